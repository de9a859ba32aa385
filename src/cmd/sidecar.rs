//! `kith sidecar run`: the mTLS proxy, with its identity from files, from the CA (the pod's
//! service-account token) or from a `kith agent` over the Workload API (see [`sidecar::source`]).
//!
//! - explicit mode (ghostunnel-style), one tunnel from flags or several from `--config`:
//!   client side `--listen 127.0.0.1:9000 --connect 10.0.0.2:8443 --expect-id spiffe://…`
//!   (plaintext in, mTLS out), server side `--listen 0.0.0.0:8443 --forward 127.0.0.1:8080
//!   --allow spiffe://…` (mTLS in, plaintext out);
//! - transparent mode (no `--listen`, no `--config`): captured outbound (15001) and inbound
//!   (15006) listeners behind `kith sidecar init`'s rules.
//!
//! Before the first SVID, connections wait up to `--hold-timeout`; SIGTERM (or
//! `POST /quitquitquit`) stops accepting and lets open connections finish for
//! `--drain-timeout`.
//!
//! Why this is one file of over 500 lines: about half of it is `kith sidecar run`'s documented
//! flags (each also a `KITH_SIDECAR_*` variable) and their validation; the rest is the wiring of
//! sources, tunnels, transparent mode and the admin port, which reads those flags.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use identity::mesh;
use proxy::authz::Policy;
use proxy::metrics::Metrics;
use proxy::tls::{ExpectedPeer, IdentityHandle};
use proxy::transparent::{Captured, ExpectRules, InboundMode, OutboundPolicy, TransparentMetrics};
use proxy::tunnel::{self, Limits, Upstream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use sidecar::admin::{self, AdminRefusals, Counters};
use sidecar::app_probe::AppProbes;
use sidecar::source::FirstContact;
use sidecar::source::{self, Source, SourceMetrics};
use sidecar::tunnel_config::{self, End, Tunnel};
use sidecar::workers::Workers;

use crate::process::{self, Threads};

#[derive(Debug, Args)]
pub struct SidecarArgs {
    #[command(subcommand)]
    command: SidecarCommand,
}

#[derive(Debug, Subcommand)]
enum SidecarCommand {
    /// Run the mTLS proxy: explicit tunnels (--listen or --config) or transparent mode
    Run(Box<RunArgs>),
    /// Program the pod's network namespace to capture its TCP traffic (the init container)
    Init(Box<sidecar::capture::InitArgs>),
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Identity from files: the SVID chain (PEM, leaf first); reloaded when it changes
    #[arg(long, env = "KITH_SIDECAR_CERT", requires_all = ["key", "bundle"], conflicts_with_all = ["k8s_token_file", "workload_api"])]
    cert: Option<PathBuf>,
    /// Identity from files: the SVID's private key (PKCS#8 PEM); reloaded when it changes
    #[arg(long, env = "KITH_SIDECAR_KEY", requires = "cert")]
    key: Option<PathBuf>,
    /// The trust bundle (PEM or SPIFFE format): with --cert, the peers' roots (reloaded); with
    /// --ca, what authenticates the CA at first contact
    #[arg(long, env = "KITH_SIDECAR_BUNDLE")]
    bundle: Option<PathBuf>,
    /// With --ca instead of --bundle: the SHA-256 of the CA's PEM bundle; the sidecar fetches
    /// the bundle from the CA at first contact and accepts it only if it matches
    #[arg(
        long,
        env = "KITH_SIDECAR_BUNDLE_SHA256",
        conflicts_with = "bundle",
        requires = "ca"
    )]
    bundle_sha256: Option<String>,
    /// Identity from the CA: the pod's projected service-account token, read for every request
    #[arg(
        long,
        env = "KITH_SIDECAR_K8S_TOKEN_FILE",
        requires = "ca",
        conflicts_with = "workload_api"
    )]
    k8s_token_file: Option<PathBuf>,
    /// The CA's URL (with --k8s-token-file), e.g. https://kith-ca.kith-system.svc:8443.
    /// Repeat it (or give a comma list) for CA replicas; a name that resolves to several
    /// addresses counts as several. The sidecar moves to the next on a failed connection, a
    /// timeout or 503
    #[arg(
        long,
        env = "KITH_SIDECAR_CA",
        value_delimiter = ',',
        requires = "k8s_token_file"
    )]
    ca: Vec<String>,
    /// Identity from a kith agent: its Workload API socket, e.g. unix:///run/kith/agent.sock
    #[arg(long, env = "KITH_SIDECAR_WORKLOAD_API")]
    workload_api: Option<String>,
    /// With --workload-api: which SVID to use when the agent issues several [default: the first]
    #[arg(long, env = "KITH_SIDECAR_WORKLOAD_ID", requires = "workload_api")]
    workload_id: Option<String>,
    /// Explicit mode: where to accept connections (without it: transparent mode)
    #[arg(long, env = "KITH_SIDECAR_LISTEN", conflicts_with = "config")]
    listen: Option<SocketAddr>,
    /// Explicit client side: the mTLS server to connect to, ADDRESS:PORT or HOST:PORT (a name
    /// is resolved for every connection)
    #[arg(
        long,
        env = "KITH_SIDECAR_CONNECT",
        conflicts_with = "forward",
        requires = "listen"
    )]
    connect: Option<Upstream>,
    /// The SPIFFE ID servers must present (required for explicit client tunnels unless
    /// --expect-trust-domain); transparent mode also takes rules per destination,
    /// `CIDR[:PORT]=ID` (repeatable)
    #[arg(
        long = "expect-id",
        env = "KITH_SIDECAR_EXPECT_ID",
        value_delimiter = ','
    )]
    expect_id: Vec<String>,
    /// Explicit client side without --expect-id: accept ANY server of the own trust domain
    /// (an opt-in, logged: whoever intercepts the traffic with any SVID of the domain is
    /// believed)
    #[arg(
        long,
        env = "KITH_SIDECAR_EXPECT_TRUST_DOMAIN",
        conflicts_with = "expect_id"
    )]
    expect_trust_domain: bool,
    /// Explicit server side: the plaintext backend to forward to
    #[arg(long, env = "KITH_SIDECAR_FORWARD", requires = "listen")]
    forward: Option<SocketAddr>,
    /// Explicit mode: several tunnels from a TOML file ([[tunnel]] listen, connect|forward,
    /// expect_id, allow, name)
    #[arg(long, env = "KITH_SIDECAR_CONFIG")]
    config: Option<PathBuf>,
    /// A SPIFFE ID or `spiffe://td/prefix/*` allowed to connect in, optionally for some ports
    /// only (`…@8080+8081`); repeatable [default: any ID of the own trust domain]
    #[arg(long = "allow", env = "KITH_SIDECAR_ALLOW", value_delimiter = ',')]
    allow: Vec<String>,
    /// Allow rules from a TOML file ([[allow]] id, ports), added to --allow
    #[arg(long, env = "KITH_SIDECAR_POLICY")]
    policy: Option<PathBuf>,
    /// Transparent mode: the captured outbound listener (127.0.0.1 also listens on [::1])
    #[arg(
        long,
        env = "KITH_SIDECAR_OUTBOUND_LISTEN",
        default_value_t = SocketAddr::from((Ipv4Addr::LOCALHOST, mesh::OUTBOUND_PORT))
    )]
    outbound_listen: SocketAddr,
    /// Transparent mode: the captured inbound listener (0.0.0.0 also listens on [::]);
    /// connections are forwarded to their original destination, never to 127.0.0.1
    #[arg(
        long,
        env = "KITH_SIDECAR_INBOUND_LISTEN",
        default_value_t = SocketAddr::from((Ipv4Addr::UNSPECIFIED, mesh::INBOUND_PORT))
    )]
    inbound_listen: SocketAddr,
    /// Transparent mode: destinations that get mTLS (repeatable, e.g. 10.0.0.0/8)
    #[arg(
        long = "mesh-cidr",
        env = "KITH_SIDECAR_MESH_CIDR",
        value_delimiter = ','
    )]
    mesh_cidr: Vec<String>,
    /// Transparent mode: other destinations pass through as plain TCP, or are refused
    #[arg(long, env = "KITH_SIDECAR_OUTBOUND_POLICY", default_value = "passthrough", value_parser = ["passthrough", "deny"])]
    outbound_policy: String,
    /// Transparent mode: strict refuses plaintext inbound; permissive (migration) accepts it too
    #[arg(long, env = "KITH_SIDECAR_MODE", default_value = "strict", value_parser = ["strict", "permissive"])]
    mode: String,
    /// /live, /ready, /metrics, POST /quitquitquit
    #[arg(
        long,
        env = "KITH_SIDECAR_ADMIN_LISTEN",
        default_value_t = SocketAddr::from((Ipv4Addr::LOCALHOST, mesh::SIDECAR_ADMIN_PORT))
    )]
    admin_listen: SocketAddr,
    /// Most connections at once per listener and worker, as nginx's worker_connections; more
    /// wait in the kernel's backlog. On mTLS listeners a slot is taken only once the peer is
    /// authenticated and authorized; handshakes run in their own pool
    #[arg(long, env = "KITH_SIDECAR_MAX_CONNECTIONS", default_value_t = 1024)]
    max_connections: usize,
    /// mTLS listeners: the whole ClientHello must arrive this soon after the connection is
    /// accepted, or it is cut (handshake_timeout)
    #[arg(long, env = "KITH_SIDECAR_FIRST_FLIGHT_TIMEOUT", default_value = "3s", value_parser = humantime::parse_duration)]
    first_flight_timeout: Duration,
    /// mTLS listeners: most handshakes in progress from one source address (IPv6: one /64)
    /// per listener and worker; more are refused (too_many_pending)
    #[arg(
        long,
        env = "KITH_SIDECAR_MAX_PENDING_PER_SOURCE",
        default_value_t = 256
    )]
    max_pending_per_source: usize,
    /// How long a connection waits for the first SVID before it is refused (no_identity_yet)
    #[arg(long, env = "KITH_SIDECAR_HOLD_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    hold_timeout: Duration,
    /// After SIGTERM: how long open connections may finish before they are cut
    #[arg(long, env = "KITH_SIDECAR_DRAIN_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
    /// A connection with no byte either way for this long is closed
    #[arg(long, env = "KITH_SIDECAR_IDLE_TIMEOUT", default_value = "1h", value_parser = humantime::parse_duration)]
    idle_timeout: Duration,
    /// TLS session resumption on both sides (tickets end with every new SVID or bundle, and a
    /// resumed peer's certificate is checked again); off makes every connection a full handshake
    #[arg(long, env = "KITH_SIDECAR_TLS_RESUMPTION", default_value = "on", value_parser = ["on", "off"])]
    tls_resumption: String,
    /// Post-quantum hybrid key exchange (X25519MLKEM768, offered before X25519) on both sides
    /// of the mesh hop; off offers X25519 only (logged as a weaker setting)
    #[arg(long, env = "KITH_SIDECAR_PQ", default_value = "on", value_parser = ["on", "off"])]
    pq: String,
    /// The pooled hop between kith sidecars: with `on`, application connections to another
    /// kith sidecar that pools too travel as HTTP/2 streams over a few long-lived mTLS
    /// connections (ALPN kith/2), each stream authorized on its own; peers that are not kith,
    /// or run with `off`, get one mTLS connection per application connection
    #[arg(long, env = "KITH_SIDECAR_POOL", default_value = "on", value_parser = ["on", "off"])]
    pool: String,
    /// Threads that serve connections, each with its own listeners (SO_REUSEPORT) and event
    /// loop; a connection stays on one thread (the kernel spreads new ones by address hash)
    /// [default: 2, or 1 where the process may use only one CPU]
    #[arg(long, env = "KITH_SIDECAR_WORKERS", value_parser = clap::value_parser!(u16).range(1..=256))]
    workers: Option<u16>,
    /// An app probe the sidecar runs for the kubelet at GET /app-health/<container>/<kind>
    /// on the admin port: `<container>/<livez|readyz|startupz>=http:<port><path>` or
    /// `…=tcp:<port>` (repeatable; `kith inject` writes these)
    #[arg(long = "app-probe")]
    app_probe: Vec<String>,
    #[arg(long, env = "KITH_SIDECAR_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

