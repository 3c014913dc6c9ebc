//! The job semantics of DESIGN.md section 4 that must hold, one named
//! regression test each (webhook behaviours 6 and 7 live with the webhooks).

use std::sync::Arc;
use std::time::Duration;

use jobhost::model::event::JobDeleted;
use jobhost::model::json::Json;
use jobhost::model::time::now_ms;
use jobhost::model::{EventBody, EventKind};
use jobhost::model::{JobSpec, JobStatus, PhaseStatus};
use jobhost::queue::Cancelled;
use jobhost::runtime::CancellationToken;
use jobhost::storage::Claimed;
use serde_json::json;

use crate::fixture::{Backend, DataDir, Host, config, echo_job, job, kinds, phase};

/// Behaviour 1.
async fn cancelling_a_job_that_has_not_started_cancels_every_phase(backend: Backend) {
    let host = Host::start_on(backend, config(2)).await;
    host.upload("echo", "1.0.0", plugin_artifacts::ECHO).await;
    let spec = JobSpec {
        delay_ms: Some(3_600_000),
        ..echo_job(3)
    };
    let created = host.enqueue(spec).await;

    assert_eq!(
        host.queue.cancel(&created.id).await.unwrap(),
        Cancelled::Done
    );

    let job = host.queue.job(&created.id).await.unwrap();
    assert_eq!(job.status, JobStatus::Cancelled);
    assert!(
        job.phases
            .iter()
            .all(|p| p.status == PhaseStatus::Cancelled),
        "{:?}",
        job.phases
    );
    let events = host.job_events(&created.id).await;
    assert_eq!(kinds(&events), ["job:created", "job:cancelled"]);
    // Cancelling again changes nothing, and says so.
    let again = host.queue.cancel(&created.id).await.unwrap_err();
    assert!(again.to_string().contains("already finished"), "{again}");
    assert_eq!(host.job_events(&created.id).await.len(), 2);
}

/// Behaviour 2: a cancel landing as one phase completes and the next is
/// about to start gives exactly one `job:cancelled`, whichever side wins.
async fn cancel_between_phases_emits_exactly_one_cancelled_event(backend: Backend) {
    let mut host = Host::start_on(backend, config(2)).await;
    host.upload("echo", "1.0.0", plugin_artifacts::ECHO).await;
    host.upload("sleep", "1.0.0", plugin_artifacts::SLEEP).await;
    for _ in 0..5 {
        let spec = job(
            vec![
                phase("first", "echo", json!({})),
                phase("second", "sleep", json!({"ms": 2000, "steps": 200})),
            ],
            json!({}),
        );
        let created = host.enqueue(spec).await;
        host.wait_for(&created.id, EventKind::PhaseCompleted).await;
        host.queue.cancel(&created.id).await.unwrap();
        let job = host.wait_until_finished(&created.id).await;
        host.wait_idle().await;

        assert_eq!(job.status, JobStatus::Cancelled);
        assert_eq!(job.phases[0].status, PhaseStatus::Completed);
        assert_eq!(job.phases[1].status, PhaseStatus::Cancelled);
        let events = host.job_events(&created.id).await;
        let cancelled = events
            .iter()
            .filter(|e| e.kind() == EventKind::JobCancelled)
            .count();
        assert_eq!(cancelled, 1, "{:?}", kinds(&events));
        assert_eq!(
            events.last().unwrap().kind(),
            EventKind::JobCancelled,
            "nothing after the terminal event"
        );
    }
}

