//! Reads a tcpdump capture (classic pcap, Ethernet) and checks what crossed the wire: the TCP
//! payload of each direction of each connection, reassembled in sequence order, must be a
//! sequence of whole TLS records, and the server's hello must choose TLS 1.3.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// One direction of a TCP connection: (source, source port, destination, destination port).
pub type Flow = (Ipv4Addr, u16, Ipv4Addr, u16);

/// The payload bytes of every flow in the capture, in sequence order (retransmissions once).
pub fn flows(pcap: &[u8]) -> Result<BTreeMap<Flow, Vec<u8>>, String> {
    if pcap.len() < 24 {
        return Err("capture shorter than a pcap header".into());
    }
    let le = match pcap[..4] {
        [0xd4, 0xc3, 0xb2, 0xa1] => true,
        [0xa1, 0xb2, 0xc3, 0xd4] => false,
        _ => return Err("not a classic pcap file (magic)".into()),
    };
    let u32_at = |b: &[u8], i: usize| {
        let a = [b[i], b[i + 1], b[i + 2], b[i + 3]];
        if le {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        }
    };
    if u32_at(pcap, 20) != 1 {
        return Err(format!("link type {} is not Ethernet", u32_at(pcap, 20)));
    }
    // Per flow: sequence number -> segment.
    let mut segments: BTreeMap<Flow, BTreeMap<u32, Vec<u8>>> = BTreeMap::new();
    let mut at = 24;
    while at + 16 <= pcap.len() {
        let caplen = u32_at(pcap, at + 8) as usize;
        let frame = pcap
            .get(at + 16..at + 16 + caplen)
            .ok_or("truncated packet record")?;
        at += 16 + caplen;
        if let Some((flow, seq, payload)) = tcp_segment(frame)
            && !payload.is_empty()
        {
            segments
                .entry(flow)
                .or_default()
                .insert(seq, payload.to_vec());
        }
    }
    Ok(segments
        .into_iter()
        .map(|(flow, segs)| (flow, reassemble(segs)))
        .collect())
}

/// Joins segments by sequence number (wrapping is not expected in a short capture).
fn reassemble(segs: BTreeMap<u32, Vec<u8>>) -> Vec<u8> {
    let mut out = Vec::new();
    let mut next: Option<u32> = None;
    for (seq, data) in segs {
        let skip = match next {
            Some(n) if seq < n => (n - seq) as usize,
            _ => 0,
        };
        if skip < data.len() {
            out.extend_from_slice(&data[skip..]);
        }
        next = Some(next.map_or(seq + data.len() as u32, |n| n.max(seq + data.len() as u32)));
    }
    out
}

/// An IPv4 TCP segment in an Ethernet frame: its flow, sequence number and payload.
fn tcp_segment(frame: &[u8]) -> Option<(Flow, u32, &[u8])> {
    let mut ip = frame.get(14..)?;
    let mut ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    if ethertype == 0x8100 {
        ethertype = u16::from_be_bytes([*frame.get(16)?, *frame.get(17)?]);
        ip = frame.get(18..)?;
    }
    if ethertype != 0x0800 || ip.first()? >> 4 != 4 || *ip.get(9)? != 6 {
        return None;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let tcp = ip.get(ihl..total.min(ip.len()))?;
    let sport = u16::from_be_bytes([tcp[0], tcp[1]]);
    let dport = u16::from_be_bytes([tcp[2], tcp[3]]);
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    let off = usize::from(*tcp.get(12)? >> 4) * 4;
    Some(((src, sport, dst, dport), seq, tcp.get(off..)?))
}

/// What a stream of TLS records held.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Records {
    pub handshake: usize,
    pub change_cipher_spec: usize,
    pub application_data: usize,
    pub alert: usize,
    /// The server hello chose TLS 1.3 (supported_versions = 0x0304).
    pub server_hello_tls13: bool,
}

