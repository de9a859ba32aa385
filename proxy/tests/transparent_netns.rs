//! The real `SO_ORIGINAL_DST` path, in a fresh network namespace with an iptables REDIRECT
//! rule (never the host's). Needs root, `ip` and `iptables`; otherwise skipped with a reason.
//!
//! The test re-executes this binary inside the namespace (`ip netns exec`), where
//! `netns_helper` connects to 10.255.0.1:80 (and [fd00:ff::1]:80), is redirected to the
//! listener, and checks what `SoOriginalDst` reports.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::process::{Command, Output};
use std::time::{SystemTime, UNIX_EPOCH};

use proxy::{OriginalDst, SoOriginalDst};
use tokio::net::{TcpListener, TcpStream};

const HELPER_ENV: &str = "KITH_NETNS_HELPER";
const PORT: u16 = 15001;

/// Deletes the namespace, whatever happens.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

fn run(args: &[&str]) -> std::io::Result<Output> {
    Command::new(args[0]).args(&args[1..]).output()
}

fn ok(args: &[&str]) -> Result<(), String> {
    match run(args) {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!("{args:?}: {e}")),
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

#[test]
fn so_original_dst_in_a_network_namespace() {
    if std::env::var_os(HELPER_ENV).is_some() {
        return;
    }
    if !is_root() {
        integration::skip::skip(
            "so_original_dst_in_a_network_namespace",
            "not root, cannot create a network namespace",
        );
        return;
    }
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let name = format!("kith-t-{}-{nanos:x}", std::process::id());
    if let Err(e) = ok(&["ip", "netns", "add", &name]) {
        integration::skip::skip(
            "so_original_dst_in_a_network_namespace",
            &format!("cannot create a network namespace: {e}"),
        );
        return;
    }
    let ns = Netns(name);
    let exec = |args: &[&str]| {
        let mut all = vec!["ip", "netns", "exec", &ns.0];
        all.extend_from_slice(args);
        ok(&all)
    };
    exec(&["ip", "link", "set", "lo", "up"]).unwrap();
    let port = PORT.to_string();
    let v4 = exec(&["ip", "route", "add", "10.255.0.0/16", "dev", "lo"]).and_then(|()| {
        exec(&[
            "iptables",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            "10.255.0.0/16",
            "-j",
            "REDIRECT",
            "--to-ports",
            &port,
        ])
    });
    if let Err(e) = v4 {
        integration::skip::skip(
            "so_original_dst_in_a_network_namespace",
            &format!("no iptables REDIRECT in the namespace: {e}"),
        );
        return;
    }
    let v6 = exec(&["ip", "-6", "route", "add", "fd00:ff::/32", "dev", "lo"]).and_then(|()| {
        exec(&[
            "ip6tables",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            "fd00:ff::/32",
            "-j",
            "REDIRECT",
            "--to-ports",
            &port,
        ])
    });
    if let Err(e) = &v6 {
        println!("IPv6 part skipped: {e}");
    }
    let me = std::env::current_exe().unwrap();
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0])
        .arg(me)
        .args(["--exact", "netns_helper", "--nocapture", "--test-threads=1"])
        .env(HELPER_ENV, if v6.is_ok() { "v4v6" } else { "v4" })
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("helper in {}:\n{stdout}", ns.0);
    assert!(out.status.success(), "helper failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("ORIGINAL_DST 10.255.0.1:80"),
        "helper did not report:\n{stdout}\n{stderr}"
    );
    if v6.is_ok() {
        assert!(
            stdout.contains("ORIGINAL_DST [fd00:ff::1]:80"),
            "no IPv6 report:\n{stdout}\n{stderr}"
        );
    }
    assert!(stdout.contains("NOT_REDIRECTED ok"), "{stdout}\n{stderr}");
    drop(ns);
}

/// Runs only inside the namespace (re-executed by the test above).
#[tokio::test]
async fn netns_helper() {
    let Some(mode) = std::env::var_os(HELPER_ENV) else {
        return;
    };
    let mut targets: Vec<(SocketAddr, SocketAddr)> = vec![(
        "127.0.0.1:15001".parse().unwrap(),
        "10.255.0.1:80".parse().unwrap(),
    )];
    if mode == "v4v6" {
        targets.push((
            "[::1]:15001".parse().unwrap(),
            "[fd00:ff::1]:80".parse().unwrap(),
        ));
    }
    for (bind, dest) in targets {
        let listener = TcpListener::bind(bind).await.unwrap();
        let _client = TcpStream::connect(dest).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let got = SoOriginalDst.original_dst(&accepted).unwrap();
        assert_eq!(got, dest);
        println!("ORIGINAL_DST {got}");

        // Connected straight to the listener: no original destination to follow.
        let _direct = TcpStream::connect(bind).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let err = SoOriginalDst.original_dst(&accepted).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound, "{err}");
    }
    println!("NOT_REDIRECTED ok");
}
