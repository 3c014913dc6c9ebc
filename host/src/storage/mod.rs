//! Persistence behind one interface, [`Store`], whose methods are the
//! queue's transitions and queries, never SQL. Its types are the
//! [`model`](crate::model)'s and this module's own: nothing of a backend
//! shows in it. [`sqlite`] is the embedded backend; a PostgreSQL backend
//! implements the same traits and runs the same conformance suite
//! (`host/tests/all/conformance`).
//!
//! The rules every backend follows:
//! - One method is one transaction; no transaction handle crosses the
//!   interface.
//! - Storage records, the queue decides: outcomes (retry or fail, what a
//!   recovery does) come in as arguments, and storage applies them guarded
//!   by the state they expect.
//! - Every worker-side write is guarded by the claim's [`Lease`]; a guard
//!   that does not hold is an outcome ([`Guarded`]), not an error, and
//!   changes nothing.
//! - Every state change appends its typed events to the log in its own
//!   transaction. Readers follow the log by cursor; a commit only wakes
//!   them.
//! - Errors carry a class ([`ErrorClass`]), the same for every backend.

mod concurrency;
mod error;
mod events;
pub mod import;
mod jobs;
mod plugin_limits;
mod plugins;
pub mod postgres;
mod schedules;
pub mod sqlite;
mod webhooks;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

pub use concurrency::ConcurrencyStore;
pub use error::{ErrorClass, Result, StorageError};
pub use events::{AppendWaker, EventFilter, EventStore};
pub use jobs::{
    AfterFailure, CancelOutcome, Claimed, Completion, CreateOutcome, DeleteOutcome, Guarded,
    Interrupted, JobFilter, JobPage, JobStore, Lease, MAX_PAGE, NewJob, NewPhase, PhaseDone,
    PhaseFailed, PhaseStart, Recovered, Recovery, RecoveryPolicy, RecoveryScope, RetryOutcome,
};
pub use plugins::{
    ActivateOutcome, DeleteVersionOutcome, GrantOutcome, NewPluginVersion, PluginQuota,
    PluginRecord, PluginStore, PutOutcome, VersionRecord,
};
pub use postgres::PgOptions;
pub use schedules::{Fire, FireAction, Fired, NewSchedule, ScheduleStore, ScheduleWrite};
pub use sqlite::Durability;
pub use webhooks::{AttemptOutcome, Delivery, WebhookOutbox};

/// A storage backend: all of the queue's storage, plus its lifecycle.
#[async_trait]
pub trait Store:
    JobStore + EventStore + WebhookOutbox + PluginStore + ScheduleStore + ConcurrencyStore
{
    /// Caps the database at `bytes`: a write that would grow it further
    /// fails as [`ErrorClass::Full`].
    async fn limit_size(&self, bytes: u64) -> Result<()>;

    /// Finishes the writes already sent, then closes the database. Later
    /// calls fail with [`ErrorClass::Closed`].
    async fn close(&self);

    /// How busy the backend's writes have been: SQLite's one serial
    /// writer; on PostgreSQL, write transactions, their time summed over
    /// those that ran at once.
    fn writer_stats(&self) -> WriterStats;

    /// Registers `handler` for what other hosts on a shared database ask
    /// of this one. A database one host owns never signals.
    fn on_signal(&self, handler: SignalHandler);

    /// Records a pause (or its end) of the whole platform, and tells every
    /// host sharing the database ([`ClusterSignal::Paused`]). A pause
    /// outlives restarts.
    async fn set_paused(&self, paused: bool) -> Result<()>;

    /// Whether the platform is paused, as recorded.
    async fn paused(&self) -> Result<bool>;

    /// The hosts serving from this database, oldest first, with the jobs
    /// each runs. A database one host owns has one, without its slots.
    async fn hosts(&self) -> Result<Vec<HostRecord>>;

    /// Committed events still without a position in the log, at `now`
    /// (Unix ms). Always none on SQLite, where a commit gives positions; on
    /// PostgreSQL, events wait while an older transaction, anywhere, is
    /// open (see `storage::postgres`), and so do SSE clients.
    async fn log_backlog(&self, now: i64) -> Result<LogBacklog>;
}

