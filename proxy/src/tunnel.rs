//! The two tunnel ends. Inbound: mTLS in, authorize the peer, plaintext to a local forward
//! address. Outbound: plaintext in, mTLS to the remote inbound. Both take a bound listener and
//! a shutdown token, cap connections with a semaphore, and count every refusal by reason.
//!
//! Why this is one file of over 500 lines: both tunnel ends and what they share (the accept loop,
//! limits, first-byte and handshake handling, the connection log); transparent mode and the pool
//! build on these functions.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rustls::HandshakeKind;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::authz::Policy;
use crate::copy::{self, copy_bidirectional};
use crate::metrics::{Metrics, Reason};
use crate::pool::{self, Pool, Target};
use crate::refusal::Refusal;
use crate::tls::{self, ALPN, ALPN_POOLED, ExpectedPeer, IdentityHandle, TlsError};

/// The first byte of every TLS record carrying a handshake message.
pub(crate) const TLS_HANDSHAKE: u8 = 0x16;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot build the tls configuration: {0}")]
    Tls(#[from] TlsError),
    #[error("invalid limits: {0}")]
    Limits(&'static str),
}

/// Per-listener limits. All durations must be non-zero and the counts at least one.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections being served at once: on mTLS listeners, peers that completed the handshake
    /// and were authorized; on plaintext listeners, every accepted connection. More wait.
    pub max_connections: usize,
    /// Accepted mTLS connections still in their handshake (waiting for the ClientHello, or
    /// for the handshake to finish). They hold no connection slot, so clients that send a byte
    /// and stall cannot starve authenticated peers; each is cut at `first_flight_timeout`
    /// (no ClientHello yet) or `handshake_timeout`.
    pub max_pending: usize,
    /// Pending handshakes from one source address (IPv6: one /64) on one listener of one
    /// worker; a connection beyond it is refused (`too_many_pending`).
    pub max_pending_per_source: usize,
    /// A connection with no byte either way for this long is closed.
    pub idle_timeout: Duration,
    /// The whole ClientHello must arrive this soon after the connection was accepted.
    pub first_flight_timeout: Duration,
    /// The rest of the handshake, after the ClientHello, must finish within this.
    pub handshake_timeout: Duration,
    pub connect_timeout: Duration,
    /// How long a connection waits for the first identity before `no_identity_yet`.
    pub identity_hold: Duration,
    /// After shutdown: how long open connections may finish before they are cut.
    pub drain_timeout: Duration,
    /// The pooled hop (outbound): streams on a pooled connection before the next stream opens
    /// another connection to the same destination (up to [`pool::POOL_CAP`] connections of at
    /// most [`pool::MAX_STREAMS`] streams). A few connections spread the load over the
    /// server's worker threads (one serves each pooled connection).
    pub pool_spread: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_pending: 16 * 1024,
            max_pending_per_source: 256,
            idle_timeout: Duration::from_secs(3600),
            first_flight_timeout: Duration::from_secs(3),
            handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            identity_hold: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(5),
            pool_spread: pool::SPREAD_STREAMS,
        }
    }
}

impl Limits {
    pub fn validate(&self) -> Result<(), Error> {
        if self.max_connections == 0
            || self.max_pending == 0
            || self.max_pending_per_source == 0
            || self.pool_spread == 0
        {
            return Err(Error::Limits(
                "max_connections, max_pending, max_pending_per_source and pool_spread must be at least 1",
            ));
        }
        let durations = [
            self.idle_timeout,
            self.first_flight_timeout,
            self.handshake_timeout,
            self.connect_timeout,
            self.identity_hold,
            self.drain_timeout,
        ];
        if durations.iter().any(Duration::is_zero) {
            return Err(Error::Limits("timeouts must be non-zero"));
        }
        Ok(())
    }
}

