//! The signing intermediate and the JWT key rotate by themselves: the next one is made at 1/2
//! of the active one's life and takes over at 5/6; a leaf never outlives its signer; the
//! schedule survives a restart. Time is passed in, not waited for.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, SystemTime};

use ca::authority::{Authority, Lifetimes, Rotation};
use ca::seal::Kek;
use ca::store::sqlite::SqliteStore;
use identity::{SpiffeId, TrustDomain, verify_x509_svid};
use rcgen::KeyPair;

const LIFE: Duration = Duration::from_secs(600);

fn kek() -> Kek {
    Kek::from_bytes(&[9u8; 32]).unwrap()
}

async fn load(store: &SqliteStore, now: SystemTime) -> Authority {
    let kek = kek();
    let lifetimes = Lifetimes {
        root: Duration::from_secs(86_400),
        intermediate: LIFE,
        ..Lifetimes::default()
    };
    Authority::load_or_init(
        store,
        kek,
        TrustDomain::new("example.org").unwrap(),
        lifetimes,
        None,
        now,
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn the_signer_rotates_on_schedule_and_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path(), kek().audit_key()).unwrap();
    let t0 = SystemTime::now();
    let auth = load(&store, t0).await;
    let first = auth.keys().active.id.clone();
    let first_jwt = auth.keys().jwt.signer.key_id().to_owned();
    let seq0 = auth.bundle().sequence().unwrap();

    assert_eq!(
        auth.rotate(&store, t0 + Duration::from_secs(200))
            .await
            .unwrap(),
        Rotation::Nothing
    );
    assert_eq!(
        auth.rotate(&store, t0 + Duration::from_secs(301))
            .await
            .unwrap(),
        Rotation::PrepareNext
    );
    let keys = auth.keys();
    assert_eq!(keys.active.id, first, "still signing with the first");
    let next = keys.next.as_ref().unwrap().id.clone();
    assert_eq!(
        auth.bundle().jwt_authorities().len(),
        2,
        "the next JWT key is published before use"
    );
    assert!(auth.bundle().sequence().unwrap() > seq0);

    // A restart between preparation and activation keeps both.
    drop(auth);
    let auth = load(&store, t0 + Duration::from_secs(400)).await;
    assert_eq!(auth.keys().active.id, first);
    assert_eq!(auth.keys().next.as_ref().unwrap().id, next);

    assert_eq!(
        auth.rotate(&store, t0 + Duration::from_secs(501))
            .await
            .unwrap(),
        Rotation::ActivateNext
    );
    assert_eq!(auth.keys().active.id, next);
    assert_ne!(auth.keys().jwt.signer.key_id(), first_jwt);
    // The old JWT key stays published until it expires (tokens it signed may be in flight).
    assert_eq!(auth.bundle().jwt_authorities().len(), 2);

    // A leaf from the new signer verifies with the same bundle, and a long TTL is capped at
    // the signer's NotAfter.
    let now = t0 + Duration::from_secs(502);
    let key = KeyPair::generate().unwrap();
    let id = SpiffeId::new("spiffe://example.org/web").unwrap();
    let issued = auth
        .sign(&id, &key, &[], Duration::from_secs(86_400), now)
        .unwrap();
    assert!(issued.not_after <= auth.keys().active.not_after);
    assert_eq!(
        verify_x509_svid(&issued.chain, &auth.bundle(), now).unwrap(),
        id
    );

    drop(auth);
    let auth = load(&store, t0 + Duration::from_secs(520)).await;
    assert_eq!(auth.keys().active.id, next, "activation survives a restart");
    let v = ca::store::Store::verify_audit(&store, None).await.unwrap();
    assert_eq!(v.first_broken, None);
}

#[tokio::test]
async fn a_ca_down_past_its_signer_makes_a_fresh_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path(), kek().audit_key()).unwrap();
    let t0 = SystemTime::now();
    let first = load(&store, t0).await.keys().active.id.clone();
    let later = t0 + LIFE + Duration::from_secs(60);
    let auth = load(&store, later).await;
    assert_ne!(auth.keys().active.id, first);
    assert!(auth.keys().active.not_after > later);
}

/// With the lab's short lifetimes (intermediate 60 s, SVIDs 20 s), every leaf signed on any
/// second, maintenance ticking every 5 s, verifies under the bundle of its issuance for its
/// whole NotBefore..NotAfter: no chain element expires before the leaf.
#[tokio::test]
async fn no_leaf_outlives_a_chain_element_with_short_lifetimes() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path(), kek().audit_key()).unwrap();
    let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let lifetimes = Lifetimes {
        root: Duration::from_secs(180),
        intermediate: Duration::from_secs(60),
        rollover: ca::rollover::Policy {
            rollover_at: 0.5,
            propagation: Duration::from_secs(20),
            max_leaf_ttl: Duration::from_secs(20),
        },
    };
    let auth = Authority::load_or_init(
        &store,
        kek(),
        TrustDomain::new("example.org").unwrap(),
        lifetimes,
        None,
        t0,
    )
    .await
    .unwrap();
    let id = SpiffeId::new("spiffe://example.org/web").unwrap();
    let key = KeyPair::generate().unwrap();
    for t in 0..170u64 {
        let now = t0 + Duration::from_secs(t);
        if t % 5 == 0 {
            auth.rotate(&store, now).await.unwrap();
            auth.rollover(&store, now, ca::authority::Push::None)
                .await
                .unwrap();
        }
        let issued = auth
            .sign(&id, &key, &[], Duration::from_secs(20), now)
            .unwrap();
        let bundle = auth.bundle();
        let mut at = now;
        while at < issued.not_after {
            if let Err(e) = verify_x509_svid(&issued.chain, &bundle, at) {
                panic!(
                    "leaf signed at t0+{t}s (not_after t0+{}s, signer {}) fails at t0+{}s: {e}",
                    issued.not_after.duration_since(t0).unwrap().as_secs(),
                    auth.keys().active.id,
                    at.duration_since(t0).unwrap().as_secs()
                );
            }
            at += Duration::from_secs(1);
        }
    }
}
