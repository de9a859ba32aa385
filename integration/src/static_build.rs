//! The static `kith` that the Docker images carry (`FROM scratch`): built once with the README's
//! command (`RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --target <host>`),
//! so the Docker tests share one build.
//!
//! The tests turn the release profile's optimisation off through cargo's own
//! `CARGO_PROFILE_RELEASE_*` variables and build into a target directory of their own
//! (`target/static-test`). What the tests need from this binary is that it is static and runs in
//! an image with no libc, which the profile does not change; what they avoid is the release
//! profile's fat LTO with one codegen unit, about 5.5 minutes of a 2-core machine against 2 for
//! this build. Their own directory keeps an operator's optimised `target/<host>/release/kith`
//! from being replaced by this one.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Builds (a no-op when fresh) and returns the static binary of the workspace at `repo`.
/// Panics with cargo's output when the build fails: the caller is a test.
pub fn static_kith(repo: &Path) -> PathBuf {
    let target = host_triple();
    // Lowest CPU priority: the tests that run beside this build (libtest runs a binary's tests
    // side by side) wait on child processes and deadlines, and get the cores first.
    let mut cmd = Command::new("nice");
    cmd.args(["-n", "19"])
        .arg(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(repo)
        .args(["build", "--release", "--bin", "kith", "--target", &target])
        .arg("--message-format=json-render-diagnostics")
        // Static glibc needs the explicit --target: without it the flag also hits proc-macros
        // and build scripts, which cannot be static. Exactly this, so the build is shared.
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env("CARGO_TARGET_DIR", repo.join("target/static-test"))
        .env("CARGO_PROFILE_RELEASE_OPT_LEVEL", "0")
        .env("CARGO_PROFILE_RELEASE_LTO", "off")
        .env("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "256")
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false");
    // What cargo set for the calling test describes that package; left in, it changes the
    // fingerprints (env! dependencies) and every crate is rebuilt, each run.
    for (key, _) in std::env::vars() {
        if key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_BIN_EXE_")
            || [
                "CARGO_MANIFEST_DIR",
                "CARGO_MANIFEST_PATH",
                "CARGO_CRATE_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "LD_LIBRARY_PATH",
            ]
            .contains(&key.as_str())
        {
            cmd.env_remove(key);
        }
    }
    let out = cmd.output().expect("cargo runs");
    assert!(
        out.status.success(),
        "static build failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let exe = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact" && v["target"]["name"] == "kith")
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
        .expect("cargo names the kith executable");
    if let Ok(file) = Command::new("file").arg(&exe).output()
        && file.status.success()
    {
        let text = String::from_utf8_lossy(&file.stdout);
        assert!(text.contains("static"), "not a static binary: {text}");
    }
    exe
}

/// The host's target triple, from `rustc -vV`.
pub fn host_triple() -> String {
    let out = Command::new("rustc")
        .arg("-vV")
        .output()
        .expect("rustc runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .expect("rustc -vV names the host")
        .to_owned()
}
