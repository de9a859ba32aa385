//! The embedded store: SQLite in WAL mode with `synchronous=FULL` (a commit survives power
//! loss), versioned migrations, and one writer thread that drains every pending write into a
//! single transaction (group commit). Reads use their own connection; WAL lets them run beside
//! the writer.
//!
//! Why this is one file of over 500 lines: the `Store` implementation and its writer thread share
//! one connection, the migrations and the audit chain's append; `postgres.rs` has the same shape,
//! so the two backends read side by side, method by method.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::thread;

use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, params};
use subtle::ConstantTimeEq;
use tokio::sync::{mpsc, oneshot};

use super::{
    AuditEvent, AuditHead, AuditKey, AuditRow, AuditVerdict, CaKeyRecord, CertRecord, Counts,
    Entry, IssuedCert, JoinToken, KeyKind, Node, Outcome, Store, StoreError, TokenRefusal, Write,
    audit_mac, audit_mac_ok, hex, legacy_audit_hash,
};

/// The most writes folded into one transaction.
const MAX_GROUP: usize = 2048;

/// Schema versions, applied in order; `PRAGMA user_version` records how far a database got.
const MIGRATIONS: &[&str] = &[
    // 1: the initial schema.
    "CREATE TABLE ca_keys (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        cert_der BLOB,
        sealed_key BLOB NOT NULL,
        not_before INTEGER NOT NULL,
        not_after INTEGER NOT NULL,
        activate_at INTEGER NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE join_tokens (
        hash BLOB PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        name TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        used_at INTEGER,
        revoked_at INTEGER
    );
    CREATE TABLE nodes (
        spiffe_id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        attested_at INTEGER NOT NULL,
        last_issued_at INTEGER NOT NULL,
        evicted_at INTEGER
    );
    CREATE TABLE entries (
        id TEXT PRIMARY KEY,
        spiffe_id TEXT NOT NULL,
        parent_id TEXT NOT NULL,
        selectors TEXT NOT NULL,
        ttl INTEGER,
        dns TEXT NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE INDEX entries_parent ON entries(parent_id);
    CREATE TABLE certificates (
        serial BLOB PRIMARY KEY,
        spiffe_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        not_after INTEGER NOT NULL,
        issued_at INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE audit (
        seq INTEGER PRIMARY KEY,
        at INTEGER NOT NULL,
        action TEXT NOT NULL,
        subject TEXT NOT NULL,
        outcome TEXT NOT NULL,
        detail TEXT NOT NULL,
        prev_hash BLOB NOT NULL,
        hash BLOB NOT NULL
    );",
    // 2: the node each workload SVID was issued through, so renewals follow evictions.
    "ALTER TABLE certificates ADD COLUMN parent TEXT;",
];

/// The action of the row that starts the keyed chain in a database an older kith began.
pub const AUDIT_KEYED: &str = "audit.keyed";

pub struct SqliteStore {
    path: PathBuf,
    key: AuditKey,
    reader: Mutex<Connection>,
    tx: mpsc::UnboundedSender<Job>,
}

struct Job {
    op: Write,
    reply: oneshot::Sender<Result<Outcome, StoreError>>,
}

fn db(e: rusqlite::Error) -> StoreError {
    StoreError::Db(e.to_string())
}

impl SqliteStore {
    /// Opens (creating and migrating if needed) `<dir>/kith-ca.db` and starts the writer. Audit
    /// rows are chained with `key`'s MAC.
    ///
    /// A database whose newest audit row is a plain SHA-256 chain (an older kith wrote it) gets
    /// an `audit.keyed` row that starts the MAC chain; the rows before it stay checkable as the
    /// plain chain they are. A newest row that verifies neither way means a wrong
    /// key-encryption key (or an altered row): the store refuses to open rather than append
    /// rows nobody could verify.
    pub fn open(dir: &Path, key: AuditKey) -> Result<Self, StoreError> {
        let path = dir.join("kith-ca.db");
        let mut conn = open_conn(&path, false)?;
        migrate(&mut conn)?;
        let mut last = last_hash(&conn)?;
        if let Some(legacy_rows) = newest_row_state(&conn, &key)? {
            let event = AuditEvent {
                at: unix_now(),
                action: AUDIT_KEYED.into(),
                subject: "audit".into(),
                outcome: "ok".into(),
                detail: serde_json::json!({ "legacy_rows": legacy_rows }),
            };
            let tx = conn.transaction().map_err(db)?;
            append_audit(&tx, &key, &event, &mut last).map_err(db)?;
            tx.commit().map_err(db)?;
        }
        let reader = open_conn(&path, true)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let writer_key = key.clone();
        thread::Builder::new()
            .name("kith-ca-store".into())
            .spawn(move || writer(conn, writer_key, rx, last))
            .map_err(|e| StoreError::Db(format!("cannot start the writer thread: {e}")))?;
        Ok(Self {
            path,
            key,
            reader: Mutex::new(reader),
            tx,
        })
    }

    /// Opens an existing database read-only, e.g. for `kith ca audit verify` while the CA is
    /// stopped. No writer is started. Verifying needs the audit key (from the KEK); reading
    /// rows and the head does not.
    pub fn open_read_only(dir: &Path) -> Result<ReadOnly, StoreError> {
        let path = dir.join("kith-ca.db");
        if !path.exists() {
            return Err(StoreError::Db(format!(
                "no CA database at {}",
                path.display()
            )));
        }
        let conn =
            Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(db)?;
        Ok(ReadOnly { conn })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn read<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let conn = self
            .reader
            .lock()
            .map_err(|_| StoreError::Db("reader lock poisoned".into()))?;
        f(&conn)
    }
}

/// A read-only view for offline checks.
pub struct ReadOnly {
    conn: Connection,
}

impl ReadOnly {
    pub fn verify_audit(
        &self,
        key: &AuditKey,
        expect: Option<&AuditHead>,
    ) -> Result<AuditVerdict, StoreError> {
        verify_audit(&self.conn, key, expect)
    }

    pub fn audit_head(&self) -> Result<Option<AuditHead>, StoreError> {
        audit_head(&self.conn)
    }

    pub fn audit(&self, after_seq: i64, limit: i64) -> Result<Vec<AuditRow>, StoreError> {
        audit_rows(&self.conn, after_seq, limit)
    }
}

fn open_conn(path: &Path, read_only: bool) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(db)?;
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
        .map_err(db)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Db(format!(
            "cannot enable WAL (journal_mode is {mode})"
        )));
    }
    // SECURITY/durability: FULL syncs the WAL on every commit, so an acknowledged issuance and
    // its audit row survive a crash or power loss.
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(db)?;
    conn.pragma_update(None, "foreign_keys", "ON").map_err(db)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(db)?;
    if read_only {
        conn.pragma_update(None, "query_only", "ON").map_err(db)?;
    }
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(db)?;
    let known = MIGRATIONS.len() as i64;
    if version > known {
        return Err(StoreError::Migration(format!(
            "database schema version {version} is newer than this kith ({known}); upgrade kith"
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.transaction().map_err(db)?;
        tx.execute_batch(sql)
            .map_err(|e| StoreError::Migration(format!("step {}: {e}", i + 1)))?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)
            .map_err(db)?;
        tx.commit().map_err(db)?;
    }
    Ok(())
}

fn last_hash(conn: &Connection) -> Result<(i64, [u8; 32]), StoreError> {
    let row: Option<(i64, Vec<u8>)> = conn
        .query_row(
            "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
        .map_err(db)?;
    match row {
        None => Ok((0, [0u8; 32])),
        Some((seq, h)) => {
            let hash = h.try_into().map_err(|_| StoreError::Corrupt {
                table: "audit",
                detail: format!("row {seq} has a hash that is not 32 bytes"),
            })?;
            Ok((seq, hash))
        }
    }
}

/// Whether the chain needs an `audit.keyed` row before this key's rows: `Some(rows)` when the
/// newest row is a legacy plain hash; `None` when the chain is empty or already keyed.
fn newest_row_state(conn: &Connection, key: &AuditKey) -> Result<Option<i64>, StoreError> {
    let row = conn
        .query_row(
            "SELECT seq, at, action, subject, outcome, detail, prev_hash, hash FROM audit
             ORDER BY seq DESC LIMIT 1",
            [],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    AuditEvent {
                        at: r.get(1)?,
                        action: r.get(2)?,
                        subject: r.get(3)?,
                        outcome: r.get(4)?,
                        detail: serde_json::Value::Null,
                    },
                    r.get::<_, String>(5)?,
                    r.get::<_, Vec<u8>>(6)?,
                    r.get::<_, Vec<u8>>(7)?,
                ))
            },
        )
        .optional()
        .map_err(db)?;
    let Some((seq, event, detail, prev, stored)) = row else {
        return Ok(None);
    };
    let prev: [u8; 32] = prev.try_into().map_err(|_| StoreError::Corrupt {
        table: "audit",
        detail: format!("row {seq} has a previous hash that is not 32 bytes"),
    })?;
    if audit_mac_ok(key, &prev, seq, &event, &detail, &stored) {
        return Ok(None);
    }
    if legacy_audit_hash(&prev, seq, &event, &detail).as_slice() == stored.as_slice() {
        return Ok(Some(seq));
    }
    Err(StoreError::Corrupt {
        table: "audit",
        detail: format!(
            "the newest row ({seq}) does not verify under this key-encryption key: the KEK is not the one this CA was started with, or the row was altered (`kith ca audit verify` with the right KEK says which)"
        ),
    })
}

