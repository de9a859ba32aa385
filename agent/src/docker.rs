//! Docker workload attestation: the labels, image and name of the container a caller runs in,
//! read from the Docker Engine API over its Unix socket.
//!
//! Selectors: `docker:label:<key>=<value>` for every label, `docker:image:<Config.Image>` (the
//! image as the container was created with it, e.g. `registry/app:1.2`),
//! `docker:image_id:<Image>` (the content digest, `sha256:...`) and `docker:name:<name>`.
//!
//! API version: the engine's own `ApiVersion`, probed once from `/version` (the one unversioned
//! endpoint every engine has) and reused. Pinning one version would break on some engine: 20.10
//! (this project's machines) refuses anything above 1.41, Engine 29 refuses anything below 1.44.
//! The fields read here (`Id`, `Name`, `Image`, `Config.Image`, `Config.Labels`) are the same in
//! every API version since 1.12, so whatever the engine speaks is fine.
//!
//! Binding the caller to the container: `/proc/<pid>/cgroup` only says which container the
//! caller *claims* to be in (a process can move into any cgroup it can write, and users with a
//! delegated cgroup can name one after any container). The engine's answer settles it: the
//! caller's pid namespace and mount namespace must be those of the container's main process
//! (`State.Pid`), which only a process started in the container (or `docker exec`'d into it)
//! shares. Reading another uid's `/proc/<pid>/ns/*` needs CAP_SYS_PTRACE (or root with it).
//!
//! Missing socket: the agent still starts (the CLI logs a warning once), host processes keep
//! their Unix selectors, and callers *in a Docker container* are refused (Unavailable) until the
//! engine answers. Serving them with Unix selectors only would never widen what is granted (an
//! entry needs all its selectors), but it would turn an infrastructure fault into a silent
//! "no identity" for workloads whose entries use docker selectors; Unavailable makes clients
//! retry and names the cause. The socket is opened per lookup, so an engine that starts after
//! the agent is picked up without a restart.
//!
//! Why this is one file of over 500 lines: the Docker attestor: a small Engine API client over its
//! Unix socket, the inspect cache and the selector mapping; a Docker client crate would bring a
//! second HTTP and TLS stack for its two calls (`/version`, `/containers/<id>/json`).

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::StatusCode;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::UnixStream;
use tokio::sync::Semaphore;

use crate::attest::{BoxFuture, Caller, FileId, PluginError, SelectorPlugin};

/// Where the engine listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/var/run/docker.sock";

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("docker socket {0} is missing: docker attestation is unavailable")]
    SocketMissing(PathBuf),
    #[error("permission denied on docker socket {0}: docker attestation is unavailable")]
    PermissionDenied(PathBuf),
    #[error("cannot connect to docker socket {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("docker engine did not answer within {0:?}")]
    Timeout(Duration),
    #[error("http exchange with the docker engine failed: {0}")]
    Http(#[source] hyper::Error),
    #[error("docker answer larger than {0} bytes")]
    TooLarge(usize),
    #[error("container {0} not found (gone?)")]
    NotFound(String),
    #[error("docker engine answered {status} to {path}: {message}")]
    Status {
        status: u16,
        path: String,
        message: String,
    },
    #[error("docker engine sent invalid json for {path}: {source}")]
    Json {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("docker engine sent an invalid api version {0:?}")]
    BadApiVersion(String),
    #[error("docker engine answered for container {got} when asked for {asked}")]
    WrongContainer { asked: String, got: String },
    #[error("not a full container id: {0:?}")]
    BadContainerId(String),
    #[error("invalid request path {0:?}")]
    BadPath(String),
    #[error("container {0} is not running")]
    NotRunning(String),
}

