//! The workload SVIDs on disk, so that an agent restarted while no CA answers serves them again
//! until they expire. One file per registration entry in `<data dir>/workloads/`, named by
//! the SHA-256 of the entry ID (entry IDs come from the CA and are never used as paths), mode
//! 0600 in a 0700 directory, written atomically with `identity::files::write_atomic`. Each file
//! holds the entry (ID, SPIFFE ID, selectors), the CA's renew-after hint, and the key with its
//! chain in one PEM text, so a crash can never pair a key with another SVID's certificate.
//!
//! A stored SVID is served again only if its chain still verifies against the agent's bundle
//! at load time (so never an expired one) and names the entry's SPIFFE ID; anything else is
//! removed. While the agent runs, the file of an entry the CA no longer assigns, or whose
//! selectors or ID changed, is removed with its slot; callers are attested afresh on every call
//! against the stored selectors, as for SVIDs obtained in this run.

use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use identity::{SpiffeId, Svid, TrustBundle};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::node::NodeError;
use crate::snapshot::WorkloadSvid;

const DIR: &str = "workloads";
/// Far above any real record (a chain of a few certificates); a bigger file is not ours.
const MAX_FILE: u64 = 256 * 1024;

/// A stored SVID, checked and ready to serve.
pub struct Restored {
    pub svid: WorkloadSvid,
    /// The CA's renew-after hint, unix seconds.
    pub renew_after: i64,
}

#[derive(Serialize, Deserialize)]
struct Record {
    entry_id: String,
    spiffe_id: String,
    selectors: Vec<String>,
    renew_after: i64,
    /// PKCS#8 PRIVATE KEY block, then the chain leaf first.
    credentials: String,
}

/// The directory of stored workload SVIDs.
pub fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join(DIR)
}

fn path(data_dir: &Path, entry_id: &str) -> PathBuf {
    let digest = ring::digest::digest(&ring::digest::SHA256, entry_id.as_bytes());
    let name: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    dir(data_dir).join(format!("{name}.json"))
}

/// Stores (or replaces) the SVID of its entry.
pub fn save(data_dir: &Path, svid: &WorkloadSvid, renew_after: i64) -> Result<(), NodeError> {
    let d = dir(data_dir);
    let write_err = |error| NodeError::Write {
        path: d.clone(),
        error,
    };
    fs::create_dir_all(&d).map_err(write_err)?;
    fs::set_permissions(&d, fs::Permissions::from_mode(0o700)).map_err(write_err)?;
    let credentials = Svid::new(svid.chain.clone(), svid.key.clone_key())
        .map_err(|e| NodeError::Corrupt {
            dir: d.clone(),
            detail: format!("the SVID to store does not hold together: {e}"),
        })?
        .to_credential_bundle();
    let record = Record {
        entry_id: svid.entry_id.clone(),
        spiffe_id: svid.spiffe_id.to_string(),
        selectors: svid.selectors.clone(),
        renew_after,
        credentials: String::from(credentials.as_str()),
    };
    let bytes = Zeroizing::new(serde_json::to_vec(&record).unwrap_or_default());
    // The record's own copy of the key is wiped too.
    let _ = Zeroizing::new(record.credentials);
    crate::node::write_atomic(&path(data_dir, &svid.entry_id), &bytes, 0o600)
}

/// Forgets the SVID of an entry (nothing to do if none is stored).
pub fn remove(data_dir: &Path, entry_id: &str) {
    let p = path(data_dir, entry_id);
    match fs::remove_file(&p) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %p.display(), error = %e, "cannot remove a stored workload SVID")
        }
    }
}

/// Every stored SVID that still verifies against `bundle` at `now`; the others are removed
/// (logged), so an expired key does not stay on disk.
pub fn load_all(data_dir: &Path, bundle: &TrustBundle, now: SystemTime) -> Vec<Restored> {
    let d = dir(data_dir);
    let entries = match fs::read_dir(&d) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            tracing::warn!(dir = %d.display(), error = %e, "cannot read the stored workload SVIDs");
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for file in entries.flatten() {
        let p = file.path();
        if p.extension().is_none_or(|x| x != "json") {
            continue;
        }
        match load_one(&p, bundle, now) {
            Ok(r) if path(data_dir, &r.svid.entry_id) == p => out.push(r),
            Ok(r) => {
                tracing::warn!(path = %p.display(), entry = %r.svid.entry_id, "a stored workload SVID is under another entry's name; removed");
                let _ = fs::remove_file(&p);
            }
            Err(reason) => {
                tracing::info!(path = %p.display(), %reason, "not serving a stored workload SVID; removed");
                let _ = fs::remove_file(&p);
            }
        }
    }
    out
}

fn load_one(p: &Path, bundle: &TrustBundle, now: SystemTime) -> Result<Restored, String> {
    let meta = fs::symlink_metadata(p).map_err(|e| e.to_string())?;
    if !meta.is_file() || meta.len() > MAX_FILE {
        return Err("not a regular file of a sane size".into());
    }
    let bytes = Zeroizing::new(fs::read(p).map_err(|e| e.to_string())?);
    let record: Record = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
    let credentials = Zeroizing::new(record.credentials);
    let svid = Svid::from_credential_bundle(credentials.as_bytes()).map_err(|e| e.to_string())?;
    let want = SpiffeId::new(&record.spiffe_id).map_err(|e| e.to_string())?;
    let id = identity::verify_x509_svid(svid.chain(), bundle, now)
        .map_err(|e| format!("it no longer verifies: {e}"))?;
    if id != want {
        return Err(format!("it names {id}, its entry {want}"));
    }
    Ok(Restored {
        svid: WorkloadSvid {
            entry_id: record.entry_id,
            spiffe_id: want,
            selectors: record.selectors,
            chain: svid.chain().to_vec(),
            key: Zeroizing::new(svid.key().clone_key()),
            not_after: svid.not_after(),
        },
        renew_after: record.renew_after,
    })
}
