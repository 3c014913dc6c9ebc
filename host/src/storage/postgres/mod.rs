//! The shared backend: PostgreSQL through tokio-postgres, for one or many
//! hosts on one database.
//!
//! - A pool of connections (deadpool): every read takes one, every write
//!   runs in one short transaction on one ([`PgStore::write`]); no
//!   transaction waits on anything but the database. The hot writes,
//!   creates and phase completions, are group-committed: those that arrive
//!   together share a transaction ([`batch`]).
//! - The event log: a sequence is not commit order, so events are inserted
//!   without a position, and a stamper (one at a time, under an advisory
//!   lock) gives consecutive positions, transaction by transaction in `xid`
//!   order, to the events of transactions below the snapshot's xmin: no
//!   transaction that could still commit an earlier event is running.
//!   Readers follow positions, so a reader never skips an event that
//!   committed late ([`log`]).
//! - Leases: a claim bumps the job's lease token in the claiming statement
//!   itself, so a worker whose job was claimed again is fenced on every
//!   host.

mod batch;
mod cluster;
mod commands;
mod create;
mod keys;
mod log;
mod plugin_limits;
mod plugins;
mod rows;
mod schedules;
mod schema;
mod store;
mod tls;
mod transitions;
mod webhooks;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod};
use futures::future::BoxFuture;
use tokio::sync::Notify;
use tokio_postgres::Row;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_util::sync::CancellationToken;

pub use schema::VERSION as SCHEMA_VERSION;

use crate::model::NewEvent;
use crate::storage::{Durability, ErrorClass, Result, StorageError};

/// A write's transaction.
pub(super) type Tx<'a> = deadpool_postgres::Transaction<'a>;

/// How a PostgreSQL store is set up.
#[derive(Clone)]
pub struct PgOptions {
    /// `postgres://user@host:port/database?…` (libpq's URL form).
    pub url: String,
    /// Connections this host keeps at most (beside one that listens).
    pub pool_size: usize,
    /// This host's identity among those sharing the database: the same
    /// across restarts (it is kept in the data directory), so that a host
    /// restarting recovers its own jobs at once.
    pub host_id: String,
    /// A name for people (`GET /cluster`, logs).
    pub host_name: String,
    /// How long the host's lease lasts: renewed every quarter of it, and
    /// when it runs out, other hosts recover the host's jobs.
    pub lease: Duration,
    /// Jobs the host runs at once (shown to operators).
    pub slots: u32,
    /// `Process`: a commit returns before PostgreSQL flushed it to disk
    /// (`synchronous_commit = off`): nothing is lost if jobhost crashes,
    /// and the last moments of commits may be if PostgreSQL or its machine
    /// does, as on SQLite at this setting. `Full`: every commit is on disk
    /// first.
    pub durability: Durability,
}

impl PgOptions {
    /// Options for a host of its own, with the defaults.
    pub fn new(url: impl Into<String>) -> Self {
        PgOptions {
            url: url.into(),
            pool_size: DEFAULT_POOL_SIZE,
            host_id: uuid::Uuid::now_v7().to_string(),
            host_name: "jobhost".to_owned(),
            lease: DEFAULT_LEASE,
            slots: 0,
            durability: Durability::Full,
        }
    }

    /// The URL without its password, for logs.
    pub fn redacted_url(&self) -> String {
        match self.url.split_once("://") {
            Some((scheme, rest)) => match rest.split_once('@') {
                Some((user, host)) => {
                    let user = user.split_once(':').map_or(user, |(name, _)| name);
                    format!("{scheme}://{user}:***@{host}")
                }
                None => self.url.clone(),
            },
            None => "(not a URL)".to_owned(),
        }
    }
}

impl std::fmt::Debug for PgOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgOptions")
            .field("url", &self.redacted_url())
            .field("pool_size", &self.pool_size)
            .finish()
    }
}

