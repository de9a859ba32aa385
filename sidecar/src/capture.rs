//! `kith sidecar init`: programs the pod's network namespace so that the sidecar sees its
//! traffic (transparent mode). It runs as the pod's init container, with NET_ADMIN, inside the
//! pod's network namespace, and never anywhere else: the host's own namespace carries the
//! container engine's rules.
//!
//! What it adds to the nat table:
//!
//! - chain `KITH_OUTBOUND`, jumped to once from `OUTPUT` (`-p tcp`): returns for the proxy's
//!   UID and GID together (`--proxy-uid`, `--proxy-gid`: a process that switches only its UID
//!   is still captured), loopback destinations, `--exclude-cidrs` and `--exclude-ports`, and
//!   redirects every other outbound TCP connection to the proxy's outbound port (15001);
//! - chain `KITH_INBOUND`, jumped to once from `PREROUTING` (`-p tcp`): returns for the
//!   sidecar's own ports (15001, 15006, 15020, 15021 and `--exclude-inbound-ports`) and
//!   redirects every other inbound TCP connection to the inbound port (15006).
//!
//! Applying it again flushes and refills the chains (same result); the jumps are added only
//! when missing. `--uninstall` removes the jumps and kith's chains, and nothing else.
//!
//! IPv4 goes through `iptables`, IPv6 through `ip6tables`. IPv6 is never left open: with
//! `--ipv6 on` (the default) the same nat rules are installed with ip6tables, and init fails
//! when IPv6 is enabled in the namespace (an interface other than `lo` has an IPv6 address)
//! but ip6tables cannot use the nat table; with `--ipv6 off` the filter table gets chains
//! `KITH_IPV6_IN` (from `INPUT`: drop all but `lo`) and `KITH_IPV6_OUT` (from `OUTPUT`: reject
//! all but `lo`), and init fails when IPv6 is enabled and that is impossible.
//!
//! The backend (nf_tables or legacy) is the one that already holds rules in the namespace,
//! else the system's `iptables`; `--iptables <path>` overrides it.
//!
//! Before it reports success, `init` proves the capture with canary connections from
//! `--canary-uid` (a child process, `bash`'s /dev/tcp, or a thread when it is our own UID),
//! each of which must arrive with SO_ORIGINAL_DST naming where it was sent:
//!
//! - IPv4 outbound: to `--canary-addr`, at 127.0.0.1:<outbound port>;
//! - inbound: the PREROUTING jump is checked in the kernel's table, and a connection sent
//!   through the inbound chain (by a temporary OUTPUT rule for the canary's address only,
//!   removed afterwards: a pod cannot send itself a packet through PREROUTING) must arrive at
//!   <inbound port>;
//! - IPv6 (when enabled and captured): the same two to a link-local address of an interface
//!   (it has a route even without a default route), at [::1];
//! - `--ipv6 off`: an IPv6 connection must be rejected.
//!
//! The IPv4 canary needs a route to its address (a pod has a default route) and, for another
//! UID, `bash` in the image. A failed check exits non-zero and leaves the rules in place (the
//! pod does not start; `--uninstall` removes them).
//!
//! Why this is one file of over 500 lines: everything `kith sidecar init` does to a pod's
//! namespace, in the order it does it: the rules (rendered, installed, removed), the IPv6 policy,
//! and the canary checks that prove the rules just installed.

use std::fmt::Write as _;
use std::io::Read as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener};
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Command, ExitCode, Output, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use identity::mesh;
use identity::report::chain;

/// Why `kith sidecar init` failed: a program that would not run or refused a rule, an IPv6
/// policy that cannot hold here, or a canary check that proved the capture is not working.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("cannot run {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    /// `step` says what was being done (`installing with ip6tables`); the source what failed.
    #[error("{step}")]
    Step {
        step: String,
        #[source]
        source: Box<CaptureError>,
    },
    #[error("canary check: an IPv6 original destination {got} for {target}")]
    CanaryGotIpv6 {
        got: SocketAddrV6,
        target: SocketAddr,
    },
    #[error("{what} is not working: {bin} has no `{rule}`")]
    NoJump {
        what: &'static str,
        bin: String,
        rule: String,
    },
    #[error(
        "the canary would connect as UID {uid} and GID {gid}, the proxy's, whose traffic is \
         deliberately not captured: run init as another UID or pass --canary-uid"
    )]
    CanaryExempt { uid: u32, gid: u32 },
    #[error("canary check: cannot listen on {listen} (is something already using it?)")]
    CanaryListen {
        listen: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("canary check: cannot make the listener on {listen} non-blocking")]
    CanaryNonBlocking {
        listen: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "canary check: a connection from {peer} arrived at {listen} but \
         SO_ORIGINAL_DST is unreadable ({error}): it was not redirected"
    )]
    OriginalDst {
        peer: SocketAddr,
        listen: SocketAddr,
        error: nix::Error,
    },
    #[error("canary check: accept on {listen}: {error}")]
    CanaryAccept {
        listen: SocketAddr,
        error: std::io::Error,
    },
    #[error(
        "{what} is not working: a TCP connection from uid {uid} gid {gid} to {target} \
         was not redirected to {listen}: {why}. Check that the nat OUTPUT chain jumps \
         to {OUTBOUND_CHAIN} in this network namespace and that {target} is routable \
         here (--canary-addr)"
    )]
    NotRedirected {
        what: &'static str,
        uid: u32,
        gid: u32,
        target: SocketAddr,
        listen: SocketAddr,
        why: String,
    },
    #[error("canary check: cannot start `bash` as the canary UID")]
    CanaryStart(#[source] std::io::Error),
    #[error(
        "IPv6 is enabled in this network namespace ({interface} has {addr}) but {bin6} cannot use the \
         nat table here ({said}), so IPv6 traffic would bypass capture; make {bin6} work (the \
         same backend as {v4}), or pass --ipv6 off to block IPv6 instead"
    )]
    Ipv6Uncaptured {
        interface: String,
        addr: Ipv6Addr,
        bin6: String,
        said: String,
        v4: String,
    },
    #[error(
        "--ipv6 off: IPv6 is enabled in this network namespace ({interface} has {addr}) but {bin6} \
         cannot use the filter table here ({said}) to block it; disable IPv6 in the pod \
         (sysctl net.ipv6.conf.all.disable_ipv6=1) or make {bin6} work"
    )]
    Ipv6Unblocked {
        interface: String,
        addr: Ipv6Addr,
        bin6: String,
        said: String,
    },
    #[error("IPv6 is not blocked: a connection to {target} failed with {error}, not a rejection")]
    Ipv6NotRejected {
        target: SocketAddr,
        error: std::io::Error,
    },
    #[error("IPv6 is not blocked: a connection to {target} was accepted")]
    Ipv6Accepted { target: SocketAddr },
    #[error("no interface outside loopback has an IPv6 address")]
    NoIpv6Address,
    #[error(
        "no usable link-local address (still in duplicate address detection?) among {interfaces:?}"
    )]
    NoLinkLocal { interfaces: Vec<String> },
}

