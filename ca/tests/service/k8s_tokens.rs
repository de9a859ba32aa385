//! Kubernetes tokens against a stand-in API server that speaks the issuer's JWKS and the
//! TokenReview API (authentication.k8s.io/v1): no SVID outlives its token by more than the
//! renewal margin, the leeway only absorbs clock skew, a deleted pod's token is refused by the
//! review, stale issuer keys fail closed (and `/readyz` says so), and an unknown `kid` refreshes
//! the keys at most once per interval.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::common::{TestCa, csr, start_ca};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use integration::ClusterKey as SaKey;
use serde_json::{Value, json};

/// A generous bound that only keeps a broken server from hanging the test.
const BOUND: Duration = Duration::from_secs(60);

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A pod token of `pod` issued `age` seconds ago that expires at `exp`.
fn token(key: &SaKey, kid: &str, iss: &str, pod: &str, age: u64, exp: u64) -> String {
    let now = now_secs();
    let claims = json!({
        "aud": ["kith-ca"], "exp": exp, "iat": now - age, "nbf": now - age, "iss": iss,
        "sub": "system:serviceaccount:payments:api",
        "kubernetes.io": {"namespace": "payments", "pod": {"name": pod, "uid": format!("uid-{pod}")},
                          "serviceaccount": {"name": "api", "uid": "s-1"}},
    });
    key.sign(kid, &claims)
}

fn refused(metrics: &str, reason: &str) -> u64 {
    let prefix = format!("kith_ca_refused_total{{reason=\"{reason}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |v| v.trim().parse().unwrap())
}

async fn attest(ca: &TestCa, token: &str) -> (u16, Value) {
    ca.anon()
        .await
        .post_json("/v1/attest/k8s", &json!({"token": token, "csr": csr().0}))
        .await
        .unwrap()
}

fn not_after(v: &Value) -> u64 {
    let chain = identity::pem::certificates(v["svid"].as_str().unwrap().as_bytes()).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
    cert.validity().not_after.timestamp() as u64
}

/// What the stand-in API server answers and what it saw.
#[derive(Default)]
struct State {
    jwks: (u16, Vec<u8>),
    jwks_fetches: usize,
    /// Pods whose tokens the TokenReview no longer authenticates.
    deleted: Vec<String>,
    /// When set, TokenReview answers this status with an empty body.
    review_status: Option<u16>,
    /// (Authorization header, request body) of every TokenReview.
    reviews: Vec<(String, Value)>,
}

/// A stand-in for the Kubernetes API server over HTTPS on loopback, with its own CA.
struct ApiServer {
    url: String,
    ca_file: std::path::PathBuf,
    state: Arc<Mutex<State>>,
    _dir: tempfile::TempDir,
}

impl ApiServer {
    async fn start(keys: &[&SaKey]) -> Self {
        let ca = integration::pki::TlsCa::new("apiserver ca");
        let (leaf, leaf_key) = ca.server(&["127.0.0.1"]);
        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("apiserver-ca.pem");
        std::fs::write(&ca_file, ca.cert.pem()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State::default()));
        let server = ApiServer {
            url,
            ca_file,
            state: state.clone(),
            _dir: dir,
        };
        server.set_keys(keys);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let state = state.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let state = state.clone();
                            async move {
                                let (status, body) = answer(&state, req).await;
                                let mut resp = hyper::Response::new(Full::new(Bytes::from(body)));
                                *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                                Ok::<_, std::convert::Infallible>(resp)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        server
    }

    fn set_keys(&self, keys: &[&SaKey]) {
        let set = json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()});
        self.state.lock().unwrap().jwks = (200, set.to_string().into_bytes());
    }

    fn fetches(&self) -> usize {
        self.state.lock().unwrap().jwks_fetches
    }
}

