//! One SPIFFE verifier for both sides of a handshake: the peer's chain must be an X509-SVID of
//! the current trust bundle (rustls-webpki inside [`crate::verify_x509_svid`]), and its ID what
//! this side expects.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::ServerName;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DistinguishedName, OtherError};
use rustls_pki_types::{CertificateDer, UnixTime};

use super::Signatures;
use crate::{SpiffeId, TrustBundle, VerifyError};

/// Where a verifier reads the trust bundle, per handshake.
pub trait BundleSource: fmt::Debug + Send + Sync {
    /// Runs `f` on the bundle to verify against now and its version, which keys the
    /// [`ChainCache`] (a new version forgets every chain verified before). `None` when there is
    /// no bundle yet: the handshake fails closed.
    fn with_bundle<R>(&self, f: impl FnOnce(&TrustBundle, u64) -> R) -> Option<R>;
}

/// A fixed bundle (version 0).
impl BundleSource for Arc<TrustBundle> {
    fn with_bundle<R>(&self, f: impl FnOnce(&TrustBundle, u64) -> R) -> Option<R> {
        Some(f(self, 0))
    }
}

/// Which peer this side accepts, once its chain verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Exactly this SPIFFE ID.
    Id(SpiffeId),
    /// Any workload of the bundle's trust domain.
    TrustDomain,
}

impl Expect {
    pub fn check(&self, id: &SpiffeId) -> Result<(), UnexpectedPeer> {
        match self {
            // The trust domain was already enforced by `verify_x509_svid`.
            Self::TrustDomain => Ok(()),
            Self::Id(expected) if expected == id => Ok(()),
            Self::Id(expected) => Err(UnexpectedPeer {
                got: id.clone(),
                expected: expected.to_string(),
            }),
        }
    }
}

/// A peer chain the verifier refused, with the SPIFFE ID its leaf names where it can be read
/// (for the refusal log: an expired or foreign SVID still says whose it is).
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct RejectedChain {
    pub id: Option<SpiffeId>,
    #[source]
    pub error: VerifyError,
}

/// The peer presented a valid SVID, but not the identity this side expects.
#[derive(Debug, thiserror::Error)]
#[error("peer is {got}, expected {expected}")]
pub struct UnexpectedPeer {
    pub got: SpiffeId,
    pub expected: String,
}

/// Peer chains that verified under one bundle version, so that a peer that connects again
/// costs no chain verification (two signature checks with kith's chains); its handshake
/// signature, the proof that it holds the key, is still checked every time.
#[derive(Default)]
pub struct ChainCache(Mutex<Chains>);

#[derive(Default)]
struct Chains {
    version: u64,
    chains: HashMap<Vec<u8>, Verified>,
}

struct Verified {
    id: SpiffeId,
    /// Outside this window some certificate of the chain or a root is not valid: verify again.
    from: SystemTime,
    until: SystemTime,
}

/// Chains remembered at most (about 1.3 KB each with kith's two-certificate chains).
const CACHED_CHAINS: usize = 1024;

impl fmt::Debug for ChainCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let chains = self.at(None);
        f.debug_struct("ChainCache")
            .field("version", &chains.version)
            .field("chains", &chains.chains.len())
            .finish()
    }
}

impl ChainCache {
    /// The chains, forgetting everything verified under another bundle version first.
    fn at(&self, version: Option<u64>) -> MutexGuard<'_, Chains> {
        let mut chains = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(version) = version.filter(|v| *v != chains.version) {
            chains.version = version;
            chains.chains.clear();
        }
        chains
    }

    fn get(&self, version: u64, key: &[u8], at: SystemTime) -> Option<SpiffeId> {
        let chains = self.at(Some(version));
        let v = chains.chains.get(key)?;
        (v.from <= at && at <= v.until).then(|| v.id.clone())
    }

    /// The SPIFFE ID of a chain this cache holds as verified, whatever the bundle version and
    /// clock: for a handshake that just verified `end_entity`, the ID its leaf names, without
    /// parsing the certificate again. The ID is read off the leaf's exact DER, so an entry
    /// for the same bytes always names the same ID. `None` when the chain is not held (never
    /// verified through this cache, or since forgotten).
    pub fn verified_id(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Option<SpiffeId> {
        let key = chain_key(end_entity, intermediates);
        let chains = self.at(None);
        chains.chains.get(&key).map(|v| v.id.clone())
    }

    fn insert(&self, version: u64, key: Vec<u8>, verified: Verified) {
        let mut chains = self.at(Some(version));
        if chains.chains.len() >= CACHED_CHAINS {
            chains.chains.clear();
        }
        chains.chains.insert(key, verified);
    }
}

/// Validates a peer chain against `source`'s current bundle at `now` and returns its SPIFFE
/// ID, through `cache` when given. A refused chain is a [`RejectedChain`] inside
/// `CertificateError::Other`, so that a listener can tell the reason and the peer.
pub fn verify_chain(
    source: &impl BundleSource,
    cache: Option<&ChainCache>,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
) -> Result<SpiffeId, rustls::Error> {
    source
        .with_bundle(|bundle, version| {
            verify_with(bundle, version, cache, end_entity, intermediates, now)
        })
        .unwrap_or_else(|| Err(rustls::Error::General("no identity yet".into())))
}

