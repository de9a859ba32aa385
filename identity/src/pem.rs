//! Reading certificates and keys from PEM or DER, with errors that say what the input was.

use rustls_pki_types::pem::{self, PemObject, SectionKind};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use zeroize::Zeroizing;

/// Why bytes could not be read as certificates or a key.
#[derive(Debug, thiserror::Error)]
pub enum PemError {
    #[error("input is empty")]
    Empty,
    #[error("found a {found} where a certificate was expected")]
    NotACertificate { found: &'static str },
    #[error("found a {found} where a private key was expected")]
    NotAKey { found: &'static str },
    #[error("truncated PEM: a \"BEGIN {0}\" line has no matching END line")]
    Truncated(String),
    #[error("PEM block is not valid base64 or has a malformed header: {0}")]
    Malformed(String),
    #[error("not PEM, and not a DER X.509 certificate: {0}")]
    Garbage(String),
    #[error("private key is not PKCS#8 ({0}); convert it with `openssl pkcs8 -topk8 -nocrypt`")]
    NotPkcs8(&'static str),
}

/// Reads every certificate in `input`, which is PEM (one or many CERTIFICATE blocks) or a
/// single DER certificate. Non-certificate PEM blocks are an error, not silently skipped: a
/// key or CSR passed as a certificate is a mistake the user wants to hear about.
pub fn certificates(input: &[u8]) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let sections = sections(input)?;
    let Some(sections) = sections else {
        return der_certificate(input).map(|c| vec![c]);
    };
    let mut certs = Vec::new();
    for (kind, der) in sections {
        match kind {
            SectionKind::Certificate => {
                x509_parser::parse_x509_certificate(&der).map_err(|e| {
                    PemError::Garbage(format!(
                        "CERTIFICATE block {} does not parse: {e}",
                        certs.len() + 1
                    ))
                })?;
                certs.push(CertificateDer::from(der));
            }
            other => {
                return Err(PemError::NotACertificate {
                    found: describe(other),
                });
            }
        }
    }
    Ok(certs)
}

/// Reads one private key (PKCS#8 PEM, or PKCS#8 DER).
pub fn private_key(input: &[u8]) -> Result<PrivatePkcs8KeyDer<'static>, PemError> {
    let Some(sections) = sections(input)? else {
        // DER: PKCS#8 is all kith writes; anything else is refused with a hint.
        return match PrivateKeyDer::try_from(input.to_vec()) {
            Ok(PrivateKeyDer::Pkcs8(k)) => Ok(k),
            Ok(PrivateKeyDer::Pkcs1(_)) => Err(PemError::NotPkcs8("PKCS#1 RSA key")),
            Ok(PrivateKeyDer::Sec1(_)) => Err(PemError::NotPkcs8("SEC1 EC key")),
            _ => Err(PemError::Garbage("not a PEM or DER private key".into())),
        };
    };
    let mut key = None;
    for (kind, der) in sections {
        match kind {
            SectionKind::PrivateKey if key.is_none() => key = Some(PrivatePkcs8KeyDer::from(der)),
            SectionKind::PrivateKey => {
                return Err(PemError::Malformed(
                    "more than one PRIVATE KEY block".into(),
                ));
            }
            SectionKind::EcPrivateKey => return Err(PemError::NotPkcs8("SEC1 EC key")),
            SectionKind::RsaPrivateKey => return Err(PemError::NotPkcs8("PKCS#1 RSA key")),
            // A credential bundle (SPIFFE filesystem delivery) holds the key and the chain.
            SectionKind::Certificate => {}
            other => {
                return Err(PemError::NotAKey {
                    found: describe(other),
                });
            }
        }
    }
    key.ok_or(PemError::NotAKey {
        found: "certificate",
    })
}

/// Encodes DER as one PEM block.
pub fn encode(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// [`encode`] for a private key: the text and every intermediate buffer are wiped when
/// dropped.
pub fn encode_secret(label: &str, der: &[u8]) -> Zeroizing<String> {
    use base64::Engine as _;
    let mut b64 = Zeroizing::new(String::with_capacity(der.len().div_ceil(3) * 4));
    base64::engine::general_purpose::STANDARD.encode_string(der, &mut b64);
    let lines = b64.len().div_ceil(64);
    let mut out = Zeroizing::new(String::with_capacity(
        b64.len() + lines + 2 * (label.len() + 17),
    ));
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
    out
}

pub fn encode_certificates(certs: &[CertificateDer<'_>]) -> String {
    certs.iter().map(|c| encode("CERTIFICATE", c)).collect()
}

/// `Ok(None)` when the input holds no PEM at all (so it may be DER).
type Sections = Vec<(SectionKind, Vec<u8>)>;

fn sections(input: &[u8]) -> Result<Option<Sections>, PemError> {
    if input.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(PemError::Empty);
    }
    if !contains(input, b"-----BEGIN ") {
        return Ok(None);
    }
    let mut out = Vec::new();
    for item in <(SectionKind, Vec<u8>)>::pem_slice_iter(input) {
        match item {
            Ok(section) => out.push(section),
            Err(pem::Error::MissingSectionEnd { end_marker }) => {
                let label = String::from_utf8_lossy(&end_marker)
                    .trim_start_matches("-----END ")
                    .trim_end_matches('-')
                    .to_owned();
                return Err(PemError::Truncated(label));
            }
            Err(e) => return Err(PemError::Malformed(e.to_string())),
        }
    }
    if out.is_empty() {
        // A BEGIN line of a kind pki-types does not know (e.g. "BEGIN FOO").
        let label = first_label(input).unwrap_or_default();
        if !contains(input, format!("-----END {label}-----").as_bytes()) {
            return Err(PemError::Truncated(label));
        }
        return Err(PemError::Malformed(format!(
            "unsupported PEM block \"{label}\""
        )));
    }
    Ok(Some(out))
}

fn der_certificate(input: &[u8]) -> Result<CertificateDer<'static>, PemError> {
    match x509_parser::parse_x509_certificate(input) {
        Ok(([], _)) => Ok(CertificateDer::from(input.to_vec())),
        Ok(_) => Err(PemError::Garbage(
            "trailing bytes after the DER certificate".into(),
        )),
        Err(e) => Err(PemError::Garbage(e.to_string())),
    }
}

fn describe(kind: SectionKind) -> &'static str {
    match kind {
        SectionKind::Certificate => "certificate",
        SectionKind::PublicKey => "public key",
        SectionKind::RsaPrivateKey | SectionKind::PrivateKey | SectionKind::EcPrivateKey => {
            "private key"
        }
        SectionKind::Crl => "certificate revocation list",
        SectionKind::Csr => "certificate signing request",
        _ => "non-certificate PEM block",
    }
}

