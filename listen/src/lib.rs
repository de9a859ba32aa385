//! How kith's listeners accept connections: one loop with a connection cap, a per-source cap,
//! a deadline for the request headers, an idle deadline, and a backoff when `accept` itself
//! fails (out of file descriptors), so that no listener is written without them. The limits
//! are also exported for the loops that carry more (the CA's API, with its TLS handshake and
//! worker threads).

pub mod http;
pub mod limits;

pub use http::{HttpLimits, Refusal, serve_http1};
pub use limits::{Activity, LogLimit, PerSource, SourceSlot, Watched};
