//! Persistence: SQLite through rusqlite, behind the narrow API of
//! [`Storage`], whose methods are the queue's transitions and queries, never
//! SQL. A PostgreSQL backend would implement the same methods.
//!
//! - One writer thread owns the only write connection. It takes whatever
//!   writes are waiting (up to [`MAX_BATCH`]) and commits them in one
//!   transaction, each in its own savepoint (group commit): a write is
//!   acknowledged only after that commit, and its events are published on the
//!   bus only then.
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
use std::sync::{Arc, Mutex, mpsc};
use std::thread;

use rusqlite::{Connection, OpenFlags};
use tokio::sync::oneshot;

use crate::events::{Bus, Event, NewEvent};

pub use events::EventFilter;
pub use jobs::{
    AfterFailure, CancelOutcome, CreateOutcome, DeleteOutcome, JobFilter, JobPage, NewJob,
    NewPhase, Recovered, RetryOutcome,
};
pub use plugins::{
    ActivateOutcome, DeleteVersionOutcome, NewPluginVersion, PluginRecord, PutOutcome,
    VersionRecord,
};
pub use schema::VERSION as SCHEMA_VERSION;
pub use webhooks::{AttemptOutcome, Delivery, WebhookStatus};

/// Most writes committed in one transaction.
pub const MAX_BATCH: usize = 256;
/// Read connections kept open.
const READERS: usize = 4;

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

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// A write: runs inside the batch's transaction (in its own savepoint) and
/// returns whether to keep its changes, and what to tell the caller once the
/// batch's commit has succeeded or failed.
type Write = Box<dyn FnOnce(&Connection, &mut EventLog) -> (bool, Reply) + Send>;
type Reply = Box<dyn FnOnce(Result<()>) + Send>;

/// Events written by one write, with their sequence numbers.
#[derive(Default)]
pub(crate) struct EventLog {
    events: Vec<Event>,
}

impl EventLog {
    fn emit(&mut self, conn: &Connection, event: NewEvent, at: i64) -> Result<()> {
        self.events.push(events::insert(conn, event, at)?);
        Ok(())
    }
}

pub struct Storage {
    writer: Mutex<Option<mpsc::Sender<Write>>>,
    writer_thread: Mutex<Option<thread::JoinHandle<()>>>,
    readers: Arc<Mutex<Vec<Connection>>>,
    closed: std::sync::atomic::AtomicBool,
    path: PathBuf,
    bus: Bus,
}

impl Storage {
    /// Opens (creating if needed) the database at `path`, migrates it, and
    /// starts the writer. Committed events are published on `bus`.
    pub fn open(path: &Path, durability: Durability, bus: Bus) -> Result<Self> {
        let mut conn = open_connection(path, durability)?;
        schema::migrate(&mut conn)?;
        let (sender, receiver) = mpsc::channel();
        let writer_bus = bus.clone();
        let writer_thread = thread::Builder::new()
            .name("jobhost-storage".into())
            .spawn(move || write_loop(conn, receiver, writer_bus))
            .map_err(|e| StorageError::Corrupt(format!("cannot start the writer thread: {e}")))?;
        Ok(Storage {
            writer: Mutex::new(Some(sender)),
            writer_thread: Mutex::new(Some(writer_thread)),
            readers: Arc::default(),
            closed: Default::default(),
            path: path.to_path_buf(),
            bus,
        })
    }

    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// Runs `f` in the writer's next transaction; resolves after the commit.
    async fn write<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection, &mut EventLog) -> Result<R> + Send + 'static,
    ) -> Result<R> {
        let (tell, told) = oneshot::channel();
        let write: Write = Box::new(move |conn, log| {
            let result = f(conn, log);
            let keep = result.is_ok();
            let reply: Reply = Box::new(move |committed| {
                let _ = tell.send(committed.and(result));
            });
            (keep, reply)
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
        if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(StorageError::Closed);
        }
        let (readers, path) = (self.readers.clone(), self.path.clone());
        tokio::task::spawn_blocking(move || {
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

    /// Finishes the writes already sent, then closes the database. Later
    /// calls fail with [`StorageError::Closed`].
    pub async fn close(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        drop(self.writer.lock().unwrap().take());
        let thread = self.writer_thread.lock().unwrap().take();
        if let Some(thread) = thread {
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
    let synchronous = match durability {
        Durability::Process => "normal",
        Durability::Full => "full",
    };
    conn.pragma_update(None, "synchronous", synchronous)?;
    Ok(conn)
}

fn open_reader(path: &Path) -> Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.pragma_update(None, "busy_timeout", 5000)?;
    Ok(conn)
}

/// The writer thread: group commit of whatever writes are waiting.
fn write_loop(mut conn: Connection, writes: mpsc::Receiver<Write>, bus: Bus) {
    while let Ok(first) = writes.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match writes.try_recv() {
                Ok(write) => batch.push(write),
                Err(_) => break,
            }
        }
        let mut replies = Vec::with_capacity(batch.len());
        let mut committed_events = Vec::new();
        let outcome = commit_batch(&mut conn, batch, &mut replies, &mut committed_events);
        match outcome {
            Ok(()) => {
                bus.publish(committed_events);
                for reply in replies {
                    reply(Ok(()));
                }
            }
            Err(error) => {
                tracing::error!(%error, "storage commit failed");
                let message = error.to_string();
                for reply in replies {
                    reply(Err(StorageError::Corrupt(format!(
                        "commit failed: {message}"
                    ))));
                }
            }
        }
    }
}

fn commit_batch(
    conn: &mut Connection,
    batch: Vec<Write>,
    replies: &mut Vec<Reply>,
    committed_events: &mut Vec<Event>,
) -> rusqlite::Result<()> {
    let mut tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    for write in batch {
        let savepoint = tx.savepoint()?;
        let mut log = EventLog::default();
        let (keep, reply) = write(&savepoint, &mut log);
        if keep {
            savepoint.commit()?;
            committed_events.append(&mut log.events);
        } else {
            drop(savepoint); // rolls back
        }
        replies.push(reply);
    }
    tx.commit()
}
