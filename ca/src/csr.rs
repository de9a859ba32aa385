//! Certificate signing requests: proof of possession and policy. The CA uses only the CSR's
//! public key; everything else in a certificate is the CA's decision. A CSR that *asks* for
//! something the CA would not grant (CA:true, another SPIFFE ID) is refused rather than
//! silently ignored, so a confused or malicious client learns it at once.

use rcgen::SubjectPublicKeyInfo;
use rustls_pki_types::CertificateSigningRequestDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::error::X509Error;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey as ParsedKey;

use identity::SpiffeId;

pub const MAX_CSR_BYTES: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    #[error("csr is not a PEM or DER PKCS#10 request")]
    Garbage,
    #[error("csr is larger than {MAX_CSR_BYTES} bytes")]
    TooLarge,
    #[error("csr signature does not verify (no proof of possession of the key)")]
    BadSignature,
    #[error("csr asks for a CA certificate; kith issues leaf SVIDs only")]
    RequestsCa,
    #[error("csr asks for {asked}, but this caller may only get {allowed}")]
    WrongId { asked: String, allowed: String },
    #[error("csr asks for a SAN the CA does not grant: {0}")]
    ExtraSan(String),
    #[error("csr key is too weak: {0}")]
    WeakKey(String),
    #[error("csr key type is not supported: {0}")]
    UnsupportedKey(String),
    #[error("csr carries an extension the CA does not accept")]
    UnsupportedExtension,
}

impl CsrError {
    pub fn code(&self) -> &'static str {
        match self {
            Self::Garbage => "csr_malformed",
            Self::TooLarge => "csr_too_large",
            Self::BadSignature => "csr_bad_signature",
            Self::RequestsCa => "csr_requests_ca",
            Self::WrongId { .. } => "csr_wrong_id",
            Self::ExtraSan(_) => "csr_extra_san",
            Self::WeakKey(_) => "csr_weak_key",
            Self::UnsupportedKey(_) => "csr_unsupported_key",
            Self::UnsupportedExtension => "csr_unsupported_extension",
        }
    }
}

/// Parses a CSR (PEM text or DER bytes) once, checks its signature and policy, and returns the
/// only thing the CA takes from it: the public key.
pub fn check_csr(input: &[u8], expected: &SpiffeId) -> Result<SubjectPublicKeyInfo, CsrError> {
    if input.len() > MAX_CSR_BYTES {
        return Err(CsrError::TooLarge);
    }
    let der = if input.starts_with(b"-----BEGIN") {
        CertificateSigningRequestDer::from_pem_slice(input).map_err(|_| CsrError::Garbage)?
    } else {
        CertificateSigningRequestDer::from(input.to_vec())
    };
    let (rest, req) =
        X509CertificationRequest::from_der(der.as_ref()).map_err(|_| CsrError::Garbage)?;
    if !rest.is_empty() {
        return Err(CsrError::Garbage);
    }
    check_key_strength(&req.certification_request_info.subject_pki)?;
    // Proof of possession: the request is signed by the key it carries.
    req.verify_signature().map_err(|e| match e {
        X509Error::SignatureUnsupportedAlgorithm => {
            CsrError::UnsupportedKey("signature algorithm".into())
        }
        _ => CsrError::BadSignature,
    })?;
    for ext in req.requested_extensions().into_iter().flatten() {
        match ext {
            ParsedExtension::BasicConstraints(bc) if bc.ca => return Err(CsrError::RequestsCa),
            ParsedExtension::BasicConstraints(_)
            | ParsedExtension::KeyUsage(_)
            | ParsedExtension::ExtendedKeyUsage(_) => {}
            ParsedExtension::SubjectAlternativeName(san) => {
                for name in &san.general_names {
                    match name {
                        GeneralName::URI(uri) if *uri == expected.as_str() => {}
                        GeneralName::URI(uri) => {
                            return Err(CsrError::WrongId {
                                asked: (*uri).to_owned(),
                                allowed: expected.to_string(),
                            });
                        }
                        // DNS names come from registration entries, never from the requester.
                        other => return Err(CsrError::ExtraSan(other.to_string())),
                    }
                }
            }
            _ => return Err(CsrError::UnsupportedExtension),
        }
    }
    SubjectPublicKeyInfo::from_der(req.certification_request_info.subject_pki.raw)
        .map_err(|e| CsrError::UnsupportedKey(e.to_string()))
}

/// ECDSA P-256/P-384 and Ed25519 are accepted; RSA only from 2048 bits.
fn check_key_strength(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> Result<(), CsrError> {
    match spki.parsed() {
        Ok(ParsedKey::RSA(rsa)) if rsa.key_size() < 2048 => Err(CsrError::WeakKey(format!(
            "RSA {} bits (at least 2048 required)",
            rsa.key_size()
        ))),
        Ok(ParsedKey::RSA(_)) => Ok(()),
        Ok(ParsedKey::EC(_)) => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|o| o.to_id_string())
                .unwrap_or_default();
            match curve.as_str() {
                "1.2.840.10045.3.1.7" | "1.3.132.0.34" => Ok(()),
                "1.2.840.10045.3.1.1" | "1.3.132.0.33" => {
                    Err(CsrError::WeakKey(format!("EC curve {curve}")))
                }
                other => Err(CsrError::UnsupportedKey(format!("EC curve {other}"))),
            }
        }
        _ if spki.algorithm.algorithm.to_id_string() == "1.3.101.112" => Ok(()),
        _ => Err(CsrError::UnsupportedKey(
            spki.algorithm.algorithm.to_id_string(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, IsCa, KeyPair, SanType};

    fn id() -> SpiffeId {
        SpiffeId::new("spiffe://td/web").unwrap()
    }

    fn csr(tweak: impl FnOnce(&mut CertificateParams)) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        tweak(&mut p);
        p.serialize_request(&key).unwrap().der().to_vec()
    }

    #[test]
    fn a_plain_csr_gives_its_key() {
        assert!(check_csr(&csr(|_| {}), &id()).is_ok());
        let with_id = csr(|p| {
            p.subject_alt_names = vec![SanType::URI("spiffe://td/web".try_into().unwrap())]
        });
        assert!(check_csr(&with_id, &id()).is_ok());
        let key = KeyPair::generate().unwrap();
        let pem = CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        assert!(check_csr(pem.as_bytes(), &id()).is_ok());
    }

    #[test]
    fn each_bad_csr_has_its_code() {
        let mut bad_sig = csr(|_| {});
        let n = bad_sig.len();
        bad_sig[n - 3] ^= 0x55;
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"garbage".to_vec(), "csr_malformed"),
            (vec![0u8; MAX_CSR_BYTES + 1], "csr_too_large"),
            (bad_sig, "csr_bad_signature"),
            (
                csr(|p| p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained)),
                "csr_requests_ca",
            ),
            (
                csr(|p| {
                    p.subject_alt_names =
                        vec![SanType::URI("spiffe://td/admin".try_into().unwrap())]
                }),
                "csr_wrong_id",
            ),
            (
                csr(|p| {
                    p.subject_alt_names = vec![SanType::DnsName("evil.com".try_into().unwrap())]
                }),
                "csr_extra_san",
            ),
        ];
        for (input, code) in cases {
            assert_eq!(check_csr(&input, &id()).unwrap_err().code(), code);
        }
    }
}
