//! `kith sidecar run` in explicit mode (ghostunnel-style), with its identity from files that
//! are reloaded when they change:
//!
//! - client side: `--listen 127.0.0.1:9000 --connect 10.0.0.2:8443 --expect-id spiffe://…`
//!   (plaintext in, mTLS out);
//! - server side: `--listen 0.0.0.0:8443 --forward 127.0.0.1:8080 --allow spiffe://…`
//!   (mTLS in, plaintext out).
//!
//! Without `--listen` it runs in transparent mode: captured outbound (15001) and inbound (15006)
//! listeners behind `kith sidecar init`'s rules. Identity from the CA or the Workload API comes
//! with the sidecar issue's next steps.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::{Args, Subcommand};
use http_body_util::Full;
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use identity::{SpiffeId, Svid, TrustBundle, TrustDomain};
use proxy::authz::Policy;
use proxy::metrics::{DirectionMetrics, Metrics, Reason};
use proxy::tls::{ExpectedPeer, IdentityHandle};
use proxy::transparent::{InboundMode, OutboundPolicy, TransparentMetrics};
use proxy::tunnel::{self, Limits};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Debug, Args)]
pub struct SidecarArgs {
    #[command(subcommand)]
    command: SidecarCommand,
}

#[derive(Debug, Subcommand)]
enum SidecarCommand {
    /// Run an explicit mTLS tunnel with the identity from --cert/--key/--bundle
    Run(Box<RunArgs>),
    /// Program the pod's network namespace to capture its TCP traffic (the init container)
    Init(Box<crate::capture::InitArgs>),
}

#[derive(Debug, Args)]
struct RunArgs {
    /// The SVID chain (PEM, leaf first); reloaded when it changes
    #[arg(long, env = "KITH_SIDECAR_CERT")]
    cert: PathBuf,
    /// The SVID's private key (PKCS#8 PEM); reloaded when it changes
    #[arg(long, env = "KITH_SIDECAR_KEY")]
    key: PathBuf,
    /// The trust bundle (PEM or SPIFFE format); reloaded when it changes
    #[arg(long, env = "KITH_SIDECAR_BUNDLE")]
    bundle: PathBuf,
    /// Explicit mode: where to accept connections (without it: transparent mode)
    #[arg(long, env = "KITH_SIDECAR_LISTEN")]
    listen: Option<SocketAddr>,
    /// Explicit client side: the mTLS server to connect to
    #[arg(
        long,
        env = "KITH_SIDECAR_CONNECT",
        conflicts_with = "forward",
        requires = "listen"
    )]
    connect: Option<SocketAddr>,
    /// The SPIFFE ID servers must present [default: any ID of the own trust domain]
    #[arg(long, env = "KITH_SIDECAR_EXPECT_ID")]
    expect_id: Option<String>,
    /// Explicit server side: the plaintext backend to forward to
    #[arg(long, env = "KITH_SIDECAR_FORWARD", requires = "listen")]
    forward: Option<SocketAddr>,
    /// A SPIFFE ID or `spiffe://td/prefix/*` allowed to connect in (repeatable)
    /// [default: any ID of the own trust domain]
    #[arg(long = "allow", env = "KITH_SIDECAR_ALLOW", value_delimiter = ',')]
    allow: Vec<String>,
    /// Transparent mode: the captured outbound listener
    #[arg(
        long,
        env = "KITH_SIDECAR_OUTBOUND_LISTEN",
        default_value = "127.0.0.1:15001"
    )]
    outbound_listen: SocketAddr,
    /// Transparent mode: the captured inbound listener
    #[arg(
        long,
        env = "KITH_SIDECAR_INBOUND_LISTEN",
        default_value = "0.0.0.0:15006"
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
        default_value = "127.0.0.1:15020"
    )]
    admin_listen: SocketAddr,
    #[arg(long, env = "KITH_SIDECAR_MAX_CONNECTIONS", default_value_t = 1024)]
    max_connections: usize,
    #[arg(long, env = "KITH_SIDECAR_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

