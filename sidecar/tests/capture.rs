//! `kith sidecar init` in throw-away network namespaces (root and iptables only). Never touches
//! the host namespace's rules: every iptables call goes through `ip netns exec <ns>`, and the
//! canary check runs in a thread that entered the test namespace with setns.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use sidecar::capture::{self, Family, InitArgs, Runner};

fn can_run() -> bool {
    let root = nix::unistd::geteuid().is_root();
    let ipt = Command::new("iptables")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let ip = Command::new("ip")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    if root && ipt && ip {
        return true;
    }
    integration::skip::skip("capture tests", "needs root, iptables and ip");
    false
}

/// A fresh network namespace with `lo` up, removed on drop (also on panic).
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Netns {
        static N: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!(
            "kith-test-{}-{}-{:x}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            nanos
        );
        sh(&["ip", "netns", "add", &name]);
        let ns = Netns { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    fn runner(&self) -> Runner {
        Runner::in_netns(&self.name)
    }

    fn exec(&self, args: &[&str]) -> String {
        let mut a = vec!["ip", "netns", "exec", &self.name];
        a.extend_from_slice(args);
        sh(&a)
    }

    /// A route for the canary: a veth pair (both ends inside) carrying the default route.
    fn add_default_route(&self) {
        self.exec(&[
            "ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1",
        ]);
        self.exec(&["ip", "addr", "add", "10.200.0.2/24", "dev", "v0"]);
        self.exec(&["ip", "link", "set", "v0", "up"]);
        self.exec(&["ip", "link", "set", "v1", "up"]);
        self.exec(&[
            "ip",
            "route",
            "add",
            "default",
            "via",
            "10.200.0.1",
            "dev",
            "v0",
        ]);
    }

    /// `<save> -t nat`, without comments and counters.
    fn nat(&self, bin: &str) -> String {
        let out = self.exec(&[&format!("{bin}-save"), "-t", "nat"]);
        out.lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| match l.find(" [") {
                Some(i) if l.starts_with(':') => &l[..i],
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Runs `f` in a thread that entered this namespace.
    fn within<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let fd = std::fs::File::open(&path).expect("open netns");
                nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                f()
            })
            .join()
            .expect("thread in the namespace panicked")
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether `bin` can use the nat table inside a fresh namespace.
fn backend_works(bin: &str) -> bool {
    let ns = Netns::new();
    ns.runner()
        .output(bin, &["-w", "-t", "nat", "-S"])
        .is_ok_and(|o| o.status.success())
}

fn args_for(bin: &str) -> InitArgs {
    InitArgs {
        iptables: Some(bin.to_owned()),
        exclude_ports: vec![22, 5432],
        exclude_cidrs: vec![
            capture::parse_cidr("10.96.0.0/12").expect("cidr"),
            capture::parse_cidr("fd00::/8").expect("cidr"),
        ],
        exclude_inbound_ports: vec![9090],
        no_verify: true,
        ..InitArgs::default()
    }
}

/// Apply, list, apply again (no change), uninstall (back to exactly the start), with one
/// backend; a pre-existing rule of someone else's must survive all of it.
fn lifecycle(bin: &str) {
    let ns = Netns::new();
    let runner = ns.runner();
    let bin6 = capture::ip6_name(bin);
    // Someone else's rules, present before kith.
    ns.exec(&[
        bin,
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-d",
        "192.0.2.1/32",
        "-j",
        "RETURN",
    ]);
    let v6 = runner
        .output(
            &bin6,
            &[
                "-w",
                "-t",
                "nat",
                "-A",
                "OUTPUT",
                "-d",
                "2001:db8::1/128",
                "-j",
                "RETURN",
            ],
        )
        .is_ok_and(|o| o.status.success());
    let before = ns.nat(bin);
    let before6 = v6.then(|| ns.nat(&bin6));

    let args = args_for(bin);
    let report = capture::execute(&runner, &args).expect("init");
    assert!(report.contains(bin), "{report}");

    let applied = ns.nat(bin);
    for want in [
        "-A OUTPUT -d 192.0.2.1/32 -j RETURN",
        "-A OUTPUT -p tcp -j KITH_OUTBOUND",
        "-A PREROUTING -p tcp -j KITH_INBOUND",
        "-A KITH_OUTBOUND -m owner --uid-owner 1337 --gid-owner 1337 -j RETURN",
        "-A KITH_OUTBOUND -d 10.96.0.0/12 -j RETURN",
        "--dport 5432 -j RETURN",
        "-A KITH_OUTBOUND -p tcp -j REDIRECT --to-ports 15001",
        "-A KITH_INBOUND -p tcp -j REDIRECT --to-ports 15006",
    ] {
        assert!(applied.contains(want), "missing {want:?} in\n{applied}");
    }
    for port in [15001, 15006, 15020, 15021, 9090] {
        let want = format!("--dport {port} -j RETURN");
        let inbound: Vec<&str> = applied
            .lines()
            .filter(|l| l.starts_with("-A KITH_INBOUND"))
            .collect();
        assert!(
            inbound.iter().any(|l| l.ends_with(&want)),
            "inbound {port} not excluded:\n{applied}"
        );
    }
    assert!(
        !applied.contains("fd00::/8"),
        "IPv6 CIDR in the IPv4 table:\n{applied}"
    );
    if v6 {
        let applied6 = ns.nat(&bin6);
        assert!(
            applied6.contains("-A KITH_OUTBOUND -d fd00::/8 -j RETURN"),
            "{applied6}"
        );
        assert!(
            applied6.contains("-A KITH_OUTBOUND -d ::1/128 -j RETURN"),
            "{applied6}"
        );
        assert!(
            applied6.contains("-A OUTPUT -p tcp -j KITH_OUTBOUND"),
            "{applied6}"
        );
    }

    // Idempotent.
    let applied6 = v6.then(|| ns.nat(&bin6));
    capture::execute(&runner, &args).expect("init again");
    assert_eq!(
        ns.nat(bin),
        applied,
        "a second init changed the IPv4 nat table"
    );
    assert_eq!(
        v6.then(|| ns.nat(&bin6)),
        applied6,
        "a second init changed the IPv6 nat table"
    );
    assert_eq!(applied.matches("-j KITH_OUTBOUND").count(), 1, "{applied}");

    // Uninstall: exactly as before, twice in a row.
    let un = InitArgs {
        uninstall: true,
        ..args.clone()
    };
    capture::execute(&runner, &un).expect("uninstall");
    assert_eq!(
        ns.nat(bin),
        before,
        "uninstall did not restore the IPv4 nat table"
    );
    assert_eq!(
        v6.then(|| ns.nat(&bin6)),
        before6,
        "uninstall did not restore the IPv6 nat table"
    );
    capture::execute(&runner, &un).expect("uninstall when nothing is installed");
    assert_eq!(ns.nat(bin), before);
}

#[test]
fn lifecycle_nft_backend() {
    if !can_run() {
        return;
    }
    // `iptables` is the nf_tables backend on this host; name it as such when it exists.
    let bin = if backend_works("iptables-nft") {
        "iptables-nft"
    } else {
        "iptables"
    };
    lifecycle(bin);
}

#[test]
fn lifecycle_legacy_backend() {
    if !can_run() {
        return;
    }
    if !backend_works("iptables-legacy") {
        eprintln!("SKIPPED legacy backend: iptables-legacy does not work in a namespace here");
        return;
    }
    lifecycle("iptables-legacy");
}

#[test]
fn dry_run_touches_nothing() {
    if !can_run() {
        return;
    }
    let ns = Netns::new();
    ns.exec(&[
        "iptables",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-d",
        "192.0.2.1/32",
        "-j",
        "RETURN",
    ]);
    let before = ns.nat("iptables");
    let args = InitArgs {
        dry_run: true,
        ..args_for("iptables")
    };
    let out = capture::execute(&ns.runner(), &args).expect("dry run");
    assert_eq!(
        ns.nat("iptables"),
        before,
        "--dry-run changed the nat table"
    );
    for want in [
        "*nat",
        ":KITH_OUTBOUND - [0:0]",
        "-A OUTPUT -p tcp -j KITH_OUTBOUND",
        "-A KITH_OUTBOUND -p tcp -j REDIRECT --to-ports 15001",
        "COMMIT",
    ] {
        assert!(out.contains(want), "missing {want:?} in\n{out}");
    }
    // The IPv4 part is valid iptables-restore input: it applies in a second namespace.
    let other = Netns::new();
    let v4 = capture::render(&args, Family::V4);
    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &other.name,
            "iptables-restore",
            "--noflush",
        ])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("iptables-restore");
    use std::io::Write as _;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(v4.as_bytes())
        .expect("write");
    assert!(
        child.wait().expect("wait").success(),
        "iptables-restore refused:\n{v4}"
    );
    assert!(
        other
            .nat("iptables")
            .contains("-A OUTPUT -p tcp -j KITH_OUTBOUND")
    );
}

