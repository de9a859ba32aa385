//! Trust bundles: the roots (and JWT signing keys) of one trust domain, as PEM or in the SPIFFE
//! bundle format (a JWK Set; spiffe/spiffe `standards/SPIFFE_Trust_Domain_and_Bundle.md`).

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use x509_parser::certificate::X509Certificate;
use x509_parser::public_key::PublicKey;

use crate::pem::{self, PemError};
use crate::spiffe_id::{SpiffeId, TrustDomain};
use crate::verify::uri_sans;

/// The roots and JWT authorities of one trust domain. A bundle may hold several roots at once:
/// that is how a root rollover publishes the successor before it signs anything.
#[derive(Clone, Debug, PartialEq)]
pub struct TrustBundle {
    trust_domain: TrustDomain,
    x509_authorities: Vec<CertificateDer<'static>>,
    jwt_authorities: Vec<JwtAuthority>,
    sequence: Option<u64>,
    refresh_hint: Option<Duration>,
}

/// A JWT-SVID signing key as published in the bundle: its key ID and the JWK as it was read,
/// so that a round trip keeps every parameter.
#[derive(Clone, Debug, PartialEq)]
pub struct JwtAuthority {
    pub key_id: String,
    pub jwk: Map<String, Value>,
}

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("bundle has no certificates: {0}")]
    Pem(#[from] PemError),
    #[error("bundle is not valid SPIFFE bundle JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("bundle key {index}: {detail}")]
    Key { index: usize, detail: String },
    #[error("bundle has no x509-svid authority")]
    NoRoots,
    #[error("certificate {index} of the bundle is not a CA certificate")]
    NotCa { index: usize },
    #[error(
        "cannot tell the trust domain of this PEM bundle (its roots carry no spiffe:// URI SAN); \
         pass the trust domain explicitly or use the SPIFFE bundle format"
    )]
    UnknownTrustDomain,
    #[error("bundle roots name trust domain {found}, not {expected}")]
    TrustDomainMismatch {
        expected: TrustDomain,
        found: TrustDomain,
    },
}

#[derive(Serialize, Deserialize)]
struct JwkSet {
    keys: Vec<Map<String, Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    spiffe_sequence: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    spiffe_refresh_hint: Option<u64>,
}