/// A cancel that lands exactly between two phases (the seam holds the
/// worker there until the cancel has asked it to stop): the first phase
/// stays completed, the second never starts, and the job is cancelled
/// once.
async fn a_cancel_between_phases_stops_the_job_at_the_boundary(backend: Backend) {
    let (at_boundary, mut boundaries) = tokio::sync::mpsc::unbounded_channel();
    let mut config = config(2);
    config.between_phases = Some(Arc::new(
        move |job_id: &str, next: usize, stop: &CancellationToken| {
            let _ = at_boundary.send((job_id.to_owned(), next));
            let stop = stop.clone();
            Box::pin(async move { stop.cancelled().await })
        },
    ));
    let host = Host::start_on(backend, config).await;
    host.upload("echo", "1.0.0", plugin_artifacts::ECHO).await;
    let spec = job(
        vec![
            phase("first", "echo", json!({})),
            phase("second", "echo", json!({})),
        ],
        json!({}),
    );
    let created = host.enqueue(spec).await;
    let (held, next) = boundaries.recv().await.unwrap();
    assert_eq!((held.as_str(), next), (created.id.as_str(), 1));

    assert_eq!(
        host.queue.cancel(&created.id).await.unwrap(),
        Cancelled::Done
    );
    let job = host.queue.job(&created.id).await.unwrap();
    assert_eq!(job.status, JobStatus::Cancelled);
    assert_eq!(job.phases[0].status, PhaseStatus::Completed);
    assert_eq!(job.phases[1].status, PhaseStatus::Cancelled);
    assert_eq!(job.phases[1].attempts, 0, "the second phase never started");
    let events = host.job_events(&created.id).await;
    assert_eq!(
        kinds(&events),
        [
            "job:created",
            "job:started",
            "job:phase:started",
            "job:phase:completed",
            "job:cancelled"
        ]
    );
}

/// Behaviour 3.
async fn retry_keeps_completed_phases_unless_from_start(backend: Backend) {
    let mut host = Host::start_on(backend, config(2)).await;
    host.upload("echo", "1.0.0", plugin_artifacts::ECHO).await;
    host.upload("flaky", "1.0.0", plugin_artifacts::FLAKY).await;
    let spec = JobSpec {
        max_attempts: Some(1),
        ..job(
            vec![
                phase("first", "echo", json!({})),
                phase("second", "flaky", json!({"fail_times": 1})),
            ],
            json!({"k": 1}),
        )
    };
    let created = host.enqueue(spec).await;
    let failed = host.wait_until_finished(&created.id).await;
    assert_eq!(failed.status, JobStatus::Failed);
    let first_output = failed.phases[0]
        .output
        .clone()
        .expect("first phase output stored");

    // from_start: false resumes at `second`; `first` keeps its stored output
    // and is not run again.
    let retried = host.queue.retry(&created.id, false).await.unwrap();
    assert_eq!(retried.phases[0].status, PhaseStatus::Completed);
    assert_eq!(retried.phases[0].output.as_ref(), Some(&first_output));
    let done = host.wait_until_finished(&created.id).await;
    assert_eq!(done.status, JobStatus::Completed, "{:?}", done.errors);
    assert_eq!(done.phases[0].output.as_ref(), Some(&first_output));
    assert_eq!(
        done.phases[0].attempts, 1,
        "the completed phase did not run again"
    );
    assert_eq!(
        done.phases[1].output.as_ref().map(Json::to_value),
        Some(json!({"attempt": 2}))
    );

    // from_start: true is refused for a completed job, so fail it first: a
    // cancelled job can be retried from the start, which clears outputs.
    let spec = JobSpec {
        delay_ms: Some(3_600_000),
        ..echo_job(2)
    };
    let pending = host.enqueue(spec).await;
    host.queue.cancel(&pending.id).await.unwrap();
    let cleared = host.queue.retry(&failed.id, true).await;
    assert!(cleared.is_err(), "a completed job cannot be retried");
    let restarted = host.queue.retry(&pending.id, true).await.unwrap();
    assert!(
        restarted
            .phases
            .iter()
            .all(|p| p.status == PhaseStatus::Pending && p.output.is_none())
    );
}

/// Behaviour 3, the other half: from_start clears stored results.
async fn retry_from_start_clears_stored_results(backend: Backend) {
    let mut host = Host::start_on(backend, config(2)).await;
    host.upload("echo", "1.0.0", plugin_artifacts::ECHO).await;
    host.upload("fail", "1.0.0", plugin_artifacts::FAIL).await;
    let spec = job(
        vec![
            phase("first", "echo", json!({})),
            phase("second", "fail", json!({})),
        ],
        json!({}),
    );
    let created = host.enqueue(spec).await;
    let failed = host.wait_until_finished(&created.id).await;
    assert_eq!(failed.status, JobStatus::Failed);
    assert!(failed.phases[0].output.is_some());

    let retried = host.queue.retry(&created.id, true).await.unwrap();
    assert!(
        retried
            .phases
            .iter()
            .all(|p| p.output.is_none() && p.status == PhaseStatus::Pending),
        "{:?}",
        retried.phases
    );
    let again = host.wait_until_finished(&created.id).await;
    assert_eq!(
        again.phases[0].attempts, 1,
        "the first phase ran again from scratch"
    );
    assert_eq!(again.status, JobStatus::Failed);
}

