//! Transparent mode: connections captured by iptables `REDIRECT` instead of explicit tunnels.
//!
//! - Outbound (default `127.0.0.1:15001`): the app's connection, redirected. Its original
//!   destination decides: inside a mesh CIDR → mTLS with the pod's SVID to that address
//!   (whose own inbound capture takes it); elsewhere → plain TCP pass-through, or refused
//!   under [`OutboundPolicy::Deny`].
//! - Inbound (default `0.0.0.0:15006`): connections to the pod, redirected. TLS 1.3 with a
//!   verified client SVID, authorized by [`Policy`] for the ORIGINAL destination port, then
//!   forwarded to the original destination itself (the pod's own address), never to
//!   127.0.0.1: a service bound to loopback only stays private to the pod, and the app never
//!   sees a peer as local. [`InboundMode::Strict`] refuses plaintext;
//!   [`InboundMode::Permissive`] forwards it too (first byte `0x16` means TLS). Connections to
//!   the sidecar's own ports ([`Captured::refusing_ports`], e.g. its admin port) are refused.
//!
//! The original destination comes from an [`OriginalDst`] source: `SO_ORIGINAL_DST` in
//! production ([`SoOriginalDst`]), anything injected in tests ([`Captured::with_source`]).
//!
//! The redirect rules must exclude the proxy's own outbound connections (for example
//! `-m owner --uid-owner <proxy uid> --gid-owner <proxy gid> -j RETURN`), or they loop back
//! into it; the forwarded inbound connections (to the pod's own address) are among them.
//!
//! Why this is one file of over 500 lines: transparent mode's two listeners, the
//! original-destination lookup, the mesh-CIDR decision and their counters are one feature,
//! configured together.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use identity::SpiffeId;
use ipnet::{IpNet, Ipv4Net};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

use crate::authz::Policy;
use crate::copy::copy_bidirectional;
use crate::metrics::{Metrics, Reason, counter};
use crate::pool::{Pool, Target};
use crate::refusal::{self, Refusal};
use crate::socket::{OriginalDst, SoOriginalDst};
use crate::tls::{self, ExpectedPeer, IdentityHandle};
use crate::tunnel::{self, Configs, Error, Limits, Opening};

/// The default listen addresses (Istio's ports).
pub const DEFAULT_OUTBOUND: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15001);
pub const DEFAULT_INBOUND: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 15006);

/// What happens to an outbound connection whose destination is outside the mesh.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OutboundPolicy {
    /// Plain TCP to the original destination.
    #[default]
    Passthrough,
    /// Refused (closed at once) and counted.
    Deny,
}

/// Whether the inbound side accepts plaintext.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum InboundMode {
    /// mTLS only; plaintext is refused as `plaintext_refused`.
    #[default]
    Strict,
    /// mTLS, or plaintext forwarded unauthenticated (migration). A client that sends nothing
    /// within the first-flight timeout (a server-speaks-first protocol) is plaintext.
    Permissive,
}

/// An address range such as `10.0.0.0/8` or `fd00::/8`, as [`parse_cidr`] reads it: host
/// bits cleared, an IPv4-mapped IPv6 range stored as IPv4. Test an address with [`in_cidr`].
pub type Cidr = IpNet;

#[derive(Debug, thiserror::Error)]
#[error("invalid CIDR {0:?}: expected ADDRESS/PREFIX, such as 10.0.0.0/8 or fd00::/8")]
pub struct CidrError(String);

/// `ADDRESS/PREFIX` (a bare address is refused: write /32 or /128). Host bits are cleared; an
/// IPv4-mapped address (`::ffff:10.0.0.0/8`) is read as the IPv4 range with that prefix.
pub fn parse_cidr(s: &str) -> Result<Cidr, CidrError> {
    let bad = || CidrError(s.to_owned());
    let net: IpNet = s.parse().map_err(|_| bad())?;
    let net = match net {
        IpNet::V6(v6) => match v6.addr().to_ipv4_mapped() {
            Some(v4) => IpNet::V4(Ipv4Net::new(v4, v6.prefix_len()).map_err(|_| bad())?),
            None => net,
        },
        IpNet::V4(_) => net,
    };
    Ok(net.trunc())
}