#[test]
fn detects_the_backend_with_rules() {
    if !can_run() {
        return;
    }
    if !backend_works("iptables-legacy") {
        eprintln!("SKIPPED: iptables-legacy does not work in a namespace here");
        return;
    }
    let ns = Netns::new();
    ns.exec(&[
        "iptables-legacy",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-d",
        "192.0.2.1/32",
        "-j",
        "RETURN",
    ]);
    let b = capture::detect(&ns.runner(), None, false).expect("detect");
    assert_eq!(b.v4, "iptables-legacy");
    let b = capture::detect(&ns.runner(), Some("iptables-nft"), true).expect("detect");
    assert_eq!(b.v4, "iptables-nft");
}

#[test]
fn canary_fails_without_rules_and_passes_with_them() {
    if !can_run() {
        return;
    }
    let ns = Netns::new();
    ns.add_default_route();
    let args = InitArgs {
        iptables: Some("iptables".into()),
        ..InitArgs::default()
    };

    let err = ns
        .within(|| capture::canary_check(&args, Duration::from_millis(1500)))
        .expect_err("no rules yet: the canary must not arrive");
    let msg = identity::report::chain(&err);
    assert!(
        msg.contains("outbound capture is not working")
            && msg.contains("uid 0")
            && msg.contains("10.255.255.1:80")
            && msg.contains("127.0.0.1:15001"),
        "{msg}"
    );

    capture::install(&ns.runner(), "iptables", &args, Family::V4).expect("install");
    let dst = ns
        .within(|| capture::canary_check(&args, Duration::from_secs(3)))
        .expect("canary with rules");
    assert_eq!(dst, args.canary_addr);
    // From another UID (a `bash` child switched to it, which needs CAP_SETUID) as well.
    let nobody = InitArgs {
        canary_uid: Some(65534),
        ..args.clone()
    };
    let dst = ns
        .within(|| capture::canary_check(&nobody, Duration::from_secs(3)))
        .expect("canary from uid 65534 with rules");
    assert_eq!(dst, args.canary_addr);

    // The whole command as the init container runs it: in the namespace, verification on.
    // IPv6 is link-local only here: its rules are checked, not exercised.
    let report = ns
        .within(|| capture::execute(&Runner::default(), &args))
        .expect("init with verification");
    for want in [
        "verified: a connection from uid 0 gid 0 to 10.255.255.1:80 arrived at 127.0.0.1:15001",
        "which took a connection to 10.255.255.1:81 to 127.0.0.1:15006",
        "ip6tables OUTPUT jumps to KITH_OUTBOUND",
        "ip6tables PREROUTING jumps to KITH_INBOUND",
    ] {
        assert!(report.contains(want), "missing {want:?} in\n{report}");
    }
    // The temporary rule of the inbound canary is gone again.
    assert!(
        !ns.nat("iptables").contains("--dport 81"),
        "{}",
        ns.nat("iptables")
    );
    // With a unique-local address, IPv6 capture is proven by connections, both ways.
    ns.exec(&[
        "ip",
        "-6",
        "addr",
        "add",
        "fd00:200::2/64",
        "dev",
        "v0",
        "nodad",
    ]);
    let report = ns
        .within(|| capture::execute(&Runner::default(), &args))
        .expect("init with verification, IPv6");
    for want in [
        "to [fd00:200::6b69:7468:0:1]:80 arrived at [::1]:15001",
        "which took a connection to [fd00:200::6b69:7468:0:2]:81 to [::1]:15006",
    ] {
        assert!(report.contains(want), "missing {want:?} in\n{report}");
    }
    assert!(
        !ns.nat("ip6tables").contains("--dport 81"),
        "{}",
        ns.nat("ip6tables")
    );

    // Traffic from the proxy's UID is not captured: canary from 1337 is refused up front,
    // and with the jump removed the check fails again.
    let same = InitArgs {
        canary_uid: Some(1337),
        ..args.clone()
    };
    assert!(
        ns.within(|| capture::canary_check(&same, Duration::from_secs(1)))
            .is_err()
    );
    capture::uninstall(&ns.runner(), "iptables").expect("uninstall");
    assert!(
        ns.within(|| capture::canary_check(&args, Duration::from_millis(800)))
            .is_err()
    );
}

