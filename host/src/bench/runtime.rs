//! Runtime scenarios: phase overhead, epoch-interruption overhead,
//! forced-cancel latency, and plugin load time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use super::BenchArgs;
use super::baseline::{RawPooling, RawWasmtime};
use super::stats::{median, micros, millis, percentile};
use jobhost::runtime::{LoadedPlugin, PhaseRun, Runtime, RuntimeConfig};

/// Runs per sample of the trivial-phase figures.
const TRIVIAL_RUNS: usize = 400;
/// Work for the CPU-bound phase: about 150 ms here.
const BUSY_CONFIG: &str = r#"{"iterations": 100000000}"#;
const CANCEL_SAMPLES: usize = 60;

fn component(args: &BenchArgs, file: &str) -> anyhow::Result<Vec<u8>> {
    let path = args.plugins.join(file);
    std::fs::read(&path).with_context(|| {
        format!(
            "reading {} (build the plugins first: see ./bench.sh)",
            path.display()
        )
    })
}

fn runtime(max_concurrent_runs: u32) -> anyhow::Result<Arc<Runtime>> {
    Ok(Arc::new(Runtime::new(RuntimeConfig {
        max_concurrent_runs,
        ..RuntimeConfig::default()
    })?))
}

async fn load_plugin(runtime: &Runtime, wasm: &[u8]) -> anyhow::Result<Arc<LoadedPlugin>> {
    Ok(runtime.load(wasm, None).await?.plugin)
}

/// What the phase-overhead scenario runs the trivial phase on.
#[derive(Clone)]
enum Subject {
    Jobhost(Arc<Runtime>, Arc<LoadedPlugin>),
    Raw(Arc<RawWasmtime>),
}

impl Subject {
    async fn runs(&self, runs: usize) -> anyhow::Result<()> {
        for _ in 0..runs {
            match self {
                Subject::Jobhost(runtime, plugin) => {
                    runtime
                        .run(plugin, PhaseRun::new("{}"))
                        .await
                        .outcome
                        .map_err(anyhow::Error::from)?;
                }
                Subject::Raw(raw) => {
                    raw.call("{}", "{}").await?;
                }
            }
        }
        Ok(())
    }

    /// µs per run on one task, and runs/s with two tasks (one per core).
    async fn sample(&self) -> anyhow::Result<(f64, f64)> {
        let t = Instant::now();
        self.runs(TRIVIAL_RUNS).await?;
        let per_run = micros(t.elapsed()) / TRIVIAL_RUNS as f64;
        let t = Instant::now();
        let tasks: Vec<_> = (0..2)
            .map(|_| {
                let subject = self.clone();
                tokio::spawn(async move { subject.runs(TRIVIAL_RUNS).await })
            })
            .collect();
        for task in tasks {
            task.await??;
        }
        Ok((
            per_run,
            2.0 * TRIVIAL_RUNS as f64 / t.elapsed().as_secs_f64(),
        ))
    }
}

pub async fn phase_overhead(args: &BenchArgs) -> anyhow::Result<()> {
    let wasm = component(args, "echo.wasm")?;
    let config = RuntimeConfig {
        max_concurrent_runs: 16,
        ..RuntimeConfig::default()
    };
    let runtime = Arc::new(Runtime::new(config.clone())?);
    let plugin = load_plugin(&runtime, &wasm).await?;
    let subjects = [
        Subject::Jobhost(runtime, plugin),
        Subject::Raw(Arc::new(RawWasmtime::new(
            &wasm,
            false,
            RawPooling::SameAs(Box::new(config.clone())),
        )?)),
        // What the guest's code pays to be interruptible (an epoch check
        // in each function and loop), apart from jobhost's own host code.
        Subject::Raw(Arc::new(RawWasmtime::new(
            &wasm,
            true,
            RawPooling::SameAs(Box::new(config)),
        )?)),
        Subject::Raw(Arc::new(RawWasmtime::new(
            &wasm,
            false,
            RawPooling::Defaults,
        )?)),
    ];
    for subject in &subjects {
        subject.runs(50).await?; // warm up
    }
    let mut per_run = vec![Vec::new(); subjects.len()];
    let mut per_second = vec![Vec::new(); subjects.len()];
    for _ in 0..args.samples {
        for (i, subject) in subjects.iter().enumerate() {
            let (us, rps) = subject.sample().await?;
            per_run[i].push(us);
            per_second[i].push(rps);
        }
    }
    let us: Vec<f64> = per_run.iter_mut().map(|s| median(s)).collect();
    let rps: Vec<f64> = per_second.iter_mut().map(|s| median(s)).collect();
    println!("## Phase overhead: fresh store + instantiate + run of `echo`");
    println!(
        "| | jobhost | raw wasmtime, jobhost's pooling settings | ratio | the same with epoch interruption | ratio | raw wasmtime, default pooling | ratio |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (label, figures, decimals) in [("µs per run, 1 task", us, 1), ("runs/s, 2 tasks", rps, 0)]
    {
        let [host, same, same_epochs, defaults] = figures[..] else {
            unreachable!("four subjects")
        };
        println!(
            "| {label} | {host:.decimals$} | {same:.decimals$} | {:.2} | {same_epochs:.decimals$} | {:.2} | {defaults:.decimals$} | {:.2} |",
            host / same,
            host / same_epochs,
            host / defaults
        );
    }
    Ok(())
}

pub async fn epoch_overhead(args: &BenchArgs) -> anyhow::Result<()> {
    let wasm = component(args, "busy.wasm")?;
    let runtime = runtime(2)?;
    let plugin = load_plugin(&runtime, &wasm).await?;
    let raw_off = RawWasmtime::new(&wasm, false, RawPooling::Defaults)?;
    let raw_on = RawWasmtime::new(&wasm, true, RawPooling::Defaults)?;
    let (mut off, mut on, mut host, mut stormed) = (vec![], vec![], vec![], vec![]);
    let busy_run = || {
        let mut run = PhaseRun::new("{}");
        run.config = BUSY_CONFIG.into();
        run
    };
    for _ in 0..args.samples {
        let t = Instant::now();
        raw_off.call(BUSY_CONFIG, "{}").await?;
        off.push(millis(t.elapsed()));
        let t = Instant::now();
        raw_on.call(BUSY_CONFIG, "{}").await?;
        on.push(millis(t.elapsed()));
        let t = Instant::now();
        runtime
            .run(&plugin, busy_run())
            .await
            .outcome
            .map_err(anyhow::Error::from)?;
        host.push(millis(t.elapsed()));
        // Other runs stopped 1,000 times a second: each stop interrupts all
        // guest code once (`Runtime::interrupt_guests`).
        let storm = {
            let runtime = runtime.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(Duration::from_millis(1));
                loop {
                    every.tick().await;
                    runtime.interrupt_guests();
                }
            })
        };
        let t = Instant::now();
        let busy = runtime.run(&plugin, busy_run()).await;
        stormed.push(millis(t.elapsed()));
        storm.abort();
        busy.outcome.map_err(anyhow::Error::from)?;
    }
    let (off, on, host) = (median(&mut off), median(&mut on), median(&mut host));
    let stormed = median(&mut stormed);
    println!("## Epoch interruption on a CPU-bound phase (`busy`, {BUSY_CONFIG})");
    println!("| | ms | ratio to raw, interruption off |\n|---|---:|---:|");
    println!("| raw wasmtime, interruption off | {off:.1} | 1.00 |");
    println!(
        "| raw wasmtime, interruption on (10 ms ticks, yield) | {on:.1} | {:.3} |",
        on / off
    );
    println!(
        "| jobhost (interruption, limits, capture) | {host:.1} | {:.3} |",
        host / off
    );
    println!(
        "| jobhost, while 1,000 stops a second interrupt guest code | {stormed:.1} | {:.3} |",
        stormed / off
    );
    Ok(())
}

