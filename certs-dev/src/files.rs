//! Writing files atomically and with the right modes: a crash never leaves half a key behind,
//! and private keys are 0600 from the moment they exist.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

use anyhow::{Context, Result};

pub const KEY_MODE: u32 = 0o600;
pub const PUBLIC_MODE: u32 = 0o644;

/// Writes `contents` to `path` through a new temporary file in the same directory
/// (O_EXCL|O_NOFOLLOW), then renames it into place, so readers see either the old or the new
/// file; refused in a directory others could write to ([`identity::files`]).
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    identity::files::write_atomic(path, contents, mode)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Creates `dir` (and parents) if needed; refuses a path that exists as something else.
pub fn ensure_dir(dir: &Path, mode: Option<u32>) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        anyhow::bail!("{} exists and is not a directory", dir.display());
    }
    // Created without group or world write whatever the umask allows (a 002 umask would
    // make a directory the key writer then refuses).
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode.unwrap_or(0o755))
        .create(dir)
        .with_context(|| format!("cannot create directory {}", dir.display()))?;
    if let Some(mode) = mode {
        fs::set_permissions(dir, fs::Permissions::from_mode(mode))
            .with_context(|| format!("cannot set permissions on {}", dir.display()))?;
    }
    Ok(())
}

pub fn read(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}
