//! The job model: what a user submits ([`JobSpec`]), the states a job and
//! its phases move through, and the job as stored and shown ([`Job`]).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::backoff::BackoffPolicy;
use super::json::Json;
use super::usage::{Progress, ResourceUsage};

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
    /// cancelled, waiting, or back to pending for a retry. After a crash,
    /// recovery at start-up moves it.
    Running,
    /// Between phases, waiting for a slot (or a start, under a rate) of its
    /// next phase's plugin, which the operator limited: the job holds no
    /// worker. Entered when its worker finds the plugin full, and left for
    /// pending when the plugin has room again, or when a user cancels it.
    Waiting,
    /// Every phase completed. Terminal: left only by deletion.
    Completed,
    /// A phase failed permanently, or its attempts ran out. Terminal; a
    /// manual retry moves it back to pending.
    Failed,
    /// Cancelled by a user. Terminal; a manual retry moves it back to pending.
    Cancelled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 6] = [
        JobStatus::Pending,
        JobStatus::Running,
        JobStatus::Waiting,
        JobStatus::Completed,
        JobStatus::Failed,
        JobStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Pending => "pending",
            JobStatus::Running => "running",
            JobStatus::Waiting => "waiting",
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

/// What happens to a job after a phase attempt failed (or a crash or a
/// failed write interrupted it): the queue decides, storage records.
#[derive(Debug, Clone, PartialEq)]
pub enum AfterFailure {
    /// Run the job again at `run_at` (Unix ms), resuming at this phase.
    Retry { run_at: i64 },
    /// The job fails; phases after this one will not run.
    Fail,
}

/// The bounds of a job spec. Each is checked on submit (a 422 naming the
/// field) and published in `/openapi.json`; a test keeps the two equal.
pub mod limits {
    /// Longest phase name, in bytes.
    pub const MAX_PHASE_NAME: usize = 64;
    /// Longest plugin name or version, in bytes (as plugin uploads allow).
    pub const MAX_PLUGIN_NAME: usize = 64;
    /// Largest phase `config`, as JSON text.
    pub const MAX_PHASE_CONFIG_BYTES: usize = 64 << 10;
    pub const MAX_ATTEMPTS: u32 = 100;
    pub const MIN_PRIORITY: i32 = -100;
    pub const MAX_PRIORITY: i32 = 100;
    /// How far ahead `delay_ms` and `run_at` may schedule a job: 10 years.
    pub const MAX_SCHEDULE_AHEAD_MS: u64 = 10 * 365 * 86_400_000;
    /// Longest `run_at` text.
    pub const MAX_RUN_AT_LENGTH: usize = 64;
    pub const MAX_IDEMPOTENCY_KEY: usize = 256;
    pub const MAX_WEBHOOK_URL: usize = 2048;
    pub const MAX_WEBHOOK_SECRET: usize = 256;
    /// Longest backoff delay (`backoff.initial_ms`, `backoff.max_ms`): 7 days.
    pub const MAX_BACKOFF_MS: u64 = 7 * 86_400_000;
}

/// A job as submitted (`POST /jobs`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// At most `--max-phases` (32 by default).
    #[schema(min_items = 1, max_items = 32)]
    pub phases: Vec<PhaseSpec>,
    /// Any JSON; every phase gets it. Kept as sent.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub payload: Json,
    #[schema(minimum = 1, maximum = 100)]
    pub max_attempts: Option<u32>,
    pub backoff: Option<BackoffPolicy>,
    /// Run no earlier than this many milliseconds from now (at most 10 years).
    #[schema(minimum = 0, maximum = 315_360_000_000_u64)]
    pub delay_ms: Option<u64>,
    /// Run no earlier than this time (RFC 3339, at most 10 years ahead).
    /// Exclusive with `delay_ms`.
    #[schema(format = DateTime, max_length = 64)]
    pub run_at: Option<String>,
    /// Higher runs first among due jobs.
    #[serde(default)]
    #[schema(minimum = -100, maximum = 100)]
    pub priority: i32,
    pub webhook: Option<WebhookSpec>,
    /// A second submit with the same key returns the first job.
    #[schema(min_length = 1, max_length = 256)]
    pub idempotency_key: Option<String>,
    /// Groups the job for fair claiming and the operator's limits on how
    /// many jobs with one key run at once (e.g. a tenant). Letters, digits
    /// and `. _ - : / @`.
    #[schema(min_length = 1, max_length = 128, pattern = "^[A-Za-z0-9._:/@-]+$")]
    pub concurrency_key: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PhaseSpec {
    #[schema(min_length = 1, max_length = 64)]
    pub name: String,
    #[schema(min_length = 1, max_length = 64)]
    pub plugin: String,
    /// The plugin version to run; the active version at enqueue if omitted.
    #[schema(min_length = 1, max_length = 64)]
    pub version: Option<String>,
    /// At most the server's longest phase timeout (1 hour).
    #[schema(minimum = 1, maximum = 3_600_000)]
    pub timeout_ms: Option<u64>,
    /// Any JSON, at most 64 KiB as text.
    pub config: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookSpec {
    #[schema(min_length = 1, max_length = 2048)]
    pub url: String,
    #[schema(min_length = 1, max_length = 256)]
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
    #[serde(serialize_with = "super::time::as_rfc3339::serialize")]
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrency_key: Option<String>,
    #[serde(serialize_with = "super::time::as_rfc3339::serialize")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: i64,
    #[serde(serialize_with = "super::time::as_rfc3339::option::serialize")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub started_at: Option<i64>,
    #[serde(serialize_with = "super::time::as_rfc3339::option::serialize")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub finished_at: Option<i64>,
    /// Why the job failed or was cancelled.
    pub error: Option<String>,
    pub phases: Vec<Phase>,
    /// One record per failed attempt, oldest first.
    pub errors: Vec<AttemptError>,
    /// The latest webhook delivery, once the job has ended (not in listings).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook: Option<super::webhook::WebhookStatus>,
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
    #[serde(serialize_with = "super::time::as_rfc3339::option::serialize")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub started_at: Option<i64>,
    #[serde(serialize_with = "super::time::as_rfc3339::option::serialize")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub finished_at: Option<i64>,
    pub usage: Option<ResourceUsage>,
    /// The last progress its latest run reported (live reports are on the
    /// event stream only).
    pub progress: Option<Progress>,
}

/// A job as `GET /jobs` lists it: its state and its phases' states,
/// without the payload, configs and outputs (`GET /jobs/{id}` has them),
/// so that a page stays small whatever the jobs carry.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct JobSummary {
    pub id: String,
    pub status: JobStatus,
    pub priority: i32,
    #[serde(serialize_with = "super::time::as_rfc3339::serialize")]
    #[schema(value_type = String, format = DateTime)]
    pub run_at: i64,
    pub attempt: u32,
    pub max_attempts: u32,
    #[serde(serialize_with = "super::time::as_rfc3339::serialize")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: i64,
    #[serde(serialize_with = "super::time::as_rfc3339::option::serialize")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub started_at: Option<i64>,
    #[serde(serialize_with = "super::time::as_rfc3339::option::serialize")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub finished_at: Option<i64>,
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrency_key: Option<String>,
    pub phases: Vec<PhaseSummary>,
}

/// A phase as listings show it.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct PhaseSummary {
    pub index: usize,
    pub name: String,
    pub plugin: String,
    pub version: String,
    pub status: PhaseStatus,
    pub attempts: u32,
    pub error: Option<String>,
    pub progress: Option<Progress>,
}

impl From<Job> for JobSummary {
    fn from(job: Job) -> Self {
        JobSummary {
            id: job.id,
            status: job.status,
            priority: job.priority,
            run_at: job.run_at,
            attempt: job.attempt,
            max_attempts: job.max_attempts,
            created_at: job.created_at,
            started_at: job.started_at,
            finished_at: job.finished_at,
            error: job.error,
            concurrency_key: job.concurrency_key,
            phases: job
                .phases
                .into_iter()
                .map(|phase| PhaseSummary {
                    index: phase.index,
                    name: phase.name,
                    plugin: phase.plugin,
                    version: phase.version,
                    status: phase.status,
                    attempts: phase.attempts,
                    error: phase.error,
                    progress: phase.progress,
                })
                .collect(),
        }
    }
}

/// Why one attempt of a job failed.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct AttemptError {
    pub attempt: u32,
    pub phase: Option<String>,
    pub error: String,
    #[serde(serialize_with = "super::time::as_rfc3339::serialize")]
    #[schema(value_type = String, format = DateTime)]
    pub at: i64,
}
