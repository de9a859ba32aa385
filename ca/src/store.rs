//! What the CA keeps: its sealed keys, join tokens, registration entries, nodes, issued
//! certificates and the MAC-chained audit log. The issuance code talks to the `Store` trait
//! only, so a PostgreSQL store for several replicas can follow without touching it.
//!
//! Writes are commands (`Write`) that a store applies in groups: many concurrent issuances
//! share one durable transaction instead of paying one fsync each.
//!
//! Why this is one file of over 500 lines: the `Store` trait and what both backends share (records,
//! errors, the audit chain's MAC and check): the storage contract in one file. How the backends
//! read and write those records alike is in `store/common.rs`.

pub mod any;
pub(crate) mod common;
pub mod postgres;
pub mod sqlite;
pub mod tls;

use std::future::Future;

use ring::digest::{SHA256, digest};
use ring::{hkdf, hmac};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, thiserror::Error)]
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

/// An issued certificate's row as stored: serial, SPIFFE ID, kind, not-after, issued-at, parent
/// (for copying a CA between stores).
pub type CertRow = (Vec<u8>, String, String, i64, i64, Option<String>);

/// An audit row as stored: seq, the event (its `detail` unset), the detail's JSON text, the
/// previous MAC and the MAC (for copying a CA between stores, byte for byte).
pub type RawAuditRow = (i64, AuditEvent, String, Vec<u8>, Vec<u8>);

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

/// The newest row of the audit chain: what an operator writes down to detect later truncation
/// (`kith ca audit verify --expect-head SEQ:HASH`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditHead {
    pub seq: i64,
    /// Hex of the row's MAC.
    pub hash: String,
}

impl AuditHead {
    /// Parses `SEQ:HASH` (HASH: 64 hex characters).
    pub fn parse(text: &str) -> Result<Self, String> {
        let (seq, hash) = text
            .trim()
            .split_once(':')
            .ok_or_else(|| format!("{text:?} is not SEQ:HASH"))?;
        let seq = seq
            .parse::<i64>()
            .ok()
            .filter(|s| *s > 0)
            .ok_or_else(|| format!("{seq:?} is not a row number"))?;
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("{hash:?} is not a 64-character hex hash"));
        }
        Ok(Self {
            seq,
            hash: hash.to_ascii_lowercase(),
        })
    }
}

impl std::fmt::Display for AuditHead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.seq, self.hash)
    }
}

/// The key of the audit chain's MAC: HKDF-SHA256 of the key-encryption key under its own label,
/// so the KEK itself never keys anything but the seal. Whoever can write the database but does
/// not hold the KEK cannot recompute the chain after editing or deleting rows.
#[derive(Clone)]
pub struct AuditKey(hmac::Key);

/// The HKDF label (info) of the audit key; a new label makes a new, unrelated key.
const AUDIT_KEY_LABEL: &[u8] = b"kith audit chain v1";

impl AuditKey {
    pub fn derive(kek: &[u8]) -> Self {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &[]).extract(kek);
        let info = [AUDIT_KEY_LABEL];
        // `expand` fails only when the output is longer than 255 hashes; 32 bytes never is.
        match prk.expand(&info, hmac::HMAC_SHA256) {
            Ok(okm) => Self(hmac::Key::from(okm)),
            Err(_) => unreachable!("a 32-byte HKDF output is always in range"),
        }
    }
}

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditKey(..)")
    }
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
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AuditVerdict {
    pub rows: i64,
    /// The first row whose MAC does not follow from the rows before it (or, with an expected
    /// head, the row that should have been there).
    pub first_broken: Option<i64>,
    pub detail: Option<String>,
    /// Rows written by a kith before the chain was keyed, checked as a plain SHA-256 chain.
    #[serde(default)]
    pub legacy_rows: i64,
    /// The newest row.
    #[serde(default)]
    pub head: Option<AuditHead>,
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
    /// The key's seal binds its activation time, so it comes sealed again with the new one.
    ActivateCaKey {
        id: String,
        activate_at: i64,
        sealed_key: Vec<u8>,
        audit: AuditEvent,
    },
    /// Replace a CA key's sealed blob (a key sealed by an older kith, sealed again with the
    /// current binding).
    ResealCaKey {
        id: String,
        sealed_key: Vec<u8>,
        audit: AuditEvent,
    },
    /// A durable write that changes nothing the CA reads: `/readyz` proves the store still
    /// takes writes with it.
    Probe,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// The thing to change does not exist (revoke, delete, evict).
    NotFound,
    TokenRefused(TokenRefusal),
}

