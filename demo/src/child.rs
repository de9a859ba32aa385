//! The demo's child processes. Every component is the real `kith` binary, started with the
//! caller's `KITH_*` settings removed (the demo must not pick up an operator's config), in its
//! own process group (a terminal's Ctrl-C reaches only the demo, which then stops the children
//! in order: traffic first, sidecars, agent, CA). Each child's stderr (JSON logs) is copied to
//! `<tmp>/logs/<name>.log` and parsed into [`LogEvent`]s for the live view.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{ChildStderr, Command};
use tokio::sync::{mpsc, watch};
use tokio_util::task::TaskTracker;

use crate::observe::{self, LogEvent};
use crate::roles::Role;

/// Log events of every child, tagged with who logged them.
pub type LogTx = mpsc::UnboundedSender<(Role, LogEvent)>;

/// Lines of a child's log kept for error messages.
const TAIL: usize = 12;

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
    /// `wait` itself failed; the child is gone as far as we can tell.
    Unknown,
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit status {c}"),
            Exit::Signal(s) => write!(f, "killed by signal {s}"),
            Exit::Unknown => f.write_str("ended"),
        }
    }
}

/// A running (or ended) `kith` child.
pub struct Child {
    pub role: Role,
    pub pid: u32,
    exit: watch::Receiver<Option<Exit>>,
    tail: Arc<Mutex<VecDeque<String>>>,
}