/// The [`SelectorPlugin`] for Docker. Cheap to keep for the agent's lifetime; lookups share a
/// short-lived cache and a small bound on concurrent engine requests.
pub struct DockerPlugin {
    socket: PathBuf,
    timeout: Duration,
    max_body: usize,
    cache_ttl: Duration,
    cache_capacity: usize,
    /// `Some` once probed (or pinned); reset when the engine refuses the version (upgraded).
    api_version: Mutex<Option<String>>,
    pinned: bool,
    cache: Mutex<HashMap<String, Cached>>,
    /// A burst of new callers must not open hundreds of engine connections at once; a waiter
    /// usually finds the answer cached when its turn comes.
    in_flight: Semaphore,
    /// Where the namespaces of `State.Pid` are read (`/proc`; a fake one in tests).
    proc_root: PathBuf,
}

/// What the engine said about one container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerInfo {
    pub selectors: Arc<Vec<String>>,
    /// `State.Pid`: the container's main process, on the host's pid namespace; 0 when the
    /// container is not running.
    pub pid: i64,
}

struct Cached {
    at: Instant,
    info: ContainerInfo,
}

/// Parallel engine requests at most.
const MAX_IN_FLIGHT: usize = 4;
/// Longest Docker error message quoted in an error.
const MAX_MESSAGE: usize = 200;

