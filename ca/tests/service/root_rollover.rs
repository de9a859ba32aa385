//! Root rollover with an injected clock: a successor root is published at half the root's life,
//! signing switches to it only after the propagation window and once callers report holding it,
//! the old root leaves the bundle after its last leaf expired, and every phase is audited and
//! survives a restart. And expiry safety: an expired root signs nothing.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{ServerName, UnixTime};
use std::time::{Duration, SystemTime};

use crate::common;
use ca::authority::{Authority, Lifetimes, Push, RolloverOutcome, Upstream};
use ca::rollover::{Policy, Wait};
use ca::seal::Kek;
use ca::service::ApiError;
use ca::store::Store;
use ca::store::sqlite::SqliteStore;
use identity::{SpiffeId, TrustBundle, TrustDomain, verify_x509_svid};
use integration::eventually_async;
use integration::pki::operator_root;
use rcgen::KeyPair;
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

fn lifetimes() -> Lifetimes {
    Lifetimes {
        root: Duration::from_secs(1000),
        intermediate: Duration::from_secs(200),
        rollover: Policy {
            rollover_at: 0.5,
            propagation: Duration::from_secs(100),
            max_leaf_ttl: Duration::from_secs(100),
        },
    }
}

async fn load(store: &SqliteStore, now: SystemTime, upstream: Option<Upstream>) -> Authority {
    let kek = Kek::from_bytes(&[9u8; 32]).unwrap();
    Authority::load_or_init(store, kek, td(), lifetimes(), upstream, now)
        .await
        .unwrap()
}

fn s(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// One maintenance pass as the server runs it: intermediate rotation (caught up, as after a
/// gap), then the root rollover.
async fn tick(a: &Authority, store: &SqliteStore, now: SystemTime, push: Push) -> RolloverOutcome {
    for _ in 0..3 {
        let _ = a.rotate(store, now).await;
    }
    a.rollover(store, now, push).await.unwrap()
}

fn roots(a: &Authority) -> Vec<CertificateDer<'static>> {
    a.bundle().x509_authorities().to_vec()
}

fn hex_sha(c: &CertificateDer<'_>) -> String {
    ca::store::hex(&ca::authority::sha256(c))
}

/// Signs a leaf and says which of `candidates` it verifies against alone.
fn leaf_chains_to(
    a: &Authority,
    now: SystemTime,
    candidates: &[CertificateDer<'static>],
) -> Vec<bool> {
    let key = KeyPair::generate().unwrap();
    let id = SpiffeId::new("spiffe://example.org/web").unwrap();
    let issued = a.sign(&id, &key, &[], s(60), now).unwrap();
    verify_x509_svid(&issued.chain, &a.bundle(), now).unwrap();
    candidates
        .iter()
        .map(|c| {
            let only = TrustBundle::from_roots(td(), vec![c.clone()]).unwrap();
            verify_x509_svid(&issued.chain, &only, now).is_ok()
        })
        .collect()
}

async fn audit_actions(store: &SqliteStore) -> Vec<String> {
    store
        .audit(0, 10_000)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.event.action)
        .collect()
}

