//! Offline injection (`kith inject -f`): multi-document YAML in, YAML out, like
//! `istioctl kube-inject`.
//!
//! The input is cut into documents at the lines the YAML spec reserves for document markers
//! (`---` and `...` at the start of a line can never be content), so each document can be kept
//! byte for byte when nothing in it changes: comments, quoting and layout included. A document
//! whose pod template is injected is written out again from its parsed form, with its keys in
//! their original order ([`crate::emit`]); its leading comments are kept, comments inside it
//! are not.

use std::borrow::Cow;

use serde_norway::Value;

use crate::pod::{self, Outcome, Skip};
use crate::settings::Settings;

/// The largest manifest `kith inject -f` reads.
pub const MAX_INPUT_BYTES: usize = 32 * 1024 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("document {doc} (line {line}): {what}")]
pub struct ManifestError {
    /// 1-based, in input order.
    pub doc: usize,
    /// The document's first line, 1-based.
    pub line: usize,
    pub what: String,
}

/// The injected manifests and what happened to each workload.
#[derive(Debug, Default)]
pub struct Report {
    pub output: String,
    pub injected: Vec<String>,
    pub skipped: Vec<(String, Skip)>,
    pub warnings: Vec<String>,
}

/// Injects every workload in `input` that opts in (or every one, with `all`). Documents
/// without a pod template pass through unchanged.
pub fn inject_manifests(
    input: &str,
    settings: &Settings,
    all: bool,
) -> Result<Report, ManifestError> {
    let mut report = Report::default();
    for (i, chunk) in split_documents(input).into_iter().enumerate() {
        let fail = |what: String| ManifestError {
            doc: i + 1,
            line: chunk.first_line,
            what,
        };
        let out = inject_document(chunk.text, settings, all, &mut report).map_err(fail)?;
        report.output.push_str(&out);
    }
    Ok(report)
}

/// One document of the input, with the line it starts on.
#[derive(Debug, PartialEq, Eq)]
struct Chunk<'a> {
    text: &'a str,
    first_line: usize,
}

/// Cuts `input` before every `---` line and after every `...` line. Directive lines (`%YAML`)
/// stay with the document they introduce.
fn split_documents(input: &str) -> Vec<Chunk<'_>> {
    let mut chunks: Vec<Chunk<'_>> = Vec::new();
    let (mut start, mut start_line, mut offset) = (0, 1, 0);
    for (i, line) in input.split_inclusive('\n').enumerate() {
        if is_marker(line, "---") && offset > start && !is_prelude(&input[start..offset]) {
            chunks.push(Chunk {
                text: &input[start..offset],
                first_line: start_line,
            });
            (start, start_line) = (offset, i + 1);
        }
        offset += line.len();
        if is_marker(line, "...") {
            chunks.push(Chunk {
                text: &input[start..offset],
                first_line: start_line,
            });
            (start, start_line) = (offset, i + 2);
        }
    }
    if start < input.len() {
        chunks.push(Chunk {
            text: &input[start..],
            first_line: start_line,
        });
    }
    chunks
}

/// `---` or `...` alone or followed by a space or tab.
fn is_marker(line: &str, marker: &str) -> bool {
    let line = line.trim_end_matches(['\n', '\r']);
    line.strip_prefix(marker)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t']))
}

/// Directives, comments and blank lines only, with at least one directive: the start of the
/// next document rather than a document of its own.
fn is_prelude(text: &str) -> bool {
    let mut directive = false;
    for line in text.lines().map(str::trim_end) {
        if line.starts_with('%') {
            directive = true;
        } else if !(line.is_empty() || line.starts_with('#')) {
            return false;
        }
    }
    directive
}

/// The document as it should be written out: itself when nothing changed.
fn inject_document<'a>(
    text: &'a str,
    settings: &Settings,
    all: bool,
    report: &mut Report,
) -> Result<Cow<'a, str>, String> {
    let mut value: Value = serde_norway::from_str(text).map_err(yaml_error)?;
    if value.is_null() {
        return Ok(Cow::Borrowed(text));
    }
    if !inject_object(&mut value, settings, all, report)? {
        return Ok(Cow::Borrowed(text));
    }
    let body = crate::emit::to_yaml(&value).map_err(|e| format!("cannot write YAML: {e}"))?;
    Ok(Cow::Owned(leading_lines(text) + &body))
}

/// The document marker and the comments above the document's first key.
fn leading_lines(text: &str) -> String {
    let mut out = String::new();
    let mut lines = text.split_inclusive('\n').peekable();
    if lines.peek().is_some_and(|l| is_marker(l, "---")) {
        out.push_str("---\n");
        lines.next();
    }
    for line in lines {
        let t = line.trim();
        if !(t.is_empty() || t.starts_with('#') || t.starts_with('%')) {
            break;
        }
        out.push_str(line);
    }
    out
}

