//! The stores, SQLite and PostgreSQL alike: group commit, single-use tokens under concurrency,
//! a tamper-evident audit chain, and nothing lost across a reopen. The legacy-chain tests at
//! the end are SQLite's (databases an older kith wrote).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use ca::store::any::AnyStore;
use ca::store::postgres::PgStore;
use ca::store::sqlite::SqliteStore;
use ca::store::{
    AuditEvent, AuditHead, AuditKey, IssuedCert, JoinToken, Node, Outcome, Store, TokenRefusal,
    Write,
};
use integration::postgres::Postgres;
use serde_json::json;

fn key() -> AuditKey {
    AuditKey::derive(&[3u8; 32])
}

fn event(action: &str, subject: &str) -> AuditEvent {
    AuditEvent {
        at: 1000,
        action: action.into(),
        subject: subject.into(),
        outcome: "ok".into(),
        detail: json!({"k": 1}),
    }
}

fn cert(i: u64) -> IssuedCert {
    let mut serial = i.to_be_bytes().to_vec();
    serial.extend_from_slice(&[7; 8]);
    IssuedCert {
        serial,
        spiffe_id: format!("spiffe://td/w/{i}"),
        kind: "workload",
        parent: None,
        not_after: 5000,
        issued_at: 1000,
    }
}

fn token(hash: u8, expires_at: i64) -> JoinToken {
    JoinToken {
        id: format!("t{hash}"),
        hash: [hash; 32],
        name: "host-a".into(),
        created_at: 1000,
        expires_at,
        used_at: None,
        revoked_at: None,
    }
}

fn node() -> Node {
    Node {
        spiffe_id: "spiffe://td/kith/node/host-a".into(),
        name: "host-a".into(),
        attested_at: 1000,
        last_issued_at: 1000,
        evicted_at: None,
    }
}

fn join(hash: u8, now: i64, i: u64) -> Write {
    Write::JoinIssue {
        token_id: format!("t{hash}"),
        token_hash: [hash; 32],
        now,
        cert: cert(i),
        node: node(),
        audit: event("issue", "node"),
    }
}

/// Where a test's store lives: a SQLite file in a temporary directory, or a database of a
/// throwaway PostgreSQL cluster. Every test below runs on both.
struct Fixture {
    dir: tempfile::TempDir,
    pg: Option<Postgres>,
}

impl Fixture {
    fn sqlite() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            pg: None,
        }
    }

    /// None (after printing why) where PostgreSQL cannot run; a failure under CI=true.
    fn postgres(test: &str) -> Option<Self> {
        let pg = Postgres::start_if_available(test)?;
        pg.create_db("kith");
        Some(Self {
            dir: tempfile::tempdir().unwrap(),
            pg: Some(pg),
        })
    }

    fn url(&self) -> Option<String> {
        self.pg.as_ref().map(|pg| pg.url_for("kith"))
    }

    async fn open(&self) -> AnyStore {
        self.try_open().await.unwrap()
    }

    async fn try_open(&self) -> Result<AnyStore, ca::store::StoreError> {
        match self.url() {
            None => SqliteStore::open(self.dir.path(), key()).map(AnyStore::Sqlite),
            Some(url) => PgStore::open(&url, key(), "test")
                .await
                .map(AnyStore::Postgres),
        }
    }

    /// Runs SQL on the database behind the store's back (tampering, a newer schema).
    fn sql(&self, statement: &str) {
        match &self.pg {
            None => {
                let raw = rusqlite::Connection::open(self.dir.path().join("kith-ca.db")).unwrap();
                raw.execute_batch(statement).unwrap();
            }
            Some(pg) => {
                pg.psql("kith", statement);
            }
        }
    }
}

/// Two tests from one body: `NAME::sqlite` and `NAME::postgres`.
macro_rules! on_both {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name(super::Fixture::sqlite()).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let Some(f) = super::Fixture::postgres(concat!(stringify!($name), "::postgres"))
                else {
                    return;
                };
                super::$name(f).await
            }
        }
    )*};
}

on_both!(
    concurrent_issuances_are_all_committed_and_chained,
    a_join_token_is_spent_exactly_once,
    expired_revoked_and_unknown_tokens_are_refused,
    a_failed_write_does_not_sink_its_group_or_break_the_chain,
    tampering_with_the_audit_log_is_found_at_the_first_broken_row,
    a_reopened_store_keeps_everything_and_continues_the_chain,
    a_database_from_a_newer_kith_is_refused,
);

