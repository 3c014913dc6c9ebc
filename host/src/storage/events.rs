//! The event log: appended in the same transaction as each state change it
//! reports, in one global order (its sequence numbers). Readers follow it
//! by cursor: SSE clients catching up, and the fan-out that feeds the
//! in-process bus. A commit only wakes them ([`EventStore::log_appended`]);
//! what they deliver is what they read.

use async_trait::async_trait;
use tokio::sync::watch;

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

    /// The sequence number of the newest event (0 when there is none).
    async fn last_event_seq(&self) -> Result<i64>;

    /// Changes (to the newest sequence number) after every commit that
    /// appended events.
    fn log_appended(&self) -> watch::Receiver<i64>;
}
