//! `kith agent` (and, in a later issue, `kith sidecar`): proves the node to the CA, keeps node
//! and workload SVIDs fresh, and serves them to local workloads over the SPIFFE Workload API.

pub mod agent;
pub mod ca_link;
pub mod metrics;
pub mod node;
pub mod state;
