//! The CA's decisions, independent of HTTP: who may have which SVID, and the record of every
//! issuance and refusal. The HTTP layer (`api`) only parses, calls in here, and encodes.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use identity::{Jitter, SpiffeId, TrustDomain, refresh_at};
use ring::digest::{SHA256, digest};
use serde::Serialize;
use serde_json::json;
use serde_json::value::RawValue;
use subtle::ConstantTimeEq;

use crate::authority::{Authority, AuthorityError, unix};
use crate::csr::{CsrError, check_csr};
use crate::k8s::{K8sError, K8sVerifier};
use crate::metrics::Metrics;
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

/// What a successful issuance returns to the caller.
#[derive(Serialize)]
pub struct SvidResponse {
    pub spiffe_id: String,
    /// PEM: the leaf, then the intermediates.
    pub svid: String,
    pub expires_at: i64,
    /// When to renew: the CA spreads callers over 40–60 % of the lifetime.
    pub renew_after: i64,
    pub bundle: Box<RawValue>,
}

/// JWT-SVIDs live five minutes (the SPIFFE Workload API's usual lifetime).
pub const JWT_TTL: Duration = Duration::from_secs(300);

#[derive(Serialize)]
pub struct JwtResponse {
    pub spiffe_id: String,
    pub token: String,
    pub expires_at: i64,
}

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
    by_parent: HashMap<String, Vec<Entry>>,
}

pub struct Ca<S: Store> {
    pub store: Arc<S>,
    pub authority: Arc<Authority>,
    pub policy: Policy,
    pub metrics: Arc<Metrics>,
    pub k8s: Option<Arc<K8sVerifier>>,
    cache: ArcSwap<Cache>,
    bundle_json: ArcSwap<(u64, Option<Box<RawValue>>)>,
}

impl<S: Store> Ca<S> {
    pub fn new(
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
            cache: ArcSwap::from_pointee(Cache::default()),
            bundle_json: ArcSwap::from_pointee((0, None)),
        };
        ca.reload()?;
        Ok(ca)
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        self.authority.trust_domain()
    }

    /// Rebuilds the hot-path caches from the store.
    pub fn reload(&self) -> Result<(), StoreError> {
        let evicted = self
            .store
            .nodes()?
            .into_iter()
            .filter(|n| n.evicted_at.is_some())
            .map(|n| n.spiffe_id)
            .collect();
        let mut by_parent: HashMap<String, Vec<Entry>> = HashMap::new();
        for e in self.store.entries()? {
            by_parent.entry(e.parent_id.clone()).or_default().push(e);
        }
        self.cache.store(Arc::new(Cache { evicted, by_parent }));
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
        let (token_id, hash) =
            parse_token(token).ok_or_else(|| token_error(TokenRefusal::Unknown))?;
        // Look first, so a bad token is refused before any signing work; the token is spent
        // atomically with the issuance record below, which checks it again.
        let name = match self.store.token(&token_id)? {
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
        self.reload()?;
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

    /// A fresh SVID for the caller's own, current identity.
    pub async fn renew(
        &self,
        caller: &SpiffeId,
        caller_serial: &[u8],
        csr: &[u8],
        now: SystemTime,
    ) -> Result<SvidResponse, ApiError> {
        let (kind, ttl, parent) = if caller.path().starts_with("/kith/node/") {
            self.check_node(caller)?;
            ("node", self.policy.node_ttl, None)
        } else {
            // A workload SVID renews only while the node it came through is in good standing
            // and still entitled to it: eviction reaches everything under a node.
            let record = self.store.certificate(caller_serial)?.ok_or_else(|| {
                ApiError::new(
                    403,
                    "unknown_certificate",
                    "this CA has no record of the presented certificate",
                )
            })?;
            let Some(node) = record.parent.filter(|_| record.kind == "workload") else {
                return Err(ApiError::new(
                    403,
                    "renew_not_allowed",
                    "only node and agent-issued workload SVIDs renew here; pods attest again with a fresh service-account token at /v1/attest/k8s",
                ));
            };
            let node_id = SpiffeId::new(&node).map_err(ApiError::internal)?;
            self.check_node(&node_id)?;
            let entry = self.entry_for(&node_id, caller)?;
            ("workload", self.entry_ttl(&entry), Some(node))
        };
        let key = check_csr(csr, caller)?;
        let issued = self.authority.sign(caller, &key, &[], ttl, now)?;
        let at = unix(now);
        let node = (kind == "node").then(|| Node {
            spiffe_id: caller.to_string(),
            name: caller.segments().last().unwrap_or_default().to_owned(),
            attested_at: at,
            last_issued_at: at,
            evicted_at: None,
        });
        let write = Write::Issue {
            cert: issued_cert(&issued, caller, kind, parent, now),
            node,
            audit: issue_event(caller, kind, &issued, now, json!({"renewal": true})),
        };
        self.store.write(write).await?;
        self.metrics.issued(if kind == "node" {
            "node_renewal"
        } else {
            "workload_renewal"
        });
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
        let verifier = self.k8s.as_ref().ok_or_else(|| {
            ApiError::new(
                404,
                "k8s_attestation_disabled",
                "this CA has no Kubernetes issuer configured (--k8s-issuer)",
            )
        })?;
        let pod = verifier
            .verify(token, now)
            .map_err(|e| ApiError::new(401, k8s_code(&e), e.to_string()))?;
        let id = pod
            .spiffe_id(self.trust_domain())
            .map_err(|e| ApiError::new(401, k8s_code(&e), e.to_string()))?;
        let key = check_csr(csr, &id)?;
        let issued = self
            .authority
            .sign(&id, &key, &[], self.policy.workload_ttl, now)?;
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
            detail: json!({"kind": "jwt", "node": node, "audience": audience, "kid": keys.jwt.signer.key_id(), "exp": unix(expires)}),
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

    /// Counts and audits a refusal; returns the error for the response.
    pub async fn refuse(
        &self,
        endpoint: &str,
        subject: &str,
        err: ApiError,
        now: SystemTime,
    ) -> ApiError {
        self.metrics.refused(err.code);
        if err.status >= 500 {
            tracing::error!(endpoint, subject, code = err.code, error = %err.message, "the CA could not serve a request");
        }
        let event = AuditEvent {
            at: unix(now),
            action: "refuse".into(),
            subject: subject.into(),
            outcome: err.code.into(),
            detail: json!({"endpoint": endpoint, "message": err.message}),
        };
        if let Err(e) = self.store.write(Write::Audit(event)).await {
            tracing::error!(error = %e, "failed to audit a refusal");
        }
        err
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
