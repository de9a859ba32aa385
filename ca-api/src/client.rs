//! A client for the CA's API: TLS 1.3 that verifies the CA's certificate as the X509-SVID
//! `spiffe://<td>/kith/ca` against a trust bundle (never by DNS name), optional client SVID,
//! and HTTP/1.1 keep-alive. Used by the CLI, the agent, the sidecar, the benchmark and tests.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use identity::TrustBundle;
use identity::tls::{AuthenticatedLater, Expect, Kx, SpiffeVerifier, Why};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the CA at {addr}: {error}")]
    Connect { addr: String, error: std::io::Error },
    #[error("tls handshake with the CA failed: {0}")]
    Tls(std::io::Error),
    #[error("http: {0}")]
    Http(String),
    #[error("bad client certificate or key: {0}")]
    Credentials(String),
    #[error(
        "the CA's bundle has SHA-256 {got}, not the pinned {expected}: wrong CA address, or someone in between"
    )]
    PinMismatch { expected: String, got: String },
}

/// What a caller reports on a renewal about the bundle it holds: the hex SHA-256 of each X.509
/// root. The CA switches to a new root only once its callers hold it.
pub fn held_roots(bundle: &TrustBundle) -> Vec<String> {
    bundle
        .x509_authorities()
        .iter()
        .map(|c| identity::digest::sha256_hex(c))
        .collect()
}

/// Client TLS settings for talking to the CA of `bundle`'s trust domain: its chain verified
/// against `bundle` (rustls-webpki), its ID exactly `spiffe://<td>/kith/ca`. ring's default
/// key-exchange groups, as the CA's API serves.
pub fn client_config(
    bundle: Arc<TrustBundle>,
    client: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<Arc<ClientConfig>, ClientError> {
    let expected = bundle
        .trust_domain()
        .id_with_path("/kith/ca")
        .map_err(|e| ClientError::Credentials(e.to_string()))?;
    let verifier = SpiffeVerifier::new(bundle, Expect::Id(expected));
    let builder = identity::tls::client_builder(Kx::Wide)
        .map_err(|e| ClientError::Credentials(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut config = match client {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| ClientError::Credentials(e.to_string()))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// First contact: fetches the CA's PEM bundle over TLS *without* trusting the server yet, and
/// accepts it only if its SHA-256 is `pin_hex` (as printed by `kith ca token create`).
///
/// SECURITY: the pin is the only thing that authenticates this response; the TLS session only
/// keeps it private. Nothing else may be read over this connection.
pub async fn fetch_bundle_pinned(addr: &str, pin_hex: &str) -> Result<TrustBundle, ClientError> {
    let config = identity::tls::client_builder(Kx::Wide)
        .map_err(|e| ClientError::Credentials(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AuthenticatedLater::new(Why::PinnedBundle)))
        .with_no_client_auth();
    let mut conn = Connection::open(addr, Arc::new(config)).await?;
    let (status, _, body) = conn
        .send(Method::GET, crate::wire::path::BUNDLE_PEM, None, &[])
        .await?;
    if status != 200 {
        return Err(ClientError::Http(format!(
            "GET /v1/bundle answered {status}"
        )));
    }
    let got = identity::digest::sha256_hex(&body);
    if !got.eq_ignore_ascii_case(pin_hex.trim()) {
        return Err(ClientError::PinMismatch {
            expected: pin_hex.trim().to_owned(),
            got,
        });
    }
    TrustBundle::parse(None, &body)
        .map_err(|e| ClientError::Http(format!("the pinned bundle does not parse: {e}")))
}

/// One keep-alive HTTP/1.1 connection to the CA.
pub struct Connection {
    sender: SendRequest<Full<Bytes>>,
}

impl Connection {
    pub async fn open(addr: &str, config: Arc<ClientConfig>) -> Result<Self, ClientError> {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|error| ClientError::Connect {
                addr: addr.into(),
                error,
            })?;
        Self::over(tcp, config).await
    }

    /// A connection over an already connected socket (e.g. one bound to a chosen source).
    pub async fn over(tcp: TcpStream, config: Arc<ClientConfig>) -> Result<Self, ClientError> {
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from("kith-ca").map_err(|e| ClientError::Http(e.to_string()))?;
        let tls = TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(ClientError::Tls)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Self { sender })
    }

    /// Sends a request and returns the status, headers and body.
    pub async fn send(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> Result<(u16, hyper::HeaderMap, Bytes), ClientError> {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "kith-ca");
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Http(e.to_string()))?;
        self.sender
            .ready()
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let resp = self
            .sender
            .send_request(req)
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?
            .to_bytes();
        Ok((status, headers, body))
    }

    /// POSTs `body` as JSON; the status and the raw answer.
    pub async fn post(
        &mut self,
        path: &str,
        body: &impl serde::Serialize,
    ) -> Result<(u16, Bytes), ClientError> {
        let body = serde_json::to_vec(body).map_err(|e| ClientError::Http(e.to_string()))?;
        let (status, _, bytes) = self.send(Method::POST, path, Some(body), &[]).await?;
        Ok((status, bytes))
    }

    pub async fn post_json(
        &mut self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<(u16, serde_json::Value), ClientError> {
        let (status, _, bytes) = self
            .send(Method::POST, path, Some(body.to_string().into_bytes()), &[])
            .await?;
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        ))
    }

    pub async fn get_json(&mut self, path: &str) -> Result<(u16, serde_json::Value), ClientError> {
        let (status, _, bytes) = self.send(Method::GET, path, None, &[]).await?;
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        ))
    }
}
