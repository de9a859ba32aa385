//! `kith ca serve`: the configuration checked and logged, the listeners bound, then the CA
//! until SIGTERM, with a bounded drain.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use ca::config::{Config, ServeArgs};
use ca::server::{Listeners, start};
use tokio_util::sync::CancellationToken;

use crate::process;

pub(super) async fn serve(args: ServeArgs) -> Result<ExitCode> {
    let signalled = process::on_signal();
    let cfg = Config::resolve(args)?;
    process::init_logging(&cfg.log_format);
    ca::server::prepare_data_dir(&cfg)?;
    let api = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    let metrics = tokio::net::TcpListener::bind(cfg.metrics_listen)
        .await
        .with_context(|| format!("cannot listen on {} (metrics)", cfg.metrics_listen))?;
    let admin = ca::admin::bind(&cfg.admin_socket).with_context(|| {
        format!(
            "cannot bind the admin socket {}",
            cfg.admin_socket.display()
        )
    })?;
    let shutdown = CancellationToken::new();
    let running = start(
        &cfg,
        Listeners {
            api,
            metrics,
            admin,
        },
        shutdown.clone(),
    )
    .await?;
    signalled.cancelled().await;
    tracing::info!("shutting down: no new connections; open requests may finish (up to 10s)");
    shutdown.cancel();
    if tokio::time::timeout(Duration::from_secs(10), running.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("some requests did not finish within 10s");
    }
    let _ = std::fs::remove_file(&cfg.admin_socket);
    Ok(ExitCode::SUCCESS)
}
