//! Writing keys and SVIDs to disk without being tricked: each file is written to a new
//! temporary file (`O_CREAT|O_EXCL|O_NOFOLLOW`, so a planted file or symlink is never opened,
//! let alone followed), synced, then renamed over the target (`rename` replaces a symlink
//! rather than following it), in a directory that is neither group- nor world-writable and
//! belongs to this user or root (anyone else could swap the files under us).

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use nix::fcntl::OFlag;
use ring::rand::{SecureRandom, SystemRandom};

/// Refuses a directory others could write to: group- or world-writable, or owned by someone
/// other than this user and root.
pub fn check_dir(dir: &Path) -> io::Result<()> {
    let meta = fs::metadata(dir)?;
    if !meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::NotADirectory,
            format!("{} is not a directory", dir.display()),
        ));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} is writable by group or others (mode {mode:04o}), so they could replace what is written there; make it private (chmod go-w {}) or choose another directory",
                dir.display(),
                dir.display()
            ),
        ));
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me && meta.uid() != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} belongs to uid {}, not to this user (uid {me}) or root; choose a directory of your own",
                dir.display(),
                meta.uid()
            ),
        ));
    }
    Ok(())
}

/// Writes `contents` to `path` with exactly `mode`, atomically: readers see the old file or
/// the new one, never a part, and a crash leaves no half-written key in place.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    check_dir(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (tmp, mut file) = create_temp(dir, &name, mode)?;
    let written = (|| {
        // The mode given at creation is masked by the umask; set it exactly.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

/// A new file next to the target, under a random name; never an existing file or a symlink.
fn create_temp(dir: &Path, name: &str, mode: u32) -> io::Result<(std::path::PathBuf, fs::File)> {
    let rng = SystemRandom::new();
    let mut last = None;
    for _ in 0..8 {
        let mut bytes = [0u8; 8];
        rng.fill(&mut bytes)
            .map_err(|_| io::Error::other("no randomness for a temporary file name"))?;
        let suffix: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let tmp = dir.join(format!(".{name}.tmp-{suffix}"));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(OFlag::O_NOFOLLOW.bits() | OFlag::O_CLOEXEC.bits())
            .open(&tmp)
        {
            Ok(f) => return Ok((tmp, f)),
            // Someone planted this name: take another.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no free temporary file name")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn private_dir() -> tempfile::TempDir {
        let d = tempfile::tempdir().expect("tempdir");
        fs::set_permissions(d.path(), fs::Permissions::from_mode(0o700)).expect("chmod");
        d
    }

    #[test]
    fn writes_with_the_exact_mode_and_replaces_atomically() {
        let d = private_dir();
        let path = d.path().join("svid.key");
        write_atomic(&path, b"one", 0o600).expect("write");
        write_atomic(&path, b"two", 0o600).expect("rewrite");
        assert_eq!(fs::read(&path).expect("read"), b"two");
        let mode = fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Nothing else is left behind.
        assert_eq!(fs::read_dir(d.path()).expect("ls").count(), 1);
    }

    #[test]
    fn a_symlink_planted_at_the_target_is_replaced_not_followed() {
        let d = private_dir();
        let victim = d.path().join("victim");
        fs::write(&victim, b"precious").expect("victim");
        let path = d.path().join("svid.key");
        std::os::unix::fs::symlink(&victim, &path).expect("symlink");
        write_atomic(&path, b"key", 0o600).expect("write");
        assert_eq!(fs::read(&victim).expect("victim"), b"precious");
        assert!(!fs::symlink_metadata(&path).expect("meta").is_symlink());
        assert_eq!(fs::read(&path).expect("read"), b"key");
    }

    #[test]
    fn a_group_or_world_writable_directory_is_refused() {
        for mode in [0o770, 0o777, 0o1777, 0o722] {
            let d = private_dir();
            fs::set_permissions(d.path(), fs::Permissions::from_mode(mode)).expect("chmod");
            let path = d.path().join("svid.key");
            let e = write_atomic(&path, b"key", 0o600).expect_err("refused");
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{mode:o}");
            assert!(e.to_string().contains("chmod go-w"), "{e}");
            assert!(!path.exists());
            assert_eq!(fs::read_dir(d.path()).expect("ls").count(), 0);
        }
    }

    #[test]
    fn a_directory_of_another_user_is_refused() {
        if !nix::unistd::geteuid().is_root() {
            integration::skip::skip(
                "a_directory_of_another_user_is_refused",
                "needs root to chown",
            );
            return;
        }
        let d = private_dir();
        std::os::unix::fs::chown(d.path(), Some(65534), Some(65534)).expect("chown");
        let e = write_atomic(&d.path().join("svid.key"), b"key", 0o600).expect_err("refused");
        assert!(e.to_string().contains("belongs to uid 65534"), "{e}");
    }
}
