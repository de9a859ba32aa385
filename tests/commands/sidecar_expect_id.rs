//! Which server a client tunnel believes: an explicit tunnel names it (`--expect-id`), or says
//! out loud that any SVID of the trust domain will do (`--expect-trust-domain`, logged). Without
//! either, `kith sidecar run` refuses to start; transparent mode logs the mesh destinations
//! that have no expected ID.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use crate::common::net::{echo_backend, free_port, roundtrip, wait_port};
use crate::common::{Kith, Proc};

fn identity(kith: &Kith, name: &str) -> Vec<String> {
    let d = kith.path(name);
    let p = |f: &str| d.join(f).to_str().unwrap().to_owned();
    vec![
        "--cert".into(),
        p("svid.crt"),
        "--key".into(),
        p("svid.key"),
        "--bundle".into(),
        p("bundle.crt"),
    ]
}

fn run(kith: &Kith, name: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kith"))
        .args(["sidecar", "run"])
        .args(args)
        .args(identity(kith, name))
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn spawn(kith: &Kith, log: &str, name: &str, args: &[&str]) -> Proc {
    let mut all = vec!["sidecar".to_owned(), "run".to_owned()];
    all.extend(args.iter().map(|a| (*a).to_owned()));
    all.extend(identity(kith, name));
    Proc::spawn(
        kith.dir.path(),
        log,
        &all.iter().map(String::as_str).collect::<Vec<_>>(),
    )
}

#[test]
fn a_client_tunnel_without_expect_id_refuses_to_start() {
    let kith = Kith::new();
    kith.issue("spiffe://example.org/client", "client", &[]);
    let (listen, admin) = (free_port().to_string(), free_port().to_string());
    let (code, err) = run(
        &kith,
        "client",
        &[
            "--listen",
            &listen,
            "--connect",
            "127.0.0.1:9",
            "--admin-listen",
            &admin,
        ],
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("must name the server it expects")
            && err.contains("--expect-id")
            && err.contains("--expect-trust-domain"),
        "{err}"
    );

    // The same for a client tunnel in a config file.
    let config = kith.path("tunnels.toml");
    std::fs::write(
        &config,
        format!("[[tunnel]]\nname = \"db\"\nlisten = \"{listen}\"\nconnect = \"127.0.0.1:9\"\n"),
    )
    .unwrap();
    let (code, err) = run(
        &kith,
        "client",
        &[
            "--config",
            config.to_str().unwrap(),
            "--admin-listen",
            &admin,
        ],
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("tunnel 1 (db)") && err.contains("expect_trust_domain = true"),
        "{err}"
    );
}

#[test]
fn expect_trust_domain_is_an_opt_in_that_works_and_is_logged() {
    let kith = Kith::new();
    kith.issue("spiffe://example.org/client", "client", &[]);
    kith.issue("spiffe://example.org/server", "server", &[]);
    let backend = echo_backend().to_string();
    let server_addr = free_port();
    let (server_listen, server_admin) = (server_addr.to_string(), free_port().to_string());
    let _server = spawn(
        &kith,
        "server",
        "server",
        &[
            "--listen",
            &server_listen,
            "--forward",
            &backend,
            "--admin-listen",
            &server_admin,
        ],
    );
    let client_addr = free_port();
    let (client_listen, client_admin) = (client_addr.to_string(), free_port().to_string());
    let client = spawn(
        &kith,
        "client",
        "client",
        &[
            "--listen",
            &client_listen,
            "--connect",
            &server_listen,
            "--expect-trust-domain",
            "--admin-listen",
            &client_admin,
        ],
    );
    wait_port(server_addr);
    wait_port(client_addr);
    assert_eq!(roundtrip(client_addr, b"any server"), b"any server");
    let log = client.wait_log(
        "ANY server with an SVID of the trust domain",
        Duration::from_secs(10),
    );
    assert!(log.contains("WARN"), "{log}");

    // Both at once is a usage error.
    let (code, err) = run(
        &kith,
        "client",
        &[
            "--listen",
            &free_port().to_string(),
            "--connect",
            &server_listen,
            "--expect-trust-domain",
            "--expect-id",
            "spiffe://example.org/server",
        ],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--expect-trust-domain"), "{err}");
}

#[test]
fn transparent_mode_logs_mesh_destinations_without_an_expected_id() {
    let kith = Kith::new();
    kith.issue("spiffe://example.org/pod", "pod", &[]);
    let (out, inb, admin) = (free_port(), free_port(), free_port());
    let pod = spawn(
        &kith,
        "pod",
        "pod",
        &[
            "--outbound-listen",
            &out.to_string(),
            "--inbound-listen",
            &inb.to_string(),
            "--admin-listen",
            &admin.to_string(),
            "--mesh-cidr",
            "10.0.0.0/8,10.20.0.0/16",
            "--expect-id",
            "10.20.0.0/16=spiffe://example.org/db",
        ],
    );
    wait_port(inb);
    let log = pod.wait_log(
        "no expected ID for these mesh destinations",
        Duration::from_secs(10),
    );
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("no expected ID for these mesh destinations"))
        .collect();
    // 10.0.0.0/8 has no rule; 10.20.0.0/16 is covered by one.
    assert_eq!(lines.len(), 1, "{log}");
    assert!(lines[0].contains("10.0.0.0/8"), "{log}");
}