#[test]
fn cidrs_names_and_rules_without_root() {
    let c = capture::parse_cidr("10.0.0.0/8").expect("cidr");
    assert_eq!(c.to_string(), "10.0.0.0/8");
    assert_eq!(
        capture::parse_cidr("192.0.2.7").expect("bare").to_string(),
        "192.0.2.7/32"
    );
    assert_eq!(capture::parse_cidr("fd00::/8").expect("v6").prefix_len(), 8);
    assert!(capture::parse_cidr("10.0.0.0/33").is_err());
    assert!(capture::parse_cidr("example.com").is_err());
    assert_eq!(capture::ip6_name("iptables"), "ip6tables");
    assert_eq!(
        capture::ip6_name("/usr/sbin/iptables-legacy"),
        "/usr/sbin/ip6tables-legacy"
    );
    // Excluded inbound ports are deduplicated and the sidecar's own are always there.
    let args = InitArgs {
        exclude_inbound_ports: vec![15020, 8081, 8081],
        ..InitArgs::default()
    };
    let v4 = capture::render(&args, Family::V4);
    assert_eq!(v4.matches("--dport 15020 -j RETURN").count(), 1, "{v4}");
    assert_eq!(v4.matches("--dport 8081 -j RETURN").count(), 1, "{v4}");
    assert!(v4.contains("-d 127.0.0.0/8 -j RETURN"));
}

