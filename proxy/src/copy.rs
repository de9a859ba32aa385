//! Bidirectional copy with half-close, an idle timeout, and buffers that follow the traffic:
//! each direction starts with 1 KiB, grows to 16 KiB after 128 KiB and to 64 KiB after 10 MB
//! (istio/ztunnel `src/copy.rs`). Idle connections stay cheap, bulk transfers get large TLS
//! records. At most one buffer per direction exists: a peer that stops reading stops the
//! copy (backpressure), it never makes memory grow.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

pub const INITIAL_BUFFER: usize = 1024;
pub const MEDIUM_BUFFER: usize = 16 * 1024;
pub const LARGE_BUFFER: usize = 64 * 1024;
const MEDIUM_AFTER: u64 = 128 * 1024;
const LARGE_AFTER: u64 = 10 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("idle for {0:?}")]
    Idle(Duration),
    #[error("copy failed: {0}")]
    Io(#[from] io::Error),
}

/// Bytes moved each way, also when the copy ended in an error.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transferred {
    pub a_to_b: u64,
    pub b_to_a: u64,
}

#[derive(Debug)]
pub struct Outcome {
    pub transferred: Transferred,
    pub result: Result<(), Error>,
}

/// Copies `a` → `b` and `b` → `a` until both directions saw EOF, then returns. An EOF on one
/// side is passed on as a shutdown of the other side's write half (half-close); the other
/// direction keeps going. Fails when either direction fails, or when no byte moved either way
/// for `idle`.
pub async fn copy_bidirectional<A, B>(a: A, b: B, idle: Duration) -> Outcome
where
    A: AsyncRead + AsyncWrite,
    B: AsyncRead + AsyncWrite,
{
    let (ar, aw) = tokio::io::split(a);
    let (br, bw) = tokio::io::split(b);
    both_ways(idle, async |activity, a_to_b, b_to_a| {
        tokio::try_join!(
            one_way(ar, bw, activity, a_to_b),
            one_way(br, aw, activity, b_to_a)
        )
        .map(|_| ())
    })
    .await
}

/// Runs the two directions of a copy (`ways`, given the shared activity and a byte count for
/// each way: a → b, then b → a) until both ended or one failed, or until no byte moved either
/// way for `idle`.
pub(crate) async fn both_ways<F>(idle: Duration, ways: F) -> Outcome
where
    F: AsyncFnOnce(&Activity, &AtomicU64, &AtomicU64) -> io::Result<()>,
{
    let activity = Activity::new();
    let a_to_b = AtomicU64::new(0);
    let b_to_a = AtomicU64::new(0);
    let result = tokio::select! {
        r = ways(&activity, &a_to_b, &b_to_a) => r.map_err(Error::Io),
        () = activity.idle(idle) => Err(Error::Idle(idle)),
    };
    Outcome {
        transferred: Transferred {
            a_to_b: a_to_b.load(Ordering::Relaxed),
            b_to_a: b_to_a.load(Ordering::Relaxed),
        },
        result,
    }
}

/// The buffer size for a direction that has moved `total` bytes so far.
pub fn buffer_size(total: u64) -> usize {
    if total >= LARGE_AFTER {
        LARGE_BUFFER
    } else if total >= MEDIUM_AFTER {
        MEDIUM_BUFFER
    } else {
        INITIAL_BUFFER
    }
}

async fn one_way<R, W>(
    mut reader: R,
    mut writer: W,
    activity: &Activity,
    total: &AtomicU64,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; INITIAL_BUFFER];
    let mut moved = 0u64;
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            // Half-close: the peer is done sending; tell the other side, keep reading it.
            writer.shutdown().await?;
            return Ok(());
        }
        activity.touch();
        writer.write_all(&buf[..n]).await?;
        // TLS streams keep records until flushed; without this an idle pause could strand
        // the last bytes.
        writer.flush().await?;
        activity.touch();
        moved += n as u64;
        total.store(moved, Ordering::Relaxed);
        let want = buffer_size(moved);
        if want > buf.len() {
            buf.resize(want, 0);
        }
    }
}

/// The time of the last byte moved either way, for the idle timeout.
pub(crate) struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    pub(crate) fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Completes once nothing moved for `idle`.
    async fn idle(&self, idle: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = last + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::duplex;

    use super::*;

    const LONG: Duration = Duration::from_secs(60);

    #[tokio::test]
    async fn bytes_both_ways_with_half_close() {
        let (mut client, pa) = duplex(64 * 1024);
        let (pb, mut server) = duplex(64 * 1024);
        let copy = tokio::spawn(copy_bidirectional(pa, pb, LONG));

        client.write_all(b"hello").await.expect("write");
        client.shutdown().await.expect("shutdown");
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, b"hello");

        // The other direction still works after the first one closed.
        server.write_all(b"world!").await.expect("write");
        server.shutdown().await.expect("shutdown");
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, b"world!");

        let outcome = copy.await.expect("join");
        outcome.result.expect("clean end");
        assert_eq!(
            outcome.transferred,
            Transferred {
                a_to_b: 5,
                b_to_a: 6
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_fires() {
        let (_client, pa) = duplex(1024);
        let (pb, _server) = duplex(1024);
        let outcome = copy_bidirectional(pa, pb, Duration::from_secs(10)).await;
        assert!(matches!(outcome.result, Err(Error::Idle(_))), "{outcome:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn traffic_keeps_a_connection_alive() {
        let (mut client, pa) = duplex(1024);
        let (pb, mut server) = duplex(1024);
        let copy = tokio::spawn(copy_bidirectional(pa, pb, Duration::from_secs(10)));
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            client.write_all(b"x").await.expect("write");
            let mut b = [0u8; 1];
            server.read_exact(&mut b).await.expect("still open");
        }
        let outcome = copy.await.expect("join");
        assert!(matches!(outcome.result, Err(Error::Idle(_))));
        assert_eq!(outcome.transferred.a_to_b, 5);
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_stops_reading_stops_the_copy() {
        let (mut client, pa) = duplex(4096);
        let (pb, _server) = duplex(4096);
        tokio::spawn(copy_bidirectional(pa, pb, LONG));
        let chunk = vec![7u8; 8192];
        let mut accepted = 0usize;
        while let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_secs(1), client.write(&chunk)).await
        {
            accepted += n;
            assert!(accepted < 64 * 1024, "unbounded buffering");
        }
        // Two pipes of 4 KiB and one 1 KiB copy buffer in between.
        assert!(accepted <= 4096 * 2 + INITIAL_BUFFER, "{accepted}");
    }

    #[test]
    fn buffers_grow_with_traffic() {
        assert_eq!(buffer_size(0), INITIAL_BUFFER);
        assert_eq!(buffer_size(MEDIUM_AFTER - 1), INITIAL_BUFFER);
        assert_eq!(buffer_size(MEDIUM_AFTER), MEDIUM_BUFFER);
        assert_eq!(buffer_size(LARGE_AFTER), LARGE_BUFFER);
        assert_eq!(buffer_size(u64::MAX), LARGE_BUFFER);
    }
}
