//! verify_x509_svid: each way a chain can fail has its own typed reason.
#![allow(clippy::unwrap_used)]

use identity::x509::{intermediate_params, svid_params};
use identity::{NotSvid, SpiffeId, TrustBundle, VerifyError, verify_x509_svid};
use integration::pki::{DAY, HOUR, Pki, now};
use rcgen::{ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType};

const ID: &str = "spiffe://example.org/ns/default/sa/web";

#[test]
fn a_valid_svid_yields_its_id() {
    let pki = Pki::new("example.org");
    let (chain, _) = pki.leaf(ID);
    let id = verify_x509_svid(&chain, &pki.bundle(), now()).unwrap();
    assert_eq!(id, SpiffeId::new(ID).unwrap());
}

#[test]
fn expired_and_not_yet_valid() {
    let pki = Pki::new("example.org");
    let (chain, _) = pki.leaf(ID);
    let err = verify_x509_svid(&chain, &pki.bundle(), now() + 2 * HOUR).unwrap_err();
    assert_eq!(err.reason(), "expired", "{err}");
    let err = verify_x509_svid(&chain, &pki.bundle(), now() - 2 * HOUR).unwrap_err();
    assert_eq!(err.reason(), "not_yet_valid", "{err}");
}

#[test]
fn a_leaf_from_another_ca_is_unknown_ca() {
    let ours = Pki::new("example.org");
    let theirs = Pki::new("example.org");
    let (chain, _) = theirs.leaf(ID);
    let err = verify_x509_svid(&chain, &ours.bundle(), now()).unwrap_err();
    assert_eq!(err, VerifyError::UnknownCa);
}

#[test]
fn a_missing_intermediate_is_unknown_ca() {
    let pki = Pki::new("example.org");
    let (mut chain, _) = pki.leaf(ID);
    chain.truncate(1);
    assert_eq!(
        verify_x509_svid(&chain, &pki.bundle(), now()),
        Err(VerifyError::UnknownCa)
    );
}

#[test]
fn a_wrong_intermediate_is_a_bad_signature() {
    let pki = Pki::new("example.org");
    let (mut chain, _) = pki.leaf(ID);
    // Another signer under the same root with the same name, but a different key: the name
    // chains, the signature does not.
    let other_key = KeyPair::generate().unwrap();
    let params = intermediate_params(
        &pki.td,
        &format!("test signer {}", pki.tag),
        now() - DAY,
        now() + DAY,
    )
    .unwrap();
    chain[1] = params
        .signed_by(&other_key, &pki.root_issuer)
        .unwrap()
        .der()
        .clone();
    assert_eq!(
        verify_x509_svid(&chain, &pki.bundle(), now()),
        Err(VerifyError::BadSignature)
    );
}

#[test]
fn a_leaf_with_two_uri_sans_is_not_an_svid() {
    let pki = Pki::new("example.org");
    let (chain, _) = pki.leaf_with(ID, |p| {
        p.subject_alt_names.push(SanType::URI(
            "spiffe://example.org/other".try_into().unwrap(),
        ));
    });
    let err = verify_x509_svid(&chain, &pki.bundle(), now()).unwrap_err();
    assert_eq!(err, VerifyError::NotSvid(NotSvid::MultipleUriSans(2)));
    assert_eq!(err.detailed_reason(), "not_svid(multiple_uri_sans)");
}

#[test]
fn a_ca_certificate_used_as_a_leaf_is_not_an_svid() {
    let pki = Pki::new("example.org");
    // The signing intermediate itself, presented as the leaf.
    let chain = vec![pki.intermediate.clone()];
    let err = verify_x509_svid(&chain, &pki.bundle(), now()).unwrap_err();
    assert_eq!(err, VerifyError::NotSvid(NotSvid::LeafIsCa), "{err}");
}

#[test]
fn leaf_rules_each_have_a_reason() {
    let pki = Pki::new("example.org");
    type Tweak = Box<dyn FnOnce(&mut rcgen::CertificateParams)>;
    let cases: Vec<(&str, Tweak, &str)> = vec![
        (
            ID,
            Box::new(|p| {
                p.subject_alt_names
                    .retain(|s| !matches!(s, SanType::URI(_)))
            }),
            "no_uri_san",
        ),
        ("spiffe://example.org", Box::new(|_| {}), "no_path"),
        (
            ID,
            Box::new(|p| p.key_usages = vec![KeyUsagePurpose::KeyEncipherment]),
            "no_digital_signature",
        ),
        (ID, Box::new(|p| p.key_usages = vec![]), "no_key_usage"),
        (
            ID,
            Box::new(|p| p.key_usages.push(KeyUsagePurpose::KeyCertSign)),
            "key_cert_sign",
        ),
        (
            ID,
            Box::new(|p| p.key_usages.push(KeyUsagePurpose::CrlSign)),
            "crl_sign",
        ),
        (
            ID,
            Box::new(|p| p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth]),
            "missing_eku",
        ),
        (
            ID,
            Box::new(|p| {
                p.subject_alt_names =
                    vec![SanType::URI("https://example.org/web".try_into().unwrap())]
            }),
            "invalid_spiffe_id",
        ),
    ];
    for (id, tweak, rule) in cases {
        // svid_params refuses nothing here; the tweaks break the rules afterwards.
        let id_parsed = SpiffeId::new(id).unwrap();
        let mut params = svid_params(&id_parsed, &[], &[], now() - HOUR, now() + HOUR).unwrap();
        tweak(&mut params);
        let (chain, _) = pki.issue(&params);
        let err = verify_x509_svid(&chain, &pki.bundle(), now()).unwrap_err();
        assert_eq!(
            err.detailed_reason(),
            format!("not_svid({rule})"),
            "{rule}: {err}"
        );
    }
}

