//! kith's data plane: mutual-TLS tunnels between workloads, authenticated by X509-SVIDs.
//!
//! - [`tls`]: the current identity and the rustls configs that read it per handshake;
//! - [`authz`]: which peer SPIFFE IDs may connect;
//! - [`copy`]: bidirectional copy with half-close, idle timeout and growing buffers;
//! - [`tunnel`]: `serve_inbound` (mTLS in) and `serve_outbound` (mTLS out);
//! - [`transparent`]: `serve_transparent_outbound`/`serve_transparent_inbound` for
//!   iptables-captured connections;
//! - [`pool`]: the pooled hop between kith sidecars (`kith/2`, HTTP/2 CONNECT streams), its
//!   streams copied to and from TCP by `stream_copy`;
//! - [`socket`]: the original destination of a captured connection (`SO_ORIGINAL_DST`);
//! - [`metrics`]: connection and byte counters;
//! - [`refusal`]: every refused connection counted and logged (rate-limited per reason).
#![forbid(unsafe_code)]

pub mod authz;
pub mod copy;
pub mod metrics;
pub mod pool;
pub mod refusal;
pub mod socket;
mod stream_copy;
pub mod tls;
pub mod transparent;
pub mod tunnel;

/// What the fuzz targets in `fuzz/` call: the inbound first-flight decisions, as
/// `tunnel::inbound` and `tunnel::opening` make them. Not an API.
#[doc(hidden)]
pub mod fuzzing {
    /// The first byte of a TLS handshake record: such a connection is taken for TLS.
    pub const TLS_HANDSHAKE: u8 = crate::tunnel::TLS_HANDSHAKE;

    /// Whether a ClientHello is a kith peer's (it gets the mesh configuration).
    pub fn offers_mesh(hello: &rustls::server::ClientHello<'_>) -> bool {
        crate::tunnel::offers_mesh(hello)
    }
}

pub use authz::{Denied, Policy};
pub use metrics::{DirectionMetrics, Metrics, Reason, Tunnels};
pub use refusal::{Refusal, RefusalLog};
pub use socket::{OriginalDst, SoOriginalDst};
pub use tls::{ExpectedPeer, IdentityHandle};
pub use transparent::{
    Captured, Cidr, ExpectRule, ExpectRules, InboundMode, OutboundPolicy, TransparentMetrics,
    serve_transparent_inbound, serve_transparent_outbound,
};
pub use tunnel::{Limits, Upstream, serve_inbound, serve_outbound};