/// The writer loop: take one job, drain whatever else is waiting, apply them all in one
/// transaction (each in its own savepoint, so one failing op does not sink the others), commit
/// once, then answer everyone.
fn writer(
    mut conn: Connection,
    key: AuditKey,
    mut rx: mpsc::UnboundedReceiver<Job>,
    mut last: (i64, [u8; 32]),
) {
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_GROUP);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let start = last;
        // Fast path: the whole group in one transaction, one fsync.
        let mut results = Vec::with_capacity(batch.len());
        let grouped = (|| -> Result<(), rusqlite::Error> {
            let tx = conn.transaction()?;
            for job in &batch {
                results.push(apply(&tx, &key, &job.op, &mut last)?);
            }
            tx.commit()
        })();
        let results: Vec<Result<Outcome, StoreError>> = match grouped {
            Ok(()) => results.into_iter().map(Ok).collect(),
            Err(_) => {
                // One write failed (or the commit did): the group was rolled back. Apply each
                // write alone so only the failing one fails.
                last = start;
                batch
                    .iter()
                    .map(|job| {
                        let before = last;
                        let alone = (|| -> Result<Outcome, rusqlite::Error> {
                            let tx = conn.transaction()?;
                            let outcome = apply(&tx, &key, &job.op, &mut last)?;
                            tx.commit()?;
                            Ok(outcome)
                        })();
                        alone.map_err(|e| {
                            last = before;
                            db(e)
                        })
                    })
                    .collect()
            }
        };
        for (job, result) in batch.drain(..).zip(results) {
            let _ = job.reply.send(result);
        }
    }
}

