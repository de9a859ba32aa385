//! `ca-load`: the CA issuance load generator behind `bench/ca.sh`.
//!
//! `--target kith` attests once with a join token (the node SVID), then opens `--connections`
//! keep-alive mTLS connections with that SVID and loops `POST /v1/svid` with a fresh P-256 CSR
//! per request. `--target cfssl` loops `POST /api/v1/cfssl/sign` over plain HTTP/1.1 keep-alive.
//! Both targets get CSRs made the same way (rcgen, fresh key each, empty subject, no extension).
//!
//! CSRs are made before the timed window (`--pool`, default sized for 20k issuances/s): the
//! client and the server share two cores, and making a CSR costs the client about as much CPU
//! as issuing costs the CA, so making them inside the loop would measure the client, not the
//! server. If the pool runs out, each connection makes its CSRs inline and the output says how
//! many (`csr_inline`).
//!
//! Prints one JSON line: rate (issuances/s completed in the window), latency percentiles, errors,
//! and the CPU the client (and, with `--server-pid`, the server) spent in the window.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, DistinguishedName, KeyPair};
use rustls::ClientConfig;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{Value, json};

use ca_api::client::{Connection, client_config};
use identity::{SpiffeId, TrustBundle};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Target {
    Kith,
    Cfssl,
}

#[derive(Debug, Parser)]
#[command(name = "ca-load", about = "CA issuance load generator (kith or cfssl)")]
struct Args {
    /// Which CA to load
    #[arg(long, value_enum)]
    target: Target,
    /// host:port of the CA's API; kith: several, comma-separated, to spread the connections
    /// over replicas (round robin; the node attests at the first)
    #[arg(long, value_delimiter = ',', required = true)]
    addr: Vec<String>,
    /// kith: the trust bundle (PEM) that verifies the CA
    #[arg(long)]
    bundle: Option<PathBuf>,
    /// kith: a join token to attest the load generator as a node (used once)
    #[arg(long)]
    token: Option<String>,
    /// kith: the workload SPIFFE ID to request (an entry parented by the node)
    #[arg(long, default_value = "spiffe://example.org/bench/w")]
    id: String,
    /// Concurrent keep-alive connections, each with one request in flight
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Measured window
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Load before the measured window (not counted)
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// CSRs to make before the load starts; "auto" = pool-rate x (warmup + duration);
    /// 0 = make every CSR inside the loop (costs client CPU on the shared cores)
    #[arg(long, default_value = "auto")]
    pool: String,
    /// Issuances/s the auto pool is sized for
    #[arg(long, default_value_t = 20_000)]
    pool_rate: u64,
    /// A request that takes longer is an error (and its connection is reopened)
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    request_timeout: Duration,
    /// The server's pid: report the CPU it spent in the measured window (several,
    /// comma-separated: their sum, e.g. the CA replicas and their database)
    #[arg(long, value_delimiter = ',')]
    server_pid: Vec<u32>,
    /// The name of the series in the output's `target` field [default: the target]
    #[arg(long)]
    series: Option<String>,
    /// Free text copied into the output line (e.g. the round number)
    #[arg(long)]
    label: Option<String>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let pool_size = match args.pool.as_str() {
        "auto" => {
            (args.pool_rate as f64 * (args.warmup + args.duration).as_secs_f64()).ceil() as usize
        }
        n => n.parse().context("--pool: a number or \"auto\"")?,
    };
    // Make the pool on every core before any load starts (the server is idle then).
    let made = Instant::now();
    let pems = make_csrs(pool_size)?;
    let pool_secs = made.elapsed().as_secs_f64();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(args, pems, pool_secs))
}

/// A fresh P-256 key and a CSR for it: empty subject, no extensions (what an agent sends).
fn make_csr() -> Result<String> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    Ok(p.serialize_request(&key)?.pem()?)
}

fn make_csrs(n: usize) -> Result<Vec<String>> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let per = n.div_ceil(threads.max(1));
    let parts: Vec<Result<Vec<String>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let count = per.min(n.saturating_sub(i * per));
                s.spawn(move || (0..count).map(|_| make_csr()).collect())
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow!("CSR thread panicked")))
            })
            .collect()
    });
    let mut all = Vec::with_capacity(n);
    for p in parts {
        all.extend(p?);
    }
    Ok(all)
}

/// What each target needs to open a connection and build a request body.
#[derive(Clone)]
enum Dialer {
    Kith {
        addrs: Vec<String>,
        next: Arc<AtomicUsize>,
        tls: Arc<ClientConfig>,
        id: String,
    },
    Cfssl {
        addr: String,
    },
}