async fn concurrent_issuances_are_all_committed_and_chained(f: Fixture) {
    let store = Arc::new(f.open().await);
    let tasks: Vec<_> = (0..500u64)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .write(Write::Issue {
                        cert: cert(i),
                        node: None,
                        audit: event("issue", &format!("w{i}")),
                    })
                    .await
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), Outcome::Done);
    }
    let counts = store.counts().await.unwrap();
    assert_eq!((counts.issued, counts.audit_rows), (500, 500));
    let verdict = store.verify_audit(None).await.unwrap();
    assert_eq!((verdict.rows, verdict.first_broken), (500, None));
}

async fn a_join_token_is_spent_exactly_once(f: Fixture) {
    let store = Arc::new(f.open().await);
    store
        .write(Write::CreateToken(
            token(1, 2000),
            event("token.create", "t1"),
        ))
        .await
        .unwrap();
    let tasks: Vec<_> = (0..20u64)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move { store.write(join(1, 1500, i)).await.unwrap() })
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
    assert_eq!(done, 1);
    assert_eq!(
        store.counts().await.unwrap().issued,
        1,
        "refused joins record no certificate"
    );
    assert_eq!(store.nodes().await.unwrap().len(), 1);
}

async fn expired_revoked_and_unknown_tokens_are_refused(f: Fixture) {
    let store = f.open().await;
    store
        .write(Write::CreateToken(
            token(2, 1200),
            event("token.create", "t2"),
        ))
        .await
        .unwrap();
    store
        .write(Write::CreateToken(
            token(3, 9000),
            event("token.create", "t3"),
        ))
        .await
        .unwrap();
    let revoke = Write::RevokeToken {
        id: "t3".into(),
        now: 1100,
        audit: event("token.revoke", "t3"),
    };
    assert_eq!(store.write(revoke).await.unwrap(), Outcome::Done);
    assert_eq!(
        store.write(join(2, 1200, 1)).await.unwrap(),
        Outcome::TokenRefused(TokenRefusal::Expired)
    );
    assert_eq!(
        store.write(join(3, 1150, 2)).await.unwrap(),
        Outcome::TokenRefused(TokenRefusal::Revoked)
    );
    assert_eq!(
        store.write(join(9, 1150, 3)).await.unwrap(),
        Outcome::TokenRefused(TokenRefusal::Unknown)
    );
    let again = Write::RevokeToken {
        id: "t3".into(),
        now: 1100,
        audit: event("token.revoke", "t3"),
    };
    assert_eq!(store.write(again).await.unwrap(), Outcome::NotFound);
}

async fn a_failed_write_does_not_sink_its_group_or_break_the_chain(f: Fixture) {
    let store = Arc::new(f.open().await);
    store
        .write(Write::Issue {
            cert: cert(1),
            node: None,
            audit: event("issue", "a"),
        })
        .await
        .unwrap();
    // The same serial again violates the primary key: that write fails alone.
    let dup = store.write(Write::Issue {
        cert: cert(1),
        node: None,
        audit: event("issue", "dup"),
    });
    let ok = store.write(Write::Issue {
        cert: cert(2),
        node: None,
        audit: event("issue", "b"),
    });
    let (dup, ok) = tokio::join!(dup, ok);
    assert!(dup.is_err());
    assert_eq!(ok.unwrap(), Outcome::Done);
    let v = store.verify_audit(None).await.unwrap();
    assert_eq!((v.rows, v.first_broken), (2, None));
}

async fn tampering_with_the_audit_log_is_found_at_the_first_broken_row(f: Fixture) {
    let store = f.open().await;
    for i in 0..10 {
        store
            .write(Write::Audit(event("refuse", &format!("r{i}"))))
            .await
            .unwrap();
    }
    f.sql("UPDATE audit SET outcome = 'ok-but-edited' WHERE seq = 4");
    let v = store.verify_audit(None).await.unwrap();
    assert_eq!(v.first_broken, Some(4), "{v:?}");
    assert!(v.detail.unwrap().contains("altered"));

    f.sql("UPDATE audit SET outcome = 'ok' WHERE seq = 4");
    assert_eq!(store.verify_audit(None).await.unwrap().first_broken, None);
    f.sql("DELETE FROM audit WHERE seq = 7");
    let v = store.verify_audit(None).await.unwrap();
    assert_eq!(v.first_broken, Some(8));
    assert!(v.detail.unwrap().contains("row 7 is missing"));
}

