//! A connection-level shim in front of h2 that makes the Workload API usable by gRPC C-core
//! clients (Python `grpcio`, and Ruby, PHP, … built on it) and others that send the socket path
//! as `:authority`.
//!
//! Such a client dialing `unix:///run/agent.sock` sends `:authority: %2Frun%2Fagent.sock`. h2
//! 0.4 parses `:authority` with `http::uri::Authority`, which refuses `%` in a host, and resets
//! the stream as malformed before tonic ever sees the request (the client reports INTERNAL
//! "Stream removed"). No tower layer can help, so the fix sits on the byte stream:
//!
//! - client→server bytes go through [`Rewriter`]: the 24-byte connection preface and every frame
//!   except HEADERS and CONTINUATION pass unchanged; each complete header block (a HEADERS frame
//!   and its CONTINUATIONs) is HPACK-decoded, a `:authority` that h2 would refuse is replaced by
//!   `localhost`, and the block is re-encoded as one HEADERS frame (split into CONTINUATIONs
//!   past 16 KiB), PADDED dropped, PRIORITY and END_STREAM kept;
//! - server→client bytes are not touched.
//!
//! HPACK is stateful: the client's encoder assumes our decoder's dynamic table mirrors its
//! inserts, so the shim decodes *every* block with one decoder per connection (honouring the
//! client's table size updates, bounded by the 4096 bytes h2 advertises by not sending
//! SETTINGS_HEADER_TABLE_SIZE). Toward h2 it re-encodes every field as a literal without
//! indexing, so h2's decoder table stays empty and no state has to match.
//!
//! Memory: the shim applies h2's header list limit itself ([`MAX_HEADER_LIST`], the 16 KiB the
//! server advertises as SETTINGS_MAX_HEADER_LIST_SIZE), before h2 sees anything. It stops
//! reading a header block once its compressed bytes pass the limit (a frame announcing more is
//! refused from its 9-byte header), and stops decoding once the list passes it; the connection
//! then fails with "header list too large". So what one connection can make the agent hold is a
//! few times 16 KiB, and what one block costs to decode is bounded by the limit too, however the
//! client packs its headers (the decoder is [`super::hpack`]: see there why it is our own).
//!
//! Anything the shim cannot make sense of (a bad HPACK block, a CONTINUATION out of place, a
//! header block past the limit) fails the connection with an I/O error, whose reason
//! [`AuthorityFix::failure_reason`] gives for metrics and logs; nothing here panics on input.
//!
//! Why this is one file of over 500 lines: one connection-level shim: the HTTP/2 frame walk, the
//! HPACK decoding (in `hpack.rs`) and the rewrite must agree byte for byte.

use std::io;
use std::ops::ControlFlow;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::hpack;

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_LEN: usize = 9;

const TYPE_HEADERS: u8 = 0x1;
const TYPE_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;

/// Largest decoded header list (RFC 7541 §4.1 sizes: name + value + 32 per field) the server
/// accepts: what it advertises as SETTINGS_MAX_HEADER_LIST_SIZE (hyper's default, set
/// explicitly on the server) and what h2 would apply after the shim. Workload API requests carry
/// a handful of short headers.
pub(crate) const MAX_HEADER_LIST: usize = 16 * 1024;
/// Largest header block, in compressed bytes over HEADERS + CONTINUATION: an encoder never needs
/// more bytes than the list's size (every field costs 32 in the list and at least 1 on the
/// wire), so a block past the list limit cannot decode to a list within it, bar a perverse
/// Huffman coding, and is refused unread.
pub(crate) const MAX_HEADER_BLOCK: usize = MAX_HEADER_LIST;

/// SETTINGS_HEADER_TABLE_SIZE as the server advertises it: h2 does not send the setting, so the
/// protocol default holds and the client may grow its table to this much, no more.
const HEADER_TABLE_SIZE: usize = 4096;

/// SETTINGS_MAX_FRAME_SIZE's initial value: every HTTP/2 server accepts frames this large.
const MAX_FRAME: usize = 16_384;

/// What replaces a `:authority` that h2 would refuse.
const REPLACEMENT_AUTHORITY: &[u8] = b"localhost";

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Reasons (metric labels) for a failed connection.
const TOO_LARGE: &str = "http2_header_list_too_large";
const MALFORMED: &str = "http2_header_block_malformed";

fn too_large(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, ShimError(TOO_LARGE, msg.into()))
}

