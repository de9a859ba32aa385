//! `kith agent fetch` against the in-process Workload API server: the files it writes, the
//! watcher's rewrites and hooks, and what happens when the agent goes away.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use agent::attest::Attestor;
use agent::fetch::{
    self, CREDENTIAL_BUNDLE, FetchError, FetchOptions, Hook, PidSource, SignalTarget, WatchOptions,
    Written,
};
use agent::snapshot::{JwtSource, Snapshot, SnapshotRx, SnapshotTx, WorkloadSvid};
use agent::workload_api::{self, Limits, Method, WorkloadApiMetrics};
use common::{WorkloadPki as Pki, me, someone_else};
use identity::workload_client::WorkloadClientError;
use identity::{SpiffeId, Svid, TrustBundle, verify_x509_svid};
use integration::eventually_async;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

/// The kit's PKI, with the snapshots the agent publishes.
impl Pki {
    fn snapshot(&self, version: u64, svids: Vec<Arc<WorkloadSvid>>) -> Arc<Snapshot> {
        Arc::new(Snapshot {
            version,
            svids,
            bundle: Arc::new(self.bundle()),
        })
    }
}

/// X509 only here; a JWT request would be a test bug.
struct NoJwt;

impl JwtSource for NoJwt {
    async fn fetch_jwt(
        &self,
        _id: &SpiffeId,
        _audience: &[String],
    ) -> Result<(String, SystemTime), String> {
        Err("no jwt in these tests".to_owned())
    }
}

/// A Workload API server on `socket`, until its token is cancelled.
struct Server {
    metrics: Arc<WorkloadApiMetrics>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), workload_api::Error>>,
}

impl Server {
    fn start(socket: &Path, rx: SnapshotRx) -> Self {
        let listener = workload_api::bind(socket).unwrap();
        let shutdown = CancellationToken::new();
        let limits = Limits {
            shutdown_grace: Duration::from_millis(200),
            ..Limits::default()
        };
        let metrics = Arc::new(WorkloadApiMetrics::new());
        let task = tokio::spawn(workload_api::serve(
            listener,
            rx,
            Arc::new(NoJwt),
            Arc::new(Attestor::new()),
            limits,
            metrics.clone(),
            shutdown.clone(),
        ));
        Self {
            metrics,
            shutdown,
            task,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        within(self.task).await.unwrap().unwrap();
    }
}

struct Harness {
    dir: tempfile::TempDir,
    socket: PathBuf,
    pki: Pki,
    tx: SnapshotTx,
    version: u64,
}

impl Harness {
    /// A PKI and a snapshot whose SVIDs are `svids`; no server yet.
    fn new(svids: impl FnOnce(&Pki) -> Vec<Arc<WorkloadSvid>>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent").join("api.sock");
        let pki = Pki::new("example.org");
        let (tx, _) = watch::channel(pki.snapshot(1, svids(&pki)));
        Self {
            dir,
            socket,
            pki,
            tx,
            version: 1,
        }
    }

    fn serve(&self) -> Server {
        Server::start(&self.socket, self.tx.subscribe())
    }

    fn publish(&mut self, svids: Vec<Arc<WorkloadSvid>>) {
        self.version += 1;
        self.tx.send_replace(self.pki.snapshot(self.version, svids));
    }

    fn opts(&self, id: Option<&str>) -> FetchOptions {
        FetchOptions {
            endpoint: format!("unix://{}", self.socket.display()),
            write_dir: self.dir.path().join("creds").join("web"),
            id: id.map(str::to_owned),
        }
    }

    fn watch_opts(&self, hook: Hook) -> WatchOptions {
        let mut opts = WatchOptions::new(self.opts(None), hook);
        opts.min_backoff = Duration::from_millis(20);
        opts.max_backoff = Duration::from_millis(200);
        opts
    }
}

async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(WAIT, f).await.expect("timed out")
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |s| s.lines().count())
}

