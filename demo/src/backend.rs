//! The api workload's app: a tiny HTTP server on loopback that answers every request with
//! `{"from":"api","n":<count>}`. It speaks plaintext; the api sidecar in front of it does the
//! mTLS.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Serves until `stop`, then lets open connections finish their current request.
pub async fn serve(listener: TcpListener, stop: CancellationToken) {
    let count = Arc::new(AtomicU64::new(0));
    let tracker = TaskTracker::new();
    // Only its sidecar connects, from loopback: the caps are a fence against a runaway
    // client, not a share between clients.
    let caps = listen::Caps {
        max_connections: 4096,
        max_per_source: 4096,
    };
    let mut acceptor = listen::Acceptor::new(listener, "demo api app", caps);
    while let Some(next) = acceptor.next(&stop).await {
        let listen::Next::Admitted(conn) = next else {
            continue;
        };
        let (stream, held) = (conn.io, conn.held);
        let (count, stop) = (count.clone(), stop.clone());
        tracker.spawn(async move {
            let _held = held;
            let svc = hyper::service::service_fn(move |_req: Request<hyper::body::Incoming>| {
                let n = count.fetch_add(1, Ordering::Relaxed) + 1;
                async move { Ok::<_, Infallible>(answer(n)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                () = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(2), conn).await;
                }
            }
        });
    }
    tracker.close();
    tracker.wait().await;
}

fn answer(n: u64) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(format!(
        "{{\"from\":\"api\",\"n\":{n}}}\n"
    ))));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}
