//! Cancellation and timeouts: forced through epoch interruption for guests
//! that never yield, cooperative through `cancelled()` for those that poll.

use std::time::{Duration, Instant};

use jobhost::runtime::{PhaseFailure, PhaseRun};

use crate::{assert_runtime_still_healthy, load, runtime};

/// Generous bound for a stop that takes about one epoch tick (10 ms); the
/// real latency is a benchmark figure, not a test.
const STOP_BOUND: Duration = Duration::from_secs(2);
/// How long a guest runs before the test cancels it.
const LET_IT_RUN: Duration = Duration::from_millis(100);

#[tokio::test]
async fn non_cooperative_loop_is_stopped_by_cancel() {
    let runtime = runtime();
    let spin = load(&runtime, plugin_artifacts::SPIN).await;
    let run = PhaseRun::new("{}");
    let cancel = run.cancel.clone();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(LET_IT_RUN).await;
        cancel.cancel();
        Instant::now()
    });
    let result = runtime.run(&spin, run).await;
    let returned = Instant::now();
    let cancelled_at = canceller.await.unwrap();
    assert_eq!(result.outcome, Err(PhaseFailure::Cancelled));
    assert!(
        returned - cancelled_at < STOP_BOUND,
        "took {:?} to stop",
        returned - cancelled_at
    );
    assert!(
        result.usage.epoch_ticks > 0,
        "the guest was running when cancelled"
    );
    assert_runtime_still_healthy(&runtime).await;
}

#[tokio::test]
async fn non_cooperative_loop_is_stopped_by_its_timeout() {
    let runtime = runtime();
    let spin = load(&runtime, plugin_artifacts::SPIN).await;
    let mut run = PhaseRun::new("{}");
    run.timeout = Duration::from_millis(200);
    let started = Instant::now();
    let result = runtime.run(&spin, run).await;
    assert_eq!(
        result.outcome,
        Err(PhaseFailure::TimedOut(Duration::from_millis(200)))
    );
    assert!(result.outcome.as_ref().unwrap_err().is_retryable());
    assert!(started.elapsed() < Duration::from_millis(200) + STOP_BOUND);
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "stopped before its timeout"
    );
}

#[tokio::test]
async fn cooperative_plugin_notices_cancel_and_returns_early() {
    let runtime = runtime();
    let cooperative = load(&runtime, plugin_artifacts::COOPERATIVE).await;
    let run = PhaseRun::new("{}");
    let cancel = run.cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(LET_IT_RUN).await;
        cancel.cancel();
    });
    let result = runtime.run(&cooperative, run).await;
    // The guest's own error, not a forced interruption.
    match result.outcome {
        Err(PhaseFailure::Fail(message)) => {
            assert!(message.starts_with("stopped cooperatively"), "{message}")
        }
        other => panic!("expected the guest to return on its own, got {other:?}"),
    }
}

#[tokio::test]
async fn cancel_before_start_never_runs_the_guest() {
    let runtime = runtime();
    let echo = load(&runtime, plugin_artifacts::ECHO).await;
    let run = PhaseRun::new("{}");
    run.cancel.cancel();
    let result = runtime.run(&echo, run).await;
    assert_eq!(result.outcome, Err(PhaseFailure::Cancelled));
    assert_eq!(result.usage.peak_memory_bytes, 0);
}

#[tokio::test]
async fn sleeping_guest_is_stopped_by_its_timeout() {
    // A guest parked in a WASI sleep runs no wasm, so no epoch check fires:
    // the runtime must stop it anyway.
    let runtime = runtime();
    let sleep = load(&runtime, plugin_artifacts::SLEEP).await;
    let mut run = PhaseRun::new("{}");
    run.config = r#"{"ms": 60000, "steps": 1}"#.into();
    run.timeout = Duration::from_millis(200);
    let started = Instant::now();
    let result = runtime.run(&sleep, run).await;
    assert_eq!(
        result.outcome,
        Err(PhaseFailure::TimedOut(Duration::from_millis(200)))
    );
    assert!(started.elapsed() < Duration::from_millis(200) + STOP_BOUND);
}

#[tokio::test]
async fn progress_reaches_the_sink() {
    let runtime = runtime();
    let sleep = load(&runtime, plugin_artifacts::SLEEP).await;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut run = PhaseRun::new("{}");
    // Steps farther apart than the rate limit: each report goes through.
    run.config = r#"{"ms": 600, "steps": 4}"#.into();
    let sink_seen = seen.clone();
    run.progress = Some(std::sync::Arc::new(move |p| {
        sink_seen.lock().unwrap().push(p)
    }));
    let result = runtime.run(&sleep, run).await;
    assert!(result.outcome.is_ok());
    let seen = seen.lock().unwrap();
    let percents: Vec<u8> = seen.iter().map(|p| p.percent).collect();
    assert_eq!(percents, [25, 50, 75, 100]);
    assert_eq!(
        result.last_progress.map(|p| (p.percent, p.note)),
        Some((100, "step 4/4".to_owned()))
    );
}

/// Interrupting guest code (what a stop does after cancelling a run's
/// token) stops the cancelled runs only: the others yield and go on, and
/// their resource use counts the ticks they ran, not the interruptions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupting_guests_stops_only_cancelled_runs() {
    let runtime = std::sync::Arc::new(runtime());
    let spin = load(&runtime, plugin_artifacts::SPIN).await;
    let start = |run: PhaseRun| {
        let (runtime, spin) = (runtime.clone(), spin.clone());
        tokio::spawn(async move { runtime.run(&spin, run).await })
    };
    let (first, second) = (PhaseRun::new("{}"), PhaseRun::new("{}"));
    let (stop_first, stop_second) = (first.cancel.clone(), second.cancel.clone());
    let (first, second) = (start(first), start(second));
    tokio::time::sleep(LET_IT_RUN).await;
    for _ in 0..500 {
        runtime.interrupt_guests();
    }
    stop_first.cancel();
    runtime.interrupt_guests();
    let first = first.await.unwrap();
    assert_eq!(first.outcome, Err(PhaseFailure::Cancelled));
    assert!(!second.is_finished(), "the other run went on");
    tokio::time::sleep(LET_IT_RUN).await;
    stop_second.cancel();
    runtime.interrupt_guests();
    let second = second.await.unwrap();
    assert_eq!(second.outcome, Err(PhaseFailure::Cancelled));
    let tick_ms = runtime.config().epoch_tick.as_millis() as u64;
    assert!(
        second.usage.epoch_ticks <= second.usage.wall_ms / tick_ms + 2,
        "{} ticks counted in {} ms",
        second.usage.epoch_ticks,
        second.usage.wall_ms
    );
}
