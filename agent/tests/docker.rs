//! Docker attestation against a fake Docker Engine API on a Unix socket (hyper server), and,
//! when this machine's engine is usable, against the real one with a container built here.
#![allow(clippy::unwrap_used)]

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::time::Duration;

use agent::attest::{AttestError, Attestor, Caller, FileId, PeerCred, SelectorPlugin};
use agent::docker::{DockerError, DockerPlugin};
use agent::workload_api::WorkloadApiMetrics;
use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use integration::eventually_async;
use tokio::net::UnixListener;
use tokio::task::JoinHandle;

const ID: &str = "3f1c0e6b2a9d4c8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e";
const GONE: &str = "0000000000000000000000000000000000000000000000000000000000000bad";
const IMAGE_ID: &str = "sha256:e050be6b4d0938e8baad28f3754d4b1b339691415b1222da916f75b99817484e";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Normal,
    /// `/containers/<id>/json` answers 200 with HTML.
    GarbageInspect,
    /// `/version` answers 200 with something that is not JSON.
    GarbageVersion,
    /// Requests are read and never answered.
    Hang,
    /// The inspect answer is 2 MiB.
    Huge,
    /// The inspect answer is about another container.
    WrongId,
}

/// A fake engine: 20.10's `/version` and `/v1.41/containers/<id>/json` (trimmed real answers).
struct FakeEngine {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    version_hits: Arc<AtomicUsize>,
    inspect_hits: Arc<AtomicUsize>,
    /// What the engine answers as the container's `State.Pid`: this test process unless set.
    main_pid: Arc<AtomicI64>,
    task: JoinHandle<()>,
}

impl Drop for FakeEngine {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeEngine {
    fn start(mode: Mode) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("docker.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let version_hits = Arc::new(AtomicUsize::new(0));
        let inspect_hits = Arc::new(AtomicUsize::new(0));
        let main_pid = Arc::new(AtomicI64::new(i64::from(std::process::id())));
        let (v, i, p) = (version_hits.clone(), inspect_hits.clone(), main_pid.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (v, i, p) = (v.clone(), i.clone(), p.clone());
                let service = service_fn(move |req| {
                    answer(mode, v.clone(), i.clone(), p.load(Ordering::SeqCst), req)
                });
                tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
            }
        });
        Self {
            _dir: dir,
            socket,
            version_hits,
            inspect_hits,
            main_pid,
            task,
        }
    }

    fn set_main_pid(&self, pid: i64) {
        self.main_pid.store(pid, Ordering::SeqCst);
    }

    fn plugin(&self) -> DockerPlugin {
        DockerPlugin::new(&self.socket)
    }

    fn hits(&self) -> (usize, usize) {
        (
            self.version_hits.load(Ordering::SeqCst),
            self.inspect_hits.load(Ordering::SeqCst),
        )
    }
}

