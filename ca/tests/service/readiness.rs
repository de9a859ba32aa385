//! `/readyz` (on the API and on the metrics listener) checks what issuance needs and answers 503
//! naming the failing check: the store takes a write, the signer and root are valid, the KEK
//! opens the stored signer key.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, SystemTime};

use crate::common::{TestCa, start_ca};
use integration::eventually_async;
use serde_json::Value;

/// A generous bound that only keeps a broken server from hanging the test.
const BOUND: Duration = Duration::from_secs(60);

async fn readyz_api(ca: &TestCa) -> (u16, Value) {
    ca.anon().await.get_json("/readyz").await.unwrap()
}

async fn readyz_metrics(ca: &TestCa) -> (u16, Value) {
    let stream = tokio::net::TcpStream::connect(&ca.metrics_addr)
        .await
        .unwrap();
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
    let status = resp.status().as_u16();
    use http_body_util::BodyExt;
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap())
}

/// Polls `/readyz` on both listeners until both answer `status` with `failing`.
async fn eventually_ready_is(ca: &TestCa, status: u16, failing: &[&str]) -> Value {
    let what = format!("readyz to become {status} {failing:?}");
    eventually_async(&what, BOUND, async || {
        let api = readyz_api(ca).await;
        let metrics = readyz_metrics(ca).await;
        let want =
            |(s, v): &(u16, Value)| *s == status && v["failing"] == serde_json::json!(failing);
        if want(&api) && want(&metrics) {
            Ok(api.1)
        } else {
            Err(format!("api {api:?}, metrics {metrics:?}"))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_ok_when_every_check_passes() {
    let ca = start_ca(|_| {}).await;
    let v = eventually_ready_is(&ca, 200, &[]).await;
    let names: Vec<&str> = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["store", "signer", "root", "kek"]);
    assert_eq!(v["status"], "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_names_the_store_when_it_cannot_take_a_write() {
    let ca = start_ca(|_| {}).await;
    eventually_ready_is(&ca, 200, &[]).await;
    // Another process holds the database's write lock.
    let db = rusqlite::Connection::open(ca.cfg.data_dir.join("kith-ca.db")).unwrap();
    db.execute_batch("BEGIN IMMEDIATE").unwrap();
    let v = eventually_ready_is(&ca, 503, &["store"]).await;
    assert_eq!(v["status"], "unavailable");
    let store = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "store")
        .unwrap();
    assert_eq!(store["ok"], false);
    assert!(!store["detail"].as_str().unwrap().is_empty());
    db.execute_batch("COMMIT").unwrap();
    eventually_ready_is(&ca, 200, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_names_the_kek_when_it_no_longer_opens_the_stored_signer_key() {
    let ca = start_ca(|_| {}).await;
    eventually_ready_is(&ca, 200, &[]).await;
    // The stored signer key is no longer sealed under this CA's KEK (as when the database
    // came from another CA, or the key was damaged).
    let active = ca.running.ca.authority.keys().active.id.clone();
    let db = rusqlite::Connection::open(ca.cfg.data_dir.join("kith-ca.db")).unwrap();
    let n = db
        .execute(
            "UPDATE ca_keys SET sealed_key = zeroblob(length(sealed_key)) WHERE id = ?1",
            [&active],
        )
        .unwrap();
    assert_eq!(n, 1);
    let v = eventually_ready_is(&ca, 503, &["kek"]).await;
    let kek = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "kek")
        .unwrap();
    assert!(kek["detail"].as_str().unwrap().len() > 3, "{kek}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_names_an_expired_signer_and_root() {
    let ca = start_ca(|_| {}).await;
    let later = SystemTime::now() + Duration::from_secs(400 * 86_400);
    let r = ca::ready::check(&ca.running.ca, later).await;
    assert!(!r.ready());
    assert_eq!(r.failing, ["signer", "root"]);
    let now = ca::ready::check(&ca.running.ca, SystemTime::now()).await;
    assert!(now.ready(), "{now:?}");
}