/// mTLS in → plaintext to `forward`. Runs until `shutdown`, then waits for the connections,
/// which are cancelled by the same token.
pub async fn serve_inbound(
    listener: TcpListener,
    identity: IdentityHandle,
    policy: Policy,
    forward: SocketAddr,
    limits: Limits,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    limits.validate()?;
    let acceptor = Arc::new(Configs {
        mesh: tls::server_config(&identity)?,
        edge: tls::edge_server_config(&identity)?,
    });
    let policy = Arc::new(policy);
    let drain = shutdown.clone();
    accept_loop(listener, limits, shutdown, move |stream, mut slot| {
        let (acceptor, identity, policy, metrics, drain) = (
            acceptor.clone(),
            identity.clone(),
            policy.clone(),
            metrics.clone(),
            drain.clone(),
        );
        async move {
            let m = &metrics.inbound;
            let peer = slot.peer();
            let tls = match opening(&stream, &mut slot, &limits).await {
                Ok(Opening::Tls) => true,
                Ok(Opening::Other) => false,
                Ok(Opening::Silent) => {
                    return m.refuse(Refusal::new(Reason::HandshakeTimeout, peer));
                }
                Err(refusal) => return m.refuse(refusal),
            };
            if !tls {
                // SECURITY: STRICT. What does not start like a TLS handshake is refused before
                // rustls sees it.
                return m.refuse(Refusal::new(Reason::PlaintextRefused, peer));
            }
            if let Err(refusal) =
                // Boxed: a connection still waiting for its first byte stays a small task.
                Box::pin(inbound(
                    stream,
                    slot,
                    &acceptor,
                    &identity,
                    &policy,
                    Target { forward },
                    &limits,
                    &metrics,
                    &drain,
                ))
                .await
            {
                m.refuse(refusal);
            }
        }
    })
    .await;
    Ok(())
}

/// Where a client-side tunnel connects: an address, or a host name resolved for every
/// connection (so a service whose address changes, as in Docker Compose, is followed).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Upstream {
    Addr(SocketAddr),
    Host(String, u16),
}

#[derive(Debug, thiserror::Error)]
#[error(
    "invalid upstream {0:?}: expected ADDRESS:PORT or HOST:PORT, such as 10.0.0.2:8443 or api:8443"
)]
pub struct UpstreamError(String);

impl std::str::FromStr for Upstream {
    type Err = UpstreamError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(Self::Addr(addr));
        }
        let bad = || UpstreamError(s.to_owned());
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(bad)?;
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if host.len() > 253 || !host.trim_end_matches('.').split('.').all(label_ok) {
            return Err(bad());
        }
        Ok(Self::Host(host.to_owned(), port))
    }
}

impl std::fmt::Display for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Addr(a) => write!(f, "{a}"),
            Self::Host(h, p) => write!(f, "{h}:{p}"),
        }
    }
}

impl From<SocketAddr> for Upstream {
    fn from(addr: SocketAddr) -> Self {
        Self::Addr(addr)
    }
}

/// Connects to the upstream: an address directly; a name is resolved now and its addresses
/// are tried in order until one answers.
async fn connect_upstream(
    upstream: &Upstream,
    timeout: Duration,
) -> Result<(TcpStream, SocketAddr), Refusal> {
    let unreachable = |peer| Refusal::new(Reason::UpstreamUnreachable, peer);
    let (host, port) = match upstream {
        Upstream::Addr(a) => {
            return match connect(*a, timeout).await {
                Ok(s) => Ok((s, *a)),
                Err(reason) => Err(Refusal::new(reason, Some(*a))),
            };
        }
        Upstream::Host(h, p) => (h.as_str(), *p),
    };
    let addrs: Vec<SocketAddr> =
        match tokio::time::timeout(timeout, tokio::net::lookup_host((host, port))).await {
            Ok(Ok(addrs)) => addrs.collect(),
            Ok(Err(e)) => {
                tracing::info!(%upstream, error = %e, "cannot resolve the upstream");
                return Err(unreachable(None));
            }
            Err(_) => return Err(unreachable(None)),
        };
    for addr in &addrs {
        if let Ok(stream) = connect(*addr, timeout).await {
            return Ok((stream, *addr));
        }
    }
    Err(unreachable(addrs.first().copied()))
}