type Result<T, E = CaptureError> = std::result::Result<T, E>;

/// Wraps an error with the step it happened in.
fn step(what: impl Into<String>) -> impl FnOnce(CaptureError) -> CaptureError {
    let step = what.into();
    move |source| CaptureError::Step {
        step,
        source: Box::new(source),
    }
}

pub const OUTBOUND_CHAIN: &str = "KITH_OUTBOUND";
pub const INBOUND_CHAIN: &str = "KITH_INBOUND";
/// The sidecar's own ports, never redirected inbound: outbound and inbound capture, admin,
/// health.
pub use identity::mesh::SIDECAR_PORTS;

#[derive(Debug, Clone, Args)]
pub struct InitArgs {
    /// The proxy's UID: its own outbound connections are not captured (with --proxy-gid:
    /// a process must run as both to be exempt)
    #[arg(long, env = "KITH_PROXY_UID", default_value_t = mesh::PROXY_UID)]
    pub proxy_uid: u32,
    /// The proxy's GID: exemption from capture needs this GID as well as the UID
    #[arg(long, env = "KITH_PROXY_GID", default_value_t = mesh::PROXY_GID)]
    pub proxy_gid: u32,
    /// Where outbound TCP is redirected
    #[arg(long, default_value_t = mesh::OUTBOUND_PORT)]
    pub outbound_port: u16,
    /// Where inbound TCP is redirected
    #[arg(long, default_value_t = mesh::INBOUND_PORT)]
    pub inbound_port: u16,
    /// Outbound destination ports not captured (comma-separated)
    #[arg(long, env = "KITH_EXCLUDE_PORTS", value_delimiter = ',')]
    pub exclude_ports: Vec<u16>,
    /// Outbound destination CIDRs not captured (comma-separated, IPv4 and IPv6)
    #[arg(long, env = "KITH_EXCLUDE_CIDRS", value_delimiter = ',', value_parser = parse_cidr)]
    pub exclude_cidrs: Vec<Cidr>,
    /// Inbound ports not captured, besides 15001, 15006, 15020 and 15021 (comma-separated)
    #[arg(long, env = "KITH_EXCLUDE_INBOUND_PORTS", value_delimiter = ',')]
    pub exclude_inbound_ports: Vec<u16>,
    /// Print the rules (iptables-restore format) and change nothing
    #[arg(long, conflicts_with = "uninstall")]
    pub dry_run: bool,
    /// Remove the chains and jumps `init` added, and nothing else
    #[arg(long)]
    pub uninstall: bool,
    /// The iptables binary (e.g. /usr/sbin/iptables-legacy); ip6tables is derived from its name
    /// [default: the backend that already has rules, else `iptables`]
    #[arg(long, env = "KITH_IPTABLES")]
    pub iptables: Option<String>,
    /// IPv6: `on` captures it like IPv4 (init fails when IPv6 is enabled here and ip6tables
    /// cannot capture it); `off` blocks it (REJECT out, DROP in, loopback excepted)
    #[arg(long, env = "KITH_IPV6", value_enum, default_value_t = Ipv6Mode::On)]
    pub ipv6: Ipv6Mode,
    /// The canary's destination: any non-local address (it is never reached)
    #[arg(long, default_value = "10.255.255.1:80")]
    pub canary_addr: SocketAddrV4,
    /// The UID the canary connects from (must not be the proxy's) [default: this process's
    /// own, which needs neither CAP_SETUID nor a shell]
    #[arg(long)]
    pub canary_uid: Option<u32>,
    /// The GID the canary connects from [default: the canary's UID]
    #[arg(long, requires = "canary_uid")]
    pub canary_gid: Option<u32>,
    /// Skip the canary check after applying the rules
    #[arg(long)]
    pub no_verify: bool,
}

impl Default for InitArgs {
    fn default() -> Self {
        InitArgs {
            proxy_uid: 1337,
            proxy_gid: 1337,
            outbound_port: 15001,
            inbound_port: 15006,
            exclude_ports: Vec::new(),
            exclude_cidrs: Vec::new(),
            exclude_inbound_ports: Vec::new(),
            dry_run: false,
            uninstall: false,
            iptables: None,
            ipv6: Ipv6Mode::On,
            canary_addr: SocketAddrV4::new(Ipv4Addr::new(10, 255, 255, 1), 80),
            canary_uid: None,
            canary_gid: None,
            no_verify: false,
        }
    }
}

/// What `init` does with IPv6.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Ipv6Mode {
    /// Capture it like IPv4; fail when it is enabled and cannot be captured.
    On,
    /// Block it (both directions, loopback excepted); fail when that is impossible.
    Off,
}

/// An address block, `addr/len` (a bare address is a /32 or /128). The address is kept as
/// written: iptables clears the host bits itself.
pub type Cidr = ipnet::IpNet;

