//! Where `kith sidecar` gets its identity, and how it keeps it fresh. Each source publishes
//! into the proxy's [`IdentityHandle`]; a new SVID or bundle applies to the next handshake and
//! established connections are untouched. When a source fails, the current identity stays in
//! use and the source retries with backoff.
//!
//! - [`Source::Files`]: `--cert/--key/--bundle`, reloaded when they change;
//! - [`Source::Ca`]: `--k8s-token-file` + `--ca` + `--bundle`: the pod's projected
//!   service-account token, read again for every request, exchanged at the CA's
//!   `POST /v1/attest/k8s` for the pod's SVID, renewed at the CA's `renew_after`;
//! - [`Source::WorkloadApi`]: SVIDs streamed from a `kith agent` (or any SPIFFE Workload API).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use identity::report::Chain;
use identity::{BundleError, SpiffeId, Svid, SvidError, TrustBundle};
use proxy::tls::{IdentityHandle, TlsError};
use tokio_util::sync::CancellationToken;

use ca_api::LinkError;
use ca_api::certify::{Backoff, Expect, certify};
use ca_api::link as ca_link;
use ca_api::replicas::CaSet;

/// Why the identity source cannot be used (at start) or could not renew (logged, retried).
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} / {} are not an X509-SVID and its key", cert.display(), key.display())]
    NotSvid {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: SvidError,
    },
    #[error("{} is not a trust bundle for {trust_domain}", path.display())]
    NotBundleFor {
        path: PathBuf,
        trust_domain: String,
        #[source]
        source: BundleError,
    },
    #[error("{} is not a trust bundle (--bundle: PEM roots or the SPIFFE format)", path.display())]
    NotBundle {
        path: PathBuf,
        #[source]
        source: BundleError,
    },
    #[error("the SVID does not verify against the bundle")]
    FilesDoNotVerify(#[source] TlsError),
    /// A new SVID or bundle that the proxy refused (it does not verify, or names another ID).
    #[error(transparent)]
    Publish(#[from] TlsError),
    #[error("--ca")]
    CaUrls(#[source] LinkError),
    /// Talking to the CA failed (unreachable, refused, a bad answer).
    #[error(transparent)]
    Ca(#[from] LinkError),
    #[error("cannot read the service-account token {} (--k8s-token-file)", path.display())]
    TokenRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the service-account token {} is empty (--k8s-token-file)", path.display())]
    TokenEmpty { path: PathBuf },
    #[error(
        "--bundle-sha256 {0:?} is not a SHA-256 (64 hex digits, the bundle_sha256 \
         that `kith ca token create --json` prints)"
    )]
    Pin(String),
    #[error("--workload-api: {0}")]
    WorkloadApi(identity::workload_client::WorkloadClientError),
    /// The agent's update holds no usable SVID (none, or not the one asked for).
    #[error(transparent)]
    Pick(identity::workload_client::WorkloadClientError),
}

type Result<T, E = SourceError> = std::result::Result<T, E>;

/// First and longest wait between failed attempts.
/// Reconnecting to the local agent's Workload API stream: 1 s doubling to 30 s.
const WORKLOAD_API_BACKOFF: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(30));

#[derive(Debug, Clone)]
pub enum Source {
    Files {
        cert: PathBuf,
        key: PathBuf,
        bundle: PathBuf,
    },
    Ca {
        /// `https://host:port`, one per CA replica (a name may resolve to several).
        urls: Vec<String>,
        token_file: PathBuf,
        /// What authenticates the CA at first contact.
        bundle: FirstContact,
    },
    /// `unix:///path` (or `tcp://ip:port`), as in SPIFFE_ENDPOINT_SOCKET.
    WorkloadApi {
        endpoint: String,
        id: Option<String>,
    },
}

/// How the sidecar authenticates the CA before it holds a bundle the CA sent it.
#[derive(Debug, Clone)]
pub enum FirstContact {
    /// A trust bundle file (`--bundle`).
    File(PathBuf),
    /// The SHA-256 of the CA's PEM bundle (`--bundle-sha256`, as `kith agent` takes it): the
    /// bundle is fetched from the CA and accepted only if it hashes to this pin.
    Pin(String),
}

impl Source {
    pub fn describe(&self) -> String {
        match self {
            Source::Files { cert, .. } => format!("files ({})", cert.display()),
            Source::Ca { urls, .. } => {
                format!("the CA at {} (service-account token)", urls.join(","))
            }
            Source::WorkloadApi { endpoint, .. } => format!("the Workload API at {endpoint}"),
        }
    }
}

/// Counters of the identity source, for `/metrics`.
#[derive(Debug, Default)]
pub struct SourceMetrics {
    updates: AtomicU64,
    failures: AtomicU64,
}

