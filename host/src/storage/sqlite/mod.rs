//! The embedded backend: SQLite through rusqlite.
//!
//! - One writer thread owns the only write connection and commits whatever
//!   writes are waiting in one transaction ([`writer`]). A write is
//!   acknowledged only after that commit; then readers of the event log are
//!   woken (they read the log; no payload is handed to them).
//! - Reads use a small pool of read connections on blocking threads; in WAL
//!   mode they never wait for the writer.
//! - No SQLite call runs on an async executor thread.
//! - Leases: one host owns the database, so a lease token is a counter of
//!   claims; it still fences a worker whose job was recovered under it.
//! - Time is the caller's `now`: there is one host, hence one clock.
//!
//! Durability: [`Durability::Process`] (WAL, `synchronous=NORMAL`) survives a
//! crash of the process for everything acknowledged; [`Durability::Full`]
//! (`synchronous=FULL`) also survives power loss.

mod claim;
mod commands;
mod create;
mod events;
mod keys;
mod listing;
mod plugin_limits;
mod plugins;
mod recovery;
mod rows;
mod schedules;
mod schema;
mod store;
mod transitions;
mod webhooks;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;

use rusqlite::{Connection, OpenFlags};
use tokio::sync::{Notify, Semaphore, oneshot};

pub use schema::VERSION as SCHEMA_VERSION;
pub use schema::migrate;
use writer::{Announcer, EventLog, PendingWrite, Write, WriterCounters, write_loop};

use crate::storage::{AppendWaker, ErrorClass, Result, StorageError};

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

/// The class of a SQLite error (see [`ErrorClass`]).
pub(super) fn classify(error: &rusqlite::Error) -> ErrorClass {
    use rusqlite::ErrorCode;
    match error {
        rusqlite::Error::QueryReturnedNoRows => ErrorClass::NotFound,
        error => match error.sqlite_error_code() {
            Some(ErrorCode::DiskFull) => ErrorClass::Full,
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => ErrorClass::Retryable,
            Some(ErrorCode::ConstraintViolation) => ErrorClass::Conflict,
            Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => ErrorClass::Corrupt,
            _ => ErrorClass::Other,
        },
    }
}

impl From<rusqlite::Error> for StorageError {
    fn from(error: rusqlite::Error) -> Self {
        StorageError::new(classify(&error), format!("database error: {error}"))
    }
}

/// A stored value that does not read back.
pub(super) fn corrupt(what: &str, e: impl std::fmt::Display) -> StorageError {
    StorageError::corrupt(format!("{what}: {e}"))
}

