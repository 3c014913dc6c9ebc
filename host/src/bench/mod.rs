//! `jobhost bench`: benchmark scenarios that print figures (medians of
//! repeated samples, and ratios against a baseline measured in the same run),
//! never assert on time. Run with `./bench.sh` (a release build).

mod baseline;
mod clients;
mod fairness;
mod fanout;
mod hotswap;
mod http;
mod postgres;
mod queue;
mod runtime;
mod server;
mod startup;
mod stats;
mod watchers;

use std::path::PathBuf;

use clap::{Args, ValueEnum};

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Directory holding the built plugin components.
    #[arg(long, default_value = "plugins/target/wasm32-wasip2/release")]
    pub plugins: PathBuf,
    /// Scenarios to run (default: all).
    #[arg(long, value_enum)]
    pub only: Vec<Scenario>,
    /// Samples per figure; the median is printed.
    #[arg(long, default_value_t = 7, value_parser = at_least_one())]
    pub samples: usize,
    /// Jobs per throughput sample (queue and HTTP scenarios).
    #[arg(long, default_value_t = 2000, value_parser = at_least_one())]
    pub jobs: usize,
    /// The PostgreSQL server the `postgres` scenario creates its databases
    /// on (and drops them after), as a URL to a database it may connect to.
    #[arg(
        long,
        env = "JOBHOST_BENCH_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub database_url: String,
}

/// A median of no samples is no figure.
fn at_least_one() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::new().range(1..)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// Instantiate + run a trivial phase, beside raw wasmtime.
    PhaseOverhead,
    /// A CPU-bound phase with and without epoch interruption.
    EpochOverhead,
    /// Time from cancel to return for a guest that never yields.
    CancelLatency,
    /// Loading a plugin: compiling, and reusing the cached artifact.
    Load,
    /// Trivial jobs through the durable queue, beside raw SQLite.
    QueueThroughput,
    /// Enqueue → completed at low load.
    QueueLatency,
    /// A small concurrency key's waits beside another key's backlog, and
    /// what keys and per-plugin limits cost.
    Fairness,
    /// The queue through the HTTP API and SSE, beside the library.
    HttpThroughput,
    /// Loading 50 stored plugin versions, with and without the artifact cache.
    Startup,
    /// 1,000 SSE clients each receiving every completion: delivery rate,
    /// delay, server memory, job throughput.
    SseFanout,
    /// 10,000 SSE clients each watching a job of its own (5 per `--jobs`):
    /// delivery delay, server memory, job throughput beside them.
    SseWatchers,
    /// Activating a new plugin version while jobs stream in.
    HotSwap,
    /// The queue on PostgreSQL: 1, 2 and 3 hosts on one database, and a
    /// forced cancel across hosts. Not in the default set: it needs a
    /// server (`--database-url`).
    Postgres,
}

pub async fn bench(args: BenchArgs) -> anyhow::Result<i32> {
    let all = [
        Scenario::PhaseOverhead,
        Scenario::EpochOverhead,
        Scenario::CancelLatency,
        Scenario::Load,
        Scenario::QueueThroughput,
        Scenario::QueueLatency,
        Scenario::Fairness,
        Scenario::HttpThroughput,
        Scenario::Startup,
        Scenario::SseFanout,
        Scenario::SseWatchers,
        Scenario::HotSwap,
    ];
    let scenarios = if args.only.is_empty() {
        all.to_vec()
    } else {
        args.only.clone()
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "# jobhost bench: {cores} cores, {} samples per figure (medians)\n",
        args.samples
    );
    for scenario in scenarios {
        match scenario {
            Scenario::PhaseOverhead => runtime::phase_overhead(&args).await?,
            Scenario::EpochOverhead => runtime::epoch_overhead(&args).await?,
            Scenario::CancelLatency => runtime::cancel_latency(&args).await?,
            Scenario::Load => runtime::plugin_load(&args).await?,
            Scenario::QueueThroughput => queue::queue_throughput(&args).await?,
            Scenario::QueueLatency => queue::queue_latency(&args).await?,
            Scenario::Fairness => fairness::fairness(&args).await?,
            Scenario::HttpThroughput => http::http_throughput(&args).await?,
            Scenario::Startup => startup::startup(&args).await?,
            Scenario::SseFanout => fanout::sse_fanout(&args).await?,
            Scenario::SseWatchers => watchers::sse_watchers(&args).await?,
            Scenario::HotSwap => hotswap::hot_swap(&args).await?,
            Scenario::Postgres => postgres::postgres_throughput(&args).await?,
        }
        println!();
    }
    Ok(0)
}
