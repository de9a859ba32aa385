//! `kith sidecar run`'s admin listener (`--admin-listen`): `/live`, `/ready` (an SVID held
//! and not draining), `/metrics`, the app's rewritten kubelet probes (`/app-health/...`, see
//! [`crate::app_probe`]) and `POST /quitquitquit`, which only a local process that is not a
//! connection the proxy forwarded may send.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};
use listen::HttpLimits;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use proxy::metrics::{Metrics, Tunnels, counter, gauge};
use proxy::tls::IdentityHandle;
use proxy::transparent::TransparentMetrics;
use tokio_util::sync::CancellationToken;

use crate::app_probe::AppProbes;
use crate::source::SourceMetrics;

/// The proxy's connection counters: one set per explicit tunnel (with its name, empty for an
/// unnamed tunnel: no `tunnel` label), or the transparent mode's.
pub enum Counters {
    Explicit(Vec<(String, Arc<Metrics>)>),
    Transparent(Arc<TransparentMetrics>),
}

/// The admin endpoints, through the one accept loop (at most 64 connections, headers within
/// 10 s, idle connections closed after 60 s). `shutdown` is what POST /quitquitquit triggers;
/// the server itself stops on `stop`, after the drain, so /metrics stays readable while
/// connections drain.
pub async fn serve(
    listener: tokio::net::TcpListener,
    identity: IdentityHandle,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    refused: Arc<AdminRefusals>,
    probes: Arc<AppProbes>,
    shutdown: CancellationToken,
    stop: CancellationToken,
) {
    let make = |peer: SocketAddr, at: Option<SocketAddr>| {
        let state = Arc::new(Admin {
            identity: identity.clone(),
            render: render.clone(),
            refused: refused.clone(),
            probes: probes.clone(),
            shutdown: shutdown.clone(),
            peer,
            at,
        });
        hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(state.route(req).await) }
        })
    };
    listen::serve_http1(listener, "admin", HttpLimits::ADMIN, |_| (), stop, make).await
}

/// What one admin connection's requests are answered from.
struct Admin {
    identity: IdentityHandle,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    refused: Arc<AdminRefusals>,
    probes: Arc<AppProbes>,
    shutdown: CancellationToken,
    peer: SocketAddr,
    at: Option<SocketAddr>,
}

impl Admin {
    async fn route(&self, req: hyper::Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        let metrics = req.uri().path() == "/metrics";
        if let Some(name) = req.uri().path().strip_prefix("/app-health/") {
            let (status, body) = self.probes.check(name).await;
            let mut resp = Response::new(Full::new(Bytes::from(body)));
            *resp.status_mut() = status;
            return resp;
        }
        let (status, body) = match (req.method().as_str(), req.uri().path()) {
            (_, "/live") => (StatusCode::OK, "ok\n".to_owned()),
            (_, "/ready") if self.shutdown.is_cancelled() => {
                (StatusCode::SERVICE_UNAVAILABLE, "draining\n".to_owned())
            }
            (_, "/ready") if self.identity.current().is_some() => {
                (StatusCode::OK, "ready\n".to_owned())
            }
            (_, "/ready") => (
                StatusCode::SERVICE_UNAVAILABLE,
                "no identity yet\n".to_owned(),
            ),
            (_, "/metrics") => (StatusCode::OK, (self.render)()),
            ("POST", "/quitquitquit") => match quit_refusal(self.peer, self.at) {
                None => {
                    self.shutdown.cancel();
                    (StatusCode::OK, "shutting down\n".to_owned())
                }
                Some(reason) => {
                    tracing::info!(peer = %self.peer, reason = reason.label(), "POST /quitquitquit refused");
                    self.refused.count(reason);
                    (StatusCode::FORBIDDEN, reason.message().to_owned())
                }
            },
            _ => (
                StatusCode::NOT_FOUND,
                "try /live, /ready, /metrics or POST /quitquitquit\n".to_owned(),
            ),
        };
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = status;
        if metrics {
            resp.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(METRICS_CONTENT_TYPE),
            );
        }
        resp
    }
}

/// Why a `POST /quitquitquit` was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuitRefusal {
    /// The caller is not on loopback.
    NotLocal,
    /// The caller is one of the proxy's own sockets: a connection it forwarded for a peer.
    Proxied,
}