#[tokio::test]
async fn a_root_rolls_over_with_overlap_and_the_old_root_leaves_after_its_last_leaf() {
    let dir = tempfile::tempdir().unwrap();
    let store =
        SqliteStore::open(dir.path(), Kek::from_bytes(&[9u8; 32]).unwrap().audit_key()).unwrap();
    let t0 = SystemTime::now();
    let auth = load(&store, t0, None).await;
    assert_eq!(
        tick(&auth, &store, t0 + s(10), Push::None).await,
        RolloverOutcome::Nothing
    );
    let old = roots(&auth);
    assert_eq!(old.len(), 1);

    // Half-way: the successor is published beside the signing root, and does not sign.
    let published = tick(&auth, &store, t0 + s(500), Push::None).await;
    assert!(
        matches!(published, RolloverOutcome::Published(_)),
        "{published:?}"
    );
    let both = roots(&auth);
    assert_eq!(both.len(), 2, "two roots in the bundle during the overlap");
    let new = both.iter().find(|c| **c != old[0]).unwrap().clone();
    assert_eq!(
        leaf_chains_to(&auth, t0 + s(501), &[old[0].clone(), new.clone()]),
        vec![true, false]
    );

    // A restart keeps the published successor; reports start afresh, so the window runs from
    // the restart.
    drop(auth);
    let auth = load(&store, t0 + s(505), None).await;
    assert_eq!(roots(&auth).len(), 2);
    tick(&auth, &store, t0 + s(506), Push::None).await;
    assert!(matches!(
        auth.rollover_view().waiting,
        Some(Wait::Propagation { until, .. }) if until == ca::authority::unix(t0 + s(605))
    ));

    // A node renewed in the window holding only the old root: the switch waits for it.
    let node = "spiffe://example.org/kith/node/n1";
    auth.note_held_roots(node, Some(&[hex_sha(&old[0])]), t0 + s(700), t0 + s(520))
        .unwrap();
    assert_eq!(
        tick(&auth, &store, t0 + s(606), Push::None).await,
        RolloverOutcome::Waiting
    );
    match &auth.rollover_view().waiting {
        Some(Wait::Callers { callers, .. }) => assert_eq!(callers, &vec![node.to_string()]),
        w => panic!("{w:?}"),
    }
    assert_eq!(
        leaf_chains_to(&auth, t0 + s(606), &[old[0].clone(), new.clone()]),
        vec![true, false],
        "still signing under the old root while waiting"
    );

    // It renews again and now holds both: signing switches to the new root.
    auth.note_held_roots(
        node,
        Some(&[hex_sha(&old[0]), hex_sha(&new)]),
        t0 + s(800),
        t0 + s(607),
    )
    .unwrap();
    let switched = tick(&auth, &store, t0 + s(608), Push::None).await;
    assert!(
        matches!(switched, RolloverOutcome::Switched { forced: false, .. }),
        "{switched:?}"
    );
    assert_eq!(
        leaf_chains_to(&auth, t0 + s(609), &[old[0].clone(), new.clone()]),
        vec![false, true],
        "new leaves chain to the new root"
    );
    assert_eq!(
        roots(&auth).len(),
        2,
        "the old root stays while its leaves live"
    );

    // The old root leaves once its last leaf (at most 100 s) expired.
    assert_eq!(
        tick(&auth, &store, t0 + s(700), Push::None).await,
        RolloverOutcome::Nothing
    );
    assert_eq!(roots(&auth).len(), 2);
    assert_eq!(
        tick(&auth, &store, t0 + s(710), Push::None).await,
        RolloverOutcome::BundleChanged
    );
    assert_eq!(roots(&auth), vec![new.clone()]);

    // The intermediate keeps rotating under the new root, and all of it survives a restart.
    auth.rotate(&store, t0 + s(720)).await.unwrap();
    drop(auth);
    let auth = load(&store, t0 + s(730), None).await;
    assert_eq!(roots(&auth), vec![new.clone()]);
    assert_eq!(
        leaf_chains_to(&auth, t0 + s(731), std::slice::from_ref(&new)),
        vec![true]
    );

    let actions = audit_actions(&store).await;
    for phase in ["root.published", "root.activated", "root.retired"] {
        assert!(
            actions.iter().any(|a| a == phase),
            "{phase} audited: {actions:?}"
        );
    }
    assert_eq!(store.verify_audit(None).await.unwrap().first_broken, None);
}

