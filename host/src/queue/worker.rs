//! Running one claimed job: its unfinished phases in order, each output
//! stored as soon as its phase completes. The worker decides every outcome;
//! storage records it only if the job is still running.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Shared, recovery_policy};
use crate::metrics::PhaseLabels;
use crate::model::event::PhaseProgress;
use crate::model::{Event, EventBody, Job, Phase, PhaseStatus, Progress, ResourceUsage};
use crate::runtime::{LoadedPlugin, PhaseFailure, PhaseResult, PhaseRun, ProgressSink, RunGrants};
use crate::storage::{
    AfterFailure, Claimed, Completion, Guarded, Lease, PhaseDone, PhaseFailed, PhaseStart,
    RecoveryScope,
};

/// Why a job stopped before its next phase.
enum Stop {
    /// A user cancelled it.
    Cancelled,
    /// Shutdown or pause: hand it back to the queue.
    HandBack,
}

/// After a failed write, recovery is tried again this long after, doubling
/// up to [`MAX_RECOVERY_PAUSE`].
const FIRST_RECOVERY_PAUSE: Duration = Duration::from_millis(100);
const MAX_RECOVERY_PAUSE: Duration = Duration::from_secs(30);

/// Runs a claimed job, then each job its completions claim for this worker
/// (see [`JobStore::complete_phase`](crate::storage::JobStore::complete_phase)),
/// in the slot the first one took. Returns the id of the last job it ran,
/// which still holds the slot.
pub(super) async fn run_job(
    shared: &Arc<Shared>,
    claimed: Claimed,
    cancel: CancellationToken,
) -> String {
    let mut next = Some((claimed, cancel));
    let mut last = String::new();
    while let Some((Claimed { job, lease }, cancel)) = next.take() {
        last.clone_from(&lease.job_id);
        match run_phases(shared, job, &lease, &cancel).await {
            Ok(claimed) => next = claimed,
            Err(error) => {
                tracing::error!(%error, job = %lease.job_id, "worker could not record a job transition; recovering the job");
                recover_after_failed_write(shared, &lease).await;
            }
        }
    }
    last
}

/// Whether a guarded write went through; a refused one means the job is no
/// longer this worker's to move, and it stops.
fn holds<T>(outcome: Guarded<T>, lease: &Lease) -> Option<T> {
    if matches!(outcome, Guarded::Fenced) {
        tracing::warn!(job = %lease.job_id, "the job runs under a newer claim: this worker stops");
    }
    outcome.applied()
}