pub fn run(args: SidecarArgs) -> ExitCode {
    let args = match args.command {
        SidecarCommand::Run(args) => args,
        SidecarCommand::Init(args) => return crate::capture::run(*args),
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(run_tunnel(*args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "error: {}",
                e.chain()
                    .map(|c| c.to_string())
                    .collect::<Vec<_>>()
                    .join(": ")
            );
            ExitCode::from(1)
        }
    }
}

/// The identity files and what was last loaded from them.
struct Files {
    cert: PathBuf,
    key: PathBuf,
    bundle: PathBuf,
}

impl Files {
    fn load(&self) -> Result<(Svid, TrustBundle)> {
        let read =
            |p: &Path| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
        let svid = Svid::from_pem(&read(&self.cert)?, &read(&self.key)?).with_context(|| {
            format!(
                "{} / {} are not an X509-SVID and its key",
                self.cert.display(),
                self.key.display()
            )
        })?;
        let td = svid.id().trust_domain();
        let bundle = TrustBundle::parse(Some(td), &read(&self.bundle)?).with_context(|| {
            format!(
                "{} is not a trust bundle for {}",
                self.bundle.display(),
                svid.id().trust_domain()
            )
        })?;
        Ok((svid, bundle))
    }

    /// A cheap fingerprint of the three files: their sizes and modification times.
    fn stamp(&self) -> Vec<Option<(u64, SystemTime)>> {
        [&self.cert, &self.key, &self.bundle]
            .iter()
            .map(|p| {
                std::fs::metadata(p)
                    .ok()
                    .and_then(|m| Some((m.len(), m.modified().ok()?)))
            })
            .collect()
    }
}

async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))
}

