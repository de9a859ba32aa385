//! The credential folder: what the agent sent, checked and rendered, then written file by file
//! (each atomically) in an order that keeps the folder consistent for readers.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use identity::workload_client::{Picked, pick};
use serde::Serialize;
use spiffe::X509Context;
use zeroize::Zeroizing;

use super::FetchError;
use crate::node::write_atomic;

/// The file names the standard fixes.
pub const CREDENTIAL_BUNDLE: &str = "credential-bundle.private-key.pem";
pub const TRUST_BUNDLE_SUFFIX: &str = ".spiffe-trust-bundle.pem";

/// What one write put on disk.
#[derive(Debug, Clone, Serialize)]
pub struct Written {
    pub spiffe_id: String,
    pub dir: PathBuf,
    pub credential_bundle: PathBuf,
    pub trust_bundles: Vec<WrittenBundle>,
    /// Trust bundles of trust domains no longer federated, removed as the standard asks.
    pub removed: Vec<PathBuf>,
    /// RFC 3339, UTC.
    pub not_after: String,
    /// False when the files already held exactly this content (nothing was rewritten).
    pub changed: bool,
    /// The files actually replaced by this write.
    pub rewritten: Vec<PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
pub struct WrittenBundle {
    pub trust_domain: String,
    pub path: PathBuf,
}

/// The rendered files, checked before anything touches the disk. No Debug: it holds the key
/// (wiped from memory when dropped).
pub(super) struct Layout {
    spiffe_id: String,
    not_after: SystemTime,
    credential_bundle: Zeroizing<String>,
    /// (trust domain, PEM), sorted by trust domain.
    bundles: Vec<(String, String)>,
}

/// Picks and checks the SVID, and renders the files, before the disk is touched.
pub(super) fn render(context: &X509Context, wanted: Option<&str>) -> Result<Layout, FetchError> {
    let Picked { svid, bundles, .. } = pick(context, wanted)?;
    Ok(Layout {
        spiffe_id: svid.id().to_string(),
        not_after: svid.not_after(),
        credential_bundle: svid.to_credential_bundle(),
        bundles,
    })
}

pub(super) fn ensure_dir(dir: &Path) -> Result<(), FetchError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(|error| FetchError::CreateDir {
            path: dir.to_owned(),
            error,
        })
}

/// Writes the layout: trust bundles first, so that a reader who sees a new SVID already has
/// the roots it chains to, then the credential bundle, then removes bundles of trust domains
/// that left. Unchanged files are not rewritten, so a restart or reconnect does not touch them.
pub(super) fn write_layout(dir: &Path, layout: &Layout) -> Result<Written, FetchError> {
    ensure_dir(dir)?;
    let mut rewritten = Vec::new();
    let mut trust_bundles = Vec::new();
    for (td, pem) in &layout.bundles {
        let path = dir.join(format!("{td}{TRUST_BUNDLE_SUFFIX}"));
        if write_if_changed(&path, pem.as_bytes(), 0o644)? {
            rewritten.push(path.clone());
        }
        trust_bundles.push(WrittenBundle {
            trust_domain: td.clone(),
            path,
        });
    }
    let credential_bundle = dir.join(CREDENTIAL_BUNDLE);
    let contents = layout.credential_bundle.as_bytes();
    if write_if_changed(&credential_bundle, contents, 0o600)? {
        rewritten.push(credential_bundle.clone());
    }
    let removed = remove_stale_bundles(dir, &layout.bundles);
    let changed = !rewritten.is_empty() || !removed.is_empty();
    Ok(Written {
        spiffe_id: layout.spiffe_id.clone(),
        dir: dir.to_owned(),
        credential_bundle,
        trust_bundles,
        removed,
        not_after: humantime::format_rfc3339_seconds(layout.not_after).to_string(),
        changed,
        rewritten,
    })
}

/// True when the file was (re)written.
fn write_if_changed(path: &Path, contents: &[u8], mode: u32) -> Result<bool, FetchError> {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o777 == mode
        && std::fs::read(path).is_ok_and(|old| *Zeroizing::new(old) == contents)
    {
        return Ok(false);
    }
    write_atomic(path, contents, mode)?;
    Ok(true)
}

/// De-federation: the standard asks readers to stop trusting a trust domain whose bundle
/// file disappears, so one no longer sent is removed. Failures are logged, not fatal.
fn remove_stale_bundles(dir: &Path, keep: &[(String, String)]) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot list the directory");
            return removed;
        }
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(td) = name
            .to_str()
            .and_then(|n| n.strip_suffix(TRUST_BUNDLE_SUFFIX))
        else {
            continue;
        };
        if keep.iter().any(|(kept, _)| kept == td) {
            continue;
        }
        let path = entry.path();
        match std::fs::remove_file(&path) {
            Ok(()) => removed.push(path),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove a stale trust bundle")
            }
        }
    }
    removed
}
