//! The PostgreSQL store, for several CA replicas on one database.
//!
//! - **Connections**: a deadpool pool of tokio-postgres clients, TLS by rustls (see
//!   [`super::tls`]). A multi-host connection string with `target_session_attrs=read-write`
//!   finds the primary again after a standby is promoted: every new connection tries the hosts
//!   in order and keeps the first that takes writes.
//! - **Migrations**: versioned, in table `kith_migrations`, applied in one transaction under a
//!   transaction-scoped advisory lock, so replicas starting together apply each step once.
//! - **Group commit**: one writer task per replica drains every pending write into one
//!   transaction; issued certificates and audit rows of a group go in as one `UNNEST` insert
//!   each. A group costs two round trips, pipelined on one connection: `BEGIN`, the
//!   certificates and the head lock; then the audit rows with the head update, `COMMIT` and the
//!   durable commit below. The writer keeps its connection from group to group. (Starting the
//!   next group as soon as a `COMMIT` returned, before its flush, was tried: more, smaller
//!   groups cost PostgreSQL more CPU per write, and two replicas issued about 10 % less.)
//!   Under concurrent load a group waits up to [`LINGER`] for as many writes as the previous
//!   group had: PostgreSQL's cost per group is mostly fixed, so larger groups are what let two
//!   replicas outrun cfssl (`bench/ca.sh`: 0.89x before, 1.14x after, in runs of the same day).
//! - **One audit chain across replicas**: every write transaction locks the single row of
//!   `audit_head` (`FOR UPDATE`), so appends from all replicas are serialized and each one
//!   chains on the newest row whoever wrote it. Certificate rows of plain issuances go in
//!   before the lock (they conflict with nothing but a duplicate serial), so the lock covers
//!   only the audit rows.
//! - **Durable before acknowledged, without holding the chain during the fsync**: a group
//!   commits with `synchronous_commit` off for its transaction only, so the head row's lock is
//!   released as soon as the commit record is written, not after it is flushed: the other
//!   replicas chain on without waiting for this one's fsync. Right after its `COMMIT` the
//!   group's connection commits a small write of its own (a logical-decoding message) with the
//!   session's `synchronous_commit` (on, by default), and no writer of the group is answered
//!   before that returns: PostgreSQL flushes the WAL in order, so that flush covers every
//!   commit before it, the group's and any other replica's it chained on. A crash before the
//!   flush loses only unanswered groups, and always a suffix of the chain.
//! - **Join tokens are spent once**: the token row is locked (`FOR UPDATE`) before it is
//!   checked; a second replica waits, then sees it used.
//! - **Serials never collide**: `certificates.serial` is the primary key; a duplicate fails the
//!   write (and so the issuance, which the caller retries with a new random serial).
//! - **Leases**: rows of `leases` with an expiry; a replica renews its own, takes an expired
//!   one, and the holder is the only one that prepares keys.
//!
//! Why this is one file of over 500 lines: the `Store` implementation, the group-commit writer it
//! feeds and the importer share the connection pool, the statement set and the audit-head lock
//! protocol. `sqlite.rs` has the same shape, so the two backends read side by side, method by
//! method; what they do alike around their SQL (reading rows, the token check, the answer to a
//! write) is in `common.rs`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use deadpool_postgres::Transaction;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime, Timeouts};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::Row;

use super::common::{self, AUDIT_KEYED, Cell, found, kind_str, unix_now};
use super::tls::{MakeRustls, Verify, client_config, split_url};
use super::{
    AuditEvent, AuditHead, AuditKey, AuditRow, AuditVerdict, CaKeyRecord, CertRecord, ChainCheck,
    Counts, Entry, IssuedCert, JoinToken, Lease, Node, Outcome, Store, StoreError, Write,
};

/// The most writes folded into one transaction.
const MAX_GROUP: usize = 2048;
/// How long a group may wait for more writes once the previous group had several: under
/// concurrent load the callers answered by that group send their next writes within a moment,
/// and a group that takes them in spreads PostgreSQL's fixed cost per group (statements, two
/// commits, a WAL flush) over more writes. A lone write (the previous group had one) never
/// waits. Tokio's timer has millisecond resolution.
const LINGER: Duration = Duration::from_millis(1);
/// Connections per replica: the writer's (kept from group to group), and the reads of admin
/// calls, renewals and probes.
const POOL_SIZE: usize = 8;
/// How long a caller waits for a connection (or the database to answer a new one) before the
/// store reports itself unavailable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The advisory lock id of the migrations ("kith" in ASCII).
const MIGRATION_LOCK: i64 = 0x6b69_7468;
/// The advisory lock id of a replica's start ("kits").
const STARTUP_LOCK: i64 = 0x6b69_7473;

/// The statements of a write group (prepared once per connection).
const INSERT_CERTS: &str =
    "INSERT INTO certificates (serial, spiffe_id, kind, not_after, issued_at, parent)
     SELECT * FROM UNNEST($1::bytea[], $2::text[], $3::text[], $4::int8[], $5::int8[], $6::text[])";
const INSERT_AUDIT: &str = "INSERT INTO audit (seq, at, action, subject, outcome, detail, prev_hash, hash)
     SELECT * FROM UNNEST($1::int8[], $2::int8[], $3::text[], $4::text[], $5::text[], $6::text[], $7::bytea[], $8::bytea[])";
/// The audit rows of a group and the head that follows them, in one statement.
const INSERT_AUDIT_MOVE_HEAD: &str = "WITH rows AS (
       INSERT INTO audit (seq, at, action, subject, outcome, detail, prev_hash, hash)
       SELECT * FROM UNNEST($1::int8[], $2::int8[], $3::text[], $4::text[], $5::text[], $6::text[], $7::bytea[], $8::bytea[])
     )
     UPDATE audit_head SET seq = $9, hash = $10 WHERE id = 1";
