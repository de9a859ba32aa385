//! SECURITY: inbound mesh traffic reaches the pod's own address, never 127.0.0.1. In pod B a
//! service bound to 127.0.0.1 only is not reachable by pod A through the mesh, while one bound
//! to B's address is; and B's sidecar admin port, moved off 15020 to 127.0.0.1:9901 (which
//! `kith sidecar init` does not know about, so it is captured), cannot be reached through the
//! mesh to `POST /quitquitquit`: the refusal is counted and logged with its reason.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use integration::{Lab, connections, eventually, metric, podapp};

#[test]
fn loopback_services_stay_private() {
    if !Lab::available("loopback_services_stay_private") {
        return;
    }
    let mut lab = Lab::start("1h");
    let (a, a_sidecar) = lab.ready_pod("a", &[]);
    let b = lab.add_pod("b");
    lab.write_token(&b, Duration::ZERO);
    lab.init_capture(&b);
    let mut b_sidecar = lab.start_sidecar(&b, &["--admin-listen", "127.0.0.1:9901"]);
    eventually("b's sidecar to be ready", Duration::from_secs(30), || {
        lab.exec_ok(&b.ns, &[podapp(), "get", "127.0.0.1:9901", "/ready"])
            .then_some(())
            .ok_or_else(|| b_sidecar.log())
    });
    let private = lab.spawn_in(
        &b.ns,
        "b-private",
        None,
        &[podapp(), "serve", "127.0.0.1:8081", "private"],
        &[],
    );
    let public_addr = format!("{}:8082", b.ip);
    let public = lab.spawn_in(
        &b.ns,
        "b-public",
        None,
        &[podapp(), "serve", &public_addr, "public"],
        &[],
    );
    lab.keep(private);
    lab.keep(public);
    // Both answer inside the pod, at their own addresses.
    eventually("the apps listen", Duration::from_secs(10), || {
        lab.exec_ok(&b.ns, &[podapp(), "get", "127.0.0.1:8081", "/"])
            && lab.exec_ok(&b.ns, &[podapp(), "get", &public_addr, "/"])
    });

    let get = |port: u16, path: &str| {
        let addr = format!("{}:{port}", b.ip);
        let out = integration::run(&[
            "ip",
            "netns",
            "exec",
            &a.ns,
            podapp(),
            "get",
            &addr,
            path,
            "from a",
        ]);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (ok, out) = get(8082, "/");
    assert!(
        ok && out.contains("public:from a"),
        "the service on B's address is reachable through the mesh: {out}\n{}",
        b_sidecar.log()
    );
    let (ok, out) = get(8081, "/");
    assert!(
        !ok && !out.contains("private"),
        "a loopback-only service answered a peer: {out}"
    );
    let m = lab.exec(&b.ns, &[podapp(), "get", "127.0.0.1:9901", "/metrics"]);
    assert!(
        connections(&m, "inbound", "upstream_unreachable") >= 1.0,
        "the refused forward is counted:\n{m}"
    );
    assert!(b_sidecar.log().contains("upstream unreachable"));

    // The attack: a peer posts /quitquitquit to the moved admin port through the mesh.
    let (ok, out) = get(9901, "/quitquitquit");
    assert!(!ok && !out.contains("shutting down"), "{out}");
    std::thread::sleep(Duration::from_millis(300));
    assert!(b_sidecar.is_running(), "a peer stopped the sidecar");
    let m = lab.exec(&b.ns, &[podapp(), "get", "127.0.0.1:9901", "/metrics"]);
    assert_eq!(
        metric(
            &m,
            "kith_sidecar_captured_total{outcome=\"inbound_sidecar_port_refused\"}"
        ),
        Some(1.0),
        "{m}"
    );
    let log = b_sidecar.log();
    assert!(
        log.contains("connection refused") && log.contains("sidecar_port"),
        "{log}"
    );
    // A local process of the pod may still stop it.
    let out = lab.exec(&b.ns, &[podapp(), "get", "127.0.0.1:9901", "/quitquitquit"]);
    assert!(out.contains("shutting down"), "{out}");
    assert_eq!(b_sidecar.wait_exit(Duration::from_secs(15)), Some(0));
    lab.keep(a_sidecar);
}
