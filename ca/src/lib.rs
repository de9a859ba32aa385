//! `kith ca`: the CA service. It issues short-lived X509-SVIDs and JWT-SVIDs only to callers that
//! proved who they are (join token, Kubernetes service-account token, or a current SVID), keeps
//! its keys sealed, and records every issuance and refusal in an audit log chained by a MAC keyed from its KEK.

pub mod authority;
pub mod csr;
pub mod guard;
pub mod k8s;
pub mod metrics;
pub mod outage;
pub mod ready;
pub mod rollover;
pub mod seal;
pub mod selector;
pub mod service;
pub mod store;

pub mod admin;
pub mod admin_client;
pub mod api;
pub mod config;
pub mod migrate;
pub mod server;
pub mod tls;
