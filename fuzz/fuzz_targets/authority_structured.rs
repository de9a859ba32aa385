//! Structure-aware and differential: header blocks built from arbitrary fields, HPACK-encoded
//! by a second implementation (the `hpack` crate's stateful encoder, with dynamic-table
//! references across the blocks of one connection), framed as HEADERS + CONTINUATION with
//! arbitrary splits, padding, priority and DATA frames between, fed to the `:authority` shim
//! in arbitrary read sizes. The shim's output is decoded with the `hpack` crate's decoder and
//! must equal the input, field by field, with only a `:authority` that h2 refuses changed (to
//! `localhost`); DATA frames pass unchanged. The shim may refuse a connection only for a
//! header list past its limit.
#![no_main]

use arbitrary::Arbitrary;
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use agent::workload_api::fuzzing::{AuthorityShim, MAX_HEADER_LIST};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const MAX_FRAME: usize = 16_384;

#[derive(Arbitrary, Debug)]
enum Name {
    Method,
    Scheme,
    Path,
    Authority,
    ContentType,
    Te,
    UserAgent,
    GrpcTimeout,
    Custom(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum Value {
    /// What grpcio sends for `unix:///run/agent.sock`.
    SocketPath,
    Localhost,
    Bytes(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Block {
    fields: Vec<(Name, Value)>,
    /// Where the encoded block is cut into HEADERS and CONTINUATION fragments.
    cuts: Vec<u16>,
    padding: Option<u8>,
    priority: Option<[u8; 5]>,
    end_stream: bool,
    /// A DATA frame sent before this block.
    data_before: Option<Vec<u8>>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    blocks: Vec<Block>,
    read_sizes: Vec<u8>,
}

fn name(n: &Name) -> Vec<u8> {
    match n {
        Name::Method => b":method".to_vec(),
        Name::Scheme => b":scheme".to_vec(),
        Name::Path => b":path".to_vec(),
        Name::Authority => b":authority".to_vec(),
        Name::ContentType => b"content-type".to_vec(),
        Name::Te => b"te".to_vec(),
        Name::UserAgent => b"user-agent".to_vec(),
        Name::GrpcTimeout => b"grpc-timeout".to_vec(),
        Name::Custom(b) => b.clone(),
    }
}

fn value(v: &Value) -> Vec<u8> {
    match v {
        Value::SocketPath => b"%2Frun%2Fagent.sock".to_vec(),
        Value::Localhost => b"localhost".to_vec(),
        Value::Bytes(b) => b.clone(),
    }
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8], out: &mut Vec<u8>) {
    let len = payload.len() as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// The frames of the shim's output: (type, flags, stream, payload).
fn frames(mut bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        assert!(bytes.len() >= 9, "truncated frame header in shim output");
        let len = usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
        let stream = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]);
        assert!(bytes.len() >= 9 + len, "truncated frame in shim output");
        out.push((bytes[3], bytes[4], stream, bytes[9..9 + len].to_vec()));
        bytes = &bytes[9 + len..];
    }
    out
}

type Fields = Vec<(Vec<u8>, Vec<u8>)>;

fuzz_target!(|input: Input| {
    let mut encoder = hpack::Encoder::new();
    let mut wire = PREFACE.to_vec();
    // What must come out: DATA payloads and decoded header lists, in order.
    let mut expected: Vec<Result<Vec<u8>, Fields>> = Vec::new();
    let mut over_limit = false;
    for (i, block) in input.blocks.iter().take(8).enumerate() {
        let stream = 1 + 2 * i as u32;
        if let Some(data) = &block.data_before {
            frame(0x0, 0, stream, data, &mut wire);
            expected.push(Ok(data.clone()));
        }
        let fields: Fields = block
            .fields
            .iter()
            .take(32)
            .map(|(n, v)| (name(n), value(v)))
            .collect();
        let list: usize = fields.iter().map(|(n, v)| n.len() + v.len() + 32).sum();
        let encoded = encoder.encode(fields.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        if list > MAX_HEADER_LIST || encoded.len() > MAX_HEADER_LIST {
            over_limit = true;
        }
        // Fragments: cut points within the block, each fragment at most a frame.
        let mut cuts: Vec<usize> = block
            .cuts
            .iter()
            .take(8)
            .map(|c| usize::from(*c) % (encoded.len() + 1))
            .collect();
        let mut at = MAX_FRAME / 2;
        while at < encoded.len() {
            cuts.push(at);
            at += MAX_FRAME / 2;
        }
        cuts.push(0);
        cuts.push(encoded.len());
        cuts.sort_unstable();
        cuts.dedup();
        let pieces: Vec<&[u8]> = cuts.windows(2).map(|w| &encoded[w[0]..w[1]]).collect();
        let pieces = if pieces.is_empty() {
            vec![&encoded[..]]
        } else {
            pieces
        };
        for (j, piece) in pieces.iter().enumerate() {
            let last = j + 1 == pieces.len();
            let mut flags = if last { 0x4 } else { 0 };
            if j == 0 {
                let mut payload = Vec::new();
                if let Some(pad) = block.padding {
                    flags |= 0x8;
                    payload.push(pad);
                }
                if let Some(p) = block.priority {
                    flags |= 0x20;
                    payload.extend_from_slice(&p);
                }
                payload.extend_from_slice(piece);
                if let Some(pad) = block.padding {
                    payload.resize(payload.len() + usize::from(pad), 0);
                }
                if block.end_stream {
                    flags |= 0x1;
                }
                frame(0x1, flags, stream, &payload, &mut wire);
            } else {
                frame(0x9, flags, stream, piece, &mut wire);
            }
        }
        let want: Fields = fields
            .into_iter()
            .map(|(n, v)| {
                if n == b":authority" && http::uri::Authority::try_from(v.as_slice()).is_err() {
                    (n, b"localhost".to_vec())
                } else {
                    (n, v)
                }
            })
            .collect();
        expected.push(Err(want));
    }

    let mut shim = AuthorityShim::default();
    let mut out = BytesMut::new();
    let mut sizes = input.read_sizes.iter().cycle();
    let mut rest = &wire[..];
    while !rest.is_empty() {
        let n = sizes
            .next()
            .map_or(rest.len(), |s| usize::from(*s).max(1) * 16)
            .min(rest.len());
        if let Err(e) = shim.feed(&rest[..n], &mut out) {
            assert!(over_limit, "shim refused a valid connection: {e}");
            assert_eq!(shim.failure_reason(), Some("http2_header_list_too_large"));
            return;
        }
        rest = &rest[n..];
    }
    assert!(out.starts_with(PREFACE), "preface passes unchanged");
    let mut decoder = hpack::Decoder::new();
    let mut got: Vec<Result<Vec<u8>, Fields>> = Vec::new();
    let mut block = Vec::new();
    for (kind, flags, _stream, payload) in frames(&out[PREFACE.len()..]) {
        match kind {
            0x0 => got.push(Ok(payload)),
            0x1 | 0x9 => {
                assert_eq!(flags & 0x8, 0, "PADDED is dropped");
                let start = if kind == 0x1 && flags & 0x20 != 0 {
                    5
                } else {
                    0
                };
                block.extend_from_slice(&payload[start..]);
                if flags & 0x4 != 0 {
                    let fields = decoder.decode(&block).expect("shim output is valid HPACK");
                    got.push(Err(fields));
                    block.clear();
                }
            }
            other => panic!("unexpected frame type {other}"),
        }
    }
    assert!(!over_limit || got.len() == expected.len());
    assert_eq!(got, expected);
});
