//! The agent's admin listener (`--admin-listen`, default 127.0.0.1:15021): `/live` (the process
//! answers), `/ready` (a current node SVID and the first round published) and `/metrics`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::agent::Agent;
use crate::workload_api::WorkloadApiMetrics;

/// At most this many admin connections at once; more are closed at accept. A scraper and a
/// probe need a handful; the cap keeps a local flood from taking the agent's descriptors.
pub const MAX_CONNECTIONS: usize = 64;
/// A request's headers must arrive within this, and a connection lives at most
/// [`MAX_CONNECTION_LIFE`]: a silent or slow client cannot hold a slot.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_CONNECTION_LIFE: Duration = Duration::from_secs(120);

/// Serves the admin endpoints until `shutdown`. The Workload API's refusal and connection
/// metrics are added to the agent's registry here, once.
pub async fn serve(
    agent: Arc<Agent>,
    api: Arc<WorkloadApiMetrics>,
    listener: TcpListener,
    shutdown: CancellationToken,
) {
    agent.metrics.register(|r| api.register(r));
    let tracker = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!("admin connection closed at accept: {MAX_CONNECTIONS} already open");
            drop(stream);
            continue;
        };
        let agent = agent.clone();
        let api = api.clone();
        tracker.spawn(async move {
            let _slot = slot;
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let agent = agent.clone();
                    let api = api.clone();
                    async move {
                        let (status, body, ctype) = match req.uri().path() {
                            "/live" => (StatusCode::OK, "ok\n".to_owned(), "text/plain"),
                            "/ready" if agent.is_ready() => {
                                (StatusCode::OK, "ready\n".to_owned(), "text/plain")
                            }
                            "/ready" => (
                                StatusCode::SERVICE_UNAVAILABLE,
                                "not ready: no current node SVID yet\n".to_owned(),
                                "text/plain",
                            ),
                            "/metrics" => (
                                StatusCode::OK,
                                metrics_text(&agent, &api),
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
                        Ok::<_, Infallible>(resp)
                    }
                });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(MAX_CONNECTION_LIFE, conn).await;
        });
    }
    tracker.close();
    tracker.wait().await;
}

/// The agent's registry, with the Workload API's call counters added before the end marker.
fn metrics_text(agent: &Agent, api: &WorkloadApiMetrics) -> String {
    let text = agent.metrics.encode();
    let body = text.strip_suffix("# EOF\n").unwrap_or(&text);
    let mut out = String::from(body);
    out.push_str(
        "# HELP kith_agent_workload_api_calls Workload API calls, by method and gRPC status.\n",
    );
    out.push_str("# TYPE kith_agent_workload_api_calls counter\n");
    for c in api.calls() {
        out.push_str(&format!(
            "kith_agent_workload_api_calls_total{{method=\"{}\",code=\"{}\"}} {}\n",
            c.method, c.code, c.count
        ));
    }
    out.push_str("# TYPE kith_agent_workload_api_open_streams gauge\n");
    out.push_str(&format!(
        "kith_agent_workload_api_open_streams {}\n",
        api.open_streams()
    ));
    out.push_str("# EOF\n");
    out
}
