//! The webhook over real TLS on loopback: a hyper client (HTTP/1.1 and HTTP/2) with a per-test
//! certificate from rcgen, as the kube-apiserver would call it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Frame;
use hyper::{Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use inject::metrics::Metrics;
use inject::server::{self, Limits, Webhook};
use inject::settings::Settings;
use inject::tls::{self, ReloadingCert};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

struct Server {
    addr: SocketAddr,
    ca: CertificateDer<'static>,
    dir: tempfile::TempDir,
    cert: Arc<ReloadingCert>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// A self-signed serving certificate for `kith-inject.kith-system.svc`, written to `dir`.
fn write_cert(dir: &Path) -> CertificateDer<'static> {
    integration::pki::write_tls_pair(dir, &["kith-inject.kith-system.svc"]).2
}

async fn start() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let ca = write_cert(dir.path());
    let cert =
        ReloadingCert::load(&dir.path().join("tls.crt"), &dir.path().join("tls.key")).unwrap();
    let config = tls::server_config(cert.clone()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let webhook = Arc::new(Webhook {
        settings: Settings::default(),
        metrics: Metrics::new(),
    });
    let task = tokio::spawn(server::serve(
        listener,
        config,
        webhook,
        Limits::default(),
        shutdown.clone(),
    ));
    Server {
        addr,
        ca,
        dir,
        cert,
        shutdown,
        task,
    }
}

fn connector(ca: &CertificateDer<'static>, alpn: &[u8]) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    TlsConnector::from(Arc::new(config))
}

async fn tls_stream(server: &Server, alpn: &[u8]) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let name = ServerName::try_from("kith-inject.kith-system.svc").unwrap();
    connector(&server.ca, alpn)
        .connect(name, tcp)
        .await
        .unwrap()
}

/// One HTTP/1.1 request; returns the status and body.
async fn call<B>(server: &Server, req: Request<B>) -> (StatusCode, Bytes)
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let io = TokioIo::new(tls_stream(server, b"http/1.1").await);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn);
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status();
    (status, resp.into_body().collect().await.unwrap().to_bytes())
}

fn post(body: impl Into<Bytes>) -> Request<Full<Bytes>> {
    Request::post("/mutate")
        .header("content-type", "application/json")
        .body(Full::new(body.into()))
        .unwrap()
}

fn get(path: &str) -> Request<Full<Bytes>> {
    Request::get(path).body(Full::new(Bytes::new())).unwrap()
}

const POD_YAML: &str = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  namespace: shop\n  \
    labels: {kith.dev/inject: enabled}\nspec:\n  containers:\n  - name: web\n    image: web:1\n    \
    livenessProbe: {tcpSocket: {port: 8080}}\n";

fn review_body(pod: &Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "b3c2b4d4-1f1e-4c59-9d6c-0f0e0d0c0b0a",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": "CREATE",
            "object": pod,
        }
    }))
    .unwrap()
}

fn apply_patch(pod: &Value, review: &Value) -> Value {
    let b64 = review["response"]["patch"].as_str().unwrap();
    let ops: json_patch::Patch = serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap(),
    )
    .unwrap();
    let mut patched = pod.clone();
    json_patch::patch(&mut patched, &ops).unwrap();
    patched
}

fn offline(yaml: &str) -> Value {
    let report = inject::manifest::inject_manifests(yaml, &Settings::default(), false).unwrap();
    serde_norway::from_str(&report.output).unwrap()
}

#[tokio::test]
async fn the_patch_over_tls_gives_the_same_pod_as_offline_injection() {
    let server = start().await;
    let pod: Value = serde_norway::from_str(POD_YAML).unwrap();
    let (status, body) = call(&server, post(review_body(&pod))).await;
    assert_eq!(status, StatusCode::OK);
    let review: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        review["response"]["uid"],
        "b3c2b4d4-1f1e-4c59-9d6c-0f0e0d0c0b0a"
    );
    assert_eq!(review["response"]["allowed"], true);
    assert_eq!(review["response"]["patchType"], "JSONPatch");
    assert_eq!(apply_patch(&pod, &review), offline(POD_YAML));
}

#[tokio::test]
async fn http2_works_as_the_api_server_speaks_it() {
    let server = start().await;
    let stream = tls_stream(&server, b"h2").await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let pod: Value = serde_norway::from_str(POD_YAML).unwrap();
    let resp = sender.send_request(post(review_body(&pod))).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let review: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(apply_patch(&pod, &review), offline(POD_YAML));
}

#[tokio::test]
async fn bad_requests_get_clear_errors_and_are_counted() {
    let server = start().await;
    let (status, body) = call(&server, post("{\"not\": \"a review\"}")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&body).contains("not an AdmissionReview"));

    let (status, _) = call(&server, get("/mutate")).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    let (status, _) = call(&server, get("/nowhere")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Declared too large: refused before a byte of the body is read.
    let huge = vec![b' '; inject::review::MAX_REVIEW_BYTES + 1];
    let (status, body) = call(&server, post(huge)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(String::from_utf8_lossy(&body).contains("larger than"));

    // Too large without a length (chunked): cut off at the limit.
    let chunks = (0..4)
        .map(|_| Bytes::from(vec![b' '; 1024 * 1024]))
        .collect();
    let streamed = Request::post("/mutate").body(Chunked(chunks)).unwrap();
    let (status, _) = call(&server, streamed).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);

    let (status, body) = call(&server, get("/metrics")).await;
    assert_eq!(status, StatusCode::OK);
    let metrics = String::from_utf8_lossy(&body);
    for line in [
        "kith_inject_reviews_total{result=\"malformed\"} 1",
        "kith_inject_reviews_total{result=\"bad_method\"} 1",
        "kith_inject_reviews_total{result=\"too_large\"} 2",
    ] {
        assert!(metrics.contains(line), "{line} missing from:\n{metrics}");
    }
}

/// A body of several chunks and no declared length, so HTTP/1.1 sends it chunked.
struct Chunked(Vec<Bytes>);

impl hyper::body::Body for Chunked {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        std::task::Poll::Ready(self.0.pop().map(|b| Ok(Frame::data(b))))
    }
}

#[tokio::test]
async fn healthz_answers_and_shutdown_stops_the_server() {
    let server = start().await;
    let (status, body) = call(&server, get("/healthz")).await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"ok\n"[..]));
    server.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(15), server.task)
        .await
        .expect("the server stops after shutdown")
        .unwrap();
}

#[tokio::test]
async fn a_renewed_certificate_is_served_without_a_restart() {
    let server = start().await;
    tokio::spawn(
        server
            .cert
            .clone()
            .watch(Duration::from_millis(50), server.shutdown.clone()),
    );
    let renewed = write_cert(server.dir.path());
    // Only the renewed certificate verifies with this connector.
    let stream = integration::eventually_async(
        "the renewed certificate served",
        Duration::from_secs(5),
        async || {
            let tcp = TcpStream::connect(server.addr).await.unwrap();
            let name = ServerName::try_from("kith-inject.kith-system.svc").unwrap();
            connector(&renewed, b"http/1.1").connect(name, tcp).await
        },
    )
    .await;
    let seen = stream.get_ref().1.peer_certificates().map(|c| c[0].clone());
    assert_eq!(seen.as_ref(), Some(&renewed));
}