/// Whether `ip` is in `cidr`; an IPv4-mapped IPv6 address counts as IPv4.
pub fn in_cidr(cidr: &Cidr, ip: IpAddr) -> bool {
    cidr.contains(&ip.to_canonical())
}

/// Which server identity each mesh destination must present: rules `CIDR[:PORT]=ID` checked in
/// order, then the default (an exact ID, or any ID of the own trust domain).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpectRules {
    pub default: ExpectedPeer,
    pub rules: Vec<ExpectRule>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpectRule {
    pub cidr: Cidr,
    /// `None`: every port.
    pub port: Option<u16>,
    pub expect: ExpectedPeer,
}

#[derive(Debug, thiserror::Error)]
#[error(
    "invalid expect-id rule {0:?}: expected a SPIFFE ID, or CIDR=ID / CIDR:PORT=ID such as 10.0.0.5/32:5432=spiffe://example.org/db"
)]
pub struct ExpectRuleError(String);

impl From<ExpectedPeer> for ExpectRules {
    fn from(default: ExpectedPeer) -> Self {
        Self {
            default,
            rules: Vec::new(),
        }
    }
}

impl ExpectRules {
    /// Parses `--expect-id` values: at most one plain SPIFFE ID (the default), any number of
    /// `CIDR[:PORT]=ID` rules.
    pub fn parse<'a>(items: impl IntoIterator<Item = &'a str>) -> Result<Self, ExpectRuleError> {
        let mut out = Self::from(ExpectedPeer::TrustDomain);
        let mut have_default = false;
        for item in items {
            let bad = || ExpectRuleError(item.to_owned());
            let Some((dest, id)) = item.split_once('=') else {
                if have_default {
                    return Err(bad());
                }
                have_default = true;
                out.default = ExpectedPeer::Id(SpiffeId::new(item).map_err(|_| bad())?);
                continue;
            };
            let id = ExpectedPeer::Id(SpiffeId::new(id).map_err(|_| bad())?);
            // `10.0.0.0/8:5432`: the port follows the prefix length.
            let (cidr, port) = match dest.rsplit_once('/').and_then(|(_, p)| p.split_once(':')) {
                Some((_, port)) => {
                    let cidr_part = &dest[..dest.len() - port.len() - 1];
                    let port = port
                        .parse::<u16>()
                        .ok()
                        .filter(|p| *p != 0)
                        .ok_or_else(bad)?;
                    (parse_cidr(cidr_part).map_err(|_| bad())?, Some(port))
                }
                None => (parse_cidr(dest).map_err(|_| bad())?, None),
            };
            out.rules.push(ExpectRule {
                cidr,
                port,
                expect: id,
            });
        }
        Ok(out)
    }

    /// The expectation for a destination: the first matching rule, else the default.
    pub fn for_destination(&self, to: SocketAddr) -> &ExpectedPeer {
        self.rules
            .iter()
            .find(|r| in_cidr(&r.cidr, to.ip()) && r.port.is_none_or(|p| p == to.port()))
            .map_or(&self.default, |r| &r.expect)
    }
}

/// A listener that receives redirected connections, and where to learn their destination.
pub struct Captured {
    listener: TcpListener,
    source: Arc<dyn OriginalDst>,
    refused_ports: Arc<[u16]>,
}

impl Captured {
    /// Original destinations from `SO_ORIGINAL_DST`.
    pub fn new(listener: TcpListener) -> Self {
        Self::with_source(listener, SoOriginalDst)
    }

    /// Original destinations from `source` (tests without iptables).
    pub fn with_source(listener: TcpListener, source: impl OriginalDst) -> Self {
        Self {
            listener,
            source: Arc::new(source),
            refused_ports: Arc::new([]),
        }
    }

    /// Inbound: original destination ports that are the sidecar's own (its admin port,
    /// whatever address it listens on): such a connection is refused, never forwarded, and
    /// counted as `inbound_sidecar_port`.
    #[must_use]
    pub fn refusing_ports(mut self, ports: impl IntoIterator<Item = u16>) -> Self {
        self.refused_ports = ports.into_iter().collect();
        self
    }
}

impl From<TcpListener> for Captured {
    fn from(listener: TcpListener) -> Self {
        Self::new(listener)
    }
}

