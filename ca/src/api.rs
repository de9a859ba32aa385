//! The HTTPS API (hyper 1 + tokio-rustls, TLS 1.3). Every response body is JSON; every error
//! has the stable shape `{"code", "message"}`. Documented in `ca/API.md`.
//!
//! Why this is one file of over 500 lines: the HTTPS API's accept loop (TLS, per-core workers,
//! caps, deadlines) and its routes share the per-connection peer state that every route authorizes
//! against.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, ETAG, IF_NONE_MATCH, RETRY_AFTER};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::ServerConfig;
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use ca_api::wire::{AttestRequest, ErrorBody, JwtRequest, RenewRequest, SvidRequest};
use identity::SpiffeId;

use crate::service::{ApiError, Ca};
use crate::store::Store;
use crate::tls::Peer;
use listen::{Activity, LogLimit, Watched};

pub const MAX_BODY: usize = 64 * 1024;

#[derive(Clone, Debug)]
pub struct Limits {
    pub max_connections: usize,
    /// Connections one source address may hold, so that no client takes every slot.
    pub max_per_source: usize,
    pub handshake_timeout: Duration,
    /// How long a client may take to send a request's headers, and its body. It also bounds
    /// the wait for the next request on a kept-alive connection.
    pub request_timeout: Duration,
    /// A connection on which no byte moves either way for this long is closed.
    pub idle_timeout: Duration,
    /// Threads (each with its own runtime) that serve connections.
    pub workers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            max_per_source: 512,
            handshake_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            workers: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
        }
    }
}

type Body = Full<Bytes>;

/// Serves the API on `listener` until `shutdown` fires, then lets open requests finish.
pub async fn serve<S: Store>(
    ca: Arc<Ca<S>>,
    listener: TcpListener,
    tls: Arc<arc_swap::ArcSwap<ServerConfig>>,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let caps = listen::Caps {
        max_connections: limits.max_connections,
        max_per_source: limits.max_per_source,
    };
    let mut acceptor = listen::Acceptor::new(listener, "ca api", caps);
    // Connections past the limit get a short 429 answer from a small separate budget, so an
    // overloaded CA still says why; past that budget they are closed at once.
    let overflow = Arc::new(Semaphore::new(64));
    let tracker = TaskTracker::new();
    let (workers, handles) = match start_workers(limits.workers, &ca, &limits, &shutdown) {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the api worker threads");
            return;
        }
    };
    let mut next = 0usize;
    while let Some(accepted) = acceptor.next(&shutdown).await {
        let conn = match accepted {
            listen::Next::Admitted(conn) => conn,
            listen::Next::Refused(_, listen::Refusal::TooManyFromSource) => {
                ca.metrics.refused("too_many_connections_from_source");
                continue;
            }
            listen::Next::Refused(conn, _) => {
                ca.metrics.refused("too_many_connections");
                if let Ok(p) = overflow.clone().try_acquire_owned() {
                    let acceptor = TlsAcceptor::from(tls.load_full());
                    tracker.spawn(answer_overloaded(
                        conn,
                        p,
                        acceptor,
                        ca.clone(),
                        limits.clone(),
                    ));
                }
                continue;
            }
        };
        let _ = conn.io.set_nodelay(true);
        // Connections are dealt round-robin to the per-core workers.
        // Deregistered here and registered again in the worker's runtime, so its readiness
        // events are polled by the thread that serves it.
        let tcp = match conn.io.into_std() {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "cannot hand over a connection");
                continue;
            }
        };
        let job = Job {
            tcp,
            held: conn.held,
            tls: tls.load_full(),
        };
        let worker = &workers[next % workers.len()];
        next = next.wrapping_add(1);
        if let Err(e) = worker.send(job) {
            tracing::error!("api worker stopped; dropping a connection");
            drop(e);
        }
    }
    // Closing the channels lets each worker finish its open connections and stop.
    drop(workers);
    for handle in handles {
        let _ = tokio::task::spawn_blocking(move || handle.join()).await;
    }
    tracker.close();
    tracker.wait().await;
}