enum Conn {
    Kith(Connection),
    Cfssl(SendRequest<Full<Bytes>>),
}

impl Dialer {
    fn body(&self, csr_pem: &str) -> Bytes {
        let v = match self {
            Dialer::Kith { id, .. } => json!({"spiffe_id": id, "csr": csr_pem}),
            Dialer::Cfssl { .. } => json!({"certificate_request": csr_pem}),
        };
        Bytes::from(v.to_string())
    }

    async fn open(&self) -> Result<Conn> {
        match self {
            Dialer::Kith {
                addrs, next, tls, ..
            } => {
                let addr = &addrs[next.fetch_add(1, Ordering::Relaxed) % addrs.len()];
                Ok(Conn::Kith(
                    Connection::open(addr, tls.clone())
                        .await
                        .map_err(|e| anyhow!("{e}"))?,
                ))
            }
            Dialer::Cfssl { addr } => {
                let tcp = tokio::net::TcpStream::connect(addr)
                    .await
                    .with_context(|| format!("connect to cfssl at {addr}"))?;
                let _ = tcp.set_nodelay(true);
                let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                    .await
                    .context("http handshake")?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                Ok(Conn::Cfssl(sender))
            }
        }
    }
}

impl Conn {
    /// Sends one issuance request; returns the HTTP status and the body.
    async fn issue(&mut self, body: Bytes) -> Result<(u16, Bytes)> {
        match self {
            Conn::Kith(c) => {
                let (status, _, bytes) = c
                    .send(hyper::Method::POST, "/v1/svid", Some(body.to_vec()), &[])
                    .await
                    .map_err(|e| anyhow!("{e}"))?;
                Ok((status, bytes))
            }
            Conn::Cfssl(sender) => {
                let req = Request::post("/api/v1/cfssl/sign")
                    .header("host", "cfssl")
                    .header("content-type", "application/json")
                    .body(Full::new(body))?;
                sender.ready().await?;
                let resp = sender.send_request(req).await?;
                let status = resp.status().as_u16();
                let bytes = resp.into_body().collect().await?.to_bytes();
                Ok((status, bytes))
            }
        }
    }
}

