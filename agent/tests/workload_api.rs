//! The Workload API over a real Unix socket, driven by the reference Rust client (the `spiffe`
//! crate) and, for what no proper client sends, by raw HTTP/2.
#![allow(clippy::unwrap_used)]

mod common;

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use agent::attest::Attestor;
use agent::snapshot::{JwtSource, Snapshot, SnapshotTx, WorkloadSvid};
use agent::workload_api::{self, Limits, Method, WorkloadApiMetrics};
use bytes::Bytes;
use common::{WorkloadPki as Pki, me, someone_else};
use futures_util::StreamExt;
use identity::jwt::JwtSigner;
use identity::{SpiffeId, TrustBundle};
use integration::eventually_async;
use spiffe::{WorkloadApiClient, WorkloadApiError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::Code;

const HOUR: Duration = Duration::from_secs(3600);
const WAIT: Duration = Duration::from_secs(20);

/// The kit's PKI, with the JWT authority of the fake CA in its bundle.
impl Pki {
    fn bundle(&self, signer: &JwtSigner) -> Arc<TrustBundle> {
        let mut bundle = TrustBundle::from_roots(self.td.clone(), vec![self.root.clone()]).unwrap();
        bundle.add_jwt_authority(signer.authority());
        Arc::new(bundle)
    }
}

/// Mints JWT-SVIDs locally, as the CA would, and counts the round trips.
struct FakeJwt(JwtSigner, AtomicUsize);

impl JwtSource for FakeJwt {
    fn fetch_jwt(
        &self,
        id: &SpiffeId,
        audience: &[String],
    ) -> impl Future<Output = Result<(String, SystemTime), String>> + Send {
        self.1.fetch_add(1, Ordering::SeqCst);
        let minted = self
            .0
            .mint(id, audience, HOUR, SystemTime::now())
            .map_err(|e| e.to_string());
        async move { minted }
    }
}

struct Harness {
    dir: tempfile::TempDir,
    socket: PathBuf,
    pki: Pki,
    signer: Arc<JwtSigner>,
    tx: SnapshotTx,
    version: u64,
    metrics: Arc<WorkloadApiMetrics>,
    jwt: Arc<FakeJwt>,
    shutdown: CancellationToken,
    server: JoinHandle<Result<(), workload_api::Error>>,
}

impl Harness {
    /// A server whose one SVID (`/web`) is granted to this process.
    fn start() -> Self {
        Self::with_limits(Limits::default())
    }

    fn with_limits(limits: Limits) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent").join("api.sock");
        let pki = Pki::new("example.org");
        let (signer, der) = JwtSigner::generate(SystemTime::now() + 24 * HOUR).unwrap();
        // The fake CA mints with the same key the bundle publishes.
        let jwt = Arc::new(FakeJwt(
            JwtSigner::from_pkcs8(signer.key_id().to_owned(), &der, signer.not_after()).unwrap(),
            AtomicUsize::new(0),
        ));
        let signer = Arc::new(signer);
        let first = Arc::new(Snapshot {
            version: 1,
            svids: vec![pki.svid("/web", &[me()])],
            bundle: pki.bundle(&signer),
        });
        let (tx, rx) = watch::channel(first);
        let listener = workload_api::bind(&socket).unwrap();
        let metrics = Arc::new(WorkloadApiMetrics::new());
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(workload_api::serve(
            listener,
            rx,
            jwt.clone(),
            Arc::new(Attestor::new().with_metrics(metrics.clone())),
            limits,
            metrics.clone(),
            shutdown.clone(),
        ));
        Self {
            dir,
            socket,
            pki,
            signer,
            tx,
            version: 1,
            metrics,
            jwt,
            shutdown,
            server,
        }
    }

    fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    async fn client(&self) -> WorkloadApiClient {
        WorkloadApiClient::connect_to(self.endpoint())
            .await
            .unwrap()
    }

    fn publish(&mut self, svids: Vec<Arc<WorkloadSvid>>) {
        self.version += 1;
        let bundle = self.tx.borrow().bundle.clone();
        self.tx.send_replace(Arc::new(Snapshot {
            version: self.version,
            svids,
            bundle,
        }));
    }

    fn current_svids(&self) -> Vec<Arc<WorkloadSvid>> {
        self.tx.borrow().svids.clone()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        within(self.server).await.unwrap().unwrap();
    }
}

async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(WAIT, f).await.expect("timed out")
}

fn code_of(err: &WorkloadApiError) -> Option<Code> {
    match err {
        WorkloadApiError::NoIdentityIssued | WorkloadApiError::PermissionDenied(_) => {
            Some(Code::PermissionDenied)
        }
        other => {
            let text = format!("{other:?}");
            [
                ("InvalidArgument", Code::InvalidArgument),
                ("ResourceExhausted", Code::ResourceExhausted),
                ("Unavailable", Code::Unavailable),
                ("Unimplemented", Code::Unimplemented),
            ]
            .into_iter()
            .find(|(name, _)| text.contains(name))
            .map(|(_, code)| code)
        }
    }
}