#[tokio::test]
async fn an_operator_can_start_a_rollover_early_and_force_the_switch() {
    let dir = tempfile::tempdir().unwrap();
    let store =
        SqliteStore::open(dir.path(), Kek::from_bytes(&[9u8; 32]).unwrap().audit_key()).unwrap();
    let t0 = SystemTime::now();
    let auth = load(&store, t0, None).await;
    assert!(matches!(
        tick(&auth, &store, t0 + s(10), Push::Start).await,
        RolloverOutcome::Published(_)
    ));
    assert_eq!(
        tick(&auth, &store, t0 + s(11), Push::None).await,
        RolloverOutcome::Waiting
    );
    assert!(matches!(
        tick(&auth, &store, t0 + s(12), Push::Now).await,
        RolloverOutcome::Switched { forced: true, .. }
    ));
    let detail = store
        .audit(0, 10_000)
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.event.action == "root.activated")
        .unwrap()
        .event
        .detail;
    assert_eq!(detail["forced"], true);
}

#[tokio::test]
async fn a_ca_down_past_its_root_makes_a_new_root_at_start_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let store =
        SqliteStore::open(dir.path(), Kek::from_bytes(&[9u8; 32]).unwrap().audit_key()).unwrap();
    let t0 = SystemTime::now();
    let old = roots(&load(&store, t0, None).await);
    let later = t0 + s(1100);
    let auth = load(&store, later, None).await;
    let now_roots = roots(&auth);
    assert_eq!(now_roots.len(), 1);
    assert_ne!(now_roots, old, "the expired root is gone from the bundle");
    assert_eq!(leaf_chains_to(&auth, later, &now_roots), vec![true]);
    assert!(
        audit_actions(&store)
            .await
            .iter()
            .any(|a| a == "root.break_glass")
    );
}

/// An operator's root that ends at `t0 + life`.
fn upstream(t0: SystemTime, life: Duration) -> Upstream {
    let (cert, key) = operator_root(&td(), "Corp Root", t0 - s(60), t0 + life);
    Upstream {
        chain: vec![cert.der().clone()],
        key: PrivatePkcs8KeyDer::from(key.serialize_der()),
    }
}

#[tokio::test]
async fn an_expired_root_signs_nothing_and_makes_no_expired_signer() {
    let dir = tempfile::tempdir().unwrap();
    let store =
        SqliteStore::open(dir.path(), Kek::from_bytes(&[9u8; 32]).unwrap().audit_key()).unwrap();
    let t0 = SystemTime::now();
    let auth = load(&store, t0, Some(upstream(t0, s(600)))).await;
    let key = KeyPair::generate().unwrap();
    let id = SpiffeId::new("spiffe://example.org/web").unwrap();
    for t in (0..590).step_by(10) {
        let _ = auth.rotate(&store, t0 + s(t)).await;
    }
    // Just before the end: the leaf is capped, and still valid when made.
    let issued = auth.sign(&id, &key, &[], s(3600), t0 + s(590)).unwrap();
    assert!(issued.not_after > t0 + s(590));

    let after = t0 + s(601);
    let err = auth.sign(&id, &key, &[], s(3600), after).err().unwrap();
    let api = ApiError::from(err);
    assert_eq!((api.status, api.code), (503, "ca_root_expired"), "{api:?}");

    // Rotation past the root's end makes nothing (it would be born expired).
    let before = store.ca_keys().await.unwrap().len();
    for t in [after, after + s(5), after + s(10)] {
        assert!(auth.rotate(&store, t).await.is_err());
    }
    let keys = store.ca_keys().await.unwrap();
    assert_eq!(
        keys.len(),
        before,
        "no intermediate made past the root's end"
    );
    assert!(keys.iter().all(|k| k.not_after > k.created_at));
    // And the upstream warning is up.
    auth.rollover(&store, after, Push::None).await.unwrap();
    let view = auth.rollover_view();
    assert!(view.upstream_expires_soon);
    assert!(
        view.warning
            .as_deref()
            .unwrap()
            .contains("upstream replace")
    );
}

