//! Counters as plain atomics: connections by direction and result, bytes each way. An
//! exporter (Prometheus text) reads them; nothing here allocates per connection.

use std::fmt;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use identity::VerifyError;

/// Why a connection was refused. `as_str()` is a stable snake_case label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    Expired,
    NotYetValid,
    UnknownCa,
    WrongTrustDomain,
    NotAuthorized,
    PlaintextRefused,
    NoIdentityYet,
    UpstreamUnreachable,
    /// A chain that is not a valid X509-SVID for another reason (bad signature, not an SVID,
    /// malformed).
    BadCertificate,
    /// The TLS peer closed or sent an alert before its first byte (TLS 1.3 reports a refused
    /// client certificate only then).
    PeerRefused,
    /// Any other handshake failure (protocol error, no ALPN `kith/1`).
    HandshakeFailed,
    /// The ClientHello did not arrive within the first-flight deadline, or the handshake did
    /// not finish within the handshake timeout.
    HandshakeTimeout,
    /// The peer's address already had as many handshakes pending as one source may.
    TooManyPending,
}

impl Reason {
    pub const ALL: [Reason; 13] = [
        Reason::Expired,
        Reason::NotYetValid,
        Reason::UnknownCa,
        Reason::WrongTrustDomain,
        Reason::NotAuthorized,
        Reason::PlaintextRefused,
        Reason::NoIdentityYet,
        Reason::UpstreamUnreachable,
        Reason::BadCertificate,
        Reason::PeerRefused,
        Reason::HandshakeFailed,
        Reason::HandshakeTimeout,
        Reason::TooManyPending,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Expired => "expired",
            Reason::NotYetValid => "not_yet_valid",
            Reason::UnknownCa => "unknown_ca",
            Reason::WrongTrustDomain => "wrong_trust_domain",
            Reason::NotAuthorized => "not_authorized",
            Reason::PlaintextRefused => "plaintext_refused",
            Reason::NoIdentityYet => "no_identity_yet",
            Reason::UpstreamUnreachable => "upstream_unreachable",
            Reason::BadCertificate => "bad_certificate",
            Reason::PeerRefused => "peer_refused",
            Reason::HandshakeFailed => "handshake_failed",
            Reason::HandshakeTimeout => "handshake_timeout",
            Reason::TooManyPending => "too_many_pending",
        }
    }

    pub fn from_verify(e: &VerifyError) -> Self {
        match e.reason() {
            "expired" => Reason::Expired,
            "not_yet_valid" => Reason::NotYetValid,
            "unknown_ca" => Reason::UnknownCa,
            "wrong_trust_domain" => Reason::WrongTrustDomain,
            _ => Reason::BadCertificate,
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Counters of one direction (inbound: mTLS in; outbound: mTLS out).
#[derive(Debug, Default)]
pub struct DirectionMetrics {
    /// `inbound` or `outbound`, for the refusal log.
    direction: &'static str,
    accepted: AtomicU64,
    active: AtomicU64,
    refused: [AtomicU64; Reason::ALL.len()],
    /// Bytes from the TLS side to the plaintext side.
    bytes_from_tls: AtomicU64,
    /// Bytes from the plaintext side to the TLS side.
    bytes_to_tls: AtomicU64,
    /// Completed TLS handshakes, by duration (inbound: from the first byte to the finished
    /// handshake; outbound: TCP connect plus handshake).
    handshake: Histogram,
    /// Of those, the handshakes that resumed a session (no certificates exchanged).
    resumed: AtomicU64,
    /// Completed handshakes by negotiated key-exchange group, in the order of `KX_GROUPS`.
    kx: [AtomicU64; KX_GROUPS.len()],
    /// Pooled connections (ALPN `kith/2`) opened; each carries many connections as streams.
    pooled: AtomicU64,
}

/// The key-exchange group labels of `kith_sidecar_handshakes_total` (`identity::kx::group_name`).
pub const KX_GROUPS: [&str; 3] = ["X25519MLKEM768", "X25519", "other"];

impl DirectionMetrics {
    /// Connections that were established: inbound, handshake and authorization passed;
    /// outbound, the peer's first byte arrived (or it closed cleanly) after the handshake.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Connections being forwarded now.
    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    pub fn refused(&self, reason: Reason) -> u64 {
        self.refused[reason.index()].load(Ordering::Relaxed)
    }

    pub fn refused_total(&self) -> u64 {
        Reason::ALL.iter().map(|r| self.refused(*r)).sum()
    }

    pub fn bytes_from_tls(&self) -> u64 {
        self.bytes_from_tls.load(Ordering::Relaxed)
    }

    pub fn bytes_to_tls(&self) -> u64 {
        self.bytes_to_tls.load(Ordering::Relaxed)
    }

    pub fn handshake(&self) -> &Histogram {
        &self.handshake
    }

    pub fn resumed(&self) -> u64 {
        self.resumed.load(Ordering::Relaxed)
    }

    /// Completed handshakes that negotiated `group` (a label of [`KX_GROUPS`]).
    pub fn handshakes_kx(&self, group: &str) -> u64 {
        KX_GROUPS
            .iter()
            .position(|g| *g == group)
            .map_or(0, |i| self.kx[i].load(Ordering::Relaxed))
    }

    /// Pooled connections (ALPN `kith/2`) opened or accepted; their streams count as
    /// connections in `accepted`.
    pub fn pooled(&self) -> u64 {
        self.pooled.load(Ordering::Relaxed)
    }

    pub(crate) fn pooled_open(&self) {
        self.pooled.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a completed handshake: its duration, whether it resumed a session, and the
    /// key-exchange group it negotiated.
    pub(crate) fn handshake_done(&self, took: Duration, resumed: bool, kx: rustls::NamedGroup) {
        self.handshake.record(took);
        let name = identity::kx::group_name(kx);
        let slot = KX_GROUPS
            .iter()
            .position(|g| *g == name)
            .unwrap_or(KX_GROUPS.len() - 1);
        self.kx[slot].fetch_add(1, Ordering::Relaxed);
        if resumed {
            self.resumed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a refusal without logging it; [`Self::refuse`] does both.
    pub(crate) fn count_refusal(&self, reason: Reason) {
        self.refused[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn direction(&self) -> &'static str {
        self.direction
    }

    pub(crate) fn open(&self) {
        self.accepted.fetch_add(1, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn close(&self, from_tls: u64, to_tls: u64) {
        self.active.fetch_sub(1, Ordering::Relaxed);
        self.add_bytes(from_tls, to_tls);
    }

    pub(crate) fn add_bytes(&self, from_tls: u64, to_tls: u64) {
        self.bytes_from_tls.fetch_add(from_tls, Ordering::Relaxed);
        self.bytes_to_tls.fetch_add(to_tls, Ordering::Relaxed);
    }
}

#[derive(Debug)]
pub struct Metrics {
    pub inbound: DirectionMetrics,
    pub outbound: DirectionMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            inbound: DirectionMetrics {
                direction: "inbound",
                ..DirectionMetrics::default()
            },
            outbound: DirectionMetrics {
                direction: "outbound",
                ..DirectionMetrics::default()
            },
        }
    }
}

impl Metrics {
    /// Appends the Prometheus text exposition (format 0.0.4) of one or more sets of counters,
    /// each set's series labelled with its labels (such as `tunnel="db"`; empty for none).
    pub fn render_prometheus(out: &mut String, sets: &[(&str, &Metrics)]) {
        let series = || {
            sets.iter().flat_map(|(labels, m)| {
                [("inbound", &m.inbound), ("outbound", &m.outbound)].map(|(dir, d)| {
                    let l = if labels.is_empty() {
                        format!("direction=\"{dir}\"")
                    } else {
                        format!("{labels},direction=\"{dir}\"")
                    };
                    (l, d)
                })
            })
        };
        family(
            out,
            "kith_sidecar_connections_total",
            "counter",
            "Connections by direction and result (accepted, or the refusal reason)",
        );
        for (l, m) in series() {
            let _ = writeln!(
                out,
                "kith_sidecar_connections_total{{{l},result=\"accepted\"}} {}",
                m.accepted()
            );
            for r in Reason::ALL {
                let _ = writeln!(
                    out,
                    "kith_sidecar_connections_total{{{l},result=\"{r}\"}} {}",
                    m.refused(r)
                );
            }
        }
        family(
            out,
            "kith_sidecar_active_connections",
            "gauge",
            "Connections being forwarded now",
        );
        for (l, m) in series() {
            let _ = writeln!(out, "kith_sidecar_active_connections{{{l}}} {}", m.active());
        }
        family(
            out,
            "kith_sidecar_bytes_total",
            "counter",
            "Bytes forwarded, by direction and by side (from or to the TLS side)",
        );
        for (l, m) in series() {
            let _ = writeln!(
                out,
                "kith_sidecar_bytes_total{{{l},side=\"from_tls\"}} {}",
                m.bytes_from_tls()
            );
            let _ = writeln!(
                out,
                "kith_sidecar_bytes_total{{{l},side=\"to_tls\"}} {}",
                m.bytes_to_tls()
            );
        }
        family(
            out,
            "kith_sidecar_handshake_seconds",
            "histogram",
            "Duration of completed TLS handshakes",
        );
        for (l, m) in series() {
            m.handshake
                .render(out, "kith_sidecar_handshake_seconds", &l);
        }
        family(
            out,
            "kith_sidecar_tls_resumed_total",
            "counter",
            "Completed TLS handshakes that resumed a session (no certificate exchange)",
        );
        for (l, m) in series() {
            let _ = writeln!(out, "kith_sidecar_tls_resumed_total{{{l}}} {}", m.resumed());
        }
        family(
            out,
            "kith_sidecar_handshakes_total",
            "counter",
            "Completed TLS handshakes by negotiated key-exchange group (X25519MLKEM768 is the post-quantum hybrid)",
        );
        for (l, m) in series() {
            for (i, kx) in KX_GROUPS.iter().enumerate() {
                let n = m.kx[i].load(Ordering::Relaxed);
                let _ = writeln!(out, "kith_sidecar_handshakes_total{{{l},kx=\"{kx}\"}} {n}");
            }
        }
        family(
            out,
            "kith_sidecar_pooled_connections_total",
            "counter",
            "Pooled mTLS connections between kith sidecars (kith/2), each carrying many connections as HTTP/2 streams",
        );
        for (l, m) in series() {
            let _ = writeln!(
                out,
                "kith_sidecar_pooled_connections_total{{{l}}} {}",
                m.pooled()
            );
        }
    }
}

/// Writes the `# HELP` and `# TYPE` lines of a metric family.
pub fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Upper bounds of the handshake histogram's buckets, in microseconds (250 µs to 10 s).
const BUCKETS_US: [u64; 14] = [
    250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 10_000_000,
];

/// A fixed-bucket latency histogram of atomics: recording is three relaxed adds, no lock.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Per bucket (not cumulative); the last slot is +Inf.
    buckets: [AtomicU64; BUCKETS_US.len() + 1],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn record(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let slot = BUCKETS_US
            .iter()
            .position(|b| us <= *b)
            .unwrap_or(BUCKETS_US.len());
        self.buckets[slot].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Appends `_bucket` (cumulative), `_sum` and `_count` series.
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, slot) in self.buckets.iter().enumerate() {
            cumulative += slot.load(Ordering::Relaxed);
            let le = BUCKETS_US
                .get(i)
                .map_or_else(|| "+Inf".to_owned(), |us| format!("{}", *us as f64 / 1e6));
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}"
            );
        }
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_index_their_own_slot() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i, "{r}");
        }
        let m = DirectionMetrics::default();
        m.count_refusal(Reason::UnknownCa);
        assert_eq!(m.refused(Reason::UnknownCa), 1);
        assert_eq!(m.refused_total(), 1);
    }

    #[test]
    fn handshakes_are_counted_by_key_exchange_group() {
        let m = DirectionMetrics::default();
        m.handshake_done(
            Duration::from_millis(1),
            false,
            rustls::NamedGroup::X25519MLKEM768,
        );
        m.handshake_done(
            Duration::from_millis(1),
            true,
            rustls::NamedGroup::X25519MLKEM768,
        );
        m.handshake_done(Duration::from_millis(1), false, rustls::NamedGroup::X25519);
        m.handshake_done(
            Duration::from_millis(1),
            false,
            rustls::NamedGroup::secp256r1,
        );
        assert_eq!(m.handshakes_kx("X25519MLKEM768"), 2);
        assert_eq!(m.handshakes_kx("X25519"), 1);
        assert_eq!(m.handshakes_kx("other"), 1);
        assert_eq!(m.handshakes_kx("nonsense"), 0);
        assert_eq!(m.handshake().count(), 4);
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        h.record(Duration::from_micros(100));
        h.record(Duration::from_millis(3));
        h.record(Duration::from_secs(60));
        let mut out = String::new();
        h.render(&mut out, "x", "d=\"in\"");
        assert!(
            out.contains("x_bucket{d=\"in\",le=\"0.00025\"} 1\n"),
            "{out}"
        );
        assert!(out.contains("x_bucket{d=\"in\",le=\"0.005\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{d=\"in\",le=\"10\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{d=\"in\",le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count{d=\"in\"} 3\n"), "{out}");
        assert!(out.contains("x_sum{d=\"in\"} 60.0031\n"), "{out}");
    }
}
