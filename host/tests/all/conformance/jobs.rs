//! Jobs through their life: create, claim, complete, fail, retry, cancel,
//! release.

use jobhost::model::event::PhaseStarted;
use jobhost::model::{EventBody, JobStatus, PhaseStatus};
use jobhost::storage::{
    AfterFailure, CancelOutcome, Completion, CreateOutcome, Guarded, NewJob, PhaseDone,
    PhaseFailed, RetryOutcome,
};

use super::{create, done, fresh, job, kinds, running, with_echo};
use crate::fixture::Backend;

/// `create` and `claim` return the jobs they changed without reading them
/// back: what they return must be exactly what loading returns.
pub async fn created_and_claimed_jobs_read_back_as_returned(backend: Backend) {
    let (store, _dir) = fresh(backend).await;
    with_echo(&store).await;
    let created = create(&store, job("job-1", 2)).await;
    assert_eq!(created.phases[0].version, "1.0.0", "the active version");
    assert_eq!(created.phases[1].version, "2.0.0");
    assert_eq!(Some(created), store.job("job-1").await.unwrap());

    let mut claimed = store.claim_due_jobs(2_000, 10).await.unwrap();
    assert_eq!(claimed.len(), 1);
    let claimed = claimed.remove(0);
    assert_eq!(claimed.job.status, JobStatus::Running);
    assert_eq!(claimed.job.phases[0].status, PhaseStatus::Running);
    assert_eq!(claimed.job.phases[0].attempts, 1);
    assert_eq!(
        (claimed.lease.job_id.as_str(), claimed.lease.attempt),
        ("job-1", 1)
    );
    assert_eq!(Some(claimed.job), store.job("job-1").await.unwrap());

    // Created and claimed in one write (nothing else is due): the same.
    let CreateOutcome::Created(both, Some(lease)) = store
        .create_job(job("job-2", 2), Some(2_000))
        .await
        .unwrap()
    else {
        panic!("not created and claimed");
    };
    assert_eq!(both.status, JobStatus::Running);
    assert_eq!(both.phases[0].status, PhaseStatus::Running);
    assert_eq!(lease.attempt, 1);
    assert_eq!(Some(both), store.job("job-2").await.unwrap());

    // Not claimed with it while another job is due.
    create(&store, job("job-3", 1)).await;
    let outcome = store
        .create_job(job("job-4", 1), Some(2_000))
        .await
        .unwrap();
    assert!(
        matches!(outcome, CreateOutcome::Created(_, None)),
        "{outcome:?}"
    );
}

/// A completion starts the next phase in the same write, and logs both.
pub async fn a_completion_starts_the_next_phase_and_logs_both(backend: Backend) {
    let (store, _dir) = fresh(backend).await;
    with_echo(&store).await;
    let claimed = running(&store, job("job-1", 2)).await;
    let outcome = store
        .complete_phase(&claimed.lease, done(0, true, 3_000))
        .await
        .unwrap();
    assert_eq!(outcome, Guarded::Applied(Completion::NextStarted(1)));
    let stored = store.job("job-1").await.unwrap().unwrap();
    assert_eq!(stored.phases[0].status, PhaseStatus::Completed);
    assert_eq!(
        stored.phases[0].output.as_ref().unwrap().as_str(),
        r#"{"done":0}"#
    );
    assert_eq!(stored.phases[1].status, PhaseStatus::Running);
    assert_eq!(stored.phases[1].started_at, Some(3_000));
    let filter = jobhost::storage::EventFilter {
        job_id: Some("job-1".into()),
        kinds: vec![],
    };
    let events = store.events_after(0, filter, 100).await.unwrap();
    let last = &events[events.len() - 1];
    assert_eq!(
        last.body,
        EventBody::PhaseStarted(PhaseStarted {
            phase: "p1".into(),
            index: 1,
            plugin: "echo".into(),
            version: "2.0.0".into(),
            attempt: 1,
        })
    );
    assert_eq!(
        kinds(&store, "job-1").await,
        [
            "job:created",
            "job:started",
            "job:phase:started",
            "job:phase:completed",
            "job:phase:started"
        ]
    );

    // The last phase's completion completes the job in the same write.
    let outcome = store
        .complete_phase(&claimed.lease, done(1, false, 4_000))
        .await
        .unwrap();
    assert_eq!(outcome, Guarded::Applied(Completion::Recorded));
    let stored = store.job("job-1").await.unwrap().unwrap();
    assert_eq!(
        (stored.status, stored.finished_at),
        (JobStatus::Completed, Some(4_000))
    );
    assert_eq!(kinds(&store, "job-1").await.last(), Some(&"job:completed"));
}

