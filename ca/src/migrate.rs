//! `kith ca store migrate --to postgres://…`: copies a stopped SQLite CA into an empty
//! PostgreSQL database, every row as stored (sealed keys stay sealed, the audit chain byte for
//! byte), in one transaction, then checks the copy: the chain verifies under the CA's KEK and
//! ends at the same head, and every table has as many rows as the source.

use std::path::{Path, PathBuf};

use crate::seal::Kek;
use crate::store::postgres::{PgStore, import, redact};
use crate::store::sqlite::SqliteStore;
use crate::store::{Store, StoreError};

/// Rows per progress line (and per certificate/audit insert statement).
const CHUNK: usize = 5_000;

/// Why the migration stopped; nothing is left half-copied (the copy is one transaction).
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(
        "the CA in {} is running (its admin socket answers): stop it first, so no issuance happens after the copy",
        dir.display()
    )]
    Running { dir: PathBuf },
    #[error("the audit chain of {} is broken at row {row} ({detail}): not copying it", dir.display())]
    SourceBroken {
        dir: PathBuf,
        row: i64,
        detail: String,
    },
    #[error("connecting to {target}")]
    Connect {
        target: String,
        #[source]
        source: StoreError,
    },
    #[error(
        "{target} already holds a CA (keys, tokens, entries, nodes, certificates or audit rows): the migration only fills an empty database"
    )]
    NotEmpty { target: String },
    #[error("committing the copy into {target}")]
    Commit {
        target: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("opening {target} after the copy")]
    Reopen {
        target: String,
        #[source]
        source: StoreError,
    },
    /// The heads are shown as found (`None` for an empty chain).
    #[error(
        "the copied audit chain does not match the source (source head {source_head}, copy {copy_head}: {detail})"
    )]
    CopyMismatch {
        source_head: String,
        copy_head: String,
        detail: String,
    },
    #[error("the copy's row counts {got} differ from the source's {want}")]
    CountMismatch { got: String, want: String },
    /// Reading the source or writing the copy failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

type Result<T, E = MigrateError> = std::result::Result<T, E>;

pub async fn to_postgres(data_dir: &Path, kek: &Kek, url: &str) -> Result<()> {
    let target = redact(url);
    if data_dir.join("admin.sock").exists()
        && std::os::unix::net::UnixStream::connect(data_dir.join("admin.sock")).is_ok()
    {
        return Err(MigrateError::Running {
            dir: data_dir.to_owned(),
        });
    }
    let source = SqliteStore::open_read_only(data_dir)?;
    // The source must verify before anything is copied: a broken chain is not moved.
    let verdict = source.verify_audit(&kek.audit_key(), None)?;
    if let Some(row) = verdict.first_broken {
        return Err(MigrateError::SourceBroken {
            dir: data_dir.to_owned(),
            row,
            detail: verdict.detail.unwrap_or_default(),
        });
    }
    let rows = source.export()?;
    println!(
        "source  {}: {} keys, {} tokens, {} entries, {} nodes, {} certificates, {} audit rows",
        data_dir.join("kith-ca.db").display(),
        rows.ca_keys.len(),
        rows.tokens.len(),
        rows.entries.len(),
        rows.nodes.len(),
        rows.certificates.len(),
        rows.audit.len()
    );
    let mut importer =
        PgStore::open_for_import(url)
            .await
            .map_err(|source| MigrateError::Connect {
                target: target.clone(),
                source,
            })?;
    if !importer.is_empty().await? {
        return Err(MigrateError::NotEmpty { target });
    }
    let tx = importer.transaction().await?;
    for k in &rows.ca_keys {
        import::ca_key(&tx, k).await?;
    }
    println!("copied  {} keys (still sealed)", rows.ca_keys.len());
    for t in &rows.tokens {
        import::token(&tx, t).await?;
    }
    println!("copied  {} join tokens", rows.tokens.len());
    for e in &rows.entries {
        import::entry(&tx, e).await?;
    }
    println!("copied  {} entries", rows.entries.len());
    for n in &rows.nodes {
        import::node(&tx, n).await?;
    }
    println!("copied  {} nodes", rows.nodes.len());
    let mut done = 0;
    for chunk in rows.certificates.chunks(CHUNK) {
        import::certificates(&tx, chunk).await?;
        done += chunk.len();
        println!("copied  {done}/{} certificates", rows.certificates.len());
    }
    // The head row follows the last chunk: each chunk sets it to its own last row.
    let mut done = 0;
    for chunk in rows.audit.chunks(CHUNK) {
        import::audit(&tx, chunk).await?;
        done += chunk.len();
        println!("copied  {done}/{} audit rows", rows.audit.len());
    }
    tx.commit().await.map_err(|source| MigrateError::Commit {
        target: target.clone(),
        source,
    })?;
    drop(importer);

    // Check the copy through the store the CA will use.
    let store = PgStore::open(url, kek.audit_key(), "migrate")
        .await
        .map_err(|source| MigrateError::Reopen {
            target: target.clone(),
            source,
        })?;
    let copied = store.verify_audit(None).await?;
    if copied.first_broken.is_some() || copied.head != verdict.head {
        return Err(MigrateError::CopyMismatch {
            source_head: format!("{:?}", verdict.head),
            copy_head: format!("{:?}", copied.head),
            detail: copied.detail.unwrap_or_default(),
        });
    }
    let counts = store.counts().await?;
    let keys = store.ca_keys().await?.len();
    let tokens = store.tokens().await?.len();
    let entries = store.entries().await?.len();
    let nodes = counts.nodes + counts.evicted_nodes;
    let want = (
        rows.ca_keys.len(),
        rows.tokens.len(),
        rows.entries.len(),
        rows.nodes.len() as i64,
        rows.certificates.len() as i64,
    );
    let got = (keys, tokens, entries, nodes, counts.issued);
    if want != got {
        return Err(MigrateError::CountMismatch {
            got: format!("{got:?}"),
            want: format!("{want:?}"),
        });
    }
    println!(
        "verified audit chain intact in {target}: {} rows, head {}",
        copied.rows,
        copied.head.map(|h| h.to_string()).unwrap_or_default()
    );
    println!(
        "done: start the CA with --store '{target}' (the same KEK); keep {} until the new CA runs",
        data_dir.display()
    );
    Ok(())
}