async fn answer(
    mode: Mode,
    version_hits: Arc<AtomicUsize>,
    inspect_hits: Arc<AtomicUsize>,
    main_pid: i64,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if mode == Mode::Hang {
        std::future::pending::<()>().await;
    }
    let path = req.uri().path().to_owned();
    if path == "/version" {
        version_hits.fetch_add(1, Ordering::SeqCst);
        if mode == Mode::GarbageVersion {
            return Ok(reply(StatusCode::OK, "Docker is fine, thanks".into()));
        }
        return Ok(reply(StatusCode::OK, VERSION.into()));
    }
    let Some(id) = path
        .strip_prefix("/v1.41/containers/")
        .and_then(|p| p.strip_suffix("/json"))
    else {
        // What 20.10 answers for a version above its own.
        let message = r#"{"message":"client version 1.99 is too new. Maximum supported API version is 1.41"}"#;
        return Ok(reply(StatusCode::BAD_REQUEST, message.into()));
    };
    inspect_hits.fetch_add(1, Ordering::SeqCst);
    if id != ID {
        let message = format!(r#"{{"message":"No such container: {id}"}}"#);
        return Ok(reply(StatusCode::NOT_FOUND, message));
    }
    Ok(match mode {
        Mode::GarbageInspect => reply(StatusCode::OK, "<html><body>502</body></html>".into()),
        Mode::Huge => reply(StatusCode::OK, inspect(ID, &"x".repeat(2 << 20), main_pid)),
        Mode::WrongId => reply(StatusCode::OK, inspect(GONE, "web", main_pid)),
        _ => reply(StatusCode::OK, inspect(ID, "web", main_pid)),
    })
}

fn reply(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

const VERSION: &str = r#"{"Platform":{"Name":""},"Components":[{"Name":"Engine","Version":"20.10.24+dfsg1"}],
"Version":"20.10.24+dfsg1","ApiVersion":"1.41","MinAPIVersion":"1.12","GitCommit":"5d6db84",
"GoVersion":"go1.19.8","Os":"linux","Arch":"amd64","KernelVersion":"6.1.0-18-amd64","BuildTime":"2026-05-07T21:09:36.000000000+00:00"}"#;

/// A trimmed `docker inspect` answer of engine 20.10.
fn inspect(id: &str, app: &str, main_pid: i64) -> String {
    format!(
        r#"{{"Id":"{id}","Created":"2026-11-27T08:46:06.1Z","Path":"/s","Args":[],
"State":{{"Status":"running","Running":true,"Paused":false,"Pid":{main_pid},"ExitCode":0,"StartedAt":"2026-11-27T08:46:07Z"}},
"Image":"{IMAGE_ID}","ResolvConfPath":"/var/lib/docker/containers/{id}/resolv.conf",
"Name":"/web-1","RestartCount":0,"Driver":"overlay2","Platform":"linux","MountLabel":"","ProcessLabel":"",
"HostConfig":{{"NetworkMode":"default","RestartPolicy":{{"Name":"no","MaximumRetryCount":0}},"CgroupnsMode":"host"}},
"Mounts":[],
"Config":{{"Hostname":"870db03f6c71","User":"1337:1337","Env":["PATH=/usr/local/sbin:/usr/bin"],"Cmd":null,
"Image":"kith/web:1.2","Volumes":null,"WorkingDir":"","Entrypoint":["/s"],"OnBuild":null,
"Labels":{{"app":"{app}","com.docker.compose.project":"shop","tier":"front"}}}},
"NetworkSettings":{{"Bridge":"","SandboxID":"ab12","Ports":{{}},"IPAddress":"172.17.0.2","Networks":{{}}}}}}"#
    )
}

/// A caller in container `id`, in the namespaces of process `pid` (as the engine's answer says
/// the container is, by default: this test process).
fn in_container_of(id: &str, pid: u32) -> Caller {
    let ns = |kind: &str| FileId::of(Path::new(&format!("/proc/{pid}/ns/{kind}"))).ok();
    Caller {
        pid: 4242,
        uid: 1337,
        gid: 1337,
        container_id: Some(id.to_owned()),
        pid_ns: ns("pid"),
        mnt_ns: ns("mnt"),
    }
}

fn in_container(id: &str) -> Caller {
    in_container_of(id, std::process::id())
}

#[tokio::test]
async fn selectors_from_the_engine() {
    let engine = FakeEngine::start(Mode::Normal);
    let plugin = engine.plugin();
    assert_eq!(plugin.name(), "docker");
    let selectors = plugin.selectors(&in_container(ID)).await.unwrap();
    assert_eq!(
        selectors,
        [
            "docker:label:app=web",
            "docker:label:com.docker.compose.project=shop",
            "docker:label:tier=front",
            "docker:image:kith/web:1.2",
            &format!("docker:image_id:{IMAGE_ID}"),
            "docker:name:web-1",
        ]
    );
    // The version is probed once and kept, failures included.
    let _ = plugin.selectors(&in_container(GONE)).await.unwrap_err();
    assert_eq!(plugin.api_version().await.unwrap(), "1.41");
    assert_eq!(engine.hits(), (1, 2));
}

#[tokio::test]
async fn cached_per_container_for_a_while() {
    let engine = FakeEngine::start(Mode::Normal);
    let plugin = engine.plugin();
    let first = plugin.container_selectors(ID).await.unwrap();
    for _ in 0..10 {
        assert_eq!(plugin.container_selectors(ID).await.unwrap(), first);
    }
    assert_eq!(engine.hits(), (1, 1));

    let uncached = engine.plugin().with_cache_ttl(Duration::ZERO);
    uncached.container_selectors(ID).await.unwrap();
    uncached.container_selectors(ID).await.unwrap();
    assert_eq!(engine.hits(), (2, 3));

    let short = engine.plugin().with_cache_ttl(Duration::from_millis(50));
    short.container_selectors(ID).await.unwrap();
    tokio::time::sleep(Duration::from_millis(80)).await;
    short.container_selectors(ID).await.unwrap();
    assert_eq!(engine.hits(), (3, 5));
}

