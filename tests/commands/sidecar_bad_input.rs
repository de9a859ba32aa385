//! `kith sidecar run` against hostile or broken peers, on every listener it opens (explicit
//! server and client sides, transparent inbound and outbound, admin): random bytes, truncated
//! ClientHellos, 10,000 connections that never send a byte, and a peer that stops reading
//! mid-stream. Each time: no crash, memory stays bounded, and a well-behaved client is served
//! meanwhile. Refusals are counted with their reason.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::common::net::{echo_backend, free_port, http, metric, roundtrip, wait_port};
use crate::common::{Kith, Proc};
use integration::eventually;

/// Resident memory of `pid` in KiB (VmRSS).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Raises this process's open-file limit to its hard limit (the sidecars inherit it).
fn raise_nofile() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    getrlimit(Resource::RLIMIT_NOFILE).unwrap().0
}

/// Deterministic noise (xorshift), so a failure can be replayed.
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect()
}

/// The first bytes of a TLS 1.3 ClientHello: a record header announcing 512 bytes, the
/// handshake header, legacy version and part of the random. Never completed.
fn truncated_client_hello() -> Vec<u8> {
    let mut b = vec![
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ];
    b.extend(noise(20, 7));
    b
}

/// Connects to `to` from `source` (any 127.0.0.0/8 address works on Linux loopback).
fn connect_from(source: &str, to: SocketAddr) -> TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
        let stream = socket.connect(to).await.unwrap();
        let std = stream.into_std().unwrap();
        std.set_nonblocking(false).unwrap();
        std
    })
}

/// True while the other side has neither closed nor reset `s` (nothing to read, no EOF).
fn still_open(s: &TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    let open = matches!((&*s).read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
    s.set_nonblocking(false).unwrap();
    open
}

/// Sends `bytes`, half-closes, and waits (bounded) for the other side to close.
fn send_and_wait_close(addr: SocketAddr, bytes: &[u8]) {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return;
    };
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink);
}

struct Rig {
    _kith: Kith,
    server: Proc,
    server_addr: SocketAddr,
    server_admin: SocketAddr,
    client: Proc,
    client_addr: SocketAddr,
    transparent: Proc,
    t_out: SocketAddr,
    t_in: SocketAddr,
    t_admin: SocketAddr,
}

impl Rig {
    fn start() -> Self {
        Self::start_with(&[])
    }

    /// With `server_extra` flags for the server side (mTLS in).
    fn start_with(server_extra: &[&str]) -> Self {
        let kith = Kith::new();
        kith.issue("spiffe://example.org/client", "client", &[]);
        kith.issue("spiffe://example.org/server", "server", &[]);
        let ident = |name: &str| {
            let d = kith.path(name);
            [
                "--cert".to_owned(),
                d.join("svid.crt").to_str().unwrap().to_owned(),
                "--key".to_owned(),
                d.join("svid.key").to_str().unwrap().to_owned(),
                "--bundle".to_owned(),
                d.join("bundle.crt").to_str().unwrap().to_owned(),
            ]
        };
        let spawn = |name: &str, id: &str, args: &[String]| {
            let mut all: Vec<String> = vec!["sidecar".into(), "run".into()];
            all.extend_from_slice(args);
            all.extend(ident(id));
            Proc::spawn(
                kith.dir.path(),
                name,
                &all.iter().map(String::as_str).collect::<Vec<_>>(),
            )
        };
        let backend = echo_backend();
        let (server_addr, server_admin) = (free_port(), free_port());
        let server = spawn(
            "server",
            "server",
            &[
                &[
                    "--listen".into(),
                    server_addr.to_string(),
                    "--forward".into(),
                    backend.to_string(),
                    "--admin-listen".into(),
                    server_admin.to_string(),
                ][..],
                &server_extra
                    .iter()
                    .map(|a| (*a).to_owned())
                    .collect::<Vec<_>>(),
            ]
            .concat(),
        );
        let (client_addr, client_admin) = (free_port(), free_port());
        let client = spawn(
            "client",
            "client",
            &[
                "--listen".into(),
                client_addr.to_string(),
                "--connect".into(),
                server_addr.to_string(),
                "--expect-id".into(),
                "spiffe://example.org/server".into(),
                "--admin-listen".into(),
                client_admin.to_string(),
            ],
        );
        let (t_out, t_in, t_admin) = (free_port(), free_port(), free_port());
        let transparent = spawn(
            "transparent",
            "server",
            &[
                "--outbound-listen".into(),
                t_out.to_string(),
                "--inbound-listen".into(),
                t_in.to_string(),
                "--admin-listen".into(),
                t_admin.to_string(),
                "--mesh-cidr".into(),
                "10.0.0.0/8".into(),
            ],
        );
        for addr in [server_addr, client_addr, t_out, t_in, t_admin] {
            wait_port(addr);
        }
        Self {
            _kith: kith,
            server,
            server_addr,
            server_admin,
            client,
            client_addr,
            transparent,
            t_out,
            t_in,
            t_admin,
        }
    }

