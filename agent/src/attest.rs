//! Caller attestation for the Workload API: who is on the other end of a Unix-socket
//! connection, as selectors (`type:value`) that registration entries are matched against.
//!
//! The kernel vouches for the peer's uid, gid and pid (SO_PEERCRED, taken when the connection
//! was accepted). Everything else is read from `/proc/<pid>`, which names whatever process holds
//! that pid *now*: see [`Attestor::attest`] for how a reused pid and an exec after connect are
//! caught. Other attestors (Docker, later Kubernetes) plug in through [`SelectorPlugin`].
//!
//! What `unix:path:<p>` proves: the process that connected was, when the agent accepted the
//! connection and still at every call on it, running the file the agent itself finds at `<p>`
//! (same device and inode), and it shares the agent's mount and user namespaces, so `<p>` means
//! the same file to both. What it does not prove: anything about the file's content beyond its
//! identity (whoever can write the file or replace `<p>` decides what runs), the arguments or
//! environment of the process, or which process uses the connection (a process that connects and
//! hands the socket to another keeps its own identity on it). A process that execs between
//! `connect()` and the agent's `accept()` is seen with its new executable: the window is the
//! agent's accept latency, which is why an entry must also name `unix:uid` or `unix:gid`.
//!
//! Why this is one file of over 500 lines: the kernel's facts about a caller (SO_PEERCRED, start
//! time, executable) and the selector plugins that read them share the caller pinned at accept.

use std::future::Future;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use nix::unistd::{Gid, Group, Uid, User};
use tokio::net::unix::UCred;

use crate::workload_api::WorkloadApiMetrics;

/// The identity of a file: `(st_dev, st_ino)` of what a path resolves to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

impl FileId {
    /// `stat` (following links, so `/proc/<pid>/exe` and `/proc/<pid>/ns/*` give the file or
    /// namespace they stand for).
    pub fn of(path: &Path) -> io::Result<Self> {
        let m = std::fs::metadata(path)?;
        Ok(Self {
            dev: m.dev(),
            ino: m.ino(),
        })
    }
}

/// What SO_PEERCRED said about a connection's peer, and what the agent read about that process
/// as soon as it accepted the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCred {
    pub uid: u32,
    pub gid: u32,
    pub pid: i32,
    /// Field 22 of `/proc/<pid>/stat` at accept time (clock ticks since boot). `None` when the
    /// process had already exited (or its pid changed hands while it was read): such a caller
    /// is refused, since a later pid reuse could not be told apart.
    pub start_time: Option<u64>,
    /// The executable's identity at accept time (stat of `/proc/<pid>/exe`); `None` when it
    /// could not be read. A caller whose executable is different at a call has exec'd since.
    pub exe: Option<FileId>,
}

impl PeerCred {
    /// Takes the kernel's credentials of a freshly accepted connection and pins the process's
    /// start time and executable. `None` when the kernel gave no pid (never on Linux).
    pub fn at_accept(cred: UCred) -> Option<Self> {
        let pid = cred.pid().filter(|p| *p > 0)?;
        Some(Self::of_process(cred.uid(), cred.gid(), pid))
    }

    /// The credentials of process `pid` as they would be pinned at accept, from `/proc`.
    pub fn of_process(uid: u32, gid: u32, pid: i32) -> Self {
        Self::of_process_in(Path::new("/proc"), uid, gid, pid)
    }

    /// As [`PeerCred::of_process`], reading under `proc_root` (tests).
    pub fn of_process_in(proc_root: &Path, uid: u32, gid: u32, pid: i32) -> Self {
        // The executable first: the earlier it is read, the shorter the window in which an exec
        // after connect goes unnoticed. The start time is read on both sides of it, so that the
        // executable surely belongs to the process whose start time is kept.
        let before = start_time_of(proc_root, pid);
        let exe = FileId::of(&proc_root.join(pid.to_string()).join("exe")).ok();
        let after = start_time_of(proc_root, pid);
        Self {
            uid,
            gid,
            pid,
            start_time: before.filter(|b| Some(*b) == after),
            exe,
        }
    }
}

