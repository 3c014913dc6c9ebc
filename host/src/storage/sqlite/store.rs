//! The job side of the interface on SQLite: each method is one write (one
//! transaction of a group commit) or one read.

use async_trait::async_trait;

use super::SqliteStore;
use super::claim::{claim, claim_created, next_due_at, other_job_due};
use super::commands::{cancel_if_pending, delete, retry};
use super::create::create;
use super::listing::{due_count, job_counts, list, pending_count};
use super::recovery::{delete_finished_before, recover};
use super::rows::{job_status, load_job};
use super::transitions;
use crate::model::{Job, JobStatus, Progress, ResourceUsage};
use crate::storage::{
    CancelOutcome, Claimed, Completion, CreateOutcome, DeleteOutcome, Guarded, HostRecord,
    JobFilter, JobPage, JobStore, Lease, LogBacklog, NewJob, PhaseDone, PhaseFailed, PhaseStart,
    Recovered, RecoveryPolicy, RecoveryScope, Result, RetryOutcome, SignalHandler, Store,
    WriterStats,
};

#[async_trait]
impl JobStore for SqliteStore {
    async fn create_job(&self, new: NewJob, claim_at: Option<i64>) -> Result<CreateOutcome> {
        self.write(move |conn, log| {
            let created = create(conn, log, &new)?;
            match (created, claim_at) {
                (CreateOutcome::Created(mut job, None), Some(now))
                    if job.run_at <= now
                        && job.concurrency_key.is_none()
                        && !other_job_due(conn, &job.id, now)? =>
                {
                    let lease = claim_created(conn, log, &mut job, now)?;
                    Ok(CreateOutcome::Created(job, Some(lease)))
                }
                (created, _) => Ok(created),
            }
        })
        .await
    }

    async fn claim_due_jobs(&self, now: i64, limit: usize) -> Result<Vec<Claimed>> {
        self.write(move |conn, log| claim(conn, log, now, limit))
            .await
    }

    async fn next_due_at(&self) -> Result<Option<i64>> {
        self.read(next_due_at).await
    }

    async fn start_phase(
        &self,
        lease: &Lease,
        index: usize,
        now: i64,
    ) -> Result<Guarded<PhaseStart>> {
        let lease = lease.clone();
        self.write(move |conn, log| transitions::start_phase(conn, log, &lease, index, now))
            .await
    }

    async fn record_progress(
        &self,
        lease: &Lease,
        index: usize,
        progress: &Progress,
    ) -> Result<()> {
        let (lease, progress) = (lease.clone(), progress.clone());
        self.write(move |conn, _| transitions::record_progress(conn, &lease, index, &progress))
            .await
    }

    async fn complete_phase(&self, lease: &Lease, done: PhaseDone) -> Result<Guarded<Completion>> {
        let lease = lease.clone();
        self.write(move |conn, log| transitions::complete_phase(conn, log, &lease, &done))
            .await
    }

    async fn complete_job(&self, lease: &Lease, now: i64) -> Result<Guarded<()>> {
        let lease = lease.clone();
        self.write(move |conn, log| transitions::complete_job(conn, log, &lease, now))
            .await
    }

    async fn fail_phase(&self, lease: &Lease, failed: PhaseFailed) -> Result<Guarded<()>> {
        let lease = lease.clone();
        self.write(move |conn, log| transitions::fail_phase(conn, log, &lease, &failed))
            .await
    }

    async fn cancel_running_job(
        &self,
        lease: &Lease,
        stopped: Option<(usize, ResourceUsage)>,
        now: i64,
    ) -> Result<Guarded<()>> {
        let lease = lease.clone();
        let stopped = crate::storage::jobs::stopped_usage(stopped)?;
        self.write(move |conn, log| {
            transitions::cancel_running(conn, log, &lease, stopped.as_ref(), now)
        })
        .await
    }

