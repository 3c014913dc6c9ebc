//! Persistence: SQLite through rusqlite, behind the narrow API of
//! [`Storage`], whose methods are the queue's transitions and queries, never
//! SQL. A PostgreSQL backend would implement the same methods.
//!
//! - One writer thread owns the only write connection. It takes whatever
//!   writes are waiting (up to [`MAX_BATCH`]) and commits them in one
//!   transaction (group commit): a write is acknowledged only after that
//!   commit, and its events are published on the bus only then. A write that
//!   fails must change nothing, so when one does, the transaction is rolled
//!   back and the batch is run again with each write in its own savepoint.
//!   Savepoints are not used up front because each copies every page it
//!   touches to a sub-journal, which was an eighth of the writer's time.
//! - Reads use a small pool of read connections on blocking threads; in WAL
//!   mode they never wait for the writer.
//! - No SQLite call runs on an async executor thread.
//!
//! Durability: [`Durability::Process`] (WAL, `synchronous=NORMAL`) survives a
//! crash of the process for everything acknowledged; [`Durability::Full`]
//! (`synchronous=FULL`) also survives power loss.

mod events;
mod jobs;
mod plugins;
mod schema;
mod webhooks;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags};
use tokio::sync::{Notify, Semaphore, oneshot};

use crate::events::{Bus, Event, NewEvent};

pub use events::EventFilter;
pub use jobs::{
    AfterFailure, CancelOutcome, Completion, CreateOutcome, DeleteOutcome, JobFilter, JobPage,
    MAX_PAGE, NewJob, NewPhase, Recovered, RetryOutcome,
};
pub use plugins::{
    ActivateOutcome, DeleteVersionOutcome, NewPluginVersion, PluginQuota, PluginRecord, PutOutcome,
    VersionRecord,
};
pub use schema::VERSION as SCHEMA_VERSION;
pub(crate) use schema::migrate;
pub use webhooks::{AttemptOutcome, Delivery, WebhookStatus};

/// Most writes committed in one transaction.
pub const MAX_BATCH: usize = 256;
/// WAL size, in pages, at which the writer asks for a checkpoint
/// (SQLite's default auto-checkpoint threshold).
const CHECKPOINT_PAGES: i32 = 1000;
/// Reads at once, each on a connection of its own, kept open between reads.
const READERS: usize = 4;
/// Bytes the WAL is truncated to after a checkpoint that empties it.
const WAL_SIZE_LIMIT: i64 = 64 << 20;
/// Prepared statements cached per connection: more than the distinct
/// statements the queue uses, so none is ever prepared twice.
const STATEMENT_CACHE: usize = 128;

#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    serde::Deserialize,
    serde::Serialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Survives a crash of the process (WAL, synchronous=NORMAL).
    #[default]
    Process,
    /// Also survives power loss or an OS crash (fsync at every commit).
    Full,
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("corrupt stored value: {0}")]
    Corrupt(String),
    #[error("storage is closed")]
    Closed,
}

impl StorageError {
    /// The database reached its size limit (`--max-db-mb`) or the disk is
    /// full: the write was refused whole, and nothing else was lost.
    pub fn is_full(&self) -> bool {
        matches!(self, StorageError::Sqlite(error)
            if error.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull))
    }
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// A write waiting for the writer thread.
trait Write: Send {
    /// Runs the write in the batch's transaction, keeping its result for
    /// the reply; returns whether it succeeded. May run twice: a second time
    /// after a rollback, when another write of the batch failed.
    fn run(&mut self, conn: &Connection, log: &mut EventLog) -> bool;
    /// Tells the caller the result, once the batch's commit has succeeded
    /// or failed.
    fn reply(self: Box<Self>, committed: Result<()>);
}

struct PendingWrite<F, R> {
    f: F,
    result: Option<Result<R>>,
    tell: oneshot::Sender<Result<R>>,
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
            .unwrap_or_else(|| Err(StorageError::Corrupt("the write never ran".into())));
        let _ = self.tell.send(committed.and(result));
    }
}

/// What writes did that the writer thread must announce after the commit:
/// the events they wrote (with their sequence numbers), and whether any
/// added a webhook delivery to the outbox.
#[derive(Default)]
pub(crate) struct EventLog {
    events: Vec<Event>,
    webhook_added: bool,
}

impl EventLog {
    fn emit(&mut self, conn: &Connection, event: NewEvent, at: i64) -> Result<()> {
        self.events.push(events::insert(conn, event, at)?);
        Ok(())
    }
}

