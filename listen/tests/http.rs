//! The shared HTTP/1.1 loop against real sockets on loopback: the caps close what is past
//! them, a client that never finishes its headers is cut and counted, and a normal request is
//! served meanwhile.
#![allow(clippy::unwrap_used)]

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use listen::{HttpLimits, Refusal, serve_http1};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

type Seen = Arc<Mutex<Vec<Refusal>>>;

async fn start(limits: HttpLimits) -> (std::net::SocketAddr, Seen, CancellationToken) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let shutdown = CancellationToken::new();
    let record = seen.clone();
    tokio::spawn(serve_http1(
        listener,
        "test",
        limits,
        move |r| record.lock().unwrap().push(r),
        shutdown.clone(),
        |_, _| {
            hyper::service::service_fn(|_req| async {
                Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from("ok\n"))))
            })
        },
    ));
    (addr, seen, shutdown)
}

async fn get(addr: std::net::SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// Waits (up to 10 s) until the connection is closed by the server.
async fn closed(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test]
async fn past_the_connection_cap_a_connection_is_closed_and_counted() {
    let limits = HttpLimits {
        max_connections: 2,
        max_per_source: 10,
        ..HttpLimits::ADMIN
    };
    let (addr, seen, _stop) = start(limits).await;
    // Two idle connections hold both slots.
    let _a = TcpStream::connect(addr).await.unwrap();
    let _b = TcpStream::connect(addr).await.unwrap();
    let mut c = TcpStream::connect(addr).await.unwrap();
    assert!(closed(&mut c).await, "the third connection must be closed");
    assert_eq!(*seen.lock().unwrap(), [Refusal::TooManyConnections]);
}

#[tokio::test]
async fn one_source_cannot_take_every_slot() {
    let limits = HttpLimits {
        max_connections: 10,
        max_per_source: 1,
        ..HttpLimits::ADMIN
    };
    let (addr, seen, _stop) = start(limits).await;
    let _a = TcpStream::connect(addr).await.unwrap();
    let mut b = TcpStream::connect(addr).await.unwrap();
    assert!(closed(&mut b).await);
    assert_eq!(*seen.lock().unwrap(), [Refusal::TooManyFromSource]);
}

#[tokio::test]
async fn a_slow_client_is_cut_at_the_header_deadline_while_others_are_served() {
    let limits = HttpLimits {
        header_timeout: Duration::from_millis(300),
        ..HttpLimits::ADMIN
    };
    let (addr, seen, _stop) = start(limits).await;
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    assert!(get(addr).await.ends_with("ok\n"));
    assert!(
        closed(&mut slow).await,
        "headers never finished: must be cut"
    );
    assert_eq!(*seen.lock().unwrap(), [Refusal::HeaderTimeout]);
}

#[tokio::test]
async fn shutdown_stops_the_listener_and_closes_open_connections() {
    let (addr, _seen, stop) = start(HttpLimits::ADMIN).await;
    let mut open = TcpStream::connect(addr).await.unwrap();
    // The connection is accepted before shutdown.
    assert!(get(addr).await.ends_with("ok\n"));
    stop.cancel();
    assert!(closed(&mut open).await);
}
