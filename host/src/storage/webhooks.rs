//! The webhook outbox. A delivery is added in the same transaction as the
//! job's terminal state, with the exact body every attempt will send and a
//! stable id (the receiver's idempotency key); the deliverer records each
//! attempt.

use async_trait::async_trait;

use super::Result;

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

#[async_trait]
pub trait WebhookOutbox: Send + Sync {
    /// Pending deliveries due by `now`, oldest first.
    async fn due_webhooks(&self, now: i64, limit: usize) -> Result<Vec<Delivery>>;

    /// When the next pending delivery is due.
    async fn next_webhook_at(&self) -> Result<Option<i64>>;

    /// Records one attempt; logs `job:webhook:delivered` or
    /// `job:webhook:failed` when the delivery is settled. Works whether or
    /// not the job still exists.
    async fn record_webhook_attempt(
        &self,
        delivery: Delivery,
        outcome: AttemptOutcome,
        now: i64,
    ) -> Result<()>;

    /// Resolves after a commit that added a delivery (at once if one
    /// happened since the last call returned).
    async fn webhook_added(&self);
}
