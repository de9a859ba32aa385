//! The certificate policy shared by every kith issuer: what a root, a signing intermediate and
//! an X509-SVID leaf look like. The CA and `kith certs` both build certificates from here, so
//! the X509-SVID rules (spiffe/spiffe `standards/X509-SVID.md`) live in one place.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber, SignatureAlgorithm,
};
use ring::rand::{SecureRandom, SystemRandom};
use rustls_pki_types::PrivatePkcs8KeyDer;
use time::OffsetDateTime;

use crate::spiffe_id::{SpiffeId, TrustDomain};

/// NotBefore is backdated so a peer whose clock runs a little behind accepts a fresh certificate.
pub const BACKDATE: Duration = Duration::from_secs(30);

/// The key algorithms kith issues. ECDSA P-256 is the default everywhere (as in SPIRE,
/// Linkerd and step-ca); P-384 and Ed25519 are for users whose policy asks for them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KeyType {
    #[default]
    P256,
    P384,
    Ed25519,
}

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("invalid DNS name {0:?}: {1}")]
    DnsName(String, String),
    #[error("random number generator failed")]
    Random,
    #[error("failed to generate a {0} key: {1}")]
    KeyGen(KeyType, rcgen::Error),
}

impl KeyType {
    pub fn algorithm(self) -> &'static SignatureAlgorithm {
        match self {
            Self::P256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            Self::P384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            Self::Ed25519 => &rcgen::PKCS_ED25519,
        }
    }

    pub fn generate(self) -> Result<KeyPair, TemplateError> {
        KeyPair::generate_for(self.algorithm()).map_err(|e| TemplateError::KeyGen(self, e))
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::P256 => "p256",
            Self::P384 => "p384",
            Self::Ed25519 => "ed25519",
        }
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for KeyType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "p256" | "p-256" | "ecdsa-p256" => Ok(Self::P256),
            "p384" | "p-384" | "ecdsa-p384" => Ok(Self::P384),
            "ed25519" => Ok(Self::Ed25519),
            _ => Err(format!(
                "unknown key type {s:?}: expected p256, p384 or ed25519"
            )),
        }
    }
}

/// The key as PKCS#8 that every common tool reads. ring makes Ed25519 keys as PKCS#8 v2
/// (RFC 5958, with the public key inside), which OpenSSL 3.0 refuses ("unsupported"); those are
/// rewritten as the v1 document (RFC 8410) that OpenSSL, Go and ring itself all accept.
pub fn portable_pkcs8(key: &KeyPair) -> PrivatePkcs8KeyDer<'static> {
    // SEQUENCE { INTEGER 1, SEQUENCE { OID 1.3.101.112 }, OCTET STRING { OCTET STRING (seed) } …
    const V2_PREFIX: [u8; 14] = [
        0x02, 0x01, 0x01, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
    ];
    const V1_PREFIX: [u8; 16] = [
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    let der = zeroize::Zeroizing::new(key.serialize_der());
    if der.len() >= 48 && der[0] == 0x30 && der[2..16] == V2_PREFIX {
        let mut v1 = Vec::with_capacity(48);
        v1.extend_from_slice(&V1_PREFIX);
        v1.extend_from_slice(&der[16..48]);
        return PrivatePkcs8KeyDer::from(v1);
    }
    PrivatePkcs8KeyDer::from(der.to_vec())
}

/// A serial for a CA that stores what it issues: 64 bits of time (microseconds, with a fixed
/// top byte so the DER integer stays positive and minimal) followed by 64 random bits. The
/// random half meets the CA/Browser Forum's 64-bit rule; the time half makes consecutive
/// serials sort together, so storing them by serial appends to one index page instead of
/// dirtying a random page per issuance.
pub fn ordered_serial(now: SystemTime) -> Result<SerialNumber, TemplateError> {
    let micros = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    let prefix = (0x40u64 << 56) | (micros & 0x00ff_ffff_ffff_ffff);
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&prefix.to_be_bytes());
    SystemRandom::new()
        .fill(&mut bytes[8..])
        .map_err(|_| TemplateError::Random)?;
    Ok(SerialNumber::from_slice(&bytes))
}

/// A random serial of 128 bits with the top bit cleared (a positive DER INTEGER) and a
/// non-zero first byte (so the encoding stays 16 bytes and minimal): at least 120 random bits,
/// well above the 64 that RFC 5280 and the CA/B forum ask for.
pub fn random_serial() -> Result<SerialNumber, TemplateError> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| TemplateError::Random)?;
    bytes[0] = (bytes[0] & 0x7f).max(1);
    Ok(SerialNumber::from_slice(&bytes))
}

