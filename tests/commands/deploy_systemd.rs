//! deploy/systemd as CI checks it: `systemd-analyze verify` finds nothing to say about the units,
//! `systemd-analyze security` rates their exposure "OK" (2.0 or less of 10), and each has the
//! hardening the project asks for.
//!
//! `verify` insists that ExecStart's binary exists, and the units name /usr/local/bin/kith,
//! where an operator installs it. `--root=` would find it in a scratch tree but then wants the
//! whole systemd unit set (sysinit.target, ...) there too, so instead the units are copied with
//! that path replaced by the binary cargo built; nothing else in them changes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::have_tool;

const UNITS: [&str; 2] = ["kith-ca.service", "kith-agent.service"];

/// The units, copied into `dir` with ExecStart pointing at the built binary.
fn units_in(dir: &Path) -> Vec<PathBuf> {
    UNITS
        .iter()
        .map(|name| {
            let text = std::fs::read_to_string(Path::new("deploy/systemd").join(name)).unwrap();
            assert!(text.contains("ExecStart=/usr/local/bin/kith "), "{name}");
            let text = text.replace("/usr/local/bin/kith", env!("CARGO_BIN_EXE_kith"));
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path
        })
        .collect()
}

/// `systemd-analyze <args>`: (success, what it said about kith units).
fn analyze(args: &[&str], files: &[PathBuf]) -> (bool, String) {
    let out = Command::new("systemd-analyze")
        .args(args)
        .args(files)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Lines about our own units: verify exits 0 on unknown keys and bad values, and only warns,
/// so the warnings are what count. Lines about the host's other units are its business.
fn complaints(text: &str, files: &[PathBuf]) -> Vec<String> {
    text.lines()
        .filter(|l| {
            files
                .iter()
                .any(|f| l.contains(f.file_name().unwrap().to_str().unwrap()))
        })
        .map(str::to_owned)
        .collect()
}

#[test]
fn systemd_analyze_verify_finds_nothing_in_the_units() {
    if !have_tool(
        "systemd-analyze",
        "systemd_analyze_verify_finds_nothing_in_the_units",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let files = units_in(dir.path());
    let (ok, text) = analyze(&["verify"], &files);
    assert!(ok, "systemd-analyze verify failed:\n{text}");
    let found = complaints(&text, &files);
    assert!(
        found.is_empty(),
        "systemd-analyze verify:\n{}",
        found.join("\n")
    );
}

/// The checker checks: a misspelt key and a bad boolean are reported.
#[test]
fn systemd_analyze_verify_reports_a_broken_unit() {
    if !have_tool(
        "systemd-analyze",
        "systemd_analyze_verify_reports_a_broken_unit",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("kith-broken.service");
    std::fs::write(
        &bad,
        "[Service]\nExecStart=/bin/true\nProtectSystm=strict\nNoNewPrivileges=maybe\n",
    )
    .unwrap();
    let files = [bad];
    let (_, text) = analyze(&["verify"], &files);
    assert_eq!(complaints(&text, &files).len(), 2, "{text}");
}

#[test]
fn the_units_exposure_is_rated_ok() {
    if !have_tool("systemd-analyze", "the_units_exposure_is_rated_ok") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for file in units_in(dir.path()) {
        let (ok, text) = analyze(
            &["security", "--offline=yes", "--no-pager"],
            std::slice::from_ref(&file),
        );
        assert!(ok, "systemd-analyze security failed:\n{text}");
        let score: f64 = text
            .lines()
            .find_map(|l| l.split("Overall exposure level for ").nth(1))
            .and_then(|rest| rest.split(':').nth(1))
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
        assert!(
            score <= 2.0,
            "{}: exposure {score} > 2.0:\n{text}",
            file.display()
        );
    }
}

#[test]
fn the_units_run_unprivileged_in_a_read_only_system() {
    for name in UNITS {
        let text = std::fs::read_to_string(Path::new("deploy/systemd").join(name)).unwrap();
        let has = |line: &str| text.lines().any(|l| l.trim() == line);
        for line in [
            "DynamicUser=yes",
            "ProtectSystem=strict",
            "NoNewPrivileges=yes",
            "CapabilityBoundingSet=",
            "AmbientCapabilities=",
            "PrivateTmp=yes",
        ] {
            assert!(has(line), "{name} lacks {line}");
        }
        assert!(
            text.contains("\nStateDirectory="),
            "{name} has no StateDirectory"
        );
    }
    let agent = std::fs::read_to_string("deploy/systemd/kith-agent.service").unwrap();
    let directives: Vec<&str> = agent
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    assert!(
        directives.contains(&"RuntimeDirectory=kith"),
        "the agent's socket directory"
    );
    // Attestation reads other users' /proc/<pid> and their real UIDs: hiding either breaks it.
    assert!(directives.contains(&"ProtectProc=default"));
    assert!(!directives.iter().any(|l| l.starts_with("PrivateUsers=")));
}
