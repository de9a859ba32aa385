//! `kith sidecar run` in explicit mode (ghostunnel-style), with its identity from files that
//! are reloaded when they change:
//!
//! - client side: `--listen 127.0.0.1:9000 --connect 10.0.0.2:8443 --expect-id spiffe://…`
//!   (plaintext in, mTLS out);
//! - server side: `--listen 0.0.0.0:8443 --forward 127.0.0.1:8080 --allow spiffe://…`
//!   (mTLS in, plaintext out).
//!
//! Transparent mode (capture) and identity from the CA or the Workload API come with the
//! sidecar issue's next steps.

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
    /// Where to accept connections
    #[arg(long, env = "KITH_SIDECAR_LISTEN")]
    listen: SocketAddr,
    /// Client side: the mTLS server to connect to
    #[arg(
        long,
        env = "KITH_SIDECAR_CONNECT",
        conflicts_with = "forward",
        required_unless_present = "forward"
    )]
    connect: Option<SocketAddr>,
    /// Client side: the SPIFFE ID the server must present [default: any ID of the own trust domain]
    #[arg(long, env = "KITH_SIDECAR_EXPECT_ID", requires = "connect")]
    expect_id: Option<String>,
    /// Server side: the plaintext backend to forward to
    #[arg(long, env = "KITH_SIDECAR_FORWARD")]
    forward: Option<SocketAddr>,
    /// Server side: a SPIFFE ID or `spiffe://td/prefix/*` allowed to connect (repeatable)
    /// [default: any ID of the own trust domain]
    #[arg(
        long = "allow",
        env = "KITH_SIDECAR_ALLOW",
        value_delimiter = ',',
        requires = "forward"
    )]
    allow: Vec<String>,
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
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
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

    let mode = match (args.connect, args.forward) {
        (Some(connect), None) => {
            let expect = match &args.expect_id {
                Some(s) => ExpectedPeer::Id(
                    SpiffeId::new(s).with_context(|| format!("--expect-id {s:?}"))?,
                ),
                None => ExpectedPeer::TrustDomain,
            };
            tracing::info!(%id, listen = %args.listen, %connect, expect = ?args.expect_id, "kith sidecar: client side (plaintext in, mTLS out)");
            tasks.spawn(tunnel::serve_outbound(
                listener,
                identity.clone(),
                connect,
                expect,
                limits,
                metrics.clone(),
                shutdown.clone(),
            ));
            "outbound"
        }
        (None, Some(forward)) => {
            let mut policy = Policy::new(own_td);
            for rule in &args.allow {
                policy = policy
                    .allow(rule)
                    .with_context(|| format!("--allow {rule:?}"))?;
            }
            tracing::info!(%id, listen = %args.listen, %forward, allow = ?args.allow, "kith sidecar: server side (mTLS in, plaintext out)");
            tasks.spawn(tunnel::serve_inbound(
                listener,
                identity.clone(),
                policy,
                forward,
                limits,
                metrics.clone(),
                shutdown.clone(),
            ));
            "inbound"
        }
        _ => bail!("give either --connect (client side) or --forward (server side)"),
    };
    tasks.spawn(reload(files, identity.clone(), shutdown.clone()));
    tasks.spawn(admin_serve(
        admin,
        identity.clone(),
        metrics.clone(),
        mode,
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
    metrics: Arc<Metrics>,
    mode: &'static str,
    shutdown: CancellationToken,
) {
    let tracker = TaskTracker::new();
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r { Ok((s, _)) => s, Err(_) => { tokio::time::sleep(Duration::from_millis(50)).await; continue; } },
        };
        let (identity, metrics, shutdown) = (identity.clone(), metrics.clone(), shutdown.clone());
        tracker.spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (identity, metrics, shutdown) =
                        (identity.clone(), metrics.clone(), shutdown.clone());
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
                            (_, "/metrics") => {
                                (StatusCode::OK, metrics_text(&metrics, &identity, mode))
                            }
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