const LOCK_HEAD: &str = "SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE";
const UPDATE_HEAD: &str = "UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1";
/// A group's transaction: its commit returns without waiting for the WAL flush (and so
/// releases the head row at once); the durable commit after it is awaited before anyone is
/// answered.
const BEGIN_GROUP: &str = "BEGIN; SET LOCAL synchronous_commit = off";
/// The durable commit after a group: a transaction of its own with the session's
/// `synchronous_commit`, which waits for the WAL flush up to its commit record (a transaction
/// that writes nothing would not). Its write is a transactional logical-decoding message: it
/// takes no lock, so the commits after concurrent groups (of this replica or another) wait for
/// no one and share their flushes, and it leaves no row behind.
const FLUSH: &str = "SELECT pg_logical_emit_message(true, 'kith', ''::text)";

/// Schema versions, applied in order; `kith_migrations` records which ran.
const MIGRATIONS: &[&str] = &[
    // 1: the schema of the SQLite store's version 2, plus what replicas share.
    "CREATE TABLE ca_keys (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        cert_der BYTEA,
        sealed_key BYTEA NOT NULL,
        not_before BIGINT NOT NULL,
        not_after BIGINT NOT NULL,
        activate_at BIGINT NOT NULL,
        created_at BIGINT NOT NULL
    );
    CREATE TABLE join_tokens (
        hash BYTEA PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        name TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        expires_at BIGINT NOT NULL,
        used_at BIGINT,
        revoked_at BIGINT
    );
    CREATE TABLE nodes (
        spiffe_id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        attested_at BIGINT NOT NULL,
        last_issued_at BIGINT NOT NULL,
        evicted_at BIGINT
    );
    CREATE TABLE entries (
        id TEXT PRIMARY KEY,
        spiffe_id TEXT NOT NULL,
        parent_id TEXT NOT NULL,
        selectors TEXT NOT NULL,
        ttl BIGINT,
        dns TEXT NOT NULL,
        created_at BIGINT NOT NULL
    );
    CREATE INDEX entries_parent ON entries(parent_id);
    CREATE TABLE certificates (
        serial BYTEA PRIMARY KEY,
        spiffe_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        not_after BIGINT NOT NULL,
        issued_at BIGINT NOT NULL,
        parent TEXT
    );
    CREATE TABLE audit (
        seq BIGINT PRIMARY KEY,
        at BIGINT NOT NULL,
        action TEXT NOT NULL,
        subject TEXT NOT NULL,
        outcome TEXT NOT NULL,
        detail TEXT NOT NULL,
        prev_hash BYTEA NOT NULL,
        hash BYTEA NOT NULL
    );
    CREATE INDEX audit_action ON audit(action, subject);
    CREATE TABLE audit_head (
        id INT PRIMARY KEY CHECK (id = 1),
        seq BIGINT NOT NULL,
        hash BYTEA NOT NULL
    );
    INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, decode(repeat('00', 32), 'hex'));
    CREATE TABLE leases (
        name TEXT PRIMARY KEY,
        replica TEXT NOT NULL,
        host TEXT NOT NULL,
        since BIGINT NOT NULL,
        expires_at BIGINT NOT NULL
    );
    CREATE TABLE probes (
        replica TEXT PRIMARY KEY,
        n BIGINT NOT NULL
    );",
];

pub struct PgStore {
    pool: Pool,
    key: AuditKey,
    tx: mpsc::UnboundedSender<Job>,
    replica: String,
    host: String,
    /// The connection string without credentials, for `status`.
    target: String,
    up: Arc<AtomicBool>,
    last_error_at: Arc<AtomicI64>,
}

struct Job {
    op: Write,
    reply: oneshot::Sender<Result<Outcome, StoreError>>,
}

fn db(e: tokio_postgres::Error) -> StoreError {
    // The server's own message (constraint, lock, shutdown) says more than the Display.
    match e.as_db_error() {
        Some(d) => StoreError::Db(format!("{}: {}", d.code().code(), d.message())),
        None => StoreError::Db(e.to_string()),
    }
}

impl<T: for<'a> tokio_postgres::types::FromSql<'a>> Cell<T> for Row {
    fn cell(&self, i: usize) -> Result<T, StoreError> {
        self.try_get(i).map_err(db)
    }
}

fn pool_err(e: deadpool_postgres::PoolError) -> StoreError {
    // The causes say what went wrong (refused, a certificate not trusted, a bad password).
    StoreError::Db(format!(
        "cannot reach the database: {}",
        identity::report::chain(&e)
    ))
}

/// Whether `s` is a PostgreSQL connection string (`postgres://` or `postgresql://`).
pub fn is_url(s: &str) -> bool {
    s.starts_with("postgres://") || s.starts_with("postgresql://")
}

/// The connection string with any password replaced, for logs and `status`.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (auth, tail) = match rest.split_once('@') {
        Some((a, t)) if !a.contains('/') => (Some(a), t),
        _ => (None, rest),
    };
    let tail = match tail.split_once('?') {
        Some((h, q)) => {
            let q: Vec<String> = q
                .split('&')
                .map(|p| match p.split_once('=') {
                    Some(("password", _)) => "password=REDACTED".to_owned(),
                    _ => p.to_owned(),
                })
                .collect();
            format!("{h}?{}", q.join("&"))
        }
        None => tail.to_owned(),
    };
    match auth {
        Some(a) => {
            let user = a.split_once(':').map_or(a, |(u, _)| u);
            format!("{scheme}://{user}@{tail}")
        }
        None => format!("{scheme}://{tail}"),
    }
}

