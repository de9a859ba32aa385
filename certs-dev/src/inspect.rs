//! `kith certs inspect`: everything a developer asks of a certificate, and whether it is a
//! valid X509-SVID (and if not, which rule it breaks).

use std::time::SystemTime;

use identity::check_svid_leaf;
use identity::x509::from_offset;
use rustls_pki_types::CertificateDer;
use serde::Serialize;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::public_key::PublicKey;

use crate::issue::{hex_colon, rfc3339};

#[derive(Serialize)]
pub struct CertInfo {
    pub subject: String,
    pub issuer: String,
    pub serial: String,
    pub not_before: String,
    pub not_after: String,
    /// Seconds until expiry; negative once expired.
    pub expires_in_seconds: i64,
    pub key_algorithm: String,
    pub signature_algorithm: String,
    pub sans: Vec<String>,
    pub spiffe_id: Option<String>,
    pub is_ca: bool,
    pub path_len: Option<u32>,
    pub key_usage: Vec<&'static str>,
    pub extended_key_usage: Vec<String>,
    pub sha256_fingerprint: String,
    pub svid: Verdict,
}

/// What the certificate is in X509-SVID terms.
#[derive(Serialize)]
pub struct Verdict {
    /// `leaf` (a valid X509-SVID), `signing` (a CA certificate), or `invalid`.
    pub kind: &'static str,
    pub valid: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

pub fn inspect(der: &CertificateDer<'_>, now: SystemTime) -> Result<CertInfo, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let not_after = from_offset(cert.validity().not_after.to_datetime());
    let not_before = from_offset(cert.validity().not_before.to_datetime());
    let expires_in_seconds = match not_after.duration_since(now) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    };
    let sans = sans(&cert);
    let spiffe_id = sans
        .iter()
        .find_map(|s| {
            s.strip_prefix("URI:")
                .filter(|u| u.starts_with("spiffe://"))
        })
        .map(str::to_owned);
    let bc = cert
        .basic_constraints()
        .ok()
        .flatten()
        .map(|b| b.value.clone());
    let svid = if cert.is_ca() {
        Verdict {
            kind: "signing",
            valid: true,
            rule: None,
            message: Some("a CA certificate: it signs SVIDs, it is not one".into()),
        }
    } else {
        match check_svid_leaf(der) {
            Ok(_) => Verdict {
                kind: "leaf",
                valid: true,
                rule: None,
                message: None,
            },
            Err(e) => Verdict {
                kind: "invalid",
                valid: false,
                rule: Some(e.detailed_reason()),
                message: Some(e.to_string()),
            },
        }
    };
    Ok(CertInfo {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        serial: hex_colon(cert.raw_serial()),
        not_before: rfc3339(not_before),
        not_after: rfc3339(not_after),
        expires_in_seconds,
        key_algorithm: key_algorithm(&cert),
        signature_algorithm: signature_algorithm(&cert),
        sans,
        spiffe_id,
        is_ca: cert.is_ca(),
        path_len: bc.and_then(|b| b.path_len_constraint),
        key_usage: key_usage(&cert),
        extended_key_usage: eku(&cert),
        sha256_fingerprint: hex_colon(ring::digest::digest(&ring::digest::SHA256, der).as_ref()),
        svid,
    })
}

pub fn render(infos: &[CertInfo]) -> String {
    let mut s = String::new();
    for (i, c) in infos.iter().enumerate() {
        if infos.len() > 1 {
            s.push_str(&format!("certificate {} of {}\n", i + 1, infos.len()));
        }
        let remaining = if c.expires_in_seconds >= 0 {
            format!("expires in {}", human(c.expires_in_seconds as u64))
        } else {
            format!("EXPIRED {} ago", human(c.expires_in_seconds.unsigned_abs()))
        };
        let dash = |v: &str| {
            if v.is_empty() {
                "(empty)".to_owned()
            } else {
                v.to_owned()
            }
        };
        let list = |v: &[String]| {
            if v.is_empty() {
                "-".to_owned()
            } else {
                v.join(", ")
            }
        };
        let lines = [
            (
                "SPIFFE ID",
                c.spiffe_id.clone().unwrap_or_else(|| "-".into()),
            ),
            ("subject", dash(&c.subject)),
            ("issuer", dash(&c.issuer)),
            ("serial", c.serial.clone()),
            (
                "valid",
                format!("{} to {} ({remaining})", c.not_before, c.not_after),
            ),
            ("key", c.key_algorithm.clone()),
            ("signature", c.signature_algorithm.clone()),
            ("SANs", list(&c.sans)),
            (
                "CA",
                match (c.is_ca, c.path_len) {
                    (true, Some(n)) => format!("yes (path length {n})"),
                    (true, None) => "yes".into(),
                    (false, _) => "no".into(),
                },
            ),
            (
                "key usage",
                list(
                    &c.key_usage
                        .iter()
                        .map(|k| k.to_string())
                        .collect::<Vec<_>>(),
                ),
            ),
            ("ext key usage", list(&c.extended_key_usage)),
            ("SHA-256", c.sha256_fingerprint.clone()),
            (
                "X509-SVID",
                match (&c.svid.kind, &c.svid.message) {
                    (&"leaf", _) => {
                        "valid leaf (chain not checked; use `kith certs verify`)".into()
                    }
                    (&"signing", _) => "signing certificate (CA)".into(),
                    (_, Some(m)) => format!("NO: {m}"),
                    _ => "NO".into(),
                },
            ),
        ];
        for (k, v) in lines {
            s.push_str(&format!("  {k:<14} {v}\n"));
        }
    }
    s
}