pub struct Storage {
    writer: Mutex<Option<mpsc::Sender<Box<dyn Write>>>>,
    /// The writer, then the checkpointer (which stops when the writer does).
    threads: Mutex<Vec<thread::JoinHandle<()>>>,
    readers: Arc<Mutex<Vec<Connection>>>,
    /// One permit per reader: a burst of reads (a thousand SSE clients
    /// connecting at once) waits its turn instead of starting a blocking
    /// thread and a connection, with its own page cache, for each read.
    read_permits: Arc<Semaphore>,
    /// Reads of the event log for catching SSE clients up may take only
    /// half the readers, so that the queue's own reads (the next due job,
    /// webhook deliveries) never wait behind a thousand clients connecting.
    log_read_permits: Semaphore,
    /// Notified after a commit that added a webhook delivery.
    webhook_added: Arc<Notify>,
    writer_stats: Arc<WriterCounters>,
    closed: AtomicBool,
    path: PathBuf,
    bus: Bus,
}

impl Storage {
    /// Opens (creating if needed) the database at `path`, migrates it, and
    /// starts the writer. Committed events are published on `bus`.
    pub fn open(path: &Path, durability: Durability, bus: Bus) -> Result<Self> {
        let mut conn = open_connection(path, durability)?;
        check_integrity(&conn)?;
        schema::migrate(&mut conn)?;
        // Readers are opened now, not at their first read: a server whose
        // descriptors run out (a flood of connections) still reads.
        let readers = (0..READERS)
            .map(|_| open_reader(path))
            .collect::<Result<Vec<_>>>()?;
        // Checkpoints run on a thread of their own instead of inside the
        // writer's commits (SQLite's auto-checkpoint, which this hook
        // replaces): the writer is the queue's one serial resource.
        let checkpointer = open_connection(path, durability)?;
        let (request_checkpoint, checkpoint_requests) = mpsc::sync_channel(1);
        conn.wal_hook(Some(move |_: &mut rusqlite::hooks::Wal, pages| {
            if pages >= CHECKPOINT_PAGES {
                let _ = request_checkpoint.try_send(());
            }
            Ok(())
        }))?;
        let (sender, receiver) = mpsc::channel();
        let webhook_added = Arc::new(Notify::new());
        let writer_stats = Arc::new(WriterCounters::default());
        let announcer = Announcer {
            bus: bus.clone(),
            webhook_added: webhook_added.clone(),
            stats: writer_stats.clone(),
        };
        let spawn = |name: &str, run: Box<dyn FnOnce() + Send>| {
            thread::Builder::new()
                .name(name.into())
                .spawn(run)
                .map_err(|e| StorageError::Corrupt(format!("cannot start the {name} thread: {e}")))
        };
        let threads = vec![
            spawn(
                "jobhost-storage",
                Box::new(move || write_loop(conn, receiver, announcer)),
            )?,
            spawn(
                "jobhost-checkpoint",
                Box::new(move || checkpoint_loop(checkpointer, checkpoint_requests)),
            )?,
        ];
        Ok(Storage {
            writer: Mutex::new(Some(sender)),
            threads: Mutex::new(threads),
            readers: Arc::new(Mutex::new(readers)),
            read_permits: Arc::new(Semaphore::new(READERS)),
            log_read_permits: Semaphore::new(READERS / 2),
            webhook_added,
            writer_stats,
            closed: Default::default(),
            path: path.to_path_buf(),
            bus,
        })
    }

    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    pub fn writer_stats(&self) -> WriterStats {
        let stats = &self.writer_stats;
        WriterStats {
            commits: stats.commits.load(Ordering::Relaxed),
            writes: stats.writes.load(Ordering::Relaxed),
            busy: Duration::from_nanos(stats.busy_nanos.load(Ordering::Relaxed)),
        }
    }

    /// Resolves after a commit that added a webhook delivery to the outbox
    /// (at once if one happened since the last call returned).
    pub async fn webhook_added(&self) {
        self.webhook_added.notified().await
    }

