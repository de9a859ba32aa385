//! Refused connections as a person sees them: every refusal is counted (by reason, in
//! [`DirectionMetrics`]) and logged at info with the peer's address, the reason and the peer's
//! SPIFFE ID where one was presented. Logging is rate-limited per reason, process-wide: at most
//! [`RefusalLog::lines`] lines per reason per [`RefusalLog::window`], then one line saying how
//! many were left out, so a flood of refusals cannot fill the log (or the disk under it).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use identity::SpiffeId;

use crate::metrics::{DirectionMetrics, Reason};

/// One refused connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub reason: Reason,
    /// The other end: the client (inbound) or the server that was dialled (outbound).
    pub peer: Option<SocketAddr>,
    /// The SPIFFE ID the peer presented, when it presented one that could be read.
    pub id: Option<SpiffeId>,
}

impl Refusal {
    pub fn new(reason: Reason, peer: Option<SocketAddr>) -> Self {
        Self {
            reason,
            peer,
            id: None,
        }
    }

    pub fn with_id(mut self, id: Option<SpiffeId>) -> Self {
        self.id = id;
        self
    }
}

impl From<Reason> for Refusal {
    fn from(reason: Reason) -> Self {
        Self::new(reason, None)
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.reason.fmt(f)
    }
}

/// How much refusal logging a process allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RefusalLog {
    /// Lines per reason per window; the rest are counted and summed up in one line.
    pub lines: u32,
    pub window: Duration,
}

impl Default for RefusalLog {
    fn default() -> Self {
        Self {
            lines: 10,
            window: Duration::from_secs(10),
        }
    }
}

/// Sets the process's refusal log limits (before serving; tests use short windows).
pub fn configure_log(config: RefusalLog) {
    limiter()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .config = config;
}

impl DirectionMetrics {
    /// Counts the refusal by its reason and logs it (rate-limited per reason).
    pub fn refuse(&self, refusal: impl Into<Refusal>) {
        let refusal = refusal.into();
        self.count_refusal(refusal.reason);
        log(
            self.direction(),
            refusal.reason.as_str(),
            refusal.peer,
            refusal.id.as_ref(),
        );
    }
}

/// Logs a refusal that is counted elsewhere (such as transparent mode's capture outcomes),
/// under the same per-reason limit.
pub fn log(
    direction: &'static str,
    reason: &'static str,
    peer: Option<SocketAddr>,
    id: Option<&SpiffeId>,
) {
    let now = Instant::now();
    let decision = limiter()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .admit(reason, now);
    if let Some(suppressed) = decision.flushed {
        log_suppressed(reason, suppressed.0, suppressed.1);
    }
    if decision.log {
        let peer = peer.map_or_else(|| "unknown".to_owned(), |p| p.to_string());
        let id = id.map_or_else(|| "none".to_owned(), ToString::to_string);
        tracing::info!(
            direction,
            peer = %peer,
            reason = %reason,
            peer_id = %id,
            "connection refused"
        );
    }
    if decision.schedule_flush {
        schedule_flush(reason, now);
    }
}

fn log_suppressed(reason: &str, count: u64, window: Duration) {
    tracing::info!(
        reason = %reason,
        suppressed = count,
        window = ?window,
        "{count} more refusals ({reason}) not logged in the last {window:?}"
    );
}

/// The first refusal left out of a window arranges for the summary line at the window's end,
/// so the count is reported even if no refusal of that reason follows.
fn schedule_flush(reason: &'static str, now: Instant) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let at = {
        let limiter = limiter().lock().unwrap_or_else(PoisonError::into_inner);
        limiter.window_end(reason).unwrap_or(now)
    };
    rt.spawn(async move {
        tokio::time::sleep_until(at.into()).await;
        let flushed = limiter()
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .flush(reason, Instant::now());
        if let Some((count, window)) = flushed {
            log_suppressed(reason, count, window);
        }
    });
}

fn limiter() -> &'static Mutex<Limiter> {
    static LIMITER: OnceLock<Mutex<Limiter>> = OnceLock::new();
    LIMITER.get_or_init(|| Mutex::new(Limiter::new(RefusalLog::default())))
}