/// The channels to the workers and their threads.
type Workers = (
    Vec<tokio::sync::mpsc::UnboundedSender<Job>>,
    Vec<std::thread::JoinHandle<()>>,
);

/// A connection handed from the acceptor to a worker, with its connection-limit permit.
struct Job {
    tcp: std::net::TcpStream,
    held: listen::Held<std::net::IpAddr>,
    tls: Arc<ServerConfig>,
}

/// Past the connection limit, within the small budget `budget` is taken from: a 429 with
/// `Retry-After`, under the same handshake, header and idle deadlines as the rest.
async fn answer_overloaded<S: Store>(
    conn: listen::Conn<TcpListener>,
    budget: tokio::sync::OwnedSemaphorePermit,
    acceptor: TlsAcceptor,
    ca: Arc<Ca<S>>,
    limits: Limits,
) {
    let _held = (budget, conn.held);
    let activity = Activity::new();
    let tcp = Watched::new(conn.io, activity.clone());
    let Ok(Ok(stream)) = tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await
    else {
        return;
    };
    let svc = hyper::service::service_fn(|_req| async {
        let mut resp = error_response(&ApiError::new(
            429,
            "too_many_connections",
            "the CA is at its connection limit; retry shortly",
        ));
        resp.headers_mut()
            .insert(RETRY_AFTER, hyper::header::HeaderValue::from_static("1"));
        Ok::<_, Infallible>(resp)
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.request_timeout)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), svc);
    tokio::select! {
        r = conn => note_close(&ca, r, false),
        _ = activity.idle(limits.idle_timeout) => {
            IDLE_LOG.warn("closed an api connection on which nothing moved for the idle timeout");
            ca.metrics.refused("idle_timeout");
        }
    }
}

/// Starts `n` threads, each with its own single-threaded runtime serving the connections it is
/// dealt. On this kind of workload (short TLS requests, signing inline) one runtime per core
/// beat tokio's work-stealing runtime by about a quarter in the CA benchmark: no cross-thread
/// wake-ups per request.
fn start_workers<S: Store>(
    n: usize,
    ca: &Arc<Ca<S>>,
    limits: &Limits,
    shutdown: &CancellationToken,
) -> std::io::Result<Workers> {
    let mut senders = Vec::with_capacity(n);
    let mut handles = Vec::with_capacity(n);
    for i in 0..n.max(1) {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Job>();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let ca = ca.clone();
        let limits = limits.clone();
        let shutdown = shutdown.clone();
        let handle = std::thread::Builder::new()
            .name(format!("kith-ca-api-{i}"))
            .spawn(move || {
                rt.block_on(async move {
                    let tracker = TaskTracker::new();
                    while let Some(job) = rx.recv().await {
                        let Ok(tcp) = tokio::net::TcpStream::from_std(job.tcp) else {
                            continue;
                        };
                        let ca = ca.clone();
                        let limits = limits.clone();
                        let shutdown = shutdown.clone();
                        tracker.spawn(async move {
                            let _held = job.held;
                            ca.metrics.connections.inc();
                            serve_connection(
                                ca.clone(),
                                TlsAcceptor::from(job.tls),
                                tcp,
                                limits,
                                shutdown,
                            )
                            .await;
                            ca.metrics.connections.dec();
                        });
                    }
                    tracker.close();
                    tracker.wait().await;
                });
            })?;
        senders.push(tx);
        handles.push(handle);
    }
    Ok((senders, handles))
}

