//! Queue scenarios: end-to-end throughput of trivial jobs through the
//! durable queue (1 and 3 phases; concurrency 1, 8, 64; both durability
//! levels) beside raw SQLite lifecycle loops, and enqueue → `job:completed`
//! latency at low load.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rusqlite::params;
use serde_json::json;
use tokio::sync::broadcast;

use super::BenchArgs;
use super::stats::{median, micros, millis, percentile};
use jobhost::events::{Bus, Subscription};
use jobhost::model::EventKind;
use jobhost::model::json::Json;
use jobhost::model::{JobSpec, JobStatus, PhaseSpec};
use jobhost::plugins::PluginRegistry;
use jobhost::queue::{Queue, QueueConfig};
use jobhost::runtime::{Runtime, RuntimeConfig};
use jobhost::storage::{Durability, Storage, WriterStats};

const LATENCY_SAMPLES: usize = 100;
/// Syncs timed for the full-durability latency's comparison.
const FSYNC_SAMPLES: usize = 50;
/// Jobs scheduled for later in the last latency measurement.
const SCHEDULED_LATER: usize = 20_000;
/// The batched raw loop: jobs inserted per transaction, and jobs moved
/// through each later step per transaction (the "limit" loop).
const RAW_INSERT_BATCH: usize = 100;
const RAW_STEP_BATCH: usize = 64;
/// Rows in the bigger payload: about 14 KB of JSON.
const PAYLOAD_ROWS: usize = 250;

pub(super) struct Bench {
    pub queue: Queue,
    pub storage: Arc<Storage>,
    pub events: Subscription,
    _dir: tempfile::TempDir,
}

/// A throughput figure, with how busy the storage writer was meanwhile.
#[derive(Debug, Clone, Copy)]
pub(super) struct Throughput {
    pub jobs_per_second: f64,
    /// Fraction of the wall time the writer thread was busy.
    pub writer_busy: f64,
    pub writer_micros_per_job: f64,
    pub writes_per_commit: f64,
}

/// The compiled-artifact cache shared by the samples of a scenario, each on
/// a fresh database, so that only the first compiles `echo`: the digest of
/// its artifact is recorded in each new database, as a server keeps it.
pub(super) struct SharedCache {
    dir: tempfile::TempDir,
    /// (content hash, engine key, artifact digest) once compiled.
    recorded: std::sync::Mutex<Option<(String, String, String)>>,
}

impl SharedCache {
    pub(super) fn new() -> anyhow::Result<Self> {
        Ok(SharedCache {
            dir: tempfile::tempdir()?,
            recorded: std::sync::Mutex::default(),
        })
    }
}

/// A queue on a fresh SQLite database, sharing `compiled` with the other
/// samples.
pub(super) async fn start(
    args: &BenchArgs,
    compiled: &SharedCache,
    concurrency: usize,
    durability: Durability,
) -> anyhow::Result<Bench> {
    let dir = tempfile::tempdir()?;
    let storage = jobhost::storage::open_sqlite(&dir.path().join("bench.db"), durability)?;
    let (queue, events) = start_on(args, compiled, storage.clone(), concurrency, true).await?;
    Ok(Bench {
        queue,
        storage,
        events,
        _dir: dir,
    })
}

