//! Several CA replicas on one PostgreSQL database, at the store level: each replica is its
//! own `PgStore` (its own pool and writer), as in separate processes. A token is spent once
//! across them, a serial cannot be recorded twice, the audit log stays one chain, concurrent
//! starts migrate once, one replica holds a lease, and a store whose database goes away fails
//! its writes with a clear error and recovers by itself when the database returns.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use ca::store::postgres::PgStore;
use ca::store::{
    AuditEvent, AuditKey, IssuedCert, JoinToken, Node, Outcome, Store, TokenRefusal, Write,
};
use integration::postgres::Postgres;
use serde_json::json;

fn key() -> AuditKey {
    AuditKey::derive(&[5u8; 32])
}

fn event(action: &str, subject: &str) -> AuditEvent {
    AuditEvent {
        at: 1000,
        action: action.into(),
        subject: subject.into(),
        outcome: "ok".into(),
        detail: json!({"replica": subject}),
    }
}

fn cert(i: u64, replica: u8) -> IssuedCert {
    let mut serial = i.to_be_bytes().to_vec();
    serial.extend_from_slice(&[replica; 8]);
    IssuedCert {
        serial,
        spiffe_id: format!("spiffe://td/w/{i}"),
        kind: "workload",
        parent: None,
        not_after: 5000,
        issued_at: 1000,
    }
}

fn join(i: u64) -> Write {
    Write::JoinIssue {
        token_id: "t1".into(),
        token_hash: [1; 32],
        now: 1500,
        cert: cert(i, 9),
        node: Node {
            spiffe_id: "spiffe://td/kith/node/host-a".into(),
            name: "host-a".into(),
            attested_at: 1500,
            last_issued_at: 1500,
            evicted_at: None,
        },
        audit: event("issue", "node"),
    }
}

/// A cluster with database `kith`, or None where PostgreSQL cannot run.
fn cluster(test: &str) -> Option<(Postgres, String)> {
    let pg = Postgres::start_if_available(test)?;
    let url = pg.create_db("kith");
    Some((pg, url))
}

