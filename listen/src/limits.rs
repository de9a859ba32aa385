//! Limits every listener shares: a per-source connection count, an idle deadline that closes a
//! connection on which nothing moved for too long, and a log limiter for refusals that an
//! attacker can repeat as fast as it likes.

use std::collections::HashMap;
use std::hash::Hash;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// Open connections per source (an address, or a UID on a Unix socket), capped.
#[derive(Debug)]
pub struct PerSource<K = IpAddr> {
    max: usize,
    open: Mutex<HashMap<K, usize>>,
}

/// One admitted connection; dropping it gives the source's slot back.
#[derive(Debug)]
pub struct SourceSlot<K: Copy + Eq + Hash = IpAddr> {
    gate: Arc<PerSource<K>>,
    key: K,
}

impl<K: Copy + Eq + Hash> PerSource<K> {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max: max.max(1),
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for `key`, or `None` when that source already holds its maximum.
    pub fn admit(self: &Arc<Self>, key: K) -> Option<SourceSlot<K>> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(key).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            gate: Arc::clone(self),
            key,
        })
    }

    pub fn open(&self, key: K) -> usize {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.get(&key).copied().unwrap_or(0)
    }
}

impl<K: Copy + Eq + Hash> Drop for SourceSlot<K> {
    fn drop(&mut self) {
        let mut open = self.gate.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// When a connection last moved a byte either way.
#[derive(Debug)]
pub struct Activity {
    base: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            base: Instant::now(),
            last_ms: AtomicU64::new(0),
        })
    }

    fn touch(&self) {
        let ms = self.base.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Resolves once nothing has moved for `timeout`.
    pub async fn idle(&self, timeout: Duration) {
        loop {
            let last = self.base + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = last + timeout;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// An IO stream that records its activity.
#[derive(Debug)]
pub struct Watched<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T> Watched<T> {
    pub fn new(inner: T, activity: Arc<Activity>) -> Self {
        Self { inner, activity }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Logs a refusal at most once a second per limiter, with how many were not logged: an
/// attacker repeating a refused request must not flood the log either.
#[derive(Debug, Default)]
pub struct LogLimit {
    last_sec: AtomicU64,
    suppressed: AtomicU64,
}

impl LogLimit {
    pub const fn new() -> Self {
        Self {
            last_sec: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Logs `what` (a refused connection) at warn level if this limiter allows it now.
    pub fn warn(&self, what: &str) {
        if let Some(skipped) = self.admit() {
            tracing::warn!(skipped, "{what}");
        }
    }

    /// `Some(n)` when this refusal should be logged, `n` being how many were skipped since
    /// the last logged one; `None` when it should not.
    pub fn admit(&self) -> Option<u64> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        self.admit_at(now)
    }

    fn admit_at(&self, now: u64) -> Option<u64> {
        let last = self.last_sec.load(Ordering::Relaxed);
        if now != last
            && self
                .last_sec
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_source_cannot_take_more_than_its_share() {
        let gate = PerSource::new(2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let s1 = gate.admit(a).unwrap();
        let _s2 = gate.admit(a).unwrap();
        assert!(gate.admit(a).is_none());
        let _b = gate.admit(b).unwrap();
        drop(s1);
        assert_eq!(gate.open(a), 1);
        assert!(gate.admit(a).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn idle_fires_only_after_nothing_moved() {
        let activity = Activity::new();
        let t0 = Instant::now();
        tokio::time::sleep(Duration::from_secs(5)).await;
        activity.touch();
        activity.idle(Duration::from_secs(10)).await;
        assert!(Instant::now() >= t0 + Duration::from_secs(15));
    }

    #[test]
    fn log_limit_logs_once_then_counts() {
        let l = LogLimit::default();
        assert_eq!(l.admit_at(100), Some(0));
        assert_eq!(l.admit_at(100), None);
        assert_eq!(l.admit_at(100), None);
        assert_eq!(l.admit_at(101), Some(2));
        assert_eq!(l.admit_at(101), None);
    }
}
