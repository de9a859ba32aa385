//! Transparent mode on loopback: the original destination is injected instead of coming from
//! iptables (see transparent_netns.rs for the real `SO_ORIGINAL_DST`).
#![allow(clippy::unwrap_used)]

mod common;

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use common::*;
use identity::SpiffeId;
use proxy::transparent::{
    Captured, Cidr, ExpectRules, InboundMode, OutboundPolicy, TransparentMetrics,
};
use proxy::{ExpectedPeer, IdentityHandle, OriginalDst, Policy, Reason};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const CLIENT: &str = "spiffe://example.test/client";
const SERVER: &str = "spiffe://example.test/server";

fn id(s: &str) -> SpiffeId {
    SpiffeId::new(s).unwrap()
}

fn cidrs(list: &[&str]) -> Vec<Cidr> {
    list.iter()
        .map(|s| proxy::transparent::parse_cidr(s).unwrap())
        .collect()
}

/// An original destination the test can change between connections.
#[derive(Clone)]
struct Dst(Arc<Mutex<io::Result<SocketAddr>>>);

impl Dst {
    fn new(addr: SocketAddr) -> Self {
        Self(Arc::new(Mutex::new(Ok(addr))))
    }

    fn set(&self, addr: SocketAddr) {
        *self.0.lock().unwrap() = Ok(addr);
    }

    fn unknown(&self) {
        *self.0.lock().unwrap() = Err(io::Error::new(io::ErrorKind::NotFound, "not redirected"));
    }
}

impl OriginalDst for Dst {
    fn original_dst(&self, _: &TcpStream) -> io::Result<SocketAddr> {
        match &*self.0.lock().unwrap() {
            Ok(a) => Ok(*a),
            Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
        }
    }
}

struct Side {
    addr: SocketAddr,
    metrics: Arc<TransparentMetrics>,
    dst: Dst,
    shutdown: CancellationToken,
}

impl Drop for Side {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn captured(dst: SocketAddr) -> (Captured, SocketAddr, Dst) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let dst = Dst::new(dst);
    (Captured::with_source(listener, dst.clone()), addr, dst)
}

async fn t_inbound(
    identity: IdentityHandle,
    policy: Policy,
    mode: InboundMode,
    to: SocketAddr,
) -> Side {
    let (listener, addr, dst) = captured(to).await;
    let metrics = Arc::new(TransparentMetrics::default());
    let shutdown = CancellationToken::new();
    tokio::spawn(proxy::serve_transparent_inbound(
        listener,
        identity,
        policy,
        mode,
        limits(),
        metrics.clone(),
        shutdown.clone(),
    ));
    Side {
        addr,
        metrics,
        dst,
        shutdown,
    }
}

async fn t_outbound(
    identity: IdentityHandle,
    mesh: Vec<Cidr>,
    policy: OutboundPolicy,
    expect: impl Into<ExpectRules>,
    to: SocketAddr,
) -> Side {
    let (listener, addr, dst) = captured(to).await;
    let metrics = Arc::new(TransparentMetrics::default());
    let shutdown = CancellationToken::new();
    let expect: ExpectRules = expect.into();
    tokio::spawn(proxy::serve_transparent_outbound(
        listener,
        identity,
        mesh,
        policy,
        expect,
        limits(),
        metrics.clone(),
        shutdown.clone(),
    ));
    Side {
        addr,
        metrics,
        dst,
        shutdown,
    }
}

fn client_cert(pki: &Pki) -> Arc<rustls::ClientConfig> {
    let (chain, key) = pki.leaf(CLIENT);
    raw_client(Some((chain, &key)))
}