fn first_label(input: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(input);
    let start = text.find("-----BEGIN ")? + "-----BEGIN ".len();
    let end = text[start..].find("-----")? + start;
    Some(text[start..end].to_owned())
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_pem() -> (String, String) {
        let (cert, key) = integration::pki::self_signed(&["a.test"]);
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn reads_pem_many_and_der() {
        let (a, _) = cert_pem();
        let (b, _) = cert_pem();
        let both = format!("{a}{b}");
        assert_eq!(certificates(both.as_bytes()).unwrap().len(), 2);
        let der = certificates(a.as_bytes()).unwrap().remove(0);
        assert_eq!(certificates(&der).unwrap(), vec![der.clone()]);
        assert_eq!(encode_certificates(std::slice::from_ref(&der)), a);
    }

    #[test]
    fn bad_inputs_are_named() {
        let (cert, key) = cert_pem();
        assert!(matches!(certificates(b""), Err(PemError::Empty)));
        assert!(matches!(certificates(b" \n"), Err(PemError::Empty)));
        assert!(matches!(
            certificates(key.as_bytes()),
            Err(PemError::NotACertificate {
                found: "private key"
            })
        ));
        let truncated = &cert[..cert.len() / 2];
        let err = certificates(truncated.as_bytes()).unwrap_err();
        assert!(
            matches!(&err, PemError::Truncated(l) if l == "CERTIFICATE"),
            "{err}"
        );
        assert!(matches!(
            certificates(b"hello world"),
            Err(PemError::Garbage(_))
        ));
        let der = certificates(cert.as_bytes()).unwrap().remove(0);
        assert!(matches!(
            certificates(&der[..der.len() - 5]),
            Err(PemError::Garbage(_))
        ));
        assert!(matches!(
            private_key(cert.as_bytes()),
            Err(PemError::NotAKey {
                found: "certificate"
            })
        ));
        assert!(private_key(key.as_bytes()).is_ok());
        let bad_b64 = "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n";
        assert!(certificates(bad_b64.as_bytes()).is_err());
    }
}
