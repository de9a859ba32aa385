//! The live phase: traffic runs, the children's logs and the sidecars' `/metrics` come in,
//! and the view shows what happens until `--duration` passes, a signal arrives, or a part of
//! the system dies.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use identity::TrustDomain;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Signals;
use crate::observe::{self, LogEvent, Scrape};
use crate::stack::{Role, Stack, Workload};
use crate::traffic::{self, Outcome};
use crate::view::{self, Event, EventKind, Style, Term, TlsPeer};

/// Lines of the rolling log in the terminal frame.
const RECENT: usize = 10;

/// One workload as the view shows it: from its sidecar's `/metrics`.
#[derive(Debug, Clone)]
pub struct WorkloadView {
    pub workload: Workload,
    pub id: String,
    /// Seconds until the SVID held expires, at the last scrape.
    pub left: Option<i64>,
    /// SVIDs published by the sidecar, the first one included.
    pub updates: u64,
}

impl WorkloadView {
    pub fn rotations(&self) -> u64 {
        self.updates.saturating_sub(1)
    }
}

#[derive(Debug, Default)]
pub struct Requests {
    pub ok: u64,
    pub failed: u64,
    pub keep_alive: u64,
    pub new_connections: u64,
    /// Latencies of the successful requests.
    pub latencies: Vec<Duration>,
    /// Why requests failed, with counts.
    pub errors: BTreeMap<String, u64>,
}

#[derive(Debug, Default)]
pub struct Intruder {
    pub attempts: u64,
    pub refused: u64,
    pub let_in: u64,
}

/// Requests and inbound connections since the last traffic line.
#[derive(Debug, Default)]
struct Window {
    statuses: BTreeMap<u16, u64>,
    failed: u64,
    new_inbound: u64,
}

/// Everything the demo has seen.
#[derive(Debug)]
pub struct State {
    pub workloads: Vec<WorkloadView>,
    pub requests: Requests,
    pub intruder: Intruder,
    /// Inbound refusals by the api sidecar, by reason (its log).
    pub refusals: BTreeMap<String, u64>,
    /// SPIFFE IDs the api's policy refused, with counts.
    pub denied: BTreeMap<String, u64>,
    /// Inbound refusals by reason as the api sidecar's `/metrics` counted them (last scrape).
    pub refusals_metrics: BTreeMap<String, u64>,
    /// The api's identity as the web sidecar logged it, and web's as the api sidecar did.
    pub out_peer: Option<TlsPeer>,
    pub in_peer: Option<TlsPeer>,
    window: Window,
}

impl State {
    pub fn new(td: &TrustDomain) -> Self {
        Self {
            workloads: Workload::ALL
                .iter()
                .map(|&w| WorkloadView {
                    workload: w,
                    id: w.id(td).to_string(),
                    left: None,
                    updates: 0,
                })
                .collect(),
            requests: Requests::default(),
            intruder: Intruder::default(),
            refusals: BTreeMap::new(),
            denied: BTreeMap::new(),
            refusals_metrics: BTreeMap::new(),
            out_peer: None,
            in_peer: None,
            window: Window::default(),
        }
    }

    pub fn workload(&self, w: Workload) -> Option<&WorkloadView> {
        self.workloads.iter().find(|v| v.workload == w)
    }

    /// p50 and p99 of the successful requests, in milliseconds (nearest rank).
    pub fn latency(&self) -> Option<(f64, f64)> {
        let mut l = self.requests.latencies.clone();
        if l.is_empty() {
            return None;
        }
        l.sort_unstable();
        Some((percentile(&l, 50.0), percentile(&l, 99.0)))
    }

