//! Per-plugin limits: at most `max_running` phases of a plugin run at once
//! and at most `per_second` start each second; a job whose phase finds the
//! plugin full waits without a worker, and is woken (and claimed again)
//! when the plugin has room.

use std::sync::Arc;

use jobhost::model::{JobStatus, PluginLoad, PluginResources};
use jobhost::storage::{CancelOutcome, Claimed, Guarded, PhaseStart, Storage};

use super::{create, done, fresh, job, kinds, with_echo};
use crate::fixture::Backend;

async fn limit_echo(store: &Arc<Storage>, max_running: Option<u32>, per_second: Option<f64>) {
    let resources = PluginResources {
        max_running,
        per_second,
        ..PluginResources::default()
    };
    assert!(
        store
            .set_plugin_resources("echo", resources, 1)
            .await
            .unwrap()
    );
}

async fn start(store: &Arc<Storage>, claimed: &Claimed, now: i64) -> PhaseStart {
    match store.start_phase(&claimed.lease, 0, now).await.unwrap() {
        Guarded::Applied(start) => start,
        other => panic!("the start was refused: {other:?}"),
    }
}

async fn status(store: &Arc<Storage>, id: &str) -> JobStatus {
    store.job_status(id).await.unwrap().unwrap()
}

/// Claims every job due at `now`: their ids.
async fn claim(store: &Arc<Storage>, now: i64) -> Vec<Claimed> {
    store.claim_due_jobs(now, 10).await.unwrap()
}

/// A claim leaves the phase of a limited plugin to `start_phase`, which
/// starts it while the plugin has room; a job that finds it full waits,
/// holding no worker and no attempt, until a phase of the plugin ends; a
/// waiting job can be cancelled; lifting the limit wakes every waiting job.
pub async fn a_plugins_limit_holds_and_waiting_jobs_hold_no_worker(backend: Backend) {
    let (store, _dir) = fresh(backend).await;
    with_echo(&store).await;
    limit_echo(&store, Some(1), None).await;
    create(&store, job("a", 1)).await;
    create(&store, job("b", 1)).await;
    let claimed = claim(&store, 2_000).await;
    assert_eq!(claimed.len(), 2);
    for c in &claimed {
        assert_eq!(
            c.job.phases[0].status,
            jobhost::model::PhaseStatus::Pending,
            "a limited plugin's phase is not started by the claim"
        );
    }
    assert_eq!(
        start(&store, &claimed[0], 2_000).await,
        PhaseStart::Started(1)
    );
    assert_eq!(start(&store, &claimed[1], 2_000).await, PhaseStart::Waiting);
    let waiting = store.job("b").await.unwrap().unwrap();
    assert_eq!(waiting.status, JobStatus::Waiting);
    assert_eq!(waiting.attempt, 0, "waiting is not a failed attempt");
    assert_eq!(kinds(&store, "b").await.last(), Some(&"job:waiting"));
    assert_eq!(
        store
            .start_phase(&claimed[1].lease, 0, 2_000)
            .await
            .unwrap(),
        Guarded::Stale,
        "the waiting job's lease is gone"
    );
    assert!(claim(&store, 2_000).await.is_empty(), "the plugin is full");
    assert_eq!(store.next_due_at().await.unwrap(), None);
    assert_eq!(store.pending_count().await.unwrap(), 1);
    let load = PluginLoad {
        plugin: "echo".into(),
        running: 1,
        waiting: 1,
        max_running: Some(1),
        per_second: None,
    };
    assert_eq!(store.plugin_loads().await.unwrap(), vec![load]);

    let outcome = store.complete_phase(&claimed[0].lease, done(0, false, 3_000));
    assert!(matches!(outcome.await.unwrap(), Guarded::Applied(_)));
    assert!(
        store
            .next_due_at()
            .await
            .unwrap()
            .is_some_and(|at| at <= 3_000)
    );
    let woken = claim(&store, 3_000).await;
    assert_eq!(woken.len(), 1, "the waiting job is woken and claimed");
    assert_eq!((woken[0].job.id.as_str(), woken[0].job.attempt), ("b", 1));
    assert_eq!(
        start(&store, &woken[0], 3_000).await,
        PhaseStart::Started(1)
    );

    // A waiting job is cancelled like a pending one.
    create(&store, job("c", 1)).await;
    let c = claim(&store, 3_000).await.remove(0);
    assert_eq!(start(&store, &c, 3_000).await, PhaseStart::Waiting);
    assert_eq!(
        store.cancel_pending_job("c", 3_000).await.unwrap(),
        CancelOutcome::Cancelled
    );
    assert_eq!(status(&store, "c").await, JobStatus::Cancelled);

    // Lifting the limit wakes the jobs waiting for it; their phase starts
    // in the claim again.
    create(&store, job("d", 1)).await;
    let d = claim(&store, 3_000).await.remove(0);
    assert_eq!(start(&store, &d, 3_000).await, PhaseStart::Waiting);
    limit_echo(&store, None, None).await;
    assert_eq!(status(&store, "d").await, JobStatus::Pending);
    assert!(store.plugin_loads().await.unwrap().is_empty());
    let d = claim(&store, 3_000).await.remove(0);
    assert_eq!(d.job.phases[0].status, jobhost::model::PhaseStatus::Running);
}

