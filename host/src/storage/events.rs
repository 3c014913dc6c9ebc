//! The event log: appended in the same transaction as each state change,
//! read back by SSE clients resuming after a disconnect.

use rusqlite::{Connection, Row, params};

use super::{Result, Storage, StorageError};
use crate::events::{Event, EventKind, NewEvent};

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
            && (self.kinds.is_empty() || self.kinds.contains(&event.kind))
    }
}

pub(super) fn insert(conn: &Connection, event: NewEvent, at: i64) -> Result<Event> {
    let data = crate::json::text(&event.data);
    conn.prepare_cached("INSERT INTO events (kind, job_id, at, data) VALUES (?1, ?2, ?3, ?4)")?
        .execute(params![event.kind.name(), event.job_id, at, data])?;
    // `seq` is the rowid. Not `RETURNING seq`: SQLite buffers RETURNING rows
    // in a temporary b-tree, which cost more than the insert itself.
    let seq = conn.last_insert_rowid();
    Ok(Event {
        seq,
        kind: event.kind,
        job_id: event.job_id,
        at,
        data: event.data,
        live: false,
    })
}

fn from_row(row: &Row<'_>) -> rusqlite::Result<(i64, String, Option<String>, i64, String)> {
    Ok((
        row.get(0)?,
        row.get(1)?,
        row.get(2)?,
        row.get(3)?,
        row.get(4)?,
    ))
}

impl Storage {
    /// Events with a sequence number above `after` that match `filter`,
    /// oldest first, at most `limit`.
    pub async fn events_after(
        &self,
        after: i64,
        filter: EventFilter,
        limit: usize,
    ) -> Result<Vec<Event>> {
        let _turn = self
            .log_read_permits
            .acquire()
            .await
            .map_err(|_| StorageError::Closed)?;
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT seq, kind, job_id, at, data FROM events
                 WHERE seq > ?1 AND (?2 IS NULL OR job_id = ?2)
                   AND (?3 = '' OR instr(?3, ',' || kind || ',') > 0)
                 ORDER BY seq LIMIT ?4",
            )?;
            // Kinds as ",a,b,": a kind matches when ",kind," is in it.
            let kinds = if filter.kinds.is_empty() {
                String::new()
            } else {
                let names: Vec<&str> = filter.kinds.iter().map(|k| k.name()).collect();
                format!(",{},", names.join(","))
            };
            let rows =
                stmt.query_map(params![after, filter.job_id, kinds, limit as i64], from_row)?;
            let mut events = Vec::new();
            for row in rows {
                let (seq, kind, job_id, at, data) = row?;
                let kind = EventKind::from_name(&kind)
                    .ok_or_else(|| StorageError::Corrupt(format!("unknown event kind `{kind}`")))?;
                let data = serde_json::from_str(&data)
                    .map_err(|e| StorageError::Corrupt(e.to_string()))?;
                events.push(Event {
                    seq,
                    kind,
                    job_id,
                    at,
                    data,
                    live: false,
                });
            }
            Ok(events)
        })
        .await
    }

    /// The sequence number of the newest event (0 when there is none).
    pub async fn last_event_seq(&self) -> Result<i64> {
        self.read(|conn| {
            Ok(
                conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM events", [], |row| {
                    row.get(0)
                })?,
            )
        })
        .await
    }
}