    async fn cancel_pending_job(&self, job_id: &str, now: i64) -> Result<CancelOutcome> {
        let job_id = job_id.to_owned();
        self.write(move |conn, log| cancel_if_pending(conn, log, &job_id, now))
            .await
    }

    async fn request_cancel(&self, _job_id: &str) -> Result<bool> {
        Ok(false)
    }

    async fn release_job(&self, lease: &Lease, now: i64) -> Result<Guarded<()>> {
        let lease = lease.clone();
        self.write(move |conn, _| transitions::release(conn, &lease, now))
            .await
    }

    async fn retry_job(&self, job_id: &str, from_start: bool, now: i64) -> Result<RetryOutcome> {
        let job_id = job_id.to_owned();
        self.write(move |conn, log| retry(conn, log, &job_id, from_start, now))
            .await
    }

    async fn delete_job(&self, job_id: &str, now: i64) -> Result<DeleteOutcome> {
        let job_id = job_id.to_owned();
        self.write(move |conn, log| delete(conn, log, &job_id, now))
            .await
    }

    async fn recover_jobs(
        &self,
        scope: RecoveryScope,
        policy: RecoveryPolicy,
        now: i64,
    ) -> Result<Vec<Recovered>> {
        self.write(move |conn, log| recover(conn, log, &scope, &policy, now))
            .await
    }

    async fn delete_finished_before(
        &self,
        cutoff: i64,
        limit: usize,
        now: i64,
    ) -> Result<Vec<String>> {
        self.write(move |conn, log| delete_finished_before(conn, log, cutoff, limit, now))
            .await
    }

    async fn job(&self, job_id: &str) -> Result<Option<Job>> {
        let job_id = job_id.to_owned();
        self.read(move |conn| load_job(conn, &job_id)).await
    }

    async fn job_status(&self, job_id: &str) -> Result<Option<JobStatus>> {
        let job_id = job_id.to_owned();
        self.read(move |conn| job_status(conn, &job_id)).await
    }

    async fn jobs(&self, filter: JobFilter) -> Result<JobPage> {
        self.read(move |conn| list(conn, &filter)).await
    }

    async fn due_count(&self, now: i64) -> Result<u64> {
        self.read(move |conn| due_count(conn, now)).await
    }

    async fn pending_count(&self) -> Result<u64> {
        self.read(pending_count).await
    }

    async fn job_counts(&self) -> Result<Vec<(JobStatus, u64)>> {
        self.read(job_counts).await
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn limit_size(&self, bytes: u64) -> Result<()> {
        self.set_max_size(bytes).await
    }

    async fn close(&self) {
        self.shut().await
    }

    fn writer_stats(&self) -> WriterStats {
        self.writer_stats.stats()
    }

    fn on_signal(&self, _handler: SignalHandler) {}

    async fn set_paused(&self, paused: bool) -> Result<()> {
        self.write(move |conn, _| {
            conn.prepare_cached("UPDATE cluster_state SET paused = ?1")?
                .execute([paused])?;
            Ok(())
        })
        .await
    }

    async fn hosts(&self) -> Result<Vec<HostRecord>> {
        let (opened_at, now) = (self.opened_at, crate::model::time::now_ms());
        self.read(move |conn| {
            let running = conn
                .prepare_cached("SELECT id FROM jobs WHERE status = 'running' ORDER BY id")?
                .query_map([], |row| row.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            Ok(vec![HostRecord {
                id: "local".into(),
                name: "this host".into(),
                started_at: opened_at,
                heartbeat_at: now,
                alive: true,
                slots: None,
                running,
            }])
        })
        .await
    }

    async fn log_backlog(&self, _now: i64) -> Result<LogBacklog> {
        Ok(LogBacklog::default())
    }

    async fn paused(&self) -> Result<bool> {
        self.read(|conn| {
            Ok(conn.query_row("SELECT paused FROM cluster_state", [], |row| row.get(0))?)
        })
        .await
    }
}
