//! Group commit: writes of one kind that arrive while earlier ones of that
//! kind are in flight share one transaction. PostgreSQL's cost is per
//! transaction and per statement far more than per row (see BENCHMARKS
//! "PostgreSQL"), so under load a batch of k writes costs little more than
//! one.
//!
//! - A write joins its kind's queue ([`Coalescer`]). While fewer than its
//!   lanes run, a new lane takes everything queued (at most [`MAX_BATCH`])
//!   into one transaction, and again until the queue is empty. A write
//!   alone runs at once; under load, writes wait for one batch at most.
//! - The kind runs its batch's writes together ([`Kind::run`]): as one
//!   statement over them all where it can, else their statements pipelined
//!   on the lane's connection. Their events are appended at the end, in one
//!   statement.
//! - A statement that fails aborts the transaction: nothing of it
//!   committed, and each write runs again alone, so a bad write fails only
//!   itself.
//! - A write may ask for a job for its worker ([`Outcome::wants_claim`]):
//!   the batch claims them all in one statement after its writes, and
//!   hands the jobs out in the writes' order.
//! - Writes see each other's uncommitted rows, so only writes for which
//!   that is harmless share a queue: creates with creates (a create claims
//!   only the job it inserted), completions with completions (each changes
//!   only its own job's rows; the batch's claim comes after them all).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use futures::future::BoxFuture;
use tokio::sync::{Semaphore, oneshot};

use super::{MAX_BATCH, Tx, WriteScope, log};
use crate::storage::{Claimed, Result, StorageError, WriterStats};

/// A kind of write that shares transactions with writes of its kind.
pub(super) trait Kind: Send + Sync + 'static {
    /// What one write asks for.
    type Write: Send + Sync + 'static;
    /// What one write returns.
    type Outcome: Outcome;

    /// Runs `writes` in `tx`, `writes[n]` emitting into `scopes[n]`, and
    /// returns their outcomes in the same order. An error aborts the
    /// transaction (then each write runs again alone).
    fn run<'a>(
        tx: &'a Tx<'a>,
        writes: Vec<&'a Self::Write>,
        scopes: &'a mut [WriteScope],
    ) -> BoxFuture<'a, Result<Vec<Self::Outcome>>>;
}

/// What a batched write returns.
pub(super) trait Outcome: Send + 'static {
    /// The time at which the write wants a job claimed for its worker, if
    /// it does.
    fn wants_claim(&self) -> Option<i64> {
        None
    }

    /// Takes the job claimed for it.
    fn claimed(&mut self, _next: Claimed) {}
}

/// A write's outcome once its transaction committed.
pub(super) struct Committed<R> {
    pub(super) value: R,
    /// The transaction's id, if it appended events.
    pub(super) xid: Option<i64>,
    /// The write added a webhook delivery.
    pub(super) webhook: bool,
}

/// A write waiting for its batch, and its caller (who may have gone).
struct Queued<K: Kind> {
    write: K::Write,
    reply: oneshot::Sender<Result<Committed<K::Outcome>>>,
}

/// Runs transactions on the pool for one host, and counts them.
pub(super) struct Committer {
    pool: Pool,
    host: Arc<str>,
    commits: AtomicU64,
    writes: AtomicU64,
    busy_nanos: AtomicU64,
}

impl Committer {
    pub(super) fn new(pool: Pool, host: Arc<str>) -> Self {
        Committer {
            pool,
            host,
            commits: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            busy_nanos: AtomicU64::new(0),
        }
    }

    pub(super) fn scope(&self) -> WriteScope {
        WriteScope {
            host: self.host.clone(),
            events: Vec::new(),
            webhook: false,
            jobs_due: false,
        }
    }

    /// Appends what `scope` emitted and commits `tx`: the transaction's id
    /// if it appended events.
    pub(super) async fn commit(
        &self,
        tx: Tx<'_>,
        scope: &mut WriteScope,
        writes: usize,
        began: Instant,
    ) -> Result<Option<i64>> {
        let events = std::mem::take(&mut scope.events);
        let xid = match events.is_empty() {
            false => Some(log::append(&tx, events, scope.jobs_due).await?),
            true if scope.jobs_due => {
                super::execute(&tx, log::NOTIFY_JOBS_DUE, &[]).await?;
                None
            }
            true => None,
        };
        let committed = tx.commit().await;
        self.count(writes, began.elapsed());
        committed?;
        Ok(xid)
    }

