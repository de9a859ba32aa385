//! An in-process CA on loopback with its own data dir, and clients for it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use ca::admin_client::AdminClient;
use ca::config::Config;
use ca::server::{Listeners, Running, start};
use ca_api::client::{Connection, client_config};
use identity::TrustBundle;
use rcgen::{CertificateParams, DistinguishedName, KeyPair};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

pub struct TestCa {
    pub dir: tempfile::TempDir,
    pub cfg: Config,
    pub addr: String,
    pub metrics_addr: String,
    pub running: Running,
    pub shutdown: CancellationToken,
    pub admin: AdminClient,
}

pub async fn start_ca(tweak: impl FnOnce(&mut Config)) -> TestCa {
    let dir = tempfile::tempdir().unwrap();
    start_in(dir, tweak).await
}

pub async fn start_in(dir: tempfile::TempDir, tweak: impl FnOnce(&mut Config)) -> TestCa {
    let mut cfg = Config::for_tests(&dir.path().join("data"), "example.org").unwrap();
    tweak(&mut cfg);
    ca::server::prepare_data_dir(&cfg).unwrap();
    let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = ca::admin::bind(&cfg.admin_socket).unwrap();
    let addr = api.local_addr().unwrap().to_string();
    let metrics_addr = metrics.local_addr().unwrap().to_string();
    let shutdown = CancellationToken::new();
    let running = start(
        &cfg,
        Listeners {
            api,
            metrics,
            admin,
        },
        shutdown.clone(),
    )
    .await
    .unwrap();
    let admin = AdminClient::new(&cfg.admin_socket);
    TestCa {
        dir,
        cfg,
        addr,
        metrics_addr,
        running,
        shutdown,
        admin,
    }
}

impl TestCa {
    pub fn bundle(&self) -> Arc<TrustBundle> {
        self.running.ca.authority.bundle()
    }

    pub async fn anon(&self) -> Connection {
        Connection::open(&self.addr, client_config(self.bundle(), None).unwrap())
            .await
            .unwrap()
    }

    pub async fn as_svid(&self, svid: &Svid) -> Connection {
        let cfg = client_config(
            self.bundle(),
            Some((
                svid.chain.clone(),
                PrivateKeyDer::Pkcs8(svid.key.clone_key()),
            )),
        )
        .unwrap();
        Connection::open(&self.addr, cfg).await.unwrap()
    }

    pub async fn token(&self, name: &str) -> String {
        let v = self
            .admin
            .call(
                hyper::Method::POST,
                "/tokens",
                Some(json!({"name": name, "ttl_seconds": 3600})),
            )
            .await
            .unwrap();
        v["token"].as_str().unwrap().to_owned()
    }

    /// Attests a node with a fresh token; returns its SVID.
    pub async fn node(&self, name: &str) -> Svid {
        let token = self.token(name).await;
        let (csr, key) = csr();
        let (status, v) = self
            .anon()
            .await
            .post_json("/v1/attest/join", &json!({"token": token, "csr": csr}))
            .await
            .unwrap();
        assert_eq!(status, 200, "{v}");
        Svid::from_response(&v, key)
    }

    pub async fn entry(&self, id: &str, parent: &str) -> Value {
        self.admin
            .call(
                hyper::Method::POST,
                "/entries",
                Some(json!({"spiffe_id": id, "parent_id": parent, "selectors": ["unix:uid:1000"]})),
            )
            .await
            .unwrap()
    }

    pub async fn metrics(&self) -> String {
        let stream = tokio::net::TcpStream::connect(&self.metrics_addr)
            .await
            .unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = hyper::Request::get("/metrics")
            .header("host", "x")
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        use http_body_util::BodyExt;
        String::from_utf8(
            resp.into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes()
                .to_vec(),
        )
        .unwrap()
    }

    pub async fn stop(self) -> tempfile::TempDir {
        self.shutdown.cancel();
        self.running.tasks.wait().await;
        self.dir
    }
}

pub struct Svid {
    pub id: String,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivatePkcs8KeyDer<'static>,
    pub response: Value,
}

impl Svid {
    pub fn from_response(v: &Value, key: KeyPair) -> Self {
        let chain = identity::pem::certificates(v["svid"].as_str().unwrap().as_bytes()).unwrap();
        Svid {
            id: v["spiffe_id"].as_str().unwrap().to_owned(),
            chain,
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
            response: v.clone(),
        }
    }
}

/// A fresh P-256 key and a CSR for it with an empty subject (PEM).
pub fn csr() -> (String, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    (p.serialize_request(&key).unwrap().pem().unwrap(), key)
}

pub fn csr_with(tweak: impl FnOnce(&mut CertificateParams)) -> String {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    tweak(&mut p);
    p.serialize_request(&key).unwrap().pem().unwrap()
}
