//! TLS for the CA's API: TLS 1.3 only (ring, its default key-exchange groups), the CA's own
//! X509-SVID as server certificate (hot-swapped when it renews), and client certificates
//! requested but judged by the HTTP layer, so that a bad client certificate gets a JSON
//! refusal with its reason.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use identity::SpiffeId;
use identity::tls::{AuthenticatedLater, Current, HotCert, Kx, Why};
use rustls::ServerConfig;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::authority::{Authority, AuthorityError};

/// Issues the CA's own SVID (`spiffe://<td>/kith/ca` plus `dns`) from its own signer, to
/// serve from a [`HotCert`] (first with `HotCert::new`, on renewal with `HotCert::store`).
/// Renewed on the schedule of every SVID, from `now` (its issue time) to its expiry.
pub fn serving_cert(
    authority: &Authority,
    dns: &[String],
    ttl: Duration,
    now: SystemTime,
) -> Result<Current, AuthorityError> {
    let id = authority
        .trust_domain()
        .id_with_path("/kith/ca")
        .map_err(|e| AuthorityError::Cert(e.to_string()))?;
    let key = identity::KeyType::P256
        .generate()
        .map_err(|e| AuthorityError::Cert(e.to_string()))?;
    let issued = authority.sign(&id, &key, dns, ttl, now)?;
    let der = PrivateKeyDer::Pkcs8(identity::x509::portable_pkcs8(&key));
    let signing = rustls::crypto::ring::sign::any_supported_type(&der)
        .map_err(|e| AuthorityError::Cert(e.to_string()))?;
    let key = Arc::new(CertifiedKey::new(issued.chain, signing));
    Ok(Current::new(key, now, issued.not_after))
}

/// The API's TLS configuration: TLS 1.3 only, HTTP/1.1.
pub fn server_config(cert: Arc<HotCert>) -> Result<Arc<ServerConfig>, rustls::Error> {
    // SECURITY: any client chain passes the handshake (its signature still proves the key);
    // this is safe only because every endpoint that needs a caller identity calls
    // `verify_x509_svid` on the peer chain (`Peer::from_chain`) before reading it, and the
    // unauthenticated endpoints (bundle, attest) use no peer identity at all. This is what
    // lets the CA answer a certificate from another CA with a 401 and a reason.
    let verifier = AuthenticatedLater::new(Why::ChainCheckedByHttp);
    let mut config = identity::tls::server_builder(Kx::Wide)?
        .with_client_cert_verifier(Arc::new(verifier))
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
