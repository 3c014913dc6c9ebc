//! Jobs and their phases: what the queue stores, the transitions it asks
//! for, and what they report. Every worker-side transition is guarded by the
//! claim's [`Lease`]; one that finds the job elsewhere changes nothing and
//! says so ([`Guarded::Stale`], [`Guarded::Fenced`]), so races with cancel,
//! retry, recovery or another host are harmless.

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;

use super::Result;
use crate::model::{
    BackoffPolicy, Job, JobStatus, JobSummary, Json, Phase, PhaseStatus, Progress, ResourceUsage,
};

/// What a worker holds for a job it claimed. Every write it makes about the
/// job is guarded by all of it: the job must still be running, in this
/// attempt, under this token. A new claim (after a recovery, or on another
/// host) gets a new token, so the writes of a worker that lost the job are
/// refused ([`Guarded::Fenced`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub job_id: String,
    pub attempt: u32,
    pub token: i64,
}

/// A job just claimed, with its lease.
#[derive(Debug, Clone, PartialEq)]
pub struct Claimed {
    pub job: Job,
    pub lease: Lease,
}

/// The outcome of a guarded write.
#[derive(Debug, Clone, PartialEq)]
pub enum Guarded<T> {
    Applied(T),
    /// The job or phase is no longer where the writer expected it
    /// (cancelled, finished, recovered): nothing changed.
    Stale,
    /// The job runs under another lease now: nothing changed.
    Fenced,
}

impl<T> Guarded<T> {
    pub fn applied(self) -> Option<T> {
        match self {
            Guarded::Applied(value) => Some(value),
            Guarded::Stale | Guarded::Fenced => None,
        }
    }
}

/// A finished phase run to record.
#[derive(Debug, Clone)]
pub struct PhaseDone {
    pub index: usize,
    /// The phase's name (the worker's copy: names never change).
    pub name: String,
    pub output: Json,
    pub usage: ResourceUsage,
    /// Start the next phase in the same write (there is one, and the job is
    /// not to stop here); otherwise, after the last phase, the job completes.
    pub start_next: bool,
    /// When the job completes with this phase, the same write also claims
    /// the worker's next job, if one is due (see [`Completion::Claimed`]).
    pub claim_next: bool,
    pub now: i64,
}

/// A failed phase attempt to record, with what the queue decided.
#[derive(Debug, Clone)]
pub struct PhaseFailed {
    pub index: usize,
    pub name: String,
    pub error: String,
    pub usage: Option<ResourceUsage>,
    pub after: AfterFailure,
    pub now: i64,
}

/// A job ready to store: validated, with plugin versions still to pin.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: String,
    pub payload: Json,
    pub priority: i32,
    pub run_at: i64,
    pub max_attempts: u32,
    pub backoff: BackoffPolicy,
    pub idempotency_key: Option<String>,
    pub webhook_url: Option<String>,
    pub webhook_secret: Option<String>,
    pub concurrency_key: Option<String>,
    pub phases: Vec<NewPhase>,
    pub created_at: i64,
}