#[tokio::test]
async fn concurrent_callers_share_one_lookup() {
    let engine = FakeEngine::start(Mode::Normal);
    let plugin = Arc::new(engine.plugin().with_api_version("1.41").unwrap());
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let plugin = plugin.clone();
            tokio::spawn(async move { plugin.container_selectors(ID).await.unwrap() })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().len(), 6);
    }
    // At most one lookup per engine slot before the first answer is cached.
    let (versions, inspects) = engine.hits();
    assert_eq!(versions, 0, "pinned version: no probe");
    assert!((1..=4).contains(&inspects), "{inspects} lookups");
}

#[tokio::test]
async fn host_processes_need_no_engine() {
    // Neither the missing socket nor anything else is touched for a process outside containers.
    let plugin = DockerPlugin::new("/nonexistent/docker.sock");
    let host = Caller {
        container_id: None,
        ..in_container(ID)
    };
    assert_eq!(plugin.selectors(&host).await.unwrap(), Vec::<String>::new());

    let engine = FakeEngine::start(Mode::Normal);
    assert!(engine.plugin().selectors(&host).await.unwrap().is_empty());
    assert_eq!(engine.hits(), (0, 0));
}

#[tokio::test]
async fn missing_socket_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("docker.sock");
    let plugin = DockerPlugin::new(&path);
    let err = plugin.container_selectors(ID).await.unwrap_err();
    assert!(matches!(err, DockerError::SocketMissing(_)), "{err}");
    let err = plugin.selectors(&in_container(ID)).await.unwrap_err();
    assert_eq!(err.reason, "docker_engine_unavailable");
    assert!(!err.denied);
    assert_eq!(
        err.detail,
        format!(
            "docker socket {} is missing: docker attestation is unavailable",
            path.display()
        )
    );
    assert!(matches!(
        plugin.api_version().await.unwrap_err(),
        DockerError::SocketMissing(_)
    ));

    // A plain file where the socket should be: nobody listens.
    std::fs::write(&path, b"").unwrap();
    let err = plugin.container_selectors(ID).await.unwrap_err();
    assert!(matches!(err, DockerError::Connect { .. }), "{err}");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
}

#[tokio::test]
async fn engine_appearing_later_is_used() {
    let dir = tempfile::tempdir().unwrap();
    let engine = FakeEngine::start(Mode::Normal);
    let path = dir.path().join("docker.sock");
    let plugin = DockerPlugin::new(&path);
    assert!(plugin.container_selectors(ID).await.is_err());
    std::os::unix::fs::symlink(&engine.socket, &path).unwrap();
    assert_eq!(plugin.container_selectors(ID).await.unwrap().len(), 6);
}

#[tokio::test]
async fn gone_container_is_an_error() {
    let engine = FakeEngine::start(Mode::Normal);
    let err = engine.plugin().container_selectors(GONE).await.unwrap_err();
    assert!(
        matches!(&err, DockerError::NotFound(id) if id == GONE),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        format!("container {GONE} not found (gone?)")
    );
}

#[tokio::test]
async fn refuses_what_is_not_a_full_id() {
    let engine = FakeEngine::start(Mode::Normal);
    let plugin = engine.plugin();
    // The engine would resolve a name or an id prefix; and nothing may reach the URL unchecked.
    for id in [
        "web-1",
        &ID[..12],
        &format!("{ID}/../../version"),
        &ID.to_uppercase(),
        "",
    ] {
        let err = plugin.container_selectors(id).await.unwrap_err();
        assert!(matches!(err, DockerError::BadContainerId(_)), "{id}: {err}");
    }
    assert_eq!(engine.hits(), (0, 0));
}

