//! Trust bundles and SVIDs round-trip through PEM and the SPIFFE formats.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use identity::{BundleError, JwtAuthority, Svid, SvidError, TrustBundle, TrustDomain};
use integration::pki::Pki;
use serde_json::{Value, json};

fn jwt_authority(kid: &str) -> JwtAuthority {
    let jwk = json!({"kty": "EC", "crv": "P-256", "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
                     "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0", "kid": kid, "use": "jwt-svid"});
    let Value::Object(jwk) = jwk else {
        unreachable!()
    };
    JwtAuthority {
        key_id: kid.into(),
        jwk,
    }
}

#[test]
fn spiffe_json_round_trips_roots_jwt_keys_sequence_and_hint() {
    let a = Pki::new("example.org");
    let b = Pki::new("example.org");
    let mut bundle = a.bundle();
    bundle.add_x509_authority(b.root.clone());
    bundle.add_jwt_authority(jwt_authority("key-1"));
    bundle.set_sequence(42);
    bundle.set_refresh_hint(Duration::from_secs(300));

    let json = bundle.to_spiffe_json();
    let v: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["spiffe_sequence"], 42);
    assert_eq!(v["spiffe_refresh_hint"], 300);
    let keys = v["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 3);
    assert_eq!(keys[0]["use"], "x509-svid");
    assert_eq!(keys[0]["kty"], "EC");
    assert_eq!(keys[0]["crv"], "P-256");
    assert_eq!(keys[0]["x5c"].as_array().unwrap().len(), 1);
    assert_eq!(keys[2]["use"], "jwt-svid");
    assert_eq!(keys[2]["kid"], "key-1");

    let back = TrustBundle::from_spiffe_json(a.td.clone(), json.as_bytes()).unwrap();
    assert_eq!(back, bundle);
    // Without a trust domain, it is read from the roots' spiffe:// URI SAN.
    assert_eq!(TrustBundle::parse(None, json.as_bytes()).unwrap(), bundle);
}

#[test]
fn pem_round_trips_and_names_its_trust_domain() {
    let a = Pki::new("example.org");
    let b = Pki::new("example.org");
    let mut bundle = a.bundle();
    bundle.add_x509_authority(b.root.clone());
    let pem = bundle.to_pem();
    assert_eq!(pem.matches("BEGIN CERTIFICATE").count(), 2);
    let back = TrustBundle::parse(None, pem.as_bytes()).unwrap();
    assert_eq!(back, bundle);
    let err = TrustBundle::from_pem(Some(TrustDomain::new("other.org").unwrap()), pem.as_bytes());
    assert!(matches!(err, Err(BundleError::TrustDomainMismatch { .. })));
}

#[test]
fn a_root_of_another_trust_domain_is_refused_in_either_format() {
    let a = Pki::new("example.org");
    let other = Pki::new("other.org");
    let mut bundle = a.bundle();
    bundle.add_x509_authority(other.root.clone());
    let td = a.td.clone();
    // PEM: the second root names other.org (only the first was checked before).
    for input in [bundle.to_pem(), bundle.to_spiffe_json()] {
        for given in [Some(td.clone()), None] {
            let err = TrustBundle::parse(given, input.as_bytes());
            assert!(
                matches!(&err, Err(BundleError::TrustDomainMismatch { found, .. }) if found.as_str() == "other.org"),
                "{err:?}"
            );
        }
    }
    let err = TrustBundle::from_spiffe_json(td.clone(), bundle.to_spiffe_json().as_bytes());
    assert!(
        matches!(err, Err(BundleError::TrustDomainMismatch { .. })),
        "{err:?}"
    );
    // The fuzzer's input: a SPIFFE JSON bundle read for example.org whose one root names the
    // trust domain `example.`.
    let found = include_bytes!("../../fuzz/regressions/bundle/json-root-of-another-trust-domain");
    let err = TrustBundle::parse(Some(TrustDomain::new("example.org").unwrap()), found);
    assert!(
        matches!(&err, Err(BundleError::TrustDomainMismatch { found, .. }) if found.as_str() == "example."),
        "{err:?}"
    );
}