fn append_audit(
    tx: &Connection,
    key: &AuditKey,
    e: &AuditEvent,
    last: &mut (i64, [u8; 32]),
) -> rusqlite::Result<()> {
    let seq = last.0 + 1;
    let detail = e.detail.to_string();
    let hash = audit_mac(key, &last.1, seq, e, &detail);
    tx.prepare_cached(
        "INSERT INTO audit (seq, at, action, subject, outcome, detail, prev_hash, hash)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        seq,
        e.at,
        e.action,
        e.subject,
        e.outcome,
        detail,
        &last.1[..],
        &hash[..]
    ])?;
    *last = (seq, hash);
    Ok(())
}

fn insert_cert(tx: &Connection, c: &IssuedCert) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO certificates (serial, spiffe_id, kind, not_after, issued_at, parent) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![c.serial, c.spiffe_id, c.kind, c.not_after, c.issued_at, c.parent])?;
    Ok(())
}

fn upsert_node(tx: &Connection, n: &Node) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO nodes (spiffe_id, name, attested_at, last_issued_at, evicted_at)
         VALUES (?1, ?2, ?3, ?4, NULL)
         ON CONFLICT(spiffe_id) DO UPDATE SET last_issued_at = excluded.last_issued_at",
    )?
    .execute(params![
        n.spiffe_id,
        n.name,
        n.attested_at,
        n.last_issued_at
    ])?;
    Ok(())
}

/// A join token's stored hash, expiry, use and revocation times.
type TokenState = (Vec<u8>, i64, Option<i64>, Option<i64>);

