//! The agent's Prometheus metrics: SVIDs held and the seconds until each expires, and renewals
//! by kind and result (a CA outage shows as a rising count of failures with their reason).

use std::sync::Mutex;
use std::sync::atomic::AtomicI64;
use std::time::SystemTime;

use identity::Svid;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::snapshot::WorkloadSvid;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RenewalLabels {
    kind: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IdLabel {
    spiffe_id: String,
}

pub struct AgentMetrics {
    registry: Mutex<Registry>,
    renewals: Family<RenewalLabels, Counter>,
    expiry: Family<IdLabel, Gauge<i64, AtomicI64>>,
    held: Gauge<i64, AtomicI64>,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("kith_agent");
        let renewals = Family::<RenewalLabels, Counter>::default();
        let expiry = Family::<IdLabel, Gauge<i64, AtomicI64>>::default();
        let held = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "renewals",
            "SVID attestations and renewals, by kind and result",
            renewals.clone(),
        );
        registry.register(
            "svid_seconds_to_expiry",
            "Seconds until each held SVID expires",
            expiry.clone(),
        );
        registry.register("svids_held", "Workload SVIDs currently held", held.clone());
        Self {
            registry: Mutex::new(registry),
            renewals,
            expiry,
            held,
        }
    }

    /// Lets other parts (the Workload API) register their metrics in the same registry.
    pub fn register(&self, f: impl FnOnce(&mut Registry)) {
        if let Ok(mut r) = self.registry.lock() {
            f(&mut r);
        }
    }

    pub fn renewal(&self, kind: &str, result: &str) {
        self.renewals
            .get_or_create(&RenewalLabels {
                kind: kind.into(),
                result: result.into(),
            })
            .inc();
    }

    pub fn renewals(&self, kind: &str, result: &str) -> u64 {
        self.renewals
            .get_or_create(&RenewalLabels {
                kind: kind.into(),
                result: result.into(),
            })
            .get()
    }

    pub fn observe<'a>(
        &self,
        node: &Svid,
        workloads: impl Iterator<Item = &'a WorkloadSvid>,
        now: SystemTime,
    ) {
        let secs = |t: SystemTime| match t.duration_since(now) {
            Ok(d) => d.as_secs() as i64,
            Err(e) => -(e.duration().as_secs() as i64),
        };
        self.expiry.clear();
        self.expiry
            .get_or_create(&IdLabel {
                spiffe_id: node.id().to_string(),
            })
            .set(secs(node.not_after()));
        let mut n = 0;
        for w in workloads {
            n += 1;
            self.expiry
                .get_or_create(&IdLabel {
                    spiffe_id: w.spiffe_id.to_string(),
                })
                .set(secs(w.not_after));
        }
        self.held.set(n);
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Ok(r) = self.registry.lock()
            && prometheus_client::encoding::text::encode(&mut out, &r).is_err()
        {
            out.clear();
        }
        out
    }
}
