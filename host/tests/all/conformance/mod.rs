//! The storage conformance suite: what the queue relies on from storage,
//! written once against the backend-neutral interface (`Arc<Storage>`) and
//! run for every backend by [`for_each_backend!`]. A new backend adds its
//! opener to [`Fresh`] and a module to the macro; no test is copied.
//!
//! Time is injected: every call passes its own `now`.

mod events;
mod jobs;
mod races;
mod recovery;

use std::sync::Arc;

use jobhost::model::{BackoffPolicy, Json};
use jobhost::storage::{
    Claimed, CreateOutcome, Durability, Lease, NewJob, NewPhase, NewPluginVersion, Storage,
};
use serde_json::json;

/// A fresh, empty store of one backend, with what keeps it alive.
pub struct Fresh {
    pub store: Arc<Storage>,
    _dir: tempfile::TempDir,
}

impl Fresh {
    pub fn sqlite() -> Fresh {
        let dir = tempfile::tempdir().unwrap();
        let store =
            jobhost::storage::open_sqlite(&dir.path().join("jobhost.db"), Durability::Process)
                .unwrap();
        Fresh { store, _dir: dir }
    }
}

/// Instantiates each listed test (an `async fn(Arc<Storage>)`) once per
/// backend, as `conformance::<backend>::<test>`.
macro_rules! for_each_backend {
    ($($module:ident :: $test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    let fresh = super::Fresh::sqlite();
                    super::$module::$test(fresh.store.clone()).await;
                    fresh.store.close().await;
                }
            )*
        }
    };
}

for_each_backend! {
    jobs::created_and_claimed_jobs_read_back_as_returned,
    jobs::a_completion_starts_the_next_phase_and_logs_both,
    jobs::claims_take_the_highest_priority_then_the_earliest_due,
    jobs::an_idempotency_key_returns_the_first_job,
    jobs::a_failed_attempt_retries_or_fails_as_the_queue_decides,
    jobs::a_manual_retry_keeps_completed_phases_unless_from_start,
    jobs::cancel_takes_a_pending_job_and_leaves_a_running_one_to_its_worker,
    jobs::a_released_job_runs_again_without_counting_the_attempt,
    recovery::recovery_applies_the_queues_decision_to_every_running_job,
    recovery::a_job_claimed_again_fences_its_old_worker,
    recovery::retention_deletes_old_finished_jobs_and_logs_their_deletion,
    events::an_ending_job_with_a_webhook_adds_one_delivery,
    events::the_log_reads_back_in_order_by_cursor_and_filter,
    races::concurrent_claimers_never_share_a_job,
    races::one_idempotency_key_submitted_at_once_creates_one_job,
    races::a_cancel_racing_a_completion_ends_the_job_once,
    races::a_transition_replayed_after_an_unknown_outcome_changes_nothing,
}

/// Stores `echo` 1.0.0 (active) and 2.0.0, which [`job`] pins.
pub async fn with_echo(store: &Arc<Storage>) {
    for version in ["1.0.0", "2.0.0"] {
        let new = NewPluginVersion {
            name: "echo".into(),
            version: version.into(),
            content_hash: format!("hash-{version}"),
            description: String::new(),
            component: vec![0; 8],
            quota: Default::default(),
        };
        store.put_plugin_version(new, 0).await.unwrap();
    }
}

/// A job of `phases` `echo` phases (the first on the active version, the
/// others on 2.0.0), due at 1,000, created at 900.
pub fn job(id: &str, phases: usize) -> NewJob {
    let phase = |index: usize| NewPhase {
        name: format!("p{index}"),
        plugin: "echo".into(),
        version: (index > 0).then(|| "2.0.0".into()),
        config: json!({"index": index}),
        timeout_ms: 1234,
    };
    NewJob {
        id: id.into(),
        payload: Json::from_value(&json!({"rows": [1, 2, 3], "note": "é"})),
        priority: 0,
        run_at: 1_000,
        max_attempts: 3,
        backoff: BackoffPolicy::default(),
        idempotency_key: None,
        webhook_url: None,
        webhook_secret: None,
        phases: (0..phases).map(phase).collect(),
        created_at: 900,
    }
}

/// Stores `new`, which must be created.
pub async fn create(store: &Arc<Storage>, new: NewJob) -> jobhost::model::Job {
    match store.create_job(new, None).await.unwrap() {
        CreateOutcome::Created(job, None) => job,
        other => panic!("not created as expected: {other:?}"),
    }
}

/// Stores a job and claims it (nothing else is due): its lease.
pub async fn running(store: &Arc<Storage>, new: NewJob) -> Claimed {
    let id = new.id.clone();
    create(store, new).await;
    let mut claimed = store.claim_due_jobs(2_000, 1).await.unwrap();
    assert_eq!(claimed.len(), 1, "one job claimed");
    let claimed = claimed.remove(0);
    assert_eq!(claimed.job.id, id);
    claimed
}

/// What completing phase `index` of a job writes, at `now`.
pub fn done(index: usize, start_next: bool, now: i64) -> jobhost::storage::PhaseDone {
    jobhost::storage::PhaseDone {
        index,
        name: format!("p{index}"),
        output: Json::parse(format!(r#"{{"done":{index}}}"#)).unwrap(),
        usage: Default::default(),
        start_next,
        now,
    }
}

/// The kinds of a job's logged events, in order.
pub async fn kinds(store: &Arc<Storage>, job_id: &str) -> Vec<&'static str> {
    let filter = jobhost::storage::EventFilter {
        job_id: Some(job_id.into()),
        kinds: vec![],
    };
    let events = store.events_after(0, filter, 1000).await.unwrap();
    events.iter().map(|event| event.kind().name()).collect()
}

/// A copy of `lease` with another token, as a stale worker would hold.
pub fn other_token(lease: &Lease, token: i64) -> Lease {
    Lease {
        token,
        ..lease.clone()
    }
}
