//! Getting an SVID from the CA, the same way for every caller (the agent's node and workload
//! SVIDs, a pod sidecar's own): a fresh key and CSR → the call (with whatever evidence the
//! caller has) → the answer checked (chain against the bundle it carries, the expected ID, our
//! own key) → an [`Issued`] ready to publish, with when to renew it. And one retry policy for
//! when that fails.
//!
//! On failure nothing is published: the caller keeps what it holds, and retries after
//! [`Backoff::after_failure`].

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use identity::{SpiffeId, Svid, TrustBundle, TrustDomain};

use crate::link::{self, LinkError};
use crate::wire::SvidResponse;

/// The first wait after a failure; it doubles with every failure in a row...
pub const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// ...up to this.
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// Which SPIFFE ID the answer must name.
#[derive(Debug, Clone, Copy)]
pub enum Expect<'a> {
    /// Exactly this one (a renewal, or an entry's SVID).
    Id(&'a SpiffeId),
    /// Any ID of the trust domain: the CA derives it from the evidence (a pod's namespace and
    /// service account).
    MemberOf(&'a TrustDomain),
}

/// A checked SVID, the bundle that came with it, and when to renew.
pub struct Issued {
    pub svid: Svid,
    pub bundle: TrustBundle,
    /// The CA's hint when it is sane, else our own point in the lifetime (see [`renew_point`]).
    pub renew_at: SystemTime,
    /// The CA's hint as it came (unix seconds), for the record.
    pub renew_hint: i64,
}

/// One issuance: makes a key and CSR, hands the CSR to `call` (which sends it with the
/// caller's evidence and returns the CA's answer), and checks the answer before anything uses
/// it. The key never leaves this process.
pub async fn certify<F, Fut>(expect: Expect<'_>, call: F) -> Result<Issued, LinkError>
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = Result<SvidResponse, LinkError>>,
{
    let (key, csr) = link::new_key_and_csr()?;
    let answer = call(csr).await?;
    let now = SystemTime::now();
    let (td, id) = match expect {
        Expect::Id(id) => (id.trust_domain(), id.clone()),
        Expect::MemberOf(td) => {
            let id = SpiffeId::new(&answer.spiffe_id)
                .map_err(|e| LinkError::BadAnswer(format!("spiffe_id: {e}")))?;
            if !id.is_member_of(td) {
                return Err(LinkError::BadAnswer(format!(
                    "the CA issued {id}, outside {td}"
                )));
            }
            (td.clone(), id)
        }
    };
    let bundle = link::bundle_of(&answer.bundle, &td)?;
    let svid = link::validate(&answer, &key, &bundle, &id, now)?;
    let renew_at = renew_point(answer.renew_after, svid.not_after(), now);
    Ok(Issued {
        svid,
        bundle,
        renew_at,
        renew_hint: answer.renew_after,
    })
}

/// When to renew: the CA's hint if it lies between now and the SVID's end; otherwise (a hint
/// in the past would mean asking again at once, in a loop; one past the end would mean expiry)
/// our own point in the lifetime, with jitter.
pub fn renew_point(hint_unix: i64, not_after: SystemTime, now: SystemTime) -> SystemTime {
    let hint = UNIX_EPOCH + Duration::from_secs(hint_unix.max(0) as u64);
    if hint > now && hint < not_after {
        hint
    } else {
        identity::refresh_at(now, not_after, identity::Jitter::random())
    }
}

/// Exponential backoff between failed attempts: [`BACKOFF_MIN`] doubling to [`BACKOFF_MAX`],
/// back to the start after a success.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    delay: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { delay: BACKOFF_MIN }
    }
}

impl Backoff {
    /// The wait before the next attempt. Never more than a quarter of what is left of the SVID
    /// the caller still holds (and at least [`BACKOFF_MIN`]), so that a CA that comes back
    /// shortly before that SVID expires is used in time.
    pub fn after_failure(&mut self, held_until: Option<SystemTime>, now: SystemTime) -> Duration {
        let mut wait = self.delay;
        self.delay = (self.delay * 2).min(BACKOFF_MAX);
        if let Some(end) = held_until {
            let left = end.duration_since(now).unwrap_or_default();
            wait = wait.min((left / 4).max(BACKOFF_MIN));
        }
        wait
    }

    pub fn succeeded(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unix(t: SystemTime) -> i64 {
        t.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
    }

    #[test]
    fn a_hint_in_the_past_or_past_the_end_is_not_trusted() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let end = now + Duration::from_secs(3600);
        let good = now + Duration::from_secs(1800);
        assert_eq!(renew_point(unix(good), end, now), good);
        for bad in [unix(now) - 10, 0, -5, unix(end) + 10, unix(end)] {
            let at = renew_point(bad, end, now);
            assert!(at > now && at < end, "hint {bad} gave {at:?}");
        }
    }

    #[test]
    fn backoff_doubles_to_a_minute_and_respects_the_held_svid() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut b = Backoff::default();
        let waits: Vec<u64> = (0..8)
            .map(|_| b.after_failure(None, now).as_secs())
            .collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60]);
        // 20 s left: never more than 5 s.
        assert_eq!(
            b.after_failure(Some(now + Duration::from_secs(20)), now),
            Duration::from_secs(5)
        );
        // Expired: still at least the minimum, never a busy loop.
        assert_eq!(
            b.after_failure(Some(now - Duration::from_secs(5)), now),
            BACKOFF_MIN
        );
        b.succeeded();
        assert_eq!(b.after_failure(None, now), BACKOFF_MIN);
    }
}
