//! SSE fan-out: 1,000 clients connected to `GET /events` of a real
//! `jobhost serve` process while jobs complete; events/s delivered, the
//! delivery delay, the server's RSS with those clients connected, and job
//! throughput over HTTP with and without them, and beside 1,000 clients
//! each watching a job of its own, as `jobhost job watch` does. The clients
//! run in this process, on the same 2 cores as the server. The delay is
//! measured for a burst (all jobs submitted at once: the delay is the time
//! to drain it) and at steady rates below saturation.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::Barrier;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::BenchArgs;
use super::http::submit_and_watch;
use super::server::{event_stream, upload_echo};
use super::stats::{median, percentile};
use jobhost::model::time::{now_ms, parse_rfc3339};

const CLIENTS: usize = 1000;
/// Jobs submitted at once, for the burst's delay.
const JOBS: usize = 100;
/// Jobs per second submitted at a steady rate, each for [`STEADY_SECONDS`],
/// after the burst: every completion goes to every client, so 100 jobs/s
/// are 100,000 deliveries/s.
const STEADY_RATES: [usize; 3] = [100, 200, 400];
const STEADY_SECONDS: usize = 2;

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
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--concurrency",
            "64",
            // Every client connects from this one address: the per-address
            // stream cap is lifted for the benchmark.
            "--max-streams-per-ip",
            "1000000",
            "--data-dir",
        ])
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

/// One measured run of `args.jobs` 1-phase jobs over HTTP.
struct Run {
    figures: Figures,
    /// The id of its last completion, after which the next run starts.
    last_event: i64,
}

struct Figures {
    jobs_per_second: f64,
    server_cpu_micros_per_job: f64,
}

impl Figures {
    fn median(runs: &[Run]) -> Figures {
        let median_of = |figure: fn(&Figures) -> f64| {
            median(
                &mut runs
                    .iter()
                    .map(|run| figure(&run.figures))
                    .collect::<Vec<_>>(),
            )
        };
        Figures {
            jobs_per_second: median_of(|f| f.jobs_per_second),
            server_cpu_micros_per_job: median_of(|f| f.server_cpu_micros_per_job),
        }
    }
}

/// The server under test, and how the bench reaches it.
struct Server<'a> {
    http: &'a reqwest::Client,
    args: &'a BenchArgs,
    base: &'a str,
    pid: u32,
}

async fn run(server: &Server<'_>, after: i64) -> anyhow::Result<Run> {
    let Server {
        http,
        args,
        base,
        pid,
    } = *server;
    let cpu = cpu_seconds(pid)?;
    let (jobs_per_second, last_event) = submit_and_watch(http, base, 1, args.jobs, after).await?;
    Ok(Run {
        figures: Figures {
            jobs_per_second,
            server_cpu_micros_per_job: (cpu_seconds(pid)? - cpu) * 1e6 / args.jobs as f64,
        },
        last_event,
    })
}

async fn measure(args: &BenchArgs, base: &str, pid: u32) -> anyhow::Result<()> {
    jobhost::tls::init();
    let http = reqwest::Client::new();
    upload_echo(&http, args, base, "1.0.0").await?;
    let watched_jobs = queue_jobs_for_watchers(&http, base).await?;
    // Unmeasured: the first run on a fresh server can be slower than the
    // later ones it is compared with (the database file grows, the
    // instance pool's memory is touched for the first time).
    let server = Server {
        http: &http,
        args,
        base,
        pid,
    };
    let warm_up = run(&server, 0).await?;
    let rss_idle = rss_mib(pid)?;
    // Alternately alone and beside the watchers, so that both see the
    // database grow alike.
    let (mut alone, mut watchers, mut last_event) = (Vec::new(), Vec::new(), warm_up.last_event);
    for _ in 0..args.samples.min(3) {
        let run_alone = run(&server, last_event).await?;
        let run_beside = beside_watchers(&server, &watched_jobs, run_alone.last_event).await?;
        last_event = run_beside.last_event;
        alone.push(run_alone);
        watchers.push(run_beside);
    }
    let (alone, watchers) = (Figures::median(&alone), Figures::median(&watchers));
    let fan_out = fan_out(&server, last_event).await?;

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
        "\n{} 1-phase jobs over HTTP (server concurrency 64): alone and beside {CLIENTS} clients each watching a queued job of its own (medians of {}, alternating), then with {CLIENTS} clients each receiving every completion:",
        args.jobs,
        args.samples.min(3)
    );
    println!(
        "| | no SSE clients | each watching its own job | ratio | every completion to each | ratio |\n|---|---:|---:|---:|---:|---:|"
    );
    let every = fan_out.run.figures;
    let row = |name: &str, figure: fn(&Figures) -> f64| {
        let (alone, watchers, every) = (figure(&alone), figure(&watchers), figure(&every));
        println!(
            "| {name} | {alone:.0} | {watchers:.0} | {:.2} | {every:.0} | {:.2} |",
            watchers / alone,
            every / alone
        );
    };
    row("jobs/s", |f| f.jobs_per_second);
    row("server CPU µs per job", |f| f.server_cpu_micros_per_job);
    Ok(())
}