pub fn parse_cidr(s: &str) -> Result<Cidr, String> {
    let t = s.trim();
    let (a, l) = t.split_once('/').unwrap_or((t, ""));
    let addr: IpAddr = a
        .parse()
        .map_err(|_| format!("{s:?} is not an IP address or CIDR"))?;
    if l.is_empty() {
        return Ok(Cidr::from(addr));
    }
    let max = if addr.is_ipv4() { 32 } else { 128 };
    t.parse::<Cidr>()
        .map_err(|_| format!("{s:?}: prefix length must be 0..={max}"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// Runs the iptables programs, optionally behind a prefix such as
/// `ip netns exec <ns>` (the tests target a namespace this way).
#[derive(Debug, Clone, Default)]
pub struct Runner {
    pub prefix: Vec<String>,
}

impl Runner {
    pub fn in_netns(ns: &str) -> Runner {
        Runner {
            prefix: vec!["ip".into(), "netns".into(), "exec".into(), ns.into()],
        }
    }

    pub fn output(&self, program: &str, args: &[&str]) -> Result<Output> {
        let mut words: Vec<&str> = self.prefix.iter().map(String::as_str).collect();
        words.push(program);
        words.extend_from_slice(args);
        Command::new(words[0])
            .args(&words[1..])
            .stdin(Stdio::null())
            .output()
            .map_err(|source| CaptureError::Spawn {
                program: words[0].to_owned(),
                source,
            })
    }

    /// Runs and insists on success; the error quotes the command and its stderr.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<String> {
        let out = self.output(program, args)?;
        if !out.status.success() {
            return Err(CaptureError::Failed {
                command: format!("{program} {}", args.join(" ")),
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn ok(&self, program: &str, args: &[&str]) -> bool {
        self.output(program, args)
            .map(|o| o.status.success())
            .unwrap_or(false)
    }
}

/// The iptables binaries to use: IPv4, and IPv6 when it works.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub v4: String,
    pub v6: Option<String>,
}

impl Backend {
    pub fn bin(&self, family: Family) -> Option<&str> {
        match family {
            Family::V4 => Some(&self.v4),
            Family::V6 => self.v6.as_deref(),
        }
    }
}

/// `…/iptables-legacy` -> `…/ip6tables-legacy`.
pub fn ip6_name(v4: &str) -> String {
    let p = Path::new(v4);
    let file = p
        .file_name()
        .map(|f| f.to_string_lossy().replacen("iptables", "ip6tables", 1))
        .unwrap_or_else(|| "ip6tables".into());
    match p.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(d) => d.join(file).to_string_lossy().into_owned(),
        None => file,
    }
}

fn has_rules(runner: &Runner, save: &str) -> bool {
    runner
        .output(save, &[])
        .ok()
        .filter(|o| o.status.success())
        .is_some_and(|o| save_has_rules(&o.stdout))
}

/// Whether `iptables-save` output holds any rule (a `-A` line).
pub fn save_has_rules(stdout: &[u8]) -> bool {
    String::from_utf8_lossy(stdout)
        .lines()
        .any(|l| l.starts_with("-A "))
}

/// The backend: `--iptables` if given; else the one of legacy/nf_tables that already holds
/// rules in the namespace (if exactly one does); else the system's `iptables`.
pub fn detect(runner: &Runner, explicit: Option<&str>, ipv6: bool) -> Result<Backend> {
    let v4 = match explicit {
        Some(b) => b.to_owned(),
        None => {
            let legacy = has_rules(runner, "iptables-legacy-save")
                || has_rules(runner, "ip6tables-legacy-save");
            let nft =
                has_rules(runner, "iptables-nft-save") || has_rules(runner, "ip6tables-nft-save");
            match (legacy, nft) {
                (true, false) => "iptables-legacy".to_owned(),
                (false, true) => "iptables-nft".to_owned(),
                _ => "iptables".to_owned(),
            }
        }
    };
    let version = runner
        .run(&v4, &["--version"])
        .map_err(step(format!("{v4} does not work here")))?;
    tracing::debug!(iptables = %v4, version = version.trim(), "capture backend");
    runner
        .run(&v4, &["-w", "-t", "nat", "-S", "OUTPUT"])
        .map_err(step(format!(
            "{v4} cannot read the nat table (NET_ADMIN missing?)"
        )))?;
    let v6 = ip6_name(&v4);
    let v6 = (ipv6 && runner.ok(&v6, &["-w", "-t", "nat", "-S", "OUTPUT"])).then_some(v6);
    Ok(Backend { v4, v6 })
}

/// One rule: the chain it goes into and its match/target words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub chain: &'static str,
    pub spec: Vec<String>,
}

fn rule(chain: &'static str, spec: &[&str]) -> Rule {
    Rule {
        chain,
        spec: spec.iter().map(|s| (*s).to_owned()).collect(),
    }
}

/// The two jumps from the built-in chains.
pub fn jumps() -> [Rule; 2] {
    [
        rule("PREROUTING", &["-p", "tcp", "-j", INBOUND_CHAIN]),
        rule("OUTPUT", &["-p", "tcp", "-j", OUTBOUND_CHAIN]),
    ]
}

/// The contents of the two chains for one family.
pub fn chain_rules(args: &InitArgs, family: Family) -> Vec<Rule> {
    let mut rules = Vec::new();
    let mut inbound: Vec<u16> = SIDECAR_PORTS.to_vec();
    inbound.push(args.inbound_port);
    inbound.push(args.outbound_port);
    inbound.extend(&args.exclude_inbound_ports);
    dedup(&mut inbound);
    for p in inbound {
        rules.push(rule(
            INBOUND_CHAIN,
            &["-p", "tcp", "--dport", &p.to_string(), "-j", "RETURN"],
        ));
    }
    let to = args.inbound_port.to_string();
    rules.push(rule(
        INBOUND_CHAIN,
        &["-p", "tcp", "-j", "REDIRECT", "--to-ports", &to],
    ));

    // SECURITY: UID and GID both: an app that can switch its UID (root, or CAP_SETUID) but not
    // its primary GID is still captured. A root app can switch both; egress policy is not a
    // boundary against it.
    let (uid, gid) = (args.proxy_uid.to_string(), args.proxy_gid.to_string());
    rules.push(rule(
        OUTBOUND_CHAIN,
        &[
            "-m",
            "owner",
            "--uid-owner",
            &uid,
            "--gid-owner",
            &gid,
            "-j",
            "RETURN",
        ],
    ));
    let lo = match family {
        Family::V4 => "127.0.0.0/8",
        Family::V6 => "::1/128",
    };
    rules.push(rule(OUTBOUND_CHAIN, &["-d", lo, "-j", "RETURN"]));
    rules.push(rule(OUTBOUND_CHAIN, &["-o", "lo", "-j", "RETURN"]));
    for c in &args.exclude_cidrs {
        if c.addr().is_ipv4() == (family == Family::V4) {
            rules.push(rule(
                OUTBOUND_CHAIN,
                &["-d", &c.to_string(), "-j", "RETURN"],
            ));
        }
    }
    let mut ports = args.exclude_ports.clone();
    dedup(&mut ports);
    for p in ports {
        rules.push(rule(
            OUTBOUND_CHAIN,
            &["-p", "tcp", "--dport", &p.to_string(), "-j", "RETURN"],
        ));
    }
    let to = args.outbound_port.to_string();
    rules.push(rule(
        OUTBOUND_CHAIN,
        &["-p", "tcp", "-j", "REDIRECT", "--to-ports", &to],
    ));
    rules
}

fn dedup(v: &mut Vec<u16>) {
    let mut seen = std::collections::HashSet::new();
    v.retain(|p| seen.insert(*p));
}

/// The rules in iptables-restore format (for `iptables-restore --noflush` on a namespace
/// without them).
pub fn render(args: &InitArgs, family: Family) -> String {
    let mut s = String::from("*nat\n");
    let _ = writeln!(s, ":{INBOUND_CHAIN} - [0:0]");
    let _ = writeln!(s, ":{OUTBOUND_CHAIN} - [0:0]");
    for r in jumps().iter().chain(chain_rules(args, family).iter()) {
        let _ = writeln!(s, "-A {} {}", r.chain, r.spec.join(" "));
    }
    s.push_str("COMMIT\n");
    s
}

fn chain_exists(runner: &Runner, bin: &str, chain: &str) -> bool {
    chain_exists_in(runner, bin, "nat", chain)
}

fn chain_exists_in(runner: &Runner, bin: &str, table: &str, chain: &str) -> bool {
    runner.ok(bin, &["-w", "-t", table, "-S", chain])
}

fn rule_exists(runner: &Runner, bin: &str, r: &Rule) -> bool {
    rule_exists_in(runner, bin, "nat", r)
}

fn rule_exists_in(runner: &Runner, bin: &str, table: &str, r: &Rule) -> bool {
    let mut a = vec!["-w", "-t", table, "-C", r.chain];
    a.extend(r.spec.iter().map(String::as_str));
    runner.ok(bin, &a)
}

/// Creates (or flushes) the two chains, fills them, and adds the jumps when missing.
pub fn install(runner: &Runner, bin: &str, args: &InitArgs, family: Family) -> Result<()> {
    for chain in [INBOUND_CHAIN, OUTBOUND_CHAIN] {
        if chain_exists(runner, bin, chain) {
            runner.run(bin, &["-w", "-t", "nat", "-F", chain])?;
        } else {
            runner.run(bin, &["-w", "-t", "nat", "-N", chain])?;
        }
    }
    for r in chain_rules(args, family) {
        let mut a = vec!["-w", "-t", "nat", "-A", r.chain];
        a.extend(r.spec.iter().map(String::as_str));
        runner.run(bin, &a)?;
    }
    for j in jumps() {
        if !rule_exists(runner, bin, &j) {
            let mut a = vec!["-w", "-t", "nat", "-A", j.chain];
            a.extend(j.spec.iter().map(String::as_str));
            runner.run(bin, &a)?;
        }
    }
    Ok(())
}

/// Removes the jumps (every copy) and the two chains; leaves every other rule alone.
pub fn uninstall(runner: &Runner, bin: &str) -> Result<()> {
    for j in jumps() {
        // At most a handful of copies; bounded so that a `-D` that "succeeds" without
        // deleting cannot loop forever.
        for _ in 0..64 {
            if !rule_exists(runner, bin, &j) {
                break;
            }
            let mut a = vec!["-w", "-t", "nat", "-D", j.chain];
            a.extend(j.spec.iter().map(String::as_str));
            runner.run(bin, &a)?;
        }
    }
    for chain in [INBOUND_CHAIN, OUTBOUND_CHAIN] {
        if chain_exists(runner, bin, chain) {
            runner.run(bin, &["-w", "-t", "nat", "-F", chain])?;
            runner.run(bin, &["-w", "-t", "nat", "-X", chain])?;
        }
    }
    Ok(())
}

/// `--ipv6 off`: the filter-table chains that block IPv6 (loopback excepted).
pub const IPV6_IN_CHAIN: &str = "KITH_IPV6_IN";
pub const IPV6_OUT_CHAIN: &str = "KITH_IPV6_OUT";

/// The jumps of `--ipv6 off` from the built-in filter chains.
pub fn ipv6_block_jumps() -> [Rule; 2] {
    [
        rule("INPUT", &["-j", IPV6_IN_CHAIN]),
        rule("OUTPUT", &["-j", IPV6_OUT_CHAIN]),
    ]
}

/// The contents of the two blocking chains: loopback passes, everything else is dropped on
/// the way in and rejected on the way out (so that apps fail at once instead of timing out).
pub fn ipv6_block_rules() -> Vec<Rule> {
    vec![
        rule(IPV6_IN_CHAIN, &["-i", "lo", "-j", "RETURN"]),
        rule(IPV6_IN_CHAIN, &["-j", "DROP"]),
        rule(IPV6_OUT_CHAIN, &["-o", "lo", "-j", "RETURN"]),
        // A reset: an ICMP error to a link-local source never reaches the socket.
        rule(
            IPV6_OUT_CHAIN,
            &["-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset"],
        ),
        rule(
            IPV6_OUT_CHAIN,
            &["-j", "REJECT", "--reject-with", "icmp6-adm-prohibited"],
        ),
    ]
}

/// `--ipv6 off` in iptables-restore format (filter table).
pub fn render_ipv6_block() -> String {
    let mut s = String::from("*filter\n");
    let _ = writeln!(s, ":{IPV6_IN_CHAIN} - [0:0]");
    let _ = writeln!(s, ":{IPV6_OUT_CHAIN} - [0:0]");
    for r in ipv6_block_jumps().iter().chain(ipv6_block_rules().iter()) {
        let _ = writeln!(s, "-A {} {}", r.chain, r.spec.join(" "));
    }
    s.push_str("COMMIT\n");
    s
}

/// Installs (or refills) the IPv6 blocking chains with `bin` (an ip6tables).
pub fn install_ipv6_block(runner: &Runner, bin: &str) -> Result<()> {
    for chain in [IPV6_IN_CHAIN, IPV6_OUT_CHAIN] {
        if chain_exists_in(runner, bin, "filter", chain) {
            runner.run(bin, &["-w", "-t", "filter", "-F", chain])?;
        } else {
            runner.run(bin, &["-w", "-t", "filter", "-N", chain])?;
        }
    }
    for r in ipv6_block_rules() {
        let mut a = vec!["-w", "-t", "filter", "-A", r.chain];
        a.extend(r.spec.iter().map(String::as_str));
        runner.run(bin, &a)?;
    }
    for j in ipv6_block_jumps() {
        if !rule_exists_in(runner, bin, "filter", &j) {
            // First: an ACCEPT of someone else's must not open IPv6 again.
            let mut a = vec!["-w", "-t", "filter", "-I", j.chain, "1"];
            a.extend(j.spec.iter().map(String::as_str));
            runner.run(bin, &a)?;
        }
    }
    Ok(())
}

/// Removes the IPv6 blocking jumps and chains, if there.
pub fn uninstall_ipv6_block(runner: &Runner, bin: &str) -> Result<()> {
    for j in ipv6_block_jumps() {
        for _ in 0..64 {
            if !rule_exists_in(runner, bin, "filter", &j) {
                break;
            }
            let mut a = vec!["-w", "-t", "filter", "-D", j.chain];
            a.extend(j.spec.iter().map(String::as_str));
            runner.run(bin, &a)?;
        }
    }
    for chain in [IPV6_IN_CHAIN, IPV6_OUT_CHAIN] {
        if chain_exists_in(runner, bin, "filter", chain) {
            runner.run(bin, &["-w", "-t", "filter", "-F", chain])?;
            runner.run(bin, &["-w", "-t", "filter", "-X", chain])?;
        }
    }
    Ok(())
}

/// One IPv6 address of the namespace (a line of `/proc/net/if_inet6`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inet6 {
    pub addr: std::net::Ipv6Addr,
    pub ifindex: u32,
    pub prefix: u8,
    pub interface: String,
    /// Still in duplicate address detection: not usable as a source yet.
    pub tentative: bool,
}

/// Parses `/proc/net/if_inet6`: `<32 hex addr> <ifindex hex> <prefix> <scope> <flags> <name>`.
pub fn parse_if_inet6(text: &str) -> Vec<Inet6> {
    const IFA_F_TENTATIVE: u32 = 0x40;
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let [hex, index, prefix, _, flags, name] = f.as_slice() else {
                return None;
            };
            let addr = u128::from_str_radix(hex, 16).ok()?;
            Some(Inet6 {
                addr: addr.into(),
                ifindex: u32::from_str_radix(index, 16).ok()?,
                prefix: u8::from_str_radix(prefix, 16).ok()?,
                interface: (*name).to_owned(),
                tentative: u32::from_str_radix(flags, 16).ok()? & IFA_F_TENTATIVE != 0,
            })
        })
        .collect()
}

