//! Throwaway PostgreSQL clusters for tests: `initdb` into a temporary directory, `pg_ctl start`
//! on a free loopback port with the socket in that directory, stopped and removed on drop (also
//! when the test panics).
//!
//! PostgreSQL refuses to run as root, so as root the server tools run as the `postgres` user
//! (`runuser -u postgres`), which owns the cluster directory; as any other user they run as that
//! user. The server binaries are Debian's (`/usr/lib/postgresql/<major>/bin`, the newest major
//! installed) or `KITH_PG_BIN`.
//!
//! [`Postgres::available`] says whether a cluster can be started here and prints why not;
//! under `CI=true` (where `.ci/run` installs `postgresql`) a missing server fails instead, so a
//! PostgreSQL test never passes silently.
//!
//! ```no_run
//! let Some(pg) = integration::postgres::Postgres::start_if_available("my_test") else { return };
//! let url = pg.create_db("kith"); // postgres://postgres@127.0.0.1:PORT/kith?sslmode=disable
//! pg.stop();                      // the database goes away (outage tests)
//! pg.restart();                   // and comes back on the same port
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

static CLUSTERS: AtomicU32 = AtomicU32::new(0);

/// How to start a cluster: extra server settings (`-c name=value`) and TLS.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Server settings, e.g. `("fsync", "on")`, `("max_connections", "200")`.
    pub settings: Vec<(String, String)>,
    /// A server certificate chain and key (PEM): the cluster then takes TLS (`ssl=on`) and
    /// answers TCP clients only over TLS (`hostssl` in `pg_hba.conf`).
    pub tls: Option<(String, String)>,
    /// Keep durable commits (fsync). Off by default: tests need no crash safety of their
    /// throwaway cluster, and fsync on a shared disk makes them slow. Benchmarks turn it on.
    pub durable: bool,
}

/// A running throwaway cluster, stopped and deleted on drop.
pub struct Postgres {
    dir: tempfile::TempDir,
    port: u16,
    bin: PathBuf,
    options: Options,
}

impl Postgres {
    /// The directory of the server binaries (`initdb`, `pg_ctl`, `psql`, `pg_basebackup`…), if
    /// a server is installed.
    pub fn bin_dir() -> Option<PathBuf> {
        if let Ok(p) = std::env::var("KITH_PG_BIN") {
            let p = PathBuf::from(p);
            return p.join("initdb").exists().then_some(p);
        }
        let mut majors: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .flatten()
            .filter_map(|e| {
                let major = e.file_name().to_str()?.parse::<u32>().ok()?;
                let bin = e.path().join("bin");
                bin.join("initdb").exists().then_some((major, bin))
            })
            .collect();
        majors.sort();
        majors.pop().map(|(_, bin)| bin)
    }

    /// Whether a cluster can be started here; prints why not, and panics under `CI=true`.
    pub fn available(test: &str) -> bool {
        let why = if Self::bin_dir().is_none() {
            "PostgreSQL's server (initdb, pg_ctl) is not installed (apt-get install postgresql)"
        } else if is_root() && !user_exists("postgres") {
            "running as root and there is no `postgres` user to run the server as"
        } else if is_root() && !Path::new("/usr/sbin/runuser").exists() && !tool_works("runuser") {
            "running as root and `runuser` (util-linux) is missing"
        } else {
            return true;
        };
        crate::skip::skip(test, why);
        false
    }

    /// `start` when [`available`](Self::available), else None (after printing why).
    pub fn start_if_available(test: &str) -> Option<Postgres> {
        Self::available(test).then(Self::start)
    }

    /// A cluster with default options (trust authentication on loopback, no TLS, no fsync).
    pub fn start() -> Postgres {
        Self::start_with(Options::default())
    }