impl RunArgs {
    fn source(&self) -> Result<Source> {
        match (
            &self.cert,
            &self.key,
            &self.k8s_token_file,
            self.ca.is_empty(),
            &self.workload_api,
        ) {
            (Some(cert), Some(key), None, true, None) => Ok(Source::Files {
                cert: cert.clone(),
                key: key.clone(),
                bundle: self.bundle.clone().context("--cert needs --bundle")?,
            }),
            (None, None, Some(token_file), false, None) => Ok(Source::Ca {
                urls: self.ca.clone(),
                token_file: token_file.clone(),
                bundle: match (&self.bundle, &self.bundle_sha256) {
                    (Some(path), None) => FirstContact::File(path.clone()),
                    (None, Some(pin)) => FirstContact::Pin(pin.clone()),
                    _ => bail!("--k8s-token-file needs --bundle or --bundle-sha256"),
                },
            }),
            (None, None, None, true, Some(endpoint)) => Ok(Source::WorkloadApi {
                endpoint: endpoint.clone(),
                id: self.workload_id.clone(),
            }),
            _ => bail!(
                "say where the identity comes from: --cert/--key/--bundle (files), \
                 --k8s-token-file/--ca/--bundle (the CA, in Kubernetes) or --workload-api (a kith agent)"
            ),
        }
    }

