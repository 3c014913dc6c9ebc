//! A claimed job's transitions, each guarded by its lease in the statement
//! that changes the row (so the row lock orders racing writers), with the
//! events each appends. A guard that does not hold changes nothing and
//! says why.

use std::collections::HashMap;

use futures::future::{BoxFuture, join_all};

use super::batch::{Kind, Outcome};
use super::plugin_limits;
use super::webhooks::Target;
use super::{Tx, WriteScope, corrupt, execute, query, query_opt};
use crate::model::event::{
    EndedAttempt, JobCancelled, JobCompleted, JobWaiting, PhaseCompleted, PhaseStarted,
};
use crate::model::{EventBody, EventKind, JobStatus, NewEvent, Progress, event};
use crate::storage::{
    AfterFailure, Claimed, Completion, Guarded, Lease, PhaseDone, PhaseFailed, PhaseStart, Result,
};

/// The guard every worker write puts on the job's row, with the lease in
/// `$1` (job id), `$2` (attempt) and `$3` (token).
const LEASE_HOLDS: &str = "EXISTS (SELECT 1 FROM jobs WHERE id = $1 AND status = 'running' AND attempt = $2 AND lease = $3)";

/// The same guard, locking the job's row while it holds (a cancel or a
/// recovery racing the write waits for its commit), in one statement with
/// the write: `WITH held AS (…)`.
const LOCK_IF_HELD: &str = "SELECT 1 FROM jobs
    WHERE id = $1 AND status = 'running' AND attempt = $2 AND lease = $3 FOR UPDATE";

fn lease_params(lease: &Lease) -> (i32, i64) {
    (lease.attempt as i32, lease.token)
}

/// Emits a job event. A terminal one also writes the job's webhook delivery
/// to the outbox, in the same transaction as the terminal state.
pub(super) async fn job_event(
    tx: &Tx<'_>,
    scope: &mut WriteScope,
    job_id: &str,
    body: EventBody,
    at: i64,
) -> Result<()> {
    if body.kind().is_job_terminal() {
        super::webhooks::enqueue(tx, scope, job_id, body.kind(), at).await?;
    }
    scope.emit(NewEvent::job(job_id, body), at);
    Ok(())
}

/// Locks the job's row and says whether it still runs under `lease`; if
/// not, why. Later statements of the transaction see the row as locked.
async fn hold_lease(tx: &Tx<'_>, lease: &Lease) -> Result<Guarded<()>> {
    let row = query_opt(
        tx,
        "SELECT status, attempt, lease FROM jobs WHERE id = $1 FOR UPDATE",
        &[&lease.job_id],
    )
    .await?;
    let job = row.as_ref().map(|row| (row.get(0), row.get(1), row.get(2)));
    Ok(lease_holds(lease, job))
}

/// Whether a job, as its row reads (status, attempt, lease; none if it is
/// gone), still runs under `lease`; if not, why.
fn lease_holds(lease: &Lease, job: Option<(&str, i32, i64)>) -> Guarded<()> {
    match job {
        Some((status, attempt, token)) if status == JobStatus::Running.as_str() => {
            match (attempt, token) == lease_params(lease) {
                true => Guarded::Applied(()),
                false => Guarded::Fenced,
            }
        }
        _ => Guarded::Stale,
    }
}

/// A lease check that did not hold, as the outcome of any write.
fn refusal<T>(held: Guarded<()>) -> Option<Guarded<T>> {
    match held {
        Guarded::Applied(()) => None,
        Guarded::Stale => Some(Guarded::Stale),
        Guarded::Fenced => Some(Guarded::Fenced),
    }
}

/// Why a guarded write changed nothing, given its lease check: the lease
/// is gone (fenced or stale), or the phase had moved on under it (stale).
fn why_refused<T>(held: Guarded<()>) -> Guarded<T> {
    match held {
        Guarded::Fenced => Guarded::Fenced,
        Guarded::Applied(()) | Guarded::Stale => Guarded::Stale,
    }
}

/// [`why_refused`], the job's row read (and locked) for it.
async fn refused<T>(tx: &Tx<'_>, lease: &Lease) -> Result<Guarded<T>> {
    Ok(why_refused(hold_lease(tx, lease).await?))
}

/// The condition on a phase (`p`) that its plugin has no limits: only
/// `start_phase` starts a phase of a plugin with limits.
pub(super) const FREELY_STARTED: &str =
    "NOT EXISTS (SELECT 1 FROM plugin_limits l WHERE l.plugin = p.plugin)";

