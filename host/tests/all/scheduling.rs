//! Scheduling guarantees: the concurrency limit, priorities, scheduled
//! start times, pinned plugin versions across a hot swap, idempotent
//! enqueue, and bad input refused with nothing stored.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use jobhost::model::EventKind;
use jobhost::model::json::Json;
use jobhost::model::{JobSpec, JobStatus, PhaseSpec};
use jobhost::queue::QueueError;
use serde_json::json;

use crate::fixture::{Host, config, echo_job, job, phase};

fn sleep_job(ms: u64) -> JobSpec {
    job(
        vec![phase("nap", "sleep", json!({"ms": ms, "steps": 2}))],
        json!({}),
    )
}

#[tokio::test]
async fn concurrency_limit_is_never_exceeded() {
    let mut host = Host::start(config(2)).await;
    host.upload("sleep", "1.0.0", plugin_artifacts::SLEEP).await;
    let mut events = host.queue.bus().subscribe();
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(host.enqueue(sleep_job(150)).await.id);
    }
    for id in &ids {
        host.wait_until_finished(id).await;
    }
    // Replay the lifecycle in commit order: never more than 2 at once.
    let (mut running, mut most) = (0i32, 0i32);
    while let Ok(event) = events.try_recv() {
        match event.kind() {
            EventKind::JobStarted => running += 1,
            EventKind::JobCompleted => running -= 1,
            _ => continue,
        }
        most = most.max(running);
    }
    assert_eq!(most, 2, "the limit of 2 was exceeded or never reached");
}

/// With a free slot and nothing else due, the write that stores a job also
/// claims it; otherwise the job waits for the dispatcher, in order.
#[tokio::test]
async fn an_idle_queue_claims_a_job_as_it_stores_it() {
    let mut host = Host::start(config(1)).await;
    host.upload("sleep", "1.0.0", plugin_artifacts::SLEEP).await;
    let first = host.enqueue(sleep_job(300)).await;
    assert_eq!(first.status, JobStatus::Running, "claimed by its create");
    assert_eq!(first.phases[0].attempts, 1);
    // The only slot is taken: the next job is stored pending.
    let second = host.enqueue(sleep_job(10)).await;
    assert_eq!(second.status, JobStatus::Pending);
    assert_eq!(
        host.wait_until_finished(&second.id).await.status,
        JobStatus::Completed
    );
    host.queue.pause().await.unwrap();
    let paused = host.enqueue(sleep_job(10)).await;
    assert_eq!(paused.status, JobStatus::Pending, "no claim while paused");
}

#[tokio::test]
async fn higher_priority_due_jobs_start_first() {
    let mut host = Host::start(config(1)).await;
    host.upload("echo", "1.0.0", plugin_artifacts::ECHO).await;
    host.queue.pause().await.unwrap();
    let low = host
        .enqueue(JobSpec {
            priority: 0,
            ..echo_job(1)
        })
        .await;
    let high = host
        .enqueue(JobSpec {
            priority: 10,
            ..echo_job(1)
        })
        .await;
    let mid = host
        .enqueue(JobSpec {
            priority: 5,
            ..echo_job(1)
        })
        .await;
    host.queue.resume().await.unwrap();
    for job in [&low, &high, &mid] {
        host.wait_until_finished(&job.id).await;
    }
    let started = |id: &str| {
        let host = &host;
        let id = id.to_owned();
        async move {
            host.job_events(&id)
                .await
                .iter()
                .find(|e| e.kind() == EventKind::JobStarted)
                .unwrap()
                .seq
        }
    };
    let (h, m, l) = (
        started(&high.id).await,
        started(&mid.id).await,
        started(&low.id).await,
    );
    assert!(
        h < m && m < l,
        "start order by seq: high {h}, mid {m}, low {l}"
    );
}

#[tokio::test]
async fn scheduled_job_starts_on_time_not_before() {
    let mut host = Host::start(config(2)).await;
    host.upload("echo", "1.0.0", plugin_artifacts::ECHO).await;
    let delay = 400;
    let created = host
        .enqueue(JobSpec {
            delay_ms: Some(delay),
            ..echo_job(1)
        })
        .await;
    let started = host.wait_for(&created.id, EventKind::JobStarted).await;
    let due = created.created_at + delay as i64;
    assert_eq!(created.run_at, due);
    assert!(started.at >= due, "started {} ms early", due - started.at);
    // Promptly: the dispatcher sleeps until the due time, not a poll interval.
    assert!(
        started.at - due < 1000,
        "started {} ms late",
        started.at - due
    );
}

