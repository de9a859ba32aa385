//! The live phase: traffic runs, the children's logs and the sidecars' `/metrics` come in,
//! and the view shows what happens until `--duration` passes, a signal arrives, or a part of
//! the system dies.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Signals;
use crate::observe::{self, LogEvent};
use crate::roles::{Role, Workload};
use crate::stack::Stack;
use crate::state::State;
use crate::traffic;
use crate::view::{self, Event, EventKind, Style, Term};

/// Lines of the rolling log in the terminal frame.
const RECENT: usize = 10;

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
    /// How long the live phase ran, once it stopped.
    ran: Option<Duration>,
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
            ran: None,
            duration,
            td: stack.td.to_string(),
            dir: stack.dir.display().to_string(),
        }
    }

    /// How long the live phase ran (until it was told to stop, not until it had stopped).
    pub fn elapsed(&self) -> Duration {
        self.ran.unwrap_or_else(|| self.started.elapsed())
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

        self.ran = Some(self.started.elapsed());
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
        let elapsed = self.elapsed();
        let until = match (self.ran, self.duration) {
            (Some(_), _) => "stopped".to_owned(),
            (None, Some(d)) => format!("stops in {}", view::clock(d.saturating_sub(elapsed))),
            (None, None) => "Ctrl-C stops".to_owned(),
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
