//! Starting the demo's system, every part the real `kith` binary (`std::env::current_exe()`),
//! in the order an operator would: the CA, a join token and three registration entries, the
//! agent, then the api backend and the three sidecars. Each step waits until the part answers,
//! and says how long it took.
//!
//! The agent tells its three callers apart by the kernel's view of them (`unix:path:` is
//! `/proc/<pid>/exe`, see `agent/src/attest.rs`), so each sidecar runs from its own copy (a
//! hard link where possible) of the binary: `<tmp>/bin/web-sidecar` and so on.
//!
//! Why this is one file of over 500 lines: the start is one sequence of steps, each of which
//! can fail with its own error variant (what to do about it included), and reads best in order.

use std::ffi::OsString;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use identity::{SpiffeId, TrustDomain};
use ring::rand::{SecureRandom, SystemRandom};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::child::{self, Child, ChildError, LogTx};
use crate::observe::{self, LogEvent};
use crate::roles::{Role, Workload};
use crate::view::{Style, Term};

/// The demo's workload SVID lifetime: short enough to see rotations within a minute.
pub const SVID_TTL: Duration = Duration::from_secs(30);
/// The node the agent attests as: `spiffe://<td>/kith/node/demo-host`.
const NODE: &str = "demo-host";
/// How long any one part may take to come up.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// One running sidecar.
#[derive(Debug, Clone)]
pub struct Sidecar {
    pub workload: Workload,
    pub id: SpiffeId,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
}

/// What the demo started, in start order (stopped in reverse).
pub struct Stack {
    pub dir: PathBuf,
    pub td: TrustDomain,
    pub children: Vec<Child>,
    pub sidecars: Vec<Sidecar>,
}

impl Stack {
    pub fn new(dir: PathBuf, td: TrustDomain) -> Self {
        Self {
            dir,
            td,
            children: Vec::new(),
            sidecars: Vec::new(),
        }
    }

    pub fn sidecar(&self, w: Workload) -> Option<&Sidecar> {
        self.sidecars.iter().find(|s| s.workload == w)
    }
}

/// The parts of [`start`] that outlive it: where log events go, and who owns the tasks.
pub struct Wiring<'a> {
    pub tracker: &'a TaskTracker,
    pub log_tx: LogTx,
    pub log_rx: &'a mut mpsc::UnboundedReceiver<(Role, LogEvent)>,
    /// Events that arrived while waiting for a specific one; the live view replays them.
    pub early: &'a mut Vec<(Role, LogEvent)>,
    pub backend_stop: CancellationToken,
}

