//! The event log on PostgreSQL: one order for every host.
//!
//! A write inserts its events without positions, numbered 1.. within its
//! transaction (`n`), with the transaction's id (`xid`). A stamper gives
//! positions: under a transaction-scoped advisory lock (one stamper at a
//! time, on any host), the function `jobhost_stamp_events` gives each
//! transaction below the snapshot's xmin that appended events a block of
//! consecutive positions after the last given, in `xid` order
//! (`event_blocks`; an event's position is its block's base + `n`). Below
//! the xmin, no transaction is still running, so no event can later
//! commit below a position already given: readers that follow positions
//! (`position > cursor`) never skip one, and SSE ids stay plain increasing
//! integers. Stamping writes one row per transaction, and no event row
//! twice.
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

/// Tells every host, at commit, that jobs became due; identical
/// notifications of one transaction are sent once.
pub(super) const NOTIFY_JOBS_DUE: &str = "SELECT pg_notify('jobhost_jobs', '')";

/// Appends the events a write emitted, in one statement at the end of its
/// transaction, numbered in the order it emitted them, without positions,
/// and sends [`NOTIFY_JOBS_DUE`] with them if the write made jobs due;
/// returns the transaction's id. A transaction appends once: its events
/// are numbered from 1, and a second append would collide.
pub(super) async fn append(
    tx: &Tx<'_>,
    events: Vec<(NewEvent, i64)>,
    jobs_due: bool,
) -> Result<i64> {
    let mut kinds = Vec::with_capacity(events.len());
    let (mut jobs, mut ats, mut data) = (Vec::new(), Vec::new(), Vec::new());
    for (event, at) in events {
        kinds.push(event.kind().name());
        data.push(event.body.data_json());
        jobs.push(event.job_id);
        ats.push(at);
    }
    let row = query_one(
        tx,
        &format!(
            "WITH appended AS (
                 INSERT INTO events (n, kind, job_id, at, data)
                 SELECT n, kind, job_id, at, data
                 FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[])
                      WITH ORDINALITY AS e(kind, job_id, at, data, n)
                 RETURNING xid
             ), notified AS ({NOTIFY_JOBS_DUE} WHERE $5)
             SELECT (SELECT xid::text::bigint FROM appended LIMIT 1),
                    (SELECT count(*) FROM notified)"
        ),
        &[&kinds, &jobs, &ats, &data, &jobs_due],
    )
    .await?;
    row.get::<_, Option<i64>>(0)
        .ok_or_else(|| crate::storage::StorageError::corrupt("no event was appended"))
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
/// once while that makes progress, and while an older transaction holds
/// the watermark back, after the next local commit or a pause (doubling
/// from 1 ms), whichever comes first.
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
        // A local commit may be what held the watermark back: it wakes
        // this at once.
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = log.wake_stamper.notified() => {}
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

/// The events after position `$1`, block by block (blocks never overlap,
/// so `(block, n)` order is position order), for a reader to filter, order
/// by `b.last, e.n` and limit.
const IN_LOG_ORDER: &str = "SELECT b.base + e.n, e.kind, e.job_id, e.at, e.data
    FROM event_blocks b JOIN events e ON e.xid = b.xid
    WHERE b.last > $1 AND b.base + e.n > $1";

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
                    "SELECT b.base + e.n AS seq, e.kind, e.job_id, e.at, e.data
                     FROM events e JOIN event_blocks b ON b.xid = e.xid
                     WHERE e.job_id = $2 AND b.base + e.n > $1 ORDER BY seq LIMIT $3",
                    &[&after, job, &limit],
                )
                .await
            }
            (job, _) => {
                read_events(
                    &client,
                    &format!(
                        "{IN_LOG_ORDER} AND ($2::text IS NULL OR e.job_id = $2)
                           AND (cardinality($3::text[]) = 0 OR e.kind = ANY($3))
                         ORDER BY b.last, e.n LIMIT $4"
                    ),
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
            &format!("{IN_LOG_ORDER} ORDER BY b.last, e.n LIMIT $2"),
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