async fn serve_connection<S: Store>(
    ca: Arc<Ca<S>>,
    acceptor: TlsAcceptor,
    tcp: tokio::net::TcpStream,
    limits: Limits,
    shutdown: CancellationToken,
) {
    // The address refusals are rate-limited by in the audit log.
    let source = tcp.peer_addr().ok().map(|a| a.ip());
    let activity = Activity::new();
    let tcp = Watched::new(tcp, activity.clone());
    let stream = match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "tls handshake failed");
            ca.metrics.refused("tls_handshake");
            return;
        }
        Err(_) => {
            ca.metrics.refused("handshake_timeout");
            return;
        }
    };
    // The client certificate is judged once per connection; expiry is re-checked per request.
    let peer = {
        let (_, conn) = stream.get_ref();
        let chain = conn
            .peer_certificates()
            .map(|c| c.iter().map(|c| c.clone().into_owned()).collect::<Vec<_>>());
        Arc::new(Peer::from_chain(
            chain.as_deref(),
            &ca.authority.bundle(),
            SystemTime::now(),
        ))
    };
    let served = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let svc = {
        let ca = ca.clone();
        let served = served.clone();
        hyper::service::service_fn(move |req| {
            let ca = ca.clone();
            let peer = peer.clone();
            let timeout = limits.request_timeout;
            served.store(true, std::sync::atomic::Ordering::Relaxed);
            async move { Ok::<_, Infallible>(handle(ca, peer, source, req, timeout).await) }
        })
    };
    // HTTP/1.1 with keep-alive: what agents and the benchmark speak; hyper's header timeout
    // closes connections whose request never arrives.
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.request_timeout)
        .serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => note_close(&ca, r, served.load(std::sync::atomic::Ordering::Relaxed)),
        _ = activity.idle(limits.idle_timeout) => {
            IDLE_LOG.warn("closed an api connection on which nothing moved for the idle timeout");
            ca.metrics.refused("idle_timeout");
        }
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// Slow and silent clients are logged at most once a second per kind, with the count skipped.
static HEADER_LOG: LogLimit = LogLimit::new();
static IDLE_LOG: LogLimit = LogLimit::new();

/// Counts a connection that hyper closed because its first request's headers did not arrive in
/// time. The same deadline closes a kept-alive connection that waits too long for its next
/// request; that is ordinary and not counted.
fn note_close<S: Store>(ca: &Ca<S>, result: Result<(), hyper::Error>, served: bool) {
    if let Err(e) = result
        && e.is_timeout()
    {
        if served {
            tracing::debug!("closing a kept-alive connection that sent no further request");
        } else {
            HEADER_LOG
                .warn("closed an api connection whose request headers did not arrive in time");
            ca.metrics.refused("header_timeout");
        }
    }
}

/// Checks a request's `held_roots` before any work is done.
fn check_held(held: &Option<Vec<String>>) -> Result<(), ApiError> {
    if let Some(h) = held {
        crate::rollover::parse_held(h).map_err(|e| ApiError::new(400, "bad_held_roots", e))?;
    }
    Ok(())
}

/// Remembers what a caller holds, for the root rollover.
fn note_held<S: Store>(
    ca: &Ca<S>,
    caller: &str,
    held: &Option<Vec<String>>,
    expires_at: i64,
    now: SystemTime,
) {
    let expires = crate::authority::at(expires_at);
    if let Err(e) = ca
        .authority
        .note_held_roots(caller, held.as_deref(), expires, now)
    {
        tracing::warn!(caller, error = %e, "ignored a bad held_roots report");
    }
}

async fn handle<S: Store>(
    ca: Arc<Ca<S>>,
    peer: Arc<Peer>,
    source: Option<std::net::IpAddr>,
    req: Request<Incoming>,
    timeout: Duration,
) -> Response<Body> {
    let started = Instant::now();
    let now = SystemTime::now();
    let path = req.uri().path().to_owned();
    let endpoint = endpoint_name(req.method(), &path);
    let result = route(&ca, &peer, req, timeout, now, endpoint).await;
    let resp = match result {
        Ok(resp) => resp,
        Err(err) => {
            let (subject, authenticated) = match peer.as_ref() {
                Peer::Verified { id, .. } => (id.to_string(), true),
                _ => ("anonymous".to_owned(), false),
            };
            let err = ca
                .refuse(endpoint, &subject, source, authenticated, err, now)
                .await;
            error_response(&err)
        }
    };
    ca.metrics
        .observe(endpoint, started.elapsed().as_secs_f64());
    resp
}

