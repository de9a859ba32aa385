//! The first bytes of a connection the inbound proxy accepts: the first-byte decision
//! (`0x16`: TLS, anything else: plaintext), then, for TLS, what `tunnel::inbound` does with
//! them: rustls' `Acceptor` reads the ClientHello, `offers_mesh` picks the mesh or the edge
//! configuration (the proxy's real server configurations, with session tickets), and the
//! server connection takes the rest of the bytes.
#![no_main]

use std::io::Cursor;
use std::sync::{Arc, LazyLock};

use libfuzzer_sys::fuzz_target;
use proxy::tls::{IdentityHandle, edge_server_config, server_config};
use rustls::ServerConfig;
use rustls::server::Acceptor;

struct Configs {
    mesh: Arc<ServerConfig>,
    edge: Arc<ServerConfig>,
}

static CONFIGS: LazyLock<Configs> = LazyLock::new(|| {
    let identity = IdentityHandle::new();
    Configs {
        mesh: server_config(&identity).expect("mesh server config"),
        edge: edge_server_config(&identity).expect("edge server config"),
    }
});

fuzz_target!(|data: &[u8]| {
    // An empty first read is a failed handshake; a first byte other than a handshake record
    // is plaintext (permissive mode forwards it untouched; nothing is parsed).
    if data.first() != Some(&proxy::fuzzing::TLS_HANDSHAKE) {
        return;
    }
    let mut acceptor = Acceptor::default();
    let mut input = Cursor::new(data);
    let accepted = loop {
        match acceptor.read_tls(&mut input) {
            Ok(0) => return,
            Ok(_) => {}
            Err(_) => return,
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => break accepted,
            Ok(None) => continue,
            Err(_) => return,
        }
    };
    let mesh = proxy::fuzzing::offers_mesh(&accepted.client_hello());
    let config = if mesh {
        CONFIGS.mesh.clone()
    } else {
        CONFIGS.edge.clone()
    };
    let Ok(mut conn) = accepted.into_connection(config) else {
        return;
    };
    loop {
        match conn.read_tls(&mut input) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if conn.process_new_packets().is_err() {
            return;
        }
    }
});
