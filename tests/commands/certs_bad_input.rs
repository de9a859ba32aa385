//! Bad input gets a one-line error that says what is wrong, exit code 2, and never a panic.
#![allow(clippy::unwrap_used)]

use crate::common::{Kith, Run};

const ID: &str = "spiffe://example.org/web";

fn assert_usage_error(run: &Run, expect: &str) {
    assert_eq!(
        run.code, 2,
        "stdout: {}\nstderr: {}",
        run.stdout, run.stderr
    );
    let line = run.stderr.trim();
    assert!(line.contains(expect), "expected {expect:?} in: {line}");
    assert!(!line.is_empty());
    assert_eq!(run.stdout, "", "nothing on stdout on error");
}

fn one_line(run: &Run) {
    assert_eq!(
        run.stderr.trim().lines().count(),
        1,
        "one line: {}",
        run.stderr
    );
}

#[test]
fn inspect_and_verify_refuse_bad_files() {
    let kith = Kith::new();
    let (chain, key, bundle) = kith.issue(ID, "out", &[]);
    let pem = std::fs::read_to_string(&chain).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "garbage.crt",
            b"this is not a certificate\n".to_vec(),
            "not PEM, and not a DER X.509 certificate",
        ),
        ("empty.crt", Vec::new(), "input is empty"),
        (
            "truncated.crt",
            pem.as_bytes()[..pem.len() / 3].to_vec(),
            "truncated PEM",
        ),
        (
            "key-as-cert.crt",
            std::fs::read(&key).unwrap(),
            "found a private key where a certificate was expected",
        ),
        (
            "random.der",
            vec![0x30, 0x82, 0x01, 0x00, 0xde, 0xad],
            "not PEM, and not a DER X.509 certificate",
        ),
    ];
    for (name, content, expect) in cases {
        let path = kith.path(name);
        std::fs::write(&path, &content).unwrap();
        let run = kith.certs(&["inspect", path.to_str().unwrap()]);
        assert_usage_error(&run, expect);
        one_line(&run);
        let run = kith.certs(&[
            "verify",
            path.to_str().unwrap(),
            "--bundle",
            bundle.to_str().unwrap(),
        ]);
        assert_usage_error(&run, expect);
        one_line(&run);
        // A bad bundle is a usage error too, not a verdict on the chain.
        let run = kith.certs(&[
            "verify",
            chain.to_str().unwrap(),
            "--bundle",
            path.to_str().unwrap(),
        ]);
        assert_usage_error(&run, "is not a trust bundle");
        one_line(&run);
    }
    let missing = kith.certs(&["inspect", kith.path("nope.crt").to_str().unwrap()]);
    assert_usage_error(&missing, "cannot read");
    assert_usage_error(&missing, "No such file or directory");
}

#[test]
fn der_is_read_as_well_as_pem() {
    let kith = Kith::new();
    let (chain, _, _) = kith.issue(ID, "out", &[]);
    let der = identity::pem::certificates(&std::fs::read(&chain).unwrap())
        .unwrap()
        .remove(0);
    let path = kith.path("leaf.der");
    std::fs::write(&path, &der).unwrap();
    let run = kith.certs(&["inspect", path.to_str().unwrap()]);
    run.ok();
    assert!(run.stdout.contains(ID), "{}", run.stdout);
}

#[test]
fn invalid_spiffe_ids_name_the_rule() {
    let kith = Kith::new();
    let cases = [
        ("spiffe://Example.org/web", "trust domain must be lowercase"),
        (
            "http://example.org/web",
            "must start with the lowercase scheme",
        ),
        ("spiffe://example.org/web/", "must not end with '/'"),
        ("spiffe://example.org:8443/web", "a port is not allowed"),
        ("spiffe://example.org/a//b", "empty segment"),
        (
            "spiffe://example.org/../etc",
            "'.' and '..' are not allowed",
        ),
        ("spiffe://example.org/web?x=1", "a query"),
    ];
    for (id, expect) in cases {
        let run = kith.certs(&["issue", id, "--out", kith.path("out").to_str().unwrap()]);
        assert_eq!(run.code, 2, "{id}");
        assert!(run.stderr.contains(expect), "{id}: {}", run.stderr);
        assert!(!kith.path("out").exists(), "{id}: nothing written");
    }
    let run = kith.certs(&["init", "--trust-domain", "Bad_Domain"]);
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains("trust domain must be lowercase"),
        "{}",
        run.stderr
    );
}

#[test]
fn an_unwritable_out_is_refused_before_anything_is_made() {
    let kith = Kith::new();
    let file = kith.path("a-file");
    std::fs::write(&file, "x").unwrap();
    let run = kith.certs(&["issue", ID, "--out", file.to_str().unwrap()]);
    assert_usage_error(&run, "exists and is not a directory");
    one_line(&run);
    let below_a_file = file.join("sub");
    let run = kith.certs(&["issue", ID, "--out", below_a_file.to_str().unwrap()]);
    assert_usage_error(&run, "cannot create directory");
    one_line(&run);
    assert!(
        !kith.home().exists(),
        "no CA was created for a request that could not be written"
    );
}

#[test]
fn other_bad_flags_are_refused() {
    let kith = Kith::new();
    let out = kith.path("out");
    let out = out.to_str().unwrap();
    let run = kith.certs(&["issue", ID, "--ttl", "soon", "--out", out]);
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains("--ttl"), "{}", run.stderr);
    let run = kith.certs(&["issue", ID, "--ttl", "10s", "--out", out]);
    assert_usage_error(&run, "--ttl must be at least 1m");
    let run = kith.certs(&["issue", ID, "--ip", "999.1.1.1", "--out", out]);
    assert_eq!(run.code, 2);
    let run = kith.certs(&["issue", ID, "--dns", "bad name!", "--out", out]);
    assert_usage_error(&run, "invalid DNS name");
    let run = kith.certs(&["issue", ID, "--key-type", "rsa", "--out", out]);
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains("expected p256, p384 or ed25519"),
        "{}",
        run.stderr
    );
    let run = kith.certs(&["issue", "spiffe://other.org/web", "--out", out]);
    assert_usage_error(&run, "outside the dev CA's trust domain example.org");
    let (chain, _, bundle) = kith.issue(ID, "ok", &[]);
    let run = kith.certs(&[
        "verify",
        chain.to_str().unwrap(),
        "--bundle",
        bundle.to_str().unwrap(),
        "--at",
        "yesterday",
    ]);
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains("not an RFC 3339 time"),
        "{}",
        run.stderr
    );
}

#[test]
fn keys_are_never_written_where_others_could_swap_them() {
    use std::os::unix::fs::PermissionsExt;
    let kith = Kith::new();
    // A group- or world-writable --out: refused, and no key is left there.
    let shared = kith.path("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    let run = kith.certs(&["issue", ID, "--out", shared.to_str().unwrap()]);
    assert_ne!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stderr.contains("writable by group or others") && run.stderr.contains("chmod go-w"),
        "{}",
        run.stderr
    );
    assert_eq!(std::fs::read_dir(&shared).unwrap().count(), 0);

    // A symlink planted where the key goes is replaced, never followed.
    let out = kith.path("out");
    std::fs::create_dir(&out).unwrap();
    let victim = kith.path("victim");
    std::fs::write(&victim, "precious").unwrap();
    std::os::unix::fs::symlink(&victim, out.join("svid.key")).unwrap();
    kith.issue(ID, "out", &[]);
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    let key = std::fs::symlink_metadata(out.join("svid.key")).unwrap();
    assert!(!key.file_type().is_symlink());
    assert_eq!(key.permissions().mode() & 0o777, 0o600);
}
