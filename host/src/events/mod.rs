//! Typed lifecycle events and the in-process bus.
//!
//! Every event is written to the event log by storage in the same transaction
//! as the state change it reports, which gives it its sequence number; it is
//! published on the [`Bus`] only after that commit. Subscribers (SSE,
//! webhooks, tests) that fall behind the bus's buffer are told how many they
//! missed and catch up from the log, so the queue never waits for them.

use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::broadcast;

/// Events kept in memory for subscribers that are briefly behind.
const BUS_CAPACITY: usize = 4096;

/// The closed set of event kinds. On the wire (JSON, SSE) each is its
/// [`EventKind::name`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    JobCreated,
    JobStarted,
    PhaseStarted,
    PhaseProgress,
    PhaseCompleted,
    PhaseFailed,
    JobRetrying,
    JobCompleted,
    JobFailed,
    JobCancelled,
    JobDeleted,
    WebhookDelivered,
    WebhookFailed,
    PluginUploaded,
    PluginActivated,
}

impl EventKind {
    pub const ALL: [EventKind; 15] = [
        EventKind::JobCreated,
        EventKind::JobStarted,
        EventKind::PhaseStarted,
        EventKind::PhaseProgress,
        EventKind::PhaseCompleted,
        EventKind::PhaseFailed,
        EventKind::JobRetrying,
        EventKind::JobCompleted,
        EventKind::JobFailed,
        EventKind::JobCancelled,
        EventKind::JobDeleted,
        EventKind::WebhookDelivered,
        EventKind::WebhookFailed,
        EventKind::PluginUploaded,
        EventKind::PluginActivated,
    ];

    /// The wire name, e.g. `job:phase:started`.
    pub fn name(self) -> &'static str {
        match self {
            EventKind::JobCreated => "job:created",
            EventKind::JobStarted => "job:started",
            EventKind::PhaseStarted => "job:phase:started",
            EventKind::PhaseProgress => "job:phase:progress",
            EventKind::PhaseCompleted => "job:phase:completed",
            EventKind::PhaseFailed => "job:phase:failed",
            EventKind::JobRetrying => "job:retrying",
            EventKind::JobCompleted => "job:completed",
            EventKind::JobFailed => "job:failed",
            EventKind::JobCancelled => "job:cancelled",
            EventKind::JobDeleted => "job:deleted",
            EventKind::WebhookDelivered => "job:webhook:delivered",
            EventKind::WebhookFailed => "job:webhook:failed",
            EventKind::PluginUploaded => "plugin:uploaded",
            EventKind::PluginActivated => "plugin:activated",
        }
    }

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

/// An event about to be written: storage gives it its sequence number.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub kind: EventKind,
    pub job_id: Option<String>,
    pub data: Value,
}

impl NewEvent {
    pub fn job(kind: EventKind, job_id: &str, data: Value) -> Self {
        NewEvent {
            kind,
            job_id: Some(job_id.to_owned()),
            data,
        }
    }

    pub fn plugin(kind: EventKind, data: Value) -> Self {
        NewEvent {
            kind,
            job_id: None,
            data,
        }
    }
}

/// A committed event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Event {
    /// Monotonically increasing across all events; the SSE `id:`.
    pub seq: i64,
    #[serde(rename = "type")]
    #[schema(value_type = String, example = "job:completed")]
    pub kind: EventKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// Unix time in milliseconds (RFC 3339 in JSON).
    #[serde(
        serialize_with = "crate::time::as_rfc3339::serialize",
        deserialize_with = "crate::time::as_rfc3339::deserialize"
    )]
    #[schema(value_type = String, format = DateTime)]
    pub at: i64,
    pub data: Value,
}

/// An event as subscribers receive it: shared by all of them, and
/// serialized to JSON at most once however many SSE clients send it (a
/// thousand clients each copying and serializing every event cost more than
/// the queue's own work).
#[derive(Debug)]
pub struct Published {
    event: Event,
    json: OnceLock<String>,
}

impl Published {
    pub fn new(event: Event) -> Self {
        Published {
            event,
            json: OnceLock::new(),
        }
    }

    /// The event as JSON, as `GET /events` sends it.
    pub fn json(&self) -> &str {
        self.json
            .get_or_init(|| serde_json::to_string(&self.event).expect("an event always serializes"))
    }
}

impl std::ops::Deref for Published {
    type Target = Event;

    fn deref(&self) -> &Event {
        &self.event
    }
}

/// Publishes committed events to in-process subscribers. Publishing never
/// blocks: a subscriber that falls more than the buffer behind gets
/// `RecvError::Lagged` and must catch up from the event log.
#[derive(Clone)]
pub struct Bus {
    sender: broadcast::Sender<Arc<Published>>,
}

impl Default for Bus {
    fn default() -> Self {
        Bus {
            sender: broadcast::Sender::new(BUS_CAPACITY),
        }
    }
}

impl Bus {
    pub fn publish(&self, events: impl IntoIterator<Item = Event>) {
        for event in events {
            // No subscribers is fine: the log has it.
            let _ = self.sender.send(Arc::new(Published::new(event)));
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Published>> {
        self.sender.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_match_serde() {
        for kind in EventKind::ALL {
            assert_eq!(EventKind::from_name(kind.name()), Some(kind));
            assert_eq!(serde_json::to_value(kind).unwrap(), kind.name());
        }
        assert_eq!(EventKind::from_name("job:exploded"), None);
    }

    #[tokio::test]
    async fn a_lagging_subscriber_does_not_block_publishing() {
        let bus = Bus::default();
        let mut slow = bus.subscribe();
        let event = |seq| Event {
            seq,
            kind: EventKind::JobCreated,
            job_id: None,
            at: 0,
            data: Value::Null,
        };
        bus.publish((0..BUS_CAPACITY as i64 + 10).map(event));
        assert!(matches!(
            slow.recv().await,
            Err(broadcast::error::RecvError::Lagged(10))
        ));
        assert_eq!(slow.recv().await.unwrap().seq, 10);
    }
}