fn endpoint_name(method: &Method, path: &str) -> &'static str {
    match (method.as_str(), path) {
        ("POST", "/v1/attest/join") => "attest_join",
        ("POST", "/v1/attest/k8s") => "attest_k8s",
        ("POST", "/v1/svid") => "svid",
        ("POST", "/v1/jwt") => "jwt",
        ("POST", "/v1/renew") => "renew",
        ("GET", "/v1/entries") => "entries",
        ("GET", "/v1/bundle") => "bundle",
        ("GET", "/healthz") | ("GET", "/readyz") => "health",
        _ => "other",
    }
}

async fn route<S: Store>(
    ca: &Ca<S>,
    peer: &Peer,
    req: Request<Incoming>,
    timeout: Duration,
    now: SystemTime,
    endpoint: &'static str,
) -> Result<Response<Body>, ApiError> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    match (method.as_str(), path.as_str()) {
        ("GET", "/v1/bundle") => {
            let pem = req
                .uri()
                .query()
                .is_some_and(|q| q.split('&').any(|kv| kv == "format=pem"));
            if pem {
                let mut resp =
                    Response::new(Full::new(Bytes::from(ca.authority.bundle().to_pem())));
                resp.headers_mut().insert(
                    CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("application/x-pem-file"),
                );
                Ok(resp)
            } else {
                Ok(json_response(StatusCode::OK, &ca.bundle_value()))
            }
        }
        ("GET", "/healthz") => Ok(json_response(
            StatusCode::OK,
            &serde_json::json!({"status": "ok"}),
        )),
        ("GET", "/readyz") => Ok(readyz_response(&ca.readiness(now).await)),
        ("POST", "/v1/attest/join") => {
            let body: AttestRequest = read_json(req, timeout).await?;
            let resp = ca
                .attest_join(&body.token, body.csr.as_bytes(), now)
                .await?;
            Ok(json_response(StatusCode::OK, &resp))
        }
        ("POST", "/v1/attest/k8s") => {
            let body: AttestRequest = read_json(req, timeout).await?;
            check_held(&body.held_roots)?;
            let resp = ca.attest_k8s(&body.token, body.csr.as_bytes(), now).await?;
            note_held(ca, &resp.spiffe_id, &body.held_roots, resp.expires_at, now);
            Ok(json_response(StatusCode::OK, &resp))
        }
        ("POST", "/v1/svid") => {
            let caller = caller(peer, now)?;
            let body: SvidRequest = read_json(req, timeout).await?;
            check_held(&body.held_roots)?;
            let id = parse_id(&body.spiffe_id)?;
            let resp = ca
                .issue_for_node(&caller, &id, body.csr.as_bytes(), now)
                .await?;
            // The agent asked: what it holds is what its workloads get. The report lives as
            // long as the node's own SVID would be renewed, so it counts per node.
            note_held(ca, caller.as_str(), &body.held_roots, resp.expires_at, now);
            Ok(json_response(StatusCode::OK, &resp))
        }
        ("POST", "/v1/jwt") => {
            let caller = caller(peer, now)?;
            let body: JwtRequest = read_json(req, timeout).await?;
            let id = parse_id(&body.spiffe_id)?;
            let resp = ca.jwt_for_node(&caller, &id, &body.audience, now).await?;
            Ok(json_response(StatusCode::OK, &resp))
        }
        ("POST", "/v1/renew") => {
            let caller = caller(peer, now)?;
            let body: RenewRequest = read_json(req, timeout).await?;
            check_held(&body.held_roots)?;
            let (serial, not_before) = match peer {
                Peer::Verified {
                    serial, not_before, ..
                } => (serial.as_slice(), *not_before),
                _ => (&[][..], SystemTime::UNIX_EPOCH),
            };
            let resp = ca
                .renew(&caller, serial, not_before, body.csr.as_bytes(), now)
                .await?;
            note_held(ca, caller.as_str(), &body.held_roots, resp.expires_at, now);
            Ok(json_response(StatusCode::OK, &resp))
        }
        ("GET", "/v1/entries") => {
            let caller = caller(peer, now)?;
            let list = ca.entries_for(&caller)?;
            let etag = hyper::header::HeaderValue::from_str(&list.etag)
                .map_err(|e| ApiError::new(500, "internal", e.to_string()))?;
            if req.headers().get(IF_NONE_MATCH) == Some(&etag) {
                let mut resp = Response::new(Full::new(Bytes::new()));
                *resp.status_mut() = StatusCode::NOT_MODIFIED;
                resp.headers_mut().insert(ETAG, etag);
                return Ok(resp);
            }
            let mut resp = json_response(StatusCode::OK, &list);
            resp.headers_mut().insert(ETAG, etag);
            Ok(resp)
        }
        _ if endpoint == "other" && is_known_path(&path) => Err(ApiError::new(
            405,
            "method_not_allowed",
            format!("{method} is not allowed on {path}"),
        )),
        _ => Err(ApiError::new(
            404,
            "not_found",
            format!("no endpoint {method} {path}; see ca/API.md"),
        )),
    }
}

