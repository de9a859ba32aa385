//! For context only: the same full mutual-TLS 1.3 handshakes (P-256 ECDSA, no resumption, one
//! thread, in memory) with both ends on kith's provider (ring + identity::kx) and with both ends
//! on rustls's aws-lc-rs provider, whose ML-KEM is C; each with the hybrid and with X25519 only,
//! in alternating rounds. Also the bare hybrid key exchange of each.
//!
//! `cargo bench --manifest-path interop/pq-awslc/Cargo.toml --target-dir target/pq-interop --
//! [seconds per round] [rounds]` (defaults 2 and 5).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::client::Resumption;
use rustls::crypto::{CryptoProvider, SupportedKxGroup};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{
    ClientConfig, ClientConnection, NamedGroup, RootCertStore, ServerConfig, ServerConnection,
};

struct Ends {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
}

fn ends(
    p: CryptoProvider,
    roots: &RootCertStore,
    chain: &[CertificateDer<'static>],
    key: &KeyPair,
) -> Ends {
    let p = Arc::new(p);
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

fn handshake(ends: &Ends, want: NamedGroup) {
    let name = ServerName::try_from("bench.test").unwrap();
    let mut c = ClientConnection::new(ends.client.clone(), name).unwrap();
    let mut s = ServerConnection::new(ends.server.clone()).unwrap();
    let mut buf = Vec::with_capacity(8192);
    while c.is_handshaking() || s.is_handshaking() || c.wants_write() || s.wants_write() {
        while c.wants_write() {
            buf.clear();
            c.write_tls(&mut buf).unwrap();
            let mut rd = buf.as_slice();
            while !rd.is_empty() {
                s.read_tls(&mut rd).unwrap();
                s.process_new_packets().unwrap();
            }
        }
        while s.wants_write() {
            buf.clear();
            s.write_tls(&mut buf).unwrap();
            let mut rd = buf.as_slice();
            while !rd.is_empty() {
                c.read_tls(&mut rd).unwrap();
                c.process_new_packets().unwrap();
            }
        }
    }
    assert_eq!(c.negotiated_key_exchange_group().unwrap().name(), want);
}

fn kx_only(group: &dyn SupportedKxGroup) {
    let client = group.start().unwrap();
    let server = group.start_and_complete(client.pub_key()).unwrap();
    let secret = client.complete(&server.pub_key).unwrap();
    assert_eq!(secret.secret_bytes(), server.secret.secret_bytes());
}

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

#[allow(deprecated)] // ring's provider: deprecated here only because prefer-post-quantum is on
fn ring(groups: Vec<&'static dyn SupportedKxGroup>) -> CryptoProvider {
    let mut p = rustls::crypto::ring::default_provider();
    p.kx_groups = groups;
    p
}

fn awslc(only: NamedGroup) -> CryptoProvider {
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.kx_groups.retain(|g| g.name() == only);
    p
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let nums: Vec<u64> = args.iter().filter_map(|a| a.parse().ok()).collect();
    let secs = Duration::from_secs(nums.first().copied().unwrap_or(2).max(1));
    let rounds = nums.get(1).copied().unwrap_or(5).max(1);

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
    let (h, x) = (NamedGroup::X25519MLKEM768, NamedGroup::X25519);
    let cases = [
        (
            "kith hybrid",
            ends(ring(identity::kx::kx_groups(true)), &roots, &chain, &key),
            h,
        ),
        (
            "kith X25519",
            ends(ring(identity::kx::kx_groups(false)), &roots, &chain, &key),
            x,
        ),
        ("aws-lc hybrid", ends(awslc(h), &roots, &chain, &key), h),
        ("aws-lc X25519", ends(awslc(x), &roots, &chain, &key), x),
    ];
    let aws_hybrid = rustls::crypto::aws_lc_rs::default_provider()
        .kx_groups
        .into_iter()
        .find(|g| g.name() == h)
        .unwrap();
    let mut hs: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    let (mut kx_kith, mut kx_aws) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        for (i, (_, e, g)) in cases.iter().enumerate() {
            hs[i].push(rate(secs, || handshake(e, *g)));
        }
        kx_kith.push(rate(secs / 2, || kx_only(identity::kx::X25519MLKEM768)));
        kx_aws.push(rate(secs / 2, || kx_only(aws_hybrid)));
    }
    println!(
        "median of {rounds} rounds of {secs:?}, one thread, full mutual TLS 1.3 handshakes/s:"
    );
    let m: Vec<f64> = hs.into_iter().map(median).collect();
    for (i, (name, _, _)) in cases.iter().enumerate() {
        println!("  {name:14} {:.0}", m[i]);
    }
    println!(
        "  hybrid/X25519: kith {:.3}, aws-lc {:.3}",
        m[0] / m[1],
        m[2] / m[3]
    );
    let (kk, ka) = (median(kx_kith), median(kx_aws));
    println!(
        "  bare X25519MLKEM768 exchanges/s: kith {kk:.0}, aws-lc {ka:.0} (kith/aws-lc {:.3})",
        kk / ka
    );
}
