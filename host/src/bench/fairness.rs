//! Fair claiming across concurrency keys: how long a small key's jobs wait
//! to start while another key has a backlog (10,000 jobs), beside the same jobs
//! with no backlog and behind a backlog of their own key (first come, first
//! served), in one run; and what keys and per-plugin limits cost the
//! queue's throughput.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use jobhost::events::{KindSet, Topic};
use jobhost::model::{EventBody, EventKind, JobSpec, PluginResources};
use jobhost::storage::Durability;

use super::BenchArgs;
use super::queue::{SharedCache, completions, spec, start};
use super::stats::{median, millis, percentile};

/// Jobs in the big key's backlog, per `--jobs` (10,000 by default).
const BACKLOG_PER_JOB: usize = 5;
/// The small key's jobs, one every `SMALL_EVERY`.
const SMALL_JOBS: usize = 200;
const SMALL_EVERY: Duration = Duration::from_millis(2);
const CONCURRENCY: usize = 8;

pub async fn fairness(args: &BenchArgs) -> anyhow::Result<()> {
    let compiled = SharedCache::new()?;
    println!(
        "## Fair claiming: enqueue → `job:started` of {SMALL_JOBS} jobs of a small key, one every \
         {} ms, concurrency {CONCURRENCY} (ms)",
        SMALL_EVERY.as_millis()
    );
    println!(
        "| while pending | p50 | p99 | ratio of p99 to no backlog | backlog left | writer busy | \
         µs per commit | writes per commit |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let backlog = args.jobs * BACKLOG_PER_JOB;
    // The second case is the floor under the backlog's load: the small
    // jobs outrank it, so they wait for a free worker and the writer only.
    let cases = [
        ("nothing else".to_owned(), 0, "small", 0),
        (
            format!("{backlog} jobs of another key"),
            backlog,
            "small",
            0,
        ),
        (
            "the same, the small key's jobs at a higher priority".to_owned(),
            backlog,
            "small",
            1,
        ),
        (format!("{backlog} jobs of the same key"), backlog, "big", 0),
    ];
    let mut baseline = None;
    for (name, backlog, key, priority) in cases {
        let mut p50s = Vec::new();
        let mut p99s = Vec::new();
        let mut left = Vec::new();
        let (mut busy, mut per_commit, mut writes) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..args.samples.min(3) {
            let mut small = small_waits(args, &compiled, backlog, key, priority).await?;
            p50s.push(percentile(&mut small.waits, 50.0));
            p99s.push(percentile(&mut small.waits, 99.0));
            left.push(small.backlog_left as f64);
            busy.push(small.writer_busy);
            per_commit.push(small.micros_per_commit);
            writes.push(small.writes_per_commit);
        }
        let p99 = median(&mut p99s);
        let base = *baseline.get_or_insert(p99);
        println!(
            "| {name} | {:.2} | {p99:.2} | {:.1} | {:.0} | {:.0}% | {:.0} | {:.1} |",
            median(&mut p50s),
            p99 / base,
            median(&mut left),
            median(&mut busy) * 100.0,
            median(&mut per_commit),
            median(&mut writes)
        );
    }

    println!(
        "\n## What keys and plugin limits cost: {} 1-phase jobs, concurrency {CONCURRENCY}, jobs/s",
        args.jobs
    );
    println!(
        "| keys, plugin limit | jobs/s | ratio to neither | writer µs per job |\n|---|---:|---:|---:|"
    );
    let mut neither = None;
    for (name, keys, max_running) in [
        ("none", 0, None),
        ("8 keys", 8, None),
        ("a key per job", usize::MAX, None),
        (
            "`echo` limited to 1,000 running (never reached)",
            0,
            Some(1_000),
        ),
        ("`echo` limited to 4 running", 0, Some(4)),
    ] {
        let (rate, writer_micros) = throughput(args, &compiled, keys, max_running).await?;
        let base = *neither.get_or_insert(rate);
        println!(
            "| {name} | {rate:.0} | {:.2} | {writer_micros:.0} |",
            rate / base
        );
    }
    Ok(())
}

fn keyed(key: String) -> JobSpec {
    JobSpec {
        concurrency_key: Some(key),
        ..spec(1)
    }
}

/// What the small key's jobs met in one sample.
struct SmallWaits {
    /// Enqueue → `job:started` of each, in ms.
    waits: Vec<f64>,
    /// The backlog's jobs still pending once the last small job started.
    backlog_left: u64,
    /// The storage writer meanwhile: the share of the time it was busy,
    /// and its commits' length and size. Every job waits for at least the
    /// commit that stores it and the one that claims it.
    writer_busy: f64,
    micros_per_commit: f64,
    writes_per_commit: f64,
}

/// The waits of the small key's jobs (of `priority`), with `backlog` jobs
/// of key `big` enqueued first (while paused, so that all of it is there).
async fn small_waits(
    args: &BenchArgs,
    compiled: &SharedCache,
    backlog: usize,
    small_key: &str,
    priority: i32,
) -> anyhow::Result<SmallWaits> {
    let bench = start(args, compiled, CONCURRENCY, Durability::Process).await?;
    bench.queue.pause().await?;
    for chunk in (0..backlog).collect::<Vec<_>>().chunks(500) {
        let jobs = chunk
            .iter()
            .map(|_| bench.queue.enqueue(keyed("big".into())));
        for job in futures::future::join_all(jobs).await {
            job?;
        }
    }
    let mut started = bench
        .queue
        .bus()
        .subscribe_batches(Topic::Kinds(KindSet::of(&[EventKind::JobStarted])));
    bench.queue.resume().await?;
    let began = Instant::now();
    let before = bench.storage.writer_stats();
    let mut submitted = HashMap::new();
    let mut waits = Vec::with_capacity(SMALL_JOBS);
    let mut ticker = tokio::time::interval(SMALL_EVERY);
    while waits.len() < SMALL_JOBS {
        tokio::select! {
            _ = ticker.tick(), if submitted.len() + waits.len() < SMALL_JOBS => {
                let at = Instant::now();
                let spec = JobSpec { priority, ..keyed(small_key.into()) };
                let job = bench.queue.enqueue(spec).await?;
                submitted.insert(job.job.id, at);
            }
            batch = started.recv() => {
                let batch = batch.map_err(|e| anyhow::anyhow!("event bus: {e}"))?;
                let now = Instant::now();
                for event in batch.events() {
                    if let (EventBody::JobStarted(_), Some(job)) = (&event.body, &event.job_id)
                        && let Some(at) = submitted.remove(job)
                    {
                        waits.push(millis(now - at));
                    }
                }
            }
        }
    }
    let writer = bench.storage.writer_stats().since(before);
    let elapsed = began.elapsed();
    let backlog_left = bench.storage.pending_count().await?;
    let _ = bench.queue.shutdown(Duration::from_secs(30)).await;
    Ok(SmallWaits {
        waits,
        backlog_left,
        writer_busy: writer.busy.as_secs_f64() / elapsed.as_secs_f64(),
        micros_per_commit: writer.micros_per_commit(),
        writes_per_commit: writer.writes_per_commit(),
    })
}

/// Jobs per second through the queue, each job with one of `keys` keys
/// (none for 0), `echo` limited to `max_running` phases at once, and the
/// storage writer's µs per job.
async fn throughput(
    args: &BenchArgs,
    compiled: &SharedCache,
    keys: usize,
    max_running: Option<u32>,
) -> anyhow::Result<(f64, f64)> {
    let (mut rates, mut writer_micros) = (Vec::new(), Vec::new());
    for _ in 0..args.samples.min(3) {
        let mut bench = start(args, compiled, CONCURRENCY, Durability::Process).await?;
        if max_running.is_some() {
            let limited = PluginResources {
                max_running,
                ..PluginResources::default()
            };
            bench
                .storage
                .set_plugin_resources("echo", limited, 0)
                .await?;
        }
        let queue = std::sync::Arc::new(bench.queue);
        let before = bench.storage.writer_stats();
        let began = Instant::now();
        let submitters: Vec<_> = (0..args.jobs)
            .map(|i| {
                let spec = match keys {
                    0 => spec(1),
                    keys => keyed(format!("k{}", i % keys)),
                };
                let queue = queue.clone();
                tokio::spawn(async move { queue.enqueue(spec).await })
            })
            .collect();
        for submitter in submitters {
            submitter.await??;
        }
        completions(&mut bench.events, bench.storage.as_ref(), args.jobs).await?;
        rates.push(args.jobs as f64 / began.elapsed().as_secs_f64());
        let busy = bench.storage.writer_stats().since(before).busy;
        writer_micros.push(busy.as_secs_f64() * 1e6 / args.jobs as f64);
        if let Ok(queue) = std::sync::Arc::try_unwrap(queue) {
            let _ = queue.shutdown(Duration::from_secs(5)).await;
        }
    }
    Ok((median(&mut rates), median(&mut writer_micros)))
}