/// Starts phase `index` of a job whose lease the caller holds, if the phase
/// is pending and (unless `limits_checked`) its plugin has no limits;
/// returns its attempt.
async fn start_pending_phase(
    tx: &Tx<'_>,
    scope: &mut WriteScope,
    job_id: &str,
    index: usize,
    limits_checked: bool,
    now: i64,
) -> Result<Option<u32>> {
    let row = query_opt(
        tx,
        &format!(
            "UPDATE phases p SET status = 'running', attempts = attempts + 1, started_at = $3,
                                 finished_at = NULL, progress = NULL
             WHERE job_id = $1 AND idx = $2 AND status = 'pending' AND ($4 OR {FREELY_STARTED})
             RETURNING name, plugin, version, attempts"
        ),
        &[&job_id, &(index as i32), &now, &limits_checked],
    )
    .await?;
    let Some(row) = row else { return Ok(None) };
    let started = PhaseStarted {
        phase: row.get(0),
        index,
        plugin: row.get(1),
        version: row.get(2),
        attempt: row.get::<_, i32>(3) as u32,
    };
    let attempt = started.attempt;
    job_event(tx, scope, job_id, EventBody::PhaseStarted(started), now).await?;
    Ok(Some(attempt))
}

/// Starts a pending phase of the leased job if its plugin has room and a
/// token for it (see `storage::plugin_limits`), or else makes the job wait
/// for the plugin.
pub(super) async fn start_phase(
    tx: &Tx<'_>,
    scope: &mut WriteScope,
    lease: &Lease,
    index: usize,
    now: i64,
) -> Result<Guarded<PhaseStart>> {
    if let Some(refusal) = refusal(hold_lease(tx, lease).await?) {
        return Ok(refusal);
    }
    let Some((name, slots)) = plugin_limits::of_pending_phase(tx, &lease.job_id, index).await?
    else {
        return Ok(Guarded::Stale);
    };
    let Some(slots) = slots else {
        return Ok(started(
            start_pending_phase(tx, scope, &lease.job_id, index, true, now).await?,
        ));
    };
    let Some(tokens) = slots.take(now) else {
        let waiting = JobWaiting {
            phase: name,
            index,
            plugin: slots.plugin,
        };
        wait_for_plugin(tx, scope, &lease.job_id, waiting, now).await?;
        return Ok(Guarded::Applied(PhaseStart::Waiting));
    };
    let attempt = start_pending_phase(tx, scope, &lease.job_id, index, true, now).await?;
    if attempt.is_some() {
        plugin_limits::hold_slot(tx, &lease.job_id, index, &slots.plugin, tokens, now).await?;
    }
    Ok(started(attempt))
}

/// What a start that found its phase pending (or not) says.
fn started(attempt: Option<u32>) -> Guarded<PhaseStart> {
    match attempt {
        Some(attempt) => Guarded::Applied(PhaseStart::Started(attempt)),
        None => Guarded::Stale,
    }
}

/// Moves a running job with no phase running to `waiting` for a plugin's
/// slot: not a failed attempt, so the attempt is not counted (its claim
/// counts it again).
async fn wait_for_plugin(
    tx: &Tx<'_>,
    scope: &mut WriteScope,
    job_id: &str,
    waiting: JobWaiting,
    now: i64,
) -> Result<()> {
    execute(
        tx,
        "UPDATE jobs SET status = 'waiting', waiting_for = $2, attempt = GREATEST(attempt - 1, 0)
         WHERE id = $1",
        &[&job_id, &waiting.plugin],
    )
    .await?;
    job_event(tx, scope, job_id, EventBody::JobWaiting(waiting), now).await
}

pub(super) async fn record_progress(
    tx: &Tx<'_>,
    lease: &Lease,
    index: usize,
    progress: &Progress,
) -> Result<()> {
    let progress = serde_json::to_string(progress).map_err(|e| corrupt("progress", e))?;
    let (attempt, token) = lease_params(lease);
    execute(
        tx,
        &format!(
            "UPDATE phases SET progress = $5 WHERE job_id = $1 AND idx = $4 AND status = 'running'
             AND {LEASE_HOLDS}"
        ),
        &[&lease.job_id, &attempt, &token, &(index as i32), &progress],
    )
    .await?;
    Ok(())
}