/// A libyaml error without its position, which is relative to the document; the caller names
/// the document's first line instead.
fn yaml_error(e: serde_norway::Error) -> String {
    let msg = e.to_string();
    let msg = match (e.location(), msg.rfind(" at line ")) {
        (Some(loc), Some(at)) => format!(
            "{} (line {} of the document, column {})",
            &msg[..at],
            loc.line(),
            loc.column()
        ),
        _ => msg,
    };
    format!("not valid YAML: {msg}")
}

/// Injects the pod template of one object (or of each item of a `List`). True if it changed.
fn inject_object(
    value: &mut Value,
    settings: &Settings,
    all: bool,
    report: &mut Report,
) -> Result<bool, String> {
    let kind = object_kind(value)?;
    if kind == "List" {
        return inject_list(value, settings, all, report);
    }
    let name = describe(value, &kind);
    let Some(path) = template_path(&kind) else {
        return Ok(false);
    };
    let template = path
        .iter()
        .try_fold(&mut *value, |v, key| v.get_mut(*key))
        .filter(|t| !t.is_null())
        .ok_or_else(|| format!("{name}: {} is missing", path.join(".")))?;
    match pod::inject(template, settings, all).map_err(|e| format!("{name}: {e}"))? {
        Outcome::Injected { warnings } => {
            report
                .warnings
                .extend(warnings.into_iter().map(|w| format!("{name}: {w}")));
            report.injected.push(name);
            Ok(true)
        }
        Outcome::Skipped(why) => {
            report.skipped.push((name, why));
            Ok(false)
        }
    }
}

fn inject_list(
    value: &mut Value,
    settings: &Settings,
    all: bool,
    report: &mut Report,
) -> Result<bool, String> {
    let Some(items) = value.get_mut("items") else {
        return Ok(false);
    };
    let items = items.as_sequence_mut().ok_or("List: items is not a list")?;
    let mut changed = false;
    for (i, item) in items.iter_mut().enumerate() {
        changed |= inject_object(item, settings, all, report)
            .map_err(|e| format!("List item {i}: {e}"))?;
    }
    Ok(changed)
}

/// The `kind` of a Kubernetes object, or why this is not one.
fn object_kind(value: &Value) -> Result<String, String> {
    let Some(map) = value.as_mapping() else {
        return Err(format!(
            "not a Kubernetes object: found {} where a mapping with apiVersion and kind belongs",
            type_name(value)
        ));
    };
    match map.get("kind") {
        Some(Value::String(kind)) if !kind.is_empty() => Ok(kind.clone()),
        Some(_) => Err("kind is not a non-empty string".into()),
        None => Err("no kind: every Kubernetes object needs apiVersion and kind".into()),
    }
}

/// Where each workload kind keeps its pod template; `None` for kinds without one.
fn template_path(kind: &str) -> Option<&'static [&'static str]> {
    match kind {
        "Pod" => Some(&[]),
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "Job"
        | "ReplicationController" => Some(&["spec", "template"]),
        "CronJob" => Some(&["spec", "jobTemplate", "spec", "template"]),
        _ => None,
    }
}

