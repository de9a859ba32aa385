//! `kith sidecar run` as a library: [`Config`] is what the flags become once validated, and
//! [`run`] serves it until the shutdown token (SIGTERM in the binary) or `POST /quitquitquit`.
//!
//! - explicit mode: one tunnel per [`Tunnel`] (plaintext in and mTLS out, or the reverse);
//! - transparent mode: the captured outbound and inbound listeners behind `kith sidecar init`'s
//!   rules.
//!
//! Before the first SVID, connections wait up to the hold timeout; on shutdown the listeners
//! stop accepting and open connections may finish for the drain timeout.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use proxy::authz::Policy;
use proxy::metrics::Metrics;
use proxy::tls::{ExpectedPeer, IdentityHandle};
use proxy::transparent::{
    Captured, Cidr, ExpectRules, InboundMode, OutboundPolicy, TransparentMetrics,
};
use proxy::tunnel::{self, Limits};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{self, AdminRefusals, Counters};
use crate::app_probe::AppProbes;
use crate::source::{self, Source, SourceError, SourceMetrics};
use crate::tunnel_config::{End, Tunnel};
use crate::workers::{Workers, WorkersError};

/// The sidecar's validated configuration, logged once at start (it holds paths and rules,
/// never a key or a token).
#[derive(Debug)]
pub struct Config {
    /// Where the identity comes from.
    pub source: Source,
    /// Who may connect in: transparent inbound, and explicit server tunnels (each already
    /// carries its own copy).
    pub policy: Policy,
    pub mode: Mode,
    /// Connection limits and timeouts, hold and drain included.
    pub limits: Limits,
    /// TLS session resumption on both sides.
    pub tls_resumption: bool,
    /// Post-quantum hybrid key exchange on the mesh hop.
    pub pq: bool,
    /// The pooled HTTP/2 hop between kith sidecars.
    pub pool: bool,
    /// Threads that serve connections, each with its own listeners; see [`default_workers`].
    pub workers: usize,
    pub app_probes: AppProbes,
    /// `/live`, `/ready`, `/metrics`, `/app-health/...` and `POST /quitquitquit`.
    pub admin_listen: SocketAddr,
}

#[derive(Debug)]
pub enum Mode {
    /// Tunnels from flags or a config file (at least one).
    Explicit(Vec<Tunnel>),
    Transparent(Transparent),
}

/// Transparent mode: connections captured by `kith sidecar init`'s rules.
#[derive(Debug)]
pub struct Transparent {
    /// 127.0.0.1 also listens on [::1].
    pub outbound_listen: SocketAddr,
    /// 0.0.0.0 also listens on [::].
    pub inbound_listen: SocketAddr,
    /// Destinations that get mTLS.
    pub mesh: Vec<Cidr>,
    /// What happens to other destinations.
    pub outbound_policy: OutboundPolicy,
    pub inbound_mode: InboundMode,
    /// Which server ID each mesh destination must present.
    pub expect: ExpectRules,
}

/// Why the sidecar could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("--max-connections, --max-pending-per-source and the timeouts")]
    Limits(#[source] tunnel::Error),
    /// The identity source cannot be used (a file, the CA's address, the token, the socket).
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("cannot listen on {addr} (admin)")]
    Admin {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// `tunnel` is `--listen` or `tunnel NAME`.
    #[error("{tunnel}")]
    Tunnel {
        tunnel: String,
        #[source]
        source: WorkersError,
    },
    #[error("the IPv6 {what} listener")]
    Ipv6Listener {
        what: &'static str,
        #[source]
        source: WorkersError,
    },
    /// A listener that cannot be bound, or a worker that cannot start.
    #[error(transparent)]
    Workers(#[from] WorkersError),
}

/// Two threads, as Istio's sidecars run Envoy (`concurrency: 2`): a second thread keeps the
/// proxy from being the one queue every request waits in, and more than two rarely pays on a
/// node whose CPUs the pods share. One where the CPU quota or affinity allows only one.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(2))
}