    /// Runs `f` in the writer's next transaction; resolves after the commit.
    /// `f` may run twice (see [`Write::run`]): it must depend only on the
    /// database and what it captured.
    async fn write<R: Send + 'static>(
        &self,
        f: impl FnMut(&Connection, &mut EventLog) -> Result<R> + Send + 'static,
    ) -> Result<R> {
        let (tell, told) = oneshot::channel();
        let write: Box<dyn Write> = Box::new(PendingWrite {
            f,
            result: None,
            tell,
        });
        let sender = self
            .writer
            .lock()
            .unwrap()
            .clone()
            .ok_or(StorageError::Closed)?;
        sender.send(write).map_err(|_| StorageError::Closed)?;
        told.await.map_err(|_| StorageError::Closed)?
    }

    /// Runs `f` on a read connection, on a blocking thread.
    async fn read<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<R> + Send + 'static,
    ) -> Result<R> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(StorageError::Closed);
        }
        let permit = self
            .read_permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| StorageError::Closed)?;
        let (readers, path) = (self.readers.clone(), self.path.clone());
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let conn = match readers.lock().unwrap().pop() {
                Some(conn) => conn,
                None => open_reader(&path)?,
            };
            let result = f(&conn);
            let mut pool = readers.lock().unwrap();
            if pool.len() < READERS {
                pool.push(conn);
            }
            result
        })
        .await
        .map_err(|_| StorageError::Closed)?
    }

    /// Caps the database at `bytes` (rounded down to whole pages): a write
    /// that would grow it further fails as full.
    pub async fn limit_size(&self, bytes: u64) -> Result<()> {
        self.write(move |conn, _| {
            let page: i64 = conn.query_row("PRAGMA page_size", [], |row| row.get(0))?;
            conn.pragma_update(None, "max_page_count", (bytes as i64 / page).max(1))?;
            Ok(())
        })
        .await
    }

    /// Finishes the writes already sent, then closes the database. Later
    /// calls fail with [`StorageError::Closed`].
    pub async fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        // Reads waiting for a reader fail instead of opening one after the
        // pool is emptied below.
        self.read_permits.close();
        self.log_read_permits.close();
        drop(self.writer.lock().unwrap().take());
        let threads = std::mem::take(&mut *self.threads.lock().unwrap());
        for thread in threads {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        self.readers.lock().unwrap().clear();
    }
}

fn open_connection(path: &Path, durability: Durability) -> Result<Connection> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "wal")?;
    conn.pragma_update(None, "foreign_keys", "on")?;
    conn.pragma_update(None, "busy_timeout", 5000)?;
    // A checkpoint that empties the WAL also truncates it to this: a WAL
    // that grew under long reads does not keep its size for good.
    conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)?;
    let synchronous = match durability {
        Durability::Process => "normal",
        Durability::Full => "full",
    };
    conn.pragma_update(None, "synchronous", synchronous)?;
    tune(&conn)?;
    Ok(conn)
}

/// Settings every connection gets. The query planner stability guarantee
/// matters for speed: without it, SQLite marks a statement for re-preparing
/// whenever a new value is bound to a parameter the planner looked at (the
/// partial indexes make it look at many), so cached statements were
/// compiled again on nearly every use.
fn tune(conn: &Connection) -> Result<()> {
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(())
}

/// A damaged database is refused at start with a clear error, rather than
/// failing requests one by one later.
fn check_integrity(conn: &Connection) -> Result<()> {
    let verdict = conn
        .query_row("PRAGMA quick_check", [], |row| row.get::<_, String>(0))
        .unwrap_or_else(|error| error.to_string());
    if verdict == "ok" {
        Ok(())
    } else {
        Err(StorageError::Corrupt(format!(
            "the database is damaged ({verdict}); restore it from a backup"
        )))
    }
}

fn open_reader(path: &Path) -> Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.pragma_update(None, "busy_timeout", 5000)?;
    tune(&conn)?;
    Ok(conn)
}

/// Checkpoints the WAL into the database file whenever the writer asks,
/// without blocking it (PASSIVE); stops when the writer's connection closes.
fn checkpoint_loop(conn: Connection, requests: mpsc::Receiver<()>) {
    while requests.recv().is_ok() {
        if let Err(error) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!(%error, "WAL checkpoint failed");
        }
    }
}

/// Where the writer announces what a commit did.
struct Announcer {
    bus: Bus,
    webhook_added: Arc<Notify>,
    stats: Arc<WriterCounters>,
}

/// How busy the writer thread has been since the database was opened: the
/// queue's one serial resource, so its busy time bounds throughput.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct WriterStats {
    /// Transactions committed (or failed).
    pub commits: u64,
    /// Writes in them.
    pub writes: u64,
    /// Time spent from taking a batch to replying to its writes.
    pub busy: Duration,
}

#[derive(Default)]
struct WriterCounters {
    commits: AtomicU64,
    writes: AtomicU64,
    busy_nanos: AtomicU64,
}

impl WriterCounters {
    fn record(&self, writes: u64, busy: Duration) {
        self.commits.fetch_add(1, Ordering::Relaxed);
        self.writes.fetch_add(writes, Ordering::Relaxed);
        self.busy_nanos
            .fetch_add(busy.as_nanos() as u64, Ordering::Relaxed);
    }
}

/// The writer thread: group commit of whatever writes are waiting.
fn write_loop(mut conn: Connection, writes: mpsc::Receiver<Box<dyn Write>>, announcer: Announcer) {
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
                announcer.bus.publish(log.events);
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
                committed.events.append(&mut log.events);
                committed.webhook_added |= log.webhook_added;
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

/// What each write of a batch whose commit failed is told: a full disk
/// stays recognisable as such (see [`StorageError::is_full`]).
fn commit_failure(error: &rusqlite::Error) -> StorageError {
    match error.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DiskFull) => {
            StorageError::Sqlite(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
                Some(format!("commit failed: {error}")),
            ))
        }
        _ => StorageError::Corrupt(format!("commit failed: {error}")),
    }
}