/// Per-reason windows; a pure function of `now` (unit-tested without sleeping). Reasons are
/// a fixed set of static labels, so the map stays small.
#[derive(Debug)]
struct Limiter {
    config: RefusalLog,
    windows: HashMap<&'static str, Window>,
}

#[derive(Clone, Copy, Debug, Default)]
struct Window {
    start: Option<Instant>,
    logged: u32,
    suppressed: u64,
    flush_scheduled: bool,
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Decision {
    log: bool,
    /// A summary of the previous window to log first: (count, window length).
    flushed: Option<(u64, Duration)>,
    /// The first refusal left out in this window: arrange for a summary at its end.
    schedule_flush: bool,
}

impl Limiter {
    fn new(config: RefusalLog) -> Self {
        Self {
            config,
            windows: HashMap::new(),
        }
    }

    fn admit(&mut self, reason: &'static str, now: Instant) -> Decision {
        let config = self.config;
        let w = self.windows.entry(reason).or_default();
        let mut decision = Decision::default();
        let expired = w
            .start
            .is_none_or(|s| now.saturating_duration_since(s) >= config.window);
        if expired {
            if w.suppressed > 0 {
                decision.flushed = Some((w.suppressed, config.window));
            }
            *w = Window {
                start: Some(now),
                ..Window::default()
            };
        }
        if w.logged < config.lines {
            w.logged += 1;
            decision.log = true;
        } else {
            w.suppressed += 1;
            if !w.flush_scheduled {
                w.flush_scheduled = true;
                decision.schedule_flush = true;
            }
        }
        decision
    }

    fn window_end(&self, reason: &str) -> Option<Instant> {
        let w = self.windows.get(reason)?;
        w.start.map(|s| s + self.config.window)
    }

    /// At a window's end: the count left out, once; the next refusal starts a new window.
    fn flush(&mut self, reason: &str, now: Instant) -> Option<(u64, Duration)> {
        let window = self.config.window;
        let w = self.windows.get_mut(reason)?;
        let start = w.start?;
        if now.saturating_duration_since(start) < window || w.suppressed == 0 {
            return None;
        }
        let count = w.suppressed;
        *w = Window::default();
        Some((count, window))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(lines: u32) -> Limiter {
        Limiter::new(RefusalLog {
            lines,
            window: Duration::from_secs(10),
        })
    }

    #[test]
    fn logs_the_first_lines_of_a_window_then_counts() {
        let mut l = limiter(3);
        let t = Instant::now();
        let logged = (0..3).filter(|_| l.admit("unknown_ca", t).log).count();
        assert_eq!(logged, 3);
        let fourth = l.admit("unknown_ca", t);
        assert!(!fourth.log && fourth.schedule_flush);
        let fifth = l.admit("unknown_ca", t);
        assert!(!fifth.log && !fifth.schedule_flush);
        // Another reason has its own budget.
        assert!(l.admit("expired", t).log);
    }

    #[test]
    fn the_next_window_reports_what_was_left_out() {
        let mut l = limiter(1);
        let t = Instant::now();
        l.admit("not_authorized", t);
        l.admit("not_authorized", t);
        l.admit("not_authorized", t);
        let later = l.admit("not_authorized", t + Duration::from_secs(10));
        assert!(later.log);
        assert_eq!(later.flushed, Some((2, Duration::from_secs(10))));
    }

    #[test]
    fn a_flush_reports_once_and_only_after_the_window() {
        let mut l = limiter(1);
        let t = Instant::now();
        l.admit("plaintext_refused", t);
        l.admit("plaintext_refused", t);
        assert_eq!(
            l.flush("plaintext_refused", t + Duration::from_secs(5)),
            None
        );
        let end = t + Duration::from_secs(10);
        assert_eq!(
            l.flush("plaintext_refused", end),
            Some((1, Duration::from_secs(10)))
        );
        assert_eq!(l.flush("plaintext_refused", end), None);
        // A fresh window after the flush logs again, with nothing left to report.
        let next = l.admit("plaintext_refused", end);
        assert!(next.log && next.flushed.is_none());
    }
}
