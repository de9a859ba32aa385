//! `kith ca` as a user runs it: serve on loopback, create a token and paste the join line's
//! parts, manage entries and nodes, read status and the audit log, stop with SIGTERM, and prove
//! the audit chain offline, including finding a tampered row.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;

use serde_json::{Value, json};

use crate::common;
use crate::common::{kith, kith_with_kek, serve_ca as serve, stop};
use integration::CA_KEK as KEK;
use integration::pki::csr;

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
        .find(|l| l.contains("kith agent run"))
        .unwrap()
        .trim()
        .to_owned();
    let parts: Vec<&str> = line.split_whitespace().collect();
    let arg = |flag: &str| parts[parts.iter().position(|p| *p == flag).unwrap() + 1].to_owned();
    // The token in the environment, not in argv.
    assert!(!parts.contains(&"--join-token"), "{line}");
    let token = parts[0]
        .strip_prefix("KITH_JOIN_TOKEN=")
        .unwrap()
        .to_owned();
    let pin = arg("--bundle-sha256");
    assert!(arg("--ca").starts_with("https://localhost:"));

    // First contact: fetch the bundle over TLS without trusting it yet, check the pin, then
    // attest with the token, as an agent does.
    let bundle = Arc::new(
        ca_api::client::fetch_bundle_pinned(&ca.addr, &pin)
            .await
            .unwrap(),
    );
    let pem = bundle.to_pem();
    let wrong = ca_api::client::fetch_bundle_pinned(&ca.addr, &"0".repeat(64))
        .await
        .unwrap_err();
    assert!(wrong.to_string().contains("not the pinned"), "{wrong}");
    let mut conn = ca_api::client::Connection::open(
        &ca.addr,
        ca_api::client::client_config(bundle, None).unwrap(),
    )
    .await
    .unwrap();
    let (csr, _key) = csr();
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
    assert_eq!(status["disk"]["state"], "ok", "{status}");
    assert!(status["disk"]["free_bytes"].as_u64().unwrap() > 0);
    let (_, out, _) = kith(&["ca", "status", "--data-dir", d]);
    assert!(out.contains("disk          ok:"), "{out}");
    assert!(out.contains("audit head    "), "{out}");
    assert!(status["audit_head"]["seq"].as_i64().unwrap() > 0);
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
    // Offline: the audit chain can be proven without the CA running, with its KEK...
    let (code, out, _) = kith_with_kek(&["ca", "audit", "verify", "--data-dir", d]);
    assert_eq!(code, 0, "{out}");
    // ...and a tampered row is found by number.
    let db = rusqlite_free_edit(&data.join("kith-ca.db"));
    let (code, out, _) = kith_with_kek(&["ca", "audit", "verify", "--data-dir", d]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("BROKEN at row {db}")), "{out}");

    // Admin commands against a stopped CA say what is wrong.
    let (code, _, err) = kith(&["ca", "status", "--data-dir", d]);
    assert_eq!(code, 2);
    assert!(err.contains("is `kith ca serve` running"), "{err}");
}

