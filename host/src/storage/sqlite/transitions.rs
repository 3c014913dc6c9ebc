//! A claimed job's transitions, each guarded by its lease: phases started,
//! completed and failed, the job completed, retried, failed, cancelled or
//! released, and the events each appends. A guard that does not hold
//! changes nothing and says why ([`Guarded::Stale`] or [`Guarded::Fenced`]).

use rusqlite::{Connection, OptionalExtension, params};

use super::corrupt;
use super::plugin_limits;
use super::writer::EventLog;
use crate::model::event::{
    EndedAttempt, JobCancelled, JobCompleted, JobWaiting, PhaseCompleted, PhaseStarted,
};
use crate::model::{EventBody, JobStatus, NewEvent, Progress, event};
use crate::storage::{
    AfterFailure, Completion, Guarded, Lease, PhaseDone, PhaseFailed, PhaseStart, Result,
};

/// The guard every worker write puts on the job's row, with the lease in
/// `?{n}` (job id), `?{n+1}` (attempt) and `?{n+2}` (token).
macro_rules! lease_holds {
    ($job:literal, $attempt:literal, $token:literal) => {
        concat!(
            "EXISTS (SELECT 1 FROM jobs WHERE id = ?",
            $job,
            " AND status = 'running' AND attempt = ?",
            $attempt,
            " AND lease = ?",
            $token,
            ")"
        )
    };
}

/// Emits a job event. A terminal one also writes the job's webhook delivery
/// to the outbox, in the same transaction as the terminal state.
pub(super) fn job_event(
    conn: &Connection,
    log: &mut EventLog,
    job_id: &str,
    body: EventBody,
    at: i64,
) -> Result<()> {
    if body.kind().is_job_terminal() {
        super::webhooks::enqueue(conn, log, job_id, body.kind(), at)?;
    }
    log.emit(conn, NewEvent::job(job_id, body), at)
}

/// Whether the job still runs under `lease`; if not, why.
pub(super) fn check_lease(conn: &Connection, lease: &Lease) -> Result<Guarded<()>> {
    let row: Option<(String, u32, i64)> = conn
        .prepare_cached("SELECT status, attempt, lease FROM jobs WHERE id = ?1")?
        .query_row([&lease.job_id], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })
        .optional()?;
    Ok(match row {
        Some((status, attempt, token)) if status == JobStatus::Running.as_str() => {
            if (attempt, token) == (lease.attempt, lease.token) {
                Guarded::Applied(())
            } else {
                Guarded::Fenced
            }
        }
        _ => Guarded::Stale,
    })
}

/// Why a guarded write changed nothing: the lease is gone (fenced or
/// stale), or the phase had moved on under it (stale).
fn refused<T>(conn: &Connection, lease: &Lease) -> Result<Guarded<T>> {
    Ok(match check_lease(conn, lease)? {
        Guarded::Fenced => Guarded::Fenced,
        Guarded::Applied(()) | Guarded::Stale => Guarded::Stale,
    })
}

/// Marks a phase running if it is pending and its plugin has no limits;
/// false if not (a phase of a plugin with limits starts only through
/// [`start_phase`]).
pub(super) fn mark_phase_running(
    conn: &Connection,
    job_id: &str,
    index: usize,
    now: i64,
) -> Result<bool> {
    let changed = conn
        .prepare_cached(
            "UPDATE phases SET status = 'running', attempts = attempts + 1, started_at = ?3, finished_at = NULL, progress = NULL
             WHERE job_id = ?1 AND idx = ?2 AND status = 'pending'
               AND NOT EXISTS (SELECT 1 FROM plugin_limits l WHERE l.plugin = phases.plugin)",
        )?
        .execute(params![job_id, index as i64, now])?;
    Ok(changed > 0)
}

/// Starts phase `index` of a job whose lease the caller has checked in this
/// write, if the phase is pending and its plugin has no limits; returns its
/// attempt. Reads back only what the event needs, after the update.
fn start_pending_phase(
    conn: &Connection,
    log: &mut EventLog,
    job_id: &str,
    index: usize,
    now: i64,
) -> Result<Option<u32>> {
    if !mark_phase_running(conn, job_id, index, now)? {
        return Ok(None);
    }
    Ok(Some(announce_started(conn, log, job_id, index, now)?))
}

