//! `kith sidecar run` in Kubernetes token mode with several CA addresses: the first is dead
//! (nothing listens), the next is the CA. First contact (the pinned bundle) and the token
//! exchange both move on to the live CA, the sidecar gets the pod's SVID and says which CA
//! answered. Both forms of the flag: repeated, and a comma list.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use crate::common::net::{echo_backend, free_port, http, wait_ready};
use crate::common::{Proc, kith, serve_k8s_ca, stop};

#[test]
fn a_pod_sidecar_skips_a_dead_ca_address_and_gets_its_svid_from_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (ca, key) = serve_k8s_ca(d, &[]);
    let ca_data = d.join("ca");
    let live = format!("https://{}", ca.addr);
    let dead = format!("https://{}", free_port());
    let (code, pem, err) = kith(&["ca", "bundle", "--data-dir", ca_data.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let pin = ca::admin::bundle_sha256(&pem);
    let token = d.join("web.token");
    std::fs::write(&token, key.token("shop", "web", "web-1", Duration::ZERO)).unwrap();

    let comma = format!("{dead},{live}");
    let forms: [(&str, Vec<&str>); 2] = [
        ("repeated", vec!["--ca", &dead, "--ca", &live]),
        ("comma-list", vec!["--ca", &comma]),
    ];
    for (name, ca_flags) in forms {
        let admin = free_port();
        let (listen, backend, a) = (
            free_port().to_string(),
            echo_backend().to_string(),
            admin.to_string(),
        );
        let mut args = vec![
            "sidecar",
            "run",
            "--k8s-token-file",
            token.to_str().unwrap(),
            "--bundle-sha256",
            &pin,
            "--listen",
            &listen,
            "--forward",
            &backend,
            "--admin-listen",
            &a,
        ];
        args.extend_from_slice(&ca_flags);
        let sidecar = Proc::spawn(d, name, &args);
        wait_ready(admin, &sidecar, Duration::from_secs(30));
        let m = http(admin, "GET", "/metrics");
        assert!(
            m.contains("spiffe_id=\"spiffe://example.org/ns/shop/sa/web\""),
            "{name}: {m}"
        );
        let log = sidecar.log();
        assert!(
            log.contains("using this CA replica") && log.contains(&ca.addr),
            "{name}: the log names the CA that answered:\n{log}"
        );
    }
    assert_eq!(stop(ca), 0);
}