/// What a [`SelectorPlugin`] is told about the caller: the kernel's credentials, its
/// namespaces, and the container its cgroup names, if any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
    /// The Docker container id from `/proc/<pid>/cgroup` (see [`container_id`]). Only a claim:
    /// a plugin must bind the caller to the container by something the caller cannot choose.
    pub container_id: Option<String>,
    /// `/proc/<pid>/ns/pid` and `/proc/<pid>/ns/mnt`, when readable.
    pub pid_ns: Option<FileId>,
    pub mnt_ns: Option<FileId>,
}

/// Why a plugin refused a caller: `reason` is a short snake_case label for metrics and logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginError {
    pub reason: &'static str,
    pub detail: String,
    /// The caller is not who it claims (PermissionDenied) rather than the plugin being unable
    /// to tell right now (Unavailable).
    pub denied: bool,
}

impl PluginError {
    pub fn unavailable(reason: &'static str, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
            denied: false,
        }
    }

    pub fn denied(reason: &'static str, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
            denied: true,
        }
    }
}

impl std::fmt::Display for PluginError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.detail)
    }
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A source of extra selectors (Docker, Kubernetes, ...). Plugins run after the Unix selectors
/// and before the final pid-reuse check, so whatever they look up is covered by it.
pub trait SelectorPlugin: Send + Sync + 'static {
    /// Short name for errors and logs (`"docker"`).
    fn name(&self) -> &'static str;

    /// Selectors for `caller`; an empty list when the plugin does not apply (a process that is
    /// not in a container). An error refuses the call.
    fn selectors<'a>(
        &'a self,
        caller: &'a Caller,
    ) -> BoxFuture<'a, Result<Vec<String>, PluginError>>;
}

#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    #[error("caller exited or its pid was reused")]
    Gone,
    #[error("caller had already exited when its connection was accepted")]
    ExitedAtAccept,
    #[error("caller's executable changed since it connected (exec after connect)")]
    ExeChanged,
    #[error("caller's cgroup is not one the agent recognises: {0}")]
    Cgroup(String),
    #[error("cannot read /proc for the caller: {0}")]
    Proc(#[source] io::Error),
    #[error("{plugin} attestor refused the caller ({reason}): {detail}")]
    Plugin {
        plugin: &'static str,
        reason: &'static str,
        detail: String,
        denied: bool,
    },
    #[error("attestation task failed: {0}")]
    Task(String),
}

impl AttestError {
    /// A short snake_case label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Gone => "caller_gone",
            Self::ExitedAtAccept => "caller_exited_at_accept",
            Self::ExeChanged => "exe_changed_since_accept",
            Self::Cgroup(_) => "cgroup_unrecognised",
            Self::Proc(_) => "proc_unreadable",
            Self::Plugin { reason, .. } => reason,
            Self::Task(_) => "attestation_task_failed",
        }
    }

    /// The caller is refused for what it is or did, not for a fault on the agent's side.
    pub fn is_denial(&self) -> bool {
        match self {
            Self::Gone | Self::ExitedAtAccept | Self::ExeChanged | Self::Cgroup(_) => true,
            Self::Plugin { denied, .. } => *denied,
            Self::Proc(_) | Self::Task(_) => false,
        }
    }
}

/// Derives a caller's selectors. Cheap to share: one per agent, behind an `Arc`.
pub struct Attestor {
    proc_root: PathBuf,
    plugins: Vec<Box<dyn SelectorPlugin>>,
    metrics: Option<Arc<WorkloadApiMetrics>>,
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

    /// Reads process information under `proc_root` instead of `/proc` (tests). The agent's own
    /// namespaces are read from `<proc_root>/self/ns`.
    pub fn with_proc_root(proc_root: impl Into<PathBuf>) -> Self {
        Self {
            proc_root: proc_root.into(),
            plugins: Vec::new(),
            metrics: None,
        }
    }

