//! `kith demo`: the whole system, live, on loopback, with nothing to install or configure.
//!
//! In a temporary directory it starts the real `kith` binary as a CA, as an agent that joins
//! with a one-time token, and as three sidecars that get their SVIDs from the agent's Workload
//! API: `web` (a client), `api` (in front of a small HTTP backend, allowing only web), and
//! `intruder` (a registered workload the api's policy does not allow). Requests flow from web to
//! api through mTLS; the view shows the peers' SPIFFE IDs, TLS version and suite, each SVID's
//! time left, rotations (the demo's SVIDs live 30 s) and the intruder's refusals. At the end,
//! or on Ctrl-C / SIGTERM, it stops everything it started, removes the directory, and prints
//! a summary (exit 0 when it proved its point, 1 with the reason when not).

mod backend;
mod child;
mod live;
mod observe;
mod roles;
mod stack;
mod state;
mod summary;
mod traffic;
mod view;

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What `kith demo` was asked for (its flags live in the binary).
#[derive(Debug, Clone)]
pub struct Options {
    /// Stop after this long and print a summary; until Ctrl-C when none.
    pub duration: Option<std::time::Duration>,
    /// The final summary as JSON on stdout; the live view then goes to stderr.
    pub json: bool,
    /// Keep the temporary directory.
    pub keep: bool,
    pub trust_domain: identity::TrustDomain,
}

use crate::live::{Live, Stop};
use crate::roles::Role;
use crate::stack::{Stack, Wiring};
use crate::summary::{Run, Summary};
use crate::view::{Style, Term};

/// How long a child may take to stop after SIGTERM before it gets SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

pub fn run(args: Options) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = rt.block_on(demo(args));
    // Whatever is left (nothing, normally) is dropped here: children still running are killed.
    rt.shutdown_timeout(Duration::from_secs(2));
    code
}

