//! Recovery of interrupted jobs (the queue's policy decides each one's
//! fate), and retention.

use rusqlite::{Connection, OptionalExtension, params};

use super::commands::delete_row;
use super::transitions::{end_attempt, record_attempt_error};
use super::writer::EventLog;
use crate::model::event::EndedAttempt;
use crate::storage::{AfterFailure, Interrupted, Recovered, RecoveryPolicy, RecoveryScope, Result};

/// Recovers the running jobs `scope` names, each as `policy` decides.
pub(super) fn recover(
    conn: &Connection,
    log: &mut EventLog,
    scope: &RecoveryScope,
    policy: &RecoveryPolicy,
    now: i64,
) -> Result<Vec<Recovered>> {
    let running: Vec<Interrupted> = match scope {
        // One host owns the database: none other can have expired.
        RecoveryScope::ExpiredHosts => Vec::new(),
        RecoveryScope::AtStart => conn
            .prepare_cached(
                "SELECT id, attempt, max_attempts FROM jobs WHERE status = 'running' ORDER BY id",
            )?
            .query_map([], interrupted_row)?
            .collect::<rusqlite::Result<_>>()?,
        RecoveryScope::Job(lease) => conn
            .prepare_cached(
                "SELECT id, attempt, max_attempts FROM jobs
                 WHERE id = ?1 AND status = 'running' AND attempt = ?2 AND lease = ?3",
            )?
            .query_map(
                params![lease.job_id, lease.attempt, lease.token],
                interrupted_row,
            )?
            .collect::<rusqlite::Result<_>>()?,
    };
    let mut recovered = Vec::with_capacity(running.len());
    for mut job in running {
        job.phase = conn
            .prepare_cached(
                "SELECT idx, name FROM phases WHERE job_id = ?1 AND status = 'running'",
            )?
            .query_row([&job.job_id], |row| {
                Ok((row.get::<_, i64>(0)? as usize, row.get(1)?))
            })
            .optional()?;
        let decision = policy(&job);
        let requeued = matches!(decision.after, AfterFailure::Retry { .. });
        let phase = job.phase.as_ref().map(|(_, name)| name.as_str());
        let (job_id, error) = (job.job_id.as_str(), decision.error.as_str());
        record_attempt_error(conn, job_id, job.attempt, phase, error, now)?;
        if let Some((index, _)) = &job.phase {
            let status = if requeued { "pending" } else { "failed" };
            conn.prepare_cached(
                "UPDATE phases SET status = ?3, error = ?4, finished_at = ?5 WHERE job_id = ?1 AND idx = ?2",
            )?
            .execute(params![job_id, *index as i64, status, error, now])?;
        }
        let ended = EndedAttempt {
            attempt: job.attempt,
            phase,
            error,
            recovered: true,
        };
        end_attempt(conn, log, job_id, &ended, &decision.after, now)?;
        recovered.push(Recovered {
            phase: phase.map(str::to_owned),
            job_id: job.job_id,
            attempt: job.attempt,
            requeued,
        });
    }
    Ok(recovered)
}

fn interrupted_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Interrupted> {
    Ok(Interrupted {
        job_id: row.get(0)?,
        attempt: row.get(1)?,
        max_attempts: row.get(2)?,
        phase: None,
    })
}

pub(super) fn delete_finished_before(
    conn: &Connection,
    log: &mut EventLog,
    cutoff: i64,
    limit: usize,
    now: i64,
) -> Result<Vec<String>> {
    // INDEXED BY: SQLite chose `jobs_status` and sorted every finished job
    // on each sweep otherwise.
    let ids: Vec<String> = conn
        .prepare_cached(
            "SELECT id FROM jobs INDEXED BY jobs_finished
             WHERE finished_at < ?1 AND status IN ('completed', 'failed', 'cancelled')
             ORDER BY finished_at LIMIT ?2",
        )?
        .query_map(params![cutoff, limit as i64], |row| row.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    // The log's other old entries go first: plugin events, and what was
    // logged about jobs that no longer exist (their `job:deleted`, late
    // webhook outcomes). Events of jobs still stored stay with them.
    conn.prepare_cached(
        "DELETE FROM events WHERE at < ?1 AND (job_id IS NULL OR job_id NOT IN (SELECT id FROM jobs))",
    )?
    .execute([cutoff])?;
    for id in &ids {
        delete_row(conn, log, id, now)?;
    }
    Ok(ids)
}
