//! The pooled hop (ALPN `kith/2`): many application connections as HTTP/2 CONNECT streams over
//! one mTLS connection between two kith tunnel ends, on loopback with an in-memory PKI.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use identity::SpiffeId;
use proxy::{ExpectedPeer, IdentityHandle, Policy, Reason};
use rustls_pki_types::PrivateKeyDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const CLIENT: &str = "spiffe://example.test/client";
const SERVER: &str = "spiffe://example.test/server";

fn id(s: &str) -> SpiffeId {
    SpiffeId::new(s).unwrap()
}

/// Full handshakes the inbound side completed (each pooled connection is one).
fn handshakes(r: &Running) -> u64 {
    r.metrics.inbound.handshake().count()
}

/// Echo, except a connection that starts with `FLOOD\n` gets an endless stream of bytes
/// (for a client that never reads), one that starts with `SINK\n` is never read, and one that
/// starts with `RESET` is reset.
async fn backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = [0u8; 5];
                let mut n = 0;
                while n < 5 {
                    match s.read(&mut head[n..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => n += k,
                    }
                }
                if &head[..n] == b"FLOOD" {
                    let chunk = vec![b'f'; 64 * 1024];
                    while s.write_all(&chunk).await.is_ok() {}
                    return;
                }
                if &head[..n] == b"RESET" {
                    let _ = s.set_zero_linger();
                    return;
                }
                if &head[..n] == b"SINK\n" {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    return;
                }
                let (mut r, mut w) = s.split();
                if w.write_all(&head[..n]).await.is_err() {
                    return;
                }
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

struct Chain {
    inbound: Running,
    outbound: Running,
    client: IdentityHandle,
    server: IdentityHandle,
}

async fn chain_with(pki: &Pki, client_pool: bool, server_pool: bool, policy: Policy) -> Chain {
    let server = IdentityHandle::new().with_pooling(server_pool);
    server
        .publish(pki.svid(SERVER), pki.bundle(), now())
        .unwrap();
    let client = IdentityHandle::new().with_pooling(client_pool);
    client
        .publish(pki.svid(CLIENT), pki.bundle(), now())
        .unwrap();
    let inbound = inbound(server.clone(), policy, backend().await).await;
    let outbound = outbound_one(client.clone(), inbound.addr).await;
    Chain {
        inbound,
        outbound,
        client,
        server,
    }
}

/// An outbound end whose pool fills one connection (up to MAX_STREAMS streams) before it
/// opens another: these tests count connections.
async fn outbound_one(identity: IdentityHandle, connect: SocketAddr) -> Running {
    outbound_with(identity, connect, proxy::pool::MAX_STREAMS as usize).await
}

async fn outbound_with(identity: IdentityHandle, connect: SocketAddr, spread: usize) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let metrics = Arc::new(proxy::Metrics::default());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let limits = proxy::Limits {
        pool_spread: spread,
        ..limits()
    };
    tokio::spawn(proxy::serve_outbound(
        listener,
        identity,
        connect.into(),
        ExpectedPeer::Id(id(SERVER)),
        limits,
        metrics.clone(),
        shutdown.clone(),
    ));
    Running {
        addr,
        metrics,
        shutdown,
    }
}

async fn chain(pki: &Pki) -> Chain {
    chain_with(pki, true, true, Policy::new(pki.td.clone())).await
}

/// Bytes of connection `i`: distinct per connection.
fn payload(i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|k| ((k * 7 + i * 13) % 251) as u8).collect()
}

