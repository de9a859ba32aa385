//! Shared harness for the `kith` CLI tests: a private CA home per test, the real binary, and
//! external checkers (openssl, pkilint) that skip loudly when absent outside CI.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use integration::{CA_KEK, eventually};
use rustls_pki_types::CertificateDer;
use serde_json::Value;

pub mod net;

pub struct Kith {
    pub dir: tempfile::TempDir,
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Kith {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Runs `kith certs <args>` with this test's CA home.
    pub fn certs(&self, args: &[&str]) -> Run {
        let out = Command::new(env!("CARGO_BIN_EXE_kith"))
            .arg("certs")
            .args(args)
            .env("KITH_HOME", self.home())
            .current_dir(self.dir.path())
            .output()
            .unwrap();
        Run::from(out)
    }

    /// Issues `id` into `<dir>/<out>` and returns (chain path, key path, bundle path).
    pub fn issue(&self, id: &str, out: &str, extra: &[&str]) -> (PathBuf, PathBuf, PathBuf) {
        let out_dir = self.path(out);
        let mut args = vec![
            "issue",
            id,
            "--out",
            out_dir.to_str().unwrap(),
            "--name",
            "svid",
        ];
        args.extend_from_slice(extra);
        let run = self.certs(&args);
        run.ok();
        (
            out_dir.join("svid.crt"),
            out_dir.join("svid.key"),
            out_dir.join("bundle.crt"),
        )
    }
}

impl Run {
    fn from(out: Output) -> Self {
        let run = Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        assert!(
            !run.stderr.contains("panicked"),
            "kith panicked:\n{}",
            run.stderr
        );
        run
    }

