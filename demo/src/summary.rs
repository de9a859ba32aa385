//! The summary at the end, as text or JSON (`--json`, for scripts), and the verdict behind the
//! exit code: 0 when no request failed, the intruder was never answered, and (for runs of
//! 35 s or more) both web and api rotated their SVIDs under load; 1 otherwise, with the reason.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::live::{State, Stop};
use crate::stack::{SVID_TTL, Workload};
use crate::view::{Style, Term};

/// A run at least this long must see rotations: the first renewal comes at about half of the
/// 30 s TTL, so 35 s leaves room for jitter and startup.
pub const ROTATION_REQUIRED_AFTER: Duration = Duration::from_secs(35);

#[derive(Debug, Serialize)]
pub struct Summary {
    pub ok: bool,
    pub verdict: String,
    pub stopped_by: String,
    pub seconds: f64,
    pub trust_domain: String,
    pub svid_ttl_seconds: u64,
    pub requests: Requests,
    pub latency_ms: Option<Latency>,
    pub workloads: Vec<WorkloadSummary>,
    pub refusals: Vec<Refusal>,
    pub intruder: Intruder,
    pub tls: Option<Tls>,
    pub temp_dir: String,
    pub temp_dir_kept: bool,
}

#[derive(Debug, Serialize)]
pub struct Requests {
    pub ok: u64,
    pub failed: u64,
    pub keep_alive: u64,
    pub new_connections: u64,
    pub errors: BTreeMap<String, u64>,
}

#[derive(Debug, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
}

#[derive(Debug, Serialize)]
pub struct WorkloadSummary {
    pub name: &'static str,
    pub spiffe_id: String,
    pub rotations: u64,
    pub svid_seconds_left: Option<i64>,
}

/// Inbound refusals by the api sidecar with one reason.
#[derive(Debug, Serialize)]
pub struct Refusal {
    pub reason: String,
    pub count: u64,
    /// The same count in the api sidecar's `/metrics`, at the last read.
    pub metrics_count: u64,
}

#[derive(Debug, Serialize)]
pub struct Intruder {
    pub attempts: u64,
    pub refused: u64,
    pub answered: u64,
    pub denied_ids: BTreeMap<String, u64>,
}

#[derive(Debug, Serialize)]
pub struct Tls {
    pub version: String,
    pub suite: String,
    /// The api's SPIFFE ID as the web sidecar logged it (outbound peer).
    pub web_saw: String,
    /// Web's SPIFFE ID as the api sidecar logged it (inbound peer).
    pub api_saw: Option<String>,
}

pub struct Run<'a> {
    pub state: &'a State,
    pub stop: &'a Stop,
    pub elapsed: Duration,
    pub trust_domain: String,
    pub temp_dir: String,
    pub kept: bool,
}

impl Summary {
    pub fn new(run: Run<'_>) -> Self {
        let s = run.state;
        let seconds = (run.elapsed.as_secs_f64() * 10.0).round() / 10.0;
        let mut refusals: Vec<Refusal> = s
            .refusals
            .iter()
            .map(|(reason, &count)| Refusal {
                reason: reason.clone(),
                count,
                metrics_count: s.refusals_metrics.get(reason).copied().unwrap_or(0),
            })
            .collect();
        for (reason, &n) in &s.refusals_metrics {
            if !s.refusals.contains_key(reason) {
                refusals.push(Refusal {
                    reason: reason.clone(),
                    count: 0,
                    metrics_count: n,
                });
            }
        }
        let (ok, verdict) = verdict(s, run.stop, run.elapsed);
        Self {
            ok,
            verdict,
            stopped_by: match run.stop {
                Stop::Duration => "duration".to_owned(),
                Stop::Signal(sig) => (*sig).to_owned(),
                Stop::Died(_) => "failure".to_owned(),
                Stop::OutputClosed => "output closed".to_owned(),
            },
            seconds,
            trust_domain: run.trust_domain,
            svid_ttl_seconds: SVID_TTL.as_secs(),
            requests: Requests {
                ok: s.requests.ok,
                failed: s.requests.failed,
                keep_alive: s.requests.keep_alive,
                new_connections: s.requests.new_connections,
                errors: s.requests.errors.clone(),
            },
            latency_ms: s.latency().map(|(p50, p99)| Latency {
                p50: round2(p50),
                p99: round2(p99),
            }),
            workloads: s
                .workloads
                .iter()
                .map(|w| WorkloadSummary {
                    name: w.workload.name(),
                    spiffe_id: w.id.clone(),
                    rotations: w.rotations(),
                    svid_seconds_left: w.left,
                })
                .collect(),
            refusals,
            intruder: Intruder {
                attempts: s.intruder.attempts,
                refused: s.intruder.refused,
                answered: s.intruder.let_in,
                denied_ids: s.denied.clone(),
            },
            tls: s.out_peer.as_ref().map(|p| Tls {
                version: p.tls.clone(),
                suite: p.suite.clone(),
                web_saw: p.peer.clone(),
                api_saw: s.in_peer.as_ref().map(|p| p.peer.clone()),
            }),
            temp_dir: run.temp_dir,
            temp_dir_kept: run.kept,
        }
    }

