//! `kith agent`: proves the node to the CA, keeps node and workload SVIDs fresh, and serves them
//! to local workloads over the SPIFFE Workload API; `kith agent fetch` writes them to files for
//! programs that only read files.

pub mod admin;
pub mod agent;
pub mod attest;
pub mod docker;
pub mod fetch;
pub mod metrics;
pub mod node;
pub mod run;
pub mod snapshot;
pub mod workload_api;
pub mod workload_store;
