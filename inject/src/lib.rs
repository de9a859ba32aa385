//! `kith inject`: puts kith into Kubernetes pods. The same transformation ([`pod`]) runs
//! offline on manifests ([`manifest`], like `istioctl kube-inject`) and as a mutating admission
//! webhook ([`review`], [`server`]).
#![forbid(unsafe_code)]

pub mod emit;
pub mod manifest;
pub mod metrics;
pub mod pod;
pub mod review;
pub mod server;
pub mod settings;
pub mod tls;
