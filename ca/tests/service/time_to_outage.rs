//! Time to outage in `kith ca status`, `kith ca root status` and `/metrics`: the earliest of a
//! root or signer's end with no successor, a KEK that no longer opens the stored signer key
//! (an outage now) and a data volume below its free-space reserve (anonymous work refused now),
//! with the cause named.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use crate::common::{TestCa, start_ca};
use ca::guard::MinFree;
use integration::eventually_async;
use serde_json::Value;

/// A generous bound that only keeps a broken server from hanging the test.
const BOUND: Duration = Duration::from_secs(60);

async fn status(ca: &TestCa) -> Value {
    ca.admin
        .call(hyper::Method::GET, "/status", None)
        .await
        .unwrap()
}

async fn roots(ca: &TestCa) -> Value {
    ca.admin
        .call(hyper::Method::GET, "/roots", None)
        .await
        .unwrap()
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
}

/// Polls `/metrics` until the cause gauge names `cause`; returns the time to outage.
async fn eventually_metrics_name(ca: &TestCa, cause: &str) -> f64 {
    let line = format!("kith_ca_time_to_outage_cause{{cause=\"{cause}\"}}");
    let what = format!("the metrics to name {cause}");
    eventually_async(&what, BOUND, async || {
        let m = ca.metrics().await;
        if metric(&m, &line) == Some(1.0) {
            Ok(metric(&m, "kith_ca_time_to_outage_seconds ").unwrap())
        } else {
            Err(m)
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_ca_names_its_signer_as_the_time_to_outage_cause() {
    let ca = start_ca(|_| {}).await;
    let s = status(&ca).await;
    assert_eq!(s["time_to_outage_cause"], "signer", "{s}");
    let signer = s["signers"][0]["expires_in_seconds"].as_i64().unwrap();
    let outage = s["time_to_outage_seconds"].as_i64().unwrap();
    assert!((outage - signer).abs() <= 5, "{s}");
    let r = roots(&ca).await;
    assert_eq!(r["time_to_outage_cause"], "signer", "{r}");
    let m = eventually_metrics_name(&ca, "signer").await;
    assert!(m > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kek_that_no_longer_opens_the_signer_key_is_an_outage_now() {
    let ca = start_ca(|_| {}).await;
    let active = ca.running.ca.authority.keys().active.id.clone();
    let db = rusqlite::Connection::open(ca.cfg.data_dir.join("kith-ca.db")).unwrap();
    let n = db
        .execute(
            "UPDATE ca_keys SET sealed_key = zeroblob(length(sealed_key)) WHERE id = ?1",
            [&active],
        )
        .unwrap();
    assert_eq!(n, 1);
    let s = status(&ca).await;
    assert_eq!(s["time_to_outage_cause"], "kek", "{s}");
    let outage = s["time_to_outage_seconds"].as_i64().unwrap();
    assert!((-2..=0).contains(&outage), "{s}");
    assert!(
        s["time_to_outage_detail"]
            .as_str()
            .unwrap()
            .contains("key-encryption key"),
        "{s}"
    );
    let r = roots(&ca).await;
    assert_eq!(r["time_to_outage_cause"], "kek", "{r}");
    let m = eventually_metrics_name(&ca, "kek").await;
    assert!(m <= 0.0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_volume_below_its_reserve_is_an_outage_now() {
    // A reserve larger than any disk: the volume is "full".
    let ca = start_ca(|c| c.min_free_disk = MinFree::Bytes(u64::MAX / 4)).await;
    let s = status(&ca).await;
    assert_eq!(s["time_to_outage_cause"], "store_full", "{s}");
    assert_eq!(s["disk"]["state"], "low", "{s}");
    let outage = s["time_to_outage_seconds"].as_i64().unwrap();
    assert!((-2..=0).contains(&outage), "{s}");
    let m = eventually_metrics_name(&ca, "store_full").await;
    assert!(m <= 0.0, "{m}");
    let m = ca.metrics().await;
    assert_eq!(
        metric(&m, "kith_ca_time_to_outage_cause{cause=\"kek\"}"),
        Some(0.0),
        "{m}"
    );
}
