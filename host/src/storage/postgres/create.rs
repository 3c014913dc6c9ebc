//! Storing a new job (idempotency, pinning plugin versions), and claiming
//! due jobs with `FOR UPDATE SKIP LOCKED`: claimers on every host take
//! disjoint jobs without waiting for each other.

use super::rows::{J_JOB_COLUMNS, LEASE_COLUMN, Listed, decode_job, must_load, phases_of};
use super::transitions::{job_event, mark_phase_running};
use super::{Tx, WriteScope, corrupt, execute, query, query_one, query_opt};
use crate::model::event::JobStarted;
use crate::model::{EventBody, Job, JobStatus, Phase, PhaseStatus};
use crate::storage::{Claimed, CreateOutcome, Lease, NewJob, Result};

pub(super) async fn create(
    tx: &Tx<'_>,
    scope: &mut WriteScope,
    new: &NewJob,
) -> Result<CreateOutcome> {
    let mut pinned = Vec::with_capacity(new.phases.len());
    for phase in &new.phases {
        let version: Option<String> = match &phase.version {
            Some(version) => query_opt(
                tx,
                "SELECT version FROM plugin_versions WHERE plugin = $1 AND version = $2",
                &[&phase.plugin, version],
            )
            .await?
            .map(|row| row.get(0)),
            None => query_opt(
                tx,
                "SELECT active_version FROM plugins WHERE name = $1",
                &[&phase.plugin],
            )
            .await?
            .and_then(|row| row.get(0)),
        };
        match version {
            Some(version) => pinned.push(version),
            None => return Ok(phase.unknown_plugin()),
        }
    }
    let backoff = serde_json::to_string(&new.backoff).map_err(|e| corrupt("backoff", e))?;
    let indexes: Vec<i32> = (0..new.phases.len() as i32).collect();
    let names: Vec<&str> = new.phases.iter().map(|p| p.name.as_str()).collect();
    let plugins: Vec<&str> = new.phases.iter().map(|p| p.plugin.as_str()).collect();
    let configs: Vec<String> = new
        .phases
        .iter()
        .map(|p| crate::model::json::text(&p.config))
        .collect();
    let timeouts: Vec<i64> = new.phases.iter().map(|p| p.timeout_ms as i64).collect();
    // The job and its phases in one statement. Two requests with one
    // idempotency key at once: the second's insert waits for the first's
    // commit, then inserts nothing, and it returns the first job.
    let inserted = execute(
        tx,
        "WITH job AS (
             INSERT INTO jobs (id, status, payload, priority, run_at, max_attempts, backoff,
                               idempotency_key, webhook_url, webhook_secret, created_at)
             VALUES ($1, 'pending', $2, $3, $4, $5, $6, $7, $8, $9, $10)
             ON CONFLICT (idempotency_key) DO NOTHING
             RETURNING id
         )
         INSERT INTO phases (job_id, idx, name, plugin, version, config, timeout_ms, status)
         SELECT job.id, idx, name, plugin, version, config, timeout_ms, 'pending'
         FROM job, unnest($11::int[], $12::text[], $13::text[], $14::text[], $15::text[],
                          $16::bigint[]) AS p(idx, name, plugin, version, config, timeout_ms)",
        &[
            &new.id,
            &new.payload.as_str(),
            &new.priority,
            &new.run_at,
            &(new.max_attempts as i32),
            &backoff,
            &new.idempotency_key,
            &new.webhook_url,
            &new.webhook_secret,
            &new.created_at,
            &indexes,
            &names,
            &plugins,
            &pinned,
            &configs,
            &timeouts,
        ],
    )
    .await?;
    if inserted == 0 {
        let row = query_opt(
            tx,
            "SELECT id FROM jobs WHERE idempotency_key = $1",
            &[&new.idempotency_key],
        )
        .await?
        .ok_or_else(|| corrupt("idempotency key without its job", "?"))?;
        let id: String = row.get(0);
        return Ok(CreateOutcome::Existing(must_load(tx, &id).await?));
    }
    let job = new.stored(pinned);
    job_event(tx, scope, &job.id, EventBody::created(&job), new.created_at).await?;
    Ok(CreateOutcome::Created(job, None))
}

/// Whether a pending job other than `job_id` is due at `now`.
pub(super) async fn other_job_due(tx: &Tx<'_>, job_id: &str, now: i64) -> Result<bool> {
    let row = query_opt(
        tx,
        "SELECT 1 FROM jobs WHERE status = 'pending' AND run_at <= $1 AND id <> $2 LIMIT 1",
        &[&now, &job_id],
    )
    .await?;
    Ok(row.is_some())
}

