//! Prometheus metrics: issuances by kind, refusals by reason, seconds until the signer and the
//! root expire, and request latency.

use std::sync::atomic::AtomicI64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabel {
    cause: &'static str,
}

/// Every cause `time_to_outage_cause` can name.
pub const OUTAGE_CAUSES: [&str; 4] = ["root", "signer", "kek", "store_full"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabel {
    endpoint: &'static str,
}

pub struct Metrics {
    registry: Registry,
    issued: Family<KindLabel, Counter>,
    refused: Family<ReasonLabel, Counter>,
    latency: Family<EndpointLabel, Histogram>,
    pub signer_seconds_to_expiry: Gauge<i64, AtomicI64>,
    pub root_seconds_to_expiry: Gauge<i64, AtomicI64>,
    pub connections: Gauge<i64, AtomicI64>,
    pub time_to_outage: Gauge<i64, AtomicI64>,
    time_to_outage_cause: Family<CauseLabel, Gauge<i64, AtomicI64>>,
    pub rollover_waiting: Gauge<i64, AtomicI64>,
    pub rollover_unconfirmed: Gauge<i64, AtomicI64>,
    pub bundle_roots: Gauge<i64, AtomicI64>,
    pub upstream_expiring: Gauge<i64, AtomicI64>,
    /// The newest audit row's sequence number; the CA also logs its MAC periodically.
    pub audit_head_seq: Gauge<i64, AtomicI64>,
    /// Refusals counted but held back from the audit log by its rate limits.
    pub audit_suppressed: Counter,
    /// Free bytes on the data volume, and the reserve below which anonymous work is refused.
    pub data_free_bytes: Gauge<i64, AtomicI64>,
    pub data_reserve_bytes: Gauge<i64, AtomicI64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("kith_ca");
        let issued = Family::<KindLabel, Counter>::default();
        let refused = Family::<ReasonLabel, Counter>::default();
        let latency = Family::<EndpointLabel, Histogram>::new_with_constructor(|| {
            // 100 µs to ~3 s.
            Histogram::new(exponential_buckets(0.0001, 2.0, 16))
        });
        let signer = Gauge::<i64, AtomicI64>::default();
        let root = Gauge::<i64, AtomicI64>::default();
        let connections = Gauge::<i64, AtomicI64>::default();
        registry.register("issued", "SVIDs issued, by kind", issued.clone());
        registry.register("refused", "Requests refused, by reason", refused.clone());
        registry.register(
            "request_duration_seconds",
            "API request latency",
            latency.clone(),
        );
        registry.register(
            "signer_seconds_to_expiry",
            "Seconds until the active signing intermediate expires",
            signer.clone(),
        );
        registry.register(
            "root_seconds_to_expiry",
            "Seconds until the signing root expires",
            root.clone(),
        );
        registry.register(
            "open_connections",
            "Open API connections",
            connections.clone(),
        );
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let g = Gauge::<i64, AtomicI64>::default();
            registry.register(name, help, g.clone());
            g
        };
        let time_to_outage = gauge(
            &mut registry,
            "time_to_outage_seconds",
            "Seconds until the earliest of: a root or signer's end with no successor, a KEK that does not open the signer key (0), the data volume reaching its free-space reserve",
        );
        let time_to_outage_cause = Family::<CauseLabel, Gauge<i64, AtomicI64>>::default();
        registry.register(
            "time_to_outage_cause",
            "1 for the cause time_to_outage_seconds names, 0 for the others",
            time_to_outage_cause.clone(),
        );
        for cause in OUTAGE_CAUSES {
            time_to_outage_cause
                .get_or_create(&CauseLabel { cause })
                .set(0);
        }
        let rollover_waiting = gauge(
            &mut registry,
            "root_rollover_waiting",
            "1 while a published successor root waits to take over (propagation window or callers)",
        );
        let rollover_unconfirmed = gauge(
            &mut registry,
            "root_rollover_unconfirmed_callers",
            "Callers that renewed in the rollover window without reporting the successor root",
        );
        let bundle_roots = gauge(
            &mut registry,
            "bundle_roots",
            "X.509 roots in the published trust bundle",
        );
        let upstream_expiring = gauge(
            &mut registry,
            "upstream_expiring",
            "1 from 30 days before the upstream CA certificate's end",
        );
        let audit_head_seq = Gauge::<i64, AtomicI64>::default();
        let audit_suppressed = Counter::default();
        let data_free_bytes = Gauge::<i64, AtomicI64>::default();
        let data_reserve_bytes = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "audit_head_seq",
            "Sequence number of the newest audit row",
            audit_head_seq.clone(),
        );
        registry.register(
            "audit_suppressed",
            "Refusals held back from the audit log by its rate limits (summarised in one row)",
            audit_suppressed.clone(),
        );
        registry.register(
            "data_free_bytes",
            "Free bytes on the CA's data volume",
            data_free_bytes.clone(),
        );
        registry.register(
            "data_reserve_bytes",
            "Free bytes below which the CA refuses anonymous requests (--min-free-disk)",
            data_reserve_bytes.clone(),
        );
        Self {
            registry,
            time_to_outage,
            time_to_outage_cause,
            rollover_waiting,
            rollover_unconfirmed,
            bundle_roots,
            upstream_expiring,
            issued,
            refused,
            latency,
            signer_seconds_to_expiry: signer,
            root_seconds_to_expiry: root,
            connections,
            audit_head_seq,
            audit_suppressed,
            data_free_bytes,
            data_reserve_bytes,
        }
    }

    /// Updates the rollover gauges from the authority's view.
    pub fn observe_rollover(&self, view: &crate::authority::RolloverView) {
        use crate::rollover::Wait;
        self.rollover_waiting.set(i64::from(view.waiting.is_some()));
        self.rollover_unconfirmed.set(match &view.waiting {
            Some(Wait::Callers { callers, .. }) => callers.len() as i64,
            _ => 0,
        });
        self.bundle_roots
            .set(view.roots.iter().filter(|r| r.phase.in_bundle()).count() as i64);
        self.upstream_expiring
            .set(i64::from(view.upstream_expires_soon));
    }

    /// Updates the time-to-outage gauges.
    pub fn observe_outage(&self, outage: &crate::outage::Outage, now: i64) {
        self.time_to_outage.set(outage.at - now);
        for cause in OUTAGE_CAUSES {
            self.time_to_outage_cause
                .get_or_create(&CauseLabel { cause })
                .set(i64::from(cause == outage.cause));
        }
    }

    pub fn issued(&self, kind: &'static str) {
        self.issued.get_or_create(&KindLabel { kind }).inc();
    }

    pub fn refused(&self, reason: &'static str) {
        self.refused.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub fn observe(&self, endpoint: &'static str, seconds: f64) {
        self.latency
            .get_or_create(&EndpointLabel { endpoint })
            .observe(seconds);
    }

    pub fn refused_count(&self, reason: &'static str) -> u64 {
        self.refused.get_or_create(&ReasonLabel { reason }).get()
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
