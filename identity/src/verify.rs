//! X509-SVID verification: rustls-webpki validates the chain against the trust bundle, then the
//! X509-SVID leaf rules are checked and the SPIFFE ID is read. Chain validation is never written
//! by hand here.

use std::fmt;
use std::time::SystemTime;

use rustls_pki_types::{CertificateDer, UnixTime};
use webpki::{EndEntityCert, ExtendedKeyUsageValidator, KeyPurposeIdIter};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use crate::bundle::TrustBundle;
use crate::spiffe_id::{IdError, SpiffeId, TrustDomain};
use crate::x509::from_offset;

/// Why a certificate chain is not a valid X509-SVID for a trust bundle. `reason()` is a stable
/// snake_case label for metrics and logs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("the chain is empty")]
    EmptyChain,
    #[error("certificate {index} in the chain is malformed: {detail}")]
    Malformed { index: usize, detail: String },
    #[error("certificate expired at {}", rfc3339(*not_after))]
    Expired { not_after: SystemTime },
    #[error("trust bundle root \"{subject}\" expired at {}", rfc3339(*not_after))]
    RootExpired {
        subject: String,
        not_after: SystemTime,
    },
    #[error("certificate is not valid before {}", rfc3339(*not_before))]
    NotYetValid { not_before: SystemTime },
    #[error(
        "no path to a root of the trust bundle (issued by an unknown CA, or the intermediate is missing)"
    )]
    UnknownCa,
    #[error(
        "a signature in the chain does not verify (wrong intermediate or tampered certificate)"
    )]
    BadSignature,
    #[error("not an X509-SVID: {0}")]
    NotSvid(#[from] NotSvid),
    #[error("spiffe id {id} is not in the trust domain {expected} of the bundle")]
    WrongTrustDomain { id: SpiffeId, expected: TrustDomain },
    #[error("invalid chain: {0}")]
    BadChain(String),
}

/// The X509-SVID leaf rule a certificate breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotSvid {
    #[error("the leaf has no URI SAN (an X509-SVID carries its SPIFFE ID as the one URI SAN)")]
    NoUriSan,
    #[error("the leaf has {0} URI SANs; an X509-SVID has exactly one")]
    MultipleUriSans(usize),
    #[error("the URI SAN {uri:?} is not a SPIFFE ID: {error}")]
    InvalidId { uri: String, error: IdError },
    #[error("the SPIFFE ID {0} has no path; a leaf must identify a workload, not a trust domain")]
    RootId(SpiffeId),
    #[error("the leaf is a CA certificate (basicConstraints cA=true)")]
    LeafIsCa,
    #[error("the leaf has no keyUsage extension; digitalSignature is required")]
    NoKeyUsage,
    #[error("the leaf's keyUsage lacks digitalSignature")]
    NoDigitalSignature,
    #[error("the leaf's keyUsage has keyCertSign, which only CA certificates may set")]
    KeyCertSign,
    #[error("the leaf's keyUsage has cRLSign, which only CA certificates may set")]
    CrlSign,
    #[error("the leaf's extendedKeyUsage lacks {0}")]
    MissingEku(&'static str),
    #[error("the leaf's extensions do not parse: {0}")]
    BadExtension(String),
}

impl VerifyError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::EmptyChain | Self::Malformed { .. } => "malformed",
            Self::Expired { .. } | Self::RootExpired { .. } => "expired",
            Self::NotYetValid { .. } => "not_yet_valid",
            Self::UnknownCa => "unknown_ca",
            Self::BadSignature => "bad_signature",
            Self::NotSvid(_) => "not_svid",
            Self::WrongTrustDomain { .. } => "wrong_trust_domain",
            Self::BadChain(_) => "bad_chain",
        }
    }

    /// The reason with the broken leaf rule, e.g. `not_svid(multiple_uri_sans)`.
    pub fn detailed_reason(&self) -> String {
        match self {
            Self::NotSvid(rule) => format!("not_svid({})", rule.rule()),
            other => other.reason().to_owned(),
        }
    }
}

impl NotSvid {
    pub fn rule(&self) -> &'static str {
        match self {
            Self::NoUriSan => "no_uri_san",
            Self::MultipleUriSans(_) => "multiple_uri_sans",
            Self::InvalidId { .. } => "invalid_spiffe_id",
            Self::RootId(_) => "no_path",
            Self::LeafIsCa => "leaf_is_ca",
            Self::NoKeyUsage => "no_key_usage",
            Self::NoDigitalSignature => "no_digital_signature",
            Self::KeyCertSign => "key_cert_sign",
            Self::CrlSign => "crl_sign",
            Self::MissingEku(_) => "missing_eku",
            Self::BadExtension(_) => "bad_extension",
        }
    }
}

