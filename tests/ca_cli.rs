//! `kith ca` as a user runs it: serve on loopback, create a token and paste the join line's
//! parts, manage entries and nodes, read status and the audit log, stop with SIGTERM, and prove
//! the audit chain offline, including finding a tampered row.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;

use serde_json::{Value, json};

mod common;

use common::{kith, serve_ca as serve, stop};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_runs_the_ca_from_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let d = data.to_str().unwrap();
    let ca = serve(&data);

    let (code, out, err) = kith(&["ca", "token", "create", "--name", "host-a", "--data-dir", d]);
    assert_eq!(code, 0, "{err}");
    let line = out
        .lines()
        .find(|l| l.trim_start().starts_with("kith agent run"))
        .unwrap()
        .trim()
        .to_owned();
    let parts: Vec<&str> = line.split_whitespace().collect();
    let arg = |flag: &str| parts[parts.iter().position(|p| *p == flag).unwrap() + 1].to_owned();
    let (token, pin) = (arg("--join-token"), arg("--bundle-sha256"));
    assert!(arg("--ca").starts_with("https://localhost:"));

    // First contact: fetch the bundle over TLS without trusting it yet, check the pin, then
    // attest with the token, as an agent does.
    let bundle = Arc::new(
        ca::client::fetch_bundle_pinned(&ca.addr, &pin)
            .await
            .unwrap(),
    );
    let pem = bundle.to_pem();
    let wrong = ca::client::fetch_bundle_pinned(&ca.addr, &"0".repeat(64))
        .await
        .unwrap_err();
    assert!(wrong.to_string().contains("not the pinned"), "{wrong}");
    let mut conn =
        ca::client::Connection::open(&ca.addr, ca::client::client_config(bundle, None).unwrap())
            .await
            .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    let csr = p.serialize_request(&key).unwrap().pem().unwrap();
    let (status, v) = conn
        .post_json("/v1/attest/join", &json!({"token": token, "csr": csr}))
        .await
        .unwrap();
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["spiffe_id"], "spiffe://example.org/kith/node/host-a");
    check_with_outside_tools(dir.path(), &pem, v["svid"].as_str().unwrap());

    let (code, out, _) = kith(&[
        "ca",
        "entry",
        "create",
        "--id",
        "spiffe://example.org/web",
        "--parent",
        "spiffe://example.org/kith/node/host-a",
        "--selector",
        "unix:uid:1000",
        "--data-dir",
        d,
        "--json",
    ]);
    assert_eq!(code, 0);
    let entry: Value = serde_json::from_str(&out).unwrap();
    let (_, out, _) = kith(&["ca", "entry", "list", "--data-dir", d]);
    assert!(
        out.contains("spiffe://example.org/web") && out.contains("SPIFFE_ID"),
        "{out}"
    );
    let (code, out, _) = kith(&[
        "ca",
        "entry",
        "show",
        entry["id"].as_str().unwrap(),
        "--data-dir",
        d,
    ]);
    assert_eq!(code, 0, "{out}");
    let (code, _, err) = kith(&[
        "ca",
        "entry",
        "create",
        "--id",
        "spiffe://other.org/web",
        "--parent",
        "spiffe://example.org/kith/node/host-a",
        "--selector",
        "unix:uid:1",
        "--data-dir",
        d,
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("wrong_trust_domain"), "{err}");

    let (_, out, _) = kith(&["ca", "node", "list", "--json", "--data-dir", d]);
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()[0]["spiffe_id"],
        "spiffe://example.org/kith/node/host-a"
    );
    let (code, out, _) = kith(&["ca", "status", "--json", "--data-dir", d]);
    assert_eq!(code, 0);
    let status: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["signers"][0]["state"], "active");
    // Time to outage: the first signer's end, since no next signer is prepared yet (the root,
    // a year, has longer).
    let outage = status["time_to_outage_seconds"].as_i64().unwrap();
    let signer = status["signers"][0]["expires_in_seconds"].as_i64().unwrap();
    assert!(
        outage > 6 * 86_400 && (outage - signer).abs() <= 10,
        "{status}"
    );

    assert_eq!(status["counts"]["issued"], 1);
    let (_, out, _) = kith(&["ca", "bundle", "--data-dir", d]);
    assert_eq!(out, pem);
    let (code, out, _) = kith(&["ca", "audit", "verify", "--data-dir", d]);
    assert_eq!(code, 0);
    assert!(out.starts_with("audit chain intact"), "{out}");

    // The root verbs: status, an early rollover, and a forced switch that says what it risks.
    let (code, out, err) = kith(&["ca", "root", "status", "--data-dir", d]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(" active ") && out.contains("time to outage"),
        "{out}"
    );
    let (code, out, err) = kith(&["ca", "root", "rotate", "--data-dir", d]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("published successor root"), "{out}");
    assert!(
        out.contains("waits for the new bundle to reach every caller"),
        "{out}"
    );
    let (code, out, err) = kith(&["ca", "root", "rotate", "--now", "--data-dir", d]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("WITHOUT waiting. Risk:"), "{out}");
    assert!(out.contains("retiring"), "{out}");
    let (_, out, _) = kith(&["ca", "bundle", "--data-dir", d]);
    assert_eq!(
        out.matches("BEGIN CERTIFICATE").count(),
        2,
        "both roots during the overlap"
    );

    assert_eq!(stop(ca), 0, "SIGTERM is a clean exit");
    assert!(!data.join("admin.sock").exists());
    // Offline: the audit chain can be proven without the CA running...
    let (code, out, _) = kith(&["ca", "audit", "verify", "--data-dir", d]);
    assert_eq!(code, 0, "{out}");
    // ...and a tampered row is found by number.
    let db = rusqlite_free_edit(&data.join("kith-ca.db"));
    let (code, out, _) = kith(&["ca", "audit", "verify", "--data-dir", d]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("BROKEN at row {db}")), "{out}");

    // Admin commands against a stopped CA say what is wrong.
    let (code, _, err) = kith(&["ca", "status", "--data-dir", d]);
    assert_eq!(code, 2);
    assert!(err.contains("is `kith ca serve` running"), "{err}");
}

/// Alters audit row 2 behind the CA's back; returns the row number.
fn rusqlite_free_edit(db: &Path) -> i64 {
    let c = rusqlite::Connection::open(db).unwrap();
    c.execute("UPDATE audit SET subject = 'forged' WHERE seq = 2", [])
        .unwrap();
    2
}

/// openssl verifies the CA's node SVID against its bundle, and pkilint finds no error in the
/// leaf, the signing intermediate or the root beyond its known false positives.
fn check_with_outside_tools(dir: &Path, bundle_pem: &str, chain_pem: &str) {
    let bundle = dir.join("bundle.pem");
    let chain = dir.join("node.pem");
    std::fs::write(&bundle, bundle_pem).unwrap();
    std::fs::write(&chain, chain_pem).unwrap();
    if common::have_tool("openssl", "a_user_runs_the_ca_from_the_cli (openssl part)") {
        let (ok, text) = common::openssl(&[
            "verify",
            "-CAfile",
            bundle.to_str().unwrap(),
            "-untrusted",
            chain.to_str().unwrap(),
            chain.to_str().unwrap(),
        ]);
        assert!(ok, "{text}");
    }
    if common::have_tool(
        "lint_pkix_cert",
        "a_user_runs_the_ca_from_the_cli (pkilint part)",
    ) {
        let mut certs = common::split_pem(&chain, dir);
        certs.push(bundle);
        for cert in certs {
            let findings = common::pkilint_findings(&cert);
            assert!(findings.is_empty(), "{}: {findings:#?}", cert.display());
        }
    }
}
