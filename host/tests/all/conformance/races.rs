//! Races that a single writer hides and a shared database does not: each
//! side runs at once, many times, and the outcome must be one of the
//! serial ones.

use std::collections::HashSet;

use jobhost::model::{EventKind, JobStatus};
use jobhost::storage::{Completion, CreateOutcome, ErrorClass, EventFilter, Guarded, NewJob};

use super::{create, done, fresh, job, kinds, running, with_echo};
use crate::fixture::Backend;

/// Claimers running at once never take the same job, and together take
/// every due job.
pub async fn concurrent_claimers_never_share_a_job(backend: Backend) {
    let (store, _dir) = fresh(backend).await;
    with_echo(&store).await;
    const JOBS: usize = 60;
    for i in 0..JOBS {
        create(&store, job(&format!("job-{i:02}"), 1)).await;
    }
    let claimers = (0..8).map(|_| {
        let store = store.clone();
        tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let claimed = store.claim_due_jobs(2_000, 3).await.unwrap();
                if claimed.is_empty() {
                    return mine;
                }
                mine.extend(claimed.into_iter().map(|c| c.job.id));
            }
        })
    });
    let mut all = Vec::new();
    for claimer in futures::future::join_all(claimers).await {
        all.extend(claimer.unwrap());
    }
    let distinct: HashSet<_> = all.iter().collect();
    assert_eq!(distinct.len(), all.len(), "a job was claimed twice");
    assert_eq!(all.len(), JOBS);
}

