//! Pod B allows only pod A. Refused, each with its reason in B's metrics: pod C (a valid
//! identity the policy does not allow: not_authorized), a plaintext client (STRICT:
//! plaintext_refused), and a sidecar whose certificate comes from a foreign CA (unknown_ca).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use integration::{Lab, PROXY_UID, connections, eventually, kith_bin, podapp};

#[test]
fn unauthorized_peer_is_refused() {
    if !Lab::available("unauthorized_peer_is_refused") {
        return;
    }
    let mut lab = Lab::start("1h");
    let (a, a_sidecar) = lab.ready_pod("a", &[]);
    let (b, b_sidecar) = lab.ready_pod("b", &["--allow", &a.spiffe_id()]);
    let (c, c_sidecar) = lab.ready_pod("c", &[]);

    let (ok, out) = lab.request(&a, &b, "allowed");
    assert!(
        ok && out.contains("b:allowed"),
        "{out}\n{}",
        b_sidecar.log()
    );

    // C has a valid SVID of the same trust domain, but B's policy names only A.
    let (ok, out) = lab.request(&c, &b, "not allowed");
    assert!(!ok, "C got through: {out}");
    let log = b_sidecar.log();
    assert!(
        log.lines().any(|l| l.contains("connection refused")
            && l.contains("not_authorized")
            && l.contains(&c.spiffe_id())),
        "B logs the denial with the peer's ID:\n{log}"
    );

    // A plaintext client: a process of pod C running as the proxy's UID is not captured, so
    // it reaches B's port in clear, and B's inbound capture refuses it.
    let addr = format!("{}:8080", b.ip);
    let out = lab.exec_ok(
        &c.ns,
        &[
            "setpriv",
            &format!("--reuid={PROXY_UID}"),
            &format!("--regid={PROXY_UID}"),
            "--clear-groups",
            "--",
            podapp(),
            "get",
            &addr,
            "/",
            "plaintext",
        ],
    );
    assert!(!out, "a plaintext client was answered");

    // A sidecar with a certificate from a foreign CA (a developer's `kith certs` CA with the
    // same trust domain name), which trusts the lab's CA too so it does try to connect.
    let d = lab.add_pod("d");
    lab.init_capture(&d);
    let home = lab.path("foreign-ca");
    let out_dir = lab.path("foreign");
    let kith = kith_bin();
    integration::sh(&[
        "env",
        &format!("KITH_HOME={}", home.display()),
        kith.to_str().unwrap(),
        "certs",
        "issue",
        "spiffe://example.org/ns/default/sa/d",
        "--out",
        out_dir.to_str().unwrap(),
        "--name",
        "svid",
    ]);
    let both = out_dir.join("both.pem");
    let mut pem = std::fs::read(out_dir.join("bundle.crt")).unwrap();
    pem.extend(std::fs::read(lab.path("bundle.pem")).unwrap());
    std::fs::write(&both, pem).unwrap();
    integration::sh(&[
        "chown",
        "-R",
        &format!("{PROXY_UID}"),
        out_dir.to_str().unwrap(),
    ]);
    let d_sidecar = lab.spawn_in(
        &d.ns,
        "d-sidecar",
        Some(PROXY_UID),
        &[
            kith.to_str().unwrap(),
            "sidecar",
            "run",
            "--cert",
            out_dir.join("svid.crt").to_str().unwrap(),
            "--key",
            out_dir.join("svid.key").to_str().unwrap(),
            "--bundle",
            both.to_str().unwrap(),
            "--mesh-cidr",
            "10.77.0.0/24",
            "--log-format",
            "json",
        ],
        &[],
    );
    lab.wait_ready(&d, &d_sidecar);
    let (ok, out) = lab.request(&d, &b, "foreign");
    assert!(!ok, "a foreign CA's certificate got through: {out}");

    eventually(
        "B counts each refusal by reason",
        Duration::from_secs(10),
        || {
            let m = lab.metrics(&b);
            connections(&m, "inbound", "not_authorized") >= 1.0
                && connections(&m, "inbound", "plaintext_refused") >= 1.0
                && connections(&m, "inbound", "unknown_ca") >= 1.0
        },
    );
    let m = lab.metrics(&b);
    assert_eq!(connections(&m, "inbound", "accepted"), 1.0, "only A: {m}");
    for p in [a_sidecar, c_sidecar, d_sidecar] {
        lab.keep(p);
    }
    lab.keep(b_sidecar);
}