impl TrustBundle {
    pub fn new(trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            x509_authorities: Vec::new(),
            jwt_authorities: Vec::new(),
            sequence: None,
            refresh_hint: None,
        }
    }

    /// A bundle of the given roots; each must be a CA certificate.
    pub fn from_roots(
        trust_domain: TrustDomain,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<Self, BundleError> {
        let mut bundle = Self::new(trust_domain);
        for (index, root) in roots.into_iter().enumerate() {
            let (_, cert) = parse(&root).map_err(|detail| BundleError::Key { index, detail })?;
            if !cert.is_ca() {
                return Err(BundleError::NotCa { index });
            }
            bundle.add_x509_authority(root);
        }
        if bundle.x509_authorities.is_empty() {
            return Err(BundleError::NoRoots);
        }
        Ok(bundle)
    }

    /// Reads PEM roots. With no trust domain given, it is taken from the roots' `spiffe://<td>`
    /// URI SAN (kith, SPIRE and most SPIFFE CAs put one there).
    pub fn from_pem(trust_domain: Option<TrustDomain>, input: &[u8]) -> Result<Self, BundleError> {
        let roots = pem::certificates(input)?;
        let found = roots.iter().find_map(|r| root_trust_domain(r));
        let td = match (trust_domain, found) {
            (Some(expected), Some(found)) if expected != found => {
                return Err(BundleError::TrustDomainMismatch { expected, found });
            }
            (Some(td), _) | (None, Some(td)) => td,
            (None, None) => return Err(BundleError::UnknownTrustDomain),
        };
        check_root_domains(&td, &roots)?;
        Self::from_roots(td, roots)
    }

    /// Reads a bundle in either format: SPIFFE JSON when it starts with `{`, PEM otherwise.
    /// With no trust domain given, it is taken from the roots' `spiffe://<td>` URI SAN.
    pub fn parse(trust_domain: Option<TrustDomain>, input: &[u8]) -> Result<Self, BundleError> {
        match input.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'{') => Self::read_json(trust_domain, input),
            _ => Self::from_pem(trust_domain, input),
        }
    }

    /// Reads the SPIFFE bundle format. Keys whose `use` is neither `x509-svid` nor `jwt-svid`
    /// are skipped, as the standard asks of consumers.
    pub fn from_spiffe_json(trust_domain: TrustDomain, input: &[u8]) -> Result<Self, BundleError> {
        Self::read_json(Some(trust_domain), input)
    }

    fn read_json(trust_domain: Option<TrustDomain>, input: &[u8]) -> Result<Self, BundleError> {
        let set: JwkSet = serde_json::from_slice(input)?;
        let mut roots = Vec::new();
        let mut jwt_authorities = Vec::new();
        for (index, jwk) in set.keys.into_iter().enumerate() {
            let key_err = |detail: String| BundleError::Key { index, detail };
            match jwk.get("use").and_then(Value::as_str) {
                Some("x509-svid") => {
                    let x5c = jwk
                        .get("x5c")
                        .and_then(Value::as_array)
                        .ok_or_else(|| key_err("x509-svid key has no x5c array".into()))?;
                    let [b64] = x5c.as_slice() else {
                        return Err(key_err(format!(
                            "x5c must hold exactly one certificate, found {}",
                            x5c.len()
                        )));
                    };
                    let der = b64
                        .as_str()
                        .and_then(|s| STANDARD.decode(s).ok())
                        .ok_or_else(|| key_err("x5c entry is not base64".into()))?;
                    let (_, cert) = parse(&der).map_err(key_err)?;
                    // The JWK's own key parameters must describe the certificate's key.
                    let expected = jwk_params(&cert).map_err(key_err)?;
                    for (name, value) in &expected {
                        if let Some(given) = jwk.get(name)
                            && given != value
                        {
                            return Err(key_err(format!(
                                "JWK parameter {name:?} does not match the x5c certificate's key"
                            )));
                        }
                    }
                    if !cert.is_ca() {
                        return Err(BundleError::NotCa { index });
                    }
                    roots.push(CertificateDer::from(der));
                }
                Some("jwt-svid") => {
                    let key_id = jwk
                        .get("kid")
                        .and_then(Value::as_str)
                        .filter(|k| !k.is_empty())
                        .ok_or_else(|| key_err("jwt-svid key has no kid".into()))?
                        .to_owned();
                    jwt_authorities.push(JwtAuthority { key_id, jwk });
                }
                _ => {}
            }
        }
        let trust_domain = match trust_domain {
            Some(td) => td,
            None => roots
                .iter()
                .find_map(|r| root_trust_domain(r))
                .ok_or(BundleError::UnknownTrustDomain)?,
        };
        check_root_domains(&trust_domain, &roots)?;
        let mut bundle = Self::new(trust_domain);
        for root in roots {
            bundle.add_x509_authority(root);
        }
        for authority in jwt_authorities {
            bundle.add_jwt_authority(authority);
        }
        bundle.sequence = set.spiffe_sequence;
        bundle.refresh_hint = set.spiffe_refresh_hint.map(Duration::from_secs);
        Ok(bundle)
    }

    /// Writes the SPIFFE bundle format, pretty-printed, with a trailing newline.
    pub fn to_spiffe_json(&self) -> String {
        let mut keys = Vec::new();
        for root in &self.x509_authorities {
            let mut jwk = Map::new();
            jwk.insert("use".into(), "x509-svid".into());
            if let Ok((_, cert)) = parse(root)
                && let Ok(params) = jwk_params(&cert)
            {
                jwk.extend(params);
            }
            jwk.insert(
                "x5c".into(),
                Value::Array(vec![STANDARD.encode(root).into()]),
            );
            keys.push(jwk);
        }
        keys.extend(self.jwt_authorities.iter().map(|a| {
            let mut jwk = a.jwk.clone();
            jwk.insert("use".into(), "jwt-svid".into());
            jwk.insert("kid".into(), a.key_id.clone().into());
            jwk
        }));
        let set = JwkSet {
            keys,
            spiffe_sequence: self.sequence,
            spiffe_refresh_hint: self.refresh_hint.map(|d| d.as_secs()),
        };
        let mut out = serde_json::to_string_pretty(&set).unwrap_or_default();
        out.push('\n');
        out
    }

    pub fn to_pem(&self) -> String {
        pem::encode_certificates(&self.x509_authorities)
    }

    pub fn add_x509_authority(&mut self, root: CertificateDer<'static>) {
        if !self.x509_authorities.contains(&root) {
            self.x509_authorities.push(root);
        }
    }

    pub fn add_jwt_authority(&mut self, authority: JwtAuthority) {
        self.jwt_authorities
            .retain(|a| a.key_id != authority.key_id);
        self.jwt_authorities.push(authority);
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn x509_authorities(&self) -> &[CertificateDer<'static>] {
        &self.x509_authorities
    }

    pub fn jwt_authorities(&self) -> &[JwtAuthority] {
        &self.jwt_authorities
    }

    pub fn sequence(&self) -> Option<u64> {
        self.sequence
    }

    pub fn set_sequence(&mut self, sequence: u64) {
        self.sequence = Some(sequence);
    }

    pub fn refresh_hint(&self) -> Option<Duration> {
        self.refresh_hint
    }

    pub fn set_refresh_hint(&mut self, hint: Duration) {
        self.refresh_hint = Some(hint);
    }
}

