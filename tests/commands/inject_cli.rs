//! `kith inject` as a user runs it: offline on a file and on standard input, refusing bad input
//! with exit 2 and one line, and `kith inject serve` answering curl over TLS 1.3 with a patch
//! that turns the pod into what the offline mode writes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::have_tool;

const FIXTURE: &str = "tests/fixtures/inject/workloads.yaml";

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// `kith inject <args>` with `stdin` on its standard input.
fn inject(args: &[&str], stdin: &[u8]) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kith"))
        .arg("inject")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    let stdin = stdin.to_vec();
    // A writer thread: kith may stop reading (and exit) before all of a huge input is written.
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&stdin);
    });
    let out = child.wait_with_output().unwrap();
    let _ = writer.join();
    let run = Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    run
}

#[test]
fn a_file_and_standard_input_give_the_same_injection() {
    let from_file = inject(&["-f", FIXTURE], b"");
    assert_eq!(from_file.code, 0, "{}", from_file.stderr);
    let from_stdin = inject(&["-f", "-"], &std::fs::read(FIXTURE).unwrap());
    assert_eq!(from_stdin.code, 0, "{}", from_stdin.stderr);
    assert_eq!(from_file.stdout, from_stdin.stdout);
    assert!(
        from_file
            .stderr
            .contains("injected 7 workload(s), left 2 alone"),
        "{}",
        from_file.stderr
    );
    assert!(
        from_file
            .stderr
            .contains("left DaemonSet shop/node-exporter alone: uses hostNetwork")
    );
    assert_eq!(from_file.stdout.matches("name: kith-proxy").count(), 7);

    // Injecting the output again changes nothing.
    let again = inject(&["-f", "-"], from_file.stdout.as_bytes());
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert_eq!(again.stdout, from_file.stdout);
    assert!(
        again
            .stderr
            .contains("injected 0 workload(s), left 9 alone")
    );
}

#[test]
fn settings_flags_reach_the_injected_pods() {
    let run = inject(
        &[
            "-f",
            FIXTURE,
            "--image",
            "registry.example/kith:dev",
            "--init-image",
            "registry.example/kith-init:dev",
            "--ca-url",
            "https://ca.example:8443",
            "--mesh-cidr",
            "10.0.0.0/8,fd00::/8",
            "--bundle-configmap",
            "mesh-roots",
        ],
        b"",
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    for expect in [
        "image: registry.example/kith:dev",
        "image: registry.example/kith-init:dev",
        "--ca=https://ca.example:8443",
        "'--mesh-cidr=10.0.0.0/8,fd00::/8'",
        "name: mesh-roots",
    ] {
        assert!(run.stdout.contains(expect), "{expect} missing");
    }
    let bad = inject(&["-f", FIXTURE, "--mesh-cidr", "10.0.0.0/99"], b"");
    assert_eq!(bad.code, 2);
    assert!(bad.stderr.contains("prefix length"), "{}", bad.stderr);
}

#[test]
fn bad_input_exits_2_with_one_line_and_no_output() {
    let huge = vec![b'#'; 32 * 1024 * 1024 + 10];
    let cases: [(&[&str], &[u8], &str); 7] = [
        (
            &["-f", "-"],
            b"kind: Pod\nspec: [unclosed\n",
            "document 1 (line 1): not valid YAML",
        ),
        (
            &["-f", "-"],
            b"kind: Service\nmetadata: {name: a}\n---\nmetadata:\n  name: \"trunc",
            "document 2 (line 3): not valid YAML",
        ),
        (
            &["-f", "-"],
            b"apiVersion: v1\nmetadata: {name: a}\n",
            "no kind",
        ),
        (&["-f", "-"], b"kind: Pod\n\xff\xfe\n", "not UTF-8"),
        (&["-f", "-"], &huge, "larger than 32 MiB"),
        (
            &["-f", "/nonexistent/manifest.yaml"],
            b"",
            "cannot open /nonexistent/manifest.yaml",
        ),
        (&[], b"", "say what to inject"),
    ];
    for (args, stdin, expect) in cases {
        let run = inject(args, stdin);
        assert_eq!(run.code, 2, "{args:?}: {}", run.stderr);
        assert!(run.stdout.is_empty(), "{args:?}: wrote {}", run.stdout);
        assert_eq!(run.stderr.lines().count(), 1, "{args:?}: {}", run.stderr);
        assert!(run.stderr.contains(expect), "{args:?}: {}", run.stderr);
    }
}

/// `kith inject serve` on loopback; stopped with SIGTERM when dropped.
struct Webhook {
    child: Child,
    port: u16,
}

impl Drop for Webhook {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A serving certificate for kith-inject.kith-system.svc in `dir`: (cert, key) paths.
fn serving_cert(dir: &Path) -> (PathBuf, PathBuf) {
    let (c, k, _) = integration::pki::write_tls_pair(dir, &["kith-inject.kith-system.svc"]);
    (c, k)
}

fn serve(cert: &Path, key: &Path) -> Webhook {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kith"))
        .args([
            "inject",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ])
        .arg("--tls-cert")
        .arg(cert)
        .arg("--tls-key")
        .arg(key)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            assert!(!line.contains("panicked"), "{line}");
            if let Ok(v) = serde_json::from_str::<Value>(&line)
                && v["fields"]["message"] == "kith inject serving"
            {
                let addr: std::net::SocketAddr =
                    v["fields"]["addr"].as_str().unwrap().parse().unwrap();
                let _ = tx.send(addr.port());
            }
        }
    });
    let port = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("kith inject serve logs its address");
    Webhook { child, port }
}

