//! `sidecar::run` as a library: a validated `Config` in, the listeners bound inside, a stop
//! token that ends it.

use std::net::SocketAddr;
use std::path::Path;

use integration::pki::Pki;
use proxy::authz::Policy;
use proxy::tunnel::Limits;
use sidecar::app_probe::AppProbes;
use sidecar::source::Source;
use sidecar::tunnel_config::{End, Tunnel};
use sidecar::{Config, Mode, RunError};
use tokio_util::sync::CancellationToken;

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

/// One server tunnel on a free port, its identity from files written in `dir`.
fn config(dir: &Path) -> Config {
    let pki = Pki::new("example.org");
    let svid = pki.svid("spiffe://example.org/server");
    let (cert, key, bundle) = (
        dir.join("svid.pem"),
        dir.join("key.pem"),
        dir.join("bundle.pem"),
    );
    std::fs::write(&cert, svid.chain_pem()).expect("cert");
    std::fs::write(&key, svid.key_pem().as_bytes()).expect("key");
    std::fs::write(&bundle, pki.bundle().to_pem()).expect("bundle");
    let policy = Policy::own_trust_domain();
    Config {
        source: Source::Files { cert, key, bundle },
        policy: policy.clone(),
        mode: Mode::Explicit(vec![Tunnel {
            name: String::new(),
            listen: loopback(),
            end: End::Server {
                forward: "127.0.0.1:9".parse().expect("addr"),
                policy,
            },
        }]),
        limits: Limits::default(),
        tls_resumption: true,
        pq: true,
        pool: true,
        workers: 2,
        app_probes: AppProbes::default(),
        admin_listen: loopback(),
    }
}

#[tokio::test]
async fn starts_and_returns_when_told_to_stop() {
    let dir = tempfile::tempdir().expect("temp dir");
    let stop = CancellationToken::new();
    // Stopped before it starts: it binds, serves, then drains at once.
    stop.cancel();
    sidecar::run(config(dir.path()), stop)
        .await
        .expect("a clean stop");
}

#[tokio::test]
async fn start_errors_name_what_failed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let taken = std::net::TcpListener::bind(loopback()).expect("bind");
    let mut cfg = config(dir.path());
    cfg.admin_listen = taken.local_addr().expect("addr");
    let err = sidecar::run(cfg, CancellationToken::new())
        .await
        .expect_err("admin port taken");
    assert!(matches!(err, RunError::Admin { .. }), "{err:?}");
    assert!(err.to_string().contains("(admin)"), "{err}");

    let mut cfg = config(dir.path());
    let Mode::Explicit(tunnels) = &mut cfg.mode else {
        unreachable!("explicit")
    };
    tunnels[0].listen = taken.local_addr().expect("addr");
    let err = sidecar::run(cfg, CancellationToken::new())
        .await
        .expect_err("tunnel port taken");
    let text = identity::report::chain(&err);
    assert!(text.starts_with("--listen: cannot listen on"), "{text}");

    let mut cfg = config(dir.path());
    cfg.limits.max_connections = 0;
    let err = sidecar::run(cfg, CancellationToken::new())
        .await
        .expect_err("bad limits");
    assert!(matches!(err, RunError::Limits(_)), "{err:?}");

    let mut cfg = config(dir.path());
    cfg.source = Source::Files {
        cert: dir.path().join("missing.pem"),
        key: dir.path().join("key.pem"),
        bundle: dir.path().join("bundle.pem"),
    };
    let err = sidecar::run(cfg, CancellationToken::new())
        .await
        .expect_err("no certificate");
    assert!(
        identity::report::chain(&err).contains("missing.pem"),
        "{err}"
    );
}
