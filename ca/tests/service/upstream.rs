//! kith can sit under an operator's PKI: signing under an imported root, or under an upstream
//! intermediate whose chain leads to the operator's root.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, SystemTime};

use crate::common::start_ca;
use identity::TrustDomain;
use identity::x509::root_params;
use integration::pki::operator_root;
use rcgen::{BasicConstraints, IsCa, Issuer, KeyPair};

fn write(dir: &std::path::Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_imported_root_signs_the_intermediates() {
    let dir = tempfile::tempdir().unwrap();
    let td = TrustDomain::new("example.org").unwrap();
    let now = SystemTime::now();
    let (root, key) = operator_root(
        &td,
        "Corp Root",
        now - Duration::from_secs(60),
        now + Duration::from_secs(86_400 * 30),
    );
    let cert = write(dir.path(), "root.pem", &root.pem());
    let keyf = write(dir.path(), "root.key", &key.serialize_pem());
    let ca = start_ca(|c| {
        c.upstream_cert = Some(cert.clone());
        c.upstream_key = Some(keyf.clone());
    })
    .await;
    assert_eq!(
        ca.bundle().x509_authorities(),
        &[root.der().clone()],
        "the operator's root is the bundle"
    );
    let node = ca.node("host-a").await;
    assert_eq!(node.chain.len(), 2);
    identity::verify_x509_svid(&node.chain, &ca.bundle(), SystemTime::now()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_intermediate_chains_to_the_operators_root() {
    let dir = tempfile::tempdir().unwrap();
    let td = TrustDomain::new("example.org").unwrap();
    let now = SystemTime::now();
    let root_key = KeyPair::generate().unwrap();
    let root_p = root_params(
        &td,
        "Corp Root",
        now - Duration::from_secs(60),
        now + Duration::from_secs(86_400 * 365),
    )
    .unwrap();
    let root = root_p.self_signed(&root_key).unwrap();
    let root_issuer = Issuer::new(root_p, root_key);
    let up_key = KeyPair::generate().unwrap();
    let mut up_p = root_params(
        &td,
        "Corp Issuing CA",
        now - Duration::from_secs(60),
        now + Duration::from_secs(86_400 * 90),
    )
    .unwrap();
    up_p.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    up_p.use_authority_key_identifier_extension = true;
    let up = up_p.signed_by(&up_key, &root_issuer).unwrap();
    let cert = write(
        dir.path(),
        "chain.pem",
        &format!("{}{}", up.pem(), root.pem()),
    );
    let keyf = write(dir.path(), "up.key", &up_key.serialize_pem());
    let ca = start_ca(|c| {
        c.upstream_cert = Some(cert.clone());
        c.upstream_key = Some(keyf.clone());
    })
    .await;
    assert_eq!(ca.bundle().x509_authorities(), &[root.der().clone()]);
    let node = ca.node("host-a").await;
    assert_eq!(
        node.chain.len(),
        3,
        "leaf, kith's intermediate, the upstream intermediate"
    );
    assert_eq!(node.chain[2], *up.der());
    identity::verify_x509_svid(&node.chain, &ca.bundle(), SystemTime::now()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_that_is_not_the_upstreams_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let td = TrustDomain::new("example.org").unwrap();
    let now = SystemTime::now();
    let (root, _key) = operator_root(&td, "Corp Root", now, now + Duration::from_secs(86_400));
    let cert = write(dir.path(), "root.pem", &root.pem());
    let keyf = write(
        dir.path(),
        "other.key",
        &KeyPair::generate().unwrap().serialize_pem(),
    );
    let mut cfg = ca::config::Config::for_tests(&dir.path().join("data"), "example.org").unwrap();
    cfg.upstream_cert = Some(cert);
    cfg.upstream_key = Some(keyf);
    ca::server::prepare_data_dir(&cfg).unwrap();
    let listeners = ca::server::Listeners {
        api: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        metrics: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        admin: ca::admin::bind(&cfg.admin_socket).unwrap(),
    };
    let err = ca::server::start(&cfg, listeners, tokio_util::sync::CancellationToken::new())
        .await
        .err()
        .unwrap();
    let err = identity::report::chain(&err);
    assert!(
        err.contains("does not belong to the upstream certificate"),
        "{err}"
    );
}
