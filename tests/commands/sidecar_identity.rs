//! Where `kith sidecar run` gets its identity when it is not given files, against a real
//! `kith ca serve` and a real `kith agent run`:
//!
//! - the Kubernetes case: each sidecar exchanges its pod's projected service-account token at
//!   the CA for the pod's SVID, renews with the token it reads again each time, and keeps
//!   serving on the current SVID while the token is bad;
//! - the Docker-host case: SVIDs streamed from an agent over the Workload API, and an app that
//!   connects before the agent is even running is held, then served.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use crate::common::net::{
    echo_backend, free_port, http, metric, roundtrip, try_http, wait_metric, wait_port, wait_ready,
};
use crate::common::{Proc, kith, serve_ca, serve_k8s_ca, stop};
use serde_json::Value;

fn write_bundle(ca_data: &Path, to: &Path) {
    let (code, pem, err) = kith(&["ca", "bundle", "--data-dir", ca_data.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    std::fs::write(to, pem).unwrap();
}

#[test]
fn pod_sidecars_get_their_svids_from_the_ca_with_the_service_account_token() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Pod SVIDs of 20 s: renewals (at 40-60 % of the lifetime) happen within the test.
    let (ca, key) = serve_k8s_ca(d, &["--workload-ttl", "20s"]);
    let ca_data = d.join("ca");
    let url = format!("https://{}", ca.addr);
    let bundle = d.join("bundle.pem");
    write_bundle(&ca_data, &bundle);
    let api_token = d.join("api.token");
    let web_token = d.join("web.token");
    std::fs::write(
        &api_token,
        key.token("payments", "api", "api-1", Duration::ZERO),
    )
    .unwrap();
    std::fs::write(
        &web_token,
        key.token("shop", "web", "web-1", Duration::ZERO),
    )
    .unwrap();

    let backend = echo_backend();
    let (server_addr, server_admin) = (free_port(), free_port());
    // `kith sidecar run` with `flags`, its identity from `token` by way of the CA.
    let start = |name: &str, flags: &[&str], token: &Path| {
        let identity = [
            "--k8s-token-file",
            token.to_str().unwrap(),
            "--ca",
            &url,
            "--bundle",
            bundle.to_str().unwrap(),
        ];
        Proc::spawn(
            d,
            name,
            &[&["sidecar", "run"][..], flags, &identity].concat(),
        )
    };
    let server = start(
        "server",
        &[
            "--listen",
            &server_addr.to_string(),
            "--forward",
            &backend.to_string(),
            "--allow",
            "spiffe://example.org/ns/shop/sa/web",
            "--admin-listen",
            &server_admin.to_string(),
        ],
        &api_token,
    );
    let (client_addr, client_admin) = (free_port(), free_port());
    let client = start(
        "client",
        &[
            "--listen",
            &client_addr.to_string(),
            "--connect",
            &server_addr.to_string(),
            "--expect-id",
            "spiffe://example.org/ns/payments/sa/api",
            "--admin-listen",
            &client_admin.to_string(),
        ],
        &web_token,
    );
    wait_ready(server_admin, &server, Duration::from_secs(20));
    wait_ready(client_admin, &client, Duration::from_secs(20));
    wait_port(client_addr);
    assert_eq!(
        roundtrip(client_addr, b"pod to pod"),
        b"pod to pod",
        "server:\n{}\nclient:\n{}",
        server.log(),
        client.log()
    );
    let m = http(server_admin, "GET", "/metrics");
    assert!(
        m.contains("kith_sidecar_svid_seconds_to_expiry{spiffe_id=\"spiffe://example.org/ns/payments/sa/api\"}"),
        "{m}"
    );
    let m = http(client_admin, "GET", "/metrics");
    assert!(
        m.contains("spiffe_id=\"spiffe://example.org/ns/shop/sa/web\""),
        "{m}"
    );

    // The token is read for every request: an expired one makes the renewal fail (counted,
    // logged), and traffic keeps flowing on the current SVID.
    let ok = "kith_sidecar_identity_updates_total{result=\"ok\"}";
    let failed = "kith_sidecar_identity_updates_total{result=\"failed\"}";
    std::fs::write(
        &api_token,
        key.token("payments", "api", "api-1", Duration::from_secs(7200)),
    )
    .unwrap();
    let m = wait_metric(server_admin, failed, 1.0, Duration::from_secs(30));
    let ok_before = metric(&m, ok).unwrap();
    assert_eq!(roundtrip(client_addr, b"still up"), b"still up");
    assert!(
        server.log().contains("k8s_token_expired"),
        "the log says why:\n{}",
        server.log()
    );
    // A fresh token (the kubelet rotated it): the next attempt renews.
    std::fs::write(
        &api_token,
        key.token("payments", "api", "api-1", Duration::ZERO),
    )
    .unwrap();
    wait_metric(server_admin, ok, ok_before + 1.0, Duration::from_secs(30));
    // The client renewed on its own schedule meanwhile.
    wait_metric(client_admin, ok, 2.0, Duration::from_secs(30));
    assert_eq!(roundtrip(client_addr, b"renewed"), b"renewed");
    // Nothing was refused along the way, on either side.
    for (admin, dir) in [(client_admin, "outbound"), (server_admin, "inbound")] {
        let m = http(admin, "GET", "/metrics");
        let refused: f64 = m
            .lines()
            .filter(|l| {
                l.starts_with(&format!(
                    "kith_sidecar_connections_total{{direction=\"{dir}\""
                )) && !l.contains("result=\"accepted\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert_eq!(refused, 0.0, "{m}");
    }
    drop((server, client));
    assert_eq!(stop(ca), 0);
}

#[test]
fn workload_api_sidecars_hold_an_early_app_until_the_agent_serves_the_svid() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca_data = d.join("ca");
    let ca = serve_ca(&ca_data);
    let data = ca_data.to_str().unwrap();
    let (code, out, err) = kith(&[
        "ca",
        "token",
        "create",
        "--name",
        "host-a",
        "--data-dir",
        data,
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let join: Value = serde_json::from_str(&out).unwrap();
    // Our uid: the owner of what we just created.
    let uid = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(d).unwrap());
    let (code, _, err) = kith(&[
        "ca",
        "entry",
        "create",
        "--id",
        "spiffe://example.org/web",
        "--parent",
        "spiffe://example.org/kith/node/host-a",
        "--selector",
        &format!("unix:uid:{uid}"),
        "--data-dir",
        data,
    ]);
    assert_eq!(code, 0, "{err}");

    // Both sidecars start before the agent: no SVID yet, not ready, connections held.
    let socket = d.join("run/agent.sock");
    let endpoint = format!("unix://{}", socket.display());
    let backend = echo_backend();
    let (server_addr, server_admin) = (free_port(), free_port());
    let server = Proc::spawn(
        d,
        "server",
        &[
            "sidecar",
            "run",
            "--listen",
            &server_addr.to_string(),
            "--forward",
            &backend.to_string(),
            "--allow",
            "spiffe://example.org/web",
            "--admin-listen",
            &server_admin.to_string(),
            "--workload-api",
            &endpoint,
        ],
    );
    let (client_addr, client_admin) = (free_port(), free_port());
    let client = Proc::spawn(
        d,
        "client",
        &[
            "sidecar",
            "run",
            "--listen",
            &client_addr.to_string(),
            "--connect",
            &server_addr.to_string(),
            "--expect-id",
            "spiffe://example.org/web",
            "--admin-listen",
            &client_admin.to_string(),
            "--workload-api",
            &endpoint,
            "--hold-timeout",
            "60s",
        ],
    );
    wait_port(client_addr);
    wait_port(client_admin);
    let ready = http(client_admin, "GET", "/ready");
    assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
    assert!(ready.contains("no identity yet"), "{ready}");
    let early = std::thread::spawn(move || roundtrip(client_addr, b"app started first"));
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !early.is_finished(),
        "the early connection is held, not refused"
    );

    let agent_data = d.join("agent");
    let token_file = d.join("join-token");
    std::fs::write(&token_file, join["token"].as_str().unwrap()).unwrap();
    let agent = Proc::spawn(
        d,
        "agent",
        &[
            "agent",
            "run",
            "--ca",
            &format!("https://{}", ca.addr),
            "--admin-listen",
            "127.0.0.1:0",
            "--data-dir",
            agent_data.to_str().unwrap(),
            "--socket",
            socket.to_str().unwrap(),
            "--bundle-sha256",
            join["bundle_sha256"].as_str().unwrap(),
            "--join-token-file",
            token_file.to_str().unwrap(),
        ],
    );
    let answer = early.join().unwrap();
    assert_eq!(
        answer,
        b"app started first",
        "agent:\n{}\nserver:\n{}\nclient:\n{}",
        agent.log(),
        server.log(),
        client.log()
    );
    wait_ready(client_admin, &client, Duration::from_secs(20));
    wait_ready(server_admin, &server, Duration::from_secs(20));
    let m = http(client_admin, "GET", "/metrics");
    assert_eq!(
        metric(
            &m,
            "kith_sidecar_connections_total{direction=\"outbound\",result=\"no_identity_yet\"}"
        ),
        Some(0.0),
        "{m}"
    );
    assert!(
        m.contains("kith_sidecar_svid_seconds_to_expiry{spiffe_id=\"spiffe://example.org/web\"}"),
        "{m}"
    );
    assert_eq!(roundtrip(client_addr, b"again"), b"again");
    drop((client, server, agent));
    assert_eq!(stop(ca), 0);
}

#[test]
fn a_sidecar_without_an_identity_source_says_which_flags_to_give() {
    let (code, _, err) = kith(&["sidecar", "run", "--listen", "127.0.0.1:0"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("--cert/--key/--bundle") && err.contains("--workload-api"),
        "{err}"
    );
    let (code, _, err) = kith(&[
        "sidecar",
        "run",
        "--workload-api",
        "http://nowhere",
        "--admin-listen",
        "127.0.0.1:0",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("--workload-api"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = kith(&[
        "sidecar",
        "run",
        "--k8s-token-file",
        dir.path().join("missing").to_str().unwrap(),
        "--ca",
        "https://127.0.0.1:1",
        "--bundle",
        "/dev/null",
        "--admin-listen",
        "127.0.0.1:0",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("service-account token"), "{err}");
}

#[test]
fn a_pod_sidecar_fetches_the_bundle_by_its_pin_and_refuses_a_wrong_pin() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (ca, key) = serve_k8s_ca(d, &[]);
    let ca_data = d.join("ca");
    let url = format!("https://{}", ca.addr);
    let bundle = d.join("bundle.pem");
    write_bundle(&ca_data, &bundle);
    let pin = ca::admin::bundle_sha256(&std::fs::read_to_string(&bundle).unwrap());
    let token = d.join("web.token");
    std::fs::write(&token, key.token("shop", "web", "web-1", Duration::ZERO)).unwrap();
    // No bundle file anywhere: only the pin, as the injector hands it to each pod.
    std::fs::remove_file(&bundle).unwrap();
    let start = |name: &str, pin: &str, admin: std::net::SocketAddr| {
        Proc::spawn(
            d,
            name,
            &[
                "sidecar",
                "run",
                "--k8s-token-file",
                token.to_str().unwrap(),
                "--ca",
                &url,
                "--bundle-sha256",
                pin,
                "--listen",
                &free_port().to_string(),
                "--forward",
                &echo_backend().to_string(),
                "--admin-listen",
                &admin.to_string(),
            ],
        )
    };
    let admin = free_port();
    let good = start("pinned", &pin, admin);
    wait_ready(admin, &good, Duration::from_secs(20));
    let m = http(admin, "GET", "/metrics");
    assert!(
        m.contains("spiffe_id=\"spiffe://example.org/ns/shop/sa/web\""),
        "{m}"
    );

    // A pin of another bundle: the CA's answer is refused, no SVID, counted and logged.
    let wrong = format!("{:064x}", 7);
    let bad_admin = free_port();
    let bad = start("wrong-pin", &wrong, bad_admin);
    let failed = "kith_sidecar_identity_updates_total{result=\"failed\"}";
    wait_port(bad_admin);
    wait_metric(bad_admin, failed, 1.0, Duration::from_secs(20));
    assert!(
        try_http(bad_admin, "GET", "/ready").is_ok_and(|r| r.starts_with("HTTP/1.1 503")),
        "not ready without a trusted bundle"
    );
    assert!(
        bad.log().contains(&wrong),
        "the log names the pin:\n{}",
        bad.log()
    );

    let (code, _, err) = kith(&[
        "sidecar",
        "run",
        "--k8s-token-file",
        token.to_str().unwrap(),
        "--ca",
        &url,
        "--bundle-sha256",
        "abc",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("64 hex digits"), "{err}");
    drop((good, bad));
    assert_eq!(stop(ca), 0);
}