/// How long a host's lease lasts by default.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(10);
/// The shortest lease: renewals every quarter of it must get through a
/// busy database.
pub const MIN_LEASE: Duration = Duration::from_secs(1);
/// Connections per host by default: the workers' transitions, the
/// dispatcher's claims and HTTP reads share them.
pub const DEFAULT_POOL_SIZE: usize = 16;
/// A transaction left idle this long (a frozen host) is ended by the
/// server: it would hold back the event log's watermark for every host.
const IDLE_IN_TRANSACTION_TIMEOUT: &str = "10s";
/// Transactions of one kind of batched write that run at once (see
/// [`batch`]).
pub const LANES: usize = 2;
/// Most writes in one batched transaction: a worker pool's completions at
/// once.
pub const MAX_BATCH: usize = 64;
/// How long a caller waits for a pooled connection before the call fails
/// as retryable.
const POOL_WAIT: Duration = Duration::from_secs(10);

/// The class of a PostgreSQL error (see [`ErrorClass`]).
fn classify(error: &tokio_postgres::Error) -> ErrorClass {
    if error.is_closed() {
        return ErrorClass::Retryable;
    }
    let Some(code) = error.code() else {
        // No SQLSTATE: the connection or the protocol failed.
        return ErrorClass::Retryable;
    };
    match code {
        c if *c == SqlState::T_R_SERIALIZATION_FAILURE
            || *c == SqlState::T_R_DEADLOCK_DETECTED
            || *c == SqlState::ADMIN_SHUTDOWN
            || *c == SqlState::CANNOT_CONNECT_NOW
            || *c == SqlState::TOO_MANY_CONNECTIONS
            || *c == SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT =>
        {
            ErrorClass::Retryable
        }
        c if *c == SqlState::DISK_FULL
            || *c == SqlState::OUT_OF_MEMORY
            || *c == SqlState::PROGRAM_LIMIT_EXCEEDED =>
        {
            ErrorClass::Full
        }
        c if c.code().starts_with("23") => ErrorClass::Conflict,
        c if *c == SqlState::DATA_CORRUPTED || *c == SqlState::INDEX_CORRUPTED => {
            ErrorClass::Corrupt
        }
        _ => ErrorClass::Other,
    }
}

impl From<tokio_postgres::Error> for StorageError {
    fn from(error: tokio_postgres::Error) -> Self {
        // The server's message, not only "db error".
        let message = match error.as_db_error() {
            Some(db) => format!("database error: {}: {}", db.code().code(), db.message()),
            // With its causes: "error performing TLS handshake" alone does
            // not say that the certificate was for another name.
            None => {
                let mut message = format!("database error: {error}");
                let mut cause = std::error::Error::source(&error);
                while let Some(inner) = cause {
                    message.push_str(&format!(": {inner}"));
                    cause = inner.source();
                }
                message
            }
        };
        StorageError::new(classify(&error), message)
    }
}

impl From<deadpool_postgres::PoolError> for StorageError {
    fn from(error: deadpool_postgres::PoolError) -> Self {
        match error {
            deadpool_postgres::PoolError::Backend(error) => error.into(),
            deadpool_postgres::PoolError::Closed => StorageError::closed(),
            other => StorageError::new(
                ErrorClass::Retryable,
                format!("no database connection: {other}"),
            ),
        }
    }
}

/// How this host's connections are made: the URL's settings with
/// jobhost's own, and TLS as `sslmode` asks.
async fn session(options: &PgOptions) -> Result<(tokio_postgres::Config, tls::Connector)> {
    let target = tls::Target::parse(&options.url)?;
    let connector = match target.mode {
        tls::SslMode::Prefer => tls::prefer(&target).await?,
        mode => target.connector(mode)?,
    };
    let mut config = connector.configure(&target.config);
    let synchronous_commit = match options.durability {
        Durability::Process => "off",
        Durability::Full => "on",
    };
    config.options(format!(
        "-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_TIMEOUT} \
         -c synchronous_commit={synchronous_commit}"
    ));
    config.application_name("jobhost");
    Ok((config, connector))
}

/// One connection outside any pool, its driver on a task of its own.
pub(crate) async fn connect(options: &PgOptions) -> Result<tokio_postgres::Client> {
    let (config, connector) = session(options).await?;
    let client = match connector {
        tls::Connector::Plain => {
            let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
            tokio::spawn(connection);
            client
        }
        tls::Connector::Tls(make, _) => {
            let (client, connection) = config.connect(make).await?;
            tokio::spawn(connection);
            client
        }
    };
    Ok(client)
}

