//! TLS to PostgreSQL (rustls with ring): `sslmode=verify-full` with `sslrootcert` checks the
//! server's certificate and name, a certificate from another CA is refused, `require` without a
//! root still encrypts, and a server that takes only TLS refuses `sslmode=disable`.
#![allow(clippy::unwrap_used)]

use ca::store::postgres::PgStore;
use ca::store::{AuditEvent, AuditKey, Store, Write};
use integration::pki::TlsCa;
use integration::postgres::{Options, Postgres};

/// The database server's certificate for 127.0.0.1 from `ca`, and its key (PEM).
fn server_cert(ca: &TlsCa) -> (String, String) {
    let (cert, key) = ca.server(&["127.0.0.1"]);
    (cert.pem(), key.serialize_pem())
}

fn event() -> AuditEvent {
    AuditEvent {
        at: 1000,
        action: "probe".into(),
        subject: "tls".into(),
        outcome: "ok".into(),
        detail: serde_json::json!({}),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_is_reached_over_verified_tls_only() {
    if !Postgres::available("the_database_is_reached_over_verified_tls_only") {
        return;
    }
    let db_ca = TlsCa::new("db ca");
    let root_pem = db_ca.cert.pem();
    let other_root = TlsCa::new("someone else").cert.pem();
    let pg = Postgres::start_with(Options {
        tls: Some(server_cert(&db_ca)),
        ..Options::default()
    });
    pg.create_db("kith");
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root.pem");
    std::fs::write(&root, &root_pem).unwrap();
    let other = dir.path().join("other.pem");
    std::fs::write(&other, &other_root).unwrap();
    let base = format!("postgres://postgres@127.0.0.1:{}/kith", pg.port());
    let key = AuditKey::derive(&[7u8; 32]);

    let url = format!("{base}?sslmode=verify-full&sslrootcert={}", root.display());
    let store = PgStore::open(&url, key.clone(), "r0").await.unwrap();
    store.write(Write::Audit(event())).await.unwrap();
    let ssl = pg.psql(
        "kith",
        "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid)
         WHERE ssl AND application_name = 'kith-ca'",
    );
    assert_ne!(ssl.trim(), "0", "the store's connections use TLS");

    let wrong = format!("{base}?sslmode=verify-full&sslrootcert={}", other.display());
    let err = PgStore::open(&wrong, key.clone(), "r1")
        .await
        .err()
        .unwrap();
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "a server certificate from another CA is refused: {err}"
    );

    let err = PgStore::open(&format!("{base}?sslmode=disable"), key.clone(), "r2")
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("reach"), "{err}");

    // Encrypted without authenticating the server (a warning in the log): still works.
    let store = PgStore::open(&format!("{base}?sslmode=require"), key, "r3")
        .await
        .unwrap();
    assert_eq!(store.verify_audit(None).await.unwrap().first_broken, None);
}