/// A replica holding a lease (PostgreSQL: the one that prepares keys and runs the rollover).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Lease {
    pub name: String,
    pub replica: String,
    pub host: String,
    pub since: i64,
    pub expires_at: i64,
}

/// Reads are async: a networked store (PostgreSQL) must not block the runtime while it waits.
pub trait Store: Send + Sync + 'static {
    /// Applies `op` durably (grouped with concurrent writes) and returns its outcome.
    fn write(&self, op: Write) -> impl Future<Output = Result<Outcome, StoreError>> + Send;
    fn ca_keys(&self) -> impl Future<Output = Result<Vec<CaKeyRecord>, StoreError>> + Send;
    fn token(&self, id: &str)
    -> impl Future<Output = Result<Option<JoinToken>, StoreError>> + Send;
    /// The record of an issued certificate, by serial.
    fn certificate(
        &self,
        serial: &[u8],
    ) -> impl Future<Output = Result<Option<CertRecord>, StoreError>> + Send;
    fn tokens(&self) -> impl Future<Output = Result<Vec<JoinToken>, StoreError>> + Send;
    fn entries(&self) -> impl Future<Output = Result<Vec<Entry>, StoreError>> + Send;
    fn nodes(&self) -> impl Future<Output = Result<Vec<Node>, StoreError>> + Send;
    fn audit(
        &self,
        after_seq: i64,
        limit: i64,
    ) -> impl Future<Output = Result<Vec<AuditRow>, StoreError>> + Send;
    /// Walks the whole chain; with `expect`, also requires that row to be in it unchanged.
    fn verify_audit(
        &self,
        expect: Option<&AuditHead>,
    ) -> impl Future<Output = Result<AuditVerdict, StoreError>> + Send;
    fn audit_head(&self) -> impl Future<Output = Result<Option<AuditHead>, StoreError>> + Send;
    /// Whether any audit row has this action and subject (a scan: for rare checks only).
    fn audit_has(
        &self,
        action: &str,
        subject: &str,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    fn counts(&self) -> impl Future<Output = Result<Counts, StoreError>> + Send;
    /// Whether other CA processes share this store (replicas): they then coordinate key
    /// preparation through [`Store::try_lease`] and pick up each other's writes by polling.
    fn shared(&self) -> bool {
        false
    }
    /// Takes or renews lease `name` for this process for `ttl` seconds; true while this
    /// process holds it. A store only one process uses always grants it.
    fn try_lease(
        &self,
        name: &str,
        ttl: i64,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        let _ = (name, ttl);
        std::future::ready(Ok(true))
    }
    /// The leases held now (empty for a store only one process uses).
    fn leases(&self) -> impl Future<Output = Result<Vec<Lease>, StoreError>> + Send {
        std::future::ready(Ok(Vec::new()))
    }
    /// What the store is and how it is doing, for `kith ca status` (no secrets).
    fn describe(&self) -> serde_json::Value {
        serde_json::json!({ "kind": "sqlite" })
    }
}

/// The MAC of an audit row: HMAC-SHA256 under the audit key over the previous row's MAC and
/// every field of this row as stored (`detail` is the JSON text in the row), each
/// length-prefixed so no two rows encode alike.
pub fn audit_mac(
    key: &AuditKey,
    prev: &[u8; 32],
    seq: i64,
    e: &AuditEvent,
    detail: &str,
) -> [u8; 32] {
    let buf = audit_encoding(prev, seq, e, detail);
    let mut out = [0u8; 32];
    out.copy_from_slice(hmac::sign(&key.0, &buf).as_ref());
    out
}

/// Checks a row's MAC in constant time.
pub fn audit_mac_ok(
    key: &AuditKey,
    prev: &[u8; 32],
    seq: i64,
    e: &AuditEvent,
    detail: &str,
    stored: &[u8],
) -> bool {
    hmac::verify(&key.0, &audit_encoding(prev, seq, e, detail), stored).is_ok()
}

/// The plain SHA-256 chain of kith versions before the chain was keyed: still checked for the
/// rows such a version wrote, up to the `audit.keyed` row that starts the MAC chain.
pub fn legacy_audit_hash(prev: &[u8; 32], seq: i64, e: &AuditEvent, detail: &str) -> [u8; 32] {
    let buf = audit_encoding(prev, seq, e, detail);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, &buf).as_ref());
    out
}

