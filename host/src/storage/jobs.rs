//! Jobs and their phases. Every transition is one write (one savepoint of
//! a group commit) together with its events, and is guarded by the state it
//! expects: a transition that finds the job elsewhere changes nothing and
//! reports `false`, so races with cancel, retry or recovery are harmless.

use rusqlite::{Connection, OptionalExtension, Row, params};
use serde_json::{Value, json};

use super::{EventLog, Result, Storage, StorageError};
use crate::events::{EventKind, NewEvent};
use crate::json::Json;
use crate::queue::{AttemptError, BackoffPolicy, Job, JobStatus, JobSummary, Phase, PhaseStatus};
use crate::runtime::{Progress, ResourceUsage};

/// A job ready to store: validated, with plugin versions still to pin.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: String,
    pub payload: Json,
    pub priority: i32,
    pub run_at: i64,
    pub max_attempts: u32,
    pub backoff: BackoffPolicy,
    pub idempotency_key: Option<String>,
    pub webhook_url: Option<String>,
    pub webhook_secret: Option<String>,
    pub phases: Vec<NewPhase>,
    pub created_at: i64,
}

#[derive(Debug, Clone)]
pub struct NewPhase {
    pub name: String,
    pub plugin: String,
    /// `None`: the plugin's active version, pinned in the same transaction.
    pub version: Option<String>,
    pub config: Value,
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum CreateOutcome {
    Created(Job),
    /// A job with the same idempotency key exists; nothing was stored.
    Existing(Job),
    /// A phase names a plugin or version that is not stored.
    UnknownPlugin(String),
}

/// What happens to a job after a phase attempt failed.
#[derive(Debug, Clone, PartialEq)]
pub enum AfterFailure {
    /// Run the job again at `run_at` (Unix ms), resuming at this phase.
    Retry { run_at: i64 },
    /// The job fails; phases after this one will not run.
    Fail,
}

/// What recording a phase's completion did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Completion {
    /// The job or phase had moved on (cancelled, recovered): nothing changed.
    Stale,
    /// Recorded; if it was the last phase, the job completed with it.
    Recorded,
    /// Recorded, and the next phase started in the same write, with this
    /// attempt number.
    NextStarted(u32),
}

#[derive(Debug, Clone, PartialEq)]
pub enum CancelOutcome {
    /// The job was pending and is now cancelled, with all its phases.
    Cancelled,
    /// The job is running: only its worker can stop it.
    Running,
    /// The job had already finished; nothing changed.
    AlreadyFinished(JobStatus),
    NotFound,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RetryOutcome {
    Retried(Box<Job>),
    /// Only failed and cancelled jobs can be retried.
    NotRetryable(JobStatus),
    NotFound,
}

#[derive(Debug, Clone, PartialEq)]
pub enum DeleteOutcome {
    Deleted,
    /// Pending and running jobs must be cancelled first.
    NotTerminal(JobStatus),
    NotFound,
}

/// A job found running at start-up, and what recovery did with it.
#[derive(Debug, Clone, PartialEq)]
pub struct Recovered {
    pub job_id: String,
    /// The phase that was running when the process stopped, if any.
    pub phase: Option<String>,
    pub attempt: u32,
    /// Requeued (true) or failed for lack of attempts (false).
    pub requeued: bool,
}

#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub status: Option<JobStatus>,
    pub plugin: Option<String>,
    /// Clamped to 1..=[`MAX_PAGE`].
    pub limit: usize,
    /// Return jobs older than this id (ids sort by creation time).
    pub cursor: Option<String>,
}

#[derive(Debug, Clone)]
pub struct JobPage {
    pub jobs: Vec<JobSummary>,
    /// Pass as `cursor` for the next page; `None` on the last page.
    pub next_cursor: Option<String>,
}

/// Most jobs one listing returns.
pub const MAX_PAGE: usize = 100;

const JOB_COLUMNS: &str = "id, status, payload, priority, run_at, attempt, max_attempts, backoff,
    idempotency_key, webhook_url, created_at, started_at, finished_at, error";

fn corrupt(what: &str, e: impl std::fmt::Display) -> StorageError {
    StorageError::Corrupt(format!("{what}: {e}"))
}

fn json_column(text: &str, what: &str) -> Result<Value> {
    serde_json::from_str(text).map_err(|e| corrupt(what, e))
}

/// A `jobs` row as SQLite holds it; [`RawJob::decode`] parses its JSON.
struct RawJob {
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
}

/// Reads a row selected with [`JOB_COLUMNS`].
fn job_row(row: &Row<'_>) -> rusqlite::Result<RawJob> {
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
    })
}

