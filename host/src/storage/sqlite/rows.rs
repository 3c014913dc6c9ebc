//! Reading jobs back: the `jobs` row as SQLite holds it, a job's phases and
//! attempt errors, and the status alone.

use rusqlite::{Connection, OptionalExtension, Row};
use serde_json::Value;

use super::{corrupt, webhooks};
use crate::model::{
    AttemptError, Job, JobStatus, Json, Phase, PhaseStatus, Progress, ResourceUsage,
};
use crate::storage::Result;

pub(super) const JOB_COLUMNS: &str =
    "id, status, payload, priority, run_at, attempt, max_attempts, backoff,
    idempotency_key, webhook_url, created_at, started_at, finished_at, error, concurrency_key";
/// Where `lease` is in a row selected as `{JOB_COLUMNS}, lease`.
pub(super) const LEASE_COLUMN: usize = 15;

pub(super) fn json_column(text: &str, what: &str) -> Result<Value> {
    serde_json::from_str(text).map_err(|e| corrupt(what, e))
}

/// A `jobs` row as SQLite holds it; [`RawJob::decode`] parses its JSON.
pub(super) struct RawJob {
    id: String,
    status: String,
    payload: String,
    priority: i32,
    run_at: i64,
    attempt: u32,
    max_attempts: u32,
    backoff: String,
    idempotency_key: Option<String>,
    webhook_url: Option<String>,
    created_at: i64,
    started_at: Option<i64>,
    finished_at: Option<i64>,
    error: Option<String>,
    concurrency_key: Option<String>,
}

/// Reads a row selected with [`JOB_COLUMNS`].
pub(super) fn job_row(row: &Row<'_>) -> rusqlite::Result<RawJob> {
    Ok(RawJob {
        id: row.get(0)?,
        status: row.get(1)?,
        payload: row.get(2)?,
        priority: row.get(3)?,
        run_at: row.get(4)?,
        attempt: row.get(5)?,
        max_attempts: row.get(6)?,
        backoff: row.get(7)?,
        idempotency_key: row.get(8)?,
        webhook_url: row.get(9)?,
        created_at: row.get(10)?,
        started_at: row.get(11)?,
        finished_at: row.get(12)?,
        error: row.get(13)?,
        concurrency_key: row.get(14)?,
    })
}

impl RawJob {
    /// The job without its phases and errors.
    pub(super) fn decode(self) -> Result<Job> {
        Ok(Job {
            status: JobStatus::parse(&self.status)
                .ok_or_else(|| corrupt("job status", &self.status))?,
            payload: Json::parse(self.payload).map_err(|e| corrupt("job payload", e))?,
            backoff: serde_json::from_str(&self.backoff).map_err(|e| corrupt("job backoff", e))?,
            id: self.id,
            priority: self.priority,
            run_at: self.run_at,
            attempt: self.attempt,
            max_attempts: self.max_attempts,
            idempotency_key: self.idempotency_key,
            webhook_url: self.webhook_url,
            concurrency_key: self.concurrency_key,
            created_at: self.created_at,
            started_at: self.started_at,
            finished_at: self.finished_at,
            error: self.error,
            phases: Vec::new(),
            errors: Vec::new(),
            webhook: None,
        })
    }
}

pub(super) fn phases_of(conn: &Connection, job_id: &str) -> Result<Vec<Phase>> {
    phases_where(conn, job_id, Listed::Whole)
}

/// How much of a phase to read.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Listed {
    Whole,
    /// Without config and output, for listings.
    Summary,
}

/// The job's phases in order.
pub(super) fn phases_where(conn: &Connection, job_id: &str, listed: Listed) -> Result<Vec<Phase>> {
    let (config, output) = match listed {
        Listed::Whole => ("config", "output"),
        Listed::Summary => ("'{}'", "NULL"),
    };
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT idx, name, plugin, version, {config}, timeout_ms, status, {output}, error, attempts,
                started_at, finished_at, usage, progress
         FROM phases WHERE job_id = ?1 ORDER BY idx"
    ))?;
    let rows = stmt.query_map([job_id], |row| {
        Ok((
            row.get::<_, i64>(0)?,
            row.get::<_, String>(1)?,
            row.get::<_, String>(2)?,
            row.get::<_, String>(3)?,
            row.get::<_, String>(4)?,
            row.get::<_, i64>(5)?,
            row.get::<_, String>(6)?,
            row.get::<_, Option<String>>(7)?,
            row.get::<_, Option<String>>(8)?,
            row.get::<_, i64>(9)?,
            row.get::<_, Option<i64>>(10)?,
            row.get::<_, Option<i64>>(11)?,
            row.get::<_, Option<String>>(12)?,
            row.get::<_, Option<String>>(13)?,
        ))
    })?;
    let mut phases = Vec::new();
    for row in rows {
        let (
            index,
            name,
            plugin,
            version,
            config,
            timeout_ms,
            status,
            output,
            error,
            attempts,
            started,
            finished,
            usage,
            progress,
        ) = row?;
        phases.push(Phase {
            index: index as usize,
            name,
            plugin,
            version,
            config: json_column(&config, "phase config")?,
            timeout_ms: timeout_ms as u64,
            status: PhaseStatus::parse(&status).ok_or_else(|| corrupt("phase status", &status))?,
            output: output
                .map(|o| Json::parse(o).map_err(|e| corrupt("phase output", e)))
                .transpose()?,
            error,
            attempts: attempts as u32,
            started_at: started,
            finished_at: finished,
            usage: usage
                .map(|u| serde_json::from_str::<ResourceUsage>(&u))
                .transpose()
                .map_err(|e| corrupt("phase usage", e))?,
            progress: progress
                .map(|p| serde_json::from_str::<Progress>(&p))
                .transpose()
                .map_err(|e| corrupt("phase progress", e))?,
        });
    }
    Ok(phases)
}

pub(super) fn errors_of(conn: &Connection, job_id: &str) -> Result<Vec<AttemptError>> {
    let mut stmt = conn.prepare_cached(
        "SELECT attempt, phase, error, at FROM attempt_errors WHERE job_id = ?1 ORDER BY attempt",
    )?;
    let rows = stmt.query_map([job_id], |row| {
        Ok(AttemptError {
            attempt: row.get(0)?,
            phase: row.get(1)?,
            error: row.get(2)?,
            at: row.get(3)?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

pub(super) fn load_job(conn: &Connection, id: &str) -> Result<Option<Job>> {
    let raw = conn
        .prepare_cached(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"))?
        .query_row([id], job_row)
        .optional()?;
    let Some(raw) = raw else { return Ok(None) };
    let mut job = raw.decode()?;
    job.phases = phases_of(conn, id)?;
    job.errors = errors_of(conn, id)?;
    job.webhook = webhooks::latest_for_job(conn, id)?;
    Ok(Some(job))
}

pub(super) fn must_load(conn: &Connection, id: &str) -> Result<Job> {
    load_job(conn, id)?.ok_or_else(|| corrupt("job vanished inside its transaction", id))
}

pub(super) fn job_status(conn: &Connection, id: &str) -> Result<Option<JobStatus>> {
    let status: Option<String> = conn
        .prepare_cached("SELECT status FROM jobs WHERE id = ?1")?
        .query_row([id], |row| row.get(0))
        .optional()?;
    status
        .map(|s| JobStatus::parse(&s).ok_or_else(|| corrupt("job status", s)))
        .transpose()
}