/// An error with its reason, so that [`Rewriter::failure_reason`] can tell them apart.
#[derive(Debug)]
struct ShimError(&'static str, String);

impl std::fmt::Display for ShimError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.1)
    }
}

impl std::error::Error for ShimError {}

#[derive(Debug)]
enum State {
    /// Waiting for the 24-byte preface.
    Preface,
    /// Between frames, or `skip` bytes into the payload of a frame passed through as it is.
    Frames { skip: usize },
    /// The stream did not start with the HTTP/2 preface: everything passes untouched and h2
    /// gives its own answer.
    Opaque,
}

/// A header block being gathered from a HEADERS frame and its CONTINUATIONs.
#[derive(Debug)]
struct Pending {
    stream: u32,
    flags: u8,
    priority: Option<[u8; 5]>,
}

/// The client→server half of the shim, with no I/O: bytes in, rewritten bytes out.
pub(crate) struct Rewriter {
    state: State,
    input: BytesMut,
    decoder: hpack::Decoder,
    pending: Option<Pending>,
    block: Vec<u8>,
    /// Set once a call failed, with why: the connection is dead.
    failed: Option<&'static str>,
    /// Whether a complete header block (a request) went through.
    saw_request: bool,
}

impl Default for Rewriter {
    fn default() -> Self {
        Self {
            state: State::Preface,
            input: BytesMut::new(),
            decoder: hpack::Decoder::new(HEADER_TABLE_SIZE),
            pending: None,
            block: Vec::new(),
            failed: None,
            saw_request: false,
        }
    }
}

