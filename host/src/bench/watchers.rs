//! SSE watchers: thousands of clients (10,000 by default), each on
//! `GET /jobs/{id}/events` of a job of its own, as `jobhost job watch`
//! does, on a real `jobhost serve` process (concurrency 64, the per-address
//! stream cap lifted). How soon each hears of its job's events while the
//! jobs run at a steady rate, the server's memory with the watchers
//! connected, and job throughput over HTTP beside them against none. The
//! clients run in this process, on the same 2 cores as the server.

use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::BenchArgs;
use super::clients::{Rendezvous, committed_at, failure, spawn_client};
use super::server::{Figures, Run, ServeProcess, Server, event_stream, upload_echo};
use super::stats::percentile;
use jobhost::model::time::{now_ms, rfc3339};

/// Watchers per `--jobs` (10,000 for the default 2,000).
const WATCHERS_PER_JOB: usize = 5;
/// The watched jobs fall due one after another at each of these rates
/// (per second), a fresh set of watchers for each.
const WATCHED_PER_SECOND: [u64; 2] = [1000, 4000];
/// How long before the first watched job is due the watchers begin to
/// connect: a base, and this much per watcher.
const CONNECT_LEAD: Duration = Duration::from_secs(2);
const CONNECT_LEAD_PER_WATCHER: Duration = Duration::from_millis(2);
/// Runs alone and beside the watchers, alternating, at most.
const PAIRS: usize = 5;
/// Job creations in flight at once while the watched jobs are queued.
const SUBMITTERS: usize = 32;

pub async fn sse_watchers(args: &BenchArgs) -> anyhow::Result<()> {
    jobhost::tls::init();
    let watchers = args.jobs * WATCHERS_PER_JOB;
    // A connection takes a descriptor on each side; the server raises its
    // own limit the same way.
    let open_files = jobhost::app::raise_open_file_limit();
    anyhow::ensure!(
        open_files as usize > watchers + 1024,
        "{watchers} watchers need more than {} open files; the hard limit is {open_files} (`ulimit -Hn`)",
        watchers + 1024
    );
    let process = ServeProcess::start(64)?;
    // The server closes a connection idle for its `header_read_timeout`
    // (10 s): a pooled one must not be picked up just as it does.
    let http = reqwest::Client::builder()
        .pool_idle_timeout(Duration::from_secs(5))
        .build()?;
    // Each watcher is a client of its own, as `jobhost job watch` is: its
    // connection closes with its stream rather than idle in a pool.
    let watch = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()?;
    upload_echo(&http, args, &process.base, "1.0.0").await?;
    let server = Server {
        http: &http,
        args,
        process: &process,
    };
    // Jobs due in an hour, one per watcher: queued through every run, so
    // that each run has the same database to work with.
    let idle_jobs = queue_jobs(
        &http,
        &process.base,
        watchers,
        |_| json!({"phases": [{"name": "e", "plugin": "echo"}], "delay_ms": 3_600_000}),
    )
    .await?;
    // Unmeasured: the first run on a fresh server can be slower than the
    // later ones it is compared with.
    let warm_up = server.run(0).await?;
    let rss_idle = process.rss_mib()?;
    // Alternately alone and beside the watchers, so that both see the
    // database grow alike.
    let (mut alone, mut beside, mut last_event) = (Vec::new(), Vec::new(), warm_up.last_event);
    for _ in 0..args.samples.min(PAIRS) {
        let run_alone = server.run(last_event).await?;
        let run_beside = beside_watchers(server, &watch, &idle_jobs, run_alone.last_event).await?;
        last_event = run_beside.last_event;
        alone.push(run_alone);
        beside.push(run_beside);
    }
    // Each pair ran back to back: the median of their ratios is steadier
    // than the ratio of the medians on a noisy machine.
    let ratios = Figures::median_ratio(&alone, &beside);
    let (alone, beside) = (Figures::median(&alone), Figures::median(&beside));

    println!(
        "## SSE watchers: {watchers} clients, each on `GET /jobs/{{id}}/events` of its own job \
         while the jobs fall due at a steady rate (server concurrency 64, per-address stream cap \
         lifted; server RSS idle {rss_idle:.1} MiB)"
    );
    println!(
        "| jobs due per second | events delivered | delay p50 ms | delay p99 ms | max ms | server RSS with the watchers MiB |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    for rate in WATCHED_PER_SECOND {
        let mut delivered = delivery(server, &watch, watchers, rate).await?;
        println!(
            "| {rate} | {} | {:.0} | {:.0} | {:.0} | {:.1} |",
            delivered.delays.len(),
            percentile(&mut delivered.delays, 50.0),
            percentile(&mut delivered.delays, 99.0),
            percentile(&mut delivered.delays, 100.0),
            delivered.rss_connected
        );
    }
    println!(
        "\n{} 1-phase jobs over HTTP: alone and beside {watchers} watchers of queued jobs \
         ({} pairs, medians):",
        args.jobs,
        args.samples.min(PAIRS)
    );
    println!(
        "| | no SSE clients | beside the watchers | median ratio of each pair |\n\
         |---|---:|---:|---:|"
    );
    let row = |name: &str, figure: fn(&Figures) -> f64| {
        let (alone, beside, ratio) = (figure(&alone), figure(&beside), figure(&ratios));
        println!("| {name} | {alone:.0} | {beside:.0} | {ratio:.2} |");
    };
    row("jobs/s", |f| f.jobs_per_second);
    row("server CPU µs per job", |f| f.server_cpu_micros_per_job);
    Ok(())
}

