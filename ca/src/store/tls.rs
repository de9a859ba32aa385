//! TLS to PostgreSQL with rustls (ring provider): tokio-postgres's `MakeTlsConnect` over
//! tokio-rustls, so no OpenSSL is linked.
//!
//! tokio-postgres itself understands `sslmode=disable|prefer|require`; libpq's stricter
//! `verify-ca` and `verify-full` are read here first (and passed on as `require`):
//!
//! - `verify-full` / `verify-ca`: the server's certificate must chain to `sslrootcert` (a PEM
//!   file, required) and name the host connected to. kith checks the name for both: a
//!   certificate of another server signed by the same CA is not this database.
//! - `require` with `sslrootcert`: verified as above (libpq does the same).
//! - `require` / `prefer` without `sslrootcert`: encrypted but the server is not
//!   authenticated; logged as a warning at start.
//! - `disable`: plain TCP; logged as a warning unless every host is loopback or a Unix socket.

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use identity::tls::{AuthenticatedLater, Kx, Why};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

use super::StoreError;

/// How the connection string asked for TLS, after kith read the modes tokio-postgres lacks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verify {
    /// Certificate chain to `sslrootcert` and host name checked.
    Full(PathBuf),
    /// Encrypted only (or plain, per sslmode): the server is not authenticated.
    None,
}

/// Splits kith's own TLS parameters out of a connection string: `sslmode=verify-full` (and
/// `verify-ca`) become `require`, `sslrootcert=FILE` is removed; returns the string
/// tokio-postgres gets and how to verify the server.
pub fn split_url(url: &str) -> Result<(String, Verify), StoreError> {
    let bad = |m: String| StoreError::Db(format!("the store's connection string: {m}"));
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, q),
        None => (url, ""),
    };
    let mut kept = Vec::new();
    let mut mode = None;
    let mut root = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "sslmode" => mode = Some(v.to_owned()),
            "sslrootcert" => root = Some(PathBuf::from(percent_decode(v))),
            _ => kept.push(pair.to_owned()),
        }
    }
    let (pg_mode, verify) = match (mode.as_deref(), root) {
        (Some("verify-full" | "verify-ca"), Some(r)) => ("require", Verify::Full(r)),
        (Some("verify-full" | "verify-ca"), None) => {
            return Err(bad(
                "sslmode=verify-full needs sslrootcert=FILE (the PEM of the CA that signed the database's certificate)".into(),
            ));
        }
        (Some("require"), Some(r)) => ("require", Verify::Full(r)),
        (Some(m @ ("disable" | "prefer" | "require")), _) => (m, Verify::None),
        (None, Some(r)) => ("require", Verify::Full(r)),
        (None, None) => ("prefer", Verify::None),
        (Some(other), _) => {
            return Err(bad(format!(
                "sslmode={other} is not one of disable, prefer, require, verify-ca, verify-full"
            )));
        }
    };
    kept.push(format!("sslmode={pg_mode}"));
    Ok((format!("{base}?{}", kept.join("&")), verify))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(hex) = b.get(i + 1..i + 3)
            && let Ok(v) = u8::from_str_radix(std::str::from_utf8(hex).unwrap_or("-"), 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The rustls client configuration for `verify`: TLS 1.3 (the only version this build of
/// rustls has), ring's default key-exchange groups (PostgreSQL 15 refuses an X25519-only
/// hello).
pub fn client_config(verify: &Verify) -> Result<Arc<ClientConfig>, StoreError> {
    let builder = identity::tls::client_builder(Kx::Wide)
        .map_err(|e| StoreError::Db(format!("TLS setup: {e}")))?;
    let config = match verify {
        Verify::Full(path) => {
            let pem = std::fs::read(path).map_err(|e| {
                StoreError::Db(format!("cannot read sslrootcert {}: {e}", path.display()))
            })?;
            let certs = identity::pem::certificates(&pem)
                .map_err(|e| StoreError::Db(format!("sslrootcert {}: {e}", path.display())))?;
            let mut roots = RootCertStore::empty();
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| StoreError::Db(format!("sslrootcert {}: {e}", path.display())))?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        // SECURITY: `sslmode=require` without a root: the handshake's signatures are checked
        // (the session is really encrypted to whoever holds the certificate's key) but not who
        // that is, as libpq does; warned about at start.
        Verify::None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AuthenticatedLater::new(Why::EncryptOnly)))
            .with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// tokio-postgres's TLS factory over rustls.
#[derive(Clone)]
pub struct MakeRustls {
    config: Arc<ClientConfig>,
}

impl MakeRustls {
    pub fn new(config: Arc<ClientConfig>) -> Self {
        Self { config }
    }
}

impl<S> MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, io::Error> {
        let name = ServerName::try_from(domain.to_owned())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        Ok(RustlsConnect {
            config: self.config.clone(),
            name,
        })
    }
}

pub struct RustlsConnect {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let tls = tokio_rustls::TlsConnector::from(self.config)
                .connect(self.name, stream)
                .await?;
            Ok(RustlsStream(Box::new(tls)))
        })
    }
}

pub struct RustlsStream<S>(Box<tokio_rustls::client::TlsStream<S>>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kith_reads_the_verify_modes_and_passes_the_rest_on() {
        let (u, v) = split_url("postgres://h1,h2/db?sslmode=verify-full&sslrootcert=%2Fca.pem&target_session_attrs=read-write").unwrap();
        assert_eq!(v, Verify::Full("/ca.pem".into()));
        assert_eq!(
            u,
            "postgres://h1,h2/db?target_session_attrs=read-write&sslmode=require"
        );
        assert!(split_url("postgres://h/db?sslmode=verify-full").is_err());
        assert!(split_url("postgres://h/db?sslmode=allow-everything").is_err());
        let (u, v) = split_url("postgres://h/db").unwrap();
        assert_eq!(
            (u.as_str(), v),
            ("postgres://h/db?sslmode=prefer", Verify::None)
        );
        let (u, v) = split_url("postgres://h/db?sslmode=disable").unwrap();
        assert_eq!(
            (u.as_str(), v),
            ("postgres://h/db?sslmode=disable", Verify::None)
        );
    }
}