/// The queue reads time from its injected clock: a job scheduled an hour
/// ahead is stored with that clock's times, is not claimed before the
/// clock reaches its `run_at`, and runs once it has, without the hour
/// passing.
#[tokio::test]
async fn the_queue_keeps_the_time_of_its_injected_clock() {
    const START: i64 = 1_700_000_000_000;
    let clock = Arc::new(AtomicI64::new(START));
    let mut config = config(2);
    config.clock = {
        let clock = clock.clone();
        Arc::new(move || clock.load(Ordering::SeqCst))
    };
    let mut host = Host::start(config).await;
    host.upload("echo", "1.0.0", plugin_artifacts::ECHO).await;
    let created = host
        .enqueue(JobSpec {
            delay_ms: Some(3_600_000),
            ..echo_job(1)
        })
        .await;
    assert_eq!(created.created_at, START);
    assert_eq!(created.run_at, START + 3_600_000);
    host.queue.resume().await.unwrap(); // wakes the dispatcher: nothing is due yet
    clock.store(START + 3_599_999, Ordering::SeqCst);
    host.queue.resume().await.unwrap();
    assert_eq!(host.queue.due_count().await.unwrap(), 0);
    assert_eq!(
        host.queue.job_status(&created.id).await.unwrap(),
        JobStatus::Pending
    );

    clock.store(START + 3_600_000, Ordering::SeqCst);
    host.queue.resume().await.unwrap();
    let job = host.wait_until_finished(&created.id).await;
    assert_eq!(job.status, JobStatus::Completed);
    assert_eq!(job.started_at, Some(START + 3_600_000));
}

#[tokio::test]
async fn hot_swap_keeps_pinned_versions_and_fails_nothing() {
    let mut host = Host::start(config(2)).await;
    // Two versions of one plugin: v1 sleeps, v2 echoes.
    host.upload("worker", "1.0.0", plugin_artifacts::SLEEP)
        .await;
    let on_v1 = host
        .enqueue(job(
            vec![phase("work", "worker", json!({"ms": 600, "steps": 6}))],
            json!({}),
        ))
        .await;
    assert_eq!(on_v1.phases[0].version, "1.0.0");
    host.wait_for(&on_v1.id, EventKind::PhaseStarted).await;

    host.upload("worker", "2.0.0", plugin_artifacts::ECHO).await;
    assert_eq!(
        host.plugins
            .activate("worker", "2.0.0")
            .await
            .unwrap()
            .as_deref(),
        Some("1.0.0")
    );
    let on_v2 = host
        .enqueue(job(
            vec![phase("work", "worker", json!({}))],
            json!({"v": 2}),
        ))
        .await;
    assert_eq!(on_v2.phases[0].version, "2.0.0");

    let v1_done = host.wait_until_finished(&on_v1.id).await;
    let v2_done = host.wait_until_finished(&on_v2.id).await;
    assert_eq!(v1_done.status, JobStatus::Completed);
    assert_eq!(
        v1_done.phases[0].output.as_ref().map(Json::to_value),
        Some(json!({"slept_ms": 600})),
        "ran v1 to the end"
    );
    assert_eq!(v2_done.status, JobStatus::Completed);
    assert_eq!(
        v2_done.phases[0].output.as_ref().unwrap().to_value()["payload"],
        json!({"v": 2}),
        "ran v2"
    );

    // Rollback works the same way; the version pinned by nothing can go.
    host.plugins.activate("worker", "1.0.0").await.unwrap();
    let back = host
        .enqueue(job(
            vec![phase("work", "worker", json!({"ms": 10}))],
            json!({}),
        ))
        .await;
    assert_eq!(back.phases[0].version, "1.0.0");
    assert_eq!(
        host.wait_until_finished(&back.id).await.status,
        JobStatus::Completed
    );
    host.plugins
        .delete_version("worker", "2.0.0")
        .await
        .unwrap();
}

#[tokio::test]
async fn a_version_pinned_by_an_unfinished_job_cannot_be_deleted() {
    let host = Host::start(config(2)).await;
    host.upload("echo", "1.0.0", plugin_artifacts::ECHO).await;
    host.upload("echo", "1.1.0", plugin_artifacts::ECHO).await;
    let spec = JobSpec {
        delay_ms: Some(3_600_000),
        phases: vec![PhaseSpec {
            version: Some("1.1.0".into()),
            ..phase("p", "echo", json!({}))
        }],
        ..JobSpec::default()
    };
    let waiting = host.enqueue(spec).await;
    let refused = host
        .plugins
        .delete_version("echo", "1.1.0")
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("pinned by 1 unfinished job"),
        "{refused}"
    );
    host.queue.cancel(&waiting.id).await.unwrap();
    host.plugins.delete_version("echo", "1.1.0").await.unwrap();
}

