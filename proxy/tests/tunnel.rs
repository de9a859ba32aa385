//! Loopback tests of the two tunnel ends with an in-memory PKI per test.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::*;
use identity::x509::to_offset;
use identity::{SpiffeId, TrustBundle};
use proxy::{ExpectedPeer, IdentityHandle, Limits, Policy, Reason};
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const CLIENT: &str = "spiffe://example.test/client";
const SERVER: &str = "spiffe://example.test/server";

fn id(s: &str) -> SpiffeId {
    SpiffeId::new(s).unwrap()
}

/// backend ← inbound (SERVER identity) ← outbound (CLIENT identity) ← test
async fn chain(pki: &Pki) -> (Running, Running) {
    let backend = echo_backend().await;
    let inbound = inbound(
        handle(pki.svid(SERVER), pki.bundle()),
        Policy::new(pki.td.clone()),
        backend,
    )
    .await;
    let outbound = outbound(
        handle(pki.svid(CLIENT), pki.bundle()),
        inbound.addr,
        ExpectedPeer::Id(id(SERVER)),
    )
    .await;
    (inbound, outbound)
}

#[tokio::test]
async fn bytes_flow_both_ways_with_half_close() {
    let pki = Pki::new("example.test");
    let (inbound, outbound) = chain(&pki).await;
    let got = within(round_trip(outbound.addr, b"ping")).await.unwrap();
    assert_eq!(got, b"ping");
    eventually_async("closed on both sides", WAIT, async || {
        inbound.metrics.inbound.accepted() == 1
            && inbound.metrics.inbound.active() == 0
            && outbound.metrics.outbound.active() == 0
    })
    .await;
    assert_eq!(inbound.metrics.inbound.bytes_from_tls(), 4);
    assert_eq!(inbound.metrics.inbound.bytes_to_tls(), 4);
    assert_eq!(outbound.metrics.outbound.bytes_to_tls(), 4);
    assert_eq!(inbound.metrics.inbound.refused_total(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_megabytes_each_way() {
    let pki = Pki::new("example.test");
    let (_inbound, outbound) = chain(&pki).await;
    let data: Vec<u8> = (0..10 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let s = TcpStream::connect(outbound.addr).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut got = Vec::with_capacity(data.len());
    within(r.read_to_end(&mut got)).await.unwrap();
    writer.await.unwrap();
    assert_eq!(got.len(), data.len());
    assert!(got == data, "bytes differ");
    eventually_async("bytes counted", WAIT, async || {
        outbound.metrics.outbound.bytes_to_tls() == data.len() as u64
            && outbound.metrics.outbound.bytes_from_tls() == data.len() as u64
    })
    .await;
}

/// Connects to an inbound (SERVER, default policy unless given) with a raw TLS client and
/// asserts the connection is refused for `reason`.
async fn assert_inbound_refuses(
    pki: &Pki,
    policy: Policy,
    client: Arc<rustls::ClientConfig>,
    reason: Reason,
) {
    let backend = echo_backend().await;
    let inbound = inbound(handle(pki.svid(SERVER), pki.bundle()), policy, backend).await;
    let got = within(tls_attempt(inbound.addr, client)).await;
    // Refused: an error or an EOF without the echo.
    assert!(!matches!(&got, Ok(b) if b == b"x"), "got through: {got:?}");
    let m = &inbound.metrics.inbound;
    eventually_async(&format!("refused as {reason}"), WAIT, async || {
        m.refused(reason) == 1
    })
    .await;
    assert_eq!(m.refused_total(), 1);
    assert_eq!(m.accepted(), 0);
}

#[tokio::test]
async fn a_valid_client_gets_through_the_raw_path() {
    // The harness itself works: a good certificate is echoed.
    let pki = Pki::new("example.test");
    let backend = echo_backend().await;
    let inbound = inbound(
        handle(pki.svid(SERVER), pki.bundle()),
        Policy::new(pki.td.clone()),
        backend,
    )
    .await;
    let (chain, key) = pki.leaf(CLIENT);
    let got = within(tls_attempt(inbound.addr, raw_client(Some((chain, &key))))).await;
    assert_eq!(got.unwrap(), b"x");
}

#[tokio::test]
async fn refuses_a_client_from_another_ca() {
    let pki = Pki::new("example.test");
    let other = Pki::new("example.test");
    let (chain, key) = other.leaf(CLIENT);
    let policy = Policy::new(pki.td.clone());
    assert_inbound_refuses(
        &pki,
        policy,
        raw_client(Some((chain, &key))),
        Reason::UnknownCa,
    )
    .await;
}

#[tokio::test]
async fn refuses_an_expired_client() {
    let pki = Pki::new("example.test");
    let (chain, key) = pki.leaf_with(CLIENT, |p| {
        p.not_before = to_offset(now() - 2 * HOUR);
        p.not_after = to_offset(now() - HOUR);
    });
    let policy = Policy::new(pki.td.clone());
    assert_inbound_refuses(
        &pki,
        policy,
        raw_client(Some((chain, &key))),
        Reason::Expired,
    )
    .await;
}

#[tokio::test]
async fn refuses_a_client_of_another_trust_domain() {
    let pki = Pki::new("example.test");
    let (chain, key) = pki.leaf("spiffe://other.test/client");
    let policy = Policy::new(pki.td.clone());
    let client = raw_client(Some((chain, &key)));
    assert_inbound_refuses(&pki, policy, client, Reason::WrongTrustDomain).await;
}

#[tokio::test]
async fn refuses_an_id_the_policy_does_not_allow() {
    let pki = Pki::new("example.test");
    let (chain, key) = pki.leaf("spiffe://example.test/intruder");
    let policy = Policy::new(pki.td.clone()).allow(CLIENT).unwrap();
    let client = raw_client(Some((chain, &key)));
    assert_inbound_refuses(&pki, policy, client, Reason::NotAuthorized).await;
}

#[tokio::test]
async fn refuses_a_client_without_certificate() {
    let pki = Pki::new("example.test");
    let policy = Policy::new(pki.td.clone());
    assert_inbound_refuses(&pki, policy, raw_client(None), Reason::PlaintextRefused).await;
}

#[tokio::test]
async fn refuses_plaintext() {
    let pki = Pki::new("example.test");
    let backend = echo_backend().await;
    let inbound = inbound(
        handle(pki.svid(SERVER), pki.bundle()),
        Policy::new(pki.td.clone()),
        backend,
    )
    .await;
    let got = within(round_trip(inbound.addr, b"GET / HTTP/1.1\r\n\r\n")).await;
    assert!(got.map(|b| b.is_empty()).unwrap_or(true));
    let m = &inbound.metrics.inbound;
    eventually_async("plaintext refused", WAIT, async || {
        m.refused(Reason::PlaintextRefused) == 1
    })
    .await;
}

#[tokio::test]
async fn outbound_refuses_an_unexpected_server() {
    let pki = Pki::new("example.test");
    let backend = echo_backend().await;
    let inbound = inbound(
        handle(pki.svid("spiffe://example.test/impostor"), pki.bundle()),
        Policy::new(pki.td.clone()),
        backend,
    )
    .await;
    let outbound = outbound(
        handle(pki.svid(CLIENT), pki.bundle()),
        inbound.addr,
        ExpectedPeer::Id(id(SERVER)),
    )
    .await;
    let got = within(round_trip(outbound.addr, b"secret")).await;
    assert!(got.map(|b| b.is_empty()).unwrap_or(true));
    let m = &outbound.metrics.outbound;
    eventually_async("not authorized", WAIT, async || {
        m.refused(Reason::NotAuthorized) == 1
    })
    .await;
}

#[tokio::test]
async fn outbound_counts_a_refusal_that_arrives_after_its_handshake() {
    let pki = Pki::new("example.test");
    let backend = echo_backend().await;
    let inbound = inbound(
        handle(pki.svid(SERVER), pki.bundle()),
        Policy::new(pki.td.clone()),
        backend,
    )
    .await;
    // The client trusts the server's CA, but the server does not trust the client's.
    let other = Pki::new("example.test");
    let both = TrustBundle::from_roots(pki.td.clone(), vec![pki.root.clone(), other.root.clone()])
        .unwrap();
    let outbound = outbound(
        handle(other.svid(CLIENT), both),
        inbound.addr,
        ExpectedPeer::Id(id(SERVER)),
    )
    .await;
    let got = within(round_trip(outbound.addr, b"hello")).await;
    assert!(got.map(|b| b.is_empty()).unwrap_or(true));
    let (i, o) = (&inbound.metrics.inbound, &outbound.metrics.outbound);
    eventually_async("refused on both sides", WAIT, async || {
        i.refused(Reason::UnknownCa) == 1 && o.refused(Reason::PeerRefused) == 1
    })
    .await;
    assert_eq!(
        o.accepted(),
        0,
        "counted as established before the peer's first byte"
    );
}

#[tokio::test]
async fn connection_limit_queues_the_excess() {
    let pki = Pki::new("example.test");
    let backend = echo_backend().await;
    let one = Limits {
        max_connections: 1,
        ..limits()
    };
    let inbound = inbound_with(
        handle(pki.svid(SERVER), pki.bundle()),
        Policy::new(pki.td.clone()),
        backend,
        one,
    )
    .await;
    let outbound = outbound(
        handle(pki.svid(CLIENT), pki.bundle()),
        inbound.addr,
        ExpectedPeer::Id(id(SERVER)),
    )
    .await;
    let mut first = TcpStream::connect(outbound.addr).await.unwrap();
    first.write_all(b"1").await.unwrap();
    let mut b = [0u8; 1];
    within(first.read_exact(&mut b)).await.unwrap();

    // The second waits in the backlog while the first holds the only slot.
    let second = tokio::spawn(round_trip(outbound.addr, b"2"));
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(!second.is_finished());
    assert_eq!(inbound.metrics.inbound.accepted(), 1);

    drop(first);
    let got = within(second).await.unwrap().unwrap();
    assert_eq!(got, b"2");
    assert_eq!(inbound.metrics.inbound.accepted(), 2);
}

#[tokio::test]
async fn shutdown_stops_the_listener_and_its_connections() {
    let pki = Pki::new("example.test");
    let backend = echo_backend().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let metrics = Arc::new(proxy::Metrics::default());
    let serve = tokio::spawn(proxy::serve_inbound(
        listener,
        handle(pki.svid(SERVER), pki.bundle()),
        Policy::new(pki.td.clone()),
        backend,
        limits(),
        metrics.clone(),
        shutdown.clone(),
    ));
    let outbound = outbound(
        handle(pki.svid(CLIENT), pki.bundle()),
        addr,
        ExpectedPeer::Id(id(SERVER)),
    )
    .await;
    let mut open = TcpStream::connect(outbound.addr).await.unwrap();
    open.write_all(b"1").await.unwrap();
    let mut b = [0u8; 1];
    within(open.read_exact(&mut b)).await.unwrap();

    shutdown.cancel();
    within(serve).await.unwrap().unwrap();
    // The established connection was closed too.
    let mut rest = Vec::new();
    let closed = within(open.read_to_end(&mut rest)).await;
    assert!(closed.is_err() || rest.is_empty());
    assert!(TcpStream::connect(addr).await.is_err());
}

#[test]
fn limits_are_validated() {
    assert!(limits().validate().is_ok());
    let zero = Limits {
        max_connections: 0,
        ..limits()
    };
    assert!(zero.validate().is_err());
    let no_idle = Limits {
        idle_timeout: std::time::Duration::ZERO,
        ..limits()
    };
    assert!(no_idle.validate().is_err());
}

#[tokio::test]
async fn outbound_without_identity_waits_then_refuses() {
    let pki = Pki::new("example.test");
    let (inbound, _) = chain(&pki).await;
    let empty = IdentityHandle::new();
    let outbound = outbound(empty.clone(), inbound.addr, ExpectedPeer::TrustDomain).await;
    let got = within(round_trip(outbound.addr, b"early")).await;
    assert!(got.map(|b| b.is_empty()).unwrap_or(true));
    let m = &outbound.metrics.outbound;
    eventually_async("no identity yet", WAIT, async || {
        m.refused(Reason::NoIdentityYet) == 1
    })
    .await;

    // Published while a connection waits: it goes through.
    let s = TcpStream::connect(outbound.addr).await.unwrap();
    empty
        .publish(pki.svid(CLIENT), pki.bundle(), now())
        .unwrap();
    let (mut r, mut w) = s.into_split();
    w.write_all(b"late").await.unwrap();
    w.shutdown().await.unwrap();
    let mut got = Vec::new();
    within(r.read_to_end(&mut got)).await.unwrap();
    assert_eq!(got, b"late");
}

#[tokio::test]
async fn outbound_counts_an_unreachable_upstream() {
    let pki = Pki::new("example.test");
    let gone = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = gone.local_addr().unwrap();
    drop(gone);
    let outbound = outbound(
        handle(pki.svid(CLIENT), pki.bundle()),
        addr,
        ExpectedPeer::TrustDomain,
    )
    .await;
    let _ = within(round_trip(outbound.addr, b"x")).await;
    let m = &outbound.metrics.outbound;
    eventually_async("unreachable", WAIT, async || {
        m.refused(Reason::UpstreamUnreachable) == 1
    })
    .await;
}

#[test]
fn publish_refuses_an_svid_the_bundle_does_not_validate() {
    let pki = Pki::new("example.test");
    let other = Pki::new("example.test");
    let (chain, key) = pki.leaf(CLIENT);
    let h = handle(to_svid(chain.clone(), &key), pki.bundle());
    assert!(h.publish(other.svid(CLIENT), pki.bundle(), now()).is_err());
    // The old identity stays.
    let current = h.current().unwrap();
    assert_eq!(current.version(), 1);
    assert_eq!(current.svid().leaf(), &chain[0]);
}

fn serial(der: &CertificateDer<'_>) -> Vec<u8> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    cert.raw_serial().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_applies_to_the_next_handshake_and_keeps_old_connections() {
    let pki = Pki::new("example.test");
    // The test is the server here, to see the client certificate of each handshake.
    // The test server speaks kith/1 (one connection per application connection).
    let server_id = handle(pki.svid(SERVER), pki.bundle()).with_pooling(false);
    let acceptor = tokio_rustls::TlsAcceptor::from(proxy::tls::server_config(&server_id).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server_addr = listener.local_addr().unwrap();
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let seen_tx = seen_tx.clone();
            tokio::spawn(async move {
                let tls = acceptor.accept(tcp).await.unwrap();
                let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
                seen_tx.send(leaf).unwrap();
                let (mut r, mut w) = tokio::io::split(tls);
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });

    let (chain1, key1) = pki.leaf(CLIENT);
    let client_id = handle(to_svid(chain1.clone(), &key1), pki.bundle());
    let outbound = outbound(client_id.clone(), server_addr, ExpectedPeer::Id(id(SERVER))).await;

    // A long-lived connection streaming data in both directions.
    let mut old = TcpStream::connect(outbound.addr).await.unwrap();
    let chunk = [42u8; 1024];
    let mut back = [0u8; 1024];
    old.write_all(&chunk).await.unwrap();
    within(old.read_exact(&mut back)).await.unwrap();
    let first = seen.recv().await.unwrap();
    assert_eq!(serial(&first), serial(&chain1[0]));

    // Rotate to a leaf from a new root; both sides get a bundle with both roots.
    let next = Pki::new("example.test");
    let both =
        TrustBundle::from_roots(pki.td.clone(), vec![pki.root.clone(), next.root.clone()]).unwrap();
    let (chain2, key2) = next.leaf(CLIENT);
    server_id
        .publish(pki.svid(SERVER), both.clone(), now())
        .unwrap();
    client_id
        .publish(to_svid(chain2.clone(), &key2), both, now())
        .unwrap();

    // The old connection keeps streaming.
    for _ in 0..100 {
        old.write_all(&chunk).await.unwrap();
        within(old.read_exact(&mut back)).await.unwrap();
        assert_eq!(back, chunk);
    }

    // The next handshake presents the new certificate.
    let got = within(round_trip(outbound.addr, b"new")).await.unwrap();
    assert_eq!(got, b"new");
    let second = seen.recv().await.unwrap();
    assert_eq!(serial(&second), serial(&chain2[0]));
    assert_ne!(serial(&first), serial(&second));

    old.write_all(b"still").await.unwrap();
    old.shutdown().await.unwrap();
    let mut rest = Vec::new();
    within(old.read_to_end(&mut rest)).await.unwrap();
    assert_eq!(rest, b"still");
    assert_eq!(outbound.metrics.outbound.refused_total(), 0);
}