/// Applies one write inside its savepoint (which derefs to the connection).
fn apply(
    tx: &Connection,
    key: &AuditKey,
    op: &Write,
    last: &mut (i64, [u8; 32]),
) -> rusqlite::Result<Outcome> {
    match op {
        Write::Issue { cert, node, audit } => {
            insert_cert(tx, cert)?;
            if let Some(node) = node {
                upsert_node(tx, node)?;
            }
            append_audit(tx, key, audit, last)?;
            Ok(Outcome::Done)
        }
        Write::JoinIssue {
            token_id,
            token_hash,
            now,
            cert,
            node,
            audit,
        } => {
            let row: Option<TokenState> = tx
                .prepare_cached(
                    "SELECT hash, expires_at, used_at, revoked_at FROM join_tokens WHERE id = ?1",
                )?
                .query_row(params![token_id], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })
                .optional()?;
            // SECURITY: constant-time comparison of the secret's hash.
            let row = row.filter(|(h, ..)| bool::from(h.as_slice().ct_eq(&token_hash[..])));
            let row = row.map(|(_, e, u, r)| (e, u, r));
            let refusal = match row {
                None => Some(TokenRefusal::Unknown),
                Some((_, _, Some(_))) => Some(TokenRefusal::Revoked),
                Some((_, Some(_), _)) => Some(TokenRefusal::Used),
                Some((expires, _, _)) if expires <= *now => Some(TokenRefusal::Expired),
                _ => None,
            };
            if let Some(r) = refusal {
                return Ok(Outcome::TokenRefused(r));
            }
            tx.prepare_cached("UPDATE join_tokens SET used_at = ?1 WHERE id = ?2")?
                .execute(params![now, token_id])?;
            insert_cert(tx, cert)?;
            // A node re-attesting with a new token after eviction is a new decision by an
            // operator (they made the token), so it clears the eviction.
            tx.prepare_cached(
                "INSERT INTO nodes (spiffe_id, name, attested_at, last_issued_at, evicted_at)
                 VALUES (?1, ?2, ?3, ?4, NULL)
                 ON CONFLICT(spiffe_id) DO UPDATE SET attested_at = excluded.attested_at,
                   last_issued_at = excluded.last_issued_at, evicted_at = NULL",
            )?
            .execute(params![
                node.spiffe_id,
                node.name,
                node.attested_at,
                node.last_issued_at
            ])?;
            append_audit(tx, key, audit, last)?;
            Ok(Outcome::Done)
        }
        Write::Audit(e) => {
            append_audit(tx, key, e, last)?;
            Ok(Outcome::Done)
        }
        Write::Probe => {
            // Rewrites the header's user_version with its own value: a real page write (and
            // fsync at commit) without a table of its own.
            let v: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
            tx.execute_batch(&format!("PRAGMA user_version = {v}"))?;
            Ok(Outcome::Done)
        }
        Write::CreateToken(t, audit) => {
            tx.prepare_cached(
                "INSERT INTO join_tokens (hash, id, name, created_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![&t.hash[..], t.id, t.name, t.created_at, t.expires_at])?;
            append_audit(tx, key, audit, last)?;
            Ok(Outcome::Done)
        }
        Write::RevokeToken { id, now, audit } => {
            let n = tx
                .prepare_cached(
                    "UPDATE join_tokens SET revoked_at = ?1 WHERE id = ?2 AND revoked_at IS NULL",
                )?
                .execute(params![now, id])?;
            if n == 0 {
                return Ok(Outcome::NotFound);
            }
            append_audit(tx, key, audit, last)?;
            Ok(Outcome::Done)
        }
        Write::PutEntry(e, audit) => {
            tx.prepare_cached(
                "INSERT INTO entries (id, spiffe_id, parent_id, selectors, ttl, dns, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                e.id,
                e.spiffe_id,
                e.parent_id,
                serde_json::to_string(&e.selectors).unwrap_or_default(),
                e.ttl.map(|t| t as i64),
                serde_json::to_string(&e.dns).unwrap_or_default(),
                e.created_at
            ])?;
            append_audit(tx, key, audit, last)?;
            Ok(Outcome::Done)
        }
        Write::DeleteEntry { id, audit } => {
            let n = tx
                .prepare_cached("DELETE FROM entries WHERE id = ?1")?
                .execute(params![id])?;
            if n == 0 {
                return Ok(Outcome::NotFound);
            }
            append_audit(tx, key, audit, last)?;
            Ok(Outcome::Done)
        }
        Write::EvictNode {
            spiffe_id,
            now,
            audit,
        } => {
            let n = tx
                .prepare_cached(
                    "UPDATE nodes SET evicted_at = ?1 WHERE spiffe_id = ?2 AND evicted_at IS NULL",
                )?
                .execute(params![now, spiffe_id])?;
            if n == 0 {
                return Ok(Outcome::NotFound);
            }
            append_audit(tx, key, audit, last)?;
            Ok(Outcome::Done)
        }
        Write::PutCaKey(k, audit) => {
            tx.prepare_cached(
                "INSERT INTO ca_keys (id, kind, cert_der, sealed_key, not_before, not_after, activate_at, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?
            .execute(params![
                k.id,
                kind_str(k.kind),
                k.cert_der,
                k.sealed_key,
                k.not_before,
                k.not_after,
                k.activate_at,
                k.created_at
            ])?;
            append_audit(tx, key, audit, last)?;
            Ok(Outcome::Done)
        }
        Write::ResealCaKey {
            id,
            sealed_key,
            audit,
        } => {
            let n = tx
                .prepare_cached("UPDATE ca_keys SET sealed_key = ?1 WHERE id = ?2")?
                .execute(params![sealed_key, id])?;
            if n == 0 {
                return Ok(Outcome::NotFound);
            }
            append_audit(tx, key, audit, last)?;
            Ok(Outcome::Done)
        }
        Write::ActivateCaKey {
            id,
            activate_at,
            sealed_key,
            audit,
        } => {
            let n = tx
                .prepare_cached(
                    "UPDATE ca_keys SET activate_at = ?1, sealed_key = ?2 WHERE id = ?3",
                )?
                .execute(params![activate_at, sealed_key, id])?;
            if n == 0 {
                return Ok(Outcome::NotFound);
            }
            append_audit(tx, key, audit, last)?;
            Ok(Outcome::Done)
        }
    }
}

