//! A CA on loopback (in process) and agents against it; workload SVIDs as the agent holds them.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use agent::agent::{Agent, AgentConfig};
use agent::metrics::AgentMetrics;
use agent::snapshot::{SnapshotRx, WorkloadSvid};
use ca::config::Config;
use integration::ca::InProcessCa;
use integration::pki::{HOUR, Pki};
use rustls_pki_types::PrivatePkcs8KeyDer;
use tokio_util::sync::CancellationToken;

/// The kit's in-process CA, with the calls the agent tests make.
pub struct TestCa {
    ca: InProcessCa,
}

/// Starts a CA in `data` on `addr` (port 0 for any); the same data dir and port restart it.
pub async fn start_ca(data: &Path, addr: SocketAddr, tweak: impl FnOnce(&mut Config)) -> TestCa {
    TestCa {
        ca: integration::ca::start(data, addr, tweak).await,
    }
}

impl Deref for TestCa {
    type Target = InProcessCa;

    fn deref(&self) -> &InProcessCa {
        &self.ca
    }
}

impl TestCa {
    /// A join token for `name` and the bundle's pin (`--bundle-sha256`).
    pub async fn token(&self, name: &str) -> (String, String) {
        let v = self.ca.join_token(name).await;
        (
            v["token"].as_str().unwrap().to_owned(),
            v["bundle_sha256"].as_str().unwrap().to_owned(),
        )
    }

    pub async fn stop(self) {
        self.ca.stop().await;
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

pub fn data_dir(root: &Path, name: &str) -> PathBuf {
    root.join(name)
}

/// The kit's PKI as the agent sees it: a root and intermediate valid from an hour ago for a day,
/// and workload SVIDs granted to callers with selectors.
pub struct WorkloadPki(Pki);

impl WorkloadPki {
    pub fn new(td: &str) -> Self {
        let now = SystemTime::now();
        Self(Pki::valid(td, now - HOUR, now + 24 * HOUR))
    }

    /// A workload SVID for `path` granted to callers with all of `selectors`, valid for an hour
    /// (from 30 s ago); a new key each call, so two calls are a rotation.
    pub fn svid(&self, path: &str, selectors: &[String]) -> Arc<WorkloadSvid> {
        let id = self.td.id_with_path(path).unwrap();
        let now = SystemTime::now();
        let (chain, key) = self.svid_for(&id, now - Duration::from_secs(30), now + HOUR);
        Arc::new(WorkloadSvid {
            entry_id: format!("entry-{path}"),
            spiffe_id: id,
            selectors: selectors.to_vec(),
            chain,
            key: PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
            not_after: now + HOUR,
        })
    }
}

impl Deref for WorkloadPki {
    type Target = Pki;

    fn deref(&self) -> &Pki {
        &self.0
    }
}

/// The selector every test process has.
pub fn me() -> String {
    format!("unix:uid:{}", nix::unistd::getuid())
}

/// A uid no test runs as.
pub fn someone_else() -> String {
    format!(
        "unix:uid:{}",
        nix::unistd::getuid().as_raw().wrapping_add(4242)
    )
}