#[cfg(test)]
mod tests {
    use std::pin::pin;
    use std::sync::atomic::AtomicUsize;

    use serde_json::json;

    use super::*;
    use crate::events::{EventKind, NewEvent};

    /// A damaged database file is refused at start, saying so.
    #[test]
    fn a_damaged_database_is_refused_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobhost.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE filler (n INTEGER PRIMARY KEY, text TEXT);
                 WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000)
                 INSERT INTO filler SELECT i, printf('%0100d', i) FROM n;",
            )
            .unwrap();
        }
        let mut bytes = std::fs::read(&path).unwrap();
        // Pages 3 to 6 (of 4 KiB): inside the table's b-tree.
        bytes[3 * 4096..7 * 4096].fill(0x5a);
        std::fs::write(&path, bytes).unwrap();
        let error = Storage::open(&path, Durability::Process, Bus::default())
            .err()
            .expect("a damaged database is refused");
        assert!(
            error.to_string().contains("the database is damaged"),
            "{error}"
        );
    }

    /// However many reads are asked for at once, at most [`READERS`] run
    /// at a time. Each read holds its reader until more than that many run
    /// at once (which must not happen) or 200 ms have passed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_of_reads_waits_for_free_readers() {
        let dir = tempfile::tempdir().unwrap();
        let storage =
            Storage::open(&dir.path().join("db"), Durability::Process, Bus::default()).unwrap();
        let (active, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let reads = (0..2 * READERS).map(|_| {
            let (active, most) = (active.clone(), most.clone());
            storage.read(move |_| {
                most.fetch_max(active.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
                let deadline = Instant::now() + Duration::from_millis(200);
                while active.load(Ordering::SeqCst) <= READERS && Instant::now() < deadline {
                    thread::sleep(Duration::from_millis(1));
                }
                active.fetch_sub(1, Ordering::SeqCst);
                Ok(())
            })
        });
        for read in futures::future::join_all(reads).await {
            read.unwrap();
        }
        let most = most.load(Ordering::SeqCst);
        assert!(most <= READERS, "{most} reads at once");
        assert!(
            most > 1,
            "the reads never overlapped, so the test proved nothing"
        );
    }

    fn marker(conn: &Connection, log: &mut EventLog, name: &str) -> Result<()> {
        let event = NewEvent::plugin(EventKind::PluginUploaded, json!({ "write": name }));
        log.emit(conn, event, 0)
    }

    /// A write that fails changes nothing, even when it shares its batch
    /// (and so its transaction) with writes that succeed; those are kept,
    /// and only their events are published.
    #[tokio::test]
    async fn a_failed_write_in_a_batch_leaves_the_others_committed() {
        let dir = tempfile::tempdir().unwrap();
        let bus = Bus::default();
        let mut published = bus.subscribe();
        let storage = Storage::open(&dir.path().join("db"), Durability::Process, bus).unwrap();

        // The first write holds the writer until the other two are queued
        // behind it, so those two are committed in one batch.
        let (open_gate, gate) = mpsc::channel::<()>();
        let mut gate = Some(gate);
        let first = storage.write(move |conn, log| {
            if let Some(gate) = gate.take() {
                gate.recv().unwrap();
            }
            marker(conn, log, "first")
        });
        let failing = storage.write(|conn, log| {
            marker(conn, log, "failing")?;
            Err::<(), _>(StorageError::Corrupt("on purpose".into()))
        });
        let kept = storage.write(|conn, log| marker(conn, log, "kept"));
        let (mut first, mut failing, mut kept) = (pin!(first), pin!(failing), pin!(kept));
        // Polling a write once hands it to the writer thread.
        assert!(futures::poll!(first.as_mut()).is_pending());
        assert!(futures::poll!(failing.as_mut()).is_pending());
        assert!(futures::poll!(kept.as_mut()).is_pending());
        open_gate.send(()).unwrap();

        first.await.unwrap();
        assert!(matches!(failing.await, Err(StorageError::Corrupt(m)) if m == "on purpose"));
        kept.await.unwrap();

        let stored: Vec<String> = storage
            .read(|conn| {
                let mut stmt =
                    conn.prepare("SELECT json_extract(data, '$.write') FROM events ORDER BY seq")?;
                let rows = stmt.query_map([], |row| row.get(0))?;
                Ok(rows.collect::<rusqlite::Result<_>>()?)
            })
            .await
            .unwrap();
        assert_eq!(stored, ["first", "kept"]);
        let mut seen = Vec::new();
        while let Ok(event) = published.try_recv() {
            seen.push(event.data["write"].as_str().unwrap().to_owned());
        }
        assert_eq!(seen, ["first", "kept"]);
        storage.close().await;
    }
}