/// The namespace's IPv6 addresses outside loopback: IPv6 is enabled here when there is any
/// (every interface with IPv6 on has at least a link-local address). Empty when the kernel has
/// no IPv6 at all.
pub fn ipv6_addresses(runner: &Runner) -> Vec<Inet6> {
    let text = if runner.prefix.is_empty() {
        // thread-self: the calling thread's namespace (tests enter one with setns).
        std::fs::read_to_string("/proc/thread-self/net/if_inet6")
            .or_else(|_| std::fs::read_to_string("/proc/net/if_inet6"))
            .unwrap_or_default()
    } else {
        runner
            .output("cat", &["/proc/net/if_inet6"])
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    parse_if_inet6(&text)
        .into_iter()
        .filter(|a| a.interface != "lo" && !a.addr.is_loopback())
        .collect()
}

/// Proves that outbound TCP from `args.canary_uid` is redirected to the outbound port, in the
/// calling thread's network namespace: listens on 127.0.0.1:<outbound port>, has a child
/// running as the canary UID connect to the canary address, and waits for that connection.
/// Returns the original destination read with SO_ORIGINAL_DST.
pub fn canary_check(args: &InitArgs, timeout: Duration) -> Result<SocketAddrV4> {
    refuse_exempt_canary(args)?;
    let listen = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), args.outbound_port);
    let target = SocketAddr::V4(args.canary_addr);
    match probe(args, listen, target, timeout, "outbound capture")? {
        SocketAddr::V4(d) => Ok(d),
        SocketAddr::V6(got) => Err(CaptureError::CanaryGotIpv6 { got, target }),
    }
}