/// Two namespaces joined by a veth pair (`a0` in `a`, `b0` in `b`), each end with a static
/// link-local and a unique-local address (no duplicate address detection to wait for).
fn pair() -> (Netns, Netns) {
    static N: AtomicU32 = AtomicU32::new(0);
    let (a, b) = (Netns::new(), Netns::new());
    let n = N.fetch_add(1, Ordering::Relaxed);
    let (ka, kb) = (
        format!("ka{}x{n}", std::process::id()),
        format!("kb{}x{n}", std::process::id()),
    );
    sh(&[
        "ip", "link", "add", &ka, "type", "veth", "peer", "name", &kb,
    ]);
    sh(&["ip", "link", "set", &ka, "netns", &a.name, "name", "a0"]);
    sh(&["ip", "link", "set", &kb, "netns", &b.name, "name", "b0"]);
    for (ns, dev, n) in [(&a, "a0", "1"), (&b, "b0", "2")] {
        ns.exec(&["ip", "addr", "add", &format!("10.201.0.{n}/24"), "dev", dev]);
        ns.exec(&["ip", "link", "set", dev, "up"]);
        for addr in [format!("fe80::{n}/64"), format!("fd00:201::{n}/64")] {
            ns.exec(&["ip", "-6", "addr", "add", &addr, "dev", dev, "nodad"]);
        }
    }
    // For the IPv4 canary.
    a.exec(&["ip", "route", "add", "default", "via", "10.201.0.2"]);
    (a, b)
}

/// A listener bound inside `ns`.
fn listen_in(ns: &Netns, addr: &str) -> std::net::TcpListener {
    let addr: std::net::SocketAddr = addr.parse().expect("addr");
    ns.within(|| std::net::TcpListener::bind(addr).expect("bind in the namespace"))
}