pub async fn cancel_latency(args: &BenchArgs) -> anyhow::Result<()> {
    let wasm = component(args, "spin.wasm")?;
    let runtime = runtime(2)?;
    let plugin = load_plugin(&runtime, &wasm).await?;
    let tick = runtime.config().epoch_tick;
    let mut latencies = Vec::with_capacity(CANCEL_SAMPLES);
    for i in 0..CANCEL_SAMPLES {
        let run = PhaseRun::new("{}");
        let cancel = run.cancel.clone();
        let (running, plugin) = (runtime.clone(), plugin.clone());
        let task = tokio::spawn(async move { running.run(&plugin, run).await });
        // Cancel at varying points within a tick, after the guest is spinning.
        tokio::time::sleep(Duration::from_millis(30) + tick.mul_f64((i % 10) as f64 / 10.0)).await;
        // As the queue stops a run: cancel, then interrupt guest code.
        let cancelled_at = Instant::now();
        cancel.cancel();
        runtime.interrupt_guests();
        let result = task.await?;
        latencies.push(millis(cancelled_at.elapsed()));
        anyhow::ensure!(result.outcome.is_err(), "spin returned");
    }
    let tick_ms = millis(tick);
    println!(
        "## Forced cancel of `spin` (never yields), {CANCEL_SAMPLES} samples, tick {tick_ms} ms"
    );
    println!("| | ms | ticks |\n|---|---:|---:|");
    for (label, p) in [("p50", 50.0), ("p99", 99.0), ("max", 100.0)] {
        let ms = percentile(&mut latencies, p);
        println!("| {label} | {ms:.2} | {:.2} |", ms / tick_ms);
    }
    Ok(())
}

pub async fn plugin_load(args: &BenchArgs) -> anyhow::Result<()> {
    let wasm = component(args, "csv_parse.wasm")?;
    let cache = tempfile::tempdir()?;
    let cached_runtime = || {
        Runtime::new(RuntimeConfig {
            max_concurrent_runs: 1,
            cache_dir: Some(cache.path().to_path_buf()),
            ..RuntimeConfig::default()
        })
    };
    // Fills the cache, so that every sample below reuses the artifact, as a
    // server would with the digest it recorded.
    let digest = cached_runtime()?.load(&wasm, None).await?.artifact_digest;
    let (mut compile, mut cached) = (vec![], vec![]);
    for _ in 0..args.samples {
        let runtime = Runtime::new(RuntimeConfig {
            max_concurrent_runs: 1,
            ..RuntimeConfig::default()
        })?;
        let t = Instant::now();
        load_plugin(&runtime, &wasm).await?;
        compile.push(millis(t.elapsed()));

        let warm = cached_runtime()?;
        let t = Instant::now();
        warm.load(&wasm, digest.as_deref()).await?;
        cached.push(millis(t.elapsed()));
        anyhow::ensure!(
            warm.cache_stats().reused == 1,
            "the cached artifact was not reused"
        );
    }
    println!(
        "## Loading `csv-parse` ({} KB): validate, compile or reuse, pre-instantiate, describe()",
        wasm.len() / 1000
    );
    println!("| | ms |\n|---|---:|");
    println!("| compile (no cache) | {:.1} |", median(&mut compile));
    println!("| cached artifact | {:.2} |", median(&mut cached));
    Ok(())
}