/// curl against the webhook by its service name; returns (exit code, body).
fn curl(hook: &Webhook, ca: &Path, extra: &[&str], path: &str) -> (i32, String) {
    let host = "kith-inject.kith-system.svc";
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(ca)
        .arg("--resolve")
        .arg(format!("{host}:{}:127.0.0.1", hook.port))
        .args(extra)
        .arg(format!("https://{host}:{}{path}", hook.port))
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn the_webhook_answers_curl_with_a_patch_equal_to_offline_injection() {
    if !have_tool(
        "curl",
        "the_webhook_answers_curl_with_a_patch_equal_to_offline_injection",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = serving_cert(dir.path());
    let hook = serve(&cert, &key);

    let (code, body) = curl(&hook, &cert, &[], "/healthz");
    assert_eq!((code, body.as_str()), (0, "ok\n"));

    let pod_yaml = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  namespace: shop\n  \
                    labels: {kith.dev/inject: enabled}\nspec:\n  containers:\n  - name: web\n    \
                    image: web:1\n    readinessProbe: {httpGet: {path: /ready, port: 8081}}\n";
    let offline = inject(&["-f", "-"], pod_yaml.as_bytes());
    assert_eq!(offline.code, 0, "{}", offline.stderr);
    let offline: Value = serde_norway_value(&offline.stdout);
    let pod: Value = serde_norway_value(pod_yaml);
    let review = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "0df28fbd-5f5f-4f8f-8f8f-000000000001",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": "CREATE",
            "object": pod,
        }
    });
    let review_file = dir.path().join("review.json");
    std::fs::write(&review_file, serde_json::to_vec(&review).unwrap()).unwrap();
    let data = format!("@{}", review_file.display());
    let (code, body) = curl(
        &hook,
        &cert,
        &[
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            &data,
        ],
        "/mutate",
    );
    assert_eq!(code, 0, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        answer["response"]["uid"],
        "0df28fbd-5f5f-4f8f-8f8f-000000000001"
    );
    assert_eq!(answer["response"]["patchType"], "JSONPatch");
    let patch = base64_decode(answer["response"]["patch"].as_str().unwrap());
    let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
    let mut patched = pod.clone();
    json_patch::patch(&mut patched, &patch).unwrap();
    assert_eq!(patched, offline);

    // Garbage is refused with a reason, and the server is still there afterwards.
    let (code, body) = curl(
        &hook,
        &cert,
        &[
            "-X",
            "POST",
            "--data-binary",
            "not json",
            "-w",
            " %{http_code}",
        ],
        "/mutate",
    );
    assert_eq!(code, 0);
    assert!(
        body.starts_with("not an AdmissionReview") && body.ends_with(" 400"),
        "{body}"
    );

    // TLS 1.3 only: a client that stops at 1.2 gets no connection.
    let (code, body) = curl(&hook, &cert, &["--tls-max", "1.2"], "/healthz");
    assert_ne!(code, 0, "a TLS 1.2 client was served: {body}");
    let (code, _) = curl(&hook, &cert, &[], "/healthz");
    assert_eq!(code, 0);
}