/// A job whose transition could not be recorded (a full disk, say) must not
/// stay `running` forever: it is recovered as a crash would recover it,
/// retrying with backoff until storage takes the write. At shutdown it is
/// left to the recovery at the next start.
async fn recover_after_failed_write(shared: &Shared, lease: &Lease) {
    let mut pause = FIRST_RECOVERY_PAUSE;
    loop {
        let now = shared.now();
        let policy = recovery_policy("storage failed to record its progress", now);
        let scope = RecoveryScope::Job(lease.clone());
        match shared.storage.recover_jobs(scope, policy, now).await {
            Ok(recovered) => {
                if !recovered.is_empty() {
                    shared.wake.notify_one();
                }
                return;
            }
            Err(error) => {
                tracing::warn!(%error, job = %lease.job_id, "recovering the job failed; trying again")
            }
        }
        tokio::select! {
            () = shared.draining.cancelled() => return,
            () = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(MAX_RECOVERY_PAUSE);
    }
}

fn stop_reason(shared: &Shared, job_id: &str, cancel: &CancellationToken) -> Option<Stop> {
    let fenced = shared.is_fenced(job_id);
    if cancel.is_cancelled() && !shared.force.is_cancelled() && !fenced {
        Some(Stop::Cancelled)
    } else if shared.draining.is_cancelled() || shared.paused.load(Ordering::SeqCst) || fenced {
        Some(Stop::HandBack)
    } else {
        None
    }
}

/// A job claimed for this worker as its previous one completed, with the
/// cancellation token it was registered under.
type NextJob = Option<(Claimed, CancellationToken)>;

async fn run_phases(
    shared: &Arc<Shared>,
    mut job: Job,
    lease: &Lease,
    cancel: &CancellationToken,
) -> anyhow::Result<NextJob> {
    let storage = &shared.storage;
    let Some(first) = job.next_phase() else {
        // Nothing was left to run (the last phase's completion completes
        // the job otherwise).
        storage.complete_job(lease, shared.now()).await?;
        return Ok(None);
    };
    // The claim started the first phase; each completion starts the next
    // in the same write unless the job is to stop there.
    let mut started = (first.status == PhaseStatus::Running).then_some(first.attempts);
    let first = first.index;
    for index in first..job.phases.len() {
        let attempt = match started.take() {
            Some(attempt) => attempt,
            None => {
                if let Some(between_phases) = &shared.config.between_phases {
                    between_phases(&job.id, index, cancel).await;
                }
                match stop_reason(shared, &job.id, cancel) {
                    Some(Stop::Cancelled) => {
                        storage
                            .cancel_running_job(lease, None, shared.now())
                            .await?;
                        return Ok(None);
                    }
                    Some(Stop::HandBack) => {
                        storage.release_job(lease, shared.now()).await?;
                        return Ok(None);
                    }
                    None => {}
                }
                let started = storage.start_phase(lease, index, shared.now()).await?;
                match holds(started, lease) {
                    Some(PhaseStart::Started(attempt)) => attempt,
                    // The job waits for its plugin, and gives this worker
                    // back.
                    Some(PhaseStart::Waiting) => return Ok(None),
                    None => return Ok(None), // moved on underneath us
                }
            }
        };
        let result = run_phase(shared, &job, lease, index, attempt, cancel).await;
        match result.outcome {
            Ok(output) => {
                let last = index + 1 == job.phases.len();
                let start_next = !last
                    && stop_reason(shared, &job.id, cancel).is_none()
                    && shared.config.between_phases.is_none();
                let done = PhaseDone {
                    index,
                    name: job.phases[index].name.clone(),
                    output: output.clone(),
                    usage: result.usage,
                    start_next,
                    claim_next: last && shared.may_claim(),
                    now: shared.now(),
                };
                let completion = storage.complete_phase(lease, done).await?;
                slot_freed(shared, &job.phases[index].plugin).await;
                match holds(completion, lease) {
                    None => return Ok(None),
                    Some(Completion::Recorded) => {}
                    Some(Completion::NextStarted(attempt)) => started = Some(attempt),
                    Some(Completion::Claimed(next)) => {
                        // The slot passes from this job to the next. A
                        // cancel of the next that comes first waits for
                        // this (see `Queue::cancel`).
                        let mut slots = shared.running.lock().await;
                        slots.remove(&job.id);
                        let cancel = shared.force.child_token();
                        slots.insert(next.job.id.clone(), cancel.clone());
                        shared.worker_done.notify_waiters();
                        return Ok(Some((*next, cancel)));
                    }
                }
                job.phases[index].output = Some(output);
            }
            Err(failure) => {
                let usage = Some(result.usage);
                record_failure(shared, &job, lease, index, failure, usage, cancel).await?;
                slot_freed(shared, &job.phases[index].plugin).await;
                return Ok(None);
            }
        }
    }
    Ok(None)
}

/// After a phase of `plugin` ended: if the plugin has limits, jobs may wait
/// for the slot it left, which a claim wakes. The dispatcher here is
/// woken, and hosts that share the database are told.
async fn slot_freed(shared: &Shared, plugin: &str) {
    if !shared.plugins.limits_starts(plugin) {
        return;
    }
    shared.wake.notify_one();
    if let Err(error) = shared.storage.plugin_slot_freed(plugin).await {
        tracing::warn!(%error, plugin, "could not tell other hosts that a plugin has room");
    }
}

async fn run_phase(
    shared: &Arc<Shared>,
    job: &Job,
    lease: &Lease,
    index: usize,
    attempt: u32,
    cancel: &CancellationToken,
) -> PhaseResult {
    let phase = &job.phases[index];
    let (plugin, granted) = match prepare(shared, &job.id, phase).await {
        Ok(prepared) => prepared,
        Err(failure) => {
            return PhaseResult {
                outcome: Err(failure),
                log: Default::default(),
                usage: Default::default(),
                last_progress: None,
            };
        }
    };
    // Progress is live-only: each report (rate-limited by the runtime) goes
    // straight to the bus, and only the last one is stored, on the phase.
    let report_progress: ProgressSink = {
        let (bus, job_id, name, clock) = (
            shared.bus.clone(),
            job.id.clone(),
            phase.name.clone(),
            shared.config.clock.clone(),
        );
        Arc::new(move |p: Progress| {
            let body = EventBody::PhaseProgress(PhaseProgress {
                phase: name.clone(),
                percent: p.percent,
                note: p.note,
            });
            bus.publish_live(Event::live(&job_id, clock(), body));
        })
    };
    let run = PhaseRun {
        job_id: job.id.clone(),
        phase: phase.name.clone(),
        attempt,
        config: crate::model::json::text(&phase.config),
        payload: job.payload.as_str().to_owned(),
        previous: job.outputs_before(index),
        timeout: Duration::from_millis(phase.timeout_ms),
        cancel: cancel.clone(),
        progress: Some(report_progress),
        granted,
        memory_limit: shared.plugins.memory_limit(&phase.plugin),
    };
    let result = shared.plugins.runtime().run(&plugin, run).await;
    if let Some(progress) = &result.last_progress
        && let Err(error) = shared.storage.record_progress(lease, index, progress).await
    {
        tracing::warn!(%error, "could not record a phase's last progress");
    }
    let outcome = result
        .outcome
        .as_ref()
        .map_or_else(PhaseFailure::kind, |_| "completed");
    let labels = PhaseLabels {
        plugin: phase.plugin.clone(),
        outcome: outcome.into(),
    };
    shared
        .config
        .metrics
        .phase_duration
        .get_or_create(&labels)
        .observe(result.usage.wall_ms as f64 / 1000.0);
    result
}

/// The phase's plugin version, loaded, and what its run may read through
/// `wasi:config/store` and call through `wasi:http` (the grants in force
/// now; read only for plugins that import either).
async fn prepare(
    shared: &Shared,
    job_id: &str,
    phase: &Phase,
) -> Result<(Arc<LoadedPlugin>, Option<Arc<RunGrants>>), PhaseFailure> {
    let plugin = shared
        .plugins
        .load(&phase.plugin, &phase.version)
        .await
        .map_err(|error| PhaseFailure::Fail(format!("cannot load plugin: {error}")))?;
    if !plugin.uses_grants {
        return Ok((plugin, None));
    }
    let granted = shared
        .plugins
        .granted_config(&phase.plugin, &phase.version, job_id)
        .await
        .map_err(|error| {
            PhaseFailure::Retry(format!("cannot read the plugin's grants: {error}"))
        })?;
    Ok((plugin, Some(Arc::new(granted))))
}

async fn record_failure(
    shared: &Shared,
    job: &Job,
    lease: &Lease,
    index: usize,
    failure: PhaseFailure,
    usage: Option<ResourceUsage>,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    let storage = &shared.storage;
    let now = shared.now();
    // The host stopped the phase: shutting down, or fencing itself.
    let interruption = match failure {
        PhaseFailure::Cancelled if shared.force.is_cancelled() => Some("interrupted by shutdown"),
        // However the phase ended once stopped (a guest may notice and
        // return an error of its own).
        _ if shared.is_fenced(&job.id) => Some("interrupted: this host could not renew its lease"),
        _ => None,
    };
    // A user's cancel ends the job however its phase ended: a guest that
    // noticed `cancelled()` and returned an error is not to be retried.
    if matches!(stop_reason(shared, &job.id, cancel), Some(Stop::Cancelled)) {
        let stopped = usage.map(|usage| (index, usage));
        storage.cancel_running_job(lease, stopped, now).await?;
        return Ok(());
    }
    let message = match interruption {
        Some(interruption) => interruption.to_owned(),
        None => failure.to_string(),
    };
    let retryable = failure.is_retryable() || interruption.is_some();
    let after = if retryable && job.attempt < job.max_attempts {
        let delay = job.backoff.delay(job.attempt, fastrand::f64());
        AfterFailure::Retry {
            run_at: now + delay.as_millis() as i64,
        }
    } else {
        AfterFailure::Fail
    };
    let failed = PhaseFailed {
        index,
        name: job.phases[index].name.clone(),
        error: message,
        usage,
        after,
        now,
    };
    holds(storage.fail_phase(lease, failed).await?, lease);
    Ok(())
}