/// A connection from inside `ns` (as this process, root).
fn connect_from(ns: &Netns, to: std::net::SocketAddr) -> std::io::Result<std::net::TcpStream> {
    ns.within(|| std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2)))
}

fn ifindex(ns: &Netns, dev: &str) -> u32 {
    ns.exec(&["cat", &format!("/sys/class/net/{dev}/ifindex")])
        .trim()
        .parse()
        .expect("ifindex")
}

/// A directory with `iptables` (the real one) and an `ip6tables` that always fails, as in a
/// namespace or image where ip6tables cannot work.
fn broken_ip6tables() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let real = String::from_utf8(
        Command::new("sh")
            .args(["-c", "command -v iptables"])
            .output()
            .expect("which")
            .stdout,
    )
    .expect("utf8");
    std::os::unix::fs::symlink(real.trim(), dir.path().join("iptables")).expect("symlink");
    let fake = dir.path().join("ip6tables");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho 'ip6tables: can'\\''t initialize ip6tables table `nat'\\''' >&2\nexit 3\n",
    )
    .expect("write");
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    dir
}

#[test]
fn init_fails_when_ipv6_is_enabled_and_ip6tables_cannot_capture_it() {
    if !can_run() {
        return;
    }
    let (a, _b) = pair();
    let dir = broken_ip6tables();
    let args = InitArgs {
        iptables: Some(dir.path().join("iptables").to_string_lossy().into_owned()),
        no_verify: true,
        ..InitArgs::default()
    };
    let err = capture::execute(&a.runner(), &args).expect_err("IPv6 uncapturable: must fail");
    let msg = identity::report::chain(&err);
    assert!(
        msg.contains("IPv6 is enabled in this network namespace")
            && msg.contains("a0")
            && msg.contains("ip6tables cannot use the nat table")
            && msg.contains("can't initialize ip6tables table `nat'")
            && msg.contains("--ipv6 off"),
        "{msg}"
    );
    // Nothing was installed: the decision comes before any rule.
    assert!(
        !a.nat("iptables").contains("KITH_"),
        "{}",
        a.nat("iptables")
    );
    // --ipv6 off cannot block it with that ip6tables either: also a failure.
    let off = InitArgs {
        ipv6: capture::Ipv6Mode::Off,
        ..args.clone()
    };
    let msg = format!(
        "{:#}",
        capture::execute(&a.runner(), &off).expect_err("cannot block: must fail")
    );
    assert!(
        msg.contains("--ipv6 off") && msg.contains("cannot use the filter table"),
        "{msg}"
    );
    // A namespace with IPv6 only on loopback has nothing to capture: that is not an error.
    let lo_only = Netns::new();
    let report = capture::execute(&lo_only.runner(), &args).expect("no IPv6 outside lo");
    assert!(
        report.contains("IPv6: not enabled in this namespace"),
        "{report}"
    );
}

