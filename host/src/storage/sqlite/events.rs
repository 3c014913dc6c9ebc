//! The event log: appended in the same transaction as each state change,
//! read back by SSE clients resuming after a disconnect.

use rusqlite::{Connection, params};

use async_trait::async_trait;

use super::SqliteStore;
use crate::model::{Event, EventKind, NewEvent};
use crate::storage::events::stored_event;
use crate::storage::{AppendWaker, EventFilter, EventStore, Result, StorageError};

/// Appends an event.
pub(super) fn insert(conn: &Connection, event: NewEvent, at: i64) -> Result<Event> {
    let data = event.body.data_json();
    conn.prepare_cached("INSERT INTO events (kind, job_id, at, data) VALUES (?1, ?2, ?3, ?4)")?
        .execute(params![event.kind().name(), event.job_id, at, data])?;
    // `seq` is the rowid. Not `RETURNING seq`: SQLite buffers RETURNING rows
    // in a temporary b-tree, which cost more than the insert itself.
    Ok(Event {
        seq: conn.last_insert_rowid(),
        job_id: event.job_id,
        at,
        body: event.body,
        live: false,
    })
}

/// The newest committed events, in log order: the log's tail, read by the
/// fan-out once per commit, costs no query while it is here. Only the
/// writer adds to it, after each commit, so it holds every event after its
/// first.
#[derive(Default)]
pub(super) struct RecentEvents {
    events: std::sync::Mutex<std::collections::VecDeque<Event>>,
}

impl RecentEvents {
    /// Events kept: a few commits of the largest batches.
    const CAPACITY: usize = 4096;

    pub(super) fn append(&self, events: Vec<Event>) {
        let mut recent = self.events.lock().expect("never poisoned");
        recent.extend(events);
        let excess = recent.len().saturating_sub(Self::CAPACITY);
        recent.drain(..excess);
    }

    /// Up to `limit` events after `after`, if every such event is here.
    pub(super) fn after(&self, after: i64, limit: usize) -> Option<Vec<Event>> {
        let recent = self.events.lock().expect("never poisoned");
        if after < recent.front()?.seq - 1 {
            return None;
        }
        let start = recent.partition_point(|event| event.seq <= after);
        Some(recent.range(start..).take(limit).cloned().collect())
    }
}

/// Reads the events a query selects as `seq, kind, job_id, at, data`.
fn read_events(conn: &Connection, sql: &str, params: impl rusqlite::Params) -> Result<Vec<Event>> {
    let mut stmt = conn.prepare_cached(sql)?;
    let rows = stmt.query_map(params, |row| {
        Ok((
            row.get::<_, i64>(0)?,
            row.get::<_, String>(1)?,
            row.get::<_, Option<String>>(2)?,
            row.get::<_, i64>(3)?,
            row.get::<_, String>(4)?,
        ))
    })?;
    let mut events = Vec::new();
    for row in rows {
        let (seq, kind, job_id, at, data) = row?;
        events.push(stored_event(seq, &kind, job_id, at, &data)?);
    }
    Ok(events)
}

/// The kinds every job emits, which `events_rare_kind` leaves out (the
/// index's condition, word for word: SQLite uses a partial index only for a
/// query that repeats it).
const EVERY_JOBS_KINDS: &str =
    "kind <> 'job:created' AND kind <> 'job:started' AND kind <> 'job:phase:started'
          AND kind <> 'job:phase:completed' AND kind <> 'job:completed'";

/// Whether `events_rare_kind` holds events of this kind.
fn is_rare(kind: EventKind) -> bool {
    !matches!(
        kind,
        EventKind::JobCreated
            | EventKind::JobStarted
            | EventKind::PhaseStarted
            | EventKind::PhaseCompleted
            | EventKind::JobCompleted
    )
}