/// Events committed but not yet in the log's order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogBacklog {
    pub events: u64,
    /// How long the oldest of them has waited, in ms.
    pub oldest_ms: i64,
}

/// A host serving from the database.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct HostRecord {
    pub id: String,
    pub name: String,
    #[serde(serialize_with = "crate::model::time::as_rfc3339::serialize")]
    #[schema(value_type = String, format = DateTime)]
    pub started_at: i64,
    /// When it last renewed its lease.
    #[serde(serialize_with = "crate::model::time::as_rfc3339::serialize")]
    #[schema(value_type = String, format = DateTime)]
    pub heartbeat_at: i64,
    /// Whether its lease still holds: other hosts recover the jobs of a
    /// host whose lease ran out.
    pub alive: bool,
    /// Jobs it runs at once.
    pub slots: Option<u32>,
    /// The jobs it runs now.
    pub running: Vec<String>,
}

/// What a database shared by several hosts tells this host's queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterSignal {
    /// Jobs may have become due: another host enqueued, retried, released
    /// or recovered some (or this host reconnected and may have missed
    /// that).
    JobsDue,
    /// A user asked another host to cancel this job, which this host runs.
    CancelRequested(String),
    /// A user paused the platform (true) or resumed it (false), on any host.
    Paused(bool),
    /// This host has not renewed its lease for three quarters of it: it
    /// must stop its running phases before other hosts take its jobs over.
    LeaseLost,
    /// This host renewed its lease again after [`ClusterSignal::LeaseLost`].
    LeaseHeld,
}

/// Called on the backend's listening task: it must be quick and must not
/// block.
pub type SignalHandler = Arc<dyn Fn(ClusterSignal) + Send + Sync>;

/// Storage as the rest of jobhost holds it: `Arc<Storage>`.
pub type Storage = dyn Store;

/// Connects to PostgreSQL and migrates its schema.
pub async fn open_postgres(options: &postgres::PgOptions) -> Result<Arc<Storage>> {
    Ok(Arc::new(postgres::PgStore::open(options).await?))
}

/// Opens (creating if needed) the embedded SQLite database at `path`.
pub fn open_sqlite(path: &std::path::Path, durability: Durability) -> Result<Arc<Storage>> {
    Ok(Arc::new(sqlite::SqliteStore::open(path, durability)?))
}

/// How busy the writer has been since the database was opened: the queue's
/// one serial resource on SQLite, so its busy time bounds throughput.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct WriterStats {
    /// Transactions committed (or failed).
    pub commits: u64,
    /// Writes in them.
    pub writes: u64,
    /// Time spent from taking a batch to replying to its writes.
    pub busy: Duration,
}

impl std::ops::Add for WriterStats {
    type Output = WriterStats;

    /// Two writers' work together (hosts on one database).
    fn add(self, other: WriterStats) -> WriterStats {
        WriterStats {
            commits: self.commits + other.commits,
            writes: self.writes + other.writes,
            busy: self.busy + other.busy,
        }
    }
}

impl WriterStats {
    /// What the writer did between `earlier` and these.
    pub fn since(self, earlier: WriterStats) -> WriterStats {
        WriterStats {
            commits: self.commits - earlier.commits,
            writes: self.writes - earlier.writes,
            busy: self.busy - earlier.busy,
        }
    }

    /// Writes per commit (0 without commits).
    pub fn writes_per_commit(&self) -> f64 {
        self.writes as f64 / self.commits.max(1) as f64
    }

    /// Busy µs per commit (0 without commits).
    pub fn micros_per_commit(&self) -> f64 {
        self.busy.as_secs_f64() * 1e6 / self.commits.max(1) as f64
    }
}
