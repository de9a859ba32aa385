//! One full root rollover on a compressed timeline, end to end with the real binaries: a
//! `kith ca serve` whose root lives 180 s (successor at 90 s), an agent and two sidecars fed by
//! its Workload API, SVIDs of 20 s. Requests on new connections and on one keep-alive
//! connection never fail; the bundle holds two roots during the overlap; after the switch new
//! SVIDs chain to the new root; the old root leaves the bundle once its last leaf expired; the
//! audit log records each phase.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use crate::common::net::{echo_backend, free_port, try_http, wait_port};
use crate::common::{Proc, kith, serve_ca_with, stop, workload_svid};
use identity::{TrustBundle, TrustDomain, verify_x509_svid};
use integration::{eventually, eventually_async};
use rustls_pki_types::CertificateDer;
use serde_json::Value;

#[derive(Default)]
struct Traffic {
    ok: AtomicU64,
    failed: AtomicU64,
    last_error: std::sync::Mutex<String>,
}

impl Traffic {
    fn fail(&self, e: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock().unwrap() = e;
    }
}

/// A new connection per request.
fn one_shot(addr: SocketAddr, n: u64) -> Result<(), String> {
    let msg = format!("new connection {n}");
    let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(msg.as_bytes()).map_err(|e| e.to_string())?;
    s.shutdown(std::net::Shutdown::Write)
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).map_err(|e| e.to_string())?;
    if out != msg.as_bytes() {
        return Err(format!("answer {:?}", String::from_utf8_lossy(&out)));
    }
    Ok(())
}

/// One request on a connection kept open for the whole test.
fn keep_alive(s: &mut TcpStream, n: u64) -> Result<(), String> {
    let msg = format!("keep-alive {n:08}");
    s.write_all(msg.as_bytes()).map_err(|e| e.to_string())?;
    let mut out = vec![0u8; msg.len()];
    s.read_exact(&mut out).map_err(|e| e.to_string())?;
    if out != msg.as_bytes() {
        return Err(format!("answer {:?}", String::from_utf8_lossy(&out)));
    }
    Ok(())
}

fn root_status(data: &str) -> Value {
    let (code, out, err) = kith(&["ca", "root", "status", "--json", "--data-dir", data]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

fn bundle_roots(data: &str) -> Vec<CertificateDer<'static>> {
    let (code, pem, err) = kith(&["ca", "bundle", "--data-dir", data]);
    assert_eq!(code, 0, "{err}");
    identity::pem::certificates(pem.as_bytes()).unwrap()
}

/// The CA names roots by the hex SHA-256 of their DER.
fn sha_hex(c: &CertificateDer<'_>) -> String {
    ring::digest::digest(&ring::digest::SHA256, c)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The X509-SVID a workload gets from the agent now, with the `spiffe` crate.
fn workload_chain(socket: &std::path::Path) -> Vec<CertificateDer<'static>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(eventually_async(
        "an SVID from the agent",
        Duration::from_secs(20),
        async || workload_svid(socket).await.map(|(_, chain)| chain),
    ))
}