/// Where an IPv6 canary can connect so that its redirect works: an address in the on-link
/// prefix (/64 or wider) of one of our global or unique-local addresses, with the low 64 bits
/// `6b69:7468:0:<n>` ("kith"). Connections from a link-local source cannot be redirected to
/// [::1] (the reply has no route back), so without such an address there is no IPv6 canary,
/// and also no IPv6 source an app could reach a non-link-local destination from.
fn ipv6_canary_target(runner: &Runner, port: u16, n: u16, deadline: Instant) -> Option<SocketAddr> {
    loop {
        let addrs = ipv6_addresses(runner);
        let globals: Vec<&Inet6> = addrs
            .iter()
            .filter(|a| !a.addr.is_unicast_link_local() && a.prefix <= 64)
            .collect();
        if let Some(a) = globals.iter().find(|a| !a.tentative) {
            let net = u128::from(a.addr) & (u128::MAX << 64);
            let low = u128::from(0x6b69_7468_0000_0000_u64 | u64::from(n));
            return Some(SocketAddr::V6(SocketAddrV6::new(
                (net | low).into(),
                port,
                0,
                0,
            )));
        }
        if globals.is_empty() || Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The canary of IPv6 outbound capture: a connection from the canary UID to an address beside
/// one of ours ([`ipv6_canary_target`]) must arrive at [::1]:<outbound port>. Without a
/// global or unique-local address, the OUTPUT jump is checked in the kernel's table instead
/// (`Ok(None)`).
pub fn canary_check_ipv6(
    runner: &Runner,
    bin: &str,
    args: &InitArgs,
    timeout: Duration,
) -> Result<Option<SocketAddr>> {
    refuse_exempt_canary(args)?;
    let jump = rule("OUTPUT", &["-p", "tcp", "-j", OUTBOUND_CHAIN]);
    if !rule_exists(runner, bin, &jump) {
        return Err(CaptureError::NoJump {
            what: "IPv6 outbound capture",
            bin: bin.to_owned(),
            rule: format!("-A OUTPUT -p tcp -j {OUTBOUND_CHAIN}"),
        });
    }
    let deadline = Instant::now() + timeout;
    let Some(target) = ipv6_canary_target(runner, args.canary_addr.port(), 1, deadline) else {
        return Ok(None);
    };
    let listen = SocketAddr::new(Ipv6Addr::LOCALHOST.into(), args.outbound_port);
    let left = deadline.saturating_duration_since(Instant::now());
    probe(
        args,
        listen,
        target,
        left.max(Duration::from_secs(1)),
        "IPv6 outbound capture",
    )
    .map(Some)
}

/// The canary of inbound capture. A pod cannot send itself a packet through PREROUTING (its
/// own traffic to itself never enters an interface), so this checks the two halves: the jump
/// from PREROUTING is in the kernel's table (`-C`), and the inbound chain redirects a real
/// connection to the inbound port with its original destination intact: for the check only, a
/// rule at the top of OUTPUT sends the canary's connection (to `--canary-addr`'s address and
/// the next port; IPv6: see [`ipv6_canary_target`]) through the inbound chain; it is removed
/// again whatever the outcome. `Ok(None)`: IPv6 without a global address, only the jump checked.
pub fn canary_check_inbound(
    runner: &Runner,
    bin: &str,
    family: Family,
    args: &InitArgs,
    timeout: Duration,
) -> Result<Option<SocketAddr>> {
    refuse_exempt_canary(args)?;
    let jump = rule("PREROUTING", &["-p", "tcp", "-j", INBOUND_CHAIN]);
    if !rule_exists(runner, bin, &jump) {
        return Err(CaptureError::NoJump {
            what: "inbound capture",
            bin: bin.to_owned(),
            rule: format!("-A PREROUTING -p tcp -j {INBOUND_CHAIN}"),
        });
    }
    let port = args.canary_addr.port().wrapping_add(1).max(1);
    let (target, listen, dst) = match family {
        Family::V4 => {
            let t = SocketAddr::new((*args.canary_addr.ip()).into(), port);
            (
                t,
                SocketAddr::new(Ipv4Addr::LOCALHOST.into(), args.inbound_port),
                format!("{}/32", t.ip()),
            )
        }
        Family::V6 => {
            let Some(t) = ipv6_canary_target(runner, port, 2, Instant::now() + timeout) else {
                return Ok(None);
            };
            (
                t,
                SocketAddr::new(Ipv6Addr::LOCALHOST.into(), args.inbound_port),
                format!("{}/128", t.ip()),
            )
        }
    };
    let port_s = port.to_string();
    let temp = [
        "-p",
        "tcp",
        "-d",
        &dst,
        "--dport",
        &port_s,
        "-j",
        INBOUND_CHAIN,
    ];
    let mut add = vec!["-w", "-t", "nat", "-I", "OUTPUT", "1"];
    add.extend(temp);
    runner
        .run(bin, &add)
        .map_err(step("inbound canary: cannot add its temporary rule"))?;
    let result = probe(args, listen, target, timeout, "inbound capture").map(Some);
    let mut del = vec!["-w", "-t", "nat", "-D", "OUTPUT"];
    del.extend(temp);
    let removed = runner.run(bin, &del);
    let got = result?;
    removed.map_err(step("inbound canary: cannot remove its temporary rule"))?;
    Ok(got)
}

/// The canary must not be exempt: the proxy's UID and GID together are.
fn refuse_exempt_canary(args: &InitArgs) -> Result<()> {
    let (uid, gid) = (canary_uid(args), canary_gid(args));
    if uid == args.proxy_uid && gid == args.proxy_gid {
        return Err(CaptureError::CanaryExempt { uid, gid });
    }
    Ok(())
}

/// Listens on `listen`, has the canary connect to `target`, and waits for that connection to
/// arrive with `target` as its original destination.
fn probe(
    args: &InitArgs,
    listen: SocketAddr,
    target: SocketAddr,
    timeout: Duration,
    what: &'static str,
) -> Result<SocketAddr> {
    let (uid, gid) = (canary_uid(args), canary_gid(args));
    let listener = TcpListener::bind(listen)
        .map_err(|source| CaptureError::CanaryListen { listen, source })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| CaptureError::CanaryNonBlocking { listen, source })?;
    let mut child = Canary::start(uid, gid, target, timeout)?;
    let deadline = Instant::now() + timeout;
    let mut early_exit: Option<String> = None;
    let same = |a: SocketAddr| a.ip() == target.ip() && a.port() == target.port();
    let result = loop {
        match listener.accept() {
            Ok((stream, peer)) => match original_dst(&stream, listen.is_ipv6()) {
                Ok(d) if same(d) => break Ok(d),
                Ok(d) => tracing::debug!(%peer, original_dst = %d, "not the canary"),
                Err(error) => {
                    break Err(CaptureError::OriginalDst {
                        peer,
                        listen,
                        error,
                    });
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(error) => break Err(CaptureError::CanaryAccept { listen, error }),
        }
        if early_exit.is_none() {
            early_exit = child.failed();
        }
        if early_exit.is_some() || Instant::now() >= deadline {
            let why = match &early_exit {
                Some(e) => format!("the canary's connect failed ({e})"),
                None => format!("nothing arrived within {timeout:?}"),
            };
            break Err(CaptureError::NotRedirected {
                what,
                uid,
                gid,
                target,
                listen,
                why,
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    child.stop();
    result
}

/// SO_ORIGINAL_DST (IPv4) or IP6T_SO_ORIGINAL_DST (IPv6) of a redirected connection.
fn original_dst(stream: &std::net::TcpStream, ipv6: bool) -> nix::Result<SocketAddr> {
    use nix::sys::socket::{getsockopt, sockopt};
    if ipv6 {
        getsockopt(stream, sockopt::Ip6tOriginalDst).map(|sa| {
            SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sa.sin6_addr.s6_addr),
                u16::from_be(sa.sin6_port),
                0,
                sa.sin6_scope_id,
            ))
        })
    } else {
        getsockopt(stream, sockopt::OriginalDst).map(|sa| {
            SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
                u16::from_be(sa.sin_port),
            ))
        })
    }
}

/// The canary's UID: `--canary-uid`, else our own.
fn canary_uid(args: &InitArgs) -> u32 {
    args.canary_uid
        .unwrap_or_else(|| nix::unistd::geteuid().as_raw())
}

/// The canary's GID: `--canary-gid`, else its UID (or our own GID when it is us).
fn canary_gid(args: &InitArgs) -> u32 {
    match (args.canary_gid, args.canary_uid) {
        (Some(g), _) => g,
        (None, Some(u)) => u,
        (None, None) => nix::unistd::getegid().as_raw(),
    }
}

/// The canary connection: from a thread of this process when it runs as our own UID and GID,
/// else from a `bash` child switched to them (which needs CAP_SETUID and CAP_SETGID).
enum Canary {
    /// `None` once joined.
    Thread(Option<std::thread::JoinHandle<std::io::Result<()>>>),
    Child(std::process::Child),
}

impl Canary {
    fn start(uid: u32, gid: u32, target: SocketAddr, timeout: Duration) -> Result<Canary> {
        if uid == nix::unistd::geteuid().as_raw() && gid == nix::unistd::getegid().as_raw() {
            return Ok(Canary::Thread(Some(std::thread::spawn(move || {
                std::net::TcpStream::connect_timeout(&target, timeout).map(drop)
            }))));
        }
        let host = match target {
            SocketAddr::V4(a) => a.ip().to_string(),
            SocketAddr::V6(a) if a.scope_id() != 0 => {
                let name = nix::net::if_::if_indextoname(a.scope_id())
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|_| a.scope_id().to_string());
                format!("{}%{name}", a.ip())
            }
            SocketAddr::V6(a) => a.ip().to_string(),
        };
        let child = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "exec 3<>/dev/tcp/{host}/{} && exec 3>&-",
                target.port()
            ))
            .uid(uid)
            .gid(gid)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(CaptureError::CanaryStart)?;
        Ok(Canary::Child(child))
    }

    /// Why the canary's connect failed, once it has.
    fn failed(&mut self) -> Option<String> {
        match self {
            Canary::Thread(slot) => match slot.take_if(|t| t.is_finished())?.join() {
                Ok(Err(e)) => Some(e.to_string()),
                _ => None,
            },
            Canary::Child(child) => {
                let status = child.try_wait().ok().flatten().filter(|s| !s.success())?;
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                Some(format!("{status}: {}", err.trim()))
            }
        }
    }

    fn stop(self) {
        if let Canary::Child(mut child) = self {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Does what `kith sidecar init` does with `args`, through `runner`, and returns what it
/// reports. The canary checks run in the calling thread's network namespace.
pub fn execute(runner: &Runner, args: &InitArgs) -> Result<String> {
    let backend = detect(runner, args.iptables.as_deref(), true)?;
    let v6_addrs = ipv6_addresses(runner);
    let v6_enabled = !v6_addrs.is_empty();
    let bin6 = ip6_name(&backend.v4);
    // --ipv6 off needs the filter table, not nat.
    let filter6 = (args.ipv6 == Ipv6Mode::Off
        && runner.ok(&bin6, &["-w", "-t", "filter", "-S", "OUTPUT"]))
    .then(|| bin6.clone());
    let mut report = String::new();
    if args.dry_run {
        let _ = writeln!(report, "# {} (kith sidecar init --dry-run)", backend.v4);
        report.push_str(&render(args, Family::V4));
        match args.ipv6 {
            Ipv6Mode::On => {
                let _ = writeln!(report, "# {bin6} (kith sidecar init --dry-run)");
                report.push_str(&render(args, Family::V6));
            }
            Ipv6Mode::Off => {
                let _ = writeln!(report, "# {bin6} --ipv6 off (kith sidecar init --dry-run)");
                report.push_str(&render_ipv6_block());
            }
        }
        return Ok(report);
    }
    if args.uninstall {
        uninstall(runner, &backend.v4)
            .map_err(step(format!("uninstalling with {}", backend.v4)))?;
        let _ = writeln!(
            report,
            "{}: removed {INBOUND_CHAIN}, {OUTBOUND_CHAIN} and their jumps",
            backend.v4
        );
        if let Some(bin) = &backend.v6 {
            uninstall(runner, bin).map_err(step(format!("uninstalling with {bin}")))?;
            let _ = writeln!(
                report,
                "{bin}: removed {INBOUND_CHAIN}, {OUTBOUND_CHAIN} and their jumps"
            );
        }
        // --ipv6 off's chains, also where ip6tables has no nat table.
        if runner.ok(&bin6, &["-w", "-t", "filter", "-S", "OUTPUT"]) {
            uninstall_ipv6_block(runner, &bin6)
                .map_err(step(format!("uninstalling with {bin6}")))?;
            let _ = writeln!(
                report,
                "{bin6}: removed {IPV6_IN_CHAIN}, {IPV6_OUT_CHAIN} and their jumps"
            );
        }
        return Ok(report);
    }
    if !args.no_verify {
        refuse_exempt_canary(args)?;
    }
    // SECURITY: decide about IPv6 before touching anything: IPv6 left open bypasses capture.
    // What ip6tables itself said, for the message.
    let said = |table: &str| match runner.output(&bin6, &["-w", "-t", table, "-S", "OUTPUT"]) {
        Ok(o) => format!(
            "{}: {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => chain(&e),
    };
    match args.ipv6 {
        Ipv6Mode::On if backend.v6.is_none() && v6_enabled => {
            return Err(CaptureError::Ipv6Uncaptured {
                interface: v6_addrs[0].interface.clone(),
                addr: v6_addrs[0].addr,
                bin6: bin6.clone(),
                said: said("nat"),
                v4: backend.v4.clone(),
            });
        }
        Ipv6Mode::Off if filter6.is_none() && v6_enabled => {
            return Err(CaptureError::Ipv6Unblocked {
                interface: v6_addrs[0].interface.clone(),
                addr: v6_addrs[0].addr,
                bin6: bin6.clone(),
                said: said("filter"),
            });
        }
        _ => {}
    }
    let exempt = format!(
        "proxy uid {} + gid {} exempt",
        args.proxy_uid, args.proxy_gid
    );
    install(runner, &backend.v4, args, Family::V4)
        .map_err(step(format!("installing with {}", backend.v4)))?;
    let _ = writeln!(
        report,
        "{}: outbound TCP -> :{}, inbound TCP -> :{} ({exempt})",
        backend.v4, args.outbound_port, args.inbound_port
    );
    let mut captured6 = None;
    match (args.ipv6, &backend.v6, &filter6) {
        (Ipv6Mode::On, Some(bin), _) => {
            install(runner, bin, args, Family::V6)
                .map_err(step(format!("installing with {bin}")))?;
            // A switch from --ipv6 off: blocking no longer wanted.
            uninstall_ipv6_block(runner, bin).map_err(step(format!("installing with {bin}")))?;
            let _ = writeln!(
                report,
                "{bin}: outbound TCP -> :{}, inbound TCP -> :{} ({exempt})",
                args.outbound_port, args.inbound_port
            );
            captured6 = Some(bin.clone());
        }
        (Ipv6Mode::On, None, _) => {
            let _ = writeln!(
                report,
                "IPv6: not enabled in this namespace (no address outside loopback); {bin6} unusable"
            );
        }
        (Ipv6Mode::Off, _, Some(bin)) => {
            install_ipv6_block(runner, bin).map_err(step(format!("blocking IPv6 with {bin}")))?;
            if backend.v6.is_some() {
                uninstall(runner, bin).map_err(step(format!("installing with {bin}")))?;
            }
            let _ = writeln!(
                report,
                "{bin}: IPv6 blocked (--ipv6 off): inbound dropped, outbound rejected, loopback excepted"
            );
        }
        (Ipv6Mode::Off, _, None) => {
            let _ = writeln!(
                report,
                "IPv6: not enabled in this namespace (no address outside loopback); nothing to block"
            );
        }
    }
    if !args.no_verify {
        let timeout = Duration::from_secs(3);
        let who = format!("uid {} gid {}", canary_uid(args), canary_gid(args));
        let d = canary_check(args, timeout)?;
        let _ = writeln!(
            report,
            "verified: a connection from {who} to {d} arrived at 127.0.0.1:{}",
            args.outbound_port
        );
        if let Some(d) = canary_check_inbound(runner, &backend.v4, Family::V4, args, timeout)? {
            let _ = writeln!(
                report,
                "verified: PREROUTING jumps to {INBOUND_CHAIN}, which took a connection to {d} to 127.0.0.1:{}",
                args.inbound_port
            );
        }
        if let Some(bin) = &captured6
            && v6_enabled
        {
            match canary_check_ipv6(runner, bin, args, timeout)? {
                Some(d) => {
                    let _ = writeln!(
                        report,
                        "verified: a connection from {who} to {d} arrived at [::1]:{}",
                        args.outbound_port
                    );
                }
                None => {
                    let _ = writeln!(
                        report,
                        "verified: {bin} OUTPUT jumps to {OUTBOUND_CHAIN} (IPv6 is link-local only here: no canary connection possible)"
                    );
                }
            }
            match canary_check_inbound(runner, bin, Family::V6, args, timeout)? {
                Some(d) => {
                    let _ = writeln!(
                        report,
                        "verified: PREROUTING (IPv6) jumps to {INBOUND_CHAIN}, which took a connection to {d} to [::1]:{}",
                        args.inbound_port
                    );
                }
                None => {
                    let _ = writeln!(
                        report,
                        "verified: {bin} PREROUTING jumps to {INBOUND_CHAIN} (IPv6 is link-local only here: no canary connection possible)"
                    );
                }
            }
        }
        if filter6.is_some() && v6_enabled {
            let d = canary_blocked_ipv6(runner, args)?;
            let _ = writeln!(
                report,
                "verified: a connection from {who} to {d} was rejected"
            );
        }
    }
    Ok(report)
}

/// `--ipv6 off`: a connection to a link-local address must be refused at once by the
/// blocking rules (not reach anything, not be redirected).
pub fn canary_blocked_ipv6(runner: &Runner, args: &InitArgs) -> Result<SocketAddr> {
    let via = usable_link_local(runner, Instant::now() + Duration::from_secs(3))
        .map_err(step("IPv6 block canary"))?;
    let target = SocketAddr::V6(SocketAddrV6::new(
        Ipv6Addr::new(0xfe80, 0, 0, 0, 0x6b69, 0x7468, 0, 3),
        args.canary_addr.port(),
        0,
        via.ifindex,
    ));
    use std::io::ErrorKind::{
        ConnectionRefused, HostUnreachable, NetworkUnreachable, PermissionDenied,
    };
    match std::net::TcpStream::connect_timeout(&target, Duration::from_secs(3)) {
        Err(e)
            if matches!(
                e.kind(),
                PermissionDenied | ConnectionRefused | HostUnreachable | NetworkUnreachable
            ) =>
        {
            Ok(target)
        }
        Err(error) => Err(CaptureError::Ipv6NotRejected { target, error }),
        Ok(_) => Err(CaptureError::Ipv6Accepted { target }),
    }
}

/// A link-local address outside loopback that is out of duplicate address detection (so it
/// can be a source), waiting for one until `deadline`.
fn usable_link_local(runner: &Runner, deadline: Instant) -> Result<Inet6> {
    loop {
        let addrs = ipv6_addresses(runner);
        if addrs.is_empty() {
            return Err(CaptureError::NoIpv6Address);
        }
        if let Some(a) = addrs
            .iter()
            .find(|a| !a.tentative && a.addr.is_unicast_link_local())
        {
            return Ok(a.clone());
        }
        if Instant::now() >= deadline {
            return Err(CaptureError::NoLinkLocal {
                interfaces: addrs.iter().map(|a| a.interface.clone()).collect(),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `kith sidecar init`.
pub fn run(args: InitArgs) -> ExitCode {
    let runner = Runner::default();
    match execute(&runner, &args) {
        Ok(report) => {
            print!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}", chain(&e));
            ExitCode::from(1)
        }
    }
}
