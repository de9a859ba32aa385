//! Runs the interoperability tests of kith's X25519MLKEM768 against rustls on aws-lc-rs
//! (`interop/pq-awslc`, both directions) as part of the workspace's tests, and fails if they
//! fail. That crate is outside the workspace, with its own Cargo.lock and its own target
//! directory (`target/pq-interop`), so that aws-lc-sys never enters the product's lock file;
//! the first run builds aws-lc (C, with the cc crate: a C compiler, no cmake).
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

#[test]
fn x25519mlkem768_interoperates_with_rustls_on_aws_lc_rs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let manifest = root.join("interop/pq-awslc/Cargo.toml");
    assert!(manifest.is_file(), "{} is missing", manifest.display());
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .arg("test")
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--target-dir")
        .arg(root.join("target/pq-interop"))
        // The committed lock file, as it is: no new versions picked behind the test's back.
        .arg("--locked")
        .args(["-j", "2"])
        .args(["--", "--test-threads", "2"])
        .env_remove("CARGO_TARGET_DIR")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "interop tests failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    // Every direction ran: a filtered or empty run must not pass for a proof.
    for name in [
        "kith_client_to_awslc_server",
        "awslc_client_to_kith_server",
        "hybrid_only_both_directions",
    ] {
        assert!(
            stdout.contains(&format!("test {name} ... ok")),
            "{name} did not pass:\n{stdout}"
        );
    }
    println!("{stdout}");
}