/// Logs `job:phase:started` for a phase just marked running; its attempt.
fn announce_started(
    conn: &Connection,
    log: &mut EventLog,
    job_id: &str,
    index: usize,
    now: i64,
) -> Result<u32> {
    let started = conn
        .prepare_cached(
            "SELECT name, plugin, version, attempts FROM phases WHERE job_id = ?1 AND idx = ?2",
        )?
        .query_row(params![job_id, index as i64], |row| {
            Ok(PhaseStarted {
                phase: row.get(0)?,
                index,
                plugin: row.get(1)?,
                version: row.get(2)?,
                attempt: row.get(3)?,
            })
        })?;
    let attempt = started.attempt;
    job_event(conn, log, job_id, EventBody::PhaseStarted(started), now)?;
    Ok(attempt)
}

/// Starts a pending phase of the leased job if its plugin has room and a
/// token for it (see `storage::plugin_limits`), or else makes the job wait
/// for the plugin.
pub(super) fn start_phase(
    conn: &Connection,
    log: &mut EventLog,
    lease: &Lease,
    index: usize,
    now: i64,
) -> Result<Guarded<PhaseStart>> {
    match check_lease(conn, lease)? {
        Guarded::Applied(()) => {}
        Guarded::Stale => return Ok(Guarded::Stale),
        Guarded::Fenced => return Ok(Guarded::Fenced),
    }
    let Some((name, slots)) = plugin_limits::of_pending_phase(conn, &lease.job_id, index)? else {
        return Ok(Guarded::Stale);
    };
    if let Some(slots) = &slots {
        match slots.take(now) {
            Some(tokens) => plugin_limits::keep_tokens(conn, &slots.plugin, tokens, now)?,
            None => {
                let waiting = JobWaiting {
                    phase: name,
                    index,
                    plugin: slots.plugin.clone(),
                };
                wait_for_plugin(conn, log, &lease.job_id, waiting, now)?;
                return Ok(Guarded::Applied(PhaseStart::Waiting));
            }
        }
    }
    // A phase of a limited plugin holds one of its slots while it runs.
    conn.prepare_cached(
        "UPDATE phases SET status = 'running', attempts = attempts + 1, started_at = ?3, finished_at = NULL, progress = NULL,
                           holds_slot = ?4
         WHERE job_id = ?1 AND idx = ?2",
    )?
    .execute(params![lease.job_id, index as i64, now, slots.is_some()])?;
    let attempt = announce_started(conn, log, &lease.job_id, index, now)?;
    Ok(Guarded::Applied(PhaseStart::Started(attempt)))
}

/// Moves a running job with no phase running to `waiting` for a plugin's
/// slot: not a failed attempt, so the attempt is not counted (its claim
/// counts it again).
fn wait_for_plugin(
    conn: &Connection,
    log: &mut EventLog,
    job_id: &str,
    waiting: JobWaiting,
    now: i64,
) -> Result<()> {
    conn.prepare_cached(
        "UPDATE jobs SET status = 'waiting', waiting_for = ?2, attempt = MAX(attempt - 1, 0)
         WHERE id = ?1",
    )?
    .execute(params![job_id, waiting.plugin])?;
    job_event(conn, log, job_id, EventBody::JobWaiting(waiting), now)
}

pub(super) fn record_progress(
    conn: &Connection,
    lease: &Lease,
    index: usize,
    progress: &Progress,
) -> Result<()> {
    let progress = serde_json::to_string(progress).map_err(|e| corrupt("progress", e))?;
    conn.prepare_cached(concat!(
        "UPDATE phases SET progress = ?3 WHERE job_id = ?1 AND idx = ?2 AND status = 'running' AND ",
        lease_holds!(1, 4, 5)
    ))?
    .execute(params![
        lease.job_id,
        index as i64,
        progress,
        lease.attempt,
        lease.token
    ])?;
    Ok(())
}

