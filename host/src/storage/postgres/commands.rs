//! What users and chores ask for, beside the workers' transitions:
//! cancelling a pending job, retrying or deleting a finished one, recovery
//! of interrupted jobs (the queue's policy decides each one's fate), and
//! retention. Each locks the job's row before deciding from its status.

use super::rows::{must_load, phases_of};
use super::transitions::{cancel, end_attempt, job_event, record_attempt_error};
use super::{Tx, WriteScope, corrupt, execute, query, query_one, query_opt};
use crate::model::event::{EndedAttempt, JobDeleted, JobRetrying, ManualRetry};
use crate::model::{EventBody, JobStatus, PhaseStatus};
use crate::storage::{
    AfterFailure, CancelOutcome, DeleteOutcome, Interrupted, Recovered, RecoveryPolicy,
    RecoveryScope, Result, RetryOutcome,
};

/// The advisory locks of the chores that run on one host at a time.
const REAPER_LOCK: i64 = 0x6a6f_6268_6f73_7403;
const RETENTION_LOCK: i64 = 0x6a6f_6268_6f73_7404;

/// The job's status, with its row locked until the transaction ends.
async fn locked_status(tx: &Tx<'_>, job_id: &str) -> Result<Option<JobStatus>> {
    Ok(locked(tx, job_id).await?.map(|(status, _)| status))
}

/// The job's status and the host whose worker runs it, with its row
/// locked until the transaction ends.
async fn locked(tx: &Tx<'_>, job_id: &str) -> Result<Option<(JobStatus, Option<String>)>> {
    let row = query_opt(
        tx,
        "SELECT status, owner FROM jobs WHERE id = $1 FOR UPDATE",
        &[&job_id],
    )
    .await?;
    row.map(|row| {
        let status: &str = row.get(0);
        let status = JobStatus::parse(status).ok_or_else(|| corrupt("job status", status))?;
        Ok((status, row.get(1)))
    })
    .transpose()
}

pub(super) async fn cancel_if_pending(
    tx: &Tx<'_>,
    scope: &mut WriteScope,
    job_id: &str,
    now: i64,
) -> Result<CancelOutcome> {
    Ok(match locked(tx, job_id).await? {
        None => CancelOutcome::NotFound,
        Some((status @ (JobStatus::Pending | JobStatus::Waiting), _)) => {
            cancel(tx, scope, job_id, status, now).await?;
            CancelOutcome::Cancelled
        }
        Some((JobStatus::Running, owner)) => CancelOutcome::Running {
            on_this_host: owner.as_deref() == Some(&*scope.host),
        },
        Some((status, _)) => CancelOutcome::AlreadyFinished(status),
    })
}

pub(super) async fn retry(
    tx: &Tx<'_>,
    scope: &mut WriteScope,
    job_id: &str,
    from_start: bool,
    now: i64,
) -> Result<RetryOutcome> {
    match locked_status(tx, job_id).await? {
        None => return Ok(RetryOutcome::NotFound),
        Some(JobStatus::Failed | JobStatus::Cancelled) => {}
        Some(status) => return Ok(RetryOutcome::NotRetryable(status)),
    }
    let reset = if from_start {
        "UPDATE phases SET status = 'pending', output = NULL, error = NULL, usage = NULL,
                           progress = NULL, attempts = 0, started_at = NULL, finished_at = NULL
         WHERE job_id = $1"
    } else {
        "UPDATE phases SET status = 'pending', error = NULL, started_at = NULL, finished_at = NULL
         WHERE job_id = $1 AND status <> 'completed'"
    };
    execute(tx, reset, &[&job_id]).await?;
    scope.jobs_due = true;
    execute(
        tx,
        "UPDATE jobs SET status = 'pending', run_at = $2, attempt = 0, finished_at = NULL, error = NULL
         WHERE id = $1",
        &[&job_id, &now],
    )
    .await?;
    let retrying = JobRetrying::Manual(ManualRetry {
        manual: true,
        from_start,
        run_at: now,
    });
    job_event(tx, scope, job_id, EventBody::JobRetrying(retrying), now).await?;
    Ok(RetryOutcome::Retried(Box::new(
        must_load(tx, job_id).await?,
    )))
}

