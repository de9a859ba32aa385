//! `kith agent run`: the per-host identity agent. Flags, each also a `KITH_AGENT_*` variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use agent::agent::{Agent, AgentConfig, JoinToken};
use agent::attest::Attestor;
use agent::docker::DockerPlugin;
use agent::metrics::AgentMetrics;
use agent::workload_api::{self, Limits, WorkloadApiMetrics};

use crate::process::{self, Threads};

#[derive(Debug, Args)]
pub struct AgentArgs {
    #[command(subcommand)]
    command: AgentCommand,
}

#[derive(Debug, Subcommand)]
enum AgentCommand {
    /// Attest the node, keep SVIDs fresh, and serve the SPIFFE Workload API
    Run(Box<RunArgs>),
    /// Write this process's SVID and bundles as files (SPIFFE Filesystem Delivery)
    Fetch(Box<crate::cmd::fetch::FetchArgs>),
}

#[derive(Debug, Args)]
struct RunArgs {
    /// The CA, e.g. https://ca.example.org:8443. Repeat it (or give a comma list) for CA
    /// replicas; a name that resolves to several addresses counts as several. Calls go to the
    /// replica that answered last and move to the next on a failed connection, a timeout or 503
    #[arg(long, env = "KITH_AGENT_CA", value_delimiter = ',', required = true)]
    ca: Vec<String>,
    /// How long one attempt at one CA replica may take (connect, TLS, answer) before the same
    /// call goes to the next replica
    #[arg(long, env = "KITH_AGENT_CA_TIMEOUT", default_value = "15s", value_parser = parse_ca_timeout)]
    ca_timeout: Duration,
    /// The CA's trust bundle (PEM or SPIFFE format), for first contact
    #[arg(long, env = "KITH_AGENT_BUNDLE", conflicts_with = "bundle_sha256")]
    bundle: Option<PathBuf>,
    /// SHA-256 of the CA's PEM bundle (printed by `kith ca token create`), for first contact
    #[arg(long, env = "KITH_AGENT_BUNDLE_SHA256")]
    bundle_sha256: Option<String>,
    /// Refused: a token in argv is visible to every local user (`ps`, /proc/<pid>/cmdline)
    #[arg(long, hide = true)]
    join_token: Option<String>,
    /// A file holding the one-time join token (first start only; later starts renew the stored
    /// identity). Or give the token in the environment: KITH_JOIN_TOKEN
    #[arg(long, env = "KITH_AGENT_JOIN_TOKEN_FILE")]
    join_token_file: Option<PathBuf>,
    #[arg(
        long,
        env = "KITH_AGENT_DATA_DIR",
        default_value = "/var/lib/kith-agent"
    )]
    data_dir: PathBuf,
    /// The Workload API socket (SPIFFE_ENDPOINT_SOCKET for workloads: unix://<path>)
    #[arg(
        long,
        env = "KITH_AGENT_SOCKET",
        default_value = "/run/kith/agent.sock"
    )]
    socket: PathBuf,
    /// /live, /ready and /metrics
    #[arg(
        long,
        env = "KITH_AGENT_ADMIN_LISTEN",
        default_value_t = SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, identity::mesh::AGENT_ADMIN_PORT))
    )]
    admin_listen: SocketAddr,
    /// The Docker Engine API socket, for docker:label/image/name selectors of callers in containers
    #[arg(
        long,
        env = "KITH_AGENT_DOCKER_SOCKET",
        default_value = agent::docker::DEFAULT_SOCKET
    )]
    docker_socket: PathBuf,
    /// Workload API connections open at once, over all callers
    #[arg(long, env = "KITH_AGENT_MAX_CONNECTIONS", default_value_t = Limits::default().max_connections as u32, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,
    /// Workload API connections one caller uid may hold open
    #[arg(long, env = "KITH_AGENT_MAX_CONNECTIONS_PER_UID", default_value_t = Limits::default().max_connections_per_uid as u32, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections_per_uid: u32,
    /// Workload API streams one caller uid may hold open
    #[arg(long, env = "KITH_AGENT_MAX_STREAMS_PER_UID", default_value_t = Limits::default().max_streams_per_uid as u32, value_parser = clap::value_parser!(u32).range(1..))]
    max_streams_per_uid: u32,
    /// Seconds a new Workload API connection has to send its first request, else it is cut
    #[arg(long, env = "KITH_AGENT_FIRST_REQUEST_TIMEOUT", default_value_t = Limits::default().first_request_timeout.as_secs(), value_parser = clap::value_parser!(u64).range(1..=3600))]
    first_request_timeout: u64,
    /// text or json
    #[arg(long, env = "KITH_AGENT_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

pub fn run(args: AgentArgs) -> ExitCode {
    let rt = match process::runtime(Threads::Two, 2) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let args = match args.command {
        AgentCommand::Run(args) => args,
        AgentCommand::Fetch(args) => return rt.block_on(crate::cmd::fetch::main(*args)),
    };
    process::exit(&rt, run_agent(*args), 1)
}

