//! A CA on loopback (in process) and agents against it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use agent::agent::{Agent, AgentConfig};
use agent::metrics::AgentMetrics;
use agent::snapshot::SnapshotRx;
use ca::admin_client::AdminClient;
use ca::config::Config;
use ca::server::{Listeners, Running, start};
use serde_json::json;
use tokio_util::sync::CancellationToken;

pub struct TestCa {
    pub cfg: Config,
    pub addr: SocketAddr,
    pub running: Running,
    pub shutdown: CancellationToken,
    pub admin: AdminClient,
}

/// Starts a CA in `data` on `addr` (port 0 for any); the same data dir and port restart it.
pub async fn start_ca(data: &Path, addr: SocketAddr, tweak: impl FnOnce(&mut Config)) -> TestCa {
    let mut cfg = Config::for_tests(data, "example.org").unwrap();
    tweak(&mut cfg);
    ca::server::prepare_data_dir(&cfg).unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket.bind(addr).unwrap();
    let api = socket.listen(128).unwrap();
    let addr = api.local_addr().unwrap();
    let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = ca::admin::bind(&cfg.admin_socket).unwrap();
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
        cfg,
        addr,
        running,
        shutdown,
        admin,
    }
}

impl TestCa {
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub async fn token(&self, name: &str) -> (String, String) {
        let v = self
            .admin
            .call(
                hyper::Method::POST,
                "/tokens",
                Some(json!({"name": name, "ttl_seconds": 600})),
            )
            .await
            .unwrap();
        (
            v["token"].as_str().unwrap().to_owned(),
            v["bundle_sha256"].as_str().unwrap().to_owned(),
        )
    }

    pub async fn entry(&self, id: &str, parent: &str, selectors: &[&str]) -> serde_json::Value {
        self.admin
            .call(
                hyper::Method::POST,
                "/entries",
                Some(json!({"spiffe_id": id, "parent_id": parent, "selectors": selectors})),
            )
            .await
            .unwrap()
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        self.running.tasks.wait().await;
    }
}

pub fn agent_config(
    ca: &TestCa,
    data: &Path,
    token: Option<String>,
    pin: Option<String>,
) -> AgentConfig {
    AgentConfig {
        ca_urls: vec![ca.url()],
        ca_timeout: ca_api::replicas::ATTEMPT_TIMEOUT,
        bundle_file: None,
        bundle_sha256: pin,
        join_token: token.and_then(agent::agent::JoinToken::new),
        data_dir: data.to_owned(),
    }
}

/// Bootstraps an agent and runs its loop in the background.
pub async fn run_agent(cfg: AgentConfig) -> (Arc<Agent>, SnapshotRx, CancellationToken) {
    let (agent, rx) = Agent::bootstrap(cfg, Arc::new(AgentMetrics::new()))
        .await
        .unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(agent.clone().run(stop.clone()));
    (agent, rx, stop)
}

/// Polls `f` until it is true or `within` passes.
pub async fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    f()
}

pub fn data_dir(root: &Path, name: &str) -> PathBuf {
    root.join(name)
}