/// Serves `config` until `shutdown` is cancelled or `POST /quitquitquit` arrives, then drains.
/// Every listener is bound before any is served, so a taken port fails here, at once. Call it
/// on a current-thread runtime: the workers beyond the first bring their own.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), RunError> {
    tracing::info!(?config, "kith sidecar configuration");
    let Config {
        source,
        policy,
        mode,
        limits,
        tls_resumption: resumption,
        pq,
        pool: pooling,
        workers,
        app_probes,
        admin_listen,
    } = config;
    limits.validate().map_err(RunError::Limits)?;
    if !resumption {
        tracing::info!("TLS session resumption off: every connection is a full handshake");
    }
    if !pq {
        // SECURITY: an explicit opt-in; traffic recorded today could be decrypted by a future
        // quantum computer that breaks X25519.
        tracing::warn!(
            "post-quantum key exchange off (--pq off): the mesh hop offers X25519 only, not X25519MLKEM768"
        );
    }
    if !pooling {
        tracing::info!("pooled hop off: one mTLS connection per application connection");
    }
    let app_probes = Arc::new(app_probes);
    let identity = IdentityHandle::new()
        .with_resumption(resumption)
        .with_pq(pq)
        .with_pooling(pooling);
    let source_metrics = Arc::new(SourceMetrics::default());
    source::prepare(&source, &identity, &source_metrics)?;
    let admin = tokio::net::TcpListener::bind(admin_listen)
        .await
        .map_err(|e| RunError::Admin {
            addr: admin_listen,
            source: e,
        })?;
    // Cancelled by `shutdown` or by POST /quitquitquit: stops the listeners, starts the drain.
    let stop = shutdown.child_token();
    let tasks = TaskTracker::new();
    if policy.has_rules() {
        tracing::info!(?policy, "inbound authorization rules loaded");
    }

    // Every listener is bound before any is served, so a taken port fails the start.
    let mut pool = Workers::new(workers);
    let counters = match mode {
        Mode::Transparent(t) => Counters::Transparent(transparent(
            &t,
            admin_listen,
            &identity,
            policy,
            limits,
            &mut pool,
            &stop,
        )?),
        Mode::Explicit(tunnels) => {
            Counters::Explicit(explicit(tunnels, &identity, limits, &mut pool, &stop)?)
        }
    };
    pool.start(&tasks)?;
    tracing::info!(identity = %source.describe(), hold = ?limits.identity_hold, tls_resumption = on_off(resumption), pq = on_off(pq), pool = on_off(pooling), workers, "kith sidecar running");
    tasks.spawn(source::run(
        source,
        identity.clone(),
        source_metrics.clone(),
        stop.clone(),
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
        stop.clone(),
        admin_shutdown.clone(),
    ));
    tasks.close();
    stop.cancelled().await;
    tracing::info!(drain = ?limits.drain_timeout, "shutting down: no new connections; open ones may finish");
    // The listeners drain and cut by themselves; this is only a bound on a stuck task.
    if tokio::time::timeout(limits.drain_timeout + Duration::from_secs(2), tasks.wait())
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

fn on_off(on: bool) -> &'static str {
    if on { "on" } else { "off" }
}