/// A child that could not be started, or a one-shot command that failed.
#[derive(Debug, thiserror::Error)]
pub enum ChildError {
    #[error("cannot create {}", path.display())]
    Log {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `hint` says what to do when the cause is a known one (a noexec temporary directory).
    #[error("cannot start {role} ({}): {error}{hint}", exe.display())]
    Spawn {
        role: String,
        exe: PathBuf,
        error: std::io::Error,
        hint: &'static str,
    },
    #[error("the child has no pid")]
    NoPid,
    #[error("no answer within 20 s")]
    Timeout,
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The command's own error message (its stderr).
    #[error("{0}")]
    Failed(String),
    #[error("its output is not the JSON it should be")]
    NotJson(#[source] serde_json::Error),
}

type Result<T, E = ChildError> = std::result::Result<T, E>;

impl Child {
    /// Starts `exe args…` with `env` added to a cleaned environment.
    pub fn spawn(
        role: Role,
        exe: &Path,
        args: Vec<OsString>,
        env: &[(&str, String)],
        logs: &Path,
        tx: LogTx,
        tracker: &TaskTracker,
    ) -> Result<Self> {
        let log_path = logs.join(format!("{}.log", role.slug()));
        let file = std::fs::File::create(&log_path).map_err(|source| ChildError::Log {
            path: log_path.clone(),
            source,
        })?;
        let mut cmd = clean_command(exe);
        cmd.args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // The safety net: a child whose owner task is dropped (the demo's runtime ends,
            // or it panics) is killed.
            .kill_on_drop(true)
            .process_group(0);
        let mut child = cmd.spawn().map_err(|error| {
            let hint = if error.kind() == std::io::ErrorKind::PermissionDenied {
                "; if the temporary directory is on a noexec file system, set TMPDIR to another one"
            } else {
                ""
            };
            ChildError::Spawn {
                role: role.title(),
                exe: exe.to_owned(),
                error,
                hint,
            }
        })?;
        let pid = child.id().ok_or(ChildError::NoPid)?;
        let tail = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL)));
        if let Some(stderr) = child.stderr.take() {
            tracker.spawn(read_log(role, stderr, file, tail.clone(), tx));
        }
        let (exit_tx, exit) = watch::channel(None);
        tracker.spawn(async move {
            let exit = match child.wait().await {
                Ok(status) => {
                    use std::os::unix::process::ExitStatusExt as _;
                    match (status.code(), status.signal()) {
                        (Some(c), _) => Exit::Code(c),
                        (None, Some(s)) => Exit::Signal(s),
                        (None, None) => Exit::Unknown,
                    }
                }
                Err(_) => Exit::Unknown,
            };
            let _ = exit_tx.send(Some(exit));
        });
        Ok(Self {
            role,
            pid,
            exit,
            tail,
        })
    }

    pub fn exited(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    /// Resolves when the child has ended.
    pub async fn ended(&self) -> Exit {
        let mut rx = self.exit.clone();
        match rx.wait_for(Option::is_some).await {
            Ok(e) => e.unwrap_or(Exit::Unknown),
            Err(_) => Exit::Unknown,
        }
    }

    /// SIGTERM: a clean stop (sidecars drain, the agent removes its socket).
    pub fn terminate(&self) {
        self.signal(Signal::SIGTERM);
    }

    /// Waits up to `grace` for the child to end, then SIGKILLs it and waits for that.
    pub async fn reap(&self, grace: Duration) -> Exit {
        match tokio::time::timeout(grace, self.ended()).await {
            Ok(exit) => exit,
            Err(_) => {
                self.signal(Signal::SIGKILL);
                self.ended().await
            }
        }
    }

    fn signal(&self, sig: Signal) {
        // Only while our waiter has not reaped it: afterwards the pid may belong to another
        // process.
        if self.exited().is_none()
            && let Ok(pid) = i32::try_from(self.pid)
        {
            let _ = kill(Pid::from_raw(pid), sig);
        }
    }

    /// The last lines of the child's log, readable (for error messages).
    pub fn tail(&self) -> Vec<String> {
        self.tail
            .lock()
            .map(|t| t.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// "the api sidecar exited (exit status 1) …" with the last log lines and the log path.
    pub fn explain(&self, what: &str) -> String {
        let mut msg = format!("{} {what}", self.role.title());
        let tail = self.tail();
        if tail.is_empty() {
            msg.push_str(" (it logged nothing)");
        } else {
            msg.push_str("; its last log lines:");
            for line in tail.iter().rev().take(6).rev() {
                msg.push_str("\n    ");
                msg.push_str(line);
            }
        }
        msg
    }
}

/// A `kith` command with the caller's `KITH_*`, `SPIFFE_ENDPOINT_SOCKET` and `RUST_LOG`
/// removed: an operator's settings for a real deployment must not leak into the demo.
fn clean_command(exe: &Path) -> Command {
    let mut cmd = Command::new(exe);
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("KITH_") || k == "SPIFFE_ENDPOINT_SOCKET" || k == "RUST_LOG" {
            cmd.env_remove(&key);
        }
    }
    cmd
}

/// Runs a one-shot `kith` command (e.g. `ca token create --json`) and parses its JSON output.
pub async fn run_json(exe: &Path, args: &[OsString]) -> Result<serde_json::Value> {
    let mut cmd = clean_command(exe);
    cmd.args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .process_group(0);
    let out = tokio::time::timeout(Duration::from_secs(20), cmd.output())
        .await
        .map_err(|_| ChildError::Timeout)??;
    if !out.status.success() {
        return Err(ChildError::Failed(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ));
    }
    serde_json::from_slice(&out.stdout).map_err(ChildError::NotJson)
}

/// Copies the child's stderr to its log file and parses each line. Reads until EOF even when
/// a line is not UTF-8, so the child never blocks on a full pipe.
async fn read_log(
    role: Role,
    stderr: ChildStderr,
    mut file: std::fs::File,
    tail: Arc<Mutex<VecDeque<String>>>,
    tx: LogTx,
) {
    let mut reader = BufReader::new(stderr);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let _ = file.write_all(&buf);
        let line = String::from_utf8_lossy(&buf);
        let line = line.trim_end();
        if let Ok(mut t) = tail.lock() {
            if t.len() == TAIL {
                t.pop_front();
            }
            t.push_back(observe::readable(line));
        }
        if let Some(event) = observe::parse_line(line) {
            let _ = tx.send((role, event));
        }
    }
}
