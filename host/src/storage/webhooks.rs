//! The webhook outbox. A delivery row is written in the same transaction as
//! the job's terminal state, with the exact body every attempt will send
//! and a stable id (the receiver's idempotency key); the delivery worker
//! records each attempt.

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use serde_json::json;

use super::{EventLog, Result, Storage};
use crate::events::{EventKind, NewEvent};

/// A delivery to attempt.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub id: String,
    pub job_id: String,
    pub url: String,
    /// The job's own secret (`whsec_…`); `None` means the server default.
    pub secret: Option<String>,
    pub body: String,
    pub attempts: u32,
}

/// What one attempt achieved.
#[derive(Debug, Clone, PartialEq)]
pub enum AttemptOutcome {
    Delivered {
        status: u16,
    },
    /// Try again at `next_attempt_at` (Unix ms).
    Retry {
        status: Option<u16>,
        error: String,
        next_attempt_at: i64,
    },
    /// Give up: a permanent refusal, or attempts ran out.
    Failed {
        status: Option<u16>,
        error: String,
    },
}

/// A job's latest webhook delivery, as `GET /jobs/{id}` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct WebhookStatus {
    pub id: String,
    pub url: String,
    pub status: String,
    pub attempts: u32,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    #[serde(serialize_with = "crate::time::as_rfc3339::option::serialize")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub finished_at: Option<i64>,
}

/// Adds a delivery for a job that just reached a terminal state, if the job
/// has a webhook. Runs inside that transition's transaction.
pub(super) fn enqueue(
    conn: &Connection,
    log: &mut EventLog,
    job_id: &str,
    kind: EventKind,
    now: i64,
) -> Result<()> {
    type Target = (Option<String>, Option<String>, i64, i64, Option<String>);
    let target: Option<Target> = conn
        .prepare_cached("SELECT webhook_url, webhook_secret, attempt, created_at, error FROM jobs WHERE id = ?1")?
        .query_row([job_id], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?)))
        .optional()?;
    let Some((Some(url), secret, attempt, created_at, error)) = target else {
        return Ok(());
    };
    let status = kind.name().trim_start_matches("job:");
    let body = json!({
        "type": kind.name(),
        "timestamp": crate::time::rfc3339(now),
        "data": {
            "job_id": job_id,
            "status": status,
            "attempt": attempt,
            "error": error,
            "created_at": crate::time::rfc3339(created_at),
            "finished_at": crate::time::rfc3339(now),
        }
    });
    conn.prepare_cached(
        "INSERT INTO webhook_deliveries (id, job_id, url, secret, event, body, status, next_attempt_at, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'pending', ?7, ?7)",
    )?
    .execute(params![
        format!("msg_{}", uuid::Uuid::now_v7().simple()),
        job_id,
        url,
        secret,
        kind.name(),
        crate::json::text(&body),
        now
    ])?;
    log.webhook_added = true;
    Ok(())
}

pub(super) fn latest_for_job(conn: &Connection, job_id: &str) -> Result<Option<WebhookStatus>> {
    Ok(conn
        .prepare_cached(
            "SELECT id, url, status, attempts, last_status, last_error, finished_at FROM webhook_deliveries
             WHERE job_id = ?1 ORDER BY created_at DESC, id DESC LIMIT 1",
        )?
        .query_row([job_id], |row| {
            Ok(WebhookStatus {
                id: row.get(0)?,
                url: row.get(1)?,
                status: row.get(2)?,
                attempts: row.get(3)?,
                last_status: row.get(4)?,
                last_error: row.get(5)?,
                finished_at: row.get(6)?,
            })
        })
        .optional()?)
}

fn record(
    conn: &Connection,
    log: &mut EventLog,
    delivery: &Delivery,
    outcome: &AttemptOutcome,
    now: i64,
) -> Result<()> {
    let attempts = delivery.attempts + 1;
    let (status, http, error, next, finished) = match outcome {
        AttemptOutcome::Delivered { status } => ("delivered", Some(*status), None, now, Some(now)),
        AttemptOutcome::Retry {
            status,
            error,
            next_attempt_at,
        } => (
            "pending",
            *status,
            Some(error.as_str()),
            *next_attempt_at,
            None,
        ),
        AttemptOutcome::Failed { status, error } => {
            ("failed", *status, Some(error.as_str()), now, Some(now))
        }
    };
    // A settled delivery no longer needs its secret.
    conn.prepare_cached(
        "UPDATE webhook_deliveries SET status = ?2, attempts = ?3, last_status = ?4, last_error = ?5,
                next_attempt_at = ?6, finished_at = ?7,
                secret = CASE WHEN ?2 = 'pending' THEN secret END
         WHERE id = ?1",
    )?
    .execute(params![delivery.id, status, attempts, http, error, next, finished])?;
    if finished.is_some() {
        // Retention already took its job: the settled row goes too.
        conn.prepare_cached(
            "DELETE FROM webhook_deliveries
             WHERE id = ?1 AND NOT EXISTS (SELECT 1 FROM jobs WHERE jobs.id = webhook_deliveries.job_id)",
        )?
        .execute([&delivery.id])?;
    }
    let data = json!({"webhook_id": delivery.id, "url": delivery.url, "attempts": attempts, "status": http, "error": error});
    match outcome {
        AttemptOutcome::Delivered { .. } => log.emit(
            conn,
            NewEvent::job(EventKind::WebhookDelivered, &delivery.job_id, data),
            now,
        ),
        AttemptOutcome::Failed { .. } => log.emit(
            conn,
            NewEvent::job(EventKind::WebhookFailed, &delivery.job_id, data),
            now,
        ),
        AttemptOutcome::Retry { .. } => Ok(()),
    }
}

impl Storage {
    /// Pending deliveries due by `now`, oldest first.
    pub async fn due_webhooks(&self, now: i64, limit: usize) -> Result<Vec<Delivery>> {
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT id, job_id, url, secret, body, attempts FROM webhook_deliveries
                 WHERE status = 'pending' AND next_attempt_at <= ?1 ORDER BY next_attempt_at, id LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![now, limit as i64], |row| {
                Ok(Delivery {
                    id: row.get(0)?,
                    job_id: row.get(1)?,
                    url: row.get(2)?,
                    secret: row.get(3)?,
                    body: row.get(4)?,
                    attempts: row.get(5)?,
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    /// When the next pending delivery is due.
    pub async fn next_webhook_at(&self) -> Result<Option<i64>> {
        self.read(|conn| {
            Ok(conn.query_row(
                "SELECT MIN(next_attempt_at) FROM webhook_deliveries WHERE status = 'pending'",
                [],
                |row| row.get(0),
            )?)
        })
        .await
    }

    /// Records one attempt; emits `job:webhook:delivered` or
    /// `job:webhook:failed` when the delivery is settled. Works whether or
    /// not the job still exists.
    pub async fn record_webhook_attempt(
        &self,
        delivery: Delivery,
        outcome: AttemptOutcome,
        now: i64,
    ) -> Result<()> {
        self.write(move |conn, log| record(conn, log, &delivery, &outcome, now))
            .await
    }
}