/// Phase completions, batched with completions: one statement completes
/// the batch's phases, and the jobs they end, each guarded by its lease.
/// What follows a completion (the next phase, a webhook delivery, why a
/// guard did not hold) is asked per write, pipelined.
pub(super) struct Completions;

/// The lease under which a phase completed, and what it did.
pub(super) type CompletionWrite = (Lease, PhaseDone);

impl Kind for Completions {
    type Write = CompletionWrite;
    type Outcome = PhaseCompletion;

    fn run<'a>(
        tx: &'a Tx<'a>,
        writes: Vec<&'a CompletionWrite>,
        scopes: &'a mut [WriteScope],
    ) -> BoxFuture<'a, Result<Vec<PhaseCompletion>>> {
        Box::pin(complete_phases(tx, writes, scopes))
    }
}

async fn complete_phases(
    tx: &Tx<'_>,
    writes: Vec<&CompletionWrite>,
    scopes: &mut [WriteScope],
) -> Result<Vec<PhaseCompletion>> {
    // A statement updates a row once however many of its inputs match it,
    // and would report each as done: a job's second write in a batch (a
    // repeated completion, or a fenced worker beside its successor) goes
    // in a second statement, which sees what the first did.
    let mut rounds: Vec<Vec<usize>> = Vec::new();
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (n, (lease, _)) in writes.iter().enumerate() {
        let round = seen.entry(lease.job_id.as_str()).or_default();
        if *round == rounds.len() {
            rounds.push(Vec::new());
        }
        rounds[*round].push(n);
        *round += 1;
    }
    let mut statuses: Vec<Option<PhaseOutcome>> = writes.iter().map(|_| None).collect();
    for round in rounds {
        let part: Vec<&CompletionWrite> = round.iter().map(|&n| writes[n]).collect();
        for (n, status) in round.into_iter().zip(complete_distinct(tx, &part).await?) {
            statuses[n] = Some(status);
        }
    }
    let followed = (writes.into_iter().zip(statuses).zip(scopes)).map(
        |(((lease, done), status), scope)| async move {
            match status.ok_or_else(|| corrupt("a batch of completions", "a write left out"))? {
                PhaseOutcome::Completed { ended } => {
                    after_completion(tx, scope, lease, done, ended).await
                }
                PhaseOutcome::Refused(refusal) => Ok(refusal.into()),
            }
        },
    );
    join_all(followed).await.into_iter().collect()
}

/// What [`complete_distinct`] did with one write.
enum PhaseOutcome {
    /// The phase completed; with where the job's webhook goes if the job
    /// completed with it.
    Completed { ended: Option<Option<Target>> },
    /// The lease no longer held, or the phase was not running.
    Refused(Guarded<Completion>),
}