#[test]
fn the_kek_is_never_taken_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("data");
    let (code, _, err) = kith(&[
        "ca",
        "serve",
        "--kek",
        KEK,
        "--data-dir",
        d.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("unexpected argument '--kek'"), "{err}");
    assert!(!d.exists(), "nothing was started");
    let (_, help, _) = kith(&["ca", "serve", "--help"]);
    assert!(
        help.contains("KITH_CA_KEK") && help.contains("--kek-file"),
        "{help}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_written_down_audit_head_catches_deleted_rows() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let d = data.to_str().unwrap();
    let ca = serve(&data);
    for name in ["host-a", "host-b", "host-c"] {
        let (code, _, err) = kith(&["ca", "token", "create", "--name", name, "--data-dir", d]);
        assert_eq!(code, 0, "{err}");
    }
    let (code, out, err) = kith(&["ca", "audit", "head", "--json", "--data-dir", d]);
    assert_eq!(code, 0, "{err}");
    let head: Value = serde_json::from_str(&out).unwrap();
    let seq = head["seq"].as_i64().unwrap();
    let hash = head["hash"].as_str().unwrap().to_owned();
    assert_eq!(hash.len(), 64);
    let (_, text, _) = kith(&["ca", "audit", "head", "--data-dir", d]);
    let written_down = format!("{seq}:{hash}");
    assert_eq!(text.trim(), written_down);
    let (code, out, _) = kith(&[
        "ca",
        "audit",
        "verify",
        "--expect-head",
        &written_down,
        "--data-dir",
        d,
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&written_down), "{out}");
    assert_eq!(stop(ca), 0);

    // Offline, verifying needs the KEK, and says so.
    let (code, _, err) = kith(&["ca", "audit", "verify", "--data-dir", d]);
    assert_eq!(code, 2);
    assert!(
        err.contains("KITH_CA_KEK") && err.contains("--kek-file"),
        "{err}"
    );
    let (code, out, _) = kith(&["ca", "audit", "head", "--data-dir", d]);
    assert_eq!((code, out.trim()), (0, written_down.as_str()));

    // The newest rows deleted behind the CA's back: still a chain, but not the one written down.
    let c = rusqlite::Connection::open(data.join("kith-ca.db")).unwrap();
    c.execute("DELETE FROM audit WHERE seq >= ?1", [seq - 1])
        .unwrap();
    let (code, out, _) = kith_with_kek(&["ca", "audit", "verify", "--data-dir", d]);
    assert_eq!(code, 0, "{out}");
    let (code, out, _) = kith_with_kek(&[
        "ca",
        "audit",
        "verify",
        "--expect-head",
        &written_down,
        "--data-dir",
        d,
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("rows were deleted"), "{out}");
    let (code, _, err) = kith_with_kek(&[
        "ca",
        "audit",
        "verify",
        "--expect-head",
        "seven",
        "--data-dir",
        d,
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("SEQ:HASH"), "{err}");
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
        integration::skip::skip(
            "the_admin_socket_refuses_a_local_user_who_is_neither_root_nor_the_cas_own",
            "not root, cannot run a client as another uid",
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

/// id, kind, cert_der, sealed_key, not_before, not_after, activate_at.
type KeyRow = (String, String, Option<Vec<u8>>, Vec<u8>, i64, i64, i64);

/// Turns a CA's database back into what the kith before the keyed chain left: the audit log
/// as a plain SHA-256 chain, and every CA key sealed in format 1 (bound to kind and id only).
fn make_it_look_old(db: &Path) {
    let c = rusqlite::Connection::open(db).unwrap();
    let kek = ca::seal::Kek::from_base64(KEK).unwrap();
    let store_keys: Vec<KeyRow> = c
        .prepare("SELECT id, kind, cert_der, sealed_key, not_before, not_after, activate_at FROM ca_keys")
        .unwrap()
        .query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect();
    for (id, kind, cert_der, sealed, not_before, not_after, activate_at) in store_keys {
        let kind = match kind.as_str() {
            "root" => ca::store::KeyKind::Root,
            "intermediate" => ca::store::KeyKind::Intermediate,
            _ => ca::store::KeyKind::Jwt,
        };
        let rec = ca::store::CaKeyRecord {
            id: id.clone(),
            kind,
            cert_der,
            sealed_key: sealed.clone(),
            not_before,
            not_after,
            activate_at,
            created_at: 0,
        };
        let der = kek.unseal(&ca::authority::binding(&rec), &sealed).unwrap();
        let mut old = kek.seal(&format!("kith-ca:{kind:?}:{id}"), &der).unwrap();
        old[0] = 1;
        c.execute(
            "UPDATE ca_keys SET sealed_key = ?1 WHERE id = ?2",
            rusqlite::params![old, id],
        )
        .unwrap();
    }
    let rows: Vec<(i64, i64, String, String, String, String)> = c
        .prepare("SELECT seq, at, action, subject, outcome, detail FROM audit ORDER BY seq")
        .unwrap()
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let mut prev = [0u8; 32];
    for (seq, at, action, subject, outcome, detail) in rows {
        let e = ca::store::AuditEvent {
            at,
            action,
            subject,
            outcome,
            detail: Value::Null,
        };
        let h = ca::store::legacy_audit_hash(&prev, seq, &e, &detail);
        c.execute(
            "UPDATE audit SET prev_hash = ?1, hash = ?2 WHERE seq = ?3",
            rusqlite::params![&prev[..], &h[..], seq],
        )
        .unwrap();
        prev = h;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_from_before_the_keyed_chain_upgrades_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let d = data.to_str().unwrap();
    let ca = serve(&data);
    let (code, _, err) = kith(&["ca", "token", "create", "--name", "host-a", "--data-dir", d]);
    assert_eq!(code, 0, "{err}");
    let bundle_before = kith(&["ca", "bundle", "--data-dir", d]).1;
    assert_eq!(stop(ca), 0);
    make_it_look_old(&data.join("kith-ca.db"));
    let (_, out, _) = kith_with_kek(&["ca", "audit", "verify", "--data-dir", d]);
    assert!(
        out.contains("BROKEN") && out.contains("no row is keyed"),
        "{out}"
    );

    // The new kith starts on it: same keys, the chain keyed from here on, the keys sealed again.
    let ca = serve(&data);
    assert_eq!(kith(&["ca", "bundle", "--data-dir", d]).1, bundle_before);
    let (code, out, _) = kith(&["ca", "audit", "verify", "--data-dir", d]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("from before the chain was keyed"), "{out}");
    let (_, rows, _) = kith(&["ca", "audit", "list", "--json", "--data-dir", d]);
    let rows: Value = serde_json::from_str(&rows).unwrap();
    let actions: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    assert!(actions.contains(&"audit.keyed"), "{actions:?}");
    assert_eq!(
        actions.iter().filter(|a| **a == "key.reseal").count(),
        3,
        "{actions:?}"
    );
    assert_eq!(stop(ca), 0);
    let c = rusqlite::Connection::open(data.join("kith-ca.db")).unwrap();
    let old_format: i64 = c
        .query_row(
            "SELECT COUNT(*) FROM ca_keys WHERE substr(sealed_key, 1, 1) = x'01'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(old_format, 0);
}
