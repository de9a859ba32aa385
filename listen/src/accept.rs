//! The accept step of every kith listener, TCP or Unix: a connection cap, a per-source cap
//! (the peer's IP address on TCP, its UID on a Unix socket), and a backoff when `accept` itself
//! fails. What happens after the accept (a TLS handshake, HTTP/1.1, gRPC) is the caller's; the
//! deadlines for it are in [`crate::http`] and [`crate::limits`].

use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::unix::UCred;
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::limits::{LogLimit, PerSource, SourceSlot};

/// A listening socket the loop can take.
pub trait Listener: Send + Sync + 'static {
    type Io: Send + 'static;
    /// Who connected, as the accept reports it.
    type Peer: fmt::Debug + Send + 'static;
    /// What the per-source cap counts by.
    type Source: Copy + Eq + Hash + fmt::Debug + Send + Sync + 'static;

    fn accept(&self) -> impl Future<Output = io::Result<(Self::Io, Self::Peer)>> + Send;

    /// The source a connection is counted against; `None` (no credentials) counts in the
    /// total only.
    fn source(peer: &Self::Peer) -> Option<Self::Source>;
}

impl Listener for TcpListener {
    type Io = TcpStream;
    type Peer = SocketAddr;
    type Source = IpAddr;

    fn accept(&self) -> impl Future<Output = io::Result<(TcpStream, SocketAddr)>> + Send {
        TcpListener::accept(self)
    }

    fn source(peer: &SocketAddr) -> Option<IpAddr> {
        Some(source_of(peer.ip()))
    }
}

/// The source a TCP peer is counted as: IPv4 by address (an IPv4-mapped IPv6 address too);
/// IPv6 by its /64, the block one host (or attacker) usually holds.
pub fn source_of(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        v4 => v4,
    }
}

/// A Unix socket's peer is its credentials, read from the kernel at accept (`SO_PEERCRED`):
/// the UID is what the per-source cap counts by.
impl Listener for UnixListener {
    type Io = UnixStream;
    type Peer = Option<UCred>;
    type Source = u32;

    async fn accept(&self) -> io::Result<(UnixStream, Option<UCred>)> {
        let (io, _) = UnixListener::accept(self).await?;
        let cred = match io.peer_cred() {
            Ok(cred) => Some(cred),
            Err(e) => {
                tracing::debug!(error = %e, "no peer credentials on a unix socket connection");
                None
            }
        };
        Ok((io, cred))
    }

    fn source(peer: &Option<UCred>) -> Option<u32> {
        peer.map(|c| c.uid())
    }
}

/// How many connections a listener holds at once, in all and from one source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    pub max_connections: usize,
    pub max_per_source: usize,
}

impl Caps {
    /// No cap at accept: for a caller that bounds its connections itself before accepting
    /// (the proxy waits for a free handshake slot, so excess connections wait in the kernel's
    /// backlog).
    pub const NONE: Self = Self {
        max_connections: Semaphore::MAX_PERMITS,
        max_per_source: usize::MAX,
    };
}

/// Why the accept step closed (or answered for) a connection rather than serving it, and,
/// for the HTTP listeners, why a deadline cut it. Its metrics label is [`Refusal::label`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    TooManyConnections,
    TooManyFromSource,
    HeaderTimeout,
    IdleTimeout,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Self::TooManyConnections => "too_many_connections",
            Self::TooManyFromSource => "too_many_from_source",
            Self::HeaderTimeout => "header_timeout",
            Self::IdleTimeout => "idle_timeout",
        }
    }
}

/// The slots one accepted connection holds; dropping it gives them back.
#[derive(Debug)]
pub struct Held<K: Copy + Eq + Hash> {
    _total: Option<OwnedSemaphorePermit>,
    _source: Option<SourceSlot<K>>,
}

/// One accepted connection with the slots it holds.
pub struct Conn<L: Listener> {
    pub io: L::Io,
    pub peer: L::Peer,
    pub held: Held<L::Source>,
}

impl<L: Listener> fmt::Debug for Conn<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conn").field("peer", &self.peer).finish()
    }
}

/// What [`Acceptor::next`] gives.
#[derive(Debug)]
pub enum Next<L: Listener> {
    /// Within both caps: serve it.
    Admitted(Conn<L>),
    /// Past a cap. The refusal is already logged (at most once a second per kind); the caller
    /// counts it, and either drops the connection or answers why on it. Past the total cap
    /// the connection still holds its source's slot, so that one client cannot take the
    /// answers' budget either.
    Refused(Conn<L>, Refusal),
}

