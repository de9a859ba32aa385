//! The embedded store: SQLite in WAL mode with `synchronous=FULL` (a commit survives power
//! loss), versioned migrations, and one writer thread that drains every pending write into a
//! single transaction (group commit). Reads use their own connection; WAL lets them run beside
//! the writer.
//!
//! Why this is one file of over 500 lines: the `Store` implementation and its writer thread share
//! one connection, the migrations and the audit chain's append; `postgres.rs` has the same shape,
//! so the two backends read side by side, method by method. What they do alike around their SQL
//! (reading rows, the token check, the answer to a write) is in `common.rs`.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::thread;

use rusqlite::{Connection, OpenFlags, OptionalExtension, Params, Row, Statement, params};
use tokio::sync::{mpsc, oneshot};

use super::common::{self, Cell, TokenState, found, kind_str, unix_now};
use super::{
    AuditEvent, AuditHead, AuditKey, AuditRow, AuditVerdict, CaKeyRecord, CertRecord, ChainCheck,
    Counts, Entry, IssuedCert, JoinToken, Node, Outcome, Store, StoreError, Write,
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

pub use super::common::AUDIT_KEYED;

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

impl<T: rusqlite::types::FromSql> Cell<T> for Row<'_> {
    fn cell(&self, i: usize) -> Result<T, StoreError> {
        self.get(i).map_err(db)
    }
}

/// Every row `stmt` returns for `params`, each read by `read`.
fn all<'s, T>(
    stmt: &'s mut Statement<'_>,
    params: impl Params,
    read: impl Fn(&Row<'s>) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    let mut rows = stmt.query(params).map_err(db)?;
    let mut out = Vec::new();
    while let Some(r) = rows.next().map_err(db)? {
        out.push(read(r)?);
    }
    Ok(out)
}

