//! Writing files atomically and with the right modes: a crash never leaves half a key behind,
//! and private keys are 0600 from the moment they exist.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A file or directory of the CA home or the output that cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} exists and is not a directory", path.display())]
    NotADirectory { path: PathBuf },
    #[error("cannot create directory {}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot set permissions on {}", path.display())]
    Permissions {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

type Result<T, E = FilesError> = std::result::Result<T, E>;

pub const KEY_MODE: u32 = 0o600;
pub const PUBLIC_MODE: u32 = 0o644;

/// Writes `contents` to `path` through a new temporary file in the same directory
/// (O_EXCL|O_NOFOLLOW), then renames it into place, so readers see either the old or the new
/// file; refused in a directory others could write to ([`identity::files`]).
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    identity::files::write_atomic(path, contents, mode).map_err(|source| FilesError::Write {
        path: path.to_owned(),
        source,
    })
}

/// Creates `dir` (and parents) if needed; refuses a path that exists as something else.
pub fn ensure_dir(dir: &Path, mode: Option<u32>) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        return Err(FilesError::NotADirectory {
            path: dir.to_owned(),
        });
    }
    // Created without group or world write whatever the umask allows (a 002 umask would
    // make a directory the key writer then refuses).
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode.unwrap_or(0o755))
        .create(dir)
        .map_err(|source| FilesError::CreateDir {
            path: dir.to_owned(),
            source,
        })?;
    if let Some(mode) = mode {
        fs::set_permissions(dir, fs::Permissions::from_mode(mode)).map_err(|source| {
            FilesError::Permissions {
                path: dir.to_owned(),
                source,
            }
        })?;
    }
    Ok(())
}

pub fn read(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).map_err(|source| FilesError::Read {
        path: path.to_owned(),
        source,
    })
}