/// Plaintext in → mTLS to `connect`, whose server must match `expect`.
pub async fn serve_outbound(
    listener: TcpListener,
    identity: IdentityHandle,
    connect: Upstream,
    expect: ExpectedPeer,
    limits: Limits,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    limits.validate()?;
    let connector = TlsConnector::from(tls::client_config(&identity, expect.clone())?);
    let connect = Arc::new(connect);
    let expect = Arc::new(expect);
    let pool = identity.pooling().then(|| Arc::new(Pool::new()));
    accept_loop(listener, limits, shutdown, move |stream, slot| {
        let (connector, expect, identity, metrics, connect, pool) = (
            connector.clone(),
            expect.clone(),
            identity.clone(),
            metrics.clone(),
            connect.clone(),
            pool.clone(),
        );
        async move {
            let Some(_permit) = slot.claim().await else {
                return;
            };
            let m = metrics.clone();
            let to = Hop {
                connector: &connector,
                expect: &expect,
                pool: pool.as_deref(),
            };
            if let Err(refusal) = outbound(stream, to, &identity, &connect, &limits, m).await {
                metrics.outbound.refuse(refusal);
            }
        }
    })
    .await;
    Ok(())
}

/// A connection's claim on a connection slot. Until [`Slot::claim`], the connection only
/// holds a pending slot (bounded by `max_pending`, and per source once
/// [`Slot::hold_source`] counted it); mTLS listeners claim once the peer is authenticated,
/// plaintext listeners at once (they may serve server-speaks-first protocols).
pub(crate) struct Slot {
    pending: OwnedSemaphorePermit,
    active: Arc<Semaphore>,
    accepted: Instant,
    peer: Option<SocketAddr>,
    sources: Arc<Sources>,
    source: Option<SourceGuard>,
}

impl Slot {
    /// Waits for a connection slot, then gives the pending one (and the source's count) back.
    pub(crate) async fn claim(self) -> Option<OwnedSemaphorePermit> {
        let permit = self.active.acquire_owned().await.ok();
        drop(self.pending);
        drop(self.source);
        permit
    }

    /// Gives the pending slot (and the source's count) back without claiming a connection
    /// slot, and returns the connection slots: a pooled connection's streams claim them.
    pub(crate) fn release(self) -> Arc<Semaphore> {
        self.active
    }

    /// The peer's address, as accepted.
    pub(crate) fn peer(&self) -> Option<SocketAddr> {
        self.peer
    }

    /// When the ClientHello must have arrived.
    fn first_flight_deadline(&self, limits: &Limits) -> tokio::time::Instant {
        (self.accepted + limits.first_flight_timeout).into()
    }

    /// Counts this connection among its source's pending handshakes until it claims a slot
    /// or ends; false (and not counted) when the source already has `cap`.
    fn hold_source(&mut self, cap: usize) -> bool {
        let Some(peer) = self.peer else {
            return true;
        };
        if self.source.is_some() {
            return true;
        }
        let key = listen::source_of(peer.ip());
        let mut counts = self.sources.lock();
        let n = counts.entry(key).or_insert(0);
        if *n >= cap {
            return false;
        }
        *n += 1;
        drop(counts);
        self.source = Some(SourceGuard {
            sources: self.sources.clone(),
            key,
        });
        true
    }
}

/// Pending handshakes per source of one accept loop.
#[derive(Default)]
pub(crate) struct Sources(Mutex<HashMap<IpAddr, usize>>);

