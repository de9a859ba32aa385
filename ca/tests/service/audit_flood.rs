//! Anonymous callers cannot fill the CA's disk through its audit log: noise is only counted,
//! refusals are audited at a bounded rate with one summary row for the rest, rows keep only a
//! short excerpt of what a caller sent, and below its free-space reserve the CA refuses
//! anonymous work while renewals go on.
#![allow(clippy::unwrap_used)]

use std::time::SystemTime;

use crate::common::{Svid, TestCa, csr, start_ca, start_in};
use ca::guard::MinFree;
use ca::store::Store;
use serde_json::{Value, json};

/// The database and its write-ahead log, in bytes.
fn db_bytes(ca: &TestCa) -> u64 {
    ["kith-ca.db", "kith-ca.db-wal"]
        .iter()
        .filter_map(|f| std::fs::metadata(ca.cfg.data_dir.join(f)).ok())
        .map(|m| m.len())
        .sum()
}

async fn audit_rows(ca: &TestCa) -> Vec<ca::store::AuditRow> {
    ca.running.ca.store.audit(0, 100_000).await.unwrap()
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_kilobyte_paths_and_bad_tokens_grow_the_database_by_a_bounded_amount() {
    let ca = start_ca(|_| {}).await;
    let rows_before = audit_rows(&ca).await.len();
    let bytes_before = db_bytes(&ca);
    let long_path = format!("/{}", "x".repeat(60 * 1024));
    let mut conn = ca.anon().await;
    for _ in 0..200 {
        let (status, v) = conn.get_json(&long_path).await.unwrap();
        assert_eq!((status, v["code"].as_str()), (404, Some("not_found")));
    }
    // A bad join token is worth auditing, but only so often per source.
    let long_token = format!("0123456789ab.{}", "y".repeat(60 * 1024 - 100));
    for _ in 0..200 {
        let (status, v) = conn
            .post_json(
                "/v1/attest/join",
                &json!({"token": long_token, "csr": csr().0}),
            )
            .await
            .unwrap();
        assert_eq!((status, v["code"].as_str()), (401, Some("token_unknown")));
    }
    let rows = audit_rows(&ca).await;
    let new: Vec<_> = rows[rows_before..].to_vec();
    assert!(
        new.iter().all(|r| r.event.outcome == "token_unknown"),
        "404s are not audited"
    );
    // One source's burst (ten), plus one per ten seconds should the machine be slow.
    assert!((10..=15).contains(&new.len()), "{} refusal rows", new.len());
    let held_back = 200 - new.len() as u64;
    for r in &new {
        let text = serde_json::to_string(&r.event).unwrap();
        assert!(text.len() < 400, "a refusal row stays small: {text}");
        assert!(!text.contains("xxxxxxxx") && !text.contains("yyyyyyyy"));
        assert_eq!(r.event.detail["source"], "127.0.0.1");
    }

    // What was held back becomes one summary row.
    assert!(
        ca.running
            .ca
            .audit_suppressed(SystemTime::now())
            .await
            .unwrap()
    );
    let rows = audit_rows(&ca).await;
    let summary = rows.last().unwrap();
    assert_eq!(summary.event.action, "refuse.suppressed");
    assert_eq!(summary.event.detail["count"], held_back);
    assert_eq!(
        summary.event.detail["by_reason"]["token_unknown"],
        held_back
    );
    assert_eq!(summary.event.detail["sources"], 1);
    assert!(
        !ca.running
            .ca
            .audit_suppressed(SystemTime::now())
            .await
            .unwrap()
    );
    assert_eq!(
        ca.running
            .ca
            .store
            .verify_audit(None)
            .await
            .unwrap()
            .first_broken,
        None
    );

    // 24 MB of requests; the database grew by a few rows' worth.
    let grown = db_bytes(&ca).saturating_sub(bytes_before);
    assert!(grown < 64 * 1024, "the database grew {grown} bytes");

    let m = ca.metrics().await;
    assert_eq!(
        metric(&m, "kith_ca_refused_total{reason=\"not_found\"}"),
        200.0
    );
    assert_eq!(
        metric(&m, "kith_ca_refused_total{reason=\"token_unknown\"}"),
        200.0
    );
    assert_eq!(
        metric(&m, "kith_ca_audit_suppressed_total"),
        held_back as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authenticated_refusal_keeps_only_an_escaped_excerpt() {
    let ca = start_ca(|_| {}).await;
    let node = ca.node("host-a").await;
    let id = format!("spiffe://example.org/\u{1b}[2J{}", "z".repeat(60 * 1024));
    let (status, v) = ca
        .as_svid(&node)
        .await
        .post_json("/v1/svid", &json!({"spiffe_id": id, "csr": csr().0}))
        .await
        .unwrap();
    assert_eq!(
        (status, v["code"].as_str()),
        (400, Some("invalid_spiffe_id"))
    );
    let row = audit_rows(&ca).await.last().unwrap().clone();
    assert_eq!(row.event.outcome, "invalid_spiffe_id");
    assert_eq!(row.event.subject, node.id);
    let message = row.event.detail["message"].as_str().unwrap();
    assert!(message.chars().count() <= 65, "{message}");
    assert!(
        message.contains("\\u{1b}") && !message.contains('\u{1b}'),
        "{message}"
    );
}

async fn readyz(addr: &str) -> Value {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::get("/readyz")
        .header("host", "x")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    use http_body_util::BodyExt;
    serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_the_free_space_reserve_anonymous_work_is_refused_and_readyz_says_why() {
    let ca = start_ca(|_| {}).await;
    let ready = readyz(&ca.metrics_addr).await;
    assert_eq!(ready["status"], "ok", "{ready}");
    assert_eq!(ready["disk"]["state"], "ok");
    assert!(ready["disk"]["free_bytes"].as_u64().unwrap() > 0);
    let node = ca.node("host-a").await;
    let token = ca.token("host-b").await;
    let dir = ca.stop().await;

    // A reserve larger than any disk: the volume is "full".
    let ca = start_in(dir, |c| c.min_free_disk = MinFree::Bytes(u64::MAX / 4)).await;
    let rows_before = audit_rows(&ca).await.len();
    let (status, v) = ca
        .anon()
        .await
        .post_json("/v1/attest/join", &json!({"token": token, "csr": csr().0}))
        .await
        .unwrap();
    assert_eq!((status, v["code"].as_str()), (503, Some("disk_low")), "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("--min-free-disk"),
        "{v}"
    );
    let ready = readyz(&ca.metrics_addr).await;
    assert_eq!(ready["status"], "degraded", "{ready}");
    assert_eq!(ready["disk"]["state"], "low");
    assert!(
        ready["disk"]["message"]
            .as_str()
            .unwrap()
            .contains("anonymous requests are refused")
    );
    let status = ca
        .admin
        .call(hyper::Method::GET, "/status", None)
        .await
        .unwrap();
    assert_eq!(status["disk"]["state"], "low", "{status}");

    // The node that already has an SVID keeps renewing it.
    let (key_csr, key) = csr();
    let (s, v) = ca
        .as_svid(&node)
        .await
        .post_json("/v1/renew", &json!({"csr": key_csr}))
        .await
        .unwrap();
    assert_eq!(s, 200, "{v}");
    let _renewed = Svid::from_response(&v, key);

    let m = ca.metrics().await;
    assert_eq!(
        metric(&m, "kith_ca_refused_total{reason=\"disk_low\"}"),
        1.0
    );
    assert!(metric(&m, "kith_ca_data_reserve_bytes") > metric(&m, "kith_ca_data_free_bytes"));
    // The refused join wrote nothing; the renewal wrote its issuance row.
    let new: Vec<_> = audit_rows(&ca).await[rows_before..].to_vec();
    assert!(new.iter().all(|r| r.event.action == "issue"), "{new:?}");
    // The unused token survives for when space is back.
    assert!(
        ca.running
            .ca
            .store
            .tokens()
            .await
            .unwrap()
            .iter()
            .any(|t| t.name == "host-b" && t.used_at.is_none())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_head_is_exported_as_a_metric() {
    let ca = start_ca(|_| {}).await;
    ca.node("host-a").await;
    let head = ca.running.ca.store.audit_head().await.unwrap().unwrap();
    assert!(head.seq > 0);
    // The maintenance loop exports it every few seconds.
    let within = std::time::Duration::from_secs(20);
    integration::eventually_async("the audit head in the metrics", within, async || {
        let exported = metric(&ca.metrics().await, "kith_ca_audit_head_seq");
        if exported == head.seq as f64 {
            Ok(())
        } else {
            Err(format!(
                "kith_ca_audit_head_seq {exported}, head {}",
                head.seq
            ))
        }
    })
    .await;
}
