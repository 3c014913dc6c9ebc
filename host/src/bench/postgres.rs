//! PostgreSQL scenarios: trivial jobs through the queue on 1, 2 and 3 hosts
//! sharing one database (in this process, each with its own store, runtime
//! and queue), with the CPU PostgreSQL and jobhost took; and a forced
//! cancel sent to one host for a phase running on another.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::BenchArgs;
use super::queue::{SharedCache, completions, spec_with, start_on, trivial_payload};
use super::stats::{median, millis, percentile};
use jobhost::model::{EventKind, JobSpec, PhaseSpec};
use jobhost::queue::{Cancelled, Queue};
use jobhost::storage::{Durability, PgOptions, Storage, WriterStats};

/// Concurrency of each host.
const CONCURRENCY: usize = 64;
const CANCEL_SAMPLES: usize = 30;

/// A database of the benchmark's own on the server `args.database_url`
/// names, dropped with it.
struct Database {
    admin: tokio_postgres::Client,
    name: String,
    url: String,
}

impl Database {
    async fn create(args: &BenchArgs) -> anyhow::Result<Database> {
        let (admin, connection) =
            tokio_postgres::connect(&args.database_url, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        let name = format!("jobhost_bench_{}", uuid::Uuid::now_v7().simple());
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await?;
        let (server, _) = args
            .database_url
            .rsplit_once('/')
            .ok_or_else(|| anyhow::anyhow!("--database-url has no database"))?;
        let url = format!("{server}/{name}");
        Ok(Database { admin, name, url })
    }

    async fn drop(self) -> anyhow::Result<()> {
        self.admin
            .batch_execute(&format!("DROP DATABASE {} WITH (FORCE)", self.name))
            .await?;
        Ok(())
    }
}

/// `hosts` queues on one fresh database; the first uploaded `echo`.
async fn hosts(
    args: &BenchArgs,
    compiled: &SharedCache,
    database: &Database,
    hosts: usize,
    durability: Durability,
) -> anyhow::Result<Vec<(Queue, Arc<Storage>, jobhost::events::Subscription)>> {
    let mut started = Vec::new();
    for host in 0..hosts {
        let options = PgOptions {
            slots: CONCURRENCY as u32,
            durability,
            ..PgOptions::new(database.url.clone())
        };
        let storage = jobhost::storage::open_postgres(&options).await?;
        let (queue, events) =
            start_on(args, compiled, storage.clone(), CONCURRENCY, host == 0).await?;
        started.push((queue, storage, events));
    }
    Ok(started)
}

/// CPU seconds used so far by every process named `postgres`, and by this
/// one.
fn cpu_seconds() -> (f64, f64) {
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let of = |stat: &str| -> Option<(String, f64)> {
        // comm is in parentheses and may hold spaces: split after it.
        let (head, tail) = stat.rsplit_once(')')?;
        let comm = head.split_once('(')?.1.to_owned();
        let fields: Vec<&str> = tail.split_whitespace().collect();
        let used = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
        Some((comm, used / ticks))
    };
    let mut postgres = 0.0;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if let Ok(stat) = std::fs::read_to_string(entry.path().join("stat"))
            && let Some((comm, used)) = of(&stat)
            && comm == "postgres"
        {
            postgres += used;
        }
    }
    let own = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| of(&stat))
        .map_or(0.0, |(_, used)| used);
    (postgres, own)
}

/// What one sample measured.
#[derive(Clone, Copy)]
struct Sample {
    jobs_per_second: f64,
    /// The machine's CPU share PostgreSQL's processes took meanwhile.
    postgres_cpu: f64,
    /// And this process's.
    jobhost_cpu: f64,
    /// The hosts' write transactions, summed.
    writes: WriterStats,
}

/// One sample on a database of its own (dropped after, whatever the
/// outcome).
async fn sample(
    args: &BenchArgs,
    compiled: &SharedCache,
    count: usize,
    phases: usize,
    durability: Durability,
) -> anyhow::Result<Sample> {
    let database = Database::create(args).await?;
    let measured = measure(args, compiled, &database, count, phases, durability).await;
    database.drop().await?;
    measured
}

async fn measure(
    args: &BenchArgs,
    compiled: &SharedCache,
    database: &Database,
    count: usize,
    phases: usize,
    durability: Durability,
) -> anyhow::Result<Sample> {
    let mut started = hosts(args, compiled, database, count, durability).await?;
    let writes_before = writer_stats(&started);
    let (cpu_before, started_at) = (cpu_seconds(), Instant::now());
    let submissions = (0..args.jobs).map(|n| {
        let queue = &started[n % count].0;
        queue.enqueue(spec_with(phases, &trivial_payload()))
    });
    for outcome in futures::future::join_all(submissions).await {
        outcome?;
    }
    let (_, storage, events) = &mut started[0];
    completions(events, storage.as_ref(), args.jobs).await?;
    let elapsed = started_at.elapsed().as_secs_f64();
    let cpu_after = cpu_seconds();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let share = |before: f64, after: f64| (after - before) / (elapsed * cores);
    let result = Sample {
        jobs_per_second: args.jobs as f64 / elapsed,
        postgres_cpu: share(cpu_before.0, cpu_after.0),
        jobhost_cpu: share(cpu_before.1, cpu_after.1),
        writes: writer_stats(&started).since(writes_before),
    };
    stop(started).await;
    Ok(result)
}