impl PgStore {
    /// Connects, runs the migrations that are missing, checks the audit chain's newest row
    /// against this key-encryption key, and starts the writer. `replica` names this process in
    /// leases and probes.
    pub async fn open(url: &str, key: AuditKey, replica: &str) -> Result<Self, StoreError> {
        let pool = pool(url)?;
        let host = hostname();
        let mut client = pool.get().await.map_err(pool_err)?;
        migrate(&mut client).await?;
        // The newest row must verify under this key (else: a wrong KEK, or an altered row):
        // appending rows nobody could verify is refused, as in the SQLite store. A chain that
        // ends in plain rows (copied from an older kith's SQLite database) gets its
        // `audit.keyed` row first.
        if let Some(legacy_rows) = newest_row_state(&client, &key).await? {
            let tx = client.transaction().await.map_err(db)?;
            let mut pending = Pending::default();
            let mut last = lock_head(&tx).await?;
            let event = AuditEvent {
                at: unix_now(),
                action: AUDIT_KEYED.into(),
                subject: "audit".into(),
                outcome: "ok".into(),
                detail: serde_json::json!({ "legacy_rows": legacy_rows }),
            };
            pending.audit(&key, &event, &mut last);
            pending.flush(&tx, last).await?;
            tx.commit().await.map_err(db)?;
        }
        drop(client);
        let (tx, rx) = mpsc::unbounded_channel();
        let up = Arc::new(AtomicBool::new(true));
        let last_error_at = Arc::new(AtomicI64::new(0));
        let shared = Arc::new(Shared {
            pool: pool.clone(),
            key: key.clone(),
            replica: replica.to_owned(),
            up: up.clone(),
            last_error_at: last_error_at.clone(),
        });
        tokio::spawn(writer(shared, rx));
        Ok(Self {
            pool,
            key,
            tx,
            replica: replica.to_owned(),
            host,
            target: redact(url),
            up,
            last_error_at,
        })
    }

    /// Connects without starting a writer or touching the schema beyond the migrations: for
    /// `kith ca store migrate`, which copies rows in as they are.
    pub async fn open_for_import(url: &str) -> Result<Importer, StoreError> {
        let pool = pool(url)?;
        let mut client = pool.get().await.map_err(pool_err)?;
        migrate(&mut client).await?;
        Ok(Importer { client })
    }

    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// Holds a session advisory lock until the guard drops: replicas starting on an empty
    /// database take turns, so exactly one creates the root and the first keys and the others
    /// load them.
    pub async fn startup_lock(&self) -> Result<StartupLock, StoreError> {
        let client = self.client().await?;
        client
            .execute("SELECT pg_advisory_lock($1)", &[&STARTUP_LOCK])
            .await
            .map_err(db)?;
        Ok(StartupLock {
            client: Some(client),
        })
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        match self.pool.get().await {
            Ok(c) => Ok(c),
            Err(e) => {
                self.up.store(false, Ordering::Relaxed);
                self.last_error_at.store(unix_now(), Ordering::Relaxed);
                Err(pool_err(e))
            }
        }
    }

    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(sql).await.map_err(db)?;
        let rows = client.query(&stmt, params).await.map_err(db)?;
        self.up.store(true, Ordering::Relaxed);
        Ok(rows)
    }

    /// Every row `sql` returns, each read by `read`.
    async fn all<T>(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
        read: impl Fn(&Row) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        self.query(sql, params).await?.iter().map(read).collect()
    }

    /// The first row `sql` returns, read by `read`.
    async fn first<T>(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
        read: impl FnOnce(&Row) -> Result<T, StoreError>,
    ) -> Result<Option<T>, StoreError> {
        self.query(sql, params).await?.first().map(read).transpose()
    }
}

