//! What runs after each rewrite so the program reading the files reloads them.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::str::FromStr;
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::FetchError;

/// A hook that hangs must not stop rotations forever.
const HOOK_TIMEOUT: Duration = Duration::from_secs(60);

/// What tells the program reading the files to reload them.
#[derive(Debug, Clone)]
pub enum Hook {
    None,
    /// Run with `sh -c`.
    Command(String),
    Signal(SignalTarget),
}

/// `--signal <pid>:<SIG>` or `<pidfile>:<SIG>` (the file is read at every rotation, so a
/// restarted program still gets the signal).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignalTarget {
    pub pid: PidSource,
    pub signal: Signal,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PidSource {
    Pid(i32),
    File(PathBuf),
}

impl FromStr for SignalTarget {
    type Err = FetchError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || FetchError::SignalSpec(s.to_owned());
        let (target, sig) = s.rsplit_once(':').ok_or_else(bad)?;
        let pid = if target.starts_with('/') {
            PidSource::File(PathBuf::from(target))
        } else {
            // SECURITY: kill(0) and kill(-1) signal whole process groups or every process
            // we may signal; only a single, positive pid is accepted.
            let pid: i32 = target.parse().map_err(|_| bad())?;
            if pid <= 0 {
                return Err(bad());
            }
            PidSource::Pid(pid)
        };
        Ok(Self {
            pid,
            signal: parse_signal(sig).ok_or_else(bad)?,
        })
    }
}

/// HUP, SIGHUP, hup or 1.
fn parse_signal(s: &str) -> Option<Signal> {
    if let Ok(n) = s.parse::<i32>() {
        return Signal::try_from(n).ok();
    }
    let upper = s.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    name.parse().ok()
}

/// Runs the hook after a rewrite. Failures are logged: the files are already in place, and
/// the next rotation tries again.
pub(super) async fn run_hook(hook: &Hook, dir: &Path) {
    match hook {
        Hook::None => {}
        Hook::Command(command) => run_command(command, dir).await,
        Hook::Signal(target) => {
            let pid = match &target.pid {
                PidSource::Pid(pid) => Ok(*pid),
                PidSource::File(path) => read_pid_file(path),
            };
            let result = pid.and_then(|pid| {
                nix::sys::signal::kill(Pid::from_raw(pid), target.signal)
                    .map(|()| pid)
                    .map_err(|e| format!("kill {pid}: {e}"))
            });
            match result {
                Ok(pid) => tracing::info!(pid, signal = %target.signal, "signalled"),
                Err(e) => tracing::warn!(error = %e, signal = %target.signal, "cannot signal"),
            }
        }
    }
}

async fn run_command(command: &str, dir: &Path) {
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .env("SPIFFE_CREDENTIAL_FOLDER", dir)
        .stdin(Stdio::null())
        // stdout carries our own output (--json); the hook's goes to stderr.
        .stdout(Stdio::from(std::io::stderr()))
        .kill_on_drop(true)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(command, error = %e, "cannot start the on-rotate command");
            return;
        }
    };
    match tokio::time::timeout(HOOK_TIMEOUT, child.wait()).await {
        Ok(Ok(status)) if status.success() => tracing::info!(command, "on-rotate command ran"),
        Ok(Ok(status)) => tracing::warn!(command, %status, "on-rotate command failed"),
        Ok(Err(e)) => tracing::warn!(command, error = %e, "on-rotate command failed"),
        Err(_) => {
            let _ = child.start_kill();
            tracing::warn!(command, timeout = ?HOOK_TIMEOUT, "on-rotate command timed out; killed");
        }
    }
}

fn read_pid_file(path: &Path) -> Result<i32, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    match text.trim().parse::<i32>() {
        Ok(pid) if pid > 0 => Ok(pid),
        _ => Err(format!("{}: not a pid", path.display())),
    }
}
