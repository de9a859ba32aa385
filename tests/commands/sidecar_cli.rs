//! `kith sidecar run` in explicit mode, as a user runs it with files from `kith certs`: bytes
//! cross a client-side and a server-side tunnel both ways; curl and openssl (clients no one
//! here wrote) are accepted with a client certificate and refused without one or over TLS 1.2;
//! a policy refusal is counted; new certificate files apply without a restart; POST
//! /quitquitquit stops it.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::net::{
    echo_backend, free_port, http, metric, roundtrip, wait_metric, wait_port,
};
use crate::common::{Kith, have_tool};
use integration::eventually;

struct Sidecar {
    child: Child,
    admin: SocketAddr,
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `kith sidecar run` with `name`'s identity files (from `kith.issue`), a free admin port and
/// `args`; it may not be listening yet.
fn spawn_sidecar(kith: &Kith, name: &str, args: &[&str]) -> Sidecar {
    spawn_sidecar_at(kith, name, free_port(), args)
}

/// [`spawn_sidecar`] with its admin endpoints on `admin`.
fn spawn_sidecar_at(kith: &Kith, name: &str, admin: SocketAddr, args: &[&str]) -> Sidecar {
    let dir = kith.path(name);
    let child = Command::new(env!("CARGO_BIN_EXE_kith"))
        .args(["sidecar", "run", "--admin-listen", &admin.to_string()])
        .arg("--cert")
        .arg(dir.join("svid.crt"))
        .arg("--key")
        .arg(dir.join("svid.key"))
        .arg("--bundle")
        .arg(dir.join("bundle.crt"))
        .args(args)
        .stderr(log_file(&dir, admin))
        .spawn()
        .unwrap();
    Sidecar { child, admin }
}

/// Where a sidecar's log goes, so that a sidecar that never listens says why.
fn log_file(dir: &std::path::Path, admin: SocketAddr) -> std::fs::File {
    std::fs::File::create(dir.join(format!("sidecar-{}.log", admin.port()))).unwrap()
}

/// An explicit tunnel on `listen`, listening.
fn sidecar(kith: &Kith, name: &str, listen: SocketAddr, extra: &[&str]) -> Sidecar {
    let listen_arg = listen.to_string();
    let s = spawn_sidecar(
        kith,
        name,
        &[&["--listen", &listen_arg][..], extra].concat(),
    );
    wait_listening(kith, name, s, listen)
}

/// Waits until `s` listens on `listen`; if it exits or takes too long, fails with its log.
fn wait_listening(kith: &Kith, name: &str, mut s: Sidecar, listen: SocketAddr) -> Sidecar {
    let log = || {
        let path = kith
            .path(name)
            .join(format!("sidecar-{}.log", s.admin.port()));
        std::fs::read_to_string(path).unwrap_or_default()
    };
    let what = format!("sidecar {name} to listen on {listen}");
    eventually(&what, Duration::from_secs(20), || {
        if let Some(exited) = s.child.try_wait().unwrap() {
            panic!("sidecar {name} exited ({exited}); its log:\n{}", log());
        }
        TcpStream::connect(listen)
            .map(drop)
            .map_err(|_| format!("its log:\n{}", log()))
    });
    s
}

#[test]
fn explicit_tunnels_carry_bytes_and_refuse_what_they_should() {
    let kith = Kith::new();
    kith.issue("spiffe://example.org/client", "client", &[]);
    kith.issue(
        "spiffe://example.org/server",
        "server",
        &["--dns", "localhost"],
    );
    kith.issue("spiffe://example.org/stranger", "stranger", &[]);
    let backend = echo_backend();
    let server_addr = free_port();
    let server = sidecar(
        &kith,
        "server",
        server_addr,
        &[
            "--forward",
            &backend.to_string(),
            "--allow",
            "spiffe://example.org/client",
        ],
    );
    let client_addr = free_port();
    let _client = sidecar(
        &kith,
        "client",
        client_addr,
        &[
            "--connect",
            &server_addr.to_string(),
            "--expect-id",
            "spiffe://example.org/server",
        ],
    );
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(
        roundtrip(client_addr, &big),
        big,
        "bytes cross both tunnels both ways"
    );

    // A peer the policy does not allow is refused, and counted with its reason.
    let stranger_addr = free_port();
    let _stranger = sidecar(
        &kith,
        "stranger",
        stranger_addr,
        &[
            "--connect",
            &server_addr.to_string(),
            "--expect-id",
            "spiffe://example.org/server",
        ],
    );
    assert_eq!(roundtrip(stranger_addr, b"hello"), b"", "refused");
    let want = "kith_sidecar_connections_total{direction=\"inbound\",result=\"not_authorized\"}";
    wait_metric(server.admin, want, 1.0, Duration::from_secs(5));
    assert!(http(server.admin, "GET", "/ready").starts_with("HTTP/1.1 200"));

    if have_tool(
        "curl",
        "explicit_tunnels_carry_bytes_and_refuse_what_they_should (curl part)",
    ) {
        // curl with the client's certificate through the server-side tunnel to a tiny HTTP backend.
        let web = TcpListener::bind("127.0.0.1:0").unwrap();
        let web_addr = web.local_addr().unwrap();
        std::thread::spawn(move || {
            for mut s in web.incoming().flatten() {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf);
                let _ = s.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello",
                );
            }
        });
        let web_side = free_port();
        let _w = sidecar(
            &kith,
            "server",
            web_side,
            &["--forward", &web_addr.to_string()],
        );
        let c = kith.path("client");
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "5", "--cacert"])
            .arg(c.join("bundle.crt"))
            .arg("--cert")
            .arg(c.join("svid.crt"))
            .arg("--key")
            .arg(c.join("svid.key"))
            .arg(format!("https://localhost:{}/", web_side.port()))
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "hello",
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if have_tool(
        "openssl",
        "explicit_tunnels_carry_bytes_and_refuse_what_they_should (openssl part)",
    ) {
        // No client certificate: the handshake may complete, but nothing reaches the backend.
        let mut child = Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &server_addr.to_string(),
                "-quiet",
                "-verify_quiet",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"should not echo\n")
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("should not echo"),
            "no client certificate, no service"
        );
        // TLS 1.2 only: refused at the handshake.
        let out = Command::new("openssl")
            .args(["s_client", "-connect", &server_addr.to_string(), "-tls1_2"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success(), "a TLS 1.2-only client is refused");
    }
}

