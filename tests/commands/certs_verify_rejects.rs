//! `kith certs verify` accepts a good chain and refuses each kind of bad one with its own
//! reason and exit code 1.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::common::Kith;
use identity::SpiffeId;
use identity::x509::{intermediate_params, svid_params, to_offset};
use rcgen::{Issuer, KeyPair, SanType};
use rustls_pki_types::CertificateDer;

const ID: &str = "spiffe://example.org/web";

fn read_cert(path: &Path) -> CertificateDer<'static> {
    identity::pem::certificates(&std::fs::read(path).unwrap())
        .unwrap()
        .remove(0)
}

fn key(path: &Path) -> KeyPair {
    KeyPair::from_pem(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The dev CA's intermediate as an rcgen issuer, to forge leaves the CLI would never make.
fn ca_issuer(kith: &Kith) -> Issuer<'static, KeyPair> {
    let cert = read_cert(&kith.home().join("intermediate.crt"));
    Issuer::from_ca_cert_der(&cert, key(&kith.home().join("intermediate.key"))).unwrap()
}

fn write_chain(kith: &Kith, name: &str, certs: &[CertificateDer<'_>]) -> PathBuf {
    let path = kith.path(name);
    std::fs::write(&path, identity::pem::encode_certificates(certs)).unwrap();
    path
}

fn verify(kith: &Kith, chain: &Path, bundle: &Path, extra: &[&str]) -> (i32, String) {
    let mut args = vec![
        "verify",
        chain.to_str().unwrap(),
        "--bundle",
        bundle.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let run = kith.certs(&args);
    (run.code, format!("{}{}", run.stdout, run.stderr))
}

fn rfc3339(t: SystemTime) -> String {
    to_offset(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

#[test]
fn a_valid_chain_prints_its_spiffe_id() {
    let kith = Kith::new();
    let (chain, _, bundle) = kith.issue(ID, "out", &[]);
    let (code, out) = verify(&kith, &chain, &bundle, &["--id", ID]);
    assert_eq!((code, out.trim()), (0, ID));
    let run = kith.certs(&[
        "verify",
        chain.to_str().unwrap(),
        "--bundle",
        bundle.to_str().unwrap(),
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(v, serde_json::json!({"valid": true, "spiffe_id": ID}));
}

#[test]
fn an_expired_leaf_is_refused() {
    let kith = Kith::new();
    let (chain, _, bundle) = kith.issue(ID, "out", &["--ttl", "1h"]);
    let later = rfc3339(SystemTime::now() + Duration::from_secs(2 * 3600));
    let (code, out) = verify(&kith, &chain, &bundle, &["--at", &later]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("invalid: expired: certificate expired at"),
        "{out}"
    );
    let earlier = rfc3339(SystemTime::now() - Duration::from_secs(3600));
    let (code, out) = verify(&kith, &chain, &bundle, &["--at", &earlier]);
    assert_eq!(code, 1);
    assert!(out.contains("invalid: not_yet_valid"), "{out}");
}

#[test]
fn a_leaf_from_another_ca_is_refused() {
    let ours = Kith::new();
    let theirs = Kith::new();
    let (_, _, bundle) = ours.issue(ID, "out", &[]);
    let (chain, _, _) = theirs.issue(ID, "out", &[]);
    let (code, out) = verify(&ours, &chain, &bundle, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("invalid: unknown_ca"), "{out}");
}

#[test]
fn a_leaf_with_two_uri_sans_is_refused() {
    let kith = Kith::new();
    let (_, _, bundle) = kith.issue(ID, "out", &[]);
    let now = SystemTime::now();
    let mut params = svid_params(
        &SpiffeId::new(ID).unwrap(),
        &[],
        &[],
        now,
        now + Duration::from_secs(3600),
    )
    .unwrap();
    params.subject_alt_names.push(SanType::URI(
        "spiffe://example.org/admin".try_into().unwrap(),
    ));
    let leaf = params
        .signed_by(&KeyPair::generate().unwrap(), &ca_issuer(&kith))
        .unwrap();
    let inter = read_cert(&kith.home().join("intermediate.crt"));
    let chain = write_chain(&kith, "two-uris.crt", &[leaf.der().clone(), inter]);
    let (code, out) = verify(&kith, &chain, &bundle, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("invalid: not_svid(multiple_uri_sans)"),
        "{out}"
    );
}

#[test]
fn a_ca_certificate_used_as_a_leaf_is_refused() {
    let kith = Kith::new();
    let (_, _, bundle) = kith.issue(ID, "out", &[]);
    let (code, out) = verify(&kith, &kith.home().join("intermediate.crt"), &bundle, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("invalid: not_svid(leaf_is_ca)"), "{out}");
}

#[test]
fn a_chain_with_a_wrong_intermediate_is_refused() {
    let kith = Kith::new();
    let (chain, _, bundle) = kith.issue(ID, "out", &[]);
    // A second intermediate under the same root, with the same name but another key: the
    // leaf names it as issuer, but its signature is not that key's.
    let root = read_cert(&kith.home().join("root.crt"));
    let root_issuer = Issuer::from_ca_cert_der(&root, key(&kith.home().join("root.key"))).unwrap();
    let original = read_cert(&kith.home().join("intermediate.crt"));
    let (_, parsed) = x509_parser::parse_x509_certificate(&original).unwrap();
    let cn = parsed
        .subject()
        .iter_common_name()
        .next()
        .unwrap()
        .as_str()
        .unwrap()
        .to_owned();
    let now = SystemTime::now();
    let td = identity::TrustDomain::new("example.org").unwrap();
    let params = intermediate_params(&td, &cn, now, now + Duration::from_secs(86_400)).unwrap();
    let impostor = params
        .signed_by(&KeyPair::generate().unwrap(), &root_issuer)
        .unwrap();
    let leaf = read_cert(&chain);
    let bad = write_chain(
        &kith,
        "wrong-intermediate.crt",
        &[leaf, impostor.der().clone()],
    );
    let (code, out) = verify(&kith, &bad, &bundle, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("invalid: bad_signature"), "{out}");
    // And with the intermediate left out entirely, no path to the root exists.
    let leaf_only = write_chain(&kith, "leaf-only.crt", &[read_cert(&chain)]);
    let (code, out) = verify(&kith, &leaf_only, &bundle, &[]);
    assert_eq!(code, 1);
    assert!(out.contains("invalid: unknown_ca"), "{out}");
}

#[test]
fn an_unexpected_id_is_refused() {
    let kith = Kith::new();
    let (chain, _, bundle) = kith.issue(ID, "out", &[]);
    let (code, out) = verify(&kith, &chain, &bundle, &["--id", "spiffe://example.org/db"]);
    assert_eq!(code, 1);
    assert!(out.contains("invalid: unexpected_id: spiffe id is spiffe://example.org/web, expected spiffe://example.org/db"), "{out}");
    let run = kith.certs(&[
        "verify",
        chain.to_str().unwrap(),
        "--bundle",
        bundle.to_str().unwrap(),
        "--id",
        "spiffe://example.org/db",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(v["valid"], false);
    assert_eq!(v["reason"], "unexpected_id");
}

#[test]
fn the_spiffe_bundle_format_is_accepted() {
    let kith = Kith::new();
    let (chain, _, bundle) = kith.issue(ID, "out", &[]);
    let pem = std::fs::read(&bundle).unwrap();
    let json = identity::TrustBundle::parse(None, &pem)
        .unwrap()
        .to_spiffe_json();
    let json_path = kith.path("bundle.json");
    std::fs::write(&json_path, json).unwrap();
    let (code, out) = verify(&kith, &chain, &json_path, &[]);
    assert_eq!((code, out.trim()), (0, ID));
}
