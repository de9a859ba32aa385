//! What keeps anonymous callers from filling the CA's disk: refusals are audited at a bounded
//! rate (per source and in total, with one summary row for what was held back), audit rows
//! carry only a short escaped excerpt of anything a caller wrote, and the free space on the
//! data volume is watched so anonymous work stops before the disk is full.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use serde::Serialize;

/// The most characters of caller-supplied text an audit row keeps.
pub const EXCERPT_CHARS: usize = 64;

/// At most `EXCERPT_CHARS` characters of `text`, control characters (and backslashes) escaped,
/// marked with `…` when cut. What an audit row may keep of anything a caller sent.
pub fn excerpt(text: &str) -> String {
    let mut out = String::with_capacity(EXCERPT_CHARS + 8);
    let mut kept = 0;
    for c in text.chars() {
        let escaped = c.is_control() || c == '\\';
        let width = if escaped {
            c.escape_default().count()
        } else {
            1
        };
        if kept + width > EXCERPT_CHARS {
            out.push('…');
            return out;
        }
        if escaped {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
        kept += width;
    }
    out
}

/// A token bucket over seconds: `burst` at once, then `per_second`.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: f64,
}

impl Bucket {
    fn full(burst: f64, now: f64) -> Self {
        Self {
            tokens: burst,
            at: now,
        }
    }

    fn refill(&mut self, burst: f64, per_second: f64, now: f64) {
        let elapsed = (now - self.at).max(0.0);
        self.tokens = (self.tokens + elapsed * per_second).min(burst);
        self.at = now;
    }

    fn is_full(&self, burst: f64) -> bool {
        self.tokens >= burst
    }
}

/// How many refusal rows the audit log takes.
#[derive(Clone, Copy, Debug)]
pub struct RefusalRates {
    pub source_burst: f64,
    pub source_per_second: f64,
    pub total_burst: f64,
    pub total_per_second: f64,
    /// Sources remembered at once; past that, a new source shares the total budget only once
    /// idle ones are forgotten.
    pub max_sources: usize,
}

impl Default for RefusalRates {
    /// Ten rows per source in a burst, then one every ten seconds; sixty in all in a burst,
    /// then one a second: at most ~86,400 rows (~30 MB) a day under a sustained attack, while
    /// an operator still sees who was refused and why.
    fn default() -> Self {
        Self {
            source_burst: 10.0,
            source_per_second: 0.1,
            total_burst: 60.0,
            total_per_second: 1.0,
            max_sources: 10_000,
        }
    }
}

/// What refusals were held back from the audit log since the last summary row.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Suppressed {
    pub count: u64,
    pub by_reason: BTreeMap<&'static str, u64>,
    /// Distinct sources among them (counted up to `max_sources`).
    pub sources: usize,
    /// When the first of them was held back (unix seconds).
    pub since: i64,
}

#[derive(Default)]
struct LimiterState {
    sources: HashMap<IpAddr, Bucket>,
    total: Option<Bucket>,
    suppressed: Suppressed,
    suppressed_sources: HashSet<IpAddr>,
}

/// Decides which refusals get an audit row. Time is passed in (unix seconds, fractional), so
/// the decisions are a pure function of the calls and are unit-tested.
pub struct RefusalLimiter {
    rates: RefusalRates,
    state: Mutex<LimiterState>,
    suppressed_total: AtomicU64,
}

impl Default for RefusalLimiter {
    fn default() -> Self {
        Self::new(RefusalRates::default())
    }
}

impl RefusalLimiter {
    pub fn new(rates: RefusalRates) -> Self {
        Self {
            rates,
            state: Mutex::new(LimiterState::default()),
            suppressed_total: AtomicU64::new(0),
        }
    }

