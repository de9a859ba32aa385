//! What the CA keeps: its sealed keys, join tokens, registration entries, nodes, issued
//! certificates and the hash-chained audit log. The issuance code talks to the `Store` trait
//! only, so a PostgreSQL store for several replicas can follow without touching it.
//!
//! Writes are commands (`Write`) that a store applies in groups: many concurrent issuances
//! share one durable transaction instead of paying one fsync each.

pub mod sqlite;

use std::future::Future;

use ring::digest::{SHA256, digest};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(String),
    #[error("database migration failed: {0}")]
    Migration(String),
    #[error("the store's writer has stopped")]
    WriterGone,
    #[error("corrupt row in {table}: {detail}")]
    Corrupt { table: &'static str, detail: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyKind {
    Root,
    Intermediate,
    Jwt,
}

/// A CA key with its certificate (none for JWT keys) and its validity and activation times
/// (unix seconds). The private key is only ever stored sealed.
#[derive(Clone, Debug)]
pub struct CaKeyRecord {
    pub id: String,
    pub kind: KeyKind,
    pub cert_der: Option<Vec<u8>>,
    pub sealed_key: Vec<u8>,
    pub not_before: i64,
    pub not_after: i64,
    pub activate_at: i64,
    pub created_at: i64,
}

#[derive(Clone, Debug, Serialize)]
pub struct JoinToken {
    /// A short public handle (hex of the first bytes of the hash), for list and revoke.
    pub id: String,
    #[serde(skip)]
    pub hash: [u8; 32],
    pub name: String,
    pub created_at: i64,
    pub expires_at: i64,
    pub used_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub id: String,
    pub spiffe_id: String,
    pub parent_id: String,
    pub selectors: Vec<String>,
    /// TTL of the SVIDs issued for this entry, in seconds (None: the CA's workload TTL).
    pub ttl: Option<u64>,
    pub dns: Vec<String>,
    pub created_at: i64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Node {
    pub spiffe_id: String,
    pub name: String,
    pub attested_at: i64,
    pub last_issued_at: i64,
    pub evicted_at: Option<i64>,
}

#[derive(Clone, Debug)]
pub struct IssuedCert {
    pub serial: Vec<u8>,
    pub spiffe_id: String,
    pub kind: &'static str,
    /// The node a workload SVID was issued through (None for nodes and pods).
    pub parent: Option<String>,
    pub not_after: i64,
    pub issued_at: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertRecord {
    pub spiffe_id: String,
    pub kind: String,
    pub parent: Option<String>,
}

/// One audit event as the CA describes it; the store adds the sequence number and hashes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AuditEvent {
    pub at: i64,
    /// e.g. `issue`, `refuse`, `token.create`, `entry.delete`, `node.evict`, `signer.rotate`.
    pub action: String,
    /// Who or what it is about: a SPIFFE ID, a token id, an entry id.
    pub subject: String,
    /// `ok`, or the refusal reason.
    pub outcome: String,
    pub detail: serde_json::Value,
}

#[derive(Clone, Debug, Serialize)]
pub struct AuditRow {
    pub seq: i64,
    #[serde(flatten)]
    pub event: AuditEvent,
    pub prev_hash: String,
    pub hash: String,
}

/// The result of checking the audit chain.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct AuditVerdict {
    pub rows: i64,
    /// The first row whose hash does not follow from the rows before it.
    pub first_broken: Option<i64>,
    pub detail: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Counts {
    pub issued: i64,
    pub nodes: i64,
    pub evicted_nodes: i64,
    pub entries: i64,
    pub active_tokens: i64,
    pub audit_rows: i64,
}

/// Why a join token was not accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenRefusal {
    Unknown,
    Used,
    Expired,
    Revoked,
}

/// A write command. Each is applied atomically; a group of them shares one transaction.
#[derive(Debug)]
pub enum Write {
    /// Record an issued certificate (and the node it belongs to, for node SVIDs).
    Issue {
        cert: IssuedCert,
        node: Option<Node>,
        audit: AuditEvent,
    },
    /// Consume a join token and record the node SVID it paid for, or neither.
    JoinIssue {
        token_id: String,
        token_hash: [u8; 32],
        now: i64,
        cert: IssuedCert,
        node: Node,
        audit: AuditEvent,
    },
    Audit(AuditEvent),
    CreateToken(JoinToken, AuditEvent),
    RevokeToken {
        id: String,
        now: i64,
        audit: AuditEvent,
    },
    PutEntry(Entry, AuditEvent),
    DeleteEntry {
        id: String,
        audit: AuditEvent,
    },
    EvictNode {
        spiffe_id: String,
        now: i64,
        audit: AuditEvent,
    },
    PutCaKey(CaKeyRecord, AuditEvent),
    /// Moves a CA key's activation time (a successor root starts signing when the rollover
    /// decides, not at a time fixed when it was made).
    ActivateCaKey {
        id: String,
        activate_at: i64,
        audit: AuditEvent,
    },
}

#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// The thing to change does not exist (revoke, delete, evict).
    NotFound,
    TokenRefused(TokenRefusal),
}

pub trait Store: Send + Sync + 'static {
    /// Applies `op` durably (grouped with concurrent writes) and returns its outcome.
    fn write(&self, op: Write) -> impl Future<Output = Result<Outcome, StoreError>> + Send;
    fn ca_keys(&self) -> Result<Vec<CaKeyRecord>, StoreError>;
    fn token(&self, id: &str) -> Result<Option<JoinToken>, StoreError>;
    /// The record of an issued certificate, by serial.
    fn certificate(&self, serial: &[u8]) -> Result<Option<CertRecord>, StoreError>;
    fn tokens(&self) -> Result<Vec<JoinToken>, StoreError>;
    fn entries(&self) -> Result<Vec<Entry>, StoreError>;
    fn nodes(&self) -> Result<Vec<Node>, StoreError>;
    fn audit(&self, after_seq: i64, limit: i64) -> Result<Vec<AuditRow>, StoreError>;
    fn verify_audit(&self) -> Result<AuditVerdict, StoreError>;
    fn counts(&self) -> Result<Counts, StoreError>;
}

/// The hash of an audit row: SHA-256 over the previous row's hash and every field of this
/// row as stored (`detail` is the JSON text in the row), each length-prefixed so no two rows
/// encode alike.
pub fn audit_hash(prev: &[u8; 32], seq: i64, e: &AuditEvent, detail: &str) -> [u8; 32] {
    let mut buf = Vec::with_capacity(96 + e.action.len() + e.subject.len() + detail.len());
    buf.extend_from_slice(prev);
    buf.extend_from_slice(&seq.to_be_bytes());
    buf.extend_from_slice(&e.at.to_be_bytes());
    for field in [
        e.action.as_str(),
        e.subject.as_str(),
        e.outcome.as_str(),
        detail,
    ] {
        buf.extend_from_slice(&(field.len() as u64).to_be_bytes());
        buf.extend_from_slice(field.as_bytes());
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, &buf).as_ref());
    out
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
