//! Three `kith ca serve` replicas as processes on one PostgreSQL, carrying a small mesh (an
//! agent and two sidecars, workload SVIDs of 20 s) while one replica is killed with SIGKILL
//! and another loses its database (its connection runs through a proxy the test cuts):
//!
//! - not one workload request fails (each on a new connection, so each needs a valid SVID);
//! - renewals go on through the survivor: certificates are issued after both failures, and the
//!   run outlasts two SVID lifetimes;
//! - the replica without its database says so on `/readyz`;
//! - afterwards no serial was issued twice, each join token was spent at most once, and
//!   `kith ca audit verify` passes on the one chain all replicas wrote.
//!
//! Also: one join token sent at the same moment to two replicas is accepted exactly once.
//!
//! Needs PostgreSQL's server (Debian's `postgresql`, installed by `.ci/run`) and a kith with
//! `--store`; without them it prints `SKIPPED …` and passes, under CI=true it fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::common::Proc;
use crate::common::net::{echo_backend, free_port, wait_port};
use crate::replicas::{
    CutProxy, Traffic, admin_json, check_store, http_status, replica, request, store_available,
};
use integration::eventually;
use integration::postgres::Postgres;

const WEB: &str = "spiffe://example.org/web";
/// Short, so that the run sees several renewals; the CA's minimum is 10 s.
const WORKLOAD_TTL: &str = "20s";

