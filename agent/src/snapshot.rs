//! What the agent holds and the Workload API serves: the current workload SVIDs (one per
//! registration entry assigned to this node) and the trust bundle, published as one snapshot
//! on a `watch` channel. Every rotation or bundle change publishes a new snapshot; streams
//! push it to the callers it concerns.

use std::future::Future;
use std::sync::Arc;
use std::time::SystemTime;

use identity::{SpiffeId, TrustBundle};
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use tokio::sync::watch;
use zeroize::Zeroizing;

/// A workload X509-SVID the agent obtained for one registration entry.
#[derive(Debug)]
pub struct WorkloadSvid {
    pub entry_id: String,
    pub spiffe_id: SpiffeId,
    /// The entry's selectors (`type:value`): a caller gets this SVID only if it has all of them.
    pub selectors: Vec<String>,
    /// Leaf first, then intermediates (no root).
    pub chain: Vec<CertificateDer<'static>>,
    /// Wiped from memory when the SVID is dropped.
    pub key: Zeroizing<PrivatePkcs8KeyDer<'static>>,
    pub not_after: SystemTime,
}

impl WorkloadSvid {
    /// True when every selector of the entry is among the caller's.
    pub fn matches(&self, caller: &[String]) -> bool {
        self.selectors.iter().all(|s| caller.iter().any(|c| c == s))
    }
}

/// Everything the Workload API serves at one moment.
#[derive(Debug)]
pub struct Snapshot {
    /// Grows with every change, so a stream can tell whether anything moved.
    pub version: u64,
    pub svids: Vec<Arc<WorkloadSvid>>,
    pub bundle: Arc<TrustBundle>,
}

impl Snapshot {
    /// The SVIDs a caller with `selectors` is entitled to.
    pub fn for_caller(&self, selectors: &[String]) -> Vec<Arc<WorkloadSvid>> {
        self.svids
            .iter()
            .filter(|s| s.matches(selectors))
            .cloned()
            .collect()
    }
}

pub type SnapshotRx = watch::Receiver<Arc<Snapshot>>;
pub type SnapshotTx = watch::Sender<Arc<Snapshot>>;

/// Where JWT-SVIDs come from: the agent asks the CA (which holds the signing key).
pub trait JwtSource: Send + Sync + 'static {
    /// A JWT-SVID for `id` with `audience`, and when it expires.
    fn fetch_jwt(
        &self,
        id: &SpiffeId,
        audience: &[String],
    ) -> impl Future<Output = Result<(String, SystemTime), String>> + Send;
}
