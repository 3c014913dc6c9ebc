//! SSE fan-out: 1,000 clients connected to `GET /events` of a real
//! `jobhost serve` process while jobs complete; events/s delivered, the
//! delivery delay, the server's RSS with those clients connected, and job
//! throughput over HTTP with and without them. Then the same throughput
//! with 1,000 clients each watching a job of its own, as `jobhost job watch`
//! does. The clients run in this process, on the same 2 cores as the server.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Instant;

use anyhow::Context as _;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::Barrier;
use tokio_util::sync::CancellationToken;

use super::BenchArgs;
use super::http::submit_and_watch;
use super::server::{event_stream, upload_echo};
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

/// CPU time a process has used, in seconds, from /proc (utime + stime, in
/// USER_HZ ticks, which Linux fixes at 100 per second for user space).
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("no command name")?
        .1
        .split_whitespace()
        .collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields.get(i).context("short stat")?.parse::<f64>()?)
    };
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
    Ok((ticks(11)? + ticks(12)?) / 100.0)
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
    // The jobs the watchers below watch, due in an hour: queued through
    // every run, so that each run has the same database to work with.
    let mut watched_jobs = Vec::with_capacity(CLIENTS);
    let later = json!({"phases": [{"name": "e", "plugin": "echo"}], "delay_ms": 3_600_000});
    for _ in 0..CLIENTS {
        let job: Value = http
            .post(format!("{base}/jobs"))
            .json(&later)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        watched_jobs.push(job["id"].as_str().context("job id")?.to_owned());
    }
    // Unmeasured: the first run on a fresh server costs twice the CPU per
    // job of later ones (a growing database file, first use of the
    // instance pool's memory).
    let (_, warmed_up) = submit_and_watch(&http, base, 1, args.jobs, 0).await?;
    let rss_idle = rss_mib(pid)?;
    let cpu = cpu_seconds(pid)?;
    let (alone, last_event) = submit_and_watch(&http, base, 1, args.jobs, warmed_up).await?;
    let cpu_alone = cpu_seconds(pid)? - cpu;

    // Each client starts after the events of the run above, records the
    // delay of the first JOBS events, says so, and then keeps reading (the
    // throughput run below) until told to stop.
    let connected = Arc::new(Barrier::new(CLIENTS + 1));
    let recorded = Arc::new(Barrier::new(CLIENTS + 1));
    let stop = CancellationToken::new();
    let recorded_up_to = Arc::new(AtomicI64::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let url = format!("{base}/events?types=job:completed&last_event_id={last_event}");
            let http = http.clone();
            let (connected, recorded, stop) = (connected.clone(), recorded.clone(), stop.clone());
            let recorded_up_to = recorded_up_to.clone();
            tokio::spawn(async move {
                let mut events = event_stream(&http, &url).await?;
                connected.wait().await;
                let mut delays = Vec::with_capacity(JOBS);
                while delays.len() < JOBS {
                    let event = events.next().await.context("stream ended")??;
                    let data: Value = serde_json::from_str(&event.data)?;
                    let at = parse_rfc3339(data["at"].as_str().unwrap_or_default())
                        .map_err(anyhow::Error::msg)?;
                    delays.push((now_ms() - at) as f64);
                    recorded_up_to.fetch_max(event.id.parse()?, Ordering::Relaxed);
                }
                recorded.wait().await;
                loop {
                    tokio::select! {
                        event = events.next() => { event.context("stream ended")??; }
                        () = stop.cancelled() => break,
                    }
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
    recorded.wait().await;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid)?;
    let after = recorded_up_to.load(Ordering::Relaxed);
    let (watched, last_event) = submit_and_watch(&http, base, 1, args.jobs, after).await?;
    let cpu_watched = cpu_seconds(pid)? - cpu;
    stop.cancel();
    let mut delays = Vec::with_capacity(CLIENTS * JOBS);
    for client in clients {
        delays.extend(client.await??);
    }

    // Each watcher reads its job's first event (so its stream is caught up
    // and live), then waits on the stream until told to stop.
    let connected = Arc::new(Barrier::new(CLIENTS + 1));
    let stop = CancellationToken::new();
    let watchers: Vec<_> = watched_jobs
        .iter()
        .map(|id| {
            let url = format!("{base}/jobs/{id}/events");
            let (http, connected, stop) = (http.clone(), connected.clone(), stop.clone());
            tokio::spawn(async move {
                let mut events = event_stream(&http, &url).await?;
                events.next().await.context("stream ended")??;
                connected.wait().await;
                tokio::select! {
                    event = events.next() => anyhow::bail!("a queued job's stream moved: {event:?}"),
                    () = stop.cancelled() => anyhow::Ok(()),
                }
            })
        })
        .collect();
    connected.wait().await;
    let cpu = cpu_seconds(pid)?;
    let (beside_watchers, _) = submit_and_watch(&http, base, 1, args.jobs, last_event).await?;
    let cpu_beside_watchers = cpu_seconds(pid)? - cpu;
    stop.cancel();
    for watcher in watchers {
        watcher.await??;
    }
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
    println!(
        "\n{} 1-phase jobs over HTTP, alone, then with {CLIENTS} clients each receiving every completion, then with {CLIENTS} clients each watching a queued job of its own:",
        args.jobs
    );
    println!(
        "| | no SSE clients | every completion to each | ratio | each watching its own job | ratio |\n|---|---:|---:|---:|---:|---:|"
    );
    println!(
        "| jobs/s | {alone:.0} | {watched:.0} | {:.2} | {beside_watchers:.0} | {:.2} |",
        watched / alone,
        beside_watchers / alone
    );
    let per_job = |cpu: f64| cpu * 1e6 / args.jobs as f64;
    println!(
        "| server CPU µs per job | {:.0} | {:.0} | {:.2} | {:.0} | {:.2} |",
        per_job(cpu_alone),
        per_job(cpu_watched),
        cpu_watched / cpu_alone,
        per_job(cpu_beside_watchers),
        cpu_beside_watchers / cpu_alone
    );
    Ok(())
}
