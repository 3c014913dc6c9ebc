//! The job side of the interface on PostgreSQL: each method is one
//! transaction or one read.

use async_trait::async_trait;

use super::commands::{cancel_if_pending, delete, delete_finished_before, recover, retry};
use super::create::claim;
use super::rows::{count, job_counts, job_status, list, load_job};
use super::{PgStore, query, query_one, transitions};
use crate::model::{Job, JobStatus, Progress, ResourceUsage};
use crate::storage::jobs::stopped_usage;
use crate::storage::{
    CancelOutcome, Claimed, Completion, CreateOutcome, DeleteOutcome, Guarded, HostRecord,
    JobFilter, JobPage, JobStore, Lease, LogBacklog, NewJob, PhaseDone, PhaseFailed, PhaseStart,
    Recovered, RecoveryPolicy, RecoveryScope, Result, RetryOutcome, SignalHandler, Store,
    WriterStats,
};

#[async_trait]
impl JobStore for PgStore {
    async fn create_job(&self, new: NewJob, claim_at: Option<i64>) -> Result<CreateOutcome> {
        self.write_batched(&self.creates, (new, claim_at)).await
    }

    async fn claim_due_jobs(&self, now: i64, limit: usize) -> Result<Vec<Claimed>> {
        self.write(move |tx, scope| Box::pin(claim(tx, scope, now, limit)))
            .await
    }

    async fn next_due_at(&self) -> Result<Option<i64>> {
        let client = self.client().await?;
        // A key's jobs count only once it has room: a worker that finishes
        // wakes the dispatcher.
        let sql = format!(
            "SELECT LEAST((SELECT MIN(run_at) FROM jobs
                           WHERE status = 'pending' AND concurrency_key IS NULL), ({}))",
            super::keys::NEXT_KEY_DUE
        );
        // And jobs waiting for a plugin, once it may wake them.
        let (row, waiting) = futures::try_join!(
            query_one(&client, &sql, &[]),
            super::plugin_limits::next_plugin_wake(&client)
        )?;
        let pending: Option<i64> = row.get(0);
        Ok(pending.into_iter().chain(waiting).min())
    }

    async fn start_phase(
        &self,
        lease: &Lease,
        index: usize,
        now: i64,
    ) -> Result<Guarded<PhaseStart>> {
        let lease = lease.clone();
        self.write(move |tx, scope| {
            Box::pin(async move { transitions::start_phase(tx, scope, &lease, index, now).await })
        })
        .await
    }

    async fn record_progress(
        &self,
        lease: &Lease,
        index: usize,
        progress: &Progress,
    ) -> Result<()> {
        let (lease, progress) = (lease.clone(), progress.clone());
        self.write(move |tx, _| {
            Box::pin(
                async move { transitions::record_progress(tx, &lease, index, &progress).await },
            )
        })
        .await
    }

    async fn complete_phase(&self, lease: &Lease, done: PhaseDone) -> Result<Guarded<Completion>> {
        let completion = self.write_batched(&self.completions, (lease.clone(), done));
        Ok(completion.await?.outcome)
    }

    async fn complete_job(&self, lease: &Lease, now: i64) -> Result<Guarded<()>> {
        let lease = lease.clone();
        self.write(move |tx, scope| {
            Box::pin(async move { transitions::complete_job(tx, scope, &lease, now).await })
        })
        .await
    }

    async fn fail_phase(&self, lease: &Lease, failed: PhaseFailed) -> Result<Guarded<()>> {
        let lease = lease.clone();
        self.write(move |tx, scope| {
            Box::pin(async move { transitions::fail_phase(tx, scope, &lease, &failed).await })
        })
        .await
    }

    async fn cancel_running_job(
        &self,
        lease: &Lease,
        stopped: Option<(usize, ResourceUsage)>,
        now: i64,
    ) -> Result<Guarded<()>> {
        let lease = lease.clone();
        let stopped = stopped_usage(stopped)?;
        self.write(move |tx, scope| {
            Box::pin(async move {
                transitions::cancel_running(tx, scope, &lease, stopped.as_ref(), now).await
            })
        })
        .await
    }

    async fn cancel_pending_job(&self, job_id: &str, now: i64) -> Result<CancelOutcome> {
        let job_id = job_id.to_owned();
        self.write(move |tx, scope| {
            Box::pin(async move { cancel_if_pending(tx, scope, &job_id, now).await })
        })
        .await
    }

    async fn request_cancel(&self, job_id: &str) -> Result<bool> {
        let job_id = job_id.to_owned();
        self.write(move |tx, _| {
            Box::pin(async move {
                // The request is state (re-read by the owner whenever it
                // reconnects); the notification only wakes the owner.
                let rows = query(
                    tx,
                    "WITH requested AS (
                         UPDATE jobs SET cancel_requested = true
                         WHERE id = $1 AND status = 'running' RETURNING owner
                     )
                     SELECT pg_notify('jobhost_cancel', owner || ' ' || $1) FROM requested",
                    &[&job_id],
                )
                .await?;
                Ok(!rows.is_empty())
            })
        })
        .await
    }

    async fn release_job(&self, lease: &Lease, now: i64) -> Result<Guarded<()>> {
        let lease = lease.clone();
        self.write(move |tx, scope| {
            Box::pin(async move { transitions::release(tx, scope, &lease, now).await })
        })
        .await
    }

    async fn retry_job(&self, job_id: &str, from_start: bool, now: i64) -> Result<RetryOutcome> {
        let job_id = job_id.to_owned();
        self.write(move |tx, scope| {
            Box::pin(async move { retry(tx, scope, &job_id, from_start, now).await })
        })
        .await
    }

    async fn delete_job(&self, job_id: &str, now: i64) -> Result<DeleteOutcome> {
        let job_id = job_id.to_owned();
        self.write(move |tx, scope| Box::pin(async move { delete(tx, scope, &job_id, now).await }))
            .await
    }

    async fn recover_jobs(
        &self,
        which: RecoveryScope,
        policy: RecoveryPolicy,
        now: i64,
    ) -> Result<Vec<Recovered>> {
        self.write(move |tx, scope| {
            Box::pin(async move { recover(tx, scope, &which, &policy, now).await })
        })
        .await
    }

    async fn delete_finished_before(
        &self,
        cutoff: i64,
        limit: usize,
        now: i64,
    ) -> Result<Vec<String>> {
        self.write(move |tx, scope| Box::pin(delete_finished_before(tx, scope, cutoff, limit, now)))
            .await
    }

    async fn job(&self, job_id: &str) -> Result<Option<Job>> {
        let client = self.client().await?;
        load_job(&client, job_id).await
    }

    async fn job_status(&self, job_id: &str) -> Result<Option<JobStatus>> {
        let client = self.client().await?;
        job_status(&client, job_id).await
    }

    async fn jobs(&self, filter: JobFilter) -> Result<JobPage> {
        let client = self.client().await?;
        list(&client, &filter).await
    }

    async fn due_count(&self, now: i64) -> Result<u64> {
        let client = self.client().await?;
        count(
            &client,
            "SELECT COUNT(*) FROM jobs WHERE status = 'pending' AND run_at <= $1",
            &[&now],
        )
        .await
    }

    async fn pending_count(&self) -> Result<u64> {
        let client = self.client().await?;
        count(
            &client,
            "SELECT COUNT(*) FROM jobs WHERE status = 'pending' OR status = 'waiting'",
            &[],
        )
        .await
    }

    async fn job_counts(&self) -> Result<Vec<(JobStatus, u64)>> {
        let client = self.client().await?;
        job_counts(&client).await
    }
}

