//! `jobhost bench` still runs every scenario. Its figures are measurements,
//! not assertions (BENCHMARKS.md); this checks only that each scenario
//! works end to end, with one sample and few jobs, in a debug build.

use std::path::Path;
use std::time::Duration;

use tokio::process::Command;

/// Every scenario's heading, in the order the bench prints them.
const SCENARIOS: [&str; 13] = [
    "## Phase overhead",
    "## Epoch interruption",
    "## Forced cancel",
    "## Loading `csv-parse`",
    "## Queue throughput",
    "## Latency, enqueue",
    "## Fair claiming",
    "## What keys and plugin limits cost",
    "## Over HTTP",
    "## Start-up",
    "## SSE fan-out",
    "## SSE watchers",
    "## Hot swap under load",
];

/// Runs `jobhost bench` with one sample of 50 jobs and `args`, with the
/// test plugins; its output, once it succeeded within `limit` (a scenario
/// that never finishes fails the test instead of hanging it).
async fn bench(args: &[&str], limit: Duration) -> String {
    let plugins = Path::new(plugin_artifacts::ECHO).parent().unwrap();
    let bench = Command::new(env!("CARGO_BIN_EXE_jobhost"))
        .args(["bench", "--samples", "1", "--jobs", "50"])
        .args(args)
        .arg("--plugins")
        .arg(plugins)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(limit, bench)
        .await
        .unwrap_or_else(|_| panic!("the bench did not finish in {limit:?}"))
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!stdout.contains("NaN"), "{stdout}");
    stdout
}

#[tokio::test]
async fn every_scenario_runs() {
    // The whole bench takes about 30 s here.
    let stdout = bench(&[], Duration::from_secs(600)).await;
    let mut rest = stdout.as_str();
    for heading in SCENARIOS {
        let at = rest
            .find(heading)
            .unwrap_or_else(|| panic!("no `{heading}` (in order) in:\n{stdout}"));
        rest = &rest[at..];
    }
    // The hot swap's row: activation delay, jobs submitted, jobs failed.
    let hot_swap = rest.lines().rfind(|line| line.starts_with("| ")).unwrap();
    assert!(
        hot_swap.ends_with("| 0 |"),
        "jobs failed in a hot swap: {hot_swap}"
    );
}

/// The PostgreSQL scenario (not in the default set: it needs a server)
/// runs against this machine's, creating and dropping its own databases.
#[tokio::test]
async fn the_postgres_scenario_runs() {
    if !crate::test_database::available().await {
        return;
    }
    let server = crate::test_database::admin_url();
    let args = ["--only", "postgres", "--database-url", server.as_str()];
    let stdout = bench(&args, Duration::from_secs(300)).await;
    for heading in ["## PostgreSQL", "## Forced cancel across hosts"] {
        assert!(stdout.contains(heading), "no `{heading}` in:\n{stdout}");
    }
}