    fn count(&self, writes: usize, busy: Duration) {
        self.commits.fetch_add(1, Ordering::Relaxed);
        self.writes.fetch_add(writes as u64, Ordering::Relaxed);
        self.busy_nanos
            .fetch_add(busy.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Transactions, the writes in them and the time they took, summed
    /// over transactions that ran at once.
    pub(super) fn stats(&self) -> WriterStats {
        WriterStats {
            commits: self.commits.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
            busy: Duration::from_nanos(self.busy_nanos.load(Ordering::Relaxed)),
        }
    }

    /// Runs a batch and answers its writes; if a statement failed, each
    /// write again alone.
    async fn run<K: Kind>(&self, batch: Vec<Queued<K>>) {
        match self.attempt(&batch).await {
            Attempt::Committed(outcomes) => {
                for (queued, outcome) in batch.into_iter().zip(outcomes) {
                    let _ = queued.reply.send(Ok(outcome));
                }
            }
            Attempt::Aborted(_) if batch.len() > 1 => {
                for queued in batch {
                    let outcome = match self.attempt(std::slice::from_ref(&queued)).await {
                        Attempt::Committed(mut outcomes) => outcomes.pop().ok_or_else(|| {
                            StorageError::corrupt("a committed write left no outcome")
                        }),
                        Attempt::Aborted(error) | Attempt::Unknown(error) => Err(error),
                    };
                    let _ = queued.reply.send(outcome);
                }
            }
            Attempt::Aborted(error) | Attempt::Unknown(error) => {
                for queued in batch {
                    let _ = queued.reply.send(Err(error.clone()));
                }
            }
        }
    }

    async fn attempt<K: Kind>(&self, batch: &[Queued<K>]) -> Attempt<K::Outcome> {
        let began = Instant::now();
        let mut client = match self.pool.get().await {
            Ok(client) => client,
            Err(error) => return Attempt::Aborted(error.into()),
        };
        let tx = match client.transaction().await {
            Ok(tx) => tx,
            Err(error) => return Attempt::Aborted(error.into()),
        };
        let mut scopes: Vec<WriteScope> = batch.iter().map(|_| self.scope()).collect();
        let writes = batch.iter().map(|queued| &queued.write).collect();
        let mut values = match K::run(&tx, writes, &mut scopes).await {
            Ok(values) if values.len() == batch.len() => values,
            Ok(_) => return Attempt::Aborted(StorageError::corrupt("a batch lost a write")),
            // Dropping the transaction rolls it back.
            Err(error) => return Attempt::Aborted(error),
        };
        let mut all = self.scope();
        let webhooks: Vec<bool> = scopes.iter().map(|scope| scope.webhook).collect();
        for scope in scopes {
            all.events.extend(scope.events);
            all.jobs_due |= scope.jobs_due;
        }
        // After the writes' events: a job claimed here starts after the
        // jobs they ended, in the log too.
        if let Err(error) = self.claim_for(&tx, &mut all, &mut values).await {
            return Attempt::Aborted(error);
        }
        match self.commit(tx, &mut all, batch.len(), began).await {
            Ok(xid) => Attempt::Committed(
                (values.into_iter().zip(webhooks))
                    .map(|(value, webhook)| Committed {
                        value,
                        xid,
                        webhook,
                    })
                    .collect(),
            ),
            Err(error) => Attempt::Unknown(error),
        }
    }

    /// Claims, in one statement, a job for each write that wants one (at
    /// the latest time they asked for), in the writes' order.
    async fn claim_for(
        &self,
        tx: &Tx<'_>,
        scope: &mut WriteScope,
        values: &mut [impl Outcome],
    ) -> Result<()> {
        let wanting: Vec<(usize, i64)> = (values.iter().enumerate())
            .filter_map(|(n, value)| Some((n, value.wants_claim()?)))
            .collect();
        let Some(now) = wanting.iter().map(|(_, at)| *at).max() else {
            return Ok(());
        };
        let claimed = super::create::claim(tx, scope, now, wanting.len()).await?;
        for ((n, _), next) in wanting.into_iter().zip(claimed) {
            values[n].claimed(next);
        }
        Ok(())
    }
}

/// How a batch's transaction ended.
enum Attempt<R> {
    /// With each write's outcome.
    Committed(Vec<Committed<R>>),
    /// Before its commit: nothing of it is stored.
    Aborted(StorageError),
    /// At its commit, which may or may not have happened.
    Unknown(StorageError),
}

/// The queue of one kind of write, and the lanes that run it.
pub(super) struct Coalescer<K: Kind> {
    queue: Mutex<VecDeque<Queued<K>>>,
    lanes: Arc<Semaphore>,
}

impl<K: Kind> Coalescer<K> {
    pub(super) fn new(lanes: usize) -> Arc<Self> {
        Arc::new(Coalescer {
            queue: Mutex::new(VecDeque::new()),
            lanes: Arc::new(Semaphore::new(lanes)),
        })
    }

    /// Runs `write` in the next batch of this kind.
    pub(super) async fn write(
        self: &Arc<Self>,
        committer: &Arc<Committer>,
        write: K::Write,
    ) -> Result<Committed<K::Outcome>> {
        let (reply, outcome) = oneshot::channel();
        (self.queue.lock().expect("never poisoned")).push_back(Queued { write, reply });
        self.open_lane(committer);
        // A lane answers every write it took, unless the runtime is
        // shutting down.
        outcome
            .await
            .unwrap_or_else(|_| Err(StorageError::closed()))
    }

    /// Starts a lane if one is free; it runs batches until the queue is
    /// empty. A lane runs on a task of its own, so a caller that goes away
    /// does not abort the other writes' transaction.
    fn open_lane(self: &Arc<Self>, committer: &Arc<Committer>) {
        let Ok(lane) = self.lanes.clone().try_acquire_owned() else {
            return;
        };
        let (this, committer) = (self.clone(), committer.clone());
        tokio::spawn(async move {
            loop {
                let batch: Vec<_> = {
                    let mut queue = this.queue.lock().expect("never poisoned");
                    let take = queue.len().min(MAX_BATCH);
                    queue.drain(..take).collect()
                };
                if batch.is_empty() {
                    break;
                }
                committer.run(batch).await;
            }
            drop(lane);
            // A write queued after the last look, while this lane was still
            // taken, found none free: it needs one now.
            if !this.queue.lock().expect("never poisoned").is_empty() {
                this.open_lane(&committer);
            }
        });
    }
}
