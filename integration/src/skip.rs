//! The one rule for a test that cannot run here: outside CI it says why and skips; under
//! `CI=true` (or `CI=1`), where `.ci/run` has installed everything and runs as root, it fails,
//! so that no check ever passes without having run.

/// Whether this is a CI run (`CI=true` or `CI=1`).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Reports that `test` cannot run here because `why`: prints `SKIPPED <test>: <why>` to stderr
/// and returns (the caller then returns early), or panics under CI.
pub fn skip(test: &str, why: &str) {
    assert!(
        !in_ci(),
        "{test} cannot run: {why}, and CI is set (.ci/run installs what the tests need and runs as root)"
    );
    eprintln!("SKIPPED {test}: {why}");
}