#[test]
fn the_webhook_refuses_to_start_without_a_usable_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, _) = serving_cert(dir.path());
    let other_key = dir.path().join("other.key");
    std::fs::write(
        &other_key,
        rcgen::KeyPair::generate().unwrap().serialize_pem(),
    )
    .unwrap();
    for (c, k, expect) in [
        (cert.clone(), dir.path().join("missing.key"), "missing.key"),
        (cert.clone(), other_key, "do not go together"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_kith"))
            .args(["inject", "serve", "--listen", "127.0.0.1:0"])
            .arg("--tls-cert")
            .arg(&c)
            .arg("--tls-key")
            .arg(&k)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(expect), "{stderr}");
    }
}

#[test]
fn sigterm_stops_the_webhook_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = serving_cert(dir.path());
    let mut hook = serve(&cert, &key);
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(hook.child.id().to_string())
        .status();
    let status = hook.child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}

/// YAML text to JSON, the way the API server would hold it.
fn serde_norway_value(text: &str) -> Value {
    serde_norway::from_str(text).unwrap()
}

/// coreutils' base64, so that this test needs no base64 crate of its own.
fn base64_decode(text: &str) -> Vec<u8> {
    let mut child = Command::new("base64")
        .arg("-d")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "base64 -d failed on {text}");
    out.stdout
}

/// The injected containers' arguments are ones `kith sidecar init` and `kith sidecar run`
/// accept, and the pod's annotations and probes reach the capture rules.
#[test]
fn injected_containers_take_the_sidecars_own_flags() {
    if !have_tool(
        "iptables",
        "injected_containers_take_the_sidecars_own_flags",
    ) {
        return;
    }
    let run = inject(&["-f", FIXTURE], b"");
    assert_eq!(run.code, 0, "{}", run.stderr);
    let pod: Value = run
        .stdout
        .split("\n---\n")
        .map(serde_norway_value)
        .find(|d| d["kind"] == "Pod")
        .unwrap();
    let args = |i: usize| -> Vec<String> {
        pod["spec"]["initContainers"][i]["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_owned())
            .collect()
    };
    let (init, proxy) = (args(0), args(1));
    assert_eq!(init[..2], ["sidecar", "init"]);
    assert_eq!(proxy[..2], ["sidecar", "run"]);

    let out = Command::new(env!("CARGO_BIN_EXE_kith"))
        .args(&init)
        .arg("--dry-run")
        .output()
        .unwrap();
    let rules = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for rule in [
        "-A KITH_INBOUND -p tcp --dport 9100 -j RETURN", // kith.dev/exclude-inbound-ports
        "-A KITH_INBOUND -p tcp --dport 15020 -j RETURN", // the sidecar's admin port
        "-A KITH_OUTBOUND -p tcp --dport 5432 -j RETURN",
        "-A KITH_OUTBOUND -p tcp --dport 6379 -j RETURN",
        "-A KITH_OUTBOUND -d 169.254.169.254/32 -j RETURN",
        "-A KITH_OUTBOUND -m owner --uid-owner 1337 --gid-owner 1337 -j RETURN",
    ] {
        assert!(rules.contains(rule), "{rule} missing:\n{rules}");
    }
    assert!(
        !rules.contains("--dport 8080 -j RETURN"),
        "8080 is the app's, captured:\n{rules}"
    );
    // The probes go to the sidecar, which probes the app itself: their port stays captured.
    assert!(
        !rules.contains("--dport 8081 -j RETURN"),
        "8081 (probed) is captured too:\n{rules}"
    );
    for probe in [
        "--app-probe=app/readyz=http:8081/ready",
        "--app-probe=app/livez=tcp:8081",
    ] {
        assert!(
            proxy.iter().any(|a| a == probe),
            "{probe} missing: {proxy:?}"
        );
    }

    // clap stops at --help only after every argument before it parsed: unknown flags or bad
    // values would fail here.
    let out = Command::new(env!("CARGO_BIN_EXE_kith"))
        .args(&proxy)
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
