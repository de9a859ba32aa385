//! An HPACK decoder (RFC 7541) for the `:authority` shim: the client's header blocks decoded
//! against one dynamic table per connection, at a cost that grows with the bytes decoded and
//! nothing else.
//!
//! Why not a crate: the decoder the shim used before (`loona-hpack`, like the `hpack` crate it
//! descends from) builds its Huffman lookup tables — hash maps over the 257 codes — afresh for
//! every Huffman-coded string, about 17 µs each in a release build. A client could send a
//! 15 KB header block of 3-byte fields (an indexed name and a one-byte Huffman value) and cost
//! the agent 85 ms of CPU, and every ordinary gRPC request paid ~100 µs. h2's own decoder is
//! private to h2. Here the Huffman code is decoded from constant tables computed at compile
//! time, and the caller can stop a block early (once the header list is past its limit), so no
//! block costs more than its size.
//!
//! Huffman decoding relies on the RFC 7541 Appendix B code being canonical (codes of one length
//! are consecutive, in symbol order, and each length continues from the previous one), so the
//! code is fully described by each symbol's length; a test checks the property and the RFC's
//! examples.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::ops::ControlFlow;

/// What can be wrong with a header block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Error {
    #[error("block ends inside a field")]
    Truncated,
    #[error("integer too large")]
    IntegerOverflow,
    #[error("index {0} is not in the header table")]
    BadIndex(usize),
    #[error("invalid Huffman code")]
    BadHuffman,
    #[error("table size update to {0} past the allowed {1}")]
    TableSizeTooLarge(usize, usize),
    #[error("table size update after the first field of a block")]
    LateTableSizeUpdate,
}

/// RFC 7541 §4.1: what an entry costs in the table (and in the header list).
pub(crate) const ENTRY_OVERHEAD: usize = 32;

/// One connection's decoder: the dynamic table the client's encoder mirrors.
pub(crate) struct Decoder {
    /// Newest first: dynamic index 62 is `table[0]`.
    table: VecDeque<(Vec<u8>, Vec<u8>)>,
    size: usize,
    max_size: usize,
    /// What the peer was told (SETTINGS_HEADER_TABLE_SIZE): size updates may not exceed it.
    max_allowed: usize,
}

impl Decoder {
    /// A decoder whose table starts at, and may grow to, `max_allowed` bytes.
    pub(crate) fn new(max_allowed: usize) -> Self {
        Self {
            table: VecDeque::new(),
            size: 0,
            max_size: max_allowed,
            max_allowed,
        }
    }

    /// Decodes `block`, calling `field` with each name and value in order. `field` may stop the
    /// block early with `Break`; the table is then left mid-block and the decoder must not be
    /// used for this connection again.
    pub(crate) fn decode(
        &mut self,
        block: &[u8],
        mut field: impl FnMut(&[u8], &[u8]) -> ControlFlow<()>,
    ) -> Result<(), Error> {
        let mut r = Reader { buf: block, at: 0 };
        let mut first = true;
        while let Some(&b) = r.buf.get(r.at) {
            if b & 0xe0 == 0x20 {
                // §6.3 dynamic table size update, only before the block's first field (§4.2).
                if !first {
                    return Err(Error::LateTableSizeUpdate);
                }
                let size = r.int(5)?;
                if size > self.max_allowed {
                    return Err(Error::TableSizeTooLarge(size, self.max_allowed));
                }
                self.max_size = size;
                self.evict(0);
                continue;
            }
            first = false;
            let flow = if b & 0x80 != 0 {
                // §6.1 indexed field.
                let index = r.int(7)?;
                let (name, value) = self.get(index)?;
                field(name, value)
            } else {
                // §6.2 literal: with incremental indexing (01), without (0000), never (0001).
                let indexing = b & 0x40 != 0;
                let index = r.int(if indexing { 6 } else { 4 })?;
                let name = if index == 0 {
                    r.string()?
                } else {
                    Cow::Borrowed(self.get(index)?.0)
                };
                let value = r.string()?;
                let flow = field(&name, &value);
                if indexing {
                    let entry = (name.into_owned(), value.into_owned());
                    self.insert(entry);
                }
                flow
            };
            if flow.is_break() {
                break;
            }
        }
        Ok(())
    }

