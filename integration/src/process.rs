//! The processes the tests start: the `kith` binary of this build (refused when older than the
//! workspace's sources), the pods' `podapp`, commands run to completion, and [`Proc`], a child
//! killed on drop with its stderr kept in a file.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

/// The `kith` binary of this build: beside the test binary's `deps/` directory (cargo builds
/// it for the root package's tests), or `KITH_BIN`.
pub fn kith_bin() -> PathBuf {
    if let Ok(p) = std::env::var("KITH_BIN") {
        return p.into();
    }
    let bin = built("kith", "cargo build -p kith");
    if let Some(newer) = newer_source(&bin) {
        panic!(
            "{} is older than {}: rebuild it (cargo build -p kith; `cargo test --workspace` does)",
            bin.display(),
            newer.display()
        );
    }
    bin
}

/// A Rust source of the workspace changed after `bin` was built, if any: `cargo test -p
/// integration` alone does not rebuild the `kith` binary, and a stale one proves nothing.
fn newer_source(bin: &Path) -> Option<PathBuf> {
    let built = std::fs::metadata(bin).and_then(|m| m.modified()).ok()?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent()?;
    let mut dirs: Vec<PathBuf> = vec![root.join("src")];
    dirs.extend(
        std::fs::read_dir(root)
            .ok()?
            .flatten()
            .map(|e| e.path())
            // bench/ is not part of the binary.
            .filter(|p| !p.ends_with("bench"))
            .map(|p| p.join("src"))
            .filter(|p| p.is_dir()),
    );
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs")
                && entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t > built)
                && !path.starts_with(env!("CARGO_MANIFEST_DIR"))
            {
                return Some(path);
            }
        }
    }
    None
}

/// The pods' application binary (`src/bin/podapp.rs`), built with this crate's tests.
pub fn podapp() -> &'static str {
    static PATH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        built("podapp", "cargo build -p integration")
            .to_string_lossy()
            .into_owned()
    })
}

/// A binary of this build's profile directory (the test binary lives in its `deps/`).
fn built(name: &str, how: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    let bin = profile_dir.join(name);
    assert!(
        bin.exists(),
        "{} is missing: build it first ({how})",
        bin.display()
    );
    bin
}

/// Runs a command to completion; panics with its output if it fails.
pub fn sh(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn run(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", args[0]))
}

pub(crate) fn tool_works(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A process of the lab, killed on drop; its stderr is kept in a file.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    /// `child`, already spawned with its stderr going to `log`.
    pub fn new(name: &str, child: Child, log: PathBuf) -> Self {
        Self {
            name: name.to_owned(),
            child: Some(child),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.pid() as i32);
        let _ = nix::sys::signal::kill(pid, sig);
    }

    /// Waits up to `within` for the process to exit; its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let child = self.child.as_mut()?;
        crate::wait::poll(within, || child.try_wait().ok().flatten())
            .ok()
            .map(|status| status.code().unwrap_or(-1))
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
