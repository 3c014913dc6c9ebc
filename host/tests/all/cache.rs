//! The compiled-artifact cache: a restart reuses it without recompiling
//! when the artifact still has the digest recorded for it; a changed,
//! foreign or unrecorded file is detected and recompiled, never loaded;
//! and nothing is written for a plugin that fails its checks.

use std::path::{Path, PathBuf};

use jobhost::runtime::{CacheStats, Runtime, RuntimeConfig};

use crate::{output, run, test_config};

fn runtime_with_cache(dir: &Path) -> Runtime {
    Runtime::new(RuntimeConfig {
        cache_dir: Some(dir.to_path_buf()),
        ..test_config()
    })
    .unwrap()
}

fn cached_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect()
}

fn cached_file(dir: &Path) -> PathBuf {
    let files = cached_files(dir);
    assert_eq!(files.len(), 1, "one artifact in {files:?}");
    files.into_iter().next().unwrap()
}

/// Loads echo on a fresh runtime over `dir`, trusting `digest`, checks it
/// runs; returns the stats and the digest to keep.
async fn load_and_run_echo(dir: &Path, digest: Option<&str>) -> (CacheStats, Option<String>) {
    let runtime = runtime_with_cache(dir);
    let loaded = runtime
        .load(&plugin_artifacts::bytes(plugin_artifacts::ECHO), digest)
        .await
        .unwrap();
    let echo = loaded.plugin;
    assert_eq!(output(&run(&runtime, &echo, "7", "{}").await)["payload"], 7);
    (runtime.cache_stats(), loaded.artifact_digest)
}

const COMPILED: CacheStats = CacheStats {
    compiled: 1,
    reused: 0,
    rejected: 0,
};
const REUSED: CacheStats = CacheStats {
    compiled: 0,
    reused: 1,
    rejected: 0,
};
const REJECTED: CacheStats = CacheStats {
    compiled: 1,
    reused: 0,
    rejected: 1,
};

#[tokio::test]
async fn restart_reuses_compiled_artifacts() {
    let dir = tempfile::tempdir().unwrap();
    let (stats, digest) = load_and_run_echo(dir.path(), None).await;
    assert_eq!(stats, COMPILED);
    let digest = digest.expect("a digest for the artifact written");
    let (stats, kept) = load_and_run_echo(dir.path(), Some(&digest)).await;
    assert_eq!(stats, REUSED);
    assert_eq!(kept.as_deref(), Some(digest.as_str()));
}

#[tokio::test]
async fn a_changed_artifact_is_recompiled() {
    let dir = tempfile::tempdir().unwrap();
    let (_, digest) = load_and_run_echo(dir.path(), None).await;
    let file = cached_file(dir.path());
    let mut bytes = std::fs::read(&file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&file, bytes).unwrap();

    let (stats, fresh) = load_and_run_echo(dir.path(), digest.as_deref()).await;
    assert_eq!(stats, REJECTED);
    // The recompiled artifact replaced the changed one, with its own digest.
    let (stats, _) = load_and_run_echo(dir.path(), fresh.as_deref()).await;
    assert_eq!(stats, REUSED);
}

/// A well-formed artifact that wasmtime would accept, put in place of ours
/// (here one compiled by an engine configured differently): its digest is
/// not the one on record, so it is never deserialized.
#[tokio::test]
async fn a_foreign_artifact_is_never_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let (_, digest) = load_and_run_echo(dir.path(), None).await;
    let file = cached_file(dir.path());
    let mut other = wasmtime::Config::new();
    other.epoch_interruption(false);
    let artifact = wasmtime::Engine::new(&other)
        .unwrap()
        .precompile_component(&plugin_artifacts::bytes(plugin_artifacts::ECHO))
        .unwrap();
    std::fs::write(&file, artifact).unwrap();
    assert_eq!(
        load_and_run_echo(dir.path(), digest.as_deref()).await.0,
        REJECTED
    );
}

/// Without a digest on record, a file in the cache is not trusted.
#[tokio::test]
async fn an_unrecorded_artifact_is_never_loaded() {
    let dir = tempfile::tempdir().unwrap();
    load_and_run_echo(dir.path(), None).await;
    assert_eq!(load_and_run_echo(dir.path(), None).await.0, REJECTED);
}

/// A component that fails its checks leaves nothing in the cache.
#[tokio::test]
async fn a_rejected_plugin_writes_no_artifact() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime_with_cache(dir.path());
    for rejected in [
        plugin_artifacts::WRONG_WORLD,
        plugin_artifacts::SLOW_DESCRIBE,
    ] {
        runtime
            .load(&plugin_artifacts::bytes(rejected), None)
            .await
            .expect_err("not a loadable plugin");
    }
    assert_eq!(runtime.cache_stats().compiled, 2);
    assert_eq!(cached_files(dir.path()), Vec::<PathBuf>::new());
}
