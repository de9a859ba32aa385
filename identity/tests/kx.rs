//! TLS 1.3 handshakes in memory (rustls `ClientConnection` ↔ `ServerConnection`) over kith's
//! key-exchange groups: the hybrid X25519MLKEM768 between two kith ends, X25519 with a peer that
//! has the hybrid off, and a malformed hybrid key share refused with an error.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use identity::kx::{self, X25519MLKEM768};
use rustls::crypto::{ActiveKeyExchange, CryptoProvider, SharedSecret, SupportedKxGroup};
use rustls::pki_types::{PrivateKeyDer, ServerName};
use rustls::{
    ClientConfig, ClientConnection, HandshakeKind, NamedGroup, PeerMisbehaved, RootCertStore,
    ServerConfig, ServerConnection,
};

fn provider(groups: Vec<&'static dyn SupportedKxGroup>) -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.kx_groups = groups;
    Arc::new(p)
}

struct Ends {
    client: ClientConfig,
    server: ServerConfig,
}

/// A server with an SVID (DNS SAN `a.test`) and a client that trusts its root; each end
/// offers `client_groups` / `server_groups`.
fn ends(
    client_groups: Vec<&'static dyn SupportedKxGroup>,
    server_groups: Vec<&'static dyn SupportedKxGroup>,
) -> Ends {
    let pki = integration::pki::Pki::new("example.test");
    let (mut chain, key) = pki.leaf("spiffe://example.test/server");
    chain.truncate(1);
    chain.push(pki.intermediate.clone());
    let mut roots = RootCertStore::empty();
    roots.add(pki.root.clone()).unwrap();
    let client = ClientConfig::builder_with_provider(provider(client_groups))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let server = ServerConfig::builder_with_provider(provider(server_groups))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, PrivateKeyDer::Pkcs8(key.serialize_der().into()))
        .unwrap();
    Ends { client, server }
}

/// Moves TLS records between the two ends until neither has anything to send.
fn pump(client: &mut ClientConnection, server: &mut ServerConnection) -> Result<(), rustls::Error> {
    for _ in 0..20 {
        let mut moved = false;
        while client.wants_write() {
            let mut buf = Vec::new();
            client.write_tls(&mut buf).unwrap();
            moved |= !buf.is_empty();
            // read_tls takes at most a few KB per call: feed it all.
            let mut rd = buf.as_slice();
            while !rd.is_empty() {
                server.read_tls(&mut rd).unwrap();
                server.process_new_packets()?;
            }
        }
        while server.wants_write() {
            let mut buf = Vec::new();
            server.write_tls(&mut buf).unwrap();
            moved |= !buf.is_empty();
            // read_tls takes at most a few KB per call: feed it all.
            let mut rd = buf.as_slice();
            while !rd.is_empty() {
                client.read_tls(&mut rd).unwrap();
                client.process_new_packets()?;
            }
        }
        if !moved {
            return Ok(());
        }
    }
    panic!("handshake did not settle in 20 rounds");
}

/// A full handshake, then a request and a reply; returns the group each end negotiated.
fn handshake(ends: Ends) -> (NamedGroup, NamedGroup) {
    let mut client = ClientConnection::new(
        Arc::new(ends.client),
        ServerName::try_from("a.test").unwrap(),
    )
    .unwrap();
    let mut server = ServerConnection::new(Arc::new(ends.server)).unwrap();
    pump(&mut client, &mut server).expect("handshake");
    assert!(!client.is_handshaking() && !server.is_handshaking());
    assert_eq!(client.handshake_kind(), Some(HandshakeKind::Full));

    use std::io::{Read, Write};
    client.writer().write_all(b"ping").unwrap();
    pump(&mut client, &mut server).unwrap();
    let mut got = [0; 4];
    server.reader().read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");
    server.writer().write_all(b"pong").unwrap();
    pump(&mut client, &mut server).unwrap();
    client.reader().read_exact(&mut got).unwrap();
    assert_eq!(&got, b"pong");

    (
        client.negotiated_key_exchange_group().unwrap().name(),
        server.negotiated_key_exchange_group().unwrap().name(),
    )
}

#[test]
fn kith_ends_agree_on_the_hybrid() {
    let (c, s) = handshake(ends(kx::kx_groups(true), kx::kx_groups(true)));
    assert_eq!(c, NamedGroup::X25519MLKEM768);
    assert_eq!(s, NamedGroup::X25519MLKEM768);
}

#[test]
fn pq_off_server_gets_x25519_from_a_pq_client() {
    let (c, s) = handshake(ends(kx::kx_groups(true), kx::kx_groups(false)));
    assert_eq!(c, NamedGroup::X25519);
    assert_eq!(s, NamedGroup::X25519);
}

#[test]
fn pq_off_client_gets_x25519_from_a_pq_server() {
    let (c, s) = handshake(ends(kx::kx_groups(false), kx::kx_groups(true)));
    assert_eq!(c, NamedGroup::X25519);
    assert_eq!(s, NamedGroup::X25519);
}

#[test]
fn hybrid_only_client_and_server_agree() {
    // No X25519 to fall back on: the hybrid alone carries the handshake.
    let (c, s) = handshake(ends(vec![X25519MLKEM768], vec![X25519MLKEM768]));
    assert_eq!(c, NamedGroup::X25519MLKEM768);
    assert_eq!(s, NamedGroup::X25519MLKEM768);
}

/// A client group that sends a malformed share under the hybrid's codepoint.
#[derive(Debug)]
struct Malformed(fn() -> Vec<u8>);

struct MalformedActive(Vec<u8>);

impl SupportedKxGroup for Malformed {
    fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, rustls::Error> {
        Ok(Box::new(MalformedActive((self.0)())))
    }

    fn name(&self) -> NamedGroup {
        NamedGroup::X25519MLKEM768
    }
}

impl ActiveKeyExchange for MalformedActive {
    fn complete(self: Box<Self>, _peer: &[u8]) -> Result<SharedSecret, rustls::Error> {
        Err(rustls::Error::General("never completes".into()))
    }

    fn pub_key(&self) -> &[u8] {
        &self.0
    }

    fn group(&self) -> NamedGroup {
        NamedGroup::X25519MLKEM768
    }
}

static SHORT: Malformed = Malformed(|| vec![0x42; 100]);
static LONG: Malformed = Malformed(|| vec![0x42; kx::CLIENT_SHARE_LEN + 1]);
static GARBAGE: Malformed = Malformed(|| vec![0xff; kx::CLIENT_SHARE_LEN]);

#[test]
fn server_refuses_malformed_hybrid_shares_with_an_error() {
    for bad in [&SHORT, &LONG, &GARBAGE] {
        let ends = ends(vec![bad], kx::kx_groups(true));
        let mut client = ClientConnection::new(
            Arc::new(ends.client),
            ServerName::try_from("a.test").unwrap(),
        )
        .unwrap();
        let mut server = ServerConnection::new(Arc::new(ends.server)).unwrap();
        let err = pump(&mut client, &mut server).expect_err("malformed share accepted");
        assert_eq!(
            err,
            rustls::Error::PeerMisbehaved(PeerMisbehaved::InvalidKeyShare),
            "{bad:?}"
        );
        assert!(server.is_handshaking());
    }
}
