//! The test kit every test crate of the workspace shares ([`wait`]: waiting for a condition;
//! [`pki`]: per-test PKIs; [`ca`], feature `ca`: a CA in the test's process; [`skip`]: the rule
//! for a test that cannot run here), the pod lab ([`lab`]), the
//! processes tests start ([`process`]) and a cluster's signing key ([`cluster`]), these three
//! re-exported at the root.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[cfg(feature = "ca")]
pub mod ca;
pub mod cluster;
pub mod kubelet;
pub mod lab;
pub mod pcap;
pub mod pki;
pub mod ports;
pub mod postgres;
pub mod process;
pub mod skip;
pub mod static_build;
pub mod wait;

pub use cluster::*;
pub use lab::*;
pub use process::*;
pub use wait::{eventually, eventually_async};