#[tokio::test]
async fn mesh_destination_gets_mtls_and_reaches_the_original_port() {
    let pki = Pki::new("example.test");
    let backend = echo_backend().await;
    // The inbound's original destination is "the pod's address": here the backend's own, to
    // which it must forward (see inbound_forwards_to_the_original_address_not_to_loopback).
    let pod = backend;
    let inbound = t_inbound(
        handle(pki.svid(SERVER), pki.bundle()),
        Policy::new(pki.td.clone()),
        InboundMode::Strict,
        pod,
    )
    .await;
    // The outbound's original destination is "the pod", here the inbound listener itself.
    let outbound = t_outbound(
        handle(pki.svid(CLIENT), pki.bundle()),
        cidrs(&["127.0.0.0/8", "fd00::/8"]),
        OutboundPolicy::Deny,
        ExpectedPeer::Id(id(SERVER)),
        inbound.addr,
    )
    .await;
    let got = within(round_trip(outbound.addr, b"ping")).await.unwrap();
    assert_eq!(got, b"ping");
    let (o, i) = (&outbound.metrics, &inbound.metrics);
    eventually_async("both ends closed", WAIT, async || {
        i.tunnels().inbound.accepted() == 1
            && i.tunnels().inbound.active() == 0
            && o.tunnels().outbound.accepted() == 1
            && o.tunnels().outbound.active() == 0
    })
    .await;
    assert_eq!(o.outbound_mesh(), 1);
    assert_eq!(o.outbound_denied(), 0);
    assert_eq!(o.outbound_passthrough.accepted(), 0);
    assert_eq!(o.tunnels().outbound.bytes_to_tls(), 4);
    assert_eq!(i.inbound_tls(), 1);
    assert_eq!(i.inbound_plaintext.accepted(), 0);
    assert_eq!(i.tunnels().inbound.bytes_from_tls(), 4);
    assert_eq!(i.tunnels().inbound.refused_total(), 0);
}

#[tokio::test]
async fn mesh_destination_with_unexpected_server_is_refused() {
    let pki = Pki::new("example.test");
    let backend = echo_backend().await;
    let inbound = t_inbound(
        handle(pki.svid(SERVER), pki.bundle()),
        Policy::new(pki.td.clone()),
        InboundMode::Strict,
        backend,
    )
    .await;
    let outbound = t_outbound(
        handle(pki.svid(CLIENT), pki.bundle()),
        cidrs(&["127.0.0.0/8"]),
        OutboundPolicy::Passthrough,
        ExpectedPeer::Id(id("spiffe://example.test/someone-else")),
        inbound.addr,
    )
    .await;
    let got = within(round_trip(outbound.addr, b"ping")).await;
    assert!(got.map(|g| g.is_empty()).unwrap_or(true));
    eventually_async("refused", WAIT, async || {
        outbound.metrics.tunnels().outbound.refused_total() == 1
    })
    .await;
    assert_eq!(outbound.metrics.tunnels().outbound.accepted(), 0);
    // Never downgraded to plaintext.
    assert_eq!(outbound.metrics.outbound_passthrough.accepted(), 0);
}

#[tokio::test]
async fn expect_id_rules_apply_per_destination() {
    let pki = Pki::new("example.test");
    let backend = echo_backend().await;
    let inbound = t_inbound(
        handle(pki.svid(SERVER), pki.bundle()),
        Policy::new(pki.td.clone()),
        InboundMode::Strict,
        backend,
    )
    .await;
    let port = inbound.addr.port();
    // The rule for this destination names the server: accepted.
    let right = ExpectRules::parse([format!("127.0.0.0/8:{port}={SERVER}").as_str()]).unwrap();
    let ok = t_outbound(
        handle(pki.svid(CLIENT), pki.bundle()),
        cidrs(&["127.0.0.0/8"]),
        OutboundPolicy::Passthrough,
        right,
        inbound.addr,
    )
    .await;
    assert_eq!(within(round_trip(ok.addr, b"ping")).await.unwrap(), b"ping");
    // A rule for another port does not apply; the default (another ID) refuses this one.
    let wrong = ExpectRules::parse([
        format!("127.0.0.0/8:{}={SERVER}", port.wrapping_add(1)).as_str(),
        "spiffe://example.test/someone-else",
    ])
    .unwrap();
    let refused = t_outbound(
        handle(pki.svid(CLIENT), pki.bundle()),
        cidrs(&["127.0.0.0/8"]),
        OutboundPolicy::Passthrough,
        wrong,
        inbound.addr,
    )
    .await;
    let got = within(round_trip(refused.addr, b"ping")).await;
    assert!(got.map(|g| g.is_empty()).unwrap_or(true));
    eventually_async("refused", WAIT, async || {
        refused.metrics.tunnels().outbound.refused_total() == 1
    })
    .await;
}