/// Completes the phases of writes for distinct jobs, in one statement.
/// Unless its next phase is to start, a job completes in the statement
/// when the phase was its last unfinished one: its other phases are asked
/// for, since the statement does not see its own update. Every write's job
/// is locked, in job order as in every batch (two batches never wait for
/// each other's jobs in a cycle), and its lease is checked on the row
/// locked: the latest, should the lock have waited.
async fn complete_distinct(tx: &Tx<'_>, writes: &[&CompletionWrite]) -> Result<Vec<PhaseOutcome>> {
    let job_ids: Vec<&str> = (writes.iter())
        .map(|(lease, _)| lease.job_id.as_str())
        .collect();
    let usages = (writes.iter())
        .map(|(_, done)| serde_json::to_string(&done.usage))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| corrupt("usage", e))?;
    let column = |f: fn(&CompletionWrite) -> i64| writes.iter().map(|w| f(w)).collect::<Vec<_>>();
    let (attempts, tokens, indexes, nows) = (
        column(|(lease, _)| lease.attempt as i64),
        column(|(lease, _)| lease.token),
        column(|(_, done)| done.index as i64),
        column(|(_, done)| done.now),
    );
    let outputs: Vec<&str> = (writes.iter())
        .map(|(_, done)| done.output.as_str())
        .collect();
    let ends: Vec<bool> = (writes.iter()).map(|(_, done)| !done.start_next).collect();
    // Rows, in the writes' order: whether the phase completed; the job's
    // status, attempt and lease as locked; and the job's id and where its
    // webhook goes if it completed. (The input's columns are named apart
    // from the job's, which `Target::COLUMNS` names unqualified.)
    let rows = query(
        tx,
        &format!(
            "WITH input AS (
                 SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[],
                                      $5::text[], $6::text[], $7::bigint[], $8::boolean[])
                     WITH ORDINALITY
                     AS i(job_id, held_attempt, held_lease, idx, output, usage, at, ends, n)
             ), locked AS (
                 SELECT j.id, j.status, j.attempt, j.lease FROM jobs j JOIN input i ON j.id = i.job_id
                 ORDER BY j.id FOR UPDATE OF j
             ), held AS (
                 SELECT l.id FROM locked l JOIN input i ON l.id = i.job_id
                 WHERE l.status = 'running' AND l.attempt = i.held_attempt
                   AND l.lease = i.held_lease
             ), done AS (
                 UPDATE phases p SET status = 'completed', output = i.output, error = NULL,
                                     usage = i.usage, finished_at = i.at
                 FROM input i
                 WHERE p.job_id = i.job_id AND p.idx = i.idx AND p.status = 'running'
                   AND i.job_id IN (SELECT id FROM held)
                 RETURNING p.job_id
             ), job AS (
                 UPDATE jobs j SET status = 'completed', finished_at = i.at, error = NULL
                 FROM input i
                 WHERE j.id = i.job_id AND i.ends AND i.job_id IN (SELECT job_id FROM done)
                   AND NOT EXISTS (SELECT 1 FROM phases q
                                   WHERE q.job_id = i.job_id AND q.idx <> i.idx
                                     AND q.status <> 'completed')
                 RETURNING j.id, {}
             )
             SELECT i.job_id IN (SELECT job_id FROM done), l.status, l.attempt, l.lease, job.*
             FROM input i LEFT JOIN locked l ON l.id = i.job_id
             LEFT JOIN job ON job.id = i.job_id ORDER BY i.n",
            Target::COLUMNS
        ),
        &[
            &job_ids, &attempts, &tokens, &indexes, &outputs, &usages, &nows, &ends,
        ],
    )
    .await?;
    if rows.len() != writes.len() {
        return Err(corrupt("a batch of completions", "a write without its row"));
    }
    let statuses = (writes.iter().zip(&rows)).map(|((lease, _), row)| {
        if row.get::<_, bool>(0) {
            let ended = row.get::<_, Option<&str>>(4).is_some();
            return PhaseOutcome::Completed {
                ended: ended.then(|| Target::of_row(row, 5)),
            };
        }
        // The job as locked (none if it is gone).
        let job = (row.get::<_, Option<&str>>(1)).map(|status| (status, row.get(2), row.get(3)));
        PhaseOutcome::Refused(why_refused(lease_holds(lease, job)))
    });
    Ok(statuses.collect())
}

/// What follows a phase's completion: its event, and the job's completion
/// if the statement `ended` it (with where its webhook goes), or else its
/// next phase if it is to start.
async fn after_completion(
    tx: &Tx<'_>,
    scope: &mut WriteScope,
    lease: &Lease,
    done: &PhaseDone,
    ended: Option<Option<Target>>,
) -> Result<PhaseCompletion> {
    let completed = EventBody::PhaseCompleted(PhaseCompleted {
        phase: done.name.clone(),
        index: done.index,
        usage: done.usage,
    });
    job_event(tx, scope, &lease.job_id, completed, done.now).await?;
    let job_completed = if let Some(webhook) = ended {
        job_completed(tx, scope, &lease.job_id, webhook, done.now).await?;
        true
    } else if done.start_next {
        if let Some(attempt) =
            start_pending_phase(tx, scope, &lease.job_id, done.index + 1, false, done.now).await?
        {
            return Ok(Guarded::Applied(Completion::NextStarted(attempt)).into());
        }
        // No phase left to start: the job may be complete.
        complete_job(tx, scope, lease, done.now)
            .await?
            .applied()
            .is_some()
    } else {
        false
    };
    Ok(PhaseCompletion {
        outcome: Guarded::Applied(Completion::Recorded),
        claim_at: (done.claim_next && job_completed).then_some(done.now),
    })
}

/// A phase's completion as a batched write: the worker's next job, if it
/// may take one, is claimed by the batch (see `batch`).
pub(super) struct PhaseCompletion {
    pub(super) outcome: Guarded<Completion>,
    /// When to claim the worker's next job, if the job ended and the worker
    /// may take another.
    claim_at: Option<i64>,
}

