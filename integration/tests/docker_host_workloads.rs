//! A Docker-host style node: on the node namespace, a `kith agent` joined with a one-time
//! token; two workloads under different UIDs get different SVIDs over the Workload API (each
//! sidecar is the workload's own process, attested by its UID) and talk through explicit-mode
//! sidecars: web's client side → api's server side, which allows only web.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use integration::{Lab, eventually, kith_bin, logged_peers, metric, podapp};

const WEB_UID: u32 = 2001;
const API_UID: u32 = 2002;

#[test]
fn docker_host_workloads() {
    if !Lab::available("docker_host_workloads") {
        return;
    }
    let mut lab = Lab::start("1h");
    let join: serde_json::Value =
        serde_json::from_str(&lab.ca_cli(&["token", "create", "--name", "host-a", "--json"]))
            .unwrap();
    for (id, uid) in [("web", WEB_UID), ("api", API_UID)] {
        lab.ca_cli(&[
            "entry",
            "create",
            "--id",
            &format!("spiffe://example.org/{id}"),
            "--parent",
            "spiffe://example.org/kith/node/host-a",
            "--selector",
            &format!("unix:uid:{uid}"),
        ]);
    }
    let kith = kith_bin();
    let kith = kith.to_str().unwrap();
    let socket = lab.path("run/agent.sock");
    let endpoint = format!("unix://{}", socket.display());
    let node = lab.node.clone();
    let agent = lab.spawn_in(
        &node,
        "agent",
        None,
        &[
            kith,
            "agent",
            "run",
            "--ca",
            &lab.ca_url(),
            "--data-dir",
            lab.path("agent").to_str().unwrap(),
            "--socket",
            socket.to_str().unwrap(),
            "--admin-listen",
            "127.0.0.1:15021",
            "--bundle-sha256",
            join["bundle_sha256"].as_str().unwrap(),
        ],
        &[("KITH_JOIN_TOKEN", join["token"].as_str().unwrap())],
    );
    eventually("the agent serves", Duration::from_secs(30), || {
        socket.exists()
    });

    let api_app = lab.spawn_in(
        &node,
        "api-app",
        Some(API_UID),
        &[podapp(), "serve", "127.0.0.1:8081", "api"],
        &[],
    );
    let api = lab.spawn_in(
        &node,
        "api-sidecar",
        Some(API_UID),
        &[
            kith,
            "sidecar",
            "run",
            "--workload-api",
            &endpoint,
            "--listen",
            "10.77.0.1:9443",
            "--forward",
            "127.0.0.1:8081",
            "--allow",
            "spiffe://example.org/web",
            "--admin-listen",
            "127.0.0.1:15030",
            "--log-format",
            "json",
        ],
        &[("RUST_LOG", "info,proxy=debug")],
    );
    let web = lab.spawn_in(
        &node,
        "web-sidecar",
        Some(WEB_UID),
        &[
            kith,
            "sidecar",
            "run",
            "--workload-api",
            &endpoint,
            "--listen",
            "127.0.0.1:9000",
            "--connect",
            "10.77.0.1:9443",
            "--expect-id",
            "spiffe://example.org/api",
            "--admin-listen",
            "127.0.0.1:15031",
            "--log-format",
            "json",
        ],
        &[("RUST_LOG", "info,proxy=debug")],
    );
    for admin in ["127.0.0.1:15030", "127.0.0.1:15031"] {
        eventually(
            "the sidecars hold their SVIDs",
            Duration::from_secs(30),
            || lab.exec_ok(&node, &[podapp(), "get", admin, "/ready"]),
        );
    }
    // Different UIDs, different SVIDs.
    for (admin, id) in [("127.0.0.1:15030", "api"), ("127.0.0.1:15031", "web")] {
        let m = lab.exec_node(&[podapp(), "get", admin, "/metrics"]);
        let series = format!(
            "kith_sidecar_svid_seconds_to_expiry{{spiffe_id=\"spiffe://example.org/{id}\"}}"
        );
        assert!(metric(&m, &series).is_some_and(|s| s > 0.0), "{id}: {m}");
    }

    // The web workload (its own UID) talks to the api through both sidecars.
    let out = lab.exec_node(&[
        "setpriv",
        &format!("--reuid={WEB_UID}"),
        &format!("--regid={WEB_UID}"),
        "--clear-groups",
        "--",
        podapp(),
        "get",
        "127.0.0.1:9000",
        "/",
        "from web",
    ]);
    assert!(
        out.contains("api:from web"),
        "{out}\n{}\n{}",
        web.log(),
        api.log()
    );
    assert_eq!(
        logged_peers(&web.log(), "outbound"),
        ["spiffe://example.org/api"]
    );
    assert_eq!(
        logged_peers(&api.log(), "inbound"),
        ["spiffe://example.org/web"]
    );

    // A process under a UID without an entry gets no SVID from the agent.
    let stranger = lab.spawn_in(
        &node,
        "stranger-sidecar",
        Some(2003),
        &[
            kith,
            "sidecar",
            "run",
            "--workload-api",
            &endpoint,
            "--listen",
            "127.0.0.1:9001",
            "--connect",
            "10.77.0.1:9443",
            "--expect-id",
            "spiffe://example.org/api",
            "--admin-listen",
            "127.0.0.1:15032",
        ],
        &[],
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !lab.exec_ok(&node, &[podapp(), "get", "127.0.0.1:15032", "/ready"]),
        "a UID without an entry got an identity"
    );
    for p in [agent, api_app, api, web, stranger] {
        lab.keep(p);
    }
}
