//! The compiled-artifact cache: a restart reuses it without recompiling, and
//! a corrupt or incompatible file is detected and recompiled, never loaded.

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

fn cached_file(dir: &Path) -> PathBuf {
    let files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "one artifact in {files:?}");
    files.into_iter().next().unwrap()
}

/// Loads echo on a fresh runtime over `dir`, checks it runs, returns the stats.
async fn load_and_run_echo(dir: &Path) -> CacheStats {
    let runtime = runtime_with_cache(dir);
    let echo = runtime
        .load(&plugin_artifacts::bytes(plugin_artifacts::ECHO))
        .await
        .unwrap();
    assert_eq!(output(&run(&runtime, &echo, "7", "{}").await)["payload"], 7);
    runtime.cache_stats()
}

#[tokio::test]
async fn restart_reuses_compiled_artifacts() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(
        load_and_run_echo(dir.path()).await,
        CacheStats {
            compiled: 1,
            reused: 0,
            rejected: 0
        }
    );
    assert_eq!(
        load_and_run_echo(dir.path()).await,
        CacheStats {
            compiled: 0,
            reused: 1,
            rejected: 0
        }
    );
}

#[tokio::test]
async fn corrupt_artifact_is_recompiled() {
    let dir = tempfile::tempdir().unwrap();
    load_and_run_echo(dir.path()).await;
    let file = cached_file(dir.path());
    let mut bytes = std::fs::read(&file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&file, bytes).unwrap();

    assert_eq!(
        load_and_run_echo(dir.path()).await,
        CacheStats {
            compiled: 1,
            reused: 0,
            rejected: 1
        }
    );
    // The recompiled artifact replaced the corrupt one.
    assert_eq!(
        load_and_run_echo(dir.path()).await,
        CacheStats {
            compiled: 0,
            reused: 1,
            rejected: 0
        }
    );
}

#[tokio::test]
async fn artifact_from_an_incompatible_engine_is_recompiled() {
    let dir = tempfile::tempdir().unwrap();
    load_and_run_echo(dir.path()).await;
    let file = cached_file(dir.path());
    // A well-formed artifact, checksummed like ours, but compiled by an engine
    // configured differently (no epoch interruption).
    let mut other = wasmtime::Config::new();
    other.epoch_interruption(false);
    let artifact = wasmtime::Engine::new(&other)
        .unwrap()
        .precompile_component(&plugin_artifacts::bytes(plugin_artifacts::ECHO))
        .unwrap();
    let mut bytes = <sha2::Sha256 as sha2::Digest>::digest(&artifact).to_vec();
    bytes.extend_from_slice(&artifact);
    std::fs::write(&file, bytes).unwrap();

    assert_eq!(
        load_and_run_echo(dir.path()).await,
        CacheStats {
            compiled: 1,
            reused: 0,
            rejected: 1
        }
    );
}