/// The same idempotency key submitted many times at once stores one job;
/// every other submit gets that job back.
pub async fn one_idempotency_key_submitted_at_once_creates_one_job(backend: Backend) {
    let (store, _dir) = fresh(backend).await;
    with_echo(&store).await;
    let submits = (0..12).map(|i| {
        let store = store.clone();
        tokio::spawn(async move {
            let new = NewJob {
                idempotency_key: Some("same".into()),
                ..job(&format!("try-{i}"), 1)
            };
            store.create_job(new, None).await.unwrap()
        })
    });
    let outcomes: Vec<_> = futures::future::join_all(submits)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let created: Vec<_> = outcomes
        .iter()
        .filter_map(|o| match o {
            CreateOutcome::Created(job, _) => Some(job.id.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(created.len(), 1, "{outcomes:?}");
    for outcome in &outcomes {
        match outcome {
            CreateOutcome::Existing(job) => assert_eq!(job.id, created[0]),
            CreateOutcome::Created(..) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(store.pending_count().await.unwrap(), 1);
}

/// Creates submitted at once, one of which cannot be stored (its id is
/// taken): it fails alone, and every other job is stored once, with its
/// event logged once. (Both backends group-commit writes that arrive
/// together; `group_commit` makes sure such a batch forms on PostgreSQL.)
pub async fn a_bad_write_among_concurrent_creates_fails_alone(backend: Backend) {
    let (store, _dir) = fresh(backend).await;
    with_echo(&store).await;
    create(&store, job("taken", 1)).await;
    let submits = (0..40).map(|i| {
        let store = store.clone();
        let id = if i == 20 {
            "taken".to_owned()
        } else {
            format!("new-{i}")
        };
        tokio::spawn(async move { (id.clone(), store.create_job(job(&id, 1), None).await) })
    });
    let outcomes = futures::future::join_all(submits).await;
    assert_each_stored_but_the_taken_one(outcomes.into_iter().map(Result::unwrap).collect());
    assert_eq!(store.pending_count().await.unwrap(), 40);
    for i in (0..40).filter(|i| *i != 20) {
        assert_eq!(kinds(&store, &format!("new-{i}")).await, ["job:created"]);
    }
    assert_eq!(kinds(&store, "taken").await, ["job:created"]);
}

/// Each create (job id, outcome) stored its job, but the one of the id
/// "taken", which was refused as a conflict.
pub fn assert_each_stored_but_the_taken_one(
    outcomes: Vec<(String, jobhost::storage::Result<CreateOutcome>)>,
) {
    for (id, outcome) in outcomes {
        match (id.as_str(), outcome) {
            ("taken", Err(error)) => assert_eq!(error.class(), ErrorClass::Conflict, "{error}"),
            (_, Ok(CreateOutcome::Created(job, None))) => assert_eq!(job.id, id),
            (id, other) => panic!("{id}: {other:?}"),
        }
    }
}

/// A cancel and the last phase's completion, at once: exactly one of them
/// ends the job, and the log holds exactly one terminal event.
pub async fn a_cancel_racing_a_completion_ends_the_job_once(backend: Backend) {
    let (store, _dir) = fresh(backend).await;
    with_echo(&store).await;
    for round in 0..20 {
        let id = format!("job-{round}");
        let claimed = running(&store, job(&id, 1)).await;
        let (cancel, complete) = tokio::join!(
            {
                let (store, lease) = (store.clone(), claimed.lease.clone());
                tokio::spawn(async move { store.cancel_running_job(&lease, None, 3_000).await })
            },
            {
                let (store, lease) = (store.clone(), claimed.lease.clone());
                tokio::spawn(
                    async move { store.complete_phase(&lease, done(0, false, 3_000)).await },
                )
            },
        );
        let (cancel, complete) = (cancel.unwrap().unwrap(), complete.unwrap().unwrap());
        let status = store.job_status(&id).await.unwrap().unwrap();
        match (&cancel, &complete) {
            (Guarded::Applied(()), Guarded::Stale) => assert_eq!(status, JobStatus::Cancelled),
            (Guarded::Stale, Guarded::Applied(Completion::Recorded)) => {
                assert_eq!(status, JobStatus::Completed)
            }
            other => panic!("round {round}: not a serial outcome: {other:?}"),
        }
        let terminal = kinds(&store, &id)
            .await
            .into_iter()
            .filter(|kind| EventKind::from_name(kind).unwrap().is_job_terminal())
            .count();
        assert_eq!(terminal, 1, "round {round}");
    }
}

/// A worker that did not learn whether its write committed sends it again:
/// the replay changes nothing and logs nothing.
pub async fn a_transition_replayed_after_an_unknown_outcome_changes_nothing(backend: Backend) {
    let (store, _dir) = fresh(backend).await;
    with_echo(&store).await;
    let claimed = running(&store, job("job-1", 2)).await;
    let first = done(0, true, 3_000);
    let outcome = store
        .complete_phase(&claimed.lease, first.clone())
        .await
        .unwrap();
    assert_eq!(outcome, Guarded::Applied(Completion::NextStarted(1)));
    let logged = store.last_event_seq().await.unwrap();
    let replayed = store.complete_phase(&claimed.lease, first).await.unwrap();
    assert_eq!(replayed, Guarded::Stale);
    assert_eq!(
        store.start_phase(&claimed.lease, 1, 3_100).await.unwrap(),
        Guarded::Stale
    );

    let failed = jobhost::storage::PhaseFailed {
        index: 1,
        name: "p1".into(),
        error: "boom".into(),
        usage: None,
        after: jobhost::storage::AfterFailure::Fail,
        now: 3_200,
    };
    assert_eq!(
        store
            .fail_phase(&claimed.lease, failed.clone())
            .await
            .unwrap(),
        Guarded::Applied(())
    );
    let after_failure = store.last_event_seq().await.unwrap();
    assert!(after_failure > logged);
    assert_eq!(
        store.fail_phase(&claimed.lease, failed).await.unwrap(),
        Guarded::Stale
    );
    assert_eq!(
        store.last_event_seq().await.unwrap(),
        after_failure,
        "nothing logged twice"
    );
    let stored = store.job("job-1").await.unwrap().unwrap();
    assert_eq!(stored.errors.len(), 1);
    let filter = EventFilter {
        job_id: Some("job-1".into()),
        kinds: vec![EventKind::PhaseCompleted],
    };
    assert_eq!(store.events_after(0, filter, 10).await.unwrap().len(), 1);
}
