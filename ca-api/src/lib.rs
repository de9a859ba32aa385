//! The CA's API as its callers see it: the request and answer types of every call (the server
//! in the `ca` crate deserializes and serializes the very same types), one HTTPS client that
//! authenticates the CA by its SPIFFE ID, failover across replicas, and the certify steps every
//! caller repeats (new key and CSR, call, check the answer before it is used).
//!
//! The agent and the sidecar depend on this crate and `identity`, never on the CA server.

pub mod certify;
pub mod client;
pub mod link;
pub mod replicas;
pub mod wire;

pub use client::{ClientError, Connection, client_config, fetch_bundle_pinned, held_roots};
pub use link::LinkError;
pub use replicas::CaSet;