/// Reads the folder back as a consumer would, checking everything the standard requires.
fn read_layout(dir: &Path, pki: &Pki) -> Svid {
    let creds = std::fs::read(dir.join(CREDENTIAL_BUNDLE)).unwrap();
    let text = String::from_utf8(creds.clone()).unwrap();
    // One PRIVATE KEY block first, then certificates only, nothing between or around them.
    assert!(text.starts_with("-----BEGIN PRIVATE KEY-----\n"));
    assert_eq!(
        text.matches("-----BEGIN ").count(),
        3,
        "key, leaf, intermediate"
    );
    assert_eq!(text.matches("-----BEGIN CERTIFICATE-----").count(), 2);
    assert!(!text.contains(": "), "no PEM headers");
    assert!(text.ends_with("-----END CERTIFICATE-----\n"));
    let svid = Svid::from_credential_bundle(&creds).unwrap();
    assert!(
        !svid.chain().contains(&pki.root),
        "the root must not be in the chain"
    );

    let bundle_path = dir.join("example.org.spiffe-trust-bundle.pem");
    let bundle =
        TrustBundle::from_pem(Some(pki.td.clone()), &std::fs::read(&bundle_path).unwrap()).unwrap();
    assert_eq!(bundle.x509_authorities(), std::slice::from_ref(&pki.root));
    let id = verify_x509_svid(svid.chain(), &bundle, SystemTime::now()).unwrap();
    assert_eq!(&id, svid.id());

    assert_eq!(mode(&dir.join(CREDENTIAL_BUNDLE)), 0o600);
    assert_eq!(mode(&bundle_path), 0o644);
    svid
}