/// Verifies that `chain` (leaf first, then intermediates) is an X509-SVID issued under `bundle`
/// at time `now`, and returns its SPIFFE ID.
pub fn verify_x509_svid(
    chain: &[CertificateDer<'_>],
    bundle: &TrustBundle,
    now: SystemTime,
) -> Result<SpiffeId, VerifyError> {
    let (leaf, intermediates) = chain.split_first().ok_or(VerifyError::EmptyChain)?;
    for (index, cert) in chain.iter().enumerate() {
        x509_parser::parse_x509_certificate(cert).map_err(|e| VerifyError::Malformed {
            index,
            detail: e.to_string(),
        })?;
    }
    let ee = EndEntityCert::try_from(leaf).map_err(|e| VerifyError::Malformed {
        index: 0,
        detail: e.to_string(),
    })?;
    let time = UnixTime::since_unix_epoch(
        now.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default(),
    );

    // Roots that have expired are not trusted; but when only an expired root would complete
    // the path, say so instead of "unknown CA".
    let (live, expired): (Vec<_>, Vec<_>) = bundle
        .x509_authorities()
        .iter()
        .partition(|root| !root_expired(root, now));
    let verify = |roots: &[&CertificateDer<'static>]| {
        let anchors = roots
            .iter()
            .filter_map(|r| webpki::anchor_from_trusted_cert(r).ok())
            .collect::<Vec<_>>();
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            intermediates,
            time,
            AnyEku,
            None,
            None,
        )
        .map(|_| ())
    };
    if let Err(e) = verify(&live) {
        if !expired.is_empty() && verify(&expired).is_ok() {
            let root = expired
                .iter()
                .find(|r| verify(&[r]).is_ok())
                .unwrap_or(&expired[0]);
            let (subject, not_after) = subject_and_expiry(root);
            return Err(VerifyError::RootExpired { subject, not_after });
        }
        return Err(map_webpki(e));
    }

    let id = check_svid_leaf(leaf)?;
    if !id.is_member_of(bundle.trust_domain()) {
        return Err(VerifyError::WrongTrustDomain {
            id,
            expected: bundle.trust_domain().clone(),
        });
    }
    Ok(id)
}

/// The times between which [`verify_x509_svid`]'s answer for `chain` under `bundle` cannot
/// change, as far as time goes: from the latest notBefore in the chain to the earliest notAfter
/// in the chain and among the bundle's roots still valid at `now`. Lets a verifier remember a
/// chain it accepted (the sidecar, for peers that connect again). `None` when a certificate
/// does not parse.
pub fn verdict_window(
    chain: &[CertificateDer<'_>],
    bundle: &TrustBundle,
    now: SystemTime,
) -> Option<(SystemTime, SystemTime)> {
    let mut from = SystemTime::UNIX_EPOCH;
    let mut until = None::<SystemTime>;
    let mut bound = |t: SystemTime| until = Some(until.map_or(t, |u| u.min(t)));
    for cert in chain {
        let (_, cert) = x509_parser::parse_x509_certificate(cert).ok()?;
        from = from.max(from_offset(cert.validity().not_before.to_datetime()));
        bound(from_offset(cert.validity().not_after.to_datetime()));
    }
    for root in bundle.x509_authorities() {
        let (_, root) = x509_parser::parse_x509_certificate(root).ok()?;
        let not_after = from_offset(root.validity().not_after.to_datetime());
        if not_after >= now {
            bound(not_after);
        }
    }
    Some((from, until?))
}

/// Checks the X509-SVID leaf rules alone (no chain validation) and returns the SPIFFE ID.
/// Used after chain validation, and by `kith certs inspect` to explain a certificate.
pub fn check_svid_leaf(leaf: &[u8]) -> Result<SpiffeId, VerifyError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(leaf).map_err(|e| VerifyError::Malformed {
            index: 0,
            detail: e.to_string(),
        })?;
    check_parsed_leaf(&cert).map_err(VerifyError::NotSvid)
}

