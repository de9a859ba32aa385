//! kith's X25519MLKEM768 against rustls on aws-lc-rs, both directions, mutual TLS 1.3 in
//! memory: the handshake completes, both ends report X25519MLKEM768 as the negotiated group,
//! and application data flows both ways. An ordering slip in kith's shares or secret (ML-KEM
//! first for this group) makes the handshake fail on a bad Finished or a bad record.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::crypto::{CryptoProvider, SupportedKxGroup};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    ClientConfig, ClientConnection, HandshakeKind, NamedGroup, RootCertStore, ServerConfig,
    ServerConnection,
};

const NAME: &str = "interop.test";

/// kith's provider: ring, with kith's group list (hybrid first, X25519 second).
fn kith(groups: Vec<&'static dyn SupportedKxGroup>) -> Arc<CryptoProvider> {
    // Deprecated in this build only because rustls's `prefer-post-quantum` feature is on (for
    // aws-lc-rs): it says ring has no post-quantum group, and kith brings its own.
    #[allow(deprecated)]
    let mut p = rustls::crypto::ring::default_provider();
    p.kx_groups = groups;
    Arc::new(p)
}

/// rustls's aws-lc-rs provider as it ships, or with only `only` when given.
fn awslc(only: Option<NamedGroup>) -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    assert!(
        p.kx_groups
            .iter()
            .any(|g| g.name() == NamedGroup::X25519MLKEM768),
        "this aws-lc-rs provider has no X25519MLKEM768"
    );
    if let Some(only) = only {
        p.kx_groups.retain(|g| g.name() == only);
    }
    Arc::new(p)
}

struct Pki {
    roots: RootCertStore,
    chain: Vec<CertificateDer<'static>>,
    key: KeyPair,
}

impl Pki {
    fn new() -> Self {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "pq interop root");
        let root = ca.self_signed(&ca_key).unwrap().der().clone();
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec![NAME.to_string()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap()
            .der()
            .clone();
        let mut roots = RootCertStore::empty();
        roots.add(root).unwrap();
        Self {
            roots,
            chain: vec![leaf],
            key,
        }
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.serialize_der().into())
    }

    fn client(&self, provider: Arc<CryptoProvider>) -> ClientConfig {
        ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(self.chain.clone(), self.key())
            .unwrap()
    }

    fn server(&self, provider: Arc<CryptoProvider>) -> ServerConfig {
        let verifier = WebPkiClientVerifier::builder_with_provider(
            Arc::new(self.roots.clone()),
            provider.clone(),
        )
        .build()
        .unwrap();
        ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key())
            .unwrap()
    }
}

fn pump(client: &mut ClientConnection, server: &mut ServerConnection) {
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
                server.process_new_packets().expect("server");
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
                client.process_new_packets().expect("client");
            }
        }
        if !moved {
            return;
        }
    }
    panic!("handshake did not settle in 20 rounds");
}

/// A full mutual-TLS handshake and 64 KiB each way; asserts both ends negotiated the hybrid.
fn run(client: ClientConfig, server: ServerConfig) {
    let mut c =
        ClientConnection::new(Arc::new(client), ServerName::try_from(NAME).unwrap()).unwrap();
    let mut s = ServerConnection::new(Arc::new(server)).unwrap();
    pump(&mut c, &mut s);
    assert!(!c.is_handshaking() && !s.is_handshaking());
    assert_eq!(c.handshake_kind(), Some(HandshakeKind::Full));
    let group = |g: Option<&'static dyn SupportedKxGroup>| g.map(|g| g.name());
    assert_eq!(
        group(c.negotiated_key_exchange_group()),
        Some(NamedGroup::X25519MLKEM768)
    );
    assert_eq!(
        group(s.negotiated_key_exchange_group()),
        Some(NamedGroup::X25519MLKEM768)
    );
    assert!(s.peer_certificates().is_some_and(|c| !c.is_empty()));

    let up: Vec<u8> = (0..65_536u32).map(|i| (i % 251) as u8).collect();
    let down: Vec<u8> = up.iter().rev().copied().collect();
    let (mut got_up, mut got_down) = (Vec::new(), Vec::new());
    // In chunks: each end buffers at most 16 KiB of received plaintext unread.
    for (u, d) in up.chunks(4096).zip(down.chunks(4096)) {
        c.writer().write_all(u).unwrap();
        s.writer().write_all(d).unwrap();
        pump(&mut c, &mut s);
        let mut buf = [0; 16_384];
        while let Ok(n @ 1..) = s.reader().read(&mut buf) {
            got_up.extend_from_slice(&buf[..n]);
        }
        while let Ok(n @ 1..) = c.reader().read(&mut buf) {
            got_down.extend_from_slice(&buf[..n]);
        }
    }
    assert_eq!(got_up, up);
    assert_eq!(got_down, down);
}

#[test]
fn kith_client_to_awslc_server() {
    let pki = Pki::new();
    run(
        pki.client(kith(identity::kx::kx_groups(true))),
        pki.server(awslc(None)),
    );
}

#[test]
fn awslc_client_to_kith_server() {
    let pki = Pki::new();
    run(
        pki.client(awslc(None)),
        pki.server(kith(identity::kx::kx_groups(true))),
    );
}

/// Only the hybrid on each side: nothing else could have been negotiated.
#[test]
fn hybrid_only_both_directions() {
    let pki = Pki::new();
    let only = Some(NamedGroup::X25519MLKEM768);
    run(
        pki.client(kith(vec![identity::kx::X25519MLKEM768])),
        pki.server(awslc(only)),
    );
    run(
        pki.client(awslc(only)),
        pki.server(kith(vec![identity::kx::X25519MLKEM768])),
    );
}
