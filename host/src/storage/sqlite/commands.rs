//! What users ask for, beside the workers' transitions: cancelling a
//! pending job, retrying a finished one, deleting one.

use rusqlite::{Connection, params};

use super::rows::{job_status, must_load};
use super::transitions::{cancel, job_event};
use super::writer::EventLog;
use crate::model::event::{JobDeleted, JobRetrying, ManualRetry};
use crate::model::{EventBody, JobStatus};
use crate::storage::{CancelOutcome, DeleteOutcome, Result, RetryOutcome};

pub(super) fn cancel_if_pending(
    conn: &Connection,
    log: &mut EventLog,
    job_id: &str,
    now: i64,
) -> Result<CancelOutcome> {
    Ok(match job_status(conn, job_id)? {
        None => CancelOutcome::NotFound,
        Some(status @ (JobStatus::Pending | JobStatus::Waiting)) => {
            cancel(conn, log, job_id, status, now)?;
            CancelOutcome::Cancelled
        }
        // One host owns the database.
        Some(JobStatus::Running) => CancelOutcome::Running { on_this_host: true },
        Some(status) => CancelOutcome::AlreadyFinished(status),
    })
}

pub(super) fn retry(
    conn: &Connection,
    log: &mut EventLog,
    job_id: &str,
    from_start: bool,
    now: i64,
) -> Result<RetryOutcome> {
    match job_status(conn, job_id)? {
        None => return Ok(RetryOutcome::NotFound),
        Some(JobStatus::Failed | JobStatus::Cancelled) => {}
        Some(status) => return Ok(RetryOutcome::NotRetryable(status)),
    }
    if from_start {
        conn.execute(
            "UPDATE phases SET status = 'pending', output = NULL, error = NULL, usage = NULL, progress = NULL, attempts = 0,
                               started_at = NULL, finished_at = NULL
             WHERE job_id = ?1",
            [job_id],
        )?;
    } else {
        conn.execute(
            "UPDATE phases SET status = 'pending', error = NULL, started_at = NULL, finished_at = NULL
             WHERE job_id = ?1 AND status != 'completed'",
            [job_id],
        )?;
    }
    conn.execute(
        "UPDATE jobs SET status = 'pending', run_at = ?2, attempt = 0, finished_at = NULL, error = NULL WHERE id = ?1",
        params![job_id, now],
    )?;
    let retrying = JobRetrying::Manual(ManualRetry {
        manual: true,
        from_start,
        run_at: now,
    });
    job_event(conn, log, job_id, EventBody::JobRetrying(retrying), now)?;
    Ok(RetryOutcome::Retried(Box::new(must_load(conn, job_id)?)))
}

pub(super) fn delete(
    conn: &Connection,
    log: &mut EventLog,
    job_id: &str,
    now: i64,
) -> Result<DeleteOutcome> {
    match job_status(conn, job_id)? {
        None => Ok(DeleteOutcome::NotFound),
        Some(status) if !status.is_terminal() => Ok(DeleteOutcome::NotTerminal(status)),
        Some(_) => {
            delete_row(conn, log, job_id, now)?;
            Ok(DeleteOutcome::Deleted)
        }
    }
}

/// Deletes a job with its history: its phases, attempt errors, logged events
/// and settled webhook deliveries. Only the `job:deleted` event is left (it
/// carries only the deleted job's id), for watchers to replay.
pub(super) fn delete_row(
    conn: &Connection,
    log: &mut EventLog,
    job_id: &str,
    now: i64,
) -> Result<()> {
    conn.prepare_cached("DELETE FROM jobs WHERE id = ?1")?
        .execute([job_id])?;
    conn.prepare_cached("DELETE FROM events WHERE job_id = ?1")?
        .execute([job_id])?;
    // Settled deliveries go with their job; pending ones still go out.
    conn.prepare_cached(
        "DELETE FROM webhook_deliveries WHERE job_id = ?1 AND status != 'pending'",
    )?
    .execute([job_id])?;
    let deleted = EventBody::JobDeleted(JobDeleted {
        id: job_id.to_owned(),
    });
    job_event(conn, log, job_id, deleted, now)
}
