//! Caller attestation for the Workload API: who is on the other end of a Unix-socket
//! connection, as selectors (`type:value`) that registration entries are matched against.
//!
//! The kernel vouches for the peer's uid, gid and pid (SO_PEERCRED, taken when the connection
//! was accepted). Everything else is read from `/proc/<pid>`, which names whatever process holds
//! that pid *now*: see [`Attestor::attest`] for how a reused pid is caught. Other attestors
//! (Docker labels and image, later Kubernetes) plug in through [`SelectorPlugin`].

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use nix::unistd::{Gid, Group, Uid, User};
use tokio::net::unix::UCred;

/// What SO_PEERCRED said about a connection's peer, and the start time of that process as read
/// when the connection was accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCred {
    pub uid: u32,
    pub gid: u32,
    pub pid: i32,
    /// Field 22 of `/proc/<pid>/stat` at accept time (clock ticks since boot), if it could be read.
    pub start_time: Option<u64>,
}

impl PeerCred {
    /// Takes the kernel's credentials of a freshly accepted connection and pins the process's
    /// start time, so that a later pid reuse is noticed. `None` when the kernel gave no pid
    /// (never on Linux).
    pub fn at_accept(cred: UCred) -> Option<Self> {
        Self::at_accept_in(Path::new("/proc"), cred)
    }

    fn at_accept_in(proc_root: &Path, cred: UCred) -> Option<Self> {
        let pid = cred.pid().filter(|p| *p > 0)?;
        Some(Self {
            uid: cred.uid(),
            gid: cred.gid(),
            pid,
            start_time: start_time_of(proc_root, pid),
        })
    }
}

/// What a [`SelectorPlugin`] is told about the caller: the kernel's credentials and the
/// container it runs in, if any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
    /// The Docker container id from `/proc/<pid>/cgroup` (see [`container_id`]).
    pub container_id: Option<String>,
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A source of extra selectors (Docker, Kubernetes, ...). Plugins run after the Unix selectors
/// and before the final pid-reuse check, so whatever they look up is covered by it.
pub trait SelectorPlugin: Send + Sync + 'static {
    /// Short name for errors and logs (`"docker"`).
    fn name(&self) -> &'static str;

    /// Selectors for `caller`; an empty list when the plugin does not apply (a process that is
    /// not in a container). An error refuses the call.
    fn selectors<'a>(&'a self, caller: &'a Caller) -> BoxFuture<'a, Result<Vec<String>, String>>;
}

#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    #[error("caller exited or its pid was reused")]
    Gone,
    #[error("cannot read /proc for the caller: {0}")]
    Proc(#[source] io::Error),
    #[error("{plugin} attestor failed: {detail}")]
    Plugin {
        plugin: &'static str,
        detail: String,
    },
    #[error("attestation task failed: {0}")]
    Task(String),
}

/// Derives a caller's selectors. Cheap to share: one per agent, behind an `Arc`.
pub struct Attestor {
    proc_root: PathBuf,
    plugins: Vec<Box<dyn SelectorPlugin>>,
}

impl Default for Attestor {
    fn default() -> Self {
        Self::new()
    }
}

impl Attestor {
    /// Unix selectors only, from the real `/proc`.
    pub fn new() -> Self {
        Self::with_proc_root("/proc")
    }

    /// Reads process information under `proc_root` instead of `/proc` (tests).
    pub fn with_proc_root(proc_root: impl Into<PathBuf>) -> Self {
        Self {
            proc_root: proc_root.into(),
            plugins: Vec::new(),
        }
    }

    /// Adds a selector source; plugins run in the order they were added.
    pub fn with_plugin(mut self, plugin: impl SelectorPlugin) -> Self {
        self.plugins.push(Box::new(plugin));
        self
    }

