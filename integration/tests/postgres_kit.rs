//! The PostgreSQL test kit itself: a throwaway cluster starts, takes SQL over TCP and the
//! socket, survives a stop and restart with its data, and is gone after drop.
#![allow(clippy::unwrap_used)]

use std::net::TcpStream;

use integration::postgres::Postgres;

#[test]
fn cluster_starts_keeps_data_across_restart_and_is_removed_on_drop() {
    let Some(pg) = Postgres::start_if_available("cluster_starts_keeps_data_across_restart") else {
        return;
    };
    let url = pg.create_db("kit_test");
    assert!(url.contains(&format!(":{}/kit_test", pg.port())), "{url}");
    assert!(TcpStream::connect(pg.host_port()).is_ok());
    pg.psql(
        "kit_test",
        "CREATE TABLE t (v int); INSERT INTO t VALUES (41), (1)",
    );
    assert_eq!(pg.psql("kit_test", "SELECT sum(v) FROM t").trim(), "42");

    pg.stop();
    assert!(!pg.is_ready());
    assert!(!pg.try_psql("kit_test", "SELECT 1").status.success());
    pg.restart();
    assert!(pg.is_ready());
    assert_eq!(pg.psql("kit_test", "SELECT sum(v) FROM t").trim(), "42");

    let data = pg.data_dir();
    assert!(data.join("PG_VERSION").exists());
    drop(pg);
    assert!(!data.exists(), "{} left behind", data.display());
}
