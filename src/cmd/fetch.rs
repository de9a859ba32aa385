//! The `kith agent fetch` flags and output.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use agent::fetch::{
    DEFAULT_SOCKET, FetchOptions, Hook, SignalTarget, WatchOptions, Written, fetch_once, watch,
};

/// `kith agent fetch`.
#[derive(Debug, Args)]
pub struct FetchArgs {
    /// The agent's socket [default: $SPIFFE_ENDPOINT_SOCKET, else /run/kith/agent.sock]
    #[arg(long, conflicts_with = "endpoint")]
    socket: Option<PathBuf>,
    /// The Workload API endpoint, e.g. unix:///run/kith/agent.sock
    #[arg(long)]
    endpoint: Option<String>,
    /// The credential folder (created 0755 if missing)
    #[arg(long)]
    write_dir: PathBuf,
    /// Which SPIFFE ID, when this process has several (default: the first)
    #[arg(long)]
    id: Option<String>,
    /// Keep running: rewrite on every new SVID or bundle
    #[arg(long)]
    watch: bool,
    /// After each rewrite, run this with `sh -c` (SPIFFE_CREDENTIAL_FOLDER is set)
    #[arg(long, requires = "watch", conflicts_with = "signal")]
    on_rotate: Option<String>,
    /// After each rewrite, send a signal: <pid>:<SIG> or <pidfile>:<SIG>, e.g. 1234:HUP
    #[arg(long, requires = "watch")]
    signal: Option<SignalTarget>,
    /// Print what was written as JSON (one line per write)
    #[arg(long)]
    json: bool,
}

impl FetchArgs {
    /// Flags first, then SPIFFE_ENDPOINT_SOCKET, then the agent's default socket.
    fn endpoint(&self) -> String {
        if let Some(socket) = &self.socket {
            let socket = std::path::absolute(socket).unwrap_or_else(|_| socket.clone());
            return format!("unix://{}", socket.display());
        }
        if let Some(endpoint) = &self.endpoint {
            return endpoint.clone();
        }
        match std::env::var("SPIFFE_ENDPOINT_SOCKET") {
            Ok(v) if !v.is_empty() => v,
            _ => format!("unix://{DEFAULT_SOCKET}"),
        }
    }
}

pub async fn main(args: FetchArgs) -> ExitCode {
    let fetch = FetchOptions {
        endpoint: args.endpoint(),
        write_dir: args.write_dir.clone(),
        id: args.id.clone(),
    };
    let result = if args.watch {
        crate::process::init_logging("text");
        let hook = match (&args.on_rotate, &args.signal) {
            (Some(command), _) => Hook::Command(command.clone()),
            (None, Some(target)) => Hook::Signal(target.clone()),
            (None, None) => Hook::None,
        };
        let shutdown = crate::process::on_signal();
        let opts = WatchOptions::new(fetch, hook);
        watch(&opts, shutdown, |w| print_written(w, args.json)).await
    } else {
        fetch_once(&fetch)
            .await
            .map(|w| print_written(&w, args.json))
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

fn print_written(w: &Written, json: bool) {
    if json {
        println!("{}", serde_json::to_string(w).unwrap_or_default());
        return;
    }
    let verb = |path: &PathBuf| {
        if w.rewritten.contains(path) {
            "wrote"
        } else {
            "unchanged"
        }
    };
    println!(
        "{} {} ({}, expires {})",
        verb(&w.credential_bundle),
        w.credential_bundle.display(),
        w.spiffe_id,
        w.not_after
    );
    for b in &w.trust_bundles {
        println!("{} {}", verb(&b.path), b.path.display());
    }
    for path in &w.removed {
        println!("removed {}", path.display());
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: FetchArgs,
    }

    fn parse(args: &[&str]) -> Result<FetchArgs, clap::Error> {
        let argv = ["fetch", "--write-dir", "/tmp/creds"].iter().chain(args);
        Cli::try_parse_from(argv).map(|c| c.args)
    }

    #[test]
    fn endpoint_flags() {
        let a = parse(&["--socket", "/run/x.sock"]).unwrap();
        assert_eq!(a.endpoint(), "unix:///run/x.sock");
        let a = parse(&["--socket", "rel.sock"]).unwrap();
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(a.endpoint(), format!("unix://{}/rel.sock", cwd.display()));
        let a = parse(&["--endpoint", "unix:///a/b.sock"]).unwrap();
        assert_eq!(a.endpoint(), "unix:///a/b.sock");
        assert!(parse(&["--socket", "/a", "--endpoint", "unix:///b"]).is_err());
    }

    #[test]
    fn hooks_need_watch_and_only_one() {
        assert!(parse(&["--on-rotate", "true"]).is_err());
        assert!(parse(&["--signal", "1:HUP"]).is_err());
        assert!(parse(&["--watch", "--on-rotate", "true", "--signal", "1:HUP"]).is_err());
        assert!(parse(&["--watch", "--signal", "0:HUP"]).is_err());
        let a = parse(&["--watch", "--signal", "12:usr2", "--json"]).unwrap();
        assert_eq!(a.signal.unwrap().signal, nix::sys::signal::Signal::SIGUSR2);
    }
}
