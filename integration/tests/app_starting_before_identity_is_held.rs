//! Pod A's app connects before its sidecar has an SVID (its token is not yet valid, so the CA
//! refuses it): the connection is held, not refused, and succeeds once the identity arrives.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use integration::{Lab, connections, eventually, identity_updates};

#[test]
fn app_starting_before_identity_is_held() {
    if !Lab::available("app_starting_before_identity_is_held") {
        return;
    }
    let mut lab = Lab::start("1h");
    let (b, b_sidecar) = lab.ready_pod("b", &[]);
    let a = lab.add_pod("a");
    // An expired token: the CA refuses it and the sidecar keeps retrying.
    lab.write_token(&a, Duration::from_secs(7200));
    lab.init_capture(&a);
    let a_sidecar = lab.start_sidecar(&a, &["--hold-timeout", "60s"]);
    eventually(
        "A's sidecar tried and failed",
        Duration::from_secs(20),
        || a_sidecar.log().contains("k8s_token_expired"),
    );
    assert!(!lab.exec_ok(
        &a.ns,
        &[integration::podapp(), "get", "127.0.0.1:15020", "/ready"]
    ));

    let (early, request) = {
        let lab_ref = &lab;
        std::thread::scope(|s| {
            let request = s.spawn(|| lab_ref.request(&a, &b, "app started first"));
            std::thread::sleep(Duration::from_secs(2));
            let early = request.is_finished();
            // The kubelet rotates the token: the next attempt gets the SVID.
            lab_ref.write_token(&a, Duration::ZERO);
            (early, request.join().unwrap())
        })
    };
    assert!(
        !early,
        "the request was answered (or refused) before A had an identity"
    );
    let (ok, out) = request;
    assert!(
        ok && out.contains("b:app started first"),
        "{out}\n{}",
        a_sidecar.log()
    );
    let m = lab.metrics(&a);
    assert_eq!(connections(&m, "outbound", "no_identity_yet"), 0.0, "{m}");
    assert_eq!(identity_updates(&m), 1.0, "{m}");
    lab.keep(a_sidecar);
    lab.keep(b_sidecar);
}