impl NewJob {
    /// The job just stored, as loading it would return it (a unit test holds
    /// the two equal), without reading back what was just written.
    pub fn stored(&self, pinned: Vec<String>) -> Job {
        let new = self;
        Job {
            id: new.id.clone(),
            status: JobStatus::Pending,
            payload: new.payload.clone(),
            priority: new.priority,
            run_at: new.run_at,
            attempt: 0,
            max_attempts: new.max_attempts,
            backoff: new.backoff,
            idempotency_key: new.idempotency_key.clone(),
            webhook_url: new.webhook_url.clone(),
            concurrency_key: new.concurrency_key.clone(),
            created_at: new.created_at,
            started_at: None,
            finished_at: None,
            error: None,
            phases: new
                .phases
                .iter()
                .zip(pinned)
                .enumerate()
                .map(|(index, (phase, version))| Phase {
                    index,
                    name: phase.name.clone(),
                    plugin: phase.plugin.clone(),
                    version,
                    config: phase.config.clone(),
                    timeout_ms: phase.timeout_ms,
                    status: PhaseStatus::Pending,
                    output: None,
                    error: None,
                    attempts: 0,
                    started_at: None,
                    finished_at: None,
                    usage: None,
                    progress: None,
                })
                .collect(),
            errors: Vec::new(),
            webhook: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct NewPhase {
    pub name: String,
    pub plugin: String,
    /// `None`: the plugin's active version, pinned in the same transaction.
    pub version: Option<String>,
    pub config: Value,
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum CreateOutcome {
    /// Stored; with a lease when the same write claimed it (see
    /// [`JobStore::create_job`]).
    Created(Job, Option<Lease>),
    /// A job with the same idempotency key exists; nothing was stored.
    Existing(Job),
    /// A phase names a plugin or version that is not stored.
    UnknownPlugin(String),
}

pub use crate::model::AfterFailure;

/// What asking to start a phase did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PhaseStart {
    /// Running, with this attempt number.
    Started(u32),
    /// Its plugin is at its limit, or out of starts for now: the job waits
    /// (status `waiting`) and no longer holds its worker.
    Waiting,
}

/// What recording a phase's completion did.
#[derive(Debug, Clone, PartialEq)]
pub enum Completion {
    /// Recorded; if it was the last phase, the job completed with it.
    Recorded,
    /// Recorded, and the next phase started in the same write, with this
    /// attempt number.
    NextStarted(u32),
    /// Recorded, the job completed, and the same write claimed this job
    /// for the worker (asked for with [`PhaseDone::claim_next`]).
    Claimed(Box<Claimed>),
}

#[derive(Debug, Clone, PartialEq)]
pub enum CancelOutcome {
    /// The job was pending and is now cancelled, with all its phases.
    Cancelled,
    /// The job is running: only its worker can stop it, on this host or,
    /// on a database shared by several hosts, on another.
    Running {
        on_this_host: bool,
    },
    /// The job had already finished; nothing changed.
    AlreadyFinished(JobStatus),
    NotFound,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RetryOutcome {
    Retried(Box<Job>),
    /// Only failed and cancelled jobs can be retried.
    NotRetryable(JobStatus),
    NotFound,
}

#[derive(Debug, Clone, PartialEq)]
pub enum DeleteOutcome {
    Deleted,
    /// Pending and running jobs must be cancelled first.
    NotTerminal(JobStatus),
    NotFound,
}

/// A running job whose worker is gone (the host stopped) or could not
/// record its progress: what recovery knows about it, for the queue's
/// [`RecoveryPolicy`] to decide on.
#[derive(Debug, Clone, PartialEq)]
pub struct Interrupted {
    pub job_id: String,
    pub attempt: u32,
    pub max_attempts: u32,
    /// The phase that was running (index, name), if any.
    pub phase: Option<(usize, String)>,
}

/// What the queue decided for an interrupted job: the attempt's error,
/// and a retry or the end.
#[derive(Debug, Clone, PartialEq)]
pub struct Recovery {
    pub error: String,
    pub after: AfterFailure,
}

/// Decides, inside recovery's write, what happens to each interrupted job.
pub type RecoveryPolicy = Arc<dyn Fn(&Interrupted) -> Recovery + Send + Sync>;

/// Which running jobs a recovery takes.
#[derive(Debug, Clone, PartialEq)]
pub enum RecoveryScope {
    /// At start-up: every job this host left running, and those of hosts
    /// whose lease expired (on SQLite, one host owns the database: every
    /// running job).
    AtStart,
    /// While running: the jobs of other hosts whose lease expired (none
    /// on a database one host owns).
    ExpiredHosts,
    /// One job whose worker could not record a transition, if it still
    /// holds this lease.
    Job(Lease),
}

/// A recovered job and what became of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Recovered {
    pub job_id: String,
    /// The phase that was running when it was interrupted, if any.
    pub phase: Option<String>,
    pub attempt: u32,
    /// Requeued (true) or failed (false).
    pub requeued: bool,
}

#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub status: Option<JobStatus>,
    pub plugin: Option<String>,
    pub concurrency_key: Option<String>,
    /// Clamped to 1..=[`MAX_PAGE`].
    pub limit: usize,
    /// Return jobs older than this id (ids sort by creation time).
    pub cursor: Option<String>,
}

#[derive(Debug, Clone)]
pub struct JobPage {
    pub jobs: Vec<JobSummary>,
    /// Pass as `cursor` for the next page; `None` on the last page.
    pub next_cursor: Option<String>,
}

/// Most jobs one listing returns.
pub const MAX_PAGE: usize = 100;

/// The queue's transitions and queries over jobs. One method is one
/// transaction. `now` is the caller's clock (Unix ms): tests inject it, and
/// a backend shared by several hosts compares leases and `run_at` against
/// the database's own time instead.
#[async_trait]
pub trait JobStore: Send + Sync {
    /// Stores a new job. With `claim_at`, the same write also claims it
    /// (running, first phase started) when it is due then and no other job
    /// is due: exactly the job a claim would pick, one commit sooner. The
    /// queue asks for this only when it has a free worker.
    async fn create_job(&self, new: NewJob, claim_at: Option<i64>) -> Result<CreateOutcome>;

    /// Claims up to `limit` due pending jobs, highest priority first, then
    /// earliest `run_at`: marks each running (one more attempt, a new
    /// lease) and starts its first unfinished phase (unless its plugin has
    /// limits: see [`JobStore::start_phase`]), in one write. The jobs come
    /// with their phases, as a worker needs them, but without attempt
    /// errors or webhook status. The same write first wakes, back to
    /// pending, the jobs waiting for plugins that have room and tokens for
    /// them.
    async fn claim_due_jobs(&self, now: i64, limit: usize) -> Result<Vec<Claimed>>;

    /// The earliest `run_at` of any pending job, or the earliest time a
    /// plugin may wake jobs waiting for it.
    async fn next_due_at(&self) -> Result<Option<i64>>;

    /// Marks a pending phase of the leased job as running, if its plugin
    /// has room and a token for it (see `storage::plugin_limits`); else the
    /// job waits for the plugin, holding no worker. The other transitions
    /// that start a phase (claims, completions) leave a phase of a plugin
    /// with limits to this one.
    async fn start_phase(
        &self,
        lease: &Lease,
        index: usize,
        now: i64,
    ) -> Result<Guarded<PhaseStart>>;

    /// Keeps a run's last progress report on its phase (no event: progress
    /// is live-only), if the phase still runs under the lease.
    async fn record_progress(&self, lease: &Lease, index: usize, progress: &Progress)
    -> Result<()>;

    /// Stores a running phase's output, and in the same write either starts
    /// the next phase or, after the last phase, completes the job (and may
    /// claim the worker's next one).
    async fn complete_phase(&self, lease: &Lease, done: PhaseDone) -> Result<Guarded<Completion>>;

    /// Completes the leased job, whose phases all completed.
    async fn complete_job(&self, lease: &Lease, now: i64) -> Result<Guarded<()>>;

    /// Records a failed attempt of a running phase, then retries or fails
    /// the job as the queue decided.
    async fn fail_phase(&self, lease: &Lease, failed: PhaseFailed) -> Result<Guarded<()>>;

    /// Cancels the leased job (its worker calls this once the phase has
    /// stopped); `stopped` is the phase the cancel stopped, if any, with
    /// what it used, which its phase keeps.
    async fn cancel_running_job(
        &self,
        lease: &Lease,
        stopped: Option<(usize, ResourceUsage)>,
        now: i64,
    ) -> Result<Guarded<()>>;

    /// Cancels a job if it is pending; otherwise says where it is.
    async fn cancel_pending_job(&self, job_id: &str, now: i64) -> Result<CancelOutcome>;

    /// Asks the host whose worker runs the job to cancel it (see
    /// [`ClusterSignal::CancelRequested`](super::ClusterSignal)); false if
    /// the job is not running. On a database one host owns, every running
    /// job is that host's own, and nothing is asked.
    async fn request_cancel(&self, job_id: &str) -> Result<bool>;

    /// Hands the leased job, with no phase running, back to pending
    /// (shutdown, pause): not a failed attempt, so the attempt is not
    /// counted.
    async fn release_job(&self, lease: &Lease, now: i64) -> Result<Guarded<()>>;

    /// Runs a failed or cancelled job again, from its first unfinished
    /// phase or `from_start`.
    async fn retry_job(&self, job_id: &str, from_start: bool, now: i64) -> Result<RetryOutcome>;

    async fn delete_job(&self, job_id: &str, now: i64) -> Result<DeleteOutcome>;

    /// Recovers the running jobs `scope` names: for each, records the
    /// attempt's error and requeues or fails it as `policy` decides, with
    /// its interrupted phase on record.
    async fn recover_jobs(
        &self,
        scope: RecoveryScope,
        policy: RecoveryPolicy,
        now: i64,
    ) -> Result<Vec<Recovered>>;

    /// Deletes up to `limit` terminal jobs that finished before `cutoff`,
    /// with their history; their ids.
    async fn delete_finished_before(
        &self,
        cutoff: i64,
        limit: usize,
        now: i64,
    ) -> Result<Vec<String>>;

    async fn job(&self, job_id: &str) -> Result<Option<Job>>;

    /// A job's status alone, cheaper than the whole job.
    async fn job_status(&self, job_id: &str) -> Result<Option<JobStatus>>;

    /// Jobs newest first, filtered, one page at a time.
    async fn jobs(&self, filter: JobFilter) -> Result<JobPage>;

    /// Pending jobs that are due by `now`: the queue's backlog.
    async fn due_count(&self, now: i64) -> Result<u64>;

    /// Jobs waiting to run, now or later, or for a plugin's slot.
    async fn pending_count(&self) -> Result<u64>;

    /// Number of jobs in each status.
    async fn job_counts(&self) -> Result<Vec<(JobStatus, u64)>>;
}

/// The resource use of a phase a cancel stopped, as backends store it.
pub(super) fn stopped_usage(
    stopped: Option<(usize, ResourceUsage)>,
) -> Result<Option<(usize, String)>> {
    stopped
        .map(|(index, usage)| serde_json::to_string(&usage).map(|usage| (index, usage)))
        .transpose()
        .map_err(|e| super::StorageError::corrupt(format!("usage: {e}")))
}

impl NewPhase {
    /// What creating a job answers when this phase's plugin (or pinned
    /// version) is not stored.
    pub(super) fn unknown_plugin(&self) -> CreateOutcome {
        let what = match &self.version {
            Some(v) => format!("plugin `{}` has no version `{v}`", self.plugin),
            None => format!("no plugin named `{}` is uploaded", self.plugin),
        };
        CreateOutcome::UnknownPlugin(format!("phase `{}`: {what}", self.name))
    }
}

/// Claimed jobs in the order a claim hands them out: highest priority
/// first, then earliest `run_at` (a backend's claim may return them in any
/// order).
pub(super) fn in_claim_order(jobs: &mut [Claimed]) {
    jobs.sort_by(|a, b| claim_order(&a.job, &b.job));
}

/// The order of two claimed jobs (see [`in_claim_order`]).
pub(super) fn claim_order(a: &Job, b: &Job) -> std::cmp::Ordering {
    (b.priority, a.run_at, &a.id).cmp(&(a.priority, b.run_at, &b.id))
}

impl JobPage {
    /// A page of `limit` jobs from a listing that read up to `limit + 1`
    /// (the one more says there is a next page).
    pub(super) fn of(mut jobs: Vec<JobSummary>, limit: usize) -> JobPage {
        let next_cursor = if jobs.len() > limit {
            jobs.truncate(limit);
            jobs.last().map(|j| j.id.clone())
        } else {
            None
        };
        JobPage { jobs, next_cursor }
    }
}