fn chains_to(chain: &[CertificateDer<'static>], root: &CertificateDer<'static>) -> bool {
    let td = TrustDomain::new("example.org").unwrap();
    let only = TrustBundle::from_roots(td, vec![root.clone()]).unwrap();
    verify_x509_svid(chain, &only, SystemTime::now()).is_ok()
}

#[test]
fn a_mesh_carries_requests_through_a_full_root_rollover() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca_data = d.join("ca");
    let ca = serve_ca_with(
        &ca_data,
        &[
            "--root-ttl",
            "180s",
            "--intermediate-ttl",
            "60s",
            "--node-ttl",
            "20s",
            "--workload-ttl",
            "20s",
        ],
    );
    let data = ca_data.to_str().unwrap();
    let first_root = bundle_roots(data);
    assert_eq!(first_root.len(), 1);
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

    let socket = d.join("run/agent.sock");
    let endpoint = format!("unix://{}", socket.display());
    // The join token from a file, never argv (where `ps` shows it).
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
            d.join("agent").to_str().unwrap(),
            "--socket",
            socket.to_str().unwrap(),
            "--bundle-sha256",
            join["bundle_sha256"].as_str().unwrap(),
            "--join-token-file",
            token_file.to_str().unwrap(),
        ],
    );
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
        ],
    );
    wait_port(client_addr);
    eventually("both sidecars to be ready", Duration::from_secs(30), || {
        let ready = [client_admin, server_admin].into_iter().all(|admin| {
            try_http(admin, "GET", "/ready").is_ok_and(|r| r.starts_with("HTTP/1.1 200"))
        });
        ready.then_some(()).ok_or_else(|| {
            format!(
                "\nagent:\n{}\nserver:\n{}\nclient:\n{}",
                agent.log(),
                server.log(),
                client.log()
            )
        })
    });

    // Load: a new connection every 200 ms, and one keep-alive connection every 500 ms.
    let traffic = Arc::new(Traffic::default());
    let stop_flag = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    {
        let (t, s) = (traffic.clone(), stop_flag.clone());
        workers.push(std::thread::spawn(move || {
            let mut n = 0;
            while !s.load(Ordering::Relaxed) {
                n += 1;
                match one_shot(client_addr, n) {
                    Ok(()) => t.ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        t.fail(format!("new connection {n}: {e}"));
                        0
                    }
                };
                std::thread::sleep(Duration::from_millis(200));
            }
        }));
    }
    {
        let (t, s) = (traffic.clone(), stop_flag.clone());
        workers.push(std::thread::spawn(move || {
            let mut conn = TcpStream::connect(client_addr).unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut n = 0;
            while !s.load(Ordering::Relaxed) {
                n += 1;
                match keep_alive(&mut conn, n) {
                    Ok(()) => t.ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        t.fail(format!("keep-alive request {n}: {e}"));
                        0
                    }
                };
                std::thread::sleep(Duration::from_millis(500));
            }
        }));
    }

    // Watch the rollover: two roots published, the switch, the old root leaving.
    let mut saw_two = false;
    let mut switched_at = None;
    let mut new_root = None;
    let mut saw_waiting = false;
    eventually("a full rollover", Duration::from_secs(300), || {
        let status = root_status(data);
        let roots = bundle_roots(data);
        saw_waiting |= !status["waiting"].is_null();
        if roots.len() == 2 {
            saw_two = true;
        }
        let active = status["roots"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["phase"] == "active")
            .unwrap()["sha256"]
            .as_str()
            .unwrap()
            .to_owned();
        if switched_at.is_none() && active != sha_hex(&first_root[0]) {
            switched_at = Some(Instant::now());
            new_root = roots.iter().find(|r| sha_hex(r) == active).cloned();
            assert!(new_root.is_some(), "the new root is in the bundle");
        }
        if switched_at.is_some() && roots.len() == 1 {
            assert_eq!(
                Some(&roots[0]),
                new_root.as_ref(),
                "only the new root is left"
            );
            return Ok(());
        }
        Err(format!(
            "saw_two={saw_two} switched={switched_at:?}\n{}",
            serde_json::to_string_pretty(&status).unwrap()
        ))
    });
    let new_root = new_root.unwrap();
    assert!(saw_two, "the bundle held two roots during the overlap");
    assert!(saw_waiting, "the switch waited (propagation, callers)");

    // The SVIDs workloads get now chain to the new root (and not to the old one).
    let chain = workload_chain(&socket);
    assert!(chains_to(&chain, &new_root));
    assert!(!chains_to(&chain, &first_root[0]));

    // Keep the load a few more seconds on the new root alone, then stop it.
    std::thread::sleep(Duration::from_secs(5));
    stop_flag.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    let (ok, failed) = (
        traffic.ok.load(Ordering::Relaxed),
        traffic.failed.load(Ordering::Relaxed),
    );
    assert_eq!(
        failed,
        0,
        "{failed} failed requests of {}; last: {}\nagent:\n{}\nserver:\n{}\nclient:\n{}",
        ok + failed,
        traffic.last_error.lock().unwrap(),
        agent.log(),
        server.log(),
        client.log()
    );
    assert!(ok > 100, "only {ok} requests went through");

    // Each phase is in the audit log, and the chain is intact.
    let (code, out, err) = kith(&[
        "ca",
        "audit",
        "list",
        "--json",
        "--limit",
        "10000",
        "--data-dir",
        data,
    ]);
    assert_eq!(code, 0, "{err}");
    let rows: Vec<Value> = serde_json::from_str(&out).unwrap();
    for phase in ["root.published", "root.activated", "root.retired"] {
        let row = rows.iter().find(|r| r["action"] == phase);
        assert!(row.is_some(), "{phase} is audited");
    }
    let activated = rows
        .iter()
        .find(|r| r["action"] == "root.activated")
        .unwrap();
    assert_eq!(
        activated["detail"]["forced"], false,
        "every caller confirmed the new root before the switch: {activated}"
    );
    let (code, _, _) = kith(&["ca", "audit", "verify", "--data-dir", data]);
    assert_eq!(code, 0);
    drop((client, server, agent));
    assert_eq!(stop(ca), 0);
}
