//! The store `kith ca serve` runs on: the embedded SQLite file (the default) or PostgreSQL
//! (`--store postgres://…`), chosen at start.

use super::postgres::PgStore;
use super::sqlite::SqliteStore;
use super::{
    AuditHead, AuditRow, AuditVerdict, CaKeyRecord, CertRecord, Counts, Entry, JoinToken, Lease,
    Node, Outcome, Store, StoreError, Write,
};

pub enum AnyStore {
    Sqlite(SqliteStore),
    Postgres(PgStore),
}

macro_rules! each {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            AnyStore::Sqlite($s) => $e,
            AnyStore::Postgres($s) => $e,
        }
    };
}

impl Store for AnyStore {
    async fn write(&self, op: Write) -> Result<Outcome, StoreError> {
        each!(self, s => s.write(op).await)
    }
    async fn ca_keys(&self) -> Result<Vec<CaKeyRecord>, StoreError> {
        each!(self, s => s.ca_keys().await)
    }
    async fn token(&self, id: &str) -> Result<Option<JoinToken>, StoreError> {
        each!(self, s => s.token(id).await)
    }
    async fn certificate(&self, serial: &[u8]) -> Result<Option<CertRecord>, StoreError> {
        each!(self, s => s.certificate(serial).await)
    }
    async fn tokens(&self) -> Result<Vec<JoinToken>, StoreError> {
        each!(self, s => s.tokens().await)
    }
    async fn entries(&self) -> Result<Vec<Entry>, StoreError> {
        each!(self, s => s.entries().await)
    }
    async fn nodes(&self) -> Result<Vec<Node>, StoreError> {
        each!(self, s => s.nodes().await)
    }
    async fn audit(&self, after_seq: i64, limit: i64) -> Result<Vec<AuditRow>, StoreError> {
        each!(self, s => s.audit(after_seq, limit).await)
    }
    async fn verify_audit(&self, expect: Option<&AuditHead>) -> Result<AuditVerdict, StoreError> {
        each!(self, s => s.verify_audit(expect).await)
    }
    async fn audit_head(&self) -> Result<Option<AuditHead>, StoreError> {
        each!(self, s => s.audit_head().await)
    }
    async fn audit_has(&self, action: &str, subject: &str) -> Result<bool, StoreError> {
        each!(self, s => s.audit_has(action, subject).await)
    }
    async fn counts(&self) -> Result<Counts, StoreError> {
        each!(self, s => s.counts().await)
    }
    fn shared(&self) -> bool {
        each!(self, s => s.shared())
    }
    async fn try_lease(&self, name: &str, ttl: i64) -> Result<bool, StoreError> {
        each!(self, s => s.try_lease(name, ttl).await)
    }
    async fn leases(&self) -> Result<Vec<Lease>, StoreError> {
        each!(self, s => s.leases().await)
    }
    fn describe(&self) -> serde_json::Value {
        each!(self, s => s.describe())
    }
}