fn pool(url: &str) -> Result<Pool, StoreError> {
    let (pg_url, verify) = split_url(url)?;
    let mut config: tokio_postgres::Config = pg_url
        .parse()
        .map_err(|e| StoreError::Db(format!("the store's connection string: {e}")))?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_application_name().is_none() {
        config.application_name("kith-ca");
    }
    let loopback = config.get_hosts().iter().all(|h| match h {
        tokio_postgres::config::Host::Tcp(name) => {
            name == "localhost"
                || name
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|a| a.is_loopback())
        }
        tokio_postgres::config::Host::Unix(_) => true,
    });
    match (&verify, config.get_ssl_mode()) {
        (Verify::Full(_), _) => {}
        (Verify::None, tokio_postgres::config::SslMode::Disable) if loopback => {}
        (Verify::None, tokio_postgres::config::SslMode::Disable) => tracing::warn!(
            "sslmode=disable: the connection to the database is not encrypted; use sslmode=verify-full with sslrootcert"
        ),
        (Verify::None, _) => tracing::warn!(
            "the database's certificate is not verified (no sslrootcert): use sslmode=verify-full with sslrootcert=FILE"
        ),
    }
    let tls = MakeRustls::new(client_config(&verify)?);
    let manager = Manager::from_config(
        config,
        tls,
        ManagerConfig {
            // A connection whose server went away is closed (its task ended) and is dropped at
            // checkout; checking each one with a query would cost a round trip per write group.
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(POOL_SIZE)
        .runtime(Runtime::Tokio1)
        .timeouts(Timeouts {
            wait: Some(CONNECT_TIMEOUT),
            create: Some(CONNECT_TIMEOUT),
            recycle: Some(CONNECT_TIMEOUT),
        })
        .build()
        .map_err(|e| StoreError::Db(format!("connection pool: {e}")))
}

async fn migrate(client: &mut deadpool_postgres::Client) -> Result<(), StoreError> {
    let mig = |e: tokio_postgres::Error| StoreError::Migration(db(e).to_string());
    let tx = client.transaction().await.map_err(mig)?;
    // Replicas starting together: the first takes the lock and migrates, the others wait and
    // then find every step recorded.
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(mig)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS kith_migrations (
            version INT PRIMARY KEY,
            applied_at BIGINT NOT NULL
        )",
    )
    .await
    .map_err(mig)?;
    let version: i32 = tx
        .query_one("SELECT COALESCE(MAX(version), 0) FROM kith_migrations", &[])
        .await
        .map_err(mig)?
        .get(0);
    let known = MIGRATIONS.len() as i32;
    if version > known {
        return Err(StoreError::Migration(format!(
            "database schema version {version} is newer than this kith ({known}); upgrade kith"
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.batch_execute(sql)
            .await
            .map_err(|e| StoreError::Migration(format!("step {}: {}", i + 1, db(e))))?;
        tx.execute(
            "INSERT INTO kith_migrations (version, applied_at) VALUES ($1, $2)",
            &[&((i + 1) as i32), &unix_now()],
        )
        .await
        .map_err(mig)?;
    }
    tx.commit().await.map_err(mig)
}

/// Whether the chain needs an `audit.keyed` row first: see [`common::newest_row_state`].
async fn newest_row_state(
    client: &deadpool_postgres::Client,
    key: &AuditKey,
) -> Result<Option<i64>, StoreError> {
    let row = client
        .query_opt(
            "SELECT seq, at, action, subject, outcome, detail, prev_hash, hash FROM audit
             ORDER BY seq DESC LIMIT 1",
            &[],
        )
        .await
        .map_err(db)?;
    let newest = row.as_ref().map(common::audit_parts).transpose()?;
    common::newest_row_state(key, newest)
}

/// Locks the chain's head for this transaction; other replicas' writes wait until it ends.
async fn lock_head(tx: &Transaction<'_>) -> Result<(i64, [u8; 32]), StoreError> {
    let row = tx.query_one(LOCK_HEAD, &[]).await.map_err(db)?;
    head_of(&row)
}

/// The head row's sequence number and MAC.
fn head_of(row: &Row) -> Result<(i64, [u8; 32]), StoreError> {
    let seq: i64 = row.get(0);
    let hash: Vec<u8> = row.get(1);
    let hash = hash.try_into().map_err(|_| StoreError::Corrupt {
        table: "audit_head",
        detail: "the head hash is not 32 bytes".into(),
    })?;
    Ok((seq, hash))
}

/// Rows a group inserts in bulk.
#[derive(Default)]
struct Pending {
    serial: Vec<Vec<u8>>,
    spiffe_id: Vec<String>,
    kind: Vec<String>,
    not_after: Vec<i64>,
    issued_at: Vec<i64>,
    parent: Vec<Option<String>>,
    seq: Vec<i64>,
    at: Vec<i64>,
    action: Vec<String>,
    subject: Vec<String>,
    outcome: Vec<String>,
    detail: Vec<String>,
    prev_hash: Vec<Vec<u8>>,
    hash: Vec<Vec<u8>>,
}

impl Pending {
    fn cert(&mut self, c: &IssuedCert) {
        self.serial.push(c.serial.clone());
        self.spiffe_id.push(c.spiffe_id.clone());
        self.kind.push(c.kind.to_owned());
        self.not_after.push(c.not_after);
        self.issued_at.push(c.issued_at);
        self.parent.push(c.parent.clone());
    }

    fn audit(&mut self, key: &AuditKey, e: &AuditEvent, last: &mut (i64, [u8; 32])) {
        let common::Link { seq, detail, hash } = common::next_link(key, e, last);
        self.seq.push(seq);
        self.at.push(e.at);
        self.action.push(e.action.clone());
        self.subject.push(e.subject.clone());
        self.outcome.push(e.outcome.clone());
        self.detail.push(detail);
        self.prev_hash.push(last.1.to_vec());
        self.hash.push(hash.to_vec());
        *last = (seq, hash);
    }

    fn cert_params(&self) -> [&(dyn tokio_postgres::types::ToSql + Sync); 6] {
        [
            &self.serial,
            &self.spiffe_id,
            &self.kind,
            &self.not_after,
            &self.issued_at,
            &self.parent,
        ]
    }

    fn audit_params(&self) -> [&(dyn tokio_postgres::types::ToSql + Sync); 8] {
        [
            &self.seq,
            &self.at,
            &self.action,
            &self.subject,
            &self.outcome,
            &self.detail,
            &self.prev_hash,
            &self.hash,
        ]
    }

    /// Inserts the rows and moves the head, inside `tx` (startup and import: not the hot path).
    async fn flush(self, tx: &Transaction<'_>, last: (i64, [u8; 32])) -> Result<(), StoreError> {
        if !self.serial.is_empty() {
            exec(tx, INSERT_CERTS, &self.cert_params()).await?;
        }
        if !self.seq.is_empty() {
            exec(tx, INSERT_AUDIT, &self.audit_params()).await?;
            exec(tx, UPDATE_HEAD, &[&last.0, &last.1.as_slice()]).await?;
        }
        Ok(())
    }
}

/// What the writer works with.
struct Shared {
    pool: Pool,
    key: AuditKey,
    replica: String,
    up: Arc<AtomicBool>,
    last_error_at: Arc<AtomicI64>,
}

impl Shared {
    fn down(&self) {
        self.up.store(false, Ordering::Relaxed);
        self.last_error_at.store(unix_now(), Ordering::Relaxed);
    }
}

/// The writer task: take one job, drain whatever else waits, apply them in one transaction,
/// answer everyone once the commit is durable. When the group fails (one bad write, or the
/// database went away), each write is tried alone so only the failing ones fail. The writer
/// keeps its connection from group to group, and takes a new one when it died.
async fn writer(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<Job>) {
    let mut conn: Option<deadpool_postgres::Object> = None;
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_GROUP);
    let mut last_len = 0;
    while let Some(first) = rx.recv().await {
        batch.push(first);
        take_queued(&mut rx, &mut batch);
        if last_len > 1 && batch.len() < last_len {
            // Wait, briefly, for as many writes as the previous group had: the callers it
            // answered are sending their next ones.
            let deadline = tokio::time::Instant::now() + LINGER;
            while batch.len() < last_len {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(job)) => {
                        batch.push(job);
                        take_queued(&mut rx, &mut batch);
                    }
                    Ok(None) | Err(_) => break,
                }
            }
        }
        last_len = batch.len();
        if conn.as_ref().is_some_and(|c| c.is_closed()) {
            // A dead connection goes back to the pool closed; the pool drops it.
            conn = None;
        }
        let client = match &mut conn {
            Some(c) => c,
            slot => match shared.pool.get().await {
                Ok(c) => slot.insert(c),
                Err(e) => {
                    shared.down();
                    let e = pool_err(e);
                    for job in batch.drain(..) {
                        let _ = job.reply.send(Err(e.clone()));
                    }
                    continue;
                }
            },
        };
        let ops: Vec<&Write> = batch.iter().map(|j| &j.op).collect();
        let results = match apply_group(client, &shared, &ops).await {
            Ok(outcomes) => outcomes.into_iter().map(Ok).collect::<Vec<_>>(),
            Err(GroupError::Unconfirmed(e)) => ops.iter().map(|_| Err(e.clone())).collect(),
            // The connection is gone: every write of the group fails with its error.
            Err(GroupError::Failed(e)) if client.is_closed() => {
                ops.iter().map(|_| Err(e.clone())).collect()
            }
            Err(GroupError::Failed(_)) if ops.len() > 1 => {
                let mut each = Vec::with_capacity(ops.len());
                for op in &ops {
                    each.push(
                        apply_group(client, &shared, std::slice::from_ref(op))
                            .await
                            .map(|mut o| o.remove(0))
                            .map_err(GroupError::into_inner),
                    );
                }
                each
            }
            Err(e) => vec![Err(e.into_inner())],
        };
        if results.iter().any(|r| r.is_ok()) {
            shared.up.store(true, Ordering::Relaxed);
        } else if client.is_closed() {
            shared.down();
        }
        for (job, result) in batch.drain(..).zip(results) {
            let _ = job.reply.send(result);
        }
    }
}

