//! `kith ca store migrate`: a SQLite CA moved into PostgreSQL keeps its roots, entries, tokens,
//! nodes and audit chain, and a node attested before the move renews against the CA on
//! PostgreSQL. A non-empty target and a running source are refused.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use integration::pki::csr;
use integration::postgres::Postgres;
use serde_json::{Value, json};

use crate::common::{json_of, kith, kith_with_kek as kith_kek, serve_ca, serve_ca_with, stop};

/// The rows of a `--json` list, in a fixed order (stores order ties differently).
fn sorted(v: Value, key: &str) -> Vec<Value> {
    let mut rows = v.as_array().unwrap().clone();
    rows.sort_by_key(|r| r[key].as_str().unwrap_or_default().to_owned());
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_ca_moved_to_postgres_keeps_everything_and_its_nodes_keep_working() {
    let Some(pg) = Postgres::start_if_available("a_sqlite_ca_moved_to_postgres") else {
        return;
    };
    let url = pg.create_db("kith");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let d = data.to_str().unwrap();

    // A SQLite CA with a node, an entry, a spare token and a revoked one.
    let ca = serve_ca(&data);
    let bundle_before = kith(&["ca", "bundle", "--data-dir", d]).1;
    let token = json_of(&[
        "ca",
        "token",
        "create",
        "--name",
        "host-a",
        "--data-dir",
        d,
        "--json",
    ])["token"]
        .as_str()
        .unwrap()
        .to_owned();
    json_of(&[
        "ca",
        "token",
        "create",
        "--name",
        "host-b",
        "--data-dir",
        d,
        "--json",
    ]);
    let revoked = json_of(&[
        "ca",
        "token",
        "create",
        "--name",
        "host-c",
        "--data-dir",
        d,
        "--json",
    ])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (code, _, err) = kith(&["ca", "token", "revoke", &revoked, "--data-dir", d]);
    assert_eq!(code, 0, "{err}");
    let pem = bundle_before.clone();
    let bundle = Arc::new(
        identity::TrustBundle::from_pem(
            Some(identity::TrustDomain::new("example.org").unwrap()),
            pem.as_bytes(),
        )
        .unwrap(),
    );
    let anon = ca_api::client::client_config(bundle.clone(), None).unwrap();
    let (c, node_key) = csr();
    let (s, v) = ca_api::client::Connection::open(&ca.addr, anon.clone())
        .await
        .unwrap()
        .post_json("/v1/attest/join", &json!({"token": token, "csr": c}))
        .await
        .unwrap();
    assert_eq!(s, 200, "{v}");
    let node_chain = identity::pem::certificates(v["svid"].as_str().unwrap().as_bytes()).unwrap();
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
        d,
    ]);
    assert_eq!(code, 0, "{err}");
    let tokens_before = sorted(
        json_of(&["ca", "token", "list", "--data-dir", d, "--json"]),
        "id",
    );
    let entries_before = sorted(
        json_of(&["ca", "entry", "list", "--data-dir", d, "--json"]),
        "id",
    );
    let nodes_before = sorted(
        json_of(&["ca", "node", "list", "--data-dir", d, "--json"]),
        "spiffe_id",
    );

    // A running CA is not copied: issuances after the copy would be lost.
    let (code, _, err) = kith_kek(&["ca", "store", "migrate", "--to", &url, "--data-dir", d]);
    assert_ne!(code, 0);
    assert!(err.contains("is running"), "{err}");
    assert_eq!(stop(ca), 0);
    let head_before = kith(&["ca", "audit", "head", "--data-dir", d]).1;

    let (code, out, err) = kith_kek(&["ca", "store", "migrate", "--to", &url, "--data-dir", d]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("copied  3 join tokens"), "{out}");
    assert!(
        out.contains(&format!("head {}", head_before.trim())),
        "the copy ends at the source's head: {out}"
    );
    // Twice is refused: the target is no longer empty.
    let (code, _, err) = kith_kek(&["ca", "store", "migrate", "--to", &url, "--data-dir", d]);
    assert_ne!(code, 0);
    assert!(err.contains("already holds a CA"), "{err}");

    // The CA on PostgreSQL (a fresh data dir: nothing comes from the old file).
    let data2 = dir.path().join("data2");
    let d2 = data2.to_str().unwrap();
    let ca2 = serve_ca_with(&data2, &["--store", &url]);
    assert_eq!(
        kith(&["ca", "bundle", "--data-dir", d2]).1,
        bundle_before,
        "same roots"
    );
    assert_eq!(
        sorted(
            json_of(&["ca", "token", "list", "--data-dir", d2, "--json"]),
            "id"
        ),
        tokens_before
    );
    assert_eq!(
        sorted(
            json_of(&["ca", "entry", "list", "--data-dir", d2, "--json"]),
            "id"
        ),
        entries_before
    );
    assert_eq!(
        sorted(
            json_of(&["ca", "node", "list", "--data-dir", d2, "--json"]),
            "spiffe_id"
        ),
        nodes_before
    );
    let v = json_of(&["ca", "audit", "verify", "--data-dir", d2, "--json"]);
    assert_eq!(v["first_broken"], Value::Null, "{v}");
    let seq: i64 = head_before
        .trim()
        .split(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(v["rows"].as_i64().unwrap() >= seq, "{v}");
    let status = json_of(&["ca", "status", "--data-dir", d2, "--json"]);
    assert_eq!(status["store"]["kind"], "postgres", "{status}");

    // The node attested before the move gets a workload SVID and renews its own.
    let mtls = ca_api::client::client_config(
        bundle,
        Some((
            node_chain,
            rustls_pki_types::PrivateKeyDer::Pkcs8(node_key.serialize_der().into()),
        )),
    )
    .unwrap();
    let mut conn = ca_api::client::Connection::open(&ca2.addr, mtls)
        .await
        .unwrap();
    let (c, _) = csr();
    let (s, v) = conn
        .post_json(
            "/v1/svid",
            &json!({"spiffe_id": "spiffe://example.org/web", "csr": c}),
        )
        .await
        .unwrap();
    assert_eq!(s, 200, "{v}");
    let (c, _) = csr();
    let (s, v) = conn
        .post_json("/v1/renew", &json!({"csr": c}))
        .await
        .unwrap();
    assert_eq!(s, 200, "{v}");
    assert_eq!(stop(ca2), 0);
}