impl DockerPlugin {
    /// A plugin talking to the engine at `socket`. Defaults: 2 s per lookup, 1 MiB answers,
    /// selectors cached 30 s for up to 1024 containers, API version probed.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            timeout: Duration::from_secs(2),
            max_body: 1024 * 1024,
            // Labels and image never change on a container; a `docker rename` shows after at
            // most this long. Short enough that a removed container's id stops answering soon.
            cache_ttl: Duration::from_secs(30),
            cache_capacity: 1024,
            api_version: Mutex::new(None),
            pinned: false,
            cache: Mutex::new(HashMap::new()),
            in_flight: Semaphore::new(MAX_IN_FLIGHT),
            proc_root: PathBuf::from("/proc"),
        }
    }

    /// Reads the container's namespaces under `proc_root` instead of `/proc` (tests).
    pub fn with_proc_root(mut self, proc_root: impl Into<PathBuf>) -> Self {
        self.proc_root = proc_root.into();
        self
    }

    /// Bound on one lookup, waiting for a free engine slot and the version probe included.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Largest engine answer accepted, in bytes.
    pub fn with_max_body(mut self, bytes: usize) -> Self {
        self.max_body = bytes;
        self
    }

    /// How long a container's selectors are reused; zero disables the cache.
    pub fn with_cache_ttl(mut self, ttl: Duration) -> Self {
        self.cache_ttl = ttl;
        self
    }

    /// How many containers are cached at most.
    pub fn with_cache_capacity(mut self, capacity: usize) -> Self {
        self.cache_capacity = capacity;
        self
    }

    /// Uses `version` (`"1.41"`) instead of probing `/version`.
    pub fn with_api_version(mut self, version: &str) -> Result<Self, DockerError> {
        check_api_version(version)?;
        self.api_version = Mutex::new(Some(version.to_owned()));
        self.pinned = true;
        Ok(self)
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The API version lookups use: the pinned one, or the engine's, asked once. At start, this
    /// doubles as the check that the socket exists and answers.
    pub async fn api_version(&self) -> Result<String, DockerError> {
        tokio::time::timeout(self.timeout, self.api_version_inner())
            .await
            .map_err(|_| DockerError::Timeout(self.timeout))?
    }

    /// The selectors of container `id` (a full 64-hex id), from the cache when fresh.
    pub async fn container_selectors(&self, id: &str) -> Result<Arc<Vec<String>>, DockerError> {
        Ok(self.container_info(id).await?.selectors)
    }

    /// What the engine says about container `id` (a full 64-hex id), from the cache when fresh.
    pub async fn container_info(&self, id: &str) -> Result<ContainerInfo, DockerError> {
        if !is_full_id(id) {
            // The id goes into a URL, and the engine also resolves names and id prefixes:
            // only a full id names exactly one container.
            return Err(DockerError::BadContainerId(id.to_owned()));
        }
        if let Some(hit) = self.cached(id) {
            return Ok(hit);
        }
        tokio::time::timeout(self.timeout, self.lookup(id))
            .await
            .map_err(|_| DockerError::Timeout(self.timeout))?
    }

    /// As [`DockerPlugin::container_info`], always asking the engine.
    async fn container_info_fresh(&self, id: &str) -> Result<ContainerInfo, DockerError> {
        lock(&self.cache).remove(id);
        self.container_info(id).await
    }

    async fn lookup(&self, id: &str) -> Result<ContainerInfo, DockerError> {
        // The semaphore is never closed; an error could only mean it was.
        let _permit = self.in_flight.acquire().await;
        if let Some(hit) = self.cached(id) {
            return Ok(hit);
        }
        let version = self.api_version_inner().await?;
        let path = format!("/v{version}/containers/{id}/json");
        let (status, body) = self.get(&path).await?;
        if status == StatusCode::NOT_FOUND {
            return Err(DockerError::NotFound(id.to_owned()));
        }
        if status == StatusCode::BAD_REQUEST && !self.pinned {
            // Most likely the engine was upgraded past our probed version: probe again next
            // time rather than failing until the agent restarts.
            *lock(&self.api_version) = None;
        }
        check_status(status, &path, &body)?;
        let info = info_from_inspect(id, &path, &body)?;
        self.store(id, info.clone());
        Ok(info)
    }

    async fn api_version_inner(&self) -> Result<String, DockerError> {
        if let Some(v) = lock(&self.api_version).clone() {
            return Ok(v);
        }
        let path = "/version";
        let (status, body) = self.get(path).await?;
        check_status(status, path, &body)?;
        let answer: VersionAnswer =
            serde_json::from_slice(&body).map_err(|source| DockerError::Json {
                path: path.to_owned(),
                source,
            })?;
        check_api_version(&answer.api_version)?;
        *lock(&self.api_version) = Some(answer.api_version.clone());
        Ok(answer.api_version)
    }

    /// One GET on a fresh connection: a lookup is rare (cached), and a fresh connection leaves
    /// no idle state to go stale when the engine restarts.
    async fn get(&self, path: &str) -> Result<(StatusCode, Bytes), DockerError> {
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|e| connect_error(&self.socket, e))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(DockerError::Http)?;
        // Aborted when this future ends or is dropped (timeout): a silent engine must not keep
        // a task and a socket open behind us.
        let _conn = AbortOnDrop(tokio::spawn(conn));
        let req = hyper::Request::get(path)
            // HTTP/1.1 needs a Host; the engine ignores its value.
            .header(hyper::header::HOST, "docker")
            .body(Empty::<Bytes>::new())
            .map_err(|_| DockerError::BadPath(path.to_owned()))?;
        let resp = sender.send_request(req).await.map_err(DockerError::Http)?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), self.max_body)
            .collect()
            .await
            .map_err(|e| match e.downcast::<hyper::Error>() {
                Ok(e) => DockerError::Http(*e),
                // The only other error Limited yields is its LengthLimitError.
                Err(_) => DockerError::TooLarge(self.max_body),
            })?
            .to_bytes();
        Ok((status, body))
    }

    fn cached(&self, id: &str) -> Option<ContainerInfo> {
        let cache = lock(&self.cache);
        let hit = cache.get(id)?;
        (hit.at.elapsed() < self.cache_ttl).then(|| hit.info.clone())
    }

    fn store(&self, id: &str, info: ContainerInfo) {
        if self.cache_ttl.is_zero() || self.cache_capacity == 0 {
            return;
        }
        let mut cache = lock(&self.cache);
        if cache.len() >= self.cache_capacity && !cache.contains_key(id) {
            cache.retain(|_, c| c.at.elapsed() < self.cache_ttl);
            // Still full of fresh entries: drop the oldest. A scan, but only when full, and the
            // capacity is small.
            if cache.len() >= self.cache_capacity {
                let oldest = cache
                    .iter()
                    .min_by_key(|(_, c)| c.at)
                    .map(|(k, _)| k.clone());
                if let Some(oldest) = oldest {
                    cache.remove(&oldest);
                }
            }
        }
        cache.insert(
            id.to_owned(),
            Cached {
                at: Instant::now(),
                info,
            },
        );
    }
}

