//! The storage conformance suite: what the queue relies on from storage,
//! written once against the backend-neutral interface (`Arc<Storage>`) and
//! run for every backend by `on_each_backend!`. A new backend adds its
//! opener to `fixture::Backend` and a module to the macro; no test is
//! copied.
//!
//! Time is injected: every call passes its own `now`.

mod concurrency;
mod events;
mod jobs;
mod plugin_limits;
mod plugins;
pub mod races;
mod recovery;
mod schedules;

use std::sync::Arc;

use jobhost::model::{BackoffPolicy, Json};
use jobhost::storage::{
    Claimed, CreateOutcome, Lease, NewJob, NewPhase, NewPluginVersion, Storage,
};

use crate::fixture::{Backend, DataDir};
use serde_json::json;

/// A fresh, empty store of `backend`, and the directory it lives in.
pub async fn fresh(backend: Backend) -> (Arc<Storage>, DataDir) {
    let dir = DataDir::new(backend).await;
    (backend.open(&dir).await, dir)
}

use concurrency::a_keys_limit_holds_until_its_jobs_end;
use concurrency::a_keys_rate_spaces_its_starts;
use concurrency::a_retried_keyed_job_rejoins_the_rotation;
use concurrency::claims_go_round_robin_across_keys;
use concurrency::concurrent_claimers_respect_a_keys_limit;
use concurrency::enqueues_racing_claims_never_strand_a_keys_jobs;
use concurrency::idle_keys_keep_their_turn_until_forgotten;
use concurrency::prefix_and_default_limits_apply_to_each_key;
use events::an_ending_job_with_a_webhook_adds_one_delivery;
use events::the_log_reads_back_in_order_by_cursor_and_filter;
use jobs::a_completion_starts_the_next_phase_and_logs_both;
use jobs::a_failed_attempt_retries_or_fails_as_the_queue_decides;
use jobs::a_manual_retry_keeps_completed_phases_unless_from_start;
use jobs::a_released_job_runs_again_without_counting_the_attempt;
use jobs::an_idempotency_key_returns_the_first_job;
use jobs::cancel_takes_a_pending_job_and_leaves_a_running_one_to_its_worker;
use jobs::claims_take_the_highest_priority_then_the_earliest_due;
use jobs::completing_a_job_can_claim_the_workers_next_one;
use jobs::created_and_claimed_jobs_read_back_as_returned;
use plugin_limits::a_new_limit_counts_the_phases_already_running;
use plugin_limits::a_plugins_limit_holds_and_waiting_jobs_hold_no_worker;
use plugin_limits::a_plugins_rate_spaces_its_starts;
use plugin_limits::concurrent_starts_respect_a_plugins_limit;
use plugins::grants_replace_the_old_ones_and_go_with_the_plugin;
use plugins::resources_are_set_on_the_plugin_and_logged;
use races::a_bad_write_among_concurrent_creates_fails_alone;
use races::a_cancel_racing_a_completion_ends_the_job_once;
use races::a_transition_replayed_after_an_unknown_outcome_changes_nothing;
use races::concurrent_claimers_never_share_a_job;
use races::one_idempotency_key_submitted_at_once_creates_one_job;
use recovery::a_job_claimed_again_fences_its_old_worker;
use recovery::recovery_applies_the_queues_decision_to_every_running_job;
use recovery::retention_deletes_old_finished_jobs_and_logs_their_deletion;
use schedules::a_schedule_is_stored_replaced_paused_and_deleted;
use schedules::a_tick_fires_once_and_moves_the_schedule_on;
use schedules::hosts_firing_one_tick_at_once_enqueue_one_job;

crate::fixture::on_each_backend! {
    created_and_claimed_jobs_read_back_as_returned,
    a_completion_starts_the_next_phase_and_logs_both,
    claims_take_the_highest_priority_then_the_earliest_due,
    an_idempotency_key_returns_the_first_job,
    a_failed_attempt_retries_or_fails_as_the_queue_decides,
    a_manual_retry_keeps_completed_phases_unless_from_start,
    cancel_takes_a_pending_job_and_leaves_a_running_one_to_its_worker,
    a_released_job_runs_again_without_counting_the_attempt,
    completing_a_job_can_claim_the_workers_next_one,
    recovery_applies_the_queues_decision_to_every_running_job,
    a_job_claimed_again_fences_its_old_worker,
    retention_deletes_old_finished_jobs_and_logs_their_deletion,
    an_ending_job_with_a_webhook_adds_one_delivery,
    the_log_reads_back_in_order_by_cursor_and_filter,
    concurrent_claimers_never_share_a_job,
    one_idempotency_key_submitted_at_once_creates_one_job,
    a_bad_write_among_concurrent_creates_fails_alone,
    a_cancel_racing_a_completion_ends_the_job_once,
    a_transition_replayed_after_an_unknown_outcome_changes_nothing,
    grants_replace_the_old_ones_and_go_with_the_plugin,
    resources_are_set_on_the_plugin_and_logged,
    a_schedule_is_stored_replaced_paused_and_deleted,
    a_tick_fires_once_and_moves_the_schedule_on,
    hosts_firing_one_tick_at_once_enqueue_one_job,
    a_keys_limit_holds_until_its_jobs_end,
    claims_go_round_robin_across_keys,
    prefix_and_default_limits_apply_to_each_key,
    a_retried_keyed_job_rejoins_the_rotation,
    concurrent_claimers_respect_a_keys_limit,
    enqueues_racing_claims_never_strand_a_keys_jobs,
    a_keys_rate_spaces_its_starts,
    idle_keys_keep_their_turn_until_forgotten,
    a_plugins_limit_holds_and_waiting_jobs_hold_no_worker,
    a_plugins_rate_spaces_its_starts,
    concurrent_starts_respect_a_plugins_limit,
    a_new_limit_counts_the_phases_already_running,
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
        concurrency_key: None,
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
        claim_next: false,
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