impl Store for SqliteStore {
    async fn write(&self, op: Write) -> Result<Outcome, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job { op, reply })
            .map_err(|_| StoreError::WriterGone)?;
        rx.await.map_err(|_| StoreError::WriterGone)?
    }

    async fn ca_keys(&self) -> Result<Vec<CaKeyRecord>, StoreError> {
        self.read(|c| {
            let mut stmt = c
                .prepare(
                    "SELECT id, kind, cert_der, sealed_key, not_before, not_after, activate_at, created_at
                     FROM ca_keys ORDER BY created_at, id",
                )
                .map_err(db)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        CaKeyRecord {
                            id: r.get(0)?,
                            kind: KeyKind::Root,
                            cert_der: r.get(2)?,
                            sealed_key: r.get(3)?,
                            not_before: r.get(4)?,
                            not_after: r.get(5)?,
                            activate_at: r.get(6)?,
                            created_at: r.get(7)?,
                        },
                    ))
                })
                .map_err(db)?;
            let mut out = Vec::new();
            for row in rows {
                let (id, kind, mut rec) = row.map_err(db)?;
                rec.kind = parse_kind(&kind).ok_or_else(|| StoreError::Corrupt {
                    table: "ca_keys",
                    detail: format!("key {id} has unknown kind {kind:?}"),
                })?;
                out.push(rec);
            }
            Ok(out)
        })
    }

    async fn token(&self, id: &str) -> Result<Option<JoinToken>, StoreError> {
        self.read(|c| {
            c.prepare_cached(
                "SELECT hash, id, name, created_at, expires_at, used_at, revoked_at FROM join_tokens WHERE id = ?1",
            )
            .map_err(db)?
            .query_row(params![id], token_row)
            .optional()
            .map_err(db)
        })
    }

    async fn certificate(&self, serial: &[u8]) -> Result<Option<CertRecord>, StoreError> {
        self.read(|c| {
            c.prepare_cached("SELECT spiffe_id, kind, parent FROM certificates WHERE serial = ?1")
                .map_err(db)?
                .query_row(params![serial], |r| {
                    Ok(CertRecord {
                        spiffe_id: r.get(0)?,
                        kind: r.get(1)?,
                        parent: r.get(2)?,
                    })
                })
                .optional()
                .map_err(db)
        })
    }

    async fn tokens(&self) -> Result<Vec<JoinToken>, StoreError> {
        self.read(|c| {
            let mut stmt = c
                .prepare(
                    "SELECT hash, id, name, created_at, expires_at, used_at, revoked_at FROM join_tokens ORDER BY created_at",
                )
                .map_err(db)?;
            let rows = stmt.query_map([], token_row).map_err(db)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(db)
        })
    }

    async fn entries(&self) -> Result<Vec<Entry>, StoreError> {
        self.read(|c| {
            let mut stmt = c
                .prepare("SELECT id, spiffe_id, parent_id, selectors, ttl, dns, created_at FROM entries ORDER BY created_at, id")
                .map_err(db)?;
            let rows = stmt
                .query_map([], |r| {
                    let selectors: String = r.get(3)?;
                    let dns: String = r.get(5)?;
                    Ok(Entry {
                        id: r.get(0)?,
                        spiffe_id: r.get(1)?,
                        parent_id: r.get(2)?,
                        selectors: serde_json::from_str(&selectors).unwrap_or_default(),
                        ttl: r.get::<_, Option<i64>>(4)?.map(|t| t.max(0) as u64),
                        dns: serde_json::from_str(&dns).unwrap_or_default(),
                        created_at: r.get(6)?,
                    })
                })
                .map_err(db)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(db)
        })
    }

    async fn nodes(&self) -> Result<Vec<Node>, StoreError> {
        self.read(|c| {
            let mut stmt = c
                .prepare("SELECT spiffe_id, name, attested_at, last_issued_at, evicted_at FROM nodes ORDER BY spiffe_id")
                .map_err(db)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok(Node {
                        spiffe_id: r.get(0)?,
                        name: r.get(1)?,
                        attested_at: r.get(2)?,
                        last_issued_at: r.get(3)?,
                        evicted_at: r.get(4)?,
                    })
                })
                .map_err(db)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(db)
        })
    }

    async fn audit(&self, after_seq: i64, limit: i64) -> Result<Vec<AuditRow>, StoreError> {
        self.read(|c| audit_rows(c, after_seq, limit))
    }

    async fn verify_audit(&self, expect: Option<&AuditHead>) -> Result<AuditVerdict, StoreError> {
        self.read(|c| verify_audit(c, &self.key, expect))
    }

    async fn audit_head(&self) -> Result<Option<AuditHead>, StoreError> {
        self.read(audit_head)
    }

    async fn audit_has(&self, action: &str, subject: &str) -> Result<bool, StoreError> {
        self.read(|c| {
            c.query_row(
                "SELECT EXISTS (SELECT 1 FROM audit WHERE action = ?1 AND subject = ?2)",
                params![action, subject],
                |r| r.get::<_, bool>(0),
            )
            .map_err(db)
        })
    }

    async fn counts(&self) -> Result<Counts, StoreError> {
        self.read(|c| {
            let one = |sql: &str| c.query_row(sql, [], |r| r.get::<_, i64>(0)).map_err(db);
            Ok(Counts {
                issued: one("SELECT COUNT(*) FROM certificates")?,
                nodes: one("SELECT COUNT(*) FROM nodes WHERE evicted_at IS NULL")?,
                evicted_nodes: one("SELECT COUNT(*) FROM nodes WHERE evicted_at IS NOT NULL")?,
                entries: one("SELECT COUNT(*) FROM entries")?,
                active_tokens: one(&format!(
                    "SELECT COUNT(*) FROM join_tokens WHERE used_at IS NULL AND revoked_at IS NULL AND expires_at > {}",
                    unix_now()
                ))?,
                audit_rows: one("SELECT COUNT(*) FROM audit")?,
            })
        })
    }
}