    pub fn on_log(&mut self, role: Role, event: LogEvent) -> Vec<EventKind> {
        match (role, event) {
            (
                Role::Sidecar(Workload::Web),
                LogEvent::Established {
                    direction,
                    peer,
                    tls,
                    suite,
                },
            ) if direction == "outbound" => {
                self.out_peer = Some(TlsPeer { peer, tls, suite });
            }
            (
                Role::Sidecar(Workload::Api),
                LogEvent::Established {
                    direction,
                    peer,
                    tls,
                    suite,
                },
            ) if direction == "inbound" => {
                self.in_peer = Some(TlsPeer { peer, tls, suite });
                self.window.new_inbound += 1;
            }
            (Role::Sidecar(Workload::Api), LogEvent::NotAuthorized { id, .. }) => {
                *self.denied.entry(id.clone()).or_default() += 1;
                return vec![EventKind::Refused {
                    id: Some(id),
                    reason: "not_authorized".to_owned(),
                }];
            }
            (Role::Sidecar(Workload::Api), LogEvent::Refused { direction, reason })
                if direction == "inbound" =>
            {
                *self.refusals.entry(reason.clone()).or_default() += 1;
                // not_authorized already has its line, with the ID, from the line before.
                if reason != "not_authorized" {
                    return vec![EventKind::Refused { id: None, reason }];
                }
            }
            (Role::Sidecar(Workload::Web), LogEvent::Refused { reason, .. }) => {
                return vec![EventKind::Problem {
                    who: role.title(),
                    message: format!("connection to the api refused: {reason}"),
                }];
            }
            // The demo's callers are host processes: the agent's warning that callers in
            // containers cannot be attested (no Docker engine, or no access to it) does not
            // apply. It stays in the agent's log.
            (Role::Agent, LogEvent::Problem { message })
                if message.contains("callers in docker containers") => {}
            (role, LogEvent::Problem { message }) => {
                return vec![EventKind::Problem {
                    who: role.title(),
                    message,
                }];
            }
            _ => {}
        }
        Vec::new()
    }

    pub fn on_outcome(&mut self, outcome: Outcome) -> Vec<EventKind> {
        match outcome {
            Outcome::Request {
                new_connection,
                result,
                latency,
            } => {
                let r = &mut self.requests;
                if new_connection {
                    r.new_connections += 1;
                } else {
                    r.keep_alive += 1;
                }
                let error = match result {
                    Ok(status) => {
                        *self.window.statuses.entry(status).or_default() += 1;
                        if status == 200 {
                            r.ok += 1;
                            r.latencies.push(latency);
                            return Vec::new();
                        }
                        format!("HTTP {status}")
                    }
                    Err(e) => {
                        self.window.failed += 1;
                        e
                    }
                };
                r.failed += 1;
                *r.errors.entry(error.clone()).or_default() += 1;
                vec![EventKind::Failed { error }]
            }
            Outcome::Intruder(result) => {
                self.intruder.attempts += 1;
                match result {
                    Ok(status) => {
                        self.intruder.let_in += 1;
                        vec![EventKind::LetIn { status }]
                    }
                    // The reason comes from the api sidecar's log.
                    Err(_) => {
                        self.intruder.refused += 1;
                        Vec::new()
                    }
                }
            }
        }
    }

    pub fn on_scrape(&mut self, w: Workload, s: Scrape) -> Vec<EventKind> {
        if w == Workload::Api {
            self.refusals_metrics = s.inbound_refused;
        }
        let Some(view) = self.workloads.iter_mut().find(|v| v.workload == w) else {
            return Vec::new();
        };
        if let Some((id, left)) = s.svid {
            view.id = id;
            view.left = Some(left);
        }
        let mut events = Vec::new();
        if s.updates_ok > view.updates {
            if view.updates > 0 {
                events.push(EventKind::Rotation {
                    id: view.id.clone(),
                    left: view.left,
                    count: s.updates_ok - view.updates,
                });
            }
            view.updates = s.updates_ok;
        }
        events
    }

    /// The traffic lines for the requests since the last call.
    pub fn traffic_lines(&mut self) -> Vec<EventKind> {
        let w = std::mem::take(&mut self.window);
        let mut lines = Vec::new();
        if !w.statuses.is_empty() || w.failed > 0 {
            lines.push(EventKind::Traffic {
                statuses: w.statuses,
                failed: w.failed,
                peer: self.out_peer.clone(),
            });
        }
        if let (n @ 1.., Some(peer)) = (w.new_inbound, &self.in_peer) {
            lines.push(EventKind::Inbound {
                new: n,
                peer: peer.clone(),
            });
        }
        lines
    }