fn human(secs: u64) -> String {
    // Round to the two largest units: "23h 59m", "364days 23h".
    let d = std::time::Duration::from_secs(if secs >= 3600 { secs - secs % 60 } else { secs });
    let full = humantime::format_duration(d).to_string();
    full.split(' ').take(2).collect::<Vec<_>>().join(" ")
}

fn sans(cert: &X509Certificate<'_>) -> Vec<String> {
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::URI(u) => format!("URI:{u}"),
            GeneralName::DNSName(d) => format!("DNS:{d}"),
            GeneralName::RFC822Name(e) => format!("email:{e}"),
            GeneralName::IPAddress(b) => match b.len() {
                4 => format!(
                    "IP:{}",
                    std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*b).unwrap_or_default())
                ),
                16 => format!(
                    "IP:{}",
                    std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*b).unwrap_or_default())
                ),
                _ => format!("IP:{}", hex_colon(b)),
            },
            other => format!("{other}"),
        })
        .collect()
}

fn key_algorithm(cert: &X509Certificate<'_>) -> String {
    let spki = cert.public_key();
    match spki.parsed() {
        Ok(PublicKey::EC(_)) => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|o| o.to_id_string())
                .unwrap_or_default();
            match curve.as_str() {
                "1.2.840.10045.3.1.7" => "ECDSA P-256".into(),
                "1.3.132.0.34" => "ECDSA P-384".into(),
                "1.3.132.0.35" => "ECDSA P-521".into(),
                other => format!("ECDSA ({other})"),
            }
        }
        Ok(PublicKey::RSA(rsa)) => format!("RSA {}", rsa.key_size()),
        _ if spki.algorithm.algorithm.to_id_string() == "1.3.101.112" => "Ed25519".into(),
        _ => spki.algorithm.algorithm.to_id_string(),
    }
}

fn signature_algorithm(cert: &X509Certificate<'_>) -> String {
    match cert.signature_algorithm.algorithm.to_id_string().as_str() {
        "1.2.840.10045.4.3.2" => "ECDSA with SHA-256".into(),
        "1.2.840.10045.4.3.3" => "ECDSA with SHA-384".into(),
        "1.3.101.112" => "Ed25519".into(),
        "1.2.840.113549.1.1.11" => "RSA with SHA-256".into(),
        other => other.to_owned(),
    }
}

fn key_usage(cert: &X509Certificate<'_>) -> Vec<&'static str> {
    let Ok(Some(ku)) = cert.key_usage() else {
        return Vec::new();
    };
    let ku = ku.value;
    [
        (ku.digital_signature(), "digitalSignature"),
        (ku.non_repudiation(), "nonRepudiation"),
        (ku.key_encipherment(), "keyEncipherment"),
        (ku.data_encipherment(), "dataEncipherment"),
        (ku.key_agreement(), "keyAgreement"),
        (ku.key_cert_sign(), "keyCertSign"),
        (ku.crl_sign(), "cRLSign"),
    ]
    .into_iter()
    .filter_map(|(set, name)| set.then_some(name))
    .collect()
}

fn eku(cert: &X509Certificate<'_>) -> Vec<String> {
    let Ok(Some(eku)) = cert.extended_key_usage() else {
        return Vec::new();
    };
    let e = eku.value;
    let mut out: Vec<String> = [
        (e.any, "any"),
        (e.server_auth, "serverAuth"),
        (e.client_auth, "clientAuth"),
        (e.code_signing, "codeSigning"),
        (e.email_protection, "emailProtection"),
        (e.time_stamping, "timeStamping"),
        (e.ocsp_signing, "OCSPSigning"),
    ]
    .into_iter()
    .filter(|(set, _)| *set)
    .map(|(_, name)| name.to_owned())
    .collect();
    out.extend(e.other.iter().map(|o| o.to_id_string()));
    out
}
