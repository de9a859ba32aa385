//! Counters as plain atomics: connections by direction and result, bytes each way. An
//! exporter (Prometheus text) reads them; nothing here allocates per connection.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use identity::VerifyError;

/// Why a connection was refused. `as_str()` is a stable snake_case label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    Expired,
    NotYetValid,
    UnknownCa,
    WrongTrustDomain,
    NotAuthorized,
    PlaintextRefused,
    NoIdentityYet,
    UpstreamUnreachable,
    /// A chain that is not a valid X509-SVID for another reason (bad signature, not an SVID,
    /// malformed).
    BadCertificate,
    /// The TLS peer closed or sent an alert before its first byte (TLS 1.3 reports a refused
    /// client certificate only then).
    PeerRefused,
    /// Any other handshake failure (timeout, protocol error, no ALPN `kith/1`).
    HandshakeFailed,
}

impl Reason {
    pub const ALL: [Reason; 11] = [
        Reason::Expired,
        Reason::NotYetValid,
        Reason::UnknownCa,
        Reason::WrongTrustDomain,
        Reason::NotAuthorized,
        Reason::PlaintextRefused,
        Reason::NoIdentityYet,
        Reason::UpstreamUnreachable,
        Reason::BadCertificate,
        Reason::PeerRefused,
        Reason::HandshakeFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Expired => "expired",
            Reason::NotYetValid => "not_yet_valid",
            Reason::UnknownCa => "unknown_ca",
            Reason::WrongTrustDomain => "wrong_trust_domain",
            Reason::NotAuthorized => "not_authorized",
            Reason::PlaintextRefused => "plaintext_refused",
            Reason::NoIdentityYet => "no_identity_yet",
            Reason::UpstreamUnreachable => "upstream_unreachable",
            Reason::BadCertificate => "bad_certificate",
            Reason::PeerRefused => "peer_refused",
            Reason::HandshakeFailed => "handshake_failed",
        }
    }

    pub fn from_verify(e: &VerifyError) -> Self {
        match e.reason() {
            "expired" => Reason::Expired,
            "not_yet_valid" => Reason::NotYetValid,
            "unknown_ca" => Reason::UnknownCa,
            "wrong_trust_domain" => Reason::WrongTrustDomain,
            _ => Reason::BadCertificate,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Counters of one direction (inbound: mTLS in; outbound: mTLS out).
#[derive(Debug, Default)]
pub struct DirectionMetrics {
    accepted: AtomicU64,
    active: AtomicU64,
    refused: [AtomicU64; Reason::ALL.len()],
    /// Bytes from the TLS side to the plaintext side.
    bytes_from_tls: AtomicU64,
    /// Bytes from the plaintext side to the TLS side.
    bytes_to_tls: AtomicU64,
}

impl DirectionMetrics {
    /// Connections that were established: inbound, handshake and authorization passed;
    /// outbound, the peer's first byte arrived (or it closed cleanly) after the handshake.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Connections being forwarded now.
    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    pub fn refused(&self, reason: Reason) -> u64 {
        self.refused[reason.index()].load(Ordering::Relaxed)
    }

    pub fn refused_total(&self) -> u64 {
        Reason::ALL.iter().map(|r| self.refused(*r)).sum()
    }

    pub fn bytes_from_tls(&self) -> u64 {
        self.bytes_from_tls.load(Ordering::Relaxed)
    }

    pub fn bytes_to_tls(&self) -> u64 {
        self.bytes_to_tls.load(Ordering::Relaxed)
    }

    pub(crate) fn refuse(&self, reason: Reason) {
        self.refused[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn open(&self) {
        self.accepted.fetch_add(1, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn close(&self, from_tls: u64, to_tls: u64) {
        self.active.fetch_sub(1, Ordering::Relaxed);
        self.add_bytes(from_tls, to_tls);
    }

    pub(crate) fn add_bytes(&self, from_tls: u64, to_tls: u64) {
        self.bytes_from_tls.fetch_add(from_tls, Ordering::Relaxed);
        self.bytes_to_tls.fetch_add(to_tls, Ordering::Relaxed);
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    pub inbound: DirectionMetrics,
    pub outbound: DirectionMetrics,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_index_their_own_slot() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i, "{r}");
        }
        let m = DirectionMetrics::default();
        m.refuse(Reason::UnknownCa);
        assert_eq!(m.refused(Reason::UnknownCa), 1);
        assert_eq!(m.refused_total(), 1);
    }
}