/// Claims take due jobs only: the highest priority first, then the
/// earliest `run_at`.
pub async fn claims_take_the_highest_priority_then_the_earliest_due(backend: Backend) {
    let (store, _dir) = fresh(backend).await;
    with_echo(&store).await;
    let at = |id: &str, priority: i32, run_at: i64| NewJob {
        priority,
        run_at,
        ..job(id, 1)
    };
    for new in [
        at("low-early", -5, 100),
        at("high-late", 5, 500),
        at("high-early", 5, 200),
        at("mid", 0, 50),
        at("not-due", 10, 5_000),
    ] {
        create(&store, new).await;
    }
    let mut order = Vec::new();
    while let Some(claimed) = store.claim_due_jobs(1_000, 1).await.unwrap().pop() {
        order.push(claimed.job.id);
    }
    assert_eq!(order, ["high-early", "high-late", "mid", "low-early"]);
    assert_eq!(store.next_due_at().await.unwrap(), Some(5_000));
    assert_eq!(store.due_count(1_000).await.unwrap(), 0);
    assert_eq!(store.due_count(5_000).await.unwrap(), 1);
    assert_eq!(store.pending_count().await.unwrap(), 1);
}

/// A second job with the same idempotency key stores nothing and returns
/// the first.
pub async fn an_idempotency_key_returns_the_first_job(backend: Backend) {
    let (store, _dir) = fresh(backend).await;
    with_echo(&store).await;
    let keyed = |id: &str| NewJob {
        idempotency_key: Some("order-17".into()),
        ..job(id, 1)
    };
    let first = create(&store, keyed("first")).await;
    let again = store.create_job(keyed("second"), None).await.unwrap();
    assert_eq!(again, CreateOutcome::Existing(first));
    assert_eq!(store.job("second").await.unwrap(), None);
    assert_eq!(kinds(&store, "second").await, Vec::<&str>::new());
}

/// A failed attempt retries at the time the queue chose, resuming at the
/// failed phase, and fails the job when the queue says so.
pub async fn a_failed_attempt_retries_or_fails_as_the_queue_decides(backend: Backend) {
    let (store, _dir) = fresh(backend).await;
    with_echo(&store).await;
    let claimed = running(&store, job("job-1", 2)).await;
    store
        .complete_phase(&claimed.lease, done(0, true, 2_100))
        .await
        .unwrap();
    let failed = |after, now| PhaseFailed {
        index: 1,
        name: "p1".into(),
        error: "boom".into(),
        usage: None,
        after,
        now,
    };
    let retry = failed(AfterFailure::Retry { run_at: 9_000 }, 2_200);
    let outcome = store.fail_phase(&claimed.lease, retry).await.unwrap();
    assert_eq!(outcome, Guarded::Applied(()));
    let waiting = store.job("job-1").await.unwrap().unwrap();
    assert_eq!(
        (waiting.status, waiting.run_at),
        (JobStatus::Pending, 9_000)
    );
    assert_eq!(waiting.phases[0].status, PhaseStatus::Completed, "kept");
    assert_eq!(waiting.phases[1].status, PhaseStatus::Pending);
    assert_eq!(waiting.errors.len(), 1);
    assert_eq!(
        (
            waiting.errors[0].attempt,
            waiting.errors[0].phase.as_deref()
        ),
        (1, Some("p1"))
    );
    assert!(
        store.claim_due_jobs(8_999, 1).await.unwrap().is_empty(),
        "not due yet"
    );

    let again = store.claim_due_jobs(9_000, 1).await.unwrap().remove(0);
    assert_eq!(again.lease.attempt, 2);
    assert_eq!(
        again.job.phases[1].status,
        PhaseStatus::Running,
        "resumed there"
    );
    let outcome = store
        .fail_phase(&again.lease, failed(AfterFailure::Fail, 9_100))
        .await
        .unwrap();
    assert_eq!(outcome, Guarded::Applied(()));
    let ended = store.job("job-1").await.unwrap().unwrap();
    assert_eq!(ended.status, JobStatus::Failed);
    assert_eq!(ended.error.as_deref(), Some("boom"));
    assert_eq!(ended.phases[1].status, PhaseStatus::Failed);
    assert_eq!(ended.errors.len(), 2);
    assert_eq!(kinds(&store, "job-1").await.last(), Some(&"job:failed"));
}

