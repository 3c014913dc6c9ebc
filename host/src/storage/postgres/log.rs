//! The event log on PostgreSQL: one order for every host.
//!
//! A write inserts its events without a position (`seq` is NULL), with its
//! transaction id (`xid`). A stamper gives positions: under a
//! transaction-scoped advisory lock (one stamper at a time, on any host),
//! the function `jobhost_stamp_events` numbers, consecutively after the
//! last position given, every unstamped event whose transaction is below
//! the snapshot's xmin, in `(xid, id)` order. Below the xmin, no
//! transaction is still running, so no event can later commit below a
//! position already given: readers that follow positions (`seq > cursor`)
//! never skip one, and SSE ids stay plain increasing integers.
//!
//! A long transaction anywhere holds the xmin back, and with it every
//! stream: `idle_in_transaction_session_timeout` bounds a frozen one.

use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{GenericClient, Pool};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::{PgStore, Tx, query, query_one};
use crate::model::{Event, NewEvent};
use crate::storage::events::stored_event;
use crate::storage::{AppendWaker, EventFilter, EventStore, Result};

/// How often the stamper looks for events with no local commit to wake it
/// (other hosts' commits, until it listens for them).
const SAFETY_NET: Duration = Duration::from_secs(1);
/// Longest a write waits for its events' positions before it returns
/// anyway (an old transaction elsewhere holds the watermark back); its
/// events get theirs as soon as that transaction ends.
const STAMP_WAIT: Duration = Duration::from_secs(1);
/// Longest pause between stamps while the watermark is held back.
const WATERMARK_RETRY: Duration = Duration::from_millis(50);

/// Appends the events a write emitted, in one statement at the end of its
/// transaction, in the order it emitted them, without positions; returns
/// the transaction's id.
pub(super) async fn append(tx: &Tx<'_>, events: Vec<(NewEvent, i64)>) -> Result<i64> {
    let mut kinds = Vec::with_capacity(events.len());
    let (mut jobs, mut ats, mut data) = (Vec::new(), Vec::new(), Vec::new());
    for (event, at) in events {
        kinds.push(event.kind().name());
        data.push(event.body.data_json());
        jobs.push(event.job_id);
        ats.push(at);
    }
    let rows = query(
        tx,
        "INSERT INTO events (kind, job_id, at, data)
         SELECT kind, job_id, at, data
         FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[])
              WITH ORDINALITY AS e(kind, job_id, at, data, n)
         ORDER BY n
         RETURNING xid::text::bigint",
        &[&kinds, &jobs, &ats, &data],
    )
    .await?;
    let first = rows
        .first()
        .ok_or_else(|| crate::storage::StorageError::corrupt("no event was appended"))?;
    Ok(first.get(0))
}

/// What this host knows of the log: how far positions have been given,
/// what its writes wait for, the last position it saw given, and who to
/// wake when positions are given. A write returns once its events have
/// positions (as on SQLite, where the commit gives them): what it wrote is
/// readable, and readers were woken.
pub(super) struct Log {
    /// Every event of a transaction below this id has its position.
    stamped_below: watch::Sender<i64>,
    /// The highest transaction id a local write waits for.
    wanted: AtomicI64,
    /// The last position this host has seen given.
    last: AtomicI64,
    wake_stamper: Notify,
    wakers: Mutex<Vec<AppendWaker>>,
}

impl Default for Log {
    fn default() -> Self {
        Log {
            stamped_below: watch::Sender::new(0),
            wanted: AtomicI64::new(0),
            last: AtomicI64::new(0),
            wake_stamper: Notify::new(),
            wakers: Mutex::new(Vec::new()),
        }
    }
}

impl Log {
    /// Called after transaction `xid` committed events: waits until they
    /// have positions (at most [`STAMP_WAIT`]).
    pub(super) async fn appended(&self, xid: i64) {
        let mut stamped = self.stamped_below.subscribe();
        if *stamped.borrow() > xid {
            return;
        }
        self.wanted.fetch_max(xid, Ordering::SeqCst);
        self.wake_stamper.notify_one();
        let waited = tokio::time::timeout(STAMP_WAIT, stamped.wait_for(|below| *below > xid)).await;
        if waited.is_err() {
            tracing::debug!(
                "a write's events still wait for positions: the watermark is held back"
            );
        }
    }

