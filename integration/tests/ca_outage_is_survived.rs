//! The CA stops for longer than a renewal period: traffic keeps flowing on the current SVIDs,
//! the sidecars fail their renewals and back off; the CA restarts on its data dir and the
//! sidecars renew without being restarted; the CA lost no state.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use integration::{Lab, eventually, identity_updates, metric};

fn failures(text: &str) -> f64 {
    metric(
        text,
        "kith_sidecar_identity_updates_total{result=\"failed\"}",
    )
    .unwrap_or(0.0)
}

#[test]
fn ca_outage_is_survived() {
    if !Lab::available("ca_outage_is_survived") {
        return;
    }
    // SVIDs of 60 s: renewals fall due 24-36 s after issue, with 24 s or more left.
    let mut lab = Lab::start("60s");
    let (a, a_sidecar) = lab.ready_pod("a", &[]);
    let (b, b_sidecar) = lab.ready_pod("b", &[]);
    let audit_before = lab.ca_cli(&["audit", "list", "--json", "--limit", "100000"]);
    let rows_before = serde_json::from_str::<serde_json::Value>(&audit_before)
        .unwrap()
        .as_array()
        .unwrap()
        .len();
    assert_eq!(lab.stop_ca(), Some(0), "the CA stops cleanly on SIGTERM");
    let stopped = Instant::now();

    // Both sidecars' renewals come due during the outage and fail; requests keep working.
    let mut requests = 0;
    eventually(
        "a failed renewal in both sidecars while the CA is down",
        Duration::from_secs(50),
        || {
            if failures(&lab.metrics(&a)) >= 1.0 && failures(&lab.metrics(&b)) >= 1.0 {
                return Ok(());
            }
            let (ok, out) = lab.request(&a, &b, "during the outage");
            assert!(ok, "traffic stopped with the CA: {out}");
            requests += 1;
            Err(format!("a's log:\n{}", a_sidecar.log()))
        },
    );
    // Stay down a little longer: the sidecars back off rather than hammer.
    std::thread::sleep(Duration::from_secs(8));
    let (ok, _) = lab.request(&a, &b, "still during the outage");
    assert!(ok);
    let outage = stopped.elapsed();
    for pod in [&a, &b] {
        let m = lab.metrics(pod);
        let f = failures(&m);
        assert!(
            f <= 6.0,
            "{}: {f} attempts in {outage:?}: no backoff",
            pod.name
        );
        let left = metric(
            &m,
            &format!(
                "kith_sidecar_svid_seconds_to_expiry{{spiffe_id=\"{}\"}}",
                pod.spiffe_id()
            ),
        )
        .unwrap();
        assert!(
            left > 0.0,
            "{}: the SVID expired during the outage",
            pod.name
        );
    }
    eprintln!("CA down for {outage:?}, {requests} requests served meanwhile");

    let updates_before = [
        identity_updates(&lab.metrics(&a)),
        identity_updates(&lab.metrics(&b)),
    ];
    let ca = lab.start_ca("60s");
    lab.ca = Some(ca);
    eventually(
        "both sidecars renew from the restarted CA",
        Duration::from_secs(30),
        || {
            identity_updates(&lab.metrics(&a)) > updates_before[0]
                && identity_updates(&lab.metrics(&b)) > updates_before[1]
        },
    );
    let (ok, out) = lab.request(&a, &b, "after the outage");
    assert!(ok && out.contains("b:after the outage"), "{out}");

    // No state lost: the audit chain verifies and holds every row from before.
    lab.ca_cli(&["audit", "verify"]);
    let after: serde_json::Value =
        serde_json::from_str(&lab.ca_cli(&["audit", "list", "--json", "--limit", "100000"]))
            .unwrap();
    let rows = after.as_array().unwrap();
    assert!(
        rows.len() > rows_before,
        "{} rows before, {} after",
        rows_before,
        rows.len()
    );
    assert_eq!(
        serde_json::to_string(&rows[..rows_before]).unwrap(),
        serde_json::to_string(&serde_json::from_str::<serde_json::Value>(&audit_before).unwrap())
            .unwrap()
    );
    lab.keep(a_sidecar);
    lab.keep(b_sidecar);
}