/// Parses `stream` as back-to-back TLS records; an error names the offset and what was found.
/// A capture may end inside the last record (the snapshot stopped): that is not an error.
pub fn tls_records(stream: &[u8]) -> Result<Records, String> {
    let mut r = Records::default();
    let mut at = 0;
    while at < stream.len() {
        let header = match stream.get(at..at + 5) {
            Some(h) => h,
            None => break,
        };
        let (kind, version) = (header[0], u16::from_be_bytes([header[1], header[2]]));
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if !(0x0301..=0x0303).contains(&version) || len > (1 << 14) + 256 {
            return Err(format!(
                "offset {at}: not a TLS record (type {kind:#04x}, version {version:#06x}, length {len})"
            ));
        }
        let body = stream
            .get(at + 5..(at + 5 + len).min(stream.len()))
            .unwrap_or(&[]);
        match kind {
            0x16 => {
                r.handshake += 1;
                if body.first() == Some(&2) && server_hello_is_tls13(body) {
                    r.server_hello_tls13 = true;
                }
            }
            0x14 => r.change_cipher_spec += 1,
            0x17 => r.application_data += 1,
            0x15 => r.alert += 1,
            _ => return Err(format!("offset {at}: record type {kind:#04x} is not TLS")),
        }
        at += 5 + len;
    }
    Ok(r)
}

/// Whether a ServerHello handshake message carries supported_versions = TLS 1.3.
fn server_hello_is_tls13(msg: &[u8]) -> bool {
    // type(1) length(3) legacy_version(2) random(32) session_id(1+n) suite(2) compression(1)
    let Some(&sid_len) = msg.get(38) else {
        return false;
    };
    let mut at = 39 + usize::from(sid_len) + 3;
    let Some(ext_len) = msg.get(at..at + 2) else {
        return false;
    };
    let end = (at + 2 + usize::from(u16::from_be_bytes([ext_len[0], ext_len[1]]))).min(msg.len());
    at += 2;
    while at + 4 <= end {
        let kind = u16::from_be_bytes([msg[at], msg[at + 1]]);
        let len = usize::from(u16::from_be_bytes([msg[at + 2], msg[at + 3]]));
        if kind == 0x002b {
            return msg.get(at + 4..at + 6) == Some(&[0x03, 0x04]);
        }
        at += 4 + len;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_counted_and_plaintext_is_refused() {
        let mut s = vec![0x16, 0x03, 0x01, 0x00, 0x02, 0x01, 0x00];
        s.extend([0x14, 0x03, 0x03, 0x00, 0x01, 0x01]);
        s.extend([0x17, 0x03, 0x03, 0x00, 0x03, 1, 2, 3]);
        let r = tls_records(&s).unwrap();
        assert_eq!(
            (r.handshake, r.change_cipher_spec, r.application_data),
            (1, 1, 1)
        );
        assert!(tls_records(b"GET / HTTP/1.1\r\n").is_err());
        let mut bad = s.clone();
        bad.extend(b"hello");
        assert!(tls_records(&bad).is_err(), "plaintext after records");
    }

    #[test]
    fn server_hello_version() {
        let mut msg = vec![2, 0, 0, 0, 3, 3];
        msg.extend([0u8; 32]);
        msg.push(0); // session id
        msg.extend([0x13, 0x01, 0]);
        msg.extend([0, 6, 0x00, 0x2b, 0, 2, 3, 4]);
        assert!(server_hello_is_tls13(&msg));
        let n = msg.len();
        msg[n - 1] = 3;
        assert!(!server_hello_is_tls13(&msg));
    }

    #[test]
    fn reassembly_drops_retransmissions() {
        let mut segs = BTreeMap::new();
        segs.insert(100, b"abc".to_vec());
        segs.insert(103, b"def".to_vec());
        segs.insert(101, b"bcd".to_vec());
        assert_eq!(reassemble(segs), b"abcdef");
    }
}
