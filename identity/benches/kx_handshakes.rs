//! Full TLS 1.3 handshakes per second, in memory on one thread, with the post-quantum hybrid
//! X25519MLKEM768 and with X25519 only, in alternating rounds of the same run (so that other
//! load on the machine hits both alike), and the ratio. Like the mesh hop: mutual TLS with
//! P-256 ECDSA certificates, ring, no resumption, both ends kith.
//!
//! `cargo bench -p identity --bench kx_handshakes -- [seconds per round] [rounds]`
//! (defaults 3 and 5). Also the bare key exchange (client start, server encapsulate, client
//! decapsulate) per second, without TLS around it.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use identity::kx::{self, X25519MLKEM768};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::client::Resumption;
use rustls::crypto::{CryptoProvider, SupportedKxGroup};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

struct Ends {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
}

fn ends(pq: bool, roots: &RootCertStore, chain: &[CertificateDer<'static>], key: &KeyPair) -> Ends {
    let mut p = rustls::crypto::ring::default_provider();
    p.kx_groups = kx::kx_groups(pq);
    let p: Arc<CryptoProvider> = Arc::new(p);
    let der = || PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let mut client = ClientConfig::builder_with_provider(p.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots.clone())
        .with_client_auth_cert(chain.to_vec(), der())
        .unwrap();
    client.resumption = Resumption::disabled();
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots.clone()), p.clone())
        .build()
        .unwrap();
    let mut server = ServerConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.to_vec(), der())
        .unwrap();
    server.send_tls13_tickets = 0;
    server.session_storage = Arc::new(NoServerSessionStorage {});
    Ends {
        client: Arc::new(client),
        server: Arc::new(server),
    }
}

fn handshake(ends: &Ends, want: rustls::NamedGroup) {
    let name = ServerName::try_from("bench.test").unwrap();
    let mut c = ClientConnection::new(ends.client.clone(), name).unwrap();
    let mut s = ServerConnection::new(ends.server.clone()).unwrap();
    let mut buf = Vec::with_capacity(8192);
    while c.is_handshaking() || s.is_handshaking() || c.wants_write() || s.wants_write() {
        while c.wants_write() {
            buf.clear();
            c.write_tls(&mut buf).unwrap();
            // read_tls takes at most a few KB per call: feed it all.
            let mut rd = buf.as_slice();
            while !rd.is_empty() {
                s.read_tls(&mut rd).unwrap();
                s.process_new_packets().unwrap();
            }
        }
        while s.wants_write() {
            buf.clear();
            s.write_tls(&mut buf).unwrap();
            // read_tls takes at most a few KB per call: feed it all.
            let mut rd = buf.as_slice();
            while !rd.is_empty() {
                c.read_tls(&mut rd).unwrap();
                c.process_new_packets().unwrap();
            }
        }
    }
    assert_eq!(c.negotiated_key_exchange_group().unwrap().name(), want);
}

fn kx_only(group: &'static dyn SupportedKxGroup) {
    let client = group.start().unwrap();
    let server = group.start_and_complete(client.pub_key()).unwrap();
    let secret = client.complete(&server.pub_key).unwrap();
    assert_eq!(secret.secret_bytes(), server.secret.secret_bytes());
}

/// Runs `f` for `d`; operations per second.
fn rate(d: Duration, mut f: impl FnMut()) -> f64 {
    let began = Instant::now();
    let mut n = 0u64;
    while began.elapsed() < d {
        f();
        n += 1;
    }
    n as f64 / began.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes `--bench`; without it (`cargo test --benches`) one short round, as
    // a smoke test.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let nums: Vec<u64> = args.iter().filter_map(|a| a.parse().ok()).collect();
    let (secs, rounds) = if args.iter().any(|a| a == "--bench") {
        let secs = Duration::from_secs(nums.first().copied().unwrap_or(3).max(1));
        (secs, nums.get(1).copied().unwrap_or(5).max(1))
    } else {
        (Duration::from_millis(200), 1)
    };

    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "bench root");
    let root = ca.self_signed(&ca_key).unwrap().der().clone();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["bench.test".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap()
        .der()
        .clone();
    let mut roots = RootCertStore::empty();
    roots.add(root).unwrap();
    let chain = vec![leaf];
    let pq = ends(true, &roots, &chain, &key);
    let classic = ends(false, &roots, &chain, &key);

    let (mut hs_pq, mut hs_x, mut kx_pq, mut kx_x) = (vec![], vec![], vec![], vec![]);
    for round in 1..=rounds {
        hs_pq.push(rate(secs, || {
            handshake(&pq, rustls::NamedGroup::X25519MLKEM768)
        }));
        hs_x.push(rate(secs, || {
            handshake(&classic, rustls::NamedGroup::X25519)
        }));
        kx_pq.push(rate(secs / 2, || kx_only(X25519MLKEM768)));
        kx_x.push(rate(secs / 2, || {
            kx_only(rustls::crypto::ring::kx_group::X25519)
        }));
        println!(
            "round {round}: handshakes/s X25519MLKEM768 {:.0}, X25519 {:.0}; key exchanges/s {:.0}, {:.0}",
            hs_pq[hs_pq.len() - 1],
            hs_x[hs_x.len() - 1],
            kx_pq[kx_pq.len() - 1],
            kx_x[kx_x.len() - 1]
        );
    }
    let (hp, hx, kp, kx) = (median(hs_pq), median(hs_x), median(kx_pq), median(kx_x));
    println!(
        "median of {rounds} rounds of {:?}, one thread, mutual TLS 1.3 full handshakes (P-256 ECDSA, ring):",
        secs
    );
    println!("  X25519MLKEM768: {hp:.0} handshakes/s");
    println!("  X25519 only:    {hx:.0} handshakes/s");
    println!("  ratio hybrid/X25519: {:.3}", hp / hx);
    println!(
        "  bare key exchange: X25519MLKEM768 {kp:.0}/s, X25519 {kx:.0}/s (ratio {:.3})",
        kp / kx
    );
}
