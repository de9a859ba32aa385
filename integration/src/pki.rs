//! In-memory PKIs made per test with rcgen, so that no test depends on a committed private key:
//!
//! - [`Pki`]: a SPIFFE trust domain's root and signing intermediate, built from kith's own
//!   certificate templates (`identity::x509`), and the SVIDs it issues;
//! - [`operator_root`]: an operator's own root, for kith under an upstream CA;
//! - [`TlsCa`] and [`self_signed`]: plain TLS certificates for the servers kith talks to that
//!   are not part of the mesh (PostgreSQL, the Kubernetes API server, the admission webhook);
//! - [`csr`]: the certificate signing request an agent sends, for driving a CA by hand.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use identity::x509::{intermediate_params, portable_pkcs8, root_params, svid_params};
use identity::{SpiffeId, Svid, TrustBundle, TrustDomain};
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType, IsCa, Issuer,
    KeyPair,
};
use rustls_pki_types::CertificateDer;

pub const HOUR: Duration = Duration::from_secs(3600);
pub const DAY: Duration = Duration::from_secs(86_400);

pub fn now() -> SystemTime {
    SystemTime::now()
}

/// A trust domain's CA: a root and the intermediate that signs its SVIDs.
pub struct Pki {
    pub td: TrustDomain,
    pub root: CertificateDer<'static>,
    pub root_issuer: Issuer<'static, KeyPair>,
    pub intermediate: CertificateDer<'static>,
    pub issuer: Issuer<'static, KeyPair>,
    pub intermediate_params: CertificateParams,
    /// Random hex in the root's and the intermediate's names.
    pub tag: String,
}

impl Pki {
    /// A CA for `td` valid from a day ago for 30 days.
    pub fn new(td: &str) -> Self {
        Self::valid(td, now() - DAY, now() + 30 * DAY)
    }

