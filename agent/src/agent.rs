//! The agent's work: prove the node (join token once, then renewals), keep the entries the CA
//! assigns to this node in sync, obtain and renew a workload SVID per entry, and publish each
//! change as a new `Snapshot` for the Workload API. A CA outage costs nothing but retries:
//! current SVIDs keep being served until they expire, failures back off from 1 s to 60 s, and
//! everything catches up when the CA returns. Workload SVIDs are also kept in the data dir
//! (`workload_store`), so an agent restarted during an outage serves them again while they are
//! valid; with several CA replicas (`ca_api::replicas`), each call goes to one that answers.
//!
//! Why this is one file of over 500 lines: the agent's one control loop and the state it owns (node
//! SVID, entries, a slot per workload SVID); the loop's ordering and retry rules would be spread
//! over files if it were split.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use ca_api::certify::{Backoff, Expect, Issued, certify, renew_point};
use ca_api::link::{self as ca_link, LinkError};
use ca_api::replicas::CaSet;
use ca_api::wire;
use hyper::Method;
use identity::{SpiffeId, Svid, TrustBundle, TrustDomain};
use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::metrics::AgentMetrics;
use crate::node::{self, NodeError, NodeMeta};
use crate::snapshot::{JwtSource, Snapshot, SnapshotRx, SnapshotTx, WorkloadSvid};
use crate::workload_store;

/// How often the agent asks for its entries (a conditional request, so unchanged lists cost a
/// 304): well inside the 30 s in which a change on the CA must reach the agent.
pub const ENTRIES_POLL: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error(
        "no node identity in {dir} and no join token: create one on the CA with `kith ca token create` and give it in KITH_JOIN_TOKEN or a file named by --join-token-file"
    )]
    NoIdentity { dir: PathBuf },
    #[error(
        "the node SVID in {dir} expired at {expired}; the agent cannot renew it. Create a new join token on the CA (`kith ca token create --name {name}`) and start the agent with it in KITH_JOIN_TOKEN or --join-token-file"
    )]
    Expired {
        dir: PathBuf,
        expired: String,
        name: String,
    },
    #[error("first contact needs the CA's bundle: pass --bundle <file> or --bundle-sha256 <hex>")]
    NoBundle,
    #[error("--bundle {path}: {detail}")]
    BadBundle { path: PathBuf, detail: String },
    #[error("the stored node identity is for {stored}, but --ca serves {served}")]
    WrongTrustDomain { stored: String, served: String },
    #[error("--join-token-file {}", path.display())]
    TokenFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--join-token-file {}: {len} bytes is not a join token", path.display())]
    TokenTooLong { path: PathBuf, len: u64 },
    #[error("--join-token-file {} is empty", path.display())]
    TokenEmpty { path: PathBuf },
}

#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// The CA replicas (`https://host:port`; a name may resolve to several).
    pub ca_urls: Vec<String>,
    /// How long one attempt at one CA replica may take before the next is tried.
    pub ca_timeout: Duration,
    pub bundle_file: Option<PathBuf>,
    pub bundle_sha256: Option<String>,
    pub join_token: Option<JoinToken>,
    pub data_dir: PathBuf,
}

/// A one-time join token: never printed, wiped from memory when dropped.
#[derive(Clone)]
pub struct JoinToken(zeroize::Zeroizing<String>);

impl JoinToken {
    /// The token, without surrounding whitespace; `None` when nothing is left.
    pub fn new(token: String) -> Option<Self> {
        let token = zeroize::Zeroizing::new(token);
        let trimmed = token.trim();
        (!trimmed.is_empty()).then(|| Self(zeroize::Zeroizing::new(trimmed.to_owned())))
    }