impl RawJob {
    /// The job without its phases and errors.
    fn decode(self) -> Result<Job> {
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

fn phases_of(conn: &Connection, job_id: &str) -> Result<Vec<Phase>> {
    phases_where(conn, job_id, Listed::Whole)
}

/// How much of a phase to read.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Listed {
    Whole,
    /// Without config and output, for listings.
    Summary,
}

/// The job's phases in order.
fn phases_where(conn: &Connection, job_id: &str, listed: Listed) -> Result<Vec<Phase>> {
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

fn errors_of(conn: &Connection, job_id: &str) -> Result<Vec<AttemptError>> {
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
    job.webhook = super::webhooks::latest_for_job(conn, id)?;
    Ok(Some(job))
}

fn must_load(conn: &Connection, id: &str) -> Result<Job> {
    load_job(conn, id)?.ok_or_else(|| corrupt("job vanished inside its transaction", id))
}

fn job_status(conn: &Connection, id: &str) -> Result<Option<JobStatus>> {
    let status: Option<String> = conn
        .prepare_cached("SELECT status FROM jobs WHERE id = ?1")?
        .query_row([id], |row| row.get(0))
        .optional()?;
    status
        .map(|s| JobStatus::parse(&s).ok_or_else(|| corrupt("job status", s)))
        .transpose()
}

/// Emits a job event. A terminal one also writes the job's webhook delivery
/// to the outbox, in the same transaction as the terminal state.
fn job_event(
    conn: &Connection,
    log: &mut EventLog,
    kind: EventKind,
    job_id: &str,
    data: Value,
    at: i64,
) -> Result<()> {
    if kind.is_job_terminal() {
        super::webhooks::enqueue(conn, log, job_id, kind, at)?;
    }
    log.emit(conn, NewEvent::job(kind, job_id, data), at)
}

fn create(conn: &Connection, log: &mut EventLog, new: &NewJob) -> Result<CreateOutcome> {
    if let Some(key) = &new.idempotency_key {
        let existing: Option<String> = conn
            .prepare_cached("SELECT id FROM jobs WHERE idempotency_key = ?1")?
            .query_row([key], |row| row.get(0))
            .optional()?;
        if let Some(id) = existing {
            return Ok(CreateOutcome::Existing(must_load(conn, &id)?));
        }
    }
    let mut pinned = Vec::with_capacity(new.phases.len());
    for phase in &new.phases {
        let version: Option<String> = match &phase.version {
            Some(version) => conn
                .prepare_cached(
                    "SELECT version FROM plugin_versions WHERE plugin = ?1 AND version = ?2",
                )?
                .query_row(params![phase.plugin, version], |row| row.get(0))
                .optional()?,
            None => conn
                .prepare_cached("SELECT active_version FROM plugins WHERE name = ?1")?
                .query_row([&phase.plugin], |row| row.get(0))
                .optional()?
                .flatten(),
        };
        match version {
            Some(version) => pinned.push(version),
            None => {
                let what = match &phase.version {
                    Some(v) => format!("plugin `{}` has no version `{v}`", phase.plugin),
                    None => format!("no plugin named `{}` is uploaded", phase.plugin),
                };
                return Ok(CreateOutcome::UnknownPlugin(format!(
                    "phase `{}`: {what}",
                    phase.name
                )));
            }
        }
    }
    conn.prepare_cached(
        "INSERT INTO jobs (id, status, payload, priority, run_at, max_attempts, backoff, idempotency_key,
                           webhook_url, webhook_secret, created_at)
         VALUES (?1, 'pending', ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )?
    .execute(params![
        new.id,
        new.payload.as_str(),
        new.priority,
        new.run_at,
        new.max_attempts,
        serde_json::to_string(&new.backoff).map_err(|e| corrupt("backoff", e))?,
        new.idempotency_key,
        new.webhook_url,
        new.webhook_secret,
        new.created_at,
    ])?;
    let mut insert_phase = conn.prepare_cached(
        "INSERT INTO phases (job_id, idx, name, plugin, version, config, timeout_ms, status)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'pending')",
    )?;
    for (index, (phase, version)) in new.phases.iter().zip(&pinned).enumerate() {
        insert_phase.execute(params![
            new.id,
            index as i64,
            phase.name,
            phase.plugin,
            version,
            crate::json::text(&phase.config),
            phase.timeout_ms as i64
        ])?;
    }
    let phases: Vec<Value> = new
        .phases
        .iter()
        .zip(&pinned)
        .map(|(p, v)| json!({"name": p.name, "plugin": p.plugin, "version": v}))
        .collect();
    let data = json!({"run_at": new.run_at, "priority": new.priority, "phases": phases});
    job_event(
        conn,
        log,
        EventKind::JobCreated,
        &new.id,
        data,
        new.created_at,
    )?;
    Ok(CreateOutcome::Created(created_job(new, pinned)))
}

/// The job just inserted, as loading it would return it (a unit test holds
/// the two equal), without reading back what was just written.
fn created_job(new: &NewJob, pinned: Vec<String>) -> Job {
    Job {
        id: new.id.clone(),
        status: JobStatus::Pending,
        payload: new.payload.clone(),
        priority: new.priority,
        run_at: new.run_at,
        attempt: 0,
        max_attempts: new.max_attempts,
        backoff: new.backoff,
        idempotency_key: new.idempotency_key.clone(),
        webhook_url: new.webhook_url.clone(),
        created_at: new.created_at,
        started_at: None,
        finished_at: None,
        error: None,
        phases: new
            .phases
            .iter()
            .zip(pinned)
            .enumerate()
            .map(|(index, (phase, version))| Phase {
                index,
                name: phase.name.clone(),
                plugin: phase.plugin.clone(),
                version,
                config: phase.config.clone(),
                timeout_ms: phase.timeout_ms,
                status: PhaseStatus::Pending,
                output: None,
                error: None,
                attempts: 0,
                started_at: None,
                finished_at: None,
                usage: None,
                progress: None,
            })
            .collect(),
        errors: Vec::new(),
        webhook: None,
    }
}

/// The priorities of pending jobs, highest first, as the table `levels`
/// (ending with a NULL row): one seek of `jobs_due` each. Every search for
/// due jobs goes one priority at a time. Priority leads that index, so a
/// search for `run_at <= now` across priorities reads every pending job,
/// the ones scheduled for later too (BENCHMARKS.md, "Latency", shows what
/// that cost). Within one priority, the due jobs
/// come first, so a search stops at the first job not yet due. Searches
/// cost a seek per priority they visit: the claim and the check for
/// another due job stop at the first priorities that satisfy them.
const PENDING_PRIORITIES: &str = "
    WITH RECURSIVE levels(priority) AS (
        SELECT (SELECT priority FROM jobs INDEXED BY jobs_due WHERE status = 'pending'
                ORDER BY priority DESC LIMIT 1)
        UNION ALL
        SELECT (SELECT priority FROM jobs INDEXED BY jobs_due
                WHERE status = 'pending' AND priority < levels.priority
                ORDER BY priority DESC LIMIT 1)
        FROM levels WHERE levels.priority IS NOT NULL
    )";

/// Whether a pending job other than `?2` is due at `?1`.
const OTHER_JOB_DUE: &str = "
    SELECT EXISTS (SELECT 1 FROM levels CROSS JOIN jobs INDEXED BY jobs_due
                   WHERE jobs.status = 'pending' AND jobs.priority = levels.priority
                     AND jobs.run_at <= ?1 AND jobs.id != ?2)";

/// The earliest `run_at` of any pending job.
const NEXT_DUE: &str = "
    SELECT MIN((SELECT run_at FROM jobs INDEXED BY jobs_due
                WHERE status = 'pending' AND priority = levels.priority
                ORDER BY run_at LIMIT 1))
    FROM levels WHERE priority IS NOT NULL";

/// How many pending jobs are due at `?1`.
const DUE_COUNT: &str = "
    SELECT COALESCE(SUM((SELECT COUNT(*) FROM jobs INDEXED BY jobs_due
                         WHERE status = 'pending' AND priority = levels.priority
                           AND run_at <= ?1)), 0)
    FROM levels WHERE priority IS NOT NULL";

/// Claims up to `?2` jobs of priority `?3` due at `?1`, earliest first.
fn claim_level_sql() -> String {
    format!(
        "UPDATE jobs SET status = 'running', attempt = attempt + 1, started_at = COALESCE(started_at, ?1)
         WHERE id IN (SELECT id FROM jobs INDEXED BY jobs_due
                      WHERE status = 'pending' AND priority = ?3 AND run_at <= ?1
                      ORDER BY run_at, id LIMIT ?2)
         RETURNING {JOB_COLUMNS}"
    )
}

/// Whether a pending job other than `job_id` is due at `now`.
fn other_job_due(conn: &Connection, job_id: &str, now: i64) -> Result<bool> {
    Ok(conn
        .prepare_cached(&format!("{PENDING_PRIORITIES} {OTHER_JOB_DUE}"))?
        .query_row(params![now, job_id], |row| row.get(0))?)
}

fn next_due_at(conn: &Connection) -> Result<Option<i64>> {
    Ok(conn
        .prepare_cached(&format!("{PENDING_PRIORITIES} {NEXT_DUE}"))?
        .query_row([], |row| row.get(0))?)
}

/// The highest priority of a pending job below `?1`: one index seek.
const PRIORITY_BELOW: &str = "
    SELECT priority FROM jobs INDEXED BY jobs_due WHERE status = 'pending' AND priority < ?1
    ORDER BY priority DESC LIMIT 1";

fn pending_priority_below(conn: &Connection, below: i64) -> Result<Option<i64>> {
    Ok(conn
        .prepare_cached(PRIORITY_BELOW)?
        .query_row([below], |row| row.get(0))
        .optional()?)
}

/// Claims due jobs, highest priority first, and starts the first unfinished
/// phase of each. Without `INDEXED BY`, SQLite chose `jobs_status` and
/// sorted every pending job on each claim, so claims slowed down as the
/// backlog grew. The claimed rows come back from the update itself, and the
/// started phase is updated in memory rather than read again: claims are
/// most of the writer's work.
fn claim(conn: &Connection, log: &mut EventLog, now: i64, limit: usize) -> Result<Vec<Job>> {
    // Priorities are visited only until the claim is full: there may be
    // many of them.
    let mut claimed: Vec<RawJob> = Vec::new();
    let mut below = i64::MAX;
    while claimed.len() < limit
        && let Some(priority) = pending_priority_below(conn, below)?
    {
        let wanted = (limit - claimed.len()) as i64;
        let level = conn
            .prepare_cached(&claim_level_sql())?
            .query_map(params![now, wanted, priority], job_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        claimed.extend(level);
        below = priority;
    }
    let mut jobs = Vec::with_capacity(claimed.len());
    for raw in claimed {
        let mut job = raw.decode()?;
        job.phases = phases_of(conn, &job.id)?;
        start_claimed(conn, log, &mut job, now)?;
        jobs.push(job);
    }
    // RETURNING has no order: hand them out highest priority first.
    jobs.sort_by(|a, b| (b.priority, a.run_at, &a.id).cmp(&(a.priority, b.run_at, &b.id)));
    Ok(jobs)
}

/// Claims the job just created, which the caller knows is due and the only
/// job due: what [`claim`] would do, without searching for it or reading
/// back what was just written.
fn claim_created(conn: &Connection, log: &mut EventLog, job: &mut Job, now: i64) -> Result<()> {
    conn.prepare_cached(
        "UPDATE jobs SET status = 'running', attempt = 1, started_at = ?2 WHERE id = ?1",
    )?
    .execute(params![job.id, now])?;
    job.status = JobStatus::Running;
    job.attempt = 1;
    job.started_at = Some(now);
    start_claimed(conn, log, job, now)
}

/// Announces a job just marked running and starts its first unfinished
/// phase, in the job's copy too.
fn start_claimed(conn: &Connection, log: &mut EventLog, job: &mut Job, now: i64) -> Result<()> {
    let data = json!({"attempt": job.attempt});
    job_event(conn, log, EventKind::JobStarted, &job.id, data, now)?;
    if let Some(first) = job
        .phases
        .iter_mut()
        .find(|p| p.status != PhaseStatus::Completed)
    {
        start_loaded_phase(conn, log, &job.id, first, now)?;
    }
    Ok(())
}

/// Starts a pending phase of a running job whose row the caller has just
/// read, and updates that copy to match.
fn start_loaded_phase(
    conn: &Connection,
    log: &mut EventLog,
    job_id: &str,
    phase: &mut Phase,
    now: i64,
) -> Result<bool> {
    if !mark_phase_running(conn, job_id, phase.index, now)? {
        return Ok(false);
    }
    phase.status = PhaseStatus::Running;
    phase.attempts += 1;
    phase.started_at = Some(now);
    phase.finished_at = None;
    let started = StartedPhase {
        name: &phase.name,
        index: phase.index,
        plugin: &phase.plugin,
        version: &phase.version,
        attempt: phase.attempts,
    };
    phase_started(conn, log, job_id, &started, now)?;
    Ok(true)
}

/// Marks a phase running if it is pending; false if it was not.
fn mark_phase_running(conn: &Connection, job_id: &str, index: usize, now: i64) -> Result<bool> {
    let changed = conn
        .prepare_cached(
            "UPDATE phases SET status = 'running', attempts = attempts + 1, started_at = ?3, finished_at = NULL, progress = NULL
             WHERE job_id = ?1 AND idx = ?2 AND status = 'pending'",
        )?
        .execute(params![job_id, index as i64, now])?;
    Ok(changed > 0)
}

/// What `job:phase:started` says about the phase.
struct StartedPhase<'a> {
    name: &'a str,
    index: usize,
    plugin: &'a str,
    version: &'a str,
    attempt: u32,
}

fn phase_started(
    conn: &Connection,
    log: &mut EventLog,
    job_id: &str,
    phase: &StartedPhase<'_>,
    now: i64,
) -> Result<()> {
    let data = json!({"phase": phase.name, "index": phase.index, "plugin": phase.plugin,
                      "version": phase.version, "attempt": phase.attempt});
    job_event(conn, log, EventKind::PhaseStarted, job_id, data, now)
}

/// True when the job is running: every worker transition requires it.
fn is_running(conn: &Connection, job_id: &str) -> Result<bool> {
    Ok(job_status(conn, job_id)? == Some(JobStatus::Running))
}

/// Starts phase `index` of a job the caller has found running in this
/// write, if the phase is pending; returns its attempt. Reads back only what
/// the event needs, after the update.
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
    let (name, plugin, version, attempt): (String, String, String, u32) = conn
        .prepare_cached(
            "SELECT name, plugin, version, attempts FROM phases WHERE job_id = ?1 AND idx = ?2",
        )?
        .query_row(params![job_id, index as i64], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
        })?;
    let started = StartedPhase {
        name: &name,
        index,
        plugin: &plugin,
        version: &version,
        attempt,
    };
    phase_started(conn, log, job_id, &started, now)?;
    Ok(Some(attempt))
}

