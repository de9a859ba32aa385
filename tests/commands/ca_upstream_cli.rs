//! `kith ca upstream replace --cert --key` as an operator runs it against a `kith ca serve`
//! under an upstream certificate: bad files are refused with a reason, the replacement is
//! published beside the current root, and once switched new SVIDs chain to it alone.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::common::{json_of, kith, serve_ca_with, stop};
use identity::{TrustBundle, TrustDomain, verify_x509_svid};
use integration::pki::operator_root;
use serde_json::json;

/// An operator's self-signed CA living `days`, written as `<name>.pem` and `<name>.key`.
fn upstream(dir: &Path, name: &str, days: u64) -> (PathBuf, PathBuf, Vec<u8>) {
    let td = TrustDomain::new("example.org").unwrap();
    let now = SystemTime::now();
    let (cert, key) = operator_root(
        &td,
        "Corp Root",
        now - Duration::from_secs(60),
        now + Duration::from_secs(days * 86_400),
    );
    let c = dir.join(format!("{name}.pem"));
    let k = dir.join(format!("{name}.key"));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k, cert.der().to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_replace_from_the_cli_publishes_then_signs_under_the_new_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let d = data.to_str().unwrap();
    let (old_cert, old_key, _) = upstream(dir.path(), "old", 1);
    let ca = serve_ca_with(
        &data,
        &[
            "--upstream-cert",
            old_cert.to_str().unwrap(),
            "--upstream-key",
            old_key.to_str().unwrap(),
        ],
    );
    let v = json_of(&["ca", "root", "status", "--json", "--data-dir", d]);
    assert_eq!(v["mode"], "upstream", "{v}");

    // A file that is not a certificate, and one that does not exist: refused with a reason,
    // nothing published.
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not pem").unwrap();
    let (code, _, err) = kith(&[
        "ca",
        "upstream",
        "replace",
        "--cert",
        junk.to_str().unwrap(),
        "--key",
        old_key.to_str().unwrap(),
        "--data-dir",
        d,
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("bad_upstream"), "{err}");
    let missing = dir.path().join("missing.pem");
    let (code, _, err) = kith(&[
        "ca",
        "upstream",
        "replace",
        "--cert",
        missing.to_str().unwrap(),
        "--key",
        old_key.to_str().unwrap(),
        "--data-dir",
        d,
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("cannot read") && err.contains("missing.pem"),
        "{err}"
    );
    // The replacement's key must be the replacement's.
    let (new_cert, new_key, new_der) = upstream(dir.path(), "new", 10);
    let (code, _, err) = kith(&[
        "ca",
        "upstream",
        "replace",
        "--cert",
        new_cert.to_str().unwrap(),
        "--key",
        old_key.to_str().unwrap(),
        "--data-dir",
        d,
    ]);
    assert_ne!(code, 0, "{err}");
    let v = json_of(&["ca", "root", "status", "--json", "--data-dir", d]);
    assert_eq!(v["roots"].as_array().unwrap().len(), 1, "{v}");

    let (code, out, err) = kith(&[
        "ca",
        "upstream",
        "replace",
        "--cert",
        new_cert.to_str().unwrap(),
        "--key",
        new_key.to_str().unwrap(),
        "--data-dir",
        d,
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("published the new upstream"), "{out}");
    assert!(out.contains("published"), "{out}");
    let v = json_of(&["ca", "root", "status", "--json", "--data-dir", d]);
    let roots = v["roots"].as_array().unwrap();
    assert_eq!(roots.len(), 2, "{v}");
    assert_eq!(roots[1]["phase"], "published", "{v}");
    let sha = ring::digest::digest(&ring::digest::SHA256, &new_der);
    let sha: String = sha.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(roots[1]["sha256"], sha.as_str(), "{v}");
    let (_, pem, _) = kith(&["ca", "bundle", "--data-dir", d]);
    assert_eq!(
        identity::pem::certificates(pem.as_bytes()).unwrap().len(),
        2
    );

    // Switch now; a node that joins afterwards chains to the new upstream alone.
    let v = json_of(&["ca", "root", "rotate", "--now", "--json", "--data-dir", d]);
    assert_eq!(v["outcome"], "switched", "{v}");
    let (code, out, err) = kith(&["ca", "token", "create", "--name", "host-a", "--data-dir", d]);
    assert_eq!(code, 0, "{err}");
    let token = out
        .split_whitespace()
        .find_map(|w| w.strip_prefix("KITH_JOIN_TOKEN="))
        .unwrap()
        .to_owned();
    let words: Vec<&str> = out.split_whitespace().collect();
    let pin = words[words.iter().position(|w| *w == "--bundle-sha256").unwrap() + 1];
    let bundle = Arc::new(
        ca_api::client::fetch_bundle_pinned(&ca.addr, pin)
            .await
            .unwrap(),
    );
    let mut conn = ca_api::client::Connection::open(
        &ca.addr,
        ca_api::client::client_config(bundle, None).unwrap(),
    )
    .await
    .unwrap();
    let (csr, _key) = integration::pki::csr();
    let (status, v) = conn
        .post_json("/v1/attest/join", &json!({"token": token, "csr": csr}))
        .await
        .unwrap();
    assert_eq!(status, 200, "{v}");
    let chain = identity::pem::certificates(v["svid"].as_str().unwrap().as_bytes()).unwrap();
    let only_new = TrustBundle::from_roots(
        TrustDomain::new("example.org").unwrap(),
        vec![new_der.into()],
    )
    .unwrap();
    verify_x509_svid(&chain, &only_new, SystemTime::now()).unwrap();
    assert_eq!(stop(ca), 0);
}