    /// Whether a refusal from `source` may have its own audit row now; if not, it is counted
    /// for the next summary row.
    pub fn admit(&self, source: Option<IpAddr>, reason: &'static str, now: f64) -> bool {
        let r = self.rates;
        let Ok(mut s) = self.state.lock() else {
            return false;
        };
        let total = s
            .total
            .get_or_insert_with(|| Bucket::full(r.total_burst, now));
        total.refill(r.total_burst, r.total_per_second, now);
        let total_ok = total.tokens >= 1.0;
        let source_ok = match source {
            None => true,
            Some(ip) => {
                if !s.sources.contains_key(&ip) && s.sources.len() >= r.max_sources {
                    // Forget sources whose budget is whole again: they lose nothing.
                    s.sources.retain(|_, b| {
                        b.refill(r.source_burst, r.source_per_second, now);
                        !b.is_full(r.source_burst)
                    });
                }
                if s.sources.len() >= r.max_sources && !s.sources.contains_key(&ip) {
                    false
                } else {
                    let b = s
                        .sources
                        .entry(ip)
                        .or_insert_with(|| Bucket::full(r.source_burst, now));
                    b.refill(r.source_burst, r.source_per_second, now);
                    b.tokens >= 1.0
                }
            }
        };
        if total_ok && source_ok {
            if let Some(ip) = source
                && let Some(b) = s.sources.get_mut(&ip)
            {
                b.tokens -= 1.0;
            }
            if let Some(t) = s.total.as_mut() {
                t.tokens -= 1.0;
            }
            return true;
        }
        if s.suppressed.count == 0 {
            s.suppressed.since = now as i64;
        }
        s.suppressed.count += 1;
        *s.suppressed.by_reason.entry(reason).or_default() += 1;
        if let Some(ip) = source
            && s.suppressed_sources.len() < r.max_sources
        {
            s.suppressed_sources.insert(ip);
            s.suppressed.sources = s.suppressed_sources.len();
        }
        self.suppressed_total.fetch_add(1, Ordering::Relaxed);
        false
    }

    /// What was held back since the last call, and resets it; `None` if nothing was.
    pub fn take_suppressed(&self) -> Option<Suppressed> {
        let mut s = self.state.lock().ok()?;
        if s.suppressed.count == 0 {
            return None;
        }
        s.suppressed_sources.clear();
        Some(std::mem::take(&mut s.suppressed))
    }

    /// Every refusal ever held back from the audit log.
    pub fn suppressed_total(&self) -> u64 {
        self.suppressed_total.load(Ordering::Relaxed)
    }
}

/// The free space the CA keeps on its data volume.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MinFree {
    Bytes(u64),
    /// Percent of the volume's size.
    Percent(f64),
    /// The smaller of 5 % of the volume and 256 MiB: enough for a burst of renewals on a small
    /// volume, without holding back gigabytes on a large, shared one.
    #[default]
    Auto,
}

impl MinFree {
    /// `auto`, `5%`, `256MiB`, `1GiB`, `500MB`, `1048576` (bytes), `0` (no reserve).
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        if t == "auto" {
            return Ok(MinFree::Auto);
        }
        if let Some(p) = t.strip_suffix('%') {
            let p: f64 = p
                .trim()
                .parse()
                .map_err(|_| format!("{text:?} is not a percentage like 5%"))?;
            if !(0.0..=50.0).contains(&p) {
                return Err(format!("{text:?}: the reserve must be between 0% and 50%"));
            }
            return Ok(MinFree::Percent(p));
        }
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("{text:?} is not a size like 256MiB or a percentage like 5%"))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "K" | "KiB" => 1 << 10,
            "M" | "MiB" => 1 << 20,
            "G" | "GiB" => 1 << 30,
            "T" | "TiB" => 1 << 40,
            "KB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "TB" => 1_000_000_000_000,
            other => {
                return Err(format!(
                    "{text:?}: unknown unit {other:?} (use KiB, MiB, GiB, TiB or %)"
                ));
            }
        };
        n.checked_mul(mult)
            .map(MinFree::Bytes)
            .ok_or_else(|| format!("{text:?} is too large"))
    }

    /// The reserve in bytes on a volume of `total` bytes.
    pub fn bytes(&self, total: u64) -> u64 {
        match self {
            MinFree::Bytes(b) => *b,
            MinFree::Percent(p) => (total as f64 * p / 100.0) as u64,
            MinFree::Auto => (total / 20).min(256 << 20),
        }
    }
}

/// The data volume's space as last measured.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DiskReport {
    /// `ok`, `low` (anonymous work refused) or `unknown` (statvfs failed).
    pub state: &'static str,
    pub free_bytes: u64,
    pub total_bytes: u64,
    pub reserve_bytes: u64,
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When free space reaches the reserve (unix seconds), estimated from how fast it shrank
    /// over the last measurements; now when it already is below, none when it is not shrinking.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fills_at: Option<i64>,
}

/// The shortest span of measurements a fill estimate is made from.
pub const FILL_MIN_SPAN_SECS: i64 = 60;
/// Measurements kept for the estimate, at least `FILL_SAMPLE_EVERY_SECS` apart.
const FILL_SAMPLES: usize = 64;
const FILL_SAMPLE_EVERY_SECS: i64 = 30;