fn token_row(r: &Row<'_>) -> rusqlite::Result<JoinToken> {
    let hash: Vec<u8> = r.get(0)?;
    let mut h = [0u8; 32];
    if hash.len() == 32 {
        h.copy_from_slice(&hash);
    }
    Ok(JoinToken {
        hash: h,
        id: r.get(1)?,
        name: r.get(2)?,
        created_at: r.get(3)?,
        expires_at: r.get(4)?,
        used_at: r.get(5)?,
        revoked_at: r.get(6)?,
    })
}

fn audit_rows(c: &Connection, after_seq: i64, limit: i64) -> Result<Vec<AuditRow>, StoreError> {
    let mut stmt = c
        .prepare(
            "SELECT seq, at, action, subject, outcome, detail, prev_hash, hash FROM audit
             WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )
        .map_err(db)?;
    let rows = stmt
        .query_map(params![after_seq, limit], |r| {
            let detail: String = r.get(5)?;
            Ok(AuditRow {
                seq: r.get(0)?,
                event: AuditEvent {
                    at: r.get(1)?,
                    action: r.get(2)?,
                    subject: r.get(3)?,
                    outcome: r.get(4)?,
                    detail: serde_json::from_str(&detail)
                        .unwrap_or(serde_json::Value::String(detail)),
                },
                prev_hash: hex(&r.get::<_, Vec<u8>>(6)?),
                hash: hex(&r.get::<_, Vec<u8>>(7)?),
            })
        })
        .map_err(db)?;
    rows.collect::<Result<Vec<_>, _>>().map_err(db)
}

