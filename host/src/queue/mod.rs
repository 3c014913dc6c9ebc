//! The durable job queue: enqueue, a dispatcher that claims due jobs up to
//! the concurrency limit (waking on a timer at the earliest `run_at`, never
//! polling), workers that run each job's phases in order, retries with
//! backoff, cancellation, recovery after a crash, retention, pause/resume
//! and graceful shutdown.
//!
//! The worker decides each outcome; storage only records it, guarded by the
//! state it expects (see `storage::jobs`).

mod concurrency;
mod dispatch;
mod enqueue;
mod schedules;
mod worker;

pub use concurrency::KeysState;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{Mutex, Notify, broadcast};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::events::{Bus, KindSet, Topic};
use crate::metrics::Metrics;
use crate::model::time::now_ms;
use crate::model::{Event, EventBody, EventKind, Job, JobSpec, JobStatus};
use crate::plugins::PluginRegistry;
use crate::storage::{
    AfterFailure, CancelOutcome, Claimed, ClusterSignal, CreateOutcome, DeleteOutcome, EventFilter,
    HostRecord, Interrupted, JobFilter, JobPage, LogBacklog, Recovered, Recovery, RecoveryPolicy,
    RecoveryScope, RetryOutcome, SignalHandler, Storage, StorageError,
};
use crate::webhooks::{Deliverer, WebhookConfig};

#[derive(Clone)]
pub struct QueueConfig {
    /// Jobs run at once.
    pub concurrency: usize,
    pub default_phase_timeout: Duration,
    /// Upper bound on any phase's `timeout_ms`.
    pub max_phase_timeout: Duration,
    pub default_max_attempts: u32,
    pub max_phases: usize,
    pub max_payload_bytes: usize,
    /// Terminal jobs older than this are deleted; `None` keeps them.
    pub retention: Option<Duration>,
    /// How often the retention sweep runs.
    pub retention_interval: Duration,
    /// Webhook delivery; `None` leaves deliveries in the outbox.
    pub webhooks: Option<WebhookConfig>,
    /// Most jobs waiting (`pending`) at once; submits past it answer 429.
    pub max_pending_jobs: u64,
    /// Most schedules stored at once.
    pub max_schedules: u64,
    /// The shortest time a schedule may leave between two ticks.
    pub schedule_min_interval: Duration,
    pub metrics: Arc<Metrics>,
    /// The queue's clock, Unix ms: tests inject their own.
    pub clock: Clock,
    /// Runs between two phases of a job, when the first is recorded and the
    /// next not yet started (and keeps the worker from starting the next in
    /// the same write). A seam for tests that act at that boundary.
    pub between_phases: Option<BetweenPhases>,
}

/// A source of the current time, Unix ms.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// See [`QueueConfig::between_phases`]: called with the job's id, the
/// index of the next phase, and the job's cancellation token.
pub type BetweenPhases = Arc<
    dyn Fn(&str, usize, &CancellationToken) -> futures::future::BoxFuture<'static, ()>
        + Send
        + Sync,
>;

