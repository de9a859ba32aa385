//! The static `kith` that the Docker images carry (`FROM scratch`): built once, by
//! `integration/static-kith.sh` (the README's static build with the release profile's
//! optimisation off, in `target/static-test`; the script says why), so the Docker tests share one
//! build, and a run of the script beforehand (`.ci/run` starts one beside the tests) leaves
//! them a fresh one.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Builds (a no-op when fresh) and returns the static binary of the workspace at `repo`.
/// Panics with cargo's output when the build fails: the caller is a test.
pub fn static_kith(repo: &Path) -> PathBuf {
    let mut cmd = Command::new("bash");
    cmd.arg(repo.join("integration/static-kith.sh"))
        .arg("--message-format=json-render-diagnostics")
        .current_dir(repo);
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