    fn status(&self) -> EventKind {
        EventKind::Status {
            svids: self
                .workloads
                .iter()
                .map(|w| (w.workload.name(), w.left))
                .collect(),
            ok: self.requests.ok,
            failed: self.requests.failed,
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    let i = rank.clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1000.0
}

/// Why the live phase ended.
#[derive(Debug, Clone)]
pub enum Stop {
    Duration,
    Signal(&'static str),
    /// A part of the system died: what, with its last log lines.
    Died(String),
    /// Nobody reads our output any more.
    OutputClosed,
}

/// The live phase's view and state.
pub struct Live {
    pub state: State,
    recent: VecDeque<Event>,
    started: Instant,
    duration: Option<Duration>,
    td: String,
    dir: String,
}

impl Live {
    pub fn new(stack: &Stack, duration: Option<Duration>) -> Self {
        Self {
            state: State::new(&stack.td),
            recent: VecDeque::with_capacity(RECENT),
            started: Instant::now(),
            duration,
            td: stack.td.to_string(),
            dir: stack.dir.display().to_string(),
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Runs traffic and the view until the end; then lets requests in flight finish (their
    /// outcomes count) and reads the sidecars' metrics one last time.
    pub async fn run(
        &mut self,
        term: &mut Term,
        stack: &Stack,
        signals: &mut Signals,
        log_rx: &mut mpsc::UnboundedReceiver<(Role, LogEvent)>,
        early: Vec<(Role, LogEvent)>,
    ) -> Stop {
        let (web, intruder) = match (
            stack.sidecar(Workload::Web),
            stack.sidecar(Workload::Intruder),
        ) {
            (Some(w), Some(i)) => (w.listen, i.listen),
            _ => return Stop::Died("the sidecars are missing".to_owned()),
        };
        let until = self
            .duration
            .map_or_else(|| "Ctrl-C stops".to_owned(), |d| format!("for {}", secs(d)));
        term.line(&format!(
            "running {until}: web → api 5 requests/s (1 in 5 on a new mTLS connection), intruder → api every 3 s; SVIDs live 30 s"
        ));
        self.started = Instant::now();
        for (role, ev) in early {
            let kinds = self.state.on_log(role, ev);
            self.emit(term, kinds);
        }
        let (out_tx, mut out_rx) = mpsc::unbounded_channel();
        let stop_traffic = CancellationToken::new();
        let traffic = TaskTracker::new();
        traffic::start(web, intruder, out_tx, stop_traffic.clone(), &traffic);
        traffic.close();

        let deadline = self.duration.map(|d| tokio::time::Instant::now() + d);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        // Traffic lines every 5 s keep rotations and refusals in view; a terminal shows the
        // status (SVIDs left, counts) in its frame all the time instead of as lines.
        let (window_every, status_every) = if term.redraw() { (5, 0) } else { (5, 5) };
        let mut ticks = 0u64;
        let stop = loop {
            tokio::select! {
                () = until_deadline(deadline) => break Stop::Duration,
                sig = signals.recv() => break Stop::Signal(sig),
                Some((role, ev)) = log_rx.recv() => {
                    let kinds = self.state.on_log(role, ev);
                    self.emit(term, kinds);
                }
                Some(outcome) = out_rx.recv() => {
                    let kinds = self.state.on_outcome(outcome);
                    self.emit(term, kinds);
                }
                _ = tick.tick() => {
                    ticks += 1;
                    self.scrape(term, stack).await;
                    if ticks.is_multiple_of(window_every) {
                        let kinds = self.state.traffic_lines();
                        self.emit(term, kinds);
                    }
                    if status_every > 0 && ticks.is_multiple_of(status_every) {
                        let status = self.state.status();
                        self.emit(term, vec![status]);
                    }
                    if let Some(dead) = stack.children.iter().find(|c| c.exited().is_some()) {
                        let exit = dead.exited().map(|e| e.to_string()).unwrap_or_default();
                        break Stop::Died(dead.explain(&format!("exited unexpectedly ({exit})")));
                    }
                    self.draw(term);
                }
            }
            if term.broken() {
                break Stop::OutputClosed;
            }
        };

        // Requests in flight finish against a system that is still up, and count.
        stop_traffic.cancel();
        tokio::select! {
            () = traffic.wait() => {}
            _ = signals.recv() => {}
        }
        while let Ok(outcome) = out_rx.try_recv() {
            let kinds = self.state.on_outcome(outcome);
            self.emit(term, kinds);
        }
        self.scrape(term, stack).await;
        stop
    }

    /// Takes in the log lines still queued (the last ones of stopped children too).
    pub fn drain_logs(
        &mut self,
        term: &mut Term,
        rx: &mut mpsc::UnboundedReceiver<(Role, LogEvent)>,
    ) {
        while let Ok((role, ev)) = rx.try_recv() {
            let kinds = self.state.on_log(role, ev);
            self.emit(term, kinds);
        }
    }

    /// The last traffic lines and the final frame, left on screen.
    pub fn finish(&mut self, term: &mut Term) {
        let kinds = self.state.traffic_lines();
        self.emit(term, kinds);
        self.draw(term);
        term.end_frame();
    }

    /// Reads the three sidecars' `/metrics` at once (loopback GETs, one second at most).
    async fn scrape(&mut self, term: &mut Term, stack: &Stack) {
        let mut reads = tokio::task::JoinSet::new();
        for s in &stack.sidecars {
            let (w, admin) = (s.workload, s.admin);
            reads.spawn(async move { (w, observe::scrape(admin).await) });
        }
        while let Some(read) = reads.join_next().await {
            if let Ok((w, Some(s))) = read {
                let kinds = self.state.on_scrape(w, s);
                self.emit(term, kinds);
            }
        }
    }

    fn emit(&mut self, term: &mut Term, kinds: Vec<EventKind>) {
        for kind in kinds {
            let event = Event {
                at: self.started.elapsed(),
                kind,
            };
            if term.redraw() {
                if self.recent.len() == RECENT {
                    self.recent.pop_front();
                }
                self.recent.push_back(event);
            } else {
                let line = event.render(term);
                term.line(&line);
            }
        }
    }

    fn draw(&self, term: &mut Term) {
        if !term.redraw() {
            return;
        }
        let elapsed = self.started.elapsed();
        let until = match self.duration {
            Some(d) => format!("stops in {}", view::clock(d.saturating_sub(elapsed))),
            None => "Ctrl-C stops".to_owned(),
        };
        let header = format!(
            "{} · {} · {} · {} · {}",
            term.paint(Style::Bold, "kith demo"),
            term.paint(Style::Cyan, &self.td),
            self.dir,
            view::clock(elapsed),
            term.paint(Style::Dim, &until)
        );
        let recent: Vec<Event> = self.recent.iter().cloned().collect();
        let lines = view::frame(term, &self.state, &header, &recent);
        term.frame(&lines);
    }
}

async fn until_deadline(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// "90 s", "2 min 30 s".
pub fn secs(d: Duration) -> String {
    let s = d.as_secs();
    if s < 120 {
        format!("{s} s")
    } else if s.is_multiple_of(60) {
        format!("{} min", s / 60)
    } else {
        format!("{} min {} s", s / 60, s % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> State {
        State::new(&TrustDomain::new("demo.kith").unwrap())
    }

    fn scrape(updates: u64, left: i64) -> Scrape {
        Scrape {
            svid: Some(("spiffe://demo.kith/web".into(), left)),
            updates_ok: updates,
            inbound_refused: BTreeMap::new(),
        }
    }

    #[test]
    fn a_new_svid_is_one_rotation_event() {
        let mut s = state();
        assert!(s.on_scrape(Workload::Web, scrape(1, 28)).is_empty());
        assert!(s.on_scrape(Workload::Web, scrape(1, 27)).is_empty());
        let events = s.on_scrape(Workload::Web, scrape(2, 30));
        assert!(matches!(
            events.as_slice(),
            [EventKind::Rotation {
                count: 1,
                left: Some(30),
                ..
            }]
        ));
        assert_eq!(s.workload(Workload::Web).unwrap().rotations(), 1);
    }

    #[test]
    fn requests_count_and_failures_say_why() {
        let mut s = state();
        for ms in [1, 2, 3, 4, 100] {
            s.on_outcome(Outcome::Request {
                new_connection: ms == 100,
                result: Ok(200),
                latency: Duration::from_millis(ms),
            });
        }
        let events = s.on_outcome(Outcome::Request {
            new_connection: false,
            result: Err("connection reset".into()),
            latency: Duration::from_millis(1),
        });
        assert!(matches!(events.as_slice(), [EventKind::Failed { .. }]));
        assert_eq!((s.requests.ok, s.requests.failed), (5, 1));
        assert_eq!((s.requests.keep_alive, s.requests.new_connections), (5, 1));
        assert_eq!(s.latency(), Some((3.0, 100.0)));
        let lines = s.traffic_lines();
        assert!(matches!(
            lines.as_slice(),
            [EventKind::Traffic { failed: 1, .. }]
        ));
        assert!(s.traffic_lines().is_empty(), "the window starts over");
    }

    #[test]
    fn a_refusal_is_one_line_with_the_denied_id() {
        let mut s = state();
        let api = Role::Sidecar(Workload::Api);
        let first = s.on_log(
            api,
            LogEvent::NotAuthorized {
                id: "spiffe://demo.kith/intruder".into(),
                port: Some(1),
            },
        );
        let second = s.on_log(
            api,
            LogEvent::Refused {
                direction: "inbound".into(),
                reason: "not_authorized".into(),
            },
        );
        assert_eq!(first.len(), 1);
        assert!(second.is_empty());
        assert_eq!(s.refusals.get("not_authorized"), Some(&1));
        assert_eq!(s.denied.get("spiffe://demo.kith/intruder"), Some(&1));
    }
}