async fn run_tunnel(args: RunArgs) -> Result<()> {
    ca::cli::init_logging(&args.log_format);
    let files = Files {
        cert: args.cert.clone(),
        key: args.key.clone(),
        bundle: args.bundle.clone(),
    };
    let (svid, bundle) = files.load()?;
    let own_td: TrustDomain = svid.id().trust_domain();
    let identity = IdentityHandle::new();
    let id = svid.id().clone();
    identity
        .publish(svid, bundle, SystemTime::now())
        .context("the SVID does not verify against the bundle")?;
    let admin = tokio::net::TcpListener::bind(args.admin_listen)
        .await
        .with_context(|| format!("cannot listen on {} (admin)", args.admin_listen))?;
    let limits = Limits {
        max_connections: args.max_connections,
        ..Limits::default()
    };
    let metrics = Arc::new(Metrics::default());
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    let expect = match &args.expect_id {
        Some(s) => {
            ExpectedPeer::Id(SpiffeId::new(s).with_context(|| format!("--expect-id {s:?}"))?)
        }
        None => ExpectedPeer::TrustDomain,
    };
    let mut policy = Policy::new(own_td);
    for rule in &args.allow {
        policy = policy
            .allow(rule)
            .with_context(|| format!("--allow {rule:?}"))?;
    }
    let render: Arc<dyn Fn() -> String + Send + Sync> = match (
        args.listen,
        args.connect,
        args.forward,
    ) {
        (Some(listen), Some(connect), None) => {
            let listener = bind(listen).await?;
            tracing::info!(%id, %listen, %connect, expect = ?args.expect_id, "kith sidecar: client side (plaintext in, mTLS out)");
            tasks.spawn(tunnel::serve_outbound(
                listener,
                identity.clone(),
                connect,
                expect,
                limits,
                metrics.clone(),
                shutdown.clone(),
            ));
            let (m, i) = (metrics.clone(), identity.clone());
            Arc::new(move || metrics_text(&m, &i, "outbound"))
        }
        (Some(listen), None, Some(forward)) => {
            let listener = bind(listen).await?;
            tracing::info!(%id, %listen, %forward, allow = ?args.allow, "kith sidecar: server side (mTLS in, plaintext out)");
            tasks.spawn(tunnel::serve_inbound(
                listener,
                identity.clone(),
                policy,
                forward,
                limits,
                metrics.clone(),
                shutdown.clone(),
            ));
            let (m, i) = (metrics.clone(), identity.clone());
            Arc::new(move || metrics_text(&m, &i, "inbound"))
        }
        (None, None, None) => {
            // Transparent mode: connections captured by `kith sidecar init`'s rules.
            let mesh = proxy::transparent::parse_cidrs(args.mesh_cidr.iter().map(String::as_str))
                .map_err(|e| anyhow::anyhow!("--mesh-cidr: {e}"))?;
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
            let out_listener = bind(args.outbound_listen).await?;
            let in_listener = bind(args.inbound_listen).await?;
            let tm = Arc::new(TransparentMetrics::default());
            tracing::info!(%id, outbound = %args.outbound_listen, inbound = %args.inbound_listen, mesh = ?args.mesh_cidr,
                outbound_policy = %args.outbound_policy, mode = %args.mode, "kith sidecar: transparent mode");
            tasks.spawn(proxy::transparent::serve_transparent_outbound(
                out_listener,
                identity.clone(),
                mesh,
                outbound_policy,
                expect,
                limits,
                tm.clone(),
                shutdown.clone(),
            ));
            tasks.spawn(proxy::transparent::serve_transparent_inbound(
                in_listener,
                identity.clone(),
                policy,
                inbound_mode,
                limits,
                tm.clone(),
                shutdown.clone(),
            ));
            let i = identity.clone();
            Arc::new(move || transparent_text(&tm, &i))
        }
        _ => bail!(
            "explicit mode needs --listen with either --connect (client side) or --forward (server side); transparent mode takes neither"
        ),
    };
    tasks.spawn(reload(files, identity.clone(), shutdown.clone()));
    tasks.spawn(admin_serve(
        admin,
        identity.clone(),
        render,
        shutdown.clone(),
    ));
    tasks.close();
    tokio::select! {
        _ = wait_for_signal() => {}
        _ = shutdown.cancelled() => {}
    }
    tracing::info!("shutting down");
    shutdown.cancel();
    if tokio::time::timeout(Duration::from_secs(5), tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("some connections did not close within 5s");
    }
    Ok(())
}

/// Reloads the identity when a file changes. A new SVID or bundle applies to the next
/// handshake; an invalid one is refused and the current identity stays (logged).
async fn reload(files: Files, identity: IdentityHandle, shutdown: CancellationToken) {
    let mut last = files.stamp();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let stamp = files.stamp();
        if stamp == last {
            continue;
        }
        last = stamp;
        match files.load().and_then(|(svid, bundle)| {
            let id = svid.id().clone();
            identity
                .publish(svid, bundle, SystemTime::now())
                .map(|()| id)
                .map_err(anyhow::Error::from)
        }) {
            Ok(id) => tracing::info!(%id, "reloaded the identity files; new handshakes use them"),
            Err(e) => tracing::warn!(
                error = format!("{e:#}"),
                "identity files changed but are not usable; keeping the current identity"
            ),
        }
    }
}

