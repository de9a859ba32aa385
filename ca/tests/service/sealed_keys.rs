//! A CA key's validity comes from its sealed certificate, not from the database's columns, and
//! the seal binds the certificate's hash: whoever can write the database cannot stretch a
//! signer's life or pair a key with another certificate.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, SystemTime};

use ca::authority::{Authority, AuthorityError, Lifetimes, binding, cert_validity, unix};
use ca::seal::Kek;
use ca::store::sqlite::SqliteStore;
use ca::store::{CaKeyRecord, KeyKind, Store};
use identity::{SpiffeId, TrustDomain};
use rcgen::KeyPair;

fn kek() -> Kek {
    Kek::from_bytes(&[5u8; 32]).unwrap()
}

async fn load(store: &SqliteStore, now: SystemTime) -> Result<Authority, AuthorityError> {
    Authority::load_or_init(
        store,
        kek(),
        TrustDomain::new("example.org").unwrap(),
        Lifetimes {
            root: Duration::from_secs(86_400),
            intermediate: Duration::from_secs(3600),
            ..Lifetimes::default()
        },
        None,
        now,
    )
    .await
}

async fn record(store: &SqliteStore, kind: KeyKind) -> CaKeyRecord {
    store
        .ca_keys()
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.kind == kind)
        .unwrap()
}

fn sql(dir: &Path, statement: &str, params: impl rusqlite::Params) {
    let raw = rusqlite::Connection::open(dir.join("kith-ca.db")).unwrap();
    raw.execute(statement, params).unwrap();
}

#[tokio::test]
async fn stretched_validity_columns_are_ignored_for_the_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path(), kek().audit_key()).unwrap();
    let now = SystemTime::now();
    let first = load(&store, now).await.unwrap();
    let signer_id = first.keys().active.id.clone();
    drop(first);
    let int = record(&store, KeyKind::Intermediate).await;
    let (_, cert_not_after) = cert_validity(int.cert_der.as_ref().unwrap()).unwrap();

    // Someone with write access to the database gives every CA key ten more years.
    sql(
        dir.path(),
        "UPDATE ca_keys SET not_after = not_after + 315360000 WHERE cert_der IS NOT NULL",
        [],
    );
    let auth = load(&store, now).await.unwrap();
    let keys = auth.keys();
    assert_eq!(keys.active.id, signer_id);
    assert_eq!(unix(keys.active.not_after), cert_not_after);
    // A leaf asking for a long life is still capped by the signer's real NotAfter.
    let id = SpiffeId::new("spiffe://example.org/web").unwrap();
    let leaf = auth
        .sign(
            &id,
            &KeyPair::generate().unwrap(),
            &[],
            Duration::from_secs(100 * 86_400),
            now,
        )
        .unwrap();
    assert!(unix(leaf.not_after) <= cert_not_after);

    // Past the certificate's NotAfter the signer is gone, whatever the column says: a CA that
    // starts then makes a fresh one rather than signing with an expired certificate.
    let later = now + Duration::from_secs(2 * 3600);
    let auth = load(&store, later).await.unwrap();
    assert_ne!(auth.keys().active.id, signer_id);
    assert!(auth.keys().active.not_after > later);
}

#[tokio::test]
async fn a_key_paired_with_another_certificate_does_not_unseal() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path(), kek().audit_key()).unwrap();
    let now = SystemTime::now();
    let auth = load(&store, now).await.unwrap();
    // A second intermediate, so there is another valid certificate to swap in.
    auth.rotate(&store, now + Duration::from_secs(1801))
        .await
        .unwrap();
    drop(auth);
    let ints: Vec<CaKeyRecord> = store
        .ca_keys()
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.kind == KeyKind::Intermediate)
        .collect();
    assert_eq!(ints.len(), 2);
    sql(
        dir.path(),
        "UPDATE ca_keys SET cert_der = ?1 WHERE id = ?2",
        rusqlite::params![ints[1].cert_der, ints[0].id],
    );
    let err = load(&store, now).await.err().unwrap();
    assert!(
        matches!(&err, AuthorityError::Binding { id, .. } if *id == ints[0].id),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("does not match its database record"),
        "{err}"
    );
}

#[tokio::test]
async fn a_moved_activation_or_a_stretched_jwt_key_does_not_unseal() {
    for statement in [
        "UPDATE ca_keys SET activate_at = activate_at - 1 WHERE kind = 'intermediate'",
        "UPDATE ca_keys SET not_after = not_after + 86400 WHERE kind = 'jwt'",
    ] {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path(), kek().audit_key()).unwrap();
        let now = SystemTime::now();
        drop(load(&store, now).await.unwrap());
        sql(dir.path(), statement, []);
        let err = load(&store, now).await.err().unwrap();
        assert!(
            matches!(err, AuthorityError::Binding { .. }),
            "{statement}: {err}"
        );
    }
}

#[tokio::test]
async fn a_key_sealed_by_an_older_kith_is_sealed_again_with_its_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path(), kek().audit_key()).unwrap();
    let now = SystemTime::now();
    drop(load(&store, now).await.unwrap());
    // Re-create what an older kith stored: format 1, bound to kind and id only.
    let int = record(&store, KeyKind::Intermediate).await;
    let der = kek().unseal(&binding(&int), &int.sealed_key).unwrap();
    let mut old = kek()
        .seal(&format!("kith-ca:Intermediate:{}", int.id), &der)
        .unwrap();
    old[0] = 1;
    sql(
        dir.path(),
        "UPDATE ca_keys SET sealed_key = ?1 WHERE id = ?2",
        rusqlite::params![old, int.id],
    );
    let auth = load(&store, now).await.unwrap();
    assert_eq!(auth.keys().active.id, int.id);
    let resealed = record(&store, KeyKind::Intermediate).await;
    assert_eq!(resealed.sealed_key[0], 2);
    assert_eq!(
        kek()
            .unseal(&binding(&resealed), &resealed.sealed_key)
            .unwrap(),
        der
    );
    let rows = store.audit(0, 100).await.unwrap();
    assert!(
        rows.iter()
            .any(|r| r.event.action == "key.reseal" && r.event.subject == int.id)
    );
    assert_eq!(store.verify_audit(None).await.unwrap().first_broken, None);

    // The old blob put back (it binds no certificate, so it could be paired with any): refused.
    sql(
        dir.path(),
        "UPDATE ca_keys SET sealed_key = ?1 WHERE id = ?2",
        rusqlite::params![old, int.id],
    );
    let err = load(&store, now).await.err().unwrap();
    assert!(
        matches!(&err, AuthorityError::OldSealRestored { id } if *id == int.id),
        "{err}"
    );
}