/// Behaviour 4: jobs found running at start-up are requeued, or failed when
/// out of attempts, and the failure record names the phase and attempt.
async fn jobs_left_running_by_a_crash_are_recovered(backend: Backend) {
    let dir = Arc::new(DataDir::new(backend).await);
    let (requeued_id, exhausted_id) = {
        let host = Host::open_on(backend, dir.clone(), config(2)).await;
        host.upload("echo", "1.0.0", plugin_artifacts::ECHO).await;
        host.queue.pause().await.unwrap();
        let a = host.enqueue(echo_job(2)).await;
        let b = host
            .enqueue(JobSpec {
                max_attempts: Some(1),
                ..echo_job(2)
            })
            .await;
        host.queue.shutdown(Duration::from_secs(5)).await.unwrap();
        // Simulate a crash mid-phase: claim both jobs (which starts their
        // first phase), then never finish them.
        let storage = host.reopen_storage().await;
        let claimed = storage.claim_due_jobs(now_ms(), 10).await.unwrap();
        assert_eq!(claimed.len(), 2);
        for Claimed { job, .. } in &claimed {
            assert_eq!(job.phases[0].status, PhaseStatus::Running);
            assert_eq!(job.phases[0].attempts, 1);
        }
        storage.close().await;
        (a.id, b.id)
    };

    let mut host = Host::open_on(backend, dir, config(2)).await;
    let mut recovered = host.recovered.clone();
    recovered.sort_by_key(|r| r.job_id != requeued_id);
    assert_eq!(recovered.len(), 2);
    assert_eq!(
        (
            recovered[0].phase.as_deref(),
            recovered[0].attempt,
            recovered[0].requeued
        ),
        (Some("p0"), 1, true)
    );
    assert_eq!(
        (recovered[1].phase.as_deref(), recovered[1].requeued),
        (Some("p0"), false)
    );

    let exhausted = host.queue.job(&exhausted_id).await.unwrap();
    assert_eq!(exhausted.status, JobStatus::Failed);
    assert_eq!(exhausted.errors.len(), 1);
    assert_eq!(exhausted.errors[0].phase.as_deref(), Some("p0"));
    assert_eq!(exhausted.errors[0].attempt, 1);
    assert!(
        exhausted.errors[0]
            .error
            .contains("during phase `p0` (attempt 1)"),
        "{}",
        exhausted.errors[0].error
    );

    // The pause outlived the restart.
    assert!(host.queue.is_paused());
    host.queue.resume().await.unwrap();
    let finished = host.wait_until_finished(&requeued_id).await;
    assert_eq!(finished.status, JobStatus::Completed);
    assert_eq!(finished.attempt, 2);
    assert!(
        finished.errors[0].error.contains("interrupted"),
        "{:?}",
        finished.errors
    );
    assert_eq!(finished.phases[0].attempts, 2);
}

/// Behaviour 5: shutdown stops claiming, waits up to its timeout, stops the
/// rest by force (even a guest that never yields), always closes storage,
/// and reports the timeout after that cleanup.
async fn shutdown_forces_stuck_phases_and_always_cleans_up(backend: Backend) {
    let mut host = Host::start_on(backend, config(2)).await;
    host.upload("spin", "1.0.0", plugin_artifacts::SPIN).await;
    let created = host
        .enqueue(job(vec![phase("forever", "spin", json!({}))], json!({})))
        .await;
    host.wait_for(&created.id, EventKind::PhaseStarted).await;

    let timed_out = host
        .queue
        .shutdown(Duration::from_millis(200))
        .await
        .unwrap_err();
    assert_eq!(timed_out.report.forced, vec![created.id.clone()]);
    // Storage was closed even though the wait timed out.
    assert!(
        host.storage.job(&created.id).await.is_err(),
        "storage still open after shutdown"
    );
    assert!(
        host.queue.enqueue(echo_job(1)).await.is_err(),
        "still accepting jobs"
    );

    // The interrupted job was requeued, with the interruption on record.
    let reopened = host.reopen_storage().await;
    let job = reopened.job(&created.id).await.unwrap().unwrap();
    assert_eq!(job.status, JobStatus::Pending);
    assert_eq!(job.errors[0].error, "interrupted by shutdown");
    assert_eq!(job.errors[0].phase.as_deref(), Some("forever"));
    reopened.close().await;
}