    /// The caller's selectors: `unix:uid:<n>`, `unix:gid:<n>`, `unix:user:<name>` and
    /// `unix:group:<name>` when the ids have names, `unix:path:<exe>` when the executable can
    /// be read, then every plugin's.
    ///
    /// SECURITY: SO_PEERCRED's pid names the process that connected, but `/proc/<pid>` names
    /// whichever process holds the pid now. The start time is compared three times: against
    /// the one read at accept, before deriving anything, and once more after every selector
    /// (plugins included) is known. If the process is gone or the start time moved, the call
    /// is refused rather than served with another process's selectors.
    pub async fn attest(&self, cred: PeerCred) -> Result<Vec<String>, AttestError> {
        let proc_root = self.proc_root.clone();
        // uid/gid names go through NSS, which may block (LDAP, sssd): off the async workers.
        let (mut selectors, caller, started) =
            tokio::task::spawn_blocking(move || unix_selectors(&proc_root, &cred))
                .await
                .map_err(|e| AttestError::Task(e.to_string()))??;
        for plugin in &self.plugins {
            let extra = plugin
                .selectors(&caller)
                .await
                .map_err(|detail| AttestError::Plugin {
                    plugin: plugin.name(),
                    detail,
                })?;
            selectors.extend(extra);
        }
        if start_time_of(&self.proc_root, cred.pid) != Some(started) {
            return Err(AttestError::Gone);
        }
        Ok(selectors)
    }
}