#[test]
fn bad_spiffe_json_is_refused_with_the_key_at_fault() {
    let pki = Pki::new("example.org");
    let td = pki.td.clone();
    let good: Value = serde_json::from_str(&pki.bundle().to_spiffe_json()).unwrap();
    let key = good["keys"][0].clone();

    let mut two_certs = key.clone();
    two_certs["x5c"] = json!([key["x5c"][0], key["x5c"][0]]);
    let mut wrong_x = key.clone();
    wrong_x["x"] = json!("AAAA");
    let cases = [
        (json!({"keys": [two_certs]}), "exactly one certificate"),
        (json!({"keys": [wrong_x]}), "does not match"),
        (
            json!({"keys": [{"use": "x509-svid", "kty": "EC"}]}),
            "no x5c",
        ),
        (
            json!({"keys": [{"use": "x509-svid", "x5c": ["%%%"]}]}),
            "not base64",
        ),
        (
            json!({"keys": [{"use": "jwt-svid", "kty": "EC"}]}),
            "no kid",
        ),
        (json!({"nokeys": []}), "missing field `keys`"),
    ];
    for (input, want) in cases {
        let err =
            TrustBundle::from_spiffe_json(td.clone(), input.to_string().as_bytes()).unwrap_err();
        assert!(err.to_string().contains(want), "{want}: {err}");
    }
    // Keys of an unknown use are skipped, as the standard asks.
    let with_unknown = json!({"keys": [key, {"use": "wit-svid", "kid": "w"}]});
    let bundle = TrustBundle::from_spiffe_json(td, with_unknown.to_string().as_bytes()).unwrap();
    assert_eq!(bundle.x509_authorities().len(), 1);
}

#[test]
fn a_leaf_is_not_a_root() {
    let pki = Pki::new("example.org");
    let (chain, _) = pki.leaf("spiffe://example.org/web");
    let err = TrustBundle::from_roots(pki.td.clone(), vec![chain[0].clone()]).unwrap_err();
    assert!(matches!(err, BundleError::NotCa { index: 0 }));
}

#[test]
fn svid_round_trips_as_pem_and_credential_bundle() {
    let pki = Pki::new("example.org");
    let (chain, key) = pki.leaf("spiffe://example.org/web");
    let chain_pem = identity::pem::encode_certificates(&chain);
    let svid = Svid::from_pem(chain_pem.as_bytes(), key.serialize_pem().as_bytes()).unwrap();
    assert_eq!(svid.id().as_str(), "spiffe://example.org/web");
    assert_eq!(svid.chain_pem(), chain_pem);
    assert!(!format!("{svid:?}").contains("PRIVATE"));

    let cb = svid.to_credential_bundle();
    assert!(cb.starts_with("-----BEGIN PRIVATE KEY-----"));
    let back = Svid::from_credential_bundle(cb.as_bytes()).unwrap();
    assert_eq!(back.chain(), svid.chain());
    assert_eq!(back.key_pem(), svid.key_pem());
}

/// Compiles only for types that wipe their memory when dropped.
fn wiped_on_drop<T: zeroize::ZeroizeOnDrop>(_: &T) {}

#[test]
fn an_svids_key_and_the_pem_texts_made_from_it_are_wiped_on_drop() {
    let pki = Pki::new("example.org");
    let (chain, key) = pki.leaf("spiffe://example.org/web");
    let svid = Svid::from_pem(
        identity::pem::encode_certificates(&chain).as_bytes(),
        key.serialize_pem().as_bytes(),
    )
    .unwrap();
    let key_pem = svid.key_pem();
    let bundle = svid.to_credential_bundle();
    wiped_on_drop(&key_pem);
    wiped_on_drop(&bundle);
    // The wiping encoder writes exactly the usual PEM.
    assert_eq!(
        *key_pem,
        identity::pem::encode("PRIVATE KEY", svid.key().secret_pkcs8_der())
    );
    assert_eq!(*bundle, format!("{}{}", *key_pem, svid.chain_pem()));
    // A key that is a multiple of 48 bytes long ends its base64 on a line boundary.
    for len in [0usize, 1, 47, 48, 49, 96, 500] {
        let der: Vec<u8> = (0..len).map(|i| i as u8).collect();
        assert_eq!(
            *identity::pem::encode_secret("PRIVATE KEY", &der),
            identity::pem::encode("PRIVATE KEY", &der),
            "{len}"
        );
    }
}

#[test]
fn an_svid_refuses_a_key_that_is_not_its_own() {
    let pki = Pki::new("example.org");
    let (chain, _) = pki.leaf("spiffe://example.org/web");
    let (_, other_key) = pki.leaf("spiffe://example.org/db");
    let chain_pem = identity::pem::encode_certificates(&chain);
    let err =
        Svid::from_pem(chain_pem.as_bytes(), other_key.serialize_pem().as_bytes()).unwrap_err();
    assert!(matches!(err, SvidError::KeyMismatch), "{err}");
}