/// A queue on `storage`, uploading `echo` if `upload` (the first host on a
/// database), with a subscription to its bus.
pub(super) async fn start_on(
    args: &BenchArgs,
    compiled: &SharedCache,
    storage: Arc<Storage>,
    concurrency: usize,
    upload: bool,
) -> anyhow::Result<(Queue, Subscription)> {
    let bus = Bus::default();
    let events = bus.subscribe();
    let runtime = Arc::new(Runtime::new(RuntimeConfig {
        max_concurrent_runs: concurrency as u32 + 1,
        cache_dir: Some(compiled.dir.path().to_path_buf()),
        ..RuntimeConfig::default()
    })?);
    let recorded = compiled.recorded.lock().unwrap().clone();
    if let Some((hash, engine, digest)) = recorded {
        storage.record_artifact(&hash, &engine, &digest).await?;
    }
    let engine = runtime.engine_key().to_owned();
    let plugins = Arc::new(PluginRegistry::new(runtime, storage.clone()));
    let echo = std::fs::read(args.plugins.join("echo.wasm"))
        .context("reading echo.wasm (see ./bench.sh)")?;
    let hash = jobhost::runtime::content_hash(&echo);
    if upload {
        plugins.upload("echo", "1.0.0", echo).await?;
    }
    plugins.load("echo", "1.0.0").await?;
    if let Some(digest) = storage.artifact_digest(&hash, &engine).await? {
        *compiled.recorded.lock().unwrap() = Some((hash, engine, digest));
    }
    let config = QueueConfig {
        concurrency,
        retention: None,
        ..QueueConfig::default()
    };
    let (queue, _) = Queue::start(storage.clone(), plugins, bus, config).await?;
    Ok((queue, events))
}

/// A job of `phases` `echo` phases with a trivial payload.
pub(super) fn spec(phases: usize) -> JobSpec {
    spec_with(phases, &trivial_payload())
}

pub(super) fn spec_with(phases: usize, payload: &Json) -> JobSpec {
    JobSpec {
        phases: (0..phases)
            .map(|i| PhaseSpec {
                name: format!("p{i}"),
                plugin: "echo".into(),
                ..PhaseSpec::default()
            })
            .collect(),
        payload: payload.clone(),
        ..JobSpec::default()
    }
}

pub(super) fn trivial_payload() -> Json {
    Json::from_value(&json!({"n": 1}))
}

/// A payload of `rows` table rows, about 57 bytes of JSON each.
fn rows_payload(rows: usize) -> Json {
    let rows: Vec<_> = (0..rows)
        .map(|i| json!({"id": i, "name": format!("item {i}"), "price": 1.5, "tags": ["a", "b"]}))
        .collect();
    Json::from_value(&json!({ "rows": rows }))
}

/// Waits until `count` jobs of this (fresh) queue have completed, seen on
/// the bus. A receiver that lags behind the bus misses events; from then on
/// each completion it does see is checked against storage instead.
pub(super) async fn completions(
    events: &mut Subscription,
    storage: &Storage,
    count: usize,
) -> anyhow::Result<()> {
    let (mut seen, mut lagged) = (0, false);
    loop {
        match events.recv().await {
            Ok(event) if event.kind() == EventKind::JobCompleted => {
                seen += 1;
                if seen >= count {
                    return Ok(());
                }
                if lagged {
                    let counts = storage.job_counts().await?;
                    let completed = counts
                        .iter()
                        .find(|(status, _)| *status == JobStatus::Completed)
                        .map_or(0, |(_, n)| *n as usize);
                    if completed >= count {
                        return Ok(());
                    }
                }
            }
            Ok(_) => {}
            Err(broadcast::error::RecvError::Lagged(_)) => lagged = true,
            Err(e) => anyhow::bail!("event bus: {e}"),
        }
    }
}

/// Jobs per second: `args.jobs` jobs submitted by concurrent clients, until
/// the last completes (the sample with the median rate).
pub(super) async fn throughput(
    args: &BenchArgs,
    compiled: &SharedCache,
    phases: usize,
    concurrency: usize,
    durability: Durability,
    payload: &Json,
) -> anyhow::Result<Throughput> {
    let mut samples = Vec::new();
    for _ in 0..args.samples.min(3) {
        let mut bench = start(args, compiled, concurrency, durability).await?;
        let queue = Arc::new(bench.queue);
        let before = bench.storage.writer_stats();
        let started = Instant::now();
        let submitters: Vec<_> = (0..args.jobs)
            .map(|_| {
                let (queue, spec) = (queue.clone(), spec_with(phases, payload));
                tokio::spawn(async move { queue.enqueue(spec).await })
            })
            .collect();
        for submitter in submitters {
            submitter.await??;
        }
        completions(&mut bench.events, bench.storage.as_ref(), args.jobs).await?;
        let elapsed = started.elapsed();
        let writer = bench.storage.writer_stats().since(before);
        let busy = writer.busy.as_secs_f64();
        samples.push(Throughput {
            jobs_per_second: args.jobs as f64 / elapsed.as_secs_f64(),
            writer_busy: busy / elapsed.as_secs_f64(),
            writer_micros_per_job: busy * 1e6 / args.jobs as f64,
            writes_per_commit: writer.writes_per_commit(),
        });
        if let Ok(queue) = Arc::try_unwrap(queue) {
            let _ = queue.shutdown(Duration::from_secs(5)).await;
        }
    }
    samples.sort_by(|a, b| a.jobs_per_second.total_cmp(&b.jobs_per_second));
    Ok(samples[samples.len() / 2])
}

