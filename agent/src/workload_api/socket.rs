//! The Workload API socket: binding it safely, and the accepted connections, each carrying the
//! caller's credentials pinned at accept time so that every call on the connection is attested
//! against the same process.

use std::future::Future;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::Connected;

use super::authority_shim::AuthorityFix;
use super::{Limits, WorkloadApiMetrics};
use crate::attest::PeerCred;

/// Binds the Workload API socket at `path`: removes a stale socket left by an earlier run,
/// creates the parent directory (0755) if missing, and opens the socket to every local user
/// (0777), since any local process may ask who it is: the answer depends on who asks.
///
/// SECURITY: the socket is only as trustworthy as its directory. A directory that others can
/// write lets them swap the socket for their own and hand out identities; it is refused.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(parent)?;
    let dir = std::fs::metadata(parent)?;
    if dir.mode() & 0o022 != 0 || dir.uid() != nix::unistd::geteuid().as_raw() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} must be owned by the agent and writable by no one else (chmod 755)",
                parent.display()
            ),
        ));
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    // The umask made it 0755 or so: other uids could not connect.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777))?;
    Ok(listener)
}

/// What every request on a connection carries in its extensions.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ConnInfo {
    /// `None` when the kernel gave no credentials: such a caller is refused.
    pub cred: Option<PeerCred>,
}

/// Which connections are let in: the total and per-uid caps, and the first-request deadline
/// each one gets.
pub(crate) struct Admission {
    caps: listen::Caps,
    first_request_timeout: Duration,
    metrics: Arc<WorkloadApiMetrics>,
}

impl Admission {
    pub(crate) fn new(limits: &Limits, metrics: Arc<WorkloadApiMetrics>) -> Self {
        Self {
            caps: listen::Caps {
                max_connections: limits.max_connections,
                max_per_source: limits.max_connections_per_uid,
            },
            first_request_timeout: limits.first_request_timeout,
            metrics,
        }
    }
}

/// A connection's place under the caps, given back when the connection is dropped (the
/// open-connection gauge, raised once the connection is set up, goes down with it).
struct Slot {
    _held: listen::Held<u32>,
    metrics: Arc<WorkloadApiMetrics>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.metrics.connection_closed();
    }
}

pub(crate) struct Conn {
    /// The client's bytes reach h2 through the `:authority` shim (see `authority_shim.rs`).
    io: AuthorityFix<UnixStream>,
    info: ConnInfo,
    /// Once ready, reads and writes fail: a connection that outlives the shutdown grace
    /// (no HTTP/2 preface ever sent, a reader that never reads) is cut.
    force_close: Pin<Box<WaitForCancellationFutureOwned>>,
    /// Until the first request's headers arrived: when this fires first, the connection is cut.
    first_request: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Set once the connection was cut for a reason of its own: every later read fails too.
    cut: Option<&'static str>,
    metrics: Arc<WorkloadApiMetrics>,
    _slot: Slot,
}

impl Conn {
    fn check_open(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if let Some(reason) = self.cut {
            return Err(io::Error::new(io::ErrorKind::ConnectionAborted, reason));
        }
        if let Poll::Ready(()) = self.force_close.as_mut().poll(cx) {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "workload api shut down",
            ));
        }
        if let Some(deadline) = &mut self.first_request {
            if self.io.saw_request() {
                self.first_request = None;
            } else if deadline.as_mut().poll(cx).is_ready() {
                self.first_request = None;
                return Err(self.cut_for(
                    "first_request_deadline",
                    "no HTTP/2 request on the connection before the deadline",
                ));
            }
        }
        Ok(())
    }

    /// Marks the connection cut, counts and logs why, and gives the error that ends it.
    fn cut_for(&mut self, reason: &'static str, detail: &str) -> io::Error {
        self.cut = Some(reason);
        let (uid, pid) = match self.info.cred {
            Some(c) => (Some(c.uid), Some(c.pid)),
            None => (None, None),
        };
        self.metrics.refuse(reason, uid, pid, detail);
        io::Error::new(
            io::ErrorKind::ConnectionAborted,
            format!("{reason}: {detail}"),
        )
    }
}

impl Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check_open(cx)?;
        match Pin::new(&mut self.io).poll_read(cx, buf) {
            // The shim refused what the client sent (a header list past the limit, a bad header
            // block): say why, once. Other read errors (the client went away) are no refusal.
            Poll::Ready(Err(e)) => match self.io.failure_reason() {
                Some(reason) if self.cut.is_none() => {
                    Poll::Ready(Err(self.cut_for(reason, &e.to_string())))
                }
                _ => Poll::Ready(Err(e)),
            },
            other => {
                if self.first_request.is_some() && self.io.saw_request() {
                    self.first_request = None;
                }
                other
            }
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check_open(cx)?;
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.check_open(cx)?;
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// The listener's connections, each with its peer's credentials read at accept; all of them
/// are cut when `force_close` is cancelled. Connections past the caps (a connection without
/// credentials counts in the total only) are closed at once. The stream ends with `shutdown`.
pub(crate) fn incoming(
    listener: UnixListener,
    force_close: CancellationToken,
    admission: Admission,
    shutdown: CancellationToken,
) -> impl Stream<Item = io::Result<Conn>> {
    let acceptor = listen::Acceptor::new(listener, "workload api", admission.caps);
    futures_util::stream::unfold(
        (acceptor, admission, force_close, shutdown),
        |(mut acceptor, admission, force_close, shutdown)| async move {
            let conn = loop {
                match acceptor.next(&shutdown).await? {
                    listen::Next::Admitted(conn) => break conn,
                    listen::Next::Refused(conn, why) => {
                        let reason = match why {
                            listen::Refusal::TooManyFromSource => "connections_per_uid_cap",
                            _ => "connections_total_cap",
                        };
                        admission.metrics.refuse(
                            reason,
                            conn.peer.map(|c| c.uid()),
                            conn.peer.and_then(|c| c.pid()),
                            "connection closed at accept: too many open",
                        );
                    }
                }
            };
            // As early as possible: the executable and start time that every call on this
            // connection is checked against.
            let cred = conn.peer.and_then(PeerCred::at_accept);
            // Counted open once its credentials are pinned.
            admission.metrics.connection_opened();
            let item = Conn {
                io: AuthorityFix::new(conn.io),
                info: ConnInfo { cred },
                force_close: Box::pin(force_close.clone().cancelled_owned()),
                first_request: Some(Box::pin(tokio::time::sleep(
                    admission.first_request_timeout,
                ))),
                cut: None,
                metrics: admission.metrics.clone(),
                _slot: Slot {
                    _held: conn.held,
                    metrics: admission.metrics.clone(),
                },
            };
            Some((Ok(item), (acceptor, admission, force_close, shutdown)))
        },
    )
}
