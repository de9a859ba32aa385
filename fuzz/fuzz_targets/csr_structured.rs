//! Structure-aware CSRs: rcgen builds and signs a request from arbitrary names, SANs, key
//! usages, CA flags and extensions (optionally with one byte of the DER changed afterwards),
//! and `ca::csr::check_csr` judges it. Random bytes rarely make a DER request whose signature
//! verifies; these always do, so the policy checks behind the signature are what is explored.
//! Property: an accepted request asks for no CA, no SAN other than the expected SPIFFE ID.
#![no_main]

use std::net::IpAddr;
use std::sync::LazyLock;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

/// Ed25519 most of the time: signing and verifying P-384 costs a hundred times more, and the
/// policy checks behind the signature are the same for every key type.
static KEYS: LazyLock<Vec<KeyPair>> = LazyLock::new(|| {
    [
        &rcgen::PKCS_ECDSA_P256_SHA256,
        &rcgen::PKCS_ECDSA_P384_SHA384,
        &rcgen::PKCS_ED25519,
        &rcgen::PKCS_ED25519,
        &rcgen::PKCS_ED25519,
        &rcgen::PKCS_ED25519,
        &rcgen::PKCS_ED25519,
        &rcgen::PKCS_ED25519,
    ]
    .into_iter()
    .map(|alg| KeyPair::generate_for(alg).expect("key generation"))
    .collect()
});

#[derive(Arbitrary, Debug)]
enum San {
    Expected,
    /// The expected ID with a suffix (another workload's ID).
    ExpectedPlus(String),
    Uri(String),
    Dns(String),
    Email(String),
    Ip(IpAddr),
    Other(Vec<u8>, String),
}

#[derive(Arbitrary, Debug)]
enum Ca {
    No,
    ExplicitNo,
    Unconstrained,
    Constrained(u8),
}

#[derive(Arbitrary, Debug)]
enum Usage {
    DigitalSignature,
    KeyEncipherment,
    KeyAgreement,
    KeyCertSign,
    CrlSign,
}

