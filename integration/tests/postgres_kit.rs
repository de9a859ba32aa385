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

#[test]
fn a_synchronous_standby_follows_and_takes_writes_once_promoted() {
    let Some(primary) = Postgres::start_if_available("a_synchronous_standby_follows") else {
        return;
    };
    primary.create_db("kit_test");
    primary.psql("kit_test", "CREATE TABLE t (v int)");
    let standby = Postgres::standby_of(&primary);
    assert!(standby.is_standby());
    primary.psql(
        "postgres",
        "ALTER SYSTEM SET synchronous_standby_names = '*'",
    );
    primary.psql("postgres", "SELECT pg_reload_conf()");
    // A synchronous commit returns once the standby has it.
    primary.psql(
        "kit_test",
        "SET synchronous_commit = remote_apply; INSERT INTO t VALUES (7)",
    );
    assert_eq!(
        primary
            .psql("postgres", "SELECT sync_state FROM pg_stat_replication")
            .trim(),
        "sync"
    );
    assert_eq!(standby.psql("kit_test", "SELECT sum(v) FROM t").trim(), "7");
    assert!(
        !standby
            .try_psql("kit_test", "INSERT INTO t VALUES (1)")
            .status
            .success()
    );
    primary.stop();
    standby.promote();
    assert!(!standby.is_standby());
    standby.psql("kit_test", "INSERT INTO t VALUES (1)");
    assert_eq!(standby.psql("kit_test", "SELECT sum(v) FROM t").trim(), "8");
}