    fn get(&self, index: usize) -> Result<(&[u8], &[u8]), Error> {
        match index {
            0 => Err(Error::BadIndex(0)),
            1..=61 => {
                let (n, v) = STATIC_TABLE[index - 1];
                Ok((n.as_bytes(), v.as_bytes()))
            }
            _ => self
                .table
                .get(index - 62)
                .map(|(n, v)| (n.as_slice(), v.as_slice()))
                .ok_or(Error::BadIndex(index)),
        }
    }

    /// §4.4: evicts the oldest entries until the new one fits; one larger than the whole table
    /// empties it and is not added.
    fn insert(&mut self, entry: (Vec<u8>, Vec<u8>)) {
        let cost = entry.0.len() + entry.1.len() + ENTRY_OVERHEAD;
        if cost > self.max_size {
            self.table.clear();
            self.size = 0;
            return;
        }
        self.evict(cost);
        self.size += cost;
        self.table.push_front(entry);
    }

    /// Evicts until `room` more bytes fit within the maximum size.
    fn evict(&mut self, room: usize) {
        while self.size + room > self.max_size {
            let Some((n, v)) = self.table.pop_back() else {
                break;
            };
            self.size -= n.len() + v.len() + ENTRY_OVERHEAD;
        }
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    /// §5.1 integer with an N-bit prefix (the current byte's low bits).
    fn int(&mut self, prefix: u8) -> Result<usize, Error> {
        let mask = (1usize << prefix) - 1;
        let first = *self.buf.get(self.at).ok_or(Error::Truncated)?;
        self.at += 1;
        let mut value = usize::from(first) & mask;
        if value < mask {
            return Ok(value);
        }
        // Up to four continuation bytes (28 bits): more than any table or string here needs.
        for shift in [0, 7, 14, 21] {
            let b = *self.buf.get(self.at).ok_or(Error::Truncated)?;
            self.at += 1;
            value += usize::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(Error::IntegerOverflow)
    }

    /// §5.2 string literal, Huffman-decoded if its H bit is set.
    fn string(&mut self) -> Result<Cow<'a, [u8]>, Error> {
        let huffman = self.buf.get(self.at).ok_or(Error::Truncated)? & 0x80 != 0;
        let len = self.int(7)?;
        let end = self.at.checked_add(len).ok_or(Error::Truncated)?;
        let raw = self.buf.get(self.at..end).ok_or(Error::Truncated)?;
        self.at = end;
        if huffman {
            huffman_decode(raw).map(Cow::Owned)
        } else {
            Ok(Cow::Borrowed(raw))
        }
    }
}

/// Decodes a Huffman-coded string (RFC 7541 §5.2, Appendix B): canonical decoding, one bit at
/// a time, against the per-length tables below. Padding must be at most 7 bits, all ones; the
/// EOS symbol must not appear.
pub(crate) fn huffman_decode(raw: &[u8]) -> Result<Vec<u8>, Error> {
    // Every code is at least 5 bits: at most 8/5 symbols per byte.
    let mut out = Vec::with_capacity(raw.len() * 8 / 5);
    let mut code: u32 = 0;
    let mut len: usize = 0;
    for &byte in raw {
        for bit in (0..8).rev() {
            code = (code << 1) | u32::from((byte >> bit) & 1);
            len += 1;
            if len < MIN_LEN {
                continue;
            }
            if len > MAX_LEN {
                return Err(Error::BadHuffman);
            }
            let offset = code.wrapping_sub(HUFFMAN.first[len]);
            if offset < HUFFMAN.count[len] {
                let symbol = HUFFMAN.symbols[HUFFMAN.start[len] + offset as usize];
                if symbol == EOS {
                    return Err(Error::BadHuffman);
                }
                out.push(symbol as u8);
                code = 0;
                len = 0;
            }
        }
    }
    // Leftover bits: the padding, the most significant bits of EOS (all ones), under a byte.
    if len > 7 || code != (1 << len) - 1 {
        return Err(Error::BadHuffman);
    }
    Ok(out)
}

const EOS: u16 = 256;
const MIN_LEN: usize = 5;
const MAX_LEN: usize = 30;

/// RFC 7541 Appendix B: the code length of each symbol 0..=256 (256 is EOS). The code itself
/// follows from these, the code being canonical.
const CODE_LENGTHS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30, 28,
    28, 28, 28, 28, 28, 28, 28, 28, 6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, 5, 5,
    5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, 13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, 15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6,
    6, 5, 6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, 20, 22, 20, 20, 22, 22, 22, 23, 22,
    23, 23, 23, 23, 23, 24, 23, 24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, 22,
    21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, 21, 21, 22, 21, 23, 22, 23, 23, 20,
    22, 22, 22, 23, 22, 22, 23, 26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, 19,
    21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, 20, 24, 20, 21, 22, 21, 21, 23, 22,
    22, 25, 25, 24, 24, 26, 23, 26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, 30,
];