impl From<Guarded<Completion>> for PhaseCompletion {
    fn from(outcome: Guarded<Completion>) -> Self {
        PhaseCompletion {
            outcome,
            claim_at: None,
        }
    }
}

impl Outcome for PhaseCompletion {
    fn wants_claim(&self) -> Option<i64> {
        self.claim_at
    }

    fn claimed(&mut self, next: Claimed) {
        self.outcome = Guarded::Applied(Completion::Claimed(Box::new(next)));
    }
}

/// Completes the leased job if all its phases completed.
pub(super) async fn complete_job(
    tx: &Tx<'_>,
    scope: &mut WriteScope,
    lease: &Lease,
    now: i64,
) -> Result<Guarded<()>> {
    let (attempt, token) = lease_params(lease);
    // Returns where its webhook goes: one statement fewer than asking.
    let completed = query_opt(
        tx,
        &format!(
            "UPDATE jobs SET status = 'completed', finished_at = $4, error = NULL
             WHERE id = $1 AND status = 'running' AND attempt = $2 AND lease = $3
               AND NOT EXISTS (SELECT 1 FROM phases WHERE job_id = $1 AND status <> 'completed')
             RETURNING {}",
            Target::COLUMNS
        ),
        &[&lease.job_id, &attempt, &token, &now],
    )
    .await?;
    let Some(completed) = completed else {
        return refused(tx, lease).await;
    };
    job_completed(tx, scope, &lease.job_id, Target::of_row(&completed, 0), now).await?;
    Ok(Guarded::Applied(()))
}

/// What a job's completion adds: its webhook delivery, if it has a
/// target, and its event.
async fn job_completed(
    tx: &Tx<'_>,
    scope: &mut WriteScope,
    job_id: &str,
    webhook: Option<Target>,
    now: i64,
) -> Result<()> {
    if let Some(target) = webhook {
        super::webhooks::add(tx, scope, job_id, EventKind::JobCompleted, target, now).await?;
    }
    let body = EventBody::JobCompleted(JobCompleted {});
    scope.emit(NewEvent::job(job_id, body), now);
    Ok(())
}

/// Phases that have not finished will not run: mark them cancelled.
async fn cancel_unfinished_phases(tx: &Tx<'_>, job_id: &str, now: i64) -> Result<()> {
    execute(
        tx,
        "UPDATE phases SET status = 'cancelled', finished_at = COALESCE(finished_at, $2)
         WHERE job_id = $1 AND status IN ('pending', 'running')",
        &[&job_id, &now],
    )
    .await?;
    Ok(())
}

/// Records the error of the job's current attempt.
pub(super) async fn record_attempt_error(
    tx: &Tx<'_>,
    job_id: &str,
    attempt: u32,
    phase: Option<&str>,
    error: &str,
    now: i64,
) -> Result<()> {
    execute(
        tx,
        "INSERT INTO attempt_errors (job_id, attempt, phase, error, at) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (job_id, attempt) DO UPDATE
         SET phase = EXCLUDED.phase, error = EXCLUDED.error, at = EXCLUDED.at",
        &[&job_id, &(attempt as i32), &phase, &error, &now],
    )
    .await?;
    Ok(())
}

pub(super) async fn fail_phase(
    tx: &Tx<'_>,
    scope: &mut WriteScope,
    lease: &Lease,
    failed: &PhaseFailed,
) -> Result<Guarded<()>> {
    let retrying = matches!(failed.after, AfterFailure::Retry { .. });
    let usage = failed
        .usage
        .as_ref()
        .map(serde_json::to_string)
        .transpose()
        .map_err(|e| corrupt("usage", e))?;
    let (attempt, token) = lease_params(lease);
    let changed = execute(
        tx,
        &format!(
            "WITH held AS ({LOCK_IF_HELD})
             UPDATE phases SET status = $5, error = $6, usage = $7, finished_at = $8
             WHERE job_id = $1 AND idx = $4 AND status = 'running' AND EXISTS (SELECT 1 FROM held)"
        ),
        &[
            &lease.job_id,
            &attempt,
            &token,
            &(failed.index as i32),
            &if retrying { "pending" } else { "failed" },
            &failed.error,
            &usage,
            &failed.now,
        ],
    )
    .await?;
    if changed == 0 {
        return refused(tx, lease).await;
    }
    let (job_id, attempt, now) = (&lease.job_id, lease.attempt, failed.now);
    record_attempt_error(tx, job_id, attempt, Some(&failed.name), &failed.error, now).await?;
    let event = EventBody::PhaseFailed(event::PhaseFailed {
        phase: failed.name.clone(),
        index: failed.index,
        attempt,
        error: failed.error.clone(),
        retrying,
    });
    job_event(tx, scope, job_id, event, now).await?;
    let ended = EndedAttempt {
        attempt,
        phase: Some(&failed.name),
        error: &failed.error,
        recovered: false,
    };
    end_attempt(tx, scope, job_id, &ended, &failed.after, now).await?;
    Ok(Guarded::Applied(()))
}

