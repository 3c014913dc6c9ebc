//! Typed lifecycle events: a closed set of kinds, one payload struct each,
//! serialised here and nowhere else. SSE, webhooks, the CLI and the
//! dashboard all read this shape (`/openapi.json` publishes it as `Event`).
//!
//! On the wire an event is `{"seq", "type", "job_id"?, "at", "data"}`, where
//! `type` is the kind's name (`job:phase:started`) and `data` its payload.

use serde::{Deserialize, Serialize};

use super::job::{AfterFailure, Job, JobStatus, Phase};
use super::usage::ResourceUsage;

/// Declares the event kinds once: the [`EventKind`] tag, its wire name, and
/// the [`EventBody`] variant holding the kind's payload.
macro_rules! event_kinds {
    ($( $(#[$doc:meta])* $variant:ident($data:ty) = $name:literal, )*) => {
        /// The closed set of event kinds. On the wire (JSON, SSE) each is
        /// its [`EventKind::name`].
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum EventKind {
            $( $(#[$doc])* $variant, )*
        }

        impl EventKind {
            pub const ALL: [EventKind; [$($name),*].len()] = [$(EventKind::$variant),*];

            /// The wire name, e.g. `job:phase:started`.
            pub fn name(self) -> &'static str {
                match self {
                    $( EventKind::$variant => $name, )*
                }
            }
        }

        /// An event's kind with its payload.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
        #[serde(tag = "type", content = "data")]
        pub enum EventBody {
            $( $(#[$doc])* #[serde(rename = $name)] #[schema(rename = $name)] $variant($data), )*
        }

        impl EventBody {
            pub fn kind(&self) -> EventKind {
                match self {
                    $( EventBody::$variant(_) => EventKind::$variant, )*
                }
            }

            /// The payload alone, as JSON text (what the event log stores
            /// beside the kind).
            pub fn data_json(&self) -> String {
                match self {
                    $( EventBody::$variant(data) => serde_json::to_string(data), )*
                }
                .expect("event payloads always serialize")
            }
        }
    };
}

event_kinds! {
    /// A job was stored.
    JobCreated(JobCreated) = "job:created",
    /// A worker claimed the job: an attempt began.
    JobStarted(JobStarted) = "job:started",
    PhaseStarted(PhaseStarted) = "job:phase:started",
    /// Live only: never logged, sent without an SSE `id:`.
    PhaseProgress(PhaseProgress) = "job:phase:progress",
    PhaseCompleted(PhaseCompleted) = "job:phase:completed",
    PhaseFailed(PhaseFailed) = "job:phase:failed",
    /// The job waits for another attempt (automatic or manual retry).
    JobRetrying(JobRetrying) = "job:retrying",
    /// The job's next phase found its plugin at its limit: the job waits,
    /// holding no worker, until the plugin has room.
    JobWaiting(JobWaiting) = "job:waiting",
    JobCompleted(JobCompleted) = "job:completed",
    JobFailed(JobFailed) = "job:failed",
    JobCancelled(JobCancelled) = "job:cancelled",
    /// The job and its history were deleted (by a user or retention).
    JobDeleted(JobDeleted) = "job:deleted",
    WebhookDelivered(WebhookSettled) = "job:webhook:delivered",
    WebhookFailed(WebhookSettled) = "job:webhook:failed",
    PluginUploaded(PluginUploaded) = "plugin:uploaded",
    PluginActivated(PluginActivated) = "plugin:activated",
    /// The operator set a plugin's grants. Names only: values stay out of
    /// the log.
    PluginGrantsChanged(PluginGrantsChanged) = "plugin:grants:changed",
    /// The operator set a plugin's memory cap or default timeout.
    PluginResourcesChanged(PluginResourcesChanged) = "plugin:resources:changed",
    /// A schedule enqueued a job, at a tick or by hand.
    ScheduleFired(ScheduleFired) = "schedule:fired",
    /// A schedule let a tick (or a run of missed ticks) pass without a job.
    ScheduleSkipped(ScheduleSkipped) = "schedule:skipped",
    /// A schedule was created, replaced, deleted, paused or resumed.
    ScheduleChanged(ScheduleChanged) = "schedule:changed",
}

impl EventKind {
    pub fn from_name(name: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|kind| kind.name() == name)
    }

    /// Whether the job this event is about has ended with it.
    pub fn is_job_terminal(self) -> bool {
        matches!(
            self,
            EventKind::JobCompleted | EventKind::JobFailed | EventKind::JobCancelled
        )
    }
}

impl Serialize for EventKind {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for EventKind {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        EventKind::from_name(&name)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown event type `{name}`")))
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl EventBody {
    /// `job:created` for a job just stored.
    pub fn created(job: &Job) -> EventBody {
        EventBody::JobCreated(JobCreated {
            run_at: job.run_at,
            priority: job.priority,
            phases: job
                .phases
                .iter()
                .map(|phase| CreatedPhase {
                    name: phase.name.clone(),
                    plugin: phase.plugin.clone(),
                    version: phase.version.clone(),
                })
                .collect(),
        })
    }

    /// `job:phase:started` for a phase just started (`attempts` counts this run).
    pub fn phase_started(phase: &Phase) -> EventBody {
        EventBody::PhaseStarted(PhaseStarted {
            phase: phase.name.clone(),
            index: phase.index,
            plugin: phase.plugin.clone(),
            version: phase.version.clone(),
            attempt: phase.attempts,
        })
    }

    /// The event that ends an attempt: the job waits for its retry, or
    /// fails, as the queue decided.
    pub fn attempt_ended(ended: &EndedAttempt<'_>, after: &AfterFailure) -> EventBody {
        match after {
            AfterFailure::Retry { run_at } => {
                EventBody::JobRetrying(JobRetrying::Automatic(AutomaticRetry {
                    attempt: ended.attempt,
                    next_attempt: ended.attempt + 1,
                    run_at: *run_at,
                    error: ended.error.to_owned(),
                    recovered: ended.recovered,
                }))
            }
            AfterFailure::Fail => EventBody::JobFailed(JobFailed {
                phase: ended.phase.map(str::to_owned),
                error: ended.error.to_owned(),
                recovered: ended.recovered,
            }),
        }
    }

    /// Reads a payload stored as JSON text beside its kind.
    pub fn parse(kind: EventKind, data: &str) -> Result<EventBody, serde_json::Error> {
        // The tag first: serde then reads the payload straight into its
        // struct, without buffering it.
        serde_json::from_str(&format!(r#"{{"type":"{}","data":{data}}}"#, kind.name()))
    }
}

/// An attempt that failed, or that a crash or a failed write interrupted
/// (`recovered`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EndedAttempt<'a> {
    pub attempt: u32,
    /// The phase that failed or was interrupted, if any.
    pub phase: Option<&'a str>,
    pub error: &'a str,
    pub recovered: bool,
}

/// An event about to be written: the log gives it its sequence number.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub job_id: Option<String>,
    pub body: EventBody,
}

impl NewEvent {
    pub fn job(job_id: &str, body: EventBody) -> Self {
        NewEvent {
            job_id: Some(job_id.to_owned()),
            body,
        }
    }

    /// An event about no job (plugins, schedules).
    pub fn global(body: EventBody) -> Self {
        NewEvent { job_id: None, body }
    }

    pub fn kind(&self) -> EventKind {
        self.body.kind()
    }
}

/// A committed event (or a live-only one, see [`Event::live`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Event {
    /// Monotonically increasing across all events; the SSE `id:`.
    pub seq: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// Unix time in milliseconds (RFC 3339 in JSON).
    #[serde(with = "super::time::as_rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub at: i64,
    #[serde(flatten)]
    pub body: EventBody,
    /// Published on the bus only, never logged (progress reports): it has no
    /// sequence number of its own (`seq` is 0), goes out without an SSE
    /// `id:`, and is not replayed on resume.
    #[serde(skip)]
    pub live: bool,
}

impl Event {
    pub fn kind(&self) -> EventKind {
        self.body.kind()
    }

    /// A live-only event about a job (see [`Event::live`]).
    pub fn live(job_id: &str, at: i64, body: EventBody) -> Self {
        Event {
            seq: 0,
            job_id: Some(job_id.to_owned()),
            at,
            body,
            live: true,
        }
    }
}

/// One phase as `job:created` lists it, with the version pinned at enqueue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CreatedPhase {
    pub name: String,
    pub plugin: String,
    pub version: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobCreated {
    /// When the job is due, Unix ms.
    pub run_at: i64,
    pub priority: i32,
    pub phases: Vec<CreatedPhase>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobStarted {
    pub attempt: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobWaiting {
    /// The phase that waits to start.
    pub phase: String,
    pub index: usize,
    /// The plugin whose slot it waits for.
    pub plugin: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PhaseStarted {
    pub phase: String,
    pub index: usize,
    pub plugin: String,
    pub version: String,
    /// This phase's attempt (1 for its first run).
    pub attempt: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PhaseProgress {
    pub phase: String,
    pub percent: u8,
    pub note: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PhaseCompleted {
    pub phase: String,
    pub index: usize,
    pub usage: ResourceUsage,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PhaseFailed {
    pub phase: String,
    pub index: usize,
    /// The job's attempt.
    pub attempt: u32,
    pub error: String,
    /// Whether the job will run again.
    pub retrying: bool,
}

/// Why the job waits for another attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum JobRetrying {
    /// An attempt failed (or a crash interrupted it) and attempts remain.
    Automatic(AutomaticRetry),
    /// A user retried a failed or cancelled job.
    Manual(ManualRetry),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AutomaticRetry {
    pub attempt: u32,
    pub next_attempt: u32,
    /// When the next attempt is due, Unix ms.
    pub run_at: i64,
    pub error: String,
    /// A crash or a failed write interrupted the attempt.
    pub recovered: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ManualRetry {
    /// Always true: tells a manual retry apart.
    pub manual: bool,
    pub from_start: bool,
    pub run_at: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobCompleted {}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobFailed {
    /// The phase whose failure ended the job, if one did.
    pub phase: Option<String>,
    pub error: String,
    pub recovered: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobCancelled {
    /// Where the job was when cancelled.
    pub was: JobStatus,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobDeleted {
    pub id: String,
}

/// A webhook delivery that is settled, delivered or given up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WebhookSettled {
    pub webhook_id: String,
    pub url: String,
    pub attempts: u32,
    /// The receiver's last HTTP status, if it answered.
    pub status: Option<u16>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PluginUploaded {
    pub plugin: String,
    pub version: String,
    pub content_hash: String,
    pub size: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PluginActivated {
    pub plugin: String,
    pub version: String,
    pub previous: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PluginGrantsChanged {
    pub plugin: String,
    /// The versions the grants now cover.
    pub versions: Vec<String>,
    /// The plain configuration keys granted.
    pub config_keys: Vec<String>,
    /// The secrets granted, by name.
    pub secrets: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PluginResourcesChanged {
    pub plugin: String,
    pub resources: super::PluginResources,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ScheduleFired {
    pub schedule: String,
    pub job_id: String,
    /// The tick (Unix ms) it fired for; none when triggered by hand.
    pub tick: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ScheduleSkipped {
    pub schedule: String,
    /// The tick skipped (Unix ms); with `until`, the first of a run of them.
    pub tick: i64,
    /// The last tick of the run skipped, if more than one.
    pub until: Option<i64>,
    pub reason: SkipReason,
    pub message: String,
}

/// Why a schedule skipped a tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SkipReason {
    /// The previous fire's job was unfinished (overlap `skip`).
    Overlap,
    /// No host ran at the tick, and the catch-up policy skipped it.
    Missed,
    /// The template no longer makes a valid job (a plugin was deleted, a
    /// limit was lowered).
    InvalidJob,
    /// As many jobs wait as the server allows (`--max-pending-jobs`).
    QueueFull,
}

impl SkipReason {
    /// The wire name, e.g. `queue_full`.
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::Overlap => "overlap",
            SkipReason::Missed => "missed",
            SkipReason::InvalidJob => "invalid_job",
            SkipReason::QueueFull => "queue_full",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ScheduleChanged {
    pub schedule: String,
    pub change: ScheduleChange,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleChange {
    Created,
    Replaced,
    Deleted,
    Paused,
    Resumed,
}

impl PluginGrantsChanged {
    pub fn new(plugin: &str, grants: &super::PluginGrants) -> Self {
        PluginGrantsChanged {
            plugin: plugin.to_owned(),
            versions: grants.versions.clone(),
            config_keys: grants.config.keys().cloned().collect(),
            secrets: grants.secrets.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn names_round_trip_and_match_serde() {
        for kind in EventKind::ALL {
            assert_eq!(EventKind::from_name(kind.name()), Some(kind));
            assert_eq!(serde_json::to_value(kind).unwrap(), kind.name());
        }
        assert_eq!(EventKind::from_name("job:exploded"), None);
    }

    /// The wire shape is the one clients have always read, and a stored
    /// payload reads back as the same body.
    #[test]
    fn events_keep_their_wire_shape() {
        let event = Event {
            seq: 7,
            job_id: Some("j".into()),
            at: 0,
            body: EventBody::JobFailed(JobFailed {
                phase: None,
                error: "boom".into(),
                recovered: false,
            }),
            live: false,
        };
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(
            json,
            json!({"seq": 7, "job_id": "j", "at": "1970-01-01T00:00:00.000Z", "type": "job:failed",
                   "data": {"phase": null, "error": "boom", "recovered": false}})
        );
        assert_eq!(serde_json::from_value::<Event>(json).unwrap(), event);
        let stored = event.body.data_json();
        assert_eq!(
            EventBody::parse(EventKind::JobFailed, &stored).unwrap(),
            event.body
        );
    }

    /// Both shapes of `job:retrying` read back as what they were.
    #[test]
    fn retries_keep_their_two_shapes() {
        let manual = EventBody::JobRetrying(JobRetrying::Manual(ManualRetry {
            manual: true,
            from_start: false,
            run_at: 5,
        }));
        let automatic = EventBody::JobRetrying(JobRetrying::Automatic(AutomaticRetry {
            attempt: 1,
            next_attempt: 2,
            run_at: 5,
            error: "e".into(),
            recovered: true,
        }));
        for body in [manual, automatic] {
            let stored = body.data_json();
            assert_eq!(
                EventBody::parse(EventKind::JobRetrying, &stored).unwrap(),
                body
            );
        }
        assert_eq!(
            serde_json::to_value(EventBody::JobCompleted(JobCompleted {})).unwrap(),
            json!({"type": "job:completed", "data": {}})
        );
    }
}