pub(super) async fn delete(
    tx: &Tx<'_>,
    scope: &mut WriteScope,
    job_id: &str,
    now: i64,
) -> Result<DeleteOutcome> {
    match locked_status(tx, job_id).await? {
        None => Ok(DeleteOutcome::NotFound),
        Some(status) if !status.is_terminal() => Ok(DeleteOutcome::NotTerminal(status)),
        Some(_) => {
            delete_row(tx, scope, job_id, now).await?;
            Ok(DeleteOutcome::Deleted)
        }
    }
}

/// Deletes the events a `DELETE … RETURNING xid::text` selects, and the
/// position blocks it left empty.
async fn forget_events(
    tx: &Tx<'_>,
    delete: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<()> {
    let mut xids: Vec<String> = query(tx, delete, params)
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    xids.sort_unstable();
    xids.dedup();
    if !xids.is_empty() {
        execute(
            tx,
            "DELETE FROM event_blocks b WHERE b.xid = ANY($1::text[]::xid8[])
               AND NOT EXISTS (SELECT 1 FROM events e WHERE e.xid = b.xid)",
            &[&xids],
        )
        .await?;
    }
    Ok(())
}

/// Deletes a job with its history: its phases, attempt errors, logged
/// events and settled webhook deliveries. Only the `job:deleted` event is
/// left, for watchers to replay.
async fn delete_row(tx: &Tx<'_>, scope: &mut WriteScope, job_id: &str, now: i64) -> Result<()> {
    execute(tx, "DELETE FROM jobs WHERE id = $1", &[&job_id]).await?;
    forget_events(
        tx,
        "DELETE FROM events WHERE job_id = $1 RETURNING xid::text",
        &[&job_id],
    )
    .await?;
    // Settled deliveries go with their job; pending ones still go out.
    execute(
        tx,
        "DELETE FROM webhook_deliveries WHERE job_id = $1 AND status <> 'pending'",
        &[&job_id],
    )
    .await?;
    let deleted = EventBody::JobDeleted(JobDeleted {
        id: job_id.to_owned(),
    });
    job_event(tx, scope, job_id, deleted, now).await
}

/// Recovers the running jobs `which` names, each as `policy` decides.
pub(super) async fn recover(
    tx: &Tx<'_>,
    scope: &mut WriteScope,
    which: &RecoveryScope,
    policy: &RecoveryPolicy,
    now: i64,
) -> Result<Vec<Recovered>> {
    // A host whose lease expired is presumed dead; if it is only frozen,
    // the new lease token fences its late writes.
    const EXPIRED_OWNER: &str = "owner IS NULL
        OR owner IN (SELECT id FROM hosts WHERE lease_until < jobhost_now())";
    let rows = match which {
        RecoveryScope::AtStart => {
            query(
                tx,
                &format!(
                    "SELECT id, attempt, max_attempts FROM jobs
                     WHERE status = 'running' AND (owner = $1 OR {EXPIRED_OWNER})
                     ORDER BY id FOR UPDATE"
                ),
                &[&&*scope.host],
            )
            .await?
        }
        RecoveryScope::ExpiredHosts => {
            // One host at a time reaps; the others skip this round.
            let reaping: bool =
                query_one(tx, "SELECT pg_try_advisory_xact_lock($1)", &[&REAPER_LOCK])
                    .await?
                    .get(0);
            if !reaping {
                return Ok(Vec::new());
            }
            // Hosts gone for an hour with nothing left to recover are
            // forgotten.
            execute(
                tx,
                "DELETE FROM hosts h WHERE h.lease_until < jobhost_now() - 3600000
                 AND NOT EXISTS (SELECT 1 FROM jobs WHERE status = 'running' AND owner = h.id)",
                &[],
            )
            .await?;
            query(
                tx,
                &format!(
                    "SELECT id, attempt, max_attempts FROM jobs
                     WHERE status = 'running' AND ({EXPIRED_OWNER})
                     ORDER BY id FOR UPDATE SKIP LOCKED"
                ),
                &[],
            )
            .await?
        }
        RecoveryScope::Job(lease) => {
            query(
                tx,
                "SELECT id, attempt, max_attempts FROM jobs
                 WHERE id = $1 AND status = 'running' AND attempt = $2 AND lease = $3 FOR UPDATE",
                &[&lease.job_id, &(lease.attempt as i32), &lease.token],
            )
            .await?
        }
    };
    let mut recovered = Vec::with_capacity(rows.len());
    for row in rows {
        let job_id: String = row.get(0);
        let phases = phases_of(tx, &job_id, super::rows::Listed::Summary).await?;
        let job = Interrupted {
            attempt: row.get::<_, i32>(1) as u32,
            max_attempts: row.get::<_, i32>(2) as u32,
            phase: phases
                .iter()
                .find(|phase| phase.status == PhaseStatus::Running)
                .map(|phase| (phase.index, phase.name.clone())),
            job_id,
        };
        let decision = policy(&job);
        let requeued = matches!(decision.after, AfterFailure::Retry { .. });
        let phase = job.phase.as_ref().map(|(_, name)| name.as_str());
        let (job_id, error) = (job.job_id.as_str(), decision.error.as_str());
        record_attempt_error(tx, job_id, job.attempt, phase, error, now).await?;
        if let Some((index, _)) = &job.phase {
            let status = if requeued { "pending" } else { "failed" };
            execute(
                tx,
                "UPDATE phases SET status = $3, error = $4, finished_at = $5
                 WHERE job_id = $1 AND idx = $2",
                &[&job_id, &(*index as i32), &status, &error, &now],
            )
            .await?;
        }
        let ended = EndedAttempt {
            attempt: job.attempt,
            phase,
            error,
            recovered: true,
        };
        end_attempt(tx, scope, job_id, &ended, &decision.after, now).await?;
        recovered.push(Recovered {
            phase: phase.map(str::to_owned),
            job_id: job.job_id.clone(),
            attempt: job.attempt,
            requeued,
        });
    }
    Ok(recovered)
}

pub(super) async fn delete_finished_before(
    tx: &Tx<'_>,
    scope: &mut WriteScope,
    cutoff: i64,
    limit: usize,
    now: i64,
) -> Result<Vec<String>> {
    // One sweep at a time, whichever host runs it: the next waits, then
    // finds what is left.
    execute(tx, "SELECT pg_advisory_xact_lock($1)", &[&RETENTION_LOCK]).await?;
    let ids: Vec<String> = query(
        tx,
        "SELECT id FROM jobs
         WHERE finished_at < $1 AND status IN ('completed', 'failed', 'cancelled')
         ORDER BY finished_at LIMIT $2 FOR UPDATE SKIP LOCKED",
        &[&cutoff, &(limit as i64)],
    )
    .await?
    .iter()
    .map(|row| row.get(0))
    .collect();
    // The log's other old entries go first: plugin events, and what was
    // logged about jobs that no longer exist. Events of jobs still stored
    // stay with them.
    forget_events(
        tx,
        "DELETE FROM events e WHERE e.at < $1
           AND EXISTS (SELECT 1 FROM event_blocks b WHERE b.xid = e.xid)
           AND (e.job_id IS NULL OR NOT EXISTS (SELECT 1 FROM jobs WHERE jobs.id = e.job_id))
         RETURNING e.xid::text",
        &[&cutoff],
    )
    .await?;
    for id in &ids {
        delete_row(tx, scope, id, now).await?;
    }
    Ok(ids)
}
