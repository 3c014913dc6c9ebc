//! Reading jobs back: the `jobs` row, a job's phases and attempt errors,
//! the status alone, listings and counts.

use deadpool_postgres::GenericClient;
use tokio_postgres::Row;

use super::{corrupt, query, query_opt};
use crate::model::{
    AttemptError, DeliveryStatus, Job, JobStatus, JobSummary, Json, Phase, PhaseStatus, Progress,
    ResourceUsage, WebhookStatus,
};
use crate::storage::{JobFilter, JobPage, MAX_PAGE, Result};

/// A job's columns, in the order [`decode_job`] reads them (`lease` last).
pub(super) const JOB_COLUMNS: &str =
    "id, status, payload, priority, run_at, attempt, max_attempts, backoff,
    idempotency_key, webhook_url, created_at, started_at, finished_at, error, concurrency_key,
    lease";

/// The same, qualified by the table's alias `j`.
pub(super) const J_JOB_COLUMNS: &str = "j.id, j.status, j.payload, j.priority, j.run_at, j.attempt,
    j.max_attempts, j.backoff, j.idempotency_key, j.webhook_url, j.created_at, j.started_at,
    j.finished_at, j.error, j.concurrency_key, j.lease";

/// Where `lease` is in a row of [`JOB_COLUMNS`].
pub(super) const LEASE_COLUMN: usize = 15;

/// A job without its phases and errors, from a row of [`JOB_COLUMNS`].
pub(super) fn decode_job(row: &Row) -> Result<Job> {
    let status: &str = row.get(1);
    let payload: String = row.get(2);
    let backoff: &str = row.get(7);
    Ok(Job {
        id: row.get(0),
        status: JobStatus::parse(status).ok_or_else(|| corrupt("job status", status))?,
        payload: Json::parse(payload).map_err(|e| corrupt("job payload", e))?,
        priority: row.get(3),
        run_at: row.get(4),
        attempt: row.get::<_, i32>(5) as u32,
        max_attempts: row.get::<_, i32>(6) as u32,
        backoff: serde_json::from_str(backoff).map_err(|e| corrupt("job backoff", e))?,
        idempotency_key: row.get(8),
        webhook_url: row.get(9),
        created_at: row.get(10),
        started_at: row.get(11),
        finished_at: row.get(12),
        error: row.get(13),
        concurrency_key: row.get(14),
        phases: Vec::new(),
        errors: Vec::new(),
        webhook: None,
    })
}

/// How much of a phase to read.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Listed {
    Whole,
    /// Without config and output, for listings.
    Summary,
}

/// A phase's columns, in the order [`decode_phase`] reads them, qualified
/// by the table's alias `p`.
pub(super) const PHASE_COLUMNS: &str = "p.idx, p.name, p.plugin, p.version, p.config,
    p.timeout_ms, p.status, p.output, p.error, p.attempts, p.started_at, p.finished_at, p.usage,
    p.progress";

/// The phases of `job_id`, in order.
pub(super) async fn phases_of(
    db: &impl GenericClient,
    job_id: &str,
    listed: Listed,
) -> Result<Vec<Phase>> {
    let sql = match listed {
        Listed::Whole => {
            "SELECT idx, name, plugin, version, config, timeout_ms, status, output, error, attempts,
                    started_at, finished_at, usage, progress
             FROM phases WHERE job_id = $1 ORDER BY idx"
        }
        Listed::Summary => {
            "SELECT idx, name, plugin, version, '{}', timeout_ms, status, NULL::text, error, attempts,
                    started_at, finished_at, usage, progress
             FROM phases WHERE job_id = $1 ORDER BY idx"
        }
    };
    query(db, sql, &[&job_id])
        .await?
        .iter()
        .map(|row| decode_phase(row, 0))
        .collect()
}

/// A phase from a row holding [`PHASE_COLUMNS`] from column `at` on.
pub(super) fn decode_phase(row: &Row, at: usize) -> Result<Phase> {
    let status: &str = row.get(at + 6);
    Ok(Phase {
        index: row.get::<_, i32>(at) as usize,
        name: row.get(at + 1),
        plugin: row.get(at + 2),
        version: row.get(at + 3),
        config: serde_json::from_str(row.get(at + 4)).map_err(|e| corrupt("phase config", e))?,
        timeout_ms: row.get::<_, i64>(at + 5) as u64,
        status: PhaseStatus::parse(status).ok_or_else(|| corrupt("phase status", status))?,
        output: row
            .get::<_, Option<String>>(at + 7)
            .map(|o| Json::parse(o).map_err(|e| corrupt("phase output", e)))
            .transpose()?,
        error: row.get(at + 8),
        attempts: row.get::<_, i32>(at + 9) as u32,
        started_at: row.get(at + 10),
        finished_at: row.get(at + 11),
        usage: row
            .get::<_, Option<&str>>(at + 12)
            .map(serde_json::from_str::<ResourceUsage>)
            .transpose()
            .map_err(|e| corrupt("phase usage", e))?,
        progress: row
            .get::<_, Option<&str>>(at + 13)
            .map(serde_json::from_str::<Progress>)
            .transpose()
            .map_err(|e| corrupt("phase progress", e))?,
    })
}