/// Brings the database's schema up to this build's, and nothing else
/// (`jobhost migrate`); refuses a newer one. The schema version.
pub async fn migrate(options: &PgOptions) -> Result<usize> {
    schema::migrate(&mut connect(options).await?).await?;
    Ok(SCHEMA_VERSION)
}

/// A stored value that does not read back.
fn corrupt(what: &str, e: impl std::fmt::Display) -> StorageError {
    StorageError::corrupt(format!("{what}: {e}"))
}

/// Runs a cached statement: its rows.
async fn query(
    db: &impl GenericClient,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<Row>> {
    let statement = db.prepare_cached(sql).await?;
    Ok(db.query(&statement, params).await?)
}

/// Runs a cached statement: its row, if any.
async fn query_opt(
    db: &impl GenericClient,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Option<Row>> {
    let statement = db.prepare_cached(sql).await?;
    Ok(db.query_opt(&statement, params).await?)
}

/// Runs a cached statement that returns exactly one row.
async fn query_one(
    db: &impl GenericClient,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Row> {
    let statement = db.prepare_cached(sql).await?;
    Ok(db.query_one(&statement, params).await?)
}

/// Runs a cached statement: the rows it changed.
async fn execute(
    db: &impl GenericClient,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<u64> {
    let statement = db.prepare_cached(sql).await?;
    Ok(db.execute(&statement, params).await?)
}

/// The host a write runs for, and what the write did that must be
/// announced at or after its commit.
pub(super) struct WriteScope {
    /// The host's id: the owner of what it claims.
    pub(super) host: Arc<str>,
    /// The events it emitted, with their times: appended together before
    /// its commit.
    pub(super) events: Vec<(NewEvent, i64)>,
    /// It added a webhook delivery.
    pub(super) webhook: bool,
    /// It made jobs due (enqueued, retried, released): other hosts are
    /// told, once per transaction however many.
    pub(super) jobs_due: bool,
}

impl WriteScope {
    /// Logs an event, in the write's transaction.
    pub(super) fn emit(&mut self, event: NewEvent, at: i64) {
        self.events.push((event, at));
    }
}

pub struct PgStore {
    pool: Pool,
    host: Arc<str>,
    /// Runs and counts write transactions.
    committer: Arc<batch::Committer>,
    /// Creates, batched with creates (see [`batch`]).
    creates: Arc<batch::Coalescer<create::Creates>>,
    /// Phase completions, batched with completions.
    completions: Arc<batch::Coalescer<transitions::Completions>>,
    signals: Arc<cluster::Signals>,
    log: Arc<log::Log>,
    /// Notified after a commit that added a webhook delivery.
    webhook_added: Notify,
    closed: AtomicBool,
    /// Stops the stamper.
    stop: CancellationToken,
    /// The stamper, the heartbeat and the listener.
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// jobhost's hot tables are updated at every transition and rely on
/// autovacuum (tuned per table by the schema) to reclaim dead rows; a
/// server with autovacuum off bloats them without bound.
async fn warn_if_autovacuum_off(client: &tokio_postgres::Client) -> Result<()> {
    let row = client
        .query_one("SELECT current_setting('autovacuum')", &[])
        .await?;
    let setting: String = row.get(0);
    if setting != "on" {
        tracing::warn!(
            autovacuum = %setting,
            "PostgreSQL's autovacuum is off: the jobs, phases and events tables \
             will bloat; turn it on or schedule VACUUM (see the README, \
             \"Hot tables under churn\")"
        );
    }
    Ok(())
}

impl PgStore {
    /// Connects, migrates the schema (refusing one newer than this build
    /// knows), and starts the event log's stamper.
    pub async fn open(options: &PgOptions) -> Result<Self> {
        let (config, connector) = session(options).await?;
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match &connector {
            tls::Connector::Plain => {
                Manager::from_config(config.clone(), tokio_postgres::NoTls, manager_config)
            }
            tls::Connector::Tls(make, _) => {
                Manager::from_config(config.clone(), make.clone(), manager_config)
            }
        };
        let listen_config = config.clone();
        let pool = Pool::builder(manager)
            .max_size(options.pool_size.max(2))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(POOL_WAIT))
            .build()
            .map_err(|e| StorageError::new(ErrorClass::Other, e.to_string()))?;
        {
            let mut client = pool.get().await?;
            schema::migrate(&mut client).await?;
            warn_if_autovacuum_off(&client).await?;
        }
        let host = cluster::Host::register(&pool, options).await?;
        let log = Arc::new(log::Log::default());
        let signals = Arc::new(cluster::Signals::default());
        let stop = CancellationToken::new();
        let host_id = host.id.clone();
        let tasks = vec![
            tokio::spawn(log::stamp_loop(pool.clone(), log.clone(), stop.clone())),
            tokio::spawn(cluster::listen_loop(
                listen_config,
                connector,
                pool.clone(),
                host_id.clone(),
                log.clone(),
                signals.clone(),
                stop.clone(),
            )),
            tokio::spawn(host.heartbeat_loop(pool.clone(), signals.clone(), stop.clone())),
        ];
        Ok(PgStore {
            committer: Arc::new(batch::Committer::new(pool.clone(), host_id.clone())),
            creates: batch::Coalescer::new(LANES),
            completions: batch::Coalescer::new(LANES),
            pool,
            host: host_id,
            signals,
            log,
            webhook_added: Notify::new(),
            closed: AtomicBool::new(false),
            stop,
            tasks: Mutex::new(tasks),
        })
    }

    async fn client(&self) -> Result<deadpool_postgres::Object> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(StorageError::closed());
        }
        Ok(self.pool.get().await?)
    }

    /// Runs `f` in a transaction of its own and commits it; then announces
    /// what it wrote. A failure rolls the whole transaction back.
    async fn write<R: Send>(
        &self,
        f: impl for<'a> FnOnce(&'a Tx<'a>, &'a mut WriteScope) -> BoxFuture<'a, Result<R>> + Send,
    ) -> Result<R> {
        let began = Instant::now();
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let mut scope = self.committer.scope();
        let result = f(&tx, &mut scope).await?;
        let xid = self.committer.commit(tx, &mut scope, 1, began).await?;
        drop(client);
        self.announce(xid, scope.webhook).await;
        Ok(result)
    }

    /// Runs `write` in the next transaction of `kind`'s batches (see
    /// [`batch`]); then announces what it wrote.
    async fn write_batched<K: batch::Kind>(
        &self,
        kind: &Arc<batch::Coalescer<K>>,
        write: K::Write,
    ) -> Result<K::Outcome> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(StorageError::closed());
        }
        let committed = kind.write(&self.committer, write).await?;
        self.announce(committed.xid, committed.webhook).await;
        Ok(committed.value)
    }

    /// After a commit: wakes the webhook sender if the write added a
    /// delivery, and returns once its events have positions (readable, and
    /// readers woken).
    async fn announce(&self, xid: Option<i64>, webhook: bool) {
        if webhook {
            self.webhook_added.notify_one();
        }
        if let Some(xid) = xid {
            self.log.appended(xid).await;
        }
    }

    async fn shut(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.stop.cancel();
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap());
        for task in tasks {
            let _ = task.await;
        }
        // A host that leaves says so: its lease ends now, not when it
        // would have run out.
        if let Ok(client) = self.pool.get().await {
            let ended = execute(
                &client,
                "UPDATE hosts SET lease_until = jobhost_now() WHERE id = $1",
                &[&&*self.host],
            )
            .await;
            if let Err(error) = ended {
                tracing::warn!(%error, "ending this host's lease failed");
            }
        }
        self.pool.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_never_show_the_password() {
        let options = PgOptions::new("postgres://jobhost:s3cret@db.internal:5432/jobs");
        assert_eq!(
            options.redacted_url(),
            "postgres://jobhost:***@db.internal:5432/jobs"
        );
        assert!(!format!("{options:?}").contains("s3cret"));
    }
}