/// Accept backoff: the first wait after `accept` fails, doubling to the second.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(5), Duration::from_secs(1));

/// One listener's accept step.
pub struct Acceptor<L: Listener> {
    listener: L,
    name: &'static str,
    caps: Caps,
    /// `None` when uncapped ([`Caps::NONE`]): nothing to count on the proxy's accept path.
    total: Option<Arc<Semaphore>>,
    /// `None` when uncapped ([`Caps::NONE`]): nothing to count.
    per_source: Option<Arc<PerSource<L::Source>>>,
    backoff: Duration,
    logs: Logs,
}

#[derive(Default)]
struct Logs {
    accept: LogLimit,
    total: LogLimit,
    source: LogLimit,
}

impl<L: Listener> fmt::Debug for Acceptor<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Acceptor")
            .field("name", &self.name)
            .field("caps", &self.caps)
            .finish_non_exhaustive()
    }
}

impl<L: Listener> Acceptor<L> {
    /// `name` goes in the log lines.
    pub fn new(listener: L, name: &'static str, caps: Caps) -> Self {
        Self {
            listener,
            name,
            caps,
            total: (caps.max_connections < Semaphore::MAX_PERMITS)
                .then(|| Arc::new(Semaphore::new(caps.max_connections.max(1)))),
            per_source: (caps.max_per_source != usize::MAX)
                .then(|| PerSource::new(caps.max_per_source)),
            backoff: BACKOFF.0,
            logs: Logs::default(),
        }
    }

    pub fn listener(&self) -> &L {
        &self.listener
    }

    /// The next connection, admitted or refused; `None` once `shutdown` fires. A failing
    /// `accept` (out of file descriptors: the next one would fail the same way at once) is
    /// logged at most once a second and retried after a backoff of 5 ms doubling to 1 s.
    pub async fn next(&mut self, shutdown: &CancellationToken) -> Option<Next<L>> {
        let (io, peer) = loop {
            tokio::select! {
                () = shutdown.cancelled() => return None,
                r = self.listener.accept() => match r {
                    Ok(accepted) => {
                        self.backoff = BACKOFF.0;
                        break accepted;
                    }
                    Err(e) => {
                        if let Some(skipped) = self.logs.accept.admit() {
                            tracing::warn!(listener = self.name, error = %e, skipped, retry_in = ?self.backoff, "accept failed");
                        }
                        tokio::select! {
                            () = shutdown.cancelled() => return None,
                            () = tokio::time::sleep(self.backoff) => {}
                        }
                        self.backoff = (self.backoff * 2).min(BACKOFF.1);
                    }
                },
            }
        };
        Some(self.admit(io, peer))
    }