/// One HTTP/2 connection to the socket, spoken by hand.
async fn raw_connection(socket: &Path) -> h2::client::SendRequest<Bytes> {
    let io = UnixStream::connect(socket).await.unwrap();
    let (client, conn) = h2::client::handshake(io).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// Sends one gRPC call with an empty request message; `with_header` adds the security header.
async fn raw_call(
    client: &mut h2::client::SendRequest<Bytes>,
    method: &str,
    with_header: bool,
) -> Result<http::Response<h2::RecvStream>, h2::Error> {
    let mut req = http::Request::builder()
        .method("POST")
        .uri(format!("http://localhost/SpiffeWorkloadAPI/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if with_header {
        req = req.header("workload.spiffe.io", "true");
    }
    let mut ready = client.clone().ready().await?;
    let (resp, mut body) = ready.send_request(req.body(()).unwrap(), false)?;
    // gRPC framing: not compressed, length 0 (an empty message).
    body.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), true)?;
    *client = ready;
    resp.await
}

/// The grpc-status of a call that failed at once (a trailers-only answer), if any.
fn immediate_status(resp: &http::Response<h2::RecvStream>) -> Option<i32> {
    resp.headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetches_x509_jwt_and_bundles_with_the_spiffe_client() {
    let h = Harness::start();
    let client = h.client().await;
    let expected = h.current_svids()[0].clone();

    let svid = within(client.fetch_x509_svid()).await.unwrap();
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/web");
    let chain: Vec<&[u8]> = svid.cert_chain().iter().map(|c| c.as_bytes()).collect();
    let want: Vec<&[u8]> = expected.chain.iter().map(|c| c.as_ref()).collect();
    assert_eq!(chain, want);
    assert_eq!(
        svid.private_key().as_bytes(),
        expected.key.secret_pkcs8_der()
    );

    let td = spiffe::TrustDomain::new("example.org").unwrap();
    let bundles = within(client.fetch_x509_bundles()).await.unwrap();
    let bundle = bundles.get(&td).unwrap();
    assert_eq!(bundle.authorities().len(), 1);
    assert_eq!(bundle.authorities()[0].as_bytes(), h.pki.root.as_ref());

    let jwt = within(client.fetch_jwt_svid(["db"], None)).await.unwrap();
    assert_eq!(jwt.spiffe_id().to_string(), "spiffe://example.org/web");
    assert_eq!(jwt.audience(), ["db".to_owned()]);
    assert_eq!(jwt.key_id(), h.signer.key_id());

    let jwt_bundles = within(client.fetch_jwt_bundles()).await.unwrap();
    let jwt_bundle = jwt_bundles.get(&td).unwrap();
    assert!(jwt_bundle.find_jwt_authority(h.signer.key_id()).is_some());

    let validated = within(client.validate_jwt_token("db", jwt.token()))
        .await
        .unwrap();
    assert_eq!(
        validated.spiffe_id().to_string(),
        "spiffe://example.org/web"
    );
    let err = within(client.validate_jwt_token("cache", jwt.token()))
        .await
        .unwrap_err();
    assert!(err.is_invalid_argument(), "{err:?}");

    // Asking for an identity by name: ours works, another is refused.
    let web = spiffe::SpiffeId::new("spiffe://example.org/web").unwrap();
    within(client.fetch_jwt_svid(["db"], Some(&web)))
        .await
        .unwrap();
    let admin = spiffe::SpiffeId::new("spiffe://example.org/admin").unwrap();
    let err = within(client.fetch_jwt_svid(["db"], Some(&admin)))
        .await
        .unwrap_err();
    assert_eq!(code_of(&err), Some(Code::PermissionDenied), "{err:?}");

    assert_eq!(h.metrics.count(Method::FetchX509Svid, Code::Ok), 1);
    assert_eq!(
        h.metrics
            .count(Method::ValidateJwtSvid, Code::InvalidArgument),
        1
    );
    assert_eq!(
        h.metrics
            .count(Method::FetchJwtSvid, Code::PermissionDenied),
        1
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_pushes_rotation_but_not_unrelated_changes() {
    let mut h = Harness::start();
    let client = h.client().await;
    let mut stream = within(client.stream_x509_contexts()).await.unwrap();
    let first = within(stream.next()).await.unwrap().unwrap();
    let first_leaf = first.default_svid().unwrap().leaf().as_bytes().to_vec();

    // Someone else's SVID appears: nothing changes for this caller, so nothing is sent...
    let mine = h.current_svids()[0].clone();
    let theirs = h.pki.svid("/db", &[someone_else()]);
    h.publish(vec![mine, theirs.clone()]);
    // ...and the next message is the rotation, not a repeat of the first.
    let rotated = h.pki.svid("/web", &[me()]);
    h.publish(vec![rotated.clone(), theirs]);
    let second = within(stream.next()).await.unwrap().unwrap();
    let leaf = second.default_svid().unwrap().leaf().as_bytes().to_vec();
    assert_ne!(leaf, first_leaf);
    assert_eq!(leaf, rotated.chain[0].as_ref());
    assert_eq!(second.svids().len(), 1);

    // A second identity for this caller arrives in the same stream.
    let extra = h.pki.svid("/web-admin", &[me()]);
    h.publish(vec![rotated, extra]);
    let third = within(stream.next()).await.unwrap().unwrap();
    assert_eq!(third.svids().len(), 2);

    // Entitlement gone: the stream ends with PermissionDenied.
    h.publish(vec![h.pki.svid("/db", &[someone_else()])]);
    let err = within(stream.next()).await.unwrap().unwrap_err();
    assert_eq!(code_of(&err), Some(Code::PermissionDenied), "{err:?}");
    assert!(within(stream.next()).await.is_none());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_without_an_entry_is_denied() {
    let mut h = Harness::start();
    h.publish(vec![h.pki.svid("/db", &[someone_else()])]);
    let client = h.client().await;
    let err = within(client.fetch_x509_svid()).await.unwrap_err();
    assert!(matches!(err, WorkloadApiError::NoIdentityIssued), "{err:?}");
    let err = within(client.fetch_jwt_svid(["db"], None))
        .await
        .unwrap_err();
    assert_eq!(code_of(&err), Some(Code::PermissionDenied), "{err:?}");
    let err = within(client.fetch_x509_bundles()).await.unwrap_err();
    assert_eq!(code_of(&err), Some(Code::PermissionDenied), "{err:?}");
    assert_eq!(
        h.metrics
            .count(Method::FetchX509Svid, Code::PermissionDenied),
        1
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_without_the_security_header_are_invalid_argument() {
    let h = Harness::start();
    let mut conn = raw_connection(&h.socket).await;
    for method in [
        "FetchX509SVID",
        "FetchX509Bundles",
        "FetchJWTSVID",
        "FetchJWTBundles",
        "ValidateJWTSVID",
    ] {
        let resp = within(raw_call(&mut conn, method, false)).await.unwrap();
        assert_eq!(
            immediate_status(&resp),
            Some(Code::InvalidArgument as i32),
            "{method}"
        );
    }
    // With the header, the same bytes are served...
    let resp = within(raw_call(&mut conn, "FetchX509SVID", true))
        .await
        .unwrap();
    assert_eq!(immediate_status(&resp), None);
    let mut body = resp.into_body();
    assert!(!within(body.data()).await.unwrap().unwrap().is_empty());
    // ...missing mandatory fields are refused, and WIT-SVIDs are not offered.
    let resp = within(raw_call(&mut conn, "FetchJWTSVID", true))
        .await
        .unwrap();
    assert_eq!(immediate_status(&resp), Some(Code::InvalidArgument as i32));
    let resp = within(raw_call(&mut conn, "ValidateJWTSVID", true))
        .await
        .unwrap();
    assert_eq!(immediate_status(&resp), Some(Code::InvalidArgument as i32));
    for method in ["FetchWITSVID", "FetchWITBundles"] {
        let resp = within(raw_call(&mut conn, method, true)).await.unwrap();
        assert_eq!(
            immediate_status(&resp),
            Some(Code::Unimplemented as i32),
            "{method}"
        );
    }
    assert_eq!(
        h.metrics
            .count(Method::FetchX509Svid, Code::InvalidArgument),
        1
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_socket_does_not_hurt_the_server() {
    let h = Harness::with_limits(Limits {
        shutdown_grace: Duration::from_millis(200),
        ..Limits::default()
    });
    let junk: [&[u8]; 4] = [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        &[0xff; 4096],
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x04\x99\x00\x00\x00\x00\x00oops",
        b"",
    ];
    for bytes in junk {
        let mut s = UnixStream::connect(&h.socket).await.unwrap();
        let _ = s.write_all(bytes).await;
        let _ = s.shutdown().await;
        // The server answers or hangs up; either way the read ends.
        let mut sink = Vec::new();
        let _ = within(s.read_to_end(&mut sink)).await;
    }
    // A connection that sends nothing and stays open does not block others either.
    let _idle = UnixStream::connect(&h.socket).await.unwrap();
    let client = h.client().await;
    within(client.fetch_x509_svid()).await.unwrap();
    // Nor does it hold the server open past the shutdown grace.
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_streams_on_one_connection_are_capped() {
    let limits = Limits {
        max_streams_per_connection: 100,
        ..Limits::default()
    };
    let h = Harness::with_limits(limits);
    let mut conn = raw_connection(&h.socket).await;
    // One call first, so the client has the server's SETTINGS (and its stream limit).
    let first = within(raw_call(&mut conn, "FetchX509SVID", true))
        .await
        .unwrap();
    assert_eq!(immediate_status(&first), None);

    let answered = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let mut held = Vec::new();
    for _ in 1..1000 {
        let (mut conn, answered, refused) = (conn.clone(), answered.clone(), refused.clone());
        held.push(tokio::spawn(async move {
            match raw_call(&mut conn, "FetchX509SVID", true).await {
                Ok(resp) if immediate_status(&resp).is_none() => {
                    answered.fetch_add(1, Ordering::SeqCst);
                    // Keep the stream open until the test ends.
                    std::future::pending::<()>().await;
                }
                _ => {
                    refused.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }
    eventually_async("99 more streams answered", WAIT, async || {
        answered.load(Ordering::SeqCst) + 1 >= 100
    })
    .await;
    assert_eq!(h.metrics.open_streams(), 100);

    // Other callers are still served meanwhile.
    let client = h.client().await;
    within(client.fetch_x509_svid()).await.unwrap();
    within(client.fetch_jwt_svid(["db"], None)).await.unwrap();
    assert_eq!(answered.load(Ordering::SeqCst) + 1, 100, "the cap held");

    // The connection goes away: every stream and its task go with it.
    for task in &held {
        task.abort();
    }
    drop((first, conn, held));
    eventually_async("no stream left", WAIT, async || {
        h.metrics.open_streams() == 0
    })
    .await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn total_stream_cap_answers_resource_exhausted() {
    let limits = Limits {
        max_streams: 3,
        ..Limits::default()
    };
    let h = Harness::with_limits(limits);
    let client = h.client().await;
    let mut streams = Vec::new();
    for _ in 0..3 {
        let mut s = within(client.stream_x509_contexts()).await.unwrap();
        within(s.next()).await.unwrap().unwrap();
        streams.push(s);
    }
    let err = within(client.stream_x509_contexts())
        .await
        .err()
        .expect("fourth stream must be refused");
    assert_eq!(code_of(&err), Some(Code::ResourceExhausted), "{err:?}");
    // Unary calls are not streams: still served.
    within(client.fetch_jwt_svid(["db"], None)).await.unwrap();

    // A stream closes: its slot is free again.
    streams.pop();
    eventually_async("a stream slot back", WAIT, async || {
        h.metrics.open_streams() <= 2
    })
    .await;
    let mut s = within(client.stream_x509_contexts()).await.unwrap();
    within(s.next()).await.unwrap().unwrap();
    assert_eq!(
        h.metrics
            .count(Method::FetchX509Svid, Code::ResourceExhausted),
        1
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_open_streams_and_returns() {
    let h = Harness::start();
    let client = h.client().await;
    let mut x509 = within(client.stream_x509_contexts()).await.unwrap();
    within(x509.next()).await.unwrap().unwrap();
    let mut jwt = within(client.stream_jwt_bundles()).await.unwrap();
    within(jwt.next()).await.unwrap().unwrap();
    h.shutdown.cancel();
    let err = within(x509.next()).await.unwrap().unwrap_err();
    assert_eq!(code_of(&err), Some(Code::Unavailable), "{err:?}");
    within(h.server).await.unwrap().unwrap();
}

#[tokio::test]
async fn bind_replaces_a_stale_socket_and_opens_it_to_all() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run").join("kith").join("api.sock");
    let first = workload_api::bind(&path).unwrap();
    drop(first); // leaves the socket file behind, as a crashed agent would
    let _second = workload_api::bind(&path).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o777);
    let parent = std::fs::metadata(path.parent().unwrap()).unwrap();
    assert_eq!(parent.permissions().mode() & 0o777, 0o755);

    // Not a socket: left alone.
    let file = dir.path().join("run").join("kith").join("file");
    std::fs::write(&file, b"keep me").unwrap();
    assert!(workload_api::bind(&file).is_err());
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");

    // A directory others can write is refused.
    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = workload_api::bind(&open.join("api.sock")).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied);
}

/// Where the child of `another_uid_gets_only_its_own_svid` finds the socket.
const CHILD_SOCKET: &str = "KITH_WAPI_TEST_CHILD_SOCKET";

#[tokio::test]
#[ignore = "a child of another_uid_gets_only_its_own_svid, run as another uid"]
async fn child_fetches_as_another_uid() {
    let Ok(socket) = std::env::var(CHILD_SOCKET) else {
        return;
    };
    let client = WorkloadApiClient::connect_to(format!("unix://{socket}"))
        .await
        .unwrap();
    match within(client.fetch_x509_svid()).await {
        Ok(svid) => println!("CHILD-RESULT ok {}", svid.spiffe_id()),
        Err(e) => println!("CHILD-RESULT err {:?}", code_of(&e)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_uid_gets_only_its_own_svid() {
    let Some(setpriv) = setpriv_as_root("another_uid_gets_only_its_own_svid") else {
        return;
    };
    let mut h = Harness::start();
    // The socket is 0777 but sits in a 0700 temporary directory: let uid 65534 through.
    std::fs::set_permissions(h.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let exe = std::env::current_exe().unwrap();
    let child = |socket: PathBuf| {
        let mut cmd = tokio::process::Command::new(setpriv);
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&exe)
            .args([
                "--ignored",
                "--exact",
                "child_fetches_as_another_uid",
                "--nocapture",
            ])
            .env(CHILD_SOCKET, socket);
        async move {
            let out = within(cmd.output()).await.unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(
                out.status.success(),
                "{stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            stdout
        }
    };

    let nobody = h.pki.svid("/nobody", &["unix:uid:65534".to_owned()]);
    h.publish(vec![h.pki.svid("/web", &[me()]), nobody]);
    let out = child(h.socket.clone()).await;
    assert!(
        out.contains("CHILD-RESULT ok spiffe://example.org/nobody"),
        "{out}"
    );

    h.publish(vec![h.pki.svid("/web", &[me()])]);
    let out = child(h.socket.clone()).await;
    assert!(
        out.contains("CHILD-RESULT err Some(PermissionDenied)"),
        "{out}"
    );
    h.stop().await;
}

// ---- Attacks (issue: close the attack paths in the node agent) ------------------------------

/// `setpriv`, when this process is root and it is installed; else why not. Under CI=true a
/// missing prerequisite fails the test instead.
fn setpriv_as_root(test: &str) -> Option<&'static str> {
    let why = if !nix::unistd::geteuid().is_root() {
        "running a client as another uid needs root"
    } else if let Some(p) = ["/usr/bin/setpriv", "/bin/setpriv"]
        .into_iter()
        .find(|p| Path::new(p).exists())
    {
        return Some(p);
    } else {
        "setpriv (util-linux) is not installed"
    };
    integration::skip::skip(test, why);
    None
}

/// Two copies of this test binary in a directory uid 65534 can read: `trusted` (the one an
/// entry names) and `evil` (another file, the same program).
fn trusted_and_evil() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let exe = std::env::current_exe().unwrap();
    let trusted = dir.path().join("trusted");
    let evil = dir.path().join("evil");
    std::fs::copy(&exe, &trusted).unwrap();
    std::fs::copy(&exe, &evil).unwrap();
    (dir, trusted, evil)
}

/// The harness with one SVID, `/trusted`, for uid 65534 running `trusted`.
fn harness_for_trusted(trusted: &Path) -> Harness {
    let mut h = Harness::start();
    std::fs::set_permissions(h.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let entry = h.pki.svid(
        "/trusted",
        &[
            "unix:uid:65534".to_owned(),
            format!("unix:path:{}", trusted.display()),
        ],
    );
    h.publish(vec![entry]);
    h
}

async fn output_of(mut cmd: tokio::process::Command) -> String {
    let out = within(cmd.output()).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// As `nobody`: a user namespace and a mount namespace of its own, where another binary is
/// bind-mounted over the trusted path, then run from that path. `/proc/<pid>/exe` reads the
/// trusted path, but the caller is not in the agent's mount namespace: no `unix:path`, no SVID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bind_mount_over_the_trusted_path_in_a_user_namespace_gets_no_svid() {
    let test = "bind_mount_over_the_trusted_path_in_a_user_namespace_gets_no_svid";
    let Some(setpriv) = setpriv_as_root(test) else {
        return;
    };
    let (_bins, trusted, evil) = trusted_and_evil();
    let h = harness_for_trusted(&trusted);
    let nobody = |script: &str| {
        let mut cmd = tokio::process::Command::new(setpriv);
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .args(["sh", "-c", script, "sh"])
            .arg(&evil)
            .arg(&trusted)
            .args([
                "--ignored",
                "--exact",
                "child_fetches_as_another_uid",
                "--nocapture",
            ])
            .env(CHILD_SOCKET, &h.socket);
        cmd
    };

    // The control: the trusted binary, run by nobody as it is, gets the SVID.
    let out = output_of(nobody(r#"shift; exec "$@""#)).await;
    assert!(
        out.contains("CHILD-RESULT ok spiffe://example.org/trusted"),
        "{out}"
    );

    // The attack.
    let attack = r#"unshare -Urm sh -c 'mount --bind "$1" "$2" && shift && exec "$@"' sh "$@""#;
    let out = output_of(nobody(attack)).await;
    assert!(
        out.contains("CHILD-RESULT err Some(PermissionDenied)"),
        "{out}"
    );
    assert_eq!(h.metrics.refusals("unix_path_other_mount_namespace"), 1);
    h.stop().await;
}

/// Where the children of `exec_after_connect_gets_no_svid` find the trusted binary.
const CHILD_TRUSTED: &str = "KITH_WAPI_TEST_CHILD_TRUSTED";
/// The pid whose executable the socket's user waits on.
const CHILD_PARENT: &str = "KITH_WAPI_TEST_CHILD_PARENT";

/// The connecting process of the exec-after-connect attack (runs as `evil`): connects, waits
/// for the word, hands the socket to a child, and becomes the trusted binary (same pid, same
/// start time).
#[test]
#[ignore = "a child of exec_after_connect_gets_no_svid"]
fn child_connects_then_execs() {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    let (Ok(socket), Ok(trusted)) = (std::env::var(CHILD_SOCKET), std::env::var(CHILD_TRUSTED))
    else {
        return;
    };
    let conn = std::os::unix::net::UnixStream::connect(socket).unwrap();
    println!("CHILD-CONNECTED");
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).unwrap();
    let exe = std::env::current_exe().unwrap();
    // This process execs right after: the child outlives what spawned it, by design.
    #[allow(clippy::zombie_processes)]
    std::process::Command::new(exe)
        .args([
            "--ignored",
            "--exact",
            "child_uses_the_inherited_socket",
            "--nocapture",
        ])
        .env(CHILD_PARENT, std::process::id().to_string())
        .stdin(std::process::Stdio::from(std::os::fd::OwnedFd::from(conn)))
        .spawn()
        .unwrap();
    let err = std::process::Command::new(trusted)
        .args(["--ignored", "--exact", "child_sleeps", "--nocapture"])
        .exec();
    panic!("exec: {err}");
}

#[test]
#[ignore = "a child of exec_after_connect_gets_no_svid: the trusted binary, idle"]
fn child_sleeps() {
    if std::env::var(CHILD_TRUSTED).is_ok() {
        std::thread::sleep(Duration::from_secs(60));
    }
}

/// The socket's user: once its parent runs the trusted binary, calls FetchX509SVID over the
/// connection its parent opened.
#[tokio::test]
#[ignore = "a child of exec_after_connect_gets_no_svid"]
async fn child_uses_the_inherited_socket() {
    use std::os::fd::AsFd;
    let (Ok(parent), Ok(trusted)) = (std::env::var(CHILD_PARENT), std::env::var(CHILD_TRUSTED))
    else {
        return;
    };
    let trusted = std::fs::metadata(trusted).unwrap();
    let parent_exe = format!("/proc/{parent}/exe");
    eventually_async("the parent to run the trusted binary", WAIT, async || {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&parent_exe)
            .is_ok_and(|m| (m.dev(), m.ino()) == (trusted.dev(), trusted.ino()))
    })
    .await;
    let fd = std::io::stdin().as_fd().try_clone_to_owned().unwrap();
    let conn = std::os::unix::net::UnixStream::from(fd);
    conn.set_nonblocking(true).unwrap();
    let io = UnixStream::from_std(conn).unwrap();
    let (mut client, h2conn) = within(h2::client::handshake(io)).await.unwrap();
    tokio::spawn(async move {
        let _ = h2conn.await;
    });
    let resp = within(raw_call(&mut client, "FetchX509SVID", true))
        .await
        .unwrap();
    println!("CHILD-RESULT status {:?}", immediate_status(&resp));
}

/// As `nobody`: connect, then exec the trusted binary while a child keeps the socket and asks
/// for the SVID. The executable the agent pinned at accept is not the one the process runs at
/// the call: refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_after_connect_gets_no_svid() {
    use tokio::io::AsyncBufReadExt;
    let test = "exec_after_connect_gets_no_svid";
    let Some(setpriv) = setpriv_as_root(test) else {
        return;
    };
    let (_bins, trusted, evil) = trusted_and_evil();
    let h = harness_for_trusted(&trusted);
    let mut parent = tokio::process::Command::new(setpriv)
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&evil)
        .args([
            "--ignored",
            "--exact",
            "child_connects_then_execs",
            "--nocapture",
        ])
        .env(CHILD_SOCKET, &h.socket)
        .env(CHILD_TRUSTED, &trusted)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(parent.stdout.take().unwrap()).lines();
    let mut seen = String::new();
    let mut next_line = async || {
        let line = within(lines.next_line()).await.unwrap();
        let line = line.unwrap_or_else(|| panic!("child output ended: {seen}"));
        seen.push_str(&line);
        seen.push('\n');
        line
    };
    while next_line().await != "CHILD-CONNECTED" {}
    // The agent accepted the connection (and pinned the caller's executable, `evil`).
    eventually_async("the agent to accept the connection", WAIT, async || {
        h.metrics.connections() >= 1
    })
    .await;
    let mut stdin = parent.stdin.take().unwrap();
    stdin.write_all(b"go\n").await.unwrap();
    let result = loop {
        let line = next_line().await;
        if line.starts_with("CHILD-RESULT") {
            break line;
        }
    };
    // 7: PermissionDenied.
    assert_eq!(result, "CHILD-RESULT status Some(7)");
    assert_eq!(h.metrics.refusals("exe_changed_since_accept"), 1);
    let _ = parent.kill().await;
    h.stop().await;
}

/// A process that exited before the agent got to it has no start time to pin; it is refused
/// (a later process reusing its pid could not be told apart).
#[tokio::test]
async fn a_caller_gone_at_accept_is_refused() {
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id() as i32;
    child.wait().unwrap();
    let cred = agent::attest::PeerCred::of_process(0, 0, pid);
    assert_eq!(cred.start_time, None);
    let metrics = Arc::new(WorkloadApiMetrics::new());
    let err = Attestor::new()
        .with_metrics(metrics.clone())
        .attest(cred)
        .await
        .unwrap_err();
    assert!(
        matches!(err, agent::attest::AttestError::ExitedAtAccept),
        "{err}"
    );
    assert_eq!(metrics.refusals("caller_exited_at_accept"), 1);
}

/// A process whose executable was replaced on disk after it started: the path now names
/// another file, so it proves nothing about the process.
#[tokio::test]
async fn unix_path_is_withheld_when_the_path_names_another_file() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("app");
    std::fs::copy("/bin/sleep", &bin).unwrap();
    let mut child = std::process::Command::new(&bin).arg("30").spawn().unwrap();
    let pid = child.id() as i32;
    eventually_async("the child to run the copied binary", WAIT, async || {
        std::fs::read_link(format!("/proc/{pid}/exe"))
            .ok()
            .as_deref()
            == Some(&bin)
    })
    .await;
    let uid = nix::unistd::getuid().as_raw();
    let metrics = Arc::new(WorkloadApiMetrics::new());
    let attestor = Attestor::new().with_metrics(metrics.clone());
    let selectors = attestor
        .attest(agent::attest::PeerCred::of_process(uid, uid, pid))
        .await
        .unwrap();
    assert!(
        selectors.contains(&format!("unix:path:{}", bin.display())),
        "{selectors:?}"
    );
    // Replaced: same path, another file.
    std::fs::remove_file(&bin).unwrap();
    std::fs::copy("/bin/true", &bin).unwrap();
    let selectors = attestor
        .attest(agent::attest::PeerCred::of_process(uid, uid, pid))
        .await
        .unwrap();
    assert!(
        !selectors.iter().any(|s| s.starts_with("unix:path:")),
        "{selectors:?}"
    );
    assert_eq!(metrics.refusals("unix_path_exe_mismatch"), 1);
    let _ = child.kill();
    let _ = child.wait();
}

/// How many connections `child_holds_silent_connections` opens.
const CHILD_SILENT: &str = "KITH_WAPI_TEST_CHILD_SILENT";

/// Opens N connections, sends nothing, and reports how many the agent closed.
#[tokio::test]
#[ignore = "a child of silent_connections_from_one_uid_are_capped_and_cut, run as another uid"]
async fn child_holds_silent_connections() {
    let (Ok(socket), Ok(n)) = (std::env::var(CHILD_SOCKET), std::env::var(CHILD_SILENT)) else {
        return;
    };
    let mut conns = Vec::new();
    for _ in 0..n.parse::<usize>().unwrap() {
        conns.push(UnixStream::connect(&socket).await.unwrap());
    }
    println!("CHILD-OPENED {}", conns.len());
    let mut closed = 0;
    for mut c in conns {
        let mut sink = Vec::new();
        // The server hangs up: EOF or a reset, either ends the read.
        if tokio::time::timeout(Duration::from_secs(60), c.read_to_end(&mut sink))
            .await
            .is_ok()
        {
            closed += 1;
        }
    }
    println!("CHILD-RESULT closed {closed}");
}

fn silent_child(setpriv: &str, socket: &Path, n: usize) -> tokio::process::Child {
    tokio::process::Command::new(setpriv)
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "child_holds_silent_connections",
            "--nocapture",
        ])
        .env(CHILD_SOCKET, socket)
        .env(CHILD_SILENT, n.to_string())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// The attack: one local user opens many connections and sends nothing. Past its per-uid cap
/// they are closed at accept, and those it holds are cut at the first-request deadline; another
/// uid is served meanwhile, and the total cap holds for everyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_from_one_uid_are_capped_and_cut() {
    let test = "silent_connections_from_one_uid_are_capped_and_cut";
    let Some(setpriv) = setpriv_as_root(test) else {
        return;
    };
    // The caps, with a deadline far enough away not to interfere.
    let h = Harness::with_limits(Limits {
        max_connections: 7,
        max_connections_per_uid: 4,
        first_request_timeout: Duration::from_secs(600),
        shutdown_grace: Duration::from_millis(200),
        ..Limits::default()
    });
    std::fs::set_permissions(h.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let child = silent_child(setpriv, &h.socket, 20);
    eventually_async("16 connections refused, 4 held", WAIT, async || {
        h.metrics.refusals("connections_per_uid_cap") == 16 && h.metrics.connections() == 4
    })
    .await;
    // Another uid is served while nobody holds all it may.
    let client = h.client().await;
    within(client.fetch_x509_svid()).await.unwrap();
    assert_eq!(h.metrics.connections(), 5);
    // The total cap: two more are let in, the third is closed at once.
    let _a = UnixStream::connect(&h.socket).await.unwrap();
    let _b = UnixStream::connect(&h.socket).await.unwrap();
    eventually_async("7 connections", WAIT, async || h.metrics.connections() == 7).await;
    let mut c = UnixStream::connect(&h.socket).await.unwrap();
    let mut sink = Vec::new();
    within(c.read_to_end(&mut sink)).await.unwrap();
    assert_eq!(h.metrics.refusals("connections_total_cap"), 1);
    assert_eq!(h.metrics.refusals("first_request_deadline"), 0);
    h.stop().await;
    let out = String::from_utf8_lossy(&within(child.wait_with_output()).await.unwrap().stdout)
        .into_owned();
    assert!(out.contains("CHILD-RESULT closed 20"), "{out}");

    // The deadline: connections that send nothing are cut, and their slots come back.
    let h = Harness::with_limits(Limits {
        max_connections_per_uid: 4,
        first_request_timeout: Duration::from_secs(1),
        ..Limits::default()
    });
    std::fs::set_permissions(h.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let child = silent_child(setpriv, &h.socket, 4);
    let out = String::from_utf8_lossy(&within(child.wait_with_output()).await.unwrap().stdout)
        .into_owned();
    assert!(out.contains("CHILD-RESULT closed 4"), "{out}");
    assert_eq!(h.metrics.refusals("first_request_deadline"), 4);
    eventually_async("no connection left", WAIT, async || {
        h.metrics.connections() == 0
    })
    .await;
    // A client that asks in time is served as usual.
    let client = h.client().await;
    within(client.fetch_x509_svid()).await.unwrap();
    assert_eq!(h.metrics.refusals("first_request_deadline"), 4);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_per_uid_are_capped() {
    let h = Harness::with_limits(Limits {
        max_streams_per_uid: 3,
        ..Limits::default()
    });
    let client = h.client().await;
    let mut streams = Vec::new();
    for _ in 0..3 {
        let mut s = within(client.stream_x509_contexts()).await.unwrap();
        within(s.next()).await.unwrap().unwrap();
        streams.push(s);
    }
    // Over another connection, the same uid: still capped.
    let other = h.client().await;
    let err = within(other.stream_x509_contexts())
        .await
        .err()
        .expect("a fourth stream for this uid must be refused");
    assert_eq!(code_of(&err), Some(Code::ResourceExhausted), "{err:?}");
    assert_eq!(h.metrics.refusals("streams_per_uid_cap"), 1);
    streams.pop();
    eventually_async("a stream slot back", WAIT, async || {
        h.metrics.open_streams() == 2
    })
    .await;
    let mut s = within(other.stream_x509_contexts()).await.unwrap();
    within(s.next()).await.unwrap().unwrap();
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_svids_are_cached_per_id_and_audience() {
    let h = Harness::start();
    let client = h.client().await;
    let first = within(client.fetch_jwt_svid(["db"], None)).await.unwrap();
    for _ in 0..5 {
        let again = within(client.fetch_jwt_svid(["db"], None)).await.unwrap();
        assert_eq!(again.token(), first.token());
    }
    assert_eq!(h.jwt.1.load(Ordering::SeqCst), 1, "one CA round trip");
    let other = within(client.fetch_jwt_svid(["cache"], None))
        .await
        .unwrap();
    assert_ne!(other.token(), first.token());
    assert_eq!(h.jwt.1.load(Ordering::SeqCst), 2);
    h.stop().await;
}

/// A header block past the 16 KiB the server advertises: the shim refuses the connection
/// before h2 sees it, counts and logs why; other callers are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_header_block_is_refused_by_the_shim() {
    let h = Harness::start();
    let mut raw = UnixStream::connect(&h.socket).await.unwrap();
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    bytes.extend([0, 0, 0, 0x4, 0, 0, 0, 0, 0]); // SETTINGS, empty
    // One literal header field of 20,000 bytes (literal without indexing, new name), in a
    // HEADERS frame and CONTINUATIONs of 8 KiB.
    let mut block = vec![0x00, 0x05];
    block.extend(b"x-big");
    // The length as an HPACK integer with a 7-bit prefix (RFC 7541 §5.1).
    block.push(0x7f);
    let mut rest = 20_000 - 127;
    while rest >= 128 {
        block.push(0x80 | (rest % 128) as u8);
        rest /= 128;
    }
    block.push(rest as u8);
    block.extend(std::iter::repeat_n(b'a', 20_000));
    let chunks: Vec<_> = block.chunks(8192).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let kind = if i == 0 { 0x1 } else { 0x9 };
        let flags = if i + 1 == chunks.len() { 0x4 } else { 0 };
        let len = chunk.len();
        bytes.extend([
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            kind,
            flags,
            0,
            0,
            0,
            1,
        ]);
        bytes.extend(*chunk);
    }
    // The server may hang up before it has read everything.
    let _ = raw.write_all(&bytes).await;
    let mut sink = Vec::new();
    let _ = within(raw.read_to_end(&mut sink)).await;
    eventually_async("the refusal counted", WAIT, async || {
        h.metrics.refusals("http2_header_list_too_large") == 1
    })
    .await;
    let client = h.client().await;
    within(client.fetch_x509_svid()).await.unwrap();
    h.stop().await;
}