impl std::fmt::Debug for QueueConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueConfig")
            .field("concurrency", &self.concurrency)
            .field("default_phase_timeout", &self.default_phase_timeout)
            .field("max_phase_timeout", &self.max_phase_timeout)
            .field("default_max_attempts", &self.default_max_attempts)
            .field("max_phases", &self.max_phases)
            .field("max_payload_bytes", &self.max_payload_bytes)
            .field("retention", &self.retention)
            .field("webhooks", &self.webhooks)
            .field("max_pending_jobs", &self.max_pending_jobs)
            .field("max_schedules", &self.max_schedules)
            .field("schedule_min_interval", &self.schedule_min_interval)
            .finish_non_exhaustive()
    }
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            concurrency: 8,
            default_phase_timeout: Duration::from_secs(60),
            max_phase_timeout: Duration::from_secs(3600),
            default_max_attempts: 3,
            max_phases: 32,
            max_payload_bytes: 1 << 20,
            retention: Some(Duration::from_secs(7 * 24 * 3600)),
            retention_interval: Duration::from_secs(60),
            webhooks: None,
            max_pending_jobs: 100_000,
            max_schedules: 1000,
            schedule_min_interval: Duration::from_secs(1),
            metrics: Arc::default(),
            clock: Arc::new(now_ms),
            between_phases: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("invalid job: {0}")]
    InvalidJob(String),
    #[error("unknown plugin: {0}")]
    UnknownPlugin(String),
    #[error("no job with id `{0}`")]
    NotFound(String),
    #[error("job is {}: {reason}", .status.as_str())]
    Conflict {
        status: JobStatus,
        reason: &'static str,
    },
    #[error("the queue is shutting down")]
    ShuttingDown,
    /// The webhook client could not be set up (at start).
    #[error("cannot start webhook delivery: {0}")]
    Webhooks(String),
    #[error("{0} jobs are waiting, the server's limit: try again when some have run")]
    TooManyPending(u64),
    #[error("invalid schedule: {0}")]
    InvalidSchedule(String),
    #[error("invalid concurrency limits: {0}")]
    InvalidLimits(String),
    #[error("no schedule named `{0}`")]
    ScheduleNotFound(String),
    #[error("a schedule named `{0}` exists")]
    ScheduleExists(String),
    #[error("{0} schedules exist, the server's limit")]
    TooManySchedules(u64),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// The result of an enqueue: the job, and whether this call created it
/// (false when an idempotency key matched an earlier job).
#[derive(Debug, Clone)]
pub struct Enqueued {
    pub job: Job,
    pub created: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Cancelled {
    /// The job was pending: it is cancelled now.
    Done,
    /// The job is running and its phase did not stop within the wait: it
    /// will be cancelled when it has stopped (`job:cancelled` follows).
    Stopping,
}

/// How a shutdown went.
#[derive(Debug, Clone, PartialEq)]
pub struct ShutdownReport {
    /// Jobs whose phases were still running at the timeout and were stopped by force.
    pub forced: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("shutdown timed out: {} job(s) were stopped by force", .report.forced.len())]
pub struct ShutdownTimedOut {
    pub report: ShutdownReport,
}

pub(crate) struct Shared {
    storage: Arc<Storage>,
    plugins: Arc<PluginRegistry>,
    /// Where committed events (read back from the log) and live progress
    /// reports reach this host's subscribers.
    bus: Bus,
    config: QueueConfig,
    /// Wakes the dispatcher: a job was enqueued, a worker finished, resume.
    wake: Notify,
    /// Notified (all waiters) whenever a worker finishes.
    worker_done: Notify,
    /// Cancellation token of each job this process is running. Claiming and
    /// cancelling both hold this lock, so a cancel never misses a claim.
    running: Mutex<HashMap<String, CancellationToken>>,
    paused: AtomicBool,
    /// Stop claiming; workers hand jobs back between phases.
    draining: CancellationToken,
    /// Parent of every job's token: cancelled to stop running phases by force.
    force: CancellationToken,
    /// Jobs whose phase this host stopped because it could not renew its
    /// lease on a shared database: their stop is an interruption (retried),
    /// not a user's cancel.
    fenced: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Set while this host's lease is in doubt: it claims nothing.
    lease_lost: AtomicBool,
    workers: TaskTracker,
    /// Pending jobs as last counted, plus those enqueued since.
    pending: PendingCount,
}

/// How many jobs wait, for the pending-jobs quota: counted in storage at
/// most once per [`PENDING_RECOUNT`], and raised by each enqueue between
/// counts, so that it errs towards refusing (claims lower it only at the
/// next count).
#[derive(Default)]
struct PendingCount {
    estimate: std::sync::atomic::AtomicU64,
    counted_at: std::sync::Mutex<Option<std::time::Instant>>,
}

const PENDING_RECOUNT: Duration = Duration::from_secs(1);

impl Shared {
    fn now(&self) -> i64 {
        (self.config.clock)()
    }

