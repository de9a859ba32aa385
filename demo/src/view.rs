//! The terminal view. On a terminal: colours and a compact frame redrawn in place about once a
//! second. Anywhere else (a pipe, a file, CI logs, `TERM=dumb`): plain lines, appended, with
//! no escape sequence at all. `NO_COLOR` keeps the redraw and drops the colours.

use std::collections::BTreeMap;
use std::io::{self, IsTerminal, Write};
use std::time::Duration;

use crate::live::State;
use crate::stack::SVID_TTL;

/// Where the demo writes: stdout, or stderr when stdout carries the JSON summary.
pub struct Term {
    out: Box<dyn Write + Send>,
    to_stderr: bool,
    /// Cursor movement allowed (a terminal that is not `dumb`).
    redraw: bool,
    color: bool,
    /// Lines of the frame on screen, to move back over on the next redraw.
    frame_lines: usize,
    cursor_hidden: bool,
    broken: bool,
}

#[derive(Debug, Clone, Copy)]
pub enum Style {
    Bold,
    Dim,
    Green,
    Red,
    Yellow,
    Cyan,
}

impl Term {
    pub fn new(to_stderr: bool) -> Self {
        let (tty, out): (bool, Box<dyn Write + Send>) = if to_stderr {
            (io::stderr().is_terminal(), Box::new(io::stderr()))
        } else {
            (io::stdout().is_terminal(), Box::new(io::stdout()))
        };
        let dumb = std::env::var("TERM").is_ok_and(|t| t == "dumb");
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        let mut t = Self::with(out, tty && !dumb, tty && !dumb && !no_color);
        t.to_stderr = to_stderr;
        t
    }

    fn with(out: Box<dyn Write + Send>, redraw: bool, color: bool) -> Self {
        Self {
            out,
            to_stderr: false,
            redraw,
            color,
            frame_lines: 0,
            cursor_hidden: false,
            broken: false,
        }
    }

    pub fn redraw(&self) -> bool {
        self.redraw
    }

    /// The terminal's columns and rows, when it says.
    pub fn size(&self) -> Option<(usize, usize)> {
        let ws = if self.to_stderr {
            rustix::termios::tcgetwinsize(io::stderr())
        } else {
            rustix::termios::tcgetwinsize(io::stdout())
        }
        .ok()?;
        (ws.ws_col > 0 && ws.ws_row > 0).then(|| (ws.ws_col.into(), ws.ws_row.into()))
    }

    /// True once a write failed (the reader went away): the demo then stops.
    pub fn broken(&self) -> bool {
        self.broken
    }

    pub fn paint(&self, style: Style, text: &str) -> String {
        if !self.color {
            return text.to_owned();
        }
        let code = match style {
            Style::Bold => "1",
            Style::Dim => "2",
            Style::Green => "32",
            Style::Red => "31",
            Style::Yellow => "33",
            Style::Cyan => "36",
        };
        format!("\x1b[{code}m{text}\x1b[0m")
    }

    /// A complete line, appended.
    pub fn line(&mut self, text: &str) {
        self.write(&format!("{text}\n"));
    }

    /// The start of a line, shown at once (a startup step before its "ok").
    pub fn partial(&mut self, text: &str) {
        self.write(text);
    }

    /// Replaces the frame on screen with `lines` (terminal only). Lines are cut to the
    /// terminal's width (and auto-wrap is off while the frame is written, in case the width
    /// changed meanwhile), so the next redraw moves back over exactly the lines it wrote.
    pub fn frame(&mut self, lines: &[String]) {
        if !self.redraw {
            return;
        }
        let width = self
            .size()
            .map_or(usize::MAX, |(cols, _)| cols.saturating_sub(1));
        let mut buf = String::new();
        if !self.cursor_hidden {
            buf.push_str("\x1b[?25l");
            self.cursor_hidden = true;
        }
        if self.frame_lines > 0 {
            buf.push_str(&format!("\x1b[{}A\r", self.frame_lines));
        }
        buf.push_str("\x1b[J\x1b[?7l");
        for l in lines {
            buf.push_str(&cut(l, width));
            buf.push('\n');
        }
        buf.push_str("\x1b[?7h");
        self.frame_lines = lines.len();
        self.write(&buf);
    }

    /// Leaves the last frame on screen; what follows is appended below it.
    pub fn end_frame(&mut self) {
        self.frame_lines = 0;
        self.show_cursor();
    }

    fn show_cursor(&mut self) {
        if self.cursor_hidden {
            self.cursor_hidden = false;
            self.write("\x1b[?25h");
        }
    }

    fn write(&mut self, s: &str) {
        if self.broken {
            return;
        }
        if self.out.write_all(s.as_bytes()).is_err() || self.out.flush().is_err() {
            self.broken = true;
        }
    }
}

impl Drop for Term {
    fn drop(&mut self) {
        self.show_cursor();
    }
}

/// What a sidecar logged about one mTLS connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPeer {
    pub peer: String,
    pub tls: String,
    pub suite: String,
}