/// 1 s to 5 min: shorter cannot finish a TLS handshake on a busy host, longer hides a dead
/// replica for longer than a short SVID lives.
fn parse_ca_timeout(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < Duration::from_secs(1) || d > Duration::from_secs(300) {
        return Err(format!("{s} is not between 1s and 5m"));
    }
    Ok(d)
}

/// Where the join token may come from, in the order they are looked at.
pub const JOIN_TOKEN_ENV: [&str; 2] = ["KITH_JOIN_TOKEN", "KITH_AGENT_JOIN_TOKEN"];

/// The join token from `--join-token-file` or the environment; never from argv.
fn join_token(args: &RunArgs) -> Result<Option<JoinToken>> {
    if args.join_token.is_some() {
        anyhow::bail!(
            "--join-token on the command line is visible to every local user (ps); put the token in a file and pass --join-token-file <path>, or set KITH_JOIN_TOKEN in the environment"
        );
    }
    if let Some(path) = &args.join_token_file {
        return Ok(JoinToken::from_file(path).map(Some)?);
    }
    for var in JOIN_TOKEN_ENV {
        if let Some(value) = std::env::var_os(var) {
            let value = value
                .into_string()
                .map_err(|_| anyhow::anyhow!("{var} is not UTF-8"))?;
            // Empty counts as unset: compose passes the variable through on every start,
            // though the token is needed (and valid) on the first only.
            if let Some(token) = JoinToken::new(value) {
                return Ok(Some(token));
            }
        }
    }
    Ok(None)
}

async fn run_agent(args: RunArgs) -> Result<()> {
    let signalled = process::on_signal();
    process::init_logging(&args.log_format);
    let token = join_token(&args)?;
    let cfg = AgentConfig {
        ca_urls: args.ca.clone(),
        ca_timeout: args.ca_timeout,
        bundle_file: args.bundle.clone(),
        bundle_sha256: args.bundle_sha256.clone(),
        join_token: token,
        data_dir: args.data_dir.clone(),
    };
    tracing::info!(
        ca = %args.ca.join(","),
        ca_timeout = ?args.ca_timeout,
        data_dir = %args.data_dir.display(),
        socket = %args.socket.display(),
        admin = %args.admin_listen,
        first_contact = if args.bundle.is_some() { "bundle file" } else if args.bundle_sha256.is_some() { "pinned sha256" } else { "stored" },
        join_token = if cfg.join_token.is_some() { "<redacted>" } else { "none" },
        "kith agent starting"
    );
    let metrics = Arc::new(AgentMetrics::new());
    let (agent, snapshots) = Agent::bootstrap(cfg, metrics).await?;
    let socket = workload_api::bind(&args.socket).with_context(|| {
        format!(
            "cannot bind the Workload API socket {}",
            args.socket.display()
        )
    })?;
    let admin = tokio::net::TcpListener::bind(args.admin_listen)
        .await
        .with_context(|| format!("cannot listen on {} (admin)", args.admin_listen))?;
    tracing::info!(id = %agent.node_id(), socket = %args.socket.display(), "serving the Workload API");

    // Without the engine the agent still serves host processes; callers in containers are
    // refused until it answers (see agent::docker for why). Warned once, here.
    let docker = DockerPlugin::new(&args.docker_socket);
    match docker.api_version().await {
        Ok(api) => {
            tracing::info!(socket = %args.docker_socket.display(), api, "docker attestation enabled")
        }
        Err(e) => {
            tracing::warn!(error = %e, "callers in docker containers will be refused until the engine answers")
        }
    }

    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    let api_metrics = Arc::new(WorkloadApiMetrics::new());
    let limits = Limits {
        max_connections: args.max_connections as usize,
        max_connections_per_uid: args.max_connections_per_uid as usize,
        max_streams_per_uid: args.max_streams_per_uid as usize,
        first_request_timeout: Duration::from_secs(args.first_request_timeout),
        ..Limits::default()
    };
    tasks.spawn(agent.clone().run(shutdown.clone()));
    tasks.spawn(agent::admin::serve(
        agent.clone(),
        api_metrics.clone(),
        admin,
        shutdown.clone(),
    ));
    let api = workload_api::serve(
        socket,
        snapshots,
        agent.clone(),
        Arc::new(
            Attestor::new()
                .with_plugin(docker)
                .with_metrics(api_metrics.clone()),
        ),
        limits,
        api_metrics,
        shutdown.clone(),
    );
    let api = tasks.spawn(api);
    tasks.close();
    tokio::select! {
        _ = signalled.cancelled() => tracing::info!("shutting down"),
        r = api => {
            if let Ok(Err(e)) = r {
                tracing::error!(error = %e, "the Workload API stopped");
            }
        }
    }
    shutdown.cancel();
    if tokio::time::timeout(Duration::from_secs(10), tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("some tasks did not stop within 10s");
    }
    let _ = std::fs::remove_file(&args.socket);
    Ok(())
}
