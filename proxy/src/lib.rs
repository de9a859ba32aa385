//! kith's data plane: mutual-TLS tunnels between workloads, authenticated by X509-SVIDs.
//!
//! - [`tls`]: the current identity and the rustls configs that read it per handshake;
//! - [`authz`]: which peer SPIFFE IDs may connect;
//! - [`copy`]: bidirectional copy with half-close, idle timeout and growing buffers;
//! - [`tunnel`]: `serve_inbound` (mTLS in) and `serve_outbound` (mTLS out);
//! - [`metrics`]: connection and byte counters.
#![forbid(unsafe_code)]

pub mod authz;
pub mod copy;
pub mod metrics;
pub mod tls;
pub mod tunnel;

pub use authz::{Denied, Policy};
pub use metrics::{DirectionMetrics, Metrics, Reason};
pub use tls::{ExpectedPeer, IdentityHandle};
pub use tunnel::{Limits, serve_inbound, serve_outbound};