/// A line of the rolling log, `at` after the live phase began.
#[derive(Debug, Clone)]
pub struct Event {
    pub at: Duration,
    pub kind: EventKind,
}

#[derive(Debug, Clone)]
pub enum EventKind {
    /// Requests through the web sidecar since the last traffic line, with the api's identity
    /// as the web sidecar logged it.
    Traffic {
        statuses: BTreeMap<u16, u64>,
        failed: u64,
        peer: Option<TlsPeer>,
    },
    /// New mTLS connections the api sidecar accepted since the last traffic line.
    Inbound {
        new: u64,
        peer: TlsPeer,
    },
    Rotation {
        id: String,
        left: Option<i64>,
        count: u64,
    },
    Refused {
        id: Option<String>,
        reason: String,
    },
    Failed {
        error: String,
    },
    LetIn {
        status: u16,
    },
    Problem {
        who: String,
        message: String,
    },
    /// Plain mode's periodic line: what the terminal frame shows all the time.
    Status {
        svids: Vec<(&'static str, Option<i64>)>,
        ok: u64,
        failed: u64,
    },
}

impl Event {
    pub fn render(&self, t: &Term) -> String {
        format!(
            "{}  {}",
            t.paint(Style::Dim, &clock(self.at)),
            self.kind.render(t)
        )
    }
}

impl EventKind {
    fn render(&self, t: &Term) -> String {
        match self {
            EventKind::Traffic {
                statuses,
                failed,
                peer,
            } => {
                let mut parts: Vec<String> = statuses
                    .iter()
                    .map(|(s, n)| {
                        let style = if (200..300).contains(s) {
                            Style::Green
                        } else {
                            Style::Red
                        };
                        t.paint(style, &format!("{s} ×{n}"))
                    })
                    .collect();
                if *failed > 0 {
                    parts.push(t.paint(Style::Red, &format!("failed ×{failed}")));
                }
                let peer = peer.as_ref().map_or_else(
                    || "peer not logged yet".to_owned(),
                    |p| format!("peer {}  {} {}", p.peer, p.tls, p.suite),
                );
                format!("web → api  {}  {peer}", parts.join(", "))
            }
            EventKind::Inbound { new, peer } => {
                let conns = if *new == 1 {
                    "connection"
                } else {
                    "connections"
                };
                format!(
                    "api ← {}  peer {}  {} {}  ({new} new mTLS {conns})",
                    short_name(&peer.peer),
                    peer.peer,
                    peer.tls,
                    peer.suite
                )
            }
            EventKind::Rotation { id, left, count } => {
                let what = if *count == 1 {
                    "a new SVID".to_owned()
                } else {
                    format!("{count} new SVIDs")
                };
                let left = left.map_or_else(String::new, |l| format!(" ({l} s left)"));
                t.paint(Style::Yellow, &format!("rotation: {id} got {what}{left}"))
            }
            EventKind::Refused { id, reason } => {
                let who = id.as_deref().unwrap_or("a peer");
                t.paint(Style::Red, &format!("refused: {who} → api: {reason}"))
            }
            EventKind::Failed { error } => t.paint(Style::Red, &format!("request failed: {error}")),
            EventKind::LetIn { status } => t.paint(
                Style::Red,
                &format!("SECURITY: the intruder's request was answered ({status})"),
            ),
            EventKind::Problem { who, message } => {
                t.paint(Style::Yellow, &format!("{who}: {message}"))
            }
            EventKind::Status { svids, ok, failed } => {
                let svids: Vec<String> = svids
                    .iter()
                    .map(|(name, left)| format!("{name} {}", seconds(*left)))
                    .collect();
                format!(
                    "SVIDs left: {}   requests: {ok} ok, {failed} failed",
                    svids.join(" · ")
                )
            }
        }
    }
}

/// The header and table of the terminal frame, followed by the recent events.
pub fn frame(t: &Term, s: &State, header: &str, recent: &[Event]) -> Vec<String> {
    let mut lines = vec![header.to_owned(), String::new()];
    let width = s
        .workloads
        .iter()
        .map(|w| w.id.len())
        .max()
        .unwrap_or(0)
        .max("SPIFFE ID".len());
    lines.push(t.paint(
        Style::Dim,
        &format!(
            "{:<9} {:<width$}  {:<19} rotations",
            "workload", "SPIFFE ID", "SVID left"
        ),
    ));
    for w in &s.workloads {
        let bar = bar(w.left);
        lines.push(format!(
            "{:<9} {:<width$}  {} {:>5}   {}",
            w.workload.name(),
            w.id,
            t.paint(bar_style(w.left), &bar),
            seconds(w.left),
            w.rotations()
        ));
    }
    lines.push(String::new());
    let r = &s.requests;
    let latency = s.latency().map_or_else(String::new, |(p50, p99)| {
        format!("  ·  p50 {p50:.1} ms  p99 {p99:.1} ms")
    });
    let failed = format!("{} failed", r.failed);
    lines.push(format!(
        "requests  {} ok  {}{latency}  ·  {} keep-alive, {} on new mTLS connections",
        t.paint(Style::Green, &r.ok.to_string()),
        if r.failed > 0 {
            t.paint(Style::Red, &failed)
        } else {
            failed
        },
        r.keep_alive,
        r.new_connections
    ));
    let reasons: Vec<String> = s
        .refusals
        .iter()
        .map(|(reason, n)| format!("{reason} ×{n}"))
        .collect();
    lines.push(format!(
        "intruder  {}, {} refused{}{}",
        crate::summary::plural(s.intruder.attempts, "attempt"),
        s.intruder.refused,
        if reasons.is_empty() {
            String::new()
        } else {
            format!(" (api sidecar: {})", reasons.join(", "))
        },
        if s.intruder.let_in > 0 {
            t.paint(Style::Red, &format!(", {} LET IN", s.intruder.let_in))
        } else {
            String::new()
        }
    ));
    lines.push(String::new());
    lines.push(t.paint(Style::Dim, "recent events"));
    // The newest events that fit: a frame taller than the terminal would scroll on redraw.
    let room = t.size().map_or(recent.len(), |(_, rows)| {
        rows.saturating_sub(lines.len() + 1)
    });
    let recent = &recent[recent.len().saturating_sub(room)..];
    lines.extend(recent.iter().map(|e| e.render(t)));
    lines
}

/// `line` cut to `width` visible characters; escape sequences pass and do not count.
fn cut(line: &str, width: usize) -> String {
    let mut out = String::with_capacity(line.len());
    let (mut visible, mut in_escape, mut cut) = (0, false, false);
    for c in line.chars() {
        if in_escape {
            out.push(c);
            in_escape = !c.is_ascii_alphabetic();
        } else if c == '\x1b' {
            out.push(c);
            in_escape = true;
        } else if visible < width {
            out.push(c);
            visible += 1;
        } else {
            cut = true;
        }
    }
    if cut && out.contains('\x1b') {
        out.push_str("\x1b[0m");
    }
    out
}

/// `m:ss`.
pub fn clock(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}:{:02}", s / 60, s % 60)
}