/// The write transactions of every host so far.
fn writer_stats(hosts: &[(Queue, Arc<Storage>, jobhost::events::Subscription)]) -> WriterStats {
    (hosts.iter()).fold(WriterStats::default(), |sum, (_, storage, _)| {
        sum + storage.writer_stats()
    })
}

async fn stop(hosts: Vec<(Queue, Arc<Storage>, jobhost::events::Subscription)>) {
    for (queue, storage, _) in hosts {
        let _ = queue.shutdown(Duration::from_secs(5)).await;
        storage.close().await;
    }
}

pub async fn postgres_throughput(args: &BenchArgs) -> anyhow::Result<()> {
    let compiled = SharedCache::new()?;
    println!(
        "## PostgreSQL: {} trivial `echo` jobs submitted round-robin to each host, until the last completes; concurrency {CONCURRENCY} per host",
        args.jobs
    );
    println!(
        "| durability | hosts | phases | jobs/s | PostgreSQL CPU | jobhost CPU | write transactions per job | writes per transaction | ms per transaction |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let runs = [
        (Durability::Process, 1, 1),
        (Durability::Full, 1, 1),
        (Durability::Process, 1, 3),
        (Durability::Process, 2, 1),
        (Durability::Process, 3, 1),
    ];
    for (durability, count, phases) in runs {
        let mut samples = Vec::new();
        for _ in 0..args.samples.min(3) {
            samples.push(sample(args, &compiled, count, phases, durability).await?);
        }
        samples.sort_by(|a, b| a.jobs_per_second.total_cmp(&b.jobs_per_second));
        let median = samples[samples.len() / 2];
        let writes = median.writes;
        println!(
            "| {durability:?} | {count} | {phases} | {:.0} | {:.0}% | {:.0}% | {:.2} | {:.1} | {:.2} |",
            median.jobs_per_second,
            median.postgres_cpu * 100.0,
            median.jobhost_cpu * 100.0,
            writes.commits as f64 / args.jobs as f64,
            writes.writes_per_commit(),
            writes.micros_per_commit() / 1000.0,
        );
    }
    cancel_across_hosts(args, &compiled).await
}

/// A forced cancel sent to host A for a phase that never yields, running
/// on host B: from the call until it answers that the job is cancelled
/// (B stopped the phase and recorded it, and A read that in the log).
async fn cancel_across_hosts(args: &BenchArgs, compiled: &SharedCache) -> anyhow::Result<()> {
    let database = Database::create(args).await?;
    let measured = cancels(args, compiled, &database).await;
    database.drop().await?;
    let mut latencies = measured?;
    println!();
    println!(
        "## Forced cancel across hosts: sent to host A for a phase that never yields on host B, until A answers it is cancelled ({CANCEL_SAMPLES} samples)"
    );
    println!("| p50 | p99 | epoch tick |");
    println!("|---:|---:|---:|");
    println!(
        "| {:.1} ms | {:.1} ms | 10 ms |",
        median(&mut latencies),
        percentile(&mut latencies, 99.0)
    );
    Ok(())
}

/// The cancel latencies, in ms.
async fn cancels(
    args: &BenchArgs,
    compiled: &SharedCache,
    database: &Database,
) -> anyhow::Result<Vec<f64>> {
    let mut started = hosts(args, compiled, database, 2, Durability::Process).await?;
    // Stored through the first host's store; the other loads it from the
    // database when it first runs it (compiled before the timing below).
    let spin = std::fs::read(args.plugins.join("spin.wasm"))?;
    store_plugin(&started[0].1, "spin", spin).await?;
    let mut latencies = Vec::new();
    for _ in 0..CANCEL_SAMPLES + 1 {
        let spec = JobSpec {
            phases: vec![PhaseSpec {
                name: "forever".into(),
                plugin: "spin".into(),
                ..PhaseSpec::default()
            }],
            ..JobSpec::default()
        };
        // Submitted to B with a free worker: B claims it in the same write.
        let (b, b_events) = {
            let (queue, _, events) = &mut started[1];
            (&*queue, events)
        };
        let job = b.enqueue(spec).await?.job;
        loop {
            let event = b_events.recv().await?;
            if event.kind() == EventKind::PhaseStarted && event.job_id.as_deref() == Some(&job.id) {
                break;
            }
        }
        let sent = Instant::now();
        let cancelled = started[0].0.cancel(&job.id).await?;
        latencies.push(millis(sent.elapsed()));
        anyhow::ensure!(
            cancelled == Cancelled::Done,
            "cancel answered {cancelled:?}"
        );
    }
    // The first sample compiled `spin` on B.
    latencies.remove(0);
    stop(started).await;
    Ok(latencies)
}

/// Stores a component as a plugin's first (active) version, as an upload
/// would after validating it.
async fn store_plugin(
    storage: &Arc<Storage>,
    name: &str,
    component: Vec<u8>,
) -> anyhow::Result<()> {
    let new = jobhost::storage::NewPluginVersion {
        name: name.into(),
        version: "1.0.0".into(),
        content_hash: jobhost::runtime::content_hash(&component),
        description: String::new(),
        component,
        quota: Default::default(),
    };
    storage.put_plugin_version(new, 0).await?;
    Ok(())
}
