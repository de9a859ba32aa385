//! An HTTP request from the app in pod A to pod B's address and port is answered by B's app,
//! through both sidecars (captured by their nat rules), and both sidecars report the peer's
//! SPIFFE ID.
#![allow(clippy::unwrap_used)]

use integration::{Lab, connections, logged_peers};

#[test]
fn pod_to_pod_is_mtls() {
    if !Lab::available("pod_to_pod_is_mtls") {
        return;
    }
    let mut lab = Lab::start("1h");
    let (a, a_sidecar) = lab.ready_pod("a", &[]);
    let (b, b_sidecar) = lab.ready_pod("b", &[]);

    let (ok, out) = lab.request(&a, &b, "hello from a");
    assert!(
        ok,
        "{out}\na:\n{}\nb:\n{}",
        a_sidecar.log(),
        b_sidecar.log()
    );
    assert!(out.contains("b:hello from a"), "{out}");

    // Each sidecar saw the other's SPIFFE ID: A's outbound peer is B, B's inbound peer is A.
    assert_eq!(logged_peers(&a_sidecar.log(), "outbound"), [b.spiffe_id()]);
    assert_eq!(logged_peers(&b_sidecar.log(), "inbound"), [a.spiffe_id()]);
    assert_eq!(connections(&lab.metrics(&a), "outbound", "accepted"), 1.0);
    assert_eq!(connections(&lab.metrics(&b), "inbound", "accepted"), 1.0);
    let m = lab.metrics(&b);
    assert!(
        m.contains("kith_sidecar_captured_total{outcome=\"inbound_tls\"} 1\n"),
        "{m}"
    );
    lab.keep(a_sidecar);
    lab.keep(b_sidecar);
}