fn seconds(left: Option<i64>) -> String {
    left.map_or_else(|| "–".to_owned(), |l| format!("{l} s"))
}

/// The SVID's remaining life as a bar of the demo TTL.
fn bar(left: Option<i64>) -> String {
    const WIDTH: i64 = 12;
    let ttl = SVID_TTL.as_secs() as i64;
    let filled = left.map_or(0, |l| (l.clamp(0, ttl) * WIDTH + ttl / 2) / ttl);
    (0..WIDTH)
        .map(|i| if i < filled { '█' } else { '░' })
        .collect()
}

fn bar_style(left: Option<i64>) -> Style {
    match left {
        Some(l) if l > 10 => Style::Green,
        Some(l) if l > 0 => Style::Yellow,
        _ => Style::Red,
    }
}

/// The last path segment of a SPIFFE ID (`spiffe://td/web` → `web`), to label an arrow.
pub fn short_name(id: &str) -> &str {
    id.rsplit('/').next().unwrap_or(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_output_has_no_escape_bytes() {
        let t = Term::with(Box::new(io::sink()), false, false);
        let e = Event {
            at: Duration::from_secs(75),
            kind: EventKind::Refused {
                id: Some("spiffe://demo.kith/intruder".into()),
                reason: "not_authorized".into(),
            },
        };
        let line = e.render(&t);
        assert_eq!(
            line,
            "1:15  refused: spiffe://demo.kith/intruder → api: not_authorized"
        );
        assert!(!line.contains('\x1b'));
    }

    #[test]
    fn traffic_lines_name_the_peer_version_and_suite() {
        let t = Term::with(Box::new(io::sink()), false, false);
        let kind = EventKind::Traffic {
            statuses: BTreeMap::from([(200, 9)]),
            failed: 0,
            peer: Some(TlsPeer {
                peer: "spiffe://demo.kith/api".into(),
                tls: "TLSv1.3".into(),
                suite: "TLS13_AES_256_GCM_SHA384".into(),
            }),
        };
        assert_eq!(
            kind.render(&t),
            "web → api  200 ×9  peer spiffe://demo.kith/api  TLSv1.3 TLS13_AES_256_GCM_SHA384"
        );
    }

    #[test]
    fn lines_are_cut_to_the_width_without_counting_escapes() {
        assert_eq!(cut("abcdef", 4), "abcd");
        assert_eq!(cut("ab", 4), "ab");
        assert_eq!(cut("\x1b[32mabcdef\x1b[0m", 3), "\x1b[32mabc\x1b[0m\x1b[0m");
        assert_eq!(cut("0:01  web → api", 9), "0:01  web");
    }

    #[test]
    fn the_bar_follows_the_time_left() {
        assert_eq!(bar(Some(30)), "████████████");
        assert_eq!(bar(Some(15)), "██████░░░░░░");
        assert_eq!(bar(Some(-3)), "░░░░░░░░░░░░");
        assert_eq!(bar(None), "░░░░░░░░░░░░");
    }
}