/// Moves every write already queued into `batch`, up to [`MAX_GROUP`].
fn take_queued(rx: &mut mpsc::UnboundedReceiver<Job>, batch: &mut Vec<Job>) {
    while batch.len() < MAX_GROUP {
        match rx.try_recv() {
            Ok(job) => batch.push(job),
            Err(_) => break,
        }
    }
}

enum GroupError {
    /// The group did not commit (or, when the connection is gone, may not have): its writes
    /// fail, or are tried one by one on a live connection.
    Failed(StoreError),
    /// The group committed, but the durable commit after it failed: its writes must not be
    /// reported done, nor tried again.
    Unconfirmed(StoreError),
}

impl GroupError {
    fn into_inner(self) -> StoreError {
        match self {
            Self::Failed(e) | Self::Unconfirmed(e) => e,
        }
    }
}

impl From<StoreError> for GroupError {
    fn from(e: StoreError) -> Self {
        Self::Failed(e)
    }
}

/// The prepared statements of a write group.
struct GroupStatements {
    certs: tokio_postgres::Statement,
    audit: tokio_postgres::Statement,
    lock_head: tokio_postgres::Statement,
    flush: tokio_postgres::Statement,
}

/// One group in one transaction, committed without waiting for the WAL flush, then the durable
/// commit that follows it (see the module's notes). On an error before that the transaction is
/// rolled back, and the connection is ready for the next group.
async fn apply_group(
    client: &deadpool_postgres::Object,
    shared: &Shared,
    ops: &[&Write],
) -> Result<Vec<Outcome>, GroupError> {
    let result = group(client, shared, ops).await;
    if matches!(result, Err(GroupError::Failed(_))) && !client.is_closed() {
        // Ends whatever the group left open (a statement failed mid-transaction); outside a
        // transaction it is a no-op.
        let _ = client.batch_execute("ROLLBACK").await;
    }
    result
}

async fn group(
    object: &deadpool_postgres::Object,
    shared: &Shared,
    ops: &[&Write],
) -> Result<Vec<Outcome>, GroupError> {
    let client: &deadpool_postgres::ClientWrapper = object;
    // Prepared (a round trip) only on a connection's first group; cache hits after that. The
    // pipelines below rely on it: each request is sent when its future is first polled, and
    // `biased` polls them in the order written, so they reach the server in that order.
    let s = GroupStatements {
        certs: client.prepare_cached(INSERT_CERTS).await.map_err(db)?,
        audit: client
            .prepare_cached(INSERT_AUDIT_MOVE_HEAD)
            .await
            .map_err(db)?,
        lock_head: client.prepare_cached(LOCK_HEAD).await.map_err(db)?,
        flush: client.prepare_cached(FLUSH).await.map_err(db)?,
    };
    let writes_chain = ops.iter().any(|op| !matches!(op, Write::Probe));
    // Plain issuances' certificates go in before the head is locked: they wait on nothing but
    // a concurrent insert of the same serial, and hold no lock anyone else needs first.
    let mut early = Pending::default();
    for op in ops {
        if let Write::Issue { cert, .. } = op {
            early.cert(cert);
        }
    }
    // Round trip 1: BEGIN, those certificates, the head's lock.
    let (begun, certs, head) = tokio::join!(
        biased;
        client.batch_execute(BEGIN_GROUP),
        async {
            if early.serial.is_empty() {
                return Ok(0);
            }
            client.execute(&s.certs, &early.cert_params()).await
        },
        async {
            if !writes_chain {
                return Ok(None);
            }
            client.query_one(&s.lock_head, &[]).await.map(Some)
        },
    );
    begun.map_err(db)?;
    certs.map_err(db)?;
    let mut last = match head.map_err(db)? {
        Some(row) => head_of(&row)?,
        None => (0, [0u8; 32]),
    };
    let mut late = Pending::default();
    let mut outcomes = Vec::with_capacity(ops.len());
    for op in ops {
        outcomes.push(
            apply(
                object,
                &shared.key,
                &shared.replica,
                op,
                &mut late,
                &mut last,
            )
            .await?,
        );
    }
    // Round trip 2: the other rows, the audit rows with the head, COMMIT, and the durable
    // commit after it (which waits for the WAL flush; the head is free by then).
    let (certs, audit, commit, flushed) = tokio::join!(
        biased;
        async {
            if late.serial.is_empty() {
                return Ok(0);
            }
            client.execute(&s.certs, &late.cert_params()).await
        },
        async {
            if late.seq.is_empty() {
                return Ok(0);
            }
            let params = late.audit_params();
            let [p1, p2, p3, p4, p5, p6, p7, p8] = params;
            client
                .execute(
                    &s.audit,
                    &[p1, p2, p3, p4, p5, p6, p7, p8, &last.0, &last.1.as_slice()],
                )
                .await
        },
        client.batch_execute("COMMIT"),
        async { client.execute(&s.flush, &[]).await },
    );
    // After a failed statement the server has rolled the transaction back, and COMMIT reports
    // success all the same: the statements' own results say whether the group landed.
    certs.map_err(db)?;
    audit.map_err(db)?;
    commit.map_err(db)?;
    flushed.map_err(|e| {
        GroupError::Unconfirmed(StoreError::Db(format!(
            "the write committed but the database did not confirm it durable: {}",
            db(e)
        )))
    })?;
    Ok(outcomes)
}