    /// Reads the token from a file (surrounding whitespace ignored).
    pub fn from_file(path: &std::path::Path) -> Result<Self, AgentError> {
        let unreadable = |source| AgentError::TokenFile {
            path: path.to_owned(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(unreadable)?;
        if meta.len() > 4096 {
            return Err(AgentError::TokenTooLong {
                path: path.to_owned(),
                len: meta.len(),
            });
        }
        let text = std::fs::read_to_string(path).map_err(unreadable)?;
        Self::new(text).ok_or_else(|| AgentError::TokenEmpty {
            path: path.to_owned(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JoinToken(<redacted>)")
    }
}

/// The node's current SVID and when to renew it.
struct Node {
    svid: Svid,
    renew_after: SystemTime,
}

pub struct Agent {
    cfg: AgentConfig,
    cas: CaSet,
    td: TrustDomain,
    bundle: ArcSwap<TrustBundle>,
    node: ArcSwap<Node>,
    snapshots: SnapshotTx,
    pub metrics: Arc<AgentMetrics>,
    ready: AtomicBool,
    /// Workload SVIDs read back from the data dir at start, handed to the first `run`.
    restored: std::sync::Mutex<Vec<Slot>>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
struct Entry {
    id: String,
    spiffe_id: String,
    selectors: Vec<String>,
}

#[derive(Deserialize)]
struct EntryList {
    entries: Vec<Entry>,
}

/// One workload SVID slot per entry.
struct Slot {
    entry: Entry,
    svid: Option<Arc<WorkloadSvid>>,
    renew_after: SystemTime,
    retry: Retry,
}

/// When a failed request may be tried again: the CA client's one backoff policy.
#[derive(Clone, Copy)]
struct Retry {
    next: tokio::time::Instant,
    backoff: Backoff,
}

impl Retry {
    fn new() -> Self {
        Self {
            next: tokio::time::Instant::now(),
            backoff: Backoff::default(),
        }
    }
    fn ready(&self) -> bool {
        tokio::time::Instant::now() >= self.next
    }
    /// `held_until`: the end of the SVID still in use, which bounds the wait.
    fn failed(&mut self, held_until: Option<SystemTime>) -> Duration {
        let wait = self.backoff.after_failure(held_until, SystemTime::now());
        self.next = tokio::time::Instant::now() + wait;
        wait
    }
    fn succeeded(&mut self) {
        *self = Self::new();
    }
}

impl Agent {
    /// Loads the node identity from the data dir, or attests with the join token on first
    /// start. Fails with what to do when neither works.
    pub async fn bootstrap(
        cfg: AgentConfig,
        metrics: Arc<AgentMetrics>,
    ) -> Result<(Arc<Self>, SnapshotRx), AgentError> {
        let cas = CaSet::new(&cfg.ca_urls)?.with_attempt_timeout(cfg.ca_timeout);
        let now = SystemTime::now();
        // The bundle fetched to judge a stored identity by, reused for attesting again.
        let mut given = None;
        let stored = if node::exists(&cfg.data_dir) {
            let stored = node::load(&cfg.data_dir)?;
            match &cfg.join_token {
                Some(_) => match rejoin_or_keep(&cfg, &cas, stored, &metrics, now).await? {
                    Ok(stored) => Some(stored),
                    Err(bundle) => {
                        given = Some(bundle);
                        None
                    }
                },
                None => Some(stored),
            }
        } else {
            None
        };
        let (svid, bundle, renew_after) = if let Some(stored) = stored {
            if node::expired(&stored, now) {
                return Err(AgentError::Expired {
                    dir: cfg.data_dir.clone(),
                    expired: rfc3339(stored.svid.not_after()),
                    name: stored
                        .svid
                        .id()
                        .segments()
                        .last()
                        .unwrap_or("host")
                        .to_owned(),
                });
            }
            (stored.svid, stored.bundle, at(stored.meta.renew_after))
        } else {
            let token = cfg
                .join_token
                .clone()
                .ok_or_else(|| AgentError::NoIdentity {
                    dir: cfg.data_dir.clone(),
                })?;
            let bundle = match given {
                Some(b) => b,
                None => initial_bundle(&cfg, &cas).await?,
            };
            let td = bundle.trust_domain().clone();
            let first = Arc::new(bundle);
            let issued = certify(Expect::MemberOf(&td), |csr| {
                let (cas, first) = (&cas, first.clone());
                async move { ca_link::attest_join(cas, first, token.as_str(), &csr).await }
            })
            .await?;
            let Issued {
                svid,
                bundle,
                renew_at,
                renew_hint,
            } = issued;
            if !svid.id().path().starts_with("/kith/node/") {
                return Err(LinkError::BadAnswer(format!(
                    "attestation answered {}, not a node ID",
                    svid.id()
                ))
                .into());
            }
            let meta = NodeMeta {
                trust_domain: bundle.trust_domain().to_string(),
                spiffe_id: svid.id().to_string(),
                renew_after: renew_hint,
            };
            node::save(&cfg.data_dir, &svid, &bundle, &meta)?;
            metrics.renewal("node_attest", "ok");
            tracing::info!(id = %svid.id(), "node attested with the join token");
            (svid, bundle, renew_at)
        };
        let td = bundle.trust_domain().clone();
        // The workload SVIDs of the last run, served at once (before any CA answers) while
        // they verify; the first entry list from the CA then drops any it no longer assigns.
        let restored: Vec<Slot> = workload_store::load_all(&cfg.data_dir, &bundle, now)
            .into_iter()
            .map(|r| {
                let renew_after = renew_point(r.renew_after, r.svid.not_after, now);
                Slot {
                    entry: Entry {
                        id: r.svid.entry_id.clone(),
                        spiffe_id: r.svid.spiffe_id.to_string(),
                        selectors: r.svid.selectors.clone(),
                    },
                    svid: Some(Arc::new(r.svid)),
                    renew_after,
                    retry: Retry::new(),
                }
            })
            .collect();
        if !restored.is_empty() {
            tracing::info!(
                count = restored.len(),
                "serving the workload SVIDs kept from the last run until they are renewed or expire"
            );
        }
        let bundle = Arc::new(bundle);
        let (tx, rx) = watch::channel(Arc::new(Snapshot {
            version: 0,
            svids: restored.iter().filter_map(|s| s.svid.clone()).collect(),
            bundle: bundle.clone(),
        }));
        let agent = Arc::new(Self {
            cas,
            td,
            bundle: ArcSwap::new(bundle),
            node: ArcSwap::from_pointee(Node { svid, renew_after }),
            snapshots: tx,
            metrics,
            ready: AtomicBool::new(false),
            restored: std::sync::Mutex::new(restored),
            cfg,
        });
        Ok((agent, rx))
    }

    pub fn node_id(&self) -> SpiffeId {
        self.node.load().svid.id().clone()
    }

    pub fn bundle(&self) -> Arc<TrustBundle> {
        self.bundle.load_full()
    }

    /// Ready once the first round with the CA (or without it, from disk) has been published.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed) && self.node.load().svid.not_after() > SystemTime::now()
    }

    /// The reconcile loop; returns when `shutdown` fires.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut node_retry = Retry::new();
        let mut entries_retry = Retry::new();
        let mut next_entries_poll = tokio::time::Instant::now();
        let mut etag: Option<String> = None;
        let mut slots: HashMap<String, Slot> =
            std::mem::take(&mut *self.restored.lock().unwrap_or_else(|e| e.into_inner()))
                .into_iter()
                .map(|s| (s.entry.id.clone(), s))
                .collect();
        let data_dir = self.cfg.data_dir.clone();
        let mut version = 0u64;
        let mut last_published: Option<Vec<(String, Option<SystemTime>)>> = None;
        let mut last_bundle_seq = None;
        let mut next_bundle_refresh = tokio::time::Instant::now() + self.bundle_refresh();
        loop {
            let now = SystemTime::now();
            // Node renewal.
            if now >= self.node.load().renew_after && node_retry.ready() {
                match self.renew_node().await {
                    Ok(()) => {
                        node_retry.succeeded();
                        self.metrics.renewal("node", "ok");
                    }
                    Err(e) => {
                        let wait = node_retry.failed(Some(self.node.load().svid.not_after()));
                        self.metrics.renewal("node", e.reason());
                        tracing::warn!(error = %e, retry_in = ?wait, "node SVID renewal failed; serving the current one");
                    }
                }
            }
            // Entries, with a conditional request.
            if tokio::time::Instant::now() >= next_entries_poll && entries_retry.ready() {
                match self.fetch_entries(etag.as_deref()).await {
                    Ok(Some((list, tag))) => {
                        entries_retry.succeeded();
                        etag = tag;
                        slots.retain(|id, _| {
                            let keep = list.iter().any(|e| &e.id == id);
                            if !keep {
                                workload_store::remove(&data_dir, id);
                            }
                            keep
                        });
                        for entry in list {
                            match slots.get_mut(&entry.id) {
                                Some(slot) if slot.entry == entry => {}
                                Some(slot) => {
                                    // Changed selectors or ID: the old SVID no longer fits.
                                    workload_store::remove(&data_dir, &slot.entry.id);
                                    slot.entry = entry;
                                    slot.svid = None;
                                    slot.retry = Retry::new();
                                }
                                None => {
                                    slots.insert(
                                        entry.id.clone(),
                                        Slot {
                                            entry,
                                            svid: None,
                                            renew_after: now,
                                            retry: Retry::new(),
                                        },
                                    );
                                }
                            }
                        }
                    }
                    Ok(None) => entries_retry.succeeded(),
                    Err(e) => {
                        let wait = entries_retry.failed(None);
                        tracing::warn!(error = %e, retry_in = ?wait, "fetching entries failed");
                    }
                }
                next_entries_poll = tokio::time::Instant::now() + ENTRIES_POLL;
            }
            // The bundle at its refresh hint, besides the copy every renewal brings: a new root
            // reaches workloads even when nothing renews for a while.
            if tokio::time::Instant::now() >= next_bundle_refresh {
                match self.fetch_bundle().await {
                    Ok(bundle) => self.set_bundle(bundle),
                    Err(e) => {
                        tracing::warn!(error = %e, "refreshing the trust bundle failed; keeping the current one")
                    }
                }
                next_bundle_refresh = tokio::time::Instant::now() + self.bundle_refresh();
            }
            // Workload SVIDs that are missing or due.
            for slot in slots.values_mut() {
                let due = slot.svid.is_none() || now >= slot.renew_after;
                if !due || !slot.retry.ready() {
                    continue;
                }
                match self.issue_workload(&slot.entry).await {
                    Ok((svid, renew_after)) => {
                        let hint = renew_after
                            .duration_since(UNIX_EPOCH)
                            .map_or(0, |d| d.as_secs() as i64);
                        if let Err(e) = workload_store::save(&data_dir, &svid, hint) {
                            tracing::warn!(entry = %slot.entry.id, error = %e,
                                "cannot keep the workload SVID on disk; it is served, but not after a restart without a CA");
                        }
                        slot.svid = Some(Arc::new(svid));
                        slot.renew_after = renew_after;
                        slot.retry.succeeded();
                        self.metrics.renewal("workload", "ok");
                    }
                    Err(e) => {
                        let wait = slot.retry.failed(slot.svid.as_ref().map(|s| s.not_after));
                        self.metrics.renewal("workload", e.reason());
                        tracing::warn!(entry = %slot.entry.id, id = %slot.entry.spiffe_id, error = %e, retry_in = ?wait,
                            "workload SVID renewal failed; serving the current one until it expires");
                    }
                }
            }
            // An expired SVID is never served.
            for slot in slots.values_mut() {
                if slot.svid.as_ref().is_some_and(|s| s.not_after <= now) {
                    slot.svid = None;
                    workload_store::remove(&data_dir, &slot.entry.id);
                }
            }
            // Ready from the end of the first round; set before publishing so that whoever sees
            // the first snapshot also sees the agent ready.
            self.ready.store(true, Ordering::Relaxed);
            // Publish when what workloads would receive changed.
            let shape: Vec<(String, Option<SystemTime>)> = {
                let mut v: Vec<_> = slots
                    .values()
                    .map(|s| (s.entry.id.clone(), s.svid.as_ref().map(|x| x.not_after)))
                    .collect();
                v.sort();
                v
            };
            let bundle = self.bundle.load_full();
            let bundle_seq = Some((
                bundle.sequence(),
                bundle.x509_authorities().len(),
                bundle.jwt_authorities().len(),
            ));
            if last_published.as_ref() != Some(&shape) || last_bundle_seq != bundle_seq {
                version += 1;
                let svids = slots.values().filter_map(|s| s.svid.clone()).collect();
                self.snapshots.send_replace(Arc::new(Snapshot {
                    version,
                    svids,
                    bundle,
                }));
                last_published = Some(shape);
                last_bundle_seq = bundle_seq;
            }
            self.metrics.observe(
                &self.node.load().svid,
                slots.values().filter_map(|s| s.svid.as_deref()),
                now,
            );

            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }

    async fn renew_node(&self) -> Result<(), LinkError> {
        let node = self.node.load_full();
        let held_roots = Some(self.held_roots());
        let issued = certify(Expect::Id(node.svid.id()), |csr| async {
            let body = ca_link::body(&wire::RenewRequest { csr, held_roots })?;
            let (status, _, bytes) = self
                .call(&node.svid, Method::POST, wire::path::RENEW, Some(body), &[])
                .await?;
            ca_link::answer(status, &bytes)
        })
        .await?;
        let Issued {
            svid,
            bundle,
            renew_at,
            renew_hint,
        } = issued;
        let meta = NodeMeta {
            trust_domain: self.td.to_string(),
            spiffe_id: svid.id().to_string(),
            renew_after: renew_hint,
        };
        node::save(&self.cfg.data_dir, &svid, &bundle, &meta)
            .map_err(|e| LinkError::BadAnswer(e.to_string()))?;
        self.set_bundle(bundle);
        self.node.store(Arc::new(Node {
            svid,
            renew_after: renew_at,
        }));
        tracing::info!(id = %self.node_id(), renew_after = renew_hint, "renewed the node SVID");
        Ok(())
    }

    /// `Ok(None)` when the list has not changed (304).
    async fn fetch_entries(
        &self,
        etag: Option<&str>,
    ) -> Result<Option<(Vec<Entry>, Option<String>)>, LinkError> {
        let node = self.node.load_full();
        let headers: Vec<(&str, &str)> =
            etag.map(|t| vec![("if-none-match", t)]).unwrap_or_default();
        let (status, headers, body) = self
            .call(&node.svid, Method::GET, wire::path::ENTRIES, None, &headers)
            .await?;
        match status {
            304 => Ok(None),
            200 => {
                let list: EntryList = serde_json::from_slice(&body)
                    .map_err(|e| LinkError::BadAnswer(e.to_string()))?;
                let tag = headers
                    .get("etag")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                Ok(Some((list.entries, tag)))
            }
            s => Err(ca_link::refused(s, &body)),
        }
    }

    async fn issue_workload(&self, entry: &Entry) -> Result<(WorkloadSvid, SystemTime), LinkError> {
        let id =
            SpiffeId::new(&entry.spiffe_id).map_err(|e| LinkError::BadAnswer(e.to_string()))?;
        let node = self.node.load_full();
        let held_roots = Some(self.held_roots());
        // Validated before it can replace anything.
        let issued = certify(Expect::Id(&id), |csr| async {
            let body = ca_link::body(&wire::SvidRequest {
                spiffe_id: id.to_string(),
                csr,
                held_roots,
            })?;
            let (status, _, bytes) = self
                .call(&node.svid, Method::POST, wire::path::SVID, Some(body), &[])
                .await?;
            ca_link::answer(status, &bytes)
        })
        .await?;
        self.set_bundle(issued.bundle);
        let svid = issued.svid;
        let workload = WorkloadSvid {
            entry_id: entry.id.clone(),
            spiffe_id: id,
            selectors: entry.selectors.clone(),
            chain: svid.chain().to_vec(),
            key: zeroize::Zeroizing::new(svid.key().clone_key()),
            not_after: svid.not_after(),
        };
        Ok((workload, issued.renew_at))
    }

    /// The bundle's refresh hint, within sane bounds (10 s to 1 h; 5 min when it has none).
    fn bundle_refresh(&self) -> Duration {
        self.bundle
            .load()
            .refresh_hint()
            .unwrap_or(Duration::from_secs(300))
            .clamp(Duration::from_secs(10), Duration::from_secs(3600))
    }

    async fn fetch_bundle(&self) -> Result<TrustBundle, LinkError> {
        let node = self.node.load_full();
        let (status, _, body) = self
            .call(&node.svid, Method::GET, wire::path::BUNDLE, None, &[])
            .await?;
        if status != 200 {
            return Err(ca_link::refused(status, &body));
        }
        let bundle: Box<serde_json::value::RawValue> = serde_json::from_slice(&body)
            .map_err(|e| LinkError::BadAnswer(format!("bundle: {e}")))?;
        ca_link::bundle_of(&bundle, &self.td)
    }

    /// The roots this agent holds (and serves to its workloads), reported on every request
    /// for a certificate so the CA knows when a new root has reached this node.
    fn held_roots(&self) -> Vec<String> {
        ca_api::client::held_roots(&self.bundle.load())
    }

    /// Adopts a bundle from a CA answer if it differs; persists it.
    fn set_bundle(&self, bundle: TrustBundle) {
        let current = self.bundle.load();
        if **current == bundle {
            return;
        }
        if let Err(e) = node::save_bundle(&self.cfg.data_dir, &bundle) {
            tracing::warn!(error = %e, "cannot persist the new trust bundle");
        }
        tracing::info!(sequence = ?bundle.sequence(), roots = bundle.x509_authorities().len(), "trust bundle changed");
        self.bundle.store(Arc::new(bundle));
    }

    async fn call(
        &self,
        node: &Svid,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> Result<(u16, hyper::HeaderMap, bytes::Bytes), LinkError> {
        ca_link::call(
            &self.cas,
            self.bundle.load_full(),
            node,
            method,
            path,
            body,
            headers,
        )
        .await
    }
}

impl JwtSource for Agent {
    async fn fetch_jwt(
        &self,
        id: &SpiffeId,
        audience: &[String],
    ) -> Result<(String, SystemTime), String> {
        let node = self.node.load_full();
        let body = ca_link::body(&wire::JwtRequest {
            spiffe_id: id.to_string(),
            audience: audience.to_vec(),
        })
        .map_err(|e| e.to_string())?;
        let (status, _, bytes) = self
            .call(&node.svid, Method::POST, wire::path::JWT, Some(body), &[])
            .await
            .map_err(|e| e.to_string())?;
        if status != 200 {
            return Err(ca_link::refused(status, &bytes).to_string());
        }
        let answer: wire::JwtResponse = serde_json::from_slice(&bytes)
            .map_err(|e| format!("the CA's JWT answer is not valid: {e}"))?;
        Ok((answer.token, at(answer.expires_at)))
    }
}

/// With a join token given over a stored identity: the stored identity stays (`Ok`) while it
/// is unexpired and chains to the bundle given for first contact (`--bundle` or
/// `--bundle-sha256`), so a token left in the environment on every start changes nothing. It is
/// set aside (`Err(bundle)`: attest again with the token) when it expired or chains only to roots that
/// bundle does not hold, as after a CA was down past its root's end and made a new root
/// (break-glass). The old files are moved to `<data dir>/replaced-<unix time>/`, not deleted.
/// If the bundle cannot be had (the CA is down), an unexpired identity stays.
async fn rejoin_or_keep(
    cfg: &AgentConfig,
    cas: &CaSet,
    stored: node::StoredNode,
    metrics: &AgentMetrics,
    now: SystemTime,
) -> Result<Result<node::StoredNode, TrustBundle>, AgentError> {
    let expired = node::expired(&stored, now);
    let (reason, given) = match initial_bundle(cfg, cas).await {
        Ok(given) => {
            if stored.svid.id().trust_domain() != *given.trust_domain() {
                return Err(AgentError::WrongTrustDomain {
                    stored: stored.svid.id().trust_domain().to_string(),
                    served: given.trust_domain().to_string(),
                });
            }
            let reason = match identity::verify_x509_svid(stored.svid.chain(), &given, now) {
                Ok(_) => return Ok(Ok(stored)),
                Err(e) if expired => format!("it expired ({e})"),
                Err(e) => format!("it does not chain to the given bundle: {e}"),
            };
            (reason, given)
        }
        // No bundle to judge by: keep what still works; an expired identity is refused below.
        Err(AgentError::NoBundle) => return Ok(Ok(stored)),
        Err(e) if !expired => {
            tracing::warn!(error = %e, "a join token is given, but the bundle to check the stored node identity against cannot be had; keeping the stored identity");
            return Ok(Ok(stored));
        }
        Err(e) => return Err(e),
    };
    let aside = cfg.data_dir.join(format!(
        "replaced-{}",
        now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
    ));
    node::set_aside(&cfg.data_dir, &aside)?;
    metrics.renewal("node_rejoin", "ok");
    tracing::warn!(
        id = %stored.svid.id(),
        moved_to = %aside.display(),
        "the stored node identity is set aside ({reason}); attesting again with the join token"
    );
    Ok(Err(given))
}

/// The bundle for first contact: a file the operator copied, or fetched and pinned by SHA-256.
async fn initial_bundle(cfg: &AgentConfig, cas: &CaSet) -> Result<TrustBundle, AgentError> {
    if let Some(path) = &cfg.bundle_file {
        let bytes = std::fs::read(path).map_err(|e| AgentError::BadBundle {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        return TrustBundle::parse(None, &bytes).map_err(|e| AgentError::BadBundle {
            path: path.clone(),
            detail: e.to_string(),
        });
    }
    let pin = cfg.bundle_sha256.as_deref().ok_or(AgentError::NoBundle)?;
    Ok(ca_link::first_contact(cas, pin).await?)
}

/// When to renew: the CA's hint if it falls inside the SVID's remaining life, else the usual
/// schedule from now. A hint in the past would make the agent renew in a loop.
pub fn at(secs: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64)
}

fn rfc3339(t: SystemTime) -> String {
    identity::x509::to_offset(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
