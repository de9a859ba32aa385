//! identity::tls: the SPIFFE verifier on its own (each way a peer is refused, with the typed
//! error a listener reads) and in real TLS 1.3 handshakes on loopback, on both sides.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use identity::tls::{
    self, AuthenticatedLater, ChainCache, Current, Expect, HotCert, Kx, RejectedChain,
    SpiffeVerifier, UnexpectedPeer, Why,
};
use identity::{SpiffeId, TrustBundle, VerifyError};
use integration::pki::{HOUR, Pki, now};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{CertificateError, OtherError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const WEB: &str = "spiffe://example.org/web";
const DB: &str = "spiffe://example.org/db";

fn id(s: &str) -> SpiffeId {
    SpiffeId::new(s).unwrap()
}

fn verifier(pki: &Pki, expect: Expect) -> SpiffeVerifier<Arc<TrustBundle>> {
    SpiffeVerifier::new(Arc::new(pki.bundle()), expect)
}

fn verify(
    v: &SpiffeVerifier<Arc<TrustBundle>>,
    chain: &[CertificateDer<'static>],
) -> Result<SpiffeId, rustls::Error> {
    v.verify(&chain[0], &chain[1..], UnixTime::now())
}

/// The error a verifier put inside `CertificateError::Other`.
fn other(e: &rustls::Error) -> &(dyn std::error::Error + Send + Sync + 'static) {
    match e {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(e))) => e.as_ref(),
        other => panic!("not a verifier's own error: {other:?}"),
    }
}

fn rejected(e: &rustls::Error) -> &RejectedChain {
    other(e)
        .downcast_ref::<RejectedChain>()
        .expect("a RejectedChain")
}

#[test]
fn the_exact_id_passes_and_another_is_an_unexpected_peer() {
    let pki = Pki::new("example.org");
    let (chain, _) = pki.leaf(WEB);
    assert_eq!(
        verify(&verifier(&pki, Expect::Id(id(WEB))), &chain).unwrap(),
        id(WEB)
    );
    assert_eq!(
        verify(&verifier(&pki, Expect::TrustDomain), &chain).unwrap(),
        id(WEB)
    );

    let err = verify(&verifier(&pki, Expect::Id(id(DB))), &chain).unwrap_err();
    let u = other(&err)
        .downcast_ref::<UnexpectedPeer>()
        .expect("UnexpectedPeer");
    assert_eq!((u.got.clone(), u.expected.as_str()), (id(WEB), DB));
}

#[test]
fn a_foreign_trust_domain_an_expired_svid_and_an_unknown_ca_are_rejected_chains() {
    let pki = Pki::new("example.org");
    let v = verifier(&pki, Expect::TrustDomain);

    let (foreign, _) = pki.leaf("spiffe://evil.org/web");
    let err = verify(&v, &foreign).unwrap_err();
    let r = rejected(&err);
    assert!(
        matches!(r.error, VerifyError::WrongTrustDomain { .. }),
        "{err}"
    );
    assert_eq!(r.id, Some(id("spiffe://evil.org/web")));

    let (expired, _) = pki.svid_for(&id(WEB), now() - 2 * HOUR, now() - HOUR);
    let err = verify(&v, &expired).unwrap_err();
    let r = rejected(&err);
    assert!(matches!(r.error, VerifyError::Expired { .. }), "{err}");
    assert_eq!(
        r.id,
        Some(id(WEB)),
        "an expired SVID still says whose it is"
    );

    let (unknown, _) = Pki::new("example.org").leaf(WEB);
    let err = verify(&v, &unknown).unwrap_err();
    assert_eq!(rejected(&err).error, VerifyError::UnknownCa, "{err}");
}

#[test]
fn a_cached_chain_is_taken_again_but_a_new_bundle_version_verifies_afresh() {
    /// A bundle that the test replaces, as the proxy's identity handle does on a publish.
    #[derive(Clone, Debug)]
    struct Versioned(Arc<std::sync::Mutex<(Arc<TrustBundle>, u64)>>);
    impl tls::BundleSource for Versioned {
        fn with_bundle<R>(&self, f: impl FnOnce(&TrustBundle, u64) -> R) -> Option<R> {
            let (bundle, version) = self.0.lock().unwrap().clone();
            Some(f(&bundle, version))
        }
    }
    let (pki, other_pki) = (Pki::new("example.org"), Pki::new("example.org"));
    let source = Versioned(Arc::new(std::sync::Mutex::new((Arc::new(pki.bundle()), 1))));
    let v = SpiffeVerifier::new(source.clone(), Expect::TrustDomain)
        .with_cache(Arc::new(ChainCache::default()));
    let (chain, _) = pki.leaf(WEB);
    for _ in 0..2 {
        assert_eq!(
            v.verify(&chain[0], &chain[1..], UnixTime::now()).unwrap(),
            id(WEB)
        );
    }
    // SECURITY: a new bundle without the chain's root ends the cached verdict.
    *source.0.lock().unwrap() = (Arc::new(other_pki.bundle()), 2);
    let err = v
        .verify(&chain[0], &chain[1..], UnixTime::now())
        .unwrap_err();
    assert_eq!(rejected(&err).error, VerifyError::UnknownCa);
}

fn certified(chain: Vec<CertificateDer<'static>>, key: &rcgen::KeyPair) -> CertifiedKey {
    let der = PrivateKeyDer::Pkcs8(key.serialize_der().into());
    CertifiedKey::new(
        chain,
        rustls::crypto::ring::sign::any_supported_type(&der).unwrap(),
    )
}