    pub fn print(&self, t: &mut Term) {
        let r = &self.requests;
        t.line("");
        t.line(&t.paint(
            Style::Bold,
            &format!(
                "summary: {} s, stopped by {}",
                self.seconds, self.stopped_by
            ),
        ));
        t.line(&format!(
            "  requests   {} ok, {} failed ({} keep-alive, {} on new mTLS connections)",
            r.ok, r.failed, r.keep_alive, r.new_connections
        ));
        for (error, n) in &r.errors {
            t.line(&format!("             {n} × {error}"));
        }
        if let Some(l) = &self.latency_ms {
            t.line(&format!(
                "  latency    p50 {:.1} ms, p99 {:.1} ms, through both sidecars",
                l.p50, l.p99
            ));
        }
        let rotations: Vec<String> = self
            .workloads
            .iter()
            .map(|w| format!("{} {}", w.name, w.rotations))
            .collect();
        t.line(&format!(
            "  rotations  {} (SVID TTL {} s)",
            rotations.join(", "),
            self.svid_ttl_seconds
        ));
        let i = &self.intruder;
        let denied: Vec<String> = i
            .denied_ids
            .iter()
            .map(|(id, n)| format!("{id} ×{n}"))
            .collect();
        if self.refusals.is_empty() {
            t.line("  refusals   none");
        }
        for f in &self.refusals {
            t.line(&format!(
                "  refusals   {} ×{}{} (api /metrics: {})",
                f.reason,
                f.count,
                if f.reason == "not_authorized" && !denied.is_empty() {
                    format!(": {}", denied.join(", "))
                } else {
                    String::new()
                },
                f.metrics_count,
            ));
        }
        t.line(&format!(
            "  intruder   {}, {} refused, {} answered",
            plural(i.attempts, "attempt"),
            i.refused,
            i.answered
        ));
        if let Some(tls) = &self.tls {
            t.line(&format!("  mTLS       {} {}", tls.version, tls.suite));
            t.line(&format!(
                "  peers      web saw {}, api saw {}",
                tls.web_saw,
                tls.api_saw.as_deref().unwrap_or("-")
            ));
        }
        let (style, word) = if self.ok {
            (Style::Green, "OK")
        } else {
            (Style::Red, "FAILED")
        };
        t.line(&format!(
            "  result     {}: {}",
            t.paint(style, word),
            self.verdict
        ));
    }
}

/// Whether the run proved what the demo claims, and why (or why not).
fn verdict(s: &State, stop: &Stop, elapsed: Duration) -> (bool, String) {
    let mut wrong = Vec::new();
    if let Stop::Died(why) = stop {
        wrong.push(why.clone());
    }
    if s.requests.failed > 0 {
        wrong.push(format!("{} failed", plural(s.requests.failed, "request")));
    }
    if s.intruder.let_in > 0 {
        wrong.push(format!(
            "the intruder was answered {} times: the api's policy did not hold",
            s.intruder.let_in
        ));
    }
    if s.requests.ok == 0 {
        wrong.push("no request succeeded".to_owned());
    }
    let rotations_needed = elapsed >= ROTATION_REQUIRED_AFTER;
    let unrotated: Vec<&str> = [Workload::Web, Workload::Api]
        .into_iter()
        .filter(|&w| s.workload(w).is_none_or(|v| v.rotations() == 0))
        .map(Workload::name)
        .collect();
    if rotations_needed && !unrotated.is_empty() {
        wrong.push(format!(
            "no SVID rotation seen for {} in {} s (TTL {} s, renewed at about half-life)",
            unrotated.join(" and "),
            elapsed.as_secs(),
            SVID_TTL.as_secs()
        ));
    }
    if !wrong.is_empty() {
        return (false, wrong.join("; "));
    }
    let rotation = if rotations_needed {
        "; web and api rotated their SVIDs under load".to_owned()
    } else {
        format!(
            " (too short to check rotations: {} s < {} s)",
            elapsed.as_secs(),
            ROTATION_REQUIRED_AFTER.as_secs()
        )
    };
    (true, format!("no request failed{rotation}"))
}

/// "1 attempt", "3 attempts".
pub fn plural(n: u64, word: &str) -> String {
    if n == 1 {
        format!("{n} {word}")
    } else {
        format!("{n} {word}s")
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use identity::TrustDomain;

    use super::*;
    use crate::observe::Scrape;
    use crate::traffic::Outcome;

    fn state(rotated: bool, failed: bool) -> State {
        let mut s = State::new(&TrustDomain::new("demo.kith").unwrap());
        for w in Workload::ALL {
            let updates = if rotated { 2 } else { 1 };
            s.on_scrape(
                w,
                Scrape {
                    svid: Some((w.name().into(), 20)),
                    updates_ok: updates,
                    inbound_refused: BTreeMap::new(),
                },
            );
        }
        s.on_outcome(Outcome::Request {
            new_connection: false,
            result: if failed { Err("reset".into()) } else { Ok(200) },
            latency: Duration::from_millis(2),
        });
        s.on_outcome(Outcome::Request {
            new_connection: false,
            result: Ok(200),
            latency: Duration::from_millis(2),
        });
        s
    }

    #[test]
    fn a_long_run_needs_rotations_and_no_failures() {
        let long = Duration::from_secs(40);
        assert!(verdict(&state(true, false), &Stop::Duration, long).0);
        let (ok, why) = verdict(&state(false, false), &Stop::Duration, long);
        assert!(!ok);
        assert!(
            why.contains("no SVID rotation seen for web and api"),
            "{why}"
        );
        let (ok, why) = verdict(&state(true, true), &Stop::Duration, long);
        assert!(!ok);
        assert!(why.contains("1 request failed"), "{why}");
    }

    #[test]
    fn a_short_run_says_rotations_were_not_checked() {
        let (ok, why) = verdict(
            &state(false, false),
            &Stop::Signal("SIGINT"),
            Duration::from_secs(10),
        );
        assert!(ok);
        assert!(why.contains("too short to check rotations"), "{why}");
    }
}