#[derive(Arbitrary, Debug)]
enum Eku {
    ServerAuth,
    ClientAuth,
    CodeSigning,
    Any,
    Other(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum ExtOid {
    /// The OID of a known extension (SAN, basic constraints, key usage, EKU, name
    /// constraints), with arbitrary content.
    Known(u8),
    Arbitrary(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Input {
    key: u8,
    common_name: Option<String>,
    organization: Option<String>,
    sans: Vec<San>,
    ca: Ca,
    usages: Vec<Usage>,
    ekus: Vec<Eku>,
    extensions: Vec<(ExtOid, bool, Vec<u8>)>,
    pem: bool,
    /// Change the byte at this index (modulo the length) by xor-ing this value.
    tamper: Option<(u16, u8)>,
}

fn oid(arcs: &[u8]) -> Vec<u64> {
    // A valid OID starts with 0.x, 1.x (x < 40) or 2.x.
    let mut oid = vec![u64::from(arcs.first().copied().unwrap_or(1) % 3), 5];
    oid.extend(arcs.iter().skip(1).take(8).map(|a| u64::from(*a)));
    oid
}

fn ia5(s: &str) -> Option<rcgen::string::Ia5String> {
    rcgen::string::Ia5String::try_from(s.to_owned()).ok()
}

fuzz_target!(|input: Input| {
    let expected = kith_fuzz::EXPECTED_ID.as_str();
    let mut params = CertificateParams::default();
    if let Some(cn) = &input.common_name {
        params
            .distinguished_name
            .push(DnType::CommonName, cn.as_str());
    }
    if let Some(o) = &input.organization {
        params
            .distinguished_name
            .push(DnType::OrganizationName, o.as_str());
    }
    let mut only_expected_san = true;
    for san in input.sans.iter().take(8) {
        let s = match san {
            San::Expected => ia5(expected).map(SanType::URI),
            San::ExpectedPlus(tail) => ia5(&format!("{expected}{tail}")).map(SanType::URI),
            San::Uri(u) => ia5(u).map(SanType::URI),
            San::Dns(d) => ia5(d).map(SanType::DnsName),
            San::Email(e) => ia5(e).map(SanType::Rfc822Name),
            San::Ip(ip) => Some(SanType::IpAddress(*ip)),
            San::Other(arcs, v) => Some(SanType::OtherName((
                oid(arcs),
                rcgen::OtherNameValue::Utf8String(v.clone()),
            ))),
        };
        if let Some(s) = s {
            if !matches!(&s, SanType::URI(u) if u.as_str() == expected) {
                only_expected_san = false;
            }
            params.subject_alt_names.push(s);
        }
    }
    let asks_ca = matches!(input.ca, Ca::Unconstrained | Ca::Constrained(_));
    params.is_ca = match input.ca {
        Ca::No => IsCa::NoCa,
        Ca::ExplicitNo => IsCa::ExplicitNoCa,
        Ca::Unconstrained => IsCa::Ca(BasicConstraints::Unconstrained),
        Ca::Constrained(n) => IsCa::Ca(BasicConstraints::Constrained(n)),
    };
    params.key_usages = input
        .usages
        .iter()
        .map(|u| match u {
            Usage::DigitalSignature => KeyUsagePurpose::DigitalSignature,
            Usage::KeyEncipherment => KeyUsagePurpose::KeyEncipherment,
            Usage::KeyAgreement => KeyUsagePurpose::KeyAgreement,
            Usage::KeyCertSign => KeyUsagePurpose::KeyCertSign,
            Usage::CrlSign => KeyUsagePurpose::CrlSign,
        })
        .collect();
    params.extended_key_usages = input
        .ekus
        .iter()
        .take(8)
        .map(|e| match e {
            Eku::ServerAuth => ExtendedKeyUsagePurpose::ServerAuth,
            Eku::ClientAuth => ExtendedKeyUsagePurpose::ClientAuth,
            Eku::CodeSigning => ExtendedKeyUsagePurpose::CodeSigning,
            Eku::Any => ExtendedKeyUsagePurpose::Any,
            Eku::Other(arcs) => ExtendedKeyUsagePurpose::Other(oid(arcs)),
        })
        .collect();
    let custom = !input.extensions.is_empty();
    for (which, critical, content) in input.extensions.iter().take(4) {
        let oid = match which {
            ExtOid::Known(n) => match n % 5 {
                0 => vec![2, 5, 29, 17],
                1 => vec![2, 5, 29, 19],
                2 => vec![2, 5, 29, 15],
                3 => vec![2, 5, 29, 37],
                _ => vec![2, 5, 29, 30],
            },
            ExtOid::Arbitrary(arcs) => oid(arcs),
        };
        let mut ext = CustomExtension::from_oid_content(&oid, content.clone());
        ext.set_criticality(*critical);
        params.custom_extensions.push(ext);
    }
    let key = &KEYS[usize::from(input.key) % KEYS.len()];
    let Ok(csr) = params.serialize_request(key) else {
        return;
    };
    let mut der = csr.der().to_vec();
    let tampered = match input.tamper {
        Some((at, x)) if x != 0 => {
            let i = usize::from(at) % der.len();
            der[i] ^= x;
            true
        }
        _ => false,
    };
    let bytes = if input.pem && !tampered {
        csr.pem().expect("pem encoding").into_bytes()
    } else {
        der
    };
    let result = ca::csr::check_csr(&bytes, &kith_fuzz::EXPECTED_ID);
    if result.is_ok() && !tampered && !custom {
        assert!(!asks_ca, "a CSR asking for CA:true was accepted");
        assert!(
            only_expected_san,
            "a CSR with another SAN was accepted: {:?}",
            params.subject_alt_names
        );
    }
    if let Err(e) = &result {
        assert!(!e.code().is_empty());
    }
});