    /// A well-behaved exchange through both tunnels, answered before `roundtrip` gives up
    /// reading (5 s). Where hostile connections are held open they outlast that (a 10 min
    /// first-flight timeout): an answer means the good client was not queued behind them.
    fn served(&self) {
        let answer = roundtrip(self.client_addr, b"still serving");
        assert_eq!(
            answer,
            b"still serving",
            "server:\n{}\nclient:\n{}",
            self.server.log(),
            self.client.log()
        );
    }

    fn alive(&mut self) {
        for (name, p) in [
            ("server", &mut self.server),
            ("client", &mut self.client),
            ("transparent", &mut self.transparent),
        ] {
            assert!(
                p.child.try_wait().unwrap().is_none(),
                "{name} exited:\n{}",
                p.log()
            );
            assert!(!p.log().contains("panicked"), "{name}:\n{}", p.log());
        }
    }
}

#[test]
fn garbage_and_truncated_handshakes_on_every_listener_are_refused_and_counted() {
    let mut rig = Rig::start();
    let listeners = [
        ("server side (mTLS in)", rig.server_addr),
        ("client side (plaintext in)", rig.client_addr),
        ("transparent outbound", rig.t_out),
        ("transparent inbound", rig.t_in),
        ("server admin", rig.server_admin),
        ("transparent admin", rig.t_admin),
    ];
    for (i, (what, addr)) in listeners.iter().enumerate() {
        for (kind, bytes) in [
            ("random bytes", noise(64 * 1024, i as u64 + 1)),
            ("random bytes after a TLS record type", {
                let mut b = vec![0x16];
                b.extend(noise(4096, i as u64 + 100));
                b
            }),
            ("a truncated ClientHello", truncated_client_hello()),
            ("nothing", Vec::new()),
        ] {
            send_and_wait_close(*addr, &bytes);
            rig.alive();
            eprintln!("{what}: {kind}: survived");
        }
        rig.served();
    }
    // The mTLS listeners counted what they refused, by reason.
    let m = http(rig.server_admin, "GET", "/metrics");
    let refused = |reason: &str| {
        metric(
            &m,
            &format!("kith_sidecar_connections_total{{direction=\"inbound\",result=\"{reason}\"}}"),
        )
        .unwrap()
    };
    assert!(refused("plaintext_refused") >= 1.0, "{m}");
    assert!(refused("handshake_failed") >= 3.0, "{m}");
    let m = http(rig.t_admin, "GET", "/metrics");
    assert!(
        metric(
            &m,
            "kith_sidecar_captured_total{outcome=\"outbound_no_original_dst\"}"
        )
        .unwrap()
            >= 4.0,
        "connections that were not redirected have no original destination: {m}"
    );
    rig.alive();
}

