//! `kith sidecar init`: programs the pod's network namespace so that the sidecar sees its
//! traffic (transparent mode). It runs as the pod's init container, with NET_ADMIN, inside the
//! pod's network namespace, and never anywhere else: the host's own namespace carries the
//! container engine's rules.
//!
//! What it adds, in the nat table, and nothing else:
//!
//! - chain `KITH_OUTBOUND`, jumped to once from `OUTPUT` (`-p tcp`): returns for the proxy's
//!   UID (`--proxy-uid`), loopback destinations, `--exclude-cidrs` and `--exclude-ports`, and
//!   redirects every other outbound TCP connection to the proxy's outbound port (15001);
//! - chain `KITH_INBOUND`, jumped to once from `PREROUTING` (`-p tcp`): returns for the
//!   sidecar's own ports (15001, 15006, 15020, 15021 and `--exclude-inbound-ports`) and
//!   redirects every other inbound TCP connection to the inbound port (15006).
//!
//! Applying it again flushes and refills the two chains (same result); the jumps are added
//! only when missing. `--uninstall` removes the jumps and the two chains, and nothing else.
//! IPv4 goes through `iptables`, IPv6 through `ip6tables` when it works in the namespace.
//!
//! The backend (nf_tables or legacy) is the one that already holds rules in the namespace,
//! else the system's `iptables`; `--iptables <path>` overrides it.
//!
//! Before it reports success, `init` proves the IPv4 outbound capture: it listens on
//! 127.0.0.1:<outbound port> itself, connects to `--canary-addr` from `--canary-uid` (a child
//! process, `bash`'s /dev/tcp) and checks the connection arrives there, with SO_ORIGINAL_DST
//! naming the canary address. The canary needs a route to its address (a pod has a default
//! route) and `bash` in the image. A failed check exits non-zero and leaves the rules in place
//! (the pod does not start; `--uninstall` removes them). Only IPv4 outbound is checked.

use std::fmt::Write as _;
use std::io::Read as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4, TcpListener};
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Command, ExitCode, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;

pub const OUTBOUND_CHAIN: &str = "KITH_OUTBOUND";
pub const INBOUND_CHAIN: &str = "KITH_INBOUND";
/// The sidecar's own ports, never redirected inbound: outbound and inbound capture, admin,
/// health.
pub const SIDECAR_PORTS: [u16; 4] = [15001, 15006, 15020, 15021];

#[derive(Debug, Clone, Args)]
pub struct InitArgs {
    /// The proxy's UID: its own outbound connections are not captured
    #[arg(long, env = "KITH_PROXY_UID", default_value_t = 1337)]
    pub proxy_uid: u32,
    /// Where outbound TCP is redirected
    #[arg(long, default_value_t = 15001)]
    pub outbound_port: u16,
    /// Where inbound TCP is redirected
    #[arg(long, default_value_t = 15006)]
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
    /// Leave IPv6 alone even when ip6tables works
    #[arg(long)]
    pub no_ipv6: bool,
    /// The canary's destination: any non-local address (it is never reached)
    #[arg(long, default_value = "10.255.255.1:80")]
    pub canary_addr: SocketAddrV4,
    /// The UID the canary connects from (must not be the proxy's) [default: this process's
    /// own, which needs neither CAP_SETUID nor a shell]
    #[arg(long)]
    pub canary_uid: Option<u32>,
    /// Skip the canary check after applying the rules
    #[arg(long)]
    pub no_verify: bool,
}

impl Default for InitArgs {
    fn default() -> Self {
        InitArgs {
            proxy_uid: 1337,
            outbound_port: 15001,
            inbound_port: 15006,
            exclude_ports: Vec::new(),
            exclude_cidrs: Vec::new(),
            exclude_inbound_ports: Vec::new(),
            dry_run: false,
            uninstall: false,
            iptables: None,
            no_ipv6: false,
            canary_addr: SocketAddrV4::new(Ipv4Addr::new(10, 255, 255, 1), 80),
            canary_uid: None,
            no_verify: false,
        }
    }
}

