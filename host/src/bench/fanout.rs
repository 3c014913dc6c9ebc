//! SSE fan-out: 1,000 clients connected to `GET /events` of a real
//! `jobhost serve` process while jobs complete, each receiving every
//! completion; events/s delivered, the delivery delay, the server's RSS with
//! those clients connected, and job throughput over HTTP with and without
//! them. The clients run in this process, on the same 2 cores as the
//! server. The delay is measured for a burst (all jobs submitted at once:
//! the delay is the time to drain it) and at steady rates below saturation.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::StreamExt;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::BenchArgs;
use super::clients::{Rendezvous, committed_at, failure, spawn_client};
use super::server::{Figures, Run, ServeProcess, Server, event_stream, upload_echo};
use super::stats::percentile;
use jobhost::model::time::now_ms;

const CLIENTS: usize = 1000;
/// Jobs submitted at once, for the burst's delay.
const JOBS: usize = 100;
/// Jobs per second submitted at a steady rate, each for [`STEADY_SECONDS`],
/// after the burst: every completion goes to every client, so 100 jobs/s
/// are 100,000 deliveries/s.
const STEADY_RATES: [usize; 3] = [100, 200, 400];
const STEADY_SECONDS: usize = 2;

pub async fn sse_fanout(args: &BenchArgs) -> anyhow::Result<()> {
    jobhost::tls::init();
    let process = ServeProcess::start(64)?;
    let http = reqwest::Client::new();
    upload_echo(&http, args, &process.base, "1.0.0").await?;
    let server = Server {
        http: &http,
        args,
        process: &process,
    };
    // Unmeasured: the first run on a fresh server can be slower than the
    // later ones it is compared with (the database file grows, the
    // instance pool's memory is touched for the first time).
    let warm_up = server.run(0).await?;
    let rss_idle = process.rss_mib()?;
    let mut alone = Vec::new();
    let mut last_event = warm_up.last_event;
    for _ in 0..args.samples.min(3) {
        let run = server.run(last_event).await?;
        last_event = run.last_event;
        alone.push(run);
    }
    let alone = Figures::median(&alone);
    let fan_out = fan_out(server, last_event).await?;

    let mut delays = fan_out.burst;
    println!(
        "## SSE fan-out: {CLIENTS} clients on `GET /events`, {JOBS} jobs completing ({} events delivered)",
        delays.len()
    );
    println!(
        "| events/s delivered | delay p50 ms | delay p99 ms | server RSS idle MiB | with {CLIENTS} clients MiB |"
    );
    println!("|---:|---:|---:|---:|---:|");
    println!(
        "| {:.0} | {:.0} | {:.0} | {rss_idle:.1} | {:.1} |",
        fan_out.events_per_second,
        percentile(&mut delays, 50.0),
        percentile(&mut delays, 99.0),
        fan_out.rss_connected
    );
    println!(
        "\nThe same clients while jobs are submitted at a steady rate, {STEADY_SECONDS} s each (every completion to every client):"
    );
    println!("| jobs/s submitted | deliveries/s | delay p50 ms | delay p99 ms | max ms |");
    println!("|---:|---:|---:|---:|---:|");
    for (rate, mut delays) in STEADY_RATES.into_iter().zip(fan_out.steady) {
        println!(
            "| {rate} | {} | {:.0} | {:.0} | {:.0} |",
            rate * CLIENTS,
            percentile(&mut delays, 50.0),
            percentile(&mut delays, 99.0),
            percentile(&mut delays, 100.0),
        );
    }
    println!(
        "\n{} 1-phase jobs over HTTP (server concurrency 64): alone (median of {}), then with {CLIENTS} clients each receiving every completion:",
        args.jobs,
        args.samples.min(3)
    );
    println!("| | no SSE clients | every completion to each | ratio |\n|---|---:|---:|---:|");
    let every = fan_out.run.figures;
    let row = |name: &str, figure: fn(&Figures) -> f64| {
        let (alone, every) = (figure(&alone), figure(&every));
        println!(
            "| {name} | {alone:.0} | {every:.0} | {:.2} |",
            every / alone
        );
    };
    row("jobs/s", |f| f.jobs_per_second);
    row("server CPU µs per job", |f| f.server_cpu_micros_per_job);
    Ok(())
}