#[test]
fn an_id_outside_the_bundles_trust_domain_is_refused() {
    let pki = Pki::new("example.org");
    let (chain, _) = pki.leaf("spiffe://evil.org/web");
    let err = verify_x509_svid(&chain, &pki.bundle(), now()).unwrap_err();
    assert_eq!(err.reason(), "wrong_trust_domain", "{err}");
}

#[test]
fn an_expired_root_is_reported_as_such() {
    let pki = Pki::valid("example.org", now() - 10 * DAY, now() + 30 * DAY);
    // A root valid only until yesterday, with the same key as the real one.
    let mut rp = identity::x509::root_params(
        &pki.td,
        &format!("test root {}", pki.tag),
        now() - 10 * DAY,
        now() - DAY,
    )
    .unwrap();
    rp.serial_number = None;
    let key = KeyPair::generate().unwrap();
    let expired_root = rp.self_signed(&key).unwrap().der().clone();
    let issuer = Issuer::new(rp, key);
    let ikey = KeyPair::generate().unwrap();
    let ip = intermediate_params(&pki.td, "s", now() - DAY, now() + DAY).unwrap();
    let inter = ip.signed_by(&ikey, &issuer).unwrap().der().clone();
    let inter_issuer = Issuer::new(ip, ikey);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = svid_params(
        &SpiffeId::new(ID).unwrap(),
        &[],
        &[],
        now() - HOUR,
        now() + HOUR,
    )
    .unwrap()
    .signed_by(&leaf_key, &inter_issuer)
    .unwrap()
    .der()
    .clone();
    let bundle =
        TrustBundle::from_roots(pki.td.clone(), vec![pki.root.clone(), expired_root]).unwrap();
    let err = verify_x509_svid(&[leaf, inter], &bundle, now()).unwrap_err();
    assert!(matches!(err, VerifyError::RootExpired { .. }), "{err}");
    assert_eq!(err.reason(), "expired");
}

#[test]
fn garbage_and_empty_chains_are_malformed() {
    let pki = Pki::new("example.org");
    assert_eq!(
        verify_x509_svid(&[], &pki.bundle(), now()),
        Err(VerifyError::EmptyChain)
    );
    let garbage = vec![rustls_pki_types::CertificateDer::from(vec![
        0x30, 0x03, 1, 2, 3,
    ])];
    assert_eq!(
        verify_x509_svid(&garbage, &pki.bundle(), now())
            .unwrap_err()
            .reason(),
        "malformed"
    );
}

#[test]
fn a_bundle_with_two_roots_accepts_leaves_of_both() {
    let a = Pki::new("example.org");
    let b = Pki::new("example.org");
    let mut bundle = a.bundle();
    bundle.add_x509_authority(b.root.clone());
    assert!(verify_x509_svid(&a.leaf(ID).0, &bundle, now()).is_ok());
    assert!(verify_x509_svid(&b.leaf(ID).0, &bundle, now()).is_ok());
}

#[test]
fn explicit_no_ca_is_what_kith_issues() {
    let id = SpiffeId::new(ID).unwrap();
    let p = svid_params(&id, &[], &[], now(), now() + HOUR).unwrap();
    assert_eq!(p.is_ca, IsCa::ExplicitNoCa);
}

#[test]
fn the_verdict_window_bounds_where_the_answer_holds() {
    use std::time::Duration;
    let second = Duration::from_secs(1);
    let pki = Pki::new("example.org");
    let (chain, _) = pki.leaf(ID);
    let bundle = pki.bundle();
    let (from, until) = identity::verdict_window(&chain, &bundle, now()).unwrap();
    // The leaf's own validity (one hour either side) is the narrowest here.
    assert!(from > now() - HOUR - 5 * second && from < now() - HOUR + 5 * second);
    assert!(until > now() + HOUR - 5 * second && until < now() + HOUR + 5 * second);
    for inside in [from, until] {
        verify_x509_svid(&chain, &bundle, inside).unwrap();
    }
    for outside in [from - second, until + second] {
        verify_x509_svid(&chain, &bundle, outside).unwrap_err();
    }

    // A CA that expires sooner than the leaf ends the window.
    let short = Pki::valid("example.org", now() - DAY, now() + HOUR / 2);
    let (chain, _) = short.leaf(ID);
    let (_, until) = identity::verdict_window(&chain, &short.bundle(), now()).unwrap();
    assert!(until < now() + HOUR / 2 + 5 * second, "{until:?}");
    assert!(identity::verdict_window(&[b"junk".to_vec().into()], &bundle, now()).is_none());
}