#[tokio::test]
async fn garbage_answers_are_errors() {
    let engine = FakeEngine::start(Mode::GarbageInspect);
    let err = engine.plugin().container_selectors(ID).await.unwrap_err();
    assert!(matches!(err, DockerError::Json { .. }), "{err}");
    assert!(
        err.to_string()
            .starts_with("docker engine sent invalid json for /v1.41/containers/")
    );

    let engine = FakeEngine::start(Mode::GarbageVersion);
    let err = engine.plugin().container_selectors(ID).await.unwrap_err();
    assert!(
        matches!(&err, DockerError::Json { path, .. } if path == "/version"),
        "{err}"
    );

    let engine = FakeEngine::start(Mode::WrongId);
    let err = engine.plugin().container_selectors(ID).await.unwrap_err();
    assert!(matches!(err, DockerError::WrongContainer { .. }), "{err}");
}

#[tokio::test]
async fn oversized_answer_is_refused() {
    let engine = FakeEngine::start(Mode::Huge);
    let err = engine.plugin().container_selectors(ID).await.unwrap_err();
    assert!(matches!(err, DockerError::TooLarge(1_048_576)), "{err}");
    // A larger cap takes it.
    let big = engine.plugin().with_max_body(4 << 20);
    assert!(big.container_selectors(ID).await.is_ok());
}

// Paused time: the wait is measured on tokio's clock, which only the timers move, so the
// bound below holds however busy the machine is.
#[tokio::test(start_paused = true)]
async fn silent_engine_times_out() {
    let engine = FakeEngine::start(Mode::Hang);
    let plugin = engine.plugin().with_timeout(Duration::from_millis(300));
    let started = tokio::time::Instant::now();
    let err = plugin.container_selectors(ID).await.unwrap_err();
    assert!(matches!(err, DockerError::Timeout(_)), "{err}");
    // The configured 300 ms, not the 2 s default.
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
    assert!(matches!(
        plugin.api_version().await.unwrap_err(),
        DockerError::Timeout(_)
    ));
}

#[tokio::test]
async fn pinned_version_the_engine_refuses() {
    let engine = FakeEngine::start(Mode::Normal);
    let plugin = engine.plugin().with_api_version("1.99").unwrap();
    let err = plugin.container_selectors(ID).await.unwrap_err();
    assert!(
        matches!(&err, DockerError::Status { status: 400, message, .. } if message.contains("too new")),
        "{err}"
    );
    assert_eq!(engine.hits(), (0, 0));
    assert!(matches!(
        engine.plugin().with_api_version("1.41/x"),
        Err(DockerError::BadApiVersion(_))
    ));
}

/// A fake `/proc` with one process, 4242, in container `id` by its cgroup (cgroup v1, cgroupfs
/// driver, as here), in the namespaces of the real process `ns_of` (`None`: namespaces of its
/// own, which no real process shares).
fn fake_proc(id: &str, ns_of: Option<u32>) -> (tempfile::TempDir, PeerCred) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("4242");
    std::fs::create_dir_all(p.join("ns")).unwrap();
    let stat = "4242 (app) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 100 1000 10";
    std::fs::write(p.join("stat"), stat).unwrap();
    let cgroup = format!("12:pids:/docker/{id}\n1:name=systemd:/docker/{id}\n0::/\n");
    std::fs::write(p.join("cgroup"), cgroup).unwrap();
    std::fs::write(dir.path().join("s"), "app").unwrap();
    std::os::unix::fs::symlink(dir.path().join("s"), p.join("exe")).unwrap();
    for kind in ["pid", "mnt", "user"] {
        let link = p.join("ns").join(kind);
        match ns_of {
            Some(pid) => {
                std::os::unix::fs::symlink(format!("/proc/{pid}/ns/{kind}"), link).unwrap()
            }
            None => std::fs::write(link, "private").unwrap(),
        }
    }
    let cred = PeerCred::of_process_in(dir.path(), 0, 0, 4242);
    assert_eq!(cred.start_time, Some(100));
    (dir, cred)
}

