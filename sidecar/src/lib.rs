//! `kith sidecar`: `run` is the mTLS proxy with its identity from files, from the CA (a pod's
//! service-account token) or from a `kith agent` over the Workload API; `init` programs a pod's
//! network namespace so that the proxy sees its traffic. [`run()`] serves a validated
//! [`Config`] (the binary only turns flags into it).

pub mod admin;
pub mod app_probe;
pub mod capture;
pub mod own_socket;
pub mod run;
pub mod source;
pub mod tunnel_config;
pub mod workers;

pub use run::{Config, Mode, RunError, Transparent, default_workers, run};
