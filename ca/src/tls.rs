//! TLS for the CA's API: TLS 1.3 only (ring), the CA's own X509-SVID as server certificate
//! (hot-swapped when it renews), and client certificates requested but judged by the HTTP
//! layer, so that a bad client certificate gets a JSON refusal with its reason.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use identity::SpiffeId;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};

use crate::authority::{Authority, AuthorityError};

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The CA's serving certificate, swapped in place when it renews.
pub struct ServingCert {
    current: ArcSwap<CertifiedKey>,
    not_after: ArcSwap<SystemTime>,
    not_before: ArcSwap<SystemTime>,
}

impl fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServingCert").finish_non_exhaustive()
    }
}

impl ServingCert {
    /// Issues the CA's own SVID (`spiffe://<td>/kith/ca` plus `dns`) from its own signer.
    pub fn issue(
        authority: &Authority,
        dns: &[String],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Self, AuthorityError> {
        let (key, not_after) = make(authority, dns, ttl, now)?;
        Ok(Self {
            current: ArcSwap::from_pointee(key),
            not_after: ArcSwap::from_pointee(not_after),
            not_before: ArcSwap::from_pointee(now),
        })
    }

    pub fn renew(
        &self,
        authority: &Authority,
        dns: &[String],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<(), AuthorityError> {
        let (key, not_after) = make(authority, dns, ttl, now)?;
        self.current.store(Arc::new(key));
        self.not_after.store(Arc::new(not_after));
        self.not_before.store(Arc::new(now));
        Ok(())
    }

    /// When to renew it: the same schedule as every SVID.
    pub fn refresh_at(&self) -> SystemTime {
        identity::refresh_at(
            **self.not_before.load(),
            **self.not_after.load(),
            identity::Jitter::NONE,
        )
    }
}

fn make(
    authority: &Authority,
    dns: &[String],
    ttl: Duration,
    now: SystemTime,
) -> Result<(CertifiedKey, SystemTime), AuthorityError> {
    let id = authority
        .trust_domain()
        .id_with_path("/kith/ca")
        .map_err(|e| AuthorityError::Cert(e.to_string()))?;
    let key = identity::KeyType::P256
        .generate()
        .map_err(|e| AuthorityError::Cert(e.to_string()))?;
    let issued = authority.sign(&id, &key, dns, ttl, now)?;
    let der = PrivateKeyDer::Pkcs8(identity::x509::portable_pkcs8(&key));
    let signing = provider()
        .key_provider
        .load_private_key(der)
        .map_err(|e| AuthorityError::Cert(e.to_string()))?;
    Ok((CertifiedKey::new(issued.chain, signing), issued.not_after))
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// Requests a client certificate and checks the handshake signature (proof that the client
/// holds the key), but leaves the chain to `identity::verify_x509_svid` in the HTTP layer.
///
/// SECURITY: accepting any chain here is safe only because every endpoint that needs a caller
/// identity calls `verify_x509_svid` on the peer chain before reading it; unauthenticated
/// endpoints (bundle, attest) use no peer identity at all. This is what lets the CA answer a
/// certificate from another CA with a 401 and a reason, instead of a bare TLS alert.
#[derive(Debug)]
pub struct DeferredClientAuth {
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for DeferredClientAuth {
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

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // TLS 1.2 is compiled out; never reached.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The API's TLS configuration: TLS 1.3 only, HTTP/1.1.
pub fn server_config(cert: Arc<ServingCert>) -> Result<Arc<ServerConfig>, rustls::Error> {
    let provider = provider();
    let mut config = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(DeferredClientAuth { provider }))
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // SECURITY: no resumption. A resumed session presents no certificate, so an evicted or
    // expired client identity would live on for the ticket's lifetime.
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(Arc::new(config))
}

/// The verified identity of a connection's client certificate.
#[derive(Clone, Debug)]
pub enum Peer {
    None,
    Verified {
        id: SpiffeId,
        not_before: SystemTime,
        not_after: SystemTime,
        serial: Vec<u8>,
    },
    Refused(identity::VerifyError),
}

impl Peer {
    pub fn from_chain(
        chain: Option<&[CertificateDer<'static>]>,
        bundle: &identity::TrustBundle,
        now: SystemTime,
    ) -> Self {
        let Some(chain) = chain.filter(|c| !c.is_empty()) else {
            return Peer::None;
        };
        match identity::verify_x509_svid(chain, bundle, now) {
            Ok(id) => match x509_parser::parse_x509_certificate(&chain[0]) {
                Ok((_, c)) => Peer::Verified {
                    id,
                    not_before: identity::x509::from_offset(c.validity().not_before.to_datetime()),
                    not_after: identity::x509::from_offset(c.validity().not_after.to_datetime()),
                    serial: c.raw_serial().to_vec(),
                },
                Err(e) => Peer::Refused(identity::VerifyError::Malformed {
                    index: 0,
                    detail: e.to_string(),
                }),
            },
            Err(e) => Peer::Refused(e),
        }
    }
}