async fn a_reopened_store_keeps_everything_and_continues_the_chain(f: Fixture) {
    {
        let store = f.open().await;
        store
            .write(Write::CreateToken(
                token(5, 9000),
                event("token.create", "t5"),
            ))
            .await
            .unwrap();
        store.write(join(5, 1100, 1)).await.unwrap();
        let entry = ca::store::Entry {
            id: "e1".into(),
            spiffe_id: "spiffe://td/web".into(),
            parent_id: node().spiffe_id,
            selectors: vec!["unix:uid:1000".into()],
            ttl: Some(600),
            dns: vec!["web.local".into()],
            created_at: 1000,
        };
        store
            .write(Write::PutEntry(entry, event("entry.create", "e1")))
            .await
            .unwrap();
        let evict = Write::EvictNode {
            spiffe_id: node().spiffe_id,
            now: 1200,
            audit: event("node.evict", "n"),
        };
        store.write(evict).await.unwrap();
    }
    let store = f.open().await;
    assert_eq!(store.tokens().await.unwrap()[0].used_at, Some(1100));
    assert_eq!(
        store.entries().await.unwrap()[0].selectors,
        vec!["unix:uid:1000".to_owned()]
    );
    assert_eq!(store.nodes().await.unwrap()[0].evicted_at, Some(1200));
    store
        .write(Write::Audit(event("refuse", "later")))
        .await
        .unwrap();
    let v = store.verify_audit(None).await.unwrap();
    assert_eq!((v.rows, v.first_broken), (5, None));
}

async fn a_database_from_a_newer_kith_is_refused(f: Fixture) {
    drop(f.open().await);
    if f.pg.is_some() {
        f.sql("INSERT INTO kith_migrations (version, applied_at) VALUES (99, 0)");
    } else {
        f.sql("PRAGMA user_version = 99");
    }
    let err = f.try_open().await.err().unwrap();
    assert!(err.to_string().contains("newer than this kith"), "{err}");
}

/// seq, at, action, subject, outcome, detail, hash.
type StoredRow = (i64, i64, String, String, String, String, Vec<u8>);

/// Rewrites every audit row from `from` on as the plain SHA-256 chain (what someone without the
/// KEK can compute), as the older, unkeyed kith wrote it.
fn recompute_plain_chain(db: &std::path::Path, from: i64) {
    let raw = rusqlite::Connection::open(db).unwrap();
    let mut prev = [0u8; 32];
    let rows: Vec<StoredRow> = raw
        .prepare("SELECT seq, at, action, subject, outcome, detail, hash FROM audit ORDER BY seq")
        .unwrap()
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
            ))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect();
    for (seq, at, action, subject, outcome, detail, hash) in rows {
        if seq < from {
            prev.copy_from_slice(&hash);
            continue;
        }
        let e = AuditEvent {
            at,
            action,
            subject,
            outcome,
            detail: serde_json::Value::Null,
        };
        let h = ca::store::legacy_audit_hash(&prev, seq, &e, &detail);
        raw.execute(
            "UPDATE audit SET prev_hash = ?1, hash = ?2 WHERE seq = ?3",
            rusqlite::params![&prev[..], &h[..], seq],
        )
        .unwrap();
        prev = h;
    }
}