#[allow(clippy::too_many_arguments)]
fn complete_phase(
    conn: &Connection,
    log: &mut EventLog,
    job_id: &str,
    index: usize,
    name: &str,
    output: &str,
    usage: &ResourceUsage,
    start_next: bool,
    now: i64,
) -> Result<Completion> {
    let usage_json = serde_json::to_string(usage).map_err(|e| corrupt("usage", e))?;
    // The job must still be running too (the guard of every worker
    // transition), checked in the same statement.
    let changed = conn.prepare_cached(
        "UPDATE phases SET status = 'completed', output = ?3, error = NULL, usage = ?4, finished_at = ?5
         WHERE job_id = ?1 AND idx = ?2 AND status = 'running'
           AND EXISTS (SELECT 1 FROM jobs WHERE id = ?1 AND status = 'running')",
    )?
    .execute(params![job_id, index as i64, output, usage_json, now])?;
    if changed == 0 {
        return Ok(Completion::Stale);
    }
    let data = json!({"phase": name, "index": index, "usage": usage});
    job_event(conn, log, EventKind::PhaseCompleted, job_id, data, now)?;
    // The update above found the job running.
    if start_next && let Some(attempt) = start_pending_phase(conn, log, job_id, index + 1, now)? {
        return Ok(Completion::NextStarted(attempt));
    }
    // The job completes in the same write when this was its last phase.
    complete_job(conn, log, job_id, now)?;
    Ok(Completion::Recorded)
}