#[tokio::test]
async fn non_mesh_destination_passes_through_plain() {
    let pki = Pki::new("example.test");
    let backend = echo_backend().await;
    let outbound = t_outbound(
        handle(pki.svid(CLIENT), pki.bundle()),
        cidrs(&["10.0.0.0/8"]),
        OutboundPolicy::Passthrough,
        ExpectedPeer::TrustDomain,
        backend,
    )
    .await;
    let got = within(round_trip(outbound.addr, b"plain")).await.unwrap();
    assert_eq!(got, b"plain");
    let m = &outbound.metrics;
    eventually_async("closed", WAIT, async || {
        m.outbound_passthrough.accepted() == 1 && m.outbound_passthrough.active() == 0
    })
    .await;
    assert_eq!(m.outbound_passthrough.bytes_sent(), 5);
    assert_eq!(m.outbound_passthrough.bytes_received(), 5);
    assert_eq!(m.outbound_mesh(), 0);
    assert_eq!(m.tunnels().outbound.accepted(), 0);

    // An unreachable destination is counted, not retried.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gone = closed.local_addr().unwrap();
    drop(closed);
    outbound.dst.set(gone);
    let _ = within(round_trip(outbound.addr, b"x")).await;
    eventually_async("unreachable", WAIT, async || {
        m.outbound_passthrough.unreachable() == 1
    })
    .await;
}

#[tokio::test]
async fn non_mesh_destination_is_refused_under_deny() {
    let pki = Pki::new("example.test");
    let backend = echo_backend().await;
    let outbound = t_outbound(
        handle(pki.svid(CLIENT), pki.bundle()),
        cidrs(&["10.0.0.0/8"]),
        OutboundPolicy::Deny,
        ExpectedPeer::TrustDomain,
        backend,
    )
    .await;
    let got = within(round_trip(outbound.addr, b"plain")).await;
    assert!(got.map(|g| g.is_empty()).unwrap_or(true));
    let m = &outbound.metrics;
    eventually_async("denied", WAIT, async || m.outbound_denied() == 1).await;
    assert_eq!(m.outbound_passthrough.accepted(), 0);
    assert_eq!(m.outbound_mesh(), 0);
}

#[tokio::test]
async fn unknown_original_destination_is_closed_and_counted() {
    let pki = Pki::new("example.test");
    let backend = echo_backend().await;
    let outbound = t_outbound(
        handle(pki.svid(CLIENT), pki.bundle()),
        cidrs(&["10.0.0.0/8"]),
        OutboundPolicy::Passthrough,
        ExpectedPeer::TrustDomain,
        backend,
    )
    .await;
    outbound.dst.unknown();
    let got = within(round_trip(outbound.addr, b"x")).await;
    assert!(got.map(|g| g.is_empty()).unwrap_or(true));
    eventually_async("counted", WAIT, async || {
        outbound.metrics.outbound_no_original_dst() == 1
    })
    .await;
    assert_eq!(outbound.metrics.outbound_passthrough.accepted(), 0);

    let inbound = t_inbound(
        handle(pki.svid(SERVER), pki.bundle()),
        Policy::new(pki.td.clone()),
        InboundMode::Permissive,
        backend,
    )
    .await;
    inbound.dst.unknown();
    let got = within(round_trip(inbound.addr, b"x")).await;
    assert!(got.map(|g| g.is_empty()).unwrap_or(true));
    eventually_async("counted", WAIT, async || {
        inbound.metrics.inbound_no_original_dst() == 1
    })
    .await;
    assert_eq!(inbound.metrics.inbound_plaintext.accepted(), 0);
}

#[tokio::test]
async fn strict_inbound_refuses_plaintext_and_accepts_mtls() {
    let pki = Pki::new("example.test");
    let backend = echo_backend().await;
    let inbound = t_inbound(
        handle(pki.svid(SERVER), pki.bundle()),
        Policy::new(pki.td.clone()),
        InboundMode::Strict,
        backend,
    )
    .await;
    let m = &inbound.metrics;
    let got = within(round_trip(inbound.addr, b"GET / HTTP/1.1\r\n\r\n")).await;
    assert!(got.map(|g| g.is_empty()).unwrap_or(true));
    eventually_async("plaintext refused", WAIT, async || {
        m.tunnels().inbound.refused(Reason::PlaintextRefused) == 1
    })
    .await;
    assert_eq!(m.inbound_plaintext.accepted(), 0);

    let got = within(tls_attempt(inbound.addr, client_cert(&pki)))
        .await
        .unwrap();
    assert_eq!(got, b"x");
    eventually_async("mtls accepted", WAIT, async || {
        m.tunnels().inbound.accepted() == 1
    })
    .await;
    assert_eq!(m.inbound_tls(), 1);

    // No client certificate: refused even in transparent mode.
    let got = within(tls_attempt(inbound.addr, raw_client(None))).await;
    assert!(got.is_err() || got.unwrap().is_empty());
    eventually_async("refused", WAIT, async || {
        m.tunnels().inbound.refused_total() == 2
    })
    .await;
    assert_eq!(m.tunnels().inbound.accepted(), 1);
}

