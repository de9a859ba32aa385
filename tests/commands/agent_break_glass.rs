//! The README's break-glass path, run as written: a `kith ca serve` whose root ends while the CA
//! is down makes a new root at start; the agent on the host holds an identity under the dead
//! root. `kith ca token create --name <host>` prints the pin of the new bundle, and
//! `kith agent run --ca … --bundle-sha256 <pin> --join-token-file <file>` over the old data dir
//! sets the old identity aside and attests again: workloads get SVIDs under the new root.
//! Also: a CA rebuilt from nothing (a new root while the agent's identity is still valid) is
//! rejoined the same way, and a token left in the configuration changes nothing on a restart.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use crate::common;
use crate::common::{Proc, kith, serve_ca_with, stop, workload_svid};
use identity::{TrustBundle, TrustDomain, verify_x509_svid};
use integration::eventually_async;
use rustls_pki_types::CertificateDer;
use serde_json::Value;

/// A root of 60 s whose successor would only be made at 90 % of its life: stopped before
/// that, the CA comes back to a dead root with no successor.
const SHORT_ROOT: &[&str] = &[
    "--root-ttl",
    "60s",
    "--intermediate-ttl",
    "60s",
    "--root-rollover-at",
    "0.9",
    "--node-ttl",
    "20s",
    "--workload-ttl",
    "20s",
];

fn uid() -> u32 {
    // The uid this test runs as, from the kernel's view of ourselves.
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|u| u.parse().ok())
        .unwrap()
}

/// `kith ca token create --name <host>` as the README says; returns the `--ca` URL (the
/// printed one names the configured port; this CA listens on a port the kernel chose), the
/// `--bundle-sha256` pin, and the token written to a file (never argv).
fn token_line(ca: &common::Ca, ca_data: &str, host: &str, dir: &Path) -> (String, String, PathBuf) {
    let (code, out, err) = kith(&[
        "ca",
        "token",
        "create",
        "--name",
        host,
        "--data-dir",
        ca_data,
    ]);
    assert_eq!(code, 0, "{err}");
    let line = out.lines().find(|l| l.contains("kith agent run")).unwrap();
    let words: Vec<&str> = line.split_whitespace().collect();
    let arg = |flag: &str| words[words.iter().position(|w| *w == flag).unwrap() + 1].to_owned();
    let token = words
        .iter()
        .find_map(|w| w.strip_prefix("KITH_JOIN_TOKEN="))
        .unwrap();
    let file = dir.join(format!("token-{}", rand_suffix()));
    std::fs::write(&file, format!("{token}\n")).unwrap();
    assert!(arg("--ca").starts_with("https://"), "{line}");
    (format!("https://{}", ca.addr), arg("--bundle-sha256"), file)
}

fn rand_suffix() -> u128 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn entry(ca_data: &str, host: &str) {
    let (code, _, err) = kith(&[
        "ca",
        "entry",
        "create",
        "--id",
        "spiffe://example.org/web",
        "--parent",
        &format!("spiffe://example.org/kith/node/{host}"),
        "--selector",
        &format!("unix:uid:{}", uid()),
        "--data-dir",
        ca_data,
    ]);
    assert_eq!(code, 0, "{err}");
}

fn agent(dir: &Path, name: &str, url: &str, data: &Path, socket: &Path, extra: &[&str]) -> Proc {
    let mut args = vec![
        "agent",
        "run",
        "--ca",
        url,
        "--admin-listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
        "--socket",
        socket.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    Proc::spawn(dir, name, &args)
}

fn sigterm(p: &mut Proc) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(p.child.id().to_string())
        .status();
    let _ = p.child.wait();
}

fn bundle_roots(ca_data: &str) -> Vec<CertificateDer<'static>> {
    let (code, pem, err) = kith(&["ca", "bundle", "--data-dir", ca_data]);
    assert_eq!(code, 0, "{err}");
    identity::pem::certificates(pem.as_bytes()).unwrap()
}

fn chains_to(chain: &[CertificateDer<'static>], roots: &[CertificateDer<'static>]) -> bool {
    let td = TrustDomain::new("example.org").unwrap();
    let only = TrustBundle::from_roots(td, roots.to_vec()).unwrap();
    verify_x509_svid(chain, &only, SystemTime::now()).is_ok()
}

/// Waits until the agent at `socket` serves a workload SVID that chains to `roots`.
fn eventually_served_under(socket: &Path, roots: &[CertificateDer<'static>], agent: &Proc) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(eventually_async(
        "an SVID under the expected root",
        Duration::from_secs(30),
        async || {
            let served = workload_svid(socket).await;
            match served {
                Some((_, chain)) if chains_to(&chain, roots) => Ok(()),
                _ => Err(format!("agent log:\n{}", agent.log())),
            }
        },
    ))
}

fn set_aside_dirs(data: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(data)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("replaced-")
        })
        .collect()
}

