//! SIGTERM to pod B's sidecar lets an in-flight request finish (drain), then the sidecar
//! exits cleanly; `kith sidecar init --uninstall` leaves the pod's nat table as it found it.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use integration::{Lab, PROXY_UID, eventually, kith_bin};

/// The nat table without counters and comments: what the rules are, not how often they hit.
fn nat_rules(lab: &Lab, ns: &str, tool: &str) -> String {
    lab.exec(ns, &[tool, "-t", "nat"])
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split(" [").next().unwrap_or(l).to_owned())
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn shutdown_drains_and_cleans_up() {
    if !Lab::available("shutdown_drains_and_cleans_up") {
        return;
    }
    let mut lab = Lab::start("1h");
    let (a, a_sidecar) = lab.ready_pod("a", &[]);
    let b = lab.add_pod("b");
    lab.write_token(&b, Duration::ZERO);
    let before = nat_rules(&lab, &b.ns, "iptables-save");
    lab.init_capture(&b);
    assert_ne!(
        nat_rules(&lab, &b.ns, "iptables-save"),
        before,
        "init added rules"
    );
    // The admin port open to the pod network (as for kubelet probes).
    let mut b_sidecar = lab.start_sidecar(
        &b,
        &["--drain-timeout", "10s", "--admin-listen", "0.0.0.0:15020"],
    );
    let app = lab.start_app(&b);
    lab.keep(app);
    lab.wait_ready(&b, &b_sidecar);
    // Another pod may read it, but not stop the sidecar (from A's proxy UID and GID: not
    // captured).
    let admin = format!("{}:15020", b.ip);
    let uid = format!("--reuid={PROXY_UID}");
    let gid = format!("--regid={PROXY_UID}");
    let stop = integration::run(&[
        "ip",
        "netns",
        "exec",
        &a.ns,
        "setpriv",
        &uid,
        &gid,
        "--clear-groups",
        "--",
        integration::podapp(),
        "get",
        &admin,
        "/quitquitquit",
    ]);
    let said = String::from_utf8_lossy(&stop.stdout);
    assert!(said.contains(" 403 "), "{said}");
    assert!(b_sidecar.is_running());

    let (in_flight, answer) = std::thread::scope(|s| {
        let slow = s.spawn(|| {
            let addr = format!("{}:8080", b.ip);
            integration::run(&[
                "ip",
                "netns",
                "exec",
                &a.ns,
                integration::podapp(),
                "get",
                &addr,
                "/slow/3000",
                "in flight",
            ])
        });
        // Through both sidecars and held by B's app for 3 s from now.
        eventually(
            "the slow request reaches B's app",
            Duration::from_secs(10),
            || {
                std::fs::read_to_string(lab.path("b-app.log"))
                    .is_ok_and(|log| log.contains("slow request"))
            },
        );
        b_sidecar.signal(nix::sys::signal::Signal::SIGTERM);
        let in_flight = !slow.is_finished();
        (in_flight, slow.join().unwrap())
    });
    assert!(in_flight, "the request was answered before the SIGTERM");
    let stdout = String::from_utf8_lossy(&answer.stdout);
    assert!(
        answer.status.success() && stdout.contains("b:in flight"),
        "the in-flight request finished during the drain: {stdout}\n{}",
        b_sidecar.log()
    );
    let code = b_sidecar.wait_exit(Duration::from_secs(15));
    assert_eq!(code, Some(0), "{}", b_sidecar.log());
    // What the sidecar says when its 10 s drain deadline cuts connections or tasks.
    let log = b_sidecar.log();
    assert!(
        !log.contains("after the drain timeout") && !log.contains("did not stop in time"),
        "exited once the connection was done, not at the drain deadline:\n{log}"
    );
    // After shutdown, B refuses (nothing listens on the captured ports).
    let (ok, _) = lab.request(&a, &b, "after");
    assert!(!ok);

    lab.exec(
        &b.ns,
        &[
            kith_bin().to_str().unwrap(),
            "sidecar",
            "init",
            "--uninstall",
        ],
    );
    assert_eq!(nat_rules(&lab, &b.ns, "iptables-save"), before);
    lab.keep(a_sidecar);
}