impl SelectorPlugin for DockerPlugin {
    fn name(&self) -> &'static str {
        "docker"
    }

    fn selectors<'a>(
        &'a self,
        caller: &'a Caller,
    ) -> BoxFuture<'a, Result<Vec<String>, PluginError>> {
        Box::pin(async move {
            // Not in a container: nothing to add, and no reason to bother the engine.
            let Some(id) = &caller.container_id else {
                return Ok(Vec::new());
            };
            let unavailable = |e: DockerError| match e {
                DockerError::NotFound(_) | DockerError::NotRunning(_) => {
                    PluginError::denied("docker_container_not_running", identity::report::chain(&e))
                }
                _ => PluginError::unavailable(
                    "docker_engine_unavailable",
                    identity::report::chain(&e),
                ),
            };
            if caller.pid_ns.is_none() || caller.mnt_ns.is_none() {
                return Err(PluginError::unavailable(
                    "docker_caller_namespaces_unreadable",
                    format!(
                        "cannot read /proc/{}/ns of a caller claiming container {id}: the agent needs CAP_SYS_PTRACE to bind it to the container",
                        caller.pid
                    ),
                ));
            }
            let info = self.container_info(id).await.map_err(unavailable)?;
            if self.in_container(caller, &info).await {
                return Ok(info.selectors.as_ref().clone());
            }
            // A cached answer may be about the container's previous run (restarted since, new
            // main process): ask the engine once more before refusing.
            let info = self.container_info_fresh(id).await.map_err(unavailable)?;
            if self.in_container(caller, &info).await {
                return Ok(info.selectors.as_ref().clone());
            }
            Err(PluginError::denied(
                "docker_namespace_mismatch",
                format!(
                    "pid {} claims container {id} by its cgroup but is not in the pid and mount namespaces of the container's process {}",
                    caller.pid, info.pid
                ),
            ))
        })
    }
}

impl DockerPlugin {
    /// Whether `caller` is in the pid and mount namespaces of the container's main process.
    /// Unreadable namespaces (on either side) are not a match.
    async fn in_container(&self, caller: &Caller, info: &ContainerInfo) -> bool {
        let (Some(pid_ns), Some(mnt_ns)) = (caller.pid_ns, caller.mnt_ns) else {
            return false;
        };
        if info.pid <= 0 {
            return false;
        }
        let dir = self.proc_root.join(info.pid.to_string()).join("ns");
        let ns = tokio::task::spawn_blocking(move || {
            (
                FileId::of(&dir.join("pid")).ok(),
                FileId::of(&dir.join("mnt")).ok(),
            )
        })
        .await;
        matches!(ns, Ok((Some(p), Some(m))) if p == pid_ns && m == mnt_ns)
    }
}

/// The selectors in a `/containers/<id>/json` answer for container `id`; `path` is for errors.
/// Labels come sorted, so the order is stable.
pub fn selectors_from_inspect(
    id: &str,
    path: &str,
    body: &[u8],
) -> Result<Vec<String>, DockerError> {
    Ok(info_from_inspect(id, path, body)?
        .selectors
        .as_ref()
        .clone())
}