    /// A CA for `td` whose root and intermediate are valid from `not_before` to `not_after`.
    pub fn valid(td: &str, not_before: SystemTime, not_after: SystemTime) -> Self {
        let td = TrustDomain::new(td).expect("a valid trust domain");
        // Distinct names per PKI, as real CAs have: a foreign CA must not chain by name.
        let tag = identity::x509::random_serial()
            .expect("random bytes")
            .to_bytes()[..4]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>();
        let root_key = KeyPair::generate().expect("a P-256 key");
        let rp = root_params(&td, &format!("test root {tag}"), not_before, not_after)
            .expect("root parameters");
        let root = rp.self_signed(&root_key).expect("a root").der().clone();
        let root_issuer = Issuer::new(rp, root_key);
        let ikey = KeyPair::generate().expect("a P-256 key");
        let ip = intermediate_params(&td, &format!("test signer {tag}"), not_before, not_after)
            .expect("intermediate parameters");
        let intermediate = ip
            .signed_by(&ikey, &root_issuer)
            .expect("an intermediate")
            .der()
            .clone();
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

    /// A bundle of this CA's root.
    pub fn bundle(&self) -> TrustBundle {
        TrustBundle::from_roots(self.td.clone(), vec![self.root.clone()]).expect("a bundle")
    }

    /// Signs `params` under the intermediate for a new key: chain = [leaf, intermediate].
    pub fn issue(&self, params: &CertificateParams) -> (Vec<CertificateDer<'static>>, KeyPair) {
        let key = KeyPair::generate().expect("a P-256 key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("a leaf")
            .der()
            .clone();
        (vec![cert, self.intermediate.clone()], key)
    }

    /// An SVID for `id` that names nothing else (no DNS name or address), valid from
    /// `not_before` to `not_after`.
    pub fn svid_for(
        &self,
        id: &SpiffeId,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> (Vec<CertificateDer<'static>>, KeyPair) {
        let params = svid_params(id, &[], &[], not_before, not_after).expect("SVID parameters");
        self.issue(&params)
    }

    /// A leaf for `id` (also naming `a.test` and 127.0.0.1) valid for an hour either side of now.
    pub fn leaf(&self, id: &str) -> (Vec<CertificateDer<'static>>, KeyPair) {
        self.leaf_with(id, |_| {})
    }

    /// [`Pki::leaf`] with its parameters changed by `tweak` before signing.
    pub fn leaf_with(
        &self,
        id: &str,
        tweak: impl FnOnce(&mut CertificateParams),
    ) -> (Vec<CertificateDer<'static>>, KeyPair) {
        let id = SpiffeId::new(id).expect("a valid SPIFFE ID");
        let mut params = svid_params(
            &id,
            &["a.test".into()],
            &[IpAddr::from([127, 0, 0, 1])],
            now() - HOUR,
            now() + HOUR,
        )
        .expect("SVID parameters");
        tweak(&mut params);
        self.issue(&params)
    }

    /// [`Pki::leaf`] as an [`Svid`].
    pub fn svid(&self, id: &str) -> Svid {
        let (chain, key) = self.leaf(id);
        to_svid(chain, &key)
    }
}

pub fn to_svid(chain: Vec<CertificateDer<'static>>, key: &KeyPair) -> Svid {
    Svid::new(chain, portable_pkcs8(key)).expect("a chain and its key")
}

/// An operator's own CA for `td` (kith's root template, named `common_name`), as kith takes one
/// with `--upstream-cert` and `--upstream-key`: the certificate and its key.
pub fn operator_root(
    td: &TrustDomain,
    common_name: &str,
    not_before: SystemTime,
    not_after: SystemTime,
) -> (Certificate, KeyPair) {
    let key = KeyPair::generate().expect("a P-256 key");
    let cert = root_params(td, common_name, not_before, not_after)
        .expect("root parameters")
        .self_signed(&key)
        .expect("a root");
    (cert, key)
}

/// A plain TLS CA outside the mesh: a self-signed root named `common_name` that signs server
/// certificates.
pub struct TlsCa {
    pub cert: Certificate,
    issuer: Issuer<'static, KeyPair>,
}

impl TlsCa {
    pub fn new(common_name: &str) -> Self {
        let key = KeyPair::generate().expect("a P-256 key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("parameters");
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).expect("a root");
        Self {
            cert,
            issuer: Issuer::new(params, key),
        }
    }

    /// A server certificate for `names` (DNS names or IP addresses) and its key.
    pub fn server(&self, names: &[&str]) -> (Certificate, KeyPair) {
        let key = KeyPair::generate().expect("a P-256 key");
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let cert = CertificateParams::new(names)
            .expect("valid names")
            .signed_by(&key, &self.issuer)
            .expect("a server certificate");
        (cert, key)
    }
}

/// A self-signed certificate for `names` (DNS names or IP addresses) and its key.
pub fn self_signed(names: &[&str]) -> (Certificate, KeyPair) {
    let key = KeyPair::generate().expect("a P-256 key");
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let cert = CertificateParams::new(names)
        .expect("valid names")
        .self_signed(&key)
        .expect("a certificate");
    (cert, key)
}

/// A self-signed certificate for `names` written as `tls.crt` and `tls.key` in `dir` (the file
/// names of a Kubernetes TLS Secret, as `kith inject serve` reads them): both paths and the
/// certificate.
pub fn write_tls_pair(dir: &Path, names: &[&str]) -> (PathBuf, PathBuf, CertificateDer<'static>) {
    let (cert, key) = self_signed(names);
    let (cert_path, key_path) = (dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&cert_path, cert.pem()).expect("tls.crt written");
    std::fs::write(&key_path, key.serialize_pem()).expect("tls.key written");
    (cert_path, key_path, cert.der().clone())
}

/// A CSR (PEM) for a new P-256 key with an empty subject, as kith's agents send, and the key.
pub fn csr() -> (String, KeyPair) {
    let key = KeyPair::generate().expect("a P-256 key");
    (csr_for(&key, |_| {}), key)
}

/// A CSR (PEM) with its parameters changed by `tweak`, for a new key.
pub fn csr_with(tweak: impl FnOnce(&mut CertificateParams)) -> String {
    csr_for(&KeyPair::generate().expect("a P-256 key"), tweak)
}

fn csr_for(key: &KeyPair, tweak: impl FnOnce(&mut CertificateParams)) -> String {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    tweak(&mut params);
    params
        .serialize_request(key)
        .and_then(|csr| csr.pem())
        .expect("a CSR")
}
