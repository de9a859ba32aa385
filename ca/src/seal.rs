//! Keys at rest: CA private keys are sealed with AES-256-GCM under a key-encryption key (KEK)
//! that lives outside the data directory. Each sealed blob carries its own random 96-bit nonce,
//! and what the key is for is bound in as associated data (the caller's `purpose`: for CA keys,
//! its kind, id and the hash of its certificate), so a sealed intermediate key cannot be swapped
//! in where the root key is expected, nor paired with another certificate.
//!
//! The KEK also keys the audit chain, through a key derived from it (`AuditKey`).

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

use crate::store::AuditKey;

/// Format version of a sealed blob: `[VERSION] [nonce; 12] [ciphertext + tag]`. Version 2 is
/// the layout of version 1; what changed is the associated data its writers bind (see
/// `authority::binding`), so a reader can tell which to expect.
const VERSION: u8 = 2;
const LEGACY_VERSION: u8 = 1;
pub const KEK_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("key-encryption key must be {KEK_LEN} bytes, base64-encoded (got {0} bytes)")]
    BadKekLength(usize),
    #[error("key-encryption key is not base64: {0}")]
    BadKekEncoding(String),
    #[error("cannot read key-encryption key file {path}: {error}")]
    ReadKek {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot create key-encryption key file {path}: {error}")]
    WriteKek {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("key-encryption key file {path} is readable by others (mode {mode:o}); chmod 600 it")]
    KekPermissions { path: PathBuf, mode: u32 },
    #[error("random number generator failed")]
    Random,
    #[error("sealed key is truncated or of an unknown format")]
    Format,
    #[error("cannot unseal the {0} key: wrong key-encryption key, or the sealed data was altered")]
    Unseal(String),
    #[error(
        "no key-encryption key: pass --kek-file or set KITH_CA_KEK (none at {0} either); the audit chain is a MAC keyed by the CA's KEK, so checking it needs the same KEK the CA runs with"
    )]
    NoKek(PathBuf),
}

/// Where the KEK came from, for the start-up log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KekSource {
    File(PathBuf),
    Env,
    /// Created beside the data directory because none was configured: it shares a disk with
    /// the data, which the CA warns about on every start.
    Generated(PathBuf),
    Existing(PathBuf),
}

#[derive(Clone)]
pub struct Kek {
    key: LessSafeKey,
    audit: AuditKey,
    rng: SystemRandom,
}

impl Kek {
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SealError> {
        if bytes.len() != KEK_LEN {
            return Err(SealError::BadKekLength(bytes.len()));
        }
        let unbound = UnboundKey::new(&AES_256_GCM, bytes)
            .map_err(|_| SealError::BadKekLength(bytes.len()))?;
        Ok(Self {
            key: LessSafeKey::new(unbound),
            audit: AuditKey::derive(bytes),
            rng: SystemRandom::new(),
        })
    }

    /// The key of the audit chain's MAC, derived from this KEK.
    pub fn audit_key(&self) -> AuditKey {
        self.audit.clone()
    }

    /// Whether `sealed` was sealed by a kith that bound only the key's kind and id.
    pub fn is_legacy(sealed: &[u8]) -> bool {
        sealed.first() == Some(&LEGACY_VERSION)
    }

    /// The KEK as `load` would find it, but never created: for offline checks of a CA's data
    /// (`kith ca audit verify`), where a missing KEK is an error that says where to put it.
    pub fn find(
        file: Option<&Path>,
        env: Option<&str>,
        data_dir: &Path,
    ) -> Result<(Self, KekSource), SealError> {
        let default = default_kek_path(data_dir);
        if file.is_none() && env.is_none() && !default.exists() {
            return Err(SealError::NoKek(default));
        }
        Self::load(file, env, data_dir)
    }

    pub fn from_base64(text: &str) -> Result<Self, SealError> {
        let bytes = STANDARD
            .decode(text.trim())
            .map_err(|e| SealError::BadKekEncoding(e.to_string()))?;
        Self::from_bytes(&bytes)
    }