#[test]
fn new_certificate_files_apply_without_a_restart_and_quitquitquit_stops_it() {
    let kith = Kith::new();
    kith.issue("spiffe://example.org/client", "client", &["--ttl", "1h"]);
    kith.issue("spiffe://example.org/server", "server", &[]);
    let backend = echo_backend();
    let server_addr = free_port();
    let server = sidecar(
        &kith,
        "server",
        server_addr,
        &["--forward", &backend.to_string()],
    );
    let client_addr = free_port();
    let mut client = sidecar(
        &kith,
        "client",
        client_addr,
        &[
            "--connect",
            &server_addr.to_string(),
            "--expect-id",
            "spiffe://example.org/server",
        ],
    );
    assert_eq!(roundtrip(client_addr, b"one"), b"one");

    // Rotate the client's certificate on disk (a new key and serial, same ID).
    let before = std::fs::read(kith.path("client/svid.crt")).unwrap();
    kith.issue("spiffe://example.org/client", "client", &["--ttl", "2h"]);
    assert_ne!(std::fs::read(kith.path("client/svid.crt")).unwrap(), before);
    eventually(
        "the new certificate to be picked up",
        Duration::from_secs(10),
        || {
            let m = http(client.admin, "GET", "/metrics");
            let picked_up = m.contains("svid_seconds_to_expiry")
                && m.lines().any(|l| {
                    l.starts_with("kith_sidecar_svid_seconds_to_expiry")
                        && l.split_whitespace()
                            .last()
                            .and_then(|v| v.parse::<i64>().ok())
                            .is_some_and(|s| s > 3700)
                });
            if picked_up { Ok(()) } else { Err(m) }
        },
    );
    assert_eq!(
        roundtrip(client_addr, b"two"),
        b"two",
        "the next connection uses the new certificate"
    );

    // A broken file is not applied; the current identity stays. The failed-update counter
    // proves the watcher read the broken file (a fixed sleep would pass without it looking).
    let ok = r#"kith_sidecar_identity_updates_total{result="ok"}"#;
    let failed = r#"kith_sidecar_identity_updates_total{result="failed"}"#;
    let m = http(client.admin, "GET", "/metrics");
    // One OpenMetrics exposition (the proxy's families and the sidecar's, one registry).
    assert!(
        m.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text; version=1.0.0; charset=utf-8"),
        "{m}"
    );
    assert!(m.ends_with("# EOF\n"), "{m}");
    let (ok_before, failed_before) = (metric(&m, ok).unwrap(), metric(&m, failed).unwrap());
    std::fs::write(kith.path("client/svid.key"), "garbage").unwrap();
    let m = wait_metric(
        client.admin,
        failed,
        failed_before + 1.0,
        Duration::from_secs(10),
    );
    assert_eq!(metric(&m, ok), Some(ok_before), "nothing applied\n{m}");
    assert_eq!(roundtrip(client_addr, b"three"), b"three");

    assert!(http(client.admin, "POST", "/quitquitquit").starts_with("HTTP/1.1 200"));
    let status = client.child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    drop(server);
}