    /// SECURITY: the per-source cap comes first, so that one client can take neither the
    /// connection slots nor what a caller spends on answering refusals.
    fn admit(&self, io: L::Io, peer: L::Peer) -> Next<L> {
        let source = self.per_source.as_ref().zip(L::source(&peer));
        let slot = match source {
            Some((per_source, key)) => match per_source.admit(key) {
                Some(slot) => Some(slot),
                None => {
                    if let Some(skipped) = self.logs.source.admit() {
                        tracing::warn!(listener = self.name, source = ?key, limit = self.caps.max_per_source, skipped, "refused a connection: that source holds its share");
                    }
                    let held = Held {
                        _total: None,
                        _source: None,
                    };
                    return Next::Refused(Conn { io, peer, held }, Refusal::TooManyFromSource);
                }
            },
            None => None,
        };
        let permit = match &self.total {
            None => Ok(None),
            Some(total) => total.clone().try_acquire_owned().map(Some),
        };
        match permit {
            Ok(permit) => Next::Admitted(Conn {
                io,
                peer,
                held: Held {
                    _total: permit,
                    _source: slot,
                },
            }),
            Err(_) => {
                if let Some(skipped) = self.logs.total.admit() {
                    tracing::warn!(
                        listener = self.name,
                        limit = self.caps.max_connections,
                        skipped,
                        "refused a connection: at the connection limit"
                    );
                }
                let held = Held {
                    _total: None,
                    _source: slot,
                };
                Next::Refused(Conn { io, peer, held }, Refusal::TooManyConnections)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal<L: Listener>(next: Option<Next<L>>) -> Option<Refusal> {
        match next.expect("a connection") {
            Next::Admitted(_) => None,
            Next::Refused(_, why) => Some(why),
        }
    }

    #[tokio::test]
    async fn tcp_caps_per_source_first_then_in_all() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let caps = Caps {
            max_connections: 2,
            max_per_source: 1,
        };
        let mut acceptor = Acceptor::new(listener, "test", caps);
        let shutdown = CancellationToken::new();
        let _c1 = TcpStream::connect(addr).await.expect("connect");
        let first = acceptor.next(&shutdown).await;
        assert!(matches!(first, Some(Next::Admitted(_))));
        // The same source (127.0.0.1) holds its one slot.
        let _c2 = TcpStream::connect(addr).await.expect("connect");
        assert_eq!(
            refusal(acceptor.next(&shutdown).await),
            Some(Refusal::TooManyFromSource)
        );
        // Once the first is gone, its slot is free again.
        drop(first);
        let _c3 = TcpStream::connect(addr).await.expect("connect");
        assert_eq!(refusal(acceptor.next(&shutdown).await), None);
    }

    #[tokio::test]
    async fn the_total_cap_keeps_the_source_slot_while_refusing() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let caps = Caps {
            max_connections: 1,
            max_per_source: 2,
        };
        let mut acceptor = Acceptor::new(listener, "test", caps);
        let shutdown = CancellationToken::new();
        let _c1 = TcpStream::connect(addr).await.expect("connect");
        let _held = acceptor.next(&shutdown).await;
        let _c2 = TcpStream::connect(addr).await.expect("connect");
        let refused = acceptor.next(&shutdown).await;
        assert_eq!(
            match &refused {
                Some(Next::Refused(_, why)) => Some(*why),
                _ => None,
            },
            Some(Refusal::TooManyConnections)
        );
        // The refused connection still counts for its source until it is dropped: a third
        // from the same source is past its share of two.
        let _c3 = TcpStream::connect(addr).await.expect("connect");
        assert_eq!(
            refusal(acceptor.next(&shutdown).await),
            Some(Refusal::TooManyFromSource)
        );
    }

    #[tokio::test]
    async fn unix_connections_are_counted_by_uid() {
        let dir = std::env::temp_dir().join(format!("listen-accept-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("s.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).expect("bind");
        let caps = Caps {
            max_connections: 8,
            max_per_source: 1,
        };
        let mut acceptor = Acceptor::new(listener, "test", caps);
        let shutdown = CancellationToken::new();
        let _c1 = UnixStream::connect(&path).await.expect("connect");
        let first = acceptor.next(&shutdown).await;
        match &first {
            Some(Next::Admitted(conn)) => {
                let uid = conn.peer.map(|c| c.uid());
                assert_eq!(uid, Some(nix_uid()), "the peer's UID comes from the kernel");
            }
            other => panic!("expected an admitted connection, got {other:?}"),
        }
        let _c2 = UnixStream::connect(&path).await.expect("connect");
        assert_eq!(
            refusal(acceptor.next(&shutdown).await),
            Some(Refusal::TooManyFromSource)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_ipv6_source_is_its_64() {
        let a: SocketAddr = "[2001:db8:1:2:aaaa::1]:1000".parse().unwrap();
        let b: SocketAddr = "[2001:db8:1:2:bbbb::9]:2000".parse().unwrap();
        let c: SocketAddr = "[2001:db8:1:3::1]:1000".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:10.0.0.1]:1000".parse().unwrap();
        assert_eq!(TcpListener::source(&a), TcpListener::source(&b));
        assert_ne!(TcpListener::source(&a), TcpListener::source(&c));
        assert_eq!(
            TcpListener::source(&mapped),
            Some("10.0.0.1".parse().unwrap())
        );
    }

    #[tokio::test]
    async fn shutdown_ends_the_wait() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut acceptor = Acceptor::new(listener, "test", Caps::NONE);
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        assert!(acceptor.next(&shutdown).await.is_none());
    }

    /// This process's effective UID, as the kernel reports it for a socket pair.
    fn nix_uid() -> u32 {
        let (a, _b) = std::os::unix::net::UnixStream::pair().expect("pair");
        let a = UnixStream::from_std({
            a.set_nonblocking(true).expect("nonblocking");
            a
        })
        .expect("tokio stream");
        a.peer_cred().expect("cred").uid()
    }
}
