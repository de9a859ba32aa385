//! An in-memory PKI per test (copied from identity/tests/common), plus loopback harness:
//! echo backend, proxies on 127.0.0.1:0, a raw TLS client, and `eventually`.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use identity::x509::{intermediate_params, portable_pkcs8, root_params, svid_params};
use identity::{SpiffeId, Svid, TrustBundle, TrustDomain};
use proxy::{ExpectedPeer, IdentityHandle, Limits, Metrics, Policy};
use rcgen::{CertificateParams, Issuer, KeyPair};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub const HOUR: Duration = Duration::from_secs(3600);
pub const DAY: Duration = Duration::from_secs(86_400);

pub struct Pki {
    pub td: TrustDomain,
    pub root: CertificateDer<'static>,
    pub root_issuer: Issuer<'static, KeyPair>,
    pub intermediate: CertificateDer<'static>,
    pub issuer: Issuer<'static, KeyPair>,
    pub intermediate_params: CertificateParams,
    pub tag: String,
}

pub fn now() -> SystemTime {
    SystemTime::now()
}

impl Pki {
    pub fn new(td: &str) -> Self {
        Self::valid(td, now() - DAY, now() + 30 * DAY)
    }

    pub fn valid(td: &str, not_before: SystemTime, not_after: SystemTime) -> Self {
        let td = TrustDomain::new(td).unwrap();
        // Distinct names per PKI, as real CAs have: a foreign CA must not chain by name.
        let tag = identity::x509::random_serial().unwrap().to_bytes()[..4]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>();
        let root_key = KeyPair::generate().unwrap();
        let rp = root_params(&td, &format!("test root {tag}"), not_before, not_after).unwrap();
        let root = rp.self_signed(&root_key).unwrap().der().clone();
        let root_issuer = Issuer::new(rp, root_key);
        let ikey = KeyPair::generate().unwrap();
        let ip =
            intermediate_params(&td, &format!("test signer {tag}"), not_before, not_after).unwrap();
        let intermediate = ip.signed_by(&ikey, &root_issuer).unwrap().der().clone();
        let issuer = Issuer::new(ip.clone(), ikey);
        Self {
            td,
            root,
            root_issuer,
            intermediate,
            issuer,
            intermediate_params: ip,
            tag,
        }
    }

    pub fn bundle(&self) -> TrustBundle {
        TrustBundle::from_roots(self.td.clone(), vec![self.root.clone()]).unwrap()
    }

    /// A leaf for `id` valid around now, with its key, chain = [leaf, intermediate].
    pub fn leaf(&self, id: &str) -> (Vec<CertificateDer<'static>>, KeyPair) {
        self.leaf_with(id, |_| {})
    }

    pub fn leaf_with(
        &self,
        id: &str,
        tweak: impl FnOnce(&mut CertificateParams),
    ) -> (Vec<CertificateDer<'static>>, KeyPair) {
        let id = SpiffeId::new(id).unwrap();
        let mut params = svid_params(
            &id,
            &["a.test".into()],
            &["127.0.0.1".parse::<IpAddr>().unwrap()],
            now() - HOUR,
            now() + HOUR,
        )
        .unwrap();
        tweak(&mut params);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap().der().clone();
        (vec![cert, self.intermediate.clone()], key)
    }
}

impl Pki {
    /// A validated-looking SVID for `id` (the proxy validates it again on publish).
    pub fn svid(&self, id: &str) -> Svid {
        let (chain, key) = self.leaf(id);
        to_svid(chain, &key)
    }
}

pub fn to_svid(chain: Vec<CertificateDer<'static>>, key: &KeyPair) -> Svid {
    Svid::new(chain, portable_pkcs8(key)).unwrap()
}

/// An identity handle with `svid` published under `bundle`.
pub fn handle(svid: Svid, bundle: TrustBundle) -> IdentityHandle {
    let h = IdentityHandle::new();
    h.publish(svid, bundle, now()).unwrap();
    h
}

pub fn limits() -> Limits {
    Limits {
        identity_hold: Duration::from_millis(300),
        ..Limits::default()
    }
}

/// An echo server that passes on half-close: echoes until EOF, then shuts down its writes.
pub async fn echo_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

pub struct Running {
    pub addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    pub shutdown: CancellationToken,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub async fn inbound(identity: IdentityHandle, policy: Policy, forward: SocketAddr) -> Running {
    inbound_with(identity, policy, forward, limits()).await
}

pub async fn inbound_with(
    identity: IdentityHandle,
    policy: Policy,
    forward: SocketAddr,
    limits: Limits,
) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let metrics = Arc::new(Metrics::default());
    let shutdown = CancellationToken::new();
    tokio::spawn(proxy::serve_inbound(
        listener,
        identity,
        policy,
        forward,
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

pub async fn outbound(
    identity: IdentityHandle,
    connect: SocketAddr,
    expect: ExpectedPeer,
) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let metrics = Arc::new(Metrics::default());
    let shutdown = CancellationToken::new();
    tokio::spawn(proxy::serve_outbound(
        listener,
        identity,
        connect.into(),
        expect,
        limits(),
        metrics.clone(),
        shutdown.clone(),
    ));
    Running {
        addr,
        metrics,
        shutdown,
    }
}

/// Sends `data`, half-closes, and reads the reply to EOF (or to an error).
pub async fn round_trip(addr: SocketAddr, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(data).await?;
    s.shutdown().await?;
    let mut got = Vec::new();
    s.read_to_end(&mut got).await?;
    Ok(got)
}

/// Polls `check` for up to 5 s.
pub async fn eventually<F: Fn() -> bool>(what: &str, check: F) {
    for _ in 0..500 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never happened: {what}");
}

pub async fn within<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .expect("timed out")
}

/// A TLS client that presents `cert` (or nothing) and accepts any server: for testing what
/// the inbound side refuses.
pub fn raw_client(cert: Option<(Vec<CertificateDer<'static>>, &KeyPair)>) -> Arc<ClientConfig> {
    let builder = ClientConfig::builder_with_provider(proxy::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer));
    let mut config = match cert {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, PrivateKeyDer::Pkcs8(portable_pkcs8(key)))
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![proxy::tls::ALPN.to_vec()];
    Arc::new(config)
}

/// Connects with `config`, sends a byte, and reads: Ok(bytes) if the server let it through.
pub async fn tls_attempt(addr: SocketAddr, config: Arc<ClientConfig>) -> std::io::Result<Vec<u8>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?;
    tls.write_all(b"x").await?;
    tls.shutdown().await?;
    let mut got = Vec::new();
    tls.read_to_end(&mut got).await?;
    Ok(got)
}

#[derive(Debug)]
struct AnyServer;

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        proxy::tls::provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
