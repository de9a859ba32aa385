//! Root rollover, as pure functions of the roots the CA holds, what its callers reported, and
//! `now`. The `Authority` applies the steps; everything that decides lives here and is tested
//! with an injected clock.
//!
//! A root goes through these phases:
//!
//! 1. **active**: it signs the signing intermediates.
//! 2. At `rollover_at` of its life (default 1/2) a successor is made and **published**: it is in
//!    the bundle beside the active root, but signs nothing yet. Its `activate_at` is stored as its
//!    own NotAfter, which marks it pending ("never, while it is valid").
//! 3. Signing **switches** to an intermediate under the successor only when the bundle has had
//!    time to reach every consumer: the propagation window (the longest SVID TTL) has passed
//!    since it was published (and since this process began watching), and every caller that
//!    renewed in that window reported holding the successor. A CA that is still waiting at
//!    2/3 of the way from publication to the old root's end switches anyway (the old root's
//!    leaves need the rest of its life to expire), naming the callers it did not hear from.
//! 4. The old root is **retiring**: still in the bundle until the last certificate under it has
//!    expired (the switch plus the longest SVID TTL, never past its own end), then **retired**.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::authority::unix;

/// When and how cautiously roots roll over.
#[derive(Clone, Debug)]
pub struct Policy {
    /// The fraction of a root's life at which its successor is made (0 < f < 1).
    pub rollover_at: f64,
    /// How long a new bundle needs to reach every consumer: the longest SVID TTL, since a
    /// caller renews at least once per lifetime and gets the bundle with each answer.
    pub propagation: Duration,
    /// The longest lifetime of any leaf: how long a replaced root must stay trusted.
    pub max_leaf_ttl: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            rollover_at: 0.5,
            propagation: Duration::from_secs(86_400),
            max_leaf_ttl: Duration::from_secs(86_400),
        }
    }
}

/// What the rollover needs to know about a root.
#[derive(Clone, Debug)]
pub struct RootFacts {
    pub id: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub created_at: SystemTime,
    /// When it started signing; `>= not_after` while it is a published successor.
    pub activate_at: SystemTime,
    /// SHA-256 of the certificate: what callers report.
    pub sha256: [u8; 32],
}