    pub fn start_with(options: Options) -> Postgres {
        let bin = Self::bin_dir().expect("PostgreSQL is not installed (check `available` first)");
        let n = CLUSTERS.fetch_add(1, Ordering::Relaxed);
        let dir = tempfile::Builder::new()
            .prefix(&format!("kith-pg{}x{n}-", std::process::id()))
            .tempdir()
            .unwrap();
        let pg = Postgres {
            dir,
            port: 0,
            bin,
            options,
        };
        pg.give_to_server_user(pg.dir.path());
        let data = pg.data_dir();
        pg.server_tool(&[
            "initdb",
            "-D",
            data.to_str().unwrap(),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-sync",
        ]);
        if let Some((cert, key)) = &pg.options.tls {
            std::fs::write(data.join("server.crt"), cert).unwrap();
            std::fs::write(data.join("server.key"), key).unwrap();
            // The server refuses a key file others can read.
            pg.give_to_server_user(&data.join("server.crt"));
            pg.give_to_server_user(&data.join("server.key"));
            set_mode(&data.join("server.key"), 0o600);
            // Over TCP only TLS; the Unix socket (for psql in tests) stays plain.
            std::fs::write(
                data.join("pg_hba.conf"),
                "local all all trust\nhostssl all all 127.0.0.1/32 trust\n\
                 hostssl replication all 127.0.0.1/32 trust\n",
            )
            .unwrap();
        } else {
            std::fs::write(
                data.join("pg_hba.conf"),
                "local all all trust\nhost all all 127.0.0.1/32 trust\n\
                 host replication all 127.0.0.1/32 trust\n",
            )
            .unwrap();
        }
        pg.give_to_server_user(&data.join("pg_hba.conf"));
        let mut pg = pg;
        pg.port = free_port();
        pg.launch();
        pg
    }

    /// A streaming standby of `primary`: `pg_basebackup -R` (it follows the primary over the
    /// replication connection), started on its own port with the primary's options. Make it
    /// synchronous with `primary.psql("postgres", "ALTER SYSTEM SET synchronous_standby_names
    /// = '*'")` and `SELECT pg_reload_conf()` (a commit then returns once the standby flushed
    /// it; `SET synchronous_commit = remote_apply` also waits until reads there see it);
    /// [`promote`](Self::promote) makes it a primary.
    pub fn standby_of(primary: &Postgres) -> Postgres {
        let n = CLUSTERS.fetch_add(1, Ordering::Relaxed);
        let dir = tempfile::Builder::new()
            .prefix(&format!("kith-pg{}x{n}-", std::process::id()))
            .tempdir()
            .unwrap();
        let mut pg = Postgres {
            dir,
            port: 0,
            bin: primary.bin.clone(),
            options: primary.options.clone(),
        };
        pg.give_to_server_user(pg.dir.path());
        let data = pg.data_dir();
        let port = primary.port.to_string();
        pg.server_tool(&[
            "pg_basebackup",
            "-D",
            data.to_str().unwrap(),
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
            "-X",
            "stream",
            "-R",
            "--no-sync",
            // An immediate checkpoint: the default spread one can take minutes.
            "-c",
            "fast",
        ]);
        pg.port = free_port();
        pg.launch();
        pg
    }

    /// Promotes a standby to primary and waits until it takes writes.
    pub fn promote(&self) {
        let data = self.data_dir();
        self.server_tool(&["pg_ctl", "-D", data.to_str().unwrap(), "-w", "promote"]);
    }

    /// Whether the server is a standby (in recovery).
    pub fn is_standby(&self) -> bool {
        self.psql("postgres", "SELECT pg_is_in_recovery()").trim() == "t"
    }