/// A plugin's rate spaces the starts of its phases: a job that finds the
/// bucket empty waits, and the next token is the dispatcher's next wake-up.
pub async fn a_plugins_rate_spaces_its_starts(backend: Backend) {
    let (store, _dir) = fresh(backend).await;
    with_echo(&store).await;
    limit_echo(&store, None, Some(1.0)).await;
    create(&store, job("a", 1)).await;
    create(&store, job("b", 1)).await;
    let claimed = claim(&store, 2_000).await;
    assert_eq!(
        start(&store, &claimed[0], 2_000).await,
        PhaseStart::Started(1)
    );
    assert_eq!(start(&store, &claimed[1], 2_000).await, PhaseStart::Waiting);
    assert_eq!(store.next_due_at().await.unwrap(), Some(3_000));
    assert!(claim(&store, 2_500).await.is_empty(), "no token yet");
    let woken = claim(&store, 3_000).await;
    assert_eq!(woken.len(), 1);
    assert_eq!(
        start(&store, &woken[0], 3_000).await,
        PhaseStart::Started(1)
    );
}

/// Starts racing for a plugin's slots, from many writers at once (on
/// PostgreSQL, many transactions): exactly `max_running` start.
pub async fn concurrent_starts_respect_a_plugins_limit(backend: Backend) {
    let (store, _dir) = fresh(backend).await;
    with_echo(&store).await;
    limit_echo(&store, Some(2), None).await;
    for i in 0..8 {
        create(&store, job(&format!("j-{i}"), 1)).await;
    }
    let claimed = store.claim_due_jobs(2_000, 8).await.unwrap();
    assert_eq!(claimed.len(), 8);
    let starts = claimed.into_iter().map(|c| {
        let store = store.clone();
        tokio::spawn(async move { start(&store, &c, 2_000).await })
    });
    let mut started = 0;
    for outcome in futures::future::join_all(starts).await {
        if matches!(outcome.unwrap(), PhaseStart::Started(_)) {
            started += 1;
        }
    }
    assert_eq!(started, 2);
    let loads = store.plugin_loads().await.unwrap();
    assert_eq!((loads[0].running, loads[0].waiting), (2, 6));
}

/// A limit set while phases of the plugin run counts them: the next start
/// waits for them.
pub async fn a_new_limit_counts_the_phases_already_running(backend: Backend) {
    let (store, _dir) = fresh(backend).await;
    with_echo(&store).await;
    create(&store, job("a", 1)).await;
    let a = claim(&store, 2_000).await.remove(0);
    assert_eq!(
        a.job.phases[0].status,
        jobhost::model::PhaseStatus::Running,
        "started in the claim: echo has no limit yet"
    );
    limit_echo(&store, Some(1), None).await;
    create(&store, job("b", 1)).await;
    let b = claim(&store, 2_000).await.remove(0);
    assert_eq!(start(&store, &b, 2_000).await, PhaseStart::Waiting);
    assert_eq!(store.plugin_loads().await.unwrap()[0].running, 1);
}
