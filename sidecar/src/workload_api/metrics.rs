//! Call counters for the Workload API, kept as plain atomics so the agent can export them in
//! whatever format it serves (no metrics crate here).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

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

/// Calls by method and result, and the streams open now.
#[derive(Debug)]
pub struct WorkloadApiMetrics {
    calls: [[AtomicU64; CODES]; METHODS.len()],
    open_streams: AtomicI64,
}

impl Default for WorkloadApiMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl WorkloadApiMetrics {
    pub fn new() -> Self {
        Self {
            calls: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
            open_streams: AtomicI64::new(0),
        }
    }

    /// Every counter that is not zero.
    pub fn calls(&self) -> Vec<CallCount> {
        let mut out = Vec::new();
        for (m, method) in METHODS.iter().enumerate() {
            for (c, counter) in self.calls[m].iter().enumerate() {
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
        self.calls[method as usize][code_index(code)].load(Ordering::Relaxed)
    }

    /// Server streams open now.
    pub fn open_streams(&self) -> u64 {
        self.open_streams
            .load(Ordering::Relaxed)
            .max(0)
            .unsigned_abs()
    }

    pub(crate) fn record(&self, method: Method, code: Code) {
        self.calls[method as usize][code_index(code)].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn stream_opened(&self) {
        self.open_streams.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn stream_closed(&self) {
        self.open_streams.fetch_sub(1, Ordering::Relaxed);
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
}
