//! `wapi-load`: load for `kith agent`'s Workload API, driven by `bench/agent.sh`.
//!
//! - `first-fetch`: N new callers, each a new connection that attests and waits for its first
//!   `FetchX509SVID` answer; latency from connect to the answer.
//! - `streams`: holds many open `FetchX509SVID` streams (spread over connections, since the
//!   agent caps streams per connection) and reports the agent's RSS with them open.
//!
//! The client is the Rust `spiffe` crate, as a workload would use it. One JSON line per run.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use serde_json::json;
use spiffe::WorkloadApiClient;
use tokio_stream::StreamExt;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Mode {
    FirstFetch,
    Streams,
}

#[derive(Parser)]
struct Args {
    #[arg(long, value_enum)]
    mode: Mode,
    /// The agent's Workload API socket
    #[arg(long)]
    socket: String,
    /// first-fetch: how many new callers
    #[arg(long, default_value_t = 200)]
    count: usize,
    /// first-fetch: callers at once
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// streams: how many to hold open
    #[arg(long, default_value_t = 1000)]
    streams: usize,
    /// streams: per connection (the agent allows 100)
    #[arg(long, default_value_t = 50)]
    per_connection: usize,
    /// streams: how long to hold them after all are open
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    hold: Duration,
    /// The agent's pid, to read its memory
    #[arg(long)]
    agent_pid: Option<u32>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let endpoint = format!("unix://{}", args.socket);
    match args.mode {
        Mode::FirstFetch => first_fetch(&endpoint, args.count, args.concurrency.max(1)).await,
        Mode::Streams => streams(&endpoint, &args).await,
    }
}

async fn first_fetch(endpoint: &str, count: usize, concurrency: usize) -> Result<()> {
    let mut latencies = Vec::with_capacity(count);
    let mut errors = 0usize;
    let mut done = 0usize;
    while done < count {
        let batch = concurrency.min(count - done);
        let tasks: Vec<_> = (0..batch)
            .map(|_| {
                let endpoint = endpoint.to_owned();
                tokio::spawn(async move {
                    let start = Instant::now();
                    let client = WorkloadApiClient::connect_to(&endpoint).await?;
                    let svid = client.fetch_x509_svid().await?;
                    Ok::<_, anyhow::Error>((start.elapsed(), svid.spiffe_id().to_string()))
                })
            })
            .collect();
        for t in tasks {
            match t.await? {
                Ok((d, _)) => latencies.push(d),
                Err(_) => errors += 1,
            }
        }
        done += batch;
    }
    latencies.sort();
    let ms = |p: f64| {
        if latencies.is_empty() {
            return 0.0;
        }
        let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[i].as_secs_f64() * 1000.0
    };
    println!(
        "{}",
        json!({"mode": "first-fetch", "callers": count, "concurrency": concurrency, "errors": errors,
               "p50_ms": ms(0.50), "p99_ms": ms(0.99), "max_ms": ms(1.0)})
    );
    Ok(())
}

async fn streams(endpoint: &str, args: &Args) -> Result<()> {
    let rss_before = args.agent_pid.map(rss_kib).transpose()?;
    let started = Instant::now();
    let mut held = Vec::with_capacity(args.streams);
    let mut clients = Vec::new();
    while held.len() < args.streams {
        let client = WorkloadApiClient::connect_to(endpoint)
            .await
            .context("connecting to the agent")?;
        for _ in 0..args.per_connection.min(args.streams - held.len()) {
            let mut stream = client
                .stream_x509_svids()
                .await
                .context("opening a stream")?;
            // Each stream counts once its first message arrived.
            match tokio::time::timeout(Duration::from_secs(10), stream.next()).await {
                Ok(Some(Ok(_))) => held.push(stream),
                other => bail!(
                    "stream {} gave no first message: {:?}",
                    held.len(),
                    other.map(|o| o.map(|r| r.err()))
                ),
            }
        }
        clients.push(client);
    }
    let open_s = started.elapsed().as_secs_f64();
    tokio::time::sleep(args.hold).await;
    let rss_with = args.agent_pid.map(rss_kib).transpose()?;
    println!(
        "{}",
        json!({"mode": "streams", "streams": held.len(), "connections": clients.len(), "open_s": open_s,
               "agent_rss_kib_before": rss_before, "agent_rss_kib_with_streams": rss_with})
    );
    drop(held);
    Ok(())
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("agent pid {pid}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")
}
