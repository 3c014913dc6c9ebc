//! The dispatcher (claims due jobs and starts a worker for each) and the
//! retention sweep.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{QueueError, Shared, worker};
use crate::storage::{Claimed, RecoveryScope};

/// Pause after a storage error before claiming again.
const ERROR_BACKOFF: Duration = Duration::from_secs(1);
/// How often the jobs of hosts whose lease expired are looked for.
const REAP_EVERY: Duration = Duration::from_secs(2);
/// How often concurrency keys with no pending or running job are forgotten
/// (until then an idle key keeps its turn in the rotation).
const FORGET_IDLE_KEYS_EVERY: Duration = Duration::from_secs(60);
/// Jobs deleted per retention transaction.
const PURGE_BATCH: usize = 500;

/// Claims due jobs while there are free slots, then sleeps until woken (a
/// job was enqueued or retried, a worker finished, a limited plugin's
/// phase ended, the queue resumed) or until the earliest scheduled job is
/// due. Returns when the queue drains,
/// never in the middle of a claim: shutdown waits for it rather than abort
/// it, so that every claimed job gets its worker.
pub(super) async fn dispatch(shared: Arc<Shared>) {
    while !shared.draining.is_cancelled() {
        let wait_for_due = match claim(&shared).await {
            Ok(slot_left) => slot_left,
            Err(error) => {
                tracing::error!(%error, "claiming jobs failed");
                tokio::select! {
                    () = tokio::time::sleep(ERROR_BACKOFF) => continue,
                    () = shared.draining.cancelled() => return,
                }
            }
        };
        let next_due = if wait_for_due {
            shared.storage.next_due_at().await.ok().flatten()
        } else {
            None
        };
        let timer = async {
            match next_due {
                Some(at) => {
                    let wait = Duration::from_millis(at.saturating_sub(shared.now()).max(0) as u64);
                    tokio::time::sleep(wait).await
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = shared.wake.notified() => {}
            () = timer => {}
            () = shared.draining.cancelled() => return,
        }
    }
}

/// Claims a due job for each free slot (none while paused) and spawns their
/// workers. Returns whether a slot is left free because nothing more was
/// due. Slots are counted under the lock that enqueues also take to claim.
async fn claim(shared: &Arc<Shared>) -> Result<bool, QueueError> {
    let mut running = shared.running.lock().await;
    let free = if !shared.may_claim() {
        0
    } else {
        shared.config.concurrency.saturating_sub(running.len())
    };
    if free == 0 {
        return Ok(false);
    }
    let claims = shared.storage.claim_due_jobs(shared.now(), free).await?;
    let slot_left = claims.len() < free;
    for claimed in claims {
        let cancel = shared.force.child_token();
        running.insert(claimed.job.id.clone(), cancel.clone());
        spawn_worker(shared, claimed, cancel);
    }
    Ok(slot_left)
}

/// Runs a claimed job whose cancellation token is in `running`, and frees
/// its slot when done.
pub(super) fn spawn_worker(shared: &Arc<Shared>, claimed: Claimed, cancel: CancellationToken) {
    let shared = shared.clone();
    shared.workers.clone().spawn(async move {
        let id = worker::run_job(&shared, claimed, cancel).await;
        shared.running.lock().await.remove(&id);
        shared.fenced.lock().expect("never poisoned").remove(&id);
        shared.wake.notify_one();
        shared.worker_done.notify_waiters();
    });
}

/// Runs `task` every `period` until the queue drains (never in the middle
/// of a run).
async fn every<F: Future<Output = ()>>(
    shared: &Shared,
    period: Duration,
    mut task: impl FnMut() -> F,
) {
    let mut ticker = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = shared.draining.cancelled() => return,
        }
        task().await;
    }
}

/// Deletes finished jobs older than the retention age, periodically, until
/// the queue drains.
pub(super) async fn retention(shared: Arc<Shared>) {
    let Some(age) = shared.config.retention else {
        return;
    };
    every(&shared, shared.config.retention_interval, || async {
        let cutoff = shared.now() - age.as_millis() as i64;
        match purge(&shared, cutoff).await {
            Ok(ids) if !ids.is_empty() => tracing::info!(deleted = ids.len(), "retention sweep"),
            Ok(_) => {}
            Err(error) => tracing::error!(%error, "retention sweep failed"),
        }
    })
    .await
}

pub(super) async fn purge(shared: &Shared, cutoff: i64) -> Result<Vec<String>, QueueError> {
    let mut deleted = Vec::new();
    loop {
        let batch = shared
            .storage
            .delete_finished_before(cutoff, PURGE_BATCH, shared.now())
            .await?;
        let done = batch.len() < PURGE_BATCH || shared.draining.is_cancelled();
        deleted.extend(batch);
        if done {
            return Ok(deleted);
        }
    }
}

/// Recovers, periodically until the queue drains, the jobs of other hosts
/// sharing the database whose lease expired (a database one host owns has
/// none), as a crash of theirs: requeued with the interrupted phase on
/// record, or failed when out of attempts.
pub(super) async fn reap(shared: Arc<Shared>) {
    every(&shared, REAP_EVERY, || async {
        let now = shared.now();
        let policy = super::recovery_policy("its host stopped renewing its lease", now);
        match shared
            .storage
            .recover_jobs(RecoveryScope::ExpiredHosts, policy, now)
            .await
        {
            Ok(recovered) => {
                for job in &recovered {
                    tracing::warn!(job = %job.job_id, phase = ?job.phase, attempt = job.attempt, requeued = job.requeued, "recovered a job of a host whose lease expired");
                }
                if recovered.iter().any(|job| job.requeued) {
                    shared.wake.notify_one();
                }
            }
            Err(error) => tracing::error!(%error, "recovering the jobs of expired hosts failed"),
        }
    })
    .await
}

/// Forgets, periodically until the queue drains, the concurrency keys that
/// have no pending or running job, so that the rotation holds only keys in
/// use however many keys come and go.
pub(super) async fn forget_idle_keys(shared: Arc<Shared>) {
    every(&shared, FORGET_IDLE_KEYS_EVERY, || async {
        if let Err(error) = shared.storage.forget_idle_keys().await {
            tracing::error!(%error, "forgetting idle concurrency keys failed");
        }
    })
    .await
}
