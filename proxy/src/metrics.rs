//! Counters as plain atomics: connections by direction and result, bytes each way. Nothing
//! here allocates or locks per connection; prometheus-client reads the atomics at scrape time
//! ([`Collector`] implementations), so they join the process's one registry.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet, MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::MetricType;

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
    /// Encodes the families of one or more sets of counters, each set's series labelled
    /// `tunnel="<name>"` when its name is not empty, then `direction`.
    pub fn encode(encoder: &mut DescriptorEncoder, sets: &[(&str, &Metrics)]) -> fmt::Result {
        let series = || {
            sets.iter().flat_map(|(tunnel, m)| {
                [("inbound", &m.inbound), ("outbound", &m.outbound)].map(|(dir, d)| {
                    let mut labels = Vec::with_capacity(2);
                    if !tunnel.is_empty() {
                        labels.push(("tunnel", *tunnel));
                    }
                    labels.push(("direction", dir));
                    (labels, d)
                })
            })
        };
        let mut f = encoder.encode_descriptor(
            "kith_sidecar_connections",
            "Connections by direction and result (accepted, or the refusal reason)",
            None,
            MetricType::Counter,
        )?;
        for (l, m) in series() {
            counter(
                &mut f,
                &(l.as_slice(), [("result", "accepted")]),
                m.accepted(),
            )?;
            for r in Reason::ALL {
                counter(
                    &mut f,
                    &(l.as_slice(), [("result", r.as_str())]),
                    m.refused(r),
                )?;
            }
        }
        let mut f = encoder.encode_descriptor(
            "kith_sidecar_active_connections",
            "Connections being forwarded now",
            None,
            MetricType::Gauge,
        )?;
        for (l, m) in series() {
            gauge(&mut f, &l, m.active())?;
        }
        let mut f = encoder.encode_descriptor(
            "kith_sidecar_bytes",
            "Bytes forwarded, by direction and by side (from or to the TLS side)",
            None,
            MetricType::Counter,
        )?;
        for (l, m) in series() {
            counter(
                &mut f,
                &(l.as_slice(), [("side", "from_tls")]),
                m.bytes_from_tls(),
            )?;
            counter(
                &mut f,
                &(l.as_slice(), [("side", "to_tls")]),
                m.bytes_to_tls(),
            )?;
        }
        let mut f = encoder.encode_descriptor(
            "kith_sidecar_handshake_seconds",
            "Duration of completed TLS handshakes",
            None,
            MetricType::Histogram,
        )?;
        for (l, m) in series() {
            m.handshake.encode(&mut f.encode_family(&l)?)?;
        }
        let mut f = encoder.encode_descriptor(
            "kith_sidecar_tls_resumed",
            "Completed TLS handshakes that resumed a session (no certificate exchange)",
            None,
            MetricType::Counter,
        )?;
        for (l, m) in series() {
            counter(&mut f, &l, m.resumed())?;
        }
        let mut f = encoder.encode_descriptor(
            "kith_sidecar_handshakes",
            "Completed TLS handshakes by negotiated key-exchange group (X25519MLKEM768 is the post-quantum hybrid)",
            None,
            MetricType::Counter,
        )?;
        for (l, m) in series() {
            for (i, kx) in KX_GROUPS.iter().enumerate() {
                let n = m.kx[i].load(Ordering::Relaxed);
                counter(&mut f, &(l.as_slice(), [("kx", *kx)]), n)?;
            }
        }
        let mut f = encoder.encode_descriptor(
            "kith_sidecar_pooled_connections",
            "Pooled mTLS connections between kith sidecars (kith/2), each carrying many connections as HTTP/2 streams",
            None,
            MetricType::Counter,
        )?;
        for (l, m) in series() {
            counter(&mut f, &l, m.pooled())?;
        }
        Ok(())
    }
}

/// One set of counters, its series without a `tunnel` label (a registry's collector).
impl Collector for Metrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        Metrics::encode(&mut encoder, &[("", self)])
    }
}

/// The counters of the explicit tunnels, each with its tunnel's name (empty: no `tunnel`
/// label), as one collector: each family is written once, with every tunnel's series.
#[derive(Debug, Default)]
pub struct Tunnels(pub Vec<(String, Arc<Metrics>)>);

impl Collector for Tunnels {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let sets: Vec<(&str, &Metrics)> = self
            .0
            .iter()
            .map(|(t, m)| (t.as_str(), m.as_ref()))
            .collect();
        Metrics::encode(&mut encoder, &sets)
    }
}

