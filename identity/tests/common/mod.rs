//! An in-memory PKI per test, built from kith's own certificate templates.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use identity::x509::{intermediate_params, root_params, svid_params};
use identity::{SpiffeId, TrustBundle, TrustDomain};
use rcgen::{CertificateParams, Issuer, KeyPair};
use rustls_pki_types::CertificateDer;

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
