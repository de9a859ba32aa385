//! The pooled hop between two kith sidecars (ALPN `kith/2`): one long-lived mTLS connection
//! carries many application connections, each as an HTTP/2 CONNECT stream whose authority is
//! the original destination (`ip:port`).
//!
//! - Outbound ([`Pool`]): per destination sidecar (and, since a pool belongs to one listener
//!   and its [`IdentityHandle`], per own identity) at most [`POOL_CAP`] connections of at most
//!   [`MAX_STREAMS`] streams each; a connection with [`Limits::pool_spread`] streams
//!   ([`SPREAD_STREAMS`] by default) makes the next stream
//!   open another (the others meanwhile use the existing ones), and beyond the cap streams
//!   wait for a free slot. A connection made before the last publish
//!   of the own identity takes no new streams (its streams finish, then it closes with
//!   GOAWAY), so after a rotation new streams go to a connection made with the new SVID. A
//!   server that answers `kith/1` (an older kith, or `--pool off`) gets one mTLS connection
//!   per application connection, as before.
//! - Inbound ([`serve_pooled`]): every stream is authorized on its own, with the same policy
//!   as a direct connection, for the pool connection's peer ID; a refused stream gets an HTTP
//!   status (403, 400, 502) and is counted with the usual reasons. A publish of the own
//!   identity, or shutdown, sends GOAWAY: open streams finish, new ones go to a new
//!   connection.
//! - Flow control: each stream has its own window ([`STREAM_WINDOW`]) that opens only as the
//!   receiving application reads, and the connection window is large enough for every stream's
//!   window at once, so a stream whose reader stalls holds at most its window and never stalls
//!   the others. Buffered data is bounded by `MAX_STREAMS * STREAM_WINDOW` per connection.
//! - Half-close is END_STREAM one way and TCP `shutdown(Write)` the other; a reset stream is
//!   an RST on the TCP side (zero linger) and a TCP error a RST_STREAM (CANCEL).
//! - Idle cost: an idle application connection holds no TLS state of its own (the pooled
//!   connection's is shared by all its streams) and no copy buffer (`stream_copy` reads only
//!   once the socket is readable), only its socket, its task (the dial's state is boxed and
//!   gone once the stream is open: about 2 KiB is left) and its h2 stream entry. rustls
//!   itself already shrinks a connection's receive buffer to one 4 KiB read when it holds no
//!   partial record, and its send buffers are empty once written, so an idle pooled
//!   connection is small too.
//!
//! Why this is one file of over 500 lines: the pooled hop is one protocol: the pool (per-peer
//! connections, drained on rotation), the h2 bridge and both ends of a CONNECT stream, tested
//! together.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use identity::SpiffeId;
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::authz::Policy;
use crate::metrics::{DirectionMetrics, Metrics, Reason};
use crate::refusal::Refusal;
use crate::stream_copy;
use crate::tls::IdentityHandle;
use crate::tunnel::{self, Limits, Upstream};

/// Streams one pooled connection carries at once (the server's SETTINGS_MAX_CONCURRENT_STREAMS).
pub const MAX_STREAMS: u32 = 32;

/// Each stream's flow-control window: the most one stream buffers when its reader stalls.
/// Large enough that window updates do not pace a bulk transfer over a slower path. On
/// loopback, 256 KiB and 2 MiB measured alike (the pooled hop's bulk rate there is bound by
/// its CPU per byte, not by the window).
pub const STREAM_WINDOW: u32 = 2 * 1024 * 1024;

/// The connection's window: every stream's window at once (64 MiB), so that streams that
/// stall cannot use up the connection's credit and stall the others.
pub const CONNECTION_WINDOW: u32 = MAX_STREAMS * STREAM_WINDOW;

/// Largest HTTP/2 frame either side sends: four TLS records' worth, so that bulk data takes
/// few frames (the protocol's default is 16 KiB).
const MAX_FRAME: u32 = 64 * 1024;