#[test]
fn transparent_mode_starts_its_captured_listeners_and_counts_what_was_not_captured() {
    let kith = Kith::new();
    kith.issue("spiffe://example.org/pod", "pod", &[]);
    let (out_addr, in_addr) = (free_port(), free_port());
    let (out_arg, in_arg) = (out_addr.to_string(), in_addr.to_string());
    let pod = spawn_sidecar(
        &kith,
        "pod",
        &[
            "--mesh-cidr",
            "10.0.0.0/8",
            "--outbound-listen",
            &out_arg,
            "--inbound-listen",
            &in_arg,
        ],
    );
    let admin = pod.admin;
    wait_port(out_addr);
    wait_port(in_addr);
    wait_port(admin);
    assert!(http(admin, "GET", "/ready").starts_with("HTTP/1.1 200"));
    // Without capture rules there is no original destination: refused and counted, never
    // forwarded to the proxy itself.
    assert_eq!(roundtrip(out_addr, b"hello"), b"");
    assert_eq!(roundtrip(in_addr, b"hello"), b"");
    eventually(
        "both refusals to be counted",
        Duration::from_secs(5),
        || {
            let m = http(admin, "GET", "/metrics");
            let count = |outcome: &str| {
                let key = format!("kith_sidecar_captured_total{{outcome=\"{outcome}\"}} ");
                m.lines()
                    .find_map(|l| l.strip_prefix(key.as_str()))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            };
            if count("outbound_no_original_dst") >= 1 && count("inbound_no_original_dst") >= 1 {
                Ok(())
            } else {
                Err(m)
            }
        },
    );
    drop(pod);
    // Explicit flags without --listen are a usage error.
    let out = Command::new(env!("CARGO_BIN_EXE_kith"))
        .args([
            "sidecar",
            "run",
            "--connect",
            "127.0.0.1:1",
            "--cert",
            "a",
            "--key",
            "b",
            "--bundle",
            "c",
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A sidecar with its identity files and a config file instead of --listen.
fn sidecar_with_config(kith: &Kith, name: &str, config: &str, extra: &[&str]) -> Sidecar {
    let path = kith.path(&format!("{name}.toml"));
    std::fs::write(&path, config).unwrap();
    let path = path.to_str().unwrap();
    let s = spawn_sidecar(kith, name, &[&["--config", path][..], extra].concat());
    wait_port(s.admin);
    s
}

#[test]
fn several_tunnels_from_a_config_file_with_a_per_port_policy_file() {
    let kith = Kith::new();
    kith.issue("spiffe://example.org/client", "client", &[]);
    kith.issue("spiffe://example.org/server", "server", &[]);
    let (orders, billing) = (echo_backend(), echo_backend());
    let (orders_in, billing_in) = (free_port(), free_port());
    // The client may reach the orders app's port only; ops/* may reach every port.
    let policy = kith.path("policy.toml");
    std::fs::write(
        &policy,
        format!(
            "[[allow]]\nid = \"spiffe://example.org/client\"\nports = [{}]\n\n[[allow]]\nid = \"spiffe://example.org/ops/*\"\n",
            orders.port()
        ),
    )
    .unwrap();
    let server = sidecar_with_config(
        &kith,
        "server",
        &format!(
            "[[tunnel]]\nname = \"orders\"\nlisten = \"{orders_in}\"\nforward = \"{orders}\"\n\n\
             [[tunnel]]\nname = \"billing\"\nlisten = \"{billing_in}\"\nforward = \"{billing}\"\n"
        ),
        &["--policy", policy.to_str().unwrap()],
    );
    let (to_orders, to_billing) = (free_port(), free_port());
    let _client = sidecar_with_config(
        &kith,
        "client",
        &format!(
            "[[tunnel]]\nname = \"orders\"\nlisten = \"{to_orders}\"\nconnect = \"localhost:{}\"\nexpect_id = \"spiffe://example.org/server\"\n\n\
             [[tunnel]]\nname = \"billing\"\nlisten = \"{to_billing}\"\nconnect = \"{billing_in}\"\nexpect_trust_domain = true\n",
            // A name, resolved for each connection (both ::1 and 127.0.0.1 are tried).
            orders_in.port()
        ),
        &[],
    );
    wait_port(to_orders);
    wait_port(to_billing);
    assert_eq!(roundtrip(to_orders, b"order 1"), b"order 1");
    assert_eq!(roundtrip(to_billing, b"invoice 1"), b"", "port not allowed");
    let m = wait_metric(
        server.admin,
        "kith_sidecar_connections_total{tunnel=\"billing\",direction=\"inbound\",result=\"not_authorized\"}",
        1.0,
        Duration::from_secs(5),
    );
    // (wait_port's probe through the client tunnel counts too.)
    assert!(
        metric(
            &m,
            "kith_sidecar_connections_total{tunnel=\"orders\",direction=\"inbound\",result=\"accepted\"}"
        )
        .is_some_and(|n| n >= 1.0),
        "{m}"
    );

    // A bad config or policy file stops the start with the file and the problem named.
    let bad = kith.path("bad.toml");
    std::fs::write(&bad, "[[tunnel]]\nlisten = \"127.0.0.1:1\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kith"))
        .args([
            "sidecar",
            "run",
            "--admin-listen",
            "127.0.0.1:0",
            "--config",
        ])
        .arg(&bad)
        .args(["--cert", "x", "--key", "y", "--bundle", "z"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("bad.toml") && err.contains("either connect"),
        "{err}"
    );
}

#[test]
fn sigterm_lets_open_connections_finish_then_cuts_them_at_the_drain_timeout() {
    let kith = Kith::new();
    kith.issue("spiffe://example.org/client", "client", &[]);
    kith.issue("spiffe://example.org/server", "server", &[]);
    let backend = echo_backend();
    let server_addr = free_port();
    let mut server = sidecar(
        &kith,
        "server",
        server_addr,
        &["--forward", &backend.to_string(), "--drain-timeout", "4s"],
    );
    let client_addr = free_port();
    let _client = sidecar(
        &kith,
        "client",
        client_addr,
        &[
            "--connect",
            &server_addr.to_string(),
            "--expect-id",
            "spiffe://example.org/server",
        ],
    );
    let mut open = TcpStream::connect(client_addr).unwrap();
    open.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let echo = |s: &mut TcpStream, msg: &[u8]| {
        s.write_all(msg).unwrap();
        let mut buf = vec![0u8; msg.len()];
        s.read_exact(&mut buf).map(|()| buf)
    };
    assert_eq!(echo(&mut open, b"before").unwrap(), b"before");

    let server_log = || {
        let path = kith
            .path("server")
            .join(format!("sidecar-{}.log", server.admin.port()));
        std::fs::read_to_string(path).unwrap_or_default()
    };
    let _ = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status();
    // The tunnel closes its listener, then says it drains what is open.
    eventually("the server to drain", Duration::from_secs(10), || {
        server_log().contains("draining connections")
    });
    // In flight: still served. New: refused (the listener is closed).
    assert_eq!(
        echo(&mut open, b"during the drain").unwrap(),
        b"during the drain"
    );
    assert!(
        TcpStream::connect(server_addr).is_err(),
        "no new connections"
    );
    let ready = http(server.admin, "GET", "/ready");
    assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
    // Past the drain timeout the connection is cut and the process exits cleanly. The sidecar
    // says so once its 4 s drain timer fired with the connection still open; and it would say
    // "did not stop in time" had it hung on past that.
    let status = server.child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    let log = server_log();
    assert!(
        log.contains("connections still open after the drain timeout")
            && !log.contains("did not stop in time"),
        "exited at the 4 s drain timeout with a connection open:\n{log}"
    );
    let mut rest = Vec::new();
    let cut = open.read_to_end(&mut rest);
    assert!(
        cut.is_err() || rest.is_empty(),
        "the open connection was closed"
    );
}

#[test]
fn tls_resumption_is_on_by_default_and_off_on_request() {
    let kith = Kith::new();
    kith.issue("spiffe://example.org/client", "client", &[]);
    kith.issue("spiffe://example.org/server", "server", &[]);
    let backend = echo_backend().to_string();
    let resumed = "kith_sidecar_tls_resumed_total{direction=\"inbound\"}";
    let handshakes = "kith_sidecar_handshake_seconds_count{direction=\"inbound\"}";
    // Resumption shortens the handshake of each connection: the pooled hop, which needs
    // few handshakes, is off here (pool_is_on_by_default_and_off_on_request).
    for (setting, extra) in [
        ("on", &["--pool", "off"][..]),
        ("off", &["--pool", "off", "--tls-resumption", "off"][..]),
    ] {
        let server_addr = free_port();
        let server_str = server_addr.to_string();
        let server_args = [&["--forward", &backend][..], extra].concat();
        let server = sidecar(&kith, "server", server_addr, &server_args);
        let client_addr = free_port();
        let client_args = [
            &[
                "--connect",
                &server_str,
                "--expect-id",
                "spiffe://example.org/server",
            ][..],
            extra,
        ]
        .concat();
        let _client = sidecar(&kith, "client", client_addr, &client_args);
        for i in 0..4 {
            let msg = format!("request {i}");
            assert_eq!(roundtrip(client_addr, msg.as_bytes()), msg.as_bytes());
        }
        let m = wait_metric(server.admin, handshakes, 4.0, Duration::from_secs(5));
        let n = metric(&m, resumed).unwrap_or_else(|| panic!("{resumed} in\n{m}"));
        if setting == "on" {
            // full, resumed, resumed (the two tickets of the full handshake), full
            assert!(n >= 2.0, "resumption {setting}: {n} resumed\n{m}");
        } else {
            assert_eq!(n, 0.0, "resumption {setting}\n{m}");
        }
    }

    let out = Command::new(env!("CARGO_BIN_EXE_kith"))
        .args(["sidecar", "run", "--tls-resumption", "sometimes"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--tls-resumption"), "{err}");
}

#[test]
fn pq_key_exchange_is_on_by_default_and_off_on_request() {
    let kith = Kith::new();
    kith.issue("spiffe://example.org/client", "client", &[]);
    kith.issue("spiffe://example.org/server", "server", &[]);
    let backend = echo_backend().to_string();
    let series =
        |kx: &str| format!("kith_sidecar_handshakes_total{{direction=\"inbound\",kx=\"{kx}\"}}");
    // The server keeps the default (on) both times: the client's setting decides.
    for (client_pq, expected, other) in [
        (&[][..], "X25519MLKEM768", "X25519"),
        (&["--pq", "off"][..], "X25519", "X25519MLKEM768"),
    ] {
        let server_addr = free_port();
        let server = sidecar(&kith, "server", server_addr, &["--forward", &backend]);
        let client_addr = free_port();
        let server_str = server_addr.to_string();
        let client_args = [
            &[
                "--connect",
                &server_str,
                "--expect-id",
                "spiffe://example.org/server",
                // One handshake per connection, so each request is one handshake to count.
                "--pool",
                "off",
            ][..],
            client_pq,
        ]
        .concat();
        let client = sidecar(&kith, "client", client_addr, &client_args);
        for i in 0..3 {
            let msg = format!("request {i}");
            assert_eq!(roundtrip(client_addr, msg.as_bytes()), msg.as_bytes());
        }
        let m = wait_metric(server.admin, &series(expected), 3.0, Duration::from_secs(5));
        assert_eq!(metric(&m, &series(other)), Some(0.0), "{client_pq:?}\n{m}");
        // The client's count includes the probe that found its port open.
        let c = http(client.admin, "GET", "/metrics");
        let out = |kx: &str| {
            let s = format!("kith_sidecar_handshakes_total{{direction=\"outbound\",kx=\"{kx}\"}}");
            metric(&c, &s)
        };
        assert!(
            out(expected).is_some_and(|n| n >= 3.0),
            "{client_pq:?}\n{c}"
        );
        assert_eq!(out(other), Some(0.0), "{client_pq:?}\n{c}");
    }

    let out = Command::new(env!("CARGO_BIN_EXE_kith"))
        .args(["sidecar", "run", "--pq", "maybe"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--pq"), "{err}");
}

#[test]
fn pool_is_on_by_default_and_off_on_request() {
    let kith = Kith::new();
    kith.issue("spiffe://example.org/client", "client", &[]);
    kith.issue("spiffe://example.org/server", "server", &[]);
    let backend = echo_backend().to_string();
    let pooled = "kith_sidecar_pooled_connections_total{direction=\"inbound\"}";
    let accepted = "kith_sidecar_connections_total{direction=\"inbound\",result=\"accepted\"}";
    let handshakes = "kith_sidecar_handshake_seconds_count{direction=\"inbound\"}";
    for (setting, extra) in [("on", &[][..]), ("off", &["--pool", "off"][..])] {
        let server_addr = free_port();
        let server_str = server_addr.to_string();
        let server_args = [&["--forward", &backend][..], extra].concat();
        let server = sidecar(&kith, "server", server_addr, &server_args);
        let client_addr = free_port();
        let client_args = [
            &[
                "--connect",
                &server_str,
                "--expect-id",
                "spiffe://example.org/server",
                "--tls-resumption",
                "off",
            ][..],
            extra,
        ]
        .concat();
        let _client = sidecar(&kith, "client", client_addr, &client_args);
        for i in 0..8 {
            let msg = format!("request {i}");
            assert_eq!(roundtrip(client_addr, msg.as_bytes()), msg.as_bytes());
        }
        let m = wait_metric(server.admin, accepted, 8.0, Duration::from_secs(5));
        let p = metric(&m, pooled).unwrap_or_else(|| panic!("{pooled} in\n{m}"));
        let h = metric(&m, handshakes).unwrap_or_else(|| panic!("{handshakes} in\n{m}"));
        let a = metric(&m, accepted).unwrap_or(0.0);
        if setting == "on" {
            // Eight connections (and the start's check) over at most one pooled connection
            // per client worker (2).
            assert!((1.0..=2.0).contains(&p), "pool {setting}: {p} pooled\n{m}");
            assert_eq!(
                h, p,
                "pool {setting}: one handshake per pooled connection\n{m}"
            );
        } else {
            assert_eq!(p, 0.0, "pool {setting}\n{m}");
            assert_eq!(h, a, "pool {setting}: a handshake per connection\n{m}");
        }
    }
    let out = Command::new(env!("CARGO_BIN_EXE_kith"))
        .args(["sidecar", "run", "--pool", "sometimes"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--pool"), "{err}");
}

#[test]
fn workers_each_run_their_own_thread_and_listener() {
    let kith = Kith::new();
    kith.issue("spiffe://example.org/server", "server", &[]);
    let backend = echo_backend().to_string();
    let addr = free_port();
    let server = sidecar(
        &kith,
        "server",
        addr,
        &["--forward", &backend, "--workers", "3"],
    );
    let names: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", server.child.id()))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_owned())
        .collect();
    for w in ["kith-worker-1", "kith-worker-2"] {
        assert!(names.iter().any(|n| n == w), "{w} in {names:?}");
    }
    assert!(!names.iter().any(|n| n == "kith-worker-3"), "{names:?}");

    for bad in ["0", "many"] {
        let out = Command::new(env!("CARGO_BIN_EXE_kith"))
            .args(["sidecar", "run", "--workers", bad])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--workers"), "{err}");
    }
}

/// SECURITY (the attack): a server-side tunnel forwards to its own admin port on 127.0.0.1 (a
/// misconfiguration, or what transparent mode used to do). A peer that posts /quitquitquit
/// through the tunnel arrives from loopback, but from the proxy's own socket: refused (403),
/// counted with its reason; a local process may still stop it.
#[test]
fn quitquitquit_through_the_proxy_is_refused() {
    let kith = Kith::new();
    kith.issue("spiffe://example.org/client", "client", &[]);
    kith.issue("spiffe://example.org/server", "server", &[]);
    let admin = free_port();
    let server_addr = free_port();
    let mut server = spawn_sidecar_at(
        &kith,
        "server",
        admin,
        &[
            "--listen",
            &server_addr.to_string(),
            "--forward",
            &admin.to_string(),
        ],
    );
    wait_port(server_addr);
    let client_addr = free_port();
    let _client = sidecar(
        &kith,
        "client",
        client_addr,
        &[
            "--connect",
            &server_addr.to_string(),
            "--expect-id",
            "spiffe://example.org/server",
        ],
    );
    let answer = http(client_addr, "POST", "/quitquitquit");
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(answer.contains("forwarded by the proxy"), "{answer}");
    // Reading through the tunnel still works: only the stop is refused.
    assert!(http(client_addr, "GET", "/live").starts_with("HTTP/1.1 200"));
    let m = http(admin, "GET", "/metrics");
    assert_eq!(
        metric(&m, "kith_sidecar_admin_refused_total{reason=\"proxied\"}"),
        Some(1.0),
        "{m}"
    );
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "the peer stopped it"
    );
    assert!(http(admin, "POST", "/quitquitquit").starts_with("HTTP/1.1 200"));
    assert_eq!(server.child.wait().unwrap().code(), Some(0));
}