    fn is_fenced(&self, job_id: &str) -> bool {
        self.fenced.lock().expect("never poisoned").contains(job_id)
    }

    /// Refuses a new job while the pending-jobs quota is used up.
    async fn check_pending_quota(&self) -> Result<(), QueueError> {
        let shared = self;
        // One caller recounts; those arriving meanwhile use the estimate
        // rather than all asking storage at once.
        let stale = {
            let mut counted_at = shared.pending.counted_at.lock().unwrap();
            let stale = counted_at.is_none_or(|at| at.elapsed() >= PENDING_RECOUNT);
            if stale {
                *counted_at = Some(std::time::Instant::now());
            }
            stale
        };
        if stale {
            let counted = shared.storage.pending_count().await?;
            shared.pending.estimate.store(counted, Ordering::Relaxed);
        }
        let waiting = shared.pending.estimate.fetch_add(1, Ordering::Relaxed);
        if waiting >= shared.config.max_pending_jobs {
            shared.pending.estimate.fetch_sub(1, Ordering::Relaxed);
            return Err(QueueError::TooManyPending(shared.config.max_pending_jobs));
        }
        Ok(())
    }

    /// Stops the runs of these jobs' tokens by force, at once (see
    /// `Runtime::interrupt_guests`), rather than at the next epoch tick.
    fn stop_runs<'a>(&self, tokens: impl IntoIterator<Item = &'a CancellationToken>) {
        for token in tokens {
            token.cancel();
        }
        self.plugins.runtime().interrupt_guests();
    }

    /// Whether the queue takes new jobs now (not paused, not draining, its
    /// lease not in doubt).
    fn may_claim(&self) -> bool {
        !self.paused.load(Ordering::SeqCst)
            && !self.draining.is_cancelled()
            && !self.lease_lost.load(Ordering::SeqCst)
    }
}

/// What the queue does with a running job whose worker is gone (`cause`):
/// requeued at once while attempts remain, failed otherwise, with an error
/// that names the cause and the interrupted phase.
/// Compiles each plugin version as it is uploaded, on whichever host: the
/// first job of a new version (an 18 MB Python component, say) does not
/// wait for it on every host. Where the upload happened, it is loaded
/// already. Keeps each plugin's resources current on every host too.
async fn follow_plugins(shared: Arc<Shared>) {
    // Batches with plugin changes only: job events do not wake this task.
    let topic = Topic::Kinds(KindSet::of(&[
        EventKind::PluginUploaded,
        EventKind::PluginResourcesChanged,
    ]));
    let mut batches = shared.bus.subscribe_batches(topic);
    loop {
        let batch = tokio::select! {
            batch = batches.recv() => batch,
            () = shared.draining.cancelled() => return,
        };
        let batch = match batch {
            Ok(batch) => batch,
            Err(broadcast::error::RecvError::Lagged(_)) => continue,
            Err(broadcast::error::RecvError::Closed) => return,
        };
        for event in batch.events() {
            match &event.body {
                EventBody::PluginUploaded(uploaded) => {
                    // A first upload may be a new plugin of a deleted one's name.
                    let plugins = &shared.plugins;
                    let loaded = plugins.load(&uploaded.plugin, &uploaded.version).await;
                    if let Err(error) = loaded {
                        tracing::warn!(plugin = %uploaded.plugin, version = %uploaded.version, %error, "compiling an uploaded plugin failed");
                    }
                    if let Err(error) = plugins.refresh_resources(&uploaded.plugin).await {
                        tracing::warn!(plugin = %uploaded.plugin, %error, "reading a plugin's resources failed");
                    }
                }
                EventBody::PluginResourcesChanged(changed) => {
                    shared
                        .plugins
                        .resources_changed(&changed.plugin, changed.resources);
                    // A plugin's new limits may have room for jobs that
                    // wait for it.
                    shared.wake.notify_one();
                }
                _ => {}
            }
        }
    }
}

