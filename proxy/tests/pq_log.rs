//! The connection log names the negotiated key-exchange group (`kx=X25519MLKEM768`). Alone in
//! its file: a tracing subscriber scoped to one test thread would miss events whose callsites
//! another test's thread registered first.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use common::*;
use identity::SpiffeId;
use proxy::{ExpectedPeer, Policy};

const CLIENT: &str = "spiffe://example.test/client";
const SERVER: &str = "spiffe://example.test/server";

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One thread: the subscriber set for this test's thread sees every task of both proxies.
#[tokio::test(flavor = "current_thread")]
async fn the_connection_log_names_the_group() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let pki = Pki::new("example.test");
    let server = handle(pki.svid(SERVER), pki.bundle());
    let client = handle(pki.svid(CLIENT), pki.bundle());
    let backend = echo_backend().await;
    let server_end = inbound(server, Policy::new(pki.td.clone()), backend).await;
    let expect = ExpectedPeer::Id(SpiffeId::new(SERVER).unwrap());
    let outbound = outbound(client, server_end.addr, expect).await;
    let got = within(round_trip(outbound.addr, b"ping")).await.unwrap();
    assert_eq!(got, b"ping");
    let text = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
    let established: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(identity::mesh::events::MTLS_ESTABLISHED))
        .collect();
    assert_eq!(established.len(), 2, "inbound and outbound:\n{text}");
    for line in established {
        assert!(
            line.contains("kx=\"X25519MLKEM768\"") || line.contains("kx=X25519MLKEM768"),
            "{line}"
        );
    }
}
