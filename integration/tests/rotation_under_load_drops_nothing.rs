//! SVIDs of 20 s and a client sending requests for 60 s over long-lived connections and over a
//! new connection per request: zero failed requests, and at least two rotations on each side.
#![allow(clippy::unwrap_used)]

use integration::{Lab, identity_updates, metric, podapp};

#[test]
fn rotation_under_load_drops_nothing() {
    if !Lab::available("rotation_under_load_drops_nothing") {
        return;
    }
    let mut lab = Lab::start("20s");
    let (a, a_sidecar) = lab.ready_pod("a", &[]);
    let (b, b_sidecar) = lab.ready_pod("b", &[]);
    let addr = format!("{}:8080", b.ip);
    let out = lab.exec(&a.ns, &[podapp(), "load", &addr, "60", "4"]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    eprintln!("load: {v}");
    assert_eq!(
        v["failed"],
        0,
        "{v}\na:\n{}\nb:\n{}",
        a_sidecar.log(),
        b_sidecar.log()
    );
    assert!(v["ok"].as_u64().unwrap() > 1000, "{v}");
    // The pooled hop is on by default: b's sidecar took the connections as streams of a few
    // pooled mTLS connections (new ones after each rotation), not one handshake each.
    let b_metrics = lab.metrics(&b);
    let pooled = metric(
        &b_metrics,
        "kith_sidecar_pooled_connections_total{direction=\"inbound\"}",
    )
    .unwrap_or(0.0);
    let accepted = metric(
        &b_metrics,
        "kith_sidecar_connections_total{direction=\"inbound\",result=\"accepted\"}",
    )
    .unwrap_or(0.0);
    eprintln!("b: {accepted} connections over {pooled} pooled connections");
    assert!(pooled >= 1.0, "no pooled connection");
    assert!(
        accepted >= 10.0 * pooled,
        "{accepted} connections over {pooled} pooled connections"
    );
    for pod in [&a, &b] {
        let updates = identity_updates(&lab.metrics(pod));
        // The first SVID, then a rotation every 8-12 s: at least two more in 60 s.
        assert!(updates >= 3.0, "{}: {updates} identity updates", pod.name);
    }
    lab.keep(a_sidecar);
    lab.keep(b_sidecar);
}