#[test]
fn three_replicas_carry_the_mesh_through_a_kill_and_a_database_cut() {
    const TEST: &str = "three_replicas_carry_the_mesh_through_a_kill_and_a_database_cut";
    let Some(pg) = Postgres::start_if_available(TEST) else {
        return;
    };
    if !store_available(TEST) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = pg.create_db("kith");
    // Replica 3 reaches the database through a proxy the test cuts.
    let proxy = CutProxy::start(pg.host_port().parse().unwrap());
    let proxied = store.replace(&pg.host_port(), &proxy.addr.to_string());
    assert_ne!(proxied, store);

    let mut r1 = replica(dir.path(), "r1", &store, WORKLOAD_TTL);
    let r2 = replica(dir.path(), "r2", &store, WORKLOAD_TTL);
    let r3 = replica(dir.path(), "r3", &proxied, WORKLOAD_TTL);
    let (r1_data, r2_data) = (dir.path().join("r1"), dir.path().join("r2"));

    // The admin verbs work from any replica: the token from one, the entry from another.
    let join = admin_json(&r1_data, &["token", "create", "--name", "host-a"]);
    admin_json(
        &r2_data,
        &[
            "entry",
            "create",
            "--id",
            WEB,
            "--parent",
            "spiffe://example.org/kith/node/host-a",
            "--selector",
            &format!("unix:uid:{}", nix::unistd::getuid()),
        ],
    );
    let one_token_twice = concurrent_join(&r2_data, &r2.addr, &r3.addr);

    // The agent knows all three; two sidecars get the web SVID from it: client side (a) and
    // server side (b) in front of an echo backend.
    let socket = dir.path().join("agent.sock");
    let urls: Vec<String> = [&r1.addr, &r2.addr, &r3.addr]
        .iter()
        .map(|a| format!("https://{a}"))
        .collect();
    let agent = {
        let mut args = vec!["agent", "run", "--admin-listen", "127.0.0.1:0"];
        for u in &urls {
            args.extend_from_slice(&["--ca", u]);
        }
        // A hung replica costs at most this per call before the next is asked.
        args.extend_from_slice(&["--ca-timeout", "3s"]);
        args.extend_from_slice(&["--bundle-sha256", join["bundle_sha256"].as_str().unwrap()]);
        let data = dir.path().join("agent");
        let (d, s) = (data.to_str().unwrap(), socket.to_str().unwrap());
        args.extend_from_slice(&["--data-dir", d, "--socket", s, "--log-format", "json"]);
        let token_file = dir.path().join("join-token");
        std::fs::write(&token_file, join["token"].as_str().unwrap()).unwrap();
        let t = token_file.to_str().unwrap().to_owned();
        args.extend_from_slice(&["--join-token-file", &t]);
        Proc::spawn(dir.path(), "agent", &args)
    };
    let backend = echo_backend();
    let (a, b) = (free_port(), free_port());
    let endpoint = format!("unix://{}", socket.display());
    let sidecar = |name: &str, listen: SocketAddr, role: &[&str]| {
        let (l, admin) = (listen.to_string(), free_port().to_string());
        let mut args = vec![
            "sidecar",
            "run",
            "--workload-api",
            &endpoint,
            "--listen",
            &l,
            "--admin-listen",
            &admin,
        ];
        args.extend_from_slice(role);
        Proc::spawn(dir.path(), name, &args)
    };
    let (b_connect, backend_s) = (b.to_string(), backend.to_string());
    let side_b = sidecar("sidecar-b", b, &["--forward", &backend_s, "--allow", WEB]);
    let side_a = sidecar(
        "sidecar-a",
        a,
        &["--connect", &b_connect, "--expect-id", WEB],
    );
    wait_port(a);
    wait_port(b);
    eventually(
        "the first request through the mesh",
        Duration::from_secs(60),
        || request(a, 0).is_ok(),
    );

    let traffic = Traffic::start(a, Duration::from_millis(100));
    std::thread::sleep(Duration::from_secs(5));
    // SIGKILL: no drain, no goodbye.
    r1.child.kill().unwrap();
    r1.child.wait().unwrap();
    std::thread::sleep(Duration::from_secs(5));
    proxy.cut();
    let cut_at = unix_now();
    eventually(
        "the replica without its database is not ready",
        Duration::from_secs(30),
        || http_status(&r3.metrics_addr, "/readyz").is_some_and(|s| s != 200),
    );
    // Two SVID lifetimes on one replica: the sidecars' SVIDs must have been renewed through it.
    let survivor_started = Instant::now();
    std::thread::sleep(Duration::from_secs(45));
    let (answered, failures) = traffic.finish();
    eprintln!(
        "{answered} requests answered, {} failed; {:?} on the last replica",
        failures.len(),
        survivor_started.elapsed()
    );
    assert!(
        failures.is_empty(),
        "requests failed: {failures:?}\nagent:\n{}\nsidecar a:\n{}\nsidecar b:\n{}",
        agent.log(),
        side_a.log(),
        side_b.log()
    );
    assert!(answered > 100, "too little traffic: {answered}");
    let renewed = pg.psql(
        "kith",
        &format!("SELECT count(*) FROM certificates WHERE kind <> 'node' AND issued_at > {cut_at}"),
    );
    assert!(
        renewed.trim().parse::<u64>().unwrap() >= 2,
        "workload renewals after the cut: {renewed}"
    );

    // Tokens: the agent's and the contested one spent once each, nothing spent twice.
    assert_eq!(one_token_twice, 1, "one token, two replicas at once");
    let spent = pg.psql(
        "kith",
        "SELECT count(*) FROM join_tokens WHERE used_at IS NOT NULL",
    );
    assert_eq!(spent.trim(), "2", "spent tokens");
    let nodes = pg.psql("kith", "SELECT count(*) FROM nodes");
    assert_eq!(nodes.trim(), "2", "one node per spent token");
    check_store(|sql| pg.psql("kith", sql), &r2_data);
    drop((r2, r3));
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Creates a token through `admin_dir`'s replica and sends it to the replicas at `x` and `y` at
/// the same moment; returns how many accepted it.
fn concurrent_join(admin_dir: &Path, x: &str, y: &str) -> usize {
    let join = admin_json(admin_dir, &["token", "create", "--name", "contested"]);
    let token = join["token"].as_str().unwrap().to_owned();
    let pin = join["bundle_sha256"].as_str().unwrap().to_owned();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let bundle = Arc::new(ca_api::client::fetch_bundle_pinned(x, &pin).await.unwrap());
        let config = ca_api::client::client_config(bundle, None).unwrap();
        // Both connections open first, so that the two requests leave together.
        let mut conns = Vec::new();
        for addr in [x, y] {
            conns.push(
                ca_api::client::Connection::open(addr, config.clone())
                    .await
                    .unwrap(),
            );
        }
        let barrier = Arc::new(tokio::sync::Barrier::new(2));
        let mut tasks = Vec::new();
        for mut conn in conns {
            let (token, barrier) = (token.clone(), barrier.clone());
            tasks.push(tokio::spawn(async move {
                let (_, csr) = ca_api::link::new_key_and_csr().unwrap();
                let body = serde_json::json!({"token": token, "csr": csr});
                barrier.wait().await;
                conn.post_json("/v1/attest/join", &body).await.unwrap()
            }));
        }
        let mut accepted = 0;
        for t in tasks {
            let (status, v) = t.await.unwrap();
            match status {
                200 => accepted += 1,
                // The loser is told the token is spent, not an internal error.
                s => assert!((400..500).contains(&s), "{s}: {v}"),
            }
        }
        accepted
    })
}