impl Rewriter {
    /// Takes the next bytes the client sent and appends to `out` everything that can be
    /// forwarded to h2 so far. Bytes of an incomplete header block stay here until the rest
    /// arrives.
    pub(crate) fn feed(&mut self, bytes: &[u8], out: &mut BytesMut) -> io::Result<()> {
        if self.failed.is_some() {
            return Err(invalid("http/2 shim already failed"));
        }
        self.input.extend_from_slice(bytes);
        let result = self.process(out);
        if let Err(e) = &result {
            let reason = e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<ShimError>())
                .map_or(MALFORMED, |s| s.0);
            self.failed = Some(reason);
            // Nothing more is kept for a dead connection.
            self.input = BytesMut::new();
            self.block = Vec::new();
        }
        result
    }

    /// Why the connection failed, once it did.
    pub(crate) fn failure_reason(&self) -> Option<&'static str> {
        self.failed
    }

    /// Whether a complete request header block has been seen.
    pub(crate) fn saw_request(&self) -> bool {
        self.saw_request
    }

    fn process(&mut self, out: &mut BytesMut) -> io::Result<()> {
        loop {
            match self.state {
                State::Opaque => {
                    out.extend_from_slice(&self.input.split());
                    return Ok(());
                }
                State::Preface => {
                    let n = self.input.len().min(PREFACE.len());
                    if self.input[..n] != PREFACE[..n] {
                        self.state = State::Opaque;
                        continue;
                    }
                    if n < PREFACE.len() {
                        return Ok(());
                    }
                    out.extend_from_slice(&self.input.split_to(PREFACE.len()));
                    self.state = State::Frames { skip: 0 };
                }
                State::Frames { skip } if skip > 0 => {
                    if self.input.is_empty() {
                        return Ok(());
                    }
                    let n = skip.min(self.input.len());
                    out.extend_from_slice(&self.input.split_to(n));
                    self.state = State::Frames { skip: skip - n };
                }
                State::Frames { .. } => {
                    if self.input.len() < FRAME_HEADER_LEN {
                        return Ok(());
                    }
                    let h = &self.input[..FRAME_HEADER_LEN];
                    let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
                    let (kind, flags) = (h[3], h[4]);
                    let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                    let header_frame = kind == TYPE_HEADERS || kind == TYPE_CONTINUATION;
                    if !header_frame {
                        if self.pending.is_some() {
                            return Err(invalid(
                                "http/2 frame inside a header block (CONTINUATION expected)",
                            ));
                        }
                        out.extend_from_slice(&self.input.split_to(FRAME_HEADER_LEN));
                        self.state = State::Frames { skip: len };
                        continue;
                    }
                    // A header frame is rewritten whole: its payload must fit the cap (plus
                    // padding and priority), and the block gathered so far with it. Refused from
                    // the frame header, before its payload is read.
                    if len > MAX_HEADER_BLOCK + 256
                        || self.block.len() + len > MAX_HEADER_BLOCK + 256
                    {
                        return Err(too_large(format!(
                            "http/2 header block larger than the {MAX_HEADER_LIST}-byte header list limit"
                        )));
                    }
                    if self.input.len() < FRAME_HEADER_LEN + len {
                        self.input
                            .reserve(FRAME_HEADER_LEN + len - self.input.len());
                        return Ok(());
                    }
                    self.input.advance(FRAME_HEADER_LEN);
                    let payload = self.input.split_to(len);
                    if kind == TYPE_HEADERS {
                        self.headers(stream, flags, &payload)?;
                    } else {
                        self.continuation(stream, flags, &payload)?;
                    }
                    if flags & FLAG_END_HEADERS != 0 {
                        self.finish_block(out)?;
                    }
                }
            }
        }
    }

    fn headers(&mut self, stream: u32, flags: u8, payload: &[u8]) -> io::Result<()> {
        if self.pending.is_some() {
            return Err(invalid("http/2 HEADERS inside a header block"));
        }
        if stream == 0 {
            return Err(invalid("http/2 HEADERS on stream 0"));
        }
        let mut rest = payload;
        let mut pad = 0;
        if flags & FLAG_PADDED != 0 {
            let (&p, tail) = rest
                .split_first()
                .ok_or_else(|| invalid("http/2 HEADERS: padding length missing"))?;
            pad = usize::from(p);
            rest = tail;
        }
        let mut priority = None;
        if flags & FLAG_PRIORITY != 0 {
            let (p, tail) = rest
                .split_first_chunk::<5>()
                .ok_or_else(|| invalid("http/2 HEADERS: priority fields missing"))?;
            priority = Some(*p);
            rest = tail;
        }
        let fragment_len = rest
            .len()
            .checked_sub(pad)
            .ok_or_else(|| invalid("http/2 HEADERS: padding longer than the frame"))?;
        self.pending = Some(Pending {
            stream,
            flags,
            priority,
        });
        self.append(&rest[..fragment_len])
    }

    fn continuation(&mut self, stream: u32, _flags: u8, payload: &[u8]) -> io::Result<()> {
        match &self.pending {
            Some(p) if p.stream == stream => self.append(payload),
            _ => Err(invalid(
                "http/2 CONTINUATION without a header block on its stream",
            )),
        }
    }

    fn append(&mut self, fragment: &[u8]) -> io::Result<()> {
        if self.block.len() + fragment.len() > MAX_HEADER_BLOCK {
            return Err(too_large(format!(
                "http/2 header block larger than the {MAX_HEADER_LIST}-byte header list limit"
            )));
        }
        self.block.extend_from_slice(fragment);
        Ok(())
    }

    /// Decodes the gathered block, fixes `:authority`, and writes it out re-encoded.
    fn finish_block(&mut self, out: &mut BytesMut) -> io::Result<()> {
        let pending = self
            .pending
            .take()
            .ok_or_else(|| invalid("http/2 header block end without a start"))?;
        let block = std::mem::take(&mut self.block);
        let mut fields: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut list_size = 0usize;
        self.decoder
            .decode(&block, |name, value| {
                // RFC 7541 §4.1 sizes; past the cap the block is refused below, so decoding
                // stops there: what a block costs is bounded by the limit, not by how many
                // tiny fields or table references the client packed into it.
                list_size += name.len() + value.len() + hpack::ENTRY_OVERHEAD;
                if list_size > MAX_HEADER_LIST {
                    return ControlFlow::Break(());
                }
                fields.push((name.to_vec(), value.to_vec()));
                ControlFlow::Continue(())
            })
            .map_err(|e| invalid(format!("http/2 header block: hpack: {e}")))?;
        if list_size > MAX_HEADER_LIST {
            return Err(too_large(format!(
                "http/2 header list too large: {list_size} bytes decoded, limit {MAX_HEADER_LIST}"
            )));
        }
        self.saw_request = true;

        let mut encoded = Vec::with_capacity(block.len() + 64);
        for (name, value) in &fields {
            let value: &[u8] = if name == b":authority" && !acceptable_authority(value) {
                REPLACEMENT_AUTHORITY
            } else {
                value
            };
            encode_literal(name, value, &mut encoded);
        }
        write_header_frames(&pending, &encoded, out);
        Ok(())
    }
}