/// The Unix selectors, the caller description for plugins, and the start time they belong to.
fn unix_selectors(
    proc_root: &Path,
    cred: &PeerCred,
) -> Result<(Vec<String>, Caller, u64), AttestError> {
    let started = start_time_of(proc_root, cred.pid).ok_or(AttestError::Gone)?;
    if cred
        .start_time
        .is_some_and(|at_accept| at_accept != started)
    {
        return Err(AttestError::Gone);
    }
    let mut selectors = vec![
        format!("unix:uid:{}", cred.uid),
        format!("unix:gid:{}", cred.gid),
    ];
    // A lookup failure only means fewer selectors, which can never widen what is granted
    // (an entry needs all of its selectors).
    if let Ok(Some(user)) = User::from_uid(Uid::from_raw(cred.uid)) {
        selectors.push(format!("unix:user:{}", user.name));
    }
    if let Ok(Some(group)) = Group::from_gid(Gid::from_raw(cred.gid)) {
        selectors.push(format!("unix:group:{}", group.name));
    }
    let pid_dir = proc_root.join(cred.pid.to_string());
    match std::fs::read_link(pid_dir.join("exe")) {
        Ok(exe) => selectors.push(format!("unix:path:{}", exe.display())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(AttestError::Gone),
        // Kernel threads have no exe, and without CAP_SYS_PTRACE another uid's exe is
        // unreadable: no path selector then.
        Err(e) => tracing::debug!(pid = cred.pid, error = %e, "no unix:path selector"),
    }
    let container_id = match std::fs::read_to_string(pid_dir.join("cgroup")) {
        Ok(text) => container_id(&text),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(AttestError::Gone),
        Err(e) => return Err(AttestError::Proc(e)),
    };
    let caller = Caller {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
        container_id,
    };
    Ok((selectors, caller, started))
}

fn start_time_of(proc_root: &Path, pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(proc_root.join(pid.to_string()).join("stat")).ok()?;
    start_time(&stat)
}

/// Field 22 (`starttime`) of a `/proc/<pid>/stat` line. The second field is the command name in
/// parentheses and may itself hold spaces and parentheses, so fields are counted after the
/// *last* `)`.
pub fn start_time(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    // `rest` starts at field 3 (state); field 22 is 19 further.
    rest.split_ascii_whitespace().nth(19)?.parse().ok()
}

/// The Docker container id in a `/proc/<pid>/cgroup` text, if the process runs in one:
/// `.../docker/<64 hex>` (cgroupfs driver, cgroup v1 or v2) or `.../docker-<64 hex>.scope`
/// (systemd driver). `0::/` (a host process under cgroup v2) and anything else give `None`.
pub fn container_id(cgroup: &str) -> Option<String> {
    cgroup.lines().find_map(|line| {
        // hierarchy-id:controllers:path; the path may contain ':' so split at most twice.
        let path = line.splitn(3, ':').nth(2)?;
        let mut previous = "";
        for segment in path.split('/') {
            if previous == "docker" && is_container_id(segment) {
                return Some(segment.to_owned());
            }
            if let Some(id) = segment
                .strip_prefix("docker-")
                .and_then(|s| s.strip_suffix(".scope"))
                .filter(|id| is_container_id(id))
            {
                return Some(id.to_owned());
            }
            previous = segment;
        }
        None
    })
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    const ID: &str = "3f1c0e6b2a9d4c8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e";

    fn stat_line(comm: &str, start: u64) -> String {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
        // utime stime cutime cstime priority nice threads itrealvalue starttime vsize ...
        format!(
            "4242 ({comm}) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 {start} 1000 10"
        )
    }

    #[test]
    fn start_time_survives_hostile_comm() {
        assert_eq!(start_time(&stat_line("sleep", 777)), Some(777));
        assert_eq!(start_time(&stat_line("a) (b c) 9 9", 12345)), Some(12345));
        assert_eq!(start_time(&stat_line(") ", 5)), Some(5));
        assert_eq!(start_time("4242 (x) S 1 2"), None);
        assert_eq!(start_time("no parenthesis at all"), None);
        assert_eq!(start_time(""), None);
    }

    #[test]
    fn start_time_of_this_process() {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
        assert!(start_time(&stat).is_some());
    }

    #[test]
    fn container_id_cgroup_v1_cgroupfs() {
        let text =
            format!("12:pids:/docker/{ID}\n11:memory:/docker/{ID}\n1:name=systemd:/docker/{ID}\n");
        assert_eq!(container_id(&text).as_deref(), Some(ID));
    }

    #[test]
    fn container_id_systemd_scope() {
        let text = format!("0::/system.slice/docker-{ID}.scope\n");
        assert_eq!(container_id(&text).as_deref(), Some(ID));
        let v1 = format!("4:cpu,cpuacct:/system.slice/docker-{ID}.scope\n");
        assert_eq!(container_id(&v1).as_deref(), Some(ID));
    }

    #[test]
    fn container_id_none_for_host_processes() {
        assert_eq!(container_id("0::/\n"), None);
        assert_eq!(
            container_id("0::/user.slice/user-1000.slice/session-3.scope\n"),
            None
        );
        assert_eq!(
            container_id("12:pids:/\n1:name=systemd:/init.scope\n"),
            None
        );
        assert_eq!(container_id(""), None);
    }

    #[test]
    fn container_id_refuses_lookalikes() {
        // Too short, upper case, not hex, wrong parent.
        assert_eq!(container_id("0::/docker/abc123\n"), None);
        assert_eq!(
            container_id(&format!("0::/docker/{}\n", ID.to_uppercase())),
            None
        );
        assert_eq!(container_id(&format!("0::/docker/{}g\n", &ID[..63])), None);
        assert_eq!(container_id(&format!("0::/notdocker/{ID}\n")), None);
        assert_eq!(container_id(&format!("0::/docker-{ID}.slice\n")), None);
        assert_eq!(container_id("garbage without colons"), None);
    }

    /// A fake `/proc` with one process.
    struct FakeProc {
        dir: tempfile::TempDir,
        pid: i32,
    }

    impl FakeProc {
        fn new(start: u64, cgroup: &str) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let pid = 4242;
            let p = dir.path().join(pid.to_string());
            std::fs::create_dir(&p).unwrap();
            std::fs::write(p.join("stat"), stat_line("app", start)).unwrap();
            std::fs::write(p.join("cgroup"), cgroup).unwrap();
            std::os::unix::fs::symlink("/usr/bin/app", p.join("exe")).unwrap();
            Self { dir, pid }
        }

        fn set_start(&self, start: u64) {
            let p = self.dir.path().join(self.pid.to_string()).join("stat");
            std::fs::write(p, stat_line("app", start)).unwrap();
        }

        fn cred(&self, start_time: Option<u64>) -> PeerCred {
            PeerCred {
                uid: 0,
                gid: 0,
                pid: self.pid,
                start_time,
            }
        }
    }

    #[tokio::test]
    async fn unix_selectors_from_proc() {
        let fake = FakeProc::new(100, "0::/\n");
        let attestor = Attestor::with_proc_root(fake.dir.path());
        let selectors = attestor.attest(fake.cred(Some(100))).await.unwrap();
        assert!(selectors.contains(&"unix:uid:0".to_owned()));
        assert!(selectors.contains(&"unix:gid:0".to_owned()));
        assert!(selectors.contains(&"unix:user:root".to_owned()));
        assert!(selectors.contains(&"unix:path:/usr/bin/app".to_owned()));
    }

    #[tokio::test]
    async fn refuses_pid_reused_since_accept() {
        let fake = FakeProc::new(100, "0::/\n");
        let attestor = Attestor::with_proc_root(fake.dir.path());
        let err = attestor.attest(fake.cred(Some(99))).await.unwrap_err();
        assert!(matches!(err, AttestError::Gone), "{err}");
    }

    #[tokio::test]
    async fn refuses_vanished_process() {
        let fake = FakeProc::new(100, "0::/\n");
        let attestor = Attestor::with_proc_root(fake.dir.path());
        let mut cred = fake.cred(None);
        cred.pid = 999_999;
        let err = attestor.attest(cred).await.unwrap_err();
        assert!(matches!(err, AttestError::Gone), "{err}");
    }

    /// Swaps the process under the attestor's feet while selectors are being derived.
    struct Reuser {
        fake: Arc<FakeProc>,
        seen: Arc<AtomicBool>,
    }

    impl SelectorPlugin for Reuser {
        fn name(&self) -> &'static str {
            "reuser"
        }

        fn selectors<'a>(
            &'a self,
            caller: &'a Caller,
        ) -> BoxFuture<'a, Result<Vec<String>, String>> {
            Box::pin(async move {
                self.seen.store(true, Ordering::SeqCst);
                self.fake.set_start(200);
                Ok(vec![format!("test:pid:{}", caller.pid)])
            })
        }
    }

    #[tokio::test]
    async fn refuses_pid_reused_during_attestation() {
        let fake = Arc::new(FakeProc::new(100, "0::/\n"));
        let seen = Arc::new(AtomicBool::new(false));
        let attestor = Attestor::with_proc_root(fake.dir.path()).with_plugin(Reuser {
            fake: fake.clone(),
            seen: seen.clone(),
        });
        let err = attestor.attest(fake.cred(None)).await.unwrap_err();
        assert!(seen.load(Ordering::SeqCst));
        assert!(matches!(err, AttestError::Gone), "{err}");
    }

    struct ContainerEcho;

    impl SelectorPlugin for ContainerEcho {
        fn name(&self) -> &'static str {
            "echo"
        }

        fn selectors<'a>(
            &'a self,
            caller: &'a Caller,
        ) -> BoxFuture<'a, Result<Vec<String>, String>> {
            Box::pin(async move {
                match &caller.container_id {
                    Some(id) => Ok(vec![format!("docker:id:{id}")]),
                    None => Err("not in a container".into()),
                }
            })
        }
    }

    #[tokio::test]
    async fn plugins_see_the_container_and_their_errors_refuse() {
        let fake = FakeProc::new(100, &format!("0::/system.slice/docker-{ID}.scope\n"));
        let attestor = Attestor::with_proc_root(fake.dir.path()).with_plugin(ContainerEcho);
        let selectors = attestor.attest(fake.cred(Some(100))).await.unwrap();
        assert!(selectors.contains(&format!("docker:id:{ID}")));

        let host = FakeProc::new(100, "0::/\n");
        let attestor = Attestor::with_proc_root(host.dir.path()).with_plugin(ContainerEcho);
        let err = attestor.attest(host.cred(Some(100))).await.unwrap_err();
        assert!(
            matches!(err, AttestError::Plugin { plugin: "echo", .. }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn attests_this_process_for_real() {
        let cred = PeerCred {
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
            pid: std::process::id() as i32,
            start_time: None,
        };
        let selectors = Attestor::new().attest(cred).await.unwrap();
        let exe = std::env::current_exe().unwrap();
        assert!(
            selectors.contains(&format!("unix:path:{}", exe.display())),
            "{selectors:?}"
        );
    }
}