fn audit_head(c: &Connection) -> Result<Option<AuditHead>, StoreError> {
    c.query_row(
        "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
        [],
        |r| {
            Ok(AuditHead {
                seq: r.get(0)?,
                hash: hex(&r.get::<_, Vec<u8>>(1)?),
            })
        },
    )
    .optional()
    .map_err(db)
}

/// Walks the whole chain in order. A row is broken when its sequence number skips (a row was
/// deleted), its stored previous MAC is not the MAC of the row before, or its own MAC does not
/// match its content under the audit key (it was edited, or the chain recomputed without the
/// key).
///
/// Rows an older kith wrote (a plain SHA-256 chain) are accepted only before the first keyed
/// row, and the newest row must be keyed: rewriting the whole log as a plain chain, or cutting
/// it back to its legacy part, does not verify. Deleting the newest keyed rows leaves a valid
/// shorter chain; `expect` (a head written down earlier) catches that.
fn verify_audit(
    c: &Connection,
    key: &AuditKey,
    expect: Option<&AuditHead>,
) -> Result<AuditVerdict, StoreError> {
    let mut stmt = c
        .prepare("SELECT seq, at, action, subject, outcome, detail, prev_hash, hash FROM audit ORDER BY seq")
        .map_err(db)?;
    let mut rows = stmt.query([]).map_err(db)?;
    let mut prev = [0u8; 32];
    let mut expected_seq = 1i64;
    let mut count = 0i64;
    let mut legacy_rows = 0i64;
    let mut keyed = false;
    let mut head = None;
    let mut expect_seen = false;
    while let Some(r) = rows.next().map_err(db)? {
        let seq: i64 = r.get(0).map_err(db)?;
        let detail: String = r.get(5).map_err(db)?;
        let event = AuditEvent {
            at: r.get(1).map_err(db)?,
            action: r.get(2).map_err(db)?,
            subject: r.get(3).map_err(db)?,
            outcome: r.get(4).map_err(db)?,
            detail: serde_json::Value::Null,
        };
        let stored_prev: Vec<u8> = r.get(6).map_err(db)?;
        let stored: Vec<u8> = r.get(7).map_err(db)?;
        count += 1;
        let legacy_so_far = legacy_rows;
        let broken = |why: String| {
            Ok(AuditVerdict {
                rows: count,
                first_broken: Some(seq),
                detail: Some(why),
                legacy_rows: legacy_so_far,
                head: None,
            })
        };
        if seq != expected_seq {
            return broken(format!("row {expected_seq} is missing (next row is {seq})"));
        }
        if stored_prev != prev {
            return broken("previous-hash does not match the row before".into());
        }
        if audit_mac_ok(key, &prev, seq, &event, &detail, &stored) {
            keyed = true;
        } else if !keyed
            && event.action != AUDIT_KEYED
            && legacy_audit_hash(&prev, seq, &event, &detail).as_slice() == stored.as_slice()
        {
            legacy_rows += 1;
        } else {
            return broken(
                "content does not match its MAC (the row was altered, or the key-encryption key is not this CA's)"
                    .into(),
            );
        }
        let hash = hex(&stored);
        if let Some(e) = expect
            && e.seq == seq
        {
            if e.hash != hash {
                return broken(format!(
                    "row {seq} is not the expected head {e}: the chain was rewritten from there"
                ));
            }
            expect_seen = true;
        }
        prev.copy_from_slice(&stored);
        head = Some(AuditHead { seq, hash });
        expected_seq += 1;
    }
    let mut verdict = AuditVerdict {
        rows: count,
        first_broken: None,
        detail: None,
        legacy_rows,
        head: head.clone(),
    };
    if count > 0 && !keyed {
        verdict.first_broken = Some(count);
        verdict.detail = Some(
            "no row is keyed: the whole chain is plain SHA-256, which anyone can recompute; start the CA once to key it, or the log was rewritten"
                .into(),
        );
    } else if let Some(e) = expect
        && !expect_seen
    {
        verdict.first_broken = Some(count + 1);
        verdict.detail = Some(format!(
            "the chain ends at row {count}, before the expected head {e}: rows were deleted"
        ));
    }
    Ok(verdict)
}

fn kind_str(k: KeyKind) -> &'static str {
    match k {
        KeyKind::Root => "root",
        KeyKind::Intermediate => "intermediate",
        KeyKind::Jwt => "jwt",
    }
}

