//! The Workload API driven by Python gRPC clients (grpcio's C core, and py-spiffe on top of it),
//! which send the socket path percent-encoded as `:authority`: h2 alone refuses those calls, the
//! shim in `workload_api/authority.rs` lets them through.
//!
//! Needs python3 with grpcio, grpcio-tools and cryptography (and spiffe for py-spiffe), as
//! `.ci/run` installs them. Without them the test says SKIPPED, except under `CI=true`.
#![allow(clippy::unwrap_used)]

mod common;

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use agent::attest::Attestor;
use agent::snapshot::{JwtSource, Snapshot};
use agent::workload_api::{self, Limits, WorkloadApiMetrics};
use common::{WorkloadPki, me};
use identity::SpiffeId;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// JWT-SVIDs are not asked for here.
struct NoJwt;

impl JwtSource for NoJwt {
    fn fetch_jwt(
        &self,
        _id: &SpiffeId,
        _audience: &[String],
    ) -> impl Future<Output = Result<(String, SystemTime), String>> + Send {
        std::future::ready(Err("no JWT-SVIDs in this test".to_owned()))
    }
}

/// A snapshot with one SVID, `spiffe://example.org/web`, granted to this process's uid.
fn snapshot() -> Snapshot {
    let pki = WorkloadPki::new("example.org");
    Snapshot {
        version: 1,
        svids: vec![pki.svid("/web", &[me()])],
        bundle: Arc::new(pki.bundle()),
    }
}

fn skip(why: &str) {
    integration::skip::skip("python_client", &format!("{why} (run .ci/run)"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpc_clients_fetch_an_x509_svid() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent").join("api.sock");
    let (_tx, rx) = watch::channel(Arc::new(snapshot()));
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(workload_api::serve(
        workload_api::bind(&socket).unwrap(),
        rx,
        Arc::new(NoJwt),
        Arc::new(Attestor::new()),
        Limits::default(),
        Arc::new(WorkloadApiMetrics::new()),
        shutdown.clone(),
    ));

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/fetch.py");
    let run = tokio::process::Command::new("python3")
        .arg(&script)
        .arg(&socket)
        .kill_on_drop(true)
        .output();
    let output = match tokio::time::timeout(Duration::from_secs(120), run).await {
        Err(_) => panic!("python client timed out"),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            return skip("python3 is not installed");
        }
        Ok(result) => result.unwrap(),
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("python stdout:\n{stdout}python stderr:\n{stderr}");
    if output.status.code() == Some(3) {
        return skip(stderr.trim());
    }
    assert!(output.status.success(), "python client failed");

    let want = "spiffe://example.org/web";
    let ids: Vec<(&str, &str)> = stdout.lines().filter_map(|l| l.split_once(": ")).collect();
    let grpcio = ids.iter().find(|(client, _)| client.starts_with("grpcio "));
    assert_eq!(grpcio.map(|(_, id)| *id), Some(want), "grpcio's answer");
    match ids
        .iter()
        .find(|(client, _)| client.starts_with("py-spiffe "))
    {
        Some((_, id)) => assert_eq!(*id, want, "py-spiffe's answer"),
        None => skip("py-spiffe (pip package spiffe) is not installed"),
    }

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(20), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