impl QuitRefusal {
    fn label(self) -> &'static str {
        match self {
            QuitRefusal::NotLocal => "not_local",
            QuitRefusal::Proxied => "proxied",
        }
    }

    fn message(self) -> &'static str {
        match self {
            QuitRefusal::NotLocal => "only local processes may stop the sidecar\n",
            QuitRefusal::Proxied => {
                "a connection forwarded by the proxy may not stop the sidecar\n"
            }
        }
    }
}

/// SECURITY: the admin port may listen beyond loopback (kubelet probes); only local processes
/// may stop the sidecar, and never through the proxy itself (a peer's connection forwarded to
/// a loopback address is local in appearance only).
fn quit_refusal(peer: SocketAddr, at: Option<SocketAddr>) -> Option<QuitRefusal> {
    if !peer.ip().to_canonical().is_loopback() {
        return Some(QuitRefusal::NotLocal);
    }
    // Unknown local address: cannot tell, so refuse.
    let Some(at) = at else {
        return Some(QuitRefusal::Proxied);
    };
    crate::own_socket::is_own(peer, at).then_some(QuitRefusal::Proxied)
}

/// Refused `POST /quitquitquit`s, by reason.
#[derive(Debug, Default)]
pub struct AdminRefusals {
    not_local: AtomicU64,
    proxied: AtomicU64,
}

impl AdminRefusals {
    pub fn count(&self, reason: QuitRefusal) {
        let c = match reason {
            QuitRefusal::NotLocal => &self.not_local,
            QuitRefusal::Proxied => &self.proxied,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Refusals counted with `reason`.
    pub fn get(&self, reason: QuitRefusal) -> u64 {
        match reason {
            QuitRefusal::NotLocal => &self.not_local,
            QuitRefusal::Proxied => &self.proxied,
        }
        .load(Ordering::Relaxed)
    }
}

/// The sidecar process's one registry: the proxy's connection counters, then the SVID's time
/// left, the identity source's counters and the refused `POST /quitquitquit`s. Everything is
/// read from atomics at scrape time.
pub fn registry(
    counters: Counters,
    identity: &IdentityHandle,
    source: &Arc<SourceMetrics>,
    refused: &Arc<AdminRefusals>,
) -> Registry {
    let mut registry = Registry::default();
    match counters {
        Counters::Explicit(sets) => registry.register_collector(Box::new(Tunnels(sets))),
        Counters::Transparent(tm) => registry.register_collector(Box::new(tm)),
    }
    registry.register_collector(Box::new(SidecarMetrics {
        identity: identity.clone(),
        source: source.clone(),
        refused: refused.clone(),
    }));
    registry
}

/// The OpenMetrics text of `registry` (ends in `# EOF`), served as [`METRICS_CONTENT_TYPE`].
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        tracing::warn!(error = %e, "cannot encode the metrics");
        out.clear();
    }
    out
}

/// The content type of `/metrics`.
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The sidecar's own families, after the proxy's.
struct SidecarMetrics {
    identity: IdentityHandle,
    source: Arc<SourceMetrics>,
    refused: Arc<AdminRefusals>,
}

impl std::fmt::Debug for SidecarMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SidecarMetrics")
            .field("source", &self.source)
            .field("refused", &self.refused)
            .finish_non_exhaustive()
    }
}

impl Collector for SidecarMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let mut f = encoder.encode_descriptor(
            "kith_sidecar_svid_seconds_to_expiry",
            "Seconds until the current SVID expires (negative: expired)",
            None,
            MetricType::Gauge,
        )?;
        if let Some(c) = self.identity.current() {
            let left = match c.svid().not_after().duration_since(SystemTime::now()) {
                Ok(d) => d.as_secs() as i64,
                Err(e) => -(e.duration().as_secs() as i64),
            };
            let id = c.svid().id().to_string();
            gauge(&mut f, &[("spiffe_id", id.as_str())], left)?;
        }
        let mut f = encoder.encode_descriptor(
            "kith_sidecar_identity_updates",
            "SVIDs and bundles published (ok), and failed attempts to get one (failed)",
            None,
            MetricType::Counter,
        )?;
        counter(&mut f, &[("result", "ok")], self.source.updates())?;
        counter(&mut f, &[("result", "failed")], self.source.failures())?;
        let mut f = encoder.encode_descriptor(
            "kith_sidecar_admin_refused",
            "POST /quitquitquit requests refused, by reason",
            None,
            MetricType::Counter,
        )?;
        for reason in [QuitRefusal::NotLocal, QuitRefusal::Proxied] {
            let n = self.refused.get(reason);
            counter(&mut f, &[("reason", reason.label())], n)?;
        }
        Ok(())
    }
}
