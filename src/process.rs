//! The process shell every long-running command shares: its runtime, logging, the signals that
//! stop it, and how an error chain is printed. Libraries take a shutdown token and never install
//! handlers or subscribers themselves; only the binary does, here.

use std::process::ExitCode;

/// Logs to stderr, `text` or `json`, filtered by `RUST_LOG` (default `info`). Colours only on a
/// terminal: a log redirected to a file or a pipe carries no ANSI codes.
pub fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = if format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// A token cancelled on the first SIGTERM (what Kubernetes, Docker and systemd send) or SIGINT
/// (Ctrl-C). The handlers are installed when this is called, so a command calls it first thing:
/// a signal that arrives while it is still starting (binding, loading keys) then stops it
/// cleanly instead of killing it. Must be called inside the runtime.
pub fn on_signal() -> tokio_util::sync::CancellationToken {
    use tokio::signal::unix::{SignalKind, signal};
    let token = tokio_util::sync::CancellationToken::new();
    let cancel = token.clone();
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    tokio::spawn(async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            (Ok(mut one), Err(_)) | (Err(_), Ok(mut one)) => {
                one.recv().await;
            }
            // No handler could be installed: the default action (exit) stays.
            (Err(_), Err(_)) => std::future::pending::<()>().await,
        }
        cancel.cancel();
    });
    token
}

/// How many threads a command's runtime gets.
pub enum Threads {
    /// One: the sidecar (its workers bring their own), the CA's control loop.
    One,
    Two,
}

/// Keeps glibc's malloc from returning the top of its heap to the kernel after every burst.
///
/// glibc trims its heap once more than its trim threshold (128 KiB at start) is free at the
/// top. The pooled mesh hop frees received HTTP/2 frames (blocks of 16 to 64 KiB) in bursts,
/// so at that threshold a sidecar's heap shrinks and grows again all through a bulk transfer
/// (1,601 `brk` calls in one 256 MiB download through the pooled hop, 100 with the threshold
/// raised), and each regrowth faults in and zeroes fresh pages: 60 to 70 ticks of CPU on the
/// receiving sidecar for that download against about 35, and no change in the memory of 1,000
/// held connections.
/// glibc raises the threshold by itself when a block above its mmap threshold is freed (to
/// twice that block's size: the "dynamic mmap threshold" of mallopt(3)), so freeing one 1 MiB
/// block at start sets it to about 2 MiB, with no `unsafe` call and no tunable in the
/// environment. Elsewhere (musl's allocator, in the static build) it is one allocation.
pub fn settle_allocator() {
    let block: Vec<u8> = Vec::with_capacity(1 << 20);
    drop(std::hint::black_box(block));
}

/// The command's tokio runtime; on failure the error is printed and the exit code returned.
pub fn runtime(threads: Threads, failure: u8) -> Result<tokio::runtime::Runtime, ExitCode> {
    let built = match threads {
        Threads::One => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        Threads::Two => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build(),
    };
    built.map_err(|e| {
        eprintln!("error: cannot start the runtime: {e}");
        ExitCode::from(failure)
    })
}

/// Runs `work` on `rt` and turns its outcome into the exit status: success, or the error with
/// its causes on one line (`error: what failed: why: the cause under it`) and `failure`.
pub fn exit<T: Outcome>(
    rt: &tokio::runtime::Runtime,
    work: impl std::future::Future<Output = anyhow::Result<T>>,
    failure: u8,
) -> ExitCode {
    match rt.block_on(work) {
        Ok(done) => done.code(),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(failure)
        }
    }
}

/// What a command's work returns when it succeeds: nothing (exit 0), or its own exit code.
pub trait Outcome {
    fn code(self) -> ExitCode;
}

impl Outcome for () {
    fn code(self) -> ExitCode {
        ExitCode::SUCCESS
    }
}

impl Outcome for ExitCode {
    fn code(self) -> ExitCode {
        self
    }
}
