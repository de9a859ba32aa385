//! Failover between CA replicas: fake replicas on loopback (one refusing connections, one
//! answering 503, one accepting and never answering, one good) in front of a good one; calls
//! move past the broken ones within one call, stick to the one that answered, and do not move on
//! for an answer another replica would repeat. Then a real agent given a dead address before its
//! CA attests and gets its workload SVIDs.
#![allow(clippy::unwrap_used)]

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use ca_api::link::{self as ca_link, LinkError};
use ca_api::replicas::CaSet;
use http_body_util::Full;
use hyper::Method;
use identity::{Svid, TrustBundle};
use rustls_pki_types::PrivateKeyDer;
use tokio::net::TcpListener;

const HOUR: Duration = Duration::from_secs(3600);
/// Short, so the silent replica costs little; far above what a loopback call takes.
const ATTEMPT: Duration = Duration::from_secs(2);

/// The kit's PKI for example.org (root and intermediate valid from an hour ago for a day), with
/// the SVIDs the replicas and the node present.
struct Pki(integration::pki::Pki);

impl Pki {
    fn new() -> Self {
        let now = SystemTime::now();
        Self(integration::pki::Pki::valid(
            "example.org",
            now - HOUR,
            now + 24 * HOUR,
        ))
    }

    fn svid(&self, path: &str) -> Svid {
        let id = self.0.td.id_with_path(path).unwrap();
        let now = SystemTime::now();
        let (chain, key) = self.0.svid_for(&id, now - HOUR, now + HOUR);
        integration::pki::to_svid(chain, &key)
    }

    fn bundle(&self) -> Arc<TrustBundle> {
        Arc::new(self.0.bundle())
    }
}