/// Behaviour 5, the graceful half: within the timeout, a running job is
/// handed back between phases and nothing is forced.
async fn graceful_shutdown_hands_jobs_back_between_phases(backend: Backend) {
    let mut host = Host::start_on(backend, config(2)).await;
    host.upload("sleep", "1.0.0", plugin_artifacts::SLEEP).await;
    let spec = job(
        vec![
            phase("one", "sleep", json!({"ms": 300, "steps": 3})),
            phase("two", "sleep", json!({"ms": 300})),
        ],
        json!({}),
    );
    let created = host.enqueue(spec).await;
    host.wait_for(&created.id, EventKind::PhaseStarted).await;
    let report = host.queue.shutdown(Duration::from_secs(20)).await.unwrap();
    assert!(report.forced.is_empty());

    let reopened = host.reopen_storage().await;
    let job = reopened.job(&created.id).await.unwrap().unwrap();
    assert_eq!(job.status, JobStatus::Pending);
    assert_eq!(
        job.phases[0].status,
        PhaseStatus::Completed,
        "the running phase finished"
    );
    assert_eq!(
        job.phases[1].status,
        PhaseStatus::Pending,
        "the next phase did not start"
    );
    assert!(job.errors.is_empty());
    reopened.close().await;
}

/// Behaviour 8.
async fn retention_deletes_old_terminal_jobs_with_id_only_events(backend: Backend) {
    let mut host = Host::start_on(backend, config(2)).await;
    host.upload("echo", "1.0.0", plugin_artifacts::ECHO).await;
    let done = host.enqueue(echo_job(1)).await;
    host.wait_until_finished(&done.id).await;
    let waiting = host
        .enqueue(JobSpec {
            delay_ms: Some(3_600_000),
            ..echo_job(1)
        })
        .await;

    let deleted = host
        .queue
        .purge_finished_before(now_ms() + 1)
        .await
        .unwrap();
    assert_eq!(deleted, vec![done.id.clone()]);
    assert!(host.queue.job(&done.id).await.is_err());
    assert_eq!(
        host.queue.job(&waiting.id).await.unwrap().status,
        JobStatus::Pending
    );
    // The job's history went with it; only its `job:deleted` remains.
    let events = host.job_events(&done.id).await;
    assert_eq!(kinds(&events), ["job:deleted"]);
    assert_eq!(
        events[0].body,
        EventBody::JobDeleted(JobDeleted {
            id: done.id.clone()
        })
    );
    // Old log entries about nothing that is still stored went too (the
    // plugin upload); the waiting job keeps its history.
    let all = host
        .storage
        .events_after(0, Default::default(), 100)
        .await
        .unwrap();
    assert!(
        all.iter().all(|e| e.job_id.is_some()),
        "plugin events older than the cutoff remain"
    );
    assert_eq!(kinds(&host.job_events(&waiting.id).await), ["job:created"]);
    // Nothing finished before an hour ago: nothing more to delete.
    assert!(
        host.queue
            .purge_finished_before(now_ms() - 3_600_000)
            .await
            .unwrap()
            .is_empty()
    );
}

