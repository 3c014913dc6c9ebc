//! The model every other part of jobhost shares, and which depends on none
//! of them: jobs and phases with their closed status enums, typed events,
//! webhook status, and the JSON and time representations they use.
//! Storage records it, the queue moves it, HTTP, webhooks and the CLI show
//! it.

pub mod backoff;
pub mod concurrency;
pub mod event;
pub mod grants;
pub mod job;
pub mod json;
pub mod schedule;
pub mod time;
pub mod usage;
pub mod webhook;

pub use backoff::BackoffPolicy;
pub use concurrency::{ConcurrencyLimits, KeyLoad, PluginLoad};
pub use event::{Event, EventBody, EventKind, NewEvent};
pub use grants::{PluginGrants, PluginResources};
pub use job::{
    AfterFailure, AttemptError, Job, JobSpec, JobStatus, JobSummary, Phase, PhaseSpec, PhaseStatus,
    PhaseSummary, WebhookSpec, limits,
};
pub use json::Json;
pub use schedule::{CatchUp, Overlap, Recurrence, Schedule, ScheduleSpec};
pub use usage::{Progress, ResourceUsage};
pub use webhook::{DeliveryStatus, WebhookStatus};
