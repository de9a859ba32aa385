//! The copy between an application's TCP connection and a CONNECT stream of the pooled hop
//! ([`crate::pool`]), without copy buffers of its own:
//!
//! - TCP → stream: once the socket is readable, one read into a fresh buffer (sized like
//!   [`crate::copy`]'s, 1 KiB growing to 64 KiB with the traffic) that is handed to h2 as it
//!   is, cut to the stream's window;
//! - stream → TCP: each received DATA frame is written to the socket from h2's own bytes, and
//!   its window is released once the socket took it (a reader that stops reading stops its
//!   own stream, and only its own).
//!
//! So an idle application connection holds no buffer on either side (it waits for readiness,
//! not in a read), and a byte is copied once fewer each way than through a generic
//! [`crate::copy::copy_bidirectional`] over an `AsyncRead` adapter. Half-close is END_STREAM
//! one way and TCP `shutdown(Write)` the other; an error either way resets the stream
//! (RST_STREAM CANCEL) and the TCP connection (zero linger).

use std::future::poll_fn;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};

use crate::copy::{self, Activity, Outcome, buffer_size};

/// Copies `tcp` to and from a stream until both directions ended (see the module's doc).
pub(crate) async fn bridge(
    tcp: &mut TcpStream,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
    idle: Duration,
) -> Outcome {
    let outcome = {
        let (mut read, mut write) = tcp.split();
        copy::both_ways(idle, async |activity, up, down| {
            tokio::try_join!(
                tcp_to_stream(&mut read, &mut send, activity, up),
                stream_to_tcp(&mut recv, &mut write, activity, down)
            )
            .map(|_| ())
        })
        .await
    };
    if outcome.result.is_err() {
        send.send_reset(h2::Reason::CANCEL);
        // A reset stream is a reset TCP connection, not a clean end.
        let _ = tcp.set_zero_linger();
    }
    outcome
}

async fn tcp_to_stream(
    tcp: &mut ReadHalf<'_>,
    send: &mut SendStream<Bytes>,
    activity: &Activity,
    total: &AtomicU64,
) -> io::Result<()> {
    let mut moved = 0u64;
    loop {
        // The buffer is made once there is something to read (an idle connection holds none),
        // and the read goes through `AsyncRead`: a short read marks the socket drained, where
        // `try_read_buf` would make one more read, which fails with EAGAIN, per message.
        tcp.readable().await?;
        let mut buf = BytesMut::with_capacity(buffer_size(moved));
        let n = tcp.read_buf(&mut buf).await?;
        if n == 0 {
            // Half-close: END_STREAM; the other direction goes on.
            return send.send_data(Bytes::new(), true).map_err(h2_io);
        }
        activity.touch();
        let mut data = buf.freeze();
        while !data.is_empty() {
            // Bytes are handed to h2 only within the stream's window, so nothing queues
            // beyond it.
            send.reserve_capacity(data.len());
            match poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(Ok(0)) => {}
                Some(Ok(granted)) => {
                    let chunk = data.split_to(granted.min(data.len()));
                    send.send_data(chunk, false).map_err(h2_io)?;
                }
                Some(Err(e)) => return Err(h2_io(e)),
                None => return Err(closed(send).await),
            }
        }
        activity.touch();
        moved += n as u64;
        total.store(moved, Ordering::Relaxed);
    }
}

async fn stream_to_tcp(
    recv: &mut RecvStream,
    tcp: &mut WriteHalf<'_>,
    activity: &Activity,
    total: &AtomicU64,
) -> io::Result<()> {
    let mut moved = 0u64;
    loop {
        match recv.data().await {
            Some(Ok(data)) => {
                if data.is_empty() {
                    continue;
                }
                activity.touch();
                tcp.write_all(&data).await?;
                // The frame's bytes (a slice of h2's read buffer) go before the window opens.
                let n = data.len();
                drop(data);
                let _ = recv.flow_control().release_capacity(n);
                activity.touch();
                moved += n as u64;
                total.store(moved, Ordering::Relaxed);
            }
            Some(Err(e)) => return Err(h2_io(e)),
            // END_STREAM: the peer's half-close.
            None => return tcp.shutdown().await,
        }
    }
}

/// The stream is closed for sending: why, when the peer reset it.
async fn closed(send: &mut SendStream<Bytes>) -> io::Error {
    match poll_fn(|cx| send.poll_reset(cx)).await {
        Ok(reason) => io::Error::new(
            io::ErrorKind::ConnectionReset,
            format!("stream reset: {reason:?}"),
        ),
        Err(e) => h2_io(e),
    }
}

fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e.into_io().unwrap_or_else(|| io::ErrorKind::Other.into());
    }
    if e.is_reset() || e.is_go_away() {
        return io::Error::new(io::ErrorKind::ConnectionReset, e);
    }
    io::Error::other(e)
}
