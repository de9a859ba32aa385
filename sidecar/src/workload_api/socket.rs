//! The Workload API socket: binding it safely, and the accepted connections, each carrying the
//! caller's credentials pinned at accept time so that every call on the connection is attested
//! against the same process.

use std::future::Future;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::Connected;

use super::authority::AuthorityFix;
use crate::attest::PeerCred;

/// How long the accept loop rests after an accept error (EMFILE, ENFILE, ENOMEM): tonic
/// retries at once, which would spin a core while the condition lasts.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

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

pub(crate) struct Conn {
    /// The client's bytes reach h2 through the `:authority` shim (see `authority.rs`).
    io: AuthorityFix<UnixStream>,
    info: ConnInfo,
    /// Once ready, reads and writes fail: a connection that outlives the shutdown grace
    /// (no HTTP/2 preface ever sent, a reader that never reads) is cut.
    force_close: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl Conn {
    fn check_open(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.force_close.as_mut().poll(cx) {
            Poll::Ready(()) => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "workload api shut down",
            )),
            Poll::Pending => Ok(()),
        }
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
        Pin::new(&mut self.io).poll_read(cx, buf)
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
/// are cut when `force_close` is cancelled.
pub(crate) fn incoming(
    listener: UnixListener,
    force_close: CancellationToken,
) -> impl Stream<Item = io::Result<Conn>> {
    futures_util::stream::unfold(listener, move |listener| {
        let force_close = force_close.clone();
        async move {
            let item = match listener.accept().await {
                Ok((io, _)) => {
                    let cred = match io.peer_cred() {
                        Ok(ucred) => PeerCred::at_accept(ucred),
                        Err(e) => {
                            tracing::debug!(error = %e, "no peer credentials on workload api connection");
                            None
                        }
                    };
                    Ok(Conn {
                        io: AuthorityFix::new(io),
                        info: ConnInfo { cred },
                        force_close: Box::pin(force_close.cancelled_owned()),
                    })
                }
                Err(e) => {
                    tracing::warn!(error = %e, "workload api accept failed; backing off");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    Err(e)
                }
            };
            Some((item, listener))
        }
    })
}
