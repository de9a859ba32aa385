//! TLS session resumption between the two tunnel ends: on by default, off on request, ended by
//! every new SVID or bundle, and never a way around the certificate checks.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use identity::SpiffeId;
use identity::x509::to_offset;
use proxy::{ExpectedPeer, IdentityHandle, Policy, Reason};

const CLIENT: &str = "spiffe://example.test/client";
const SERVER: &str = "spiffe://example.test/server";

/// backend ← inbound (`server`) ← outbound (`client`) ← test. Resumption shortens the one
/// handshake per application connection, so the pooled hop (tests/pool.rs) is off here.
async fn chain_of(pki: &Pki, server: IdentityHandle, client: IdentityHandle) -> (Running, Running) {
    let (server, client) = (server.with_pooling(false), client.with_pooling(false));
    let backend = echo_backend().await;
    let inbound = inbound(server, Policy::new(pki.td.clone()), backend).await;
    let expect = ExpectedPeer::Id(SpiffeId::new(SERVER).unwrap());
    let outbound = outbound(client, inbound.addr, expect).await;
    (inbound, outbound)
}

/// One request through the chain; the reply is read, so the client has processed the
/// server's ticket by the time this returns.
async fn request(outbound: &Running) -> std::io::Result<Vec<u8>> {
    within(round_trip(outbound.addr, b"ping")).await
}

async fn ok(outbound: &Running) {
    assert_eq!(request(outbound).await.unwrap(), b"ping");
}

/// Inbound and outbound counts of resumed handshakes.
fn resumed(inbound: &Running, outbound: &Running) -> (u64, u64) {
    (
        inbound.metrics.inbound.resumed(),
        outbound.metrics.outbound.resumed(),
    )
}

#[tokio::test]
async fn the_next_connection_resumes() {
    let pki = Pki::new("example.test");
    let server = handle(pki.svid(SERVER), pki.bundle());
    let client = handle(pki.svid(CLIENT), pki.bundle());
    assert!(server.resumption() && client.resumption(), "on by default");
    let (inbound, outbound) = chain_of(&pki, server, client).await;
    ok(&outbound).await;
    assert_eq!(
        resumed(&inbound, &outbound),
        (0, 0),
        "the first is a full handshake"
    );
    for n in 1..=2 {
        ok(&outbound).await;
        assert_eq!(resumed(&inbound, &outbound), (n, n));
    }
    assert_eq!(inbound.metrics.inbound.handshake().count(), 3);
    assert_eq!(inbound.metrics.inbound.refused_total(), 0);
    assert_eq!(outbound.metrics.outbound.refused_total(), 0);
}

/// A resumed connection brings no new tickets: each ticket comes from a full handshake and
/// resumes once. (rustls issues a resumed connection's tickets with the peer chains of the
/// original handshake, so tickets from resumptions would keep one pair of chains, perhaps an
/// SVID ago, in use until they expire.)
#[tokio::test]
async fn only_full_handshakes_bring_tickets() {
    let pki = Pki::new("example.test");
    let server = handle(pki.svid(SERVER), pki.bundle());
    let client = handle(pki.svid(CLIENT), pki.bundle());
    let (inbound, outbound) = chain_of(&pki, server, client).await;
    // full (2 tickets), resumed, resumed, full (2 tickets), resumed, resumed, full
    let mut kinds = Vec::new();
    for _ in 0..7 {
        let before = resumed(&inbound, &outbound);
        ok(&outbound).await;
        let after = resumed(&inbound, &outbound);
        assert_eq!(after.0 - before.0, after.1 - before.1, "both ends agree");
        kinds.push(if after.0 > before.0 { 'r' } else { 'f' });
    }
    assert_eq!(kinds.iter().collect::<String>(), "frrfrrf");
    assert_eq!(inbound.metrics.inbound.refused_total(), 0);
}

#[tokio::test]
async fn off_means_every_handshake_is_full() {
    let pki = Pki::new("example.test");
    let server = handle(pki.svid(SERVER), pki.bundle()).with_resumption(false);
    let client = handle(pki.svid(CLIENT), pki.bundle()).with_resumption(false);
    let (inbound, outbound) = chain_of(&pki, server, client).await;
    for _ in 0..3 {
        ok(&outbound).await;
    }
    assert_eq!(resumed(&inbound, &outbound), (0, 0));
    assert_eq!(inbound.metrics.inbound.handshake().count(), 3);

    // One side off is enough: a client with resumption on gets no ticket to offer.
    let pki = Pki::new("example.test");
    let server = handle(pki.svid(SERVER), pki.bundle()).with_resumption(false);
    let client = handle(pki.svid(CLIENT), pki.bundle());
    let (inbound, outbound) = chain_of(&pki, server, client).await;
    for _ in 0..3 {
        ok(&outbound).await;
    }
    assert_eq!(resumed(&inbound, &outbound), (0, 0));
}

