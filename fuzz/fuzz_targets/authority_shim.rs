//! Client bytes of a Workload API connection into the `:authority` shim (the HTTP/2 preface,
//! frames, HPACK header blocks), fed in chunks the input chooses, as reads would deliver them.
//! A failed connection must say why and stay failed.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use agent::workload_api::fuzzing::AuthorityShim;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fuzz_target!(|data: &[u8]| {
    // The first byte picks the read size (1..=256), so both whole-block and byte-by-byte
    // delivery are explored. Inputs without the preface get it prepended half the time, so the
    // frame parser is reached from raw bytes too.
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(split & 0x7f) * 2 + 1;
    let mut input = Vec::with_capacity(rest.len() + PREFACE.len());
    if split & 0x80 != 0 && !rest.starts_with(PREFACE) {
        input.extend_from_slice(PREFACE);
    }
    input.extend_from_slice(rest);
    let mut shim = AuthorityShim::default();
    let mut out = BytesMut::new();
    for piece in input.chunks(chunk) {
        if shim.feed(piece, &mut out).is_err() {
            assert!(shim.failure_reason().is_some());
            // A dead connection stays dead.
            assert!(shim.feed(b"x", &mut out).is_err());
            return;
        }
    }
});