#[tokio::test]
async fn permissive_inbound_accepts_plaintext_and_mtls_and_counts_each() {
    let pki = Pki::new("example.test");
    let backend = echo_backend().await;
    let inbound = t_inbound(
        handle(pki.svid(SERVER), pki.bundle()),
        Policy::new(pki.td.clone()),
        InboundMode::Permissive,
        backend,
    )
    .await;
    let m = &inbound.metrics;
    let got = within(round_trip(inbound.addr, b"plain")).await.unwrap();
    assert_eq!(got, b"plain");
    let got = within(tls_attempt(inbound.addr, client_cert(&pki)))
        .await
        .unwrap();
    assert_eq!(got, b"x");
    eventually_async("both counted", WAIT, async || {
        m.inbound_plaintext.accepted() == 1
            && m.inbound_plaintext.active() == 0
            && m.tunnels().inbound.accepted() == 1
    })
    .await;
    assert_eq!(m.inbound_tls(), 1);
    assert_eq!(m.inbound_plaintext.bytes_sent(), 5);
    assert_eq!(m.tunnels().inbound.refused_total(), 0);
}

#[tokio::test]
async fn inbound_policy_applies_to_the_original_port() {
    let pki = Pki::new("example.test");
    let open = echo_backend().await;
    let closed = echo_backend().await;
    let policy = Policy::new(pki.td.clone())
        .allow_on(CLIENT, &[open.port()])
        .unwrap();
    let inbound = t_inbound(
        handle(pki.svid(SERVER), pki.bundle()),
        policy,
        InboundMode::Strict,
        open,
    )
    .await;
    let m = &inbound.metrics;
    let got = within(tls_attempt(inbound.addr, client_cert(&pki)))
        .await
        .unwrap();
    assert_eq!(got, b"x");
    eventually_async("allowed", WAIT, async || {
        m.tunnels().inbound.accepted() == 1
    })
    .await;

    inbound.dst.set(closed);
    let got = within(tls_attempt(inbound.addr, client_cert(&pki))).await;
    assert!(got.is_err() || got.unwrap().is_empty());
    eventually_async("not authorized", WAIT, async || {
        m.tunnels().inbound.refused(Reason::NotAuthorized) == 1
    })
    .await;
    assert_eq!(m.tunnels().inbound.accepted(), 1);
}

/// SECURITY: inbound traffic goes to the address it was sent to, never to 127.0.0.1: a
/// service bound to 127.0.0.1 only is not reachable through the proxy when the connection was
/// for another address (127.0.0.2 here stands for the pod's own address), in STRICT (mTLS) and
/// PERMISSIVE (plaintext) alike.
#[tokio::test]
async fn inbound_forwards_to_the_original_address_not_to_loopback() {
    let pki = Pki::new("example.test");
    let loopback_only = echo_backend().await;
    let pod = SocketAddr::new("127.0.0.2".parse().unwrap(), loopback_only.port());
    for mode in [InboundMode::Strict, InboundMode::Permissive] {
        let inbound = t_inbound(
            handle(pki.svid(SERVER), pki.bundle()),
            Policy::new(pki.td.clone()),
            mode,
            pod,
        )
        .await;
        let m = &inbound.metrics;
        let _ = within(tls_attempt(inbound.addr, client_cert(&pki))).await;
        eventually_async(
            "the mTLS connection refused as unreachable",
            WAIT,
            async || m.tunnels().inbound.refused(Reason::UpstreamUnreachable) == 1,
        )
        .await;
        assert_eq!(m.tunnels().inbound.accepted(), 0, "{mode:?}");
        if mode == InboundMode::Permissive {
            let _ = within(round_trip(inbound.addr, b"plain")).await;
            eventually_async("the plaintext connection unreachable", WAIT, async || {
                m.inbound_plaintext.unreachable() == 1
            })
            .await;
            assert_eq!(m.inbound_plaintext.accepted(), 0);
        }
        // The same proxy reaches a service on the original address.
        inbound.dst.set(echo_at(pod.ip()).await);
        let got = within(tls_attempt(inbound.addr, client_cert(&pki)))
            .await
            .unwrap();
        assert_eq!(got, b"x");
    }
}

