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
                let url = dir.database_url().expect("a PostgreSQL data directory");
                let options = PgOptions {
                    pool_size: 8,
                    host_id: dir.host_id.clone(),
                    lease: dir.lease,
                    ..PgOptions::new(url)
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
    /// Shared by the data directories of hosts on one database.
    database: Option<Arc<postgres::TestDatabase>>,
    /// The host's identity, the same each time it is opened.
    host_id: String,
    /// The host's lease, on PostgreSQL.
    pub lease: std::time::Duration,
}

impl DataDir {
    pub async fn new(backend: Backend) -> DataDir {
        let dir = tempfile::tempdir().unwrap();
        let database = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => Some(Arc::new(postgres::TestDatabase::create().await)),
        };
        DataDir {
            dir,
            database,
            host_id: uuid::Uuid::now_v7().to_string(),
            lease: jobhost::storage::postgres::DEFAULT_LEASE,
        }
    }

    /// The data directory of another host on the same database (on
    /// PostgreSQL; another database altogether on SQLite).
    pub async fn beside(&self, backend: Backend) -> DataDir {
        match &self.database {
            Some(database) => DataDir {
                dir: tempfile::tempdir().unwrap(),
                database: Some(database.clone()),
                host_id: uuid::Uuid::now_v7().to_string(),
                lease: self.lease,
            },
            None => DataDir::new(backend).await,
        }
    }

    pub fn path(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// The PostgreSQL database's URL (none on SQLite).
    pub fn database_url(&self) -> Option<String> {
        self.database.as_ref().map(|database| database.url())
    }
}

#[path = "../../../tests/support/test_database.rs"]
pub mod postgres;

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

    /// Makes storage refuse the writes of large outputs, as a full disk
    /// would. SQLite: not a page more than the database has now (which
    /// may refuse small writes too). PostgreSQL, whose size is not
    /// jobhost's to cap: a constraint on phase outputs of 64 KiB or more.
    pub async fn refuse_large_writes(&self) {
        match self.backend {
            Backend::Sqlite => self.storage.limit_size(1).await.unwrap(),
            Backend::Postgres => {
                self.postgres(
                    "ALTER TABLE phases ADD CONSTRAINT test_refuses_large_outputs
                     CHECK (octet_length(output) < 65536) NOT VALID",
                )
                .await
            }
        }
    }

    /// Undoes [`Host::refuse_large_writes`].
    pub async fn accept_writes(&self) {
        match self.backend {
            Backend::Sqlite => self.storage.limit_size(1 << 30).await.unwrap(),
            Backend::Postgres => {
                self.postgres(
                    "ALTER TABLE phases DROP CONSTRAINT IF EXISTS test_refuses_large_outputs",
                )
                .await
            }
        }
    }

    /// Runs `sql` on the host's PostgreSQL database, as its operator.
    async fn postgres(&self, sql: &str) {
        let url = self.dir.database_url().expect("a PostgreSQL host");
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        client.batch_execute(sql).await.unwrap();
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
