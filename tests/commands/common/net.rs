//! Loopback helpers for the sidecar tests: free ports, an echo backend, byte round trips and
//! the admin endpoints.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use integration::eventually;

use super::Proc;

/// A loopback address free right now, outside the kernel's ephemeral range (so an outgoing
/// connection of another test cannot take it before the child process binds it).
pub fn free_port() -> SocketAddr {
    integration::ports::free_loopback()
}

/// A TCP echo server on a thread.
pub fn echo_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let mut r = s.try_clone().unwrap();
                let _ = std::io::copy(&mut r, &mut s);
            });
        }
    });
    addr
}

pub fn wait_port(addr: SocketAddr) {
    eventually(
        &format!("a listener on {addr}"),
        Duration::from_secs(10),
        || TcpStream::connect(addr),
    );
}

/// Waits until the sidecar `p` with its admin endpoints on `admin` says it is ready (it holds
/// an identity); fails with its log after `within`.
pub fn wait_ready(admin: SocketAddr, p: &Proc, within: Duration) {
    eventually(&format!("ready at {admin}"), within, || {
        let ready = try_http(admin, "GET", "/ready").is_ok_and(|r| r.starts_with("HTTP/1.1 200"));
        ready
            .then_some(())
            .ok_or_else(|| format!("its log:\n{}", p.log()))
    });
}

/// Sends `msg` through `addr` and returns what comes back before the other side closes.
pub fn roundtrip(addr: SocketAddr, msg: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // A refused connection may already be closed: that shows as an empty answer.
    let _ = s.write_all(msg);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

pub fn http(admin: SocketAddr, method: &str, path: &str) -> String {
    try_http(admin, method, path).unwrap_or_else(|e| panic!("{method} {path} at {admin}: {e}"))
}

/// [`http`], or the connection error (nothing listens yet).
pub fn try_http(admin: SocketAddr, method: &str, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(admin)?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    Ok(out)
}

/// The value of a series in Prometheus text (the pod lab's parser).
pub use integration::metric;

/// Polls `/metrics` at `admin` until `series` reaches `at_least`; panics after `within`.
pub fn wait_metric(admin: SocketAddr, series: &str, at_least: f64, within: Duration) -> String {
    eventually(&format!("{series} to reach {at_least}"), within, || {
        let text = http(admin, "GET", "/metrics");
        if metric(&text, series).is_some_and(|v| v >= at_least) {
            Ok(text)
        } else {
            Err(text)
        }
    })
}
