//! deploy/kubernetes is checked as CI checks it: every manifest and every `kith inject` output
//! validates against the Kubernetes schemas (kubernetes-validate, strict), and a security scan
//! (checkov) fails nothing that is not explained where it is skipped.
//!
//! kubernetes-validate reads YAML as YAML 1.1 (PyYAML), like kubectl, so it also proves that
//! the injected output keeps strings such as "on" and "1.10" strings.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::common::have_tool;

const DEPLOY: &str = "deploy/kubernetes";

/// The oldest Kubernetes the manifests support (native sidecars are GA from 1.33), and the
/// newest schemas the installed kubernetes-validate has (its default).
const OLDEST: &str = "1.33.0";

fn manifests() -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![PathBuf::from(DEPLOY)];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                files.push(path);
            }
        }
    }
    files.sort();
    assert!(
        files.len() >= 4,
        "deploy/kubernetes has too few manifests: {files:?}"
    );
    files
}

/// kubernetes-validate --strict on `files`, against the oldest supported and the newest
/// version; returns (success, output).
fn validate(files: &[PathBuf]) -> Vec<(bool, String)> {
    [Some(OLDEST), None]
        .into_iter()
        .map(|version| {
            let mut cmd = Command::new("kubernetes-validate");
            cmd.args(["--strict", "--quiet"]);
            if let Some(v) = version {
                cmd.args(["-k", v]);
            }
            let out = cmd.args(files).output().unwrap();
            (
                out.status.success(),
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            )
        })
        .collect()
}

fn assert_valid(files: &[PathBuf]) {
    for (ok, out) in validate(files) {
        assert!(ok, "kubernetes-validate refused:\n{out}");
        assert!(
            !out.contains("Couldn't find schema"),
            "not validated:\n{out}"
        );
    }
}

#[test]
fn every_manifest_validates_against_the_kubernetes_schemas() {
    if !have_tool(
        "kubernetes-validate",
        "every_manifest_validates_against_the_kubernetes_schemas",
    ) {
        return;
    }
    assert_valid(&manifests());
}

#[test]
fn kith_inject_output_validates_against_the_kubernetes_schemas() {
    if !have_tool(
        "kubernetes-validate",
        "kith_inject_output_validates_against_the_kubernetes_schemas",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let inputs = [
        ("tests/fixtures/inject/workloads.yaml", 7),
        ("deploy/kubernetes/examples/app.yaml", 1),
    ];
    let mut outputs = Vec::new();
    for (i, (input, injected)) in inputs.into_iter().enumerate() {
        let out = Command::new(env!("CARGO_BIN_EXE_kith"))
            .args(["inject", "-f", input])
            .output()
            .unwrap();
        let (stdout, stderr) = (
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(out.status.success(), "{input}: {stderr}");
        // Not vacuous: the sidecars are in what gets validated.
        assert_eq!(
            stdout.matches("name: kith-proxy").count(),
            injected,
            "{input}"
        );
        let path = dir.path().join(format!("injected-{i}.yaml"));
        std::fs::write(&path, stdout).unwrap();
        outputs.push(path);
    }
    assert_valid(&outputs);
}

/// The checker checks: a manifest with an unknown field, and a label that YAML 1.1 reads as a
/// boolean, are refused.
#[test]
fn kubernetes_validate_refuses_a_broken_manifest() {
    if !have_tool(
        "kubernetes-validate",
        "kubernetes_validate_refuses_a_broken_manifest",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in [
        (
            "unknown-field.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec:\n  containers:\n  - {name: a, image: a, restartPolicyy: Always}\n",
        ),
        (
            "bool-label.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a, labels: {x: on}}\nspec:\n  containers:\n  - {name: a, image: a}\n",
        ),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        for (ok, out) in validate(&[path]) {
            assert!(!ok, "{name} passed:\n{out}");
        }
    }
}

#[test]
fn checkov_fails_nothing_that_is_not_explained() {
    if !have_tool("checkov", "checkov_fails_nothing_that_is_not_explained") {
        return;
    }
    let out = Command::new("checkov")
        .args(["-d", DEPLOY, "--quiet", "--compact", "-o", "json"])
        // No call home for check metadata: the scan runs offline.
        .env("BC_SKIP_MAPPING", "TRUE")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "checkov did not write a JSON report ({e}):\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let reports = match report {
        Value::Array(list) => list,
        one => vec![one],
    };
    let k8s = reports
        .iter()
        .find(|r| r["check_type"] == "kubernetes")
        .expect("checkov scanned the Kubernetes manifests");
    assert!(
        k8s["summary"]["resource_count"].as_u64().unwrap() >= 10,
        "checkov saw too few resources: {}",
        k8s["summary"]
    );
    let failed: Vec<String> = k8s["results"]["failed_checks"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|f| {
            format!(
                "{} {} in {} ({})",
                f["check_id"], f["check_name"], f["file_path"], f["resource"]
            )
        })
        .collect();
    assert!(
        failed.is_empty(),
        "checkov failed checks that no checkov.io/skip annotation explains:\n{}",
        failed.join("\n")
    );
    assert_eq!(
        k8s["summary"]["skipped"].as_u64().unwrap(),
        skip_annotations().len() as u64,
        "every skip annotation should skip exactly one check"
    );
}

/// `checkov.io/skipN: CKV_K8S_xx=reason` annotations in deploy/kubernetes; each must give a
/// reason (checkov reads Kubernetes skips from annotations, not from YAML comments).
fn skip_annotations() -> Vec<String> {
    let mut skips = Vec::new();
    for file in manifests() {
        let text = std::fs::read_to_string(&file).unwrap();
        for line in text.lines().map(str::trim) {
            let Some(rest) = line.strip_prefix("checkov.io/skip") else {
                continue;
            };
            let value = rest.split_once(':').map(|(_, v)| v.trim()).unwrap_or("");
            let (id, reason) = value.split_once('=').unwrap_or((value, ""));
            assert!(
                id.starts_with("CKV") && reason.trim().len() >= 20,
                "{}: a skip needs a check ID and a reason: {line}",
                display(&file)
            );
            skips.push(format!("{}: {id}", display(&file)));
        }
    }
    skips
}

fn display(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn the_cas_metrics_port_is_open_only_to_the_monitoring_namespace() {
    let text = std::fs::read_to_string(Path::new(DEPLOY).join("11-ca.yaml")).unwrap();
    let policy = text
        .split("\n---")
        .map(|doc| serde_norway::from_str::<Value>(doc).unwrap())
        .find(|d| d["kind"] == "NetworkPolicy" && d["metadata"]["name"] == "kith-ca")
        .expect("11-ca.yaml has the CA's NetworkPolicy");
    let rules = policy["spec"]["ingress"].as_array().unwrap();
    let opens = |port: u64| {
        rules
            .iter()
            .filter(|r| {
                r["ports"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|p| p["port"] == port)
            })
            .map(|r| r["from"].clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        opens(9090),
        [
            serde_json::json!([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}])
        ],
        "metrics: only from the monitoring namespace"
    );
    assert_eq!(
        opens(8443),
        [serde_json::json!([{"namespaceSelector": {}}])],
        "the API: from every namespace"
    );
}