struct FanOut {
    /// Delivery delays of the JOBS completions submitted at once to every
    /// client, in ms.
    burst: Vec<f64>,
    /// The same, at each of the STEADY_RATES.
    steady: Vec<Vec<f64>>,
    events_per_second: f64,
    rss_connected: f64,
    /// The run with every client receiving every completion.
    run: Run,
}

/// CLIENTS clients on `GET /events?types=job:completed`. Each records the
/// delay of JOBS completions submitted at once, then of those submitted at
/// each steady rate, saying so after each round, and then keeps reading (a
/// measured run) until told to stop.
async fn fan_out(server: Server<'_>, after: i64) -> anyhow::Result<FanOut> {
    let (http, base) = (server.http, server.process.base.as_str());
    let failed = CancellationToken::new();
    let connected = Rendezvous::new(CLIENTS, &failed);
    let recorded = Rendezvous::new(CLIENTS, &failed);
    let stop = CancellationToken::new();
    let recorded_up_to = Arc::new(AtomicI64::new(0));
    let rounds: Arc<[usize]> = std::iter::once(JOBS)
        .chain(STEADY_RATES.map(|rate| rate * STEADY_SECONDS))
        .collect();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let url = format!("{base}/events?types=job:completed&last_event_id={after}");
            let http = http.clone();
            let (connected, recorded, stop) = (connected.clone(), recorded.clone(), stop.clone());
            let (recorded_up_to, rounds) = (recorded_up_to.clone(), rounds.clone());
            spawn_client(&failed, async move {
                let mut events = event_stream(&http, &url).await?;
                connected.meet().await?;
                let mut delays = Vec::with_capacity(rounds.len());
                for &count in rounds.iter() {
                    let mut round = Vec::with_capacity(count);
                    while round.len() < count {
                        let event = events.next().await.context("stream ended")??;
                        round.push((now_ms() - committed_at(&event.data)?) as f64);
                        recorded_up_to.fetch_max(event.id.parse()?, Ordering::Relaxed);
                    }
                    delays.push(round);
                    recorded.meet().await?;
                }
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
    if connected.meet().await.is_err() {
        return Err(failure(clients).await);
    }
    let rss_connected = server.process.rss_mib()?;

    let started = Instant::now();
    submit(http, base, JOBS, None).await?;
    if recorded.meet().await.is_err() {
        return Err(failure(clients).await);
    }
    let elapsed = started.elapsed().as_secs_f64();
    for rate in STEADY_RATES {
        submit(http, base, rate * STEADY_SECONDS, Some(rate)).await?;
        if recorded.meet().await.is_err() {
            return Err(failure(clients).await);
        }
    }
    let measured = server.run(recorded_up_to.load(Ordering::Relaxed)).await?;
    stop.cancel();
    let mut rounds = vec![Vec::new(); 1 + STEADY_RATES.len()];
    for client in clients {
        for (all, round) in rounds.iter_mut().zip(client.await??) {
            all.extend(round);
        }
    }
    let burst = rounds.remove(0);
    Ok(FanOut {
        events_per_second: burst.len() as f64 / elapsed,
        burst,
        steady: rounds,
        rss_connected,
        run: measured,
    })
}

/// Submits `count` 1-phase jobs: all at once, or evenly spread at
/// `per_second`.
async fn submit(
    http: &reqwest::Client,
    base: &str,
    count: usize,
    per_second: Option<usize>,
) -> anyhow::Result<()> {
    let spec = json!({"phases": [{"name": "e", "plugin": "echo"}]});
    let mut ticks =
        per_second.map(|rate| tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64)));
    let mut submits = Vec::with_capacity(count);
    for _ in 0..count {
        if let Some(ticks) = &mut ticks {
            ticks.tick().await;
        }
        let request = http.post(format!("{base}/jobs")).json(&spec).send();
        submits.push(tokio::spawn(request));
    }
    for submitted in submits {
        submitted.await??.error_for_status()?;
    }
    Ok(())
}
