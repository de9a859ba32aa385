//! `kith demo` as a newcomer, a script or CI runs it: in a pipe, with no root and no config.
//! A 40 s run proves what the demo claims (requests through mTLS with none failed, rotations
//! under load, the intruder refused as not_authorized) in plain output without escape bytes;
//! a SIGINT stops it early. Either way, no process it started and not its temporary directory
//! outlive it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// A process as /proc knows it: its pid and start time (pids are reused; start times are not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Proc {
    pid: u32,
    start: u64,
}

/// Fields of /proc/<pid>/stat after the command name: state, ppid, …, starttime (field 22).
fn stat(pid: u32) -> Option<(char, u32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some((
        f.first()?.chars().next()?,
        f.get(1)?.parse().ok()?,
        f.get(19)?.parse().ok()?,
    ))
}

/// Every live descendant of `root`.
fn descendants(root: u32) -> Vec<Proc> {
    let all: Vec<(u32, u32, u64)> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| stat(pid).map(|(_, ppid, start)| (pid, ppid, start)))
        .collect();
    let mut found = Vec::new();
    let mut parents = vec![root];
    while let Some(p) = parents.pop() {
        for &(pid, ppid, start) in &all {
            if ppid == p {
                found.push(Proc { pid, start });
                parents.push(pid);
            }
        }
    }
    found
}

/// Still running (a zombie has ended; only its parent's reaping is missing).
fn alive(p: Proc) -> bool {
    stat(p.pid).is_some_and(|(state, _, start)| start == p.start && state != 'Z')
}

/// `kith demo <args>` with stdout and stderr piped; stderr lines arrive on the channel.
fn spawn_demo(args: &[&str]) -> (Child, mpsc::Receiver<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kith"))
        .arg("demo")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (child, rx)
}

/// Collects lines until one contains `needle`; panics with what came after `within`.
fn wait_line(rx: &mpsc::Receiver<String>, seen: &mut Vec<String>, needle: &str, within: Duration) {
    let deadline = Instant::now() + within;
    while !seen.iter().any(|l| l.contains(needle)) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => seen.push(line),
            Err(_) => panic!(
                "no line with {needle:?} within {within:?}:\n{}",
                seen.join("\n")
            ),
        }
    }
}

/// Waits for the exit code, killing the demo (and failing) after `within`.
fn wait_exit(child: &mut Child, within: Duration) -> i32 {
    match integration::wait::poll(within, || child.try_wait().unwrap()) {
        Ok(status) => status
            .code()
            .expect("the demo exits, it is not killed by a signal"),
        Err(_) => {
            let _ = child.kill();
            panic!("kith demo did not exit within {within:?}");
        }
    }
}

fn temp_dir_of(header: &str) -> PathBuf {
    // "kith demo: trust domain demo.kith, everything in /tmp/kith-demo-XXXX (removed at exit)"
    let rest = header.split("everything in ").nth(1).expect(header);
    PathBuf::from(rest.split(" (").next().unwrap())
}

fn check_cleaned_up(children: &[Proc], dir: &std::path::Path, output: &str) {
    let left: Vec<_> = children.iter().filter(|p| alive(**p)).collect();
    assert!(
        left.is_empty(),
        "still running after the demo exited: {left:?}\n{output}"
    );
    assert!(!dir.exists(), "{} is still there\n{output}", dir.display());
}

#[test]
fn a_forty_second_run_in_a_pipe_proves_mtls_rotation_and_refusal_and_cleans_up() {
    let started = Instant::now();
    // --json: the summary for scripts on stdout, the live view (plain, in a pipe) on stderr.
    let (mut demo, rx) = spawn_demo(&["--duration", "40s", "--json"]);
    let mut err = Vec::new();
    wait_line(&rx, &mut err, "running for 40 s", Duration::from_secs(60));
    let children = descendants(demo.id());
    assert_eq!(
        children.len(),
        5,
        "a CA, an agent and three sidecars: {children:?}\n{}",
        err.join("\n")
    );
    let mut stdout = String::new();
    demo.stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    let code = wait_exit(&mut demo, Duration::from_secs(60));
    err.extend(rx.try_iter());
    let err = err.join("\n");
    eprintln!("{err}\n(took {:?})", started.elapsed());

    assert_eq!(code, 0, "{err}\n{stdout}");
    assert!(
        !err.contains('\x1b') && !stdout.contains('\x1b'),
        "escape bytes in a pipe:\n{err:?}"
    );
    let v: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(v["ok"], true, "{stdout}");
    assert_eq!(v["requests"]["failed"], 0, "{stdout}");
    assert!(v["requests"]["ok"].as_u64().unwrap() >= 100, "{stdout}");
    assert!(
        v["requests"]["new_connections"].as_u64().unwrap() >= 10,
        "{stdout}"
    );
    for w in v["workloads"].as_array().unwrap() {
        if w["name"] != "intruder" {
            assert!(w["rotations"].as_u64().unwrap() >= 1, "{stdout}");
        }
    }
    let not_authorized = v["refusals"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["reason"] == "not_authorized")
        .unwrap_or_else(|| panic!("no not_authorized refusal: {stdout}"));
    assert!(not_authorized["count"].as_u64().unwrap() >= 1, "{stdout}");
    assert_eq!(v["intruder"]["answered"], 0, "{stdout}");
    assert_eq!(v["tls"]["version"], "TLSv1.3", "{stdout}");
    assert_eq!(v["tls"]["web_saw"], "spiffe://demo.kith/api", "{stdout}");
    assert_eq!(v["tls"]["api_saw"], "spiffe://demo.kith/web", "{stdout}");

    // The same, as a person reads it.
    for line in [
        "peer spiffe://demo.kith/api  TLSv1.3",
        "rotation: spiffe://demo.kith/web got a new SVID",
        "refused: spiffe://demo.kith/intruder → api: not_authorized",
        " 0 failed",
        "result     OK",
    ] {
        assert!(err.contains(line), "no {line:?} in:\n{err}");
    }
    let dir = PathBuf::from(v["temp_dir"].as_str().unwrap());
    check_cleaned_up(&children, &dir, &err);
}

#[test]
fn sigint_stops_the_demo_and_cleans_up() {
    // Without --json the view is on stdout.
    let (mut demo, rx) = spawn_demo(&[]);
    let stdout = demo.stdout.take().unwrap();
    let (tx_out, rx_out) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx_out.send(line);
        }
    });
    let mut out = Vec::new();
    wait_line(&rx_out, &mut out, "web → api  200", Duration::from_secs(60));
    let dir = temp_dir_of(&out[0]);
    assert!(dir.exists(), "{}", out.join("\n"));
    let children = descendants(demo.id());
    assert_eq!(children.len(), 5, "{children:?}\n{}", out.join("\n"));

    let _ = Command::new("kill")
        .args(["-INT", &demo.id().to_string()])
        .status();
    let code = wait_exit(&mut demo, Duration::from_secs(30));
    out.extend(rx_out.try_iter());
    let out = format!(
        "{}\n{}",
        out.join("\n"),
        rx.try_iter().collect::<Vec<_>>().join("\n")
    );
    assert!(out.contains("stopped by SIGINT"), "{out}");
    assert_eq!(code, 0, "a short run with no failure is a success:\n{out}");
    check_cleaned_up(&children, &dir, &out);
}

#[test]
fn a_useless_duration_is_refused_with_what_to_type() {
    let out = Command::new(env!("CARGO_BIN_EXE_kith"))
        .args(["demo", "--duration", "soon"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("90s"), "{err}");
}
