//! A certificate served from memory and replaced in place (renewal, reloaded files): the next
//! handshake uses the new one, established connections keep theirs.

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::refresh::{Jitter, refresh_at};

/// A certificate with the validity it is renewed by. One value, swapped whole: a reader never
/// sees a new certificate with the old certificate's dates.
#[derive(Clone)]
pub struct Current {
    pub key: Arc<CertifiedKey>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Current {
    pub fn new(key: Arc<CertifiedKey>, not_before: SystemTime, not_after: SystemTime) -> Self {
        Self {
            key,
            not_before,
            not_after,
        }
    }

    /// With the validity the leaf certificate states; `None` if the leaf does not parse.
    pub fn from_leaf(key: Arc<CertifiedKey>) -> Option<Self> {
        let (_, leaf) = x509_parser::parse_x509_certificate(key.cert.first()?).ok()?;
        let validity = leaf.validity();
        let not_before = crate::x509::from_offset(validity.not_before.to_datetime());
        let not_after = crate::x509::from_offset(validity.not_after.to_datetime());
        Some(Self::new(key, not_before, not_after))
    }

    /// When to renew it: the schedule of every SVID.
    pub fn refresh_at(&self, jitter: Jitter) -> SystemTime {
        refresh_at(self.not_before, self.not_after, jitter)
    }
}

impl fmt::Debug for Current {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Current")
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// The certificate a server presents, hot-swapped.
pub struct HotCert {
    current: ArcSwap<Current>,
}

impl HotCert {
    pub fn new(current: Current) -> Self {
        Self {
            current: ArcSwap::from_pointee(current),
        }
    }

    /// Replaces the certificate for every handshake from now on.
    pub fn store(&self, current: Current) {
        self.current.store(Arc::new(current));
    }

    pub fn load(&self) -> Arc<Current> {
        self.current.load_full()
    }
}

impl fmt::Debug for HotCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HotCert")
            .field("current", &**self.current.load())
            .finish()
    }
}

impl ResolvesServerCert for HotCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load().key.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn current(name: &str, not_after: SystemTime) -> Current {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        let der = rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let signing = rustls::crypto::ring::sign::any_supported_type(&der).expect("signing key");
        let key = Arc::new(CertifiedKey::new(vec![cert.der().clone()], signing));
        Current::new(key, SystemTime::UNIX_EPOCH, not_after)
    }

    /// Readers racing a writer that swaps two certificates see each with its own dates only.
    #[test]
    fn a_reader_never_sees_a_certificate_with_the_other_ones_dates() {
        let t = |s| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        let (a, b) = (current("a.test", t(100)), current("b.test", t(200)));
        let pairs = [
            (a.key.cert[0].clone(), a.not_after),
            (b.key.cert[0].clone(), b.not_after),
        ];
        let hot = HotCert::new(a.clone());
        std::thread::scope(|s| {
            s.spawn(|| {
                for i in 0..20_000 {
                    hot.store(if i % 2 == 0 { b.clone() } else { a.clone() });
                }
            });
            for _ in 0..2 {
                s.spawn(|| {
                    for _ in 0..20_000 {
                        let seen = hot.load();
                        let pair = (seen.key.cert[0].clone(), seen.not_after);
                        assert!(pairs.contains(&pair), "a certificate with another's dates");
                    }
                });
            }
        });
    }

    #[test]
    fn from_leaf_reads_the_dates_and_refresh_at_is_the_svid_schedule() {
        let c = current("a.test", SystemTime::UNIX_EPOCH);
        let read = Current::from_leaf(c.key.clone()).expect("a parsable leaf");
        assert!(read.not_before < read.not_after);
        assert_eq!(
            read.refresh_at(Jitter::NONE),
            refresh_at(read.not_before, read.not_after, Jitter::NONE)
        );
    }
}
