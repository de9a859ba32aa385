//! Generates the Workload API server from `proto/workloadapi.proto`. protox parses the file in
//! pure Rust (with the well-known types built in), so building kith needs no `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    const PROTO: &str = "proto/workloadapi.proto";
    println!("cargo:rerun-if-changed={PROTO}");
    let fds = protox::compile([PROTO], ["proto"])?;
    tonic_prost_build::configure()
        // Clients come from the spiffe crate and raw h2 in tests; the agent only serves.
        .build_client(false)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
