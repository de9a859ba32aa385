//! The mesh's fixed numbers, shared by `kith sidecar init` (the capture rules), `kith sidecar
//! run` (its listeners), `kith inject` (the pod it writes) and `kith ca` (the token audience).
//! They must agree, so they are written once, here.

/// The proxy runs as this UID and GID; `kith sidecar init` exempts sockets of a process with
/// both from capture (the proxy's own outbound connections), and no app container may use them.
pub const PROXY_UID: u32 = 1337;
pub const PROXY_GID: u32 = 1337;
/// Transparent mode: captured outbound connections are redirected here (on 127.0.0.1 and ::1).
pub const OUTBOUND_PORT: u16 = 15001;
/// Transparent mode: captured inbound connections are redirected here.
pub const INBOUND_PORT: u16 = 15006;
/// The sidecar's admin port: `/live`, `/ready`, `/metrics`, the app's rewritten probes.
pub const SIDECAR_ADMIN_PORT: u16 = 15020;
/// The agent's admin port.
pub const AGENT_ADMIN_PORT: u16 = 15021;
/// The ports inbound capture never redirects.
pub const SIDECAR_PORTS: [u16; 4] = [
    OUTBOUND_PORT,
    INBOUND_PORT,
    SIDECAR_ADMIN_PORT,
    AGENT_ADMIN_PORT,
];
/// The audience pods request for their projected service-account token, and that the CA
/// requires (`--k8s-audience`).
pub const TOKEN_AUDIENCE: &str = "kith-ca";

/// Log events that other programs read (`kith demo`'s live view, the pod lab, the tests), so
/// their text is a contract, written once. They are the `message` of a log line at debug level
/// (JSON logs: `fields.message`).
pub mod events {
    /// A proxied connection finished its mTLS handshake; its fields: `direction`, `peer` (the
    /// peer's SPIFFE ID), `tls`, `suite`, `kx` (the key-exchange group).
    pub const MTLS_ESTABLISHED: &str = "mTLS connection established";
}