/// A server presenting `server` (through a HotCert) and verifying clients with `verifier`, on
/// loopback; each accepted connection echoes one byte. Returns the address and a task that
/// yields each handshake's result.
async fn serve(
    server: (Vec<CertificateDer<'static>>, rcgen::KeyPair),
    client_verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
) -> (
    std::net::SocketAddr,
    tokio::task::JoinHandle<Result<Option<SpiffeId>, std::io::Error>>,
) {
    let (chain, key) = server;
    let hot = Arc::new(HotCert::new(
        Current::from_leaf(Arc::new(certified(chain, &key))).unwrap(),
    ));
    let config = tls::server_builder(Kx::Hybrid)
        .unwrap()
        .with_client_cert_verifier(client_verifier)
        .with_cert_resolver(hot);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        let mut tls = TlsAcceptor::from(Arc::new(config)).accept(tcp).await?;
        let peer = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| identity::check_svid_leaf(&c[0]).ok());
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await?;
        tls.write_all(&byte).await?;
        tls.shutdown().await?;
        Ok(peer)
    });
    (addr, task)
}

async fn connect(
    addr: std::net::SocketAddr,
    server_verifier: Arc<dyn rustls::client::danger::ServerCertVerifier>,
    client: (Vec<CertificateDer<'static>>, rcgen::KeyPair),
) -> Result<(), std::io::Error> {
    let (chain, key) = client;
    // Not `with_client_auth_cert`, which would refuse a chain and a key that do not match.
    let config = tls::client_builder(Kx::Hybrid)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(server_verifier)
        .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(certified(chain, &key))));
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("kith").unwrap();
    let mut tls = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await?;
    tls.write_all(b"x").await?;
    let mut byte = [0u8; 1];
    tls.read_exact(&mut byte).await?;
    assert_eq!(&byte, b"x");
    Ok(())
}

/// The verifier's own error inside the io::Error of a failed handshake.
fn tls_error(e: &std::io::Error) -> &rustls::Error {
    e.get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .unwrap_or_else(|| panic!("not a TLS error: {e:?}"))
}

#[tokio::test]
async fn mutual_tls_on_loopback_verifies_both_sides() {
    let pki = Pki::new("example.org");
    let bundle = Arc::new(pki.bundle());
    let (addr, server) = serve(
        pki.leaf(DB),
        Arc::new(SpiffeVerifier::new(bundle.clone(), Expect::TrustDomain)),
    )
    .await;
    let expect_db = Arc::new(SpiffeVerifier::new(bundle, Expect::Id(id(DB))));
    connect(addr, expect_db, pki.leaf(WEB)).await.unwrap();
    assert_eq!(server.await.unwrap().unwrap(), Some(id(WEB)));
}

#[tokio::test]
async fn the_client_refuses_the_wrong_server_and_the_server_a_foreign_client() {
    let pki = Pki::new("example.org");
    let bundle = Arc::new(pki.bundle());
    let server_verifier = || Arc::new(SpiffeVerifier::new(bundle.clone(), Expect::TrustDomain));

    // Client side: the server is a valid SVID, but not the one expected.
    let (addr, server) = serve(pki.leaf(WEB), server_verifier()).await;
    let expect_db = Arc::new(SpiffeVerifier::new(bundle.clone(), Expect::Id(id(DB))));
    let err = connect(addr, expect_db.clone(), pki.leaf(WEB))
        .await
        .unwrap_err();
    let u = other(tls_error(&err))
        .downcast_ref::<UnexpectedPeer>()
        .expect("UnexpectedPeer");
    assert_eq!(u.got, id(WEB));
    assert!(server.await.unwrap().is_err());

    // Server side: the client's SVID comes from another CA of the same name.
    let (addr, server) = serve(pki.leaf(DB), server_verifier()).await;
    let foreign = Pki::new("example.org").leaf(WEB);
    assert!(connect(addr, expect_db, foreign).await.is_err());
    let err = server.await.unwrap().unwrap_err();
    let r = rejected(tls_error(&err));
    assert_eq!(
        (r.error.clone(), r.id.clone()),
        (VerifyError::UnknownCa, Some(id(WEB)))
    );
}

#[tokio::test]
async fn authenticated_later_accepts_any_chain_but_still_needs_the_key() {
    let pki = Pki::new("example.org");
    let (addr, server) = serve(
        pki.leaf(DB),
        Arc::new(AuthenticatedLater::new(Why::ChainCheckedByHttp)),
    )
    .await;
    // Any server (here one of a foreign CA) and any client chain pass the handshake.
    let foreign = Pki::new("elsewhere.org").leaf("spiffe://elsewhere.org/x");
    let later = Arc::new(AuthenticatedLater::new(Why::PinnedBundle));
    connect(addr, later.clone(), foreign).await.unwrap();
    assert_eq!(
        server.await.unwrap().unwrap(),
        Some(id("spiffe://elsewhere.org/x"))
    );

    // SECURITY: a chain shown without its key fails on the handshake signature.
    let (addr, server) = serve(
        pki.leaf(DB),
        Arc::new(AuthenticatedLater::new(Why::ChainCheckedByHttp)),
    )
    .await;
    let (stolen, _) = pki.leaf(WEB);
    let (_, wrong_key) = pki.leaf(WEB);
    let _ = connect(addr, later, (stolen, wrong_key)).await;
    let err = server.await.unwrap().unwrap_err();
    assert!(
        matches!(
            tls_error(&err),
            rustls::Error::InvalidCertificate(CertificateError::BadSignature)
        ),
        "{err:?}"
    );
}
