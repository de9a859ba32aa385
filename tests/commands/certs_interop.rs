//! Every certificate `kith certs` makes is accepted by tools no one here wrote: `openssl
//! verify`, and pkilint (RFC 5280) with no ERROR or FATAL finding beyond its known false
//! positives.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;

use crate::common;
use crate::common::{Kith, have_tool, openssl, pkilint_findings, split_pem};

const ID: &str = "spiffe://example.org/ns/default/sa/web";

#[test]
fn openssl_verifies_every_key_type() {
    if !have_tool("openssl", "openssl_verifies_every_key_type") {
        return;
    }
    for key_type in ["p256", "p384", "ed25519"] {
        let kith = Kith::new();
        kith.certs(&["init", "--key-type", key_type]).ok();
        let (chain, key, bundle) = kith.issue(
            ID,
            "out",
            &[
                "--key-type",
                key_type,
                "--dns",
                "localhost",
                "--ip",
                "127.0.0.1",
            ],
        );
        let (ok, text) = openssl(&[
            "verify",
            "-CAfile",
            bundle.to_str().unwrap(),
            "-untrusted",
            chain.to_str().unwrap(),
            chain.to_str().unwrap(),
        ]);
        assert!(ok, "{key_type}: openssl verify refused the leaf:\n{text}");
        // The key file is PKCS#8 that openssl reads, and it belongs to the leaf.
        let (ok, pubkey_from_key) = openssl(&["pkey", "-in", key.to_str().unwrap(), "-pubout"]);
        assert!(ok, "{key_type}: {pubkey_from_key}");
        let (ok, pubkey_from_cert) =
            openssl(&["x509", "-in", chain.to_str().unwrap(), "-noout", "-pubkey"]);
        assert!(ok);
        assert_eq!(
            pubkey_from_key, pubkey_from_cert,
            "{key_type}: key does not match the leaf"
        );
        // The dev CA's intermediate, too.
        let (ok, text) = openssl(&[
            "verify",
            "-CAfile",
            bundle.to_str().unwrap(),
            kith.home().join("intermediate.crt").to_str().unwrap(),
        ]);
        assert!(ok, "{key_type}: intermediate: {text}");
    }
}

#[test]
fn pkilint_finds_no_errors_in_root_intermediate_or_leaf() {
    if !have_tool(
        "lint_pkix_cert",
        "pkilint_finds_no_errors_in_root_intermediate_or_leaf",
    ) {
        return;
    }
    for key_type in ["p256", "p384", "ed25519"] {
        let kith = Kith::new();
        kith.certs(&["init", "--key-type", key_type]).ok();
        let (chain, _, _) = kith.issue(
            ID,
            "out",
            &[
                "--key-type",
                key_type,
                "--dns",
                "web.example.org",
                "--ip",
                "::1",
            ],
        );
        let mut certs = split_pem(&chain, kith.dir.path());
        assert_eq!(certs.len(), 2);
        certs.push(kith.home().join("root.crt"));
        for cert in certs {
            let findings = pkilint_findings(&cert);
            assert!(
                findings.is_empty(),
                "{key_type}: {}: {findings:#?}",
                cert.display()
            );
        }
    }
}

#[test]
fn keys_are_private_and_init_keeps_the_existing_ca() {
    let kith = Kith::new();
    let first = kith.certs(&["init", "--trust-domain", "example.org"]);
    first.ok();
    assert!(
        first.stdout.contains("created a new dev CA"),
        "{}",
        first.stdout
    );
    let root_before = std::fs::read(kith.home().join("root.crt")).unwrap();
    let second = kith.certs(&["init", "--trust-domain", "example.org"]);
    second.ok();
    assert!(
        second.stdout.contains("kept the existing dev CA"),
        "{}",
        second.stdout
    );
    assert_eq!(
        std::fs::read(kith.home().join("root.crt")).unwrap(),
        root_before
    );

    let mode = |p: std::path::PathBuf| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(kith.home().join("root.key")), 0o600);
    assert_eq!(mode(kith.home().join("intermediate.key")), 0o600);
    assert_eq!(mode(kith.home()), 0o700);
    let (_, key, _) = kith.issue(ID, "out", &[]);
    assert_eq!(mode(key), 0o600);

    // Another trust domain in the same home is refused, not silently replaced.
    let other = kith.certs(&["init", "--trust-domain", "other.org"]);
    assert_eq!(other.code, 2);
    assert!(
        other.stderr.contains("is for trust domain example.org"),
        "{}",
        other.stderr
    );
}