pub struct SqliteStore {
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
    /// Called after each commit that appended events.
    wakers: Arc<Mutex<Vec<AppendWaker>>>,
    /// The events of the latest commits.
    recent: Arc<events::RecentEvents>,
    closed: AtomicBool,
    path: PathBuf,
    /// When this store was opened (Unix ms): the host's start.
    opened_at: i64,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`, migrates it, and
    /// starts the writer.
    pub fn open(path: &Path, durability: Durability) -> Result<Self> {
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
        let wakers = Arc::new(Mutex::new(Vec::new()));
        let (sender, receiver) = mpsc::channel();
        let webhook_added = Arc::new(Notify::new());
        let writer_stats = Arc::new(WriterCounters::default());
        let recent = Arc::new(events::RecentEvents::default());
        let announcer = Announcer {
            recent: recent.clone(),
            wakers: wakers.clone(),
            webhook_added: webhook_added.clone(),
            stats: writer_stats.clone(),
        };
        let spawn = |name: &str, run: Box<dyn FnOnce() + Send>| {
            thread::Builder::new()
                .name(name.into())
                .spawn(run)
                .map_err(|e| {
                    StorageError::new(
                        ErrorClass::Other,
                        format!("cannot start the {name} thread: {e}"),
                    )
                })
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
        Ok(SqliteStore {
            writer: Mutex::new(Some(sender)),
            threads: Mutex::new(threads),
            readers: Arc::new(Mutex::new(readers)),
            read_permits: Arc::new(Semaphore::new(READERS)),
            log_read_permits: Semaphore::new(READERS / 2),
            webhook_added,
            writer_stats,
            wakers,
            recent,
            closed: Default::default(),
            path: path.to_path_buf(),
            opened_at: crate::model::time::now_ms(),
        })
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
            .ok_or_else(StorageError::closed)?;
        sender.send(write).map_err(|_| StorageError::closed())?;
        told.await.map_err(|_| StorageError::closed())?
    }

    /// Runs `f` on a read connection, on a blocking thread.
    async fn read<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<R> + Send + 'static,
    ) -> Result<R> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(StorageError::closed());
        }
        let permit = self
            .read_permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| StorageError::closed())?;
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
        .map_err(|_| StorageError::closed())?
    }

    /// Caps the database at `bytes` (rounded down to whole pages).
    async fn set_max_size(&self, bytes: u64) -> Result<()> {
        self.write(move |conn, _| {
            let page: i64 = conn.query_row("PRAGMA page_size", [], |row| row.get(0))?;
            conn.pragma_update(None, "max_page_count", (bytes as i64 / page).max(1))?;
            Ok(())
        })
        .await
    }

    /// Finishes the writes already sent, then closes the database.
    async fn shut(&self) {
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
        Err(StorageError::corrupt(format!(
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

#[cfg(test)]
mod tests {
    use std::pin::pin;
    use std::sync::atomic::AtomicUsize;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::model::event::PluginUploaded;
    use crate::model::{EventBody, NewEvent};
    use crate::storage::ErrorClass;

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
        let error = SqliteStore::open(&path, Durability::Process)
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
        let storage = SqliteStore::open(&dir.path().join("db"), Durability::Process).unwrap();
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
        let event = NewEvent::global(EventBody::PluginUploaded(PluginUploaded {
            plugin: name.into(),
            version: "1".into(),
            content_hash: String::new(),
            size: 0,
        }));
        log.emit(conn, event, 0)
    }

    /// A write that fails changes nothing, even when it shares its batch
    /// (and so its transaction) with writes that succeed; those are kept,
    /// and readers are woken for their events only.
    #[tokio::test]
    async fn a_failed_write_in_a_batch_leaves_the_others_committed() {
        let dir = tempfile::tempdir().unwrap();
        let storage = SqliteStore::open(&dir.path().join("db"), Durability::Process).unwrap();

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
            Err::<(), _>(StorageError::corrupt("on purpose"))
        });
        let kept = storage.write(|conn, log| marker(conn, log, "kept"));
        let (mut first, mut failing, mut kept) = (pin!(first), pin!(failing), pin!(kept));
        // Polling a write once hands it to the writer thread.
        assert!(futures::poll!(first.as_mut()).is_pending());
        assert!(futures::poll!(failing.as_mut()).is_pending());
        assert!(futures::poll!(kept.as_mut()).is_pending());
        open_gate.send(()).unwrap();

        first.await.unwrap();
        let failed = failing.await.unwrap_err();
        assert_eq!(
            (failed.class(), failed.to_string()),
            (ErrorClass::Corrupt, "on purpose".into())
        );
        kept.await.unwrap();

        let stored: Vec<String> = storage
            .read(|conn| {
                let mut stmt =
                    conn.prepare("SELECT json_extract(data, '$.plugin') FROM events ORDER BY seq")?;
                let rows = stmt.query_map([], |row| row.get(0))?;
                Ok(rows.collect::<rusqlite::Result<_>>()?)
            })
            .await
            .unwrap();
        assert_eq!(stored, ["first", "kept"]);
        // Only the committed events reach the log's tail in memory.
        let tail: Vec<String> = (storage.recent.after(0, 10).unwrap().into_iter())
            .map(|event| match event.body {
                EventBody::PluginUploaded(uploaded) => uploaded.plugin,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(tail, ["first", "kept"]);
        storage.shut().await;
    }
}
