//! One fixture for queue tests: a temporary data directory with a real
//! SQLite file, a runtime, the plugin registry and the queue, plus helpers
//! that wait on events (never on sleeps).

use std::sync::Arc;
use std::time::Duration;

use jobhost::events::{Bus, Subscription};
use jobhost::model::json::Json;
use jobhost::model::{Event, EventKind};
use jobhost::model::{Job, JobSpec, PhaseSpec};
use jobhost::plugins::PluginRegistry;
use jobhost::queue::{Queue, QueueConfig};
use jobhost::runtime::{Runtime, RuntimeConfig};
use jobhost::storage::postgres::PgOptions;
use jobhost::storage::{Durability, EventFilter, Recovered, Storage};
use serde_json::{Value, json};
use tokio::sync::broadcast;

/// Longest any test waits for an event before failing.
const EVENT_TIMEOUT: Duration = Duration::from_secs(30);

/// A storage backend the queue's tests run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// Opens the store of the host whose data directory is `dir`: the
    /// same data each time it is opened (a restart).
    pub async fn open(self, dir: &DataDir) -> Arc<Storage> {
        match self {
            Backend::Sqlite => {
                jobhost::storage::open_sqlite(&dir.path().join("jobhost.db"), Durability::Process)
                    .unwrap()
            }
            Backend::Postgres => {
                let database = dir.database.as_ref().expect("a PostgreSQL data directory");
                let options = PgOptions {
                    pool_size: 8,
                    host_id: dir.host_id.clone(),
                    ..PgOptions::new(postgres::url_of(database))
                };
                jobhost::storage::open_postgres(&options).await.unwrap()
            }
        }
    }
}

/// A host's data: a temporary directory (compiled artifacts; the SQLite
/// file) and, on PostgreSQL, a database of its own, dropped with it.
pub struct DataDir {
    dir: tempfile::TempDir,
    database: Option<String>,
    /// Whether dropping this drops the database (another host's data
    /// directory shares it otherwise).
    owns_database: bool,
    /// The host's identity, the same each time it is opened.
    host_id: String,
}

impl DataDir {
    pub async fn new(backend: Backend) -> DataDir {
        let dir = tempfile::tempdir().unwrap();
        let database = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => Some(postgres::create_database().await),
        };
        DataDir {
            dir,
            database,
            owns_database: true,
            host_id: uuid::Uuid::now_v7().to_string(),
        }
    }

    /// The data directory of another host on the same database (on
    /// PostgreSQL; another database altogether on SQLite).
    pub async fn beside(&self, backend: Backend) -> DataDir {
        match &self.database {
            Some(database) => DataDir {
                dir: tempfile::tempdir().unwrap(),
                database: Some(database.clone()),
                owns_database: false,
                host_id: uuid::Uuid::now_v7().to_string(),
            },
            None => DataDir::new(backend).await,
        }
    }

    pub fn path(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// The PostgreSQL database's name (none on SQLite).
    pub fn database(&self) -> Option<&str> {
        self.database.as_deref()
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        if let Some(database) = self.database.take()
            && self.owns_database
        {
            postgres::drop_database(database);
        }
    }
}

/// Test databases on the PostgreSQL that `JOBHOST_TEST_DATABASE_URL`
/// names (by default this project's machines' own, on 127.0.0.1:5432).
pub mod postgres {
    use std::sync::OnceLock;

    const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

    /// The server's URL, with the database that tests connect to first.
    fn admin_url() -> String {
        std::env::var("JOBHOST_TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned())
    }

    /// The URL of `database` on the same server.
    pub fn url_of(database: &str) -> String {
        let admin = admin_url();
        let (server, _) = admin.rsplit_once('/').expect("a URL with a database");
        format!("{server}/{database}")
    }

    async fn connect() -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, connection) =
            tokio_postgres::connect(&admin_url(), tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        Ok(client)
    }

    /// Whether PostgreSQL tests run here. Without a server they are
    /// skipped, saying so, unless `JOBHOST_REQUIRE_POSTGRES=1` (CI), where
    /// a missing server fails them.
    pub async fn available() -> bool {
        static AVAILABLE: OnceLock<Result<(), String>> = OnceLock::new();
        if AVAILABLE.get().is_none() {
            let probe = connect().await.map(drop).map_err(|e| e.to_string());
            let _ = AVAILABLE.set(probe);
        }
        match AVAILABLE.get().expect("just set") {
            Ok(()) => true,
            Err(error) if std::env::var("JOBHOST_REQUIRE_POSTGRES").as_deref() == Ok("1") => {
                panic!(
                    "JOBHOST_REQUIRE_POSTGRES=1, but PostgreSQL at {} is unreachable: {error}",
                    admin_url()
                )
            }
            Err(error) => {
                eprintln!(
                    "SKIPPED: PostgreSQL at {} is unreachable ({error}). \
                     Set JOBHOST_TEST_DATABASE_URL=postgres://user@host:port/database to run the PostgreSQL tests.",
                    admin_url()
                );
                false
            }
        }
    }

    /// Creates an empty database for one test: its name.
    pub async fn create_database() -> String {
        let name = format!("jobhost_test_{}", uuid::Uuid::now_v7().simple());
        connect()
            .await
            .unwrap()
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        name
    }

    /// Drops a test's database, closing what still connects to it. Runs
    /// on a thread of its own: it is called from `Drop`, maybe inside a
    /// runtime that is shutting down.
    pub fn drop_database(name: String) {
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let client = connect().await?;
                client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
            })
        })
        .join();
        if let Ok(Err(error)) = dropped {
            eprintln!("could not drop a test database: {error}");
        }
    }
}

