//! Post-quantum key exchange on the mesh hop: two kith ends negotiate X25519MLKEM768 by
//! default; either end with it off (`IdentityHandle::with_pq(false)`) still connects, over
//! X25519; the negotiated group is counted in the metrics (the log line: `pq_log.rs`).
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use identity::SpiffeId;
use proxy::{ExpectedPeer, IdentityHandle, Policy};

const CLIENT: &str = "spiffe://example.test/client";
const SERVER: &str = "spiffe://example.test/server";

/// backend ← inbound (`server`) ← outbound (`client`) ← test; `n` requests through it.
async fn chain(
    pki: &Pki,
    server: IdentityHandle,
    client: IdentityHandle,
    n: usize,
) -> (Running, Running) {
    let backend = echo_backend().await;
    let inbound = inbound(server, Policy::new(pki.td.clone()), backend).await;
    let expect = ExpectedPeer::Id(SpiffeId::new(SERVER).unwrap());
    // One handshake per connection (no pooled hop), so each request is a handshake to count.
    let outbound = outbound(client.with_pooling(false), inbound.addr, expect).await;
    for _ in 0..n {
        let got = within(round_trip(outbound.addr, b"ping")).await.unwrap();
        assert_eq!(got, b"ping");
    }
    (inbound, outbound)
}

/// Handshakes by group, inbound then outbound: (X25519MLKEM768, X25519).
fn by_group(inbound: &Running, outbound: &Running) -> [(u64, u64); 2] {
    let (i, o) = (&inbound.metrics.inbound, &outbound.metrics.outbound);
    [
        (i.handshakes_kx("X25519MLKEM768"), i.handshakes_kx("X25519")),
        (o.handshakes_kx("X25519MLKEM768"), o.handshakes_kx("X25519")),
    ]
}

#[tokio::test]
async fn kith_ends_negotiate_the_hybrid_by_default() {
    let pki = Pki::new("example.test");
    let server = handle(pki.svid(SERVER), pki.bundle());
    let client = handle(pki.svid(CLIENT), pki.bundle());
    assert!(server.pq() && client.pq(), "on by default");
    // Resumption on: the resumed handshakes (psk_dhe_ke) use the hybrid too.
    let (inbound, outbound) = chain(&pki, server, client, 3).await;
    assert_eq!(by_group(&inbound, &outbound), [(3, 0), (3, 0)]);
    assert_eq!(inbound.metrics.inbound.handshakes_kx("other"), 0);

    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(inbound.metrics.clone()));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    for line in [
        "kith_sidecar_handshakes_total{direction=\"inbound\",kx=\"X25519MLKEM768\"} 3\n",
        "kith_sidecar_handshakes_total{direction=\"inbound\",kx=\"X25519\"} 0\n",
        "kith_sidecar_handshakes_total{direction=\"outbound\",kx=\"X25519MLKEM768\"} 0\n",
        // OpenMetrics names a counter's family without the `_total` of its samples.
        "# TYPE kith_sidecar_handshakes counter\n",
    ] {
        assert!(text.contains(line), "{line} in\n{text}");
    }
}

#[tokio::test]
async fn a_server_with_pq_off_still_connects_over_x25519() {
    let pki = Pki::new("example.test");
    let server = handle(pki.svid(SERVER), pki.bundle()).with_pq(false);
    let client = handle(pki.svid(CLIENT), pki.bundle());
    let (inbound, outbound) = chain(&pki, server, client, 2).await;
    assert_eq!(by_group(&inbound, &outbound), [(0, 2), (0, 2)]);
    assert_eq!(inbound.metrics.inbound.refused_total(), 0);
}

#[tokio::test]
async fn a_client_with_pq_off_still_connects_over_x25519() {
    let pki = Pki::new("example.test");
    let server = handle(pki.svid(SERVER), pki.bundle());
    let client = handle(pki.svid(CLIENT), pki.bundle())
        .with_pq(false)
        .with_resumption(false);
    let (inbound, outbound) = chain(&pki, server, client, 2).await;
    assert_eq!(by_group(&inbound, &outbound), [(0, 2), (0, 2)]);
    assert_eq!(outbound.metrics.outbound.refused_total(), 0);
}