/// Writes one counter series of the family `f`. The exposed name is the family's plus
/// `_total` (OpenMetrics), so families are described without it.
pub fn counter(f: &mut MetricEncoder, labels: &impl EncodeLabelSet, value: u64) -> fmt::Result {
    f.encode_family(labels)?
        .encode_counter::<NoLabelSet, _, f64>(&value, None)
}

/// Writes one gauge series of the family `f`.
pub fn gauge(
    f: &mut MetricEncoder,
    labels: &impl EncodeLabelSet,
    value: impl EncodeGaugeValue,
) -> fmt::Result {
    f.encode_family(labels)?.encode_gauge(&value)
}

/// Upper bounds of the handshake histogram's buckets, in microseconds (250 µs to 10 s).
const BUCKETS_US: [u64; 14] = [
    250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 10_000_000,
];

/// A fixed-bucket latency histogram of atomics: recording is three relaxed adds, no lock
/// (prometheus-client's `Histogram` locks per observation). Encoded at scrape time.
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

    /// Writes `_sum`, `_count` and the cumulative `_bucket` series, in seconds.
    pub fn encode(&self, series: &mut MetricEncoder) -> fmt::Result {
        let buckets: [(f64, u64); BUCKETS_US.len() + 1] = std::array::from_fn(|i| {
            // The encoder writes an upper bound of f64::MAX as `+Inf`.
            let le = BUCKETS_US.get(i).map_or(f64::MAX, |us| *us as f64 / 1e6);
            (le, self.buckets[i].load(Ordering::Relaxed))
        });
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        series.encode_histogram::<NoLabelSet>(sum, self.count(), &buckets, None)
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

    /// The OpenMetrics text of a registry holding `c` alone.
    fn text(c: impl Collector) -> String {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(c));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        out
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        let h = m.inbound.handshake();
        h.record(Duration::from_micros(100));
        h.record(Duration::from_millis(3));
        h.record(Duration::from_secs(60));
        let out = text(m);
        let x = "kith_sidecar_handshake_seconds";
        for line in [
            format!("{x}_bucket{{le=\"0.00025\",direction=\"inbound\"}} 1\n"),
            format!("{x}_bucket{{le=\"0.005\",direction=\"inbound\"}} 2\n"),
            format!("{x}_bucket{{le=\"10.0\",direction=\"inbound\"}} 2\n"),
            format!("{x}_bucket{{le=\"+Inf\",direction=\"inbound\"}} 3\n"),
            format!("{x}_count{{direction=\"inbound\"}} 3\n"),
            format!("{x}_sum{{direction=\"inbound\"}} 60.0031\n"),
            format!("{x}_count{{direction=\"outbound\"}} 0\n"),
            "# TYPE kith_sidecar_handshake_seconds histogram\n".to_owned(),
        ] {
            assert!(out.contains(&line), "{line} in\n{out}");
        }
    }

    #[test]
    fn tunnels_share_each_family_and_keep_the_exposed_names() {
        let (db, plain) = (Arc::new(Metrics::default()), Arc::new(Metrics::default()));
        db.inbound.open();
        db.inbound.close(7, 9);
        plain.outbound.count_refusal(Reason::NotAuthorized);
        let out = text(Tunnels(vec![("db".into(), db), (String::new(), plain)]));
        assert!(out.ends_with("# EOF\n"), "{out}");
        for line in [
            "kith_sidecar_connections_total{tunnel=\"db\",direction=\"inbound\",result=\"accepted\"} 1\n",
            "kith_sidecar_connections_total{direction=\"outbound\",result=\"not_authorized\"} 1\n",
            "kith_sidecar_active_connections{tunnel=\"db\",direction=\"inbound\"} 0\n",
            "kith_sidecar_bytes_total{tunnel=\"db\",direction=\"inbound\",side=\"from_tls\"} 7\n",
            "kith_sidecar_bytes_total{tunnel=\"db\",direction=\"inbound\",side=\"to_tls\"} 9\n",
            "kith_sidecar_tls_resumed_total{direction=\"inbound\"} 0\n",
            "kith_sidecar_handshakes_total{tunnel=\"db\",direction=\"outbound\",kx=\"X25519\"} 0\n",
            "kith_sidecar_pooled_connections_total{direction=\"outbound\"} 0\n",
        ] {
            assert!(out.contains(line), "{line} in\n{out}");
        }
        for family in [
            "connections",
            "active_connections",
            "bytes",
            "handshake_seconds",
            "tls_resumed",
            "handshakes",
            "pooled_connections",
        ] {
            let help = format!("# HELP kith_sidecar_{family} ");
            assert_eq!(out.matches(&help).count(), 1, "{family} in\n{out}");
        }
    }
}