fn parse_kind(s: &str) -> Option<KeyKind> {
    match s {
        "root" => Some(KeyKind::Root),
        "intermediate" => Some(KeyKind::Intermediate),
        "jwt" => Some(KeyKind::Jwt),
        _ => None,
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Everything a CA keeps, as stored, for `kith ca store migrate`.
pub struct Export {
    pub ca_keys: Vec<CaKeyRecord>,
    pub tokens: Vec<JoinToken>,
    pub entries: Vec<Entry>,
    pub nodes: Vec<Node>,
    /// serial, SPIFFE ID, kind, not-after, issued-at, parent.
    pub certificates: Vec<crate::store::CertRow>,
    /// seq, the event (detail unset), detail as its stored JSON text, previous MAC, MAC.
    pub audit: Vec<crate::store::RawAuditRow>,
}

impl ReadOnly {
    /// Reads every row of every table, unchanged (the audit rows byte for byte).
    pub fn export(&self) -> Result<Export, StoreError> {
        let c = &self.conn;
        let mut stmt = c
            .prepare(
                "SELECT id, kind, cert_der, sealed_key, not_before, not_after, activate_at, created_at
                 FROM ca_keys ORDER BY created_at, id",
            )
            .map_err(db)?;
        let mut ca_keys = Vec::new();
        let mut rows = stmt.query([]).map_err(db)?;
        while let Some(r) = rows.next().map_err(db)? {
            let id: String = r.get(0).map_err(db)?;
            let kind: String = r.get(1).map_err(db)?;
            ca_keys.push(CaKeyRecord {
                kind: parse_kind(&kind).ok_or_else(|| StoreError::Corrupt {
                    table: "ca_keys",
                    detail: format!("key {id} has unknown kind {kind:?}"),
                })?,
                id,
                cert_der: r.get(2).map_err(db)?,
                sealed_key: r.get(3).map_err(db)?,
                not_before: r.get(4).map_err(db)?,
                not_after: r.get(5).map_err(db)?,
                activate_at: r.get(6).map_err(db)?,
                created_at: r.get(7).map_err(db)?,
            });
        }
        let tokens = c
            .prepare(
                "SELECT hash, id, name, created_at, expires_at, used_at, revoked_at FROM join_tokens ORDER BY created_at, id",
            )
            .map_err(db)?
            .query_map([], token_row)
            .map_err(db)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db)?;
        let entries = c
            .prepare("SELECT id, spiffe_id, parent_id, selectors, ttl, dns, created_at FROM entries ORDER BY created_at, id")
            .map_err(db)?
            .query_map([], |r| {
                let selectors: String = r.get(3)?;
                let dns: String = r.get(5)?;
                Ok(Entry {
                    id: r.get(0)?,
                    spiffe_id: r.get(1)?,
                    parent_id: r.get(2)?,
                    selectors: serde_json::from_str(&selectors).unwrap_or_default(),
                    ttl: r.get::<_, Option<i64>>(4)?.map(|t| t.max(0) as u64),
                    dns: serde_json::from_str(&dns).unwrap_or_default(),
                    created_at: r.get(6)?,
                })
            })
            .map_err(db)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db)?;
        let nodes = c
            .prepare("SELECT spiffe_id, name, attested_at, last_issued_at, evicted_at FROM nodes ORDER BY spiffe_id")
            .map_err(db)?
            .query_map([], |r| {
                Ok(Node {
                    spiffe_id: r.get(0)?,
                    name: r.get(1)?,
                    attested_at: r.get(2)?,
                    last_issued_at: r.get(3)?,
                    evicted_at: r.get(4)?,
                })
            })
            .map_err(db)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db)?;
        let certificates = c
            .prepare("SELECT serial, spiffe_id, kind, not_after, issued_at, parent FROM certificates ORDER BY issued_at")
            .map_err(db)?
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?))
            })
            .map_err(db)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db)?;
        let audit = c
            .prepare("SELECT seq, at, action, subject, outcome, detail, prev_hash, hash FROM audit ORDER BY seq")
            .map_err(db)?
            .query_map([], |r| {
                Ok((
                    r.get(0)?,
                    AuditEvent {
                        at: r.get(1)?,
                        action: r.get(2)?,
                        subject: r.get(3)?,
                        outcome: r.get(4)?,
                        detail: serde_json::Value::Null,
                    },
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                ))
            })
            .map_err(db)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db)?;
        Ok(Export {
            ca_keys,
            tokens,
            entries,
            nodes,
            certificates,
            audit,
        })
    }
}
