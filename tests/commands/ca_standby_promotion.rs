//! A primary with a synchronous streaming standby (`pg_basebackup -R`,
//! `synchronous_standby_names`) under two `kith ca serve` replicas that reach it through one
//! multi-host connection string (`…@primary,standby/kith?target_session_attrs=read-write`).
//! A client renews a node SVID over and over, through both replicas with failover; midway the
//! primary stops and the standby is promoted (`pg_ctl promote`). The replicas find the new
//! primary by themselves, issuance resumes, and every certificate the CA acknowledged (each
//! serial the client received) is in the new primary.
//!
//! Needs PostgreSQL's server and a kith with `--store`; without them it prints `SKIPPED …` and
//! passes, under CI=true it fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::replicas::{admin_json, check_store, replica, store_available};
use ca_api::link as ca_link;
use ca_api::replicas::CaSet;
use ca_api::wire;
use hyper::Method;
use identity::{SpiffeId, TrustDomain};
use integration::eventually;
use integration::postgres::{Options, Postgres, free_port};

/// A streaming standby of `primary` in its own directory, stopped on drop.
struct Standby<'a> {
    primary: &'a Postgres,
    dir: tempfile::TempDir,
    port: u16,
}

impl<'a> Standby<'a> {
    fn start(primary: &'a Postgres) -> Self {
        let dir = tempfile::tempdir().unwrap();
        primary.give_to_server_user(dir.path());
        let port = free_port();
        let s = Self { primary, dir, port };
        let (host, pport) = primary
            .host_port()
            .split_once(':')
            .map(|(h, p)| (h.to_owned(), p.to_owned()))
            .unwrap();
        primary.server_tool(&[
            "pg_basebackup",
            "-h",
            &host,
            "-p",
            &pport,
            "-U",
            "postgres",
            "-D",
            s.data().to_str().unwrap(),
            "-R",
            "-X",
            "stream",
            // An immediate checkpoint, not a spread one: the backup starts at once.
            "-c",
            "fast",
        ]);
        // The walreceiver names itself after cluster_name: the primary waits for `standby1`.
        let opts = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200 -c cluster_name=standby1",
            s.dir.path().display()
        );
        let log = s.dir.path().join("server.log");
        primary.server_tool(&[
            "pg_ctl",
            "-D",
            s.data().to_str().unwrap(),
            "-l",
            log.to_str().unwrap(),
            "-o",
            &opts,
            "-w",
            "-t",
            "60",
            "start",
        ]);
        s
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn psql(&self, sql: &str) -> String {
        let bin = Postgres::bin_dir().unwrap();
        let out = Command::new(bin.join("psql"))
            .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-U", "postgres"])
            .arg("-h")
            .arg(self.dir.path())
            .args(["-p", &self.port.to_string(), "-d", "kith", "-c", sql])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "psql on the standby {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn promote(&self) {
        self.primary.server_tool(&[
            "pg_ctl",
            "-D",
            self.data().to_str().unwrap(),
            "-w",
            "promote",
        ]);
    }
}

impl Drop for Standby<'_> {
    fn drop(&mut self) {
        let _ = self.primary.try_server_tool(&[
            "pg_ctl",
            "-D",
            self.data().to_str().unwrap_or_default(),
            "-m",
            "immediate",
            "-w",
            "stop",
        ]);
    }
}