/// Plaintext connections (outbound pass-through, permissive inbound).
#[derive(Debug, Default)]
pub struct PlainMetrics {
    accepted: AtomicU64,
    active: AtomicU64,
    unreachable: AtomicU64,
    /// From the accepted client to the destination.
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
}

impl PlainMetrics {
    /// Connections forwarded (destination reached).
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    /// Connections whose destination could not be reached.
    pub fn unreachable(&self) -> u64 {
        self.unreachable.load(Ordering::Relaxed)
    }

    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent.load(Ordering::Relaxed)
    }

    pub fn bytes_received(&self) -> u64 {
        self.bytes_received.load(Ordering::Relaxed)
    }
}

/// Counters of transparent mode. mTLS connections are counted in [`Self::tunnels`] exactly as
/// the explicit tunnels count them (accepted, refused by [`Reason`], bytes); the rest here.
#[derive(Debug, Default)]
pub struct TransparentMetrics {
    tunnels: Arc<Metrics>,
    outbound_mesh: AtomicU64,
    outbound_denied: AtomicU64,
    outbound_no_original_dst: AtomicU64,
    inbound_tls: AtomicU64,
    inbound_no_original_dst: AtomicU64,
    inbound_sidecar_port: AtomicU64,
    /// Outbound connections to non-mesh destinations under `Passthrough`.
    pub outbound_passthrough: PlainMetrics,
    /// Inbound plaintext connections forwarded under `Permissive`.
    pub inbound_plaintext: PlainMetrics,
}

impl TransparentMetrics {
    /// mTLS counters: `outbound` for mesh destinations, `inbound` for captured inbound
    /// connections (strict plaintext is `refused(PlaintextRefused)` there).
    pub fn tunnels(&self) -> &Metrics {
        &self.tunnels
    }

    /// Outbound connections to a mesh destination (each then established or refused in
    /// `tunnels().outbound`).
    pub fn outbound_mesh(&self) -> u64 {
        self.outbound_mesh.load(Ordering::Relaxed)
    }

    /// Outbound connections to non-mesh destinations refused under `Deny`.
    pub fn outbound_denied(&self) -> u64 {
        self.outbound_denied.load(Ordering::Relaxed)
    }

    /// Connections closed because their original destination was unknown (not redirected).
    pub fn outbound_no_original_dst(&self) -> u64 {
        self.outbound_no_original_dst.load(Ordering::Relaxed)
    }

    /// Inbound connections that started with a TLS handshake (each then established or
    /// refused in `tunnels().inbound`).
    pub fn inbound_tls(&self) -> u64 {
        self.inbound_tls.load(Ordering::Relaxed)
    }

    pub fn inbound_no_original_dst(&self) -> u64 {
        self.inbound_no_original_dst.load(Ordering::Relaxed)
    }

    /// Inbound connections refused because they were for one of the sidecar's own ports.
    pub fn inbound_sidecar_port(&self) -> u64 {
        self.inbound_sidecar_port.load(Ordering::Relaxed)
    }
}