impl RootFacts {
    pub fn is_pending(&self) -> bool {
        self.activate_at >= self.not_after
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Phase {
    /// In the bundle, not signing yet.
    Published,
    /// Signs the signing intermediates.
    Active,
    /// Replaced; in the bundle until `until` (unix seconds), when its last leaf has expired.
    Retiring { until: i64 },
    /// Out of the bundle: replaced and its leaves expired, or past its own end.
    Retired,
}

impl Phase {
    pub fn in_bundle(&self) -> bool {
        !matches!(self, Phase::Retired)
    }
}

/// The root that signs now: the most recently activated root that is not pending.
pub fn signing_root(roots: &[RootFacts], now: SystemTime) -> Option<&RootFacts> {
    roots
        .iter()
        .filter(|r| !r.is_pending() && r.activate_at <= now)
        .max_by_key(|r| (r.activate_at, r.created_at))
}

/// The newest published successor that is still valid.
pub fn pending_successor(roots: &[RootFacts], now: SystemTime) -> Option<&RootFacts> {
    roots
        .iter()
        .filter(|r| r.is_pending() && r.not_after > now)
        .max_by_key(|r| r.created_at)
}

/// When a replaced root leaves the bundle: once every leaf issued before the switch expired.
pub fn retires_at(
    switched_at: SystemTime,
    max_leaf_ttl: Duration,
    not_after: SystemTime,
) -> SystemTime {
    (switched_at + max_leaf_ttl + Duration::from_secs(1)).min(not_after)
}

/// The phase of every root.
pub fn phases(roots: &[RootFacts], now: SystemTime, max_leaf_ttl: Duration) -> Vec<Phase> {
    let signing = signing_root(roots, now).map(|r| r.id.clone());
    roots
        .iter()
        .map(|r| {
            if now >= r.not_after {
                return Phase::Retired;
            }
            if r.is_pending() {
                return Phase::Published;
            }
            if Some(&r.id) == signing.as_ref() {
                return Phase::Active;
            }
            // Replaced: by the first root activated after it.
            let switched = roots
                .iter()
                .filter(|s| !s.is_pending() && s.activate_at > r.activate_at)
                .map(|s| s.activate_at)
                .min();
            match switched {
                Some(at) => {
                    let until = retires_at(at, max_leaf_ttl, r.not_after);
                    if now < until {
                        Phase::Retiring { until: unix(until) }
                    } else {
                        Phase::Retired
                    }
                }
                // Activated in the future (not made by kith): not trusted yet.
                None => Phase::Retired,
            }
        })
        .collect()
}

/// When a root's successor is due.
pub fn successor_due_at(root: &RootFacts, rollover_at: f64) -> SystemTime {
    let life = root
        .not_after
        .duration_since(root.not_before)
        .unwrap_or_default();
    root.not_before + life.mul_f64(rollover_at.clamp(0.0, 1.0))
}

/// The latest moment the CA waits for its callers: 2/3 of the way from publication to the old
/// root's end, so the old root's leaves have the last third to expire.
pub fn switch_deadline(successor: &RootFacts, signing: &RootFacts) -> SystemTime {
    let left = signing
        .not_after
        .duration_since(successor.created_at)
        .unwrap_or_default();
    successor.created_at + left * 2 / 3
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "waiting_for", rename_all = "snake_case")]
pub enum Wait {
    /// The propagation window has not passed yet.
    Propagation { until: i64, deadline: i64 },
    /// These callers renewed in the window without reporting the successor root.
    Callers { callers: Vec<String>, deadline: i64 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// No root, or nothing is due.
    Nothing,
    /// The signing root reached its rollover point and has no successor.
    MakeSuccessor,
    /// A successor is published; the switch waits.
    Wait(Wait),
    /// Switch signing to the successor. `forced` when some callers never reported it (listed).
    Switch {
        successor: String,
        forced: bool,
        unconfirmed: Vec<String>,
    },
}

/// What to do now. `observed_since` is when this process began recording reports (reports do
/// not survive a restart, so the window must lie inside what was observed); `laggards` lists the
/// callers that renewed since a time without reporting a root (by SHA-256).
pub fn next_step(
    roots: &[RootFacts],
    now: SystemTime,
    policy: &Policy,
    observed_since: SystemTime,
    laggards: impl Fn(SystemTime, &[u8; 32]) -> Vec<String>,
) -> Step {
    let Some(signing) = signing_root(roots, now) else {
        return Step::Nothing;
    };
    let Some(successor) =
        pending_successor(roots, now).filter(|s| s.created_at >= signing.activate_at)
    else {
        return if now >= successor_due_at(signing, policy.rollover_at) {
            Step::MakeSuccessor
        } else {
            Step::Nothing
        };
    };
    let window_start = successor.created_at.max(observed_since);
    let window_end = window_start + policy.propagation;
    let deadline = switch_deadline(successor, signing);
    let late = laggards(window_start, &successor.sha256);
    if now >= deadline {
        let forced = now < window_end || !late.is_empty();
        return Step::Switch {
            successor: successor.id.clone(),
            forced,
            unconfirmed: late,
        };
    }
    if now < window_end {
        return Step::Wait(Wait::Propagation {
            until: unix(window_end),
            deadline: unix(deadline),
        });
    }
    if !late.is_empty() {
        return Step::Wait(Wait::Callers {
            callers: late,
            deadline: unix(deadline),
        });
    }
    Step::Switch {
        successor: successor.id.clone(),
        forced: false,
        unconfirmed: Vec::new(),
    }
}

/// What a caller said about its bundle on its last renewal.
#[derive(Clone, Debug)]
pub struct Report {
    pub at: SystemTime,
    /// When the certificate it got expires: after that, it no longer matters.
    pub expires: SystemTime,
    /// SHA-256 of each root it holds; None when it did not say.
    pub held: Option<Vec<[u8; 32]>>,
}

/// The callers that renewed at or after `since`, whose certificate is still valid, and that did
/// not report holding `root` on their last renewal. Sorted.
pub fn laggards(
    reports: &HashMap<String, Report>,
    since: SystemTime,
    now: SystemTime,
    root: &[u8; 32],
) -> Vec<String> {
    let mut v: Vec<String> = reports
        .iter()
        .filter(|(_, r)| r.at >= since && r.expires > now)
        .filter(|(_, r)| !r.held.as_ref().is_some_and(|h| h.contains(root)))
        .map(|(id, _)| id.clone())
        .collect();
    v.sort();
    v
}

/// Reports from renewals, by caller. Only reports made after a successor was published count,
/// so the hot path records nothing while no rollover is under way.
#[derive(Default)]
pub struct Reports {
    inner: Mutex<HashMap<String, Report>>,
    collecting: std::sync::atomic::AtomicBool,
}

impl Reports {
    /// Starts (a successor is published) or stops (none is) recording reports.
    pub fn collect(&self, on: bool) {
        let was = self
            .collecting
            .swap(on, std::sync::atomic::Ordering::Relaxed);
        if was
            && !on
            && let Ok(mut m) = self.inner.lock()
        {
            m.clear();
        }
    }