#[async_trait]
impl Store for PgStore {
    /// PostgreSQL's size is the operator's to bound (tablespace quotas,
    /// disk alerts): `--max-db-mb` caps the embedded database only.
    async fn limit_size(&self, _bytes: u64) -> Result<()> {
        Ok(())
    }

    async fn close(&self) {
        self.shut().await
    }

    fn writer_stats(&self) -> WriterStats {
        self.committer.stats()
    }

    fn on_signal(&self, handler: SignalHandler) {
        self.signals.add(handler);
    }

    async fn set_paused(&self, paused: bool) -> Result<()> {
        let client = self.client().await?;
        // One statement: the state and its announcement commit together.
        query(
            &client,
            "WITH set AS (UPDATE cluster_state SET paused = $1 RETURNING paused)
             SELECT pg_notify('jobhost_pause', paused::text) FROM set",
            &[&paused],
        )
        .await?;
        Ok(())
    }

    async fn hosts(&self) -> Result<Vec<HostRecord>> {
        let client = self.client().await?;
        let rows = query(
            &client,
            "SELECT h.id, h.name, h.started_at, h.heartbeat_at, h.lease_until >= jobhost_now(), h.slots,
                    COALESCE(array_agg(j.id ORDER BY j.id) FILTER (WHERE j.id IS NOT NULL), '{}')
             FROM hosts h LEFT JOIN jobs j ON j.owner = h.id AND j.status = 'running'
             GROUP BY h.id ORDER BY h.started_at, h.id",
            &[],
        )
        .await?;
        Ok(rows
            .iter()
            .map(|row| HostRecord {
                id: row.get(0),
                name: row.get(1),
                started_at: row.get(2),
                heartbeat_at: row.get(3),
                alive: row.get(4),
                slots: Some(row.get::<_, i32>(5) as u32),
                running: row.get(6),
            })
            .collect())
    }

    async fn log_backlog(&self, now: i64) -> Result<LogBacklog> {
        let client = self.client().await?;
        let row = query_one(
            &client,
            "SELECT count(*), COALESCE($1 - min(e.at), 0)
             FROM events e, event_positions p
             WHERE e.xid >= p.stamped_below
               AND NOT EXISTS (SELECT 1 FROM event_blocks b WHERE b.xid = e.xid)",
            &[&now],
        )
        .await?;
        Ok(LogBacklog {
            events: row.get::<_, i64>(0) as u64,
            oldest_ms: row.get::<_, i64>(1).max(0),
        })
    }

    async fn paused(&self) -> Result<bool> {
        let client = self.client().await?;
        Ok(query_one(&client, "SELECT paused FROM cluster_state", &[])
            .await?
            .get(0))
    }
}
