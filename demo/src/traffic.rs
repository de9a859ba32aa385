//! The demo's clients, in this process: the web app sending HTTP requests through the web
//! sidecar (five a second; four of five on one long-lived keep-alive connection, which lives
//! through every rotation, and one on a new connection, which means a new mTLS handshake), and
//! every few seconds one request through the intruder's sidecar, which the api must refuse.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{CONNECTION, HOST, HeaderValue, USER_AGENT};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Time between two requests of the web client.
const EVERY: Duration = Duration::from_millis(200);
/// Every this many requests, one goes on a new connection.
const NEW_CONNECTION_EVERY: u64 = 5;
/// Time between two intruder attempts.
const INTRUDER_EVERY: Duration = Duration::from_secs(3);
/// A request that takes longer has failed.
const TIMEOUT: Duration = Duration::from_secs(5);

/// What one request came to.
#[derive(Debug)]
pub enum Outcome {
    /// A request of the web client: the HTTP status, or why there was none.
    Request {
        new_connection: bool,
        result: Result<u16, String>,
        latency: Duration,
    },
    /// An intruder attempt: `Ok(status)` means the api answered it (it must not).
    Intruder(Result<u16, String>),
}

pub fn start(
    web: SocketAddr,
    intruder: SocketAddr,
    tx: mpsc::UnboundedSender<Outcome>,
    stop: CancellationToken,
    tracker: &TaskTracker,
) {
    tracker.spawn(web_client(web, tx.clone(), stop.clone(), tracker.clone()));
    tracker.spawn(intruder_client(intruder, tx, stop, tracker.clone()));
}

async fn web_client(
    to: SocketAddr,
    tx: mpsc::UnboundedSender<Outcome>,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    let mut ticker = tokio::time::interval(EVERY);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut keep_alive: Option<SendRequest<Empty<Bytes>>> = None;
    for n in 1u64.. {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let began = Instant::now();
        let (new_connection, result) = if n.is_multiple_of(NEW_CONNECTION_EVERY) {
            (true, one_shot(to, &tracker).await)
        } else {
            reuse(&mut keep_alive, to, &tracker).await
        };
        let outcome = Outcome::Request {
            new_connection,
            result,
            latency: began.elapsed(),
        };
        if tx.send(outcome).is_err() {
            break;
        }
    }
}

async fn intruder_client(
    to: SocketAddr,
    tx: mpsc::UnboundedSender<Outcome>,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    let start = tokio::time::Instant::now() + Duration::from_secs(2);
    let mut ticker = tokio::time::interval_at(start, INTRUDER_EVERY);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = ticker.tick() => {}
        }
        if tx
            .send(Outcome::Intruder(one_shot(to, &tracker).await))
            .is_err()
        {
            break;
        }
    }
}

/// A request on the keep-alive connection, opened first if there is none (or it closed).
/// Returns whether a new connection was opened, and the result.
async fn reuse(
    slot: &mut Option<SendRequest<Empty<Bytes>>>,
    to: SocketAddr,
    tracker: &TaskTracker,
) -> (bool, Result<u16, String>) {
    if let Some(sender) = slot.as_mut()
        && sender.ready().await.is_err()
    {
        // Closed between requests (nothing was sent on it): not a failure, just reconnect.
        *slot = None;
    }
    let opened = slot.is_none();
    let result = tokio::time::timeout(TIMEOUT, async {
        if slot.is_none() {
            *slot = Some(connect(to, tracker).await?);
        }
        match slot.as_mut() {
            Some(sender) => send(sender, false).await,
            None => Err("no connection".to_owned()),
        }
    })
    .await
    .unwrap_or_else(|_| Err(format!("no answer within {} s", TIMEOUT.as_secs())))
    .map_err(|e| format!("keep-alive connection: {e}"));
    if result.is_err() {
        *slot = None;
    }
    (opened, result)
}

/// A request on a connection of its own, closed afterwards.
async fn one_shot(to: SocketAddr, tracker: &TaskTracker) -> Result<u16, String> {
    tokio::time::timeout(TIMEOUT, async {
        let mut sender = connect(to, tracker).await?;
        send(&mut sender, true).await
    })
    .await
    .unwrap_or_else(|_| Err(format!("no answer within {} s", TIMEOUT.as_secs())))
    .map_err(|e| format!("new connection: {e}"))
}

async fn connect(
    to: SocketAddr,
    tracker: &TaskTracker,
) -> Result<SendRequest<Empty<Bytes>>, String> {
    let stream = TcpStream::connect(to)
        .await
        .map_err(|e| format!("connect to {to}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| identity::report::chain(&e))?;
    // Ends when the sender is dropped or the peer closes.
    tracker.spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// `GET /` and the whole answer; an answer that is not the backend's is an error too.
async fn send(sender: &mut SendRequest<Empty<Bytes>>, close: bool) -> Result<u16, String> {
    let mut req = Request::new(Empty::<Bytes>::new());
    *req.method_mut() = Method::GET;
    let h = req.headers_mut();
    h.insert(HOST, HeaderValue::from_static("api"));
    h.insert(USER_AGENT, HeaderValue::from_static("kith-demo"));
    if close {
        h.insert(CONNECTION, HeaderValue::from_static("close"));
    }
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("reading the answer: {}", identity::report::chain(&e)))?
        .to_bytes();
    if status == 200 && !body.starts_with(b"{\"from\":\"api\"") {
        return Err(format!(
            "answer from someone else: {}",
            String::from_utf8_lossy(&body).trim()
        ));
    }
    Ok(status)
}