/// Instantiates each listed test (an `async fn(Backend)`) once per backend,
/// as `<module>::<backend>::<test>`. PostgreSQL's are skipped, saying so,
/// where no server runs (see [`postgres::available`]).
macro_rules! on_each_backend {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(crate::fixture::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    if crate::fixture::postgres::available().await {
                        super::$test(crate::fixture::Backend::Postgres).await
                    }
                }
            )*
        }
    };
}
pub(crate) use on_each_backend;

pub struct Host {
    pub backend: Backend,
    pub dir: Arc<DataDir>,
    pub storage: Arc<Storage>,
    pub plugins: Arc<PluginRegistry>,
    pub queue: Queue,
    pub recovered: Vec<Recovered>,
    events: Subscription,
}

pub fn config(concurrency: usize) -> QueueConfig {
    QueueConfig {
        concurrency,
        ..QueueConfig::default()
    }
}

impl Host {
    /// A host on SQLite.
    pub async fn start(config: QueueConfig) -> Host {
        Host::start_on(Backend::Sqlite, config).await
    }

    pub async fn start_on(backend: Backend, config: QueueConfig) -> Host {
        Host::open_on(backend, Arc::new(DataDir::new(backend).await), config).await
    }

    /// Opens the host on an existing data directory, as a restart would.
    pub async fn open_on(backend: Backend, dir: Arc<DataDir>, config: QueueConfig) -> Host {
        let bus = Bus::default();
        let events = bus.subscribe();
        let storage = backend.open(&dir).await;
        let runtime_config = RuntimeConfig {
            max_concurrent_runs: config.concurrency as u32 + 1,
            memory_limit: 64 << 20,
            cache_dir: Some(dir.path().join("compiled")),
            ..RuntimeConfig::default()
        };
        let runtime = Arc::new(Runtime::new(runtime_config).unwrap());
        let plugins = Arc::new(PluginRegistry::new(runtime, storage.clone()));
        let (queue, recovered) = Queue::start(storage.clone(), plugins.clone(), bus, config)
            .await
            .unwrap();
        Host {
            backend,
            dir,
            storage,
            plugins,
            queue,
            recovered,
            events,
        }
    }

    /// The host's store opened again, beside the queue or after it stopped.
    pub async fn reopen_storage(&self) -> Arc<Storage> {
        self.backend.open(&self.dir).await
    }

    /// Uploads a component from `plugins/` under `name`@`version`.
    pub async fn upload(&self, name: &str, version: &str, component: &str) {
        self.plugins
            .upload(name, version, plugin_artifacts::bytes(component))
            .await
            .unwrap();
    }

    pub async fn enqueue(&self, spec: JobSpec) -> Job {
        self.queue.enqueue(spec).await.unwrap().job
    }

    /// Waits for the next event of `kind` about `job_id` on the bus.
    pub async fn wait_for(&mut self, job_id: &str, kind: EventKind) -> Event {
        let wait = async {
            loop {
                match self.events.recv().await {
                    Ok(event)
                        if event.kind() == kind && event.job_id.as_deref() == Some(job_id) =>
                    {
                        return Event::clone(&event);
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => panic!("event bus closed"),
                }
            }
        };
        tokio::time::timeout(EVENT_TIMEOUT, wait)
            .await
            .unwrap_or_else(|_| panic!("no {kind} for job {job_id} within {EVENT_TIMEOUT:?}"))
    }

    /// Waits until the job has ended, returning its final state.
    pub async fn wait_until_finished(&mut self, job_id: &str) -> Job {
        loop {
            let job = self.queue.job(job_id).await.unwrap();
            if job.status.is_terminal() {
                return job;
            }
            let wait = async {
                loop {
                    match self.events.recv().await {
                        Ok(e)
                            if e.kind().is_job_terminal()
                                && e.job_id.as_deref() == Some(job_id) =>
                        {
                            return;
                        }
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(broadcast::error::RecvError::Closed) => panic!("event bus closed"),
                    }
                }
            };
            tokio::time::timeout(EVENT_TIMEOUT, wait)
                .await
                .unwrap_or_else(|_| panic!("job {job_id} did not finish within {EVENT_TIMEOUT:?}"));
        }
    }

    /// Every logged event about `job_id`, oldest first.
    pub async fn job_events(&self, job_id: &str) -> Vec<Event> {
        let filter = EventFilter {
            job_id: Some(job_id.to_owned()),
            kinds: vec![],
        };
        self.storage.events_after(0, filter, 10_000).await.unwrap()
    }

    /// Waits until no worker of this queue holds a job.
    pub async fn wait_idle(&self) {
        tokio::time::timeout(EVENT_TIMEOUT, self.queue.wait_idle())
            .await
            .expect("workers did not go idle");
    }
}

pub fn kinds(events: &[Event]) -> Vec<&'static str> {
    events.iter().map(|e| e.kind().name()).collect()
}

pub fn phase(name: &str, plugin: &str, config: Value) -> PhaseSpec {
    PhaseSpec {
        name: name.into(),
        plugin: plugin.into(),
        config: Some(config),
        ..PhaseSpec::default()
    }
}

pub fn job(phases: Vec<PhaseSpec>, payload: Value) -> JobSpec {
    JobSpec {
        phases,
        payload: Json::from_value(&payload),
        ..JobSpec::default()
    }
}

/// A job of `n` echo phases named p0, p1, ….
pub fn echo_job(n: usize) -> JobSpec {
    job(
        (0..n)
            .map(|i| phase(&format!("p{i}"), "echo", json!({})))
            .collect(),
        json!({"n": n}),
    )
}