impl Sources {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

struct SourceGuard {
    sources: Arc<Sources>,
    key: IpAddr,
}

impl Drop for SourceGuard {
    fn drop(&mut self) {
        let mut counts = self.sources.lock();
        if let Some(n) = counts.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

/// Accepts until `shutdown`, then drains: open connections may finish within
/// `limits.drain_timeout`, after which the rest are cut.
pub(crate) async fn accept_loop<F, Fut>(
    listener: TcpListener,
    limits: Limits,
    shutdown: CancellationToken,
    handle: F,
) where
    F: Fn(TcpStream, Slot) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let pending = Arc::new(Semaphore::new(limits.max_pending));
    // Uncapped at accept: a connection is accepted only once a handshake slot is free, and
    // its source is counted once its first byte arrived (`opening`).
    let mut acceptor = listen::Acceptor::new(listener, "proxy", listen::Caps::NONE);
    let active = Arc::new(Semaphore::new(limits.max_connections));
    let sources = Arc::new(Sources::default());
    let tracker = TaskTracker::new();
    let cut = CancellationToken::new();
    loop {
        // Wait for a free slot before accepting: excess connections queue in the kernel's
        // backlog instead of costing memory here (mini-redis).
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            p = pending.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let Some(listen::Next::Admitted(conn)) = acceptor.next(&shutdown).await else {
            break;
        };
        let (stream, peer) = (conn.io, conn.peer);
        let _ = stream.set_nodelay(true);
        let conn = handle(
            stream,
            Slot {
                pending: permit,
                active: active.clone(),
                accepted: Instant::now(),
                peer: Some(peer),
                sources: sources.clone(),
                source: None,
            },
        );
        let cut = cut.clone();
        tracker.spawn(async move {
            tokio::select! {
                () = cut.cancelled() => {}
                () = conn => {}
            }
        });
    }
    // Stop accepting at once: new connections are refused by the kernel, not queued.
    drop(acceptor);
    tracker.close();
    if !tracker.is_empty() {
        tracing::info!(open = tracker.len(), drain = ?limits.drain_timeout, "draining connections");
    }
    if tokio::time::timeout(limits.drain_timeout, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            cut = tracker.len(),
            "connections still open after the drain timeout; closing them"
        );
        cut.cancel();
        tracker.wait().await;
    }
}

/// The two inbound configurations: `mesh` for kith proxies (they offer ALPN `kith/1`), `edge`
/// for other mTLS clients of an explicit tunnel. Both require a client SVID.
pub(crate) struct Configs {
    pub(crate) mesh: Arc<rustls::ServerConfig>,
    pub(crate) edge: Arc<rustls::ServerConfig>,
}

/// What a connection's first byte says, within the first-flight deadline.
pub(crate) enum Opening {
    Tls,
    Other,
    /// Nothing within the first-flight deadline.
    Silent,
}

/// Counts the connection against its source's pending handshakes (refused beyond
/// `max_pending_per_source`), then waits (until the first-flight deadline) for the first byte
/// without consuming it. A peer that connects and closes without a byte (a port probe) is a
/// failed handshake.
pub(crate) async fn opening(
    stream: &TcpStream,
    slot: &mut Slot,
    limits: &Limits,
) -> Result<Opening, Refusal> {
    let peer = slot.peer();
    if !slot.hold_source(limits.max_pending_per_source) {
        return Err(Refusal::new(Reason::TooManyPending, peer));
    }
    let mut first = [0u8; 1];
    let deadline = slot.first_flight_deadline(limits);
    match tokio::time::timeout_at(deadline, stream.peek(&mut first)).await {
        Ok(Ok(1)) if first[0] == TLS_HANDSHAKE => Ok(Opening::Tls),
        Ok(Ok(0)) | Ok(Err(_)) => Err(Refusal::new(Reason::HandshakeFailed, peer)),
        Err(_) => Ok(Opening::Silent),
        Ok(Ok(_)) => Ok(Opening::Other),
    }
}

/// Whether a ClientHello comes from a kith peer: it offers ALPN `kith/1` or `kith/2`.
pub(crate) fn offers_mesh(hello: &rustls::server::ClientHello<'_>) -> bool {
    hello
        .alpn()
        .is_some_and(|mut offered| offered.any(|p| p == ALPN || p == ALPN_POOLED))
}

/// An mTLS connection whose first byte was a TLS handshake record: the ClientHello within
/// the first-flight deadline, the rest of the handshake, authorization, and only then a
/// connection slot (`slot`) and the forward to `target.forward`. A kith peer that negotiated
/// the pooled hop (`kith/2`) takes the slot at once and has each of its streams authorized
/// (see [`pool::serve_pooled`]).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn inbound(
    stream: TcpStream,
    slot: Slot,
    acceptor: &Configs,
    identity: &IdentityHandle,
    policy: &Arc<Policy>,
    target: Target,
    limits: &Limits,
    metrics: &Arc<Metrics>,
    shutdown: &CancellationToken,
) -> Result<(), Refusal> {
    let forward = target.forward;
    let m = &metrics.inbound;
    let peer = slot.peer();
    let refused = |reason| Refusal::new(reason, peer);
    // SECURITY: the ClientHello must arrive by the first-flight deadline; a peer that sends a
    // byte and stalls holds only a pending slot, and not for long.
    let began = std::time::Instant::now();
    // The handshake's futures are boxed: inline, their state (kilobytes) would be part of the
    // connection's task for as long as the connection lives.
    let hello = Box::pin(tokio_rustls::LazyConfigAcceptor::new(
        rustls::server::Acceptor::default(),
        stream,
    ));
    let start = match tokio::time::timeout_at(slot.first_flight_deadline(limits), hello).await {
        Ok(Ok(start)) => start,
        Ok(Err(e)) => return Err(handshake_refusal(&e, peer)),
        Err(_) => return Err(refused(Reason::HandshakeTimeout)),
    };
    let Some(own) = identity.ready(limits.identity_hold).await else {
        return Err(refused(Reason::NoIdentityYet));
    };
    // A kith peer offers `kith/1` (and `kith/2` when it pools) and must get one of them; any
    // other mTLS client is served without ALPN.
    let mesh = offers_mesh(&start.client_hello());
    let config = if mesh {
        acceptor.mesh.clone()
    } else {
        acceptor.edge.clone()
    };
    let handshake = Box::pin(start.into_stream(config));
    let tls = match tokio::time::timeout(limits.handshake_timeout, handshake).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return Err(handshake_refusal(&e, peer)),
        Err(_) => return Err(refused(Reason::HandshakeTimeout)),
    };
    let conn = tls.get_ref().1;
    let resumed = conn.handshake_kind() == Some(HandshakeKind::Resumed);
    m.handshake_done(began.elapsed(), resumed, kx_group(conn));
    let pooled = conn.alpn_protocol() == Some(ALPN_POOLED);
    if mesh && conn.alpn_protocol() != Some(ALPN) && !pooled {
        return Err(refused(Reason::HandshakeFailed));
    }
    tls::check_resumed(identity, conn, None).map_err(|r| Refusal { peer, ..r })?;
    let peer_id = tls::peer_id(identity, conn).ok_or(refused(Reason::BadCertificate))?;
    if pooled {
        // Authenticated; each stream is authorized on its own, and takes a connection slot
        // as a direct connection would.
        let slots = slot.release();
        let ctx = pool::Inbound {
            handshake: Handshake::of(conn),
            identity: identity.clone(),
            policy: policy.clone(),
            metrics: metrics.clone(),
            target,
            peer,
            peer_id,
            limits: *limits,
            slots,
        };
        Box::pin(pool::serve_pooled(tls, ctx, shutdown.clone())).await;
        return Ok(());
    }
    let own_td = own.svid().id().trust_domain();
    if let Err(denied) = policy.check_in(&peer_id, forward.port(), Some(&own_td)) {
        tracing::debug!(%denied, "inbound connection not authorized");
        return Err(refused(Reason::NotAuthorized).with_id(Some(peer_id)));
    }
    // Authenticated and authorized: now, and only now, a connection slot.
    let Some(_permit) = slot.claim().await else {
        return Ok(());
    };
    let upstream = connect(forward, limits.connect_timeout)
        .await
        .map_err(|reason| refused(reason).with_id(Some(peer_id.clone())))?;
    log_established("inbound", &peer_id, conn);
    m.open();
    let outcome = copy_bidirectional(tls, upstream, limits.idle_timeout).await;
    log_end(&peer_id.to_string(), &outcome);
    m.close(outcome.transferred.a_to_b, outcome.transferred.b_to_a);
    Ok(())
}