async fn admin_serve(
    listener: tokio::net::TcpListener,
    identity: IdentityHandle,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    shutdown: CancellationToken,
) {
    let tracker = TaskTracker::new();
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r { Ok((s, _)) => s, Err(_) => { tokio::time::sleep(Duration::from_millis(50)).await; continue; } },
        };
        let (identity, render, shutdown) = (identity.clone(), render.clone(), shutdown.clone());
        tracker.spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (identity, render, shutdown) =
                        (identity.clone(), render.clone(), shutdown.clone());
                    async move {
                        let (status, body) = match (req.method().as_str(), req.uri().path()) {
                            (_, "/live") => (StatusCode::OK, "ok\n".to_owned()),
                            (_, "/ready") if identity.current().is_some() => {
                                (StatusCode::OK, "ready\n".to_owned())
                            }
                            (_, "/ready") => (
                                StatusCode::SERVICE_UNAVAILABLE,
                                "no identity yet\n".to_owned(),
                            ),
                            (_, "/metrics") => (StatusCode::OK, render()),
                            ("POST", "/quitquitquit") => {
                                shutdown.cancel();
                                (StatusCode::OK, "shutting down\n".to_owned())
                            }
                            _ => (
                                StatusCode::NOT_FOUND,
                                "try /live, /ready, /metrics or POST /quitquitquit\n".to_owned(),
                            ),
                        };
                        let mut resp = Response::new(Full::new(Bytes::from(body)));
                        *resp.status_mut() = status;
                        Ok::<_, Infallible>(resp)
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
    tracker.close();
    tracker.wait().await;
}

/// Transparent mode: the mTLS counters plus the capture outcomes.
fn transparent_text(tm: &TransparentMetrics, identity: &IdentityHandle) -> String {
    let base = metrics_text(tm.tunnels(), identity, "transparent");
    let mut out = base.strip_suffix("# EOF\n").unwrap_or(&base).to_owned();
    for (name, value) in [
        ("outbound_mesh", tm.outbound_mesh()),
        ("outbound_denied", tm.outbound_denied()),
        ("outbound_no_original_dst", tm.outbound_no_original_dst()),
        ("outbound_passthrough", tm.outbound_passthrough.accepted()),
        ("inbound_tls", tm.inbound_tls()),
        ("inbound_plaintext", tm.inbound_plaintext.accepted()),
        ("inbound_no_original_dst", tm.inbound_no_original_dst()),
    ] {
        out.push_str(&format!(
            "kith_sidecar_captured_total{{outcome=\"{name}\"}} {value}\n"
        ));
    }
    out.push_str("# EOF\n");
    out
}

/// Prometheus text: connections and refusals by reason, bytes, and the SVID's time left.
fn metrics_text(metrics: &Metrics, identity: &IdentityHandle, mode: &str) -> String {
    let mut out = String::new();
    let dir = |name: &str, m: &DirectionMetrics, out: &mut String| {
        out.push_str(&format!(
            "kith_sidecar_connections_total{{direction=\"{name}\",result=\"accepted\"}} {}\n",
            m.accepted()
        ));
        for r in Reason::ALL {
            out.push_str(&format!(
                "kith_sidecar_connections_total{{direction=\"{name}\",result=\"{}\"}} {}\n",
                r.as_str(),
                m.refused(r)
            ));
        }
        out.push_str(&format!(
            "kith_sidecar_active_connections{{direction=\"{name}\"}} {}\n",
            m.active()
        ));
        out.push_str(&format!(
            "kith_sidecar_bytes_total{{direction=\"{name}\",from=\"tls\"}} {}\n",
            m.bytes_from_tls()
        ));
        out.push_str(&format!(
            "kith_sidecar_bytes_total{{direction=\"{name}\",to=\"tls\"}} {}\n",
            m.bytes_to_tls()
        ));
    };
    out.push_str("# TYPE kith_sidecar_connections counter\n");
    dir("inbound", &metrics.inbound, &mut out);
    dir("outbound", &metrics.outbound, &mut out);
    if let Some(c) = identity.current() {
        let left = match c.svid().not_after().duration_since(SystemTime::now()) {
            Ok(d) => d.as_secs() as i64,
            Err(e) => -(e.duration().as_secs() as i64),
        };
        out.push_str(&format!(
            "kith_sidecar_svid_seconds_to_expiry{{spiffe_id=\"{}\",mode=\"{mode}\"}} {left}\n",
            c.svid().id()
        ));
    }
    out.push_str("# EOF\n");
    out
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
