//! Shared by the CA replica proofs (`ca_replicas_survive_failures.rs`,
//! `ca_standby_promotion.rs`): replicas of `kith ca serve` on one PostgreSQL, a TCP proxy the
//! test can cut, and the checks on the database after a run.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use crate::common::{Ca, json_of, kith, serve_ca_with};

/// Whether this `kith` has a PostgreSQL store (`kith ca serve --store`); prints why not, and
/// fails under CI=true, where the store is part of the build.
pub fn store_available(test: &str) -> bool {
    let (_, help, _) = kith(&["ca", "serve", "--help"]);
    if help.contains("--store") {
        return true;
    }
    integration::skip::skip(
        test,
        "this kith has no `kith ca serve --store` (PostgreSQL)",
    );
    false
}

/// A `kith ca serve` replica on `store`, its own data dir (admin socket) under `dir/name`.
pub fn replica(dir: &Path, name: &str, store: &str, workload_ttl: &str) -> Ca {
    serve_ca_with(
        &dir.join(name),
        &["--store", store, "--workload-ttl", workload_ttl],
    )
}

/// `kith ca <args> --data-dir <replica's dir> --json` through that replica's admin socket.
pub fn admin_json(data: &Path, args: &[&str]) -> serde_json::Value {
    let mut all: Vec<&str> = vec!["ca"];
    all.extend_from_slice(args);
    let d = data.to_str().unwrap();
    all.extend_from_slice(&["--data-dir", d, "--json"]);
    json_of(&all)
}

/// A TCP forwarder to `target` that the test can cut: every open connection is shut and new
/// ones are closed at once, as when the network path to the database fails.
pub struct CutProxy {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl CutProxy {
    pub fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (c, o) = (cut.clone(), open.clone());
        thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if c.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                {
                    let mut open = o.lock().unwrap();
                    open.push(client.try_clone().unwrap());
                    open.push(server.try_clone().unwrap());
                }
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    thread::spawn(move || {
                        let mut buf = [0u8; 16 * 1024];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 || to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(Shutdown::Both);
                        let _ = from.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        Self { addr, cut, open }
    }

    /// Cuts every connection, now and from now on.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for s in self.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// Requests through `through` (the client side of the mesh), each on a new connection, from
/// one thread until stopped; counts answers and failures, keeping the first few failures.
pub struct Traffic {
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<(u64, Vec<String>)>>,
}

impl Traffic {
    pub fn start(through: SocketAddr, every: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = thread::spawn(move || {
            let (mut ok, mut failures) = (0u64, Vec::new());
            let mut n = 0u64;
            while !s.load(Ordering::SeqCst) {
                n += 1;
                match request(through, n) {
                    Ok(()) => ok += 1,
                    Err(e) => failures.push(format!("request {n}: {e}")),
                }
                thread::sleep(every);
            }
            (ok, failures)
        });
        Self {
            stop,
            handle: Some(handle),
        }
    }

    /// (answered, failures).
    pub fn finish(mut self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.take().unwrap().join().unwrap()
    }
}

/// One request on a new connection: a line out, the same line back from the echo backend.
pub fn request(through: SocketAddr, n: u64) -> Result<(), String> {
    let mut s = TcpStream::connect_timeout(&through, Duration::from_secs(5))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let line = format!("request {n}\n");
    s.write_all(line.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    s.shutdown(Shutdown::Write).ok();
    let mut back = String::new();
    s.read_to_string(&mut back)
        .map_err(|e| format!("read: {e}"))?;
    if back != line {
        return Err(format!("answered {back:?}"));
    }
    Ok(())
}

/// GET `path` on `addr` over plain HTTP/1.1: the status code, or None if nothing answers.
pub fn http_status(addr: &str, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split_whitespace().nth(1)?.parse().ok()
}

/// The database checks after a run: no serial issued twice, and `kith ca audit verify` on the
/// chain all replicas wrote, through `data`'s replica.
pub fn check_store(psql: impl Fn(&str) -> String, verify_through: &Path) {
    let counts = psql("SELECT count(*), count(DISTINCT serial) FROM certificates");
    let (all, distinct) = counts.trim().split_once('|').unwrap();
    assert_eq!(all, distinct, "a serial was issued twice: {counts}");
    assert!(all.parse::<u64>().unwrap() > 0);
    let d = verify_through.to_str().unwrap();
    let (code, out, err) = kith(&["ca", "audit", "verify", "--data-dir", d]);
    assert_eq!(code, 0, "audit verify: {out}{err}");
    assert!(out.contains("intact"), "{out}");
}
