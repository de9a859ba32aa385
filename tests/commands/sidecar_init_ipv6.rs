//! SECURITY: `kith sidecar init` never leaves IPv6 open. In a network namespace with IPv6 on
//! an interface, an `ip6tables` that cannot work (a failing one first on PATH) makes init fail
//! non-zero with the reason, before any rule is installed; `--ipv6 off` with a working
//! ip6tables blocks IPv6 instead. Needs root, `ip` and `iptables`; otherwise skipped (under
//! CI=true, a failure).
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt as _;
use std::process::{Command, Output};

struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

fn sh(args: &[&str]) -> Output {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn can_run() -> bool {
    let root = std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(2))
            == Some("0")
    });
    let tools = ["ip", "iptables"].iter().all(|t| {
        Command::new(t)
            .arg(if *t == "ip" { "-V" } else { "--version" })
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if root && tools {
        return true;
    }
    integration::skip::skip("sidecar_init_ipv6", "needs root, ip and iptables");
    false
}

/// A namespace whose veth pair (both ends inside) has link-local IPv6 addresses.
fn ipv6_namespace() -> Netns {
    let name = format!("kith-i6-{}", std::process::id());
    sh(&["ip", "netns", "add", &name]);
    let ns = Netns(name);
    for cmd in [
        &["ip", "link", "set", "lo", "up"][..],
        &[
            "ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1",
        ],
        &[
            "ip",
            "-6",
            "addr",
            "add",
            "fe80::5/64",
            "dev",
            "v0",
            "nodad",
        ],
        &["ip", "link", "set", "v0", "up"],
        &["ip", "link", "set", "v1", "up"],
    ] {
        let mut a = vec!["ip", "netns", "exec", &ns.0];
        a.extend_from_slice(cmd);
        sh(&a);
    }
    ns
}

fn init(ns: &Netns, path: &str, extra: &[&str]) -> Output {
    Command::new("ip")
        .args(["netns", "exec", &ns.0, "env", &format!("PATH={path}")])
        .arg(env!("CARGO_BIN_EXE_kith"))
        .args(["sidecar", "init", "--no-verify"])
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn init_fails_when_ipv6_cannot_be_captured_and_ipv6_off_blocks_it() {
    if !can_run() {
        return;
    }
    let ns = ipv6_namespace();
    let fake = tempfile::tempdir().unwrap();
    let ip6 = fake.path().join("ip6tables");
    std::fs::write(
        &ip6,
        "#!/bin/sh\necho 'ip6tables: no nat table' >&2\nexit 3\n",
    )
    .unwrap();
    std::fs::set_permissions(&ip6, std::fs::Permissions::from_mode(0o755)).unwrap();
    let system = std::env::var("PATH").unwrap_or_default();
    let broken = format!("{}:{system}", fake.path().display());

    let out = init(&ns, &broken, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("IPv6 is enabled in this network namespace (v")
            && err.contains("ip6tables cannot use the nat table")
            && err.contains("ip6tables: no nat table")
            && err.contains("--ipv6 off"),
        "{err}"
    );
    let nat = sh(&["ip", "netns", "exec", &ns.0, "iptables-save", "-t", "nat"]);
    assert!(
        !String::from_utf8_lossy(&nat.stdout).contains("KITH_"),
        "nothing installed"
    );
    // --ipv6 off needs a working ip6tables too.
    let out = init(&ns, &broken, &["--ipv6", "off"]);
    assert_eq!(out.status.code(), Some(1));

    // With the system's ip6tables, --ipv6 off blocks IPv6.
    let out = init(&ns, &system, &["--ipv6", "off"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("IPv6 blocked (--ipv6 off)"), "{said}");
    let filter = sh(&[
        "ip",
        "netns",
        "exec",
        &ns.0,
        "ip6tables-save",
        "-t",
        "filter",
    ]);
    assert!(String::from_utf8_lossy(&filter.stdout).contains("-A OUTPUT -j KITH_IPV6_OUT"));
}