/// Jobs due in an hour, one per watcher: queued through every run, so that
/// each run has the same database to work with.
async fn queue_jobs_for_watchers(
    http: &reqwest::Client,
    base: &str,
) -> anyhow::Result<Vec<String>> {
    let later = json!({"phases": [{"name": "e", "plugin": "echo"}], "delay_ms": 3_600_000});
    let mut ids = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        let job: Value = http
            .post(format!("{base}/jobs"))
            .json(&later)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        ids.push(job["id"].as_str().context("job id")?.to_owned());
    }
    Ok(ids)
}

/// A run beside one client per queued job on `GET /jobs/{id}/events`, as
/// `jobhost job watch` does. Each watcher reads its job's first event (so
/// its stream is caught up and live), then waits on the stream.
async fn beside_watchers(
    server: &Server<'_>,
    watched_jobs: &[String],
    after: i64,
) -> anyhow::Result<Run> {
    let failed = CancellationToken::new();
    let connected = Rendezvous::new(watched_jobs.len(), &failed);
    let stop = CancellationToken::new();
    let watchers: Vec<_> = watched_jobs
        .iter()
        .map(|id| {
            let url = format!("{}/jobs/{id}/events", server.base);
            let (http, connected, stop) = (server.http.clone(), connected.clone(), stop.clone());
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
    let measured = run(server, after).await?;
    stop.cancel();
    for watcher in watchers {
        watcher.await??;
    }
    Ok(measured)
}

/// A barrier for the clients and the bench, which nobody waits at forever
/// once a client has failed (it will never arrive).
#[derive(Clone)]
struct Rendezvous {
    barrier: Arc<Barrier>,
    failed: CancellationToken,
}

impl Rendezvous {
    fn new(clients: usize, failed: &CancellationToken) -> Self {
        Rendezvous {
            barrier: Arc::new(Barrier::new(clients + 1)),
            failed: failed.clone(),
        }
    }

    async fn meet(&self) -> anyhow::Result<()> {
        tokio::select! {
            _ = self.barrier.wait() => Ok(()),
            () = self.failed.cancelled() => Err(Abandoned.into()),
        }
    }
}

/// Why a client gave up: another one failed.
#[derive(Debug, thiserror::Error)]
#[error("another SSE client failed")]
struct Abandoned;

/// Runs a client, cancelling `failed` if it fails.
fn spawn_client<T: Send + 'static>(
    failed: &CancellationToken,
    client: impl Future<Output = anyhow::Result<T>> + Send + 'static,
) -> JoinHandle<anyhow::Result<T>> {
    let failed = failed.clone();
    tokio::spawn(async move {
        let result = client.await;
        if result.is_err() {
            failed.cancel();
        }
        result
    })
}

/// The error of the client that failed first.
async fn failure<T>(clients: Vec<JoinHandle<anyhow::Result<T>>>) -> anyhow::Error {
    let mut first = anyhow::anyhow!("an SSE client failed");
    for client in clients {
        match client.await {
            Ok(Err(error)) if !error.is::<Abandoned>() => return error,
            Err(panicked) => first = panicked.into(),
            _ => {}
        }
    }
    first
}

/// An event's `at`, found in its JSON without parsing the rest: these
/// clients share the server's 2 cores, and parsing 100,000 events in a
/// burst would add its own delay to the one measured.
fn committed_at(json: &str) -> anyhow::Result<i64> {
    let at = json
        .split_once(r#""at":""#)
        .and_then(|(_, rest)| rest.split_once('"'))
        .context("no `at` in the event")?
        .0;
    parse_rfc3339(at).map_err(anyhow::Error::msg)
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
async fn fan_out(server: &Server<'_>, after: i64) -> anyhow::Result<FanOut> {
    let Server {
        http, base, pid, ..
    } = *server;
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
    let rss_connected = rss_mib(pid)?;

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
    let measured = run(server, recorded_up_to.load(Ordering::Relaxed)).await?;
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