/// A manual retry runs a failed job again from its first unfinished phase,
/// or from the start.
pub async fn a_manual_retry_keeps_completed_phases_unless_from_start(backend: Backend) {
    let (store, _dir) = fresh(backend).await;
    with_echo(&store).await;
    let claimed = running(&store, job("job-1", 2)).await;
    store
        .complete_phase(&claimed.lease, done(0, true, 2_100))
        .await
        .unwrap();
    let failed = PhaseFailed {
        index: 1,
        name: "p1".into(),
        error: "boom".into(),
        usage: None,
        after: AfterFailure::Fail,
        now: 2_200,
    };
    store.fail_phase(&claimed.lease, failed).await.unwrap();

    let RetryOutcome::Retried(retried) = store.retry_job("job-1", false, 3_000).await.unwrap()
    else {
        panic!("not retried")
    };
    assert_eq!(
        (retried.status, retried.attempt, retried.run_at),
        (JobStatus::Pending, 0, 3_000)
    );
    assert_eq!(retried.phases[0].status, PhaseStatus::Completed);
    assert!(retried.phases[0].output.is_some(), "the output is kept");
    assert_eq!(retried.phases[1].status, PhaseStatus::Pending);
    assert_eq!(
        store.retry_job("job-1", false, 3_000).await.unwrap(),
        RetryOutcome::NotRetryable(JobStatus::Pending)
    );
    assert_eq!(
        store.retry_job("nope", false, 3_000).await.unwrap(),
        RetryOutcome::NotFound
    );

    // Cancel it, then retry from the start: every phase runs again.
    store.cancel_pending_job("job-1", 3_100).await.unwrap();
    let RetryOutcome::Retried(retried) = store.retry_job("job-1", true, 3_200).await.unwrap()
    else {
        panic!("not retried")
    };
    assert!(
        retried
            .phases
            .iter()
            .all(|p| p.status == PhaseStatus::Pending && p.output.is_none())
    );
}

/// Cancelling a pending job cancels it and its phases; a running job is
/// left to its worker, and a finished one stays as it was.
pub async fn cancel_takes_a_pending_job_and_leaves_a_running_one_to_its_worker(backend: Backend) {
    let (store, _dir) = fresh(backend).await;
    with_echo(&store).await;
    create(
        &store,
        NewJob {
            run_at: 50_000,
            ..job("waiting", 2)
        },
    )
    .await;
    let claimed = running(&store, job("busy", 1)).await;
    assert_eq!(
        store.cancel_pending_job("waiting", 3_000).await.unwrap(),
        CancelOutcome::Cancelled
    );
    let cancelled = store.job("waiting").await.unwrap().unwrap();
    assert_eq!(cancelled.status, JobStatus::Cancelled);
    assert!(
        cancelled
            .phases
            .iter()
            .all(|p| p.status == PhaseStatus::Cancelled)
    );
    assert_eq!(
        store.cancel_pending_job("waiting", 3_000).await.unwrap(),
        CancelOutcome::AlreadyFinished(JobStatus::Cancelled)
    );
    assert_eq!(
        store.cancel_pending_job("busy", 3_000).await.unwrap(),
        CancelOutcome::Running { on_this_host: true }
    );
    assert_eq!(
        store.cancel_pending_job("nope", 3_000).await.unwrap(),
        CancelOutcome::NotFound
    );

    // Its worker cancels it; the stopped phase keeps what it used.
    let usage = jobhost::model::ResourceUsage {
        wall_ms: 42,
        ..Default::default()
    };
    let outcome = store
        .cancel_running_job(&claimed.lease, Some((0, usage)), 3_500)
        .await
        .unwrap();
    assert_eq!(outcome, Guarded::Applied(()));
    let busy = store.job("busy").await.unwrap().unwrap();
    assert_eq!(busy.status, JobStatus::Cancelled);
    assert_eq!(busy.phases[0].usage.map(|u| u.wall_ms), Some(42));
    assert_eq!(kinds(&store, "busy").await.last(), Some(&"job:cancelled"));
}