fn complete_job(conn: &Connection, log: &mut EventLog, job_id: &str, now: i64) -> Result<bool> {
    let changed = conn
        .prepare_cached(
            "UPDATE jobs SET status = 'completed', finished_at = ?2, error = NULL
         WHERE id = ?1 AND status = 'running'
           AND NOT EXISTS (SELECT 1 FROM phases WHERE job_id = ?1 AND status != 'completed')",
        )?
        .execute(params![job_id, now])?;
    if changed == 0 {
        return Ok(false);
    }
    job_event(conn, log, EventKind::JobCompleted, job_id, json!({}), now)?;
    Ok(true)
}

/// Phases that have not finished will not run: mark them cancelled.
fn cancel_unfinished_phases(conn: &Connection, job_id: &str, now: i64) -> Result<()> {
    conn.prepare_cached(
        "UPDATE phases SET status = 'cancelled', finished_at = COALESCE(finished_at, ?2)
         WHERE job_id = ?1 AND status IN ('pending', 'running')",
    )?
    .execute(params![job_id, now])?;
    Ok(())
}

fn record_attempt_error(
    conn: &Connection,
    job_id: &str,
    phase: Option<&str>,
    error: &str,
    now: i64,
) -> Result<u32> {
    let attempt: u32 =
        conn.query_row("SELECT attempt FROM jobs WHERE id = ?1", [job_id], |row| {
            row.get(0)
        })?;
    conn.prepare_cached(
        "INSERT OR REPLACE INTO attempt_errors (job_id, attempt, phase, error, at) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![job_id, attempt, phase, error, now])?;
    Ok(attempt)
}

#[allow(clippy::too_many_arguments)]
fn fail_phase(
    conn: &Connection,
    log: &mut EventLog,
    job_id: &str,
    index: usize,
    name: &str,
    error: &str,
    usage: Option<&ResourceUsage>,
    after: &AfterFailure,
    now: i64,
) -> Result<bool> {
    if !is_running(conn, job_id)? {
        return Ok(false);
    }
    let retrying = matches!(after, AfterFailure::Retry { .. });
    let usage_json = usage
        .map(serde_json::to_string)
        .transpose()
        .map_err(|e| corrupt("usage", e))?;
    let changed = conn
        .prepare_cached(
            "UPDATE phases SET status = ?3, error = ?4, usage = ?5, finished_at = ?6
         WHERE job_id = ?1 AND idx = ?2 AND status = 'running'",
        )?
        .execute(params![
            job_id,
            index as i64,
            if retrying { "pending" } else { "failed" },
            error,
            usage_json,
            now
        ])?;
    if changed == 0 {
        return Ok(false);
    }
    let attempt = record_attempt_error(conn, job_id, Some(name), error, now)?;
    let data = json!({"phase": name, "index": index, "attempt": attempt, "error": error, "retrying": retrying});
    job_event(conn, log, EventKind::PhaseFailed, job_id, data, now)?;
    end_attempt(
        conn,
        log,
        job_id,
        Some(name),
        attempt,
        error,
        after,
        false,
        now,
    )?;
    Ok(true)
}

/// After a failed attempt: the job waits for its retry at `run_at`, or
/// fails with its unfinished phases marked as never to run. `recovered` marks
/// the events of jobs a crash interrupted.
#[allow(clippy::too_many_arguments)]
fn end_attempt(
    conn: &Connection,
    log: &mut EventLog,
    job_id: &str,
    phase: Option<&str>,
    attempt: u32,
    error: &str,
    after: &AfterFailure,
    recovered: bool,
    now: i64,
) -> Result<()> {
    match after {
        AfterFailure::Retry { run_at } => {
            conn.prepare_cached(
                "UPDATE jobs SET status = 'pending', run_at = ?2, error = ?3 WHERE id = ?1",
            )?
            .execute(params![job_id, run_at, error])?;
            let data = json!({"attempt": attempt, "next_attempt": attempt + 1, "run_at": run_at, "error": error, "recovered": recovered});
            job_event(conn, log, EventKind::JobRetrying, job_id, data, now)
        }
        AfterFailure::Fail => {
            cancel_unfinished_phases(conn, job_id, now)?;
            conn.prepare_cached(
                "UPDATE jobs SET status = 'failed', finished_at = ?2, error = ?3 WHERE id = ?1",
            )?
            .execute(params![job_id, now, error])?;
            let data = json!({"phase": phase, "error": error, "recovered": recovered});
            job_event(conn, log, EventKind::JobFailed, job_id, data, now)
        }
    }
}

/// Moves a job from `expected` to cancelled, with every unfinished phase.
fn cancel(
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
    job_event(
        conn,
        log,
        EventKind::JobCancelled,
        job_id,
        json!({"was": expected}),
        now,
    )?;
    Ok(true)
}

fn cancel_if_pending(
    conn: &Connection,
    log: &mut EventLog,
    job_id: &str,
    now: i64,
) -> Result<CancelOutcome> {
    Ok(match job_status(conn, job_id)? {
        None => CancelOutcome::NotFound,
        Some(JobStatus::Pending) => {
            cancel(conn, log, job_id, JobStatus::Pending, now)?;
            CancelOutcome::Cancelled
        }
        Some(JobStatus::Running) => CancelOutcome::Running,
        Some(status) => CancelOutcome::AlreadyFinished(status),
    })
}

/// Shutdown hands a running job back between phases: it was not a failed
/// attempt, so the attempt is not counted.
fn release(conn: &Connection, job_id: &str, now: i64) -> Result<bool> {
    let changed = conn
        .prepare_cached(
            "UPDATE jobs SET status = 'pending', run_at = ?2, attempt = MAX(attempt - 1, 0)
         WHERE id = ?1 AND status = 'running'
           AND NOT EXISTS (SELECT 1 FROM phases WHERE job_id = ?1 AND status = 'running')",
        )?
        .execute(params![job_id, now])?;
    Ok(changed == 1)
}

fn retry(
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
    let data = json!({"manual": true, "from_start": from_start, "run_at": now});
    job_event(conn, log, EventKind::JobRetrying, job_id, data, now)?;
    Ok(RetryOutcome::Retried(Box::new(must_load(conn, job_id)?)))
}

fn delete(conn: &Connection, log: &mut EventLog, job_id: &str, now: i64) -> Result<DeleteOutcome> {
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
fn delete_row(conn: &Connection, log: &mut EventLog, job_id: &str, now: i64) -> Result<()> {
    conn.prepare_cached("DELETE FROM jobs WHERE id = ?1")?
        .execute([job_id])?;
    conn.prepare_cached("DELETE FROM events WHERE job_id = ?1")?
        .execute([job_id])?;
    // Settled deliveries go with their job; pending ones still go out.
    conn.prepare_cached(
        "DELETE FROM webhook_deliveries WHERE job_id = ?1 AND status != 'pending'",
    )?
    .execute([job_id])?;
    job_event(
        conn,
        log,
        EventKind::JobDeleted,
        job_id,
        json!({"id": job_id}),
        now,
    )
}

/// Why running jobs are recovered, as their attempt error says.
#[derive(Debug, Clone, Copy)]
enum Interruption<'a> {
    /// At start-up: the host stopped while they ran.
    Crash,
    /// A worker could not record one of this job's transitions.
    FailedWrite(&'a str),
}

fn recover(
    conn: &Connection,
    log: &mut EventLog,
    interruption: Interruption<'_>,
    now: i64,
) -> Result<Vec<Recovered>> {
    let only = match interruption {
        Interruption::Crash => None,
        Interruption::FailedWrite(job_id) => Some(job_id),
    };
    let running: Vec<(String, u32, u32)> = conn
        .prepare(
            "SELECT id, attempt, max_attempts FROM jobs
             WHERE status = 'running' AND (?1 IS NULL OR id = ?1) ORDER BY id",
        )?
        .query_map([only], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let cause = match interruption {
        Interruption::Crash => "the host stopped",
        Interruption::FailedWrite(_) => "storage failed to record its progress",
    };
    let mut recovered = Vec::with_capacity(running.len());
    for (job_id, attempt, max_attempts) in running {
        let interrupted: Option<(i64, String)> = conn
            .query_row(
                "SELECT idx, name FROM phases WHERE job_id = ?1 AND status = 'running'",
                [&job_id],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()?;
        let phase = interrupted.as_ref().map(|(_, name)| name.clone());
        let error = match &phase {
            Some(name) => {
                format!("interrupted: {cause} during phase `{name}` (attempt {attempt})")
            }
            None => format!("interrupted: {cause} between phases (attempt {attempt})"),
        };
        let requeued = attempt < max_attempts;
        record_attempt_error(conn, &job_id, phase.as_deref(), &error, now)?;
        if let Some((index, _)) = &interrupted {
            let status = if requeued { "pending" } else { "failed" };
            conn.execute(
                "UPDATE phases SET status = ?3, error = ?4, finished_at = ?5 WHERE job_id = ?1 AND idx = ?2",
                params![job_id, index, status, error, now],
            )?;
        }
        let after = if requeued {
            AfterFailure::Retry { run_at: now }
        } else {
            AfterFailure::Fail
        };
        end_attempt(
            conn,
            log,
            &job_id,
            phase.as_deref(),
            attempt,
            &error,
            &after,
            true,
            now,
        )?;
        recovered.push(Recovered {
            job_id,
            phase,
            attempt,
            requeued,
        });
    }
    Ok(recovered)
}

fn delete_finished_before(
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

/// The columns of [`JOB_COLUMNS`] that listings show: the payload is
/// left in the table.
const LISTED_JOB_COLUMNS: &str =
    "id, status, 'null', priority, run_at, attempt, max_attempts, backoff,
    idempotency_key, webhook_url, created_at, started_at, finished_at, error";

fn list(conn: &Connection, filter: &JobFilter) -> Result<JobPage> {
    let limit = filter.limit.clamp(1, MAX_PAGE);
    let raws: Vec<_> = conn
        .prepare_cached(&format!(
            "SELECT {LISTED_JOB_COLUMNS} FROM jobs
             WHERE (?1 IS NULL OR status = ?1)
               AND (?2 IS NULL OR EXISTS (SELECT 1 FROM phases WHERE job_id = jobs.id AND plugin = ?2))
               AND (?3 IS NULL OR id < ?3)
             ORDER BY id DESC LIMIT ?4"
        ))?
        .query_map(
            params![filter.status.map(JobStatus::as_str), filter.plugin, filter.cursor, limit as i64 + 1],
            job_row,
        )?
        .collect::<rusqlite::Result<_>>()?;
    let mut jobs = Vec::with_capacity(raws.len());
    for raw in raws {
        let mut job = raw.decode()?;
        job.phases = phases_where(conn, &job.id, Listed::Summary)?;
        jobs.push(JobSummary::from(job));
    }
    let next_cursor = if jobs.len() > limit {
        jobs.truncate(limit);
        jobs.last().map(|j| j.id.clone())
    } else {
        None
    };
    Ok(JobPage { jobs, next_cursor })
}

impl Storage {
    /// Stores a new job. With `claim_at`, the same write also claims it
    /// (running, first phase started) when it is due then and no other job
    /// is due: exactly the job a claim would pick, one commit sooner.
    pub async fn create_job(&self, new: NewJob, claim_at: Option<i64>) -> Result<CreateOutcome> {
        self.write(move |conn, log| {
            let created = create(conn, log, &new)?;
            match (created, claim_at) {
                (CreateOutcome::Created(mut job), Some(now))
                    if job.run_at <= now && !other_job_due(conn, &job.id, now)? =>
                {
                    claim_created(conn, log, &mut job, now)?;
                    Ok(CreateOutcome::Created(job))
                }
                (created, _) => Ok(created),
            }
        })
        .await
    }

    /// Claims up to `limit` due pending jobs, highest priority first: marks
    /// each running (one more attempt) and starts its first unfinished
    /// phase, in one write. The jobs come with their phases, as a worker
    /// needs them, but without attempt errors or webhook status.
    pub async fn claim_due_jobs(&self, now: i64, limit: usize) -> Result<Vec<Job>> {
        self.write(move |conn, log| claim(conn, log, now, limit))
            .await
    }

    /// The earliest `run_at` of any pending job.
    pub async fn next_due_at(&self) -> Result<Option<i64>> {
        self.read(next_due_at).await
    }

    /// Marks a pending phase of a running job as running; returns the
    /// phase's attempt number, or `None` if the job or phase moved on.
    pub async fn start_phase(&self, job_id: &str, index: usize, now: i64) -> Result<Option<u32>> {
        let job_id = job_id.to_owned();
        self.write(move |conn, log| {
            if !is_running(conn, &job_id)? {
                return Ok(None);
            }
            start_pending_phase(conn, log, &job_id, index, now)
        })
        .await
    }

    /// Keeps a run's last progress report on its phase (no event: progress
    /// is live-only), if the phase is still running.
    pub async fn record_progress(
        &self,
        job_id: &str,
        index: usize,
        progress: &Progress,
    ) -> Result<()> {
        let progress = serde_json::to_string(progress).map_err(|e| corrupt("progress", e))?;
        let job_id = job_id.to_owned();
        self.write(move |conn, _| {
            conn.prepare_cached(
                "UPDATE phases SET progress = ?3 WHERE job_id = ?1 AND idx = ?2 AND status = 'running'",
            )?
            .execute(params![job_id, index as i64, progress])?;
            Ok(())
        })
        .await
    }

    /// Stores a running phase's output, and in the same write either starts
    /// the next phase (`start_next`) or, after the last phase, completes
    /// the job. `phase` is the worker's copy: its index and name (which
    /// never change) identify it, so the write need not read them back.
    pub async fn complete_phase(
        &self,
        job_id: &str,
        phase: &Phase,
        output: Json,
        usage: ResourceUsage,
        start_next: bool,
        now: i64,
    ) -> Result<Completion> {
        let (job_id, index, name) = (job_id.to_owned(), phase.index, phase.name.clone());
        self.write(move |conn, log| {
            complete_phase(
                conn,
                log,
                &job_id,
                index,
                &name,
                output.as_str(),
                &usage,
                start_next,
                now,
            )
        })
        .await
    }

    /// Completes a running job whose phases all completed.
    pub async fn complete_job(&self, job_id: &str, now: i64) -> Result<bool> {
        let job_id = job_id.to_owned();
        self.write(move |conn, log| complete_job(conn, log, &job_id, now))
            .await
    }

    /// Records a failed attempt of a running phase (the worker's copy, as
    /// for [`Storage::complete_phase`]), then retries or fails the job.
    pub async fn fail_phase(
        &self,
        job_id: &str,
        phase: &Phase,
        error: String,
        usage: Option<ResourceUsage>,
        after: AfterFailure,
        now: i64,
    ) -> Result<bool> {
        let (job_id, index, name) = (job_id.to_owned(), phase.index, phase.name.clone());
        self.write(move |conn, log| {
            fail_phase(
                conn,
                log,
                &job_id,
                index,
                &name,
                &error,
                usage.as_ref(),
                &after,
                now,
            )
        })
        .await
    }

    /// Cancels a job its worker is running (the worker calls this once the
    /// phase has stopped); `stopped` is the phase the cancel stopped, if
    /// any, with what it used, which its phase keeps.
    pub async fn cancel_running_job(
        &self,
        job_id: &str,
        stopped: Option<(usize, ResourceUsage)>,
        now: i64,
    ) -> Result<bool> {
        let job_id = job_id.to_owned();
        let stopped = stopped
            .map(|(index, usage)| serde_json::to_string(&usage).map(|usage| (index, usage)))
            .transpose()
            .map_err(|e| corrupt("usage", e))?;
        self.write(move |conn, log| {
            let cancelled = cancel(conn, log, &job_id, JobStatus::Running, now)?;
            if cancelled && let Some((index, usage)) = &stopped {
                conn.prepare_cached("UPDATE phases SET usage = ?3 WHERE job_id = ?1 AND idx = ?2")?
                    .execute(params![job_id, *index as i64, usage])?;
            }
            Ok(cancelled)
        })
        .await
    }

    /// Cancels a job if it is pending; otherwise says where it is.
    pub async fn cancel_pending_job(&self, job_id: &str, now: i64) -> Result<CancelOutcome> {
        let job_id = job_id.to_owned();
        self.write(move |conn, log| cancel_if_pending(conn, log, &job_id, now))
            .await
    }

    /// Hands a running job with no running phase back to pending (shutdown).
    pub async fn release_job(&self, job_id: &str, now: i64) -> Result<bool> {
        let job_id = job_id.to_owned();
        self.write(move |conn, _| release(conn, &job_id, now)).await
    }

    pub async fn retry_job(
        &self,
        job_id: &str,
        from_start: bool,
        now: i64,
    ) -> Result<RetryOutcome> {
        let job_id = job_id.to_owned();
        self.write(move |conn, log| retry(conn, log, &job_id, from_start, now))
            .await
    }

    pub async fn delete_job(&self, job_id: &str, now: i64) -> Result<DeleteOutcome> {
        let job_id = job_id.to_owned();
        self.write(move |conn, log| delete(conn, log, &job_id, now))
            .await
    }

    /// At start-up: requeues (or fails, when out of attempts) every job a
    /// crash left running, recording which phase and attempt it interrupted.
    pub async fn recover_running_jobs(&self, now: i64) -> Result<Vec<Recovered>> {
        self.write(move |conn, log| recover(conn, log, Interruption::Crash, now))
            .await
    }

    /// Recovers one running job whose worker could not record a
    /// transition, as a crash would have: requeued, or failed when out of
    /// attempts, with the interrupted phase on record.
    pub async fn recover_job(&self, job_id: &str, now: i64) -> Result<Option<Recovered>> {
        let job_id = job_id.to_owned();
        self.write(move |conn, log| {
            Ok(recover(conn, log, Interruption::FailedWrite(&job_id), now)?.pop())
        })
        .await
    }

    /// Deletes up to `limit` terminal jobs that finished before `cutoff`.
    pub async fn delete_finished_before(
        &self,
        cutoff: i64,
        limit: usize,
        now: i64,
    ) -> Result<Vec<String>> {
        self.write(move |conn, log| delete_finished_before(conn, log, cutoff, limit, now))
            .await
    }

    pub async fn job(&self, job_id: &str) -> Result<Option<Job>> {
        let job_id = job_id.to_owned();
        self.read(move |conn| load_job(conn, &job_id)).await
    }

    /// A job's status alone: one indexed read instead of the four that
    /// loading the whole job takes.
    pub async fn job_status(&self, job_id: &str) -> Result<Option<JobStatus>> {
        let job_id = job_id.to_owned();
        self.read(move |conn| job_status(conn, &job_id)).await
    }

    /// Jobs newest first, filtered, one page at a time.
    pub async fn jobs(&self, filter: JobFilter) -> Result<JobPage> {
        self.read(move |conn| list(conn, &filter)).await
    }

    /// Pending jobs that are due by `now`: the queue's backlog.
    pub async fn due_count(&self, now: i64) -> Result<u64> {
        self.read(move |conn| {
            let count: i64 = conn
                .prepare_cached(&format!("{PENDING_PRIORITIES} {DUE_COUNT}"))?
                .query_row([now], |row| row.get(0))?;
            Ok(count as u64)
        })
        .await
    }

    /// Jobs waiting to run, now or later.
    pub async fn pending_count(&self) -> Result<u64> {
        self.read(|conn| {
            let count: i64 = conn
                .prepare_cached(
                    "SELECT COUNT(*) FROM jobs INDEXED BY jobs_due WHERE status = 'pending'",
                )?
                .query_row([], |row| row.get(0))?;
            Ok(count as u64)
        })
        .await
    }

    /// Number of jobs in each status.
    pub async fn job_counts(&self) -> Result<Vec<(JobStatus, u64)>> {
        self.read(|conn| {
            let mut stmt =
                conn.prepare_cached("SELECT status, COUNT(*) FROM jobs GROUP BY status")?;
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
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use std::path::Path;

    use crate::events::Bus;
    use crate::storage::{Durability, NewPluginVersion};

    /// Storage with versions 1.0.0 (active) and 2.0.0 of `echo`.
    async fn storage_with_echo(dir: &Path, bus: Bus) -> Storage {
        let storage = Storage::open(&dir.join("db"), Durability::Process, bus).unwrap();
        for version in ["1.0.0", "2.0.0"] {
            storage
                .put_plugin_version(
                    NewPluginVersion {
                        name: "echo".into(),
                        version: version.into(),
                        content_hash: format!("hash-{version}"),
                        description: String::new(),
                        component: vec![0; 8],
                        quota: Default::default(),
                    },
                    0,
                )
                .await
                .unwrap();
        }
        storage
    }

    /// A job of two `echo` phases, "first" (the active version) and
    /// "second" (2.0.0), with every option set.
    fn two_phase_job(id: &str) -> NewJob {
        let phase = |name: &str, version: Option<&str>| NewPhase {
            name: name.into(),
            plugin: "echo".into(),
            version: version.map(Into::into),
            config: json!({"name": name}),
            timeout_ms: 1234,
        };
        NewJob {
            id: id.into(),
            payload: Json::from_value(&json!({"rows": [1, 2, 3], "note": "é"})),
            priority: 7,
            run_at: 1_000,
            max_attempts: 4,
            backoff: BackoffPolicy {
                initial_ms: 10,
                multiplier: 1.5,
                max_ms: 100,
                jitter: false,
            },
            idempotency_key: Some("key-1".into()),
            webhook_url: Some("http://127.0.0.1:9/hook".into()),
            webhook_secret: Some("whsec_c2VjcmV0".into()),
            phases: vec![phase("first", None), phase("second", Some("2.0.0"))],
            created_at: 900,
        }
    }

    /// `create` and `claim` return the jobs they changed without reading
    /// them back: what they return must be exactly what loading returns.
    #[tokio::test]
    async fn created_and_claimed_jobs_are_returned_as_they_are_stored() {
        let dir = tempfile::tempdir().unwrap();
        let storage = storage_with_echo(dir.path(), Bus::default()).await;
        let new = two_phase_job("job-1");
        let second_job = NewJob {
            idempotency_key: None,
            ..two_phase_job("job-2")
        };
        let CreateOutcome::Created(created) = storage.create_job(new, None).await.unwrap() else {
            panic!("not created");
        };
        assert_eq!(
            created.phases[0].version, "1.0.0",
            "the active version is pinned"
        );
        assert_eq!(Some(created), storage.job("job-1").await.unwrap());

        // A claim returns the job with its first phase started, without
        // reading either back.
        let mut claimed = storage.claim_due_jobs(2_000, 10).await.unwrap();
        assert_eq!(claimed.len(), 1);
        let claimed = claimed.remove(0);
        assert_eq!(claimed.status, JobStatus::Running);
        assert_eq!(claimed.phases[0].status, PhaseStatus::Running);
        assert_eq!(claimed.phases[0].attempts, 1);
        assert_eq!(Some(claimed), storage.job("job-1").await.unwrap());

        // Created and claimed in one write (nothing else is due): the same.
        let claim_at = Some(2_000);
        let CreateOutcome::Created(created_running) =
            storage.create_job(second_job, claim_at).await.unwrap()
        else {
            panic!("not created");
        };
        assert_eq!(created_running.status, JobStatus::Running);
        assert_eq!(created_running.phases[0].status, PhaseStatus::Running);
        assert_eq!(Some(created_running), storage.job("job-2").await.unwrap());
        storage.close().await;
    }

    /// A completion starts the next phase in the same write, reading back
    /// only what the events need: both events name the right phase, and the
    /// stored phases match what the worker is told.
    #[tokio::test]
    async fn a_completion_starts_the_next_phase_and_announces_both() {
        let dir = tempfile::tempdir().unwrap();
        let bus = Bus::default();
        let mut events = bus.subscribe();
        let storage = storage_with_echo(dir.path(), bus).await;
        storage
            .create_job(two_phase_job("job-1"), Some(2_000))
            .await
            .unwrap();
        let job = storage.job("job-1").await.unwrap().unwrap();

        let usage = ResourceUsage::default();
        let completion = storage
            .complete_phase(
                &job.id,
                &job.phases[0],
                Json::parse(r#"{"n":1}"#.into()).unwrap(),
                usage,
                true,
                3_000,
            )
            .await
            .unwrap();
        assert!(matches!(completion, Completion::NextStarted(1)));
        let stored = storage.job("job-1").await.unwrap().unwrap();
        assert_eq!(stored.phases[0].status, PhaseStatus::Completed);
        assert_eq!(stored.phases[1].status, PhaseStatus::Running);
        assert_eq!(stored.phases[1].attempts, 1);
        assert_eq!(stored.phases[1].started_at, Some(3_000));

        let mut announced = Vec::new();
        while let Ok(event) = events.try_recv() {
            announced.push((event.kind, event.data.clone()));
        }
        let after_claim: Vec<_> = announced
            .iter()
            .skip_while(|(kind, _)| *kind != EventKind::PhaseCompleted)
            .collect();
        assert_eq!(after_claim.len(), 2, "{announced:?}");
        assert_eq!(after_claim[0].1["phase"], "first");
        assert_eq!(after_claim[0].1["index"], 0);
        assert_eq!(after_claim[1].0, EventKind::PhaseStarted);
        assert_eq!(
            after_claim[1].1,
            json!({"phase": "second", "index": 1, "plugin": "echo", "version": "2.0.0", "attempt": 1})
        );

        // A failure of that phase is recorded under its name.
        storage
            .fail_phase(
                &job.id,
                &job.phases[1],
                "boom".into(),
                None,
                AfterFailure::Fail,
                4_000,
            )
            .await
            .unwrap();
        let failed = storage.job("job-1").await.unwrap().unwrap();
        assert_eq!(failed.status, JobStatus::Failed);
        assert_eq!(failed.errors[0].phase.as_deref(), Some("second"));
        storage.close().await;
    }

    /// A connection set up like the writer's, on an in-memory database
    /// with the plugin versions `two_phase_job` pins.
    fn writer_with_echo() -> Connection {
        let mut conn = Connection::open_in_memory().unwrap();
        crate::storage::migrate(&mut conn).unwrap();
        super::super::tune(&conn).unwrap();
        conn.execute_batch(
            "INSERT INTO plugins (name, active_version, created_at) VALUES ('echo', '1.0.0', 0);
             INSERT INTO plugin_versions (plugin, version, content_hash, size, description, component, uploaded_at)
             VALUES ('echo', '1.0.0', 'a', 1, '', x'00', 0), ('echo', '2.0.0', 'b', 1, '', x'00', 0);",
        )
        .unwrap();
        conn
    }

    /// The SQLite VM steps these cached statements took since the last
    /// call, which starts counting anew.
    fn steps_of(conn: &Connection, statements: &[String]) -> i32 {
        statements
            .iter()
            .map(|sql| {
                let statement = conn.prepare_cached(sql).unwrap();
                statement.reset_status(rusqlite::StatementStatus::VmStep)
            })
            .sum()
    }

    /// Jobs scheduled for later cost the searches for due jobs nothing: a
    /// claim, the check at enqueue for another due job, the dispatcher's
    /// next wake-up and the due count take as many SQLite steps with 5,000
    /// of them as with 5. (Scanning `jobs_due` for `run_at <= now` across
    /// priorities read them all.)
    #[test]
    fn searches_for_due_jobs_skip_jobs_scheduled_for_later() {
        let steps = |scheduled: usize| -> i32 {
            let conn = writer_with_echo();
            let mut log = EventLog::default();
            let job = |id: String, priority: i32, run_at: i64| NewJob {
                id,
                priority,
                run_at,
                idempotency_key: None,
                ..two_phase_job("")
            };
            for i in 0..scheduled {
                let later = job(format!("later-{i}"), i as i32 % 3, 1_000_000);
                create(&conn, &mut log, &later).unwrap();
            }
            create(&conn, &mut log, &job("due".into(), 1, 0)).unwrap();

            let searches = [
                format!("{PENDING_PRIORITIES} {OTHER_JOB_DUE}"),
                format!("{PENDING_PRIORITIES} {NEXT_DUE}"),
                format!("{PENDING_PRIORITIES} {DUE_COUNT}"),
                PRIORITY_BELOW.to_owned(),
                claim_level_sql(),
            ];
            steps_of(&conn, &searches);
            assert!(other_job_due(&conn, "another", 1_000).unwrap());
            assert_eq!(next_due_at(&conn).unwrap(), Some(0));
            let due: i64 = conn
                .prepare_cached(&searches[2])
                .unwrap()
                .query_row([1_000], |row| row.get(0))
                .unwrap();
            assert_eq!(due, 1);
            let claimed = claim(&conn, &mut log, 1_000, 8).unwrap();
            assert_eq!(claimed.len(), 1);
            assert_eq!(claimed[0].id, "due");
            steps_of(&conn, &searches)
        };
        let (few, many) = (steps(5), steps(5_000));
        assert!(
            many < 2 * few,
            "{few} SQLite steps with 5 jobs scheduled for later, {many} with 5,000"
        );
    }

    /// A claim visits priorities only until it is full: with every pending
    /// job due and each at a priority of its own, claiming 8 takes as many
    /// SQLite steps with 5,000 priorities as with 20.
    #[test]
    fn a_claim_visits_only_the_priorities_it_takes_jobs_from() {
        let steps = |priorities: usize| -> i32 {
            let conn = writer_with_echo();
            let mut log = EventLog::default();
            for i in 0..priorities {
                let job = NewJob {
                    id: format!("job-{i}"),
                    priority: i as i32,
                    run_at: 0,
                    idempotency_key: None,
                    ..two_phase_job("")
                };
                create(&conn, &mut log, &job).unwrap();
            }
            let searches = [PRIORITY_BELOW.to_owned(), claim_level_sql()];
            steps_of(&conn, &searches);
            let claimed = claim(&conn, &mut log, 1_000, 8).unwrap();
            let priorities_claimed: Vec<i32> = claimed.iter().map(|job| job.priority).collect();
            let top = priorities as i32 - 1;
            assert_eq!(
                priorities_claimed,
                (top - 7..=top).rev().collect::<Vec<_>>()
            );
            steps_of(&conn, &searches)
        };
        let (few, many) = (steps(20), steps(5_000));
        assert!(
            many < 2 * few,
            "{few} SQLite steps with 20 priorities, {many} with 5,000"
        );
    }
}
