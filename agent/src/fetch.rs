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

mod hook;
mod layout;

use std::path::PathBuf;
use std::time::Duration;

use identity::workload_client::{self, WorkloadClientError};
use tokio_util::sync::CancellationToken;

use self::hook::run_hook;
pub use self::hook::{Hook, PidSource, SignalTarget};
pub use self::layout::{CREDENTIAL_BUNDLE, TRUST_BUNDLE_SUFFIX, Written, WrittenBundle};
use self::layout::{ensure_dir, render, write_layout};
use crate::node::NodeError;

/// Where `kith agent run` listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/kith/agent.sock";

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Reaching the agent, or what it sent.
    #[error(transparent)]
    Client(#[from] WorkloadClientError),
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
    let context = workload_client::fetch_once(&opts.endpoint).await?;
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
    workload_client::check_endpoint(&opts.fetch.endpoint)?;
    ensure_dir(&opts.fetch.write_dir)?;
    let keeping = format!(
        "keeping the last written files in {}",
        opts.fetch.write_dir.display()
    );
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    let follower = workload_client::follow(
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
    Ok(result?)
}