#[test]
fn after_a_ca_was_down_past_its_root_the_readmes_commands_rejoin_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let ca_data = dir.path().join("ca");
    let d = ca_data.to_str().unwrap();
    let data = dir.path().join("agent");
    let socket = dir.path().join("run/agent.sock");

    let ca = serve_ca_with(&ca_data, SHORT_ROOT);
    entry(d, "host-a");
    let (url, pin, token) = token_line(&ca, d, "host-a", dir.path());
    let old_roots = bundle_roots(d);
    let mut a = agent(
        dir.path(),
        "agent-1",
        &url,
        &data,
        &socket,
        &[
            "--bundle-sha256",
            &pin,
            "--join-token-file",
            token.to_str().unwrap(),
        ],
    );
    eventually_served_under(&socket, &old_roots, &a);
    let (_, out, _) = kith(&["ca", "status", "--json", "--data-dir", d]);
    let root_end = serde_json::from_str::<Value>(&out).unwrap()["root_not_after"]
        .as_i64()
        .unwrap();
    // The CA goes down before any successor is made, the agent with it.
    assert_eq!(stop(ca), 0);
    sigterm(&mut a);
    let end = SystemTime::UNIX_EPOCH + Duration::from_secs(root_end as u64 + 1);
    if let Ok(left) = end.duration_since(SystemTime::now()) {
        std::thread::sleep(left);
    }

    // 1. The CA starts past its root's end: a new root, and it serves again.
    let ca = serve_ca_with(&ca_data, SHORT_ROOT);
    let (code, out, err) = kith(&["ca", "status", "--data-dir", d]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("time to outage"), "{out}");
    let new_roots = bundle_roots(d);
    assert!(
        new_roots.iter().all(|r| !old_roots.contains(r)),
        "the dead root left the bundle"
    );
    // Without the README's step the agent cannot come back: its identity is under the dead root.
    let mut stale = agent(dir.path(), "agent-stale", &url, &data, &socket, &[]);
    let code = stale.child.wait().unwrap().code();
    assert_ne!(code, Some(0), "{}", stale.log());
    assert!(
        stale.log().contains("kith ca token create --name host-a"),
        "{}",
        stale.log()
    );

    // 2. A token for the host; 3. the agent started with the printed pin and the token file,
    // over its old data dir.
    let (url, new_pin, token) = token_line(&ca, d, "host-a", dir.path());
    assert_ne!(new_pin, pin);
    let a = agent(
        dir.path(),
        "agent-2",
        &url,
        &data,
        &socket,
        &[
            "--bundle-sha256",
            &new_pin,
            "--join-token-file",
            token.to_str().unwrap(),
        ],
    );
    eventually_served_under(&socket, &new_roots, &a);
    assert!(
        a.log().contains("set aside"),
        "the agent says what it did: {}",
        a.log()
    );
    let aside = set_aside_dirs(&data);
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert!(aside[0].join("node.key").exists(), "kept, not deleted");
    drop(a);
    assert_eq!(stop(ca), 0);
}

#[test]
fn a_new_root_under_a_still_valid_identity_is_rejoined_and_a_kept_token_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("agent");
    let socket = dir.path().join("run/agent.sock");

    let ca_data = dir.path().join("ca-1");
    let d = ca_data.to_str().unwrap();
    let ca = serve_ca_with(&ca_data, &[]);
    entry(d, "host-a");
    let (url, pin, token) = token_line(&ca, d, "host-a", dir.path());
    let join = [
        "--bundle-sha256",
        pin.as_str(),
        "--join-token-file",
        token.to_str().unwrap(),
    ];
    let mut a = agent(dir.path(), "agent-1", &url, &data, &socket, &join);
    let first = bundle_roots(d);
    eventually_served_under(&socket, &first, &a);
    sigterm(&mut a);
    // The same (used) token and pin on a restart, as a compose file passes them every time:
    // the stored identity chains to the pinned bundle and stays.
    let mut a = agent(dir.path(), "agent-2", &url, &data, &socket, &join);
    eventually_served_under(&socket, &first, &a);
    assert!(set_aside_dirs(&data).is_empty(), "{}", a.log());
    sigterm(&mut a);
    assert_eq!(stop(ca), 0);

    // The CA is rebuilt from nothing: another root, while the agent's identity is still valid.
    let ca_data = dir.path().join("ca-2");
    let d = ca_data.to_str().unwrap();
    let ca = serve_ca_with(&ca_data, &[]);
    entry(d, "host-a");
    let (url, new_pin, token) = token_line(&ca, d, "host-a", dir.path());
    let a = agent(
        dir.path(),
        "agent-3",
        &url,
        &data,
        &socket,
        &[
            "--bundle-sha256",
            &new_pin,
            "--join-token-file",
            token.to_str().unwrap(),
        ],
    );
    let second = bundle_roots(d);
    eventually_served_under(&socket, &second, &a);
    assert_eq!(set_aside_dirs(&data).len(), 1, "{}", a.log());
    drop(a);
    assert_eq!(stop(ca), 0);
}
