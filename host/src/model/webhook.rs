//! Webhook deliveries as users see them: a job's latest delivery, and the
//! body every attempt of a delivery sends.

use serde::{Deserialize, Serialize};

use super::event::EventKind;
use super::time::rfc3339;

/// Where a delivery is in the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryStatus {
    /// Not delivered yet: attempts remain.
    Pending,
    Delivered,
    /// Given up: a permanent refusal, or attempts ran out.
    Failed,
}

impl DeliveryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Failed => "failed",
        }
    }

    pub fn parse(text: &str) -> Option<DeliveryStatus> {
        [
            DeliveryStatus::Pending,
            DeliveryStatus::Delivered,
            DeliveryStatus::Failed,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
    }
}

/// A job's latest webhook delivery, as `GET /jobs/{id}` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct WebhookStatus {
    pub id: String,
    pub url: String,
    pub status: DeliveryStatus,
    pub attempts: u32,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    #[serde(serialize_with = "super::time::as_rfc3339::option::serialize")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub finished_at: Option<i64>,
}

/// What a webhook delivery sends, fixed when the job ends: every attempt
/// sends the same bytes (Standard Webhooks).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WebhookBody {
    /// The terminal event, e.g. `job:completed`.
    #[serde(rename = "type")]
    #[schema(value_type = String)]
    pub kind: EventKind,
    /// RFC 3339.
    pub timestamp: String,
    pub data: WebhookJob,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WebhookJob {
    pub job_id: String,
    /// `completed`, `failed` or `cancelled`.
    pub status: String,
    pub attempt: u32,
    pub error: Option<String>,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub finished_at: String,
}

/// The facts about an ending job that its webhook body carries.
pub struct EndedJob<'a> {
    pub job_id: &'a str,
    pub kind: EventKind,
    pub attempt: u32,
    pub error: Option<String>,
    pub created_at: i64,
    pub finished_at: i64,
}

impl WebhookBody {
    pub fn new(job: EndedJob<'_>) -> Self {
        WebhookBody {
            kind: job.kind,
            timestamp: rfc3339(job.finished_at),
            data: WebhookJob {
                job_id: job.job_id.to_owned(),
                status: job.kind.name().trim_start_matches("job:").to_owned(),
                attempt: job.attempt,
                error: job.error,
                created_at: rfc3339(job.created_at),
                finished_at: rfc3339(job.finished_at),
            },
        }
    }
}
