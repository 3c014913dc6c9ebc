//! Listing jobs, a page at a time, without their payloads and outputs; and
//! counting them.

use rusqlite::{Connection, params};

use super::claim::{DUE_COUNT, PENDING_PRIORITIES};
use super::corrupt;
use super::rows::{Listed, job_row, phases_where};
use crate::model::{JobStatus, JobSummary};
use crate::storage::{JobFilter, JobPage, MAX_PAGE, Result};

/// The columns of [`JOB_COLUMNS`] that listings show: the payload is
/// left in the table.
pub(super) const LISTED_JOB_COLUMNS: &str =
    "id, status, 'null', priority, run_at, attempt, max_attempts, backoff,
    idempotency_key, webhook_url, created_at, started_at, finished_at, error, concurrency_key";

pub(super) fn list(conn: &Connection, filter: &JobFilter) -> Result<JobPage> {
    let limit = filter.limit.clamp(1, MAX_PAGE);
    let raws: Vec<_> = conn
        .prepare_cached(&format!(
            "SELECT {LISTED_JOB_COLUMNS} FROM jobs
             WHERE (?1 IS NULL OR status = ?1)
               AND (?2 IS NULL OR EXISTS (SELECT 1 FROM phases WHERE job_id = jobs.id AND plugin = ?2))
               AND (?3 IS NULL OR id < ?3)
               AND (?5 IS NULL OR concurrency_key = ?5)
             ORDER BY id DESC LIMIT ?4"
        ))?
        .query_map(
            params![
                filter.status.map(JobStatus::as_str),
                filter.plugin,
                filter.cursor,
                limit as i64 + 1,
                filter.concurrency_key
            ],
            job_row,
        )?
        .collect::<rusqlite::Result<_>>()?;
    let mut jobs = Vec::with_capacity(raws.len());
    for raw in raws {
        let mut job = raw.decode()?;
        job.phases = phases_where(conn, &job.id, Listed::Summary)?;
        jobs.push(JobSummary::from(job));
    }
    Ok(JobPage::of(jobs, limit))
}

/// Pending jobs that are due by `now`, with a key or without.
pub(super) fn due_count(conn: &Connection, now: i64) -> Result<u64> {
    let count: i64 = conn
        .prepare_cached(&format!(
            "{PENDING_PRIORITIES} SELECT ({DUE_COUNT}) + (
                 SELECT COUNT(*) FROM jobs INDEXED BY jobs_keyed_due_at
                 WHERE status = 'pending' AND concurrency_key IS NOT NULL AND run_at <= ?1)"
        ))?
        .query_row([now], |row| row.get(0))?;
    Ok(count as u64)
}

pub(super) fn pending_count(conn: &Connection) -> Result<u64> {
    let count: i64 = conn
        .prepare_cached(
            "SELECT (SELECT COUNT(*) FROM jobs INDEXED BY jobs_due
                     WHERE status = 'pending' AND concurrency_key IS NULL)
                  + (SELECT COUNT(*) FROM jobs INDEXED BY jobs_keyed_due
                     WHERE status = 'pending' AND concurrency_key IS NOT NULL)
                  + (SELECT COUNT(*) FROM jobs INDEXED BY jobs_waiting WHERE status = 'waiting')",
        )?
        .query_row([], |row| row.get(0))?;
    Ok(count as u64)
}

pub(super) fn job_counts(conn: &Connection) -> Result<Vec<(JobStatus, u64)>> {
    let mut stmt = conn.prepare_cached("SELECT status, COUNT(*) FROM jobs GROUP BY status")?;
    let rows = stmt.query_map([], |row| {
        Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
    })?;
    let mut counts = Vec::new();
    for row in rows {
        let (status, count) = row?;
        counts.push((
            JobStatus::parse(&status).ok_or_else(|| corrupt("job status", &status))?,
            count as u64,
        ));
    }
    Ok(counts)
}
