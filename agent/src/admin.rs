//! The agent's admin listener (`--admin-listen`, default 127.0.0.1:15021): `/live` (the process
//! answers), `/ready` (a current node SVID and the first round published) and `/metrics`.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};
use listen::HttpLimits;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::agent::Agent;
use crate::workload_api::WorkloadApiMetrics;

/// At most this many admin connections at once; more are closed at accept.
pub const MAX_CONNECTIONS: usize = HttpLimits::ADMIN.max_connections;

/// Serves the admin endpoints until `shutdown`, through the one accept loop (at most
/// [`MAX_CONNECTIONS`], headers within 10 s, idle connections closed after 60 s), so a local
/// flood cannot take the agent's descriptors. The Workload API's metrics are added to the
/// agent's registry here, once: `/metrics` is that one registry, encoded.
pub async fn serve(
    agent: Arc<Agent>,
    api: Arc<WorkloadApiMetrics>,
    listener: TcpListener,
    shutdown: CancellationToken,
) {
    agent.metrics.register(|r| api.register(r));
    let make = |_, _| {
        let agent = agent.clone();
        hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let agent = agent.clone();
            async move { Ok::<_, Infallible>(route(&agent, req.uri().path())) }
        })
    };
    listen::serve_http1(listener, "admin", HttpLimits::ADMIN, |_| (), shutdown, make).await
}

fn route(agent: &Agent, path: &str) -> Response<Full<Bytes>> {
    let (status, body, ctype) = match path {
        "/live" => (StatusCode::OK, "ok\n".to_owned(), "text/plain"),
        "/ready" if agent.is_ready() => (StatusCode::OK, "ready\n".to_owned(), "text/plain"),
        "/ready" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no current node SVID yet\n".to_owned(),
            "text/plain",
        ),
        "/metrics" => (
            StatusCode::OK,
            agent.metrics.encode(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "try /live, /ready or /metrics\n".to_owned(),
            "text/plain",
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(ctype),
    );
    resp
}
