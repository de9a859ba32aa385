//! `conn-hold`: holds many idle connections open through a tunnel pair, for the memory figure of
//! `bench/sidecar.sh`.
//!
//! Each connection sends one HTTP/1.1 keep-alive request and reads the whole answer, so it counts
//! only once it is established end to end (client tunnel, mTLS hop, server tunnel, backend).
//! With all of them open and silent, it waits `--hold` and reads the RSS (and its anonymous part)
//! of the `--pid`s (the two tunnel processes); then it sends a second request on every connection to show that none was
//! dropped while idle. One JSON line per run.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

#[derive(Parser)]
struct Args {
    /// The client tunnel's plaintext listener
    #[arg(long)]
    addr: SocketAddr,
    /// How many connections to open and hold
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Connections being opened at once
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// The path each request asks for (a small answer)
    #[arg(long, default_value = "/small")]
    path: String,
    /// How long to hold them, all open, before reading the RSS
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    hold: Duration,
    /// Limit for opening one connection and for one answer
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// A process whose RSS to read while the connections are held (repeat for each tunnel)
    #[arg(long)]
    pid: Vec<u32>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: bench\r\nConnection: keep-alive\r\n\r\n",
        args.path
    );
    let rss_before = memory_all(&args.pid, "VmRSS")?;

    let started = Instant::now();
    let mut held = Vec::with_capacity(args.connections);
    let mut opening = JoinSet::new();
    let mut launched = 0;
    while held.len() < args.connections {
        while launched < args.connections && opening.len() < args.concurrency.max(1) {
            let (addr, request, limit) = (args.addr, request.clone(), args.timeout);
            opening.spawn(async move {
                let mut stream = tokio::time::timeout(limit, TcpStream::connect(addr))
                    .await
                    .context("connect timed out")??;
                round_trip(&mut stream, &request, limit).await?;
                Ok::<_, anyhow::Error>(stream)
            });
            launched += 1;
        }
        match opening.join_next().await {
            Some(done) => held.push(
                done?
                    .with_context(|| format!("connection {} through {}", held.len(), args.addr))?,
            ),
            None => bail!("no connection left to open"),
        }
    }
    let open_s = started.elapsed().as_secs_f64();

    tokio::time::sleep(args.hold).await;
    let rss_with = memory_all(&args.pid, "VmRSS")?;
    let anon_with = memory_all(&args.pid, "RssAnon")?;

    // Every connection must still carry a request after the idle hold.
    let mut still_open = 0usize;
    for stream in &mut held {
        if round_trip(stream, &request, args.timeout).await.is_ok() {
            still_open += 1;
        }
    }
    let total = |m: &BTreeMap<String, u64>| m.values().sum::<u64>();
    println!(
        "{}",
        json!({"connections": held.len(), "open_s": open_s, "hold_s": args.hold.as_secs_f64(),
               "still_open_after_hold": still_open,
               "rss_kib_before": rss_before, "rss_kib_before_total": total(&rss_before),
               "rss_kib_with": rss_with, "rss_kib_with_total": total(&rss_with),
               "anon_kib_with_total": total(&anon_with)})
    );
    Ok(())
}

/// Sends one request and reads one whole answer (headers, then `Content-Length` bytes).
async fn round_trip(stream: &mut TcpStream, request: &str, limit: Duration) -> Result<()> {
    tokio::time::timeout(limit, async {
        stream.write_all(request.as_bytes()).await?;
        let mut buf = Vec::with_capacity(512);
        let mut chunk = [0u8; 1024];
        loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                bail!("closed before a whole answer");
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = std::str::from_utf8(&buf[..end]).context("answer head is not text")?;
                if !head.starts_with("HTTP/1.1 200") {
                    bail!("answer: {}", head.lines().next().unwrap_or_default());
                }
                let length: usize = head
                    .lines()
                    .find_map(|l| {
                        let (name, value) = l.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length")
                            .then(|| value.trim().parse().ok())?
                    })
                    .context("answer without Content-Length")?;
                let mut have = buf.len() - (end + 4);
                while have < length {
                    let n = stream.read(&mut chunk).await?;
                    if n == 0 {
                        bail!("closed inside the body");
                    }
                    have += n;
                }
                return Ok(());
            }
            if buf.len() > 64 * 1024 {
                bail!("answer head larger than 64 KiB");
            }
        }
    })
    .await
    .context("answer timed out")?
}

/// One memory field of `/proc/<pid>/status` (in KiB) for each pid.
fn memory_all(pids: &[u32], field: &str) -> Result<BTreeMap<String, u64>> {
    pids.iter()
        .map(|&pid| Ok((pid.to_string(), memory_kib(pid, field)?)))
        .collect()
}

fn memory_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("pid {pid}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {field} for pid {pid}"))
}
