//! Guests that misbehave fail only their own run, with a clear error, and the
//! runtime goes on serving the next run.

use jobhost::model::json::Json;
use jobhost::runtime::PhaseFailure;

use crate::{assert_runtime_still_healthy, load, run, runtime, test_config};

#[tokio::test]
async fn memory_exhaustion_fails_the_run() {
    let runtime = runtime();
    let hog = load(&runtime, plugin_artifacts::HOG_MEMORY).await;
    let result = run(&runtime, &hog, "{}", "{}").await;
    assert_eq!(
        result.outcome,
        Err(PhaseFailure::MemoryExhausted(test_config().memory_limit))
    );
    assert!(result.usage.peak_memory_bytes > test_config().memory_limit / 2);
    assert!(result.usage.peak_memory_bytes <= test_config().memory_limit);
    assert_runtime_still_healthy(&runtime).await;
}

#[tokio::test]
async fn panic_fails_the_run_with_its_message() {
    let runtime = runtime();
    let crash = load(&runtime, plugin_artifacts::CRASH).await;
    let result = run(&runtime, &crash, "{}", r#"{"how": "panic"}"#).await;
    match &result.outcome {
        Err(PhaseFailure::Panicked(message)) => {
            assert!(
                message.starts_with("crash plugin panicked on purpose (at "),
                "{message}"
            )
        }
        other => panic!("expected a panic, got {other:?}"),
    }
    assert_runtime_still_healthy(&runtime).await;
}

#[tokio::test]
async fn trap_fails_the_run() {
    let runtime = runtime();
    let crash = load(&runtime, plugin_artifacts::CRASH).await;
    let result = run(&runtime, &crash, "{}", r#"{"how": "unreachable"}"#).await;
    match &result.outcome {
        Err(PhaseFailure::Trapped(message)) => {
            assert!(message.contains("unreachable"), "{message}")
        }
        other => panic!("expected a trap, got {other:?}"),
    }
    assert_runtime_still_healthy(&runtime).await;
}

#[tokio::test]
async fn stack_overflow_fails_the_run() {
    let runtime = runtime();
    let recursion = load(&runtime, plugin_artifacts::DEEP_RECURSION).await;
    let result = run(&runtime, &recursion, "{}", "{}").await;
    assert_eq!(result.outcome, Err(PhaseFailure::StackOverflow));
    assert_runtime_still_healthy(&runtime).await;
}

#[tokio::test]
async fn retry_and_fail_errors_reach_the_host_as_such() {
    let runtime = runtime();
    let flaky = load(&runtime, plugin_artifacts::FLAKY).await;
    let mut attempt = jobhost::runtime::PhaseRun::new("{}");
    attempt.config = r#"{"fail_times": 2}"#.into();
    for n in 1..=2 {
        attempt.attempt = n;
        let result = runtime.run(&flaky, attempt.clone()).await;
        assert_eq!(
            result.outcome,
            Err(PhaseFailure::Retry(format!("planned failure {n} of 2")))
        );
    }
    attempt.attempt = 3;
    assert_eq!(
        runtime.run(&flaky, attempt).await.outcome,
        Ok(Json::parse(r#"{"attempt":3}"#.into()).unwrap())
    );

    let fail = load(&runtime, plugin_artifacts::FAIL).await;
    let result = run(&runtime, &fail, "{}", r#"{"message": "bad input"}"#).await;
    assert_eq!(result.outcome, Err(PhaseFailure::Fail("bad input".into())));
}

#[tokio::test]
async fn stdout_flood_is_truncated_at_the_bound() {
    let runtime = runtime();
    let flood = load(&runtime, plugin_artifacts::FLOOD_STDOUT).await;
    let written: u64 = 16 << 20;
    let result = run(
        &runtime,
        &flood,
        "{}",
        &format!(r#"{{"bytes": {written}}}"#),
    )
    .await;
    assert_eq!(crate::output(&result)["written"], written);
    let limit = test_config().max_captured_output;
    assert_eq!(result.log.stdout.len(), limit, "kept exactly the bound");
    assert_eq!(
        result.log.stdout_bytes, written,
        "counted everything written"
    );
    assert_eq!(
        result.log.stderr,
        format!("flood-stdout wrote {written} bytes\n")
    );
    assert!(result.usage.log_bytes > written);
}

#[tokio::test]
async fn invalid_json_input_is_refused_before_running() {
    let runtime = runtime();
    let echo = load(&runtime, plugin_artifacts::ECHO).await;
    let result = run(&runtime, &echo, "{not json", "{}").await;
    assert_eq!(
        result.outcome,
        Err(PhaseFailure::InvalidInput(
            "the payload is not valid JSON".into()
        ))
    );
    let result = run(&runtime, &echo, "{}", "[").await;
    assert_eq!(
        result.outcome,
        Err(PhaseFailure::InvalidInput(
            "the phase config is not valid JSON".into()
        ))
    );
}

#[tokio::test]
async fn usage_is_reported() {
    let runtime = runtime();
    let echo = load(&runtime, plugin_artifacts::ECHO).await;
    let result = run(&runtime, &echo, r#"{"n": 1}"#, "{}").await;
    let output = result.outcome.as_ref().unwrap();
    assert_eq!(result.usage.output_bytes, output.as_str().len() as u64);
    assert!(
        result.usage.peak_memory_bytes >= 64 << 10,
        "at least one wasm page"
    );
}

/// A legal plugin floods the host through the contract itself: what the
/// host keeps of each flood stays within its bound, visibly cut.
#[tokio::test]
async fn floods_through_the_contract_are_bounded() {
    let runtime = runtime();
    let flood = load(&runtime, plugin_artifacts::FLOOD).await;
    let config = test_config();

    // 3,000 progress reports of 64 KiB at 100%: rate-limited with no
    // bypass, each note cut, and only the latest kept.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut progress = jobhost::runtime::PhaseRun::new("{}");
    progress.config = r#"{"mode": "progress", "count": 3000, "bytes": 65536}"#.into();
    let sink_seen = seen.clone();
    progress.progress = Some(std::sync::Arc::new(move |p| {
        sink_seen.lock().unwrap().push(p)
    }));
    let started = std::time::Instant::now();
    let result = runtime.run(&flood, progress).await;
    assert_eq!(crate::output(&result)["sent"], 3000);
    let seen = seen.lock().unwrap().clone();
    let most = started.elapsed().as_millis() / 100 + 1;
    assert!(
        (1..=most as usize).contains(&seen.len()),
        "{} reports passed",
        seen.len()
    );
    let bound = jobhost::runtime::MAX_PROGRESS_NOTE + "… [truncated 65280 bytes]".len();
    for report in seen.iter().chain(result.last_progress.iter()) {
        assert_eq!(report.note.len(), bound);
        assert!(report.note.ends_with("… [truncated 65280 bytes]"));
    }

    // 10,000 log lines of 64 KiB: each line cut, the total within the budget.
    let result = run(
        &runtime,
        &flood,
        "{}",
        r#"{"mode": "log", "count": 10000, "bytes": 65536}"#,
    )
    .await;
    assert_eq!(crate::output(&result)["sent"], 10000);
    let kept: usize = result.log.entries.iter().map(|e| e.message.len()).sum();
    assert!(kept <= config.max_log_bytes, "{kept} bytes of log kept");
    assert!(result.log.entries[0].message.contains("[truncated "));
    assert_eq!(
        result.log.dropped_entries as usize,
        10000 - result.log.entries.len()
    );
    assert_eq!(result.log.log_bytes, 10000 * 65536);

    // A 40 MiB failure message, retryable or not: cut to the bound.
    for mode in ["fail", "retry"] {
        let result = run(
            &runtime,
            &flood,
            "{}",
            &format!(r#"{{"mode": "{mode}", "bytes": 41943040}}"#),
        )
        .await;
        let message = match result.outcome {
            Err(PhaseFailure::Fail(message) | PhaseFailure::Retry(message)) => message,
            other => panic!("expected a failure, got {other:?}"),
        };
        let marker = format!("… [truncated {} bytes]", 41943040 - config.max_error_bytes);
        assert_eq!(message.len(), config.max_error_bytes + marker.len());
        assert!(message.ends_with(&marker));
    }
    assert_runtime_still_healthy(&runtime).await;
}

/// `describe()` answers of any size are cut to the documented bounds.
#[tokio::test]
async fn huge_metadata_is_cut() {
    let runtime = runtime();
    let plugin = load(&runtime, plugin_artifacts::HUGE_METADATA).await;
    let metadata = &plugin.metadata;
    let cut = |bound: usize| bound + format!("… [truncated {} bytes]", (1 << 20) - bound).len();
    assert_eq!(
        metadata.name.len(),
        cut(jobhost::runtime::MAX_METADATA_NAME)
    );
    assert_eq!(
        metadata.version.len(),
        cut(jobhost::runtime::MAX_METADATA_NAME)
    );
    assert_eq!(
        metadata.description.len(),
        cut(jobhost::runtime::MAX_METADATA_DESCRIPTION)
    );
}

/// A `describe()` parked in a WASI sleep, where no epoch check runs, is
/// stopped by the wall-clock timeout: the load fails instead of hanging.
#[tokio::test]
async fn a_parked_describe_cannot_hang_a_load() {
    let runtime = runtime();
    let started = std::time::Instant::now();
    let error = runtime
        .load(
            &plugin_artifacts::bytes(plugin_artifacts::SLOW_DESCRIBE),
            None,
        )
        .await
        .expect_err("a describe() that never returns");
    assert!(
        error.to_string().contains("did not return within"),
        "{error}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    assert_runtime_still_healthy(&runtime).await;
}

/// Handles a guest holds (here pollables it never drops) are bounded: past
/// the resource table's capacity the run fails, and the host's memory
/// stays bounded.
#[tokio::test]
async fn held_resources_are_bounded() {
    let runtime = runtime();
    let flood = load(&runtime, plugin_artifacts::FLOOD).await;
    let result = run(
        &runtime,
        &flood,
        "{}",
        r#"{"mode": "resources", "count": 100000}"#,
    )
    .await;
    match &result.outcome {
        Err(PhaseFailure::Trapped(message)) => {
            assert!(message.contains("resource table"), "{message}")
        }
        other => panic!("expected a trap, got {other:?}"),
    }
    let within = run(
        &runtime,
        &flood,
        "{}",
        r#"{"mode": "resources", "count": 1000}"#,
    )
    .await;
    assert_eq!(crate::output(&within)["sent"], 1000);
    assert_runtime_still_healthy(&runtime).await;
}
