//! One module per command: flags (each also an environment variable where a deployment sets
//! it), their validation, and the wiring of the libraries that do the work.

pub mod agent;
pub mod ca;
pub mod demo;
pub mod fetch;
pub mod inject;
pub mod sidecar;
