//! The webhook's metrics: every review and every refusal by result, and review latency.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

pub struct Metrics {
    registry: Registry,
    reviews: Family<ResultLabel, Counter>,
    duration: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("kith_inject");
        let reviews = Family::<ResultLabel, Counter>::default();
        // 50 µs to ~1.6 s.
        let duration = Histogram::new(exponential_buckets(0.00005, 2.0, 16));
        registry.register(
            "reviews",
            "Requests to /mutate by result: injected, a skip reason, not_a_pod, not_create, \
             denied_<why>, or why the request was refused (malformed, too_large, timeout, ...)",
            reviews.clone(),
        );
        registry.register(
            "review_duration_seconds",
            "Time from request to answer on /mutate",
            duration.clone(),
        );
        Self {
            registry,
            reviews,
            duration,
        }
    }

    pub fn count(&self, result: &'static str) {
        self.reviews.get_or_create(&ResultLabel { result }).inc();
    }

    pub fn observe(&self, seconds: f64) {
        self.duration.observe(seconds);
    }

    /// OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
