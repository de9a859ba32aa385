//! When to renew an SVID: a pure function of its validity and a jitter value, so the schedule
//! is testable without clocks.

use std::time::{Duration, SystemTime};

use ring::rand::{SecureRandom, SystemRandom};

/// Renew at `fraction` of the lifetime, moved by up to `spread` of the lifetime either way.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RefreshPolicy {
    pub fraction: f64,
    pub spread: f64,
}

impl Default for RefreshPolicy {
    /// 50 % of the lifetime ± 10 %: what SPIRE and Linkerd do, and it spreads a fleet's renewals.
    fn default() -> Self {
        Self {
            fraction: 0.5,
            spread: 0.1,
        }
    }
}

/// A jitter value in [-1, 1]: -1 renews earliest, 1 latest.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Jitter(f64);

impl Jitter {
    pub const NONE: Jitter = Jitter(0.0);

    /// Clamps to [-1, 1]; NaN becomes 0.
    pub fn new(value: f64) -> Self {
        if value.is_nan() {
            Self(0.0)
        } else {
            Self(value.clamp(-1.0, 1.0))
        }
    }

    /// A uniformly random jitter from the system's CSPRNG (0 if it fails, which only costs spread).
    pub fn random() -> Self {
        let mut b = [0u8; 4];
        if SystemRandom::new().fill(&mut b).is_err() {
            return Self::NONE;
        }
        let unit = u32::from_le_bytes(b) as f64 / u32::MAX as f64;
        Self::new(unit * 2.0 - 1.0)
    }

    pub fn value(self) -> f64 {
        self.0
    }
}

/// The moment to renew a certificate valid from `not_before` to `not_after`, with the default
/// policy (50 % ± 10 % of its lifetime).
pub fn refresh_at(not_before: SystemTime, not_after: SystemTime, jitter: Jitter) -> SystemTime {
    RefreshPolicy::default().refresh_at(not_before, not_after, jitter)
}

impl RefreshPolicy {
    /// Always within [not_before, not_after]; a certificate whose not_after is not after its
    /// not_before is due at once (at not_before).
    pub fn refresh_at(
        &self,
        not_before: SystemTime,
        not_after: SystemTime,
        jitter: Jitter,
    ) -> SystemTime {
        let Ok(lifetime) = not_after.duration_since(not_before) else {
            return not_before;
        };
        let fraction = (self.fraction + self.spread * jitter.value()).clamp(0.0, 1.0);
        not_before + Duration::from_secs_f64(lifetime.as_secs_f64() * fraction)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + secs)
    }

    #[test]
    fn renews_at_half_life_without_jitter() {
        assert_eq!(refresh_at(t(0), t(3600), Jitter::NONE), t(1800));
        assert_eq!(refresh_at(t(0), t(86_400), Jitter::NONE), t(43_200));
    }

    #[test]
    fn jitter_moves_up_to_ten_percent_of_the_lifetime() {
        assert_eq!(refresh_at(t(0), t(3600), Jitter::new(-1.0)), t(1440));
        assert_eq!(refresh_at(t(0), t(3600), Jitter::new(1.0)), t(2160));
        assert_eq!(refresh_at(t(0), t(3600), Jitter::new(0.5)), t(1980));
        // Out-of-range jitter is clamped, NaN is ignored.
        assert_eq!(refresh_at(t(0), t(3600), Jitter::new(7.0)), t(2160));
        assert_eq!(refresh_at(t(0), t(3600), Jitter::new(f64::NAN)), t(1800));
    }

    #[test]
    fn random_jitter_stays_in_the_window() {
        for _ in 0..1000 {
            let at = refresh_at(t(0), t(0) + HOUR, Jitter::random());
            assert!(at >= t(1440) && at <= t(2160), "{at:?}");
        }
    }

    #[test]
    fn degenerate_lifetimes_renew_immediately() {
        assert_eq!(refresh_at(t(100), t(100), Jitter::NONE), t(100));
        assert_eq!(refresh_at(t(100), t(50), Jitter::new(1.0)), t(100));
    }

    #[test]
    fn custom_policy_is_clamped_to_the_lifetime() {
        let policy = RefreshPolicy {
            fraction: 0.95,
            spread: 0.2,
        };
        assert_eq!(policy.refresh_at(t(0), t(1000), Jitter::new(1.0)), t(1000));
        assert_eq!(policy.refresh_at(t(0), t(1000), Jitter::new(-1.0)), t(750));
    }
}