    pub(super) fn on_append(&self, wake: AppendWaker) {
        self.wakers.lock().expect("never poisoned").push(wake);
    }

    /// Wakes the log's readers if positions were given since they last
    /// were (by this host or another).
    pub(super) fn saw(&self, last: i64) {
        if self.last.fetch_max(last, Ordering::SeqCst) < last {
            for wake in self.wakers.lock().expect("never poisoned").iter() {
                wake();
            }
        }
    }
}

/// Gives positions until every local write waiting has its own: again at
/// once while that makes progress, and after a pause (doubling from 1 ms)
/// while an older transaction, anywhere, holds the watermark back.
async fn stamp(db: &impl GenericClient, log: &Log, stop: &CancellationToken) -> Result<()> {
    let mut pause = Duration::from_millis(1);
    loop {
        let row = query_one(db, "SELECT last, below FROM jobhost_stamp_events()", &[]).await?;
        log.saw(row.get(0));
        let below: i64 = row.get(1);
        let advanced = log.stamped_below.send_if_modified(|stamped| {
            let advanced = below > *stamped;
            *stamped = (*stamped).max(below);
            advanced
        });
        if below > log.wanted.load(Ordering::SeqCst) {
            return Ok(());
        }
        if advanced {
            pause = Duration::from_millis(1);
            continue;
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(WATERMARK_RETRY);
    }
}

/// The stamper: runs after local commits that appended events, and at
/// least every [`SAFETY_NET`].
pub(super) async fn stamp_loop(pool: Pool, log: std::sync::Arc<Log>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = log.wake_stamper.notified() => {}
            _ = tokio::time::sleep(SAFETY_NET) => {}
        }
        let stamped = async {
            let client = pool.get().await?;
            stamp(&client, &log, &stop).await
        };
        if let Err(error) = stamped.await {
            tracing::warn!(%error, "stamping the event log failed; retrying");
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(WATERMARK_RETRY) => {}
            }
            log.wake_stamper.notify_one();
        }
    }
}

/// Reads events a query selects as `seq, kind, job_id, at, data`.
async fn read_events(
    db: &impl GenericClient,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<Event>> {
    let rows = query(db, sql, params).await?;
    rows.iter()
        .map(|row| stored_event(row.get(0), row.get(1), row.get(2), row.get(3), row.get(4)))
        .collect()
}

#[async_trait]
impl EventStore for PgStore {
    async fn events_after(
        &self,
        after: i64,
        filter: EventFilter,
        limit: usize,
    ) -> Result<Vec<Event>> {
        let client = self.client().await?;
        let kinds: Vec<&str> = filter.kinds.iter().map(|kind| kind.name()).collect();
        let limit = limit as i64;
        match (&filter.job_id, kinds.is_empty()) {
            (Some(job), true) => {
                read_events(
                    &client,
                    "SELECT seq, kind, job_id, at, data FROM events
                     WHERE job_id = $2 AND seq > $1 ORDER BY seq LIMIT $3",
                    &[&after, job, &limit],
                )
                .await
            }
            (job, _) => {
                read_events(
                    &client,
                    "SELECT seq, kind, job_id, at, data FROM events
                     WHERE seq > $1 AND ($2::text IS NULL OR job_id = $2)
                       AND (cardinality($3::text[]) = 0 OR kind = ANY($3))
                     ORDER BY seq LIMIT $4",
                    &[&after, job, &kinds, &limit],
                )
                .await
            }
        }
    }

    async fn tail_log(&self, after: i64, limit: usize) -> Result<Vec<Event>> {
        let client = self.client().await?;
        read_events(
            &client,
            "SELECT seq, kind, job_id, at, data FROM events WHERE seq > $1 ORDER BY seq LIMIT $2",
            &[&after, &(limit as i64)],
        )
        .await
    }

    fn tail_cached(&self, _after: i64, _limit: usize) -> Option<Vec<Event>> {
        None
    }

    async fn last_event_seq(&self) -> Result<i64> {
        let client = self.client().await?;
        let row = query_one(&client, "SELECT last FROM event_positions", &[]).await?;
        Ok(row.get(0))
    }

    fn on_append(&self, wake: AppendWaker) {
        self.log.on_append(wake);
    }
}
