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
//! The flags (each also a `KITH_SIDECAR_*` variable) become a validated [`sidecar::Config`];
//! [`sidecar::run`] does the rest.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use identity::mesh;
use proxy::authz::Policy;
use proxy::transparent::{ExpectRules, InboundMode, OutboundPolicy};
use proxy::tunnel::{Limits, Upstream};

use sidecar::app_probe::AppProbes;
use sidecar::source::{FirstContact, Source};
use sidecar::tunnel_config::{self, End, Tunnel};
use sidecar::{Config, Mode, Transparent};

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
    /// The validated configuration the sidecar library runs.
    fn config(&self) -> Result<Config> {
        let source = self.source()?;
        let policy = self.policy()?;
        let tunnels = self.tunnels(&policy)?;
        let mode = if tunnels.is_empty() {
            Mode::Transparent(self.transparent()?)
        } else {
            Mode::Explicit(tunnels)
        };
        Ok(Config {
            source,
            policy,
            mode,
            limits: Limits {
                max_connections: self.max_connections,
                max_pending_per_source: self.max_pending_per_source,
                first_flight_timeout: self.first_flight_timeout,
                identity_hold: self.hold_timeout,
                drain_timeout: self.drain_timeout,
                idle_timeout: self.idle_timeout,
                ..Limits::default()
            },
            tls_resumption: self.tls_resumption == "on",
            pq: self.pq == "on",
            pool: self.pool == "on",
            workers: self
                .workers
                .map_or_else(sidecar::default_workers, usize::from),
            app_probes: AppProbes::parse(self.app_probe.iter().map(String::as_str))?,
            admin_listen: self.admin_listen,
        })
    }

    /// Transparent mode's listeners, mesh ranges and rules.
    fn transparent(&self) -> Result<Transparent> {
        let mesh = proxy::transparent::parse_cidrs(self.mesh_cidr.iter().map(String::as_str))
            .context("--mesh-cidr")?;
        let expect =
            ExpectRules::parse(self.expect_id.iter().map(String::as_str)).context("--expect-id")?;
        Ok(Transparent {
            outbound_listen: self.outbound_listen,
            inbound_listen: self.inbound_listen,
            mesh,
            outbound_policy: if self.outbound_policy == "deny" {
                OutboundPolicy::Deny
            } else {
                OutboundPolicy::Passthrough
            },
            inbound_mode: if self.mode == "permissive" {
                InboundMode::Permissive
            } else {
                InboundMode::Strict
            },
            expect,
        })
    }

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
            return Ok(tunnel_config::load_tunnels(path, policy)?);
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
    process::settle_allocator();
    // The sidecar's own runtime is single-threaded; --workers adds single-threaded runtimes
    // (sidecar::workers) that serve connections too.
    let rt = match process::runtime(Threads::One, 2) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    process::exit(&rt, run_sidecar(*args), 1)
}

async fn run_sidecar(args: RunArgs) -> Result<()> {
    let signalled = process::on_signal();
    process::init_logging(&args.log_format);
    let config = args.config()?;
    Ok(sidecar::run(config, signalled).await?)
}