/// The selectors and main process of a `/containers/<id>/json` answer; a container that is not
/// running (`State.Pid` 0) is an error.
pub fn info_from_inspect(id: &str, path: &str, body: &[u8]) -> Result<ContainerInfo, DockerError> {
    let c: InspectAnswer = serde_json::from_slice(body).map_err(|source| DockerError::Json {
        path: path.to_owned(),
        source,
    })?;
    if c.id != id {
        return Err(DockerError::WrongContainer {
            asked: id.to_owned(),
            got: c.id,
        });
    }
    let mut labels: Vec<_> = c.config.labels.unwrap_or_default().into_iter().collect();
    labels.sort();
    let mut selectors: Vec<String> = labels
        .into_iter()
        .map(|(k, v)| format!("docker:label:{k}={v}"))
        .collect();
    selectors.push(format!("docker:image:{}", c.config.image));
    if !c.image.is_empty() {
        selectors.push(format!("docker:image_id:{}", c.image));
    }
    selectors.push(format!(
        "docker:name:{}",
        c.name.strip_prefix('/').unwrap_or(&c.name)
    ));
    if c.state.pid <= 0 {
        return Err(DockerError::NotRunning(id.to_owned()));
    }
    Ok(ContainerInfo {
        selectors: Arc::new(selectors),
        pid: c.state.pid,
    })
}

/// The part of `GET /containers/<id>/json` that selectors come from. Everything else in the
/// (large) answer is ignored; a missing required field is an invalid answer.
#[derive(Deserialize)]
struct InspectAnswer {
    #[serde(rename = "Id")]
    id: String,
    #[serde(rename = "Name")]
    name: String,
    #[serde(rename = "Image", default)]
    image: String,
    #[serde(rename = "Config")]
    config: InspectConfig,
    #[serde(rename = "State")]
    state: InspectState,
}

#[derive(Deserialize)]
struct InspectState {
    #[serde(rename = "Pid")]
    pid: i64,
}

#[derive(Deserialize)]
struct InspectConfig {
    #[serde(rename = "Image")]
    image: String,
    /// `null` when the container has none.
    #[serde(rename = "Labels", default)]
    labels: Option<HashMap<String, String>>,
}

#[derive(Deserialize)]
struct VersionAnswer {
    #[serde(rename = "ApiVersion")]
    api_version: String,
}

/// The engine's error answers are `{"message": "..."}`.
#[derive(Deserialize)]
struct ErrorAnswer {
    message: String,
}

fn check_status(status: StatusCode, path: &str, body: &[u8]) -> Result<(), DockerError> {
    if status.is_success() {
        return Ok(());
    }
    let message = match serde_json::from_slice::<ErrorAnswer>(body) {
        Ok(a) => a.message,
        Err(_) => String::from_utf8_lossy(body).into_owned(),
    };
    Err(DockerError::Status {
        status: status.as_u16(),
        path: path.to_owned(),
        message: message.chars().take(MAX_MESSAGE).collect(),
    })
}

/// `1.41`: digits, one dot, digits. The version goes into every URL, so nothing else passes.
fn check_api_version(v: &str) -> Result<(), DockerError> {
    let ok = v.split_once('.').is_some_and(|(major, minor)| {
        [major, minor]
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 4 && p.bytes().all(|b| b.is_ascii_digit()))
    });
    if ok {
        Ok(())
    } else {
        Err(DockerError::BadApiVersion(
            v.chars().take(MAX_MESSAGE).collect(),
        ))
    }
}