/// The storage limit: the same lifecycle as the queue (insert the job, its
/// phases and `job:created`; claim it; start and complete each phase; complete
/// the job, each step with its event row) as plain rusqlite statements on
/// jobhost's own schema, on one connection: no wasm, no async, no event bus.
/// Jobs are inserted `insert_batch` per transaction, and each later step
/// moves `step_batch` jobs per transaction: (1, 1) is one transaction per
/// transition, like an unbatched queue; larger batches approach SQLite's
/// limit for this data model.
fn raw_sqlite(
    jobs: usize,
    phases: usize,
    durability: Durability,
    insert_batch: usize,
    step_batch: usize,
) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir()?;
    let mut conn = rusqlite::Connection::open(dir.path().join("raw.db"))?;
    conn.pragma_update(None, "journal_mode", "wal")?;
    let sync = if durability == Durability::Full {
        "full"
    } else {
        "normal"
    };
    conn.pragma_update(None, "synchronous", sync)?;
    jobhost::storage::sqlite::migrate(&mut conn)?;
    conn.execute(
        "INSERT INTO plugins (name, active_version, created_at) VALUES ('echo', '1.0.0', 0)",
        [],
    )?;
    let ids: Vec<String> = (0..jobs)
        .map(|_| uuid::Uuid::now_v7().to_string())
        .collect();
    let started = Instant::now();
    for chunk in ids.chunks(insert_batch) {
        let tx = conn.transaction()?;
        for id in chunk {
            tx.prepare_cached(
                "INSERT INTO jobs (id, status, payload, priority, run_at, max_attempts, backoff, created_at)
                 VALUES (?1, 'pending', '{\"n\":1}', 0, 0, 3, '{}', 0)",
            )?
            .execute([id])?;
            for idx in 0..phases as i64 {
                tx.prepare_cached(
                    "INSERT INTO phases (job_id, idx, name, plugin, version, config, timeout_ms, status)
                     VALUES (?1, ?2, ?3, 'echo', '1.0.0', '{}', 60000, 'pending')",
                )?
                .execute(params![id, idx, format!("p{idx}")])?;
            }
            event(&tx, "job:created", id)?;
        }
        tx.commit()?;
    }
    for _ in ids.chunks(step_batch) {
        let tx = conn.transaction()?;
        let claimed: Vec<String> = tx
            .prepare_cached(
                "UPDATE jobs SET status = 'running', attempt = attempt + 1, started_at = 1
                 WHERE id IN (SELECT id FROM jobs INDEXED BY jobs_due
                              WHERE status = 'pending' AND concurrency_key IS NULL AND run_at <= 1
                              ORDER BY priority DESC, run_at, id LIMIT ?1)
                 RETURNING id",
            )?
            .query_map([step_batch as i64], |row| row.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        for id in &claimed {
            event(&tx, "job:started", id)?;
        }
        tx.commit()?;
        for idx in 0..phases as i64 {
            for status in ["running", "completed"] {
                let tx = conn.transaction()?;
                for id in &claimed {
                    tx.prepare_cached(
                        "UPDATE phases SET status = ?3, output = '{\"n\":1}', finished_at = 2
                         WHERE job_id = ?1 AND idx = ?2",
                    )?
                    .execute(params![id, idx, status])?;
                    event(&tx, "job:phase:completed", id)?;
                }
                tx.commit()?;
            }
        }
        let tx = conn.transaction()?;
        for id in &claimed {
            tx.prepare_cached(
                "UPDATE jobs SET status = 'completed', finished_at = 2 WHERE id = ?1",
            )?
            .execute([id])?;
            event(&tx, "job:completed", id)?;
        }
        tx.commit()?;
    }
    Ok(jobs as f64 / started.elapsed().as_secs_f64())
}