#[test]
fn spiffe_fs_layout_follows_filesystem_delivery() {
    let kith = Kith::new();
    let out = kith.path("creds");
    kith.certs(&[
        "issue",
        ID,
        "--format",
        "spiffe-fs",
        "--out",
        out.to_str().unwrap(),
    ])
    .ok();
    let cred = std::fs::read_to_string(out.join("credential-bundle.private-key.pem")).unwrap();
    let bundle = out.join("example.org.spiffe-trust-bundle.pem");
    assert!(bundle.exists());
    // Key first, then the chain leaf first; no root; no other block types or headers.
    let labels: Vec<&str> = cred
        .lines()
        .filter(|l| l.starts_with("-----BEGIN"))
        .collect();
    assert_eq!(
        labels,
        [
            "-----BEGIN PRIVATE KEY-----",
            "-----BEGIN CERTIFICATE-----",
            "-----BEGIN CERTIFICATE-----"
        ]
    );
    let root = std::fs::read_to_string(kith.home().join("root.crt")).unwrap();
    assert!(
        !cred.contains(root.lines().nth(1).unwrap()),
        "the credential bundle must not hold the root"
    );
    let mode = std::fs::metadata(out.join("credential-bundle.private-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // kith reads it back as a chain and verifies it.
    let v = kith.certs(&[
        "verify",
        out.join("credential-bundle.private-key.pem")
            .to_str()
            .unwrap(),
        "--bundle",
        bundle.to_str().unwrap(),
    ]);
    v.ok();
    assert_eq!(v.stdout.trim(), ID);
    if have_tool(
        "openssl",
        "spiffe_fs_layout_follows_filesystem_delivery (openssl part)",
    ) {
        let cred_path = out.join("credential-bundle.private-key.pem");
        let (ok, text) = openssl(&[
            "verify",
            "-CAfile",
            bundle.to_str().unwrap(),
            "-untrusted",
            cred_path.to_str().unwrap(),
            cred_path.to_str().unwrap(),
        ]);
        assert!(ok, "{text}");
    }
}

#[test]
fn issue_prints_files_and_one_liners_and_json() {
    let kith = Kith::new();
    let out = kith.path("out");
    let run = kith.certs(&[
        "issue",
        ID,
        "--dns",
        "localhost",
        "--out",
        out.to_str().unwrap(),
    ]);
    run.ok();
    assert!(
        run.stdout
            .contains("issued spiffe://example.org/ns/default/sa/web")
    );
    assert!(
        run.stdout.contains("web.crt")
            && run.stdout.contains("web.key")
            && run.stdout.contains("bundle.crt")
    );
    assert!(run.stdout.contains("openssl s_server") && run.stdout.contains("curl --cacert"));
    assert!(
        run.stdout.contains("created a dev CA"),
        "first use creates the CA: {}",
        run.stdout
    );

    let json = kith.certs(&[
        "issue",
        "spiffe://example.org/db",
        "--out",
        out.to_str().unwrap(),
        "--json",
        "--ttl",
        "1h",
    ]);
    json.ok();
    let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(v["spiffe_id"], "spiffe://example.org/db");
    assert!(
        v["files"]["certificate"]
            .as_str()
            .unwrap()
            .ends_with("db.crt")
    );
    let inspect = kith.certs(&[
        "inspect",
        v["files"]["certificate"].as_str().unwrap(),
        "--json",
    ]);
    inspect.ok();
    let info: serde_json::Value = serde_json::from_str(&inspect.stdout).unwrap();
    let leaf = &info[0];
    assert_eq!(leaf["spiffe_id"], "spiffe://example.org/db");
    assert_eq!(leaf["subject"], "");
    assert_eq!(leaf["is_ca"], false);
    assert_eq!(leaf["key_algorithm"], "ECDSA P-256");
    assert_eq!(leaf["key_usage"], serde_json::json!(["digitalSignature"]));
    assert_eq!(
        leaf["extended_key_usage"],
        serde_json::json!(["serverAuth", "clientAuth"])
    );
    assert_eq!(leaf["svid"]["kind"], "leaf");
    assert_eq!(
        leaf["serial"].as_str().unwrap().split(':').count(),
        16,
        "128-bit serial"
    );
    let secs = leaf["expires_in_seconds"].as_i64().unwrap();
    assert!((3500..=3600).contains(&secs), "1h ttl: {secs}");
    assert_eq!(info[1]["svid"]["kind"], "signing");
}

/// The README's "use the files with anything that speaks TLS" block, run as written: the
/// `kith certs issue` line, `openssl verify`, and the `openssl s_server` + `curl` pair with
/// client certificates (only the port and the output folder are changed).
#[test]
fn readme_certs_commands_run_as_written() {
    if !have_tool("openssl", "readme_certs_commands_run_as_written")
        || !have_tool("curl", "readme_certs_commands_run_as_written")
    {
        return;
    }
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let kith = Kith::new();
    let out = kith.path("first-svid");
    let port = common::net::free_port().port().to_string();
    let adapt = |line: &str| -> Vec<String> {
        line.replace("target/first-svid", out.to_str().unwrap())
            .replace("8443", &port)
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    let line = |prefix: &str| -> Vec<String> {
        let found = readme
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("README has no line starting with {prefix:?}"));
        adapt(found)
    };

    let issue = line("cargo run --release -- certs issue");
    let issue_args: Vec<&str> = issue[5..].iter().map(String::as_str).collect();
    kith.certs(&issue_args).ok();

    let verify = line("openssl verify");
    let (ok, text) = openssl(&verify[1..].iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "README's openssl verify failed:\n{text}");

    let server = line("openssl s_server");
    let mut s_server = std::process::Command::new("openssl")
        .args(&server[1..])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let curl = line("curl --cacert");
    let answer = integration::wait::poll(std::time::Duration::from_secs(10), || {
        let run = std::process::Command::new("curl")
            .args(["-sS", "--max-time", "5"])
            .args(&curl[1..])
            .output()
            .unwrap();
        if run.status.success() {
            Ok(String::from_utf8_lossy(&run.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&run.stderr).into_owned())
        }
    });
    let _ = s_server.kill();
    let _ = s_server.wait();
    let body = answer.unwrap_or_else(|last| {
        panic!(
            "README's curl never got an answer from its s_server: {}",
            last.unwrap_or_default()
        )
    });
    assert!(
        body.contains("s_server"),
        "s_server -www answers its status page: {body}"
    );
}