/// When free space reaches `reserve`, from the `oldest` and `newest` measurements
/// (unix seconds, free bytes): `newest`'s time if it already is below, a linear extrapolation
/// if free space shrank over at least `FILL_MIN_SPAN_SECS`, otherwise none.
pub fn fills_at(oldest: (i64, u64), newest: (i64, u64), reserve: u64) -> Option<i64> {
    let (t1, free1) = newest;
    if free1 < reserve {
        return Some(t1);
    }
    let (t0, free0) = oldest;
    let span = t1 - t0;
    if span < FILL_MIN_SPAN_SECS || free1 >= free0 {
        return None;
    }
    let rate = (free0 - free1) as f64 / span as f64;
    let left = (free1 - reserve) as f64 / rate;
    Some(t1.saturating_add(left.min(i64::MAX as f64 / 2.0) as i64))
}

/// Watches the free space of the volume that holds the database.
pub struct DiskGuard {
    path: PathBuf,
    min_free: MinFree,
    low: AtomicBool,
    report: Mutex<DiskReport>,
    /// (unix seconds, free bytes), oldest first.
    samples: Mutex<std::collections::VecDeque<(i64, u64)>>,
}

impl DiskGuard {
    pub fn new(path: &Path, min_free: MinFree) -> Self {
        let guard = Self {
            path: path.to_owned(),
            min_free,
            low: AtomicBool::new(false),
            report: Mutex::new(DiskReport::default()),
            samples: Mutex::new(std::collections::VecDeque::with_capacity(FILL_SAMPLES)),
        };
        guard.check();
        guard
    }

    /// Measures the volume now (statvfs) and updates the verdict.
    pub fn check(&self) -> DiskReport {
        let mut report = match nix::sys::statvfs::statvfs(&self.path) {
            Ok(st) => {
                let frag = st.fragment_size();
                // f_bavail: what an unprivileged writer may still use, which is what the CA has.
                let free = st.blocks_available().saturating_mul(frag);
                let total = st.blocks().saturating_mul(frag);
                let reserve = self.min_free.bytes(total);
                verdict(&self.path, free, total, reserve)
            }
            Err(e) => DiskReport {
                state: "unknown",
                path: self.path.display().to_string(),
                message: Some(format!("cannot measure free space: {e}")),
                ..Default::default()
            },
        };
        if report.state != "unknown" {
            report.fills_at = self.sample(report.free_bytes, report.reserve_bytes);
        }
        self.low.store(report.state == "low", Ordering::Relaxed);
        if let Ok(mut r) = self.report.lock() {
            if r.state != report.state && report.state == "low" {
                tracing::warn!(
                    free_bytes = report.free_bytes,
                    reserve_bytes = report.reserve_bytes,
                    path = %report.path,
                    "the CA's data volume is below its free-space reserve: refusing anonymous requests (join attestation) until space is freed"
                );
            } else if r.state == "low" && report.state == "ok" {
                tracing::info!(
                    free_bytes = report.free_bytes,
                    "the CA's data volume has space again"
                );
            }
            *r = report.clone();
        }
        report
    }

    /// Records a measurement and estimates when the reserve is reached.
    fn sample(&self, free: u64, reserve: u64) -> Option<i64> {
        let now = crate::authority::unix(std::time::SystemTime::now());
        let mut samples = self.samples.lock().ok()?;
        if samples
            .back()
            .is_none_or(|(t, _)| now - t >= FILL_SAMPLE_EVERY_SECS)
        {
            if samples.len() == FILL_SAMPLES {
                samples.pop_front();
            }
            samples.push_back((now, free));
        }
        let oldest = *samples.front()?;
        fills_at(oldest, (now, free), reserve)
    }

    /// Whether the volume is below its reserve, as last measured.
    pub fn is_low(&self) -> bool {
        self.low.load(Ordering::Relaxed)
    }

