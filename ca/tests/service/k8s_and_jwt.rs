//! Pod attestation by projected service-account token, and JWT-SVIDs for a node's workloads,
//! through the CA's API.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::common::{TestCa, csr, start_ca};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ca::store::Store;
use integration::ClusterKey as SaKey;
use serde_json::{Value, json};

const ISS: &str = "https://kubernetes.default.svc.cluster.local";

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims(edit: impl FnOnce(&mut Value)) -> Value {
    let now = now_secs();
    let mut c = json!({
        "aud": ["kith-ca"], "exp": now + 3600, "iat": now, "nbf": now, "iss": ISS,
        "sub": "system:serviceaccount:payments:api",
        "kubernetes.io": {"namespace": "payments", "pod": {"name": "api-1", "uid": "p-1"},
                          "serviceaccount": {"name": "api", "uid": "s-1"}},
    });
    edit(&mut c);
    c
}

fn token(key: &SaKey, kid: &str, claims: &Value) -> String {
    key.sign(kid, claims)
}

async fn k8s_ca(key: &SaKey) -> TestCa {
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, json!({"keys": [key.jwk]}).to_string()).unwrap();
    let ca = start_ca(|c| {
        c.k8s_issuer = Some(ISS.into());
        c.k8s_jwks = Some(jwks.clone());
    })
    .await;
    drop(dir);
    ca
}

async fn attest(ca: &TestCa, token: &str) -> (u16, Value) {
    ca.anon()
        .await
        .post_json("/v1/attest/k8s", &json!({"token": token, "csr": csr().0}))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_token_buys_the_pods_svid() {
    let key = SaKey::with_kid("k1");
    let ca = k8s_ca(&key).await;
    let (s, v) = attest(&ca, &token(&key, "k1", &claims(|_| {}))).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["spiffe_id"], "spiffe://example.org/ns/payments/sa/api");
    let chain = identity::pem::certificates(v["svid"].as_str().unwrap().as_bytes()).unwrap();
    identity::verify_x509_svid(&chain, &ca.bundle(), SystemTime::now()).unwrap();
    let rows = ca
        .admin
        .call(hyper::Method::GET, "/audit?limit=1000", None)
        .await
        .unwrap();
    let last = rows.as_array().unwrap().last().unwrap();
    assert_eq!(last["detail"]["pod"], "api-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_pod_tokens_are_refused_each_with_its_code() {
    let key = SaKey::with_kid("k1");
    let stranger = SaKey::with_kid("k1");
    let ca = k8s_ca(&key).await;
    let old = now_secs() - 7200;
    let none_header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","kid":"k1"}"#);
    let none_body = URL_SAFE_NO_PAD.encode(claims(|_| {}).to_string());
    let cases = vec![
        (
            token(
                &key,
                "k1",
                &claims(|c| {
                    c["exp"] = json!(old + 60);
                    c["iat"] = json!(old);
                    c["nbf"] = json!(old);
                }),
            ),
            "k8s_token_expired",
        ),
        (
            token(&key, "k1", &claims(|c| c["aud"] = json!(["someone-else"]))),
            "k8s_wrong_audience",
        ),
        (token(&key, "k2", &claims(|_| {})), "k8s_unknown_key"),
        (token(&stranger, "k1", &claims(|_| {})), "k8s_bad_signature"),
        (format!("{none_header}.{none_body}."), "k8s_alg_not_allowed"),
        (
            token(
                &key,
                "k1",
                &claims(|c| {
                    c.as_object_mut().unwrap().remove("kubernetes.io");
                }),
            ),
            "k8s_no_pod_binding",
        ),
        ("garbage".to_owned(), "k8s_token_malformed"),
    ];
    for (t, code) in cases {
        let (s, v) = attest(&ca, &t).await;
        assert_eq!(
            (s, v["code"].as_str().unwrap_or_default()),
            (401, code),
            "{v}"
        );
        assert!(ca.metrics().await.contains(&format!("reason=\"{code}\"")));
    }
    assert_eq!(ca.running.ca.store.counts().await.unwrap().issued, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_issuer_k8s_attestation_is_off() {
    let ca = start_ca(|_| {}).await;
    let (s, v) = attest(&ca, "x.y.z").await;
    assert_eq!(
        (s, v["code"].as_str().unwrap()),
        (404, "k8s_attestation_disabled")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_gets_jwt_svids_for_its_entries_verifiable_by_the_bundle() {
    let ca = start_ca(|_| {}).await;
    let node = ca.node("host-a").await;
    ca.entry("spiffe://example.org/web", &node.id).await;
    let mut conn = ca.as_svid(&node).await;
    let (s, v) = conn
        .post_json(
            "/v1/jwt",
            &json!({"spiffe_id": "spiffe://example.org/web", "audience": ["db"]}),
        )
        .await
        .unwrap();
    assert_eq!(s, 200, "{v}");
    let token = v["token"].as_str().unwrap();
    let bundle = ca.bundle();
    assert_eq!(
        bundle.jwt_authorities().len(),
        1,
        "the JWT key is published in the bundle"
    );
    let claims =
        identity::jwt::verify_jwt_svid(token, bundle.jwt_authorities(), "db", SystemTime::now())
            .unwrap();
    assert_eq!(claims.sub.as_str(), "spiffe://example.org/web");
    let ttl = claims.exp.duration_since(SystemTime::now()).unwrap();
    assert!(
        ttl <= Duration::from_secs(300) && ttl > Duration::from_secs(290),
        "{ttl:?}"
    );
    // The bundle endpoint publishes it as use: jwt-svid.
    let (_, b) = ca.anon().await.get_json("/v1/bundle").await.unwrap();
    assert!(
        b["keys"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["use"] == "jwt-svid" && k["kid"].is_string())
    );

    let (s, v) = conn
        .post_json(
            "/v1/jwt",
            &json!({"spiffe_id": "spiffe://example.org/db", "audience": ["x"]}),
        )
        .await
        .unwrap();
    assert_eq!((s, v["code"].as_str().unwrap()), (403, "not_entitled"));
    let (s, v) = conn
        .post_json(
            "/v1/jwt",
            &json!({"spiffe_id": "spiffe://example.org/web", "audience": []}),
        )
        .await
        .unwrap();
    assert_eq!((s, v["code"].as_str().unwrap()), (400, "audience_required"));
    let _ = csr();
}