#[tokio::test]
async fn through_the_attestor() {
    let engine = FakeEngine::start(Mode::Normal);
    let (proc_root, cred) = fake_proc(ID, Some(std::process::id()));
    let attestor = Attestor::with_proc_root(proc_root.path()).with_plugin(engine.plugin());
    let selectors = attestor.attest(cred).await.unwrap();
    assert!(
        selectors.contains(&"unix:uid:0".to_owned()),
        "{selectors:?}"
    );
    assert!(
        selectors.contains(&"docker:label:app=web".to_owned()),
        "{selectors:?}"
    );
    assert!(
        selectors.contains(&"docker:name:web-1".to_owned()),
        "{selectors:?}"
    );

    // The engine unreachable: the caller in a container is refused, not served without them.
    let attestor = Attestor::with_proc_root(proc_root.path())
        .with_plugin(DockerPlugin::new("/nonexistent/docker.sock"));
    let err = attestor.attest(cred).await.unwrap_err();
    assert!(
        matches!(&err, AttestError::Plugin { plugin: "docker", detail, denied: false, .. } if detail.contains("/nonexistent/docker.sock is missing")),
        "{err}"
    );
}

/// The attack: a process whose cgroup names a container (a cgroup it could write, or named
/// after the victim) but that is not in the container's namespaces gets none of its selectors.
#[tokio::test]
async fn a_cgroup_claim_without_the_containers_namespaces_is_refused() {
    let engine = FakeEngine::start(Mode::Normal);
    let (proc_root, cred) = fake_proc(ID, None);
    let metrics = Arc::new(WorkloadApiMetrics::new());
    let attestor = Attestor::with_proc_root(proc_root.path())
        .with_plugin(engine.plugin())
        .with_metrics(metrics.clone());
    let err = attestor.attest(cred).await.unwrap_err();
    assert!(
        matches!(
            &err,
            AttestError::Plugin {
                plugin: "docker",
                reason: "docker_namespace_mismatch",
                denied: true,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("claims container"), "{err}");
    assert_eq!(metrics.refusals("docker_namespace_mismatch"), 1);

    // Claiming through a layout the engine never uses: refused before the engine is asked.
    let (proc_root, cred) = fake_proc(ID, Some(std::process::id()));
    std::fs::write(
        proc_root.path().join("4242").join("cgroup"),
        format!("0::/user.slice/user-1000.slice/user@1000.service/docker-{ID}.scope\n"),
    )
    .unwrap();
    let attestor = Attestor::with_proc_root(proc_root.path())
        .with_plugin(engine.plugin())
        .with_metrics(metrics.clone());
    let err = attestor.attest(cred).await.unwrap_err();
    assert!(matches!(err, AttestError::Cgroup(_)), "{err}");
    assert_eq!(metrics.refusals("cgroup_unrecognised"), 1);
    // Two containers at once.
    std::fs::write(
        proc_root.path().join("4242").join("cgroup"),
        format!("12:pids:/docker/{ID}\n11:memory:/docker/{GONE}\n"),
    )
    .unwrap();
    let err = attestor.attest(cred).await.unwrap_err();
    assert!(matches!(err, AttestError::Cgroup(_)), "{err}");
    // The first caller: one lookup, and one more before refusing (a cached answer could be
    // stale). The cgroup claims never reached the engine.
    assert_eq!(engine.hits().1, 2);
}

#[tokio::test]
async fn a_stopped_or_restarted_container_is_asked_again_before_refusing() {
    let engine = FakeEngine::start(Mode::Normal);
    let plugin = engine.plugin();
    // The engine's answer names a process that is not there (the container's previous run).
    engine.set_main_pid(999_999_999);
    let err = plugin.selectors(&in_container(ID)).await.unwrap_err();
    assert_eq!(err.reason, "docker_namespace_mismatch");
    assert!(err.denied);
    // Restarted: the cached answer is stale, a fresh one binds the caller.
    engine.set_main_pid(i64::from(std::process::id()));
    assert_eq!(plugin.selectors(&in_container(ID)).await.unwrap().len(), 6);
    // Not running at all.
    engine.set_main_pid(0);
    let err = engine
        .plugin()
        .selectors(&in_container(ID))
        .await
        .unwrap_err();
    assert_eq!(err.reason, "docker_container_not_running");
}

#[tokio::test]
async fn a_caller_whose_namespaces_cannot_be_read_is_not_bound() {
    let engine = FakeEngine::start(Mode::Normal);
    let unreadable = Caller {
        pid_ns: None,
        ..in_container(ID)
    };
    let err = engine.plugin().selectors(&unreadable).await.unwrap_err();
    assert_eq!(err.reason, "docker_caller_namespaces_unreadable");
    assert!(err.detail.contains("CAP_SYS_PTRACE"), "{}", err.detail);
    assert_eq!(engine.hits(), (0, 0), "the engine is not asked");
}

/// Real namespaces: a process in its own pid and mount namespaces stands for the container.
/// Only a caller in those namespaces is bound to it.
#[tokio::test]
async fn real_namespaces_bind_the_caller_to_the_container() {
    if !nix::unistd::geteuid().is_root() {
        return skip_or_fail(
            "real_namespaces_bind_the_caller_to_the_container",
            "needs root (unshare)",
        );
    }
    let mut unshare = Command::new("unshare")
        .args(["--pid", "--mount", "--fork", "sleep", "60"])
        .spawn()
        .unwrap();
    // The sleep is unshare's child, in the new namespaces.
    let children = format!("/proc/{0}/task/{0}/children", unshare.id());
    let main_pid: u32 = eventually_async("unshare's child", Duration::from_secs(10), async || {
        let text = std::fs::read_to_string(&children).unwrap_or_default();
        let pid: u32 = text.split_whitespace().next()?.parse().unwrap();
        // Wait for the exec, so that its namespaces are the final ones.
        std::fs::read_link(format!("/proc/{pid}/exe"))
            .is_ok_and(|e| e.to_string_lossy().ends_with("sleep"))
            .then_some(pid)
    })
    .await;
    let engine = FakeEngine::start(Mode::Normal);
    engine.set_main_pid(i64::from(main_pid));
    let plugin = engine.plugin();
    // This test process claims the container: not in its namespaces.
    let err = plugin.selectors(&in_container(ID)).await.unwrap_err();
    assert_eq!(err.reason, "docker_namespace_mismatch", "{err}");
    // A process in the container's namespaces is bound to it.
    let inside = in_container_of(ID, main_pid);
    assert_eq!(plugin.selectors(&inside).await.unwrap().len(), 6);
    // In the pid namespace but not the mount namespace (or the reverse): refused.
    let half = Caller {
        mnt_ns: in_container(ID).mnt_ns,
        ..inside.clone()
    };
    assert_eq!(
        plugin.selectors(&half).await.unwrap_err().reason,
        "docker_namespace_mismatch"
    );
    let half = Caller {
        pid_ns: in_container(ID).pid_ns,
        ..inside
    };
    assert_eq!(
        plugin.selectors(&half).await.unwrap_err().reason,
        "docker_namespace_mismatch"
    );
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(main_pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    let _ = unshare.kill();
    let _ = unshare.wait();
}

// ---- The real engine ---------------------------------------------------------------------

fn docker(args: &[&str]) -> Result<String, String> {
    let out = Command::new("docker")
        .args(args)
        .output()
        .map_err(|e| format!("docker: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "docker {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Removes the test's container and image, also when an assertion fails.
struct Cleanup {
    container: String,
    image: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", &self.container]);
        let _ = docker(&["rmi", "-f", &self.image]);
    }
}

/// A static program that sleeps, in an image `FROM scratch` (nothing can be pulled here).
fn build_image(dir: &Path, tag: &str) -> Result<(), String> {
    let src = dir.join("main.rs");
    std::fs::write(
        &src,
        "fn main() { std::thread::sleep(std::time::Duration::from_secs(300)); }\n",
    )
    .map_err(|e| e.to_string())?;
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = Command::new(rustc)
        .args([
            "-C",
            "target-feature=+crt-static",
            "-C",
            "opt-level=1",
            "-o",
        ])
        .arg(dir.join("sleeper"))
        .arg(&src)
        .output()
        .map_err(|e| format!("rustc: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "static build: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    std::fs::write(
        dir.join("Dockerfile"),
        "FROM scratch\nCOPY sleeper /sleeper\nENTRYPOINT [\"/sleeper\"]\n",
    )
    .map_err(|e| e.to_string())?;
    docker(&["build", "-q", "-t", tag, &dir.display().to_string()]).map(|_| ())
}

#[tokio::test]
async fn real_engine() {
    if !nix::unistd::geteuid().is_root() {
        return skip_or_fail(
            "real_engine",
            "needs root to read another process's /proc and the docker socket",
        );
    }
    if let Err(e) = docker(&["info", "--format", "{{.ServerVersion}}"]) {
        return skip_or_fail("real_engine", &format!("no usable docker engine ({e})"));
    }
    let unique = format!(
        "kith-test-{:x}{:x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    );
    let cleanup = Cleanup {
        container: unique.clone(),
        image: format!("{unique}:latest"),
    };
    let dir = tempfile::tempdir().unwrap();
    if let Err(e) = build_image(dir.path(), &cleanup.image) {
        return skip_or_fail(
            "real_engine",
            &format!("cannot build a scratch image here ({e})"),
        );
    }
    let id = docker(&[
        "run",
        "-d",
        "--name",
        &unique,
        "--label",
        "app=web",
        "--label",
        "kith.test=1",
        &cleanup.image,
    ])
    .unwrap();
    let pid: i32 = docker(&["inspect", "-f", "{{.State.Pid}}", &id])
        .unwrap()
        .parse()
        .unwrap();
    let image_id = docker(&["inspect", "-f", "{{.Image}}", &id]).unwrap();

    // Container id from the real /proc/<pid>/cgroup, then the real engine's answer.
    let plugin = DockerPlugin::new(agent::docker::DEFAULT_SOCKET);
    let api = plugin.api_version().await.unwrap();
    let engine_api = docker(&["version", "--format", "{{.Server.APIVersion}}"]).unwrap();
    assert_eq!(api, engine_api);
    let metrics = Arc::new(WorkloadApiMetrics::new());
    let attestor = Attestor::new()
        .with_plugin(plugin)
        .with_metrics(metrics.clone());
    let cred = PeerCred::of_process(0, 0, pid);
    let selectors = attestor.attest(cred).await.unwrap();
    for expected in [
        "docker:label:app=web".to_owned(),
        "docker:label:kith.test=1".to_owned(),
        format!("docker:image:{}", cleanup.image),
        format!("docker:image_id:{image_id}"),
        format!("docker:name:{unique}"),
    ] {
        assert!(
            selectors.contains(&expected),
            "{expected} not in {selectors:?}"
        );
    }
    // `/sleeper` is a path in the container's mount namespace, not the agent's: it proves
    // nothing here, so no unix:path.
    assert!(
        !selectors.iter().any(|s| s.starts_with("unix:path:")),
        "{selectors:?}"
    );
    assert_eq!(metrics.refusals("unix_path_other_mount_namespace"), 1);

    // The attack: a host process moved into the container's cgroups (as root can; a user with
    // a delegated cgroup can make one that looks alike) claims the container, and is refused.
    let mut intruder = Command::new("sleep").arg("60").spawn().unwrap();
    let intruder_pid = intruder.id();
    let mut moved = 0;
    for entry in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        let procs = entry.path().join("docker").join(&id).join("cgroup.procs");
        if std::fs::write(&procs, intruder_pid.to_string()).is_ok() {
            moved += 1;
        }
    }
    let cgroup = std::fs::read_to_string(format!("/proc/{intruder_pid}/cgroup")).unwrap();
    assert!(
        moved > 0,
        "could not move a process into {id}'s cgroups: {cgroup}"
    );
    assert_eq!(
        agent::attest::container_id(&cgroup).unwrap().as_deref(),
        Some(id.as_str()),
        "{cgroup}"
    );
    let cred = PeerCred::of_process(0, 0, intruder_pid as i32);
    let err = attestor.attest(cred).await.unwrap_err();
    assert!(
        matches!(
            &err,
            AttestError::Plugin {
                reason: "docker_namespace_mismatch",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(metrics.refusals("docker_namespace_mismatch"), 1);
    let _ = intruder.kill();
    let _ = intruder.wait();

    // Removed: a fresh lookup (no cache) finds it gone.
    docker(&["rm", "-f", &id]).unwrap();
    let err = DockerPlugin::new(agent::docker::DEFAULT_SOCKET)
        .container_selectors(&id)
        .await
        .unwrap_err();
    assert!(matches!(err, DockerError::NotFound(_)), "{err}");
    drop(cleanup);
    assert!(docker(&["image", "inspect", &format!("{unique}:latest")]).is_err());
}

/// Outside CI a missing prerequisite skips the test and says why; under `CI=true` (root, the
/// Docker engine present) it fails: a check never passes silently.
fn skip_or_fail(test: &str, why: &str) {
    integration::skip::skip(test, why);
}
