//! The process shell every long-running command shares: logging, the signals that stop it,
//! and how an error chain is printed. Libraries take a shutdown token and never install
//! handlers or subscribers themselves; only the binary does, here.

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

/// Returns on the first SIGTERM (what Kubernetes, Docker and systemd send) or Ctrl-C.
pub async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
