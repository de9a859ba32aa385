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
    let v = ca::store::Store::verify_audit(&store, None).unwrap();
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