async fn answer(
    state: &Mutex<State>,
    req: hyper::Request<hyper::body::Incoming>,
) -> (u16, Vec<u8>) {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let auth = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let mut st = state.lock().unwrap();
    match (method.as_str(), path.as_str()) {
        ("GET", "/openid/v1/jwks") => {
            st.jwks_fetches += 1;
            st.jwks.clone()
        }
        ("POST", "/apis/authentication.k8s.io/v1/tokenreviews") => {
            let review: Value = serde_json::from_slice(&body).unwrap();
            st.reviews.push((auth, review.clone()));
            if let Some(status) = st.review_status {
                return (status, Vec::new());
            }
            // What the API server reads from a token it verified: its pod.
            let token = review["spec"]["token"].as_str().unwrap();
            let payload = token.split('.').nth(1).unwrap();
            let claims: Value =
                serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
            let pod = claims["kubernetes.io"]["pod"]["name"].as_str().unwrap();
            let status = if st.deleted.iter().any(|d| d == pod) {
                json!({"authenticated": false,
                       "error": format!("pods \"{pod}\" not found")})
            } else {
                json!({"authenticated": true,
                       "user": {"username": "system:serviceaccount:payments:api",
                                "uid": "s-1",
                                "groups": ["system:serviceaccounts", "system:authenticated"],
                                "extra": {"authentication.kubernetes.io/pod-name": [pod],
                                          "authentication.kubernetes.io/pod-uid": [format!("uid-{pod}")]}},
                       "audiences": review["spec"]["audiences"]})
            };
            let out = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                             "spec": review["spec"], "status": status});
            (201, out.to_string().into_bytes())
        }
        _ => (404, Vec::new()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_svid_outlives_its_token_by_more_than_the_margin_and_the_leeway_is_only_for_skew() {
    let key = SaKey::with_kid("k1");
    let api = ApiServer::start(&[&key]).await;
    let iss = api.url.clone();
    let ca = start_ca(|c| {
        c.k8s_issuer = Some(iss.clone());
        c.k8s_ca_file = Some(api.ca_file.clone());
    })
    .await;
    let margin = ca::k8s::SVID_MARGIN.as_secs();
    assert_eq!(margin, 300, "the margin README and API.md document");

    // 20 s past exp: inside the 30 s clock-skew leeway, so accepted, but the SVID ends with
    // the token (plus the margin), not an hour later.
    let exp = now_secs() - 20;
    let (s, v) = attest(&ca, &token(&key, "k1", &iss, "api-1", 3620, exp)).await;
    assert_eq!(s, 200, "{v}");
    assert!(
        not_after(&v) <= exp + margin,
        "{} > {}",
        not_after(&v),
        exp + margin
    );

    // A token with 10 minutes left buys at most 15 minutes, not the 1 h workload TTL.
    let exp = now_secs() + 600;
    let (s, v) = attest(&ca, &token(&key, "k1", &iss, "api-1", 60, exp)).await;
    assert_eq!(s, 200, "{v}");
    assert!(not_after(&v) <= exp + margin);
    assert!(v["renew_after"].as_u64().unwrap() < not_after(&v));

    // Past exp by more than the skew: refused.
    let exp = now_secs() - 45;
    let (s, v) = attest(&ca, &token(&key, "k1", &iss, "api-1", 3645, exp)).await;
    assert_eq!((s, v["code"].as_str().unwrap()), (401, "k8s_token_expired"));
    assert_eq!(refused(&ca.metrics().await, "k8s_token_expired"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_pods_token_is_refused_by_the_token_review() {
    let key = SaKey::with_kid("k1");
    let api = ApiServer::start(&[&key]).await;
    let iss = api.url.clone();
    let dir = tempfile::tempdir().unwrap();
    let sa_token = dir.path().join("token");
    std::fs::write(&sa_token, "ca-sa-token\n").unwrap();
    let ca = start_ca(|c| {
        c.k8s_issuer = Some(iss.clone());
        c.k8s_ca_file = Some(api.ca_file.clone());
        c.k8s_token_review = Some(api.url.clone());
        c.k8s_token_review_token_file = Some(sa_token.clone());
    })
    .await;
    let live = token(&key, "k1", &iss, "api-1", 60, now_secs() + 3600);
    let (s, v) = attest(&ca, &live).await;
    assert_eq!(s, 200, "{v}");
    {
        let st = api.state.lock().unwrap();
        let (auth, review) = st.reviews.last().unwrap();
        assert_eq!(auth, "Bearer ca-sa-token");
        assert_eq!(review["kind"], "TokenReview");
        assert_eq!(review["apiVersion"], "authentication.k8s.io/v1");
        assert_eq!(review["spec"]["token"], live.as_str());
        assert_eq!(review["spec"]["audiences"], json!(["kith-ca"]));
    }

    // The attack: the pod is deleted, its still-unexpired token is replayed.
    api.state.lock().unwrap().deleted.push("api-1".into());
    let (s, v) = attest(&ca, &live).await;
    assert_eq!(
        (s, v["code"].as_str().unwrap()),
        (401, "k8s_token_review_rejected"),
        "{v}"
    );
    assert!(v["message"].as_str().unwrap().contains("not found"), "{v}");
    assert_eq!(refused(&ca.metrics().await, "k8s_token_review_rejected"), 1);
    // Another pod of the same service account is unaffected.
    let other = token(&key, "k1", &iss, "api-2", 60, now_secs() + 3600);
    assert_eq!(attest(&ca, &other).await.0, 200);

    // No clear answer from the API server: fail closed.
    api.state.lock().unwrap().review_status = Some(500);
    let (s, v) = attest(&ca, &other).await;
    assert_eq!(
        (s, v["code"].as_str().unwrap()),
        (503, "k8s_token_review_unavailable"),
        "{v}"
    );
    assert_eq!(
        refused(&ca.metrics().await, "k8s_token_review_unavailable"),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_issuer_keys_fail_closed_and_readyz_says_so() {
    let key = SaKey::with_kid("k1");
    let api = ApiServer::start(&[&key]).await;
    let iss = api.url.clone();
    let ca = start_ca(|c| {
        c.k8s_issuer = Some(iss.clone());
        c.k8s_ca_file = Some(api.ca_file.clone());
        c.k8s_jwks_max_staleness = Duration::from_secs(1);
    })
    .await;
    let t = token(&key, "k1", &iss, "api-1", 60, now_secs() + 3600);
    // The issuer stops answering; the keys age past the maximum staleness.
    api.state.lock().unwrap().jwks = (500, Vec::new());
    let v = integration::eventually_async("the keys to go stale", BOUND, async || {
        let (s, v) = ca.anon().await.get_json("/readyz").await.unwrap();
        if s == 503 { Ok(v) } else { Err(v) }
    })
    .await;
    assert_eq!(v["failing"], json!(["k8s_jwks"]), "{v}");
    let check = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "k8s_jwks")
        .unwrap();
    assert!(
        check["detail"].as_str().unwrap().contains("refreshed"),
        "{check}"
    );
    let (s, v) = attest(&ca, &t).await;
    assert_eq!(
        (s, v["code"].as_str().unwrap()),
        (503, "k8s_jwks_stale"),
        "{v}"
    );
    assert_eq!(refused(&ca.metrics().await, "k8s_jwks_stale"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_kid_refreshes_the_keys_at_most_once_per_interval() {
    let k1 = SaKey::with_kid("k1");
    let k2 = SaKey::with_kid("k2");
    let k9 = SaKey::with_kid("k9");
    let api = ApiServer::start(&[&k1]).await;
    let iss = api.url.clone();
    let ca = start_ca(|c| {
        c.k8s_issuer = Some(iss.clone());
        c.k8s_ca_file = Some(api.ca_file.clone());
    })
    .await;
    assert_eq!(api.fetches(), 1, "fetched once at start");
    // The cluster rotates its signing key; the first token under it refreshes the keys.
    api.set_keys(&[&k1, &k2]);
    let (s, v) = attest(&ca, &token(&k2, "k2", &iss, "api-1", 60, now_secs() + 3600)).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(api.fetches(), 2);
    // The attack: tokens naming kids that do not exist, as fast as possible. They do not turn
    // into one issuer fetch each.
    for _ in 0..5 {
        let (s, v) = attest(&ca, &token(&k9, "k9", &iss, "api-1", 60, now_secs() + 3600)).await;
        assert_eq!((s, v["code"].as_str().unwrap()), (401, "k8s_unknown_key"));
    }
    assert_eq!(api.fetches(), 2, "no refresh within the interval");
    assert_eq!(refused(&ca.metrics().await, "k8s_unknown_key"), 5);
}
