//! Two `kith ca serve` processes on one PostgreSQL database: both issue, no serial is recorded
//! twice, the audit log is one chain that verifies from either, and one replica holds the keys
//! lease, the same one seen from both.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use integration::eventually_async;
use integration::pki::csr;
use integration::postgres::Postgres;
use serde_json::{Value, json};

use crate::common::{json_of, kith, kith_with_kek, serve_ca_with, stop};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_ca_processes_on_one_database_issue_with_one_chain_and_one_lease() {
    let Some(pg) = Postgres::start_if_available("two_ca_processes_on_one_database") else {
        return;
    };
    let url = pg.create_db("kith");
    let dir = tempfile::tempdir().unwrap();
    let (da, db) = (dir.path().join("a"), dir.path().join("b"));
    let a = serve_ca_with(&da, &["--store", &url]);
    let b = serve_ca_with(&db, &["--store", &url]);
    let (da, db) = (da.to_str().unwrap(), db.to_str().unwrap());

    let pem = kith(&["ca", "bundle", "--data-dir", da]).1;
    assert_eq!(pem, kith(&["ca", "bundle", "--data-dir", db]).1, "one root");
    let bundle = Arc::new(
        identity::TrustBundle::from_pem(
            Some(identity::TrustDomain::new("example.org").unwrap()),
            pem.as_bytes(),
        )
        .unwrap(),
    );
    // A token made through B joins at A.
    let token = json_of(&[
        "ca",
        "token",
        "create",
        "--name",
        "host-a",
        "--data-dir",
        db,
        "--json",
    ])["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let (c, node_key) = csr();
    let anon = ca_api::client::client_config(bundle.clone(), None).unwrap();
    let (s, v) = ca_api::client::Connection::open(&a.addr, anon)
        .await
        .unwrap()
        .post_json("/v1/attest/join", &json!({"token": token, "csr": c}))
        .await
        .unwrap();
    assert_eq!(s, 200, "{v}");
    let chain = identity::pem::certificates(v["svid"].as_str().unwrap().as_bytes()).unwrap();
    let (code, _, err) = kith(&[
        "ca",
        "entry",
        "create",
        "--id",
        "spiffe://example.org/web",
        "--parent",
        "spiffe://example.org/kith/node/host-a",
        "--selector",
        "unix:uid:1000",
        "--data-dir",
        da,
    ]);
    assert_eq!(code, 0, "{err}");
    let mtls = ca_api::client::client_config(
        bundle,
        Some((
            chain,
            rustls_pki_types::PrivateKeyDer::Pkcs8(node_key.serialize_der().into()),
        )),
    )
    .unwrap();
    let mut on_a = ca_api::client::Connection::open(&a.addr, mtls.clone())
        .await
        .unwrap();
    let mut on_b = ca_api::client::Connection::open(&b.addr, mtls)
        .await
        .unwrap();
    // B learns A's entry within its 2 s refresh.
    eventually_async(
        "B to issue for A's entry",
        Duration::from_secs(60),
        async || {
            let (c, _) = csr();
            let (s, v) = on_b
                .post_json(
                    "/v1/svid",
                    &json!({"spiffe_id": "spiffe://example.org/web", "csr": c}),
                )
                .await
                .unwrap();
            if s == 200 { Ok(()) } else { Err(v) }
        },
    )
    .await;
    for i in 0..30 {
        let conn = if i % 2 == 0 { &mut on_a } else { &mut on_b };
        let (c, _) = csr();
        let (s, v) = conn
            .post_json(
                "/v1/svid",
                &json!({"spiffe_id": "spiffe://example.org/web", "csr": c}),
            )
            .await
            .unwrap();
        assert_eq!(s, 200, "{v}");
    }

    assert_eq!(
        pg.psql(
            "kith",
            "SELECT count(*), count(DISTINCT serial) FROM certificates"
        )
        .trim(),
        "32|32",
        "the node, the first web SVID and 30 more, no serial twice"
    );
    for d in [da, db] {
        let v = json_of(&["ca", "audit", "verify", "--data-dir", d, "--json"]);
        assert_eq!(v["first_broken"], Value::Null, "{v}");
    }
    assert_eq!(
        kith(&["ca", "audit", "head", "--data-dir", da]).1,
        kith(&["ca", "audit", "head", "--data-dir", db]).1
    );
    let (sa, sb) = (
        json_of(&["ca", "status", "--data-dir", da, "--json"]),
        json_of(&["ca", "status", "--data-dir", db, "--json"]),
    );
    assert_eq!(sa["replicas"], sb["replicas"], "the same lease from both");
    let leases = sa["replicas"].as_array().unwrap();
    assert_eq!(leases.len(), 1, "{sa}");
    let holder = &leases[0]["replica"];
    assert!(
        *holder == sa["store"]["replica"] || *holder == sb["store"]["replica"],
        "{sa} {sb}"
    );
    let (_, text, _) = kith(&["ca", "status", "--data-dir", da]);
    assert!(text.contains("lease         keys held by"), "{text}");
    assert!(text.contains("healthy"), "{text}");
    assert_eq!(stop(a), 0);
    assert_eq!(stop(b), 0);

    // With every replica stopped, the chain is checked in the database itself.
    let verify = ["ca", "audit", "verify", "--data-dir", da, "--store", &url];
    let (code, text, err) = kith_with_kek(&verify);
    assert_eq!(code, 0, "{text}{err}");
    assert!(text.starts_with("audit chain intact"), "{text}");
    pg.psql("kith", "UPDATE audit SET subject = 'edited' WHERE seq = 5");
    let (code, text, _) = kith_with_kek(&verify);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("BROKEN at row 5"), "{text}");
}