/// A failed handshake as a refusal: the reason and the ID the peer presented, when the error
/// says; otherwise `handshake_failed`.
fn handshake_refusal(e: &io::Error, peer: Option<SocketAddr>) -> Refusal {
    let (reason, id) = tls::refusal(e).unwrap_or((Reason::HandshakeFailed, None));
    Refusal::new(reason, peer).with_id(id)
}

/// How an outbound connection reaches its server: the client configuration, the expected
/// server, and the pool of `kith/2` connections (none with pooling off).
#[derive(Clone, Copy)]
pub(crate) struct Hop<'a> {
    pub connector: &'a TlsConnector,
    pub expect: &'a ExpectedPeer,
    pub pool: Option<&'a Pool>,
}

/// TCP connect and mTLS handshake to `to`, with the checks every mesh connection gets.
async fn dial(
    hop: Hop<'_>,
    identity: &IdentityHandle,
    to: &Upstream,
    limits: &Limits,
    metrics: &Metrics,
) -> Result<pool::Dialed, Refusal> {
    let began = std::time::Instant::now();
    let (upstream, to) = connect_upstream(to, limits.connect_timeout).await?;
    let refused = |reason| Refusal::new(reason, Some(to));
    // The name is not checked (SPIFFE verifier) and an IP address sends no SNI.
    let name = ServerName::IpAddress(to.ip().into());
    let tls = match tokio::time::timeout(
        limits.handshake_timeout,
        hop.connector.connect(name, upstream),
    )
    .await
    {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return Err(handshake_refusal(&e, Some(to))),
        Err(_) => return Err(refused(Reason::HandshakeTimeout)),
    };
    let conn = tls.get_ref().1;
    let resumed = conn.handshake_kind() == Some(HandshakeKind::Resumed);
    metrics
        .outbound
        .handshake_done(began.elapsed(), resumed, kx_group(conn));
    let alpn = conn.alpn_protocol();
    if alpn != Some(ALPN) && !(hop.pool.is_some() && alpn == Some(ALPN_POOLED)) {
        return Err(refused(Reason::HandshakeFailed));
    }
    tls::check_resumed(identity, conn, Some(hop.expect)).map_err(|r| Refusal {
        peer: Some(to),
        ..r
    })?;
    if tracing::enabled!(tracing::Level::DEBUG)
        && let Some(peer) = tls::peer_id(identity, conn)
    {
        log_established("outbound", &peer, conn);
    }
    Ok((tls, to))
}