    pub fn ok(&self) -> &Self {
        assert_eq!(
            self.code, 0,
            "stdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }
}

/// True when `tool` runs. Absent outside CI, the test prints why it is skipped; absent in CI
/// (CI=true, where .ci/run installs it), the test fails: a checker never silently passes.
pub fn have_tool(tool: &str, test: &str) -> bool {
    let found = Command::new(tool)
        .arg("--help")
        .output()
        .map(|_| true)
        .unwrap_or(false);
    if !found {
        integration::skip::skip(
            test,
            &format!("{tool} is not installed (run .ci/run, or install it, to check this)"),
        );
    }
    found
}

/// Runs openssl with `args`; returns (success, combined output).
pub fn openssl(args: &[&str]) -> (bool, String) {
    let out = Command::new("openssl").args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// pkilint's known false positives on kith certificates: it accepts only
/// web URL schemes in URIs, and no single-label DNS names.
const PKILINT_FALSE_POSITIVES: &[&str] =
    &["pkix.invalid_uri_syntax", "pkix.invalid_domain_name_syntax"];

/// Lints one PEM certificate and returns every ERROR or FATAL finding that is not a known
/// false positive.
pub fn pkilint_findings(cert_pem: &Path) -> Vec<String> {
    let out = Command::new("lint_pkix_cert")
        .args(["lint", "-s", "ERROR"])
        .arg(cert_pem)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let findings: Vec<String> = text
        .lines()
        .filter(|l| l.contains("(ERROR)") || l.contains("(FATAL)"))
        .map(|l| l.trim().to_owned())
        .collect();
    // Guard against a silent failure: non-zero with no finding means pkilint itself broke.
    assert!(
        out.status.success() || !findings.is_empty(),
        "pkilint failed without findings: {}{}",
        text,
        String::from_utf8_lossy(&out.stderr)
    );
    findings
        .into_iter()
        .filter(|f| !PKILINT_FALSE_POSITIVES.iter().any(|fp| f.starts_with(fp)))
        .collect()
}

/// Splits a PEM file of several certificates into one file per certificate.
pub fn split_pem(path: &Path, dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string(path).unwrap();
    text.split_inclusive("-----END CERTIFICATE-----\n")
        .filter(|b| b.contains("BEGIN CERTIFICATE"))
        .enumerate()
        .map(|(i, block)| {
            let stem = path.file_stem().unwrap().to_string_lossy();
            let p = dir.join(format!("{stem}.{i}.pem"));
            std::fs::write(&p, block.trim_start()).unwrap();
            p
        })
        .collect()
}

/// One try at the caller's X509-SVID from the Workload API at `socket` with the `spiffe` crate
/// (a client no one here wrote): its SPIFFE ID and chain, or None when there is none yet.
pub async fn workload_svid(socket: &Path) -> Option<(String, Vec<CertificateDer<'static>>)> {
    let endpoint = format!("unix://{}", socket.display());
    let client = spiffe::WorkloadApiClient::connect_to(endpoint).await.ok()?;
    let svid = tokio::time::timeout(Duration::from_secs(2), client.fetch_x509_svid())
        .await
        .ok()?
        .ok()?;
    let chain = svid
        .cert_chain()
        .iter()
        .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
        .collect();
    Some((svid.spiffe_id().to_string(), chain))
}

/// A real `kith ca serve` on loopback, and the real `kith` for commands.
pub struct Ca {
    pub child: Child,
    pub addr: String,
    pub metrics_addr: String,
    /// Every log line the CA wrote to stderr so far (JSON).
    pub log: Arc<Mutex<Vec<String>>>,
}

pub fn kith(args: &[&str]) -> (i32, String, String) {
    output(Command::new(env!("CARGO_BIN_EXE_kith")).args(args))
}

/// `kith` with the test CAs' KEK in `KITH_CA_KEK`, as an operator checking a stopped CA runs it.
pub fn kith_with_kek(args: &[&str]) -> (i32, String, String) {
    output(
        Command::new(env!("CARGO_BIN_EXE_kith"))
            .args(args)
            .env("KITH_CA_KEK", CA_KEK),
    )
}

/// `kith <args>` that must succeed, its standard output read as JSON.
pub fn json_of(args: &[&str]) -> Value {
    let (code, out, err) = kith(args);
    assert_eq!(code, 0, "{args:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

/// (exit code, stdout, stderr) of `cmd`, which must not panic.
fn output(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd.output().unwrap();
    let (o, e) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(!e.contains("panicked"), "{e}");
    (out.status.code().unwrap_or(-1), o, e)
}

/// `kith ca serve` with its data in `dir/ca` that takes the projected service-account tokens
/// of a lab cluster key (its JWK set in `dir/jwks.json`); `extra` flags are appended.
pub fn serve_k8s_ca(dir: &Path, extra: &[&str]) -> (Ca, integration::ClusterKey) {
    let key = integration::ClusterKey::new();
    let jwks = dir.join("jwks.json");
    std::fs::write(&jwks, key.jwks()).unwrap();
    let mut flags = vec!["--k8s-issuer", integration::ISSUER];
    flags.extend(["--k8s-jwks", jwks.to_str().unwrap()]);
    flags.extend_from_slice(extra);
    (serve_ca_with(&dir.join("ca"), &flags), key)
}

pub fn serve_ca(data: &Path) -> Ca {
    serve_ca_with(data, &[])
}

/// `kith ca serve` on any loopback ports with its data in `data` and the test KEK; its output
/// is the caller's to direct.
pub fn ca_serve_command(data: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kith"));
    cmd.args(["ca", "serve", "--listen", "127.0.0.1:0"])
        .args(["--metrics-listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .env("KITH_CA_KEK", CA_KEK);
    cmd
}

/// `kith ca serve` on loopback with extra flags (`--k8s-issuer`, `--workload-ttl`, …).
pub fn serve_ca_with(data: &Path, extra: &[&str]) -> Ca {
    let mut child = ca_serve_command(data)
        .args(["--log-format", "json"])
        .args(extra)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let log = Arc::new(Mutex::new(Vec::new()));
    let lines = Arc::clone(&log);
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<Value>(&line)
                && v["fields"]["message"] == "kith ca serving"
            {
                let _ = tx.send((
                    v["fields"]["api"].as_str().unwrap_or_default().to_owned(),
                    v["fields"]["metrics"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                ));
            }
            lines.lock().unwrap().push(line);
        }
    });
    let (addr, metrics_addr) = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the CA logs its address when serving");
    Ca {
        child,
        addr,
        metrics_addr,
        log,
    }
}

/// A CA left running by a failed test would keep the test's output pipe open.
impl Drop for Ca {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn stop(mut ca: Ca) -> i32 {
    // SIGTERM, as an init system would send.
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(ca.child.id().to_string())
        .status();
    ca.child.wait().unwrap().code().unwrap_or(-1)
}

/// A child process killed when the test ends, its stderr kept in a file for failure messages.
pub struct Proc {
    pub child: Child,
    log: PathBuf,
}

impl Proc {
    pub fn spawn(dir: &Path, name: &str, args: &[&str]) -> Self {
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_kith"))
            .args(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Self { child, log }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log holds `needle` and returns it; fails with the log after `within`.
    pub fn wait_log(&self, needle: &str, within: Duration) -> String {
        eventually(&format!("{needle:?} in the log"), within, || {
            let log = self.log();
            if log.contains(needle) {
                Ok(log)
            } else {
                Err(log)
            }
        })
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