fn audit_encoding(prev: &[u8; 32], seq: i64, e: &AuditEvent, detail: &str) -> Vec<u8> {
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
    buf
}

pub use identity::digest::hex;

/// The audit chain check, row by row, fed by each store's walk over its rows in order. A row is
/// broken when its sequence number skips (a row was deleted), its stored previous MAC is not
/// the MAC of the row before, or its own MAC does not match its content under the audit key
/// (it was edited, or the chain recomputed without the key).
///
/// Rows an older kith wrote (a plain SHA-256 chain) are accepted only before the first keyed
/// row, and the newest row must be keyed: rewriting the whole log as a plain chain, or cutting
/// it back to its legacy part, does not verify. Deleting the newest keyed rows leaves a valid
/// shorter chain; `expect` (a head written down earlier) catches that.
pub struct ChainCheck<'a> {
    key: &'a AuditKey,
    expect: Option<&'a AuditHead>,
    prev: [u8; 32],
    expected_seq: i64,
    count: i64,
    legacy_rows: i64,
    keyed: bool,
    head: Option<AuditHead>,
    expect_seen: bool,
}

impl<'a> ChainCheck<'a> {
    pub fn new(key: &'a AuditKey, expect: Option<&'a AuditHead>) -> Self {
        Self {
            key,
            expect,
            prev: [0u8; 32],
            expected_seq: 1,
            count: 0,
            legacy_rows: 0,
            keyed: false,
            head: None,
            expect_seen: false,
        }
    }

    /// Checks the next row (`event.detail` is ignored: `detail` is the stored JSON text); a
    /// verdict when the chain is broken here.
    pub fn push(
        &mut self,
        seq: i64,
        event: &AuditEvent,
        detail: &str,
        stored_prev: &[u8],
        stored: &[u8],
    ) -> Option<AuditVerdict> {
        self.count += 1;
        // A broken row's verdict counts the rows up to it and the legacy rows before it.
        let (count, legacy_before) = (self.count, self.legacy_rows);
        let broken = |why: String| {
            Some(AuditVerdict {
                rows: count,
                first_broken: Some(seq),
                detail: Some(why),
                legacy_rows: legacy_before,
                head: None,
            })
        };
        if seq != self.expected_seq {
            return broken(format!(
                "row {} is missing (next row is {seq})",
                self.expected_seq
            ));
        }
        if stored_prev != self.prev {
            return broken("previous-hash does not match the row before".into());
        }
        if audit_mac_ok(self.key, &self.prev, seq, event, detail, stored) {
            self.keyed = true;
        } else if !self.keyed
            && event.action != common::AUDIT_KEYED
            && legacy_audit_hash(&self.prev, seq, event, detail).as_slice() == stored
        {
            self.legacy_rows += 1;
        } else {
            return broken(
                "content does not match its MAC (the row was altered, or the key-encryption key is not this CA's)"
                    .into(),
            );
        }
        let hash = hex(stored);
        if let Some(e) = self.expect
            && e.seq == seq
        {
            if e.hash != hash {
                return broken(format!(
                    "row {seq} is not the expected head {e}: the chain was rewritten from there"
                ));
            }
            self.expect_seen = true;
        }
        if stored.len() == 32 {
            self.prev.copy_from_slice(stored);
        }
        self.head = Some(AuditHead { seq, hash });
        self.expected_seq += 1;
        None
    }

    pub fn finish(self) -> AuditVerdict {
        let mut verdict = AuditVerdict {
            rows: self.count,
            first_broken: None,
            detail: None,
            legacy_rows: self.legacy_rows,
            head: self.head.clone(),
        };
        if self.count > 0 && !self.keyed {
            verdict.first_broken = Some(self.count);
            verdict.detail = Some(
                "no row is keyed: the whole chain is plain SHA-256, which anyone can recompute; start the CA once to key it, or the log was rewritten"
                    .into(),
            );
        } else if let Some(e) = self.expect
            && !self.expect_seen
        {
            verdict.first_broken = Some(self.count + 1);
            verdict.detail = Some(format!(
                "the chain ends at row {}, before the expected head {e}: rows were deleted",
                self.count
            ));
        }
        verdict
    }
}