pub(crate) async fn outbound(
    stream: TcpStream,
    hop: Hop<'_>,
    identity: &IdentityHandle,
    to: &Upstream,
    limits: &Limits,
    metrics: Arc<Metrics>,
) -> Result<(), Refusal> {
    if identity.ready(limits.identity_hold).await.is_none() {
        let peer = match to {
            Upstream::Addr(a) => Some(*a),
            Upstream::Host(..) => None,
        };
        return Err(Refusal::new(Reason::NoIdentityYet, peer));
    }
    // The dial (TCP connect, TLS and HTTP/2 handshakes) is boxed: its state is kilobytes, and
    // a future inline in the connection's task would hold that much for as long as the
    // connection lives, also while it only copies.
    let dialed = || Box::pin(dial(hop, identity, to, limits, &metrics));
    let (tls, to) = match hop.pool {
        Some(pool) => {
            match Box::pin(pool.open(to, identity, limits, &metrics.outbound, dialed)).await {
                Ok(pool::Hop::Stream(opened)) => {
                    pool::carry(stream, opened, limits, &metrics).await;
                    return Ok(());
                }
                Ok(pool::Hop::Direct(tls, to)) => (tls, to),
                Err(refusal) => {
                    // A refused stream: the app's request is still unread in its socket, and the
                    // kernel answers a close with unread data by an RST. Close it as a refused
                    // direct connection closes: a FIN, "closed without an answer".
                    tokio::spawn(close_unanswered(stream));
                    return Err(refusal);
                }
            }
        }
        None => {
            let (tls, to) = dialed().await?;
            (Box::new(tls), to)
        }
    };
    let refused = |reason| Refusal::new(reason, Some(to));
    let server_id = tls::peer_id(identity, tls.get_ref().1);
    // TLS 1.3: the server judges our certificate after our handshake "succeeded"; a refusal
    // arrives as an alert on the first read. So the connection counts as established only
    // with the peer's first byte (FirstByte), and an error before it is a refusal.
    let tls = FirstByte {
        inner: tls,
        metrics: metrics.clone(),
        opened: false,
    };
    let outcome = copy_bidirectional(stream, tls, limits.idle_timeout).await;
    log_end(&to.to_string(), &outcome);
    let m = &metrics.outbound;
    let t = outcome.transferred;
    if t.b_to_a > 0 {
        m.close(t.b_to_a, t.a_to_b);
    } else if outcome.result.is_ok() {
        // A clean close without a byte back is a normal (one-way) exchange.
        m.open();
        m.close(0, t.a_to_b);
    } else {
        m.add_bytes(0, t.a_to_b);
        return Err(refused(Reason::PeerRefused).with_id(server_id));
    }
    Ok(())
}