async fn ten_rows(dir: &std::path::Path) {
    let store = SqliteStore::open(dir, key()).unwrap();
    for i in 0..10 {
        store
            .write(Write::Audit(event("refuse", &format!("r{i}"))))
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn editing_a_row_and_recomputing_the_plain_hashes_fails_verify() {
    let dir = tempfile::tempdir().unwrap();
    ten_rows(dir.path()).await;
    let db = dir.path().join("kith-ca.db");
    let raw = rusqlite::Connection::open(&db).unwrap();
    raw.execute("UPDATE audit SET subject = 'innocent' WHERE seq = 4", [])
        .unwrap();
    recompute_plain_chain(&db, 4);
    let ro = SqliteStore::open_read_only(dir.path()).unwrap();
    let v = ro.verify_audit(&key(), None).unwrap();
    assert_eq!(v.first_broken, Some(4), "{v:?}");
    assert!(v.detail.unwrap().contains("does not match its MAC"));
    // The whole log rewritten as a plain chain: nothing in it is keyed.
    recompute_plain_chain(&db, 1);
    let v = ro.verify_audit(&key(), None).unwrap();
    assert!(v.first_broken.is_some(), "{v:?}");
    assert!(v.detail.unwrap().contains("no row is keyed"));
    // Another KEK's audit key does not verify this CA's chain.
    let v = ro
        .verify_audit(&AuditKey::derive(&[4u8; 32]), None)
        .unwrap();
    assert!(v.first_broken.is_some());
}

#[tokio::test]
async fn deleting_the_newest_rows_fails_verify_with_the_expected_head() {
    let dir = tempfile::tempdir().unwrap();
    ten_rows(dir.path()).await;
    let ro = SqliteStore::open_read_only(dir.path()).unwrap();
    let head = ro.audit_head().unwrap().unwrap();
    assert_eq!(head.seq, 10);
    let v = ro.verify_audit(&key(), Some(&head)).unwrap();
    assert_eq!((v.first_broken, v.head.as_ref()), (None, Some(&head)));

    let raw = rusqlite::Connection::open(dir.path().join("kith-ca.db")).unwrap();
    raw.execute("DELETE FROM audit WHERE seq >= 8", []).unwrap();
    // A cut chain is still a chain...
    assert_eq!(ro.verify_audit(&key(), None).unwrap().first_broken, None);
    // ...but it no longer reaches the head written down before.
    let v = ro.verify_audit(&key(), Some(&head)).unwrap();
    assert_eq!(v.first_broken, Some(8), "{v:?}");
    assert!(v.detail.unwrap().contains("rows were deleted"));
    // A head that names a row with another MAC: the chain was rewritten from there.
    let forged = AuditHead {
        seq: 5,
        hash: "00".repeat(32),
    };
    let v = ro.verify_audit(&key(), Some(&forged)).unwrap();
    assert_eq!(v.first_broken, Some(5));
    assert!(v.detail.unwrap().contains("rewritten"));
    assert!(AuditHead::parse("5:zz").is_err());
    assert_eq!(AuditHead::parse(&head.to_string()).unwrap(), head);
}

#[tokio::test]
async fn a_database_from_before_the_keyed_chain_is_keyed_on_open_and_still_verifies() {
    let dir = tempfile::tempdir().unwrap();
    ten_rows(dir.path()).await;
    let db = dir.path().join("kith-ca.db");
    // What an older kith left: a plain chain.
    recompute_plain_chain(&db, 1);
    {
        let store = SqliteStore::open(dir.path(), key()).unwrap();
        let rows = store.audit(10, 10).await.unwrap();
        assert_eq!(rows[0].event.action, "audit.keyed");
        assert_eq!(rows[0].event.detail["legacy_rows"], 10);
        store
            .write(Write::Audit(event("refuse", "after")))
            .await
            .unwrap();
        let v = store.verify_audit(None).await.unwrap();
        assert_eq!((v.rows, v.legacy_rows, v.first_broken), (12, 10, None));
    }
    // Reopening does not key it twice.
    drop(SqliteStore::open(dir.path(), key()).unwrap());
    let ro = SqliteStore::open_read_only(dir.path()).unwrap();
    assert_eq!(ro.verify_audit(&key(), None).unwrap().rows, 12);
    // Cutting the log back to its legacy part leaves nothing keyed.
    let raw = rusqlite::Connection::open(&db).unwrap();
    raw.execute("DELETE FROM audit WHERE seq > 10", []).unwrap();
    let v = ro.verify_audit(&key(), None).unwrap();
    assert!(v.detail.unwrap().contains("no row is keyed"));
}

#[tokio::test]
async fn the_store_refuses_to_open_under_another_kek() {
    let dir = tempfile::tempdir().unwrap();
    ten_rows(dir.path()).await;
    let err = SqliteStore::open(dir.path(), AuditKey::derive(&[4u8; 32]))
        .err()
        .unwrap();
    assert!(err.to_string().contains("key-encryption key"), "{err}");
}
