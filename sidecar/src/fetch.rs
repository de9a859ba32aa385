//! `kith agent fetch`: a Workload API client that writes the SPIFFE Filesystem Delivery layout
//! (spiffe/spiffe `standards/SPIFFE_Filesystem_Delivery.md`) for programs that only read files
//! (nginx, PostgreSQL, anything configured with a certificate and key path):
//!
//! - `credential-bundle.private-key.pem` (0600): one PKCS#8 PRIVATE KEY block, then the chain,
//!   leaf first, without the root. Key and chain share one file so that a reader can never see
//!   the key of one SVID with the certificate of another.
//! - `<trust-domain>.spiffe-trust-bundle.pem` (0644): the roots of each trust domain.
//!
//! Every file is replaced atomically (temp file, fsync, rename). `--watch` keeps the Workload
//! API stream open, rewrites on every change, then runs a hook so the program reloads.
//!
//! The client is the reference Rust one (the `spiffe` crate): it is what other workloads use
//! against this agent, so this command also proves the agent speaks the standard.

mod cli;
mod hook;
mod layout;

use std::path::PathBuf;
use std::time::Duration;

use futures_util::StreamExt;
use spiffe::transport::{Endpoint, GrpcStatusCode, TransportError};
use spiffe::{WorkloadApiClient, WorkloadApiError, X509Context};
use tokio_util::sync::CancellationToken;

pub use self::cli::{FetchArgs, main};
use self::hook::run_hook;
pub use self::hook::{Hook, PidSource, SignalTarget};
pub(crate) use self::layout::pick;
pub use self::layout::{CREDENTIAL_BUNDLE, TRUST_BUNDLE_SUFFIX, Written, WrittenBundle};
use self::layout::{ensure_dir, render, write_layout};
use crate::node::NodeError;

/// Where `kith agent run` listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/kith/agent.sock";

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(
        "invalid workload api endpoint {endpoint:?}: {detail} (expected unix:///path/to/socket)"
    )]
    Endpoint { endpoint: String, detail: String },
    #[error(
        "cannot reach the agent at {endpoint} ({detail}); is `kith agent run` running there? pass --socket or set SPIFFE_ENDPOINT_SOCKET"
    )]
    Unreachable { endpoint: String, detail: String },
    #[error(
        "no registration entry matches this process (uid {uid}); create one, e.g. `kith ca entry create --selector unix:uid:{uid} ...`"
    )]
    NoEntry { uid: u32 },
    #[error("this process was not issued {wanted}; it has: {have}")]
    IdNotIssued { wanted: String, have: String },
    #[error("workload api call to {endpoint} failed: {detail}")]
    Api { endpoint: String, detail: String },
    #[error("the agent sent an unusable svid or bundle: {0}")]
    BadResponse(String),
    #[error("the workload api stream ended")]
    StreamEnded,
    #[error("cannot create {path}: {error}")]
    CreateDir {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(transparent)]
    Write(#[from] NodeError),
    #[error("invalid --signal {0:?}: expected <pid>:<SIG> or <pidfile>:<SIG>, e.g. 1234:HUP")]
    SignalSpec(String),
}

/// What to fetch and where to write it.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// `unix:///path` (or `tcp://ip:port`), as in SPIFFE_ENDPOINT_SOCKET.
    pub endpoint: String,
    pub write_dir: PathBuf,
    /// Which SVID, when the caller has several; the first one otherwise.
    pub id: Option<String>,
}

/// The watcher: what to fetch, what to run after each rewrite, and how fast to reconnect.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    pub fetch: FetchOptions,
    pub hook: Hook,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
}

impl WatchOptions {
    pub fn new(fetch: FetchOptions, hook: Hook) -> Self {
        Self {
            fetch,
            hook,
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
        }
    }
}

/// Fetches the caller's X509-SVID and bundles once and writes the layout.
pub async fn fetch_once(opts: &FetchOptions) -> Result<Written, FetchError> {
    check_endpoint(&opts.endpoint)?;
    let client = connect(&opts.endpoint).await?;
    let context = client
        .fetch_x509_context()
        .await
        .map_err(|e| api_error(&opts.endpoint, e))?;
    let layout = render(&context, opts.id.as_deref())?;
    write_layout(&opts.write_dir, &layout)
}