fn verify_with(
    bundle: &TrustBundle,
    version: u64,
    cache: Option<&ChainCache>,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
) -> Result<SpiffeId, rustls::Error> {
    let at = SystemTime::UNIX_EPOCH + Duration::from_secs(now.as_secs());
    let key = cache.map(|_| chain_key(end_entity, intermediates));
    if let (Some(cache), Some(key)) = (cache, &key)
        && let Some(id) = cache.get(version, key, at)
    {
        return Ok(id);
    }
    let mut chain = Vec::with_capacity(1 + intermediates.len());
    chain.push(end_entity.clone());
    chain.extend(intermediates.iter().cloned());
    // SECURITY: rustls-webpki validates the chain inside verify_x509_svid; the error travels
    // as an OtherError so that the listener can count the refusal by its reason.
    let id = crate::verify_x509_svid(&chain, bundle, at).map_err(|error| {
        invalid(RejectedChain {
            id: crate::check_svid_leaf(end_entity).ok(),
            error,
        })
    })?;
    if let (Some(cache), Some(key)) = (cache, key)
        && let Some((from, until)) = crate::verdict_window(&chain, bundle, at)
    {
        let entry = Verified {
            id: id.clone(),
            from,
            until,
        };
        cache.insert(version, key, entry);
    }
    Ok(id)
}

/// SECURITY: every certificate's exact DER, length-prefixed: only the very same chain, under
/// the same bundle, within its validity, is taken as verified.
fn chain_key(end_entity: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>]) -> Vec<u8> {
    let mut key = Vec::with_capacity(
        8 + end_entity.len() + intermediates.iter().map(|c| 4 + c.len()).sum::<usize>(),
    );
    for cert in std::iter::once(end_entity).chain(intermediates) {
        key.extend_from_slice(&u32::try_from(cert.len()).unwrap_or(u32::MAX).to_be_bytes());
        key.extend_from_slice(cert);
    }
    key
}

fn invalid(e: impl std::error::Error + Send + Sync + 'static) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// Verifies a peer's X509-SVID against the bundle of `S` and an [`Expect`]ation, as a server
/// (client certificate mandatory) or as a client.
///
/// SECURITY: as a client the server name is ignored on purpose; an SVID is identified by its
/// URI SAN only.
#[derive(Debug)]
pub struct SpiffeVerifier<S> {
    source: S,
    expect: Expect,
    cache: Option<Arc<ChainCache>>,
    signatures: Signatures,
}

impl<S: BundleSource> SpiffeVerifier<S> {
    pub fn new(source: S, expect: Expect) -> Self {
        Self {
            source,
            expect,
            cache: None,
            signatures: Signatures::ring(),
        }
    }

    /// Remembers verified chains in `cache` (which may be shared by many verifiers).
    pub fn with_cache(mut self, cache: Arc<ChainCache>) -> Self {
        self.cache = Some(cache);
        self
    }

    /// The chain verified and the expectation checked: the peer's SPIFFE ID.
    pub fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<SpiffeId, rustls::Error> {
        let cache = self.cache.as_deref();
        let id = verify_chain(&self.source, cache, end_entity, intermediates, now)?;
        self.expect.check(&id).map_err(invalid)?;
        Ok(id)
    }
}

impl<S: BundleSource> ServerCertVerifier for SpiffeVerifier<S> {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.verify(end_entity, intermediates, now)?;
        Ok(ServerCertVerified::assertion())
    }

    super::signature_methods!();
}

/// As a server: a client certificate is mandatory (rustls's default for a verifier that
/// offers client auth).
impl<S: BundleSource> ClientCertVerifier for SpiffeVerifier<S> {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verify(end_entity, intermediates, now)?;
        Ok(ClientCertVerified::assertion())
    }

    super::signature_methods!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expect_checks_the_exact_id() {
        let a = SpiffeId::new("spiffe://example.test/a").expect("id");
        let b = SpiffeId::new("spiffe://example.test/b").expect("id");
        assert!(Expect::Id(a.clone()).check(&a).is_ok());
        let e = Expect::Id(a).check(&b).expect_err("wrong id");
        assert_eq!(e.got, b);
        assert!(Expect::TrustDomain.check(&b).is_ok());
    }

    #[test]
    fn the_cache_forgets_other_versions_and_expired_windows() {
        let id = SpiffeId::new("spiffe://example.test/a").expect("id");
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let cache = ChainCache::default();
        let entry = |id: &SpiffeId| Verified {
            id: id.clone(),
            from: t,
            until: t + Duration::from_secs(10),
        };
        cache.insert(1, b"chain".to_vec(), entry(&id));
        assert_eq!(cache.get(1, b"chain", t), Some(id.clone()));
        assert_eq!(cache.get(1, b"chain", t + Duration::from_secs(11)), None);
        assert_eq!(cache.get(1, b"other", t), None);
        assert_eq!(cache.get(2, b"chain", t), None);
        assert_eq!(cache.get(1, b"chain", t), None, "forgotten with version 1");
    }

    #[test]
    fn verified_id_names_only_the_exact_chain_held() {
        let id = SpiffeId::new("spiffe://example.test/a").expect("id");
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let (leaf, ca) = (
            CertificateDer::from(vec![1, 2]),
            CertificateDer::from(vec![3]),
        );
        let cache = ChainCache::default();
        assert_eq!(cache.verified_id(&leaf, std::slice::from_ref(&ca)), None);
        let entry = Verified {
            id: id.clone(),
            from: t,
            until: t + Duration::from_secs(10),
        };
        cache.insert(7, chain_key(&leaf, std::slice::from_ref(&ca)), entry);
        assert_eq!(
            cache.verified_id(&leaf, std::slice::from_ref(&ca)),
            Some(id)
        );
        // The same bytes cut differently, or another chain, is not the chain held.
        let (cut_leaf, cut_ca) = (
            CertificateDer::from(vec![1]),
            CertificateDer::from(vec![2, 3]),
        );
        assert_eq!(cache.verified_id(&cut_leaf, &[cut_ca]), None);
        assert_eq!(cache.verified_id(&leaf, &[]), None);
    }
}