/// After a failed attempt: the job waits for its retry at `run_at`, or
/// fails with its unfinished phases marked as never to run.
pub(super) async fn end_attempt(
    tx: &Tx<'_>,
    scope: &mut WriteScope,
    job_id: &str,
    ended: &EndedAttempt<'_>,
    after: &AfterFailure,
    now: i64,
) -> Result<()> {
    match after {
        AfterFailure::Retry { run_at } => {
            scope.jobs_due = true;
            execute(
                tx,
                "UPDATE jobs SET status = 'pending', run_at = $2, error = $3 WHERE id = $1",
                &[&job_id, run_at, &ended.error],
            )
            .await?;
        }
        AfterFailure::Fail => {
            cancel_unfinished_phases(tx, job_id, now).await?;
            execute(
                tx,
                "UPDATE jobs SET status = 'failed', finished_at = $2, error = $3 WHERE id = $1",
                &[&job_id, &now, &ended.error],
            )
            .await?;
        }
    }
    let event = EventBody::attempt_ended(ended, after);
    job_event(tx, scope, job_id, event, now).await
}

/// Moves a job from `expected` to cancelled, with every unfinished phase.
pub(super) async fn cancel(
    tx: &Tx<'_>,
    scope: &mut WriteScope,
    job_id: &str,
    expected: JobStatus,
    now: i64,
) -> Result<bool> {
    let changed = execute(
        tx,
        "UPDATE jobs SET status = 'cancelled', finished_at = $2, error = 'cancelled'
         WHERE id = $1 AND status = $3",
        &[&job_id, &now, &expected.as_str()],
    )
    .await?;
    if changed == 0 {
        return Ok(false);
    }
    cancel_unfinished_phases(tx, job_id, now).await?;
    let cancelled = EventBody::JobCancelled(JobCancelled { was: expected });
    job_event(tx, scope, job_id, cancelled, now).await?;
    Ok(true)
}

/// Cancels the leased job; the stopped phase keeps what it used.
pub(super) async fn cancel_running(
    tx: &Tx<'_>,
    scope: &mut WriteScope,
    lease: &Lease,
    stopped: Option<&(usize, String)>,
    now: i64,
) -> Result<Guarded<()>> {
    if let Some(refusal) = refusal(hold_lease(tx, lease).await?) {
        return Ok(refusal);
    }
    cancel(tx, scope, &lease.job_id, JobStatus::Running, now).await?;
    if let Some((index, usage)) = stopped {
        execute(
            tx,
            "UPDATE phases SET usage = $3 WHERE job_id = $1 AND idx = $2",
            &[&lease.job_id, &(*index as i32), usage],
        )
        .await?;
    }
    Ok(Guarded::Applied(()))
}

/// Hands the leased job back between phases: it was not a failed attempt,
/// so the attempt is not counted.
pub(super) async fn release(
    tx: &Tx<'_>,
    scope: &mut WriteScope,
    lease: &Lease,
    now: i64,
) -> Result<Guarded<()>> {
    let (attempt, token) = lease_params(lease);
    let changed = execute(
        tx,
        "UPDATE jobs SET status = 'pending', run_at = $4, attempt = GREATEST(attempt - 1, 0)
         WHERE id = $1 AND status = 'running' AND attempt = $2 AND lease = $3
           AND NOT EXISTS (SELECT 1 FROM phases WHERE job_id = $1 AND status = 'running')",
        &[&lease.job_id, &attempt, &token, &now],
    )
    .await?;
    if changed == 0 {
        return refused(tx, lease).await;
    }
    scope.jobs_due = true;
    Ok(Guarded::Applied(()))
}
