//! The writer thread: the only write connection, committing whatever writes
//! are waiting in one transaction (group commit). A write is acknowledged
//! only after that commit; readers of the event log are woken only then.
//! A write that fails must change nothing, so when one does, the
//! transaction is rolled back and the batch is run again with each write in
//! its own savepoint. Savepoints are not used up front because each copies
//! every page it touches to a sub-journal, which was an eighth of the
//! writer's time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use tokio::sync::{Notify, oneshot};

use super::MAX_BATCH;
use super::events::RecentEvents;
use crate::model::{Event, NewEvent};
use crate::storage::{AppendWaker, Result, StorageError, WriterStats};

/// A write waiting for the writer thread.
pub(super) trait Write: Send {
    /// Runs the write in the batch's transaction, keeping its result for
    /// the reply; returns whether it succeeded. May run twice: a second time
    /// after a rollback, when another write of the batch failed.
    fn run(&mut self, conn: &Connection, log: &mut EventLog) -> bool;
    /// Tells the caller the result, once the batch's commit has succeeded
    /// or failed.
    fn reply(self: Box<Self>, committed: Result<()>);
}

pub(super) struct PendingWrite<F, R> {
    pub(super) f: F,
    pub(super) result: Option<Result<R>>,
    pub(super) tell: oneshot::Sender<Result<R>>,
}

impl<F, R> Write for PendingWrite<F, R>
where
    F: FnMut(&Connection, &mut EventLog) -> Result<R> + Send,
    R: Send,
{
    fn run(&mut self, conn: &Connection, log: &mut EventLog) -> bool {
        let result = (self.f)(conn, log);
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn reply(self: Box<Self>, committed: Result<()>) {
        let result = self
            .result
            .unwrap_or_else(|| Err(StorageError::corrupt("the write never ran")));
        let _ = self.tell.send(committed.and(result));
    }
}

/// What writes did that the writer thread must announce after the commit:
/// the events they appended, and whether any added a webhook delivery to
/// the outbox.
#[derive(Default)]
pub(super) struct EventLog {
    events: Vec<Event>,
    pub(super) webhook_added: bool,
}

impl EventLog {
    /// Appends an event to the log, in the write's transaction.
    pub(super) fn emit(&mut self, conn: &Connection, event: NewEvent, at: i64) -> Result<()> {
        self.events.push(super::events::insert(conn, event, at)?);
        Ok(())
    }

    fn merge(&mut self, mut other: EventLog) {
        self.events.append(&mut other.events);
        self.webhook_added |= other.webhook_added;
    }
}

/// Where the writer announces what a commit did. It announces no payload:
/// readers of the log are woken, and read it.
pub(super) struct Announcer {
    pub(super) recent: Arc<RecentEvents>,
    pub(super) wakers: Arc<Mutex<Vec<AppendWaker>>>,
    pub(super) webhook_added: Arc<Notify>,
    pub(super) stats: Arc<WriterCounters>,
}

#[derive(Default)]
pub(super) struct WriterCounters {
    commits: AtomicU64,
    writes: AtomicU64,
    busy_nanos: AtomicU64,
}

impl WriterCounters {
    pub(super) fn stats(&self) -> WriterStats {
        WriterStats {
            commits: self.commits.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
            busy: Duration::from_nanos(self.busy_nanos.load(Ordering::Relaxed)),
        }
    }

    fn record(&self, writes: u64, busy: Duration) {
        self.commits.fetch_add(1, Ordering::Relaxed);
        self.writes.fetch_add(writes, Ordering::Relaxed);
        self.busy_nanos
            .fetch_add(busy.as_nanos() as u64, Ordering::Relaxed);
    }
}

/// The writer thread: group commit of whatever writes are waiting.
pub(super) fn write_loop(
    mut conn: Connection,
    writes: mpsc::Receiver<Box<dyn Write>>,
    announcer: Announcer,
) {
    while let Ok(first) = writes.recv() {
        let started = Instant::now();
        let mut batch = vec![first];
        let outcome = commit_batch(&mut conn, &mut batch, &writes);
        let writes_in_batch = batch.len() as u64;
        match outcome {
            Ok(log) => {
                if log.webhook_added {
                    announcer.webhook_added.notify_one();
                }
                if !log.events.is_empty() {
                    announcer.recent.append(log.events);
                    for wake in announcer.wakers.lock().expect("never poisoned").iter() {
                        wake();
                    }
                }
                for write in batch {
                    write.reply(Ok(()));
                }
            }
            Err(error) => {
                tracing::error!(%error, "storage commit failed");
                for write in batch {
                    write.reply(Err(commit_failure(&error)));
                }
            }
        }
        announcer.stats.record(writes_in_batch, started.elapsed());
    }
}

/// Runs the batch, and every write that arrives meanwhile (up to
/// [`MAX_BATCH`]), in one transaction and commits it; returns what the
/// writes logged. Taking late arrivals into the open transaction instead of
/// the next one spreads each commit's page writes over more writes, at no
/// cost in latency: the commit happens as soon as nothing is waiting.
///
/// Each write's changes are kept only if it succeeded: the first attempt
/// runs them all without savepoints, and if any fails, a second runs each in
/// a savepoint of its own.
fn commit_batch(
    conn: &mut Connection,
    batch: &mut Vec<Box<dyn Write>>,
    waiting: &mpsc::Receiver<Box<dyn Write>>,
) -> rusqlite::Result<EventLog> {
    let mut log = EventLog::default();
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let mut next = 0;
    let mut all_succeeded = true;
    while all_succeeded && next < batch.len() {
        all_succeeded = batch[next].run(&tx, &mut log);
        next += 1;
        if next == batch.len() && batch.len() < MAX_BATCH {
            batch.extend(waiting.try_recv());
        }
    }
    if all_succeeded {
        tx.commit()?;
        return Ok(log);
    }
    drop(tx); // rolls back
    let mut failed = vec![false; batch.len()];
    'pass: loop {
        let mut committed = EventLog::default();
        let mut tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        for (write, failed) in batch.iter_mut().zip(failed.iter_mut()) {
            if *failed {
                continue;
            }
            let savepoint = tx.savepoint()?;
            let mut log = EventLog::default();
            if write.run(&savepoint, &mut log) {
                savepoint.commit()?;
                committed.merge(log);
                continue;
            }
            drop(savepoint); // rolls back this write
            *failed = true;
            if tx.is_autocommit() {
                // SQLite rolled the whole transaction back (a full disk
                // does that): the others run again, without this one.
                continue 'pass;
            }
        }
        tx.commit()?;
        return Ok(committed);
    }
}

/// What each write of a batch whose commit failed is told: the error's
/// class stays (a full disk is still full), and the message says the
/// commit failed.
fn commit_failure(error: &rusqlite::Error) -> StorageError {
    StorageError::new(super::classify(error), format!("commit failed: {error}"))
}
