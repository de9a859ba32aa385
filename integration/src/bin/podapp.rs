//! The pod lab's application: a small HTTP/1.1 server and clients, std only, so that what runs
//! in a pod is an ordinary program that knows nothing about kith.
//!
//! - `podapp serve <addr> <name>`: answers every request with `<name>:<request body>`;
//!   `GET /slow/<ms>` waits that long first (and says so on stderr as it starts, so that a
//!   test knows the request is in flight); keep-alive unless the client says `close`.
//! - `podapp get <addr> <path> [body]`: one request; prints the status line and the body.
//! - `podapp load <addr> <seconds> <long-lived connections>`: requests without pause on the
//!   long-lived connections plus one new connection per request on another thread; prints
//!   `{"ok": n, "failed": n, "first_error": "…"}`.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    match a.as_slice() {
        ["serve", addr, name] => serve(addr, name),
        ["get", addr, path] => get(addr, path, ""),
        ["get", addr, path, body] => get(addr, path, body),
        ["load", addr, secs, conns] => load(addr, secs.parse().unwrap(), conns.parse().unwrap()),
        _ => {
            eprintln!(
                "usage: podapp serve <addr> <name> | get <addr> <path> [body] | load <addr> <seconds> <connections>"
            );
            std::process::exit(2);
        }
    }
}

fn serve(addr: &str, name: &str) {
    let listener = TcpListener::bind(addr).unwrap();
    let name: Arc<str> = name.into();
    for stream in listener.incoming().flatten() {
        let name = name.clone();
        std::thread::spawn(move || {
            let _ = serve_conn(stream, &name);
        });
    }
}

fn serve_conn(stream: TcpStream, name: &str) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    loop {
        let Some((path, body, close)) = read_request(&mut reader)? else {
            return Ok(());
        };
        if let Some(ms) = path.strip_prefix("/slow/") {
            eprintln!("slow request: answering in {ms} ms");
            std::thread::sleep(Duration::from_millis(ms.parse().unwrap_or(0)));
        }
        let answer = format!("{name}:{body}");
        write!(
            out,
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n{}\r\n{answer}",
            answer.len(),
            if close { "connection: close\r\n" } else { "" }
        )?;
        out.flush()?;
        if close {
            return Ok(());
        }
    }
}

/// (path, body, connection: close) of the next request, or None at a clean end.
fn read_request(r: &mut impl BufRead) -> std::io::Result<Option<(String, String, bool)>> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let (len, close) = read_headers(r)?;
    let mut body = vec![0; len];
    r.read_exact(&mut body)?;
    Ok(Some((
        path,
        String::from_utf8_lossy(&body).into_owned(),
        close,
    )))
}

/// (content-length, connection: close) from the header block.
fn read_headers(r: &mut impl BufRead) -> std::io::Result<(usize, bool)> {
    let (mut len, mut close) = (0, false);
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let h = h.trim_end();
        if h.is_empty() {
            return Ok((len, close));
        }
        let lower = h.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
        if lower.starts_with("connection:") && lower.contains("close") {
            close = true;
        }
    }
}

/// One request on `conn` (a reader over a clone of the same stream); the answer's body.
fn request(
    conn: &mut TcpStream,
    reader: &mut BufReader<TcpStream>,
    path: &str,
    body: &str,
    close: bool,
) -> std::io::Result<(String, String)> {
    write!(
        conn,
        "POST {path} HTTP/1.1\r\nhost: pod\r\ncontent-length: {}\r\n{}\r\n{body}",
        body.len(),
        if close { "connection: close\r\n" } else { "" }
    )?;
    conn.flush()?;
    let mut status = String::new();
    if reader.read_line(&mut status)? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed before an answer",
        ));
    }
    let (len, _) = read_headers(reader)?;
    let mut answer = vec![0; len];
    reader.read_exact(&mut answer)?;
    Ok((
        status.trim_end().to_owned(),
        String::from_utf8_lossy(&answer).into_owned(),
    ))
}

fn connect(addr: &str) -> std::io::Result<(TcpStream, BufReader<TcpStream>)> {
    let s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let r = BufReader::new(s.try_clone()?);
    Ok((s, r))
}

fn get(addr: &str, path: &str, body: &str) {
    let result = connect(addr).and_then(|(mut s, mut r)| request(&mut s, &mut r, path, body, true));
    match result {
        Ok((status, answer)) => {
            println!("{status}\n{answer}");
            if !status.contains(" 200 ") {
                std::process::exit(1);
            }
        }
        Err(e) => {
            println!("error: {e}");
            std::process::exit(1);
        }
    }
}

struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Tally {
    fn record(&self, r: std::io::Result<(String, String)>, expect: &str) {
        match r {
            Ok((status, body)) if status.contains(" 200 ") && body.ends_with(expect) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
            }
            other => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                let msg = match other {
                    Ok((status, body)) => format!("{status}: {body}"),
                    Err(e) => e.to_string(),
                };
                self.first_error.lock().unwrap().get_or_insert(msg);
            }
        }
    }
}

fn load(addr: &str, secs: u64, conns: usize) {
    let tally = Arc::new(Tally {
        ok: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        first_error: Mutex::new(None),
    });
    let until = Instant::now() + Duration::from_secs(secs);
    let mut threads = Vec::new();
    for c in 0..conns {
        let (tally, addr) = (tally.clone(), addr.to_owned());
        threads.push(std::thread::spawn(move || {
            // One connection for the whole run: a failure ends it (and is counted).
            let Ok((mut s, mut r)) = connect(&addr) else {
                tally.record(Err(std::io::ErrorKind::ConnectionRefused.into()), "");
                return;
            };
            let mut n = 0u64;
            while Instant::now() < until {
                let body = format!("long-{c}-{n}");
                let res = request(&mut s, &mut r, "/", &body, false);
                let failed = res.is_err();
                tally.record(res, &body);
                if failed {
                    return;
                }
                n += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
        }));
    }
    {
        let (tally, addr) = (tally.clone(), addr.to_owned());
        threads.push(std::thread::spawn(move || {
            let mut n = 0u64;
            while Instant::now() < until {
                let body = format!("new-{n}");
                let res = connect(&addr)
                    .and_then(|(mut s, mut r)| request(&mut s, &mut r, "/", &body, true));
                tally.record(res, &body);
                n += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
        }));
    }
    for t in threads {
        let _ = t.join();
    }
    let first = tally
        .first_error
        .lock()
        .unwrap()
        .clone()
        .unwrap_or_default();
    println!(
        "{{\"ok\": {}, \"failed\": {}, \"first_error\": {:?}}}",
        tally.ok.load(Ordering::Relaxed),
        tally.failed.load(Ordering::Relaxed),
        first
    );
}
