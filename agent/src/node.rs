//! The node's identity on disk: its SVID chain, its key (0600) and the trust bundle, in the
//! agent's data directory. Written atomically, so a crash never leaves a key without its
//! certificate.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use identity::{Svid, TrustBundle, TrustDomain};
use serde::{Deserialize, Serialize};

const CHAIN: &str = "node.pem";
const KEY: &str = "node.key";
const BUNDLE: &str = "bundle.json";
const META: &str = "node.json";

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot write {path}: {error}")]
    Write {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot read {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "the agent data dir {dir} is damaged ({detail}); move it away and attest again with a new join token (`kith ca token create`)"
    )]
    Corrupt { dir: PathBuf, detail: String },
}

/// What is kept besides the certificate and key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeMeta {
    pub trust_domain: String,
    pub spiffe_id: String,
    /// The CA's renew-after hint (unix seconds).
    pub renew_after: i64,
}

pub struct StoredNode {
    pub svid: Svid,
    pub bundle: TrustBundle,
    pub meta: NodeMeta,
}

pub fn exists(dir: &Path) -> bool {
    dir.join(KEY).exists() || dir.join(CHAIN).exists()
}

pub fn load(dir: &Path) -> Result<StoredNode, NodeError> {
    let read = |name: &str| {
        fs::read(dir.join(name)).map_err(|error| NodeError::Read {
            path: dir.join(name),
            error,
        })
    };
    let corrupt = |detail: String| NodeError::Corrupt {
        dir: dir.to_owned(),
        detail,
    };
    let meta: NodeMeta =
        serde_json::from_slice(&read(META)?).map_err(|e| corrupt(format!("{META}: {e}")))?;
    let td = TrustDomain::new(&meta.trust_domain).map_err(|e| corrupt(format!("{META}: {e}")))?;
    let key = zeroize::Zeroizing::new(read(KEY)?);
    let svid =
        Svid::from_pem(&read(CHAIN)?, &key).map_err(|e| corrupt(format!("{CHAIN}/{KEY}: {e}")))?;
    let bundle = TrustBundle::from_spiffe_json(td, &read(BUNDLE)?)
        .map_err(|e| corrupt(format!("{BUNDLE}: {e}")))?;
    Ok(StoredNode { svid, bundle, meta })
}

/// Writes the node identity: key first, then chain, then bundle and metadata.
pub fn save(
    dir: &Path,
    svid: &Svid,
    bundle: &TrustBundle,
    meta: &NodeMeta,
) -> Result<(), NodeError> {
    ensure_dir(dir)?;
    write_atomic(&dir.join(KEY), svid.key_pem().as_bytes(), 0o600)?;
    write_atomic(&dir.join(CHAIN), svid.chain_pem().as_bytes(), 0o644)?;
    write_atomic(&dir.join(BUNDLE), bundle.to_spiffe_json().as_bytes(), 0o644)?;
    let meta = serde_json::to_vec_pretty(meta).unwrap_or_default();
    write_atomic(&dir.join(META), &meta, 0o644)
}

pub fn save_bundle(dir: &Path, bundle: &TrustBundle) -> Result<(), NodeError> {
    write_atomic(&dir.join(BUNDLE), bundle.to_spiffe_json().as_bytes(), 0o644)
}

/// Moves the stored identity's files into `aside` (made 0700), so the agent attests again;
/// nothing is deleted. The key moves last: while any file remains the identity counts as there.
pub fn set_aside(dir: &Path, aside: &Path) -> Result<(), NodeError> {
    ensure_dir(aside)?;
    for name in [META, BUNDLE, CHAIN, KEY] {
        let from = dir.join(name);
        if from.exists() {
            fs::rename(&from, aside.join(name))
                .map_err(|error| NodeError::Write { path: from, error })?;
        }
    }
    Ok(())
}

pub fn expired(node: &StoredNode, now: SystemTime) -> bool {
    node.svid.not_after() <= now
}

fn ensure_dir(dir: &Path) -> Result<(), NodeError> {
    fs::create_dir_all(dir).map_err(|error| NodeError::Write {
        path: dir.to_owned(),
        error,
    })?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|error| NodeError::Write {
        path: dir.to_owned(),
        error,
    })
}

/// A new temporary file in the same directory (O_EXCL|O_NOFOLLOW), fsync, rename: readers see
/// the old or the new file; refused in a directory others could write to
/// ([`identity::files`]).
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), NodeError> {
    identity::files::write_atomic(path, contents, mode).map_err(|error| NodeError::Write {
        path: path.to_owned(),
        error,
    })
}