/// What the queue does with what other hosts ask of it. Holds the queue
/// weakly: storage keeps the handler, and the queue keeps storage.
fn signal_handler(shared: &Arc<Shared>) -> SignalHandler {
    let shared = Arc::downgrade(shared);
    Arc::new(move |signal| {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        match signal {
            ClusterSignal::JobsDue => shared.wake.notify_one(),
            ClusterSignal::Paused(paused) => {
                shared.paused.store(paused, Ordering::SeqCst);
                shared.wake.notify_one();
            }
            // Before the lease runs out, this host stops its phases (other
            // hosts will take the jobs over) and claims nothing more.
            ClusterSignal::LeaseLost => {
                shared.lease_lost.store(true, Ordering::SeqCst);
                tokio::spawn(async move {
                    let running = shared.running.lock().await;
                    let mut fenced = shared.fenced.lock().expect("never poisoned");
                    fenced.extend(running.keys().cloned());
                    shared.stop_runs(running.values());
                    tracing::error!(
                        jobs = running.len(),
                        "this host could not renew its lease: its running phases were stopped"
                    );
                });
            }
            ClusterSignal::LeaseHeld => {
                shared.lease_lost.store(false, Ordering::SeqCst);
                shared.wake.notify_one();
            }
            ClusterSignal::CancelRequested(id) => {
                tokio::spawn(async move {
                    if let Some(token) = shared.running.lock().await.get(&id) {
                        shared.stop_runs([token]);
                    }
                });
            }
        }
    })
}

pub(super) fn recovery_policy(cause: &'static str, now: i64) -> RecoveryPolicy {
    Arc::new(move |job: &Interrupted| {
        let attempt = job.attempt;
        let error = match &job.phase {
            Some((_, name)) => {
                format!("interrupted: {cause} during phase `{name}` (attempt {attempt})")
            }
            None => format!("interrupted: {cause} between phases (attempt {attempt})"),
        };
        let after = if attempt < job.max_attempts {
            AfterFailure::Retry { run_at: now }
        } else {
            AfterFailure::Fail
        };
        Recovery { error, after }
    })
}

/// How long a cancel of a running job waits for its worker to stop it
/// (by force, at once) before answering that it is stopping.
const CANCEL_WAIT: Duration = Duration::from_secs(5);

pub struct Queue {
    shared: Arc<Shared>,
    background: std::sync::Mutex<Vec<JoinHandle<()>>>,
    /// The webhook deliverer and how to stop it.
    deliverer: std::sync::Mutex<Option<(JoinHandle<()>, CancellationToken)>>,
    /// The fan-out of the event log to the bus, and how to stop it.
    tailer: std::sync::Mutex<Option<(JoinHandle<()>, CancellationToken)>>,
}

