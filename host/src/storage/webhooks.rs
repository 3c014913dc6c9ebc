//! The webhook outbox. A delivery is added in the same transaction as the
//! job's terminal state, with the exact body every attempt will send and a
//! stable id (the receiver's idempotency key); the deliverer records each
//! attempt.

use std::time::Duration;

use async_trait::async_trait;

use super::Result;
use crate::model::event::WebhookSettled;
use crate::model::webhook::{EndedJob, WebhookBody};
use crate::model::{DeliveryStatus, EventBody};

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

    /// Takes a due delivery for this host to attempt now: on a database
    /// shared by several hosts, no other host attempts it for `hold` (after
    /// which, if no attempt was recorded, the host is presumed dead and the
    /// delivery is due again). False if another host took it first. A
    /// database one host owns has one deliverer: it always gets it.
    async fn take_webhook(&self, delivery: &Delivery, now: i64, hold: Duration) -> Result<bool>;

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

/// What one attempt writes to its delivery row.
pub(super) struct AttemptRecord<'a> {
    pub status: DeliveryStatus,
    pub attempts: u32,
    pub http_status: Option<u16>,
    pub error: Option<&'a str>,
    pub next_attempt_at: i64,
    pub finished_at: Option<i64>,
    /// The event a settled delivery logs.
    pub settled: Option<EventBody>,
}

impl AttemptOutcome {
    /// What recording this attempt of `delivery` at `now` writes.
    pub(super) fn record<'a>(&'a self, delivery: &Delivery, now: i64) -> AttemptRecord<'a> {
        let attempts = delivery.attempts + 1;
        let (status, http_status, error, next_attempt_at, finished_at) = match self {
            AttemptOutcome::Delivered { status } => (
                DeliveryStatus::Delivered,
                Some(*status),
                None,
                now,
                Some(now),
            ),
            AttemptOutcome::Retry {
                status,
                error,
                next_attempt_at,
            } => (
                DeliveryStatus::Pending,
                *status,
                Some(error.as_str()),
                *next_attempt_at,
                None,
            ),
            AttemptOutcome::Failed { status, error } => (
                DeliveryStatus::Failed,
                *status,
                Some(error.as_str()),
                now,
                Some(now),
            ),
        };
        let settled = WebhookSettled {
            webhook_id: delivery.id.clone(),
            url: delivery.url.clone(),
            attempts,
            status: http_status,
            error: error.map(str::to_owned),
        };
        let settled = match self {
            AttemptOutcome::Delivered { .. } => Some(EventBody::WebhookDelivered(settled)),
            AttemptOutcome::Failed { .. } => Some(EventBody::WebhookFailed(settled)),
            AttemptOutcome::Retry { .. } => None,
        };
        AttemptRecord {
            status,
            attempts,
            http_status,
            error,
            next_attempt_at,
            finished_at,
            settled,
        }
    }
}

/// A new delivery's id (stable across attempts: the receiver's
/// idempotency key) and the body every attempt sends.
pub(super) fn new_delivery(ended: EndedJob<'_>) -> (String, String) {
    let body =
        serde_json::to_string(&WebhookBody::new(ended)).expect("a webhook body always serializes");
    (format!("msg_{}", uuid::Uuid::now_v7().simple()), body)
}