async fn demo(args: Options) -> ExitCode {
    let mut term = Term::new(args.json);
    // Before any child exists: from here on, SIGINT/SIGTERM/SIGHUP mean "clean up".
    let mut signals = match Signals::new() {
        Ok(s) => s,
        Err(e) => return fail(&mut term, &format!("cannot handle signals: {e}")),
    };
    let tmp = match temp_dir() {
        Ok(t) => t,
        Err(e) => return fail(&mut term, &identity::report::chain(&e)),
    };
    let dir = tmp.path().to_path_buf();
    term.line(&format!(
        "{}: trust domain {}, everything in {} ({})",
        term.paint(Style::Bold, "kith demo"),
        args.trust_domain,
        dir.display(),
        if args.keep {
            "kept at exit"
        } else {
            "removed at exit"
        }
    ));

    let tracker = TaskTracker::new();
    let (log_tx, mut log_rx) = mpsc::unbounded_channel();
    let backend_stop = CancellationToken::new();
    let mut early = Vec::new();
    let mut stack = Stack::new(dir.clone(), args.trust_domain.clone());
    let started = tokio::select! {
        r = stack::start(&mut stack, &mut term, Wiring {
            tracker: &tracker,
            log_tx,
            log_rx: &mut log_rx,
            early: &mut early,
            backend_stop: backend_stop.clone(),
        }) => r.map_err(DemoError::Stack),
        sig = signals.recv() => Err(DemoError::Interrupted(sig)),
    };
    if let Err(e) = started {
        let failed = term.paint(Style::Red, "failed");
        term.close_line(&failed);
        stop_children(&stack, &mut signals).await;
        backend_stop.cancel();
        let logs = dir.join("logs");
        let started_any = !stack.children.is_empty();
        let kept = finish_dir(tmp, args.keep);
        let hint = match kept {
            Some(_) => format!("\n  every component's log is in {}", logs.display()),
            None if started_any => "\n  run with --keep to keep every component's log".to_owned(),
            None => String::new(),
        };
        return fail(&mut term, &format!("{}{hint}", identity::report::chain(&e)));
    }

    let mut live = Live::new(&stack, args.duration);
    let stop = live
        .run(&mut term, &stack, &mut signals, &mut log_rx, early)
        .await;
    let elapsed = live.elapsed();
    stop_children(&stack, &mut signals).await;
    backend_stop.cancel();
    tracker.close();
    // Log readers end when their child's stderr closes; give them a moment to finish.
    let _ = tokio::time::timeout(Duration::from_secs(3), tracker.wait()).await;
    live.drain_logs(&mut term, &mut log_rx);
    live.finish(&mut term);

    let kept = finish_dir(tmp, args.keep);
    let summary = Summary::new(Run {
        state: &live.state,
        stop: &stop,
        elapsed,
        trust_domain: args.trust_domain.to_string(),
        temp_dir: dir.display().to_string(),
        kept: kept.is_some(),
    });
    summary.print(&mut term);
    if let Some(dir) = kept {
        term.line(&format!(
            "  kept       {} (CA database, agent data, logs/)",
            dir.display()
        ));
    }
    if args.json {
        let json = serde_json::to_string_pretty(&summary).unwrap_or_default();
        let mut out = std::io::stdout();
        if writeln!(out, "{json}").and_then(|()| out.flush()).is_err() {
            return ExitCode::FAILURE;
        }
    }
    if matches!(stop, Stop::OutputClosed) || !summary.ok {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// The signals that end the demo. A second one while stopping skips the grace periods.
pub(crate) struct Signals {
    int: Signal,
    term: Signal,
    hup: Signal,
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        Ok(Self {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    pub(crate) async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
            _ = self.hup.recv() => "SIGHUP",
        }
    }
}

/// Stops the children in reverse start order: the sidecars (together), then the agent, then
/// the CA; each gets SIGTERM and [`STOP_GRACE`]. A signal meanwhile kills the rest at once.
async fn stop_children(stack: &Stack, signals: &mut Signals) {
    let sidecars: Vec<_> = stack
        .children
        .iter()
        .filter(|c| matches!(c.role, Role::Sidecar(_)))
        .collect();
    let others: Vec<_> = stack
        .children
        .iter()
        .rev()
        .filter(|c| !matches!(c.role, Role::Sidecar(_)))
        .collect();
    let orderly = async {
        // The sidecars together: SIGTERM to all, then wait for each.
        for c in &sidecars {
            c.terminate();
        }
        for c in &sidecars {
            c.reap(STOP_GRACE).await;
        }
        for c in &others {
            c.terminate();
            c.reap(STOP_GRACE).await;
        }
    };
    tokio::select! {
        () = orderly => {}
        _ = signals.recv() => {
            for c in &stack.children {
                c.reap(Duration::ZERO).await;
            }
        }
    }
}

/// Creates `kith-demo-XXXXXX` under the system's temporary directory, by its canonical path
/// (the one `/proc/<pid>/exe` will show for the sidecars' binaries).
fn temp_dir() -> Result<tempfile::TempDir, DemoError> {
    let base = std::env::temp_dir();
    let base = base.canonicalize().unwrap_or(base);
    tempfile::Builder::new()
        .prefix("kith-demo-")
        .tempdir_in(&base)
        .map_err(|source| DemoError::TempDir { base, source })
}

/// Why the demo could not start.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(
        "cannot create a temporary directory in {}; set TMPDIR to a writable directory",
        base.display()
    )]
    TempDir {
        base: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("interrupted by {0} during startup")]
    Interrupted(&'static str),
    #[error(transparent)]
    Stack(#[from] stack::StackError),
}

/// Removes the temporary directory, or keeps it (returning its path).
fn finish_dir(tmp: tempfile::TempDir, keep: bool) -> Option<PathBuf> {
    if keep {
        Some(tmp.keep())
    } else {
        let path = tmp.path().to_path_buf();
        if let Err(e) = tmp.close() {
            eprintln!("warning: could not remove {}: {e}", path.display());
        }
        None
    }
}

/// An error on stderr (whatever stream the view uses: scripts look there), and exit 1.
fn fail(term: &mut Term, msg: &str) -> ExitCode {
    let error = term.paint(Style::Red, "error");
    eprintln!("{error}: {msg}");
    ExitCode::FAILURE
}
