//! Storing a new job: idempotency, pinning plugin versions, the rows and
//! `job:created`.

use rusqlite::{Connection, OptionalExtension, params};

use super::corrupt;
use super::rows::must_load;
use super::transitions::job_event;
use super::writer::EventLog;
use crate::model::EventBody;
use crate::storage::{CreateOutcome, NewJob, Result};

pub(super) const INSERT_JOB: &str = "
    INSERT INTO jobs (id, status, payload, priority, run_at, max_attempts, backoff, idempotency_key,
                      webhook_url, webhook_secret, created_at, concurrency_key)
    VALUES (?1, 'pending', ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)";

pub(super) fn create(conn: &Connection, log: &mut EventLog, new: &NewJob) -> Result<CreateOutcome> {
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
            None => return Ok(phase.unknown_plugin()),
        }
    }
    conn.prepare_cached(INSERT_JOB)?.execute(params![
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
        new.concurrency_key,
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
            crate::model::json::text(&phase.config),
            phase.timeout_ms as i64
        ])?;
    }
    let job = new.stored(pinned);
    job_event(conn, log, &job.id, EventBody::created(&job), new.created_at)?;
    Ok(CreateOutcome::Created(job, None))
}
