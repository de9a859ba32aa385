//! `kith agent` (and, in a later issue, `kith sidecar`): proves the node to the CA, keeps node
//! and workload SVIDs fresh, and serves them to local workloads over the SPIFFE Workload API.

pub mod admin;
pub mod agent;
pub mod app_probe;
pub mod attest;
pub mod ca_link;
pub mod ca_set;
pub mod capture;
pub mod cli;
pub mod docker;
pub mod fetch;
pub mod metrics;
pub mod node;
pub mod own_socket;
pub mod source;
pub mod state;
pub mod tunnel_cli;
pub mod tunnel_config;
pub mod workers;
pub mod workload_api;
pub mod workload_store;