pub(super) fn complete_phase(
    conn: &Connection,
    log: &mut EventLog,
    lease: &Lease,
    done: &PhaseDone,
) -> Result<Guarded<Completion>> {
    let usage = serde_json::to_string(&done.usage).map_err(|e| corrupt("usage", e))?;
    // The lease is checked in the same statement: one write, no extra read.
    let changed = conn
        .prepare_cached(concat!(
            "UPDATE phases SET status = 'completed', output = ?3, error = NULL, usage = ?4, finished_at = ?5
             WHERE job_id = ?1 AND idx = ?2 AND status = 'running' AND ",
            lease_holds!(1, 6, 7)
        ))?
        .execute(params![
            lease.job_id,
            done.index as i64,
            done.output.as_str(),
            usage,
            done.now,
            lease.attempt,
            lease.token
        ])?;
    if changed == 0 {
        return refused(conn, lease);
    }
    let completed = EventBody::PhaseCompleted(PhaseCompleted {
        phase: done.name.clone(),
        index: done.index,
        usage: done.usage,
    });
    job_event(conn, log, &lease.job_id, completed, done.now)?;
    // The update above found the lease holding.
    if done.start_next
        && let Some(attempt) =
            start_pending_phase(conn, log, &lease.job_id, done.index + 1, done.now)?
    {
        return Ok(Guarded::Applied(Completion::NextStarted(attempt)));
    }
    // The job completes in the same write when this was its last phase,
    // and the worker may take its next job in it too.
    let completed = complete_job(conn, log, lease, done.now)?;
    if done.claim_next
        && completed.applied().is_some()
        && let Some(next) = super::claim::claim(conn, log, done.now, 1)?.pop()
    {
        return Ok(Guarded::Applied(Completion::Claimed(Box::new(next))));
    }
    Ok(Guarded::Applied(Completion::Recorded))
}

/// Completes the leased job if all its phases completed.
pub(super) fn complete_job(
    conn: &Connection,
    log: &mut EventLog,
    lease: &Lease,
    now: i64,
) -> Result<Guarded<()>> {
    let changed = conn
        .prepare_cached(
            "UPDATE jobs SET status = 'completed', finished_at = ?2, error = NULL
             WHERE id = ?1 AND status = 'running' AND attempt = ?3 AND lease = ?4
               AND NOT EXISTS (SELECT 1 FROM phases WHERE job_id = ?1 AND status != 'completed')",
        )?
        .execute(params![lease.job_id, now, lease.attempt, lease.token])?;
    if changed == 0 {
        return refused(conn, lease);
    }
    let completed = EventBody::JobCompleted(JobCompleted {});
    job_event(conn, log, &lease.job_id, completed, now)?;
    Ok(Guarded::Applied(()))
}

/// Phases that have not finished will not run: mark them cancelled.
pub(super) fn cancel_unfinished_phases(conn: &Connection, job_id: &str, now: i64) -> Result<()> {
    conn.prepare_cached(
        "UPDATE phases SET status = 'cancelled', finished_at = COALESCE(finished_at, ?2)
         WHERE job_id = ?1 AND status IN ('pending', 'running')",
    )?
    .execute(params![job_id, now])?;
    Ok(())
}

