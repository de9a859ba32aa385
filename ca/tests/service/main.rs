//! The CA's tests in its own process: issuance, renewal, rotation, the stores, the listeners,
//! bad input, replicas. Each module is one behaviour.
//!
//! One test binary for all of them: one link instead of 19, and libtest runs the modules'
//! tests side by side where 19 binaries ran one after another. `cargo test -p ca --test service
//! replicas::` runs one module.

mod common;

mod audit_flood;
mod bad_input;
mod issuance;
mod issuance_rules;
mod k8s_and_jwt;
mod k8s_tokens;
mod listeners;
mod readiness;
mod renewal;
mod replicas;
mod root_rollover;
mod rotation;
mod sealed_keys;
mod store;
mod store_replicas;
mod store_tls;
mod time_to_outage;
mod upstream;
