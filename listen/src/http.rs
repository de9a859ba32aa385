//! Plain HTTP/1.1 listeners (metrics, health, admin endpoints): small, often reachable from a
//! whole cluster, and so bounded like the API itself.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::accept::{Acceptor, Caps, Conn, Next, Refusal};
use crate::limits::{Activity, LogLimit, Watched};

/// The bounds of one listener.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Connections served at once; past it a new connection is closed at once.
    pub max_connections: usize,
    /// Connections one source address may hold, so that no client takes every slot.
    pub max_per_source: usize,
    /// How long a client may take to send a request's headers (also bounds the wait for the
    /// next request on a kept-alive connection).
    pub header_timeout: Duration,
    /// A connection on which no byte moves either way for this long is closed.
    pub idle_timeout: Duration,
}

impl HttpLimits {
    /// For metrics, health and admin endpoints: scrapers and probes need a handful, and they
    /// mostly come from one address (the kubelet, a local scraper), so no per-source share.
    pub const ADMIN: Self = Self {
        max_connections: 64,
        max_per_source: 64,
        header_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(60),
    };
}

/// Serves `listener` until `shutdown`: every connection is bounded by `limits`, and each one
/// gets the service `make(peer, local)` builds. Open connections are closed on `shutdown`.
/// `refused` is called for every connection the limits closed (`name` goes in the logs).
pub async fn serve_http1<F, S, R>(
    listener: TcpListener,
    name: &'static str,
    limits: HttpLimits,
    refused: R,
    shutdown: CancellationToken,
    make: F,
) where
    F: Fn(SocketAddr, Option<SocketAddr>) -> S,
    S: hyper::service::Service<
            Request<Incoming>,
            Response = Response<Full<Bytes>>,
            Error = Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
    R: Fn(Refusal) + Send + Sync + 'static,
{
    let refused = Arc::new(refused);
    let tracker = TaskTracker::new();
    let caps = Caps {
        max_connections: limits.max_connections,
        max_per_source: limits.max_per_source,
    };
    let mut acceptor = Acceptor::new(listener, name, caps);
    while let Some(next) = acceptor.next(&shutdown).await {
        let Conn {
            io: stream,
            peer,
            held,
        } = match next {
            Next::Admitted(conn) => conn,
            Next::Refused(_, why) => {
                refused(why);
                continue;
            }
        };
        let local = stream.local_addr().ok();
        let svc = make(peer, local);
        let (refused, shutdown) = (refused.clone(), shutdown.clone());
        tracker.spawn(async move {
            let _held = held;
            let activity = Activity::new();
            let stream = Watched::new(stream, activity.clone());
            let served = Arc::new(AtomicBool::new(false));
            let svc = Counted {
                inner: svc,
                served: served.clone(),
            };
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                r = conn => {
                    // A timeout after a served request is a kept-alive client that went quiet.
                    if let Err(e) = r
                        && e.is_timeout()
                        && !served.load(Ordering::Relaxed)
                    {
                        refused(Refusal::HeaderTimeout);
                        HEADER_LOG.warn("closed a connection whose request headers did not arrive in time");
                    }
                }
                _ = activity.idle(limits.idle_timeout) => {
                    refused(Refusal::IdleTimeout);
                    IDLE_LOG.warn("closed a connection on which nothing moved for the idle timeout");
                }
                _ = shutdown.cancelled() => {}
            }
        });
    }
    tracker.close();
    tracker.wait().await;
}

/// Slow and silent clients are logged at most once a second per kind.
static HEADER_LOG: LogLimit = LogLimit::new();
static IDLE_LOG: LogLimit = LogLimit::new();

/// Marks that a request arrived, so a later header timeout is told apart from a slow client.
struct Counted<S> {
    inner: S,
    served: Arc<AtomicBool>,
}

impl<S> hyper::service::Service<Request<Incoming>> for Counted<S>
where
    S: hyper::service::Service<Request<Incoming>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        self.served.store(true, Ordering::Relaxed);
        self.inner.call(req)
    }
}