    fn policy(&self) -> Result<Policy> {
        let mut policy = Policy::own_trust_domain();
        for rule in &self.allow {
            policy = tunnel_config::add_allow_flag(policy, rule)?;
        }
        if let Some(path) = &self.policy {
            policy = tunnel_config::add_policy_file(policy, path)?;
        }
        Ok(policy)
    }

    /// Explicit mode takes one plain --expect-id.
    fn single_expect_id(&self) -> Result<Option<&str>> {
        match self.expect_id.as_slice() {
            [] => Ok(None),
            [one] if !one.contains('=') => Ok(Some(one)),
            _ => bail!(
                "explicit mode takes one --expect-id SPIFFE ID; CIDR=ID rules are for transparent mode"
            ),
        }
    }

    /// The explicit tunnels: from --config, or the one of --listen; none in transparent mode.
    fn tunnels(&self, policy: &Policy) -> Result<Vec<Tunnel>> {
        if let Some(path) = &self.config {
            if self.connect.is_some()
                || self.forward.is_some()
                || !self.expect_id.is_empty()
                || self.expect_trust_domain
            {
                bail!(
                    "--config defines the tunnels; drop --connect/--forward/--expect-id/--expect-trust-domain"
                );
            }
            return tunnel_config::load_tunnels(path, policy);
        }
        let Some(listen) = self.listen else {
            if self.connect.is_some() || self.forward.is_some() {
                bail!("--connect and --forward need --listen");
            }
            return Ok(Vec::new());
        };
        let end = match (self.connect.clone(), self.forward) {
            (Some(connect), None) => End::Client {
                connect,
                expect: tunnel_config::expected_peer(
                    self.single_expect_id()?,
                    self.expect_trust_domain,
                    "--expect-id SPIFFE_ID",
                    "--expect-trust-domain",
                )?,
            },
            (None, Some(forward)) => End::Server {
                forward,
                policy: policy.clone(),
            },
            _ => bail!(
                "explicit mode needs --listen with either --connect (client side) or --forward (server side); transparent mode takes neither"
            ),
        };
        // One tunnel from flags: its series carry no tunnel label.
        Ok(vec![Tunnel {
            name: String::new(),
            listen,
            end,
        }])
    }
}