impl Queue {
    /// Recovers jobs a crash left running, then starts the dispatcher, the
    /// retention sweep and the fan-out of the event log to `bus` (from the
    /// log's end as it was before recovery, so that subscribers see what
    /// recovery did). Returns the queue and what recovery did.
    pub async fn start(
        storage: Arc<Storage>,
        plugins: Arc<PluginRegistry>,
        bus: Bus,
        config: QueueConfig,
    ) -> Result<(Queue, Vec<Recovered>), QueueError> {
        let log_end = storage.last_event_seq().await?;
        let paused = storage.paused().await?;
        let now = (config.clock)();
        let policy = recovery_policy("the host stopped", now);
        let recovered = storage
            .recover_jobs(RecoveryScope::AtStart, policy, now)
            .await?;
        for job in &recovered {
            tracing::warn!(job = %job.job_id, phase = ?job.phase, attempt = job.attempt, requeued = job.requeued, "recovered a job interrupted by a crash");
        }
        let stop_tailing = CancellationToken::new();
        let tailer = crate::events::fan_out(&storage, bus.clone(), log_end, stop_tailing.clone());
        let shared = Arc::new(Shared {
            storage,
            plugins,
            bus,
            config,
            wake: Notify::new(),
            worker_done: Notify::new(),
            running: Mutex::default(),
            paused: AtomicBool::new(paused),
            draining: CancellationToken::new(),
            force: CancellationToken::new(),
            fenced: Default::default(),
            lease_lost: AtomicBool::new(false),
            workers: TaskTracker::new(),
            pending: PendingCount::default(),
        });
        shared.storage.on_signal(signal_handler(&shared));
        let background = vec![
            tokio::spawn(dispatch::dispatch(shared.clone())),
            tokio::spawn(dispatch::retention(shared.clone())),
            tokio::spawn(dispatch::reap(shared.clone())),
            tokio::spawn(dispatch::forget_idle_keys(shared.clone())),
            tokio::spawn(follow_plugins(shared.clone())),
            tokio::spawn(schedules::fire_schedules(shared.clone())),
        ];
        let deliverer = match &shared.config.webhooks {
            Some(config) => {
                let deliverer = Deliverer::new(
                    shared.storage.clone(),
                    config.clone(),
                    shared.config.metrics.clone(),
                )
                .map_err(|e| QueueError::Webhooks(format!("{e:#}")))?;
                let stop = CancellationToken::new();
                Some((tokio::spawn(Arc::new(deliverer).run(stop.clone())), stop))
            }
            None => None,
        };
        let queue = Queue {
            shared,
            background: std::sync::Mutex::new(background),
            deliverer: std::sync::Mutex::new(deliverer),
            tailer: std::sync::Mutex::new(Some((tailer, stop_tailing))),
        };
        Ok((queue, recovered))
    }

    pub fn config(&self) -> &QueueConfig {
        &self.shared.config
    }

    /// This host's event bus: committed events in log order, and live
    /// progress reports.
    pub fn bus(&self) -> &Bus {
        &self.shared.bus
    }

    /// Jobs newest first, filtered, a page at a time.
    pub async fn list(&self, filter: JobFilter) -> Result<JobPage, QueueError> {
        Ok(self.shared.storage.jobs(filter).await?)
    }

    /// How many jobs are in each status.
    pub async fn counts(&self) -> Result<Vec<(JobStatus, u64)>, QueueError> {
        Ok(self.shared.storage.job_counts().await?)
    }

    /// The hosts serving from this queue's database, with the jobs each
    /// runs (on SQLite, this host alone).
    pub async fn hosts(&self) -> Result<Vec<HostRecord>, QueueError> {
        let mut hosts = self.shared.storage.hosts().await?;
        for host in &mut hosts {
            // Only a database this host owns leaves slots out: they are ours.
            host.slots
                .get_or_insert(self.shared.config.concurrency as u32);
        }
        Ok(hosts)
    }

    /// Committed events not yet in the log's order (see
    /// [`Store::log_backlog`](crate::storage::Store::log_backlog)).
    pub async fn log_backlog(&self) -> Result<LogBacklog, QueueError> {
        Ok(self.shared.storage.log_backlog(self.shared.now()).await?)
    }

    /// Pending jobs due now: the backlog.
    pub async fn due_count(&self) -> Result<u64, QueueError> {
        Ok(self.shared.storage.due_count(self.shared.now()).await?)
    }

    /// Logged events after `after` that match `filter`, oldest first.
    pub async fn events_after(
        &self,
        after: i64,
        filter: EventFilter,
        limit: usize,
    ) -> Result<Vec<Event>, QueueError> {
        Ok(self
            .shared
            .storage
            .events_after(after, filter, limit)
            .await?)
    }

    /// The newest logged event's sequence number (0 when there is none).
    pub async fn last_event_seq(&self) -> Result<i64, QueueError> {
        Ok(self.shared.storage.last_event_seq().await?)
    }