async fn errors_of(db: &impl GenericClient, job_id: &str) -> Result<Vec<AttemptError>> {
    let rows = query(
        db,
        "SELECT attempt, phase, error, at FROM attempt_errors WHERE job_id = $1 ORDER BY attempt",
        &[&job_id],
    )
    .await?;
    Ok(rows
        .iter()
        .map(|row| AttemptError {
            attempt: row.get::<_, i32>(0) as u32,
            phase: row.get(1),
            error: row.get(2),
            at: row.get(3),
        })
        .collect())
}

async fn latest_webhook(db: &impl GenericClient, job_id: &str) -> Result<Option<WebhookStatus>> {
    let row = query_opt(
        db,
        "SELECT id, url, status, attempts, last_status, last_error, finished_at FROM webhook_deliveries
         WHERE job_id = $1 ORDER BY created_at DESC, id DESC LIMIT 1",
        &[&job_id],
    )
    .await?;
    Ok(row.map(|row| WebhookStatus {
        id: row.get(0),
        url: row.get(1),
        // Only the outbox writes the column, with these names.
        status: DeliveryStatus::parse(row.get(2)).unwrap_or(DeliveryStatus::Failed),
        attempts: row.get::<_, i32>(3) as u32,
        last_status: row.get::<_, Option<i32>>(4).map(|s| s as u16),
        last_error: row.get(5),
        finished_at: row.get(6),
    }))
}

/// The whole job: phases, attempt errors and webhook status.
pub(super) async fn load_job(db: &impl GenericClient, id: &str) -> Result<Option<Job>> {
    let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1");
    let Some(row) = query_opt(db, &sql, &[&id]).await? else {
        return Ok(None);
    };
    let mut job = decode_job(&row)?;
    job.phases = phases_of(db, id, Listed::Whole).await?;
    job.errors = errors_of(db, id).await?;
    job.webhook = latest_webhook(db, id).await?;
    Ok(Some(job))
}

pub(super) async fn must_load(db: &impl GenericClient, id: &str) -> Result<Job> {
    load_job(db, id)
        .await?
        .ok_or_else(|| corrupt("job vanished inside its transaction", id))
}

pub(super) async fn job_status(db: &impl GenericClient, id: &str) -> Result<Option<JobStatus>> {
    let row = query_opt(db, "SELECT status FROM jobs WHERE id = $1", &[&id]).await?;
    row.map(|row| {
        let status: &str = row.get(0);
        JobStatus::parse(status).ok_or_else(|| corrupt("job status", status))
    })
    .transpose()
}

pub(super) async fn list(db: &impl GenericClient, filter: &JobFilter) -> Result<JobPage> {
    let limit = filter.limit.clamp(1, MAX_PAGE);
    let rows = query(
        db,
        "SELECT id, status, 'null', priority, run_at, attempt, max_attempts, backoff,
                idempotency_key, webhook_url, created_at, started_at, finished_at, error,
                concurrency_key, lease
         FROM jobs
         WHERE ($1::text IS NULL OR status = $1)
           AND ($2::text IS NULL OR EXISTS (SELECT 1 FROM phases WHERE job_id = jobs.id AND plugin = $2))
           AND ($3::text IS NULL OR id < $3)
           AND ($5::text IS NULL OR concurrency_key = $5)
         ORDER BY id DESC LIMIT $4",
        &[
            &filter.status.map(JobStatus::as_str),
            &filter.plugin,
            &filter.cursor,
            &(limit as i64 + 1),
            &filter.concurrency_key,
        ],
    )
    .await?;
    let mut jobs = Vec::with_capacity(rows.len());
    for row in &rows {
        let mut job = decode_job(row)?;
        job.phases = phases_of(db, &job.id, Listed::Summary).await?;
        jobs.push(JobSummary::from(job));
    }
    Ok(JobPage::of(jobs, limit))
}

pub(super) async fn count(
    db: &impl GenericClient,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<u64> {
    let rows = query(db, sql, params).await?;
    Ok(rows.first().map_or(0, |row| row.get::<_, i64>(0)) as u64)
}

pub(super) async fn job_counts(db: &impl GenericClient) -> Result<Vec<(JobStatus, u64)>> {
    let rows = query(db, "SELECT status, COUNT(*) FROM jobs GROUP BY status", &[]).await?;
    rows.iter()
        .map(|row| {
            let status: &str = row.get(0);
            Ok((
                JobStatus::parse(status).ok_or_else(|| corrupt("job status", status))?,
                row.get::<_, i64>(1) as u64,
            ))
        })
        .collect()
}