fn is_full_id(id: &str) -> bool {
    id.len() == 64
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn connect_error(path: &Path, e: io::Error) -> DockerError {
    match e.kind() {
        io::ErrorKind::NotFound => DockerError::SocketMissing(path.to_owned()),
        io::ErrorKind::PermissionDenied => DockerError::PermissionDenied(path.to_owned()),
        _ => DockerError::Connect {
            path: path.to_owned(),
            source: e,
        },
    }
}

/// The cache holds plain data; a panic elsewhere cannot leave it inconsistent.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const ID: &str = "870db03f6c715b4d5dd826a812aa25706c805a2a4ae197f63b6c20105ca5a0a2";

    #[test]
    fn connect_errors_name_the_socket() {
        let p = Path::new("/run/x.sock");
        let e = connect_error(p, io::Error::from(io::ErrorKind::PermissionDenied));
        assert!(matches!(e, DockerError::PermissionDenied(_)));
        assert_eq!(
            e.to_string(),
            "permission denied on docker socket /run/x.sock: docker attestation is unavailable"
        );
        let e = connect_error(p, io::Error::from(io::ErrorKind::NotFound));
        assert!(e.to_string().contains("/run/x.sock is missing"), "{e}");
        let e = connect_error(p, io::Error::from(io::ErrorKind::ConnectionRefused));
        assert!(matches!(e, DockerError::Connect { .. }));
    }

    #[test]
    fn api_versions() {
        for ok in ["1.41", "1.12", "1.52", "2.0"] {
            check_api_version(ok).unwrap();
        }
        for bad in [
            "",
            "1",
            "1.",
            ".4",
            "1.41.0",
            "v1.41",
            "1.41/../x",
            "1.4a",
            "99999.1",
        ] {
            assert!(check_api_version(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn inspect_answer_to_selectors() {
        let body = format!(
            r#"{{"Id":"{ID}","Name":"/web-1","Image":"sha256:e050","State":{{"Pid":1}},
              "Config":{{"Image":"kith/web:1.2","Labels":{{"tier":"front","app":"web","x":"a=b"}}}}}}"#
        );
        let s = selectors_from_inspect(ID, "/p", body.as_bytes()).unwrap();
        assert_eq!(
            s,
            [
                "docker:label:app=web",
                "docker:label:tier=front",
                "docker:label:x=a=b",
                "docker:image:kith/web:1.2",
                "docker:image_id:sha256:e050",
                "docker:name:web-1",
            ]
        );
        // No labels at all is fine.
        let body = format!(
            r#"{{"Id":"{ID}","Name":"/n","Image":"","State":{{"Pid":7}},"Config":{{"Image":"i","Labels":null}}}}"#
        );
        let s = selectors_from_inspect(ID, "/p", body.as_bytes()).unwrap();
        assert_eq!(s, ["docker:image:i", "docker:name:n"]);
        assert_eq!(info_from_inspect(ID, "/p", body.as_bytes()).unwrap().pid, 7);
        // Not running: no process to bind a caller to.
        let stopped = body.replace(r#""Pid":7"#, r#""Pid":0"#);
        let e = info_from_inspect(ID, "/p", stopped.as_bytes()).unwrap_err();
        assert!(matches!(e, DockerError::NotRunning(_)), "{e}");
    }

    #[test]
    fn inspect_answer_refused_when_malformed() {
        for body in [
            "".to_owned(),
            "null".to_owned(),
            "{}".to_owned(),
            format!(r#"{{"Id":"{ID}","Name":"/n","Config":null}}"#),
            format!(r#"{{"Id":"{ID}","Name":"/n","Config":{{"Image":"i","Labels":{{"a":1}}}}}}"#),
            format!(r#"{{"Id":"{ID}","Name":7,"Config":{{"Image":"i"}}}}"#),
        ] {
            let e = selectors_from_inspect(ID, "/p", body.as_bytes()).unwrap_err();
            assert!(matches!(e, DockerError::Json { .. }), "{body}: {e}");
        }
        let other = format!(
            r#"{{"Id":"{}","Name":"/n","State":{{"Pid":1}},"Config":{{"Image":"i"}}}}"#,
            "0".repeat(64)
        );
        let e = selectors_from_inspect(ID, "/p", other.as_bytes()).unwrap_err();
        assert!(matches!(e, DockerError::WrongContainer { .. }), "{e}");
    }

    #[test]
    fn cache_is_bounded() {
        let p = DockerPlugin::new("/nonexistent").with_cache_capacity(2);
        let ids: Vec<String> = (0..3).map(|i| format!("{i:064x}")).collect();
        for id in &ids {
            p.store(
                id,
                ContainerInfo {
                    selectors: Arc::new(vec![id.clone()]),
                    pid: 1,
                },
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(p.cached(&ids[0]).is_none());
        assert!(p.cached(&ids[1]).is_some());
        assert!(p.cached(&ids[2]).is_some());
        assert_eq!(lock(&p.cache).len(), 2);
    }
}
