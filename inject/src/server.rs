//! `kith inject serve`: the mutating admission webhook over HTTPS (HTTP/2 or HTTP/1.1).
//!
//! - `POST /mutate`: an AdmissionReview in, an AdmissionReview out ([`crate::review`]);
//! - `GET /healthz`: 200 while serving;
//! - `GET /metrics`: OpenMetrics text ([`crate::metrics`]).
//!
//! Bodies over [`MAX_REVIEW_BYTES`] get 413 without being read, slow ones 408, and connections
//! past the limit are closed at once; the API server then applies the webhook's failurePolicy.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::Metrics;
use crate::review::{self, MAX_REVIEW_BYTES};
use crate::settings::Settings;

/// What the webhook injects, and its counters.
pub struct Webhook {
    pub settings: Settings,
    pub metrics: Metrics,
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    /// For the request head and then for the body.
    pub request_timeout: Duration,
    /// After shutdown: how long open requests may finish.
    pub drain_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 512,
            handshake_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// Serves on `listener` until `shutdown`, then lets open requests finish for the drain timeout.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    webhook: Arc<Webhook>,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let acceptor = TlsAcceptor::from(tls);
    // The webhook's one caller is the kube-apiserver, often from one address: no per-source
    // share below the total.
    let caps = listen::Caps {
        max_connections: limits.max_connections,
        max_per_source: limits.max_connections,
    };
    let mut incoming = listen::Acceptor::new(listener, "injector", caps);
    let tracker = TaskTracker::new();
    while let Some(next) = incoming.next(&shutdown).await {
        let conn = match next {
            listen::Next::Admitted(conn) => conn,
            listen::Next::Refused(_, why) => {
                webhook.metrics.count(why.label());
                continue;
            }
        };
        let (acceptor, webhook, limits) = (acceptor.clone(), webhook.clone(), limits.clone());
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let _held = conn.held;
            serve_connection(conn.io, acceptor, webhook, limits, shutdown).await;
        });
    }
    tracker.close();
    if tokio::time::timeout(limits.drain_timeout, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("requests still open after the drain timeout; closing them");
    }
}

async fn serve_connection(
    tcp: tokio::net::TcpStream,
    acceptor: TlsAcceptor,
    webhook: Arc<Webhook>,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let _ = tcp.set_nodelay(true);
    let stream = match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "tls handshake failed");
            webhook.metrics.count("tls_handshake");
            return;
        }
        Err(_) => {
            webhook.metrics.count("handshake_timeout");
            return;
        }
    };
    let timeout = limits.request_timeout;
    let svc = hyper::service::service_fn(move |req| {
        let webhook = webhook.clone();
        async move { Ok::<_, Infallible>(handle(&webhook, req, timeout).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.request_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(64);
    let conn = builder.serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

async fn handle(
    webhook: &Webhook,
    req: Request<Incoming>,
    timeout: Duration,
) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok"),
        (&Method::GET, "/metrics") => {
            let mut resp = Response::new(Full::new(Bytes::from(webhook.metrics.encode())));
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            resp
        }
        (&Method::POST, "/mutate") => {
            let started = Instant::now();
            let resp = mutate(webhook, req, timeout).await;
            webhook.metrics.observe(started.elapsed().as_secs_f64());
            resp
        }
        (_, "/mutate") => {
            webhook.metrics.count("bad_method");
            text(
                StatusCode::METHOD_NOT_ALLOWED,
                "POST an AdmissionReview to /mutate",
            )
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "try POST /mutate, GET /healthz or GET /metrics",
        ),
    }
}

async fn mutate(
    webhook: &Webhook,
    req: Request<Incoming>,
    timeout: Duration,
) -> Response<Full<Bytes>> {
    let body = match read_body(req, timeout).await {
        Ok(b) => b,
        Err((status, result, message)) => {
            webhook.metrics.count(result);
            tracing::warn!(result, "{message}");
            return text(status, &message);
        }
    };
    match review::review(&body, &webhook.settings) {
        Ok(reviewed) => {
            webhook.metrics.count(reviewed.result);
            tracing::info!(
                object = %reviewed.object,
                result = reviewed.result,
                detail = %reviewed.detail,
                "reviewed"
            );
            let json = serde_json::to_vec(&reviewed.body).unwrap_or_default();
            let mut resp = Response::new(Full::new(Bytes::from(json)));
            resp.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            resp
        }
        Err(e) => {
            webhook.metrics.count("malformed");
            tracing::warn!(error = %e, "refused a request to /mutate");
            text(StatusCode::BAD_REQUEST, &e.to_string())
        }
    }
}

type Refusal = (StatusCode, &'static str, String);

/// The request body, at most [`MAX_REVIEW_BYTES`], within `timeout`.
async fn read_body(req: Request<Incoming>, timeout: Duration) -> Result<Bytes, Refusal> {
    let too_large = || {
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!(
                "the AdmissionReview is larger than {MAX_REVIEW_BYTES} bytes; kith does not read it"
            ),
        )
    };
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_REVIEW_BYTES as u64) {
        return Err(too_large());
    }
    let limited = Limited::new(req.into_body(), MAX_REVIEW_BYTES);
    match tokio::time::timeout(timeout, limited.collect()).await {
        Err(_) => Err((
            StatusCode::REQUEST_TIMEOUT,
            "timeout",
            format!("the request body did not arrive within {timeout:?}"),
        )),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(e)) => Err((
            StatusCode::BAD_REQUEST,
            "bad_body",
            format!("cannot read the request body: {e}"),
        )),
    }
}

fn text(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(format!("{message}\n"))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