/// Creates `count` jobs, the `i`th from `spec(i)`; returns their ids in
/// that order.
async fn queue_jobs(
    http: &reqwest::Client,
    base: &str,
    count: usize,
    spec: impl Fn(usize) -> Value,
) -> anyhow::Result<Vec<String>> {
    let url = format!("{base}/jobs");
    let created = futures::stream::iter(0..count)
        .map(|i| {
            let request = http.post(&url).json(&spec(i)).send();
            async move {
                let job: Value = request.await?.error_for_status()?.json().await?;
                anyhow::Ok(job["id"].as_str().context("job id")?.to_owned())
            }
        })
        .buffered(SUBMITTERS);
    created.collect::<Vec<_>>().await.into_iter().collect()
}

/// A run beside one client per queued job on `GET /jobs/{id}/events`. Each
/// watcher reads its job's first event (so its stream is caught up and
/// live), then waits on the stream, which must not move.
async fn beside_watchers(
    server: Server<'_>,
    watch: &reqwest::Client,
    watched_jobs: &[String],
    after: i64,
) -> anyhow::Result<Run> {
    let failed = CancellationToken::new();
    let connected = Rendezvous::new(watched_jobs.len(), &failed);
    let stop = CancellationToken::new();
    let watchers: Vec<_> = watched_jobs
        .iter()
        .map(|id| {
            let url = format!("{}/jobs/{id}/events", server.process.base);
            let (http, connected, stop) = (watch.clone(), connected.clone(), stop.clone());
            spawn_client(&failed, async move {
                let mut events = event_stream(&http, &url).await?;
                events.next().await.context("stream ended")??;
                connected.meet().await?;
                tokio::select! {
                    event = events.next() => anyhow::bail!("a queued job's stream moved: {event:?}"),
                    () = stop.cancelled() => anyhow::Ok(()),
                }
            })
        })
        .collect();
    if connected.meet().await.is_err() {
        return Err(failure(watchers).await);
    }
    let measured = server.run(after).await?;
    stop.cancel();
    for watcher in watchers {
        watcher.await??;
    }
    Ok(measured)
}

struct Delivery {
    /// From each event's commit to its watcher's receipt, in ms: every
    /// event of every watched job after `job:created`.
    delays: Vec<f64>,
    rss_connected: f64,
}

/// `watchers` jobs falling due at `per_second`, each watched by a client
/// connected before the first is due, until its `job:completed`.
async fn delivery(
    server: Server<'_>,
    watch: &reqwest::Client,
    watchers: usize,
    per_second: u64,
) -> anyhow::Result<Delivery> {
    let lead = CONNECT_LEAD + CONNECT_LEAD_PER_WATCHER * watchers as u32;
    let first_due = now_ms() + lead.as_millis() as i64;
    let spacing_micros = 1_000_000 / per_second;
    let jobs = queue_jobs(server.http, &server.process.base, watchers, |i| {
        let due = first_due + (i as u64 * spacing_micros / 1000) as i64;
        json!({"phases": [{"name": "e", "plugin": "echo"}], "run_at": rfc3339(due)})
    })
    .await?;
    let failed = CancellationToken::new();
    let connected = Rendezvous::new(jobs.len(), &failed);
    let clients: Vec<_> = jobs
        .iter()
        .map(|id| {
            let url = format!("{}/jobs/{id}/events", server.process.base);
            let (http, connected) = (watch.clone(), connected.clone());
            spawn_client(&failed, async move {
                let mut events = event_stream(&http, &url).await?;
                events.next().await.context("stream ended")??;
                connected.meet().await?;
                let mut delays = Vec::new();
                loop {
                    let event = events.next().await.context("stream ended")??;
                    delays.push((now_ms() - committed_at(&event.data)?) as f64);
                    if event.event == "job:completed" {
                        return anyhow::Ok(delays);
                    }
                }
            })
        })
        .collect();
    if connected.meet().await.is_err() {
        return Err(failure(clients).await);
    }
    let late = now_ms() - first_due;
    anyhow::ensure!(
        late < 0,
        "the watchers connected {late} ms after the first watched job was due: \
         raise CONNECT_LEAD_PER_WATCHER"
    );
    let rss_connected = server.process.rss_mib()?;
    let mut delays = Vec::new();
    for client in clients {
        delays.extend(client.await??);
    }
    Ok(Delivery {
        delays,
        rss_connected,
    })
}
