//! Start-up: time to load 50 stored plugin versions (what `jobhost serve`
//! does before it is ready), compiling each, or reading the compiled-artifact
//! cache.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;

use super::BenchArgs;
use super::stats::{median, millis};
use jobhost::plugins::PluginRegistry;
use jobhost::runtime::{Runtime, RuntimeConfig};
use jobhost::storage::Durability;

const VERSIONS: usize = 50;

async fn preload(
    db: &std::path::Path,
    cache: Option<std::path::PathBuf>,
) -> anyhow::Result<(f64, usize)> {
    let started = Instant::now();
    let storage = jobhost::storage::open_sqlite(db, Durability::Process)?;
    let runtime = Arc::new(Runtime::new(RuntimeConfig {
        cache_dir: cache,
        ..RuntimeConfig::default()
    })?);
    let loaded = PluginRegistry::new(runtime, storage.clone())
        .preload()
        .await?;
    let elapsed = millis(started.elapsed());
    storage.close().await;
    Ok((elapsed, loaded))
}

pub async fn startup(args: &BenchArgs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("startup.db");
    let cache = dir.path().join("compiled");
    // Distinct components, so that every version compiles on its own.
    let files = ["echo", "csv_parse", "aggregate", "render_report", "sleep"];
    {
        let storage = jobhost::storage::open_sqlite(&db, Durability::Process)?;
        let runtime = Arc::new(Runtime::new(RuntimeConfig {
            cache_dir: Some(cache.clone()),
            ..RuntimeConfig::default()
        })?);
        let registry = PluginRegistry::new(runtime, storage.clone());
        for n in 0..VERSIONS {
            let file = files[n % files.len()];
            let wasm = std::fs::read(args.plugins.join(format!("{file}.wasm")))
                .context("reading plugins (see ./bench.sh)")?;
            registry
                .upload(file, &format!("{}.0.0", n / files.len() + 1), wasm)
                .await?;
        }
        storage.close().await;
    }
    let (mut cold, mut warm) = (vec![], vec![]);
    for _ in 0..args.samples.min(3) {
        let (ms, loaded) = preload(&db, None).await?;
        anyhow::ensure!(loaded == VERSIONS, "loaded {loaded} versions");
        cold.push(ms);
        warm.push(preload(&db, Some(cache.clone())).await?.0);
    }
    let (cold, warm) = (median(&mut cold), median(&mut warm));
    println!(
        "## Start-up: open storage and load {VERSIONS} stored plugin versions (5 components, 10 versions each)"
    );
    println!("| | ms | ratio |\n|---|---:|---:|");
    println!("| compiling every version (no artifact cache) | {cold:.0} | 1.00 |");
    println!(
        "| from the compiled-artifact cache | {warm:.0} | {:.3} |",
        warm / cold
    );
    Ok(())
}
