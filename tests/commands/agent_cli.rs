//! `kith agent run` as an operator runs it on a host, against a real `kith ca serve`: the join
//! line from `kith ca token create`, an entry for this test's uid, and the Rust `spiffe` crate
//! (a client no one here wrote) fetching the X509-SVID over the Workload API socket. Then
//! SIGTERM, and a restart that needs no token and serves again at once.
#![allow(clippy::unwrap_used)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{kith, serve_ca, stop, workload_svid};

fn start_agent(ca: &str, data: &std::path::Path, socket: &std::path::Path, join: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_kith"))
        .args(["agent", "run", "--ca", ca, "--admin-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(data)
        .arg("--socket")
        .arg(socket)
        .args(join)
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Fetches the caller's X509-SVID with the `spiffe` crate, retrying until `within` passes.
async fn fetch_id(socket: &std::path::Path, within: Duration) -> Option<String> {
    integration::wait::poll_async(within, async || {
        workload_svid(socket).await.map(|(id, _)| id)
    })
    .await
    .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_runs_the_agent_and_a_workload_gets_its_svid() {
    let dir = tempfile::tempdir().unwrap();
    let ca_data = dir.path().join("ca");
    let ca = serve_ca(&ca_data);
    let d = ca_data.to_str().unwrap();
    let (code, out, err) = kith(&[
        "ca",
        "token",
        "create",
        "--name",
        "host-a",
        "--data-dir",
        d,
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let url = format!("https://{}", ca.addr);
    let uid = nix_uid();
    let (code, _, err) = kith(&[
        "ca",
        "entry",
        "create",
        "--id",
        "spiffe://example.org/test-workload",
        "--parent",
        "spiffe://example.org/kith/node/host-a",
        "--selector",
        &format!("unix:uid:{uid}"),
        "--data-dir",
        d,
    ]);
    assert_eq!(code, 0, "{err}");

    let data = dir.path().join("agent");
    let socket = dir.path().join("run/agent.sock");
    // The token from a file: never in argv, where every local user could read it.
    let token_file = dir.path().join("join-token");
    std::fs::write(&token_file, format!("{}\n", v["token"].as_str().unwrap())).unwrap();
    let mut agent = start_agent(
        &url,
        &data,
        &socket,
        &[
            "--bundle-sha256",
            v["bundle_sha256"].as_str().unwrap(),
            "--join-token-file",
            token_file.to_str().unwrap(),
        ],
    );
    let id = fetch_id(&socket, Duration::from_secs(20)).await;
    assert_eq!(id.as_deref(), Some("spiffe://example.org/test-workload"));

    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(agent.id().to_string())
        .status();
    assert_eq!(
        agent.wait().unwrap().code(),
        Some(0),
        "SIGTERM is a clean exit"
    );
    assert!(!socket.exists(), "the socket is removed on the way out");

    // No token the second time: the node identity is on disk.
    let started = Instant::now();
    let mut agent = start_agent(&url, &data, &socket, &[]);
    let id = fetch_id(&socket, Duration::from_secs(20)).await;
    assert_eq!(id.as_deref(), Some("spiffe://example.org/test-workload"));
    eprintln!(
        "restarted agent served its first X509-SVID after {:?}",
        started.elapsed()
    );
    let _ = agent.kill();
    let _ = agent.wait();
    assert_eq!(stop(ca), 0);
}

/// `kith agent run` against a CA that is not there, with `args` and `env`: (exit code, stderr).
fn agent_once(dir: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kith"))
        .args([
            "agent",
            "run",
            "--ca",
            "https://127.0.0.1:9",
            "--admin-listen",
            "127.0.0.1:0",
            "--bundle-sha256",
            &"0".repeat(64),
        ])
        .arg("--data-dir")
        .arg(dir.join("agent"))
        .arg("--socket")
        .arg(dir.join("agent.sock"))
        .args(args)
        .env_remove("KITH_JOIN_TOKEN")
        .env_remove("KITH_AGENT_JOIN_TOKEN")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_join_token_in_argv_is_refused_with_what_to_use_instead() {
    let dir = tempfile::tempdir().unwrap();
    let (code, err) = agent_once(dir.path(), &["--join-token", "s3cret"], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("visible to every local user")
            && err.contains("--join-token-file")
            && err.contains("KITH_JOIN_TOKEN"),
        "{err}"
    );
    assert!(!err.contains("s3cret"), "{err}");
    assert!(!dir.path().join("agent").exists(), "nothing was written");
}

#[test]
fn the_join_token_is_read_from_the_environment_or_a_file() {
    let dir = tempfile::tempdir().unwrap();
    // Without a token the agent says so; with one (env or file) it goes on to first contact,
    // which fails here: no CA listens.
    let (_, none) = agent_once(dir.path(), &[], &[]);
    assert!(none.contains("no join token"), "{none}");
    let (_, empty) = agent_once(dir.path(), &[], &[("KITH_JOIN_TOKEN", " ")]);
    assert!(empty.contains("no join token"), "{empty}");
    for var in ["KITH_JOIN_TOKEN", "KITH_AGENT_JOIN_TOKEN"] {
        let (code, err) = agent_once(dir.path(), &[], &[(var, "s3cret")]);
        assert_eq!(code, 1, "{err}");
        assert!(
            !err.contains("no join token") && !err.contains("s3cret"),
            "{var}: {err}"
        );
    }
    let file = dir.path().join("token");
    std::fs::write(&file, "  s3cret\n").unwrap();
    let (code, err) = agent_once(
        dir.path(),
        &["--join-token-file", file.to_str().unwrap()],
        &[],
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        !err.contains("no join token") && !err.contains("s3cret"),
        "{err}"
    );
    std::fs::write(&file, "\n").unwrap();
    let (code, err) = agent_once(
        dir.path(),
        &["--join-token-file", file.to_str().unwrap()],
        &[],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("is empty"), "{err}");
}

#[test]
fn without_a_token_the_agent_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kith"))
        .args([
            "agent",
            "run",
            "--ca",
            "https://127.0.0.1:9",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(dir.path().join("agent"))
        .arg("--socket")
        .arg(dir.path().join("agent.sock"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--join-token") && err.contains("kith ca token create"),
        "{err}"
    );
}

fn nix_uid() -> u32 {
    // The uid this test runs as, from the kernel's view of ourselves.
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|u| u.parse().ok())
        .unwrap()
}