pub fn run(args: SidecarArgs) -> ExitCode {
    let args = match args.command {
        SidecarCommand::Run(args) => args,
        SidecarCommand::Init(args) => return sidecar::capture::run(*args),
    };
    // The sidecar's own runtime is single-threaded; --workers adds single-threaded runtimes
    // (workers.rs) that serve connections too.
    let rt = match process::runtime(Threads::One, 2) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    process::exit(&rt, run_sidecar(*args), 1)
}

async fn run_sidecar(args: RunArgs) -> Result<()> {
    let signalled = process::on_signal();
    process::init_logging(&args.log_format);
    let source = args.source()?;
    let policy = args.policy()?;
    let tunnels = args.tunnels(&policy)?;
    let workers = args.workers.map_or_else(default_workers, usize::from);
    let app_probes = Arc::new(AppProbes::parse(args.app_probe.iter().map(String::as_str))?);
    let limits = Limits {
        max_connections: args.max_connections,
        max_pending_per_source: args.max_pending_per_source,
        first_flight_timeout: args.first_flight_timeout,
        identity_hold: args.hold_timeout,
        drain_timeout: args.drain_timeout,
        idle_timeout: args.idle_timeout,
        ..Limits::default()
    };
    limits
        .validate()
        .context("--max-connections, --max-pending-per-source and the timeouts")?;
    let resumption = args.tls_resumption == "on";
    if !resumption {
        tracing::info!("TLS session resumption off: every connection is a full handshake");
    }
    let pq = args.pq == "on";
    if !pq {
        // SECURITY: an explicit opt-in; traffic recorded today could be decrypted by a future
        // quantum computer that breaks X25519.
        tracing::warn!(
            "post-quantum key exchange off (--pq off): the mesh hop offers X25519 only, not X25519MLKEM768"
        );
    }
    let pooling = args.pool == "on";
    if !pooling {
        tracing::info!("pooled hop off: one mTLS connection per application connection");
    }
    let identity = IdentityHandle::new()
        .with_resumption(resumption)
        .with_pq(pq)
        .with_pooling(pooling);
    let source_metrics = Arc::new(SourceMetrics::default());
    source::prepare(&source, &identity, &source_metrics)?;
    let admin = tokio::net::TcpListener::bind(args.admin_listen)
        .await
        .with_context(|| format!("cannot listen on {} (admin)", args.admin_listen))?;
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    if policy.has_rules() {
        tracing::info!(allow = ?args.allow, policy = ?args.policy, "inbound authorization rules loaded");
    }

    // Every listener is bound before any is served, so a taken port fails the start.
    let mut pool = Workers::new(workers);
    let counters = if tunnels.is_empty() {
        Counters::Transparent(transparent(
            &args, &identity, policy, limits, &mut pool, &shutdown,
        )?)
    } else {
        let mut sets = Vec::new();
        for t in tunnels {
            let metrics = Arc::new(Metrics::default());
            let name = tunnel_name(&t);
            let (identity, m, shutdown) = (identity.clone(), metrics.clone(), shutdown.clone());
            match t.end {
                End::Client { connect, expect } => {
                    tracing::info!(tunnel = %t.name, listen = %t.listen, %connect, ?expect, "client side (plaintext in, mTLS out)");
                    if expect == ExpectedPeer::TrustDomain {
                        tracing::warn!(tunnel = %t.name, %connect,
                            "expect-trust-domain: ANY server with an SVID of the trust domain is accepted, not one named ID; whoever can intercept this traffic with any SVID of the domain is believed");
                    }
                    pool.listen(t.listen, move |listener| async move {
                        log_exit(
                            tunnel::serve_outbound(
                                listener, identity, connect, expect, limits, m, shutdown,
                            )
                            .await,
                        );
                    })
                    .context(name)?;
                }
                End::Server { forward, policy } => {
                    tracing::info!(tunnel = %t.name, listen = %t.listen, %forward, "server side (mTLS in, plaintext out)");
                    pool.listen(t.listen, move |listener| async move {
                        log_exit(
                            tunnel::serve_inbound(
                                listener, identity, policy, forward, limits, m, shutdown,
                            )
                            .await,
                        );
                    })
                    .context(name)?;
                }
            }
            sets.push((t.name, metrics));
        }
        Counters::Explicit(sets)
    };
    pool.start(&tasks)?;
    tracing::info!(identity = %source.describe(), hold = ?args.hold_timeout, tls_resumption = %args.tls_resumption, pq = %args.pq, pool = %args.pool, workers, "kith sidecar running");
    tasks.spawn(source::run(
        source,
        identity.clone(),
        source_metrics.clone(),
        shutdown.clone(),
    ));
    let refused = Arc::new(AdminRefusals::default());
    let render = {
        let registry = admin::registry(counters, &identity, &source_metrics, &refused);
        Arc::new(move || admin::encode(&registry))
    };
    let admin_shutdown = CancellationToken::new();
    let admin_task = tokio::spawn(admin::serve(
        admin,
        identity.clone(),
        render,
        refused,
        app_probes,
        shutdown.clone(),
        admin_shutdown.clone(),
    ));
    tasks.close();
    tokio::select! {
        _ = signalled.cancelled() => {}
        _ = shutdown.cancelled() => {}
    }
    tracing::info!(drain = ?args.drain_timeout, "shutting down: no new connections; open ones may finish");
    shutdown.cancel();
    // The listeners drain and cut by themselves; this is only a bound on a stuck task.
    if tokio::time::timeout(args.drain_timeout + Duration::from_secs(2), tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("some tasks did not stop in time");
    }
    admin_shutdown.cancel();
    let _ = admin_task.await;
    tracing::info!("stopped");
    Ok(())
}