/// The canonical code by length: codes of length `l` run from `first[l]` for `count[l]`
/// symbols, which are `symbols[start[l]..]`.
struct Canonical {
    first: [u32; MAX_LEN + 1],
    count: [u32; MAX_LEN + 1],
    start: [usize; MAX_LEN + 1],
    symbols: [u16; 257],
}

const HUFFMAN: Canonical = canonical();

const fn canonical() -> Canonical {
    let mut c = Canonical {
        first: [0; MAX_LEN + 1],
        count: [0; MAX_LEN + 1],
        start: [0; MAX_LEN + 1],
        symbols: [0; 257],
    };
    let mut next = 0usize;
    let mut code = 0u32;
    let mut len = 1;
    while len <= MAX_LEN {
        c.first[len] = code;
        c.start[len] = next;
        let mut s = 0;
        while s < 257 {
            if CODE_LENGTHS[s] as usize == len {
                c.symbols[next] = s as u16;
                next += 1;
                c.count[len] += 1;
            }
            s += 1;
        }
        code = (code + c.count[len]) << 1;
        len += 1;
    }
    c
}

/// RFC 7541 Appendix A.
const STATIC_TABLE: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn decode_all(d: &mut Decoder, block: &[u8]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        d.decode(block, |n, v| {
            out.push((
                String::from_utf8(n.to_vec()).unwrap(),
                String::from_utf8(v.to_vec()).unwrap(),
            ));
            ControlFlow::Continue(())
        })
        .unwrap();
        out
    }

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_code_is_complete_and_eos_is_thirty_ones() {
        // Kraft: a complete prefix code sums to exactly 1 (here, 2^30 / 2^30).
        let kraft: u64 = CODE_LENGTHS.iter().map(|&l| 1u64 << (30 - l)).sum();
        assert_eq!(kraft, 1 << 30);
        assert_eq!(HUFFMAN.first[30] + HUFFMAN.count[30] - 1, (1 << 30) - 1);
        assert_eq!(HUFFMAN.symbols[256], EOS, "EOS is the last, longest code");
        // Appendix B spot checks: '0' = 00000, 'a' = 00011, ' ' = 010100, '%' = 010101.
        assert_eq!(huffman_decode(&[0b0000_0111]).unwrap(), b"0");
        assert_eq!(huffman_decode(&[0b0001_1111]).unwrap(), b"a");
        assert_eq!(huffman_decode(&[0b0101_0011]).unwrap(), b" ");
    }

    /// RFC 7541 C.4: requests with Huffman coding, one decoder across the three.
    #[test]
    fn rfc_7541_c4_requests_with_huffman() {
        let mut d = Decoder::new(4096);
        assert_eq!(
            decode_all(&mut d, &hex("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff")),
            pairs(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
            ])
        );
        assert_eq!(d.size, 57);
        assert_eq!(
            decode_all(&mut d, &hex("8286 84be 5886 a8eb 1064 9cbf")),
            pairs(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
                ("cache-control", "no-cache"),
            ])
        );
        assert_eq!(
            decode_all(
                &mut d,
                &hex("8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf")
            ),
            pairs(&[
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/index.html"),
                (":authority", "www.example.com"),
                ("custom-key", "custom-value"),
            ])
        );
        assert_eq!(d.size, 164);
        assert_eq!(
            d.table[0],
            (b"custom-key".to_vec(), b"custom-value".to_vec())
        );
    }

    /// RFC 7541 C.6: responses with Huffman coding in a 256-byte table, with evictions.
    #[test]
    fn rfc_7541_c6_responses_with_eviction() {
        let mut d = Decoder::new(256);
        let first = decode_all(
            &mut d,
            &hex(
                "4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6
                 2d1b ff6e 919d 29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3",
            ),
        );
        assert_eq!(
            first,
            pairs(&[
                (":status", "302"),
                ("cache-control", "private"),
                ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
                ("location", "https://www.example.com"),
            ])
        );
        assert_eq!(d.size, 222);
        decode_all(&mut d, &hex("4883 640e ffc1 c0bf"));
        assert_eq!(d.size, 222);
        let third = decode_all(
            &mut d,
            &hex(
                "88c1 6196 d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d 1bff c05a 839b d9ab
                 77ad 94e7 821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f
                 9587 3160 65c0 03ed 4ee5 b106 3d50 07",
            ),
        );
        assert_eq!(third[2].1, "Mon, 21 Oct 2013 20:13:22 GMT");
        assert_eq!(
            third[5],
            (
                "set-cookie".to_string(),
                "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1".to_string()
            )
        );
        assert_eq!(d.size, 215);
        assert_eq!(d.table.len(), 3);
    }

    #[test]
    fn bad_blocks_are_errors() {
        let cases: &[(&[u8], Error)] = &[
            (&[0x80], Error::BadIndex(0)),
            (&[0xbe], Error::BadIndex(62)),
            (
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0x7f],
                Error::IntegerOverflow,
            ),
            (&[0x04, 0x05, b'a'], Error::Truncated),
            (&[0x3f, 0xe1, 0x1f], Error::TableSizeTooLarge(4096, 4000)),
            (&[0x82, 0x20], Error::LateTableSizeUpdate),
            // A value of 'a' plus eight bits of padding.
            (&[0x04, 0x82, 0x1f, 0xff], Error::BadHuffman),
            // Padding that is not all ones.
            (&[0x04, 0x81, 0x18], Error::BadHuffman),
            // EOS itself (30 ones) inside a string.
            (&[0x04, 0x84, 0xff, 0xff, 0xff, 0xfc], Error::BadHuffman),
        ];
        for (block, want) in cases {
            let mut d = Decoder::new(4000);
            let got = d.decode(block, |_, _| ControlFlow::Continue(()));
            assert_eq!(got, Err(*want), "{block:02x?}");
        }
        // A size update at the start of a block is fine, and shrinks the table.
        let mut d = Decoder::new(4096);
        decode_all(&mut d, &hex("418c f1e3 c2e5 f23a 6ba0 ab90 f4ff"));
        assert_eq!(d.size, 57);
        decode_all(&mut d, &[0x20, 0x82]);
        assert_eq!((d.size, d.table.len()), (0, 0));
    }

    #[test]
    fn a_caller_can_stop_a_block_early() {
        let mut d = Decoder::new(4096);
        let mut seen = 0;
        d.decode(&[0x82; 100], |_, _| {
            seen += 1;
            if seen == 3 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap();
        assert_eq!(seen, 3);
    }
}