/// The mTLS families of [`Metrics`], then the capture outcomes and the plaintext connections.
impl Collector for TransparentMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        Metrics::encode(&mut encoder, &[("", &self.tunnels)])?;
        let mut f = encoder.encode_descriptor(
            "kith_sidecar_captured",
            "Captured connections by what became of them",
            None,
            MetricType::Counter,
        )?;
        for (outcome, value) in [
            ("outbound_mesh", self.outbound_mesh()),
            ("outbound_passthrough", self.outbound_passthrough.accepted()),
            (
                "outbound_passthrough_unreachable",
                self.outbound_passthrough.unreachable(),
            ),
            ("outbound_denied", self.outbound_denied()),
            ("outbound_no_original_dst", self.outbound_no_original_dst()),
            ("inbound_tls", self.inbound_tls()),
            ("inbound_plaintext", self.inbound_plaintext.accepted()),
            (
                "inbound_plaintext_unreachable",
                self.inbound_plaintext.unreachable(),
            ),
            ("inbound_no_original_dst", self.inbound_no_original_dst()),
            ("inbound_sidecar_port_refused", self.inbound_sidecar_port()),
        ] {
            counter(&mut f, &[("outcome", outcome)], value)?;
        }
        let mut f = encoder.encode_descriptor(
            "kith_sidecar_plaintext_bytes",
            "Bytes of plaintext connections (outbound pass-through, permissive inbound)",
            None,
            MetricType::Counter,
        )?;
        for (kind, m) in [
            ("outbound_passthrough", &self.outbound_passthrough),
            ("inbound_plaintext", &self.inbound_plaintext),
        ] {
            let sent = [("kind", kind), ("side", "sent")];
            counter(&mut f, &sent, m.bytes_sent())?;
            let received = [("kind", kind), ("side", "received")];
            counter(&mut f, &received, m.bytes_received())?;
        }
        Ok(())
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Serves captured outbound connections until `shutdown`: mTLS to destinations in `mesh`
/// (the server must match `expect`), `outbound_policy` for the others.
#[allow(clippy::too_many_arguments)]
pub async fn serve_transparent_outbound(
    listener: impl Into<Captured>,
    identity: IdentityHandle,
    mesh: Vec<Cidr>,
    outbound_policy: OutboundPolicy,
    expect: ExpectRules,
    limits: Limits,
    metrics: Arc<TransparentMetrics>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    limits.validate()?;
    let Captured {
        listener, source, ..
    } = listener.into();
    // One client configuration per distinct expectation, built once.
    let mut connectors: Vec<(ExpectedPeer, TlsConnector)> = Vec::new();
    for e in std::iter::once(&expect.default).chain(expect.rules.iter().map(|r| &r.expect)) {
        if !connectors.iter().any(|(have, _)| have == e) {
            let config = tls::client_config(&identity, e.clone())?;
            connectors.push((e.clone(), TlsConnector::from(config)));
        }
    }
    let connectors = Arc::new(connectors);
    let expect = Arc::new(expect);
    let mesh: Arc<[Cidr]> = mesh.into();
    let pool = identity.pooling().then(|| Arc::new(Pool::new()));
    tunnel::accept_loop(listener, limits, shutdown, move |stream, slot| {
        let (connectors, expect, identity, metrics, source, mesh, pool) = (
            connectors.clone(),
            expect.clone(),
            identity.clone(),
            metrics.clone(),
            source.clone(),
            mesh.clone(),
            pool.clone(),
        );
        async move {
            let Some(_permit) = slot.claim().await else {
                return;
            };
            let to = match source.original_dst(&stream) {
                Ok(to) => to,
                Err(e) => {
                    tracing::debug!(error = %e, "outbound connection without original destination");
                    refusal::log("outbound", "no_original_dst", stream.peer_addr().ok(), None);
                    bump(&metrics.outbound_no_original_dst);
                    return;
                }
            };
            if mesh.iter().any(|c| in_cidr(c, to.ip())) {
                bump(&metrics.outbound_mesh);
                let tunnels = metrics.tunnels.clone();
                let wanted = expect.for_destination(to);
                let Some((expect, connector)) = connectors.iter().find(|(e, _)| e == wanted) else {
                    return;
                };
                let hop = tunnel::Hop {
                    connector,
                    expect,
                    pool: pool.as_deref(),
                };
                let result =
                    tunnel::outbound(stream, hop, &identity, &to.into(), &limits, tunnels).await;
                if let Err(reason) = result {
                    tracing::debug!(%to, %reason, "mesh connection refused");
                    metrics.tunnels.outbound.refuse(reason);
                }
                return;
            }
            match outbound_policy {
                OutboundPolicy::Deny => {
                    refusal::log("outbound", "outbound_denied", Some(to), None);
                    bump(&metrics.outbound_denied);
                }
                OutboundPolicy::Passthrough => {
                    plain(stream, to, &limits, &metrics.outbound_passthrough).await;
                }
            }
        }
    })
    .await;
    Ok(())
}

