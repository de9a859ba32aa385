//! The tests of the `kith` binary as its users run it: each module is one behaviour of one
//! command, run against the real binary (`CARGO_BIN_EXE_kith`) and real tools.
//!
//! One test binary for all of them, as cargo's own test suite does: one link instead of 25, and
//! libtest runs the modules' tests side by side (most of them wait on child processes and
//! certificate lifetimes, not on the CPU), where 25 binaries ran one after another.
//! `cargo test --test commands demo_cli::` runs one module.

mod common;
mod replicas;

mod agent_break_glass;
mod agent_cli;
mod ca_cli;
mod ca_cli_output;
mod ca_replicas;
mod ca_replicas_survive_failures;
mod ca_standby_promotion;
mod ca_store_migrate;
mod ca_upstream_cli;
mod certs_bad_input;
mod certs_interop;
mod certs_verify_rejects;
mod demo_cli;
mod deploy_kubernetes;
mod deploy_systemd;
mod docker_compose;
mod inject_cli;
mod kubernetes_pods;
mod root_rollover;
mod sidecar_bad_input;
mod sidecar_ca_failover;
mod sidecar_cli;
mod sidecar_expect_id;
mod sidecar_identity;
mod sidecar_init_ipv6;
