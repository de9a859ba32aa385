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
    assert!(status["time_to_outage_seconds"].as_i64().unwrap() > 300 * 86_400);
    assert_eq!(status["counts"]["issued"], 1);
    let (_, out, _) = kith(&["ca", "bundle", "--data-dir", d]);
    assert_eq!(out, pem);
    let (code, out, _) = kith(&["ca", "audit", "verify", "--data-dir", d]);
    assert_eq!(code, 0);
    assert!(out.starts_with("audit chain intact"), "{out}");

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entry_create_refuses_selectors_that_can_never_match_and_a_path_alone() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let d = data.to_str().unwrap();
    let ca = serve(&data);
    let create = |selectors: &[&str]| {
        let mut args = vec![
            "ca",
            "entry",
            "create",
            "--id",
            "spiffe://example.org/web",
            "--parent",
            "spiffe://example.org/kith/node/host-a",
            "--data-dir",
            d,
        ];
        for s in selectors {
            args.extend(["--selector", s]);
        }
        kith(&args)
    };
    // A type kith does not implement: refused with the list of the known ones.
    let (code, _, err) = create(&["k8s:ns:default"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("unknown_selector"), "{err}");
    for known in [
        "unix:uid",
        "unix:gid",
        "unix:path",
        "docker:label",
        "docker:image_id",
    ] {
        assert!(err.contains(known), "{known} missing from {err}");
    }
    // A known type with a value the agent never produces.
    let (code, _, err) = create(&["unix:uid:root"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("bad_selector") && err.contains("numeric uid"),
        "{err}"
    );
    // unix:path alone can be imitated from another mount namespace.
    let (code, _, err) = create(&["unix:path:/usr/bin/app"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("path_selector_needs_uid_or_gid"), "{err}");
    let (_, out, _) = kith(&["ca", "entry", "list", "--json", "--data-dir", d]);
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap(), json!([]));
    // With the uid it is accepted.
    let (code, _, err) = create(&["unix:path:/usr/bin/app", "unix:uid:1000"]);
    assert_eq!(code, 0, "{err}");
    // Each refusal is counted with its reason.
    let metrics = http_get(&ca.metrics_addr, "/metrics");
    for reason in [
        "unknown_selector",
        "bad_selector",
        "path_selector_needs_uid_or_gid",
    ] {
        assert!(
            metrics.contains(&format!("kith_ca_refused_total{{reason=\"{reason}\"}} 1")),
            "{reason}: {metrics}"
        );
    }
    assert_eq!(stop(ca), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_socket_refuses_a_local_user_who_is_neither_root_nor_the_cas_own() {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    use std::os::unix::process::CommandExt as _;
    if std::fs::metadata("/proc/self").unwrap().uid() != 0 {
        if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
            panic!("this test needs root in CI (it runs a client as another uid)");
        }
        eprintln!(
            "SKIPPED the_admin_socket_refuses_a_local_user_who_is_neither_root_nor_the_cas_own: not root, cannot run a client as another uid"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let d = data.to_str().unwrap();
    let ca = serve(&data);
    // The attack needs the fence of file modes to be down: an operator widened the data
    // directory and the socket by mistake.
    for (path, mode) in [
        (dir.path().to_owned(), 0o755),
        (data.clone(), 0o755),
        (data.join("admin.sock"), 0o666),
    ] {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kith"))
        .args(["ca", "token", "create", "--name", "evil", "--data-dir", d])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("admin_peer_not_allowed") && err.contains("uid 65534"),
        "{err}"
    );
    // Nothing was created, and root is still served.
    let (code, out, err) = kith(&["ca", "token", "list", "--json", "--data-dir", d]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap(), json!([]));
    // Counted and logged with the reason.
    let metrics = http_get(&ca.metrics_addr, "/metrics");
    assert!(
        metrics.contains("kith_ca_refused_total{reason=\"admin_peer_not_allowed\"} 1"),
        "{metrics}"
    );
    let logged = ca
        .log
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("refused an admin connection") && l.contains("uid 65534"));
    assert!(logged, "the refusal is logged with the uid");
    assert_eq!(stop(ca), 0);
}

/// A plain HTTP/1.0 GET; returns the whole response.
fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
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
