//! Counters for the Workload API: calls and open streams (plain atomics, encoded at scrape
//! time), refusals by reason and open connections, all registered in the agent's own
//! Prometheus registry (see [`WorkloadApiMetrics::register`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tonic::Code;

/// The Workload API methods, in the order of the service definition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    FetchX509Svid,
    FetchX509Bundles,
    FetchJwtSvid,
    FetchJwtBundles,
    ValidateJwtSvid,
    FetchWitSvid,
    FetchWitBundles,
}

const METHODS: [Method; 7] = [
    Method::FetchX509Svid,
    Method::FetchX509Bundles,
    Method::FetchJwtSvid,
    Method::FetchJwtBundles,
    Method::ValidateJwtSvid,
    Method::FetchWitSvid,
    Method::FetchWitBundles,
];

/// gRPC status codes run from 0 (OK) to 16 (Unauthenticated).
const CODES: usize = 17;

impl Method {
    /// The snake_case name used as a metric label.
    pub fn name(self) -> &'static str {
        match self {
            Self::FetchX509Svid => "fetch_x509_svid",
            Self::FetchX509Bundles => "fetch_x509_bundles",
            Self::FetchJwtSvid => "fetch_jwt_svid",
            Self::FetchJwtBundles => "fetch_jwt_bundles",
            Self::ValidateJwtSvid => "validate_jwt_svid",
            Self::FetchWitSvid => "fetch_wit_svid",
            Self::FetchWitBundles => "fetch_wit_bundles",
        }
    }
}

/// One counter of [`WorkloadApiMetrics::calls`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallCount {
    pub method: &'static str,
    /// The gRPC status of the call's answer (for a stream: of its opening), snake_case.
    pub code: &'static str,
    pub count: u64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// A flood of refusals (hundreds of connections a second) must not fill the log: at most one
/// line per reason per this long, the next one saying how many were left out.
const LOG_EVERY: Duration = Duration::from_secs(1);

/// Calls by method and result, the streams and connections open now, and refusals by reason.
#[derive(Debug)]
pub struct WorkloadApiMetrics {
    calls: Arc<Calls>,
    refusals: Family<ReasonLabel, Counter>,
    connections: Gauge<i64, AtomicI64>,
    /// Per reason: when a line was last logged, and how many were suppressed since.
    logged: Mutex<HashMap<&'static str, (Instant, u64)>>,
}

impl Default for WorkloadApiMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl WorkloadApiMetrics {
    pub fn new() -> Self {
        Self {
            calls: Arc::new(Calls {
                counts: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
                open_streams: AtomicI64::new(0),
            }),
            refusals: Family::default(),
            connections: Gauge::default(),
            logged: Mutex::new(HashMap::new()),
        }
    }