#[tokio::test]
async fn one_shot_writes_a_valid_layout() {
    let h = Harness::new(|pki| vec![pki.svid("/web", &[me()])]);
    let server = h.serve();
    let opts = h.opts(None);
    // A bundle of a trust domain the agent no longer sends, and an unrelated file.
    std::fs::create_dir_all(&opts.write_dir).unwrap();
    let stale = opts.write_dir.join("gone.org.spiffe-trust-bundle.pem");
    std::fs::write(&stale, "old").unwrap();
    std::fs::write(opts.write_dir.join("notes.txt"), "mine").unwrap();

    let written = within(fetch::fetch_once(&opts)).await.unwrap();
    assert!(written.changed);
    assert_eq!(written.spiffe_id, "spiffe://example.org/web");
    assert_eq!(
        written.credential_bundle,
        opts.write_dir.join(CREDENTIAL_BUNDLE)
    );
    assert_eq!(written.trust_bundles.len(), 1);
    assert_eq!(written.trust_bundles[0].trust_domain, "example.org");
    assert_eq!(written.removed, vec![stale.clone()]);
    assert_eq!(
        written.rewritten.len(),
        2,
        "the bundle and the credential bundle"
    );
    assert!(!stale.exists());
    assert!(opts.write_dir.join("notes.txt").exists());
    let svid = read_layout(&opts.write_dir, &h.pki);
    assert_eq!(svid.id().to_string(), "spiffe://example.org/web");

    // What scripts read.
    let json: serde_json::Value = serde_json::to_value(&written).unwrap();
    assert_eq!(json["spiffe_id"], "spiffe://example.org/web");
    assert!(json["not_after"].as_str().unwrap().ends_with('Z'));

    // Same SVID again: nothing is rewritten.
    let again = within(fetch::fetch_once(&opts)).await.unwrap();
    assert!(!again.changed);
    assert!(again.rewritten.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn one_shot_creates_the_directory_0755() {
    let h = Harness::new(|pki| vec![pki.svid("/web", &[me()])]);
    let server = h.serve();
    let opts = h.opts(None);
    assert!(!opts.write_dir.exists());
    within(fetch::fetch_once(&opts)).await.unwrap();
    assert_eq!(mode(&opts.write_dir), 0o755);
    read_layout(&opts.write_dir, &h.pki);
    server.stop().await;
}

#[tokio::test]
async fn one_shot_picks_the_id_asked_for() {
    let h = Harness::new(|pki| vec![pki.svid("/web", &[me()]), pki.svid("/db", &[me()])]);
    let server = h.serve();

    let first = within(fetch::fetch_once(&h.opts(None))).await.unwrap();
    assert_eq!(first.spiffe_id, "spiffe://example.org/web");
    let db = within(fetch::fetch_once(&h.opts(Some("spiffe://example.org/db"))))
        .await
        .unwrap();
    assert_eq!(db.spiffe_id, "spiffe://example.org/db");
    assert_eq!(
        read_layout(&h.opts(None).write_dir, &h.pki)
            .id()
            .to_string(),
        "spiffe://example.org/db"
    );

    let err = within(fetch::fetch_once(
        &h.opts(Some("spiffe://example.org/nope")),
    ))
    .await
    .unwrap_err();
    assert!(
        matches!(
            err,
            FetchError::Client(WorkloadClientError::IdNotIssued { .. })
        ),
        "{err}"
    );
    let msg = err.to_string();
    assert!(msg.contains("spiffe://example.org/nope"), "{msg}");
    assert!(msg.contains("spiffe://example.org/db"), "{msg}");
    server.stop().await;
}

#[tokio::test]
async fn no_entry_is_a_clear_error() {
    let h = Harness::new(|pki| vec![pki.svid("/web", &[someone_else()])]);
    let server = h.serve();
    let err = within(fetch::fetch_once(&h.opts(None))).await.unwrap_err();
    let uid = nix::unistd::getuid().as_raw();
    assert!(
        matches!(err, FetchError::Client(WorkloadClientError::NoEntry { uid: u }) if u == uid),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!(
            "no registration entry matches this process (uid {uid})"
        )),
        "{msg}"
    );
    assert!(!h.opts(None).write_dir.join(CREDENTIAL_BUNDLE).exists());
    server.stop().await;
}

#[tokio::test]
async fn agent_not_running_names_the_socket() {
    let h = Harness::new(|pki| vec![pki.svid("/web", &[me()])]);
    let err = within(fetch::fetch_once(&h.opts(None))).await.unwrap_err();
    assert!(
        matches!(
            err,
            FetchError::Client(WorkloadClientError::Unreachable { .. })
        ),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains(&h.socket.display().to_string()), "{msg}");
    assert!(msg.contains("kith agent run"), "{msg}");
    assert!(!msg.contains('\n'));

    let mut bad = h.opts(None);
    bad.endpoint = "http://localhost".into();
    let err = within(fetch::fetch_once(&bad)).await.unwrap_err();
    assert!(
        matches!(
            err,
            FetchError::Client(WorkloadClientError::Endpoint { .. })
        ),
        "{err:?}"
    );
}

/// Runs the watcher in the background; every write it reports comes out of the channel.
fn spawn_watch(
    opts: WatchOptions,
) -> (
    mpsc::UnboundedReceiver<Written>,
    CancellationToken,
    JoinHandle<Result<(), FetchError>>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let token = stop.clone();
    let task = tokio::spawn(async move {
        fetch::watch(&opts, token, |w| {
            let _ = tx.send(w.clone());
        })
        .await
    });
    (rx, stop, task)
}

#[tokio::test]
async fn watch_rewrites_on_rotation_and_runs_the_hook() {
    let mut h = Harness::new(|pki| vec![pki.svid("/web", &[me()])]);
    let server = h.serve();
    let hook_log = h.dir.path().join("hook.log");
    // The hook fails every time: the watcher must carry on regardless.
    let hook = Hook::Command(format!(
        "echo \"$SPIFFE_CREDENTIAL_FOLDER\" >> '{}'; exit 3",
        hook_log.display()
    ));
    let opts = h.watch_opts(hook);
    let dir = opts.fetch.write_dir.clone();
    let (mut writes, stop, task) = spawn_watch(opts);

    let first = within(writes.recv()).await.unwrap();
    assert!(first.changed);
    let before = read_layout(&dir, &h.pki);
    eventually_async("the first hook run", WAIT, async || lines(&hook_log) == 1).await;
    assert_eq!(
        std::fs::read_to_string(&hook_log).unwrap().trim(),
        dir.display().to_string()
    );

    h.publish(vec![h.pki.svid("/web", &[me()])]);
    let second = within(writes.recv()).await.unwrap();
    assert!(second.changed);
    let after = read_layout(&dir, &h.pki);
    assert_eq!(
        second.rewritten,
        vec![dir.join(CREDENTIAL_BUNDLE)],
        "the bundle did not change"
    );
    assert_ne!(before.leaf(), after.leaf(), "the rotated svid was written");
    assert_ne!(
        before.key().secret_pkcs8_der(),
        after.key().secret_pkcs8_der()
    );
    eventually_async("the second hook run", WAIT, async || lines(&hook_log) == 2).await;

    // A change that is not ours (another workload's SVID) rewrites nothing.
    let mut svids = h.tx.borrow().svids.clone();
    svids.push(h.pki.svid("/other", &[someone_else()]));
    h.publish(svids);
    h.publish(vec![h.pki.svid("/web", &[me()])]);
    let third = within(writes.recv()).await.unwrap();
    assert_ne!(third.not_after, "");
    eventually_async("the third hook run", WAIT, async || lines(&hook_log) == 3).await;
    assert!(writes.try_recv().is_err());

    stop.cancel();
    within(task).await.unwrap().unwrap();
    server.stop().await;
}

#[tokio::test]
async fn watch_signals_a_pid() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut usr1 = signal(SignalKind::user_defined1()).unwrap();
    let mut h = Harness::new(|pki| vec![pki.svid("/web", &[me()])]);
    let server = h.serve();
    let target: SignalTarget = format!("{}:USR1", std::process::id()).parse().unwrap();
    let (mut writes, stop, task) = spawn_watch(h.watch_opts(Hook::Signal(target)));

    within(writes.recv()).await.unwrap();
    within(usr1.recv()).await.unwrap();
    h.publish(vec![h.pki.svid("/web", &[me()])]);
    within(writes.recv()).await.unwrap();
    within(usr1.recv()).await.unwrap();

    stop.cancel();
    within(task).await.unwrap().unwrap();
    server.stop().await;
}