/// Whether a response is a successful issuance. Cheap on purpose (it runs on the shared
/// cores for every request); the first response of a run is checked in full by `probe`.
fn accepted(target: Target, status: u16, body: &[u8]) -> bool {
    if status != 200 {
        return false;
    }
    match target {
        Target::Kith => contains(body, b"\"svid\":\"-----BEGIN CERTIFICATE-----"),
        Target::Cfssl => {
            contains(body, b"\"success\":true")
                || serde_json::from_slice::<Value>(body)
                    .is_ok_and(|v| v["success"] == Value::Bool(true))
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// One request checked in full: the certificate parses, and for kith the SVID verifies
/// against the bundle and names the requested ID.
async fn probe(dialer: &Dialer, target: Target, bundle: Option<&TrustBundle>) -> Result<()> {
    let mut conn = dialer.open().await?;
    let (status, body) = conn.issue(dialer.body(&make_csr()?)).await?;
    let v: Value = serde_json::from_slice(&body)
        .with_context(|| format!("probe: status {status}, body not JSON"))?;
    if !accepted(target, status, &body) {
        bail!("probe refused: status {status}: {v}");
    }
    let pem = match target {
        Target::Kith => v["svid"].as_str(),
        Target::Cfssl => v["result"]["certificate"].as_str(),
    }
    .ok_or_else(|| anyhow!("probe: no certificate in {v}"))?;
    let chain = identity::pem::certificates(pem.as_bytes())?;
    if chain.is_empty() {
        bail!("probe: empty certificate chain");
    }
    if let (Target::Kith, Some(bundle), Dialer::Kith { id, .. }) = (target, bundle, dialer) {
        let got = identity::verify_x509_svid(&chain, bundle, SystemTime::now())
            .map_err(|e| anyhow!("probe: the issued SVID does not verify: {e}"))?;
        if got.as_str() != id {
            bail!("probe: issued {got}, asked for {id}");
        }
    }
    Ok(())
}

/// Attests with the join token; returns an mTLS client config holding the node SVID.
async fn attest(addr: &str, bundle: Arc<TrustBundle>, token: &str) -> Result<Arc<ClientConfig>> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    let csr = p.serialize_request(&key)?.pem()?;
    let anon = client_config(bundle.clone(), None).map_err(|e| anyhow!("{e}"))?;
    let mut conn = Connection::open(addr, anon)
        .await
        .map_err(|e| anyhow!("{e}"))?;
    let (status, v) = conn
        .post_json("/v1/attest/join", &json!({"token": token, "csr": csr}))
        .await
        .map_err(|e| anyhow!("{e}"))?;
    if status != 200 {
        bail!("attestation refused: {status} {v}");
    }
    let pem = v["svid"]
        .as_str()
        .ok_or_else(|| anyhow!("attestation: no svid in {v}"))?;
    let chain = identity::pem::certificates(pem.as_bytes())?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    client_config(bundle, Some((chain, key))).map_err(|e| anyhow!("{e}"))
}

#[derive(Default)]
struct WorkerResult {
    latencies_us: Vec<u32>,
    errors: u64,
    total_ok: u64,
    reconnects: u64,
    inline_csrs: u64,
    first_error: Option<String>,
}

struct Shared {
    target: Target,
    dialer: Dialer,
    bodies: Vec<Bytes>,
    next: AtomicUsize,
    window_start: Instant,
    window_end: Instant,
    request_timeout: Duration,
}

impl Shared {
    fn next_body(&self, inline: &mut u64) -> Result<Bytes> {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        match self.bodies.get(i) {
            Some(b) => Ok(b.clone()),
            None => {
                *inline += 1;
                Ok(self.dialer.body(&make_csr()?))
            }
        }
    }
}

async fn worker(shared: Arc<Shared>, mut conn: Option<Conn>) -> WorkerResult {
    let mut r = WorkerResult::default();
    let note = |r: &mut WorkerResult, in_window: bool, msg: String| {
        if in_window {
            r.errors += 1;
        }
        r.first_error.get_or_insert(msg);
    };
    loop {
        let now = Instant::now();
        if now >= shared.window_end {
            break;
        }
        if conn.is_none() {
            match shared.dialer.open().await {
                Ok(c) => {
                    r.reconnects += 1;
                    conn = Some(c);
                }
                Err(e) => {
                    note(
                        &mut r,
                        now >= shared.window_start,
                        format!("connect: {e:#}"),
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        let body = match shared.next_body(&mut r.inline_csrs) {
            Ok(b) => b,
            Err(e) => {
                note(&mut r, true, format!("csr: {e:#}"));
                break;
            }
        };
        let sent = Instant::now();
        let res = tokio::time::timeout(shared.request_timeout, c.issue(body)).await;
        let done = Instant::now();
        let in_window = done >= shared.window_start && done <= shared.window_end;
        match res {
            Ok(Ok((status, bytes))) if accepted(shared.target, status, &bytes) => {
                r.total_ok += 1;
                if in_window {
                    let us = (done - sent).as_micros().min(u32::MAX as u128) as u32;
                    r.latencies_us.push(us);
                }
            }
            Ok(Ok((status, bytes))) => {
                let text = String::from_utf8_lossy(&bytes[..bytes.len().min(300)]).into_owned();
                note(&mut r, in_window, format!("status {status}: {text}"));
            }
            Ok(Err(e)) => {
                note(&mut r, in_window, format!("request: {e:#}"));
                conn = None;
            }
            Err(_) => {
                note(&mut r, in_window, "request timed out".into());
                conn = None;
            }
        }
    }
    r
}

/// utime + stime of a process, in seconds (USER_HZ is 100 on Linux).
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// Busy and total CPU time of the whole machine, in seconds (first line of /proc/stat).
fn machine_cpu() -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 8 {
        return None;
    }
    // user nice system idle iowait irq softirq steal
    let idle = v[3] + v[4];
    let total: f64 = v.iter().sum();
    Some(((total - idle) / 100.0, total / 100.0))
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1] as f64 / 1000.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

async fn run(args: Args, pems: Vec<String>, pool_secs: f64) -> Result<()> {
    let mut bundle_for_probe = None;
    let dialer = match args.target {
        Target::Kith => {
            let path = args
                .bundle
                .as_ref()
                .ok_or_else(|| anyhow!("--target kith needs --bundle"))?;
            let token = args
                .token
                .as_deref()
                .ok_or_else(|| anyhow!("--target kith needs --token"))?;
            let id = SpiffeId::new(&args.id).map_err(|e| anyhow!("--id: {e}"))?;
            let pem = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
            let bundle = Arc::new(
                TrustBundle::from_pem(Some(id.trust_domain()), &pem)
                    .map_err(|e| anyhow!("bundle: {e}"))?,
            );
            let tls = attest(&args.addr[0], bundle.clone(), token).await?;
            bundle_for_probe = Some(bundle);
            Dialer::Kith {
                addrs: args.addr.clone(),
                next: Arc::new(AtomicUsize::new(0)),
                tls,
                id: args.id.clone(),
            }
        }
        Target::Cfssl => Dialer::Cfssl {
            addr: args.addr[0].clone(),
        },
    };
    probe(&dialer, args.target, bundle_for_probe.as_deref()).await?;

    let pool = pems.len();
    let bodies: Vec<Bytes> = pems.iter().map(|p| dialer.body(p)).collect();
    drop(pems);

    let mut conns = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        conns.push(dialer.open().await?);
    }

    let start = Instant::now();
    let window_start = start + args.warmup;
    let window_end = window_start + args.duration;
    let shared = Arc::new(Shared {
        target: args.target,
        dialer,
        bodies,
        next: AtomicUsize::new(0),
        window_start,
        window_end,
        request_timeout: args.request_timeout,
    });
    let handles: Vec<_> = conns
        .into_iter()
        .map(|c| tokio::spawn(worker(shared.clone(), Some(c))))
        .collect();

    // CPU in the measured window: sample at its start and end.
    tokio::time::sleep_until(window_start.into()).await;
    let server_cpu_now = || -> Option<f64> {
        if args.server_pid.is_empty() {
            return None;
        }
        args.server_pid
            .iter()
            .map(|p| cpu_seconds(&p.to_string()))
            .sum()
    };
    let client0 = cpu_seconds("self");
    let server0 = server_cpu_now();
    let machine0 = machine_cpu();
    tokio::time::sleep_until(window_end.into()).await;
    let client1 = cpu_seconds("self");
    let server1 = server_cpu_now();
    let machine1 = machine_cpu();

    let mut all = WorkerResult::default();
    for h in handles {
        let r = h.await?;
        all.latencies_us.extend(r.latencies_us);
        all.errors += r.errors;
        all.total_ok += r.total_ok;
        all.reconnects += r.reconnects;
        all.inline_csrs += r.inline_csrs;
        if all.first_error.is_none() {
            all.first_error = r.first_error;
        }
    }
    let mut lat = all.latencies_us;
    lat.sort_unstable();
    let ok = lat.len() as u64;
    let secs = args.duration.as_secs_f64();
    let mean = if lat.is_empty() {
        0.0
    } else {
        lat.iter().map(|&x| x as f64).sum::<f64>() / lat.len() as f64 / 1000.0
    };
    let client_cpu = client0.zip(client1).map(|(a, b)| b - a);
    let server_cpu = server0.zip(server1).map(|(a, b)| b - a);
    // Cores busy in the window on the whole machine, and how much of that was neither the
    // client nor the server (other work on the shared cores distorts the result).
    let busy = machine0
        .zip(machine1)
        .map(|((b0, _), (b1, _))| (b1 - b0) / secs);
    // (Clamped: the tick counters disagree by a few hundredths.)
    let other =
        busy.map(|b| (b - (client_cpu.unwrap_or(0.0) + server_cpu.unwrap_or(0.0)) / secs).max(0.0));
    let out = json!({
        "target": args.series.clone().unwrap_or_else(|| match args.target {
            Target::Kith => "kith".into(),
            Target::Cfssl => "cfssl".into(),
        }),
        "label": args.label,
        "connections": args.connections,
        "duration_s": secs,
        "warmup_s": args.warmup.as_secs_f64(),
        "requests": ok,
        "errors": all.errors,
        "rate": round3(ok as f64 / secs),
        "p50_ms": percentile(&lat, 0.50),
        "p90_ms": percentile(&lat, 0.90),
        "p99_ms": percentile(&lat, 0.99),
        "max_ms": percentile(&lat, 1.0),
        "mean_ms": round3(mean),
        "total_ok": all.total_ok + 1, // + the probe
        "reconnects": all.reconnects,
        "csr_pool": pool,
        "csr_pool_build_s": round3(pool_secs),
        "csr_inline": all.inline_csrs,
        "client_cpu_s": client_cpu.map(round3),
        "server_cpu_s": server_cpu.map(round3),
        "server_cpu_us_per_req": server_cpu
            .filter(|_| ok > 0)
            .map(|c| round3(c * 1e6 / ok as f64)),
        "machine_busy_cores": busy.map(round3),
        "other_busy_cores": other.filter(|_| server_cpu.is_some()).map(round3),
        "first_error": all.first_error,
    });
    println!("{out}");
    Ok(())
}