fn is_known_path(path: &str) -> bool {
    matches!(
        path,
        "/v1/attest/join"
            | "/v1/attest/k8s"
            | "/v1/svid"
            | "/v1/jwt"
            | "/v1/renew"
            | "/v1/entries"
            | "/v1/bundle"
    )
}

/// The caller's verified SPIFFE ID, or why there is none.
fn caller(peer: &Peer, now: SystemTime) -> Result<SpiffeId, ApiError> {
    match peer {
        Peer::None => Err(ApiError::new(
            401,
            "client_certificate_required",
            "this endpoint needs mTLS with a current SVID",
        )),
        Peer::Refused(e) => Err(ApiError::new(
            401,
            client_cert_code(e),
            format!("client certificate refused: {e}"),
        )),
        Peer::Verified { not_after, .. } if *not_after < now => Err(ApiError::new(
            401,
            "client_cert_expired",
            "client certificate expired during this connection; reconnect with a fresh SVID",
        )),
        Peer::Verified { id, .. } => Ok(id.clone()),
    }
}

fn client_cert_code(e: &identity::VerifyError) -> &'static str {
    match e.reason() {
        "expired" => "client_cert_expired",
        "not_yet_valid" => "client_cert_not_yet_valid",
        "unknown_ca" => "client_cert_unknown_ca",
        "bad_signature" => "client_cert_bad_signature",
        "not_svid" => "client_cert_not_svid",
        "wrong_trust_domain" => "client_cert_wrong_trust_domain",
        _ => "client_cert_invalid",
    }
}

fn parse_id(s: &str) -> Result<SpiffeId, ApiError> {
    SpiffeId::new(s).map_err(|e| ApiError::new(400, "invalid_spiffe_id", format!("{s:?}: {e}")))
}

async fn read_json<T: DeserializeOwned>(
    req: Request<Incoming>,
    timeout: Duration,
) -> Result<T, ApiError> {
    let limited = Limited::new(req.into_body(), MAX_BODY);
    let collected = tokio::time::timeout(timeout, limited.collect())
        .await
        .map_err(|_| {
            ApiError::new(
                408,
                "request_timeout",
                "the request body did not arrive in time",
            )
        })?;
    let bytes = match collected {
        Ok(c) => c.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(ApiError::new(
                413,
                "body_too_large",
                format!("request body is larger than {} KiB", MAX_BODY / 1024),
            ));
        }
        Err(e) => {
            return Err(ApiError::new(
                400,
                "bad_request",
                format!("cannot read the request body: {e}"),
            ));
        }
    };
    serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::new(
            400,
            "malformed_json",
            format!("request body is not the expected JSON: {e}"),
        )
    })
}

/// `/readyz`: 200 when every check passes, else 503 naming the failing ones.
pub fn readyz_response(r: &crate::ready::Readiness) -> Response<Body> {
    let status = if r.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(status, r)
}

pub fn json_response(status: StatusCode, value: &impl serde::Serialize) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

pub fn error_response(err: &ApiError) -> Response<Body> {
    let status = StatusCode::from_u16(err.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(
        status,
        &ErrorBody {
            code: err.code.into(),
            message: err.message.clone(),
        },
    )
}
