//! The webhook outbox on PostgreSQL: a delivery row is scope in the same
//! transaction as the job's terminal state; the deliverer records each
//! attempt.

use std::time::Duration;

use async_trait::async_trait;

use super::{PgStore, Tx, WriteScope, execute, query, query_one, query_opt};
use crate::model::webhook::EndedJob;
use crate::model::{EventKind, NewEvent};
use crate::storage::webhooks::new_delivery;
use crate::storage::{AttemptOutcome, Delivery, Result, WebhookOutbox};

/// Where a job's webhook goes, and what its body says of the job.
pub(super) struct Target {
    url: String,
    secret: Option<String>,
    attempt: u32,
    created_at: i64,
    error: Option<String>,
}

impl Target {
    /// The columns a statement returns for [`Target::of_row`].
    pub(super) const COLUMNS: &str = "webhook_url, webhook_secret, attempt, created_at, error";

    /// Reads a row of [`Target::COLUMNS`] at `from`: `None` if the job has
    /// no webhook.
    pub(super) fn of_row(row: &tokio_postgres::Row, from: usize) -> Option<Target> {
        Some(Target {
            url: row.get::<_, Option<String>>(from)?,
            secret: row.get(from + 1),
            attempt: row.get::<_, i32>(from + 2) as u32,
            created_at: row.get(from + 3),
            error: row.get(from + 4),
        })
    }
}

/// Adds a delivery for a job that just reached a terminal state, if the job
/// has a webhook. Runs inside that transition's transaction.
pub(super) async fn enqueue(
    tx: &Tx<'_>,
    scope: &mut WriteScope,
    job_id: &str,
    kind: EventKind,
    now: i64,
) -> Result<()> {
    let row = query_opt(
        tx,
        &format!("SELECT {} FROM jobs WHERE id = $1", Target::COLUMNS),
        &[&job_id],
    )
    .await?;
    match row.as_ref().and_then(|row| Target::of_row(row, 0)) {
        Some(target) => add(tx, scope, job_id, kind, target, now).await,
        None => Ok(()),
    }
}

/// Adds the delivery of a job that just ended, to `target`.
pub(super) async fn add(
    tx: &Tx<'_>,
    scope: &mut WriteScope,
    job_id: &str,
    kind: EventKind,
    target: Target,
    now: i64,
) -> Result<()> {
    let (id, body) = new_delivery(EndedJob {
        job_id,
        kind,
        attempt: target.attempt,
        error: target.error,
        created_at: target.created_at,
        finished_at: now,
    });
    execute(
        tx,
        "INSERT INTO webhook_deliveries (id, job_id, url, secret, event, body, status, next_attempt_at, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, 'pending', $7, $7)",
        &[&id, &job_id, &target.url, &target.secret, &kind.name(), &body, &now],
    )
    .await?;
    scope.webhook = true;
    Ok(())
}

async fn record(
    tx: &Tx<'_>,
    scope: &mut WriteScope,
    delivery: &Delivery,
    outcome: &AttemptOutcome,
    now: i64,
) -> Result<()> {
    let record = outcome.record(delivery, now);
    // A settled delivery no longer needs its secret.
    execute(
        tx,
        "UPDATE webhook_deliveries SET status = $2, attempts = $3, last_status = $4, last_error = $5,
                next_attempt_at = $6, finished_at = $7,
                secret = CASE WHEN $2 = 'pending' THEN secret END
         WHERE id = $1",
        &[
            &delivery.id,
            &record.status.as_str(),
            &(record.attempts as i32),
            &record.http_status.map(i32::from),
            &record.error,
            &record.next_attempt_at,
            &record.finished_at,
        ],
    )
    .await?;
    if record.finished_at.is_some() {
        // Retention already took its job: the settled row goes too.
        execute(
            tx,
            "DELETE FROM webhook_deliveries d
             WHERE d.id = $1 AND NOT EXISTS (SELECT 1 FROM jobs WHERE jobs.id = d.job_id)",
            &[&delivery.id],
        )
        .await?;
    }
    match record.settled {
        Some(body) => {
            scope.emit(NewEvent::job(&delivery.job_id, body), now);
            Ok(())
        }
        None => Ok(()),
    }
}

#[async_trait]
impl WebhookOutbox for PgStore {
    async fn due_webhooks(&self, now: i64, limit: usize) -> Result<Vec<Delivery>> {
        let client = self.client().await?;
        let rows = query(
            &client,
            "SELECT id, job_id, url, secret, body, attempts FROM webhook_deliveries
             WHERE status = 'pending' AND next_attempt_at <= $1
             ORDER BY next_attempt_at, id LIMIT $2",
            &[&now, &(limit as i64)],
        )
        .await?;
        Ok(rows
            .iter()
            .map(|row| Delivery {
                id: row.get(0),
                job_id: row.get(1),
                url: row.get(2),
                secret: row.get(3),
                body: row.get(4),
                attempts: row.get::<_, i32>(5) as u32,
            })
            .collect())
    }

    async fn take_webhook(&self, delivery: &Delivery, now: i64, hold: Duration) -> Result<bool> {
        let client = self.client().await?;
        // Held by moving its next attempt past the hold: recording the
        // attempt sets the real one.
        let taken = execute(
            &client,
            "UPDATE webhook_deliveries SET next_attempt_at = $2 + $3
             WHERE id = $1 AND status = 'pending' AND next_attempt_at <= $2 AND attempts = $4",
            &[
                &delivery.id,
                &now,
                &(hold.as_millis() as i64),
                &(delivery.attempts as i32),
            ],
        )
        .await?;
        Ok(taken == 1)
    }

    async fn next_webhook_at(&self) -> Result<Option<i64>> {
        let client = self.client().await?;
        let row = query_one(
            &client,
            "SELECT MIN(next_attempt_at) FROM webhook_deliveries WHERE status = 'pending'",
            &[],
        )
        .await?;
        Ok(row.get(0))
    }

    async fn record_webhook_attempt(
        &self,
        delivery: Delivery,
        outcome: AttemptOutcome,
        now: i64,
    ) -> Result<()> {
        self.write(move |tx, scope| {
            Box::pin(async move { record(tx, scope, &delivery, &outcome, now).await })
        })
        .await
    }

    async fn webhook_added(&self) {
        self.webhook_added.notified().await
    }
}
