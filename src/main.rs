//! The `kith` binary: argument dispatch only. Each command lives in its crate.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    Ca(ca::cli::CaArgs),
    /// The per-host agent: attests the node, keeps SVIDs fresh, serves the SPIFFE Workload API
    Agent(sidecar::cli::AgentArgs),
    /// The mTLS sidecar proxy: explicit tunnels, or transparent capture in a pod
    Sidecar(sidecar::tunnel_cli::SidecarArgs),
    /// Kubernetes injection: add kith to pod templates offline (-f) or as an admission webhook (serve)
    Inject(inject::cli::InjectArgs),
    /// Developer certificates: a local CA that issues SPIFFE X509-SVIDs (mkcert for SPIFFE)
    Certs(certs_dev::CertsArgs),
    /// A live end-to-end demo on loopback: CA, agent, two workloads behind mTLS sidecars
    Demo(demo::DemoArgs),
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Ca(args) => ca::cli::run(args),
        Command::Agent(args) => sidecar::cli::run(args),
        Command::Sidecar(args) => sidecar::tunnel_cli::run(args),
        Command::Inject(args) => inject::cli::run(args),
        Command::Certs(args) => certs_dev::run(args),
        Command::Demo(args) => demo::run(args),
    }
}