/// Sends `data` in `chunks` pieces with `pause` between them while reading the echo, then
/// half-closes and reads to EOF.
async fn echo_slowly(addr: SocketAddr, data: Vec<u8>, chunks: usize, pause: Duration) -> Vec<u8> {
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        let size = data.len().div_ceil(chunks);
        for piece in data.chunks(size) {
            w.write_all(piece).await.unwrap();
            tokio::time::sleep(pause).await;
        }
        w.shutdown().await.unwrap();
    });
    let mut got = Vec::new();
    r.read_to_end(&mut got).await.unwrap();
    writer.await.unwrap();
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_streams_share_one_connection_each_with_its_own_bytes_and_half_close() {
    let pki = Pki::new("example.test");
    let c = chain(&pki).await;
    // Warm: the first connection makes the pooled connection.
    assert_eq!(
        within(round_trip(c.outbound.addr, b"hello")).await.unwrap(),
        b"hello"
    );
    // As many streams at once as one connection takes (MAX_STREAMS).
    let streams = proxy::pool::MAX_STREAMS as usize;
    let mut tasks = Vec::new();
    for i in 0..streams {
        let addr = c.outbound.addr;
        tasks.push(tokio::spawn(async move {
            let data = payload(i, 50_000 + i * 1000);
            let got = echo_slowly(addr, data.clone(), 4, Duration::from_millis(5)).await;
            assert!(
                got == data,
                "stream {i}: bytes differ ({} of {})",
                got.len(),
                data.len()
            );
        }));
    }
    for t in tasks {
        within(t).await.unwrap();
    }
    let total: u64 = (0..streams as u64).map(|i| 50_000 + i * 1000).sum::<u64>() + 5;
    let n = streams as u64 + 1;
    eventually_async("every stream closed and counted", WAIT, async || {
        c.inbound.metrics.inbound.accepted() == n
            && c.inbound.metrics.inbound.active() == 0
            && c.outbound.metrics.outbound.active() == 0
            && c.outbound.metrics.outbound.accepted() == n
            && c.inbound.metrics.inbound.bytes_from_tls() == total
    })
    .await;
    assert_eq!(c.inbound.metrics.inbound.bytes_to_tls(), total);
    assert_eq!(c.outbound.metrics.outbound.bytes_to_tls(), total);
    assert_eq!(c.outbound.metrics.outbound.bytes_from_tls(), total);
    // 33 application connections, one mTLS handshake on each side.
    assert_eq!(handshakes(&c.inbound), 1);
    assert_eq!(c.inbound.metrics.inbound.pooled(), 1);
    assert_eq!(c.outbound.metrics.outbound.pooled(), 1);
    assert_eq!(c.outbound.metrics.outbound.handshake().count(), 1);
    assert_eq!(c.inbound.metrics.inbound.refused_total(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_from_the_server_side_leaves_the_client_side_open() {
    let pki = Pki::new("example.test");
    let c = chain(&pki).await;
    // A backend that speaks first, half-closes, then reads what the client sends.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(b"banner").await.unwrap();
        s.shutdown().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"after the server's FIN");
    });
    let inbound = inbound(c.server.clone(), Policy::new(pki.td.clone()), backend).await;
    let outbound = outbound_one(c.client.clone(), inbound.addr).await;
    let mut s = TcpStream::connect(outbound.addr).await.unwrap();
    let mut got = Vec::new();
    within(s.read_to_end(&mut got)).await.unwrap();
    assert_eq!(got, b"banner");
    s.write_all(b"after the server's FIN").await.unwrap();
    s.shutdown().await.unwrap();
    eventually_async("the stream ended cleanly both ways", WAIT, async || {
        inbound.metrics.inbound.bytes_from_tls() == 22 && inbound.metrics.inbound.active() == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stream_does_not_block_the_others() {
    let pki = Pki::new("example.test");
    let c = chain(&pki).await;
    assert_eq!(
        within(round_trip(c.outbound.addr, b"warm!")).await.unwrap(),
        b"warm!"
    );
    // One client asks for a flood and never reads; another sends without end to a backend
    // that never reads.
    let mut flood = TcpStream::connect(c.outbound.addr).await.unwrap();
    flood.write_all(b"FLOOD\n").await.unwrap();
    let mut sink = TcpStream::connect(c.outbound.addr).await.unwrap();
    sink.write_all(b"SINK\n").await.unwrap();
    let sink_writer = tokio::spawn(async move {
        let chunk = vec![b's'; 64 * 1024];
        let mut sent = 0usize;
        while let Ok(Ok(())) =
            tokio::time::timeout(Duration::from_secs(2), sink.write_all(&chunk)).await
        {
            sent += chunk.len();
        }
        (sink, sent)
    });
    // Both stalled streams fill their windows and socket buffers.
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Meanwhile every other stream on the same connection goes through (the warm-up's
    // connection, the two stalled ones and these: within MAX_STREAMS).
    let mut tasks = Vec::new();
    for i in 0..24 {
        let addr = c.outbound.addr;
        tasks.push(tokio::spawn(async move {
            let data = payload(i, 200_000);
            let got = echo_slowly(addr, data.clone(), 2, Duration::from_millis(1)).await;
            assert!(got == data, "stream {i}: bytes differ");
        }));
    }
    for t in tasks {
        within(t).await.unwrap();
    }
    // The writer to the sink was stopped by flow control: it got at most the stream window
    // plus the socket buffers on the way, not everything it tried.
    let (_sink, sent) = within(sink_writer).await.unwrap();
    assert!(sent < 64 * 1024 * 1024, "the sink stream took {sent} bytes");
    assert_eq!(handshakes(&c.inbound), 1, "all on one pooled connection");
    drop(flood);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_mid_stream_drops_nothing_and_new_streams_use_the_new_svid() {
    let pki = Pki::new("example.test");
    let c = chain(&pki).await;
    assert_eq!(
        within(round_trip(c.outbound.addr, b"first")).await.unwrap(),
        b"first"
    );
    assert_eq!(handshakes(&c.inbound), 1);
    let mut tasks = Vec::new();
    for i in 0..16 {
        let addr = c.outbound.addr;
        tasks.push(tokio::spawn(async move {
            let data = payload(i, 40_000);
            let got = echo_slowly(addr, data.clone(), 20, Duration::from_millis(25)).await;
            assert!(got == data, "stream {i}: bytes differ after the rotation");
        }));
    }
    // Mid-stream: both sides get a new SVID.
    tokio::time::sleep(Duration::from_millis(150)).await;
    c.server
        .publish(pki.svid(SERVER), pki.bundle(), now())
        .unwrap();
    c.client
        .publish(pki.svid(CLIENT), pki.bundle(), now())
        .unwrap();
    // New streams during the drain go to a new connection, made with the new SVIDs.
    for i in 0..8 {
        let data = payload(100 + i, 1000);
        assert_eq!(
            within(round_trip(c.outbound.addr, &data)).await.unwrap(),
            data
        );
    }
    for t in tasks {
        within(t).await.unwrap();
    }
    assert_eq!(
        handshakes(&c.inbound),
        2,
        "one connection before, one after the rotation"
    );
    assert_eq!(c.inbound.metrics.inbound.refused_total(), 0);
    assert_eq!(c.outbound.metrics.outbound.refused_total(), 0);
    eventually_async("all 25 counted", WAIT, async || {
        c.inbound.metrics.inbound.accepted() == 25
    })
    .await;
    // A rotation on the server side alone also moves new streams to a new connection (its
    // GOAWAY), and nothing fails.
    c.server
        .publish(pki.svid(SERVER), pki.bundle(), now())
        .unwrap();
    for i in 0..4 {
        let data = payload(200 + i, 1000);
        assert_eq!(
            within(round_trip(c.outbound.addr, &data)).await.unwrap(),
            data
        );
    }
    assert_eq!(handshakes(&c.inbound), 3);
    assert_eq!(c.outbound.metrics.outbound.refused_total(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_refusals_on_a_pooled_connection_are_counted_per_stream() {
    let pki = Pki::new("example.test");
    let policy = Policy::new(pki.td.clone())
        .allow("spiffe://example.test/someone-else")
        .unwrap();
    let c = chain_with(&pki, true, true, policy).await;
    for _ in 0..3 {
        let got = within(round_trip(c.outbound.addr, b"let me in")).await;
        assert!(
            got.map_or(true, |b| b.is_empty()),
            "a refused stream carried bytes"
        );
    }
    eventually_async("three refusals on each side", WAIT, async || {
        c.inbound.metrics.inbound.refused(Reason::NotAuthorized) == 3
            && c.outbound.metrics.outbound.refused(Reason::PeerRefused) == 3
    })
    .await;
    assert_eq!(c.inbound.metrics.inbound.accepted(), 0);
    assert_eq!(c.outbound.metrics.outbound.accepted(), 0);
    // Refused streams, one connection.
    assert_eq!(handshakes(&c.inbound), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kith_peers_without_pooling_get_one_handshake_per_connection() {
    let pki = Pki::new("example.test");
    // A pooling client and a server with --pool off (or an older kith): kith/1.
    let c = chain_with(&pki, true, false, Policy::new(pki.td.clone())).await;
    for i in 0..4 {
        let data = payload(i, 3000);
        assert_eq!(
            within(round_trip(c.outbound.addr, &data)).await.unwrap(),
            data
        );
    }
    assert_eq!(handshakes(&c.inbound), 4);
    assert_eq!(c.outbound.metrics.outbound.pooled(), 0);
    // A client with --pool off and a pooling server.
    let c = chain_with(&pki, false, true, Policy::new(pki.td.clone())).await;
    for i in 0..3 {
        let data = payload(i, 3000);
        assert_eq!(
            within(round_trip(c.outbound.addr, &data)).await.unwrap(),
            data
        );
    }
    assert_eq!(handshakes(&c.inbound), 3);
    eventually_async("counted", WAIT, async || {
        c.inbound.metrics.inbound.accepted() == 3
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_is_not_kith_is_served_as_today() {
    let pki = Pki::new("example.test");
    let c = chain(&pki).await;
    // A plain rustls client with an SVID and no ALPN, against the pooling inbound.
    let (chain, key) = pki.leaf(CLIENT);
    let mut config = (*raw_client(Some((chain, &key)))).clone();
    config.alpn_protocols = Vec::new();
    let got = within(tls_attempt(c.inbound.addr, Arc::new(config)))
        .await
        .unwrap();
    assert_eq!(got, b"x");
    eventually_async("served directly", WAIT, async || {
        c.inbound.metrics.inbound.accepted() == 1
    })
    .await;
    assert_eq!(handshakes(&c.inbound), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_is_not_kith_is_refused_as_today() {
    let pki = Pki::new("example.test");
    // A plain rustls server with the server SVID and no ALPN: a kith client refuses it
    // (handshake_failed), pooling or not.
    let (chain, key) = pki.leaf(SERVER);
    let config = rustls::ServerConfig::builder_with_provider(proxy::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            chain,
            PrivateKeyDer::Pkcs8(identity::x509::portable_pkcs8(&key)),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(s).await {
                    let _ = tls.write_all(b"not kith").await;
                    let _ = tls.shutdown().await;
                }
            });
        }
    });
    let client = handle(pki.svid(CLIENT), pki.bundle());
    assert!(client.pooling());
    let outbound = outbound(client, addr, ExpectedPeer::Id(id(SERVER))).await;
    for _ in 0..2 {
        let got = within(round_trip(outbound.addr, b"hi")).await;
        assert!(got.map_or(true, |b| b.is_empty()));
    }
    eventually_async("refused as handshake_failed", WAIT, async || {
        outbound.metrics.outbound.refused(Reason::HandshakeFailed) == 2
    })
    .await;
    assert_eq!(outbound.metrics.outbound.handshake().count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_on_one_side_is_a_reset_on_the_other_and_the_connection_lives_on() {
    let pki = Pki::new("example.test");
    let c = chain(&pki).await;
    let mut s = TcpStream::connect(c.outbound.addr).await.unwrap();
    s.write_all(b"RESET").await.unwrap();
    let mut buf = [0u8; 16];
    let got = within(s.read(&mut buf)).await;
    assert_eq!(
        got.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset),
        "the backend's RST reaches the client as an RST"
    );
    // The other way: the client resets mid-stream; the backend sees the connection end.
    let mut s = TcpStream::connect(c.outbound.addr).await.unwrap();
    s.write_all(b"hello").await.unwrap();
    let mut back = [0u8; 5];
    within(s.read_exact(&mut back)).await.unwrap();
    s.set_zero_linger().unwrap();
    drop(s);
    eventually_async("both streams ended", WAIT, async || {
        c.inbound.metrics.inbound.active() == 0 && c.outbound.metrics.outbound.active() == 0
    })
    .await;
    // A reset stream does not end the pooled connection.
    assert_eq!(
        within(round_trip(c.outbound.addr, b"after")).await.unwrap(),
        b"after"
    );
    assert_eq!(handshakes(&c.inbound), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_destination_refuses_the_stream_as_a_direct_connection_would() {
    let pki = Pki::new("example.test");
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gone = closed.local_addr().unwrap();
    drop(closed);
    let c = chain(&pki).await;
    let inbound = inbound(c.server.clone(), Policy::new(pki.td.clone()), gone).await;
    let outbound = outbound_one(c.client.clone(), inbound.addr).await;
    for _ in 0..3 {
        let got = within(round_trip(outbound.addr, b"anyone?")).await;
        assert!(got.map_or(true, |b| b.is_empty()));
    }
    eventually_async("refused on both sides, per stream", WAIT, async || {
        inbound.metrics.inbound.refused(Reason::UpstreamUnreachable) == 3
            && outbound.metrics.outbound.refused(Reason::PeerRefused) == 3
    })
    .await;
    assert_eq!(handshakes(&inbound), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_the_load_spreads_over_a_few_connections() {
    let pki = Pki::new("example.test");
    let c = chain(&pki).await;
    let outbound = outbound_with(
        c.client.clone(),
        c.inbound.addr,
        proxy::Limits::default().pool_spread,
    )
    .await;
    assert_eq!(
        proxy::Limits::default().pool_spread,
        proxy::pool::SPREAD_STREAMS
    );
    let mut tasks = Vec::new();
    for i in 0..64 {
        let addr = outbound.addr;
        tasks.push(tokio::spawn(async move {
            let data = payload(i, 20_000);
            let got = echo_slowly(addr, data.clone(), 10, Duration::from_millis(20)).await;
            assert!(got == data, "stream {i}: bytes differ");
        }));
    }
    for t in tasks {
        within(t).await.unwrap();
    }
    // 64 streams at once, 16 per connection before another opens: more than one connection,
    // far fewer than one per stream, never more than the cap.
    let pooled = outbound.metrics.outbound.pooled();
    assert!(pooled >= 2, "{pooled} pooled connections");
    assert!(
        pooled <= proxy::pool::POOL_CAP as u64,
        "{pooled} pooled connections"
    );
    assert_eq!(handshakes(&c.inbound), pooled);
}