    /// The cluster's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The directory the server's Unix socket is in (and its log).
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `host:port` of the server's TCP listener.
    pub fn host_port(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The connection string of database `db` as the `postgres` superuser over TCP
    /// (`sslmode=require` when the cluster has TLS, else `disable`).
    pub fn url_for(&self, db: &str) -> String {
        let ssl = if self.options.tls.is_some() {
            "require"
        } else {
            "disable"
        };
        format!(
            "postgres://postgres@127.0.0.1:{}/{db}?sslmode={ssl}",
            self.port
        )
    }

    /// The `postgres` database's connection string.
    pub fn url(&self) -> String {
        self.url_for("postgres")
    }

    /// Creates database `name` (a plain identifier) and returns its connection string.
    pub fn create_db(&self, name: &str) -> String {
        assert!(
            !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
            "{name:?}: use lowercase letters, digits and _"
        );
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
        self.url_for(name)
    }

    /// Runs SQL in database `db` through `psql` on the Unix socket; its output, unaligned and
    /// without headers (`-At`: one row a line, columns separated by `|`). Panics on an error.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = self.try_psql(db, sql);
        assert!(
            out.status.success(),
            "psql {sql:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `psql` without the panic (the server may be down on purpose).
    pub fn try_psql(&self, db: &str, sql: &str) -> Output {
        Command::new(self.bin.join("psql"))
            .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-U", "postgres"])
            .arg("-h")
            .arg(self.socket_dir())
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-d", db, "-c", sql])
            .output()
            .unwrap_or_else(|e| panic!("cannot run psql: {e}"))
    }

    /// Stops the server (fast shutdown: clients are disconnected). The data stays.
    pub fn stop(&self) {
        let data = self.data_dir();
        self.server_tool(&[
            "pg_ctl",
            "-D",
            data.to_str().unwrap(),
            "-m",
            "fast",
            "-w",
            "stop",
        ]);
    }

    /// Starts the stopped server again on the same port.
    pub fn restart(&self) {
        self.launch();
    }

    /// Whether the server answers on its port.
    pub fn is_ready(&self) -> bool {
        Command::new(self.bin.join("pg_isready"))
            .arg("-h")
            .arg(self.socket_dir())
            .args(["-p", &self.port.to_string(), "-t", "1"])
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// The server's log (startup errors, slow statements…).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Runs one of the server's tools (`pg_ctl`, `pg_basebackup`, …) as the user that owns the
    /// cluster; panics with its output if it fails.
    pub fn server_tool(&self, args: &[&str]) -> String {
        let out = self.try_server_tool(args);
        assert!(
            out.status.success(),
            "{args:?} failed: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn try_server_tool(&self, args: &[&str]) -> Output {
        let tool = self.bin.join(args[0]);
        let mut cmd = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&tool);
            c
        } else {
            Command::new(&tool)
        };
        cmd.args(&args[1..])
            // The tools' working directory must be readable by the server user.
            .current_dir(self.dir.path())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", tool.display()))
    }

    /// Makes `path` (a file or directory of this cluster) belong to the server user.
    pub fn give_to_server_user(&self, path: &Path) {
        if is_root() {
            let out = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(path)
                .output()
                .expect("chown");
            assert!(
                out.status.success(),
                "chown {}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    fn launch(&self) {
        let data = self.data_dir();
        let mut opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200",
            self.port,
            self.socket_dir().display()
        );
        if !self.options.durable {
            // synchronous_commit stays on: a synchronous standby (set in postgresql.auto.conf,
            // which a command-line setting would override) must hold every commit.
            opts.push_str(" -c fsync=off -c full_page_writes=off");
        }
        if self.options.tls.is_some() {
            opts.push_str(" -c ssl=on");
        }
        for (k, v) in &self.options.settings {
            opts.push_str(&format!(" -c {k}={v}"));
        }
        let log = self.dir.path().join("server.log");
        self.server_tool(&[
            "pg_ctl",
            "-D",
            data.to_str().unwrap(),
            "-l",
            log.to_str().unwrap(),
            "-o",
            &opts,
            "-w",
            "-t",
            "60",
            "start",
        ]);
        crate::eventually("PostgreSQL to come up", Duration::from_secs(30), || {
            self.is_ready()
                .then_some(())
                .ok_or_else(|| format!("its log:\n{}", self.log()))
        });
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.data_dir();
        let _ = self.try_server_tool(&[
            "pg_ctl",
            "-D",
            data.to_str().unwrap_or_default(),
            "-m",
            "immediate",
            "-w",
            "stop",
        ]);
        // The TempDir removes the cluster's files (root, or the same user, may).
    }
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn user_exists(name: &str) -> bool {
    nix::unistd::User::from_name(name).ok().flatten().is_some()
}

fn tool_works(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A loopback port free right now, outside the ephemeral range (see [`crate::ports`]).
pub fn free_port() -> u16 {
    crate::ports::free_loopback().port()
}