    /// Loads the KEK: `--kek-file`, else `KITH_CA_KEK` (base64), else `<data-dir>.kek` beside the
    /// data directory, created (0600) on first start.
    pub fn load(
        file: Option<&Path>,
        env: Option<&str>,
        data_dir: &Path,
    ) -> Result<(Self, KekSource), SealError> {
        if let Some(path) = file {
            return Ok((read_kek_file(path)?, KekSource::File(path.to_owned())));
        }
        if let Some(text) = env {
            return Ok((Self::from_base64(text)?, KekSource::Env));
        }
        let path = default_kek_path(data_dir);
        if path.exists() {
            return Ok((read_kek_file(&path)?, KekSource::Existing(path)));
        }
        let rng = SystemRandom::new();
        let mut bytes = [0u8; KEK_LEN];
        rng.fill(&mut bytes).map_err(|_| SealError::Random)?;
        let write = |path: &Path| -> std::io::Result<()> {
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent)?;
            }
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)?;
            f.write_all(STANDARD.encode(bytes).as_bytes())?;
            f.write_all(b"\n")?;
            f.sync_all()
        };
        write(&path).map_err(|error| SealError::WriteKek {
            path: path.clone(),
            error,
        })?;
        Ok((Self::from_bytes(&bytes)?, KekSource::Generated(path)))
    }

    /// Seals `plaintext`; `purpose` (e.g. "intermediate:<id>") is authenticated, not encrypted.
    pub fn seal(&self, purpose: &str, plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| SealError::Random)?;
        let mut buf = plaintext.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(purpose.as_bytes()),
                &mut buf,
            )
            .map_err(|_| SealError::Random)?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + buf.len());
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&buf);
        Ok(out)
    }

    /// Opens a blob of either version; `purpose` must be what its sealer bound.
    pub fn unseal(&self, purpose: &str, sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        if sealed.len() < 1 + NONCE_LEN + AES_256_GCM.tag_len()
            || (sealed[0] != VERSION && sealed[0] != LEGACY_VERSION)
        {
            return Err(SealError::Format);
        }
        let nonce: [u8; NONCE_LEN] = sealed[1..1 + NONCE_LEN]
            .try_into()
            .map_err(|_| SealError::Format)?;
        let mut buf = sealed[1 + NONCE_LEN..].to_vec();
        let plain = self
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(purpose.as_bytes()),
                &mut buf,
            )
            .map_err(|_| SealError::Unseal(purpose.to_owned()))?;
        Ok(plain.to_vec())
    }
}

/// `/var/lib/kith-ca` → `/var/lib/kith-ca.kek`: beside the data dir, not inside it.
pub fn default_kek_path(data_dir: &Path) -> PathBuf {
    let name = data_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "kith-ca".into());
    data_dir.with_file_name(format!("{name}.kek"))
}

fn read_kek_file(path: &Path) -> Result<Kek, SealError> {
    let meta = fs::metadata(path).map_err(|error| SealError::ReadKek {
        path: path.to_owned(),
        error,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    // SECURITY: a KEK that others can read protects nothing.
    if mode & 0o077 != 0 {
        return Err(SealError::KekPermissions {
            path: path.to_owned(),
            mode,
        });
    }
    let text = fs::read_to_string(path).map_err(|error| SealError::ReadKek {
        path: path.to_owned(),
        error,
    })?;
    Kek::from_base64(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kek() -> Kek {
        Kek::from_bytes(&[7u8; KEK_LEN]).unwrap()
    }

    #[test]
    fn seal_round_trips_with_a_fresh_nonce_each_time() {
        let k = kek();
        let a = k.seal("root:1", b"secret key").unwrap();
        let b = k.seal("root:1", b"secret key").unwrap();
        assert_ne!(a, b, "random nonce");
        assert_eq!(k.unseal("root:1", &a).unwrap(), b"secret key");
        assert!(!a.windows(10).any(|w| w == b"secret key"));
    }

    #[test]
    fn purpose_wrong_kek_and_tampering_are_refused() {
        let k = kek();
        let sealed = k.seal("intermediate:2", b"k").unwrap();
        assert!(matches!(
            k.unseal("root:1", &sealed),
            Err(SealError::Unseal(_))
        ));
        let other = Kek::from_bytes(&[8u8; KEK_LEN]).unwrap();
        assert!(matches!(
            other.unseal("intermediate:2", &sealed),
            Err(SealError::Unseal(_))
        ));
        let mut flipped = sealed.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(matches!(
            k.unseal("intermediate:2", &flipped),
            Err(SealError::Unseal(_))
        ));
        assert!(matches!(
            k.unseal("intermediate:2", &sealed[..5]),
            Err(SealError::Format)
        ));
    }

    #[test]
    fn kek_is_loaded_from_file_env_or_created_beside_the_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("kith-ca");
        let (_, src) = Kek::load(None, None, &data).unwrap();
        let path = dir.path().join("kith-ca.kek");
        assert_eq!(src, KekSource::Generated(path.clone()));
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let (k2, src) = Kek::load(None, None, &data).unwrap();
        assert_eq!(src, KekSource::Existing(path.clone()));
        let (k3, _) = Kek::load(Some(&path), None, &data).unwrap();
        let sealed = k2.seal("p", b"x").unwrap();
        assert_eq!(k3.unseal("p", &sealed).unwrap(), b"x");

        let env = STANDARD.encode([1u8; KEK_LEN]);
        assert_eq!(
            Kek::load(None, Some(&env), &data).unwrap().1,
            KekSource::Env
        );
        assert!(matches!(
            Kek::load(None, Some("c2hvcnQ="), &data),
            Err(SealError::BadKekLength(5))
        ));

        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            Kek::load(Some(&path), None, &data),
            Err(SealError::KekPermissions { .. })
        ));
    }
}