/// A transition storage cannot record (the database refuses the last
/// phase's 256 KiB output, as a full disk would) does not leave its job
/// `running`: the worker recovers it as a crash would, retrying until
/// storage takes the write.
async fn a_write_that_fails_does_not_leave_the_job_running(backend: Backend) {
    let mut host = Host::start_on(backend, config(1)).await;
    host.upload("sleep", "1.0.0", plugin_artifacts::SLEEP).await;
    host.upload("echo", "1.0.0", plugin_artifacts::ECHO).await;
    let big = "x".repeat(256 << 10);
    let mut spec = job(
        vec![
            phase("nap", "sleep", json!({"ms": 200, "steps": 1})),
            phase("copy", "echo", json!({})),
        ],
        json!({ "big": big }),
    );
    spec.max_attempts = Some(1);
    let queued = host.enqueue(spec).await;
    host.wait_for(&queued.id, EventKind::PhaseStarted).await;
    host.refuse_large_writes().await;
    let finished = match tokio::time::timeout(
        Duration::from_secs(10),
        host.wait_until_finished(&queued.id),
    )
    .await
    {
        Ok(job) => job,
        // The recovery's own small write was refused too (SQLite, at its
        // size cap): once storage takes writes again, it goes through.
        Err(_) => {
            host.accept_writes().await;
            host.wait_until_finished(&queued.id).await
        }
    };
    assert_eq!(finished.status, JobStatus::Failed);
    assert!(
        finished.errors[0]
            .error
            .contains("storage failed to record its progress during phase"),
        "{:?}",
        finished.errors
    );
    host.accept_writes().await;
    let next = host.enqueue(echo_job(1)).await;
    assert_eq!(
        host.wait_until_finished(&next.id).await.status,
        JobStatus::Completed
    );
}

/// A phase stopped by a cancel keeps what it used, as a failed one does.
async fn a_cancelled_phase_keeps_its_resource_use(backend: Backend) {
    let mut host = Host::start_on(backend, config(1)).await;
    host.upload("cooperative", "1.0.0", plugin_artifacts::COOPERATIVE)
        .await;
    let queued = host
        .enqueue(job(
            vec![phase("forever", "cooperative", json!({}))],
            json!(null),
        ))
        .await;
    // Its first progress report says the guest runs (a cancel before that
    // never starts it, and it would have used nothing).
    host.wait_for(&queued.id, EventKind::PhaseProgress).await;
    host.queue.cancel(&queued.id).await.unwrap();
    let done = host.wait_until_finished(&queued.id).await;
    assert_eq!(done.status, JobStatus::Cancelled);
    let usage = done.phases[0].usage.expect("the cancelled phase's usage");
    assert!(usage.peak_memory_bytes > 0, "{usage:?}");
}

/// A guest that notices the cancel and returns an error of its own (here a
/// permanent one, under a retry budget) ends the job cancelled: the error
/// neither fails nor retries a job its user cancelled.
async fn a_guest_that_stops_on_cancel_with_an_error_is_cancelled(backend: Backend) {
    let mut host = Host::start_on(backend, config(1)).await;
    host.upload("cooperative", "1.0.0", plugin_artifacts::COOPERATIVE)
        .await;
    let mut spec = job(
        vec![phase("until-cancelled", "cooperative", json!({}))],
        json!(null),
    );
    spec.max_attempts = Some(3);
    let queued = host.enqueue(spec).await;
    host.wait_for(&queued.id, EventKind::PhaseProgress).await;

    assert_eq!(
        host.queue.cancel(&queued.id).await.unwrap(),
        Cancelled::Done
    );
    let done = host.wait_until_finished(&queued.id).await;
    assert_eq!(done.status, JobStatus::Cancelled);
    assert_eq!(done.phases[0].status, PhaseStatus::Cancelled);
    assert_eq!(done.attempt, 1, "not retried");
    let events = host.job_events(&queued.id).await;
    assert_eq!(
        kinds(&events),
        [
            "job:created",
            "job:started",
            "job:phase:started",
            "job:cancelled"
        ]
    );
}

crate::fixture::on_each_backend! {
    cancelling_a_job_that_has_not_started_cancels_every_phase,
    cancel_between_phases_emits_exactly_one_cancelled_event,
    a_cancel_between_phases_stops_the_job_at_the_boundary,
    retry_keeps_completed_phases_unless_from_start,
    retry_from_start_clears_stored_results,
    jobs_left_running_by_a_crash_are_recovered,
    shutdown_forces_stuck_phases_and_always_cleans_up,
    graceful_shutdown_hands_jobs_back_between_phases,
    retention_deletes_old_terminal_jobs_with_id_only_events,
    a_write_that_fails_does_not_leave_the_job_running,
    a_cancelled_phase_keeps_its_resource_use,
    a_guest_that_stops_on_cancel_with_an_error_is_cancelled,
}