    /// Validates and stores a job (acknowledged only after its commit).
    /// When a slot is free and no other job is due, the same write claims
    /// the job and its worker starts at once: one commit less between
    /// enqueue and completion (see `Storage::create_job`).
    pub async fn enqueue(&self, spec: JobSpec) -> Result<Enqueued, QueueError> {
        let shared = &self.shared;
        // Counts as a worker until this returns, so that shutdown waits for
        // a job claimed here to get its worker.
        let _in_flight = shared.workers.token();
        if shared.draining.is_cancelled() {
            return Err(QueueError::ShuttingDown);
        }
        let now = shared.now();
        let plugin_timeout = |plugin: &str| shared.plugins.default_timeout(plugin);
        let new = enqueue::new_job(spec, &shared.config, plugin_timeout, now)
            .map_err(QueueError::InvalidJob)?;
        self.shared.check_pending_quota().await?;
        let id = new.id.clone();
        // A keyed job waits for its turn in the rotation: never claimed as
        // it is created.
        let slot = match &new.concurrency_key {
            Some(key) => {
                self.check_key_limit(key).await?;
                None
            }
            None => self.reserve_slot(&id).await,
        };
        let created = shared
            .storage
            .create_job(new, slot.as_ref().map(|_| now))
            .await;
        let claimed = matches!(&created, Ok(CreateOutcome::Created(_, Some(_))));
        if slot.is_some() && !claimed {
            self.release_slot(&id).await;
        }
        match created? {
            CreateOutcome::Created(job, lease) => {
                match (slot, lease) {
                    (Some(cancel), Some(lease)) => {
                        let claimed = Claimed {
                            job: job.clone(),
                            lease,
                        };
                        dispatch::spawn_worker(shared, claimed, cancel)
                    }
                    _ => shared.wake.notify_one(),
                }
                Ok(Enqueued { job, created: true })
            }
            CreateOutcome::Existing(job) => Ok(Enqueued {
                job,
                created: false,
            }),
            CreateOutcome::UnknownPlugin(message) => Err(QueueError::UnknownPlugin(message)),
        }
    }

    /// Takes a free slot for the job about to be created, if the queue is
    /// claiming and has one: its cancellation token, already in `running`.
    async fn reserve_slot(&self, id: &str) -> Option<CancellationToken> {
        let shared = &self.shared;
        let mut running = shared.running.lock().await;
        if !shared.may_claim() || running.len() >= shared.config.concurrency {
            return None;
        }
        let cancel = shared.force.child_token();
        running.insert(id.to_owned(), cancel.clone());
        Some(cancel)
    }

    /// Gives back a slot the job did not take.
    async fn release_slot(&self, id: &str) {
        self.shared.running.lock().await.remove(id);
        self.shared.wake.notify_one();
    }

    pub async fn job(&self, id: &str) -> Result<Job, QueueError> {
        self.shared
            .storage
            .job(id)
            .await?
            .ok_or_else(|| QueueError::NotFound(id.to_owned()))
    }

    /// A job's status, without loading the rest of it.
    pub async fn job_status(&self, id: &str) -> Result<JobStatus, QueueError> {
        self.shared
            .storage
            .job_status(id)
            .await?
            .ok_or_else(|| QueueError::NotFound(id.to_owned()))
    }

    /// Cancels a pending job at once, or stops a running one (cooperatively
    /// through `cancelled()`, by force at the next epoch tick) and waits up
    /// to [`CANCEL_WAIT`] for its worker to say what happened: the job may
    /// have finished before the cancel took effect.
    pub async fn cancel(&self, id: &str) -> Result<Cancelled, QueueError> {
        let running = self.shared.running.lock().await;
        let outcome = self
            .shared
            .storage
            .cancel_pending_job(id, self.shared.now())
            .await?;
        let token = running.get(id).cloned();
        drop(running);
        match outcome {
            CancelOutcome::Running { on_this_host } => {
                // A job a worker claimed as its previous one completed is
                // in `running` a moment after that commit: wait for it.
                let token = match token {
                    Some(token) => Some(token),
                    None if on_this_host => self.slot_of(id).await,
                    None => None,
                };
                match token {
                    // This process runs it: its worker stops the phase and
                    // records the cancel.
                    Some(token) => self.stop_and_wait(id, token).await,
                    // Another host's worker does.
                    None => self.cancel_elsewhere(id).await,
                }
            }
            CancelOutcome::Cancelled => Ok(Cancelled::Done),
            CancelOutcome::NotFound => Err(QueueError::NotFound(id.to_owned())),
            CancelOutcome::AlreadyFinished(status) => Err(QueueError::Conflict {
                status,
                reason: "the job has already finished; nothing changed",
            }),
        }
    }

