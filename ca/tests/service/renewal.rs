//! Who may renew at `/v1/renew`: only a node, with an SVID issued since its latest attestation
//! and while it is not evicted. Workload SVIDs are renewed by their node's agent through
//! `/v1/svid`, which keeps the entry's DNS names.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::common::{Svid, TestCa, csr, start_ca};
use serde_json::json;
use x509_parser::prelude::*;

fn refused(metrics: &str, reason: &str) -> u64 {
    let prefix = format!("kith_ca_refused_total{{reason=\"{reason}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |v| v.trim().parse().unwrap())
}

async fn issued(ca: &TestCa) -> i64 {
    use ca::store::Store;
    ca.running.ca.store.counts().await.unwrap().issued
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Waits until the wall clock has moved past the second `t` (node attestation times are kept
/// to the second).
async fn next_second_after(t: u64) {
    let second = Duration::from_secs(2);
    integration::eventually_async("the next second", second, async || unix_now() > t).await;
}

fn dns_names(svid: &Svid) -> Vec<String> {
    let (_, cert) = X509Certificate::from_der(&svid.chain[0]).unwrap();
    cert.subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .filter_map(|g| match g {
            GeneralName::DNSName(d) => Some((*d).to_owned()),
            _ => None,
        })
        .collect()
}

async fn workload(ca: &TestCa, node: &Svid, id: &str) -> Svid {
    let (c, key) = csr();
    let (s, v) = ca
        .as_svid(node)
        .await
        .post_json("/v1/svid", &json!({"spiffe_id": id, "csr": c}))
        .await
        .unwrap();
    assert_eq!(s, 200, "{v}");
    Svid::from_response(&v, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_svid_cannot_renew_itself() {
    let ca = start_ca(|_| {}).await;
    let node = ca.node("host-a").await;
    ca.entry("spiffe://example.org/web", &node.id).await;
    let web = workload(&ca, &node, "spiffe://example.org/web").await;
    let before = issued(&ca).await;

    // The attack: a stolen workload key asks for a fresh SVID without the agent.
    let (s, v) = ca
        .as_svid(&web)
        .await
        .post_json("/v1/renew", &json!({"csr": csr().0}))
        .await
        .unwrap();
    assert_eq!(
        (s, v["code"].as_str().unwrap()),
        (403, "workload_renewal_refused"),
        "{v}"
    );
    assert!(v["message"].as_str().unwrap().contains("/v1/svid"), "{v}");
    assert_eq!(issued(&ca).await, before, "nothing was issued");
    assert_eq!(refused(&ca.metrics().await, "workload_renewal_refused"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicted_nodes_svid_cannot_renew_even_after_the_node_joins_again() {
    let ca = start_ca(|_| {}).await;
    let stolen = ca.node("host-a").await;
    let (s, v) = ca
        .as_svid(&stolen)
        .await
        .post_json("/v1/renew", &json!({"csr": csr().0}))
        .await
        .unwrap();
    assert_eq!(s, 200, "a node renews while in good standing: {v}");

    ca.admin
        .call(
            hyper::Method::POST,
            "/nodes/evict",
            Some(json!({"spiffe_id": stolen.id})),
        )
        .await
        .unwrap();
    let (s, v) = ca
        .as_svid(&stolen)
        .await
        .post_json("/v1/renew", &json!({"csr": csr().0}))
        .await
        .unwrap();
    assert_eq!((s, v["code"].as_str().unwrap()), (403, "node_evicted"));
    assert_eq!(refused(&ca.metrics().await, "node_evicted"), 1);

    // The operator lets the real host join again under the same name; the SVID taken before
    // the eviction must stay dead.
    next_second_after(unix_now()).await;
    let rejoined = ca.node("host-a").await;
    assert_eq!(rejoined.id, stolen.id);
    let (s, v) = ca
        .as_svid(&stolen)
        .await
        .post_json("/v1/renew", &json!({"csr": csr().0}))
        .await
        .unwrap();
    assert_eq!(
        (s, v["code"].as_str().unwrap()),
        (403, "node_svid_superseded"),
        "{v}"
    );
    assert_eq!(refused(&ca.metrics().await, "node_svid_superseded"), 1);

    // The new attestation's SVID, and what it renews into, keep working.
    let (c, key) = csr();
    let (s, v) = ca
        .as_svid(&rejoined)
        .await
        .post_json("/v1/renew", &json!({"csr": c}))
        .await
        .unwrap();
    assert_eq!(s, 200, "{v}");
    let renewed = Svid::from_response(&v, key);
    let (s, v) = ca
        .as_svid(&renewed)
        .await
        .post_json("/v1/renew", &json!({"csr": csr().0}))
        .await
        .unwrap();
    assert_eq!(s, 200, "a renewed node SVID renews again: {v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_renewal_of_a_workload_keeps_the_entrys_dns_names() {
    let ca = start_ca(|_| {}).await;
    let node = ca.node("host-a").await;
    ca.admin
        .call(
            hyper::Method::POST,
            "/entries",
            Some(
                json!({"spiffe_id": "spiffe://example.org/web", "parent_id": node.id,
                "selectors": ["unix:uid:1000"], "dns": ["web.internal", "web"]}),
            ),
        )
        .await
        .unwrap();
    let first = workload(&ca, &node, "spiffe://example.org/web").await;
    assert_eq!(dns_names(&first), ["web.internal", "web"]);

    // The node renews itself, then its agent renews the workload with the renewed node SVID.
    let (c, key) = csr();
    let (s, v) = ca
        .as_svid(&node)
        .await
        .post_json("/v1/renew", &json!({"csr": c}))
        .await
        .unwrap();
    assert_eq!(s, 200, "{v}");
    let node = Svid::from_response(&v, key);
    let second = workload(&ca, &node, "spiffe://example.org/web").await;
    assert_eq!(dns_names(&second), ["web.internal", "web"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eviction_committed_before_the_cache_is_rebuilt_still_stops_a_renewal() {
    use ca::store::{AuditEvent, Store, Write};
    let ca = start_ca(|_| {}).await;
    let node = ca.node("host-a").await;
    // The window of the race: the eviction is in the store, the CA's cache not rebuilt yet.
    let now = unix_now() as i64;
    ca.running
        .ca
        .store
        .write(Write::EvictNode {
            spiffe_id: node.id.clone(),
            now,
            audit: AuditEvent {
                at: now,
                action: "node.evict".into(),
                subject: node.id.clone(),
                outcome: "ok".into(),
                detail: json!({}),
            },
        })
        .await
        .unwrap();
    assert!(
        !ca.running
            .ca
            .is_evicted(&identity::SpiffeId::new(&node.id).unwrap())
    );
    let (s, v) = ca
        .as_svid(&node)
        .await
        .post_json("/v1/renew", &json!({"csr": csr().0}))
        .await
        .unwrap();
    assert_eq!(
        (s, v["code"].as_str().unwrap()),
        (403, "node_evicted"),
        "{v}"
    );
    assert!(v.get("svid").is_none(), "no SVID is handed out");
}