impl SourceMetrics {
    /// Identities published (the first one included).
    pub fn updates(&self) -> u64 {
        self.updates.load(Ordering::Relaxed)
    }

    /// Failed attempts to obtain or renew the identity.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    fn updated(&self) {
        self.updates.fetch_add(1, Ordering::Relaxed);
    }

    fn failed(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
    }
}

/// Checks what can be checked before the listeners start, so that a wrong flag fails at once
/// with its name rather than as a retry loop. Files are loaded and published here: with them
/// there is nothing to wait for.
pub fn prepare(source: &Source, identity: &IdentityHandle, metrics: &SourceMetrics) -> Result<()> {
    match source {
        Source::Files { cert, key, bundle } => {
            let files = Files::new(cert, key, bundle);
            let (svid, bundle) = files.load()?;
            identity
                .publish(svid, bundle, SystemTime::now())
                .map_err(SourceError::FilesDoNotVerify)?;
            metrics.updated();
        }
        Source::Ca {
            urls,
            token_file,
            bundle,
        } => {
            CaSet::new(urls).map_err(SourceError::CaUrls)?;
            read_token(token_file)?;
            match bundle {
                FirstContact::File(path) => drop(read_bundle(path)?),
                FirstContact::Pin(pin) => check_pin(pin)?,
            }
        }
        Source::WorkloadApi { endpoint, .. } => {
            identity::workload_client::check_endpoint(endpoint)
                .map_err(SourceError::WorkloadApi)?;
        }
    }
    Ok(())
}

/// Keeps the identity fresh until `shutdown`.
pub async fn run(
    source: Source,
    identity: IdentityHandle,
    metrics: Arc<SourceMetrics>,
    shutdown: CancellationToken,
) {
    match source {
        Source::Files { cert, key, bundle } => {
            watch_files(
                Files::new(&cert, &key, &bundle),
                identity,
                metrics,
                shutdown,
            )
            .await
        }
        Source::Ca {
            urls,
            token_file,
            bundle,
        } => match CaSet::new(&urls) {
            Ok(cas) => from_ca(cas, token_file, bundle, identity, metrics, shutdown).await,
            Err(e) => tracing::error!(error = %e, "--ca: no usable CA address"),
        },
        Source::WorkloadApi { endpoint, id } => {
            from_workload_api(endpoint, id, identity, metrics, shutdown).await
        }
    }
}

/// The identity files.
struct Files {
    cert: PathBuf,
    key: PathBuf,
    bundle: PathBuf,
}

impl Files {
    fn new(cert: &Path, key: &Path, bundle: &Path) -> Self {
        Self {
            cert: cert.to_owned(),
            key: key.to_owned(),
            bundle: bundle.to_owned(),
        }
    }

    fn load(&self) -> Result<(Svid, TrustBundle)> {
        let key = zeroize::Zeroizing::new(read(&self.key)?);
        let svid =
            Svid::from_pem(&read(&self.cert)?, &key).map_err(|source| SourceError::NotSvid {
                cert: self.cert.clone(),
                key: self.key.clone(),
                source,
            })?;
        let td = svid.id().trust_domain();
        let bundle =
            TrustBundle::parse(Some(td.clone()), &read(&self.bundle)?).map_err(|source| {
                SourceError::NotBundleFor {
                    path: self.bundle.clone(),
                    trust_domain: td.to_string(),
                    source,
                }
            })?;
        Ok((svid, bundle))
    }

    /// A cheap fingerprint of the three files: their sizes and modification times.
    fn stamp(&self) -> Vec<Option<(u64, SystemTime)>> {
        [&self.cert, &self.key, &self.bundle]
            .iter()
            .map(|p| {
                std::fs::metadata(p)
                    .ok()
                    .and_then(|m| Some((m.len(), m.modified().ok()?)))
            })
            .collect()
    }
}

fn read(p: &Path) -> Result<Vec<u8>> {
    std::fs::read(p).map_err(|source| SourceError::Read {
        path: p.to_owned(),
        source,
    })
}

/// Reloads the files when one changes. An unusable new set is refused and the current
/// identity stays (logged).
async fn watch_files(
    files: Files,
    identity: IdentityHandle,
    metrics: Arc<SourceMetrics>,
    shutdown: CancellationToken,
) {
    let mut last = files.stamp();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let stamp = files.stamp();
        if stamp == last {
            continue;
        }
        last = stamp;
        match files
            .load()
            .and_then(|(svid, bundle)| publish(&identity, svid, bundle, &metrics))
        {
            Ok(id) => tracing::info!(%id, "reloaded the identity files; new handshakes use them"),
            Err(e) => {
                metrics.failed();
                tracing::warn!(
                    error = %Chain(&e),
                    "identity files changed but are not usable; keeping the current identity"
                )
            }
        }
    }
}