/// The first row `stmt` returns for `params`, read by `read`.
fn first<'s, T>(
    stmt: &'s mut Statement<'_>,
    params: impl Params,
    read: impl FnOnce(&Row<'s>) -> Result<T, StoreError>,
) -> Result<Option<T>, StoreError> {
    let mut rows = stmt.query(params).map_err(db)?;
    rows.next().map_err(db)?.map(read).transpose()
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

/// Whether the chain needs an `audit.keyed` row first: see [`common::newest_row_state`].
fn newest_row_state(conn: &Connection, key: &AuditKey) -> Result<Option<i64>, StoreError> {
    let mut stmt = conn
        .prepare(
            "SELECT seq, at, action, subject, outcome, detail, prev_hash, hash FROM audit
             ORDER BY seq DESC LIMIT 1",
        )
        .map_err(db)?;
    let newest = first(&mut stmt, [], common::audit_parts)?;
    common::newest_row_state(key, newest)
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
    let common::Link { seq, detail, hash } = common::next_link(key, e, last);
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

/// Runs one cached statement; the number of rows it changed.
fn exec(tx: &Connection, sql: &str, params: impl Params) -> rusqlite::Result<u64> {
    Ok(tx.prepare_cached(sql)?.execute(params)? as u64)
}

/// Applies one write inside its transaction: its own rows, then its audit row.
fn apply(
    tx: &Connection,
    key: &AuditKey,
    op: &Write,
    last: &mut (i64, [u8; 32]),
) -> rusqlite::Result<Outcome> {
    let early = change(tx, op)?;
    common::settle(op, early, |e| append_audit(tx, key, e, last))
}

/// A write's own rows; `Some` when it ends without them (see [`common::settle`]).
fn change(tx: &Connection, op: &Write) -> rusqlite::Result<Option<Outcome>> {
    match op {
        Write::Issue { cert, node, .. } => {
            insert_cert(tx, cert)?;
            if let Some(node) = node {
                upsert_node(tx, node)?;
            }
            Ok(None)
        }
        Write::JoinIssue {
            token_id,
            token_hash,
            now,
            cert,
            node,
            ..
        } => {
            let row: Option<TokenState> = tx
                .prepare_cached(
                    "SELECT hash, expires_at, used_at, revoked_at FROM join_tokens WHERE id = ?1",
                )?
                .query_row(params![token_id], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })
                .optional()?;
            if let Some(r) = common::token_refusal(row, token_hash, *now) {
                return Ok(Some(Outcome::TokenRefused(r)));
            }
            exec(
                tx,
                "UPDATE join_tokens SET used_at = ?1 WHERE id = ?2",
                params![now, token_id],
            )?;
            insert_cert(tx, cert)?;
            // A node re-attesting with a new token after eviction is a new decision by an
            // operator (they made the token), so it clears the eviction.
            exec(
                tx,
                "INSERT INTO nodes (spiffe_id, name, attested_at, last_issued_at, evicted_at)
                 VALUES (?1, ?2, ?3, ?4, NULL)
                 ON CONFLICT(spiffe_id) DO UPDATE SET attested_at = excluded.attested_at,
                   last_issued_at = excluded.last_issued_at, evicted_at = NULL",
                params![
                    node.spiffe_id,
                    node.name,
                    node.attested_at,
                    node.last_issued_at
                ],
            )?;
            Ok(None)
        }
        Write::Audit(_) => Ok(None),
        Write::Probe => {
            // Rewrites the header's user_version with its own value: a real page write (and
            // fsync at commit) without a table of its own.
            let v: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
            tx.execute_batch(&format!("PRAGMA user_version = {v}"))?;
            Ok(None)
        }
        Write::CreateToken(t, _) => {
            exec(
                tx,
                "INSERT INTO join_tokens (hash, id, name, created_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![&t.hash[..], t.id, t.name, t.created_at, t.expires_at],
            )?;
            Ok(None)
        }
        Write::RevokeToken { id, now, .. } => {
            let n = exec(
                tx,
                "UPDATE join_tokens SET revoked_at = ?1 WHERE id = ?2 AND revoked_at IS NULL",
                params![now, id],
            )?;
            Ok(found(n))
        }
        Write::PutEntry(e, _) => {
            exec(
                tx,
                "INSERT INTO entries (id, spiffe_id, parent_id, selectors, ttl, dns, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    e.id,
                    e.spiffe_id,
                    e.parent_id,
                    common::json_list(&e.selectors),
                    common::ttl_column(e.ttl),
                    common::json_list(&e.dns),
                    e.created_at
                ],
            )?;
            Ok(None)
        }
        Write::DeleteEntry { id, .. } => {
            let n = exec(tx, "DELETE FROM entries WHERE id = ?1", params![id])?;
            Ok(found(n))
        }
        Write::EvictNode { spiffe_id, now, .. } => {
            let n = exec(
                tx,
                "UPDATE nodes SET evicted_at = ?1 WHERE spiffe_id = ?2 AND evicted_at IS NULL",
                params![now, spiffe_id],
            )?;
            Ok(found(n))
        }
        Write::PutCaKey(k, _) => {
            exec(tx, "INSERT INTO ca_keys (id, kind, cert_der, sealed_key, not_before, not_after, activate_at, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)", params![
                k.id,
                kind_str(k.kind),
                k.cert_der,
                k.sealed_key,
                k.not_before,
                k.not_after,
                k.activate_at,
                k.created_at
            ])?;
            Ok(None)
        }
        Write::ResealCaKey { id, sealed_key, .. } => {
            let n = exec(
                tx,
                "UPDATE ca_keys SET sealed_key = ?1 WHERE id = ?2",
                params![sealed_key, id],
            )?;
            Ok(found(n))
        }
        Write::ActivateCaKey {
            id,
            activate_at,
            sealed_key,
            ..
        } => {
            let n = exec(
                tx,
                "UPDATE ca_keys SET activate_at = ?1, sealed_key = ?2 WHERE id = ?3",
                params![activate_at, sealed_key, id],
            )?;
            Ok(found(n))
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
        self.read(ca_keys)
    }

    async fn token(&self, id: &str) -> Result<Option<JoinToken>, StoreError> {
        self.read(|c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT hash, id, name, created_at, expires_at, used_at, revoked_at FROM join_tokens WHERE id = ?1",
                )
                .map_err(db)?;
            first(&mut stmt, params![id], common::token)
        })
    }

    async fn certificate(&self, serial: &[u8]) -> Result<Option<CertRecord>, StoreError> {
        self.read(|c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT spiffe_id, kind, parent FROM certificates WHERE serial = ?1",
                )
                .map_err(db)?;
            first(&mut stmt, params![serial], common::cert_record)
        })
    }

    async fn tokens(&self) -> Result<Vec<JoinToken>, StoreError> {
        self.read(|c| {
            let mut stmt = c
                .prepare(
                    "SELECT hash, id, name, created_at, expires_at, used_at, revoked_at FROM join_tokens ORDER BY created_at",
                )
                .map_err(db)?;
            all(&mut stmt, [], common::token)
        })
    }

    async fn entries(&self) -> Result<Vec<Entry>, StoreError> {
        self.read(entries)
    }

    async fn nodes(&self) -> Result<Vec<Node>, StoreError> {
        self.read(nodes)
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

fn ca_keys(c: &Connection) -> Result<Vec<CaKeyRecord>, StoreError> {
    let mut stmt = c
        .prepare(
            "SELECT id, kind, cert_der, sealed_key, not_before, not_after, activate_at, created_at
             FROM ca_keys ORDER BY created_at, id",
        )
        .map_err(db)?;
    all(&mut stmt, [], common::ca_key)
}

fn entries(c: &Connection) -> Result<Vec<Entry>, StoreError> {
    let mut stmt = c
        .prepare("SELECT id, spiffe_id, parent_id, selectors, ttl, dns, created_at FROM entries ORDER BY created_at, id")
        .map_err(db)?;
    all(&mut stmt, [], common::entry)
}

fn nodes(c: &Connection) -> Result<Vec<Node>, StoreError> {
    let mut stmt = c
        .prepare("SELECT spiffe_id, name, attested_at, last_issued_at, evicted_at FROM nodes ORDER BY spiffe_id")
        .map_err(db)?;
    all(&mut stmt, [], common::node)
}

fn audit_rows(c: &Connection, after_seq: i64, limit: i64) -> Result<Vec<AuditRow>, StoreError> {
    let mut stmt = c
        .prepare(
            "SELECT seq, at, action, subject, outcome, detail, prev_hash, hash FROM audit
             WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )
        .map_err(db)?;
    all(&mut stmt, params![after_seq, limit], common::audit_row)
}

fn audit_head(c: &Connection) -> Result<Option<AuditHead>, StoreError> {
    let mut stmt = c
        .prepare("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
        .map_err(db)?;
    first(&mut stmt, [], common::audit_head)
}

/// Walks the whole chain in order, in one query (the rules: [`ChainCheck`]).
fn verify_audit(
    c: &Connection,
    key: &AuditKey,
    expect: Option<&AuditHead>,
) -> Result<AuditVerdict, StoreError> {
    let mut stmt = c
        .prepare("SELECT seq, at, action, subject, outcome, detail, prev_hash, hash FROM audit ORDER BY seq")
        .map_err(db)?;
    let mut walk = stmt.query([]).map_err(db)?;
    let mut check = ChainCheck::new(key, expect);
    while let Some(r) = walk.next().map_err(db)? {
        let (seq, event, detail, prev, stored) = common::audit_parts(r)?;
        if let Some(verdict) = check.push(seq, &event, &detail, &prev, &stored) {
            return Ok(verdict);
        }
    }
    Ok(check.finish())
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
        let ca_keys = ca_keys(c)?;
        let tokens = all(
            &mut c
                .prepare(
                    "SELECT hash, id, name, created_at, expires_at, used_at, revoked_at FROM join_tokens ORDER BY created_at, id",
                )
                .map_err(db)?,
            [],
            common::token,
        )?;
        let entries = entries(c)?;
        let nodes = nodes(c)?;
        let certificates = all(
            &mut c
                .prepare("SELECT serial, spiffe_id, kind, not_after, issued_at, parent FROM certificates ORDER BY issued_at")
                .map_err(db)?,
            [],
            common::cert_row,
        )?;
        let audit = all(
            &mut c
                .prepare("SELECT seq, at, action, subject, outcome, detail, prev_hash, hash FROM audit ORDER BY seq")
                .map_err(db)?,
            [],
            common::audit_parts,
        )?;
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