/// Keeps the layout current until `shutdown`: rewrites it on every new SVID or bundle and runs
/// the hook, reconnects with backoff when the agent goes away (the last good files stay), and
/// calls `on_write` after every write that changed something.
///
/// Returns early only for what retrying cannot fix: an invalid endpoint or a directory that
/// cannot be created.
pub async fn watch(
    opts: &WatchOptions,
    shutdown: CancellationToken,
    mut on_write: impl FnMut(&Written),
) -> Result<(), FetchError> {
    check_endpoint(&opts.fetch.endpoint)?;
    ensure_dir(&opts.fetch.write_dir)?;
    let keeping = format!(
        "keeping the last written files in {}",
        opts.fetch.write_dir.display()
    );
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    let follower = follow(
        &opts.fetch.endpoint,
        (opts.min_backoff, opts.max_backoff),
        &shutdown,
        &keeping,
        tx,
    );
    let writer = async {
        while let Some(context) = rx.recv().await {
            // A message we cannot use (the chosen ID missing, a broken chain) leaves the old
            // files in place; the next message may be fine.
            let layout = match render(&context, opts.fetch.id.as_deref()) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(error = %e, "not writing this update; the previous files stay");
                    continue;
                }
            };
            match write_layout(&opts.fetch.write_dir, &layout) {
                Ok(written) if written.changed => {
                    tracing::info!(
                        id = %written.spiffe_id,
                        not_after = %written.not_after,
                        dir = %written.dir.display(),
                        "credentials written"
                    );
                    on_write(&written);
                    run_hook(&opts.hook, &opts.fetch.write_dir).await;
                }
                Ok(_) => tracing::debug!("update leaves the files unchanged"),
                // Atomic writes: a failed one leaves the previous file whole.
                Err(e) => tracing::error!(error = %e, "cannot write the update"),
            }
        }
    };
    let (result, ()) = tokio::join!(follower, writer);
    result
}

/// Follows the agent's X509-SVID stream until `shutdown` (or until `tx`'s receiver is gone),
/// sending every message to `tx`, and reconnects with exponential backoff (`backoff`: first and
/// longest wait) whenever the stream fails; `keeping` says in the log what stays in use
/// meanwhile.
pub(crate) async fn follow(
    endpoint: &str,
    backoff: (Duration, Duration),
    shutdown: &CancellationToken,
    keeping: &str,
    tx: tokio::sync::mpsc::Sender<X509Context>,
) -> Result<(), FetchError> {
    check_endpoint(endpoint)?;
    let (min_backoff, max_backoff) = backoff;
    let mut wait = min_backoff;
    loop {
        let mut delivered = false;
        let ended = tokio::select! {
            e = session(endpoint, &mut delivered, &tx) => e,
            () = shutdown.cancelled() => return Ok(()),
        };
        if tx.is_closed() {
            return Ok(());
        }
        if delivered {
            // The agent was healthy a moment ago: come back quickly.
            wait = min_backoff;
        }
        tracing::warn!(error = %ended, retry_in = ?wait, "workload api stream lost; {keeping}");
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = shutdown.cancelled() => return Ok(()),
        }
        wait = (wait * 2).min(max_backoff);
    }
}

/// One connection: follows the stream until it fails; always returns the reason it stopped.
async fn session(
    endpoint: &str,
    delivered: &mut bool,
    tx: &tokio::sync::mpsc::Sender<X509Context>,
) -> FetchError {
    let client = match connect(endpoint).await {
        Ok(c) => c,
        Err(e) => return e,
    };
    let mut stream = match client.stream_x509_contexts().await {
        Ok(s) => s,
        Err(e) => return api_error(endpoint, e),
    };
    while let Some(item) = stream.next().await {
        match item {
            Ok(context) => {
                *delivered = true;
                if tx.send(context).await.is_err() {
                    return FetchError::StreamEnded;
                }
            }
            Err(e) => return api_error(endpoint, e),
        }
    }
    FetchError::StreamEnded
}

fn check_endpoint(endpoint: &str) -> Result<(), FetchError> {
    Endpoint::parse(endpoint)
        .map(|_| ())
        .map_err(|e| FetchError::Endpoint {
            endpoint: endpoint.to_owned(),
            detail: e.to_string(),
        })
}

async fn connect(endpoint: &str) -> Result<WorkloadApiClient, FetchError> {
    WorkloadApiClient::connect_to(endpoint)
        .await
        .map_err(|e| api_error(endpoint, e))
}

/// Turns the client's errors into what the user should do about them.
fn api_error(endpoint: &str, e: WorkloadApiError) -> FetchError {
    let uid = nix::unistd::getuid().as_raw();
    match e {
        WorkloadApiError::NoIdentityIssued => FetchError::NoEntry { uid },
        WorkloadApiError::PermissionDenied(msg) if msg.contains("no identity") => {
            FetchError::NoEntry { uid }
        }
        WorkloadApiError::Endpoint(e) => FetchError::Endpoint {
            endpoint: endpoint.to_owned(),
            detail: e.to_string(),
        },
        WorkloadApiError::Transport(TransportError::Status(s))
            if s.code() == GrpcStatusCode::Unavailable =>
        {
            FetchError::Unreachable {
                endpoint: endpoint.to_owned(),
                detail: s.message().to_owned(),
            }
        }
        WorkloadApiError::Transport(t @ TransportError::Connect(_)) => FetchError::Unreachable {
            endpoint: endpoint.to_owned(),
            detail: chain(&t),
        },
        other => FetchError::Api {
            endpoint: endpoint.to_owned(),
            detail: chain(&other),
        },
    }
}

/// An error and its sources, so "transport error" comes with the "No such file" under it.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}
