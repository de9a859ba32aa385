//! How kith's listeners accept connections, so that no listener is written without a
//! connection cap, a per-source cap and a backoff when `accept` itself fails (out of file
//! descriptors): [`Acceptor`] is that accept step for TCP and Unix sockets, and
//! [`serve_http1`] the whole loop for the plain HTTP/1.1 listeners (metrics, health, admin),
//! with deadlines for the request headers and for idleness. The loops that carry more (the
//! CA's API with its TLS handshake and worker threads, the injector, the Workload API, the
//! proxy) take an [`Acceptor`] and the limits in [`limits`].

pub mod accept;
pub mod http;
pub mod limits;

pub use accept::{Acceptor, Caps, Conn, Held, Listener, Next, Refusal, source_of};
pub use http::{HttpLimits, serve_http1};
pub use limits::{Activity, LogLimit, PerSource, SourceSlot, Watched};