    pub fn report(&self) -> DiskReport {
        self.report.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

/// The verdict on `free` bytes of `total` with `reserve` kept back: a pure function, tested.
pub fn verdict(path: &Path, free: u64, total: u64, reserve: u64) -> DiskReport {
    let low = free < reserve;
    DiskReport {
        state: if low { "low" } else { "ok" },
        free_bytes: free,
        total_bytes: total,
        reserve_bytes: reserve,
        path: path.display().to_string(),
        message: low.then(|| {
            format!(
                "{} MiB free on the data volume, below the reserve of {} MiB (--min-free-disk): anonymous requests are refused until space is freed",
                free >> 20,
                reserve >> 20
            )
        }),
        fills_at: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_fills_at_the_measured_rate() {
        // 1 GiB lost in 100 s, 2 GiB above the reserve: 200 s more.
        let gib = 1u64 << 30;
        assert_eq!(
            fills_at((1000, 5 * gib), (1100, 4 * gib), 2 * gib),
            Some(1300)
        );
    }

    #[test]
    fn a_store_below_its_reserve_is_full_now() {
        assert_eq!(fills_at((1000, 100), (1000, 10), 50), Some(1000));
    }

    #[test]
    fn no_fill_estimate_without_shrinking_or_enough_history() {
        assert_eq!(fills_at((1000, 500), (1100, 600), 50), None);
        assert_eq!(fills_at((1000, 500), (1100, 500), 50), None);
        assert_eq!(fills_at((1000, 500), (1010, 100), 50), None);
    }

    #[test]
    fn a_guard_whose_reserve_exceeds_the_volume_reports_it_full_now() {
        let dir = std::env::temp_dir();
        let guard = DiskGuard::new(&dir, MinFree::Bytes(u64::MAX));
        let r = guard.check();
        let now = crate::authority::unix(std::time::SystemTime::now());
        assert_eq!(r.state, "low");
        assert!(r.fills_at.is_some_and(|t| (t - now).abs() <= 5), "{r:?}");
    }

    #[test]
    fn an_excerpt_is_short_and_escapes_control_characters() {
        assert_eq!(excerpt("a\nb\u{1b}[31m\\"), "a\\nb\\u{1b}[31m\\\\");
        let long = "x".repeat(60_000);
        let e = excerpt(&long);
        assert_eq!(e.chars().count(), EXCERPT_CHARS + 1);
        let escapes = excerpt(&"\u{1b}".repeat(100));
        assert!(escapes.chars().count() <= EXCERPT_CHARS + 1, "{escapes}");
        assert!(e.ends_with('…'));
        assert_eq!(excerpt("short"), "short");
    }

    #[test]
    fn one_source_gets_its_burst_then_is_summarised() {
        let l = RefusalLimiter::default();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let admitted = (0..100)
            .filter(|_| l.admit(Some(a), "token_unknown", 1000.0))
            .count();
        assert_eq!(admitted, 10);
        // Ten seconds later one more row.
        assert!(l.admit(Some(a), "token_unknown", 1010.0));
        assert!(!l.admit(Some(a), "token_unknown", 1010.0));
        let s = l.take_suppressed().unwrap();
        assert_eq!((s.count, s.sources, s.since), (91, 1, 1000));
        assert_eq!(s.by_reason["token_unknown"], 91);
        assert_eq!(l.take_suppressed(), None);
        assert_eq!(l.suppressed_total(), 91);
    }

    #[test]
    fn many_sources_share_a_total_budget() {
        let l = RefusalLimiter::default();
        let admitted = (0..1000u32)
            .filter(|i| {
                let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
                l.admit(Some(ip), "token_unknown", 5000.0)
            })
            .count();
        assert_eq!(admitted, 60);
        assert_eq!(l.take_suppressed().unwrap().sources, 940);
    }

    #[test]
    fn the_source_table_is_bounded() {
        let l = RefusalLimiter::new(RefusalRates {
            max_sources: 4,
            total_burst: 1e9,
            ..Default::default()
        });
        for i in 0..100u32 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(i));
            l.admit(Some(ip), "x", 1.0);
        }
        assert!(l.state.lock().unwrap().sources.len() <= 4);
    }

    #[test]
    fn reserves_parse_as_sizes_or_percentages() {
        assert_eq!(MinFree::parse("5%").unwrap(), MinFree::Percent(5.0));
        assert_eq!(MinFree::parse("256MiB").unwrap(), MinFree::Bytes(256 << 20));
        assert_eq!(MinFree::parse("1G").unwrap(), MinFree::Bytes(1 << 30));
        assert_eq!(MinFree::parse("0").unwrap(), MinFree::Bytes(0));
        assert!(MinFree::parse("lots").is_err());
        assert!(MinFree::parse("80%").is_err());
        assert!(
            MinFree::parse("5 parsecs")
                .unwrap_err()
                .contains("unknown unit")
        );
        assert_eq!(MinFree::Percent(5.0).bytes(1000), 50);
        assert_eq!(MinFree::parse("auto").unwrap(), MinFree::Auto);
        assert_eq!(MinFree::Auto.bytes(1 << 30), (1 << 30) / 20);
        assert_eq!(MinFree::Auto.bytes(1 << 40), 256 << 20);
    }

    #[test]
    fn below_the_reserve_is_low() {
        let p = Path::new("/data");
        assert_eq!(verdict(p, 100, 1000, 50).state, "ok");
        let low = verdict(p, 10 << 20, 1 << 30, 64 << 20);
        assert_eq!(low.state, "low");
        assert!(low.message.unwrap().contains("10 MiB free"));
    }
}
