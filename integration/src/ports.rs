//! Loopback ports for servers the tests start.
//!
//! Asking the kernel for port 0 and handing the number to a child process is racy in a busy
//! test run: between the probe closing and the child binding, the kernel may give that very
//! port to someone's outgoing connection as its local (ephemeral) port, and the child fails to
//! bind. Ports picked here lie below the kernel's ephemeral range, so outgoing connections never
//! take them; the remaining race (two tests picking the same port within a moment) needs the
//! same pick out of thousands.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Where the tests' ports start; the top is the ephemeral range's low end.
const LOW: u16 = 20_000;

/// A loopback address free right now, outside the kernel's ephemeral port range.
pub fn free_loopback() -> SocketAddr {
    let high = ephemeral_low().max(LOW + 1_000);
    let span = u32::from(high - LOW);
    for _ in 0..200 {
        let port = LOW + (next_random() % span) as u16;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        if TcpListener::bind(addr).is_ok() {
            return addr;
        }
    }
    // Everything tried was taken: the kernel's own pick is still better than failing.
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
}

/// The low end of `net.ipv4.ip_local_port_range` (32768 when it cannot be read).
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .filter(|&p: &u16| p > LOW)
        .unwrap_or(32_768)
}

/// A cheap per-process random sequence (xorshift seeded from the clock and the PID): the picks
/// of parallel test processes must differ, nothing more.
fn next_random() -> u32 {
    static STATE: AtomicU32 = AtomicU32::new(0);
    let mut x = STATE.load(Ordering::Relaxed);
    if x == 0 {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(1);
        x = nanos ^ std::process::id().rotate_left(16) | 1;
    }
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    STATE.store(x, Ordering::Relaxed);
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_bindable_ports_below_the_ephemeral_range() {
        for _ in 0..50 {
            let a = free_loopback();
            assert!(a.port() >= LOW && a.port() < ephemeral_low().max(LOW + 1_000));
            TcpListener::bind(a).unwrap();
        }
    }
}
