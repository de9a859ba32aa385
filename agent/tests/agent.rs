//! The agent against a real CA on loopback: first attestation with a pinned bundle, entries to
//! workload SVIDs, restart without a token, an expired identity, and a CA outage survived.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, SystemTime};

use agent::agent::{Agent, AgentError};
use agent::metrics::AgentMetrics;
use common::{agent_config, run_agent, start_ca};
use integration::eventually_async;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_start_attests_then_entries_become_workload_svids() {
    let dir = tempfile::tempdir().unwrap();
    let ca = start_ca(
        &dir.path().join("ca"),
        "127.0.0.1:0".parse().unwrap(),
        |_| {},
    )
    .await;
    let (token, pin) = ca.token("host-a").await;
    let adir = dir.path().join("agent");
    let (agent, mut rx, stop) = run_agent(agent_config(&ca, &adir, Some(token), Some(pin))).await;
    assert_eq!(
        agent.node_id().as_str(),
        "spiffe://example.org/kith/node/host-a"
    );
    assert_eq!(
        std::fs::metadata(adir.join("node.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );

    ca.entry(
        "spiffe://example.org/web",
        agent.node_id().as_str(),
        &["unix:uid:1000"],
    )
    .await;
    let got = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            if rx
                .borrow_and_update()
                .svids
                .iter()
                .any(|s| s.spiffe_id.as_str() == "spiffe://example.org/web")
            {
                return;
            }
            rx.changed().await.unwrap();
        }
    })
    .await;
    assert!(
        got.is_ok(),
        "the entry reached the agent and became an SVID"
    );
    let snap = rx.borrow().clone();
    let svid = &snap.svids[0];
    identity::verify_x509_svid(&svid.chain, &snap.bundle, SystemTime::now()).unwrap();
    assert_eq!(
        snap.for_caller(&["unix:uid:1000".into(), "unix:gid:0".into()])
            .len(),
        1
    );
    assert_eq!(snap.for_caller(&["unix:uid:1001".into()]).len(), 0);
    assert!(agent.is_ready());
    stop.cancel();

    // A restart needs no token: the node identity is on disk.
    let cfg = common::agent_config(&ca, &adir, None, None);
    let started = std::time::Instant::now();
    let (again, _) = Agent::bootstrap(cfg, std::sync::Arc::new(AgentMetrics::new()))
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "serves again within a second"
    );
    assert_eq!(again.node_id(), agent.node_id());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_identity_or_token_the_agent_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let ca = start_ca(
        &dir.path().join("ca"),
        "127.0.0.1:0".parse().unwrap(),
        |_| {},
    )
    .await;
    let cfg = agent_config(&ca, &dir.path().join("agent"), None, None);
    let err = Agent::bootstrap(cfg, std::sync::Arc::new(AgentMetrics::new()))
        .await
        .err()
        .unwrap();
    assert!(matches!(err, AgentError::NoIdentity { .. }));
    assert!(err.to_string().contains("kith ca token create"), "{err}");

    let (token, _) = ca.token("host-b").await;
    let cfg = agent_config(
        &ca,
        &dir.path().join("agent2"),
        Some(token.clone()),
        Some("00".repeat(32)),
    );
    let err = Agent::bootstrap(cfg, std::sync::Arc::new(AgentMetrics::new()))
        .await
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("not the pinned"),
        "a wrong pin stops first contact: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_node_identity_is_refused_plainly() {
    let dir = tempfile::tempdir().unwrap();
    let ca = start_ca(
        &dir.path().join("ca"),
        "127.0.0.1:0".parse().unwrap(),
        |_| {},
    )
    .await;
    let (token, pin) = ca.token("host-a").await;
    let adir = dir.path().join("agent");
    let (_agent, _rx, stop) = run_agent(agent_config(&ca, &adir, Some(token), Some(pin))).await;
    stop.cancel();
    // Replace the stored node SVID with one that expired yesterday (same key, any issuer).
    let key_pem = std::fs::read_to_string(adir.join("node.key")).unwrap();
    let key = rcgen::KeyPair::from_pem(&key_pem).unwrap();
    let id = identity::SpiffeId::new("spiffe://example.org/kith/node/host-a").unwrap();
    let now = SystemTime::now();
    let params = identity::x509::svid_params(
        &id,
        &[],
        &[],
        now - Duration::from_secs(3 * 86_400),
        now - Duration::from_secs(86_400),
    )
    .unwrap();
    std::fs::write(
        adir.join("node.pem"),
        params.self_signed(&key).unwrap().pem(),
    )
    .unwrap();
    let err = Agent::bootstrap(
        agent_config(&ca, &adir, None, None),
        std::sync::Arc::new(AgentMetrics::new()),
    )
    .await
    .err()
    .unwrap();
    let text = err.to_string();
    assert!(
        text.contains("expired") && text.contains("kith ca token create --name host-a"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_outage_is_survived_and_caught_up_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    let short = |c: &mut ca::config::Config| {
        c.workload_ttl = Duration::from_secs(20);
        c.node_ttl = Duration::from_secs(20);
    };
    let ca = start_ca(&ca_dir, "127.0.0.1:0".parse().unwrap(), short).await;
    let addr = ca.addr;
    let (token, pin) = ca.token("host-a").await;
    let (agent, rx, _stop) = run_agent(agent_config(
        &ca,
        &dir.path().join("agent"),
        Some(token),
        Some(pin),
    ))
    .await;
    ca.entry(
        "spiffe://example.org/web",
        agent.node_id().as_str(),
        &["unix:uid:1000"],
    )
    .await;
    eventually_async("the workload SVID", Duration::from_secs(15), async || {
        !rx.borrow().svids.is_empty()
    })
    .await;
    let first = rx.borrow().svids[0].not_after;

    ca.stop().await;
    // Longer than a renewal period (half of 20 s): renewals fail and back off...
    eventually_async(
        "failed renewals are counted",
        Duration::from_secs(15),
        async || agent.metrics.renewals("workload", "ca_unreachable") >= 2,
    )
    .await;
    // ...while the current SVID is still served.
    assert_eq!(rx.borrow().svids.len(), 1);
    assert_eq!(rx.borrow().svids[0].not_after, first);

    let _ca = start_ca(&ca_dir, addr, short).await;
    eventually_async(
        "renewed by itself once the CA returned",
        Duration::from_secs(20),
        async || {
            rx.borrow()
                .svids
                .first()
                .is_some_and(|s| s.not_after > first)
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_data_dir_is_reported_and_nothing_is_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let ca = start_ca(
        &dir.path().join("ca"),
        "127.0.0.1:0".parse().unwrap(),
        |_| {},
    )
    .await;
    let (token, pin) = ca.token("host-a").await;
    let adir = dir.path().join("agent");
    let (_agent, _rx, stop) = run_agent(agent_config(&ca, &adir, Some(token), Some(pin))).await;
    stop.cancel();
    for (file, garbage) in [
        ("node.json", "{not json"),
        ("node.key", "-----BEGIN PRIVATE KEY-----\nAAAA\n"),
        ("bundle.json", "[]"),
    ] {
        let path = adir.join(file);
        let good = std::fs::read(&path).unwrap();
        std::fs::write(&path, garbage).unwrap();
        let err = Agent::bootstrap(
            agent_config(&ca, &adir, None, None),
            std::sync::Arc::new(AgentMetrics::new()),
        )
        .await
        .err()
        .unwrap();
        let text = err.to_string();
        assert!(
            text.contains("is damaged") && text.contains(file) && text.contains("join token"),
            "{file}: {text}"
        );
        assert_eq!(
            std::fs::read(&path).unwrap(),
            garbage.as_bytes(),
            "the agent does not overwrite what it cannot read"
        );
        std::fs::write(&path, good).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_reports_readiness_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let ca = start_ca(
        &dir.path().join("ca"),
        "127.0.0.1:0".parse().unwrap(),
        |_| {},
    )
    .await;
    let (token, pin) = ca.token("host-a").await;
    let (agent, rx, stop) = run_agent(agent_config(
        &ca,
        &dir.path().join("agent"),
        Some(token),
        Some(pin),
    ))
    .await;
    ca.entry(
        "spiffe://example.org/web",
        agent.node_id().as_str(),
        &["unix:uid:1000"],
    )
    .await;
    eventually_async("the workload SVID", Duration::from_secs(15), async || {
        !rx.borrow().svids.is_empty()
    })
    .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let api = std::sync::Arc::new(agent::workload_api::WorkloadApiMetrics::new());
    api.refused("connections_per_uid_cap");
    tokio::spawn(agent::admin::serve(
        agent.clone(),
        api,
        listener,
        stop.clone(),
    ));
    let get = |path: &'static str| async move {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = hyper::Request::get(path)
            .header("host", "x")
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        use http_body_util::BodyExt;
        (
            status,
            String::from_utf8(
                resp.into_body()
                    .collect()
                    .await
                    .unwrap()
                    .to_bytes()
                    .to_vec(),
            )
            .unwrap(),
        )
    };
    assert_eq!(get("/live").await.0, 200);
    assert_eq!(get("/ready").await.0, 200);
    let (status, metrics) = get("/metrics").await;
    assert_eq!(status, 200);
    for want in [
        "kith_agent_renewals_total{kind=\"node_attest\",result=\"ok\"} 1",
        "kith_agent_renewals_total{kind=\"workload\",result=\"ok\"}",
        "kith_agent_svid_seconds_to_expiry{spiffe_id=\"spiffe://example.org/web\"}",
        "kith_agent_svids_held 1",
        "kith_agent_workload_api_open_streams 0",
        "kith_agent_workload_api_refusals_total{reason=\"connections_per_uid_cap\"} 1",
        "kith_agent_workload_api_connections 0",
    ] {
        assert!(metrics.contains(want), "{want} in\n{metrics}");
    }
    assert!(metrics.ends_with("# EOF\n"));

    // The admin port is capped: silent clients holding every slot do not get one more, and
    // a slot given back serves again.
    let mut held = Vec::new();
    for _ in 0..agent::admin::MAX_CONNECTIONS {
        held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    let mut extra = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 1];
    let closed = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read(&mut extra, &mut buf),
    )
    .await
    .expect("a connection past the cap is closed at accept");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    held.pop();
    eventually_async(
        "the admin endpoint to serve again once a slot is free",
        Duration::from_secs(10),
        async || {
            std::net::TcpStream::connect(addr).is_ok_and(|mut s| {
                use std::io::{Read as _, Write as _};
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let mut out = String::new();
                s.write_all(b"GET /live HTTP/1.0\r\nHost: x\r\n\r\n")
                    .is_ok()
                    && s.read_to_string(&mut out).is_ok()
                    && out.starts_with("HTTP/1.")
                    && out.contains(" 200 ")
            })
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_change_on_the_ca_reaches_workloads_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    // A 30 s signer (the command line's floor is a minute; the test sets the config directly):
    // its successor JWT key is published at 15 s, changing the bundle.
    let ca = start_ca(
        &dir.path().join("ca"),
        "127.0.0.1:0".parse().unwrap(),
        |c| {
            c.intermediate_ttl = Duration::from_secs(30);
            c.workload_ttl = Duration::from_secs(20);
        },
    )
    .await;
    let (token, pin) = ca.token("host-a").await;
    let (agent, rx, _stop) = run_agent(agent_config(
        &ca,
        &dir.path().join("agent"),
        Some(token),
        Some(pin),
    ))
    .await;
    ca.entry(
        "spiffe://example.org/web",
        agent.node_id().as_str(),
        &["unix:uid:1000"],
    )
    .await;
    eventually_async("the workload SVID", Duration::from_secs(15), async || {
        !rx.borrow().svids.is_empty()
    })
    .await;
    let before = rx.borrow().bundle.sequence();
    eventually_async(
        "the new bundle was published to workloads",
        Duration::from_secs(75),
        async || {
            rx.borrow().bundle.sequence() > before
                && rx.borrow().bundle.jwt_authorities().len() >= 2
        },
    )
    .await;
}
