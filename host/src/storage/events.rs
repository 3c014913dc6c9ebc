//! The event log: appended in the same transaction as each state change it
//! reports, in one global order (its sequence numbers). Readers follow it
//! by cursor: SSE clients catching up, and the fan-out that feeds the
//! in-process bus. A commit only wakes them ([`EventStore::on_append`]);
//! what they deliver is what they read.

use std::sync::Arc;

use async_trait::async_trait;

use super::Result;
use crate::model::{Event, EventKind};

/// Which events a reader wants.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    pub job_id: Option<String>,
    /// Empty means every kind.
    pub kinds: Vec<EventKind>,
}

impl EventFilter {
    pub fn matches(&self, event: &Event) -> bool {
        self.job_id
            .as_ref()
            .is_none_or(|id| event.job_id.as_ref() == Some(id))
            && (self.kinds.is_empty() || self.kinds.contains(&event.kind()))
    }
}

/// An event as a backend stores it (kind by name, payload as JSON text),
/// read back.
pub(super) fn stored_event(
    seq: i64,
    kind: &str,
    job_id: Option<String>,
    at: i64,
    data: &str,
) -> Result<Event> {
    let kind = EventKind::from_name(kind)
        .ok_or_else(|| super::StorageError::corrupt(format!("unknown event kind `{kind}`")))?;
    let body = crate::model::EventBody::parse(kind, data)
        .map_err(|e| super::StorageError::corrupt(format!("event {seq}: {e}")))?;
    Ok(Event {
        seq,
        job_id,
        at,
        body,
        live: false,
    })
}

#[async_trait]
pub trait EventStore: Send + Sync {
    /// Events after the sequence number `after` that match `filter`,
    /// oldest first, at most `limit`. For clients catching up: these reads
    /// take at most half the backend's readers, so that the queue's own
    /// reads never wait behind a thousand clients connecting.
    async fn events_after(
        &self,
        after: i64,
        filter: EventFilter,
        limit: usize,
    ) -> Result<Vec<Event>>;

    /// Every event after `after`, oldest first, at most `limit`: the
    /// fan-out's read of the log's tail.
    async fn tail_log(&self, after: i64, limit: usize) -> Result<Vec<Event>>;

    /// The same, if the backend holds all of it in memory (the tail of the
    /// log as its latest commits left it); `None` when it does not, and the
    /// log must be read. Does no I/O, so a waker may call it.
    fn tail_cached(&self, after: i64, limit: usize) -> Option<Vec<Event>>;

    /// The sequence number of the newest event (0 when there is none).
    async fn last_event_seq(&self) -> Result<i64>;

    /// Registers `wake`, called after every commit that appended events.
    fn on_append(&self, wake: AppendWaker);
}

/// Called after each commit that appended events, on the committing thread
/// (or, for a database shared by hosts, on the task that heard of another
/// host's commit): it must be quick and must not block.
pub type AppendWaker = Arc<dyn Fn() + Send + Sync>;