/// A job handed back between phases (shutdown) waits again, and its next
/// claim is the same attempt.
pub async fn a_released_job_runs_again_without_counting_the_attempt(backend: Backend) {
    let (store, _dir) = fresh(backend).await;
    with_echo(&store).await;
    let claimed = running(&store, job("job-1", 2)).await;
    let outcome = store
        .complete_phase(&claimed.lease, done(0, false, 2_100))
        .await
        .unwrap();
    assert_eq!(outcome, Guarded::Applied(Completion::Recorded));
    assert_eq!(
        store.release_job(&claimed.lease, 2_200).await.unwrap(),
        Guarded::Applied(())
    );
    let waiting = store.job("job-1").await.unwrap().unwrap();
    assert_eq!((waiting.status, waiting.attempt), (JobStatus::Pending, 0));
    let again = store.claim_due_jobs(2_300, 1).await.unwrap().remove(0);
    assert_eq!(again.lease.attempt, 1);
    assert_ne!(
        again.lease.token, claimed.lease.token,
        "a new claim, a new token"
    );
    assert_eq!(again.job.phases[1].status, PhaseStatus::Running);
    // Same attempt, but the token fences the first claim's worker.
    assert_eq!(
        store
            .complete_phase(&claimed.lease, done(1, false, 2_400))
            .await
            .unwrap(),
        Guarded::Fenced
    );
    assert_eq!(
        store
            .complete_phase(&again.lease, done(1, false, 2_500))
            .await
            .unwrap(),
        Guarded::Applied(Completion::Recorded)
    );
}

/// The last phase's completion can claim the worker's next job in the same
/// write: the due job a claim would pick, started, under its own lease.
pub async fn completing_a_job_can_claim_the_workers_next_one(backend: Backend) {
    let (store, _dir) = fresh(backend).await;
    with_echo(&store).await;
    let claiming = |index, start_next, now| PhaseDone {
        claim_next: true,
        ..done(index, start_next, now)
    };
    let first = running(&store, job("first", 2)).await;
    create(
        &store,
        NewJob {
            priority: -1,
            ..job("low", 1)
        },
    )
    .await;
    create(
        &store,
        NewJob {
            priority: 1,
            ..job("high", 1)
        },
    )
    .await;
    assert_eq!(
        store
            .complete_phase(&first.lease, claiming(0, true, 3_000))
            .await
            .unwrap(),
        Guarded::Applied(Completion::NextStarted(1)),
        "no claim before the job completes"
    );
    let mut lease = first.lease;
    for (expected, now) in [("high", 3_100), ("low", 3_200)] {
        let index = if expected == "high" { 1 } else { 0 };
        let Guarded::Applied(Completion::Claimed(next)) = store
            .complete_phase(&lease, claiming(index, false, now))
            .await
            .unwrap()
        else {
            panic!("no next job claimed");
        };
        assert_eq!(next.job.id, expected, "the job a claim would pick");
        assert_eq!(next.job.phases[0].status, PhaseStatus::Running);
        assert_eq!(Some(next.job.clone()), store.job(expected).await.unwrap());
        lease = next.lease;
    }
    assert_eq!(
        store.job_status("first").await.unwrap(),
        Some(JobStatus::Completed)
    );
    assert_eq!(
        store.job_status("high").await.unwrap(),
        Some(JobStatus::Completed)
    );
    assert_eq!(
        store
            .complete_phase(&lease, claiming(0, false, 3_300))
            .await
            .unwrap(),
        Guarded::Applied(Completion::Recorded),
        "nothing left to claim"
    );
}