#[tokio::test]
async fn watch_keeps_the_files_while_the_agent_is_gone_and_reconnects() {
    let mut h = Harness::new(|pki| vec![pki.svid("/web", &[me()])]);
    let server = h.serve();
    let hook_log = h.dir.path().join("hook.log");
    let hook = Hook::Command(format!("echo rotated >> '{}'", hook_log.display()));
    let opts = h.watch_opts(hook);
    let dir = opts.fetch.write_dir.clone();
    let (mut writes, stop, task) = spawn_watch(opts);
    within(writes.recv()).await.unwrap();
    eventually_async("the first hook run", WAIT, async || lines(&hook_log) == 1).await;
    let creds = std::fs::read(dir.join(CREDENTIAL_BUNDLE)).unwrap();

    server.stop().await;
    // A socket that accepts and hangs up at once: once the watcher has come back to it a
    // few times, it has certainly seen the agent gone.
    let _ = std::fs::remove_file(&h.socket);
    let impostor = tokio::net::UnixListener::bind(&h.socket).unwrap();
    for _ in 0..3 {
        let (conn, _) = within(impostor.accept()).await.unwrap();
        drop(conn);
    }
    drop(impostor);
    assert_eq!(std::fs::read(dir.join(CREDENTIAL_BUNDLE)).unwrap(), creds);
    read_layout(&dir, &h.pki);
    assert_eq!(lines(&hook_log), 1);

    // The agent comes back with a rotated SVID.
    h.publish(vec![h.pki.svid("/web", &[me()])]);
    let server = h.serve();
    let rewritten = within(writes.recv()).await.unwrap();
    assert!(rewritten.changed);
    assert_ne!(std::fs::read(dir.join(CREDENTIAL_BUNDLE)).unwrap(), creds);
    read_layout(&dir, &h.pki);
    eventually_async("the hook after reconnecting", WAIT, async || {
        lines(&hook_log) == 2
    })
    .await;

    stop.cancel();
    within(task).await.unwrap().unwrap();
    server.stop().await;
}

#[tokio::test]
async fn watch_keeps_the_files_when_the_entry_goes_away() {
    let mut h = Harness::new(|pki| vec![pki.svid("/web", &[me()])]);
    let server = h.serve();
    let opts = h.watch_opts(Hook::None);
    let dir = opts.fetch.write_dir.clone();
    let (mut writes, stop, task) = spawn_watch(opts);
    within(writes.recv()).await.unwrap();
    let creds = std::fs::read(dir.join(CREDENTIAL_BUNDLE)).unwrap();

    // The entry is deleted: the stream ends with PermissionDenied, and so do the retries.
    h.publish(vec![h.pki.svid("/web", &[someone_else()])]);
    eventually_async("the watcher retrying without an entry", WAIT, async || {
        server
            .metrics
            .count(Method::FetchX509Svid, tonic::Code::PermissionDenied)
            >= 2
    })
    .await;
    assert_eq!(std::fs::read(dir.join(CREDENTIAL_BUNDLE)).unwrap(), creds);
    read_layout(&dir, &h.pki);
    // Then it comes back; the watcher picks it up.
    h.publish(vec![h.pki.svid("/web", &[me()])]);
    let back = within(writes.recv()).await.unwrap();
    assert!(back.changed);
    assert_ne!(std::fs::read(dir.join(CREDENTIAL_BUNDLE)).unwrap(), creds);

    stop.cancel();
    within(task).await.unwrap().unwrap();
    server.stop().await;
}

#[test]
fn signal_targets_parse() {
    let t: SignalTarget = "1234:HUP".parse().unwrap();
    assert_eq!(t.pid, PidSource::Pid(1234));
    assert_eq!(t.signal, nix::sys::signal::Signal::SIGHUP);
    let t: SignalTarget = "42:sigusr1".parse().unwrap();
    assert_eq!(t.signal, nix::sys::signal::Signal::SIGUSR1);
    let t: SignalTarget = "42:15".parse().unwrap();
    assert_eq!(t.signal, nix::sys::signal::Signal::SIGTERM);
    let t: SignalTarget = "/run/nginx.pid:HUP".parse().unwrap();
    assert_eq!(t.pid, PidSource::File("/run/nginx.pid".into()));
    for bad in ["1234", "0:HUP", "-1:HUP", "abc:HUP", "1234:NOPE", ":HUP"] {
        assert!(bad.parse::<SignalTarget>().is_err(), "{bad}");
    }
}