/// Two threads, as Istio's sidecars run Envoy (`concurrency: 2`): a second thread keeps the
/// proxy from being the one queue every request waits in, and more than two rarely pays on a
/// node whose CPUs the pods share. One where the CPU quota or affinity allows only one.
fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(2))
}

fn tunnel_name(t: &Tunnel) -> String {
    if t.name.is_empty() {
        "--listen".to_owned()
    } else {
        format!("tunnel {}", t.name)
    }
}

fn log_exit(result: Result<(), tunnel::Error>) {
    if let Err(e) = result {
        tracing::error!(error = %e, "listener stopped");
    }
}

/// Transparent mode: connections captured by `kith sidecar init`'s rules.
fn transparent(
    args: &RunArgs,
    identity: &IdentityHandle,
    policy: Policy,
    limits: Limits,
    pool: &mut Workers,
    shutdown: &CancellationToken,
) -> Result<Arc<TransparentMetrics>> {
    let mesh = proxy::transparent::parse_cidrs(args.mesh_cidr.iter().map(String::as_str))
        .map_err(|e| anyhow::anyhow!("--mesh-cidr: {e}"))?;
    if mesh.is_empty() {
        tracing::warn!(
            "no --mesh-cidr: every outbound connection leaves as plain TCP (or is refused with --outbound-policy deny)"
        );
    }
    let outbound_policy = if args.outbound_policy == "deny" {
        OutboundPolicy::Deny
    } else {
        OutboundPolicy::Passthrough
    };
    let inbound_mode = if args.mode == "permissive" {
        InboundMode::Permissive
    } else {
        InboundMode::Strict
    };
    if inbound_mode == InboundMode::Permissive {
        tracing::warn!(
            "PERMISSIVE mode: plaintext inbound connections are accepted unauthenticated (for migration only)"
        );
    }
    let expect = ExpectRules::parse(args.expect_id.iter().map(String::as_str))
        .map_err(|e| anyhow::anyhow!("--expect-id: {e}"))?;
    log_unexpected_destinations(&mesh, &expect);
    let tm = Arc::new(TransparentMetrics::default());
    let outbound = {
        let (identity, tm, shutdown) = (identity.clone(), tm.clone(), shutdown.clone());
        move |listener| async move {
            log_exit(
                proxy::transparent::serve_transparent_outbound(
                    listener,
                    identity,
                    mesh,
                    outbound_policy,
                    expect,
                    limits,
                    tm,
                    shutdown,
                )
                .await,
            );
        }
    };
    pool.listen(args.outbound_listen, outbound.clone())?;
    // ip6tables redirects IPv6 connections to [::1] (outbound) and to the address they arrived
    // at (inbound): listen on the IPv6 twin of each address too.
    if let Some(v6) = ipv6_twin(args.outbound_listen) {
        listen_ipv6(pool, v6, "outbound", outbound)?;
    }
    // SECURITY: the sidecar's own ports are never forwarded, whatever --admin-listen says.
    let own_ports = [
        args.admin_listen.port(),
        args.inbound_listen.port(),
        args.outbound_listen.port(),
    ];
    let inbound = {
        let (identity, tm, shutdown) = (identity.clone(), tm.clone(), shutdown.clone());
        move |listener| async move {
            log_exit(
                proxy::transparent::serve_transparent_inbound(
                    Captured::new(listener).refusing_ports(own_ports),
                    identity,
                    policy,
                    inbound_mode,
                    limits,
                    tm,
                    shutdown,
                )
                .await,
            );
        }
    };
    pool.listen(args.inbound_listen, inbound.clone())?;
    if let Some(v6) = ipv6_twin(args.inbound_listen) {
        listen_ipv6(pool, v6, "inbound", inbound)?;
    }
    tracing::info!(outbound = %args.outbound_listen, inbound = %args.inbound_listen, mesh = ?args.mesh_cidr,
        outbound_policy = %args.outbound_policy, mode = %args.mode, "transparent mode");
    Ok(tm)
}

