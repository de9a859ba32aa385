//! An X509-SVID with its private key: what a workload presents.

use std::time::SystemTime;

use rcgen::{KeyPair, PublicKeyData};
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use zeroize::Zeroizing;

use crate::pem::{self, PemError};
use crate::spiffe_id::SpiffeId;
use crate::verify::{NotSvid, check_parsed_leaf};
use crate::x509::from_offset;

/// A leaf X509-SVID, the intermediates up to (not including) a root, and the leaf's PKCS#8 key.
/// The key's bytes are wiped from memory when the SVID is dropped, and so are the PEM texts
/// made from it.
pub struct Svid {
    id: SpiffeId,
    chain: Vec<CertificateDer<'static>>,
    key: Zeroizing<PrivatePkcs8KeyDer<'static>>,
    not_after: SystemTime,
}

#[derive(Debug, thiserror::Error)]
pub enum SvidError {
    #[error("certificate chain is empty")]
    EmptyChain,
    #[error(transparent)]
    Pem(#[from] PemError),
    #[error("leaf certificate does not parse: {0}")]
    Malformed(String),
    #[error("leaf is not an X509-SVID: {0}")]
    NotSvid(#[from] NotSvid),
    #[error("private key does not parse: {0}")]
    BadKey(String),
    #[error("private key does not belong to the leaf certificate")]
    KeyMismatch,
}

impl Svid {
    /// Checks that the leaf follows the X509-SVID leaf rules and that the key is the leaf's.
    /// The chain is not validated against a bundle here: that is `verify_x509_svid`'s job.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivatePkcs8KeyDer<'static>,
    ) -> Result<Self, SvidError> {
        let key = Zeroizing::new(key);
        let leaf = chain.first().ok_or(SvidError::EmptyChain)?;
        let (_, cert) = x509_parser::parse_x509_certificate(leaf)
            .map_err(|e| SvidError::Malformed(e.to_string()))?;
        let id = check_parsed_leaf(&cert)?;
        let pair =
            Zeroizing::new(KeyPair::try_from(&*key).map_err(|e| SvidError::BadKey(e.to_string()))?);
        if pair.subject_public_key_info() != cert.public_key().raw {
            return Err(SvidError::KeyMismatch);
        }
        let not_after = from_offset(cert.validity().not_after.to_datetime());
        Ok(Self {
            id,
            chain,
            key,
            not_after,
        })
    }

    pub fn from_pem(chain_pem: &[u8], key_pem: &[u8]) -> Result<Self, SvidError> {
        Self::new(pem::certificates(chain_pem)?, pem::private_key(key_pem)?)
    }

    /// Reads a SPIFFE filesystem-delivery credential bundle: one PRIVATE KEY block, then the
    /// chain leaf first.
    pub fn from_credential_bundle(input: &[u8]) -> Result<Self, SvidError> {
        let key = pem::private_key(input)?;
        let chain = pem::certificates(strip_key_block(input))?;
        Self::new(chain, key)
    }

    /// The SPIFFE filesystem-delivery credential bundle: the key, then the chain.
    pub fn to_credential_bundle(&self) -> Zeroizing<String> {
        let key = self.key_pem();
        let chain = self.chain_pem();
        // One allocation of the final size: no partial copy of the key is left behind.
        let mut out = Zeroizing::new(String::with_capacity(key.len() + chain.len()));
        out.push_str(&key);
        out.push_str(&chain);
        out
    }

    pub fn chain_pem(&self) -> String {
        pem::encode_certificates(&self.chain)
    }

    pub fn key_pem(&self) -> Zeroizing<String> {
        pem::encode_secret("PRIVATE KEY", self.key.secret_pkcs8_der())
    }

    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    pub fn leaf(&self) -> &CertificateDer<'static> {
        // `new` refuses an empty chain.
        &self.chain[0]
    }

    pub fn key(&self) -> &PrivatePkcs8KeyDer<'static> {
        &self.key
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }
}

impl std::fmt::Debug for Svid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // SECURITY: never print the private key.
        f.debug_struct("Svid")
            .field("id", &self.id)
            .field("chain_len", &self.chain.len())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

fn strip_key_block(input: &[u8]) -> &[u8] {
    let end = b"-----END PRIVATE KEY-----";
    match input.windows(end.len()).position(|w| w == end) {
        Some(i) => &input[i + end.len()..],
        None => input,
    }
}