/// Serves captured inbound connections until `shutdown`: mTLS, peer authorized by `policy` for
/// the original destination port, forwarded to the original destination (never loopback).
pub async fn serve_transparent_inbound(
    listener: impl Into<Captured>,
    identity: IdentityHandle,
    policy: Policy,
    mode: InboundMode,
    limits: Limits,
    metrics: Arc<TransparentMetrics>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    limits.validate()?;
    let Captured {
        listener,
        source,
        refused_ports,
    } = listener.into();
    let configs = Arc::new(Configs {
        mesh: tls::server_config(&identity)?,
        edge: tls::edge_server_config(&identity)?,
    });
    let policy = Arc::new(policy);
    let drain = shutdown.clone();
    tunnel::accept_loop(listener, limits, shutdown, move |stream, mut slot| {
        let (configs, identity, policy, metrics, source, refused_ports, drain) = (
            configs.clone(),
            identity.clone(),
            policy.clone(),
            metrics.clone(),
            source.clone(),
            refused_ports.clone(),
            drain.clone(),
        );
        async move {
            let m = &metrics.tunnels.inbound;
            let to = match source.original_dst(&stream) {
                Ok(to) => to,
                Err(e) => {
                    tracing::debug!(error = %e, "inbound connection without original destination");
                    refusal::log("inbound", "no_original_dst", stream.peer_addr().ok(), None);
                    bump(&metrics.inbound_no_original_dst);
                    return;
                }
            };
            // SECURITY: never a loopback address: the peer reaches exactly what it could reach
            // without the proxy, the pod's own address, and not the app's loopback services.
            let forward = forward_address(&stream, to);
            if refused_ports.contains(&to.port()) {
                tracing::debug!(
                    port = to.port(),
                    "inbound connection refused: the port is the sidecar's own"
                );
                refusal::log("inbound", "sidecar_port", stream.peer_addr().ok(), None);
                bump(&metrics.inbound_sidecar_port);
                return;
            }
            // The first byte decides, before the connection takes a slot: silent clients
            // wait in the pending pool and leave at the first-flight deadline.
            let peer = slot.peer();
            let plaintext = match tunnel::opening(&stream, &mut slot, &limits).await {
                Ok(Opening::Tls) => false,
                Ok(Opening::Other) => true,
                // Nothing within the timeout: a server-speaks-first protocol, plaintext.
                Ok(Opening::Silent) if mode == InboundMode::Permissive => true,
                Ok(Opening::Silent) => {
                    return m.refuse(Refusal::new(Reason::HandshakeTimeout, peer));
                }
                Err(refusal) => return m.refuse(refusal),
            };
            if plaintext {
                match mode {
                    InboundMode::Strict => {
                        m.refuse(Refusal::new(Reason::PlaintextRefused, peer));
                    }
                    InboundMode::Permissive => {
                        let Some(_permit) = slot.claim().await else {
                            return;
                        };
                        plain(stream, forward, &limits, &metrics.inbound_plaintext).await;
                    }
                }
                return;
            }
            bump(&metrics.inbound_tls);
            // The connection slot is claimed in there, once the peer is authorized.
            let result =
                // Boxed: a connection still waiting for its first byte stays a small task.
                Box::pin(tunnel::inbound(
                    stream,
                    slot,
                    &configs,
                    &identity,
                    &policy,
                    // A pooled connection's streams go where the connection was going.
                    Target { forward },
                    &limits,
                    &metrics.tunnels,
                    &drain,
                ))
                .await;
            if let Err(reason) = result {
                tracing::debug!(port = to.port(), %reason, "inbound connection refused");
                m.refuse(reason);
            }
        }
    })
    .await;
    Ok(())
}

/// Where an inbound connection is forwarded: its original destination, with the scope of the
/// interface it arrived on for an IPv6 link-local address.
fn forward_address(stream: &TcpStream, to: SocketAddr) -> SocketAddr {
    match (to, stream.local_addr().ok()) {
        (SocketAddr::V6(mut v6), Some(SocketAddr::V6(local)))
            if v6.ip().is_unicast_link_local() && v6.scope_id() == 0 =>
        {
            v6.set_scope_id(local.scope_id());
            SocketAddr::V6(v6)
        }
        (SocketAddr::V6(v6), _) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => to,
        },
        _ => to,
    }
}