fn parse(der: &[u8]) -> Result<(&[u8], X509Certificate<'_>), String> {
    x509_parser::parse_x509_certificate(der).map_err(|e| format!("certificate does not parse: {e}"))
}

/// SECURITY: a bundle holds the roots of one trust domain. Every root that names a trust
/// domain (a `spiffe://<td>` URI SAN) must name this one, in either format: before, a SPIFFE
/// JSON bundle took a root of another trust domain without a word, and a PEM bundle checked
/// only its first root (found by fuzzing, fuzz/regressions/bundle/).
fn check_root_domains(td: &TrustDomain, roots: &[CertificateDer<'_>]) -> Result<(), BundleError> {
    for root in roots {
        if let Some(found) = root_trust_domain(root)
            && found != *td
        {
            return Err(BundleError::TrustDomainMismatch {
                expected: td.clone(),
                found,
            });
        }
    }
    Ok(())
}

/// The trust domain named by a CA certificate's `spiffe://<td>` URI SAN, if it has one.
pub fn root_trust_domain(der: &CertificateDer<'_>) -> Option<TrustDomain> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let uris = uri_sans(&cert).ok()?;
    uris.iter()
        .find_map(|u| SpiffeId::new(u).ok())
        .map(|id| id.trust_domain())
}

/// The JWK parameters (RFC 7517/7518/8037) of a certificate's public key.
fn jwk_params(cert: &X509Certificate<'_>) -> Result<Map<String, Value>, String> {
    let spki = cert.public_key();
    let parsed = spki
        .parsed()
        .map_err(|e| format!("public key does not parse: {e}"))?;
    let mut m = Map::new();
    let b64 = |b: &[u8]| Value::String(URL_SAFE_NO_PAD.encode(b));
    match parsed {
        PublicKey::EC(point) => {
            let curve_oid = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|o| o.to_id_string())
                .unwrap_or_default();
            let (crv, len) = match curve_oid.as_str() {
                "1.2.840.10045.3.1.7" => ("P-256", 32),
                "1.3.132.0.34" => ("P-384", 48),
                "1.3.132.0.35" => ("P-521", 66),
                other => return Err(format!("unsupported EC curve {other}")),
            };
            let data = point.data();
            if data.len() != 1 + 2 * len || data[0] != 4 {
                return Err("EC public key is not an uncompressed point".into());
            }
            m.insert("kty".into(), "EC".into());
            m.insert("crv".into(), crv.into());
            m.insert("x".into(), b64(&data[1..1 + len]));
            m.insert("y".into(), b64(&data[1 + len..]));
        }
        PublicKey::RSA(rsa) => {
            let strip = |b: &[u8]| {
                let start = b.iter().position(|x| *x != 0).unwrap_or(b.len());
                b[start..].to_vec()
            };
            m.insert("kty".into(), "RSA".into());
            m.insert("n".into(), b64(&strip(rsa.modulus)));
            m.insert("e".into(), b64(&strip(rsa.exponent)));
        }
        _ if spki.algorithm.algorithm.to_id_string() == "1.3.101.112" => {
            m.insert("kty".into(), "OKP".into());
            m.insert("crv".into(), "Ed25519".into());
            m.insert("x".into(), b64(&spki.subject_public_key.data));
        }
        _ => return Err("unsupported public key algorithm".into()),
    }
    Ok(m)
}