    /// Adds a selector source; plugins run in the order they were added.
    pub fn with_plugin(mut self, plugin: impl SelectorPlugin) -> Self {
        self.plugins.push(Box::new(plugin));
        self
    }

    /// Counts refused callers and withheld selectors (a `unix:path` that proves nothing) by
    /// reason, and logs them.
    pub fn with_metrics(mut self, metrics: Arc<WorkloadApiMetrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The caller's selectors: `unix:uid:<n>`, `unix:gid:<n>`, `unix:user:<name>` and
    /// `unix:group:<name>` when the ids have names, `unix:path:<exe>` when it proves something
    /// (see the module documentation), then every plugin's.
    ///
    /// SECURITY: SO_PEERCRED's pid names the process that connected, but `/proc/<pid>` names
    /// whichever process holds the pid now, running whatever it exec'd since. A caller whose
    /// start time could not be read at accept is refused. The start time and the executable are
    /// compared with the ones read at accept before deriving anything, and once more after every
    /// selector (plugins included) is known. If the process is gone, the start time moved or
    /// the executable changed, the call is refused rather than served with another process's
    /// (or another program's) selectors.
    ///
    /// With [`Attestor::with_metrics`], every refusal and every withheld `unix:path` is counted
    /// by reason and logged.
    pub async fn attest(&self, cred: PeerCred) -> Result<Vec<String>, AttestError> {
        let result = self.attest_inner(cred).await;
        if let (Err(e), Some(metrics)) = (&result, &self.metrics) {
            metrics.refuse(e.reason(), Some(cred.uid), Some(cred.pid), &e.to_string());
        }
        result
    }

    async fn attest_inner(&self, cred: PeerCred) -> Result<Vec<String>, AttestError> {
        let proc_root = self.proc_root.clone();
        // uid/gid names go through NSS, which may block (LDAP, sssd): off the async workers.
        let (mut selectors, caller, started, withheld) =
            tokio::task::spawn_blocking(move || unix_selectors(&proc_root, &cred))
                .await
                .map_err(|e| AttestError::Task(e.to_string()))??;
        match (withheld, &self.metrics) {
            // Kernel threads, other uids' processes without CAP_SYS_PTRACE: common, no attack.
            (Some(w @ (Withheld::Unreadable | Withheld::NoExeAtAccept)), metrics) => {
                if let Some(metrics) = metrics {
                    metrics.refused(w.reason());
                }
                tracing::debug!(pid = cred.pid, uid = cred.uid, reason = w.reason(), "no unix:path selector for this caller");
            }
            (Some(w), Some(metrics)) => metrics.refuse(
                w.reason(),
                Some(cred.uid),
                Some(cred.pid),
                "unix:path selector withheld: the path does not name, for the agent, the file the caller runs",
            ),
            (Some(w), None) => {
                tracing::warn!(pid = cred.pid, uid = cred.uid, reason = w.reason(), "unix:path selector withheld: the path does not name, for the agent, the file the caller runs");
            }
            (None, _) => {}
        }
        for plugin in &self.plugins {
            let extra = plugin
                .selectors(&caller)
                .await
                .map_err(|e| AttestError::Plugin {
                    plugin: plugin.name(),
                    reason: e.reason,
                    detail: e.detail,
                    denied: e.denied,
                })?;
            selectors.extend(extra);
        }
        let proc_root = self.proc_root.clone();
        tokio::task::spawn_blocking(move || still_the_same(&proc_root, &cred, started))
            .await
            .map_err(|e| AttestError::Task(e.to_string()))??;
        Ok(selectors)
    }
}

/// Why a caller gets no `unix:path` selector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Withheld {
    /// `/proc/<pid>/exe` unreadable: kernel threads, or another uid's process without
    /// CAP_SYS_PTRACE.
    Unreadable,
    /// The executable could not be read at accept, so an exec since cannot be ruled out.
    NoExeAtAccept,
    OtherMountNs,
    OtherUserNs,
    /// The path, as the agent resolves it, is not the file the caller runs (a bind mount, a
    /// deleted or replaced file).
    ExeMismatch,
}