/// The sidecar's own ports (its admin port) are refused, never forwarded, and counted.
#[tokio::test]
async fn inbound_to_a_sidecar_port_is_refused_and_counted() {
    let pki = Pki::new("example.test");
    let admin = echo_backend().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let metrics = Arc::new(TransparentMetrics::default());
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    tokio::spawn(proxy::serve_transparent_inbound(
        Captured::with_source(listener, Dst::new(admin)).refusing_ports([admin.port()]),
        handle(pki.svid(SERVER), pki.bundle()),
        Policy::new(pki.td.clone()),
        InboundMode::Permissive,
        limits(),
        metrics.clone(),
        shutdown.clone(),
    ));
    let _ = within(round_trip(addr, b"POST /quitquitquit")).await;
    let _ = within(tls_attempt(addr, client_cert(&pki))).await;
    eventually_async("both refused", WAIT, async || {
        metrics.inbound_sidecar_port() == 2
    })
    .await;
    assert_eq!(metrics.inbound_plaintext.accepted(), 0);
    assert_eq!(metrics.tunnels().inbound.accepted(), 0);
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(metrics.clone()));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains("kith_sidecar_captured_total{outcome=\"inbound_sidecar_port_refused\"} 2"),
        "{text}"
    );
}

/// An echo server on `ip` (any port).
async fn echo_at(ip: std::net::IpAddr) -> SocketAddr {
    let listener = TcpListener::bind(SocketAddr::new(ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_connections_share_one_pooled_connection_with_the_policy_per_stream() {
    let pki = Pki::new("example.test");
    let backend = echo_backend().await;
    let policy = Policy::new(pki.td.clone())
        .allow_on(CLIENT, &[backend.port()])
        .unwrap();
    let inbound = t_inbound(
        handle(pki.svid(SERVER), pki.bundle()),
        policy,
        InboundMode::Strict,
        backend,
    )
    .await;
    let outbound = t_outbound(
        handle(pki.svid(CLIENT), pki.bundle()),
        cidrs(&["127.0.0.0/8"]),
        OutboundPolicy::Deny,
        ExpectedPeer::Id(id(SERVER)),
        inbound.addr,
    )
    .await;
    let mut tasks = Vec::new();
    for i in 0..20u8 {
        let addr = outbound.addr;
        tasks.push(tokio::spawn(async move {
            let data = vec![i; 10_000 + usize::from(i)];
            let got = within(round_trip(addr, &data)).await.unwrap();
            assert!(got == data, "connection {i}: bytes differ");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (o, i) = (&outbound.metrics, &inbound.metrics);
    eventually_async("all counted", WAIT, async || {
        i.tunnels().inbound.accepted() == 20 && o.tunnels().outbound.accepted() == 20
    })
    .await;
    // Twenty captured connections, one or two mTLS handshakes (a second pooled connection
    // opens once one carries 16 streams).
    let handshakes = i.tunnels().inbound.handshake().count();
    assert!((1..=2).contains(&handshakes), "{handshakes} handshakes");
    assert_eq!(i.inbound_tls(), handshakes);
    assert_eq!(o.outbound_mesh(), 20);
    // Another destination is another pooled connection; there the policy refuses its
    // streams (a port the client may not reach), each counted.
    let other = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let inbound2 = t_inbound(
        handle(pki.svid(SERVER), pki.bundle()),
        Policy::new(pki.td.clone())
            .allow_on(CLIENT, &[backend.port()])
            .unwrap(),
        InboundMode::Strict,
        other.local_addr().unwrap(),
    )
    .await;
    outbound.dst.set(inbound2.addr);
    for _ in 0..2 {
        let got = within(round_trip(outbound.addr, b"x")).await;
        assert!(got.map_or(true, |b| b.is_empty()));
    }
    let i2 = &inbound2.metrics;
    eventually_async("refused per stream", WAIT, async || {
        i2.tunnels().inbound.refused(Reason::NotAuthorized) == 2
            && o.tunnels().outbound.refused(Reason::PeerRefused) == 2
    })
    .await;
    assert_eq!(i2.tunnels().inbound.handshake().count(), 1);
}
