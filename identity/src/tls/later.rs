//! One verifier for the connections whose peer is not authenticated by its certificate during
//! the handshake, but by something else afterwards (see [`Why`]).

use rustls::DistinguishedName;
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::ServerName;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls_pki_types::{CertificateDer, UnixTime};

use super::Signatures;

/// What authenticates the peer instead of the certificate chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    /// First contact with the CA: the bundle fetched over this connection is accepted only if
    /// its SHA-256 is the pin the operator was given; nothing else is read over it.
    PinnedBundle,
    /// The CA's API as a server: a client certificate is requested but optional, and every
    /// endpoint that needs a caller identity verifies the chain itself, so that a bad
    /// certificate gets an HTTP 401 with its reason instead of a bare TLS alert.
    ChainCheckedByHttp,
    /// PostgreSQL `sslmode=require` (or `prefer`) without a root: encrypted, the server not
    /// authenticated (libpq's meaning; warned about at start).
    EncryptOnly,
}

/// Accepts any certificate chain, as a client or as a server, for the reason in [`Why`].
///
/// SECURITY: the handshake signature is still checked (the session is encrypted to whoever
/// holds the key of the certificate shown, and a client certificate that reaches the HTTP
/// layer was proven by its holder); who that is must be established by the [`Why`] before
/// anything read over the connection is trusted.
#[derive(Debug)]
pub struct AuthenticatedLater {
    why: Why,
    signatures: Signatures,
}

impl AuthenticatedLater {
    pub fn new(why: Why) -> Self {
        Self {
            why,
            signatures: Signatures::ring(),
        }
    }

    pub fn why(&self) -> Why {
        self.why
    }
}

impl ServerCertVerifier for AuthenticatedLater {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    super::signature_methods!();
}

/// As a server: a client certificate is requested, not required.
impl ClientCertVerifier for AuthenticatedLater {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    super::signature_methods!();
}