/// Starts everything into `stack`; on error, what was started is in `stack.children`.
/// Why the demo's stack did not start; the message says which component and what to do.
#[derive(Debug, thiserror::Error)]
pub enum StackError {
    #[error("cannot create {}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the temporary directory's path is too long for a Unix socket ({}); set TMPDIR to a short directory such as /tmp",
        path.display()
    )]
    PathTooLong { path: PathBuf },
    /// `what` is the command (`kith ca token create`); the source its error.
    #[error("{what} failed")]
    Command {
        what: String,
        #[source]
        source: ChildError,
    },
    #[error("kith ca token create answered without token or bundle_sha256: {0}")]
    TokenAnswer(serde_json::Value),
    #[error("node id: {0}")]
    NodeId(identity::IdError),
    #[error("cannot listen on 127.0.0.1 for the backend")]
    BackendListen(#[source] std::io::Error),
    #[error(
        "{role} holds {held:?} instead of {want}: the agent did not tell the callers apart by their unix:path"
    )]
    WrongSvid {
        role: String,
        held: Option<String>,
        want: String,
    },
    #[error("cannot find the kith binary itself")]
    OwnBinary(#[source] std::io::Error),
    #[error("the kith binary was replaced on disk while it ran (a rebuild?); run the demo again")]
    BinaryReplaced,
    #[error("cannot resolve {}", path.display())]
    Resolve {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cannot copy {} to {} (is the temporary directory full?)",
        from.display(),
        to.display()
    )]
    Copy {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the system's random number generator failed")]
    Random,
    #[error("cannot listen on 127.0.0.1 (is the loopback interface up?)")]
    Loopback(#[source] std::io::Error),
    #[error("no local address")]
    NoLocalAddr(#[source] std::io::Error),
    #[error("the log channel closed")]
    LogClosed,
    /// A component that exited or did not get ready: its title, what happened, its last log
    /// lines and a hint.
    #[error("{0}")]
    NotReady(String),
    #[error(transparent)]
    Child(#[from] ChildError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

type Result<T, E = StackError> = std::result::Result<T, E>;

pub async fn start(stack: &mut Stack, term: &mut Term, w: Wiring<'_>) -> Result<()> {
    let exe = own_binary()?;
    let dir = stack.dir.clone();
    let logs = dir.join("logs");
    let bin = dir.join("bin");
    for d in [&logs, &bin] {
        std::fs::create_dir_all(d).map_err(|source| StackError::CreateDir {
            path: d.clone(),
            source,
        })?;
    }
    let socket = dir.join("agent.sock");
    // sockaddr_un holds 108 bytes; the CA's admin socket is the longer path.
    let longest = dir.join("ca").join("admin.sock");
    if longest.as_os_str().len() >= 100 {
        return Err(StackError::PathTooLong { path: longest });
    }

    let step = Step::begin(term, "copying the kith binary for the three sidecars");
    let mut how = "hard links";
    for wl in Workload::ALL {
        if !install(&exe, &sidecar_exe(&bin, wl))? {
            how = "copies";
        }
    }
    step.ok(term, &format!("{how} in {}", bin.display()));

    // The CA, on ports the kernel picks; it logs where it listens.
    let step = Step::begin(term, "starting the CA (kith ca serve, SVID TTL 30 s)");
    let ca_dir = dir.join("ca");
    let ca = Child::spawn(
        Role::Ca,
        &exe,
        os_args(&[
            "ca",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--trust-domain",
            stack.td.as_str(),
            "--workload-ttl",
            "30s",
            "--log-format",
            "json",
        ])
        .into_iter()
        .chain([OsString::from("--data-dir"), ca_dir.clone().into()])
        .collect(),
        // SECURITY: a fresh random key-encryption key, only in the CA's environment; the
        // sealed keys die with the temporary directory.
        &[
            ("KITH_CA_KEK", random_kek()?),
            ("RUST_LOG", "info".to_owned()),
        ],
        &logs,
        w.log_tx.clone(),
        w.tracker,
    )?;
    stack.children.push(ca);
    let ca = &stack.children[0];
    let (api, metrics) = wait_ca_serving(ca, w.log_rx, w.early).await?;
    let admin_sock = ca_dir.join("admin.sock");
    wait_for(ca, "did not answer", || async {
        admin_sock.exists()
            && observe::http_get(metrics, "/readyz")
                .await
                .is_some_and(|(s, _)| s == 200)
    })
    .await?;
    step.ok(term, &format!("https://{api}"));

    let step = Step::begin(term, &format!("join token for node {NODE}"));
    let ca_flag = ca_dir.as_os_str().to_owned();
    let token = child::run_json(
        &exe,
        &[
            os_args(&["ca", "token", "create", "--name", NODE, "--json"]),
            vec!["--data-dir".into(), ca_flag.clone()],
        ]
        .concat(),
    )
    .await
    .map_err(|source| StackError::Command {
        what: "kith ca token create".to_owned(),
        source,
    })?;
    let (Some(join), Some(sha)) = (token["token"].as_str(), token["bundle_sha256"].as_str()) else {
        return Err(StackError::TokenAnswer(token));
    };
    step.ok(term, "single use, bundle pinned by SHA-256");

    let step = Step::begin(
        term,
        "registering web, api, intruder (unix:path + unix:uid)",
    );
    let parent = stack
        .td
        .id_with_path(&format!("/kith/node/{NODE}"))
        .map_err(StackError::NodeId)?;
    let uid = nix::unistd::getuid().as_raw();
    for wl in Workload::ALL {
        // Both selectors must match: the caller's executable and our uid.
        let path = sidecar_exe(&bin, wl);
        let args = [
            os_args(&[
                "ca",
                "entry",
                "create",
                "--json",
                "--id",
                wl.id(&stack.td).as_str(),
                "--parent",
                parent.as_str(),
                "--selector",
                &format!("unix:uid:{uid}"),
            ]),
            vec![
                "--selector".into(),
                format!("unix:path:{}", path.display()).into(),
                "--data-dir".into(),
                ca_flag.clone(),
            ],
        ]
        .concat();
        child::run_json(&exe, &args)
            .await
            .map_err(|source| StackError::Command {
                what: format!("kith ca entry create for {}", wl.name()),
                source,
            })?;
    }
    step.ok(term, &format!("parent {parent}"));

    let step = Step::begin(term, "starting the agent (kith agent run, join token)");
    let agent_admin = free_ports(1)?[0];
    let agent = Child::spawn(
        Role::Agent,
        &exe,
        [
            os_args(&["agent", "run", "--ca", &format!("https://{api}")]),
            os_args(&["--bundle-sha256", sha]),
            os_args(&["--admin-listen", &agent_admin.to_string()]),
            os_args(&["--log-format", "json"]),
            vec!["--data-dir".into(), dir.join("agent").into()],
            vec!["--socket".into(), socket.clone().into()],
        ]
        .concat(),
        // SECURITY: the token goes in the environment, not argv, where `ps` would show it.
        &[
            ("KITH_AGENT_JOIN_TOKEN", join.to_owned()),
            ("RUST_LOG", "info".to_owned()),
        ],
        &logs,
        w.log_tx.clone(),
        w.tracker,
    )?;
    stack.children.push(agent);
    let agent = &stack.children[1];
    // Serving starts before the workload SVIDs are issued; a sidecar that asked in between would
    // be told to retry. Wait until the agent says it holds all three.
    let held = Workload::ALL.len() as f64;
    wait_for(agent, "did not serve the three workload SVIDs", || async {
        tokio::net::UnixStream::connect(&socket).await.is_ok()
            && observe::http_get(agent_admin, "/metrics")
                .await
                .and_then(|(_, body)| observe::metric(&body, "kith_agent_svids_held"))
                .is_some_and(|n| n >= held)
    })
    .await?;
    step.ok(term, "node attested, Workload API up, 3 SVIDs held");

    let step = Step::begin(term, "starting the api backend (HTTP, in this process)");
    let backend = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(StackError::BackendListen)?;
    let backend_addr = backend.local_addr()?;
    w.tracker
        .spawn(crate::backend::serve(backend, w.backend_stop.clone()));
    step.ok(term, &format!("http://{backend_addr}"));

    let step = Step::begin(
        term,
        "starting the sidecars api, web, intruder (kith sidecar run)",
    );
    // Ports for the sidecars' listeners and admin endpoints, all held at once so they differ.
    let ports = free_ports(6)?;
    let workload_api = format!("unix://{}", socket.display());
    let api_listen = ports[0];
    let (api_at, backend) = (api_listen.to_string(), backend_addr.to_string());
    let api_id = Workload::Api.id(&stack.td).to_string();
    let web_id = Workload::Web.id(&stack.td).to_string();
    for (i, wl) in [Workload::Api, Workload::Web, Workload::Intruder]
        .into_iter()
        .enumerate()
    {
        let (listen, admin) = (ports[i], ports[3 + i]);
        let mut args = os_args(&[
            "sidecar",
            "run",
            "--workload-api",
            &workload_api,
            "--admin-listen",
            &admin.to_string(),
            "--listen",
            &listen.to_string(),
            "--log-format",
            "json",
            "--drain-timeout",
            "2s",
        ]);
        let role_args: Vec<&str> = match wl {
            Workload::Api => vec!["--forward", &backend, "--allow", &web_id],
            Workload::Web => vec!["--connect", &api_at, "--expect-id", &api_id],
            // The intruder knows whom it wants to reach; api refuses it (not_authorized).
            Workload::Intruder => vec!["--connect", &api_at, "--expect-id", &api_id],
        };
        args.extend(os_args(&role_args));
        let child = Child::spawn(
            Role::Sidecar(wl),
            &sidecar_exe(&bin, wl),
            args,
            // proxy=debug: one line per mTLS connection with the peer, version and suite.
            &[("RUST_LOG", "info,proxy=debug".to_owned())],
            &logs,
            w.log_tx.clone(),
            w.tracker,
        )?;
        stack.children.push(child);
        stack.sidecars.push(Sidecar {
            workload: wl,
            id: wl.id(&stack.td),
            listen,
            admin,
        });
    }
    for (s, c) in stack.sidecars.iter().zip(&stack.children[2..]) {
        let admin = s.admin;
        wait_for(
            c,
            "has no SVID (is its entry's unix:path selector right?)",
            || async move {
                observe::http_get(admin, "/ready")
                    .await
                    .is_some_and(|(st, _)| st == 200)
            },
        )
        .await?;
        // The agent must have told the three callers apart.
        let held = observe::scrape(admin).await.and_then(|m| m.svid);
        match held {
            Some((id, _)) if id == s.id.as_str() => {}
            other => {
                return Err(StackError::WrongSvid {
                    role: c.role.title(),
                    held: other.map(|(id, _)| id),
                    want: s.id.to_string(),
                });
            }
        }
    }
    step.ok(term, "each holds its own SVID");
    Ok(())
}

/// A startup step on one line: "starting the CA… ok (0.4 s)  https://…".
struct Step {
    began: Instant,
}

impl Step {
    fn begin(term: &mut Term, what: &str) -> Self {
        term.partial(&format!("{what}… "));
        Self {
            began: Instant::now(),
        }
    }

    fn ok(self, term: &mut Term, detail: &str) {
        let took = format!("({:.1} s)", self.began.elapsed().as_secs_f64());
        let ok = term.paint(Style::Green, "ok");
        let detail = term.paint(Style::Dim, detail);
        term.line(&format!("{ok} {took}  {detail}"));
    }
}

/// This binary, as the kernel will name it in `/proc/<pid>/exe`.
fn own_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe().map_err(StackError::OwnBinary)?;
    if exe.to_string_lossy().ends_with(" (deleted)") {
        return Err(StackError::BinaryReplaced);
    }
    exe.canonicalize()
        .map_err(|source| StackError::Resolve { path: exe, source })
}

fn sidecar_exe(bin: &Path, w: Workload) -> PathBuf {
    bin.join(format!("{}-sidecar", w.name()))
}

/// A hard link to `exe` at `to` (true), or a copy when linking is not possible (false: another
/// file system, or a kernel that refuses links to files we do not own).
fn install(exe: &Path, to: &Path) -> Result<bool> {
    if std::fs::hard_link(exe, to).is_ok() {
        return Ok(true);
    }
    std::fs::copy(exe, to).map_err(|source| StackError::Copy {
        from: exe.to_owned(),
        to: to.to_owned(),
        source,
    })?;
    Ok(false)
}

fn os_args(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

/// 32 random bytes, base64: the format of `KITH_CA_KEK`.
fn random_kek() -> Result<String> {
    let mut key = [0u8; 32];
    SystemRandom::new()
        .fill(&mut key)
        .map_err(|_| StackError::Random)?;
    Ok(base64::engine::general_purpose::STANDARD.encode(key))
}

/// `n` distinct free loopback ports. They are free when returned, not reserved: a sidecar that
/// then finds one taken says so, and the demo tells the user to run it again.
fn free_ports(n: usize) -> Result<Vec<SocketAddr>> {
    let held = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .map_err(StackError::Loopback)?;
    held.iter()
        .map(|l| l.local_addr().map_err(StackError::NoLocalAddr))
        .collect()
}

/// Waits for the CA's "kith ca serving" line, keeping other events for later.
async fn wait_ca_serving(
    ca: &Child,
    rx: &mut mpsc::UnboundedReceiver<(Role, LogEvent)>,
    early: &mut Vec<(Role, LogEvent)>,
) -> Result<(SocketAddr, SocketAddr)> {
    let serving = async {
        loop {
            tokio::select! {
                ev = rx.recv() => match ev {
                    Some((Role::Ca, LogEvent::CaServing { api, metrics })) => return Ok((api, metrics)),
                    Some(other) => early.push(other),
                    None => return Err(StackError::LogClosed),
                },
                exit = ca.ended() => return Err(StackError::NotReady(ca.explain(&format!("exited during startup ({exit})")))),
            }
        }
    };
    tokio::time::timeout(READY_WITHIN, serving)
        .await
        .map_err(|_| StackError::NotReady(ca.explain("did not start serving within 30 s")))?
}

/// Polls `ready` until it holds; fails with the child's last log lines if it exits first or
/// does not get there within [`READY_WITHIN`].
async fn wait_for<F, Fut>(child: &Child, failure: &str, mut ready: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + READY_WITHIN;
    loop {
        if ready().await {
            return Ok(());
        }
        if let Some(exit) = child.exited() {
            return Err(StackError::NotReady(with_hint(
                child.explain(&format!("exited during startup ({exit})")),
                child,
            )));
        }
        if Instant::now() > deadline {
            return Err(StackError::NotReady(with_hint(
                child.explain(&format!("{failure} within {} s", READY_WITHIN.as_secs())),
                child,
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn with_hint(mut msg: String, child: &Child) -> String {
    if child.tail().iter().any(|l| l.contains("in use")) {
        msg.push_str(
            "\n  another program took a port the demo had picked for it: run kith demo again",
        );
    }
    msg
}