#[tokio::test]
async fn same_idempotency_key_returns_the_first_job_and_stores_nothing() {
    let host = Host::start(config(2)).await;
    host.upload("echo", "1.0.0", plugin_artifacts::ECHO).await;
    let spec = JobSpec {
        idempotency_key: Some("order-42".into()),
        delay_ms: Some(3_600_000),
        ..echo_job(1)
    };
    let first = host.queue.enqueue(spec.clone()).await.unwrap();
    let second = host
        .queue
        .enqueue(JobSpec {
            payload: Json::from_value(&json!("different")),
            ..spec
        })
        .await
        .unwrap();
    assert!(first.created && !second.created);
    assert_eq!(second.job, first.job);
    let page = host.storage.jobs(Default::default()).await.unwrap();
    assert_eq!(page.jobs.len(), 1);
    assert_eq!(
        host.job_events(&first.job.id).await.len(),
        1,
        "one job:created"
    );
}

#[tokio::test]
async fn bad_jobs_are_refused_and_nothing_is_stored() {
    let host = Host::start(config(2)).await;
    host.upload("echo", "1.0.0", plugin_artifacts::ECHO).await;
    let unknown_plugin = job(vec![phase("p", "nope", json!({}))], json!({}));
    let unknown_version = JobSpec {
        phases: vec![PhaseSpec {
            version: Some("9.9.9".into()),
            ..phase("p", "echo", json!({}))
        }],
        ..JobSpec::default()
    };
    let cases: Vec<(JobSpec, &str)> = vec![
        (unknown_plugin, "no plugin named `nope`"),
        (unknown_version, "plugin `echo` has no version `9.9.9`"),
        (job(vec![], json!({})), "at least one phase"),
        (
            job(
                vec![phase("a", "echo", json!({})), phase("a", "echo", json!({}))],
                json!({}),
            ),
            "two phases are named `a`",
        ),
    ];
    for (spec, message) in cases {
        let err = host.queue.enqueue(spec).await.unwrap_err();
        assert!(
            matches!(
                err,
                QueueError::InvalidJob(_) | QueueError::UnknownPlugin(_)
            ),
            "{err:?}"
        );
        assert!(
            err.to_string().contains(message),
            "{err} should mention {message}"
        );
    }
    assert!(
        host.storage
            .jobs(Default::default())
            .await
            .unwrap()
            .jobs
            .is_empty()
    );
    assert_eq!(
        host.storage.last_event_seq().await.unwrap(),
        2,
        "only the upload's events"
    );
}

#[tokio::test]
async fn retryable_failures_back_off_and_then_succeed() {
    let mut host = Host::start(config(2)).await;
    host.upload("flaky", "1.0.0", plugin_artifacts::FLAKY).await;
    let spec = JobSpec {
        max_attempts: Some(3),
        backoff: Some(jobhost::model::BackoffPolicy {
            initial_ms: 50,
            multiplier: 2.0,
            max_ms: 1000,
            jitter: false,
        }),
        ..job(
            vec![phase("flaky", "flaky", json!({"fail_times": 2}))],
            json!({}),
        )
    };
    let created = host.enqueue(spec).await;
    let done = host.wait_until_finished(&created.id).await;
    assert_eq!(done.status, JobStatus::Completed);
    assert_eq!(done.attempt, 3);
    let errors: Vec<&str> = done.errors.iter().map(|e| e.error.as_str()).collect();
    assert_eq!(
        errors,
        [
            "phase failed and asked to be retried: planned failure 1 of 2",
            "phase failed and asked to be retried: planned failure 2 of 2"
        ]
    );
    let events = host.job_events(&created.id).await;
    let retries: Vec<_> = events
        .iter()
        .filter(|e| e.kind() == EventKind::JobRetrying)
        .collect();
    assert_eq!(retries.len(), 2);
    // The second retry waited at least its backoff (50 ms, then 100 ms).
    let second_start = events
        .iter()
        .filter(|e| e.kind() == EventKind::JobStarted)
        .nth(2)
        .unwrap();
    assert!(
        second_start.at - retries[1].at >= 100,
        "retried before its backoff"
    );
}

#[tokio::test]
async fn a_fail_error_fails_the_job_at_once() {
    let mut host = Host::start(config(2)).await;
    host.upload("fail", "1.0.0", plugin_artifacts::FAIL).await;
    host.upload("echo", "1.0.0", plugin_artifacts::ECHO).await;
    let spec = JobSpec {
        max_attempts: Some(5),
        ..job(
            vec![
                phase("bad", "fail", json!({"message": "no"})),
                phase("after", "echo", json!({})),
            ],
            json!({}),
        )
    };
    let created = host.enqueue(spec).await;
    let done = host.wait_until_finished(&created.id).await;
    assert_eq!(done.status, JobStatus::Failed);
    assert_eq!(done.attempt, 1, "not retried");
    assert_eq!(done.error.as_deref(), Some("phase failed: no"));
    assert_eq!(
        done.phases[1].status,
        jobhost::model::PhaseStatus::Cancelled,
        "no phase left pending"
    );
}