/// The default of [`Limits::pool_spread`]: streams on a pooled connection before the next
/// stream opens another connection (up to [`POOL_CAP`]): the load spreads over a few connections, and so over the server's worker
/// threads (each pooled connection is served by one), instead of all on one.
pub const SPREAD_STREAMS: usize = 16;

/// Pooled connections per destination; beyond `POOL_CAP * MAX_STREAMS` streams, new streams
/// wait for a free slot.
pub const POOL_CAP: usize = 32;

/// A pooled connection with no stream for this long is closed.
pub const POOL_IDLE: Duration = Duration::from_secs(90);

/// After a server answered `kith/1`, how long its destination is dialled directly.
const DIRECT_FOR: Duration = Duration::from_secs(60);

/// Attempts to open a stream when a pooled connection turns out closed or draining (GOAWAY)
/// before the stream was accepted; such a stream carried no byte and is safe to try again.
const OPEN_ATTEMPTS: usize = 3;

/// Destinations remembered at most; beyond, destinations without a connection are forgotten.
const DESTINATIONS: usize = 1024;

/// Copies an application's TCP connection to and from a stream; an error on either side ends
/// the other with a reset. Returns (from the stream to TCP, from TCP to the stream).
async fn bridge(
    tcp: &mut TcpStream,
    (send, recv): (SendStream<Bytes>, RecvStream),
    idle: Duration,
    label: &str,
) -> (u64, u64) {
    let outcome = stream_copy::bridge(tcp, send, recv, idle).await;
    tunnel::log_end(label, &outcome);
    let t = outcome.transferred;
    (t.b_to_a, t.a_to_b)
}

fn client_builder() -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_header_list_size(16 * 1024)
        .enable_push(false);
    b
}

fn server_builder() -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_concurrent_streams(MAX_STREAMS)
        .max_frame_size(MAX_FRAME)
        .max_header_list_size(16 * 1024);
    b
}

// ---- outbound ---------------------------------------------------------------------------

/// The outbound pool of one listener: pooled connections by destination.
#[derive(Default)]
pub struct Pool {
    entries: Mutex<HashMap<Upstream, Arc<Entry>>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("destinations", &lock(&self.entries).len())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Default)]
struct Entry {
    conns: Mutex<Vec<Arc<Conn>>>,
    /// One new connection at a time per destination: a burst of application connections
    /// waits for one handshake and then shares it.
    dial: tokio::sync::Mutex<()>,
    direct_until: Mutex<Option<Instant>>,
    /// Dials that failed, and the last refusal: connections that waited for a failed dial
    /// fail with it.
    failures: AtomicU64,
    last_failure: Mutex<Option<Refusal>>,
}

impl Entry {
    fn direct(&self) -> bool {
        lock(&self.direct_until).is_some_and(|until| Instant::now() < until)
    }

    /// The least loaded live connection made under identity `version` with fewer than
    /// `below` streams (a slot is reserved on it); connections that closed or were made under
    /// another version leave the pool (the latter drain: their streams go on, they take no new
    /// ones).
    fn pick(&self, version: u64, below: usize) -> Option<Slot> {
        let mut conns = lock(&self.conns);
        conns.retain(|c| {
            let keep = !c.closed.load(Ordering::Acquire) && c.version == version;
            if !keep && c.version != version {
                tracing::debug!(to = %c.addr, "pooled connection draining: the identity changed");
            }
            keep
        });
        let conn = conns
            .iter()
            .filter(|c| c.active.load(Ordering::Relaxed) < below)
            .min_by_key(|c| c.active.load(Ordering::Relaxed))?;
        Some(Slot::new(conn.clone()))
    }

    fn len(&self) -> usize {
        lock(&self.conns).len()
    }
}

/// A pooled mTLS connection (client side).
struct Conn {
    send: h2::client::SendRequest<Bytes>,
    active: AtomicUsize,
    closed: AtomicBool,
    /// The server answered a stream on it (so a later failure is the connection ending, and
    /// the stream may try another).
    proven: AtomicBool,
    /// The own identity version it was made with.
    version: u64,
    addr: SocketAddr,
    server_id: Option<SpiffeId>,
    /// Milliseconds since `born` when the last stream ended.
    last_used: AtomicU64,
    born: Instant,
}