async fn exec<C: deadpool_postgres::GenericClient>(
    c: &C,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<u64, StoreError> {
    let stmt = c.prepare_cached(sql).await.map_err(db)?;
    c.execute(&stmt, params).await.map_err(db)
}

async fn upsert_node<C: deadpool_postgres::GenericClient>(
    c: &C,
    n: &Node,
) -> Result<(), StoreError> {
    exec(
        c,
        "INSERT INTO nodes (spiffe_id, name, attested_at, last_issued_at, evicted_at)
         VALUES ($1, $2, $3, $4, NULL)
         ON CONFLICT (spiffe_id) DO UPDATE SET last_issued_at = excluded.last_issued_at",
        &[&n.spiffe_id, &n.name, &n.attested_at, &n.last_issued_at],
    )
    .await
    .map(drop)
}

/// One write inside its group's transaction, after the head's lock: its own rows, then its
/// audit row (the audit rows go in together after the group's last write).
async fn apply<C: deadpool_postgres::GenericClient>(
    tx: &C,
    key: &AuditKey,
    replica: &str,
    op: &Write,
    pending: &mut Pending,
    last: &mut (i64, [u8; 32]),
) -> Result<Outcome, StoreError> {
    let early = change(tx, replica, op, pending).await?;
    common::settle(op, early, |e| {
        pending.audit(key, e, last);
        Ok(())
    })
}

/// A write's own rows; `Some` when it ends without them (see [`common::settle`]). A plain
/// issuance's certificate is already in (see [`group`]).
async fn change<C: deadpool_postgres::GenericClient>(
    tx: &C,
    replica: &str,
    op: &Write,
    pending: &mut Pending,
) -> Result<Option<Outcome>, StoreError> {
    match op {
        Write::Issue { cert: _, node, .. } => {
            if let Some(node) = node {
                upsert_node(tx, node).await?;
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
            // SECURITY: the row lock makes a second replica spending the same token wait for
            // this transaction, then read the row as this one left it (used).
            let stmt = tx
                .prepare_cached(
                    "SELECT hash, expires_at, used_at, revoked_at FROM join_tokens WHERE id = $1 FOR UPDATE",
                )
                .await
                .map_err(db)?;
            let row = tx.query_opt(&stmt, &[token_id]).await.map_err(db)?;
            let row = row
                .map(|r| Ok::<_, StoreError>((r.cell(0)?, r.cell(1)?, r.cell(2)?, r.cell(3)?)))
                .transpose()?;
            if let Some(r) = common::token_refusal(row, token_hash, *now) {
                return Ok(Some(Outcome::TokenRefused(r)));
            }
            exec(
                tx,
                "UPDATE join_tokens SET used_at = $1 WHERE id = $2",
                &[now, token_id],
            )
            .await?;
            pending.cert(cert);
            // A node re-attesting with a new token after eviction is a new decision by an
            // operator (they made the token), so it clears the eviction.
            exec(
                tx,
                "INSERT INTO nodes (spiffe_id, name, attested_at, last_issued_at, evicted_at)
                 VALUES ($1, $2, $3, $4, NULL)
                 ON CONFLICT (spiffe_id) DO UPDATE SET attested_at = excluded.attested_at,
                   last_issued_at = excluded.last_issued_at, evicted_at = NULL",
                &[
                    &node.spiffe_id,
                    &node.name,
                    &node.attested_at,
                    &node.last_issued_at,
                ],
            )
            .await?;
            Ok(None)
        }
        Write::Audit(_) => Ok(None),
        Write::Probe => {
            exec(
                tx,
                "INSERT INTO probes (replica, n) VALUES ($1, 1)
                 ON CONFLICT (replica) DO UPDATE SET n = probes.n + 1",
                &[&replica],
            )
            .await?;
            Ok(None)
        }
        Write::CreateToken(t, _) => {
            exec(
                tx,
                "INSERT INTO join_tokens (hash, id, name, created_at, expires_at) VALUES ($1, $2, $3, $4, $5)",
                &[&&t.hash[..], &t.id, &t.name, &t.created_at, &t.expires_at],
            )
            .await?;
            Ok(None)
        }
        Write::RevokeToken { id, now, .. } => {
            let n = exec(
                tx,
                "UPDATE join_tokens SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL",
                &[now, id],
            )
            .await?;
            Ok(found(n))
        }
        Write::PutEntry(e, _) => {
            exec(
                tx,
                "INSERT INTO entries (id, spiffe_id, parent_id, selectors, ttl, dns, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[
                    &e.id,
                    &e.spiffe_id,
                    &e.parent_id,
                    &common::json_list(&e.selectors),
                    &common::ttl_column(e.ttl),
                    &common::json_list(&e.dns),
                    &e.created_at,
                ],
            )
            .await?;
            Ok(None)
        }
        Write::DeleteEntry { id, .. } => {
            let n = exec(tx, "DELETE FROM entries WHERE id = $1", &[id]).await?;
            Ok(found(n))
        }
        Write::EvictNode { spiffe_id, now, .. } => {
            let n = exec(
                tx,
                "UPDATE nodes SET evicted_at = $1 WHERE spiffe_id = $2 AND evicted_at IS NULL",
                &[now, spiffe_id],
            )
            .await?;
            Ok(found(n))
        }
        Write::PutCaKey(k, _) => {
            exec(
                tx,
                "INSERT INTO ca_keys (id, kind, cert_der, sealed_key, not_before, not_after, activate_at, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                &[
                    &k.id,
                    &kind_str(k.kind),
                    &k.cert_der,
                    &k.sealed_key,
                    &k.not_before,
                    &k.not_after,
                    &k.activate_at,
                    &k.created_at,
                ],
            )
            .await?;
            Ok(None)
        }
        Write::ResealCaKey { id, sealed_key, .. } => {
            let n = exec(
                tx,
                "UPDATE ca_keys SET sealed_key = $1 WHERE id = $2",
                &[sealed_key, id],
            )
            .await?;
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
                "UPDATE ca_keys SET activate_at = $1, sealed_key = $2 WHERE id = $3",
                &[activate_at, sealed_key, id],
            )
            .await?;
            Ok(found(n))
        }
    }
}