#[test]
fn every_acknowledged_issuance_survives_the_promotion_of_the_standby() {
    const TEST: &str = "every_acknowledged_issuance_survives_the_promotion_of_the_standby";
    if !Postgres::available(TEST) {
        return;
    }
    // Durable commits (synchronous_commit=on): a commit returns only once the standby has
    // flushed it.
    let primary = Postgres::start_with(Options {
        durable: true,
        ..Options::default()
    });
    primary.create_db("kith");
    let standby = Standby::start(&primary);
    // Synchronous only now: with a standby named but absent, every commit would wait.
    primary.psql(
        "postgres",
        "ALTER SYSTEM SET synchronous_standby_names = 'standby1'",
    );
    primary.psql("postgres", "SELECT pg_reload_conf()");
    eventually(
        "the standby to become synchronous",
        Duration::from_secs(30),
        || {
            let state = primary.psql("postgres", "SELECT sync_state FROM pg_stat_replication");
            if state.trim() == "sync" {
                Ok(())
            } else {
                Err(state)
            }
        },
    );
    // The database half of the proof runs even before kith has a PostgreSQL store.
    if !store_available(TEST) {
        return;
    }

    let store = format!(
        "postgres://postgres@{},127.0.0.1:{}/kith?sslmode=disable&target_session_attrs=read-write",
        primary.host_port(),
        standby.port
    );
    let dir = tempfile::tempdir().unwrap();
    let r1 = replica(dir.path(), "r1", &store, "10m");
    let r2 = replica(dir.path(), "r2", &store, "10m");
    let r1_data = dir.path().join("r1");
    let join = admin_json(&r1_data, &["token", "create", "--name", "renewer"]);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let cas = CaSet::new(&[
        format!("https://{}", r1.addr),
        format!("https://{}", r2.addr),
    ])
    .unwrap()
    .with_attempt_timeout(Duration::from_secs(5));
    let (acked, before, after) = rt.block_on(renew_through_promotion(
        &cas,
        join["token"].as_str().unwrap(),
        join["bundle_sha256"].as_str().unwrap(),
        || {
            primary.stop();
            standby.promote();
        },
    ));
    eprintln!(
        "{} acknowledged issuances: {before} before the promotion, {after} after",
        acked.len()
    );
    assert!(before >= 20, "issuance ran before the promotion: {before}");
    assert!(after >= 20, "issuance resumed on the new primary: {after}");

    let stored: BTreeSet<String> = standby
        .psql("SELECT encode(serial, 'hex') FROM certificates")
        .lines()
        .map(|s| normalize(s.trim()))
        .collect();
    let missing: Vec<&String> = acked.iter().filter(|s| !stored.contains(*s)).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged certificates are not in the new primary: {missing:?}",
        missing.len()
    );
    check_store(|sql| standby.psql(sql), &r1_data);
    drop((r1, r2));
}

/// Attests once with the token, then renews the node SVID in a loop through `cas` for 10 s,
/// runs `failover`, and goes on for 20 s more. Returns the serial of every certificate received
/// (hex, without leading zero bytes) and how many came before and after `failover`.
async fn renew_through_promotion(
    cas: &CaSet,
    token: &str,
    pin: &str,
    failover: impl FnOnce(),
) -> (BTreeSet<String>, usize, usize) {
    let td = TrustDomain::new("example.org").unwrap();
    let bundle = ca_link::first_contact(cas, pin).await.unwrap();
    let (key, csr) = ca_link::new_key_and_csr().unwrap();
    let answer = ca_link::attest_join(cas, Arc::new(bundle.clone()), token, &csr)
        .await
        .unwrap();
    let id = SpiffeId::new(&answer.spiffe_id).unwrap();
    let mut bundle = ca_link::bundle_of(&answer.bundle, &td).unwrap();
    let mut node = ca_link::validate(&answer, &key, &bundle, &id, SystemTime::now()).unwrap();
    let mut acked = BTreeSet::new();
    acked.insert(serial_of(&answer.svid));

    let mut failover = Some(failover);
    let (mut before, mut after) = (0, 0);
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        if failover.is_some() && started.elapsed() > Duration::from_secs(10) {
            (failover.take().unwrap())();
        }
        let (key, csr) = ca_link::new_key_and_csr().unwrap();
        let result = ca_link::call(
            cas,
            Arc::new(bundle.clone()),
            &node,
            Method::POST,
            wire::path::RENEW,
            Some(
                ca_link::body(&wire::RenewRequest {
                    csr,
                    held_roots: None,
                })
                .unwrap(),
            ),
            &[],
        )
        .await;
        // While the database fails over a renewal may fail; what matters is what was
        // acknowledged.
        let Ok((200, _, body)) = result else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let answer = ca_link::answer(200, &body).unwrap();
        acked.insert(serial_of(&answer.svid));
        bundle = ca_link::bundle_of(&answer.bundle, &td).unwrap();
        node = ca_link::validate(&answer, &key, &bundle, &id, SystemTime::now()).unwrap();
        if failover.is_some() {
            before += 1;
        } else {
            after += 1;
        }
    }
    (acked, before, after)
}

fn serial_of(chain_pem: &str) -> String {
    let der = identity::pem::certificates(chain_pem.as_bytes()).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der[0]).unwrap();
    let hex: String = cert
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    normalize(&hex)
}

/// Serials as hex without leading zero bytes (DER adds one when the top bit is set).
fn normalize(hex: &str) -> String {
    let mut s = hex;
    while s.len() > 2 && s.starts_with("00") {
        s = &s[2..];
    }
    s.to_owned()
}