fn publish(
    identity: &IdentityHandle,
    svid: Svid,
    bundle: TrustBundle,
    metrics: &SourceMetrics,
) -> Result<SpiffeId> {
    let id = svid.id().clone();
    identity.publish(svid, bundle, SystemTime::now())?;
    metrics.updated();
    Ok(id)
}

fn read_token(path: &Path) -> Result<String> {
    let raw = std::fs::read_to_string(path).map_err(|source| SourceError::TokenRead {
        path: path.to_owned(),
        source,
    })?;
    let token = raw.trim();
    if token.is_empty() {
        return Err(SourceError::TokenEmpty {
            path: path.to_owned(),
        });
    }
    Ok(token.to_owned())
}

/// A SHA-256 pin: 64 hex digits.
pub fn check_pin(pin: &str) -> Result<()> {
    if pin.len() != 64 || !pin.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(SourceError::Pin(pin.to_owned()));
    }
    Ok(())
}

fn read_bundle(path: &Path) -> Result<TrustBundle> {
    TrustBundle::parse(None, &read(path)?).map_err(|source| SourceError::NotBundle {
        path: path.to_owned(),
        source,
    })
}

/// The Kubernetes case: exchange the projected token for the pod's SVID, then again at each
/// `renew_after`. The token file is read for every request, because the kubelet rotates it.
async fn from_ca(
    cas: CaSet,
    token_file: PathBuf,
    bundle_file: FirstContact,
    identity: IdentityHandle,
    metrics: Arc<SourceMetrics>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::default();
    loop {
        let next = match attest_k8s(&cas, &token_file, &bundle_file, &identity).await {
            Ok((id, renew_at)) => {
                metrics.updated();
                backoff.succeeded();
                let in_ = renew_at
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                tracing::info!(%id, renew_in = ?in_, "pod SVID from the CA");
                in_
            }
            Err(e) => {
                metrics.failed();
                let current = identity.current();
                let retry = backoff.after_failure(
                    current.as_deref().map(|c| c.svid().not_after()),
                    SystemTime::now(),
                );
                let keeping = if current.is_some() {
                    "keeping the current SVID"
                } else {
                    "no SVID yet: outbound connections are held, inbound refused"
                };
                tracing::warn!(error = %Chain(&e), retry_in = ?retry, "cannot get the pod SVID from the CA; {keeping}");
                retry
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(next) => {}
        }
    }
}

/// One exchange: returns the published ID and when to renew.
async fn attest_k8s(
    cas: &CaSet,
    token_file: &Path,
    bundle_file: &FirstContact,
    identity: &IdentityHandle,
) -> Result<(SpiffeId, SystemTime)> {
    let token = read_token(token_file)?;
    // The CA is authenticated by the bundle we hold: the last one the CA sent (so the sidecar
    // follows the CA's bundle as it changes), else the file, else the pinned first contact.
    let bundle = match (identity.current(), bundle_file) {
        (Some(c), _) => c.bundle().clone(),
        (None, FirstContact::File(path)) => read_bundle(path)?,
        (None, FirstContact::Pin(pin)) => ca_link::first_contact(cas, pin).await?,
    };
    let td = bundle.trust_domain().clone();
    let bundle = Arc::new(bundle);
    let issued = certify(Expect::MemberOf(&td), |csr| async move {
        ca_link::attest_k8s(cas, bundle, &token, &csr).await
    })
    .await?;
    let id = issued.svid.id().clone();
    identity.publish(issued.svid, issued.bundle, SystemTime::now())?;
    Ok((id, issued.renew_at))
}

/// The Docker-host case: every SVID or bundle the agent streams is published at once.
async fn from_workload_api(
    endpoint: String,
    id: Option<String>,
    identity: IdentityHandle,
    metrics: Arc<SourceMetrics>,
    shutdown: CancellationToken,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    let follower = identity::workload_client::follow(
        &endpoint,
        WORKLOAD_API_BACKOFF,
        &shutdown,
        "keeping the current SVID",
        tx,
    );
    let publisher = async {
        while let Some(context) = rx.recv().await {
            let picked = identity::workload_client::pick(&context, id.as_deref())
                .map_err(SourceError::Pick)
                .and_then(|p| publish(&identity, p.svid, p.own, &metrics));
            match picked {
                Ok(id) => tracing::info!(%id, "SVID from the Workload API; new handshakes use it"),
                Err(e) => {
                    metrics.failed();
                    tracing::warn!(
                        error = %Chain(&e),
                        "unusable Workload API update; keeping the current SVID"
                    )
                }
            }
        }
    };
    let (result, ()) = tokio::join!(follower, publisher);
    if let Err(e) = result {
        tracing::error!(error = %e, "the Workload API source stopped");
    }
}
