//! The `kith` binary: the only place that reads argv and the environment. `cmd/<verb>.rs`
//! turns flags into each library's validated configuration; `process.rs` is the shell every
//! long-running command shares (logging, signals).

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cmd;
mod process;

#[derive(Parser)]
#[command(
    name = "kith",
    version,
    about = "Attested SPIFFE identities and mutual TLS for workloads"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The CA: issues short-lived SVIDs to attested nodes and workloads
    Ca(cmd::ca::CaArgs),
    /// The per-host agent: attests the node, keeps SVIDs fresh, serves the SPIFFE Workload API
    Agent(cmd::agent::AgentArgs),
    /// The mTLS sidecar proxy: explicit tunnels, or transparent capture in a pod
    Sidecar(cmd::sidecar::SidecarArgs),
    /// Kubernetes injection: add kith to pod templates offline (-f) or as an admission webhook (serve)
    Inject(cmd::inject::InjectArgs),
    /// Developer certificates: a local CA that issues SPIFFE X509-SVIDs (mkcert for SPIFFE)
    Certs(certs_dev::CertsArgs),
    /// A live end-to-end demo on loopback: CA, agent, two workloads behind mTLS sidecars
    Demo(cmd::demo::DemoArgs),
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Ca(args) => cmd::ca::run(args),
        Command::Agent(args) => cmd::agent::run(args),
        Command::Sidecar(args) => cmd::sidecar::run(args),
        Command::Inject(args) => cmd::inject::run(args),
        Command::Certs(args) => certs_dev::run(args),
        Command::Demo(args) => demo::run(args.into()),
    }
}
