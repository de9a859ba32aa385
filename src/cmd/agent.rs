//! `kith agent run`: the per-host identity agent. Flags, each also a `KITH_AGENT_*` variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, Subcommand};

use agent::agent::{AgentConfig, JoinToken};
use agent::workload_api::Limits;

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
    let config = agent::run::Config {
        agent: AgentConfig {
            ca_urls: args.ca.clone(),
            ca_timeout: args.ca_timeout,
            bundle_file: args.bundle.clone(),
            bundle_sha256: args.bundle_sha256.clone(),
            join_token: join_token(&args)?,
            data_dir: args.data_dir.clone(),
        },
        socket: args.socket.clone(),
        admin: args.admin_listen,
        docker_socket: args.docker_socket.clone(),
        limits: Limits {
            max_connections: args.max_connections as usize,
            max_connections_per_uid: args.max_connections_per_uid as usize,
            max_streams_per_uid: args.max_streams_per_uid as usize,
            first_request_timeout: Duration::from_secs(args.first_request_timeout),
            ..Limits::default()
        },
    };
    Ok(agent::run::run(config, signalled).await?)
}
