//! A complete CA in the test's own process (feature `ca`): its store in a data directory, its API
//! and metrics on loopback, its admin socket, and its maintenance loop, as `kith ca serve` wires
//! them. For tests of the CA and of its clients that need no `kith` binary.

use std::net::SocketAddr;
use std::path::Path;

use ca::admin_client::AdminClient;
use ca::config::Config;
use ca::server::{Listeners, Running};
use hyper::Method;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::TRUST_DOMAIN;

pub struct InProcessCa {
    pub cfg: Config,
    /// The API (HTTPS).
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub running: Running,
    pub shutdown: CancellationToken,
    pub admin: AdminClient,
}

/// Starts a CA for `example.org` with its data in `data` (created if needed) and its API on
/// `addr`; `tweak` changes the test configuration first. Port 0 takes any port; the same data
/// dir and address restart a stopped CA where it was (the port is bound with SO_REUSEADDR).
pub async fn start(data: &Path, addr: SocketAddr, tweak: impl FnOnce(&mut Config)) -> InProcessCa {
    match try_start(data, addr, tweak).await {
        Ok(ca) => ca,
        Err(e) => panic!("the CA in {} did not start: {e:#}", data.display()),
    }
}

/// [`start`], or why the CA refused to start.
pub async fn try_start(
    data: &Path,
    addr: SocketAddr,
    tweak: impl FnOnce(&mut Config),
) -> anyhow::Result<InProcessCa> {
    let mut cfg = Config::for_tests(data, TRUST_DOMAIN)?;
    tweak(&mut cfg);
    ca::server::prepare_data_dir(&cfg)?;
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    let api = socket.listen(128)?;
    let addr = api.local_addr()?;
    let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let metrics_addr = metrics.local_addr()?;
    let admin = ca::admin::bind(&cfg.admin_socket)?;
    let shutdown = CancellationToken::new();
    let listeners = Listeners {
        api,
        metrics,
        admin,
    };
    let running = ca::server::start(&cfg, listeners, shutdown.clone()).await?;
    let admin = AdminClient::new(&cfg.admin_socket);
    Ok(InProcessCa {
        cfg,
        addr,
        metrics_addr,
        running,
        shutdown,
        admin,
    })
}

impl InProcessCa {
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// A join token for node `name`, valid an hour: the admin API's answer (`token`,
    /// `bundle_sha256`, …).
    pub async fn join_token(&self, name: &str) -> Value {
        let body = json!({"name": name, "ttl_seconds": 3600});
        self.admin_call(Method::POST, "/tokens", Some(body)).await
    }

    /// A registration entry for `id` under `parent`, granted to callers with `selectors`.
    pub async fn entry(&self, id: &str, parent: &str, selectors: &[&str]) -> Value {
        let body = json!({"spiffe_id": id, "parent_id": parent, "selectors": selectors});
        self.admin_call(Method::POST, "/entries", Some(body)).await
    }

    /// An admin API call that must succeed.
    pub async fn admin_call(&self, method: Method, path: &str, body: Option<Value>) -> Value {
        match self.admin.call(method.clone(), path, body).await {
            Ok(v) => v,
            Err(e) => panic!("admin {method} {path}: {e}"),
        }
    }

    /// Stops serving and waits until every task has ended (the data dir stays).
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.running.tasks.wait().await;
    }
}