    /// Whether reports are being recorded (a successor is published).
    pub fn collecting(&self) -> bool {
        self.collecting.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn note(&self, caller: &str, report: Report) {
        if !self.collecting.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        if let Ok(mut m) = self.inner.lock() {
            m.insert(caller.to_owned(), report);
        }
    }

    /// See [`laggards`]; also forgets callers whose certificate expired.
    pub fn laggards(&self, since: SystemTime, now: SystemTime, root: &[u8; 32]) -> Vec<String> {
        match self.inner.lock() {
            Ok(mut m) => {
                m.retain(|_, r| r.expires > now);
                laggards(&m, since, now, root)
            }
            Err(_) => Vec::new(),
        }
    }
}

/// Parses the `held_roots` field of a request: hex SHA-256 of each root the caller holds.
pub fn parse_held(held: &[String]) -> Result<Vec<[u8; 32]>, String> {
    held.iter()
        .take(64)
        .map(|h| {
            let h = h.trim();
            if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!(
                    "held_roots: {h:?} is not a hex SHA-256 (64 characters)"
                ));
            }
            let mut out = [0u8; 32];
            for (i, o) in out.iter_mut().enumerate() {
                *o = u8::from_str_radix(&h[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
            }
            Ok(out)
        })
        .collect()
}

/// Time to outage: the earliest of the root's end when no successor is published and the
/// signer's end when none is prepared.
pub fn outage_at(
    root_not_after: SystemTime,
    successor_not_after: Option<SystemTime>,
    signer_not_after: SystemTime,
    next_signer_not_after: Option<SystemTime>,
) -> SystemTime {
    outage(
        root_not_after,
        successor_not_after,
        signer_not_after,
        next_signer_not_after,
    )
    .0
}

/// `outage_at` with its cause: `root` or `signer` (the root on a tie: it ends the signer too).
pub fn outage(
    root_not_after: SystemTime,
    successor_not_after: Option<SystemTime>,
    signer_not_after: SystemTime,
    next_signer_not_after: Option<SystemTime>,
) -> (SystemTime, &'static str) {
    let root = successor_not_after.unwrap_or(root_not_after);
    let signer = next_signer_not_after.unwrap_or(signer_not_after);
    if root <= signer {
        (root, "root")
    } else {
        (signer, "signer")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authority::at;

    const H: u64 = 3600;

    fn root(id: &str, nb: u64, na: u64, created: u64, activate: u64) -> RootFacts {
        let mut sha256 = [0u8; 32];
        sha256[..id.len().min(32)].copy_from_slice(&id.as_bytes()[..id.len().min(32)]);
        RootFacts {
            id: id.into(),
            not_before: at(nb as i64),
            not_after: at(na as i64),
            created_at: at(created as i64),
            activate_at: at(activate as i64),
            sha256,
        }
    }

    fn policy() -> Policy {
        Policy {
            rollover_at: 0.5,
            propagation: Duration::from_secs(10 * H),
            max_leaf_ttl: Duration::from_secs(10 * H),
        }
    }

    fn t(s: u64) -> SystemTime {
        at(s as i64)
    }

    fn nobody(_: SystemTime, _: &[u8; 32]) -> Vec<String> {
        Vec::new()
    }

    #[test]
    fn successor_is_made_at_the_rollover_point_not_before() {
        let roots = [root("a", 0, 100 * H, 0, 0)];
        let p = policy();
        assert_eq!(
            next_step(&roots, t(50 * H - 1), &p, t(0), nobody),
            Step::Nothing
        );
        assert_eq!(
            next_step(&roots, t(50 * H), &p, t(0), nobody),
            Step::MakeSuccessor
        );
        let early = Policy {
            rollover_at: 0.25,
            ..policy()
        };
        assert_eq!(
            next_step(&roots, t(25 * H), &early, t(0), nobody),
            Step::MakeSuccessor
        );
    }

    #[test]
    fn published_successor_is_in_the_bundle_and_does_not_sign() {
        let roots = [
            root("a", 0, 100 * H, 0, 0),
            root("b", 50 * H, 150 * H, 50 * H, 150 * H),
        ];
        let now = t(51 * H);
        assert_eq!(signing_root(&roots, now).unwrap().id, "a");
        assert_eq!(
            phases(&roots, now, Duration::from_secs(10 * H)),
            vec![Phase::Active, Phase::Published]
        );
    }

    #[test]
    fn switch_waits_for_the_propagation_window() {
        let roots = [
            root("a", 0, 100 * H, 0, 0),
            root("b", 50 * H, 150 * H, 50 * H, 150 * H),
        ];
        let p = policy();
        match next_step(&roots, t(60 * H - 1), &p, t(0), nobody) {
            Step::Wait(Wait::Propagation { until, .. }) => assert_eq!(until, (60 * H) as i64),
            s => panic!("{s:?}"),
        }
        assert_eq!(
            next_step(&roots, t(60 * H), &p, t(0), nobody),
            Step::Switch {
                successor: "b".into(),
                forced: false,
                unconfirmed: vec![]
            }
        );
    }

    #[test]
    fn window_starts_when_this_process_began_watching() {
        let roots = [
            root("a", 0, 100 * H, 0, 0),
            root("b", 50 * H, 150 * H, 50 * H, 150 * H),
        ];
        // Restarted at 55 h: reports before that are lost, so wait until 65 h.
        match next_step(&roots, t(64 * H), &policy(), t(55 * H), nobody) {
            Step::Wait(Wait::Propagation { until, .. }) => assert_eq!(until, (65 * H) as i64),
            s => panic!("{s:?}"),
        }
    }

    #[test]
    fn switch_waits_for_callers_that_did_not_report_the_successor() {
        let roots = [
            root("a", 0, 100 * H, 0, 0),
            root("b", 50 * H, 150 * H, 50 * H, 150 * H),
        ];
        let b = roots[1].sha256;
        let mut reports = HashMap::new();
        reports.insert(
            "spiffe://td/kith/node/n1".to_string(),
            Report {
                at: t(55 * H),
                expires: t(80 * H),
                held: Some(vec![roots[0].sha256]),
            },
        );
        reports.insert(
            "spiffe://td/kith/node/n2".to_string(),
            Report {
                at: t(56 * H),
                expires: t(80 * H),
                held: Some(vec![roots[0].sha256, b]),
            },
        );
        let now = t(61 * H);
        let lag = |since: SystemTime, r: &[u8; 32]| laggards(&reports, since, now, r);
        match next_step(&roots, now, &policy(), t(0), lag) {
            Step::Wait(Wait::Callers { callers, deadline }) => {
                assert_eq!(callers, vec!["spiffe://td/kith/node/n1".to_string()]);
                assert_eq!(deadline, (50 * H + 50 * H * 2 / 3) as i64);
            }
            s => panic!("{s:?}"),
        }
        // n1 renews and now holds b: the switch goes ahead.
        reports.get_mut("spiffe://td/kith/node/n1").unwrap().held = Some(vec![b]);
        let lag = |since: SystemTime, r: &[u8; 32]| laggards(&reports, since, now, r);
        assert!(matches!(
            next_step(&roots, now, &policy(), t(0), lag),
            Step::Switch { forced: false, .. }
        ));
    }

    #[test]
    fn a_caller_that_did_not_say_what_it_holds_is_waited_for() {
        let b = [7u8; 32];
        let mut reports = HashMap::new();
        reports.insert(
            "x".to_string(),
            Report {
                at: t(10),
                expires: t(100),
                held: None,
            },
        );
        assert_eq!(laggards(&reports, t(0), t(50), &b), vec!["x".to_string()]);
        // Renewed before the window, or its certificate expired: not counted.
        assert!(laggards(&reports, t(11), t(50), &b).is_empty());
        assert!(laggards(&reports, t(0), t(100), &b).is_empty());
    }

    #[test]
    fn switch_is_forced_at_the_deadline_naming_the_unconfirmed() {
        let roots = [
            root("a", 0, 100 * H, 0, 0),
            root("b", 50 * H, 150 * H, 50 * H, 150 * H),
        ];
        let deadline = 50 * H + (50 * H) * 2 / 3;
        let stuck = |_: SystemTime, _: &[u8; 32]| vec!["n1".to_string()];
        assert!(matches!(
            next_step(&roots, t(deadline - 1), &policy(), t(0), stuck),
            Step::Wait(Wait::Callers { .. })
        ));
        assert_eq!(
            next_step(&roots, t(deadline), &policy(), t(0), stuck),
            Step::Switch {
                successor: "b".into(),
                forced: true,
                unconfirmed: vec!["n1".into()]
            }
        );
    }

    #[test]
    fn old_root_retires_after_its_last_leaf_expired() {
        // b took over at 60 h; leaves live at most 10 h.
        let roots = [
            root("a", 0, 100 * H, 0, 0),
            root("b", 50 * H, 150 * H, 50 * H, 60 * H),
        ];
        let ttl = Duration::from_secs(10 * H);
        let until = (70 * H + 1) as i64;
        assert_eq!(signing_root(&roots, t(60 * H)).unwrap().id, "b");
        assert_eq!(
            phases(&roots, t(60 * H), ttl),
            vec![Phase::Retiring { until }, Phase::Active]
        );
        assert_eq!(
            phases(&roots, t(70 * H), ttl),
            vec![Phase::Retiring { until }, Phase::Active]
        );
        assert_eq!(
            phases(&roots, t(70 * H + 1), ttl),
            vec![Phase::Retired, Phase::Active]
        );
        // And never past its own end.
        let late = [
            root("a", 0, 100 * H, 0, 0),
            root("b", 50 * H, 150 * H, 50 * H, 95 * H),
        ];
        assert_eq!(
            phases(&late, t(99 * H), ttl),
            vec![
                Phase::Retiring {
                    until: (100 * H) as i64
                },
                Phase::Active
            ]
        );
        assert_eq!(phases(&late, t(100 * H), ttl)[0], Phase::Retired);
    }

    #[test]
    fn new_root_rolls_over_again_at_its_own_point() {
        let roots = [
            root("a", 0, 100 * H, 0, 0),
            root("b", 50 * H, 150 * H, 50 * H, 60 * H),
        ];
        assert_eq!(
            next_step(&roots, t(100 * H - 1), &policy(), t(0), nobody),
            Step::Nothing
        );
        assert_eq!(
            next_step(&roots, t(100 * H), &policy(), t(0), nobody),
            Step::MakeSuccessor
        );
    }

    #[test]
    fn an_expired_successor_is_neither_signing_nor_published() {
        let roots = [
            root("a", 0, 100 * H, 0, 0),
            root("b", 50 * H, 150 * H, 50 * H, 150 * H),
        ];
        assert_eq!(signing_root(&roots, t(200 * H)).unwrap().id, "a");
        assert!(pending_successor(&roots, t(150 * H)).is_none());
        assert_eq!(
            phases(&roots, t(150 * H), Duration::from_secs(H)),
            vec![Phase::Retired, Phase::Retired]
        );
    }

    #[test]
    fn outage_is_the_earliest_end_without_a_successor() {
        assert_eq!(outage_at(t(100), None, t(50), None), t(50));
        assert_eq!(outage_at(t(100), None, t(50), Some(t(90))), t(90));
        assert_eq!(outage_at(t(100), None, t(50), Some(t(120))), t(100));
        assert_eq!(outage_at(t(100), Some(t(200)), t(50), Some(t(120))), t(120));
        assert_eq!(outage(t(100), None, t(50), None), (t(50), "signer"));
        assert_eq!(outage(t(100), None, t(50), Some(t(120))), (t(100), "root"));
        assert_eq!(outage(t(100), None, t(100), None), (t(100), "root"));
    }

    #[test]
    fn held_roots_must_be_hex_sha256() {
        let ok = parse_held(&["ab".repeat(32)]).unwrap();
        assert_eq!(ok, vec![[0xab; 32]]);
        assert!(parse_held(&["xyz".into()]).is_err());
        assert!(parse_held(&["g".repeat(64)]).is_err());
    }
}
