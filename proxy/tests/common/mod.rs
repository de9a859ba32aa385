//! The kit's in-memory PKI per test, plus loopback harness: echo backend, proxies on
//! 127.0.0.1:0, a raw TLS client, and the kit's `eventually_async`.
#![allow(dead_code, clippy::unwrap_used)]

use std::time::Duration;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use identity::x509::portable_pkcs8;
use identity::{Svid, TrustBundle};
use proxy::{ExpectedPeer, IdentityHandle, Limits, Metrics, Policy};
use rcgen::KeyPair;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

// The kit, for the tests that `use common::*` (not every test uses all of it).
#[allow(unused_imports)]
pub use integration::eventually_async;
#[allow(unused_imports)]
pub use integration::pki::{DAY, HOUR, Pki, now, to_svid};

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

/// How long a test waits for what it expects to happen soon.
pub const WAIT: Duration = Duration::from_secs(5);

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
