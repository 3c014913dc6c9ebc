//! The webhook outbox. A delivery row is written in the same transaction as
//! the job's terminal state, with the exact body every attempt will send
//! and a stable id (the receiver's idempotency key); the delivery worker
//! records each attempt.

use rusqlite::{Connection, OptionalExtension, params};

use std::time::Duration;

use async_trait::async_trait;

use super::SqliteStore;
use super::writer::EventLog;
use crate::model::webhook::EndedJob;
use crate::model::{DeliveryStatus, EventKind, NewEvent, WebhookStatus};
use crate::storage::webhooks::new_delivery;
use crate::storage::{AttemptOutcome, Delivery, Result, WebhookOutbox};

/// Adds a delivery for a job that just reached a terminal state, if the job
/// has a webhook. Runs inside that transition's transaction.
pub(super) fn enqueue(
    conn: &Connection,
    log: &mut EventLog,
    job_id: &str,
    kind: EventKind,
    now: i64,
) -> Result<()> {
    type Target = (Option<String>, Option<String>, u32, i64, Option<String>);
    let target: Option<Target> = conn
        .prepare_cached("SELECT webhook_url, webhook_secret, attempt, created_at, error FROM jobs WHERE id = ?1")?
        .query_row([job_id], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?)))
        .optional()?;
    let Some((Some(url), secret, attempt, created_at, error)) = target else {
        return Ok(());
    };
    let (id, body) = new_delivery(EndedJob {
        job_id,
        kind,
        attempt,
        error,
        created_at,
        finished_at: now,
    });
    conn.prepare_cached(
        "INSERT INTO webhook_deliveries (id, job_id, url, secret, event, body, status, next_attempt_at, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'pending', ?7, ?7)",
    )?
    .execute(params![
        id,
        job_id,
        url,
        secret,
        kind.name(),
        body,
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
            let status: String = row.get(2)?;
            Ok(WebhookStatus {
                id: row.get(0)?,
                url: row.get(1)?,
                // Only this module writes the column, with these names.
                status: DeliveryStatus::parse(&status).unwrap_or(DeliveryStatus::Failed),
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
    let record = outcome.record(delivery, now);
    // A settled delivery no longer needs its secret.
    conn.prepare_cached(
        "UPDATE webhook_deliveries SET status = ?2, attempts = ?3, last_status = ?4, last_error = ?5,
                next_attempt_at = ?6, finished_at = ?7,
                secret = CASE WHEN ?2 = 'pending' THEN secret END
         WHERE id = ?1",
    )?
    .execute(params![
        delivery.id,
        record.status.as_str(),
        record.attempts,
        record.http_status,
        record.error,
        record.next_attempt_at,
        record.finished_at
    ])?;
    if record.finished_at.is_some() {
        // Retention already took its job: the settled row goes too.
        conn.prepare_cached(
            "DELETE FROM webhook_deliveries
             WHERE id = ?1 AND NOT EXISTS (SELECT 1 FROM jobs WHERE jobs.id = webhook_deliveries.job_id)",
        )?
        .execute([&delivery.id])?;
    }
    match record.settled {
        Some(body) => log.emit(conn, NewEvent::job(&delivery.job_id, body), now),
        None => Ok(()),
    }
}

#[async_trait]
impl WebhookOutbox for SqliteStore {
    async fn due_webhooks(&self, now: i64, limit: usize) -> Result<Vec<Delivery>> {
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

    async fn take_webhook(&self, _: &Delivery, _: i64, _: Duration) -> Result<bool> {
        Ok(true)
    }

    async fn next_webhook_at(&self) -> Result<Option<i64>> {
        self.read(|conn| {
            Ok(conn.query_row(
                "SELECT MIN(next_attempt_at) FROM webhook_deliveries WHERE status = 'pending'",
                [],
                |row| row.get(0),
            )?)
        })
        .await
    }

    async fn record_webhook_attempt(
        &self,
        delivery: Delivery,
        outcome: AttemptOutcome,
        now: i64,
    ) -> Result<()> {
        self.write(move |conn, log| record(conn, log, &delivery, &outcome, now))
            .await
    }

    async fn webhook_added(&self) {
        self.webhook_added.notified().await
    }
}