    /// Adds the refusal counter (`kith_agent_workload_api_refusals_total{reason}`), the
    /// open-connection gauge, and the calls and open streams (`workload_api_calls_total{method,
    /// code}`, `workload_api_open_streams`) to the agent's registry.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "workload_api_refusals",
            "Workload API callers, connections and selectors refused, by reason",
            self.refusals.clone(),
        );
        registry.register(
            "workload_api_connections",
            "Workload API connections open now",
            self.connections.clone(),
        );
        registry.register_collector(Box::new(self.calls.clone()));
    }

    /// Counts one refusal.
    pub fn refused(&self, reason: &'static str) {
        self.refusals.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// How many refusals with `reason` were counted.
    pub fn refusals(&self, reason: &'static str) -> u64 {
        self.refusals.get_or_create(&ReasonLabel { reason }).get()
    }

    /// Counts one refusal and logs it at warn with its reason and `detail`, at most once a
    /// second per reason (the line says how many were left out before it).
    pub fn refuse(&self, reason: &'static str, uid: Option<u32>, pid: Option<i32>, detail: &str) {
        self.refused(reason);
        let suppressed = {
            let mut logged = self.logged.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            match logged.get_mut(reason) {
                Some((at, skipped)) if now.duration_since(*at) < LOG_EVERY => {
                    *skipped += 1;
                    return;
                }
                Some((at, skipped)) => {
                    *at = now;
                    std::mem::take(skipped)
                }
                None => {
                    logged.insert(reason, (now, 0));
                    0
                }
            }
        };
        tracing::warn!(
            reason,
            uid,
            pid,
            suppressed,
            "workload api refused: {detail}"
        );
    }

    /// Workload API connections open now.
    pub fn connections(&self) -> u64 {
        self.connections.get().max(0).unsigned_abs()
    }

    pub(crate) fn connection_opened(&self) {
        self.connections.inc();
    }

    pub(crate) fn connection_closed(&self) {
        self.connections.dec();
    }

    /// Every counter that is not zero.
    pub fn calls(&self) -> Vec<CallCount> {
        let mut out = Vec::new();
        for (m, method) in METHODS.iter().enumerate() {
            for (c, counter) in self.calls.counts[m].iter().enumerate() {
                let count = counter.load(Ordering::Relaxed);
                if count > 0 {
                    out.push(CallCount {
                        method: method.name(),
                        code: code_name(c),
                        count,
                    });
                }
            }
        }
        out
    }

    /// One counter: calls of `method` answered with `code`.
    pub fn count(&self, method: Method, code: Code) -> u64 {
        self.calls.counts[method as usize][code_index(code)].load(Ordering::Relaxed)
    }

    /// Server streams open now.
    pub fn open_streams(&self) -> u64 {
        self.calls
            .open_streams
            .load(Ordering::Relaxed)
            .max(0)
            .unsigned_abs()
    }

    pub(crate) fn record(&self, method: Method, code: Code) {
        self.calls.counts[method as usize][code_index(code)].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn stream_opened(&self) {
        self.calls.open_streams.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn stream_closed(&self) {
        self.calls.open_streams.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Calls by method and gRPC status, and the server streams open now: relaxed atomic adds on
/// the call path (no lock, unlike a `Family`), read when the registry is encoded.
#[derive(Debug)]
struct Calls {
    counts: [[AtomicU64; CODES]; METHODS.len()],
    open_streams: AtomicI64,
}

impl Collector for Calls {
    /// Only the counters that moved are written, as before: 7 methods by 17 codes would be
    /// 119 series of mostly zeros.
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let mut f = encoder.encode_descriptor(
            "workload_api_calls",
            "Workload API calls, by method and gRPC status.",
            None,
            MetricType::Counter,
        )?;
        for (m, method) in METHODS.iter().enumerate() {
            for (c, counter) in self.counts[m].iter().enumerate() {
                let count = counter.load(Ordering::Relaxed);
                if count > 0 {
                    let labels = [("method", method.name()), ("code", code_name(c))];
                    f.encode_family(&labels)?
                        .encode_counter::<NoLabelSet, _, f64>(&count, None)?;
                }
            }
        }
        let open = self.open_streams.load(Ordering::Relaxed).max(0);
        encoder
            .encode_descriptor(
                "workload_api_open_streams",
                "Workload API server streams open now.",
                None,
                MetricType::Gauge,
            )?
            .encode_gauge(&open)
    }
}

fn code_index(code: Code) -> usize {
    usize::try_from(code as i32)
        .ok()
        .filter(|i| *i < CODES)
        .unwrap_or(Code::Unknown as usize)
}

fn code_name(index: usize) -> &'static str {
    const NAMES: [&str; CODES] = [
        "ok",
        "cancelled",
        "unknown",
        "invalid_argument",
        "deadline_exceeded",
        "not_found",
        "already_exists",
        "permission_denied",
        "resource_exhausted",
        "failed_precondition",
        "aborted",
        "out_of_range",
        "unimplemented",
        "internal",
        "unavailable",
        "data_loss",
        "unauthenticated",
    ];
    NAMES.get(index).copied().unwrap_or("unknown")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_method_and_code() {
        let m = WorkloadApiMetrics::new();
        m.record(Method::FetchX509Svid, Code::Ok);
        m.record(Method::FetchX509Svid, Code::Ok);
        m.record(Method::ValidateJwtSvid, Code::InvalidArgument);
        m.record(Method::FetchWitBundles, Code::Unauthenticated);
        assert_eq!(m.count(Method::FetchX509Svid, Code::Ok), 2);
        assert_eq!(
            m.calls(),
            vec![
                CallCount {
                    method: "fetch_x509_svid",
                    code: "ok",
                    count: 2
                },
                CallCount {
                    method: "validate_jwt_svid",
                    code: "invalid_argument",
                    count: 1
                },
                CallCount {
                    method: "fetch_wit_bundles",
                    code: "unauthenticated",
                    count: 1
                },
            ]
        );
        m.stream_opened();
        m.stream_opened();
        m.stream_closed();
        assert_eq!(m.open_streams(), 1);
    }

    #[test]
    fn refusals_and_connections_are_exported_through_the_agent_registry() {
        let m = WorkloadApiMetrics::new();
        let mut registry = Registry::with_prefix("kith_agent");
        m.register(&mut registry);
        m.refuse("connections_per_uid_cap", Some(65534), Some(42), "test");
        m.refuse("connections_per_uid_cap", Some(65534), Some(43), "test");
        m.refused("unix_path_other_mount_namespace");
        m.connection_opened();
        m.connection_opened();
        m.connection_closed();
        m.record(Method::FetchX509Svid, Code::Ok);
        m.stream_opened();
        assert_eq!(m.refusals("connections_per_uid_cap"), 2);
        assert_eq!(m.connections(), 1);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(
                "kith_agent_workload_api_refusals_total{reason=\"connections_per_uid_cap\"} 2"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "kith_agent_workload_api_refusals_total{reason=\"unix_path_other_mount_namespace\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("kith_agent_workload_api_connections 1"),
            "{text}"
        );
        for want in [
            "# TYPE kith_agent_workload_api_calls counter\n",
            "kith_agent_workload_api_calls_total{method=\"fetch_x509_svid\",code=\"ok\"} 1\n",
            "kith_agent_workload_api_open_streams 1\n",
        ] {
            assert!(text.contains(want), "{want} in\n{text}");
        }
        // Counters that never moved are not written.
        assert!(!text.contains("code=\"internal\""), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