#[tokio::test]
async fn an_expired_signer_signs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store =
        SqliteStore::open(dir.path(), Kek::from_bytes(&[9u8; 32]).unwrap().audit_key()).unwrap();
    let t0 = SystemTime::now();
    let auth = load(&store, t0, None).await;
    let key = KeyPair::generate().unwrap();
    let id = SpiffeId::new("spiffe://example.org/web").unwrap();
    // No rotation ran: the first signer (200 s) is over.
    let err = auth.sign(&id, &key, &[], s(60), t0 + s(201)).err().unwrap();
    let api = ApiError::from(err);
    assert_eq!((api.status, api.code), (503, "ca_signer_expired"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_whose_upstream_root_expired_answers_503_and_counts_it() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = SystemTime::now();
    let up = upstream(t0, s(8));
    let cert = dir.path().join("up.pem");
    let keyf = dir.path().join("up.key");
    std::fs::write(&cert, identity::pem::encode_certificates(&up.chain)).unwrap();
    let key = KeyPair::try_from(&up.key).unwrap();
    std::fs::write(&keyf, key.serialize_pem()).unwrap();
    let ca = common::start_ca(|c| {
        c.upstream_cert = Some(cert.clone());
        c.upstream_key = Some(keyf.clone());
    })
    .await;
    // Attest nodes until the upstream ends: before, 200 with a valid certificate; after, 503.
    let refused = eventually_async("a refusal after the root's end", s(60), async || {
        let token = ca.token("n").await;
        let (csr, _) = common::csr();
        // The CA's own certificate ends with its root too: this client does not check it, as
        // an operator's `curl -k` would not, to see what the CA hands out.
        let (status, v) = ca_api::client::Connection::open(&ca.addr, unverified())
            .await
            .unwrap()
            .post_json(
                "/v1/attest/join",
                &serde_json::json!({"token": token, "csr": csr}),
            )
            .await
            .unwrap();
        if status == 503 {
            return Some(v);
        }
        assert_eq!(status, 200, "{v}");
        assert!(
            v["expires_at"].as_i64().unwrap() > ca::authority::unix(SystemTime::now()) - 2,
            "never an expired certificate: {v}"
        );
        None
    })
    .await;
    assert_eq!(refused["code"], "ca_root_expired", "{refused}");
    let metrics = ca.metrics().await;
    assert!(
        metrics.contains("kith_ca_refused_total{reason=\"ca_root_expired\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("kith_ca_upstream_expiring 1"), "{metrics}");
    ca.stop().await;
}

#[derive(Debug)]
struct AnyServer;

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        identity::tls::provider_with(identity::tls::Kx::Wide)
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn unverified() -> Arc<rustls::ClientConfig> {
    let mut c = rustls::ClientConfig::builder_with_provider(identity::tls::provider_with(
        identity::tls::Kx::Wide,
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(AnyServer))
    .with_no_client_auth();
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_status_and_rotate_through_the_admin_socket() {
    use hyper::Method;
    use serde_json::json;
    let ca = common::start_ca(|_| {}).await;
    let v = ca.admin.call(Method::GET, "/roots", None).await.unwrap();
    assert_eq!(v["mode"], "self", "{v}");
    assert_eq!(v["roots"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["roots"][0]["phase"], "active", "{v}");
    assert!(v["time_to_outage_seconds"].as_i64().unwrap() > 0, "{v}");
    assert!(v["waiting"].is_null(), "{v}");

    let v = ca
        .admin
        .call(Method::POST, "/roots/rotate", Some(json!({})))
        .await
        .unwrap();
    assert_eq!(v["outcome"], "published", "{v}");
    let phases: Vec<&str> = v["roots"]["roots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["phase"].as_str().unwrap())
        .collect();
    let mut phases = phases;
    phases.sort();
    assert_eq!(phases, vec!["active", "published"], "{v}");
    assert_eq!(
        v["roots"]["waiting"]["waiting_for"], "propagation",
        "the switch waits: {v}"
    );
    assert_eq!(ca.bundle().x509_authorities().len(), 2);
    // The maintenance loop (every 5 s) shows the wait in the metrics.
    let m = eventually_async("the wait in the metrics", s(20), async || {
        let m = ca.metrics().await;
        if m.contains("kith_ca_root_rollover_waiting 1") && m.contains("kith_ca_bundle_roots 2") {
            Ok(m)
        } else {
            Err(m)
        }
    })
    .await;
    assert!(m.contains("kith_ca_time_to_outage_seconds "), "{m}");

    let v = ca
        .admin
        .call(Method::POST, "/roots/rotate", Some(json!({"now": true})))
        .await
        .unwrap();
    assert_eq!(
        (&v["outcome"], &v["forced"]),
        (&json!("switched"), &json!(true)),
        "{v}"
    );
    let phases: Vec<&str> = v["roots"]["roots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["phase"].as_str().unwrap())
        .collect();
    let mut phases = phases;
    phases.sort();
    assert_eq!(phases, vec!["active", "retiring"], "{v}");
    // A node attested now chains to the new root, and the CA answers with the new serving
    // certificate once the maintenance loop has run.
    let new_root = ca
        .running
        .ca
        .authority
        .rollover_view()
        .roots
        .iter()
        .find(|r| r.phase == ca::rollover::Phase::Active)
        .unwrap()
        .sha256
        .clone();
    let node = ca.node("after-switch").await;
    let root_of = |chain: &[CertificateDer<'static>]| {
        ca.bundle()
            .x509_authorities()
            .iter()
            .find(|r| {
                let only = TrustBundle::from_roots(td(), vec![(*r).clone()]).unwrap();
                verify_x509_svid(chain, &only, SystemTime::now()).is_ok()
            })
            .map(hex_sha)
    };
    assert_eq!(root_of(&node.chain), Some(new_root));
    let status = ca.admin.call(Method::GET, "/status", None).await.unwrap();
    assert!(status["rollover"]["roots"].is_array(), "{status}");
    ca.stop().await;
}

#[tokio::test]
async fn an_upstream_replacement_overlaps_then_signs_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let store =
        SqliteStore::open(dir.path(), Kek::from_bytes(&[9u8; 32]).unwrap().audit_key()).unwrap();
    let t0 = SystemTime::now();
    let old = upstream(t0, s(600));
    let old_root = old.chain[0].clone();
    let flags = || Upstream {
        chain: old.chain.clone(),
        key: old.key.clone_key(),
    };
    let auth = load(&store, t0, Some(flags())).await;
    assert_eq!(roots(&auth), vec![old_root.clone()]);

    // A replacement that ends no later is refused with a reason.
    let short = upstream(t0, s(500));
    let err = auth
        .replace_upstream(&store, short, t0 + s(1))
        .await
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("no later than the current one"),
        "{err}"
    );

    let new = upstream(t0, s(5000));
    let new_root = new.chain[0].clone();
    auth.replace_upstream(&store, new, t0 + s(10))
        .await
        .unwrap();
    assert_eq!(roots(&auth), vec![old_root.clone(), new_root.clone()]);
    assert_eq!(
        tick(&auth, &store, t0 + s(20), Push::None).await,
        RolloverOutcome::Waiting
    );
    let phases: Vec<_> = auth
        .rollover_view()
        .roots
        .iter()
        .map(|r| r.phase.clone())
        .collect();
    assert_eq!(
        phases,
        vec![ca::rollover::Phase::Active, ca::rollover::Phase::Published]
    );
    assert_eq!(
        leaf_chains_to(&auth, t0 + s(21), &[old_root.clone(), new_root.clone()]),
        vec![true, false]
    );

    // A restart keeps the waiting replacement.
    drop(auth);
    let auth = load(&store, t0 + s(30), Some(flags())).await;
    assert_eq!(roots(&auth), vec![old_root.clone(), new_root.clone()]);

    // After the window (from the restart) and with the caller holding it: the switch.
    let node = "spiffe://example.org/kith/node/n1";
    auth.note_held_roots(node, Some(&[hex_sha(&old_root)]), t0 + s(300), t0 + s(100))
        .unwrap();
    assert_eq!(
        tick(&auth, &store, t0 + s(131), Push::None).await,
        RolloverOutcome::Waiting
    );
    assert!(matches!(
        &auth.rollover_view().waiting,
        Some(Wait::Callers { callers, .. }) if callers == &vec![node.to_string()]
    ));
    auth.note_held_roots(node, Some(&[hex_sha(&new_root)]), t0 + s(300), t0 + s(131))
        .unwrap();
    assert!(matches!(
        tick(&auth, &store, t0 + s(131), Push::None).await,
        RolloverOutcome::Switched { forced: false, .. }
    ));
    assert_eq!(
        leaf_chains_to(&auth, t0 + s(132), &[old_root.clone(), new_root.clone()]),
        vec![false, true]
    );
    assert_eq!(
        roots(&auth).len(),
        2,
        "the old anchor stays while its leaves live"
    );

    // Restart with the old flag files: the stored replacement signs, the old anchor retires.
    drop(auth);
    let auth = load(&store, t0 + s(140), Some(flags())).await;
    assert_eq!(
        leaf_chains_to(&auth, t0 + s(141), &[old_root.clone(), new_root.clone()]),
        vec![false, true]
    );
    assert_eq!(roots(&auth).len(), 2);
    assert_eq!(
        tick(&auth, &store, t0 + s(240), Push::None).await,
        RolloverOutcome::BundleChanged
    );
    assert_eq!(roots(&auth), vec![new_root.clone()]);
    let actions = audit_actions(&store).await;
    for phase in [
        "upstream.published",
        "upstream.activated",
        "upstream.retired",
    ] {
        assert!(actions.iter().any(|a| a == phase), "{phase}: {actions:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_replace_through_the_admin_socket() {
    use hyper::Method;
    use serde_json::json;
    let dir = tempfile::tempdir().unwrap();
    let t0 = SystemTime::now();
    let up = upstream(t0, s(86_400));
    let cert = dir.path().join("up.pem");
    let keyf = dir.path().join("up.key");
    std::fs::write(&cert, identity::pem::encode_certificates(&up.chain)).unwrap();
    std::fs::write(&keyf, KeyPair::try_from(&up.key).unwrap().serialize_pem()).unwrap();
    let ca = common::start_ca(|c| {
        c.upstream_cert = Some(cert.clone());
        c.upstream_key = Some(keyf.clone());
    })
    .await;
    let v = ca.admin.call(Method::GET, "/roots", None).await.unwrap();
    assert_eq!(v["mode"], "upstream", "{v}");
    let err = ca
        .admin
        .call(Method::POST, "/roots/rotate", Some(json!({})))
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("upstream replace"), "{err}");
    let bad = ca
        .admin
        .call(
            Method::POST,
            "/upstream/replace",
            Some(json!({"cert_pem": "not pem", "key_pem": "x"})),
        )
        .await
        .err()
        .unwrap();
    assert!(bad.to_string().contains("bad_upstream"), "{bad}");

    let new = upstream(t0, s(10 * 86_400));
    let key_pem = KeyPair::try_from(&new.key).unwrap().serialize_pem();
    let v = ca
        .admin
        .call(
            Method::POST,
            "/upstream/replace",
            Some(json!({"cert_pem": identity::pem::encode_certificates(&new.chain), "key_pem": key_pem})),
        )
        .await
        .unwrap();
    assert_eq!(v["outcome"], "published", "{v}");
    assert_eq!(v["roots"]["roots"][1]["phase"], "published", "{v}");
    assert_eq!(ca.bundle().x509_authorities().len(), 2);
    let v = ca
        .admin
        .call(Method::POST, "/roots/rotate", Some(json!({"now": true})))
        .await
        .unwrap();
    assert_eq!(
        (&v["outcome"], &v["forced"]),
        (&json!("switched"), &json!(true)),
        "{v}"
    );
    let node = ca.node("after-replace").await;
    let only_new = TrustBundle::from_roots(td(), vec![new.chain[0].clone()]).unwrap();
    verify_x509_svid(&node.chain, &only_new, SystemTime::now()).unwrap();
    ca.stop().await;
}
