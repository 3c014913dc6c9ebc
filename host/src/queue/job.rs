//! The job model: what a user submits ([`JobSpec`]), the states a job and
//! its phases move through, and the job as stored and shown ([`Job`]).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::retry::BackoffPolicy;
use crate::json::Json;
use crate::runtime::ResourceUsage;

/// Where a job is in its life. Each state says who moves a job in and out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Waiting to run, now or at its `run_at`. Entered on enqueue, when the
    /// worker schedules a retry, on a manual retry, when recovery at start-up
    /// requeues a job a crash interrupted, and when shutdown hands back a job
    /// between two phases. Left when the dispatcher claims it (→ running) or
    /// a user cancels it (→ cancelled).
    Pending,
    /// Claimed by a worker, which alone moves it on: to completed, failed,
    /// cancelled, or back to pending for a retry. After a crash, recovery at
    /// start-up moves it.
    Running,
    /// Every phase completed. Terminal: left only by deletion.
    Completed,
    /// A phase failed permanently, or its attempts ran out. Terminal; a
    /// manual retry moves it back to pending.
    Failed,
    /// Cancelled by a user. Terminal; a manual retry moves it back to pending.
    Cancelled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 5] = [
        JobStatus::Pending,
        JobStatus::Running,
        JobStatus::Completed,
        JobStatus::Failed,
        JobStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Pending => "pending",
            JobStatus::Running => "running",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<JobStatus> {
        JobStatus::ALL.into_iter().find(|s| s.as_str() == text)
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Completed | JobStatus::Failed | JobStatus::Cancelled
        )
    }
}

/// Where a phase is. Terminal jobs have no pending or running phases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PhaseStatus {
    /// Not run yet, or waiting to be run again after a retryable failure.
    /// Left when the worker starts it (→ running), or when its job ends
    /// without reaching it (→ cancelled).
    Pending,
    /// Being run by a worker, which moves it to completed, failed, pending
    /// (retry) or cancelled.
    Running,
    /// Ran and stored its output. Kept by a retry unless `from_start`.
    Completed,
    /// Its failure ended the job.
    Failed,
    /// Will not run: its job was cancelled, or failed at an earlier phase.
    Cancelled,
}

impl PhaseStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            PhaseStatus::Pending => "pending",
            PhaseStatus::Running => "running",
            PhaseStatus::Completed => "completed",
            PhaseStatus::Failed => "failed",
            PhaseStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<PhaseStatus> {
        [
            PhaseStatus::Pending,
            PhaseStatus::Running,
            PhaseStatus::Completed,
            PhaseStatus::Failed,
            PhaseStatus::Cancelled,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
    }
}

/// A job as submitted (`POST /jobs`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    pub phases: Vec<PhaseSpec>,
    /// Any JSON; every phase gets it. Kept as sent.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub payload: Json,
    pub max_attempts: Option<u32>,
    pub backoff: Option<BackoffPolicy>,
    /// Run no earlier than this many milliseconds from now.
    pub delay_ms: Option<u64>,
    /// Run no earlier than this time (RFC 3339). Exclusive with `delay_ms`.
    pub run_at: Option<String>,
    /// Higher runs first among due jobs.
    #[serde(default)]
    pub priority: i32,
    pub webhook: Option<WebhookSpec>,
    /// A second submit with the same key returns the first job.
    pub idempotency_key: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PhaseSpec {
    pub name: String,
    pub plugin: String,
    /// The plugin version to run; the active version at enqueue if omitted.
    pub version: Option<String>,
    pub timeout_ms: Option<u64>,
    pub config: Option<Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookSpec {
    pub url: String,
    pub secret: Option<String>,
}

/// A job as stored, with its phases and its attempts' errors.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Job {
    pub id: String,
    pub status: JobStatus,
    #[schema(value_type = Object)]
    pub payload: Json,
    pub priority: i32,
    /// When it is due (pending) or was last due.
    #[serde(serialize_with = "crate::time::as_rfc3339::serialize")]
    #[schema(value_type = String, format = DateTime)]
    pub run_at: i64,
    /// Attempts started so far.
    pub attempt: u32,
    pub max_attempts: u32,
    pub backoff: BackoffPolicy,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<String>,
    #[serde(serialize_with = "crate::time::as_rfc3339::serialize")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: i64,
    #[serde(serialize_with = "crate::time::as_rfc3339::option::serialize")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub started_at: Option<i64>,
    #[serde(serialize_with = "crate::time::as_rfc3339::option::serialize")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub finished_at: Option<i64>,
    /// Why the job failed or was cancelled.
    pub error: Option<String>,
    pub phases: Vec<Phase>,
    /// One record per failed attempt, oldest first.
    pub errors: Vec<AttemptError>,
    /// The latest webhook delivery, once the job has ended (not in listings).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook: Option<crate::storage::WebhookStatus>,
}

impl Job {
    /// The first phase that has not completed: where a run resumes.
    pub fn next_phase(&self) -> Option<&Phase> {
        self.phases
            .iter()
            .find(|p| p.status != PhaseStatus::Completed)
    }

    /// (name, output) of every completed phase before `index`, in order.
    pub fn outputs_before(&self, index: usize) -> Vec<(String, String)> {
        self.phases[..index]
            .iter()
            .filter_map(|p| {
                p.output
                    .as_ref()
                    .map(|o| (p.name.clone(), o.as_str().to_owned()))
            })
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Phase {
    pub index: usize,
    pub name: String,
    pub plugin: String,
    /// Pinned at enqueue.
    pub version: String,
    pub config: Value,
    pub timeout_ms: u64,
    pub status: PhaseStatus,
    /// What the phase returned, as it returned it.
    #[schema(value_type = Option<Object>)]
    pub output: Option<Json>,
    pub error: Option<String>,
    /// Times this phase was started.
    pub attempts: u32,
    #[serde(serialize_with = "crate::time::as_rfc3339::option::serialize")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub started_at: Option<i64>,
    #[serde(serialize_with = "crate::time::as_rfc3339::option::serialize")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub finished_at: Option<i64>,
    pub usage: Option<ResourceUsage>,
}

/// Why one attempt of a job failed.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct AttemptError {
    pub attempt: u32,
    pub phase: Option<String>,
    pub error: String,
    #[serde(serialize_with = "crate::time::as_rfc3339::serialize")]
    #[schema(value_type = String, format = DateTime)]
    pub at: i64,
}