    /// Stops a job this process runs and waits, up to [`CANCEL_WAIT`], for
    /// its worker to say what happened.
    async fn stop_and_wait(
        &self,
        id: &str,
        token: CancellationToken,
    ) -> Result<Cancelled, QueueError> {
        self.shared.stop_runs([&token]);
        let stopped = tokio::time::timeout(CANCEL_WAIT, self.wait_until_not_running(id)).await;
        match (stopped, self.job_status(id).await?) {
            (Ok(()), JobStatus::Cancelled) => Ok(Cancelled::Done),
            (Ok(()), status) if status.is_terminal() => Err(QueueError::Conflict {
                status,
                reason: "the job finished before the cancel took effect",
            }),
            _ => Ok(Cancelled::Stopping),
        }
    }

    /// Asks the host running the job to stop it (its worker records the
    /// cancel), and waits up to [`CANCEL_WAIT`] for the job to end.
    async fn cancel_elsewhere(&self, id: &str) -> Result<Cancelled, QueueError> {
        let mut events = self.shared.bus.subscribe();
        if self.shared.storage.request_cancel(id).await? {
            let ended = async {
                loop {
                    match events.recv().await {
                        Ok(event)
                            if event.kind().is_job_terminal()
                                && event.job_id.as_deref() == Some(id) =>
                        {
                            return;
                        }
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(broadcast::error::RecvError::Closed) => return,
                    }
                }
            };
            let _ = tokio::time::timeout(CANCEL_WAIT, ended).await;
        }
        match self.job_status(id).await? {
            JobStatus::Cancelled => Ok(Cancelled::Done),
            JobStatus::Running => Ok(Cancelled::Stopping),
            JobStatus::Pending | JobStatus::Waiting => Box::pin(self.cancel(id)).await,
            status => Err(QueueError::Conflict {
                status,
                reason: "the job finished before the cancel took effect",
            }),
        }
    }

    /// The token of a running job that is not (yet) in `running`: a worker
    /// registers the job it claimed with its previous one's completion right
    /// after that commit. `None` if it does not appear within
    /// [`CANCEL_WAIT`] or stops running first (it runs elsewhere).
    async fn slot_of(&self, id: &str) -> Option<CancellationToken> {
        let appears = async {
            loop {
                let changed = self.shared.worker_done.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if let Some(token) = self.shared.running.lock().await.get(id) {
                    return Some(token.clone());
                }
                if !matches!(self.job_status(id).await, Ok(JobStatus::Running)) {
                    return None;
                }
                changed.await;
            }
        };
        tokio::time::timeout(CANCEL_WAIT, appears)
            .await
            .ok()
            .flatten()
    }

    /// Runs a failed or cancelled job again: from its first unfinished phase,
    /// keeping completed outputs, or from the start.
    pub async fn retry(&self, id: &str, from_start: bool) -> Result<Job, QueueError> {
        match self
            .shared
            .storage
            .retry_job(id, from_start, self.shared.now())
            .await?
        {
            RetryOutcome::Retried(job) => {
                self.shared.wake.notify_one();
                Ok(*job)
            }
            RetryOutcome::NotRetryable(status) => Err(QueueError::Conflict {
                status,
                reason: "only failed or cancelled jobs can be retried",
            }),
            RetryOutcome::NotFound => Err(QueueError::NotFound(id.to_owned())),
        }
    }