/// Records the error of the job's current attempt.
pub(super) fn record_attempt_error(
    conn: &Connection,
    job_id: &str,
    attempt: u32,
    phase: Option<&str>,
    error: &str,
    now: i64,
) -> Result<()> {
    conn.prepare_cached(
        "INSERT OR REPLACE INTO attempt_errors (job_id, attempt, phase, error, at) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![job_id, attempt, phase, error, now])?;
    Ok(())
}

pub(super) fn fail_phase(
    conn: &Connection,
    log: &mut EventLog,
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
    let changed = conn
        .prepare_cached(concat!(
            "UPDATE phases SET status = ?3, error = ?4, usage = ?5, finished_at = ?6
             WHERE job_id = ?1 AND idx = ?2 AND status = 'running' AND ",
            lease_holds!(1, 7, 8)
        ))?
        .execute(params![
            lease.job_id,
            failed.index as i64,
            if retrying { "pending" } else { "failed" },
            failed.error,
            usage,
            failed.now,
            lease.attempt,
            lease.token
        ])?;
    if changed == 0 {
        return refused(conn, lease);
    }
    let (job_id, attempt, now) = (&lease.job_id, lease.attempt, failed.now);
    record_attempt_error(
        conn,
        job_id,
        attempt,
        Some(&failed.name),
        &failed.error,
        now,
    )?;
    let event = EventBody::PhaseFailed(event::PhaseFailed {
        phase: failed.name.clone(),
        index: failed.index,
        attempt,
        error: failed.error.clone(),
        retrying,
    });
    job_event(conn, log, job_id, event, now)?;
    let ended = EndedAttempt {
        attempt,
        phase: Some(&failed.name),
        error: &failed.error,
        recovered: false,
    };
    end_attempt(conn, log, job_id, &ended, &failed.after, now)?;
    Ok(Guarded::Applied(()))
}

/// After a failed attempt: the job waits for its retry at `run_at`, or
/// fails with its unfinished phases marked as never to run.
pub(super) fn end_attempt(
    conn: &Connection,
    log: &mut EventLog,
    job_id: &str,
    ended: &EndedAttempt<'_>,
    after: &AfterFailure,
    now: i64,
) -> Result<()> {
    match after {
        AfterFailure::Retry { run_at } => {
            conn.prepare_cached(
                "UPDATE jobs SET status = 'pending', run_at = ?2, error = ?3 WHERE id = ?1",
            )?
            .execute(params![job_id, run_at, ended.error])?;
        }
        AfterFailure::Fail => {
            cancel_unfinished_phases(conn, job_id, now)?;
            conn.prepare_cached(
                "UPDATE jobs SET status = 'failed', finished_at = ?2, error = ?3 WHERE id = ?1",
            )?
            .execute(params![job_id, now, ended.error])?;
        }
    }
    let event = EventBody::attempt_ended(ended, after);
    job_event(conn, log, job_id, event, now)
}

/// Moves a job from `expected` to cancelled, with every unfinished phase.
pub(super) fn cancel(
    conn: &Connection,
    log: &mut EventLog,
    job_id: &str,
    expected: JobStatus,
    now: i64,
) -> Result<bool> {
    let changed = conn.prepare_cached(
        "UPDATE jobs SET status = 'cancelled', finished_at = ?2, error = 'cancelled' WHERE id = ?1 AND status = ?3",
    )?
    .execute(params![job_id, now, expected.as_str()])?;
    if changed == 0 {
        return Ok(false);
    }
    cancel_unfinished_phases(conn, job_id, now)?;
    let cancelled = EventBody::JobCancelled(JobCancelled { was: expected });
    job_event(conn, log, job_id, cancelled, now)?;
    Ok(true)
}

/// Cancels the leased job; the stopped phase keeps what it used.
pub(super) fn cancel_running(
    conn: &Connection,
    log: &mut EventLog,
    lease: &Lease,
    stopped: Option<&(usize, String)>,
    now: i64,
) -> Result<Guarded<()>> {
    if let refusal @ (Guarded::Stale | Guarded::Fenced) = check_lease(conn, lease)? {
        return Ok(refusal);
    }
    cancel(conn, log, &lease.job_id, JobStatus::Running, now)?;
    if let Some((index, usage)) = stopped {
        conn.prepare_cached("UPDATE phases SET usage = ?3 WHERE job_id = ?1 AND idx = ?2")?
            .execute(params![lease.job_id, *index as i64, usage])?;
    }
    Ok(Guarded::Applied(()))
}

/// Hands the leased job back between phases: it was not a failed attempt,
/// so the attempt is not counted.
pub(super) fn release(conn: &Connection, lease: &Lease, now: i64) -> Result<Guarded<()>> {
    let changed = conn
        .prepare_cached(
            "UPDATE jobs SET status = 'pending', run_at = ?2, attempt = MAX(attempt - 1, 0)
             WHERE id = ?1 AND status = 'running' AND attempt = ?3 AND lease = ?4
               AND NOT EXISTS (SELECT 1 FROM phases WHERE job_id = ?1 AND status = 'running')",
        )?
        .execute(params![lease.job_id, now, lease.attempt, lease.token])?;
    if changed == 0 {
        return refused(conn, lease);
    }
    Ok(Guarded::Applied(()))
}
