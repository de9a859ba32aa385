//! Refusals a person can see: a flood of refused connections of every kind produces info lines
//! with the peer address, the reason and the presented SPIFFE ID, bounded per reason, plus one
//! line per reason saying how many were left out. (One test in this file: the log limiter and
//! the captured subscriber are process-wide.)
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use identity::x509::to_offset;
use proxy::refusal::{RefusalLog, configure_log};
use proxy::{Limits, Policy, Reason};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const CLIENT: &str = "spiffe://example.test/client";
const SERVER: &str = "spiffe://example.test/server";
const INTRUDER: &str = "spiffe://example.test/intruder";
const LINES: u32 = 3;
const FLOOD: usize = 12;

/// Everything the subscriber writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    fn lines_with(&self, needles: &[&str]) -> Vec<String> {
        self.text()
            .lines()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .map(str::to_owned)
            .collect()
    }
}

fn captured_lines(log: &Captured, needle: &str) -> Vec<String> {
    log.lines_with(&["connection refused", needle])
}

async fn attempt(addr: SocketAddr, client: Option<(&Pki, &str, bool)>) {
    let config = match client {
        None => raw_client(None),
        Some((pki, id, expired)) => {
            let (chain, key) = pki.leaf_with(id, |p| {
                if expired {
                    p.not_before = to_offset(now() - 2 * HOUR);
                    p.not_after = to_offset(now() - HOUR);
                }
            });
            raw_client(Some((chain, &key)))
        }
    };
    let _ = within(tls_attempt(addr, config)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_refusals_logs_bounded_lines_per_reason_then_the_suppressed_count() {
    let captured = Captured::default();
    let captured_log = captured.clone();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();
    configure_log(RefusalLog {
        lines: LINES,
        window: Duration::from_secs(5),
    });

    let pki = Pki::new("example.test");
    let foreign = Pki::new("example.test");
    let backend = echo_backend().await;
    let limits = Limits {
        first_flight_timeout: Duration::from_millis(300),
        ..limits()
    };
    let inbound = inbound_with(
        handle(pki.svid(SERVER), pki.bundle()),
        Policy::new(pki.td.clone()).allow(CLIENT).unwrap(),
        backend,
        limits,
    )
    .await;
    let addr = inbound.addr;

    let mut stalled = Vec::new();
    for _ in 0..FLOOD {
        attempt(addr, Some((&foreign, CLIENT, false))).await; // unknown_ca
        attempt(addr, Some((&pki, CLIENT, true))).await; // expired
        attempt(addr, Some((&pki, INTRUDER, false))).await; // not_authorized
        attempt(addr, None).await; // no certificate: plaintext_refused
        let _ = within(round_trip(addr, b"GET / HTTP/1.1\r\n\r\n")).await; // plaintext_refused
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&[0x16]).await.unwrap(); // handshake_timeout
        stalled.push(s);
    }
    let m = &inbound.metrics.inbound;
    let expected = [
        (Reason::UnknownCa, FLOOD),
        (Reason::Expired, FLOOD),
        (Reason::NotAuthorized, FLOOD),
        (Reason::PlaintextRefused, 2 * FLOOD),
        (Reason::HandshakeTimeout, FLOOD),
    ];
    for (reason, n) in expected {
        eventually_async(&format!("{reason} counted"), WAIT, async || {
            m.refused(reason) == n as u64
        })
        .await;
    }

    for (reason, n) in expected {
        let lines = captured.lines_with(&["connection refused", &format!("reason={reason}")]);
        assert_eq!(
            lines.len(),
            LINES as usize,
            "{reason}: {} lines\n{}",
            lines.len(),
            captured.text()
        );
        for l in &lines {
            assert!(l.contains(" INFO "), "{l}");
            assert!(l.contains("peer=127.0.0.1:"), "{l}");
            assert!(l.contains("direction=\"inbound\""), "{l}");
        }
        // Then, at the window's end, one line with what was left out.
        let summary = format!("{} more refusals ({reason}) not logged", n - LINES as usize);
        eventually_async(&summary, Duration::from_secs(10), async || {
            let text = captured.text();
            if text.contains(&summary) {
                Ok(())
            } else {
                Err(text)
            }
        })
        .await;
    }
    // The peer's ID where one was presented (even an expired or foreign one).
    let id_of = |reason: &str| captured.lines_with(&[&format!("reason={reason}")]);
    assert!(id_of("not_authorized")[0].contains(&format!("peer_id={INTRUDER}")));
    assert!(id_of("expired")[0].contains(&format!("peer_id={CLIENT}")));
    assert!(id_of("unknown_ca")[0].contains(&format!("peer_id={CLIENT}")));
    assert!(id_of("plaintext_refused")[0].contains("peer_id=none"));
    drop(stalled);

    // Refusals counted elsewhere (transparent mode's capture outcomes) are logged alike.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let t_addr = listener.local_addr().unwrap();
    let outside: SocketAddr = "192.0.2.1:80".parse().unwrap();
    let captured = proxy::Captured::with_source(listener, move |_: &TcpStream| Ok(outside));
    let metrics = Arc::new(proxy::TransparentMetrics::default());
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(proxy::serve_transparent_outbound(
        captured,
        handle(pki.svid(CLIENT), pki.bundle()),
        vec!["10.0.0.0/8".parse().unwrap()],
        proxy::OutboundPolicy::Deny,
        proxy::ExpectRules::from(proxy::ExpectedPeer::TrustDomain),
        limits,
        metrics.clone(),
        shutdown.clone(),
    ));
    let _ = within(round_trip(t_addr, b"out")).await;
    eventually_async("denied", WAIT, async || metrics.outbound_denied() == 1).await;
    let denied = captured_lines(&captured_log, "reason=outbound_denied");
    assert_eq!(denied.len(), 1, "{}", captured_log.text());
    assert!(denied[0].contains("peer=192.0.2.1:80"), "{}", denied[0]);
    shutdown.cancel();
}