    /// Deletes a finished job and its phases.
    pub async fn delete(&self, id: &str) -> Result<(), QueueError> {
        match self
            .shared
            .storage
            .delete_job(id, self.shared.now())
            .await?
        {
            DeleteOutcome::Deleted => Ok(()),
            DeleteOutcome::NotTerminal(status) => Err(QueueError::Conflict {
                status,
                reason: "cancel the job before deleting it",
            }),
            DeleteOutcome::NotFound => Err(QueueError::NotFound(id.to_owned())),
        }
    }

    /// Deletes every finished job that finished before `cutoff` (Unix ms);
    /// returns their ids. For operators; the retention sweep does the same.
    pub async fn purge_finished_before(&self, cutoff: i64) -> Result<Vec<String>, QueueError> {
        dispatch::purge(&self.shared, cutoff).await
    }

    /// No new phases start while paused; running phases finish.
    /// Pauses the platform: no new phase starts, on this host or any other
    /// sharing its database, until resumed. Running phases finish and
    /// their jobs wait, keeping completed phases.
    pub async fn pause(&self) -> Result<(), QueueError> {
        self.shared.storage.set_paused(true).await?;
        self.shared.paused.store(true, Ordering::SeqCst);
        Ok(())
    }

    pub async fn resume(&self) -> Result<(), QueueError> {
        self.shared.storage.set_paused(false).await?;
        self.shared.paused.store(false, Ordering::SeqCst);
        self.shared.wake.notify_one();
        Ok(())
    }

    pub fn is_paused(&self) -> bool {
        self.shared.paused.load(Ordering::SeqCst)
    }

    /// Jobs this process is running now.
    pub async fn running(&self) -> usize {
        self.shared.running.lock().await.len()
    }

    /// Stops webhook delivery. Attempts in flight are abandoned: they stay
    /// pending in the outbox and go out after the next start (their
    /// receivers may see them twice, under the same `webhook-id`).
    async fn stop_deliverer(&self) {
        let Some((task, stop)) = self.deliverer.lock().unwrap().take() else {
            return;
        };
        stop.cancel();
        let _ = task.await;
    }

    /// Stops the fan-out once it has published everything committed.
    async fn stop_tailer(&self) {
        let Some((task, stop)) = self.tailer.lock().unwrap().take() else {
            return;
        };
        stop.cancel();
        let _ = task.await;
    }

    /// Waits until this process no longer runs the job `id`.
    async fn wait_until_not_running(&self, id: &str) {
        loop {
            let done = self.shared.worker_done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            if !self.shared.running.lock().await.contains_key(id) {
                return;
            }
            done.await;
        }
    }

    /// Waits until this process runs no job.
    pub async fn wait_idle(&self) {
        loop {
            let done = self.shared.worker_done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            if self.shared.running.lock().await.is_empty() {
                return;
            }
            done.await;
        }
    }

    /// Stops claiming work, lets running phases finish for up to `timeout`
    /// (jobs are handed back between phases), then stops the rest by force
    /// and requeues them. Storage is closed in every case; a timeout is
    /// reported only after that cleanup.
    pub async fn shutdown(&self, timeout: Duration) -> Result<ShutdownReport, ShutdownTimedOut> {
        let shared = &self.shared;
        shared.draining.cancel();
        shared.workers.close();
        let background: Vec<_> = self.background.lock().unwrap().drain(..).collect();
        // Both return on `draining`, the dispatcher after any claim in flight.
        for task in background {
            let _ = task.await;
        }
        let mut forced = Vec::new();
        if tokio::time::timeout(timeout, shared.workers.wait())
            .await
            .is_err()
        {
            forced = shared.running.lock().await.keys().cloned().collect();
            tracing::warn!(
                jobs = forced.len(),
                "shutdown timeout: stopping running phases by force"
            );
            shared.stop_runs([&shared.force]);
            // Epoch interruption stops every guest at once; the workers then
            // record the interruption.
            shared.workers.wait().await;
        }
        self.stop_deliverer().await;
        self.stop_tailer().await;
        shared.storage.close().await;
        let report = ShutdownReport { forced };
        if report.forced.is_empty() {
            Ok(report)
        } else {
            Err(ShutdownTimedOut { report })
        }
    }
}