fn event(conn: &rusqlite::Connection, kind: &str, job: &str) -> rusqlite::Result<usize> {
    conn.prepare_cached(
        "INSERT INTO events (kind, job_id, at, data) VALUES (?1, ?2, 2, '{\"attempt\":1}')",
    )?
    .execute(params![kind, job])
}

pub async fn queue_throughput(args: &BenchArgs) -> anyhow::Result<()> {
    let jobs = args.jobs;
    println!(
        "## Queue throughput: {jobs} trivial `echo` jobs, submitted concurrently, until the last completes (jobs/s)"
    );
    println!(
        "| durability | phases | raw, per step | raw, batched | concurrency 1 | concurrency 8 | concurrency 64 | c64 / per step | c64 / batched |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let compiled = SharedCache::new()?;
    let trivial = trivial_payload();
    let mut writer = Vec::new();
    for durability in [Durability::Process, Durability::Full] {
        for phases in [1, 3] {
            let raw = |insert_batch, step_batch| -> anyhow::Result<f64> {
                let mut samples = (0..args.samples.min(3))
                    .map(|_| raw_sqlite(jobs, phases, durability, insert_batch, step_batch))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                Ok(median(&mut samples))
            };
            let per_step = raw(1, 1)?;
            let batched = raw(RAW_INSERT_BATCH, RAW_STEP_BATCH)?;
            let mut row = Vec::new();
            for concurrency in [1, 8, 64] {
                let sample = throughput(args, &compiled, phases, concurrency, durability, &trivial);
                row.push(sample.await?);
            }
            let c64 = row[2].jobs_per_second;
            println!(
                "| {durability:?} | {phases} | {per_step:.0} | {batched:.0} | {:.0} | {:.0} | {c64:.0} | {:.2} | {:.2} |",
                row[0].jobs_per_second,
                row[1].jobs_per_second,
                c64 / per_step,
                c64 / batched,
            );
            writer.push((durability, phases, row[2]));
        }
    }
    println!(
        "\nThe storage writer thread at concurrency 64 (it runs every transition, one batch at a time):"
    );
    println!(
        "| durability | phases | writer busy | writer µs per job | writes per commit |\n|---|---:|---:|---:|---:|"
    );
    for (durability, phases, t) in &writer {
        println!(
            "| {durability:?} | {phases} | {:.0}% | {:.0} | {:.1} |",
            t.writer_busy * 100.0,
            t.writer_micros_per_job,
            t.writes_per_commit
        );
    }

    // Real payloads are bigger than `{"n": 1}`: what a job carries should
    // cost the writer little more than storing it.
    let payload = rows_payload(PAYLOAD_ROWS);
    let big = throughput(args, &compiled, 1, 64, Durability::Process, &payload).await?;
    let (_, _, small) = writer[0];
    println!(
        "\n1-phase jobs at concurrency 64, process durability, with a payload of {PAYLOAD_ROWS} rows ({} bytes; `echo` returns it as its output), beside the trivial payload above:",
        payload.as_str().len()
    );
    println!("| payload | jobs/s | writer busy | writer µs per job |\n|---|---:|---:|---:|");
    for (name, t) in [("trivial", small), ("rows", big)] {
        println!(
            "| {name} | {:.0} | {:.0}% | {:.0} |",
            t.jobs_per_second,
            t.writer_busy * 100.0,
            t.writer_micros_per_job
        );
    }
    Ok(())
}

pub async fn queue_latency(args: &BenchArgs) -> anyhow::Result<()> {
    let compiled = SharedCache::new()?;
    let mut bench = start(args, &compiled, 8, Durability::Process).await?;
    let measured = latencies(&mut bench).await?;
    println!(
        "## Latency, enqueue → `job:completed`, one 1-phase job at a time ({LATENCY_SAMPLES} jobs)"
    );
    measured.print();

    // With full durability each commit waits for the disk: one sync of a
    // page on the same file system is what to set it beside.
    let mut full = start(args, &compiled, 8, Durability::Full).await?;
    let measured = latencies(&mut full).await?;
    println!(
        "\n## The same with full durability (one 4 KiB write + `fdatasync` here: {:.2} ms, median of {FSYNC_SAMPLES})",
        fsync_ms()?
    );
    measured.print();
    let _ = full.queue.shutdown(Duration::from_secs(5)).await;

    // Scheduling work ahead is common, and a search for due jobs that read
    // the scheduled ones would slow every enqueue and claim.
    for chunk in 0..SCHEDULED_LATER / 500 {
        let later = (0..500).map(|_| {
            bench.queue.enqueue(JobSpec {
                delay_ms: Some(3_600_000),
                ..spec(1)
            })
        });
        for job in futures::future::join_all(later).await {
            job.with_context(|| format!("scheduling batch {chunk}"))?;
        }
    }
    // Unread: the scheduled jobs' `job:created` events.
    bench.events = bench.queue.bus().subscribe();
    let measured = latencies(&mut bench).await?;
    println!("\n## The same with {SCHEDULED_LATER} jobs scheduled an hour ahead");
    measured.print();
    let _ = bench.queue.shutdown(Duration::from_secs(5)).await;
    Ok(())
}

/// The median time of a 4 KiB write and `fdatasync` of a file in the
/// temporary directory, where the benches keep their databases.
fn fsync_ms() -> anyhow::Result<f64> {
    use std::os::unix::fs::FileExt as _;
    let file = tempfile::tempfile()?;
    let page = [7u8; 4096];
    let mut times = Vec::with_capacity(FSYNC_SAMPLES);
    for _ in 0..FSYNC_SAMPLES {
        let started = Instant::now();
        file.write_all_at(&page, 0)?;
        file.sync_data()?;
        times.push(millis(started.elapsed()));
    }
    Ok(median(&mut times))
}

/// Enqueue → `job:completed` of jobs one at a time, and the storage
/// writer's share of it.
struct Latencies {
    ms: Vec<f64>,
    writer: WriterStats,
}

impl Latencies {
    fn print(mut self) {
        let jobs = self.ms.len() as f64;
        println!(
            "| p50 ms | p99 ms | max ms | writer µs per job | commits per job |\n\
             |---:|---:|---:|---:|---:|"
        );
        println!(
            "| {:.2} | {:.2} | {:.2} | {:.0} | {:.1} |",
            percentile(&mut self.ms, 50.0),
            percentile(&mut self.ms, 99.0),
            percentile(&mut self.ms, 100.0),
            micros(self.writer.busy) / jobs,
            self.writer.commits as f64 / jobs
        );
    }
}

/// Enqueue → `job:completed` of LATENCY_SAMPLES jobs, one at a time.
async fn latencies(bench: &mut Bench) -> anyhow::Result<Latencies> {
    let mut ms = Vec::with_capacity(LATENCY_SAMPLES);
    let before = bench.storage.writer_stats();
    for _ in 0..LATENCY_SAMPLES {
        let started = Instant::now();
        bench.queue.enqueue(spec(1)).await?;
        completions(&mut bench.events, bench.storage.as_ref(), 1).await?;
        ms.push(millis(started.elapsed()));
    }
    Ok(Latencies {
        ms,
        writer: bench.storage.writer_stats().since(before),
    })
}
