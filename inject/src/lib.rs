//! `kith inject`: puts kith into Kubernetes pods. The same transformation runs offline on
//! manifests ([`manifest`], like `istioctl kube-inject`) and as a mutating admission webhook
//! ([`review`], [`server`]).
#![forbid(unsafe_code)]

pub mod emit;
pub mod manifest;
pub mod pod;
pub mod review;
pub mod settings;
