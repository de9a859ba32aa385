//! The CA's API end to end on loopback: attestation by join token, workload SVIDs allowed by
//! registration entries, renewal, entries with ETags, the bundle, and a restart that loses
//! nothing.
#![allow(clippy::unwrap_used)]

use std::time::SystemTime;

use crate::common::{csr, start_ca, start_in};
use identity::{SpiffeId, verify_x509_svid};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_token_buys_one_node_svid() {
    let ca = start_ca(|_| {}).await;
    let node = ca.node("host-a").await;
    assert_eq!(node.id, "spiffe://example.org/kith/node/host-a");
    let id = verify_x509_svid(&node.chain, &ca.bundle(), SystemTime::now()).unwrap();
    assert_eq!(id.as_str(), node.id);
    let r = &node.response;
    let (exp, renew) = (
        r["expires_at"].as_i64().unwrap(),
        r["renew_after"].as_i64().unwrap(),
    );
    let now = ca::authority::unix(SystemTime::now());
    assert!((exp - now - 86_400).abs() < 60, "node SVIDs last 24h");
    assert!(
        renew > now + 86_400 * 4 / 10 - 60 && renew < now + 86_400 * 6 / 10 + 60,
        "renew hint at 40-60 %"
    );
    assert_eq!(r["bundle"]["keys"][0]["use"], "x509-svid");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_lets_a_node_obtain_a_workload_svid_and_nothing_else() {
    let ca = start_ca(|_| {}).await;
    let node = ca.node("host-a").await;
    ca.entry("spiffe://example.org/web", &node.id).await;
    let mut conn = ca.as_svid(&node).await;
    let (c, _) = csr();
    let (status, v) = conn
        .post_json(
            "/v1/svid",
            &json!({"spiffe_id": "spiffe://example.org/web", "csr": c}),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{v}");
    let chain = identity::pem::certificates(v["svid"].as_str().unwrap().as_bytes()).unwrap();
    assert_eq!(
        verify_x509_svid(&chain, &ca.bundle(), SystemTime::now())
            .unwrap()
            .as_str(),
        "spiffe://example.org/web"
    );
    let exp = v["expires_at"].as_i64().unwrap() - ca::authority::unix(SystemTime::now());
    assert!((exp - 3600).abs() < 60, "workload SVIDs last 1h: {exp}");

    let (c, _) = csr();
    let (status, v) = conn
        .post_json(
            "/v1/svid",
            &json!({"spiffe_id": "spiffe://example.org/db", "csr": c}),
        )
        .await
        .unwrap();
    assert_eq!((status, v["code"].as_str().unwrap()), (403, "not_entitled"));
    // Another node may not use this node's entry.
    let other = ca.node("host-b").await;
    let (c, _) = csr();
    let (status, v) = ca
        .as_svid(&other)
        .await
        .post_json(
            "/v1/svid",
            &json!({"spiffe_id": "spiffe://example.org/web", "csr": c}),
        )
        .await
        .unwrap();
    assert_eq!((status, v["code"].as_str().unwrap()), (403, "not_entitled"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_gives_the_same_id_and_entries_answer_with_etags() {
    let ca = start_ca(|_| {}).await;
    let node = ca.node("host-a").await;
    let mut conn = ca.as_svid(&node).await;
    let (c, _) = csr();
    let (status, v) = conn
        .post_json("/v1/renew", &json!({"csr": c}))
        .await
        .unwrap();
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["spiffe_id"], node.id);

    let (status, headers, body) = conn
        .send(hyper::Method::GET, "/v1/entries", None, &[])
        .await
        .unwrap();
    assert_eq!(status, 200);
    let etag = headers.get("etag").unwrap().to_str().unwrap().to_owned();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["entries"].as_array().unwrap().len(), 0);
    let (status, _, _) = conn
        .send(
            hyper::Method::GET,
            "/v1/entries",
            None,
            &[("if-none-match", &etag)],
        )
        .await
        .unwrap();
    assert_eq!(status, 304, "unchanged lists cost nothing");
    ca.entry("spiffe://example.org/web", &node.id).await;
    let (status, headers, _) = conn
        .send(
            hyper::Method::GET,
            "/v1/entries",
            None,
            &[("if-none-match", &etag)],
        )
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_ne!(headers.get("etag").unwrap().to_str().unwrap(), etag);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bundle_is_public_as_json_and_pem() {
    let ca = start_ca(|_| {}).await;
    let mut conn = ca.anon().await;
    let (status, v) = conn.get_json("/v1/bundle").await.unwrap();
    assert_eq!(status, 200);
    let parsed = identity::TrustBundle::from_spiffe_json(
        ca.cfg.trust_domain.clone(),
        v.to_string().as_bytes(),
    )
    .unwrap();
    assert_eq!(parsed.x509_authorities(), ca.bundle().x509_authorities());
    let (status, headers, body) = conn
        .send(hyper::Method::GET, "/v1/bundle?format=pem", None, &[])
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        headers.get("content-type").unwrap(),
        "application/x-pem-file"
    );
    assert_eq!(
        String::from_utf8(body.to_vec()).unwrap(),
        ca.bundle().to_pem()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_loses_nothing() {
    let ca = start_ca(|_| {}).await;
    let node = ca.node("host-a").await;
    let entry = ca.entry("spiffe://example.org/web", &node.id).await;
    let spare = ca.token("host-b").await;
    let root = ca.bundle().x509_authorities().to_vec();
    let signer = ca.running.ca.authority.keys().active.id.clone();
    ca.admin
        .call(
            hyper::Method::POST,
            "/nodes/evict",
            Some(json!({"spiffe_id": node.id})),
        )
        .await
        .unwrap();
    let dir = ca.stop().await;

    let ca = start_in(dir, |_| {}).await;
    assert_eq!(ca.bundle().x509_authorities(), root.as_slice(), "same root");
    assert_eq!(
        ca.running.ca.authority.keys().active.id,
        signer,
        "same signer"
    );
    let entries = ca
        .admin
        .call(hyper::Method::GET, "/entries", None)
        .await
        .unwrap();
    assert_eq!(entries[0]["id"], entry["id"]);
    let nodes = ca
        .admin
        .call(hyper::Method::GET, "/nodes", None)
        .await
        .unwrap();
    assert!(nodes[0]["evicted_at"].is_i64(), "eviction persists");
    // The evicted node's SVID still verifies, but the CA refuses it.
    let (c, _) = csr();
    let (status, v) = ca
        .as_svid(&node)
        .await
        .post_json("/v1/renew", &json!({"csr": c}))
        .await
        .unwrap();
    assert_eq!((status, v["code"].as_str().unwrap()), (403, "node_evicted"));
    // The unused token still works once.
    let (c, _) = csr();
    let (status, _) = ca
        .anon()
        .await
        .post_json("/v1/attest/join", &json!({"token": spare, "csr": c}))
        .await
        .unwrap();
    assert_eq!(status, 200);
    let verdict = ca
        .admin
        .call(hyper::Method::GET, "/audit/verify", None)
        .await
        .unwrap();
    assert!(verdict["first_broken"].is_null(), "{verdict}");
    assert!(verdict["rows"].as_i64().unwrap() >= 8);
    let _ = SpiffeId::new(&node.id).unwrap();
}
