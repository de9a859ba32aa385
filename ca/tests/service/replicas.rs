//! Two CA replicas (two complete CAs, each with its own listeners, store pool and maintenance
//! loop) on one PostgreSQL database, and a replica whose database goes away.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use crate::common::{TestCa, csr, start_ca};
use integration::eventually_async;
use integration::postgres::Postgres;
use serde_json::{Value, json};

use crate::common;
use ca::store::Store;

async fn replica(url: &str) -> TestCa {
    let url = url.to_owned();
    start_ca(move |c| c.store = Some(url)).await
}

/// How long the replicas get to see each other's writes.
const MINUTE: Duration = Duration::from_secs(60);

async fn workload(ca: &TestCa, node: &common::Svid, id: &str) -> (u16, Value) {
    let (c, _key) = csr();
    ca.as_svid(node)
        .await
        .post_json("/v1/svid", &json!({"spiffe_id": id, "csr": c}))
        .await
        .unwrap()
}

async fn get(addr: &str, path: &str) -> (u16, String) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header("host", "x")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    use http_body_util::BodyExt;
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_keys_tokens_entries_and_one_audit_chain() {
    let Some(pg) = Postgres::start_if_available("two_replicas_share_keys_tokens_entries") else {
        return;
    };
    let url = pg.create_db("kith");
    let a = replica(&url).await;
    let b = replica(&url).await;
    // One root: B loaded what A created.
    assert_eq!(a.bundle().x509_authorities(), b.bundle().x509_authorities());
    assert_eq!(
        a.running.ca.authority.keys().active.id,
        b.running.ca.authority.keys().active.id
    );

    // A token made on A pays for a join on B, once.
    let token = a.token("host-a").await;
    let (c, key) = csr();
    let (s, v) = b
        .anon()
        .await
        .post_json("/v1/attest/join", &json!({"token": token, "csr": c}))
        .await
        .unwrap();
    assert_eq!(s, 200, "{v}");
    let node = common::Svid::from_response(&v, key);
    let (c, _) = csr();
    let (s, v) = a
        .anon()
        .await
        .post_json("/v1/attest/join", &json!({"token": token, "csr": c}))
        .await
        .unwrap();
    assert_eq!(s, 401, "a spent token is spent on every replica: {v}");

    // An entry made on B reaches A's cache; workloads are issued on both.
    b.entry("spiffe://example.org/web", &node.id).await;
    eventually_async("A sees B's entry", MINUTE, async || {
        workload(&a, &node, "spiffe://example.org/web").await.0 == 200
    })
    .await;
    for i in 0..20 {
        let ca = if i % 2 == 0 { &a } else { &b };
        let (s, v) = workload(ca, &node, "spiffe://example.org/web").await;
        assert_eq!(s, 200, "{v}");
    }

    // One lease holder, the same seen from both.
    let sa = a
        .admin
        .call(hyper::Method::GET, "/status", None)
        .await
        .unwrap();
    let sb = b
        .admin
        .call(hyper::Method::GET, "/status", None)
        .await
        .unwrap();
    eventually_async("a lease holder", MINUTE, async || {
        let s = a
            .admin
            .call(hyper::Method::GET, "/status", None)
            .await
            .unwrap();
        s["replicas"].as_array().is_some_and(|r| r.len() == 1)
    })
    .await;
    assert_eq!(sa["store"]["kind"], "postgres");
    assert_eq!(sa["store"]["healthy"], true);
    assert_ne!(sa["store"]["replica"], sb["store"]["replica"]);
    let s = b
        .admin
        .call(hyper::Method::GET, "/status", None)
        .await
        .unwrap();
    let lease = &s["replicas"][0];
    assert_eq!(lease["name"], "keys");
    assert!(
        lease["replica"] == sa["store"]["replica"] || lease["replica"] == sb["store"]["replica"],
        "{s}"
    );

    // No serial twice; one chain through both replicas' rows, verified from either.
    assert_eq!(
        pg.psql(
            "kith",
            "SELECT count(*) - count(DISTINCT serial) FROM certificates"
        )
        .trim(),
        "0"
    );
    let counts = b.running.ca.store.counts().await.unwrap();
    assert_eq!(
        counts.issued,
        1 + 1 + 20,
        "the node, the first web SVID, 20 more"
    );
    for ca in [&a, &b] {
        let v = ca
            .admin
            .call(hyper::Method::GET, "/audit/verify", None)
            .await
            .unwrap();
        assert_eq!(v["first_broken"], Value::Null, "{v}");
    }
    assert_eq!(
        a.running.ca.store.audit_head().await.unwrap(),
        b.running.ca.store.audit_head().await.unwrap()
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_without_its_database_answers_503_and_recovers_by_itself() {
    let Some(pg) = Postgres::start_if_available("a_replica_without_its_database") else {
        return;
    };
    let url = pg.create_db("kith");
    let ca = replica(&url).await;
    let node = ca.node("host-a").await;
    ca.entry("spiffe://example.org/web", &node.id).await;
    assert_eq!(
        workload(&ca, &node, "spiffe://example.org/web").await.0,
        200
    );

    pg.stop();
    let (s, v) = workload(&ca, &node, "spiffe://example.org/web").await;
    assert_eq!(s, 503, "{v}");
    assert_eq!(v["code"], "store_unavailable", "{v}");
    eventually_async("/readyz says unready", MINUTE, async || {
        get(&ca.metrics_addr, "/readyz").await.0 == 503
    })
    .await;
    let (s, body) = get(&ca.metrics_addr, "/readyz").await;
    assert_eq!(s, 503);
    assert!(body.contains("\"store\""), "{body}");
    // What needs no write still works: health and the bundle.
    assert_eq!(get(&ca.metrics_addr, "/healthz").await.0, 200);
    let (s, _) = ca.anon().await.get_json("/v1/bundle").await.unwrap();
    assert_eq!(s, 200);
    let status = ca
        .admin
        .call(hyper::Method::GET, "/status", None)
        .await
        .unwrap();
    assert_eq!(status["store"]["healthy"], false, "{status}");

    pg.restart();
    eventually_async("issuance resumes", MINUTE, async || {
        workload(&ca, &node, "spiffe://example.org/web").await.0 == 200
    })
    .await;
    eventually_async("/readyz says ready", MINUTE, async || {
        get(&ca.metrics_addr, "/readyz").await.0 == 200
    })
    .await;
    ca.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_prepares_the_next_signer_and_the_other_adopts_it() {
    let Some(pg) = Postgres::start_if_available("one_replica_prepares_the_next_signer") else {
        return;
    };
    let url = pg.create_db("kith");
    // A one-minute signer: the next one is prepared at 30 s and signs from 50 s on.
    let short = |u: String| {
        move |c: &mut ca::config::Config| {
            c.store = Some(u);
            c.intermediate_ttl = Duration::from_secs(60);
            c.workload_ttl = Duration::from_secs(20);
            c.node_ttl = Duration::from_secs(20);
        }
    };
    let a = start_ca(short(url.clone())).await;
    let b = start_ca(short(url.clone())).await;
    let first = a.running.ca.authority.keys().active.id.clone();
    assert_eq!(b.running.ca.authority.keys().active.id, first);
    eventually_async(
        "both replicas sign with the same new signer",
        Duration::from_secs(120),
        async || {
            let (ka, kb) = (a.running.ca.authority.keys(), b.running.ca.authority.keys());
            ka.active.id != first && ka.active.id == kb.active.id
        },
    )
    .await;
    // One preparer: two replicas preparing would each make a successor for the same slot
    // (the same activation time).
    for kind in ["intermediate", "jwt"] {
        assert_eq!(
            pg.psql(
                "kith",
                &format!(
                    "SELECT count(*) - count(DISTINCT activate_at) FROM ca_keys WHERE kind = '{kind}'"
                )
            )
            .trim(),
            "0",
            "{}",
            pg.psql("kith", "SELECT id, kind, activate_at, created_at FROM ca_keys")
        );
    }
    assert_eq!(
        pg.psql("kith", "SELECT count(*) FROM ca_keys WHERE kind = 'root'")
            .trim(),
        "1"
    );
    let node = b.node("host-a").await;
    b.entry("spiffe://example.org/web", &node.id).await;
    eventually_async("A issues with the new signer", MINUTE, async || {
        workload(&a, &node, "spiffe://example.org/web").await.0 == 200
    })
    .await;
    let v = a
        .admin
        .call(hyper::Method::GET, "/audit/verify", None)
        .await
        .unwrap();
    assert_eq!(v["first_broken"], Value::Null, "{v}");
    a.stop().await;
    b.stop().await;
}