async fn replicas(url: &str, n: usize) -> Vec<Arc<PgStore>> {
    let mut out = Vec::new();
    for i in 0..n {
        out.push(Arc::new(
            PgStore::open(url, key(), &format!("r{i}")).await.unwrap(),
        ));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_used_on_two_replicas_at_once_is_spent_exactly_once() {
    let Some((_pg, url)) = cluster("a_token_used_on_two_replicas_at_once") else {
        return;
    };
    let r = replicas(&url, 2).await;
    let token = JoinToken {
        id: "t1".into(),
        hash: [1; 32],
        name: "host-a".into(),
        created_at: 1000,
        expires_at: 2000,
        used_at: None,
        revoked_at: None,
    };
    r[0].write(Write::CreateToken(token, event("token.create", "t1")))
        .await
        .unwrap();
    // 40 joins with the one token, half through each replica, all at once.
    let tasks: Vec<_> = (0..40u64)
        .map(|i| {
            let s = r[(i % 2) as usize].clone();
            tokio::spawn(async move { s.write(join(i)).await.unwrap() })
        })
        .collect();
    let mut done = 0;
    for t in tasks {
        match t.await.unwrap() {
            Outcome::Done => done += 1,
            Outcome::TokenRefused(TokenRefusal::Used) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(done, 1, "the token paid for exactly one node SVID");
    assert_eq!(r[1].counts().await.unwrap().issued, 1);
    assert!(r[1].token("t1").await.unwrap().unwrap().used_at.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_write_one_audit_chain_and_no_serial_twice() {
    let Some((pg, url)) = cluster("replicas_write_one_audit_chain") else {
        return;
    };
    let r = replicas(&url, 3).await;
    let tasks: Vec<_> = (0..600u64)
        .map(|i| {
            let which = (i % 3) as usize;
            let s = r[which].clone();
            tokio::spawn(async move {
                s.write(Write::Issue {
                    cert: cert(i, which as u8),
                    node: None,
                    audit: event("issue", &format!("r{which}")),
                })
                .await
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), Outcome::Done);
    }
    // The same serial through another replica is refused by the database.
    let dup = r[2]
        .write(Write::Issue {
            cert: cert(7, 1),
            node: None,
            audit: event("issue", "dup"),
        })
        .await;
    assert!(dup.is_err(), "a serial was recorded twice");
    let v = r[1].verify_audit(None).await.unwrap();
    assert_eq!((v.rows, v.first_broken), (600, None), "{v:?}");
    // Rows of all three replicas are in the one chain.
    let rows = r[0].audit(0, 1000).await.unwrap();
    for who in ["r0", "r1", "r2"] {
        assert_eq!(
            rows.iter().filter(|row| row.event.subject == who).count(),
            200
        );
    }
    assert_eq!(
        pg.psql(
            "kith",
            "SELECT count(*) - count(DISTINCT serial) FROM certificates"
        )
        .trim(),
        "0"
    );
    assert_eq!(
        r[2].audit_head().await.unwrap().unwrap().seq,
        600,
        "every replica sees the same head"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_starting_together_migrate_once() {
    let Some((pg, url)) = cluster("replicas_starting_together_migrate_once") else {
        return;
    };
    let opens: Vec<_> = (0..4)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move { PgStore::open(&url, key(), &format!("r{i}")).await })
        })
        .collect();
    for o in opens {
        o.await.unwrap().unwrap();
    }
    assert_eq!(
        pg.psql(
            "kith",
            "SELECT count(*), count(DISTINCT version) FROM kith_migrations"
        )
        .trim(),
        "1|1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_holds_a_lease_until_it_lapses() {
    let Some((_pg, url)) = cluster("one_replica_holds_a_lease") else {
        return;
    };
    let r = replicas(&url, 2).await;
    assert!(r[0].try_lease("keys", 60).await.unwrap());
    assert!(!r[1].try_lease("keys", 60).await.unwrap());
    assert!(
        r[0].try_lease("keys", 60).await.unwrap(),
        "the holder renews"
    );
    let leases = r[1].leases().await.unwrap();
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0].replica, "r0");
    // A lease renewed with no time left lapses at once: the other replica takes it.
    assert!(r[0].try_lease("keys", 0).await.unwrap());
    assert!(r[1].try_lease("keys", 60).await.unwrap());
    assert!(!r[0].try_lease("keys", 60).await.unwrap());
    assert_eq!(r[0].leases().await.unwrap()[0].replica, "r1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_whose_database_goes_away_fails_writes_and_recovers_by_itself() {
    let Some((pg, url)) = cluster("a_store_whose_database_goes_away") else {
        return;
    };
    let store = PgStore::open(&url, key(), "r0").await.unwrap();
    store
        .write(Write::Audit(event("a", "before")))
        .await
        .unwrap();
    pg.stop();
    let err = store
        .write(Write::Audit(event("a", "during")))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ca::store::StoreError::Db(_)),
        "a database error, not a hang or a panic: {err}"
    );
    assert!(store.counts().await.is_err());
    assert_eq!(store.describe()["reachable"], false);
    pg.restart();
    // The pool drops the dead connections and makes new ones: no restart of the store.
    store
        .write(Write::Audit(event("a", "after")))
        .await
        .unwrap();
    assert_eq!(store.describe()["reachable"], true);
    let v = store.verify_audit(None).await.unwrap();
    assert_eq!((v.rows, v.first_broken), (2, None), "{v:?}");
}

/// A group commits without waiting for the WAL flush (so the head row is free for the other
/// replicas at once); its writers are answered only after a synchronous commit made after it
/// succeeded. While that commit fails, no write is reported done; the chain stays whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_is_answered_only_after_a_durable_commit_that_follows_it() {
    let Some((pg, url)) = cluster("a_write_is_answered_only_after_a_durable_commit") else {
        return;
    };
    // A role without superuser rights owns the database, so a revoked privilege applies to it.
    pg.psql(
        "kith",
        "CREATE ROLE ca LOGIN; ALTER DATABASE kith OWNER TO ca; ALTER SCHEMA public OWNER TO ca",
    );
    let url = url.replace("postgres://postgres@", "postgres://ca@");
    let r = replicas(&url, 2).await;
    r[0].write(Write::Audit(event("a", "before")))
        .await
        .unwrap();
    // The durable commit each answer waits for writes a logical-decoding message; refuse it.
    let emit = "FUNCTION pg_logical_emit_message(boolean, text, text)";
    pg.psql("kith", &format!("REVOKE EXECUTE ON {emit} FROM PUBLIC"));
    let tasks: Vec<_> = (0..20u64)
        .map(|i| {
            let s = r[(i % 2) as usize].clone();
            tokio::spawn(async move {
                s.write(Write::Issue {
                    cert: cert(i, (i % 2) as u8),
                    node: None,
                    audit: event("issue", "unconfirmed"),
                })
                .await
            })
        })
        .collect();
    for t in tasks {
        let err = t.await.unwrap().unwrap_err();
        assert!(err.to_string().contains("durable"), "{err}");
    }
    pg.psql("kith", &format!("GRANT EXECUTE ON {emit} TO PUBLIC"));
    r[1].write(Write::Audit(event("a", "after"))).await.unwrap();
    // The unconfirmed groups did commit: their rows are in the one chain, which verifies.
    let v = r[0].verify_audit(None).await.unwrap();
    assert_eq!((v.rows, v.first_broken), (22, None), "{v:?}");
    assert_eq!(r[0].counts().await.unwrap().issued, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_opened_under_another_kek_is_refused() {
    let Some((_pg, url)) = cluster("a_store_opened_under_another_kek") else {
        return;
    };
    let store = PgStore::open(&url, key(), "r0").await.unwrap();
    store.write(Write::Audit(event("a", "x"))).await.unwrap();
    let err = PgStore::open(&url, AuditKey::derive(&[6u8; 32]), "r1")
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("key-encryption key"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_host_string_finds_the_server_that_takes_writes() {
    if !Postgres::available("a_multi_host_string_finds_the_server_that_takes_writes") {
        return;
    }
    // The first host answers but is read-only, as a standby is; the second is the primary.
    // It has the database too, so only its read-only state can make the store pass it by.
    let standby = Postgres::start();
    standby.create_db("kith");
    standby.psql(
        "postgres",
        "ALTER SYSTEM SET default_transaction_read_only = on",
    );
    standby.psql("postgres", "SELECT pg_reload_conf()");
    assert_eq!(
        standby.psql("kith", "SHOW transaction_read_only").trim(),
        "on"
    );
    let primary = Postgres::start();
    primary.create_db("kith");
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/kith?sslmode=disable&target_session_attrs=read-write",
        standby.port(),
        primary.port()
    );
    let store = PgStore::open(&url, key(), "r0").await.unwrap();
    store.write(Write::Audit(event("a", "x"))).await.unwrap();
    assert_eq!(
        primary.psql("kith", "SELECT count(*) FROM audit").trim(),
        "1"
    );
}