impl Conn {
    fn touch(&self) {
        let ms = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_used.store(ms, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        self.born.elapsed().saturating_sub(Duration::from_millis(
            self.last_used.load(Ordering::Relaxed),
        ))
    }
}

/// A stream slot of a pooled connection, held while the stream lives.
struct Slot {
    conn: Arc<Conn>,
}

impl Slot {
    fn new(conn: Arc<Conn>) -> Self {
        conn.active.fetch_add(1, Ordering::AcqRel);
        Self { conn }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.conn.touch();
        self.conn.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What the outbound side got for one application connection.
pub(crate) enum Hop {
    /// A stream of a pooled connection, accepted (200) by the server sidecar.
    Stream(OpenStream),
    /// The server chose `kith/1`: this mTLS connection is the application connection's own.
    Direct(Box<tokio_rustls::client::TlsStream<TcpStream>>, SocketAddr),
}

pub(crate) struct OpenStream {
    stream: (SendStream<Bytes>, RecvStream),
    slot: Slot,
}

/// How a dial ended, for [`Pool::open`].
pub(crate) type Dialed = (tokio_rustls::client::TlsStream<TcpStream>, SocketAddr);

enum OpenError {
    /// The server sidecar answered with this status: the stream is refused.
    Refused(http::StatusCode),
    /// The connection failed or is draining; another connection may take the stream.
    Connection(h2::Error),
}

impl Pool {
    pub fn new() -> Self {
        Self::default()
    }

    /// Pooled connections open now (all destinations).
    pub fn connections(&self) -> usize {
        let entries: Vec<Arc<Entry>> = lock(&self.entries).values().cloned().collect();
        entries.iter().map(|e| e.len()).sum()
    }

    fn entry(&self, to: &Upstream) -> Arc<Entry> {
        let mut entries = lock(&self.entries);
        if let Some(e) = entries.get(to) {
            return e.clone();
        }
        if entries.len() >= DESTINATIONS {
            entries.retain(|_, e| e.len() > 0 || e.direct());
        }
        let e = Arc::new(Entry::default());
        entries.insert(to.clone(), e.clone());
        e
    }

    /// A stream to `to` on a pooled connection (made with `dial` when none has room), or the
    /// dialled connection itself when the server does not pool.
    pub(crate) async fn open<F, Fut>(
        &self,
        to: &Upstream,
        identity: &IdentityHandle,
        limits: &Limits,
        metrics: &DirectionMetrics,
        dial: F,
    ) -> Result<Hop, Refusal>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<Dialed, Refusal>>,
    {
        let entry = self.entry(to);
        let mut last = None;
        for _ in 0..OPEN_ATTEMPTS {
            let version = identity.version();
            let mut fresh = false;
            let slot = if entry.direct() {
                // The server answered kith/1 lately: dial at once, as without a pool.
                match take(&entry, dial().await?, version, limits, metrics).await? {
                    Taken::Direct(hop) => return Ok(hop),
                    Taken::Pooled(slot) => {
                        fresh = true;
                        slot
                    }
                }
            } else if let Some(slot) = entry.pick(version, limits.pool_spread) {
                slot
            } else if let Some(_dialing) = (entry.len() < POOL_CAP)
                .then(|| entry.dial.try_lock().ok())
                .flatten()
            {
                // The connections have `pool_spread` streams each: one more connection,
                // made by this stream while the others keep using the existing ones.
                match dial_new(&entry, &dial, version, limits, metrics).await? {
                    Taken::Direct(hop) => return Ok(hop),
                    Taken::Pooled(slot) => {
                        fresh = true;
                        slot
                    }
                }
            } else if let Some(slot) = entry.pick(version, MAX_STREAMS as usize) {
                slot
            } else {
                let failures = entry.failures.load(Ordering::Acquire);
                let _dialing = entry.dial.lock().await;
                if let Some(slot) = entry.pick(version, limits.pool_spread) {
                    slot
                } else if entry.failures.load(Ordering::Acquire) != failures {
                    // The dial this connection waited for failed: it fails the same way, at
                    // once, as parallel connects to an unreachable server would.
                    let failed = lock(&entry.last_failure).clone();
                    return Err(failed.unwrap_or(Refusal::new(Reason::UpstreamUnreachable, None)));
                } else if entry.len() < POOL_CAP {
                    match dial_new(&entry, &dial, version, limits, metrics).await? {
                        Taken::Direct(hop) => return Ok(hop),
                        Taken::Pooled(slot) => {
                            fresh = true;
                            slot
                        }
                    }
                } else {
                    // At the cap: the least loaded connection; beyond its MAX_STREAMS the
                    // stream waits in h2 for a free one.
                    match entry.pick(version, usize::MAX) {
                        Some(slot) => slot,
                        None => continue,
                    }
                }
            };
            match open_stream(&slot.conn, limits).await {
                Ok(stream) => {
                    slot.conn.proven.store(true, Ordering::Release);
                    return Ok(Hop::Stream(OpenStream { stream, slot }));
                }
                Err(OpenError::Refused(status)) => {
                    slot.conn.proven.store(true, Ordering::Release);
                    tracing::debug!(to = %slot.conn.addr, %status, "stream refused by the server sidecar");
                    return Err(Refusal::new(Reason::PeerRefused, Some(slot.conn.addr))
                        .with_id(slot.conn.server_id.clone()));
                }
                Err(OpenError::Connection(e))
                    if fresh || !slot.conn.proven.load(Ordering::Acquire) =>
                {
                    // A connection that never answered a stream: TLS 1.3 servers judge the
                    // client certificate after the client's side of the handshake, so a
                    // refusal arrives on the new connection's first read. Not tried again.
                    slot.conn.closed.store(true, Ordering::Release);
                    tracing::debug!(to = %slot.conn.addr, error = %e, "new pooled connection refused");
                    return Err(Refusal::new(Reason::PeerRefused, Some(slot.conn.addr))
                        .with_id(slot.conn.server_id.clone()));
                }
                Err(OpenError::Connection(e)) => {
                    tracing::debug!(to = %slot.conn.addr, error = %e, "pooled connection cannot take the stream; trying another");
                    slot.conn.closed.store(true, Ordering::Release);
                    last = Some(slot.conn.addr);
                }
            }
        }
        // Like a TCP connect that failed.
        Err(Refusal::new(Reason::UpstreamUnreachable, last))
    }
}

/// Dials a new connection for the entry; a failure is remembered for the streams that waited.
async fn dial_new<F, Fut>(
    entry: &Arc<Entry>,
    dial: &F,
    version: u64,
    limits: &Limits,
    metrics: &DirectionMetrics,
) -> Result<Taken, Refusal>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<Dialed, Refusal>>,
{
    match dial().await {
        Ok(dialed) => take(entry, dialed, version, limits, metrics).await,
        Err(refusal) => {
            *lock(&entry.last_failure) = Some(refusal.clone());
            entry.failures.fetch_add(1, Ordering::AcqRel);
            Err(refusal)
        }
    }
}

enum Taken {
    Direct(Hop),
    Pooled(Slot),
}

/// A dialled connection: with `kith/2`, a new pooled connection (and a stream slot on it);
/// with `kith/1`, the application connection's own, and the destination is dialled directly
/// for a while.
async fn take(
    entry: &Arc<Entry>,
    (tls, addr): Dialed,
    version: u64,
    limits: &Limits,
    metrics: &DirectionMetrics,
) -> Result<Taken, Refusal> {
    if tls.get_ref().1.alpn_protocol() != Some(crate::tls::ALPN_POOLED) {
        *lock(&entry.direct_until) = Some(Instant::now() + DIRECT_FOR);
        return Ok(Taken::Direct(Hop::Direct(Box::new(tls), addr)));
    }
    *lock(&entry.direct_until) = None;
    let conn = start(tls, addr, version, entry, limits).await?;
    metrics.pooled_open();
    let slot = Slot::new(conn.clone());
    lock(&entry.conns).push(conn);
    Ok(Taken::Pooled(slot))
}

/// The HTTP/2 handshake on a fresh `kith/2` connection, and its connection task.
async fn start(
    tls: tokio_rustls::client::TlsStream<TcpStream>,
    addr: SocketAddr,
    version: u64,
    entry: &Arc<Entry>,
    limits: &Limits,
) -> Result<Arc<Conn>, Refusal> {
    let server_id = (tls.get_ref().1.peer_certificates())
        .and_then(<[_]>::first)
        .and_then(crate::tls::leaf_id);
    let refused = |reason| Refusal::new(reason, Some(addr)).with_id(server_id.clone());
    let (send, connection) =
        match tokio::time::timeout(limits.handshake_timeout, client_builder().handshake(tls)).await
        {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => {
                tracing::debug!(to = %addr, error = %e, "HTTP/2 handshake failed");
                return Err(refused(Reason::PeerRefused));
            }
            Err(_) => return Err(refused(Reason::HandshakeTimeout)),
        };
    let conn = Arc::new(Conn {
        send,
        active: AtomicUsize::new(0),
        closed: AtomicBool::new(false),
        proven: AtomicBool::new(false),
        version,
        addr,
        server_id: server_id.clone(),
        last_used: AtomicU64::new(0),
        born: Instant::now(),
    });
    if let Some(id) = &server_id {
        tracing::info!(mode = "pooled", to = %addr, peer = %id, "pooled mTLS connection open (kith/2, HTTP/2 streams)");
    }
    let (weak, entry) = (Arc::downgrade(&conn), Arc::downgrade(entry));
    tokio::spawn(drive(connection, weak, entry, addr));
    Ok(conn)
}

/// Drives a pooled connection until it closes; closes it when it had no stream for
/// [`POOL_IDLE`]. It ends gracefully (GOAWAY) once the pool let go of it and its last stream
/// ended.
async fn drive<T>(
    mut connection: h2::client::Connection<T, Bytes>,
    conn: Weak<Conn>,
    entry: Weak<Entry>,
    addr: SocketAddr,
) where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut check = tokio::time::interval(POOL_IDLE / 3);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result = loop {
        tokio::select! {
            r = &mut connection => break r,
            _ = check.tick() => {
                let Some(c) = conn.upgrade() else { continue };
                if c.active.load(Ordering::Acquire) == 0 && c.idle_for() >= POOL_IDLE {
                    c.closed.store(true, Ordering::Release);
                    if let Some(entry) = entry.upgrade() {
                        lock(&entry.conns).retain(|other| !Arc::ptr_eq(other, &c));
                    }
                }
            }
        }
    };
    if let Some(c) = conn.upgrade() {
        c.closed.store(true, Ordering::Release);
    }
    match result {
        Ok(()) => tracing::debug!(to = %addr, "pooled connection closed"),
        Err(e) => tracing::debug!(to = %addr, error = %e, "pooled connection ended"),
    }
}

async fn open_stream(
    conn: &Conn,
    limits: &Limits,
) -> Result<(SendStream<Bytes>, RecvStream), OpenError> {
    // The authority is the destination without an IPv6 scope (`%eth0` is no URI syntax); the
    // server side forwards to where the pooled connection went anyway.
    let authority = SocketAddr::new(conn.addr.ip(), conn.addr.port());
    let request = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(authority.to_string())
        .body(())
        .map_err(|_| OpenError::Refused(http::StatusCode::BAD_REQUEST))?;
    let ready = conn.send.clone().ready();
    let mut send = match tokio::time::timeout(limits.connect_timeout, ready).await {
        Ok(Ok(send)) => send,
        Ok(Err(e)) => return Err(OpenError::Connection(e)),
        Err(_) => return Err(OpenError::Refused(http::StatusCode::GATEWAY_TIMEOUT)),
    };
    let (response, stream) = send
        .send_request(request, false)
        .map_err(OpenError::Connection)?;
    drop(send);
    // The server sidecar answers once it reached the destination (connect timeout there),
    // or refuses; the bound here adds the round trip.
    let wait = limits.connect_timeout + limits.handshake_timeout;
    let response = match tokio::time::timeout(wait, response).await {
        Ok(Ok(r)) => r,
        Ok(Err(e))
            if e.reason() == Some(h2::Reason::REFUSED_STREAM) || e.is_go_away() || e.is_io() =>
        {
            return Err(OpenError::Connection(e));
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "stream reset before the answer");
            return Err(OpenError::Refused(http::StatusCode::BAD_GATEWAY));
        }
        Err(_) => return Err(OpenError::Refused(http::StatusCode::GATEWAY_TIMEOUT)),
    };
    if response.status() != http::StatusCode::OK {
        return Err(OpenError::Refused(response.status()));
    }
    Ok((stream, response.into_body()))
}

/// Carries an application connection over an accepted stream, counted as one outbound
/// connection (established at the server's 200).
pub(crate) async fn carry(
    mut app: TcpStream,
    opened: OpenStream,
    limits: &Limits,
    metrics: &Metrics,
) {
    let OpenStream { stream, slot } = opened;
    let m = &metrics.outbound;
    m.open();
    let label = slot.conn.addr.to_string();
    let (from_tls, to_tls) = bridge(&mut app, stream, limits.idle_timeout, &label).await;
    m.close(from_tls, to_tls);
    drop(slot);
}

// ---- inbound ----------------------------------------------------------------------------

/// Where the streams of one inbound pooled connection go: where a direct connection on the
/// same TCP connection would go (the explicit tunnel's forward address, or in transparent mode
/// the connection's own original destination), whatever authority a stream names. So the
/// pooled hop reaches exactly what a direct connection reaches, and a Service address that
/// was translated on the way (the client names the Service, this side sees the pod) still
/// works: the translation happened once, for the pooled connection.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Target {
    /// The address streams are forwarded to (its port decides the policy).
    pub forward: SocketAddr,
}