/// Plain TCP from `stream` to `to`, counted in `m`.
async fn plain(stream: TcpStream, to: SocketAddr, limits: &Limits, m: &PlainMetrics) {
    let Ok(upstream) = tunnel::connect(to, limits.connect_timeout).await else {
        bump(&m.unreachable);
        return;
    };
    bump(&m.accepted);
    m.active.fetch_add(1, Ordering::Relaxed);
    let outcome = copy_bidirectional(stream, upstream, limits.idle_timeout).await;
    tunnel::log_end(&to.to_string(), &outcome);
    m.active.fetch_sub(1, Ordering::Relaxed);
    let t = outcome.transferred;
    m.bytes_sent.fetch_add(t.a_to_b, Ordering::Relaxed);
    m.bytes_received.fetch_add(t.b_to_a, Ordering::Relaxed);
}

/// Parses a list of CIDRs (such as repeated `--mesh-cidr` flags).
pub fn parse_cidrs<'a>(items: impl IntoIterator<Item = &'a str>) -> Result<Vec<Cidr>, CidrError> {
    items.into_iter().map(parse_cidr).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn cidr_parse_and_contains() {
        let c = parse_cidr("10.0.0.0/8").expect("cidr");
        assert!(in_cidr(&c, ip("10.1.2.3")));
        assert!(!in_cidr(&c, ip("11.0.0.1")));
        assert!(in_cidr(&c, ip("::ffff:10.9.9.9")));
        assert!(!in_cidr(&c, ip("fd00::1")));
        let c6 = parse_cidr("fd00::/8").expect("cidr");
        assert!(in_cidr(&c6, ip("fd12::1")));
        assert!(!in_cidr(&c6, ip("fe80::1")));
        assert!(!in_cidr(&c6, ip("10.0.0.1")));
        let host = parse_cidr("10.1.2.3/32").expect("cidr");
        assert!(in_cidr(&host, ip("10.1.2.3")) && !in_cidr(&host, ip("10.1.2.4")));
        let all = parse_cidr("0.0.0.0/0").expect("cidr");
        assert!(in_cidr(&all, ip("1.2.3.4")));
        let all6 = parse_cidr("::/0").expect("cidr");
        assert!(in_cidr(&all6, ip("2001:db8::1")));
    }

    #[test]
    fn expect_rules_pick_the_first_match_then_the_default() {
        let r = ExpectRules::parse([
            "10.0.0.5/32:5432=spiffe://td/db",
            "10.1.0.0/16=spiffe://td/cache",
            "spiffe://td/any",
        ])
        .expect("rules");
        let id = |s: &str| ExpectedPeer::Id(SpiffeId::new(s).expect("id"));
        let to = |s: &str| s.parse::<SocketAddr>().expect("addr");
        assert_eq!(
            r.for_destination(to("10.0.0.5:5432")),
            &id("spiffe://td/db")
        );
        assert_eq!(r.for_destination(to("10.0.0.5:80")), &id("spiffe://td/any"));
        assert_eq!(
            r.for_destination(to("10.1.2.3:80")),
            &id("spiffe://td/cache")
        );
        let none = ExpectRules::parse([]).expect("empty");
        assert_eq!(
            none.for_destination(to("1.2.3.4:1")),
            &ExpectedPeer::TrustDomain
        );
        for bad in [
            "spiffe://td/a,spiffe://td/b",
            "10.0.0.0/8=db",
            "10.0.0.0=spiffe://td/x",
            "10.0.0.0/8:0=spiffe://td/x",
            "10.0.0.0/8:x=spiffe://td/x",
        ] {
            assert!(ExpectRules::parse(bad.split(',')).is_err(), "{bad}");
        }
    }

    #[test]
    fn cidr_clears_host_bits_and_displays() {
        let c = parse_cidr("10.1.2.3/8").expect("cidr");
        assert_eq!(c.to_string(), "10.0.0.0/8");
        assert_eq!(
            parse_cidr("fd00:1::/8").expect("cidr").to_string(),
            "fd00::/8"
        );
    }

    #[test]
    fn bad_cidrs() {
        for s in [
            "10.0.0.0",
            "10.0.0.0/33",
            "fd00::/129",
            "10.0.0.0/",
            "x/8",
            "10.0.0.0/+8",
            "10.0.0.0/8/8",
            "",
        ] {
            assert!(parse_cidr(s).is_err(), "{s}");
        }
        assert!(parse_cidrs(["10.0.0.0/8", "bad"]).is_err());
        assert_eq!(
            parse_cidrs(["10.0.0.0/8", "fd00::/8"]).expect("ok").len(),
            2
        );
    }
}