/// The query for [`Storage::events_after`]: one statement per filter shape,
/// each on its own index: a job's events on `events_job`, kinds that not
/// every job emits on `events_rare_kind` (one range per kind), everything
/// else in the log's own order, where kinds every job emits are dense.
fn select_events(
    after: i64,
    filter: &EventFilter,
    limit: usize,
) -> (String, Vec<rusqlite::types::Value>) {
    use rusqlite::types::Value;
    let mut sql = String::from("SELECT seq, kind, job_id, at, data FROM events WHERE seq > ?1");
    let mut params = vec![Value::Integer(after)];
    if let Some(job) = &filter.job_id {
        params.push(Value::Text(job.clone()));
        sql.push_str(&format!(" AND job_id = ?{}", params.len()));
    }
    if !filter.kinds.is_empty() {
        let places: Vec<String> = filter
            .kinds
            .iter()
            .map(|kind| {
                params.push(Value::Text(kind.name().to_owned()));
                format!("?{}", params.len())
            })
            .collect();
        sql.push_str(&format!(" AND kind IN ({})", places.join(", ")));
        if filter.kinds.iter().all(|&kind| is_rare(kind)) {
            sql.push_str(&format!(" AND {EVERY_JOBS_KINDS}"));
        }
    }
    params.push(Value::Integer(limit as i64));
    sql.push_str(&format!(" ORDER BY seq LIMIT ?{}", params.len()));
    (sql, params)
}

#[async_trait]
impl EventStore for SqliteStore {
    async fn events_after(
        &self,
        after: i64,
        filter: EventFilter,
        limit: usize,
    ) -> Result<Vec<Event>> {
        let _turn = self
            .log_read_permits
            .acquire()
            .await
            .map_err(|_| StorageError::closed())?;
        self.read(move |conn| {
            let (sql, params) = select_events(after, &filter, limit);
            read_events(conn, &sql, rusqlite::params_from_iter(params))
        })
        .await
    }

    async fn tail_log(&self, after: i64, limit: usize) -> Result<Vec<Event>> {
        self.read(move |conn| {
            let (sql, params) = select_events(after, &EventFilter::default(), limit);
            read_events(conn, &sql, rusqlite::params_from_iter(params))
        })
        .await
    }

    fn tail_cached(&self, after: i64, limit: usize) -> Option<Vec<Event>> {
        self.recent.after(after, limit)
    }

    fn on_append(&self, wake: AppendWaker) {
        self.wakers.lock().expect("never poisoned").push(wake);
    }

    async fn last_event_seq(&self) -> Result<i64> {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The partial index, the query's copy of its condition and `is_rare`
    /// name the same kinds.
    #[test]
    fn the_rare_kinds_agree_everywhere() {
        for kind in EventKind::ALL {
            let listed = EVERY_JOBS_KINDS.contains(&format!("'{}'", kind.name()));
            assert_eq!(is_rare(kind), !listed, "{kind}");
        }
        assert!(
            super::super::schema::MIGRATIONS
                .iter()
                .any(|m| m.contains(EVERY_JOBS_KINDS))
        );
    }

    /// The plan SQLite picks for each filter shape reads an index, not the
    /// whole log.
    #[test]
    fn each_filter_reads_its_index() {
        let mut conn = Connection::open_in_memory().unwrap();
        super::super::migrate(&mut conn).unwrap();
        let plan = |filter: EventFilter| {
            let (sql, params) = select_events(0, &filter, 500);
            let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            let rows = stmt
                .query_map(rusqlite::params_from_iter(params), |row| {
                    row.get::<_, String>(3)
                })
                .unwrap();
            rows.map(Result::unwrap).collect::<Vec<_>>().join("; ")
        };
        let kinds = plan(EventFilter {
            job_id: None,
            kinds: vec![EventKind::JobFailed, EventKind::JobCancelled],
        });
        assert!(kinds.contains("USING INDEX events_rare_kind"), "{kinds}");
        let every_job = plan(EventFilter {
            job_id: None,
            kinds: vec![EventKind::JobCompleted],
        });
        assert!(
            every_job.contains("USING INTEGER PRIMARY KEY"),
            "{every_job}"
        );
        let job = plan(EventFilter {
            job_id: Some("j".into()),
            kinds: vec![],
        });
        assert!(job.contains("USING INDEX events_job"), "{job}");
        let all = plan(EventFilter::default());
        assert!(all.contains("USING INTEGER PRIMARY KEY"), "{all}");
    }
}
