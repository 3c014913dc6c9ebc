//! Integration tests of the jobhost library, one binary with a module per
//! topic. Guest plugins come from `plugins/`, built by `plugin-artifacts`.

mod cache;
mod cluster;
mod conformance;
mod fixture;
mod group_commit;
mod job_semantics;
mod limits;
mod moving_over;
mod pipeline;
mod postgres_tls;
mod sandbox;
mod scheduling;
mod stopping;
mod validation;

use std::sync::Arc;
use std::time::Duration;

use jobhost::runtime::{LoadedPlugin, PhaseResult, PhaseRun, Runtime, RuntimeConfig};

/// A runtime sized for tests: a few slots, a 64 MiB memory cap.
pub fn runtime() -> Runtime {
    Runtime::new(test_config()).expect("runtime starts")
}

pub fn test_config() -> RuntimeConfig {
    RuntimeConfig {
        max_concurrent_runs: 4,
        memory_limit: 64 << 20,
        ..RuntimeConfig::default()
    }
}

pub async fn load(runtime: &Runtime, component: &str) -> Arc<LoadedPlugin> {
    runtime
        .load(&plugin_artifacts::bytes(component), None)
        .await
        .expect("plugin loads")
        .plugin
}

/// Runs `plugin` with `payload` and `config` and a generous timeout.
pub async fn run(
    runtime: &Runtime,
    plugin: &LoadedPlugin,
    payload: &str,
    config: &str,
) -> PhaseResult {
    let mut run = PhaseRun::new(payload);
    run.config = config.into();
    run.timeout = Duration::from_secs(30);
    runtime.run(plugin, run).await
}

/// The output of a run that must succeed; the guest's output is shown if not.
pub fn output(result: &PhaseResult) -> serde_json::Value {
    match &result.outcome {
        Ok(output) => output.to_value(),
        Err(failure) => panic!(
            "phase failed: {failure}\nlog: {:?}\nstdout: {}\nstderr: {}",
            result.log.entries, result.log.stdout, result.log.stderr
        ),
    }
}

/// After a failure, the same runtime must still run a healthy plugin.
pub async fn assert_runtime_still_healthy(runtime: &Runtime) {
    let echo = load(runtime, plugin_artifacts::ECHO).await;
    let out = output(&run(runtime, &echo, r#"{"still": "alive"}"#, "{}").await);
    assert_eq!(out["payload"]["still"], "alive");
}