/// A replica that answers every request with `status` and its `name` in the body.
async fn replica(pki: &Pki, status: u16, name: &'static str) -> (SocketAddr, Arc<AtomicUsize>) {
    let svid = pki.svid("/kith/ca");
    let config = rustls::ServerConfig::builder_with_provider(identity::tls::provider_with(
        identity::tls::Kx::Wide,
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        svid.chain().to_vec(),
        PrivateKeyDer::Pkcs8(svid.key().clone_key()),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, hits) = (acceptor.clone(), counted.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |_req| {
                    hits.fetch_add(1, Ordering::SeqCst);
                    let body = serde_json::json!({"code": name, "message": name}).to_string();
                    async move {
                        Ok::<_, Infallible>(
                            hyper::Response::builder()
                                .status(status)
                                .body(Full::new(Bytes::from(body)))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (addr, hits)
}

/// An address where nothing listens: connections are refused.
async fn refusing() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

/// Accepts connections and never says a word.
async fn silent() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            held.push(tcp);
        }
    });
    (addr, accepted)
}

fn url(addr: SocketAddr) -> String {
    format!("https://{addr}")
}

async fn get(cas: &CaSet, pki: &Pki, node: &Svid) -> Result<(u16, String), LinkError> {
    let (status, _, body) = ca_link::call(
        cas,
        pki.bundle(),
        node,
        Method::GET,
        "/v1/entries",
        None,
        &[],
    )
    .await?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_moves_past_refused_503_and_silent_replicas_to_a_good_one_and_stays() {
    let pki = Pki::new();
    let node = pki.svid("/kith/node/host-a");
    let dead = refusing().await;
    let (unavailable, unavailable_hits) = replica(&pki, 503, "unavailable").await;
    let (quiet, quiet_accepted) = silent().await;
    let (good, good_hits) = replica(&pki, 200, "good").await;
    // One as a comma list, the others as separate flags: both forms of --ca.
    let cas = CaSet::new(&[
        format!("{},{}", url(dead), url(unavailable)),
        url(quiet),
        url(good),
    ])
    .unwrap()
    .with_attempt_timeout(ATTEMPT);

    let (status, body) = get(&cas, &pki, &node).await.unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("good"), "{body}");
    assert_eq!(cas.current(), Some(good));
    assert_eq!(
        unavailable_hits.load(Ordering::SeqCst),
        1,
        "503 was asked once"
    );
    assert_eq!(
        quiet_accepted.load(Ordering::SeqCst),
        1,
        "the silent one was tried"
    );

    // The next call goes straight to the replica that answered.
    let (status, _) = get(&cas, &pki, &node).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(good_hits.load(Ordering::SeqCst), 2);
    assert_eq!(unavailable_hits.load(Ordering::SeqCst), 1);
    assert_eq!(quiet_accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_the_shared_database_would_repeat_does_not_move_on() {
    let pki = Pki::new();
    let node = pki.svid("/kith/node/host-a");
    let (forbidding, _) = replica(&pki, 403, "forbidden").await;
    let (good, good_hits) = replica(&pki, 200, "good").await;
    let cas = CaSet::new(&[url(forbidding), url(good)])
        .unwrap()
        .with_attempt_timeout(ATTEMPT);
    let (status, body) = get(&cas, &pki, &node).await.unwrap();
    assert_eq!(status, 403);
    assert!(body.contains("forbidden"), "{body}");
    assert_eq!(good_hits.load(Ordering::SeqCst), 0);
    assert_eq!(cas.current(), Some(forbidding));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_replica_fails_the_caller_gets_the_last_error() {
    let pki = Pki::new();
    let node = pki.svid("/kith/node/host-a");
    let dead = refusing().await;
    let (unavailable, _) = replica(&pki, 503, "unavailable").await;
    let cas = CaSet::new(&[url(dead), url(unavailable)])
        .unwrap()
        .with_attempt_timeout(ATTEMPT);
    match get(&cas, &pki, &node).await {
        Err(LinkError::Refused { status: 503, .. }) => {}
        other => panic!("expected the 503, got {other:?}"),
    }
    assert_eq!(cas.current(), None);

    let cas = CaSet::new(&[url(unavailable), url(dead)])
        .unwrap()
        .with_attempt_timeout(ATTEMPT);
    match get(&cas, &pki, &node).await {
        Err(e @ LinkError::Client(ca_api::client::ClientError::Connect { .. })) => {
            assert_eq!(e.reason(), "ca_unreachable")
        }
        other => panic!("expected the refused connection, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_is_not_the_ca_is_passed_over() {
    // A server with a certificate from another PKI (or another SPIFFE ID) fails the TLS
    // handshake: it is never trusted, and the next replica is asked.
    let pki = Pki::new();
    let other = Pki::new();
    let node = pki.svid("/kith/node/host-a");
    let (impostor, impostor_hits) = replica(&other, 200, "impostor").await;
    let (good, _) = replica(&pki, 200, "good").await;
    let cas = CaSet::new(&[url(impostor), url(good)])
        .unwrap()
        .with_attempt_timeout(ATTEMPT);
    let (status, body) = get(&cas, &pki, &node).await.unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("good"), "{body}");
    assert_eq!(impostor_hits.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_given_a_dead_replica_first_attests_through_the_live_one() {
    let dir = tempfile::tempdir().unwrap();
    let ca = common::start_ca(
        &dir.path().join("ca"),
        "127.0.0.1:0".parse().unwrap(),
        |_| {},
    )
    .await;
    let (token, pin) = ca.token("host-a").await;
    let mut cfg = common::agent_config(&ca, &dir.path().join("agent"), Some(token), Some(pin));
    let dead = refusing().await;
    cfg.ca_urls = vec![url(dead), ca.url()];
    let (agent, rx, _stop) = common::run_agent(cfg).await;
    ca.entry(
        "spiffe://example.org/web",
        agent.node_id().as_str(),
        &["unix:uid:1000"],
    )
    .await;
    integration::eventually_async(
        "the workload SVID through the live replica",
        Duration::from_secs(15),
        async || !rx.borrow().svids.is_empty(),
    )
    .await;
}
