//! Waiting for something to happen: look at a condition again and again until it holds, or fail
//! after a deadline with a message that names what was awaited and what the last look saw.
//!
//! Tests wait with these and never with a fixed sleep: a sleep long enough for a slow, shared
//! machine makes every run slow, and one short enough for a fast machine fails on a busy one.
//!
//! A look returns `bool` (done or not), `Option<T>` (the value once there is one) or
//! `Result<T, E>` (the value, or what was seen instead: the failure message shows the last one).

use std::fmt::Display;
use std::time::{Duration, Instant};

/// The first pause between two looks: most waits end within a few milliseconds.
const FIRST_PAUSE: Duration = Duration::from_millis(10);
/// The pause doubles up to this, so that a slow look (a `docker exec`, a `psql`, an HTTP call to
/// a child process) is not repeated in a busy loop for the whole wait.
const LONGEST_PAUSE: Duration = Duration::from_millis(250);

/// What one look at an awaited condition found: done, with a value, or not yet, with what it
/// saw instead (for the failure message).
pub trait Look {
    type Output;

    fn done(self) -> Result<Self::Output, Option<String>>;
}

impl Look for bool {
    type Output = ();

    fn done(self) -> Result<(), Option<String>> {
        if self { Ok(()) } else { Err(None) }
    }
}

impl<T> Look for Option<T> {
    type Output = T;

    fn done(self) -> Result<T, Option<String>> {
        self.ok_or(None)
    }
}

impl<T, E: Display> Look for Result<T, E> {
    type Output = T;

    fn done(self) -> Result<T, Option<String>> {
        self.map_err(|e| Some(e.to_string()))
    }
}

/// Looks with `look` until it is done and returns its value; panics after `within`, naming
/// `what` was awaited and what the last look saw. The first look is immediate; the pauses between
/// looks grow from 10 to 250 ms.
#[track_caller]
pub fn eventually<L: Look>(what: &str, within: Duration, look: impl FnMut() -> L) -> L::Output {
    match poll(within, look) {
        Ok(value) => value,
        Err(seen) => panic!("{}", timed_out(what, within, seen)),
    }
}

/// [`eventually`] for an async look, in a tokio runtime. The deadline and the pauses are tokio
/// time, so that a test with paused time waits in virtual time.
pub async fn eventually_async<L: Look>(
    what: &str,
    within: Duration,
    look: impl AsyncFnMut() -> L,
) -> L::Output {
    match poll_async(within, look).await {
        Ok(value) => value,
        Err(seen) => panic!("{}", timed_out(what, within, seen)),
    }
}

/// Looks with `look` until it is done, for at most `within`: its value, or what the last look
/// saw. For a wait whose timeout is not a failure (the caller decides); otherwise [`eventually`].
pub fn poll<L: Look>(
    within: Duration,
    mut look: impl FnMut() -> L,
) -> Result<L::Output, Option<String>> {
    let deadline = Instant::now() + within;
    let mut pause = FIRST_PAUSE;
    loop {
        match look().done() {
            Ok(value) => return Ok(value),
            Err(seen) if Instant::now() >= deadline => return Err(seen),
            Err(_) => {}
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(LONGEST_PAUSE);
    }
}

/// [`poll`] for an async look, in tokio time.
pub async fn poll_async<L: Look>(
    within: Duration,
    mut look: impl AsyncFnMut() -> L,
) -> Result<L::Output, Option<String>> {
    let deadline = tokio::time::Instant::now() + within;
    let mut pause = FIRST_PAUSE;
    loop {
        match look().await.done() {
            Ok(value) => return Ok(value),
            Err(seen) if tokio::time::Instant::now() >= deadline => return Err(seen),
            Err(_) => {}
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(LONGEST_PAUSE);
    }
}

fn timed_out(what: &str, within: Duration, seen: Option<String>) -> String {
    match seen {
        Some(seen) => format!("timed out after {within:?} waiting for {what}; last seen: {seen}"),
        None => format!("timed out after {within:?} waiting for {what}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_the_value_once_the_look_is_done() {
        let mut n = 0;
        let got = eventually("the third look", Duration::from_secs(5), || {
            n += 1;
            (n == 3).then_some(n)
        });
        assert_eq!(got, 3);
    }

    #[test]
    fn names_what_was_awaited_and_the_last_thing_seen() {
        let panic = std::panic::catch_unwind(|| {
            eventually("a miracle", Duration::from_millis(30), || {
                Err::<(), _>("nothing yet")
            })
        })
        .unwrap_err();
        let message = panic.downcast_ref::<String>().unwrap();
        assert!(
            message.starts_with("timed out after 30ms waiting for a miracle"),
            "{message}"
        );
        assert!(message.ends_with("last seen: nothing yet"), "{message}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_async_wait_runs_in_tokio_time() {
        let start = tokio::time::Instant::now();
        let mut looks = 0;
        eventually_async(
            "a minute of tokio time",
            Duration::from_secs(120),
            async || {
                looks += 1;
                start.elapsed() >= Duration::from_secs(60)
            },
        )
        .await;
        // Paused time advances only by the pauses: at most 250 ms past the minute.
        assert!(start.elapsed() < Duration::from_secs(61));
        assert!(looks > 1);
    }
}
