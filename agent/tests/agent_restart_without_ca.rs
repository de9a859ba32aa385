//! Outages longer than an SVID's life: the agent keeps its workload SVIDs on disk (0600), and
//! an agent restarted while no CA answers serves the same SVID again over the Workload API, to
//! the reference Rust client, until it expires; after that, nothing. An SVID whose entry the CA
//! withdrew is not kept.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use agent::agent::{Agent, AgentConfig};
use agent::attest::Attestor;
use agent::metrics::AgentMetrics;
use agent::snapshot::SnapshotRx;
use agent::workload_api::{self, Limits, WorkloadApiMetrics};
use common::{agent_config, start_ca};
use integration::eventually_async;
use spiffe::{WorkloadApiClient, WorkloadApiError};
use tokio_util::sync::CancellationToken;

/// The shortest workload TTL the CA allows: the test waits for it to run out.
const WORKLOAD_TTL: Duration = Duration::from_secs(10);

fn me() -> String {
    format!("unix:uid:{}", nix::unistd::getuid())
}

fn short(c: &mut ca::config::Config) {
    c.workload_ttl = WORKLOAD_TTL;
}

/// An agent and its loop, stoppable and awaited.
struct Running {
    agent: Arc<Agent>,
    rx: SnapshotRx,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

async fn run(cfg: AgentConfig) -> Running {
    let (agent, rx) = Agent::bootstrap(cfg, Arc::new(AgentMetrics::new()))
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(agent.clone().run(stop.clone()));
    Running {
        agent,
        rx,
        stop,
        task,
    }
}

impl Running {
    async fn stop(self) -> SnapshotRx {
        self.stop.cancel();
        self.task.await.unwrap();
        self.rx
    }
}

/// The Workload API of `r` on a socket in `dir`; returns its endpoint and its stop token.
fn serve(r: &Running, dir: &Path) -> (String, CancellationToken) {
    let socket = dir.join("api.sock");
    let listener = workload_api::bind(&socket).unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(workload_api::serve(
        listener,
        r.rx.clone(),
        r.agent.clone(),
        Arc::new(Attestor::new()),
        Limits::default(),
        Arc::new(WorkloadApiMetrics::new()),
        shutdown.clone(),
    ));
    (format!("unix://{}", socket.display()), shutdown)
}

fn stored_files(agent_dir: &Path) -> Vec<std::path::PathBuf> {
    match std::fs::read_dir(agent_dir.join("workloads")) {
        Ok(d) => d.flatten().map(|e| e.path()).collect(),
        Err(_) => Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_serves_the_kept_svid_without_a_ca_until_it_expires() {
    let dir = tempfile::tempdir().unwrap();
    let adir = dir.path().join("agent");
    let ca = start_ca(
        &dir.path().join("ca"),
        "127.0.0.1:0".parse().unwrap(),
        short,
    )
    .await;
    let ca_url = ca.url();
    let (token, pin) = ca.token("host-a").await;
    let first = run(agent_config(&ca, &adir, Some(token), Some(pin))).await;
    ca.entry(
        "spiffe://example.org/web",
        first.agent.node_id().as_str(),
        &[&me()],
    )
    .await;
    eventually_async(
        "the agent got the workload SVID",
        Duration::from_secs(15),
        async || !first.rx.borrow().svids.is_empty(),
    )
    .await;
    let files = stored_files(&adir);
    assert_eq!(files.len(), 1, "one stored SVID: {files:?}");
    assert_eq!(
        std::fs::metadata(&files[0]).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::metadata(adir.join("workloads"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o700
    );

    // The CA goes away, then the agent (its loop finished, so nothing is issued after this).
    ca.stop().await;
    let rx = first.stop().await;
    let served = rx.borrow().svids[0].clone();
    assert!(served.not_after > SystemTime::now());

    // Restarted with no CA anywhere: the same SVID, to a standard Workload API client.
    let second = run(agent_config_for(&ca_url, &adir)).await;
    let (endpoint, api_stop) = serve(&second, dir.path());
    let client = WorkloadApiClient::connect_to(endpoint.clone())
        .await
        .unwrap();
    let svid = tokio::time::timeout(Duration::from_secs(10), client.fetch_x509_svid())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/web");
    let chain: Vec<&[u8]> = svid.cert_chain().iter().map(|c| c.as_bytes()).collect();
    let want: Vec<&[u8]> = served.chain.iter().map(|c| c.as_ref()).collect();
    assert_eq!(chain, want, "the very SVID served before the restart");
    assert_eq!(svid.private_key().as_bytes(), served.key.secret_pkcs8_der());

    // Past its NotAfter the SVID is withdrawn: callers get no identity, and the file goes.
    let wait = served
        .not_after
        .duration_since(SystemTime::now())
        .unwrap_or_default()
        + Duration::from_secs(15);
    eventually_async("an expired SVID is never served", wait, async || {
        second.rx.borrow().svids.is_empty()
    })
    .await;
    let err = tokio::time::timeout(Duration::from_secs(10), client.fetch_x509_svid())
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(err, WorkloadApiError::NoIdentityIssued)
            || format!("{err:?}").contains("PermissionDenied"),
        "{err:?}"
    );
    assert!(
        stored_files(&adir).is_empty(),
        "the expired SVID is removed"
    );
    api_stop.cancel();
    second.stop().await;

    // Another restart: nothing is left to serve.
    let third = run(agent_config_for(&ca_url, &adir)).await;
    assert!(third.rx.borrow().svids.is_empty());
    third.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_svid_whose_entry_was_withdrawn_is_not_served_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let adir = dir.path().join("agent");
    let ca = start_ca(
        &dir.path().join("ca"),
        "127.0.0.1:0".parse().unwrap(),
        |_| {},
    )
    .await;
    let ca_url = ca.url();
    let (token, pin) = ca.token("host-a").await;
    let first = run(agent_config(&ca, &adir, Some(token), Some(pin))).await;
    let entry = ca
        .entry(
            "spiffe://example.org/web",
            first.agent.node_id().as_str(),
            &[&me()],
        )
        .await;
    eventually_async("the workload SVID", Duration::from_secs(15), async || {
        !first.rx.borrow().svids.is_empty()
    })
    .await;
    assert_eq!(stored_files(&adir).len(), 1);

    let id = entry["id"].as_str().unwrap();
    ca.admin
        .call(hyper::Method::DELETE, &format!("/entries/{id}"), None)
        .await
        .unwrap();
    eventually_async(
        "the withdrawn entry's SVID is dropped",
        Duration::from_secs(20),
        async || first.rx.borrow().svids.is_empty(),
    )
    .await;
    assert!(stored_files(&adir).is_empty(), "and its file removed");

    ca.stop().await;
    first.stop().await;
    let second = run(agent_config_for(&ca_url, &adir)).await;
    assert!(second.rx.borrow().svids.is_empty());
    second.stop().await;
}

/// A restart's configuration: the stored identity, no token, no first-contact bundle.
fn agent_config_for(ca_url: &str, data: &Path) -> AgentConfig {
    AgentConfig {
        ca_urls: vec![ca_url.to_owned()],
        ca_timeout: ca_api::replicas::ATTEMPT_TIMEOUT,
        bundle_file: None,
        bundle_sha256: None,
        join_token: None,
        data_dir: data.to_owned(),
    }
}
