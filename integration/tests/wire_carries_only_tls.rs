//! A packet capture on the node's bridge while a marker crosses between two pods in both
//! directions: the marker never appears in the capture, every TCP payload between the pods is
//! TLS records (the server choosing TLS 1.3), and the apps received the marker intact.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use integration::{Lab, eventually, pcap};

const MARKER: &str = "KITH-MARKER-7f3a9c-the-wire-must-never-show-this";

#[test]
fn wire_carries_only_tls() {
    if !Lab::available("wire_carries_only_tls") {
        return;
    }
    let mut lab = Lab::start("1h");
    let (a, a_sidecar) = lab.ready_pod("a", &[]);
    let (b, b_sidecar) = lab.ready_pod("b", &[]);
    let file = lab.path("bridge.pcap");
    let capture = lab.spawn_in(
        &lab.node.clone(),
        "tcpdump",
        None,
        &[
            "tcpdump",
            "-i",
            "br0",
            // Deliver packets at once, not when a ring-buffer block fills or times out.
            "--immediate-mode",
            "-U",
            "-s",
            "0",
            "-w",
            file.to_str().unwrap(),
            "tcp",
        ],
        &[],
    );
    // tcpdump says "listening on br0" when the capture has started.
    eventually("tcpdump listens", Duration::from_secs(10), || {
        capture.log().contains("listening on")
    });

    // Both directions: A's request carries the marker to B, B's answer carries it back; then
    // the same from B to A.
    let (ok, out) = lab.request(&a, &b, MARKER);
    assert!(
        ok && out.contains(&format!("b:{MARKER}")),
        "{out}\n{}",
        a_sidecar.log()
    );
    let (ok, out) = lab.request(&b, &a, MARKER);
    assert!(
        ok && out.contains(&format!("a:{MARKER}")),
        "{out}\n{}",
        b_sidecar.log()
    );
    std::thread::sleep(Duration::from_millis(500));
    capture.signal(nix::sys::signal::Signal::SIGINT);
    let mut capture = capture;
    capture.wait_exit(Duration::from_secs(10));

    let bytes = std::fs::read(&file).unwrap();
    assert!(
        !bytes.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()),
        "the marker is on the wire in clear"
    );
    let flows = pcap::flows(&bytes).unwrap();
    let between_pods: Vec<_> = flows
        .iter()
        .filter(|((src, _, dst, _), _)| [a.ip, b.ip].contains(src) && [a.ip, b.ip].contains(dst))
        .collect();
    // Two connections, each with payload both ways.
    assert_eq!(
        between_pods.len(),
        4,
        "flows: {:?} in {} bytes of capture; tcpdump: {}",
        flows.keys(),
        bytes.len(),
        capture.log()
    );
    let mut tls13 = 0;
    for (flow, stream) in between_pods {
        let records =
            pcap::tls_records(stream).unwrap_or_else(|e| panic!("{flow:?} is not TLS: {e}"));
        assert!(records.handshake >= 1, "{flow:?}: {records:?}");
        assert!(records.application_data >= 1, "{flow:?}: {records:?}");
        if records.server_hello_tls13 {
            tls13 += 1;
        }
    }
    assert_eq!(tls13, 2, "each connection's server chose TLS 1.3");
    lab.keep(a_sidecar);
    lab.keep(b_sidecar);
}