impl Withheld {
    fn reason(self) -> &'static str {
        match self {
            Self::Unreadable => "unix_path_exe_unreadable",
            Self::NoExeAtAccept => "unix_path_no_exe_at_accept",
            Self::OtherMountNs => "unix_path_other_mount_namespace",
            Self::OtherUserNs => "unix_path_other_user_namespace",
            Self::ExeMismatch => "unix_path_exe_mismatch",
        }
    }
}

type UnixAttestation = (Vec<String>, Caller, u64, Option<Withheld>);

/// The Unix selectors, the caller description for plugins, the start time they belong to, and
/// why `unix:path` was left out, if it was.
fn unix_selectors(proc_root: &Path, cred: &PeerCred) -> Result<UnixAttestation, AttestError> {
    let at_accept = cred.start_time.ok_or(AttestError::ExitedAtAccept)?;
    let started = start_time_of(proc_root, cred.pid).ok_or(AttestError::Gone)?;
    if at_accept != started {
        return Err(AttestError::Gone);
    }
    let pid_dir = proc_root.join(cred.pid.to_string());
    let exe_now = match FileId::of(&pid_dir.join("exe")) {
        Ok(id) => Some(id),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(AttestError::Gone),
        Err(_) => None,
    };
    if cred.exe.is_some() && exe_now != cred.exe {
        return Err(AttestError::ExeChanged);
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
    let ns = |pid_dir: &Path, kind: &str| FileId::of(&pid_dir.join("ns").join(kind)).ok();
    let pid_ns = ns(&pid_dir, "pid");
    let mnt_ns = ns(&pid_dir, "mnt");
    let withheld = match unix_path(proc_root, &pid_dir, cred.exe, mnt_ns) {
        Ok(path) => {
            selectors.push(format!("unix:path:{}", path.display()));
            None
        }
        Err(w) => Some(w),
    };
    let container_id = match std::fs::read_to_string(pid_dir.join("cgroup")) {
        Ok(text) => container_id(&text).map_err(AttestError::Cgroup)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(AttestError::Gone),
        Err(e) => return Err(AttestError::Proc(e)),
    };
    let caller = Caller {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
        container_id,
        pid_ns,
        mnt_ns,
    };
    Ok((selectors, caller, started, withheld))
}

/// The caller's executable path, if it proves what `unix:path` claims: the caller shares the
/// agent's mount and user namespaces (so a path means the same file to both), and the file the
/// agent finds at that path is the very file the caller runs, the one it ran at accept.
fn unix_path(
    proc_root: &Path,
    pid_dir: &Path,
    at_accept: Option<FileId>,
    mnt_ns: Option<FileId>,
) -> Result<PathBuf, Withheld> {
    let exe = std::fs::read_link(pid_dir.join("exe")).map_err(|_| Withheld::Unreadable)?;
    let at_accept = at_accept.ok_or(Withheld::NoExeAtAccept)?;
    let own = proc_root.join("self").join("ns");
    let mine = |kind: &str| FileId::of(&own.join(kind)).ok();
    // An unreadable namespace of either side is a mismatch: nothing is vouched for unseen.
    if mnt_ns.is_none() || mnt_ns != mine("mnt") {
        return Err(Withheld::OtherMountNs);
    }
    let user_ns = FileId::of(&pid_dir.join("ns").join("user")).ok();
    if user_ns.is_none() || user_ns != mine("user") {
        return Err(Withheld::OtherUserNs);
    }
    // `/proc/<pid>/exe` reads " (deleted)" after an unlinked path; such a path either does not
    // resolve or resolves to another file, and fails here.
    match FileId::of(&exe) {
        Ok(id) if id == at_accept => Ok(exe),
        _ => Err(Withheld::ExeMismatch),
    }
}

/// The last check, after every selector is known: the same process (start time), running the
/// same executable as at accept.
fn still_the_same(proc_root: &Path, cred: &PeerCred, started: u64) -> Result<(), AttestError> {
    if start_time_of(proc_root, cred.pid) != Some(started) {
        return Err(AttestError::Gone);
    }
    if let Some(at_accept) = cred.exe {
        let exe = proc_root.join(cred.pid.to_string()).join("exe");
        match FileId::of(&exe) {
            Ok(now) if now == at_accept => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(AttestError::Gone),
            _ => return Err(AttestError::ExeChanged),
        }
    }
    Ok(())
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

/// The Docker container a `/proc/<pid>/cgroup` text claims, if any.
///
/// Only the engine's own layouts are recognised, as the whole cgroup path: `/docker/<64 hex>`
/// (cgroupfs driver, cgroup v1 and v2) and `/system.slice/docker-<64 hex>.scope` (systemd
/// driver, v1 and v2). A path that names a container anywhere else (nested below the
/// container, under a user's delegated cgroup, docker-in-docker) is refused, and so is a text
/// naming two different containers: a process can move into cgroups it can write, so a
/// container named in a place the engine never uses is someone's claim, not the engine's.
/// `Ok(None)` for a process in no container (`0::/`, a user session, ...).
pub fn container_id(cgroup: &str) -> Result<Option<String>, String> {
    let mut found: Option<&str> = None;
    for line in cgroup.lines() {
        // hierarchy-id:controllers:path; the path may contain ':' so split at most twice.
        let Some(path) = line.splitn(3, ':').nth(2) else {
            continue;
        };
        let id = match engine_layout(path) {
            Some(id) => id,
            None if names_a_container(path) => {
                return Err(format!(
                    "container named outside the engine's layouts: {path:?}"
                ));
            }
            None => continue,
        };
        match found {
            Some(other) if other != id => {
                return Err(format!("two containers named: {other} and {id}"));
            }
            _ => found = Some(id),
        }
    }
    Ok(found.map(str::to_owned))
}

/// The container id of a cgroup path laid out as the engine lays them out, exactly.
fn engine_layout(path: &str) -> Option<&str> {
    path.strip_prefix("/docker/")
        .or_else(|| {
            path.strip_prefix("/system.slice/docker-")
                .and_then(|s| s.strip_suffix(".scope"))
        })
        .filter(|id| is_container_id(id))
}

/// Whether any segment of `path` looks like a container's cgroup (`docker/<64 hex>` or
/// `docker-<64 hex>.scope`), wherever it sits.
fn names_a_container(path: &str) -> bool {
    let mut previous = "";
    for segment in path.split('/') {
        if previous == "docker" && is_container_id(segment) {
            return true;
        }
        if segment
            .strip_prefix("docker-")
            .and_then(|s| s.strip_suffix(".scope"))
            .is_some_and(is_container_id)
        {
            return true;
        }
        previous = segment;
    }
    false
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    const ID: &str = "3f1c0e6b2a9d4c8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e";
    const ID2: &str = "870db03f6c715b4d5dd826a812aa25706c805a2a4ae197f63b6c20105ca5a0a2";

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
        let text = format!(
            "12:pids:/docker/{ID}\n11:memory:/docker/{ID}\n1:name=systemd:/docker/{ID}\n0::/\n"
        );
        assert_eq!(container_id(&text).unwrap().as_deref(), Some(ID));
    }

    #[test]
    fn container_id_cgroup_v2_both_drivers() {
        let text = format!("0::/system.slice/docker-{ID}.scope\n");
        assert_eq!(container_id(&text).unwrap().as_deref(), Some(ID));
        let v1 = format!("4:cpu,cpuacct:/system.slice/docker-{ID}.scope\n");
        assert_eq!(container_id(&v1).unwrap().as_deref(), Some(ID));
        let cgroupfs = format!("0::/docker/{ID}\n");
        assert_eq!(container_id(&cgroupfs).unwrap().as_deref(), Some(ID));
    }

    #[test]
    fn container_id_none_for_host_processes() {
        for text in [
            "0::/\n",
            "0::/user.slice/user-1000.slice/session-3.scope\n",
            "12:pids:/\n1:name=systemd:/init.scope\n",
            "0::/system.slice/docker.service\n",
            "",
            "garbage without colons",
            // Look-alikes that name no container: too short, upper case, not hex.
            "0::/docker/abc123\n",
        ] {
            assert_eq!(container_id(text).unwrap(), None, "{text}");
        }
        assert_eq!(
            container_id(&format!("0::/docker/{}\n", ID.to_uppercase())).unwrap(),
            None
        );
        assert_eq!(
            container_id(&format!("0::/docker/{}g\n", &ID[..63])).unwrap(),
            None
        );
    }

    #[test]
    fn container_id_refuses_claims_outside_the_engine_layouts() {
        for text in [
            // A user's delegated cgroup named after a victim container.
            format!("0::/user.slice/user-1000.slice/user@1000.service/docker-{ID}.scope\n"),
            // Below the container's cgroup, or docker-in-docker.
            format!("0::/docker/{ID}/child\n"),
            format!("0::/docker/{ID2}/docker/{ID}\n"),
            format!("0::/notdocker/docker/{ID}\n"),
            format!("0::/system.slice/docker-{ID}.scope/x\n"),
            // Two different containers.
            format!("12:pids:/docker/{ID}\n11:memory:/docker/{ID2}\n"),
            format!("12:pids:/docker/{ID}\n0::/system.slice/docker-{ID2}.scope\n"),
        ] {
            assert!(container_id(&text).is_err(), "{text}");
        }
        // A `.slice` is not the engine's `.scope`: neither a claim nor a container.
        assert_eq!(
            container_id(&format!("0::/docker-{ID}.slice\n")).unwrap(),
            None
        );
    }

    /// A fake `/proc` with one process, 4242, and the agent's own `self/ns`.
    struct FakeProc {
        dir: tempfile::TempDir,
        pid: i32,
    }

    impl FakeProc {
        fn new(start: u64, cgroup: &str) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let pid = 4242;
            let p = dir.path().join(pid.to_string());
            std::fs::create_dir_all(p.join("ns")).unwrap();
            std::fs::create_dir_all(dir.path().join("self").join("ns")).unwrap();
            std::fs::write(p.join("stat"), stat_line("app", start)).unwrap();
            std::fs::write(p.join("cgroup"), cgroup).unwrap();
            // Namespaces as files; one file linked into both places means "the same namespace".
            for kind in ["mnt", "user", "pid"] {
                let own = dir.path().join("self").join("ns").join(kind);
                std::fs::write(&own, kind).unwrap();
                std::fs::hard_link(&own, p.join("ns").join(kind)).unwrap();
            }
            for bin in ["app", "other"] {
                std::fs::write(dir.path().join(bin), bin).unwrap();
            }
            let fake = Self { dir, pid };
            fake.set_exe("app");
            fake
        }

        fn pid_dir(&self) -> PathBuf {
            self.dir.path().join(self.pid.to_string())
        }

        fn bin(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }

        fn set_start(&self, start: u64) {
            std::fs::write(self.pid_dir().join("stat"), stat_line("app", start)).unwrap();
        }

        /// The process now runs `bin` (as after an exec).
        fn set_exe(&self, bin: &str) {
            let link = self.pid_dir().join("exe");
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(self.bin(bin), link).unwrap();
        }

        /// The process moves to a namespace of its own of `kind`.
        fn unshare(&self, kind: &str) {
            let ns = self.pid_dir().join("ns").join(kind);
            std::fs::remove_file(&ns).unwrap();
            std::fs::write(&ns, "private").unwrap();
        }

        /// What the accept loop would have pinned now.
        fn cred(&self) -> PeerCred {
            PeerCred::of_process_in(self.dir.path(), 0, 0, self.pid)
        }

        fn attestor(&self) -> Attestor {
            Attestor::with_proc_root(self.dir.path())
        }
    }

    fn path_selector(fake: &FakeProc, bin: &str) -> String {
        format!("unix:path:{}", fake.bin(bin).display())
    }

    #[tokio::test]
    async fn unix_selectors_from_proc() {
        let fake = FakeProc::new(100, "0::/\n");
        let cred = fake.cred();
        assert_eq!(cred.start_time, Some(100));
        assert_eq!(cred.exe, Some(FileId::of(&fake.bin("app")).unwrap()));
        let selectors = fake.attestor().attest(cred).await.unwrap();
        assert!(selectors.contains(&"unix:uid:0".to_owned()));
        assert!(selectors.contains(&"unix:gid:0".to_owned()));
        assert!(selectors.contains(&"unix:user:root".to_owned()));
        assert!(
            selectors.contains(&path_selector(&fake, "app")),
            "{selectors:?}"
        );
    }

    #[tokio::test]
    async fn unix_path_withheld_outside_the_agents_mount_or_user_namespace() {
        for (kind, reason) in [
            ("mnt", "unix_path_other_mount_namespace"),
            ("user", "unix_path_other_user_namespace"),
        ] {
            let fake = FakeProc::new(100, "0::/\n");
            fake.unshare(kind);
            let metrics = Arc::new(WorkloadApiMetrics::new());
            let attestor = fake.attestor().with_metrics(metrics.clone());
            let selectors = attestor.attest(fake.cred()).await.unwrap();
            assert!(
                !selectors.iter().any(|s| s.starts_with("unix:path:")),
                "{kind}: {selectors:?}"
            );
            assert!(selectors.contains(&"unix:uid:0".to_owned()));
            assert_eq!(metrics.refusals(reason), 1, "{kind}");
        }
    }

    #[tokio::test]
    async fn refuses_a_caller_that_exec_d_after_connecting() {
        let fake = FakeProc::new(100, "0::/\n");
        let cred = fake.cred();
        // Same pid, same start time, another program.
        fake.set_exe("other");
        let metrics = Arc::new(WorkloadApiMetrics::new());
        let err = fake
            .attestor()
            .with_metrics(metrics.clone())
            .attest(cred)
            .await
            .unwrap_err();
        assert!(matches!(err, AttestError::ExeChanged), "{err}");
        assert_eq!(err.reason(), "exe_changed_since_accept");
        assert!(err.is_denial());
        assert_eq!(metrics.refusals("exe_changed_since_accept"), 1);
    }

    #[tokio::test]
    async fn refuses_a_caller_that_exited_before_accept() {
        let fake = FakeProc::new(100, "0::/\n");
        let cred = PeerCred {
            start_time: None,
            ..fake.cred()
        };
        let err = fake.attestor().attest(cred).await.unwrap_err();
        assert!(matches!(err, AttestError::ExitedAtAccept), "{err}");
        assert_eq!(err.reason(), "caller_exited_at_accept");
        // And what the accept loop pins for a pid with no process behind it.
        let gone = PeerCred::of_process_in(fake.dir.path(), 0, 0, 999_999);
        assert_eq!(gone.start_time, None);
        assert_eq!(gone.exe, None);
        let err = fake.attestor().attest(gone).await.unwrap_err();
        assert!(matches!(err, AttestError::ExitedAtAccept), "{err}");
    }

    #[tokio::test]
    async fn refuses_pid_reused_since_accept() {
        let fake = FakeProc::new(100, "0::/\n");
        let cred = PeerCred {
            start_time: Some(99),
            ..fake.cred()
        };
        let err = fake.attestor().attest(cred).await.unwrap_err();
        assert!(matches!(err, AttestError::Gone), "{err}");
    }

    #[tokio::test]
    async fn refuses_vanished_process() {
        let fake = FakeProc::new(100, "0::/\n");
        let cred = fake.cred();
        std::fs::remove_dir_all(fake.pid_dir()).unwrap();
        let err = fake.attestor().attest(cred).await.unwrap_err();
        assert!(matches!(err, AttestError::Gone), "{err}");
    }

    #[tokio::test]
    async fn refuses_a_cgroup_claiming_a_container_outside_the_engine_layouts() {
        let fake = FakeProc::new(
            100,
            &format!("0::/user.slice/user-1000.slice/user@1000.service/docker-{ID}.scope\n"),
        );
        let err = fake.attestor().attest(fake.cred()).await.unwrap_err();
        assert!(matches!(err, AttestError::Cgroup(_)), "{err}");
        assert_eq!(err.reason(), "cgroup_unrecognised");
    }

    /// Changes the process under the attestor's feet while selectors are being derived.
    struct Swapper {
        fake: Arc<FakeProc>,
        seen: Arc<AtomicBool>,
        exec: bool,
    }

    impl SelectorPlugin for Swapper {
        fn name(&self) -> &'static str {
            "swapper"
        }

        fn selectors<'a>(
            &'a self,
            caller: &'a Caller,
        ) -> BoxFuture<'a, Result<Vec<String>, PluginError>> {
            Box::pin(async move {
                self.seen.store(true, Ordering::SeqCst);
                if self.exec {
                    self.fake.set_exe("other");
                } else {
                    self.fake.set_start(200);
                }
                Ok(vec![format!("test:pid:{}", caller.pid)])
            })
        }
    }

    #[tokio::test]
    async fn refuses_pid_reused_or_exec_during_attestation() {
        for (exec, gone) in [(false, true), (true, false)] {
            let fake = Arc::new(FakeProc::new(100, "0::/\n"));
            let seen = Arc::new(AtomicBool::new(false));
            let cred = fake.cred();
            let attestor = fake.attestor().with_plugin(Swapper {
                fake: fake.clone(),
                seen: seen.clone(),
                exec,
            });
            let err = attestor.attest(cred).await.unwrap_err();
            assert!(seen.load(Ordering::SeqCst));
            if gone {
                assert!(matches!(err, AttestError::Gone), "{err}");
            } else {
                assert!(matches!(err, AttestError::ExeChanged), "{err}");
            }
        }
    }

    struct ContainerEcho;

    impl SelectorPlugin for ContainerEcho {
        fn name(&self) -> &'static str {
            "echo"
        }

        fn selectors<'a>(
            &'a self,
            caller: &'a Caller,
        ) -> BoxFuture<'a, Result<Vec<String>, PluginError>> {
            Box::pin(async move {
                match &caller.container_id {
                    Some(id) => Ok(vec![format!("docker:id:{id}")]),
                    None => Err(PluginError::denied(
                        "echo_no_container",
                        "not in a container",
                    )),
                }
            })
        }
    }

    #[tokio::test]
    async fn plugins_see_the_container_and_their_errors_refuse() {
        let fake = FakeProc::new(100, &format!("0::/system.slice/docker-{ID}.scope\n"));
        let attestor = fake.attestor().with_plugin(ContainerEcho);
        let selectors = attestor.attest(fake.cred()).await.unwrap();
        assert!(selectors.contains(&format!("docker:id:{ID}")));

        let host = FakeProc::new(100, "0::/\n");
        let attestor = host.attestor().with_plugin(ContainerEcho);
        let err = attestor.attest(host.cred()).await.unwrap_err();
        assert!(
            matches!(
                err,
                AttestError::Plugin {
                    plugin: "echo",
                    denied: true,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(err.reason(), "echo_no_container");
    }

    #[tokio::test]
    async fn attests_this_process_for_real() {
        let cred = PeerCred::of_process(
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
            std::process::id() as i32,
        );
        let selectors = Attestor::new().attest(cred).await.unwrap();
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        assert!(
            selectors.contains(&format!("unix:path:{}", exe.display())),
            "{selectors:?}"
        );
    }
}
