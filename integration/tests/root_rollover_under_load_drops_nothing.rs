//! The pod lab through one full root rollover: the CA's root lives 180 s (a successor is made at
//! 90 s), SVIDs 20 s, and pod a sends requests to pod b over long-lived connections and a new
//! connection per request the whole time. Zero failed requests; the bundle holds two roots
//! during the overlap; after the switch the certificate b's sidecar presents chains to the new
//! root alone; the old root leaves the bundle after its last leaf.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use integration::{Lab, eventually, podapp, run};
use serde_json::Value;

/// The DER certificates in PEM text.
fn pem_certs(pem: &str) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut b64 = String::new();
    let mut inside = false;
    for line in pem.lines() {
        match line.trim() {
            "-----BEGIN CERTIFICATE-----" => {
                inside = true;
                b64.clear();
            }
            "-----END CERTIFICATE-----" => {
                inside = false;
                out.push(
                    base64::engine::general_purpose::STANDARD
                        .decode(&b64)
                        .unwrap(),
                );
            }
            l if inside => b64.push_str(l),
            _ => {}
        }
    }
    out
}

fn to_pem(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut s = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        s.push_str(std::str::from_utf8(chunk).unwrap());
        s.push('\n');
    }
    s.push_str("-----END CERTIFICATE-----\n");
    s
}

fn sha_hex(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The chain pod `ip`'s sidecar presents on its app port, as seen by a TLS client on the node.
fn presented_chain(lab: &Lab, ip: std::net::Ipv4Addr) -> Vec<Vec<u8>> {
    let out = run(&[
        "ip",
        "netns",
        "exec",
        &lab.node,
        "openssl",
        "s_client",
        "-connect",
        &format!("{ip}:8080"),
        "-showcerts",
    ]);
    pem_certs(&String::from_utf8_lossy(&out.stdout))
}

/// Whether `chain` (leaf first) verifies under `root` alone, with openssl.
fn verifies_under(dir: &Path, chain: &[Vec<u8>], root: &[u8]) -> bool {
    if chain.is_empty() {
        return false;
    }
    let root_f = dir.join("check-root.pem");
    let leaf_f = dir.join("check-leaf.pem");
    let rest_f = dir.join("check-rest.pem");
    std::fs::write(&root_f, to_pem(root)).unwrap();
    std::fs::write(&leaf_f, to_pem(&chain[0])).unwrap();
    let rest: String = chain[1..].iter().map(|c| to_pem(c)).collect();
    std::fs::write(&rest_f, rest).unwrap();
    let mut args = vec!["openssl", "verify", "-CAfile", root_f.to_str().unwrap()];
    if chain.len() > 1 {
        args.extend_from_slice(&["-untrusted", rest_f.to_str().unwrap()]);
    }
    args.push(leaf_f.to_str().unwrap());
    run(&args).status.success()
}

#[test]
fn root_rollover_under_load_drops_nothing() {
    if !Lab::available("root_rollover_under_load_drops_nothing") {
        return;
    }
    let mut lab = Lab::start_with(
        "20s",
        &[
            "--root-ttl",
            "180s",
            "--intermediate-ttl",
            "60s",
            "--node-ttl",
            "20s",
        ],
    );
    let (a, a_sidecar) = lab.ready_pod("a", &[]);
    let (b, b_sidecar) = lab.ready_pod("b", &[]);
    let bundle = |lab: &Lab| pem_certs(&lab.ca_cli(&["bundle"]));
    let first = bundle(&lab);
    assert_eq!(first.len(), 1);
    assert!(
        verifies_under(lab.dir.path(), &presented_chain(&lab, b.ip), &first[0]),
        "b's sidecar presents a chain under the first root"
    );

    // Load in rounds of 15 s until told to stop: 4 long-lived connections per round, and a
    // new connection per request.
    let failed = Arc::new(AtomicU64::new(0));
    let ok = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let last = Arc::new(std::sync::Mutex::new(String::new()));
    let addr = format!("{}:8080", b.ip);
    let workers: Vec<_> = [
        vec!["load".to_owned(), addr.clone(), "15".into(), "4".into()],
        vec!["get".to_owned(), addr.clone(), "/".into(), "new".into()],
    ]
    .into_iter()
    .map(|cmd| {
        let (failed, ok, stop, last) = (failed.clone(), ok.clone(), stop.clone(), last.clone());
        let ns = a.ns.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let mut args = vec!["ip", "netns", "exec", ns.as_str(), podapp()];
                args.extend(cmd.iter().map(String::as_str));
                let out = run(&args);
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                if cmd[0] == "load" {
                    match serde_json::from_str::<Value>(text.trim()) {
                        Ok(v) => {
                            ok.fetch_add(v["ok"].as_u64().unwrap_or(0), Ordering::Relaxed);
                            let f = v["failed"].as_u64().unwrap_or(1);
                            if f > 0 {
                                failed.fetch_add(f, Ordering::Relaxed);
                                *last.lock().unwrap() = text;
                            }
                        }
                        Err(_) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            *last.lock().unwrap() = text;
                        }
                    }
                } else if out.status.success() && text.contains("b:new") {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                    *last.lock().unwrap() = format!(
                        "new connection: {text} {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
            }
        })
    })
    .collect();

    // Watch the rollover: two roots, the switch, the old root leaving.
    let started = Instant::now();
    let mut saw_two = false;
    let mut new_root: Option<Vec<u8>> = None;
    eventually("a full rollover", Duration::from_secs(300), || {
        let status: Value =
            serde_json::from_str(&lab.ca_cli(&["root", "status", "--json"])).unwrap();
        let roots = bundle(&lab);
        saw_two |= roots.len() == 2;
        let active = status["roots"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["phase"] == "active")
            .map(|r| r["sha256"].as_str().unwrap().to_owned());
        if new_root.is_none()
            && let Some(active) = active
            && active != sha_hex(&first[0])
        {
            new_root = roots.iter().find(|r| sha_hex(r) == active).cloned();
            assert!(new_root.is_some(), "the new root is in the bundle");
        }
        if new_root.is_some() && roots.len() == 1 {
            assert_eq!(
                Some(&roots[0]),
                new_root.as_ref(),
                "only the new root is left"
            );
            return Ok(());
        }
        Err(format!(
            "saw_two={saw_two} switched={}\n{status:#}",
            new_root.is_some()
        ))
    });
    let new_root = new_root.unwrap();
    // The old root left once its last leaf expired: b's sidecar renewed under the new root.
    eventually(
        "b's sidecar presents a chain under the new root",
        Duration::from_secs(60),
        || verifies_under(lab.dir.path(), &presented_chain(&lab, b.ip), &new_root),
    );
    assert!(!verifies_under(
        lab.dir.path(),
        &presented_chain(&lab, b.ip),
        &first[0]
    ));
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!(
        "rollover done after {:?}: {ok} requests ok, {failed} failed",
        started.elapsed()
    );
    assert!(saw_two, "the bundle held two roots during the overlap");
    assert_eq!(
        failed,
        0,
        "last failure: {}\na:\n{}\nb:\n{}",
        last.lock().unwrap(),
        a_sidecar.log(),
        b_sidecar.log()
    );
    assert!(ok > 1000, "{ok}");
    lab.keep(a_sidecar);
    lab.keep(b_sidecar);
}