/// Explicit mode: one listener per tunnel (per worker); the counters by tunnel label.
fn explicit(
    tunnels: Vec<Tunnel>,
    identity: &IdentityHandle,
    limits: Limits,
    pool: &mut Workers,
    shutdown: &CancellationToken,
) -> Result<Vec<(String, Arc<Metrics>)>, RunError> {
    let mut sets = Vec::new();
    for t in tunnels {
        let metrics = Arc::new(Metrics::default());
        let name = tunnel_name(&t);
        let in_tunnel = |source| RunError::Tunnel {
            tunnel: name,
            source,
        };
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
                .map_err(in_tunnel)?;
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
                .map_err(in_tunnel)?;
            }
        }
        sets.push((t.name, metrics));
    }
    Ok(sets)
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
    config: &Transparent,
    admin_listen: SocketAddr,
    identity: &IdentityHandle,
    policy: Policy,
    limits: Limits,
    pool: &mut Workers,
    shutdown: &CancellationToken,
) -> Result<Arc<TransparentMetrics>, RunError> {
    let mesh = config.mesh.clone();
    if mesh.is_empty() {
        tracing::warn!(
            "no --mesh-cidr: every outbound connection leaves as plain TCP (or is refused with --outbound-policy deny)"
        );
    }
    let outbound_policy = config.outbound_policy;
    let inbound_mode = config.inbound_mode;
    if inbound_mode == InboundMode::Permissive {
        tracing::warn!(
            "PERMISSIVE mode: plaintext inbound connections are accepted unauthenticated (for migration only)"
        );
    }
    let expect = config.expect.clone();
    log_unexpected_destinations(&mesh, &expect);
    let mesh_text: Vec<String> = mesh.iter().map(ToString::to_string).collect();
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
    pool.listen(config.outbound_listen, outbound.clone())?;
    // ip6tables redirects IPv6 connections to [::1] (outbound) and to the address they arrived
    // at (inbound): listen on the IPv6 twin of each address too.
    if let Some(v6) = ipv6_twin(config.outbound_listen) {
        listen_ipv6(pool, v6, "outbound", outbound)?;
    }
    // SECURITY: the sidecar's own ports are never forwarded, whatever --admin-listen says.
    let own_ports = [
        admin_listen.port(),
        config.inbound_listen.port(),
        config.outbound_listen.port(),
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
    pool.listen(config.inbound_listen, inbound.clone())?;
    if let Some(v6) = ipv6_twin(config.inbound_listen) {
        listen_ipv6(pool, v6, "inbound", inbound)?;
    }
    let outbound_policy = match outbound_policy {
        OutboundPolicy::Passthrough => "passthrough",
        OutboundPolicy::Deny => "deny",
    };
    let mode = match inbound_mode {
        InboundMode::Strict => "strict",
        InboundMode::Permissive => "permissive",
    };
    tracing::info!(outbound = %config.outbound_listen, inbound = %config.inbound_listen, mesh = ?mesh_text,
        outbound_policy, mode, "transparent mode");
    Ok(tm)
}

/// Transparent mode: says at start which mesh destinations have no expected server ID, so
/// that accepting any ID of the trust domain there is a visible choice.
fn log_unexpected_destinations(mesh: &[Cidr], expect: &ExpectRules) {
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
        let covered = expect
            .rules
            .iter()
            .any(|r| r.port.is_none() && r.cidr.contains(cidr));
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
fn listen_ipv6<F, Fut>(
    pool: &mut Workers,
    addr: SocketAddr,
    what: &'static str,
    serve: F,
) -> Result<(), RunError>
where
    F: FnOnce(tokio::net::TcpListener) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Err(e) = pool.listen_v6_only(addr, serve) else {
        return Ok(());
    };
    let no_ipv6 = matches!(
        e.listen_errno(),
        Some(code) if code == nix::errno::Errno::EADDRNOTAVAIL as i32
            || code == nix::errno::Errno::EAFNOSUPPORT as i32
    );
    if no_ipv6 {
        tracing::info!(%addr, error = %identity::report::Chain(&e), "no IPv6 here: no IPv6 {what} listener");
        return Ok(());
    }
    Err(RunError::Ipv6Listener { what, source: e })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_twins() {
        let twin = |s: &str| ipv6_twin(s.parse().expect("addr")).map(|a| a.to_string());
        assert_eq!(twin("127.0.0.1:15001").as_deref(), Some("[::1]:15001"));
        assert_eq!(twin("0.0.0.0:15006").as_deref(), Some("[::]:15006"));
        assert_eq!(twin("10.0.0.1:15006"), None);
        assert_eq!(twin("[::1]:15001"), None);
    }
}
