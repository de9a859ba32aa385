//! `kith agent run` as a library call: [`run`] takes a validated [`Config`] and a shutdown
//! token, and does what the command does: prove the node to the CA (or resume the stored
//! identity), bind the Workload API socket and the admin port, keep SVIDs fresh, serve, and on
//! shutdown drain and remove the socket. The binary only turns flags into the [`Config`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::agent::{Agent, AgentConfig, AgentError};
use crate::attest::Attestor;
use crate::docker::DockerPlugin;
use crate::metrics::AgentMetrics;
use crate::workload_api::{self, Limits, WorkloadApiMetrics};

/// Everything `kith agent run` needs, validated by whoever built it.
#[derive(Debug, Clone)]
pub struct Config {
    pub agent: AgentConfig,
    /// Where the Workload API socket is bound (its directory must be the agent's own).
    pub socket: PathBuf,
    /// The admin port: `/live`, `/ready`, `/metrics`.
    pub admin: SocketAddr,
    /// The Docker engine's socket, for attesting callers in containers.
    pub docker_socket: PathBuf,
    pub limits: Limits,
}

impl Config {
    /// Logs the configuration once at start; the join token is never printed.
    pub fn log(&self) {
        let a = &self.agent;
        tracing::info!(
            ca = %a.ca_urls.join(","),
            ca_timeout = ?a.ca_timeout,
            data_dir = %a.data_dir.display(),
            socket = %self.socket.display(),
            admin = %self.admin,
            first_contact = if a.bundle_file.is_some() { "bundle file" } else if a.bundle_sha256.is_some() { "pinned sha256" } else { "stored" },
            join_token = if a.join_token.is_some() { "<redacted>" } else { "none" },
            "kith agent starting"
        );
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(
        "cannot bind the Workload API socket {path}: {error} (is another agent running, or is its directory writable by others?)"
    )]
    Socket {
        path: PathBuf,
        #[source]
        error: std::io::Error,
    },
    #[error("cannot listen on {addr} (admin): {error}; pick another --admin-listen")]
    Admin {
        addr: SocketAddr,
        #[source]
        error: std::io::Error,
    },
}

/// How long open work may take to finish once `shutdown` fired.
const DRAIN: Duration = Duration::from_secs(10);

/// Runs the agent until `shutdown` fires (or the Workload API stops on its own).
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), RunError> {
    config.log();
    let metrics = Arc::new(AgentMetrics::new());
    let (agent, snapshots) = Agent::bootstrap(config.agent.clone(), metrics).await?;
    let socket = workload_api::bind(&config.socket).map_err(|error| RunError::Socket {
        path: config.socket.clone(),
        error,
    })?;
    let admin = tokio::net::TcpListener::bind(config.admin)
        .await
        .map_err(|error| RunError::Admin {
            addr: config.admin,
            error,
        })?;
    tracing::info!(id = %agent.node_id(), socket = %config.socket.display(), "serving the Workload API");

    // Without the engine the agent still serves host processes; callers in containers are
    // refused until it answers (see crate::docker for why). Warned once, here.
    let docker = DockerPlugin::new(&config.docker_socket);
    match docker.api_version().await {
        Ok(api) => {
            tracing::info!(socket = %config.docker_socket.display(), api, "docker attestation enabled")
        }
        Err(e) => {
            tracing::warn!(error = %e, "callers in docker containers will be refused until the engine answers")
        }
    }

    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    let api_metrics = Arc::new(WorkloadApiMetrics::new());
    tasks.spawn(agent.clone().run(stop.clone()));
    tasks.spawn(crate::admin::serve(
        agent.clone(),
        api_metrics.clone(),
        admin,
        stop.clone(),
    ));
    let attestor = Attestor::new()
        .with_plugin(docker)
        .with_metrics(api_metrics.clone());
    let api = tasks.spawn(workload_api::serve(
        socket,
        snapshots,
        agent.clone(),
        Arc::new(attestor),
        config.limits,
        api_metrics,
        stop.clone(),
    ));
    tasks.close();
    tokio::select! {
        () = shutdown.cancelled() => tracing::info!("shutting down"),
        r = api => {
            if let Ok(Err(e)) = r {
                tracing::error!(error = %e, "the Workload API stopped");
            }
        }
    }
    stop.cancel();
    if tokio::time::timeout(DRAIN, tasks.wait()).await.is_err() {
        tracing::warn!("some tasks did not stop within 10s");
    }
    let _ = std::fs::remove_file(&config.socket);
    Ok(())
}