#[test]
fn ipv6_off_blocks_ipv6_both_ways_but_not_loopback() {
    if !can_run() {
        return;
    }
    let (a, b) = pair();
    let idx_a = ifindex(&a, "a0");
    let idx_b = ifindex(&b, "b0");
    let to_b: Vec<std::net::SocketAddr> = vec![
        std::net::SocketAddrV6::new("fe80::2".parse().expect("ip"), 8080, 0, idx_a).into(),
        "[fd00:201::2]:8080".parse().expect("addr"),
    ];
    let to_a: Vec<std::net::SocketAddr> = vec![
        std::net::SocketAddrV6::new("fe80::1".parse().expect("ip"), 8080, 0, idx_b).into(),
        "[fd00:201::1]:8080".parse().expect("addr"),
    ];
    let _lb = listen_in(&b, "[::]:8080");
    let _la = listen_in(&a, "[::]:8080");
    let _la_lo = listen_in(&a, "[::1]:9000");
    // Open before: the test can tell blocked from open.
    for to in &to_b {
        connect_from(&a, *to).unwrap_or_else(|e| panic!("before: a -> {to}: {e}"));
    }
    for to in &to_a {
        connect_from(&b, *to).unwrap_or_else(|e| panic!("before: b -> {to}: {e}"));
    }
    let args = InitArgs {
        iptables: Some("iptables".into()),
        ipv6: capture::Ipv6Mode::Off,
        ..InitArgs::default()
    };
    // As the init container runs it: in the namespace, canaries on (the blocked one included).
    let report = a
        .within(|| capture::execute(&Runner::default(), &args))
        .expect("init --ipv6 off");
    assert!(report.contains("IPv6 blocked (--ipv6 off)"), "{report}");
    assert!(report.contains("was rejected"), "{report}");
    let filter = a.exec(&["ip6tables-save", "-t", "filter"]);
    for want in [
        "-A INPUT -j KITH_IPV6_IN",
        "-A OUTPUT -j KITH_IPV6_OUT",
        "-A KITH_IPV6_IN -i lo -j RETURN",
        "-A KITH_IPV6_IN -j DROP",
        "-A KITH_IPV6_OUT -o lo -j RETURN",
        "-A KITH_IPV6_OUT -p tcp -j REJECT --reject-with tcp-reset",
    ] {
        assert!(filter.contains(want), "missing {want:?} in\n{filter}");
    }
    for to in &to_b {
        let err = connect_from(&a, *to).expect_err("outbound IPv6 must be rejected");
        assert_eq!(
            err.kind(),
            std::io::ErrorKind::ConnectionRefused,
            "a -> {to}: {err}"
        );
    }
    for to in &to_a {
        connect_from(&b, *to).expect_err("inbound IPv6 must be dropped");
    }
    // IPv4 and IPv6 loopback still work.
    connect_from(&a, "[::1]:9000".parse().expect("addr")).expect("IPv6 loopback stays open");
    // Uninstall removes the block too.
    let un = InitArgs {
        uninstall: true,
        ..args.clone()
    };
    capture::execute(&a.runner(), &un).expect("uninstall");
    assert!(
        !a.exec(&["ip6tables-save", "-t", "filter"])
            .contains("KITH_")
    );
    connect_from(&a, to_b[1]).expect("open again after uninstall");
}

/// SECURITY (exemption is UID and GID): a process that switched to UID 1337 but kept another
/// GID is captured; only 1337:1337 (the proxy) is not.
#[test]
fn uid_1337_with_another_gid_is_captured() {
    if !can_run() {
        return;
    }
    let (a, b) = pair();
    let args = InitArgs {
        iptables: Some("iptables".into()),
        no_verify: true,
        ..InitArgs::default()
    };
    capture::execute(&a.runner(), &args).expect("init");
    let outbound = listen_in(&a, "127.0.0.1:15001");
    let peer = listen_in(&b, "10.201.0.2:80");
    outbound.set_nonblocking(true).expect("nonblocking");
    peer.set_nonblocking(true).expect("nonblocking");
    let send = |gid: u32| {
        a.exec(&[
            "setpriv",
            "--reuid=1337",
            &format!("--regid={gid}"),
            "--clear-groups",
            "bash",
            "-c",
            "exec 3<>/dev/tcp/10.201.0.2/80",
        ]);
    };
    // Where a connection arrived: the proxy's listener (captured) or the peer (exempt).
    let arrival = |what: &str| {
        let what = format!("the connection of {what} to arrive");
        integration::eventually(&what, Duration::from_secs(10), || {
            if let Ok((s, _)) = outbound.accept() {
                let dst = nix::sys::socket::getsockopt(&s, nix::sys::socket::sockopt::OriginalDst)
                    .expect("original dst");
                assert_eq!(u16::from_be(dst.sin_port), 80);
                return Some("captured");
            }
            peer.accept().is_ok().then_some("exempt")
        })
    };
    send(0);
    assert_eq!(arrival("uid 1337 gid 0"), "captured");
    send(1000);
    assert_eq!(arrival("uid 1337 gid 1000"), "captured");
    send(1337);
    assert_eq!(arrival("uid 1337 gid 1337"), "exempt");
}
