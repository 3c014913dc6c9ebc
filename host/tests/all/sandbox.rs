//! A phase gets nothing the contract does not grant: no files, no
//! environment, no network, nothing an earlier run left behind.

use jobhost::runtime::{Runtime, RuntimeConfig};

use crate::{load, output, run, runtime, test_config};

#[tokio::test]
async fn file_environment_and_network_are_denied() {
    // SAFETY: set before the runtime exists; no other thread reads it.
    unsafe { std::env::set_var("JOBHOST_TEST_SECRET", "hunter2") };
    let runtime = runtime();
    let escape = load(&runtime, plugin_artifacts::ESCAPE).await;
    let seen = output(&run(&runtime, &escape, "{}", "{}").await);
    for probe in ["read_file", "list_dir", "home", "tcp_connect", "dns"] {
        let outcome = seen[probe].as_str().unwrap();
        assert!(
            outcome.starts_with("denied: "),
            "{probe} was not denied: {outcome}"
        );
    }
    assert_eq!(
        seen["env_vars"],
        serde_json::json!([]),
        "the guest saw environment variables"
    );
}

/// A run never sees what an earlier run of the same plugin left in memory,
/// though they use the same pool slot and the pages a run dirtied are reset
/// in place rather than unmapped (`PAGEMAP_SCAN`, up to a bound; the rest
/// are decommitted). The guest marks 4 MiB, over that bound, so both ways
/// of resetting are checked.
#[tokio::test]
async fn a_run_finds_nothing_an_earlier_run_left_in_memory() {
    let runtime = Runtime::new(RuntimeConfig {
        max_concurrent_runs: 1,
        ..test_config()
    })
    .unwrap();
    let residue = load(&runtime, plugin_artifacts::RESIDUE).await;
    for round in 0..3 {
        let found = output(&run(&runtime, &residue, "{}", "{}").await);
        assert_eq!(
            found,
            serde_json::json!({"static_dirty": 0, "grown_dirty": 0}),
            "run {round} found marks an earlier run left"
        );
    }
}