/// Transparent mode: says at start which mesh destinations have no expected server ID, so
/// that accepting any ID of the trust domain there is a visible choice.
fn log_unexpected_destinations(mesh: &[proxy::Cidr], expect: &ExpectRules) {
    if expect.default != ExpectedPeer::TrustDomain {
        return;
    }
    let ruled: Vec<String> = expect
        .rules
        .iter()
        .map(|r| match r.port {
            Some(p) => format!("{}:{p}", r.cidr),
            None => r.cidr.to_string(),
        })
        .collect();
    for cidr in mesh {
        // Fully covered: a rule for every port of a range that contains this one.
        let covered = expect.rules.iter().any(|r| {
            r.port.is_none() && r.cidr.prefix() <= cidr.prefix() && r.cidr.contains(cidr.addr())
        });
        if !covered {
            tracing::warn!(
                destinations = %cidr,
                with_expected_id = ?ruled,
                "no expected ID for these mesh destinations (outside the listed rules): ANY server of the trust domain is accepted; give --expect-id ID or CIDR[:PORT]=ID rules"
            );
        }
    }
}

/// The IPv6 address that goes with an IPv4 listen address: `[::1]` for `127.0.0.1`, `[::]`
/// for `0.0.0.0`; `None` for an IPv6 address or another IPv4 one.
fn ipv6_twin(addr: SocketAddr) -> Option<SocketAddr> {
    let ip = match addr.ip() {
        IpAddr::V4(v4) if v4.is_loopback() => Ipv6Addr::LOCALHOST,
        IpAddr::V4(v4) if v4.is_unspecified() => Ipv6Addr::UNSPECIFIED,
        _ => return None,
    };
    Some(SocketAddr::new(IpAddr::V6(ip), addr.port()))
}

/// Listens on an IPv6 twin address (IPV6_V6ONLY). Without IPv6 in the namespace (no `::1`, or
/// no IPv6 in the kernel) there is nothing to capture and this is logged; any other failure
/// (the port taken) fails the start, since ip6tables would redirect to a listener that is not
/// ours.
fn listen_ipv6<F, Fut>(pool: &mut Workers, addr: SocketAddr, what: &str, serve: F) -> Result<()>
where
    F: FnOnce(tokio::net::TcpListener) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Err(e) = pool.listen_v6_only(addr, serve) else {
        return Ok(());
    };
    let no_ipv6 = e
        .chain()
        .filter_map(|c| c.downcast_ref::<std::io::Error>())
        .any(|io| {
            matches!(
                io.raw_os_error(),
                Some(code) if code == nix::errno::Errno::EADDRNOTAVAIL as i32
                    || code == nix::errno::Errno::EAFNOSUPPORT as i32
            )
        });
    if no_ipv6 {
        tracing::info!(%addr, error = %format!("{e:#}"), "no IPv6 here: no IPv6 {what} listener");
        return Ok(());
    }
    Err(e.context(format!("the IPv6 {what} listener")))
}