pub(crate) fn check_parsed_leaf(cert: &X509Certificate<'_>) -> Result<SpiffeId, NotSvid> {
    let bad = |e: x509_parser::error::X509Error| NotSvid::BadExtension(e.to_string());
    let uris: Vec<&str> = uri_sans(cert).map_err(bad)?;
    let uri = match uris.as_slice() {
        [] => return Err(NotSvid::NoUriSan),
        [one] => *one,
        many => return Err(NotSvid::MultipleUriSans(many.len())),
    };
    let id = SpiffeId::new(uri).map_err(|error| NotSvid::InvalidId {
        uri: uri.to_owned(),
        error,
    })?;
    if id.path().is_empty() {
        return Err(NotSvid::RootId(id));
    }
    if cert.is_ca() {
        return Err(NotSvid::LeafIsCa);
    }
    let ku = cert.key_usage().map_err(bad)?.ok_or(NotSvid::NoKeyUsage)?;
    if !ku.value.digital_signature() {
        return Err(NotSvid::NoDigitalSignature);
    }
    if ku.value.key_cert_sign() {
        return Err(NotSvid::KeyCertSign);
    }
    if ku.value.crl_sign() {
        return Err(NotSvid::CrlSign);
    }
    // X509-SVID 4.4: EKU is optional, but when present it must allow both TLS roles.
    if let Some(eku) = cert.extended_key_usage().map_err(bad)? {
        let eku = eku.value;
        if !eku.any && !eku.server_auth {
            return Err(NotSvid::MissingEku("serverAuth"));
        }
        if !eku.any && !eku.client_auth {
            return Err(NotSvid::MissingEku("clientAuth"));
        }
    }
    Ok(id)
}

pub(crate) fn uri_sans<'a>(
    cert: &'a X509Certificate<'_>,
) -> Result<Vec<&'a str>, x509_parser::error::X509Error> {
    Ok(cert
        .subject_alternative_name()?
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

fn root_expired(root: &CertificateDer<'_>, now: SystemTime) -> bool {
    match x509_parser::parse_x509_certificate(root) {
        Ok((_, cert)) => from_offset(cert.validity().not_after.to_datetime()) < now,
        Err(_) => false,
    }
}

fn subject_and_expiry(root: &CertificateDer<'_>) -> (String, SystemTime) {
    match x509_parser::parse_x509_certificate(root) {
        Ok((_, cert)) => (
            cert.subject().to_string(),
            from_offset(cert.validity().not_after.to_datetime()),
        ),
        Err(_) => (String::new(), SystemTime::UNIX_EPOCH),
    }
}

fn map_webpki(e: webpki::Error) -> VerifyError {
    use webpki::Error as E;
    let unix = |t: UnixTime| SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(t.as_secs());
    match e {
        E::CertExpired { not_after, .. } => VerifyError::Expired {
            not_after: unix(not_after),
        },
        E::CertNotValidYet { not_before, .. } => VerifyError::NotYetValid {
            not_before: unix(not_before),
        },
        E::UnknownIssuer => VerifyError::UnknownCa,
        E::InvalidSignatureForPublicKey
        | E::UnsupportedSignatureAlgorithmForPublicKeyContext(_)
        | E::SignatureAlgorithmMismatch => VerifyError::BadSignature,
        E::CaUsedAsEndEntity => VerifyError::NotSvid(NotSvid::LeafIsCa),
        E::EndEntityUsedAsCa => {
            VerifyError::BadChain("a leaf certificate was given as an intermediate".into())
        }
        E::BadDer | E::BadDerTime | E::TrailingData(_) => VerifyError::Malformed {
            index: 0,
            detail: e.to_string(),
        },
        other => VerifyError::BadChain(format!("{other:?}")),
    }
}

/// The chain is validated for any key purpose: the X509-SVID EKU rule is checked on the leaf
/// afterwards, so a leaf with the wrong EKU gets a specific reason. A malformed EKU still fails.
struct AnyEku;

impl ExtendedKeyUsageValidator for AnyEku {
    fn validate(&self, iter: KeyPurposeIdIter<'_, '_>) -> Result<(), webpki::Error> {
        for purpose in iter {
            purpose?;
        }
        Ok(())
    }
}

pub(crate) fn rfc3339(t: SystemTime) -> impl fmt::Display {
    struct D(SystemTime);
    impl fmt::Display for D {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            let t = crate::x509::to_offset(self.0);
            match t.format(&time::format_description::well_known::Rfc3339) {
                Ok(s) => f.write_str(&s),
                Err(_) => write!(f, "{}", t.unix_timestamp()),
            }
        }
    }
    D(t)
}
