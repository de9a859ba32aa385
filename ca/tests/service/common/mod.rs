//! An in-process CA on loopback with its own data dir, and clients for it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::Arc;

use ca::config::Config;
use ca_api::client::{Connection, client_config};
use identity::TrustBundle;
use integration::ca::InProcessCa;
use rcgen::KeyPair;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{Value, json};

/// The kit's in-process CA with its own temporary directory (data in `data/`), its addresses
/// as strings (they shadow the kit's `SocketAddr`s).
pub struct TestCa {
    pub dir: tempfile::TempDir,
    pub addr: String,
    pub metrics_addr: String,
    ca: InProcessCa,
}

pub async fn start_ca(tweak: impl FnOnce(&mut Config)) -> TestCa {
    let dir = tempfile::tempdir().unwrap();
    start_in(dir, tweak).await
}

/// A CA with its data in `dir/data`, on any loopback ports.
pub async fn start_in(dir: tempfile::TempDir, tweak: impl FnOnce(&mut Config)) -> TestCa {
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let ca = integration::ca::start(&dir.path().join("data"), any, tweak).await;
    TestCa {
        dir,
        addr: ca.addr.to_string(),
        metrics_addr: ca.metrics_addr.to_string(),
        ca,
    }
}

impl Deref for TestCa {
    type Target = InProcessCa;

    fn deref(&self) -> &InProcessCa {
        &self.ca
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
        let v = self.ca.join_token(name).await;
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
        self.ca.entry(id, parent, &["unix:uid:1000"]).await
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
        self.ca.stop().await;
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

/// CSRs as agents send them (not every test uses both).
#[allow(unused_imports)]
pub use integration::pki::{csr, csr_with};