#[tokio::test]
async fn a_new_svid_on_either_side_ends_the_sessions() {
    let pki = Pki::new("example.test");
    let server = handle(pki.svid(SERVER), pki.bundle());
    let client = handle(pki.svid(CLIENT), pki.bundle());
    let (inbound, outbound) = chain_of(&pki, server.clone(), client.clone()).await;
    ok(&outbound).await;
    ok(&outbound).await;
    assert_eq!(resumed(&inbound, &outbound), (1, 1));

    // The client rotates: its cached tickets are dropped, so the server sees the new SVID.
    client
        .publish(pki.svid(CLIENT), pki.bundle(), now())
        .unwrap();
    ok(&outbound).await;
    assert_eq!(
        resumed(&inbound, &outbound),
        (1, 1),
        "full after the client's rotation"
    );
    ok(&outbound).await;
    assert_eq!(resumed(&inbound, &outbound), (2, 2));

    // The server rotates: tickets it issued before no longer decrypt.
    server
        .publish(pki.svid(SERVER), pki.bundle(), now())
        .unwrap();
    ok(&outbound).await;
    assert_eq!(
        resumed(&inbound, &outbound),
        (2, 2),
        "full after the server's rotation"
    );
    ok(&outbound).await;
    assert_eq!(resumed(&inbound, &outbound), (3, 3));
    assert_eq!(inbound.metrics.inbound.refused_total(), 0);
}

/// A leaf that expires `secs` seconds from now.
fn short_lived(pki: &Pki, id: &str, secs: u64) -> identity::Svid {
    let (chain, key) = pki.leaf_with(id, |p| {
        p.not_after = to_offset(now() + Duration::from_secs(secs));
    });
    to_svid(chain, &key)
}

/// Sleeps until a certificate made by `short_lived(.., 2)` has expired.
async fn past_expiry() {
    tokio::time::sleep(Duration::from_millis(3500)).await;
}

#[tokio::test]
async fn an_expired_client_cannot_resume() {
    let pki = Pki::new("example.test");
    let server = handle(pki.svid(SERVER), pki.bundle());
    let client = handle(short_lived(&pki, CLIENT, 2), pki.bundle());
    let (inbound, outbound) = chain_of(&pki, server, client).await;
    ok(&outbound).await;
    past_expiry().await;
    // The client still offers its ticket (its own SVID is not the client's to judge); the
    // server resumes, checks the client chain of the first handshake again, and refuses.
    assert!(request(&outbound).await.unwrap_or_default().is_empty());
    eventually_async("refused as expired", WAIT, async || {
        inbound.metrics.inbound.refused(Reason::Expired) == 1
    })
    .await;
    assert_eq!(inbound.metrics.inbound.resumed(), 1);
    assert_eq!(inbound.metrics.inbound.accepted(), 1);
}

#[tokio::test]
async fn a_client_does_not_resume_with_an_expired_server() {
    let pki = Pki::new("example.test");
    let server = handle(short_lived(&pki, SERVER, 2), pki.bundle());
    let client = handle(pki.svid(CLIENT), pki.bundle());
    let (_inbound, outbound) = chain_of(&pki, server, client).await;
    ok(&outbound).await;
    past_expiry().await;
    assert!(request(&outbound).await.unwrap_or_default().is_empty());
    eventually_async("refused as expired", WAIT, async || {
        outbound.metrics.outbound.refused(Reason::Expired) == 1
    })
    .await;
    assert_eq!(outbound.metrics.outbound.resumed(), 1);
    assert_eq!(outbound.metrics.outbound.accepted(), 1);
}

/// Listeners of one process (the sidecar's workers) share their ticket keys and the client's
/// session cache: a ticket issued by one is taken by another.
#[tokio::test]
async fn listeners_of_one_identity_take_each_others_tickets() {
    let pki = Pki::new("example.test");
    let server = handle(pki.svid(SERVER), pki.bundle());
    let client = handle(pki.svid(CLIENT), pki.bundle());
    let (in1, out1) = chain_of(&pki, server.clone(), client.clone()).await;
    let (in2, out2) = chain_of(&pki, server, client).await;
    ok(&out1).await;
    ok(&out2).await;
    assert_eq!(in1.metrics.inbound.resumed(), 0);
    assert_eq!(in2.metrics.inbound.resumed(), 1, "in2 took in1's ticket");
    assert_eq!(
        out2.metrics.outbound.resumed(),
        1,
        "out2 offered out1's ticket"
    );
}

/// The verifiers remember chains they accepted; a remembered chain is still refused once a
/// certificate in it has expired, on a full handshake as on a resumed one.
#[tokio::test]
async fn a_remembered_chain_is_refused_after_it_expires() {
    let pki = Pki::new("example.test");
    let server = handle(pki.svid(SERVER), pki.bundle()).with_resumption(false);
    let client = handle(short_lived(&pki, CLIENT, 2), pki.bundle()).with_resumption(false);
    let (inbound, outbound) = chain_of(&pki, server, client).await;
    ok(&outbound).await;
    ok(&outbound).await;
    assert_eq!(inbound.metrics.inbound.accepted(), 2);
    past_expiry().await;
    assert!(request(&outbound).await.unwrap_or_default().is_empty());
    eventually_async("refused as expired", WAIT, async || {
        inbound.metrics.inbound.refused(Reason::Expired) == 1
    })
    .await;
    assert_eq!(resumed(&inbound, &outbound), (0, 0));
}
