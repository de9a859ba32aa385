//! Every listener has limits: a half-sent request is closed after the header timeout (metrics
//! listener, and the 429 answer past the connection cap), and one source address cannot hold
//! every API connection slot.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use crate::common::{TestCa, start_ca};
use ca_api::client::{Connection, client_config};
use integration::eventually_async;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// A generous bound that only keeps a broken server from hanging the test.
const BOUND: Duration = Duration::from_secs(60);

fn refused(metrics: &str, reason: &str) -> u64 {
    let prefix = format!("kith_ca_refused_total{{reason=\"{reason}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// Reads until the peer closes (EOF or reset); returns what arrived.
async fn read_until_closed(s: &mut (impl AsyncRead + Unpin)) -> Vec<u8> {
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return all,
            Ok(n) => all.extend_from_slice(&buf[..n]),
        }
    }
}

/// A TCP connection to the CA's API from the loopback address `source`.
async fn connect_from(ca: &TestCa, source: &str) -> TcpStream {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(format!("{source}:0").parse().unwrap()).unwrap();
    sock.connect(ca.addr.parse().unwrap()).await.unwrap()
}

async fn bundle_status(ca: &TestCa, tcp: TcpStream) -> u16 {
    let mut conn = Connection::over(tcp, client_config(ca.bundle(), None).unwrap())
        .await
        .unwrap();
    conn.get_json("/v1/bundle").await.unwrap().0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_sent_request_on_the_metrics_listener_is_closed_after_the_header_timeout() {
    let ca = start_ca(|c| c.request_timeout = Duration::from_secs(1)).await;
    let mut s = TcpStream::connect(&ca.metrics_addr).await.unwrap();
    // The attack: headers that never end.
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    tokio::time::timeout(BOUND, read_until_closed(&mut s))
        .await
        .expect("the metrics listener closes a request whose headers never end");
    assert_eq!(refused(&ca.metrics().await, "metrics_header_timeout"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_source_cannot_hold_all_api_connection_slots() {
    let ca = start_ca(|c| {
        c.max_connections = 8;
        c.max_connections_per_source = 2;
    })
    .await;
    // The attack: one client opens connections and sends nothing.
    let hold = [
        connect_from(&ca, "127.0.0.1").await,
        connect_from(&ca, "127.0.0.1").await,
    ];
    let mut third = connect_from(&ca, "127.0.0.1").await;
    let got = tokio::time::timeout(BOUND, read_until_closed(&mut third))
        .await
        .expect("a connection over the source's share is closed at once");
    assert!(got.is_empty(), "closed without a TLS answer");
    assert!(refused(&ca.metrics().await, "too_many_connections_from_source") >= 1);

    // Everyone else is still served.
    let other = connect_from(&ca, "127.0.0.2").await;
    assert_eq!(bundle_status(&ca, other).await, 200);

    // Once the source lets go of a slot, it is served again.
    drop(hold);
    let mut conn = eventually_async("the source served again", BOUND, async || {
        let tcp = connect_from(&ca, "127.0.0.1").await;
        Connection::over(tcp, client_config(ca.bundle(), None).unwrap()).await
    })
    .await;
    assert_eq!(conn.get_json("/v1/bundle").await.unwrap().0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_connection_cap_a_half_sent_request_gets_the_header_timeout_too() {
    let ca = start_ca(|c| {
        c.max_connections = 1;
        c.max_connections_per_source = 1;
        c.request_timeout = Duration::from_secs(1);
    })
    .await;
    // One silent connection takes the only slot.
    let _hold = connect_from(&ca, "127.0.0.1").await;
    // Probe from other sources until the cap is reached; each probe that gets the 429 answer
    // proves the slot is taken.
    eventually_async("the cap to be reached", BOUND, async || {
        if refused(&ca.metrics().await, "too_many_connections") > 0 {
            return true;
        }
        let tcp = connect_from(&ca, "127.0.0.4").await;
        let _ = Connection::over(tcp, client_config(ca.bundle(), None).unwrap()).await;
        false
    })
    .await;
    let full = connect_from(&ca, "127.0.0.2").await;
    let mut conn = Connection::over(full, client_config(ca.bundle(), None).unwrap())
        .await
        .unwrap();
    let (status, v) = conn.get_json("/v1/bundle").await.unwrap();
    assert_eq!(
        (status, v["code"].as_str()),
        (429, Some("too_many_connections"))
    );

    // The attack on the 429 path: a TLS handshake, then headers that never end.
    let before = refused(&ca.metrics().await, "header_timeout");
    let tcp = connect_from(&ca, "127.0.0.3").await;
    let tls = tokio_rustls::TlsConnector::from(client_config(ca.bundle(), None).unwrap());
    let mut s = tls
        .connect(ServerName::try_from("kith-ca").unwrap(), tcp)
        .await
        .unwrap();
    s.write_all(b"GET /v1/bundle HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    s.flush().await.unwrap();
    tokio::time::timeout(BOUND, read_until_closed(&mut s))
        .await
        .expect("the 429 path closes a request whose headers never end");
    assert_eq!(refused(&ca.metrics().await, "header_timeout"), before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_on_which_nothing_moves_is_closed_after_the_idle_timeout() {
    // The header timeout is long here, so only the idle deadline can close these.
    let ca = start_ca(|c| {
        c.request_timeout = Duration::from_secs(3600);
        c.idle_timeout = Duration::from_secs(1);
    })
    .await;
    // The API: a TLS handshake, then silence.
    let tcp = connect_from(&ca, "127.0.0.1").await;
    let tls = tokio_rustls::TlsConnector::from(client_config(ca.bundle(), None).unwrap());
    let mut s = tls
        .connect(ServerName::try_from("kith-ca").unwrap(), tcp)
        .await
        .unwrap();
    tokio::time::timeout(BOUND, read_until_closed(&mut s))
        .await
        .expect("the api closes an idle connection");
    // The metrics listener: a connection that never sends a byte.
    let mut m = TcpStream::connect(&ca.metrics_addr).await.unwrap();
    tokio::time::timeout(BOUND, read_until_closed(&mut m))
        .await
        .expect("the metrics listener closes an idle connection");
    let metrics = ca.metrics().await;
    assert_eq!(refused(&metrics, "idle_timeout"), 1);
    assert_eq!(refused(&metrics, "metrics_idle_timeout"), 1);
}