/// Claims up to `limit` due jobs, highest priority first, then earliest
/// `run_at`, skipping rows another claimer holds; starts the first
/// unfinished phase of each.
pub(super) async fn claim(
    tx: &Tx<'_>,
    scope: &mut WriteScope,
    now: i64,
    limit: usize,
) -> Result<Vec<Claimed>> {
    let sql = format!(
        "WITH picked AS (
             SELECT id FROM jobs WHERE status = 'pending' AND run_at <= $1
             ORDER BY priority DESC, run_at, id LIMIT $2
             FOR UPDATE SKIP LOCKED
         )
         UPDATE jobs j SET status = 'running', attempt = j.attempt + 1, lease = j.lease + 1,
                          started_at = COALESCE(j.started_at, $1), owner = $3,
                          cancel_requested = false
         FROM picked WHERE j.id = picked.id
         RETURNING {J_JOB_COLUMNS}"
    );
    let rows = query(tx, &sql, &[&now, &(limit as i64), &&*scope.host]).await?;
    let mut jobs = Vec::with_capacity(rows.len());
    for row in &rows {
        let mut job = decode_job(row)?;
        let token: i64 = row.get(LEASE_COLUMN);
        job.phases = phases_of(tx, &job.id, Listed::Whole).await?;
        start_claimed(tx, scope, &mut job, now).await?;
        let lease = Lease {
            job_id: job.id.clone(),
            attempt: job.attempt,
            token,
        };
        jobs.push(Claimed { job, lease });
    }
    // RETURNING has no order.
    crate::storage::jobs::in_claim_order(&mut jobs);
    Ok(jobs)
}

/// Claims the job just created, which the caller knows is due and the only
/// job due: the job and its first phase started in one statement.
pub(super) async fn claim_created(
    tx: &Tx<'_>,
    scope: &mut WriteScope,
    job: &mut Job,
    now: i64,
) -> Result<Lease> {
    let row = query_one(
        tx,
        "WITH claimed AS (
             UPDATE jobs SET status = 'running', attempt = 1, lease = lease + 1, started_at = $2,
                             owner = $3
             WHERE id = $1 RETURNING lease
         ), started AS (
             UPDATE phases SET status = 'running', attempts = attempts + 1, started_at = $2
             WHERE job_id = $1 AND idx = 0 AND status = 'pending' RETURNING idx
         )
         SELECT (SELECT lease FROM claimed), (SELECT count(*) FROM started)",
        &[&job.id, &now, &&*scope.host],
    )
    .await?;
    let token: Option<i64> = row.get(0);
    let token = token.ok_or_else(|| corrupt("job vanished inside its transaction", &job.id))?;
    job.status = JobStatus::Running;
    job.attempt = 1;
    job.started_at = Some(now);
    let started = EventBody::JobStarted(JobStarted { attempt: 1 });
    job_event(tx, scope, &job.id, started, now).await?;
    // A new job's phases are all pending: the first one started.
    if row.get::<_, i64>(1) == 1
        && let Some(first) = job.phases.first_mut()
    {
        first.status = PhaseStatus::Running;
        first.attempts += 1;
        first.started_at = Some(now);
        job_event(tx, scope, &job.id, EventBody::phase_started(first), now).await?;
    }
    Ok(Lease {
        job_id: job.id.clone(),
        attempt: 1,
        token,
    })
}

/// Announces a job just marked running and starts its first unfinished
/// phase, in the job's copy too.
async fn start_claimed(tx: &Tx<'_>, scope: &mut WriteScope, job: &mut Job, now: i64) -> Result<()> {
    let started = EventBody::JobStarted(JobStarted {
        attempt: job.attempt,
    });
    job_event(tx, scope, &job.id, started, now).await?;
    if let Some(first) = job
        .phases
        .iter_mut()
        .find(|p| p.status != PhaseStatus::Completed)
    {
        start_loaded_phase(tx, scope, &job.id, first, now).await?;
    }
    Ok(())
}

/// Starts a pending phase whose row the caller has just read, and updates
/// that copy to match.
async fn start_loaded_phase(
    tx: &Tx<'_>,
    scope: &mut WriteScope,
    job_id: &str,
    phase: &mut Phase,
    now: i64,
) -> Result<()> {
    if !mark_phase_running(tx, job_id, phase.index, now).await? {
        return Ok(());
    }
    phase.status = PhaseStatus::Running;
    phase.attempts += 1;
    phase.started_at = Some(now);
    phase.finished_at = None;
    job_event(tx, scope, job_id, EventBody::phase_started(phase), now).await
}