/// An address block, `addr/len` (a bare address is a /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

pub fn parse_cidr(s: &str) -> Result<Cidr, String> {
    let (a, l) = s.trim().split_once('/').unwrap_or((s.trim(), ""));
    let addr: IpAddr = a
        .parse()
        .map_err(|_| format!("{s:?} is not an IP address or CIDR"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len = if l.is_empty() {
        max
    } else {
        l.parse::<u8>()
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| format!("{s:?}: prefix length must be 0..={max}"))?
    };
    Ok(Cidr { addr, len })
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
            .with_context(|| format!("cannot run {}", words[0]))
    }

    /// Runs and insists on success; the error quotes the command and its stderr.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<String> {
        let out = self.output(program, args)?;
        if !out.status.success() {
            bail!(
                "`{program} {}` failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
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
        .is_some_and(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.starts_with("-A "))
        })
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
        .with_context(|| format!("{v4} does not work here"))?;
    tracing::debug!(iptables = %v4, version = version.trim(), "capture backend");
    runner
        .run(&v4, &["-w", "-t", "nat", "-S", "OUTPUT"])
        .with_context(|| format!("{v4} cannot read the nat table (NET_ADMIN missing?)"))?;
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

    let uid = args.proxy_uid.to_string();
    rules.push(rule(
        OUTBOUND_CHAIN,
        &["-m", "owner", "--uid-owner", &uid, "-j", "RETURN"],
    ));
    let lo = match family {
        Family::V4 => "127.0.0.0/8",
        Family::V6 => "::1/128",
    };
    rules.push(rule(OUTBOUND_CHAIN, &["-d", lo, "-j", "RETURN"]));
    rules.push(rule(OUTBOUND_CHAIN, &["-o", "lo", "-j", "RETURN"]));
    for c in &args.exclude_cidrs {
        if c.addr.is_ipv4() == (family == Family::V4) {
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
    runner.ok(bin, &["-w", "-t", "nat", "-S", chain])
}

fn rule_exists(runner: &Runner, bin: &str, r: &Rule) -> bool {
    let mut a = vec!["-w", "-t", "nat", "-C", r.chain];
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

/// Proves that outbound TCP from `args.canary_uid` is redirected to the outbound port, in the
/// calling thread's network namespace: listens on 127.0.0.1:<outbound port>, has a child
/// running as the canary UID connect to the canary address, and waits for that connection.
/// Returns the original destination read with SO_ORIGINAL_DST.
pub fn canary_check(args: &InitArgs, timeout: Duration) -> Result<SocketAddrV4> {
    let uid = canary_uid(args);
    if uid == args.proxy_uid {
        bail!(
            "the canary would connect as UID {uid}, the proxy's, whose traffic is deliberately \
             not captured: run init as another UID or pass --canary-uid"
        );
    }
    let listen = SocketAddrV4::new(Ipv4Addr::LOCALHOST, args.outbound_port);
    let listener = TcpListener::bind(listen).with_context(|| {
        format!("canary check: cannot listen on {listen} (is something already using it?)")
    })?;
    listener.set_nonblocking(true)?;
    let target = args.canary_addr;
    let mut child = Canary::start(uid, target, timeout)?;
    let deadline = Instant::now() + timeout;
    let mut early_exit: Option<String> = None;
    let result = loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                let dst =
                    nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::OriginalDst)
                        .map(|sa| {
                            SocketAddrV4::new(
                                Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
                                u16::from_be(sa.sin_port),
                            )
                        });
                match dst {
                    Ok(d) if d == target => break Ok(d),
                    Ok(d) => tracing::debug!(%peer, original_dst = %d, "not the canary"),
                    Err(e) => {
                        break Err(anyhow!(
                            "canary check: a connection from {peer} arrived at {listen} but \
                             SO_ORIGINAL_DST is unreadable ({e}): it was not redirected"
                        ));
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => break Err(anyhow!("canary check: accept on {listen}: {e}")),
        }
        if early_exit.is_none() {
            early_exit = child.failed();
        }
        if early_exit.is_some() || Instant::now() >= deadline {
            let why = match &early_exit {
                Some(e) => format!("the canary's connect failed ({e})"),
                None => format!("nothing arrived within {timeout:?}"),
            };
            break Err(anyhow!(
                "outbound capture is not working: a TCP connection from uid {} to {target} was \
                 not redirected to {listen}: {why}. Check that the nat OUTPUT chain jumps to \
                 {OUTBOUND_CHAIN} in this network namespace and that {target} is routable here \
                 (--canary-addr)",
                uid
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    child.stop();
    result
}

/// The canary's UID: `--canary-uid`, else our own.
fn canary_uid(args: &InitArgs) -> u32 {
    args.canary_uid
        .unwrap_or_else(|| nix::unistd::geteuid().as_raw())
}

/// The canary connection: from a thread of this process when it runs as our own UID, else from
/// a `bash` child switched to that UID (which needs CAP_SETUID and CAP_SETGID).
enum Canary {
    /// `None` once joined.
    Thread(Option<std::thread::JoinHandle<std::io::Result<()>>>),
    Child(std::process::Child),
}

impl Canary {
    fn start(uid: u32, target: SocketAddrV4, timeout: Duration) -> Result<Canary> {
        if uid == nix::unistd::geteuid().as_raw() {
            return Ok(Canary::Thread(Some(std::thread::spawn(move || {
                std::net::TcpStream::connect_timeout(&target.into(), timeout).map(drop)
            }))));
        }
        let child = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "exec 3<>/dev/tcp/{}/{} && exec 3>&-",
                target.ip(),
                target.port()
            ))
            .uid(uid)
            .gid(uid)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("canary check: cannot start `bash` as the canary UID")?;
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
/// reports. The canary check runs in the calling thread's network namespace.
pub fn execute(runner: &Runner, args: &InitArgs) -> Result<String> {
    let backend = detect(runner, args.iptables.as_deref(), !args.no_ipv6)?;
    let mut report = String::new();
    let families = [Family::V4, Family::V6];
    if args.dry_run {
        for f in families {
            if let Some(bin) = backend.bin(f) {
                let _ = writeln!(report, "# {bin} (kith sidecar init --dry-run)");
                report.push_str(&render(args, f));
            }
        }
        return Ok(report);
    }
    if args.uninstall {
        for f in families {
            if let Some(bin) = backend.bin(f) {
                uninstall(runner, bin).with_context(|| format!("uninstalling with {bin}"))?;
                let _ = writeln!(
                    report,
                    "{bin}: removed {INBOUND_CHAIN}, {OUTBOUND_CHAIN} and their jumps"
                );
            }
        }
        return Ok(report);
    }
    if canary_uid(args) == args.proxy_uid && !args.no_verify {
        bail!(
            "the canary check would connect as UID {}, the proxy's: run init as another UID, or pass --canary-uid",
            args.proxy_uid
        );
    }
    for f in families {
        if let Some(bin) = backend.bin(f) {
            install(runner, bin, args, f).with_context(|| format!("installing with {bin}"))?;
            let _ = writeln!(
                report,
                "{bin}: outbound TCP -> :{}, inbound TCP -> :{} (proxy uid {} exempt)",
                args.outbound_port, args.inbound_port, args.proxy_uid
            );
        }
    }
    if backend.v6.is_none() && !args.no_ipv6 {
        let _ = writeln!(
            report,
            "IPv6: {} unusable here, left alone",
            ip6_name(&backend.v4)
        );
    }
    if !args.no_verify {
        let d = canary_check(args, Duration::from_secs(3))?;
        let _ = writeln!(
            report,
            "verified: a connection from uid {} to {d} arrived at 127.0.0.1:{}",
            canary_uid(args),
            args.outbound_port
        );
    }
    Ok(report)
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
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