/// What every stream of an inbound pooled connection needs.
pub(crate) struct Inbound {
    pub identity: IdentityHandle,
    pub policy: Arc<Policy>,
    pub metrics: Arc<Metrics>,
    pub target: Target,
    pub peer: Option<SocketAddr>,
    pub peer_id: SpiffeId,
    pub limits: Limits,
    /// The listener's connection slots (`max_connections`).
    pub slots: Arc<tokio::sync::Semaphore>,
    /// The pooled connection's handshake, logged for each authorized stream.
    pub handshake: tunnel::Handshake,
}

/// Serves the streams of an authenticated `kith/2` connection until the client closes it,
/// it is idle for the idle timeout, or GOAWAY (own identity published again, or `shutdown`)
/// and its last stream ended.
pub(crate) async fn serve_pooled(
    tls: tokio_rustls::server::TlsStream<TcpStream>,
    ctx: Inbound,
    shutdown: CancellationToken,
) {
    let ctx = Arc::new(ctx);
    let mut h2 = match tokio::time::timeout(
        ctx.limits.handshake_timeout,
        server_builder().handshake::<_, Bytes>(tls),
    )
    .await
    {
        Ok(Ok(h2)) => h2,
        Ok(Err(e)) => {
            tracing::debug!(peer = %ctx.peer_id, error = %e, "HTTP/2 handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(peer = %ctx.peer_id, "HTTP/2 handshake timed out");
            return;
        }
    };
    ctx.metrics.inbound.pooled_open();
    tracing::info!(mode = "pooled", peer = %ctx.peer_id, "pooled mTLS connection accepted (kith/2, HTTP/2 streams)");
    let mut rotated = ctx.identity.subscribe();
    rotated.borrow_and_update();
    let mut streams = JoinSet::new();
    let mut draining = false;
    // A client closes a pooled connection without streams after POOL_IDLE; one that does
    // not is closed here a little later.
    let idle_for = ctx.limits.idle_timeout.min(2 * POOL_IDLE);
    let idle = tokio::time::sleep(idle_for);
    tokio::pin!(idle);
    loop {
        tokio::select! {
            next = h2.accept() => match next {
                Some(Ok((request, respond))) => {
                    let ctx = ctx.clone();
                    streams.spawn(stream(request, respond, ctx));
                }
                Some(Err(e)) => {
                    tracing::debug!(peer = %ctx.peer_id, error = %e, "pooled connection ended");
                    break;
                }
                None => break,
            },
            Some(_) = streams.join_next(), if !streams.is_empty() => {
                if streams.is_empty() {
                    idle.as_mut().reset(tokio::time::Instant::now() + idle_for);
                }
            }
            changed = rotated.changed(), if !draining => {
                // A new SVID (or bundle): new streams must come on a connection made with it.
                let _ = changed;
                tracing::debug!(peer = %ctx.peer_id, "identity changed: draining the pooled connection");
                h2.graceful_shutdown();
                draining = true;
            }
            () = shutdown.cancelled(), if !draining => {
                h2.graceful_shutdown();
                draining = true;
            }
            () = &mut idle, if streams.is_empty() && !draining => {
                h2.graceful_shutdown();
                draining = true;
            }
        }
    }
    // The connection is gone; its streams' I/O with it.
    streams.shutdown().await;
}

/// One CONNECT stream: checked like a direct connection, then carried.
async fn stream(
    request: http::Request<RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    ctx: Arc<Inbound>,
) {
    let m = &ctx.metrics.inbound;
    let refuse = |respond: &mut h2::server::SendResponse<Bytes>, status, reason| {
        let answer = http::Response::builder()
            .status(status)
            .body(())
            .unwrap_or_default();
        let _ = respond.send_response(answer, true);
        m.refuse(Refusal::new(reason, ctx.peer).with_id(Some(ctx.peer_id.clone())));
    };
    if request.method() != http::Method::CONNECT {
        return refuse(
            &mut respond,
            http::StatusCode::METHOD_NOT_ALLOWED,
            Reason::HandshakeFailed,
        );
    }
    let Some(authority) = request
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
    else {
        return refuse(
            &mut respond,
            http::StatusCode::BAD_REQUEST,
            Reason::HandshakeFailed,
        );
    };
    let forward = ctx.target.forward;
    // SECURITY: the same policy as a direct connection, for this stream's destination port.
    let own_td = ctx.identity.current().map(|c| c.svid().id().trust_domain());
    if let Err(denied) = ctx
        .policy
        .check_in(&ctx.peer_id, forward.port(), own_td.as_ref())
    {
        // The same event as a refused direct connection: `kith demo` and operators read it.
        tracing::debug!(%denied, "inbound connection not authorized");
        return refuse(
            &mut respond,
            http::StatusCode::FORBIDDEN,
            Reason::NotAuthorized,
        );
    }
    // Each stream is an application connection and takes a connection slot, as a direct
    // connection does (the excess waits).
    let Ok(_permit) = ctx.slots.clone().acquire_owned().await else {
        return;
    };
    tracing::trace!(peer = %ctx.peer_id, %authority, %forward, "stream accepted");
    let mut upstream = match tunnel::connect(forward, ctx.limits.connect_timeout).await {
        Ok(s) => s,
        Err(reason) => return refuse(&mut respond, http::StatusCode::BAD_GATEWAY, reason),
    };
    ctx.handshake.log_established("inbound", &ctx.peer_id);
    let send = match respond.send_response(http::Response::new(()), false) {
        Ok(send) => send,
        Err(e) => {
            tracing::debug!(error = %e, "stream gone before the answer");
            return;
        }
    };
    m.open();
    let label = ctx.peer_id.to_string();
    let stream = (send, request.into_body());
    let (from_tls, to_tls) = bridge(&mut upstream, stream, ctx.limits.idle_timeout, &label).await;
    m.close(from_tls, to_tls);
}