/// A self-signed root for `td`: CA:true (critical), keyCertSign + cRLSign, and the trust
/// domain's SPIFFE ID as its URI SAN, as X509-SVID section 3.2 allows for signing certificates.
/// No URI name constraints: rustls-webpki fails closed on them (every chain through such a CA fails).
pub fn root_params(
    td: &TrustDomain,
    common_name: &str,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<CertificateParams, TemplateError> {
    let mut params = ca_params(td, common_name, not_before, not_after)?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    Ok(params)
}

/// A signing intermediate for `td` that may sign leaves only (pathLen 0).
pub fn intermediate_params(
    td: &TrustDomain,
    common_name: &str,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<CertificateParams, TemplateError> {
    let mut params = ca_params(td, common_name, not_before, not_after)?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

fn ca_params(
    td: &TrustDomain,
    common_name: &str,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<CertificateParams, TemplateError> {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "kith");
    dn.push(DnType::OrganizationalUnitName, td.as_str());
    dn.push(DnType::CommonName, common_name);
    let mut params = CertificateParams::default();
    params.distinguished_name = dn;
    params.not_before = to_offset(not_before);
    params.not_after = to_offset(not_after);
    params.serial_number = Some(random_serial()?);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.subject_alt_names = vec![uri_san(&td.id())];
    Ok(params)
}

/// An X509-SVID leaf: an empty subject (so rcgen marks the SAN extension critical, as RFC 5280
/// requires), exactly one URI SAN (the SPIFFE ID) plus optional DNS and IP SANs, CA:false
/// present, digitalSignature only, EKU serverAuth + clientAuth, AKI, random serial.
pub fn svid_params(
    id: &SpiffeId,
    dns_names: &[String],
    ips: &[IpAddr],
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<CertificateParams, TemplateError> {
    svid_params_with_serial(id, dns_names, ips, not_before, not_after, random_serial()?)
}

/// `svid_params` with the caller's serial (the CA's time-ordered one), so the issuance path
/// draws random bytes once.
pub fn svid_params_with_serial(
    id: &SpiffeId,
    dns_names: &[String],
    ips: &[IpAddr],
    not_before: SystemTime,
    not_after: SystemTime,
    serial: SerialNumber,
) -> Result<CertificateParams, TemplateError> {
    let mut sans = vec![uri_san(id)];
    for name in dns_names {
        // A leading "*." wildcard is allowed (as mkcert does); the rest must be a hostname.
        let host = name.strip_prefix("*.").unwrap_or(name);
        rustls_pki_types::DnsName::try_from(host)
            .map_err(|_| TemplateError::DnsName(name.clone(), "not a valid hostname".into()))?;
        let ia5 = name
            .clone()
            .try_into()
            .map_err(|e: rcgen::Error| TemplateError::DnsName(name.clone(), e.to_string()))?;
        sans.push(SanType::DnsName(ia5));
    }
    sans.extend(ips.iter().copied().map(SanType::IpAddress));
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = sans;
    params.not_before = to_offset(not_before);
    params.not_after = to_offset(not_after);
    params.serial_number = Some(serial);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

fn uri_san(id: &SpiffeId) -> SanType {
    // A SpiffeId is ASCII by construction, so it is always a valid IA5String.
    SanType::URI(
        id.as_str()
            .to_owned()
            .try_into()
            .unwrap_or_else(|_| unreachable!("spiffe ids are ascii")),
    )
}

/// Converts to the `time` crate's type that rcgen takes, truncated to whole seconds (X.509
/// times carry no fractions, and a truncated value compares cleanly after a round trip).
pub fn to_offset(t: SystemTime) -> OffsetDateTime {
    let secs = match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    };
    OffsetDateTime::from_unix_timestamp(secs).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

pub fn from_offset(t: OffsetDateTime) -> SystemTime {
    let secs = t.unix_timestamp();
    if secs >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_are_positive_minimal_and_distinct() {
        let a = random_serial().unwrap().to_bytes();
        let b = random_serial().unwrap().to_bytes();
        assert_eq!(a.len(), 16);
        assert!(a[0] != 0 && a[0] < 0x80);
        assert_ne!(a, b);
    }

    #[test]
    fn ordered_serials_sort_by_time_and_keep_64_random_bits() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let a = ordered_serial(t).unwrap().to_bytes();
        let b = ordered_serial(t + Duration::from_micros(1))
            .unwrap()
            .to_bytes();
        let c = ordered_serial(t + Duration::from_micros(1))
            .unwrap()
            .to_bytes();
        assert_eq!(a.len(), 16);
        assert_eq!(a[0], 0x40, "positive and minimal");
        assert!(a < b);
        assert_eq!(b[..8], c[..8]);
        assert_ne!(b[8..], c[8..]);
    }

    #[test]
    fn key_types_parse_and_generate() {
        for kt in [KeyType::P256, KeyType::P384, KeyType::Ed25519] {
            assert_eq!(kt.name().parse::<KeyType>(), Ok(kt));
            let key = kt.generate().unwrap();
            assert!(key.is_compatible(kt.algorithm()));
        }
        assert!(
            "rsa"
                .parse::<KeyType>()
                .unwrap_err()
                .contains("expected p256")
        );
    }

    #[test]
    fn ed25519_keys_export_as_pkcs8_v1_and_read_back() {
        let key = KeyType::Ed25519.generate().unwrap();
        let v1 = portable_pkcs8(&key);
        assert_eq!(v1.secret_pkcs8_der().len(), 48);
        assert_eq!(v1.secret_pkcs8_der()[4], 0, "version 0 (v1)");
        let back = KeyPair::try_from(&v1).unwrap();
        assert_eq!(back.public_key_raw(), key.public_key_raw());
        // ECDSA keys are left as they are.
        let ec = KeyType::P256.generate().unwrap();
        assert_eq!(
            portable_pkcs8(&ec).secret_pkcs8_der(),
            ec.serialize_der().as_slice()
        );
    }

    #[test]
    fn time_conversion_round_trips_whole_seconds() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let back = from_offset(to_offset(t));
        assert_eq!(
            back,
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
        );
    }
}
