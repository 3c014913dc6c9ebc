//! Recovery (the queue decides, storage records), fencing, retention.

use std::sync::Arc;

use jobhost::model::{JobStatus, PhaseStatus};
use jobhost::storage::{
    AfterFailure, Completion, DeleteOutcome, Guarded, Interrupted, NewJob, Recovery,
    RecoveryPolicy, RecoveryScope,
};

use super::{create, done, fresh, job, kinds, other_token, running, with_echo};
use crate::fixture::Backend;

/// A policy that requeues at `run_at` while attempts remain, and records
/// what it was asked about.
fn requeue_while_attempts_remain(
    run_at: i64,
    asked: Arc<std::sync::Mutex<Vec<Interrupted>>>,
) -> RecoveryPolicy {
    Arc::new(move |job: &Interrupted| {
        asked.lock().unwrap().push(job.clone());
        let after = if job.attempt < job.max_attempts {
            AfterFailure::Retry { run_at }
        } else {
            AfterFailure::Fail
        };
        Recovery {
            error: format!("lost during {:?}", job.phase.as_ref().map(|(_, name)| name)),
            after,
        }
    })
}

/// Recovery hands every running job to the queue's policy, with the phase
/// that was interrupted, and records what the policy decided.
pub async fn recovery_applies_the_queues_decision_to_every_running_job(backend: Backend) {
    let (store, _dir) = fresh(backend).await;
    with_echo(&store).await;
    running(&store, job("again", 2)).await;
    let last_try = running(
        &store,
        NewJob {
            max_attempts: 1,
            ..job("last-try", 2)
        },
    )
    .await;
    store
        .complete_phase(&last_try.lease, done(0, false, 2_100))
        .await
        .unwrap();
    create(
        &store,
        NewJob {
            run_at: 50_000,
            ..job("waiting", 1)
        },
    )
    .await;

    let asked = Arc::default();
    let policy = requeue_while_attempts_remain(7_000, Arc::clone(&asked));
    let mut recovered = store
        .recover_jobs(RecoveryScope::AtStart, policy, 3_000)
        .await
        .unwrap();
    recovered.sort_by(|a, b| a.job_id.cmp(&b.job_id));
    let summary: Vec<_> = recovered
        .iter()
        .map(|r| (r.job_id.as_str(), r.phase.as_deref(), r.requeued))
        .collect();
    assert_eq!(
        summary,
        [("again", Some("p0"), true), ("last-try", None, false)]
    );
    let asked = asked.lock().unwrap().len();
    assert_eq!(asked, 2, "only the running jobs are asked about");

    let again = store.job("again").await.unwrap().unwrap();
    assert_eq!((again.status, again.run_at), (JobStatus::Pending, 7_000));
    assert_eq!(again.phases[0].status, PhaseStatus::Pending);
    assert_eq!(again.errors[0].error, r#"lost during Some("p0")"#);
    let ended = store.job("last-try").await.unwrap().unwrap();
    assert_eq!(ended.status, JobStatus::Failed);
    assert_eq!(
        ended.phases[1].status,
        PhaseStatus::Cancelled,
        "will not run"
    );
    assert_eq!(kinds(&store, "last-try").await.last(), Some(&"job:failed"));
    assert_eq!(
        store.job_status("waiting").await.unwrap(),
        Some(JobStatus::Pending)
    );
}

/// A worker whose job was recovered and claimed again can write nothing:
/// its lease is fenced; the new claim's writes go through.
pub async fn a_job_claimed_again_fences_its_old_worker(backend: Backend) {
    let (store, _dir) = fresh(backend).await;
    with_echo(&store).await;
    let old = running(&store, job("job-1", 2)).await;
    let asked = Arc::default();
    let policy = requeue_while_attempts_remain(2_500, asked);
    let recovered = store
        .recover_jobs(RecoveryScope::Job(old.lease.clone()), policy.clone(), 2_400)
        .await
        .unwrap();
    assert_eq!(recovered.len(), 1);
    // A second recovery under the same lease finds nothing to do.
    let twice = store
        .recover_jobs(RecoveryScope::Job(old.lease.clone()), policy, 2_450)
        .await
        .unwrap();
    assert!(twice.is_empty());

    let new = store.claim_due_jobs(2_500, 1).await.unwrap().remove(0);
    assert_eq!(new.lease.attempt, 2);
    assert_eq!(
        store
            .complete_phase(&old.lease, done(0, true, 2_600))
            .await
            .unwrap(),
        Guarded::Fenced
    );
    assert_eq!(
        store.start_phase(&old.lease, 1, 2_600).await.unwrap(),
        Guarded::Fenced
    );
    assert_eq!(
        store
            .cancel_running_job(&old.lease, None, 2_600)
            .await
            .unwrap(),
        Guarded::Fenced
    );
    let forged = other_token(&new.lease, new.lease.token + 1);
    assert_eq!(
        store.complete_job(&forged, 2_600).await.unwrap(),
        Guarded::Fenced
    );
    assert_eq!(
        store
            .complete_phase(&new.lease, done(0, true, 2_700))
            .await
            .unwrap(),
        Guarded::Applied(Completion::NextStarted(1))
    );
    let stored = store.job("job-1").await.unwrap().unwrap();
    assert_eq!(stored.status, JobStatus::Running);
    assert_eq!(stored.phases[0].finished_at, Some(2_700));
}

/// Retention deletes terminal jobs that finished before the cutoff, with
/// their history, leaving only `job:deleted` in the log.
pub async fn retention_deletes_old_finished_jobs_and_logs_their_deletion(backend: Backend) {
    let (store, _dir) = fresh(backend).await;
    with_echo(&store).await;
    let old = running(&store, job("old", 1)).await;
    store
        .complete_phase(&old.lease, done(0, false, 3_000))
        .await
        .unwrap();
    let recent = running(&store, job("recent", 1)).await;
    store
        .complete_phase(&recent.lease, done(0, false, 8_000))
        .await
        .unwrap();
    create(
        &store,
        NewJob {
            run_at: 1,
            ..job("pending", 1)
        },
    )
    .await;

    let deleted = store
        .delete_finished_before(5_000, 100, 9_000)
        .await
        .unwrap();
    assert_eq!(deleted, ["old"]);
    assert_eq!(store.job("old").await.unwrap(), None);
    assert_eq!(kinds(&store, "old").await, ["job:deleted"]);
    assert!(store.job("recent").await.unwrap().is_some());
    assert!(store.job("pending").await.unwrap().is_some());
    // A user's delete: only a finished job.
    assert_eq!(
        store.delete_job("pending", 9_100).await.unwrap(),
        DeleteOutcome::NotTerminal(JobStatus::Pending)
    );
    assert_eq!(
        store.delete_job("recent", 9_100).await.unwrap(),
        DeleteOutcome::Deleted
    );
    assert_eq!(
        store.delete_job("recent", 9_100).await.unwrap(),
        DeleteOutcome::NotFound
    );
}