impl Store for PgStore {
    async fn write(&self, op: Write) -> Result<Outcome, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job { op, reply })
            .map_err(|_| StoreError::WriterGone)?;
        rx.await.map_err(|_| StoreError::WriterGone)?
    }

    async fn ca_keys(&self) -> Result<Vec<CaKeyRecord>, StoreError> {
        self.all(
            "SELECT id, kind, cert_der, sealed_key, not_before, not_after, activate_at, created_at
                 FROM ca_keys ORDER BY created_at, id",
            &[],
            common::ca_key,
        )
        .await
    }

    async fn token(&self, id: &str) -> Result<Option<JoinToken>, StoreError> {
        self.first(
            "SELECT hash, id, name, created_at, expires_at, used_at, revoked_at FROM join_tokens WHERE id = $1",
            &[&id],
            common::token,
        )
        .await
    }

    async fn certificate(&self, serial: &[u8]) -> Result<Option<CertRecord>, StoreError> {
        self.first(
            "SELECT spiffe_id, kind, parent FROM certificates WHERE serial = $1",
            &[&serial],
            common::cert_record,
        )
        .await
    }

    async fn tokens(&self) -> Result<Vec<JoinToken>, StoreError> {
        self.all(
            "SELECT hash, id, name, created_at, expires_at, used_at, revoked_at FROM join_tokens ORDER BY created_at, id",
            &[],
            common::token,
        )
        .await
    }

    async fn entries(&self) -> Result<Vec<Entry>, StoreError> {
        self.all(
            "SELECT id, spiffe_id, parent_id, selectors, ttl, dns, created_at FROM entries ORDER BY created_at, id",
            &[],
            common::entry,
        )
        .await
    }

    async fn nodes(&self) -> Result<Vec<Node>, StoreError> {
        self.all(
            "SELECT spiffe_id, name, attested_at, last_issued_at, evicted_at FROM nodes ORDER BY spiffe_id",
            &[],
            common::node,
        )
        .await
    }

    async fn audit(&self, after_seq: i64, limit: i64) -> Result<Vec<AuditRow>, StoreError> {
        self.all(
            "SELECT seq, at, action, subject, outcome, detail, prev_hash, hash FROM audit
                 WHERE seq > $1 ORDER BY seq LIMIT $2",
            &[&after_seq, &limit],
            common::audit_row,
        )
        .await
    }

    async fn verify_audit(&self, expect: Option<&AuditHead>) -> Result<AuditVerdict, StoreError> {
        const PAGE: i64 = 10_000;
        let mut check = ChainCheck::new(&self.key, expect);
        let mut after = 0i64;
        loop {
            let rows = self
                .query(
                    "SELECT seq, at, action, subject, outcome, detail, prev_hash, hash FROM audit
                     WHERE seq > $1 ORDER BY seq LIMIT $2",
                    &[&after, &PAGE],
                )
                .await?;
            for r in &rows {
                let (seq, event, detail, prev, stored) = common::audit_parts(r)?;
                if let Some(verdict) = check.push(seq, &event, &detail, &prev, &stored) {
                    return Ok(verdict);
                }
                after = seq;
            }
            if (rows.len() as i64) < PAGE {
                return Ok(check.finish());
            }
        }
    }

    async fn audit_head(&self) -> Result<Option<AuditHead>, StoreError> {
        self.first(
            "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
            &[],
            common::audit_head,
        )
        .await
    }

    async fn audit_has(&self, action: &str, subject: &str) -> Result<bool, StoreError> {
        let rows = self
            .query(
                "SELECT EXISTS (SELECT 1 FROM audit WHERE action = $1 AND subject = $2)",
                &[&action, &subject],
            )
            .await?;
        Ok(rows.first().is_some_and(|r| r.get::<_, bool>(0)))
    }

    async fn counts(&self) -> Result<Counts, StoreError> {
        let now = unix_now();
        let rows = self
            .query(
                "SELECT
                   (SELECT COUNT(*) FROM certificates),
                   (SELECT COUNT(*) FROM nodes WHERE evicted_at IS NULL),
                   (SELECT COUNT(*) FROM nodes WHERE evicted_at IS NOT NULL),
                   (SELECT COUNT(*) FROM entries),
                   (SELECT COUNT(*) FROM join_tokens WHERE used_at IS NULL AND revoked_at IS NULL AND expires_at > $1),
                   (SELECT COUNT(*) FROM audit)",
                &[&now],
            )
            .await?;
        let r = rows
            .first()
            .ok_or_else(|| StoreError::Db("counts returned no row".into()))?;
        Ok(Counts {
            issued: r.get(0),
            nodes: r.get(1),
            evicted_nodes: r.get(2),
            entries: r.get(3),
            active_tokens: r.get(4),
            audit_rows: r.get(5),
        })
    }

    fn shared(&self) -> bool {
        true
    }

    async fn try_lease(&self, name: &str, ttl: i64) -> Result<bool, StoreError> {
        let now = unix_now();
        let rows = self
            .query(
                "INSERT INTO leases (name, replica, host, since, expires_at) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (name) DO UPDATE SET
                   replica = excluded.replica,
                   host = excluded.host,
                   since = CASE WHEN leases.replica = excluded.replica THEN leases.since ELSE excluded.since END,
                   expires_at = excluded.expires_at
                 WHERE leases.replica = excluded.replica OR leases.expires_at <= $4
                 RETURNING replica",
                &[&name, &self.replica, &self.host, &now, &(now + ttl)],
            )
            .await?;
        Ok(!rows.is_empty())
    }

    async fn leases(&self) -> Result<Vec<Lease>, StoreError> {
        let now = unix_now();
        let rows = self
            .query(
                "SELECT name, replica, host, since, expires_at FROM leases WHERE expires_at > $1 ORDER BY name",
                &[&now],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| Lease {
                name: r.get(0),
                replica: r.get(1),
                host: r.get(2),
                since: r.get(3),
                expires_at: r.get(4),
            })
            .collect())
    }

    fn describe(&self) -> serde_json::Value {
        let status = self.pool.status();
        serde_json::json!({
            "kind": "postgres",
            "target": self.target,
            "replica": self.replica,
            "host": self.host,
            "reachable": self.up.load(Ordering::Relaxed),
            "last_error_at": match self.last_error_at.load(Ordering::Relaxed) { 0 => None, t => Some(t) },
            "pool": { "size": status.size, "available": status.available, "max": status.max_size },
        })
    }
}

