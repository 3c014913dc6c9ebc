//! Guests that misbehave fail only their own run, with a clear error, and the
//! runtime goes on serving the next run.

use jobhost::json::Json;
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