/// `Deployment shop/web`, for messages.
fn describe(value: &Value, kind: &str) -> String {
    let meta = value.get("metadata");
    let field = |k: &str| meta.and_then(|m| m.get(k)).and_then(Value::as_str);
    let name = field("name")
        .or(field("generateName"))
        .unwrap_or("(unnamed)");
    match field("namespace") {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(input: &str, all: bool) -> Result<Report, ManifestError> {
        inject_manifests(input, &Settings::default(), all)
    }

    fn docs(text: &str) -> Vec<Value> {
        serde_norway::Deserializer::from_str(text)
            .map(|d| serde::Deserialize::deserialize(d).unwrap())
            .collect()
    }

    fn workload(kind: &str, api: &str) -> String {
        format!(
            "apiVersion: {api}\nkind: {kind}\nmetadata:\n  name: w\nspec:\n  replicas: 2\n  template:\n    \
             metadata:\n      labels: {{kith.dev/inject: enabled}}\n    spec:\n      containers:\n      \
             - name: app\n        image: app:1\n"
        )
    }

    #[test]
    fn every_workload_kind_has_its_pod_template_injected() {
        let mut input = String::new();
        for (kind, api) in [
            ("Deployment", "apps/v1"),
            ("StatefulSet", "apps/v1"),
            ("DaemonSet", "apps/v1"),
            ("ReplicaSet", "apps/v1"),
            ("Job", "batch/v1"),
        ] {
            input.push_str("---\n");
            input.push_str(&workload(kind, api));
        }
        input.push_str(
            "---\napiVersion: batch/v1\nkind: CronJob\nmetadata: {name: c}\nspec:\n  schedule: '@hourly'\n  \
             jobTemplate:\n    spec:\n      template:\n        metadata: {labels: {kith.dev/inject: enabled}}\n        \
             spec: {restartPolicy: Never, containers: [{name: app, image: app}]}\n\
             ---\napiVersion: v1\nkind: Pod\nmetadata: {name: p, annotations: {kith.dev/inject: enabled}}\n\
             spec: {containers: [{name: app, image: app}]}\n",
        );
        let report = run(&input, false).unwrap();
        assert_eq!(
            report.injected,
            [
                "Deployment w",
                "StatefulSet w",
                "DaemonSet w",
                "ReplicaSet w",
                "Job w",
                "CronJob c",
                "Pod p"
            ]
        );
        let out = docs(&report.output);
        assert_eq!(out.len(), 7);
        for d in &out[..5] {
            assert_eq!(
                d["spec"]["template"]["spec"]["initContainers"][1]["name"],
                "kith-proxy"
            );
            assert_eq!(d["spec"]["replicas"], 2);
        }
        assert_eq!(
            out[5]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["initContainers"][1]["name"],
            "kith-proxy"
        );
        assert_eq!(out[6]["spec"]["initContainers"][0]["name"], "kith-init");
    }

    #[test]
    fn only_the_pod_template_changes() {
        let input = workload("Deployment", "apps/v1");
        let report = run(&input, false).unwrap();
        let (before, mut after) = (docs(&input).remove(0), docs(&report.output).remove(0));
        assert_ne!(before, after);
        after["spec"]["template"] = before["spec"]["template"].clone();
        assert_eq!(before, after);
    }

    #[test]
    fn other_documents_pass_through_byte_for_byte() {
        let input = "# the app's service\napiVersion: v1\nkind: Service\nmetadata:\n  name: web   # trailing comment\n\
                     spec: {ports: [{port: 80}], selector: {on: 'yes'}}\n---\n# nothing but a comment\n\
                     ---\napiVersion: v1\nkind: ConfigMap\ndata:\n  a: |\n    ---\n    x\n...\n\
                     apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: off}\nspec: {template: {spec: {containers: [{name: a}]}}}\n";
        let report = run(input, false).unwrap();
        assert_eq!(report.output, input);
        assert!(report.injected.is_empty());
        assert_eq!(report.skipped.len(), 1);
        assert_eq!(report.skipped[0].1, Skip::NotOptedIn);
    }

    #[test]
    fn all_injects_templates_that_say_nothing_but_not_those_that_opt_out() {
        let input = "kind: Pod\nmetadata: {name: a}\nspec: {containers: [{name: a}]}\n---\n\
                     kind: Pod\nmetadata: {name: b, labels: {kith.dev/inject: disabled}}\nspec: {containers: [{name: b}]}\n";
        let report = run(input, true).unwrap();
        assert_eq!(report.injected, ["Pod a"]);
        assert_eq!(report.skipped, [("Pod b".to_owned(), Skip::OptedOut)]);
    }

    #[test]
    fn injecting_twice_is_injecting_once() {
        let input = format!(
            "{}---\n{}",
            workload("Deployment", "apps/v1"),
            workload("Job", "batch/v1")
        );
        let once = run(&input, false).unwrap().output;
        let twice = run(&once, false).unwrap();
        assert_eq!(twice.output, once);
        assert!(twice.injected.is_empty());
        assert!(
            twice
                .skipped
                .iter()
                .all(|(_, s)| *s == Skip::AlreadyInjected)
        );
    }

    #[test]
    fn leading_comments_and_markers_of_injected_documents_stay() {
        let input = "---\n# web, injected\napiVersion: v1\nkind: Pod\nmetadata: {name: p, labels: {kith.dev/inject: enabled}}\n\
                     spec: {containers: [{name: a}]}\n";
        let out = run(input, false).unwrap().output;
        assert!(
            out.starts_with(
                "---\n# web, injected\napiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n"
            ),
            "{out}"
        );
    }

    #[test]
    fn lists_from_kubectl_get_are_injected_item_by_item() {
        let input = "apiVersion: v1\nkind: List\nitems:\n- kind: Service\n  metadata: {name: s}\n\
                     - kind: Deployment\n  metadata: {name: d}\n  spec: {template: {metadata: {labels: {kith.dev/inject: enabled}}, spec: {containers: [{name: a}]}}}\n";
        let report = run(input, false).unwrap();
        assert_eq!(report.injected, ["Deployment d"]);
        let out = docs(&report.output).remove(0);
        assert_eq!(out["items"][0], docs(input)[0]["items"][0]);
        assert_eq!(
            out["items"][1]["spec"]["template"]["spec"]["initContainers"][0]["name"],
            "kith-init"
        );
    }

    #[test]
    fn bad_input_is_a_one_line_error_naming_the_document_and_line() {
        let pod = "kind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: a}]}\n";
        let cases = [
            ("{ unclosed", 1, 1, "not valid YAML"),
            (
                &format!("{pod}---\nkind: Pod\nmetadata:\n  name: \"trunc"),
                2,
                4,
                "not valid YAML",
            ),
            (
                &format!("{pod}---\n\napiVersion: v1\nmetadata: {{}}\n"),
                2,
                4,
                "no kind",
            ),
            ("just some text\n", 1, 1, "found a string"),
            ("- a\n- b\n", 1, 1, "found a list"),
            ("kind: [Pod]\n", 1, 1, "kind is not a non-empty string"),
            (
                "kind: Deployment\nmetadata: {name: d}\nspec: {replicas: 1}\n",
                1,
                1,
                "Deployment d: spec.template is missing",
            ),
            (
                "kind: Pod\nmetadata: {name: p, labels: {kith.dev/inject: maybe}}\nspec: {containers: [{name: a}]}\n",
                1,
                1,
                "Pod p: label kith.dev/inject must be",
            ),
            ("kind: List\nitems: 3\n", 1, 1, "items is not a list"),
            (
                "kind: List\nitems: [3]\n",
                1,
                1,
                "List item 0: not a Kubernetes object",
            ),
            (
                "a: &a [x, x]\nb: &b [*a, *a]\nc: &c [*b, *b]\nd: !!binary AAAA\n\u{0}",
                1,
                1,
                "not valid YAML",
            ),
        ];
        for (input, doc, line, expect) in cases {
            let err = run(input, false).unwrap_err();
            let msg = err.to_string();
            assert_eq!((err.doc, err.line), (doc, line), "{input:?}: {msg}");
            assert!(msg.contains(expect), "{input:?}: {msg}");
            assert!(!msg.contains('\n'), "not one line: {msg}");
        }
    }

    #[test]
    fn alias_bombs_and_deep_nesting_are_refused_not_expanded() {
        let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..12 {
            let p = i - 1;
            bomb.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        bomb.push_str("kind: ConfigMap\n");
        let err = run(&bomb, false).unwrap_err();
        assert!(err.to_string().contains("not valid YAML"), "{err}");

        let deep = format!(
            "kind: Pod\nx: {}{}\n",
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        let err = run(&deep, false).unwrap_err();
        assert!(err.to_string().contains("recursion limit"), "{err}");
    }

    #[test]
    fn documents_are_cut_at_markers_only() {
        let input = "a: 1\n--- \nb: 2\n---\t# c\nc: |\n  ---\n  not a marker\n...\n%YAML 1.1\n---\nd: 4\n----\n";
        let chunks = split_documents(input);
        let texts: Vec<&str> = chunks.iter().map(|c| c.text).collect();
        assert_eq!(
            texts,
            [
                "a: 1\n",
                "--- \nb: 2\n",
                "---\t# c\nc: |\n  ---\n  not a marker\n...\n",
                "%YAML 1.1\n---\nd: 4\n----\n"
            ]
        );
        let lines: Vec<usize> = chunks.iter().map(|c| c.first_line).collect();
        assert_eq!(lines, [1, 2, 4, 9]);
        assert!(split_documents("").is_empty());
        assert_eq!(split_documents("---\r\na: 1\r\n---\r\n").len(), 2);
    }

    #[test]
    fn awkward_values_in_injected_documents_read_back_the_same_way() {
        let input = "kind: Pod\nmetadata:\n  name: p\n  labels: {kith.dev/inject: enabled, legacy: 'on', build: '2024-01-01'}\n\
                     spec:\n  containers:\n  - name: a\n    command: [sh, -c, \"set -e\\nexec app\\n\"]\n    env:\n    - {name: N, value: '1_000'}\n";
        let report = run(input, false).unwrap();
        let (before, after) = (docs(input).remove(0), docs(&report.output).remove(0));
        assert_eq!(after["metadata"]["labels"], before["metadata"]["labels"]);
        // The container's own values read back the same; kith only adds the drop of SETUID
        // and SETGID.
        let mut containers = after["spec"]["containers"].clone();
        let sc = containers[0]
            .as_mapping_mut()
            .unwrap()
            .remove("securityContext")
            .unwrap();
        assert_eq!(sc["capabilities"]["drop"][0], "SETUID");
        assert_eq!(containers, before["spec"]["containers"]);
        assert!(report.output.contains("legacy: 'on'"), "{}", report.output);
    }
}
