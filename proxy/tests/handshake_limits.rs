//! The handshake pool against clients that start a handshake and stall: they hold no
//! connection slot, they are cut at the first-flight deadline and counted, and one source
//! cannot take more than its share of pending handshakes.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use proxy::{ExpectedPeer, Limits, Policy, Reason};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const CLIENT: &str = "spiffe://example.test/client";
const SERVER: &str = "spiffe://example.test/server";

/// Connects from `source` (any 127.0.0.0/8 address works on Linux loopback).
async fn connect_from(source: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    socket.connect(to).await.unwrap()
}

/// A connection that sends the first byte of a TLS handshake record and nothing more.
async fn stall(source: &str, to: SocketAddr) -> TcpStream {
    let mut s = connect_from(source, to).await;
    s.write_all(&[0x16]).await.unwrap();
    s
}

/// True while the server has neither closed nor reset `s`.
fn still_open(s: &TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(s.try_read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_handshakes_hold_no_connection_slot_and_are_cut_at_the_first_flight_deadline() {
    let pki = Pki::new("example.test");
    let backend = echo_backend().await;
    let limits = Limits {
        max_connections: 8,
        first_flight_timeout: Duration::from_secs(4),
        ..limits()
    };
    let inbound = inbound_with(
        handle(pki.svid(SERVER), pki.bundle()),
        Policy::new(pki.td.clone()),
        backend,
        limits,
    )
    .await;
    let outbound = outbound(
        handle(pki.svid(CLIENT), pki.bundle()),
        inbound.addr,
        ExpectedPeer::Id(identity::SpiffeId::new(SERVER).unwrap()),
    )
    .await;

    // The attack: four times the connection limit start a handshake and stall.
    let mut stalled = Vec::new();
    for _ in 0..32 {
        stalled.push(stall("127.0.0.2", inbound.addr).await);
    }
    // A real client is served while every one of them still holds on.
    let got = within(round_trip(outbound.addr, b"real")).await.unwrap();
    assert_eq!(got, b"real");
    let open = stalled.iter().filter(|s| still_open(s)).count();
    assert_eq!(
        open, 32,
        "the real client was served only after stalled handshakes were cut"
    );
    assert_eq!(inbound.metrics.inbound.accepted(), 1);

    // Then each stalled one is cut at the deadline, and counted.
    let m = &inbound.metrics.inbound;
    eventually_async(
        "stalled handshakes cut",
        Duration::from_secs(30),
        async || m.refused(Reason::HandshakeTimeout) == 32,
    )
    .await;
    for s in &mut stalled {
        let mut rest = Vec::new();
        let _ = within(s.read_to_end(&mut rest)).await;
        assert!(rest.is_empty());
    }
    assert_eq!(m.refused_total(), 32);
}

#[tokio::test]
async fn a_source_beyond_its_pending_handshakes_is_refused_others_are_served() {
    let pki = Pki::new("example.test");
    let backend = echo_backend().await;
    let limits = Limits {
        max_pending_per_source: 4,
        first_flight_timeout: Duration::from_secs(30),
        ..limits()
    };
    let inbound = inbound_with(
        handle(pki.svid(SERVER), pki.bundle()),
        Policy::new(pki.td.clone()),
        backend,
        limits,
    )
    .await;
    let mut stalled = Vec::new();
    for _ in 0..10 {
        stalled.push(stall("127.0.0.3", inbound.addr).await);
    }
    let m = &inbound.metrics.inbound;
    eventually_async("six over the cap refused", WAIT, async || {
        m.refused(Reason::TooManyPending) == 6
    })
    .await;
    assert_eq!(stalled.iter().filter(|s| still_open(s)).count(), 4);

    // Another source is served meanwhile.
    let (chain, key) = pki.leaf(CLIENT);
    let tcp = connect_from("127.0.0.4", inbound.addr).await;
    let mut tls = tokio_rustls::TlsConnector::from(raw_client(Some((chain, &key))))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    tls.write_all(b"y").await.unwrap();
    tls.shutdown().await.unwrap();
    let mut got = Vec::new();
    within(tls.read_to_end(&mut got)).await.unwrap();
    assert_eq!(got, b"y");

    // Once the stalled ones go, the source may handshake again.
    drop(stalled);
    eventually_async(
        "pending handshakes of the source released",
        WAIT,
        async || m.refused(Reason::HandshakeFailed) == 4,
    )
    .await;
    let again = stall("127.0.0.3", inbound.addr).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(still_open(&again));
    assert_eq!(m.refused(Reason::TooManyPending), 6);
}
