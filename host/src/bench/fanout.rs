//! SSE fan-out: 1,000 clients connected to `GET /events` of a real
//! `jobhost serve` process while jobs complete; events/s delivered, the
//! delivery delay, and the server's RSS with those clients connected.
//! The clients run in this process, on the same 2 cores as the server.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::Barrier;

use super::BenchArgs;
use super::server::upload_echo;
use super::stats::percentile;
use crate::time::{now_ms, parse_rfc3339};

const CLIENTS: usize = 1000;
const JOBS: usize = 100;

/// Resident memory of a process, in MiB, from /proc.
fn rss_mib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")?;
    Ok(kib / 1024.0)
}

pub async fn sse_fanout(args: &BenchArgs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut server = Command::new(std::env::current_exe()?)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(server.stdout.take().context("server stdout")?).read_line(&mut line)?;
    let base = line
        .trim()
        .strip_prefix("jobhost listening on ")
        .context("server did not start")?
        .to_owned();
    let result = measure(args, &base, server.id()).await;
    let _ = server.kill();
    let _ = server.wait();
    result
}

async fn measure(args: &BenchArgs, base: &str, pid: u32) -> anyhow::Result<()> {
    crate::tls::init();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()?;
    upload_echo(&http, args, base, "1.0.0").await?;
    let rss_idle = rss_mib(pid)?;

    let connected = Arc::new(Barrier::new(CLIENTS + 1));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (http, url, connected) = (
                http.clone(),
                format!("{base}/events?types=job:completed"),
                connected.clone(),
            );
            tokio::spawn(async move {
                let response = http.get(url).send().await?.error_for_status()?;
                connected.wait().await;
                let mut events = response.bytes_stream().eventsource();
                let mut delays = Vec::with_capacity(JOBS);
                while delays.len() < JOBS {
                    let event = events.next().await.context("stream ended")??;
                    let data: Value = serde_json::from_str(&event.data)?;
                    let at = parse_rfc3339(data["at"].as_str().unwrap_or_default())
                        .map_err(anyhow::Error::msg)?;
                    delays.push((now_ms() - at) as f64);
                }
                anyhow::Ok(delays)
            })
        })
        .collect();
    connected.wait().await;
    let rss_connected = rss_mib(pid)?;

    let started = Instant::now();
    let spec = json!({"phases": [{"name": "e", "plugin": "echo"}]});
    let submits = (0..JOBS).map(|_| http.post(format!("{base}/jobs")).json(&spec).send());
    for response in futures::future::join_all(submits).await {
        response?.error_for_status()?;
    }
    let mut delays = Vec::with_capacity(CLIENTS * JOBS);
    for client in clients {
        delays.extend(client.await??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "## SSE fan-out: {CLIENTS} clients on `GET /events`, {JOBS} jobs completing ({} events delivered)",
        delays.len()
    );
    println!(
        "| events/s delivered | delay p50 ms | delay p99 ms | server RSS idle MiB | with {CLIENTS} clients MiB |"
    );
    println!("|---:|---:|---:|---:|---:|");
    println!(
        "| {:.0} | {:.0} | {:.0} | {rss_idle:.1} | {rss_connected:.1} |",
        delays.len() as f64 / elapsed,
        percentile(&mut delays, 50.0),
        percentile(&mut delays, 99.0)
    );
    Ok(())
}
