//! The CA's decisions, independent of HTTP: who may have which SVID, and the record of every
//! issuance and refusal. The HTTP layer (`api`) only parses, calls in here, and encodes.
//!
//! Why this is one file of over 500 lines: every decision on who may get which SVID is here,
//! independent of HTTP, so that a review of the CA's authorization reads one file.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
pub use ca_api::wire::{JwtResponse, SvidResponse};
use identity::{Jitter, SpiffeId, TrustDomain, refresh_at};
use ring::digest::{SHA256, digest};
use serde::Serialize;
use serde_json::json;
use serde_json::value::RawValue;
use subtle::ConstantTimeEq;

use crate::authority::{Authority, AuthorityError, unix};
use crate::csr::{CsrError, check_csr};
use crate::guard::{DiskGuard, RefusalLimiter, excerpt};
use crate::k8s::{K8sError, K8sVerifier};
use crate::metrics::Metrics;
use crate::ready::Readiness;
use crate::store::{
    AuditEvent, Entry, IssuedCert, Node, Outcome, Store, StoreError, TokenRefusal, Write,
};

/// A refusal or failure, with the HTTP status, a stable machine code, and a message for
/// humans. Every refusal is counted and audited with its code.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
    fn internal(e: impl std::fmt::Display) -> Self {
        Self::new(500, "internal", e.to_string())
    }
}