#[test]
fn ten_thousand_silent_connections_do_not_starve_a_good_client() {
    let limit = raise_nofile();
    // Per process: 10,000 sockets here, 10,000 accepted in the sidecar, plus a few.
    if limit < 10_500 {
        integration::skip::skip(
            "ten_thousand_silent_connections",
            &format!("the open-file limit is {limit} (hard), below the 10,500 each process needs"),
        );
        return;
    }
    // Silent connections stay pending for the whole test (not cut at the first-flight
    // deadline), from 50 source addresses (200 each, under the per-source cap).
    let mut rig = Rig::start_with(&["--first-flight-timeout", "10m"]);
    let pid = rig.server.child.id();
    rig.served();
    let before = rss_kib(pid);
    let mut silent = Vec::with_capacity(10_000);
    for i in 0..10_000 {
        silent.push(connect_from(
            &format!("127.0.1.{}", 1 + i % 50),
            rig.server_addr,
        ));
    }
    // All accepted (pending), none holding a connection slot: a good client gets through.
    rig.served();
    // The good client's own connection may still be closing on the server side (another
    // worker thread) for a moment after its answer arrived.
    let active = "kith_sidecar_active_connections{direction=\"inbound\"}";
    eventually(
        "silent connections to hold no connection slot",
        Duration::from_secs(5),
        || {
            let m = http(rig.server_admin, "GET", "/metrics");
            if metric(&m, active) == Some(0.0) {
                Ok(())
            } else {
                Err(m)
            }
        },
    );
    let during = rss_kib(pid);
    eprintln!(
        "server sidecar RSS: {} KiB before, {} KiB with 10,000 silent connections",
        before, during
    );
    assert!(
        during < before + 32 * 1024,
        "10,000 silent connections cost {} KiB",
        during - before
    );
    rig.alive();
    drop(silent);
    rig.served();
}

#[test]
fn a_peer_that_stops_reading_costs_bounded_memory() {
    let mut rig = Rig::start();
    let pid_client = rig.client.child.id();
    let pid_server = rig.server.child.id();
    let before = rss_kib(pid_client) + rss_kib(pid_server);
    // Writes 256 MiB into the tunnel and never reads the echo: the echo backend blocks, then
    // both sidecars, then this writer. Nothing may buffer it all.
    let addr = rig.client_addr;
    let writer = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
        let chunk = noise(64 * 1024, 9);
        let mut sent = 0usize;
        while sent < 256 << 20 {
            match s.write(&chunk) {
                Ok(n) => sent += n,
                Err(_) => break,
            }
        }
        (s, sent)
    });
    let (stalled, sent) = writer.join().unwrap();
    assert!(
        sent < 256 << 20,
        "backpressure: the writer was stopped after {sent} bytes"
    );
    rig.served();
    let after = rss_kib(pid_client) + rss_kib(pid_server);
    eprintln!(
        "stalled after {} KiB in flight; sidecars' RSS {} KiB before, {} KiB after",
        sent / 1024,
        before,
        after
    );
    assert!(
        after < before + 32 * 1024,
        "a stalled peer cost {} KiB",
        after - before
    );
    rig.alive();
    drop(stalled);
}

#[test]
fn stalled_handshakes_do_not_starve_a_real_client_and_are_cut_counted_and_logged() {
    let mut rig = Rig::start_with(&["--max-connections", "8", "--first-flight-timeout", "5s"]);
    rig.served();
    // The attack: five times --max-connections send the first byte of a handshake and stall.
    let mut stalled: Vec<TcpStream> = (0..40)
        .map(|_| {
            let mut s = connect_from("127.0.0.2", rig.server_addr);
            s.write_all(&[0x16]).unwrap();
            s
        })
        .collect();
    // A real client is served while every stalled one still holds on.
    let answer = roundtrip(rig.client_addr, b"served meanwhile");
    assert_eq!(answer, b"served meanwhile", "{}", rig.server.log());
    let open = stalled.iter().filter(|s| still_open(s)).count();
    assert_eq!(
        open, 40,
        "the real client was served only after stalled handshakes were cut"
    );
    // Then they are cut at the first-flight deadline, counted and logged with their reason.
    for s in &mut stalled {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        assert!(rest.is_empty());
    }
    let key = "kith_sidecar_connections_total{direction=\"inbound\",result=\"handshake_timeout\"}";
    eventually(
        "40 handshake timeouts counted",
        Duration::from_secs(10),
        || {
            let m = http(rig.server_admin, "GET", "/metrics");
            if metric(&m, key) == Some(40.0) {
                Ok(())
            } else {
                Err(m)
            }
        },
    );
    let log = rig.server.log();
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("connection refused") && l.contains("handshake_timeout"))
        .collect();
    assert!(
        !refused.is_empty() && refused.len() <= 10,
        "at most 10 lines a reason in 10 s: {log}"
    );
    assert!(refused[0].contains("127.0.0.2:"), "{log}");
    rig.alive();
}