/// Whether h2 takes this `:authority`: it parses it exactly so.
fn acceptable_authority(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

/// RFC 7541 §5.1 integer with an `n`-bit prefix; `first` holds the pattern bits above it.
fn encode_int(mut value: usize, n: u8, first: u8, out: &mut Vec<u8>) {
    let max = (1usize << n) - 1;
    if value < max {
        // value < 2^n <= 128 fits a byte.
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

/// A field as "literal header field without indexing — new name" (RFC 7541 §6.2.2), strings
/// not Huffman-coded: h2's decoder keeps no state from it.
fn encode_literal(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    out.push(0x00);
    for s in [name, value] {
        encode_int(s.len(), 7, 0x00, out);
        out.extend_from_slice(s);
    }
}

/// One HEADERS frame and as many CONTINUATIONs as the block needs, none over 16 KiB.
fn write_header_frames(pending: &Pending, block: &[u8], out: &mut BytesMut) {
    let priority_len = if pending.priority.is_some() { 5 } else { 0 };
    let first_room = MAX_FRAME - priority_len;
    let (first, mut rest) = block.split_at(block.len().min(first_room));
    let mut flags = pending.flags & (FLAG_END_STREAM | FLAG_PRIORITY);
    if rest.is_empty() {
        flags |= FLAG_END_HEADERS;
    }
    frame_header(
        first.len() + priority_len,
        TYPE_HEADERS,
        flags,
        pending.stream,
        out,
    );
    if let Some(p) = pending.priority {
        out.extend_from_slice(&p);
    }
    out.extend_from_slice(first);
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(rest.len().min(MAX_FRAME));
        let flags = if tail.is_empty() { FLAG_END_HEADERS } else { 0 };
        frame_header(chunk.len(), TYPE_CONTINUATION, flags, pending.stream, out);
        out.extend_from_slice(chunk);
        rest = tail;
    }
}

fn frame_header(len: usize, kind: u8, flags: u8, stream: u32, out: &mut BytesMut) {
    // len <= MAX_FRAME < 2^24.
    out.put_uint(len as u64, 3);
    out.put_u8(kind);
    out.put_u8(flags);
    out.put_u32(stream);
}

/// An accepted connection with the client→server bytes going through a [`Rewriter`]; writes
/// go straight to `inner`.
pub(crate) struct AuthorityFix<T> {
    inner: T,
    rewriter: Rewriter,
    /// Rewritten bytes not yet read by h2.
    out: BytesMut,
    eof: bool,
}

impl<T> AuthorityFix<T> {
    pub(crate) fn new(inner: T) -> Self {
        Self {
            inner,
            rewriter: Rewriter::default(),
            out: BytesMut::new(),
            eof: false,
        }
    }

    /// Why the client's bytes were refused, once they were.
    pub(crate) fn failure_reason(&self) -> Option<&'static str> {
        self.rewriter.failure_reason()
    }

    /// Whether the client sent a complete request header block.
    pub(crate) fn saw_request(&self) -> bool {
        self.rewriter.saw_request()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for AuthorityFix<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.out.is_empty() {
                let n = this.out.len().min(buf.remaining());
                buf.put_slice(&this.out.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                // A header block cut short by EOF is dropped: h2 sees the connection end.
                return Poll::Ready(Ok(()));
            }
            let mut scratch = [0u8; 8192];
            let mut raw = ReadBuf::new(&mut scratch);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut raw))?;
            if raw.filled().is_empty() {
                this.eof = true;
                continue;
            }
            this.rewriter.feed(raw.filled(), &mut this.out)?;
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const SETTINGS_EMPTY: &[u8] = &[0, 0, 0, 0x4, 0, 0, 0, 0, 0];

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        frame_header(payload.len(), kind, flags, stream, &mut out);
        out.extend_from_slice(payload);
        out.to_vec()
    }

    fn lit_indexed_name(index: u8, value: &[u8]) -> Vec<u8> {
        // Literal with incremental indexing, indexed name (6-bit prefix; index < 63 here).
        let mut out = vec![0x40 | index];
        encode_int(value.len(), 7, 0, &mut out);
        out.extend_from_slice(value);
        out
    }

    /// A gRPC request block: :method POST, :scheme http, :path, :authority (indexed into the
    /// dynamic table), content-type, te.
    fn request_block(authority: &[u8]) -> Vec<u8> {
        let mut b = vec![0x83, 0x86];
        b.extend(lit_indexed_name(4, b"/SpiffeWorkloadAPI/FetchX509SVID"));
        b.extend(lit_indexed_name(1, authority));
        b.extend(lit_indexed_name(31, b"application/grpc"));
        let mut te = Vec::new();
        encode_literal(b"te", b"trailers", &mut te);
        b.extend(te);
        b
    }

    /// Parses `bytes` (after the preface) into frames: (type, flags, stream, payload).
    fn frames(mut bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        let mut all = Vec::new();
        while !bytes.is_empty() {
            let len =
                usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
            let stream = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]);
            all.push((bytes[3], bytes[4], stream, bytes[9..9 + len].to_vec()));
            bytes = &bytes[9 + len..];
        }
        all
    }

    /// Decodes a rewritten block with a fresh decoder: it must need no table state.
    fn decode_fresh(block: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut fields = Vec::new();
        hpack::Decoder::new(HEADER_TABLE_SIZE)
            .decode(block, |n, v| {
                fields.push((n.to_vec(), v.to_vec()));
                ControlFlow::Continue(())
            })
            .unwrap();
        fields
    }

    fn authority_of(fields: &[(Vec<u8>, Vec<u8>)]) -> &[u8] {
        &fields.iter().find(|(n, _)| n == b":authority").unwrap().1
    }

    fn run(input: &[u8]) -> io::Result<Vec<u8>> {
        let mut r = Rewriter::default();
        let mut out = BytesMut::new();
        r.feed(input, &mut out)?;
        Ok(out.to_vec())
    }

    #[test]
    fn rewrites_a_percent_encoded_authority_and_passes_the_rest() {
        let data = frame(0x0, 0x1, 1, b"\0\0\0\0\x05hello");
        let mut input = PREFACE.to_vec();
        input.extend(SETTINGS_EMPTY);
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS,
            1,
            &request_block(b"%2Ftmp%2Fapi.sock"),
        ));
        input.extend(&data);
        let out = run(&input).unwrap();
        assert_eq!(&out[..24], PREFACE);
        let f = frames(&out[24..]);
        assert_eq!(f.len(), 3);
        assert_eq!((f[0].0, f[0].3.as_slice()), (0x4, &[][..]));
        assert_eq!(
            (f[1].0, f[1].1, f[1].2),
            (TYPE_HEADERS, FLAG_END_HEADERS, 1)
        );
        let fields = decode_fresh(&f[1].3);
        assert_eq!(authority_of(&fields), b"localhost");
        assert_eq!(fields.len(), 6);
        assert_eq!(fields[2].1, b"/SpiffeWorkloadAPI/FetchX509SVID");
        assert_eq!(frame(f[2].0, f[2].1, f[2].2, &f[2].3), data);
    }

    #[test]
    fn keeps_a_valid_authority_and_follows_the_dynamic_table() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS,
            1,
            &request_block(b"localhost:8080"),
        ));
        // The second request refers to the first one's inserts (dynamic table, newest first:
        // 62 content-type, 63 :authority, 64 :path; `te` was not indexed).
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS,
            3,
            &[0x83, 0x86, 0xc0, 0xbf, 0xbe],
        ));
        // Then a Huffman-coded authority (RFC 7541 C.4.1, "www.example.com").
        let huff = [
            0x41, 0x8c, 0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4, 0xff,
        ];
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 5, &huff));
        let f = frames(&run(&input).unwrap()[24..]);
        assert_eq!(authority_of(&decode_fresh(&f[0].3)), b"localhost:8080");
        let second = decode_fresh(&f[1].3);
        assert_eq!(authority_of(&second), b"localhost:8080");
        assert_eq!(second[2].1, b"/SpiffeWorkloadAPI/FetchX509SVID");
        assert_eq!(second[4].1, b"application/grpc");
        assert_eq!(authority_of(&decode_fresh(&f[2].3)), b"www.example.com");
    }

    #[test]
    fn a_bad_authority_from_the_dynamic_table_is_replaced_too() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS,
            1,
            &request_block(b"%2Fs.sock"),
        ));
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS,
            3,
            &[0x83, 0x86, 0xbf],
        ));
        let f = frames(&run(&input).unwrap()[24..]);
        assert_eq!(authority_of(&decode_fresh(&f[0].3)), b"localhost");
        assert_eq!(authority_of(&decode_fresh(&f[1].3)), b"localhost");
    }

    #[test]
    fn padding_priority_and_continuations_fed_byte_by_byte() {
        let block = request_block(b"%2Frun%2Fagent.sock");
        let (a, rest) = block.split_at(7);
        let (b, c) = rest.split_at(10);
        let mut headers = vec![3u8]; // pad length
        headers.extend([0x80, 0, 0, 0x01, 0x10]); // exclusive dependency on 1, weight 16
        headers.extend(a);
        headers.extend([0, 0, 0]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_PADDED | FLAG_PRIORITY | FLAG_END_STREAM,
            3,
            &headers,
        ));
        input.extend(frame(TYPE_CONTINUATION, 0, 3, b));
        input.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 3, c));
        input.extend(frame(0x8, 0, 0, &[0, 0, 1, 0])); // WINDOW_UPDATE after the block
        let mut r = Rewriter::default();
        let mut out = BytesMut::new();
        for byte in &input {
            r.feed(std::slice::from_ref(byte), &mut out).unwrap();
        }
        let f = frames(&out[24..]);
        assert_eq!(f.len(), 2, "one HEADERS frame, then the WINDOW_UPDATE");
        let (kind, flags, stream, payload) = &f[0];
        assert_eq!((*kind, *stream), (TYPE_HEADERS, 3));
        assert_eq!(*flags, FLAG_PRIORITY | FLAG_END_STREAM | FLAG_END_HEADERS);
        assert_eq!(&payload[..5], &[0x80, 0, 0, 0x01, 0x10]);
        assert_eq!(authority_of(&decode_fresh(&payload[5..])), b"localhost");
        assert_eq!(f[1].0, 0x8);
    }

    /// `block` as HEADERS + CONTINUATIONs of `chunk` bytes each, after the preface.
    fn in_chunks(block: &[u8], chunk: usize) -> Vec<u8> {
        let mut input = PREFACE.to_vec();
        let chunks: Vec<_> = block.chunks(chunk).collect();
        for (i, c) in chunks.iter().enumerate() {
            let kind = if i == 0 {
                TYPE_HEADERS
            } else {
                TYPE_CONTINUATION
            };
            let flags = if i + 1 == chunks.len() {
                FLAG_END_HEADERS
            } else {
                0
            };
            input.extend(frame(kind, flags, 1, c));
        }
        input
    }

    #[test]
    fn continuations_up_to_the_limit_are_joined() {
        let mut block = request_block(b"%2Fx");
        encode_literal(b"x-big", &[b'a'; 15_000], &mut block);
        let mut r = Rewriter::default();
        let mut out = BytesMut::new();
        r.feed(&in_chunks(&block, 4096), &mut out).unwrap();
        assert!(r.saw_request());
        let f = frames(&out[24..]);
        assert_eq!(f.len(), 1);
        assert_eq!((f[0].0, f[0].1), (TYPE_HEADERS, FLAG_END_HEADERS));
        let fields = decode_fresh(&f[0].3);
        assert_eq!(authority_of(&fields), b"localhost");
        assert_eq!(fields.last().unwrap().1.len(), 15_000);
    }

    #[test]
    fn re_encoded_blocks_are_split_at_the_frame_size() {
        let mut block = Vec::new();
        encode_literal(b"x-big", &[b'a'; 40_000], &mut block);
        let pending = Pending {
            stream: 1,
            flags: FLAG_END_STREAM,
            priority: None,
        };
        let mut out = BytesMut::new();
        write_header_frames(&pending, &block, &mut out);
        let f = frames(&out);
        assert_eq!(f.len(), 3);
        let mut joined: Vec<u8> = Vec::new();
        for (i, (kind, flags, stream, payload)) in f.iter().enumerate() {
            assert!(payload.len() <= MAX_FRAME);
            assert_eq!(*stream, 1);
            assert_eq!(*kind == TYPE_HEADERS, i == 0);
            assert_eq!(flags & FLAG_END_HEADERS != 0, i + 1 == f.len());
            joined.extend(payload);
        }
        assert_eq!(joined, block);
    }

    fn refused_as_too_large(input: &[u8]) -> Rewriter {
        let mut r = Rewriter::default();
        let mut out = BytesMut::new();
        let err = r.feed(input, &mut out).unwrap_err();
        assert!(
            err.to_string().contains("16384"),
            "the error names the limit: {err}"
        );
        assert_eq!(r.failure_reason(), Some(TOO_LARGE));
        assert!(!r.saw_request());
        r
    }

    #[test]
    fn header_lists_past_the_advertised_limit_are_refused() {
        // One literal past 16 KiB, over CONTINUATIONs: refused once the gathered bytes pass the
        // limit, before the rest is read.
        let mut block = request_block(b"%2Fx");
        encode_literal(b"x-big", &[b'a'; 17_000], &mut block);
        let r = refused_as_too_large(&in_chunks(&block, 4096));
        assert!(r.block.is_empty() && r.input.is_empty(), "nothing kept");

        // A frame announcing more than the limit: refused from its 9-byte header alone.
        let mut header = BytesMut::new();
        frame_header(MAX_HEADER_LIST + 1024, TYPE_HEADERS, 0, 1, &mut header);
        refused_as_too_large(&[PREFACE.as_slice(), &header].concat());

        // A small block that decodes past the limit: one 4 KB field in the dynamic table, then
        // five references to it (5 bytes on the wire, 20 KB decoded).
        let mut first = vec![0x40];
        encode_int(3, 7, 0, &mut first);
        first.extend_from_slice(b"x-a");
        encode_int(3900, 7, 0, &mut first);
        first.extend_from_slice(&[b'v'; 3900]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &first));
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 3, &[0xbe; 5]));
        let mut r = Rewriter::default();
        let mut out = BytesMut::new();
        let err = r.feed(&input, &mut out).unwrap_err();
        assert!(err.to_string().contains("header list too large"), "{err}");
        assert_eq!(r.failure_reason(), Some(TOO_LARGE));
        assert!(r.saw_request(), "the first block was a request");

        // Thousands of tiny fields (an indexed name and a 1-byte Huffman value, 3 bytes each)
        // in one 15 KB block: valid HPACK, refused once the list passes the limit (decoding
        // stops at the 513th field, not the 5,000th).
        let block = [0x01, 0x81, 0x1f].repeat(5_000);
        let mut valid = 0;
        hpack::Decoder::new(HEADER_TABLE_SIZE)
            .decode(&block, |_, _| {
                valid += 1;
                ControlFlow::Continue(())
            })
            .unwrap();
        assert_eq!(valid, 5_000);
        let r = refused_as_too_large(&in_chunks(&block, MAX_FRAME));
        assert!(!r.saw_request());

        // Malformed input has its own reason.
        let mut r = Rewriter::default();
        let input = [PREFACE.as_slice(), &frame(TYPE_CONTINUATION, 4, 1, &[0x83])].concat();
        r.feed(&input, &mut BytesMut::new()).unwrap_err();
        assert_eq!(r.failure_reason(), Some(MALFORMED));
    }

    #[test]
    fn table_size_updates_are_honoured_and_bounded() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS,
            1,
            &request_block(b"a"),
        ));
        // Size update to 0 empties the table: a reference to 62 then fails.
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS,
            3,
            &[0x20, 0x83, 0xbe],
        ));
        assert!(run(&input).is_err());
        // Past the 4096 bytes h2 allows.
        let mut too_big = Vec::new();
        encode_int(8192, 5, 0x20, &mut too_big);
        too_big.push(0x83);
        let mut input = PREFACE.to_vec();
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &too_big));
        assert!(run(&input).is_err());
        // Within bounds.
        let mut ok = Vec::new();
        encode_int(1024, 5, 0x20, &mut ok);
        ok.push(0x83);
        let mut input = PREFACE.to_vec();
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &ok));
        let f = frames(&run(&input).unwrap()[24..]);
        assert_eq!(
            decode_fresh(&f[0].3),
            vec![(b":method".to_vec(), b"POST".to_vec())]
        );
    }

    #[test]
    fn garbage_fails_the_connection_without_panicking() {
        let cases: Vec<Vec<u8>> = vec![
            // CONTINUATION with no HEADERS before it.
            frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, &[0x83]),
            // DATA in the middle of a header block.
            [frame(TYPE_HEADERS, 0, 1, &[0x83]), frame(0x0, 0, 1, b"x")].concat(),
            // CONTINUATION on another stream.
            [
                frame(TYPE_HEADERS, 0, 1, &[0x83]),
                frame(TYPE_CONTINUATION, 4, 3, &[0x86]),
            ]
            .concat(),
            // Index out of range, truncated literal, padding longer than the frame.
            frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &[0xff, 0x10]),
            frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &[0x00, 0x05, b'a']),
            frame(TYPE_HEADERS, FLAG_END_HEADERS | FLAG_PADDED, 1, &[9, 0x83]),
            frame(TYPE_HEADERS, FLAG_END_HEADERS | FLAG_PRIORITY, 1, &[0, 0]),
            frame(TYPE_HEADERS, FLAG_END_HEADERS, 0, &[0x83]),
            // A header frame past the cap.
            frame(TYPE_HEADERS, 0, 1, &vec![0; MAX_HEADER_BLOCK + 1000]),
        ];
        for case in cases {
            let input = [PREFACE.as_slice(), &case].concat();
            assert!(
                run(&input).is_err(),
                "accepted {:02x?}",
                &case[..case.len().min(20)]
            );
        }
        // A block growing past the cap over CONTINUATIONs.
        let mut input = PREFACE.to_vec();
        input.extend(frame(TYPE_HEADERS, 0, 1, &vec![0; MAX_FRAME]));
        for _ in 0..4 {
            input.extend(frame(TYPE_CONTINUATION, 0, 1, &vec![0; MAX_FRAME]));
        }
        assert!(run(&input).is_err());
        // Pseudo-random frames: errors are fine, panics are not.
        let mut x: u32 = 0x1234_5678;
        for _ in 0..2000 {
            let mut input = PREFACE.to_vec();
            let mut payload = Vec::new();
            for _ in 0..(x % 40) {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                payload.push(x as u8);
            }
            input.extend(frame(
                TYPE_HEADERS,
                (x >> 8) as u8 | FLAG_END_HEADERS,
                1,
                &payload,
            ));
            let _ = run(&input);
        }
        // A non-HTTP/2 stream is passed as it is, for h2 to refuse.
        assert_eq!(
            run(b"GET / HTTP/1.1\r\n\r\n").unwrap(),
            b"GET / HTTP/1.1\r\n\r\n"
        );
    }

    /// The same request bytes, sent to a real h2 server with and without the shim: without it,
    /// h2 resets the stream (what grpcio users see as "Stream removed"); with it, the request
    /// arrives with `localhost` as its authority.
    #[tokio::test]
    async fn h2_refuses_the_raw_request_and_accepts_the_rewritten_one() {
        async fn attempt(shim: bool) -> Result<http::Uri, u32> {
            let (mut client, server) = tokio::io::duplex(64 * 1024);
            let (tx, rx) = tokio::sync::oneshot::channel();
            let server_task = tokio::spawn(async move {
                let io: Box<dyn Io> = if shim {
                    Box::new(AuthorityFix::new(server))
                } else {
                    Box::new(server)
                };
                let mut conn = h2::server::handshake(io).await.unwrap();
                // Keep driving the connection (it answers a malformed request with
                // RST_STREAM) until the task is aborted; an accepted request stays open.
                let mut open = Vec::new();
                while let Some(next) = conn.accept().await {
                    if let Ok((req, respond)) = next {
                        let _ = tx.send(req.uri().clone());
                        open.push(respond);
                        break;
                    }
                }
                while conn.accept().await.is_some() {}
                drop(open);
            });
            let mut input = PREFACE.to_vec();
            input.extend(SETTINGS_EMPTY);
            input.extend(frame(
                TYPE_HEADERS,
                FLAG_END_HEADERS,
                1,
                &request_block(b"%2Ftmp%2Fapi.sock"),
            ));
            client.write_all(&input).await.unwrap();
            let mut rx = rx;
            let mut seen = Vec::new();
            let result = loop {
                let mut buf = [0u8; 4096];
                tokio::select! {
                    biased;
                    uri = &mut rx => break Ok(uri.unwrap()),
                    n = client.read(&mut buf) => {
                        seen.extend_from_slice(&buf[..n.unwrap()]);
                        if let Some(code) = rst_stream(&seen) {
                            break Err(code);
                        }
                    }
                }
            };
            server_task.abort();
            result
        }
        trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
        impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

        /// The error code of the first RST_STREAM among complete server frames.
        fn rst_stream(mut bytes: &[u8]) -> Option<u32> {
            while bytes.len() >= 9 {
                let len = usize::from(bytes[0]) << 16
                    | usize::from(bytes[1]) << 8
                    | usize::from(bytes[2]);
                if bytes.len() < 9 + len {
                    return None;
                }
                if bytes[3] == 0x3 {
                    return Some(u32::from_be_bytes(bytes[9..13].try_into().unwrap()));
                }
                bytes = &bytes[9 + len..];
            }
            None
        }

        let timeout = std::time::Duration::from_secs(10);
        let refused = tokio::time::timeout(timeout, attempt(false)).await.unwrap();
        assert_eq!(
            refused,
            Err(0x1),
            "h2 answers PROTOCOL_ERROR without the shim"
        );
        let accepted = tokio::time::timeout(timeout, attempt(true))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(accepted.authority().unwrap().as_str(), "localhost");
        assert_eq!(accepted.path(), "/SpiffeWorkloadAPI/FetchX509SVID");
    }
}