impl From<CsrError> for ApiError {
    fn from(e: CsrError) -> Self {
        Self::new(400, e.code(), e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        Self::new(503, "store_unavailable", e.to_string())
    }
}

impl From<AuthorityError> for ApiError {
    fn from(e: AuthorityError) -> Self {
        match e.expired_code() {
            // The CA cannot sign right now; a caller should keep its current SVID and retry.
            Some(code) => Self::new(503, code, e.to_string()),
            None => Self::internal(e),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Policy {
    pub workload_ttl: Duration,
    pub node_ttl: Duration,
    /// No SVID lives longer than this, whatever an entry asks (the larger of the two TTLs).
    pub max_ttl: Duration,
}

/// JWT-SVIDs live five minutes (the SPIFFE Workload API's usual lifetime).
pub const JWT_TTL: Duration = Duration::from_secs(300);

/// Entries assigned to one node, and the ETag of that list.
#[derive(Serialize)]
pub struct EntryList {
    pub entries: Vec<Entry>,
    pub etag: String,
}

/// In-memory views of what the hot path reads, rebuilt after every admin change.
#[derive(Default)]
struct Cache {
    evicted: HashSet<String>,
    /// Each node's latest attestation (unix seconds).
    attested: HashMap<String, i64>,
    by_parent: HashMap<String, Vec<Entry>>,
}

pub struct Ca<S: Store> {
    pub store: Arc<S>,
    pub authority: Arc<Authority>,
    pub policy: Policy,
    pub metrics: Arc<Metrics>,
    pub k8s: Option<Arc<K8sVerifier>>,
    /// Which refusals get their own audit row.
    pub refusals: RefusalLimiter,
    /// The data volume's free space; anonymous work stops below its reserve.
    pub disk: Option<Arc<DiskGuard>>,
    cache: ArcSwap<Cache>,
    bundle_json: ArcSwap<(u64, Option<Box<RawValue>>)>,
    chores: Mutex<Chores>,
    /// The last readiness verdict, reused for a second: `/readyz` is anonymous, and each check
    /// costs a durable write.
    readiness: tokio::sync::Mutex<Option<(std::time::Instant, Readiness)>>,
}

/// When the periodic chores last ran (unix seconds).
#[derive(Default)]
struct Chores {
    summary_at: i64,
    head_logged_at: i64,
}

/// How often held-back refusals are summarised in one audit row.
const SUMMARY_EVERY: i64 = 60;
/// How often the audit head is logged.
const HEAD_LOG_EVERY: i64 = 600;

/// Refusal codes that, from a caller without a verified SVID, are noise: counted in metrics,
/// never audited. Anyone can send them in any number, and they say nothing about an identity.
const ANONYMOUS_NOISE: &[&str] = &[
    "not_found",
    "method_not_allowed",
    "malformed_json",
    "body_too_large",
    "bad_request",
    "request_timeout",
    "client_certificate_required",
    "invalid_spiffe_id",
    "disk_low",
];

impl<S: Store> Ca<S> {
    pub async fn new(
        store: Arc<S>,
        authority: Arc<Authority>,
        policy: Policy,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StoreError> {
        let ca = Self {
            store,
            authority,
            policy,
            metrics,
            k8s: None,
            refusals: RefusalLimiter::default(),
            disk: None,
            cache: ArcSwap::from_pointee(Cache::default()),
            bundle_json: ArcSwap::from_pointee((0, None)),
            chores: Mutex::new(Chores::default()),
            readiness: tokio::sync::Mutex::new(None),
        };
        ca.reload().await?;
        Ok(ca)
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        self.authority.trust_domain()
    }

    /// Rebuilds the hot-path caches from the store.
    pub async fn reload(&self) -> Result<(), StoreError> {
        let nodes = self.store.nodes().await?;
        let attested = nodes
            .iter()
            .map(|n| (n.spiffe_id.clone(), n.attested_at))
            .collect();
        let evicted = nodes
            .into_iter()
            .filter(|n| n.evicted_at.is_some())
            .map(|n| n.spiffe_id)
            .collect();
        let mut by_parent: HashMap<String, Vec<Entry>> = HashMap::new();
        for e in self.store.entries().await? {
            by_parent.entry(e.parent_id.clone()).or_default().push(e);
        }
        self.cache.store(Arc::new(Cache {
            evicted,
            attested,
            by_parent,
        }));
        Ok(())
    }

    /// The bundle in the SPIFFE format, encoded once per bundle version (its sequence number
    /// only grows) rather than once per response.
    pub fn bundle_raw(&self) -> Box<RawValue> {
        let bundle = self.authority.bundle();
        let seq = bundle.sequence().unwrap_or(0);
        let cached = self.bundle_json.load();
        if cached.0 == seq
            && let Some(raw) = &cached.1
        {
            return raw.clone();
        }
        let raw = RawValue::from_string(bundle.to_spiffe_json().trim_end().to_owned())
            .unwrap_or_else(|_| RawValue::NULL.to_owned());
        self.bundle_json.store(Arc::new((seq, Some(raw.clone()))));
        raw
    }

    pub fn bundle_value(&self) -> serde_json::Value {
        serde_json::from_str(self.bundle_raw().get()).unwrap_or_default()
    }

    /// Whether this CA can issue now (see `ready`), at most a second old.
    pub async fn readiness(&self, now: SystemTime) -> Readiness {
        let mut last = self.readiness.lock().await;
        if let Some((at, r)) = last.as_ref()
            && at.elapsed() < Duration::from_secs(1)
        {
            return r.clone();
        }
        let r = crate::ready::check(self, now).await;
        *last = Some((std::time::Instant::now(), r.clone()));
        r
    }

    pub fn is_evicted(&self, node: &SpiffeId) -> bool {
        self.cache.load().evicted.contains(node.as_str())
    }

    /// Node attestation by join token.
    pub async fn attest_join(
        &self,
        token: &str,
        csr: &[u8],
        now: SystemTime,
    ) -> Result<SvidResponse, ApiError> {
        self.admit_anonymous()?;
        let (token_id, hash) =
            parse_token(token).ok_or_else(|| token_error(TokenRefusal::Unknown))?;
        // Look first, so a bad token is refused before any signing work; the token is spent
        // atomically with the issuance record below, which checks it again.
        let name = match self.store.token(&token_id).await? {
            // SECURITY: the secret's hash is compared in constant time; the lookup itself is by
            // the public id, so its timing says nothing about the secret.
            Some(t) if bool::from(t.hash.ct_eq(&hash)) => t.name,
            _ => return Err(token_error(TokenRefusal::Unknown)),
        };
        let id = self
            .trust_domain()
            .id_with_path(&format!("/kith/node/{name}"))
            .map_err(|e| {
                ApiError::new(
                    500,
                    "internal",
                    format!("token name makes no valid id: {e}"),
                )
            })?;
        let key = check_csr(csr, &id)?;
        let issued = self
            .authority
            .sign(&id, &key, &[], self.policy.node_ttl, now)?;
        let at = unix(now);
        let node = Node {
            spiffe_id: id.to_string(),
            name: name.clone(),
            attested_at: at,
            last_issued_at: at,
            evicted_at: None,
        };
        let write = Write::JoinIssue {
            token_id: token_id.clone(),
            token_hash: hash,
            now: at,
            cert: issued_cert(&issued, &id, "node", None, now),
            node,
            audit: issue_event(
                &id,
                "node",
                &issued,
                now,
                json!({"attestation": "join_token", "token": token_id}),
            ),
        };
        match self.store.write(write).await? {
            Outcome::Done => {}
            Outcome::TokenRefused(r) => return Err(token_error(r)),
            Outcome::NotFound => return Err(token_error(TokenRefusal::Unknown)),
        }
        // A node that re-attests is no longer evicted.
        self.reload().await?;
        self.metrics.issued("node");
        Ok(self.response(&id, issued, now))
    }

    /// A workload SVID for a node's agent, allowed by a registration entry under that node.
    pub async fn issue_for_node(
        &self,
        node: &SpiffeId,
        id: &SpiffeId,
        csr: &[u8],
        now: SystemTime,
    ) -> Result<SvidResponse, ApiError> {
        self.check_node(node)?;
        let entry = self.entry_for(node, id)?;
        let key = check_csr(csr, id)?;
        let ttl = self.entry_ttl(&entry);
        let issued = self.authority.sign(id, &key, &entry.dns, ttl, now)?;
        let write = Write::Issue {
            cert: issued_cert(&issued, id, "workload", Some(node.to_string()), now),
            node: None,
            audit: issue_event(
                id,
                "workload",
                &issued,
                now,
                json!({"node": node, "entry": entry.id}),
            ),
        };
        self.store.write(write).await?;
        self.metrics.issued("workload");
        Ok(self.response(id, issued, now))
    }

    /// A fresh node SVID for a node that presents its current one.
    ///
    /// SECURITY: only node SVIDs renew here. A workload SVID that could renew itself would let
    /// a stolen workload key keep the identity forever; workload SVIDs are renewed by the agent
    /// of their node (`/v1/svid` under the node SVID), which attests the caller again each
    /// time. A node SVID renews only while its node is not evicted and only if it was issued
    /// since the node's latest attestation, so an SVID taken before an eviction stays dead
    /// even after the node joins again with a new token.
    pub async fn renew(
        &self,
        caller: &SpiffeId,
        caller_serial: &[u8],
        caller_not_before: SystemTime,
        csr: &[u8],
        now: SystemTime,
    ) -> Result<SvidResponse, ApiError> {
        if !caller.path().starts_with("/kith/node/") {
            return Err(ApiError::new(
                403,
                "workload_renewal_refused",
                "workload SVIDs do not renew themselves: the node's agent renews them through /v1/svid after attesting the workload again; pods attest again at /v1/attest/k8s",
            ));
        }
        self.check_node(caller)?;
        let record = self.store.certificate(caller_serial).await?;
        if record.as_ref().is_none_or(|r| r.kind != "node") {
            return Err(ApiError::new(
                403,
                "unknown_certificate",
                "this CA has no record of the presented node certificate",
            ));
        }
        // Issuance time of the presented SVID: the CA backdates NotBefore by a fixed amount.
        let issued_at = unix(caller_not_before + identity::x509::BACKDATE);
        let attested_at = self.cache.load().attested.get(caller.as_str()).copied();
        match attested_at {
            None => {
                return Err(ApiError::new(
                    403,
                    "unknown_node",
                    format!("{caller} is not a node this CA attested"),
                ));
            }
            Some(at) if issued_at < at => {
                return Err(ApiError::new(
                    403,
                    "node_svid_superseded",
                    format!(
                        "this SVID of {caller} predates the node's latest attestation; use the SVID that attestation issued"
                    ),
                ));
            }
            Some(_) => {}
        }
        let key = check_csr(csr, caller)?;
        let issued = self
            .authority
            .sign(caller, &key, &[], self.policy.node_ttl, now)?;
        let at = unix(now);
        let node = Node {
            spiffe_id: caller.to_string(),
            name: caller.segments().last().unwrap_or_default().to_owned(),
            attested_at: at,
            last_issued_at: at,
            evicted_at: None,
        };
        let write = Write::Issue {
            cert: issued_cert(&issued, caller, "node", None, now),
            node: Some(node),
            audit: issue_event(caller, "node", &issued, now, json!({"renewal": true})),
        };
        self.store.write(write).await?;
        // SECURITY: an eviction that committed while this renewal was being signed wins: the
        // store orders the two writes, and the SVID is not handed out if the eviction came
        // first (the cache the check above read is only rebuilt after the eviction commits).
        let evicted = self
            .store
            .nodes()
            .await?
            .iter()
            .any(|n| n.spiffe_id == caller.as_str() && n.evicted_at.is_some());
        if evicted {
            return Err(ApiError::new(
                403,
                "node_evicted",
                format!("{caller} has been evicted; attest it again with a new join token"),
            ));
        }
        self.metrics.issued("node_renewal");
        Ok(self.response(caller, issued, now))
    }

    /// The registration entry under `node` that names `id`.
    fn entry_for(&self, node: &SpiffeId, id: &SpiffeId) -> Result<Entry, ApiError> {
        self.cache
            .load()
            .by_parent
            .get(node.as_str())
            .and_then(|es| es.iter().find(|e| e.spiffe_id == id.as_str()).cloned())
            .ok_or_else(|| {
                ApiError::new(
                    403,
                    "not_entitled",
                    format!("no registration entry lets {node} obtain {id}"),
                )
            })
    }

    /// An entry's TTL, else the workload default; never more than the policy's maximum.
    fn entry_ttl(&self, entry: &Entry) -> Duration {
        entry
            .ttl
            .map(Duration::from_secs)
            .unwrap_or(self.policy.workload_ttl)
            .min(self.policy.max_ttl)
    }

    /// Pod attestation by a projected service-account token: the pod gets
    /// `spiffe://<td>/ns/<namespace>/sa/<serviceaccount>`.
    pub async fn attest_k8s(
        &self,
        token: &str,
        csr: &[u8],
        now: SystemTime,
    ) -> Result<SvidResponse, ApiError> {
        self.admit_anonymous()?;
        let verifier = self.k8s.as_ref().ok_or_else(|| {
            ApiError::new(
                404,
                "k8s_attestation_disabled",
                "this CA has no Kubernetes issuer configured (--k8s-issuer)",
            )
        })?;
        let pod = verifier
            .attest(token, now)
            .await
            .map_err(|e| k8s_error(&e))?;
        let id = pod
            .spiffe_id(self.trust_domain())
            .map_err(|e| k8s_error(&e))?;
        let key = check_csr(csr, &id)?;
        // SECURITY: the SVID ends with the token that bought it, plus the margin the sidecar
        // needs to come back with the kubelet's next token; never the full TTL regardless.
        let ttl = (pod.expires_at + crate::k8s::SVID_MARGIN)
            .duration_since(now)
            .unwrap_or_default()
            .min(self.policy.workload_ttl);
        let issued = self.authority.sign(&id, &key, &[], ttl, now)?;
        let detail = json!({"attestation": "k8s_psat", "namespace": pod.namespace, "pod": pod.pod_name, "pod_uid": pod.pod_uid});
        let write = Write::Issue {
            cert: issued_cert(&issued, &id, "pod", None, now),
            node: None,
            audit: issue_event(&id, "workload", &issued, now, detail),
        };
        self.store.write(write).await?;
        self.metrics.issued("pod");
        Ok(self.response(&id, issued, now))
    }

    /// A JWT-SVID (ES256, 5 minutes) for a workload the node's entries allow.
    pub async fn jwt_for_node(
        &self,
        node: &SpiffeId,
        id: &SpiffeId,
        audience: &[String],
        now: SystemTime,
    ) -> Result<JwtResponse, ApiError> {
        self.check_node(node)?;
        let entitled = self
            .cache
            .load()
            .by_parent
            .get(node.as_str())
            .is_some_and(|es| es.iter().any(|e| e.spiffe_id == id.as_str()));
        if !entitled {
            return Err(ApiError::new(
                403,
                "not_entitled",
                format!("no registration entry lets {node} obtain {id}"),
            ));
        }
        if audience.is_empty() || audience.iter().any(|a| a.is_empty()) {
            return Err(ApiError::new(
                400,
                "audience_required",
                "a JWT-SVID needs at least one non-empty audience",
            ));
        }
        let keys = self.authority.keys();
        let (token, expires) = keys
            .jwt
            .signer
            .mint(id, audience, JWT_TTL, now)
            .map_err(|e| ApiError::new(500, "internal", e.to_string()))?;
        let event = AuditEvent {
            at: unix(now),
            action: "issue".into(),
            subject: id.to_string(),
            outcome: "ok".into(),
            // The audience is the caller's text: the row keeps a short excerpt of the first few.
            detail: json!({"kind": "jwt", "node": node, "audience": audience.iter().take(4).map(|a| excerpt(a)).collect::<Vec<_>>(), "audiences": audience.len(), "kid": keys.jwt.signer.key_id(), "exp": unix(expires)}),
        };
        self.store.write(Write::Audit(event)).await?;
        self.metrics.issued("jwt");
        Ok(JwtResponse {
            spiffe_id: id.to_string(),
            token,
            expires_at: unix(expires),
        })
    }

    pub fn entries_for(&self, node: &SpiffeId) -> Result<EntryList, ApiError> {
        self.check_node(node)?;
        let entries = self
            .cache
            .load()
            .by_parent
            .get(node.as_str())
            .cloned()
            .unwrap_or_default();
        let encoded = serde_json::to_vec(&entries).unwrap_or_default();
        let etag = format!(
            "\"{}\"",
            crate::store::hex(&digest(&SHA256, &encoded).as_ref()[..16])
        );
        Ok(EntryList { entries, etag })
    }

    /// Refuses evicted nodes and anything that is not a node identity.
    pub fn check_node(&self, node: &SpiffeId) -> Result<(), ApiError> {
        if !node.path().starts_with("/kith/node/") {
            return Err(ApiError::new(
                403,
                "not_a_node",
                format!("{node} is not a node identity"),
            ));
        }
        if self.is_evicted(node) {
            return Err(ApiError::new(
                403,
                "node_evicted",
                format!("{node} has been evicted; attest it again with a new join token"),
            ));
        }
        Ok(())
    }

    /// Refuses anonymous work (join and Kubernetes attestation) while the data volume is below
    /// its reserve, so the space left goes to the renewals that keep the mesh running.
    pub fn admit_anonymous(&self) -> Result<(), ApiError> {
        match &self.disk {
            Some(disk) if disk.is_low() => Err(ApiError::new(
                503,
                "disk_low",
                disk.report().message.unwrap_or_else(|| {
                    "the CA's data volume is below its free-space reserve".into()
                }),
            )),
            _ => Ok(()),
        }
    }

    /// Counts a refusal and, within the audit log's rate limits, audits it; returns the error
    /// for the response.
    ///
    /// SECURITY: a refusal row holds the endpoint, the reason code, the caller's verified ID or
    /// address, and at most a short escaped excerpt of the message (which may quote what the
    /// caller sent). Anonymous noise is not audited at all, and the rest is rate-limited per
    /// source and in total, with what was held back summarised in one row a minute: a caller
    /// cannot grow the database by more than a small bounded amount.
    pub async fn refuse(
        &self,
        endpoint: &str,
        subject: &str,
        source: Option<IpAddr>,
        authenticated: bool,
        err: ApiError,
        now: SystemTime,
    ) -> ApiError {
        self.metrics.refused(err.code);
        if err.status >= 500 {
            tracing::error!(endpoint, subject, code = err.code, error = %err.message, "the CA could not serve a request");
        }
        if !authenticated && ANONYMOUS_NOISE.contains(&err.code) {
            tracing::debug!(
                reason = err.code,
                endpoint,
                ?source,
                "refused anonymous noise"
            );
            return err;
        }
        let t = now
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        if !self.refusals.admit(source, err.code, t) {
            self.metrics.audit_suppressed.inc();
            tracing::debug!(
                reason = err.code,
                endpoint,
                ?source,
                subject,
                "refused (audit row held back by the rate limit)"
            );
            return err;
        }
        // Logged at the rate refusals are audited, so an attack cannot flood the log either.
        tracing::info!(reason = err.code, endpoint, ?source, subject, message = %excerpt(&err.message), "refused");
        let event = AuditEvent {
            at: unix(now),
            action: "refuse".into(),
            subject: subject.into(),
            outcome: err.code.into(),
            detail: json!({
                "endpoint": endpoint,
                "source": source.map(|s| s.to_string()),
                "message": excerpt(&err.message),
            }),
        };
        if let Err(e) = self.store.write(Write::Audit(event)).await {
            tracing::error!(error = %e, "failed to audit a refusal");
        }
        err
    }

    /// Time to outage and its cause (see `crate::outage`), from the rollover's view, the KEK
    /// check and the data volume as last measured.
    pub async fn outage(&self, now: SystemTime) -> crate::outage::Outage {
        let view = self.authority.rollover_view();
        let kek = self.authority.check_kek(self.store.as_ref()).await;
        let fills_at = self.disk.as_ref().and_then(|d| d.report().fills_at);
        crate::outage::earliest(
            unix(now),
            (view.outage_at, view.outage_cause),
            &kek,
            fills_at,
        )
    }

    /// Measures the data volume and exports what it found.
    pub fn measure_disk(&self) {
        if let Some(disk) = &self.disk {
            let r = disk.check();
            self.metrics
                .data_free_bytes
                .set(i64::try_from(r.free_bytes).unwrap_or(i64::MAX));
            self.metrics
                .data_reserve_bytes
                .set(i64::try_from(r.reserve_bytes).unwrap_or(i64::MAX));
        }
    }

    /// Writes one audit row for the refusals held back since the last one, if any.
    pub async fn audit_suppressed(&self, now: SystemTime) -> Result<bool, StoreError> {
        let Some(s) = self.refusals.take_suppressed() else {
            return Ok(false);
        };
        tracing::warn!(
            suppressed = s.count,
            sources = s.sources,
            "refusals held back from the audit log by its rate limits; one summary row written"
        );
        let event = AuditEvent {
            at: unix(now),
            action: "refuse.suppressed".into(),
            subject: "refusals".into(),
            outcome: "suppressed".into(),
            detail: serde_json::to_value(&s).unwrap_or_default(),
        };
        self.store.write(Write::Audit(event)).await?;
        Ok(true)
    }

    /// The periodic chores of the maintenance loop: measure the data volume, summarise
    /// held-back refusals (once a minute), export the audit head (a gauge each call, a log
    /// line every ten minutes, so the head is on record outside the database).
    pub async fn chores(&self, now: SystemTime) {
        self.measure_disk();
        let at = unix(now);
        let (summary_due, head_due) = match self.chores.lock() {
            Ok(mut c) => {
                let s = at - c.summary_at >= SUMMARY_EVERY;
                let h = at - c.head_logged_at >= HEAD_LOG_EVERY;
                if s {
                    c.summary_at = at;
                }
                if h {
                    c.head_logged_at = at;
                }
                (s, h)
            }
            Err(_) => (true, true),
        };
        if summary_due && let Err(e) = self.audit_suppressed(now).await {
            tracing::error!(error = %e, "failed to write the refusal summary row");
        }
        match self.store.audit_head().await {
            Ok(Some(head)) => {
                self.metrics.audit_head_seq.set(head.seq);
                if head_due {
                    tracing::info!(seq = head.seq, hash = %head.hash, head = %head, "audit head");
                }
            }
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "cannot read the audit head"),
        }
    }

    fn response(
        &self,
        id: &SpiffeId,
        issued: crate::authority::Issued,
        now: SystemTime,
    ) -> SvidResponse {
        // From the moment of issuance, not the backdated NotBefore: with short lifetimes the
        // 30 s backdate would put the renewal point in the past.
        let renew = refresh_at(now, issued.not_after, Jitter::random());
        SvidResponse {
            spiffe_id: id.to_string(),
            svid: identity::pem::encode_certificates(&issued.chain),
            expires_at: unix(issued.not_after),
            renew_after: unix(renew),
            bundle: self.bundle_raw(),
        }
    }
}

/// A join token is `<id>.<secret>`: the id (12 hex characters) is a public handle for list and
/// revoke; the secret is 256 random bits, of which the CA keeps only the SHA-256.
pub fn parse_token(token: &str) -> Option<(String, [u8; 32])> {
    let (id, secret) = token.trim().split_once('.')?;
    if id.len() != 12 || !id.bytes().all(|b| b.is_ascii_hexdigit()) || secret.is_empty() {
        return None;
    }
    Some((id.to_ascii_lowercase(), secret_hash(secret)))
}

pub fn secret_hash(secret: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, secret.as_bytes()).as_ref());
    out
}

/// The refusal for a pod token: 401 for the token itself, 503 when the CA cannot judge it now
/// (stale issuer keys, TokenReview unreachable).
fn k8s_error(e: &K8sError) -> ApiError {
    let status = match e.reason() {
        "jwks_stale" | "review_failed" => 503,
        _ => 401,
    };
    ApiError::new(status, k8s_code(e), e.to_string())
}

/// A stable refusal code per kind of bad Kubernetes token.
fn k8s_code(e: &K8sError) -> &'static str {
    match e.reason() {
        "expired" => "k8s_token_expired",
        "not_yet_valid" => "k8s_token_not_yet_valid",
        "wrong_audience" => "k8s_wrong_audience",
        "wrong_issuer" => "k8s_wrong_issuer",
        "unknown_key" => "k8s_unknown_key",
        "bad_signature" => "k8s_bad_signature",
        "alg_not_allowed" => "k8s_alg_not_allowed",
        "no_pod_binding" => "k8s_no_pod_binding",
        "too_large" => "k8s_token_too_large",
        "bad_name" => "k8s_bad_name",
        "jwks_stale" => "k8s_jwks_stale",
        "review_rejected" => "k8s_token_review_rejected",
        "review_failed" => "k8s_token_review_unavailable",
        _ => "k8s_token_malformed",
    }
}

fn token_error(r: TokenRefusal) -> ApiError {
    match r {
        TokenRefusal::Unknown => {
            ApiError::new(401, "token_unknown", "join token is not known to this CA")
        }
        TokenRefusal::Used => ApiError::new(
            401,
            "token_used",
            "join token was already used; create a new one with `kith ca token create`",
        ),
        TokenRefusal::Expired => ApiError::new(
            401,
            "token_expired",
            "join token has expired; create a new one with `kith ca token create`",
        ),
        TokenRefusal::Revoked => ApiError::new(401, "token_revoked", "join token was revoked"),
    }
}

fn issued_cert(
    issued: &crate::authority::Issued,
    id: &SpiffeId,
    kind: &'static str,
    parent: Option<String>,
    now: SystemTime,
) -> IssuedCert {
    IssuedCert {
        serial: issued.serial.clone(),
        spiffe_id: id.to_string(),
        kind,
        parent,
        not_after: unix(issued.not_after),
        issued_at: unix(now),
    }
}

fn issue_event(
    id: &SpiffeId,
    kind: &str,
    issued: &crate::authority::Issued,
    now: SystemTime,
    mut detail: serde_json::Value,
) -> AuditEvent {
    if let Some(map) = detail.as_object_mut() {
        map.insert("kind".into(), kind.into());
        map.insert("serial".into(), crate::store::hex(&issued.serial).into());
        map.insert("not_after".into(), unix(issued.not_after).into());
    }
    AuditEvent {
        at: unix(now),
        action: "issue".into(),
        subject: id.to_string(),
        outcome: "ok".into(),
        detail,
    }
}