/// A replica's start in progress (see [`PgStore::startup_lock`]).
pub struct StartupLock {
    client: Option<deadpool_postgres::Object>,
}

impl Drop for StartupLock {
    fn drop(&mut self) {
        // The connection is closed rather than returned to the pool: closing it releases the
        // session lock without another round trip.
        if let Some(c) = self.client.take() {
            drop(deadpool_postgres::Object::take(c));
        }
    }
}

/// Copies rows into an empty PostgreSQL store as they are (`kith ca store migrate`).
pub struct Importer {
    client: deadpool_postgres::Object,
}

impl Importer {
    /// Whether the target holds anything a CA wrote (keys, tokens, entries, nodes,
    /// certificates, audit rows).
    pub async fn is_empty(&self) -> Result<bool, StoreError> {
        let r = self
            .client
            .query_one(
                "SELECT NOT EXISTS (SELECT 1 FROM ca_keys) AND NOT EXISTS (SELECT 1 FROM join_tokens)
                   AND NOT EXISTS (SELECT 1 FROM entries) AND NOT EXISTS (SELECT 1 FROM nodes)
                   AND NOT EXISTS (SELECT 1 FROM certificates) AND NOT EXISTS (SELECT 1 FROM audit)",
                &[],
            )
            .await
            .map_err(db)?;
        Ok(r.get(0))
    }

    /// Runs `f` in one transaction: the copy lands whole or not at all.
    pub async fn transaction(&mut self) -> Result<Transaction<'_>, StoreError> {
        self.client.transaction().await.map_err(db)
    }
}

/// Row inserts for the import, inside its transaction.
pub mod import {
    use super::*;

    pub async fn ca_key(tx: &Transaction<'_>, k: &CaKeyRecord) -> Result<(), StoreError> {
        exec(
            tx,
            "INSERT INTO ca_keys (id, kind, cert_der, sealed_key, not_before, not_after, activate_at, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            &[
                &k.id,
                &kind_str(k.kind),
                &k.cert_der,
                &k.sealed_key,
                &k.not_before,
                &k.not_after,
                &k.activate_at,
                &k.created_at,
            ],
        )
        .await
        .map(drop)
    }

    pub async fn token(tx: &Transaction<'_>, t: &JoinToken) -> Result<(), StoreError> {
        exec(
            tx,
            "INSERT INTO join_tokens (hash, id, name, created_at, expires_at, used_at, revoked_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[
                &&t.hash[..],
                &t.id,
                &t.name,
                &t.created_at,
                &t.expires_at,
                &t.used_at,
                &t.revoked_at,
            ],
        )
        .await
        .map(drop)
    }

    pub async fn entry(tx: &Transaction<'_>, e: &Entry) -> Result<(), StoreError> {
        exec(
            tx,
            "INSERT INTO entries (id, spiffe_id, parent_id, selectors, ttl, dns, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[
                &e.id,
                &e.spiffe_id,
                &e.parent_id,
                &common::json_list(&e.selectors),
                &common::ttl_column(e.ttl),
                &common::json_list(&e.dns),
                &e.created_at,
            ],
        )
        .await
        .map(drop)
    }

    pub async fn node(tx: &Transaction<'_>, n: &Node) -> Result<(), StoreError> {
        exec(
            tx,
            "INSERT INTO nodes (spiffe_id, name, attested_at, last_issued_at, evicted_at)
             VALUES ($1, $2, $3, $4, $5)",
            &[
                &n.spiffe_id,
                &n.name,
                &n.attested_at,
                &n.last_issued_at,
                &n.evicted_at,
            ],
        )
        .await
        .map(drop)
    }

    /// Certificates as stored: serial, SPIFFE ID, kind, not-after, issued-at, parent.
    pub async fn certificates(
        tx: &Transaction<'_>,
        rows: &[crate::store::CertRow],
    ) -> Result<(), StoreError> {
        let mut p = Pending::default();
        for (serial, id, kind, na, at, parent) in rows {
            p.serial.push(serial.clone());
            p.spiffe_id.push(id.clone());
            p.kind.push(kind.clone());
            p.not_after.push(*na);
            p.issued_at.push(*at);
            p.parent.push(parent.clone());
        }
        p.flush(tx, (0, [0u8; 32])).await
    }

    /// Audit rows exactly as stored (detail as its JSON text, hashes as bytes); the head row
    /// follows the last one.
    pub async fn audit(
        tx: &Transaction<'_>,
        rows: &[crate::store::RawAuditRow],
    ) -> Result<(), StoreError> {
        let Some(last) = rows.last() else {
            return Ok(());
        };
        let mut p = Pending::default();
        for (seq, e, detail, prev, hash) in rows {
            p.seq.push(*seq);
            p.at.push(e.at);
            p.action.push(e.action.clone());
            p.subject.push(e.subject.clone());
            p.outcome.push(e.outcome.clone());
            p.detail.push(detail.clone());
            p.prev_hash.push(prev.clone());
            p.hash.push(hash.clone());
        }
        let mut head = [0u8; 32];
        if last.4.len() == 32 {
            head.copy_from_slice(&last.4);
        }
        p.flush(tx, (last.0, head)).await
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".into())
}