/// Closes a local connection that gets no answer with a FIN: what the app already sent is read
/// and dropped, the write side shut, and the rest read until the app closes (at most 2 s).
async fn close_unanswered(mut stream: TcpStream) {
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 4096];
    let drain = async {
        while let Ok(n) = stream.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
}

/// Counts an outbound connection as established (`open`) on the first byte from the peer.
struct FirstByte<S> {
    inner: S,
    metrics: Arc<Metrics>,
    opened: bool,
}

impl<S: AsyncRead + Unpin> AsyncRead for FirstByte<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if !self.opened && buf.filled().len() > before {
            self.opened = true;
            self.metrics.outbound.open();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FirstByte<S> {
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
}

pub(crate) async fn connect(to: SocketAddr, timeout: Duration) -> Result<TcpStream, Reason> {
    match tokio::time::timeout(timeout, TcpStream::connect(to)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(e)) => {
            tracing::info!(%to, error = %e, "upstream unreachable");
            Err(Reason::UpstreamUnreachable)
        }
        Err(_) => Err(Reason::UpstreamUnreachable),
    }
}

/// One debug line per mTLS connection: who the peer is and what was negotiated
/// (`RUST_LOG=proxy=debug`).
fn log_established(direction: &str, peer: &identity::SpiffeId, conn: &rustls::CommonState) {
    // The event is at debug level: its strings are made only when it is written.
    if tracing::enabled!(tracing::Level::DEBUG) {
        Handshake::of(conn).log_established(direction, peer);
    }
}

/// What the `mTLS connection established` event says of a handshake, kept for the streams of
/// a pooled connection: each authorized stream is an established connection, as a direct
/// connection is once authorized (`kith demo` and operators read this event).
#[derive(Clone, Debug)]
pub(crate) struct Handshake {
    tls: String,
    suite: String,
    kx: &'static str,
}

impl Handshake {
    pub(crate) fn of(conn: &rustls::CommonState) -> Self {
        Self {
            tls: format!("{:?}", conn.protocol_version()),
            suite: format!("{:?}", conn.negotiated_cipher_suite().map(|s| s.suite())),
            kx: identity::kx::group_name(kx_group(conn)),
        }
    }

    pub(crate) fn log_established(&self, direction: &str, peer: &identity::SpiffeId) {
        tracing::debug!(
            direction,
            peer = %peer,
            tls = %self.tls,
            suite = %self.suite,
            kx = self.kx,
            "{}",
            identity::mesh::events::MTLS_ESTABLISHED
        );
    }
}

/// The key-exchange group a finished handshake negotiated.
fn kx_group(conn: &rustls::CommonState) -> rustls::NamedGroup {
    conn.negotiated_key_exchange_group()
        .map_or(rustls::NamedGroup::Unknown(0), |g| g.name())
}

pub(crate) fn log_end(peer: &str, outcome: &copy::Outcome) {
    let t = outcome.transferred;
    match &outcome.result {
        Ok(()) => tracing::debug!(
            peer,
            a_to_b = t.a_to_b,
            b_to_a = t.b_to_a,
            "connection closed"
        ),
        Err(e) => {
            tracing::debug!(peer, a_to_b = t.a_to_b, b_to_a = t.b_to_a, error = %e, "connection ended")
        }
    }
}
