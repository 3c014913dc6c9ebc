//! Storing a new job (idempotency, pinning plugin versions), and claiming
//! due jobs with `FOR UPDATE SKIP LOCKED`: claimers on every host take
//! disjoint jobs without waiting for each other.

use super::batch::{Kind, Outcome};
use super::rows::{
    J_JOB_COLUMNS, LEASE_COLUMN, PHASE_COLUMNS, decode_job, decode_phase, must_load,
};
use super::transitions::{FREELY_STARTED, job_event};
use super::{Tx, WriteScope, corrupt, query, query_one, query_opt};
use super::{keys, plugin_limits};
use crate::model::event::JobStarted;
use crate::model::{EventBody, Job, JobStatus, PhaseStatus};
use crate::storage::{Claimed, CreateOutcome, Lease, NewJob, Result};
use futures::future::{BoxFuture, join_all};
use tokio_postgres::types::ToSql;

/// Creates, batched with creates: one statement stores the batch's jobs
/// and phases. Then each create is on its own, pipelined with the others:
/// its event, or the job an idempotency key already named, and its claim.
/// The check that no other job is due sees the batch's jobs, and a create
/// claims only its own job.
pub(super) struct Creates;

/// A create, and the time at which its host may claim it for a free
/// worker.
pub(super) type CreateWrite = (NewJob, Option<i64>);

impl Kind for Creates {
    type Write = CreateWrite;
    type Outcome = CreateOutcome;

    fn run<'a>(
        tx: &'a Tx<'a>,
        writes: Vec<&'a CreateWrite>,
        scopes: &'a mut [WriteScope],
    ) -> BoxFuture<'a, Result<Vec<CreateOutcome>>> {
        Box::pin(async move {
            let (news, claims): (Vec<&NewJob>, Vec<Option<i64>>) =
                writes.into_iter().map(|(new, at)| (new, *at)).unzip();
            let inserted = insert(tx, &news).await?;
            let outcomes = (news.into_iter().zip(inserted).zip(claims).zip(scopes)).map(
                |(((new, inserted), claim_at), scope)| async move {
                    let created = created(tx, scope, new, inserted).await?;
                    claim_if_alone(tx, scope, created, claim_at).await
                },
            );
            join_all(outcomes).await.into_iter().collect()
        })
    }
}

impl Outcome for CreateOutcome {}

/// Claims a job just created at `claim_at` if it is due then and no other
/// job is; otherwise hosts with free workers are told.
async fn claim_if_alone(
    tx: &Tx<'_>,
    scope: &mut WriteScope,
    created: CreateOutcome,
    claim_at: Option<i64>,
) -> Result<CreateOutcome> {
    match (created, claim_at) {
        (CreateOutcome::Created(mut job, None), Some(now))
            if job.run_at <= now
                && job.concurrency_key.is_none()
                && !other_job_due(tx, &job.id, now).await? =>
        {
            let lease = claim_created(tx, scope, &mut job, now).await?;
            Ok(CreateOutcome::Created(job, Some(lease)))
        }
        (created, _) => {
            scope.jobs_due |= matches!(created, CreateOutcome::Created(..));
            Ok(created)
        }
    }
}

/// Stores one new job (see [`insert`]).
pub(super) async fn create(
    tx: &Tx<'_>,
    scope: &mut WriteScope,
    new: &NewJob,
) -> Result<CreateOutcome> {
    let inserted = insert(tx, &[new]).await?.pop();
    let inserted = inserted.ok_or_else(|| corrupt("a create without its row", &new.id))?;
    created(tx, scope, new, inserted).await
}

/// What [`insert`] did with one job.
struct Inserted {
    /// Each phase's pinned version: `None` where the phase's plugin (or
    /// the version it names) is unknown, and then the job was not stored.
    pinned: Vec<Option<String>>,
    /// The job was stored (else its idempotency key was taken).
    stored: bool,
}

/// Stores jobs and their phases in one statement, each phase pinned to the
/// version it names or its plugin's active one; a job is not stored if a
/// phase has none. Two creates with one idempotency key: the second's row
/// waits for the first's commit (or follows it in the statement), then
/// is not inserted. Rows go in in key order, so two batches do not wait for
/// each other's idempotency keys in a cycle (a deadlock on anything else
/// fails the statement, and the batch's writes run again alone). A job's
/// id that is taken fails the statement.
async fn insert(tx: &Tx<'_>, news: &[&NewJob]) -> Result<Vec<Inserted>> {
    let backoffs = (news.iter())
        .map(|new| serde_json::to_string(&new.backoff))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| corrupt("backoff", e))?;
    let jobs = |f: fn(&NewJob) -> Option<&str>| news.iter().map(|new| f(new)).collect::<Vec<_>>();
    let (ids, payloads, keys, urls, secrets, concurrency) = (
        jobs(|new| Some(new.id.as_str())),
        jobs(|new| Some(new.payload.as_str())),
        jobs(|new| new.idempotency_key.as_deref()),
        jobs(|new| new.webhook_url.as_deref()),
        jobs(|new| new.webhook_secret.as_deref()),
        jobs(|new| new.concurrency_key.as_deref()),
    );
    let numbers = |f: fn(&NewJob) -> i64| news.iter().map(|new| f(new)).collect::<Vec<_>>();
    let (priorities, run_ats, max_attempts, created_ats) = (
        numbers(|new| new.priority.into()),
        numbers(|new| new.run_at),
        numbers(|new| new.max_attempts.into()),
        numbers(|new| new.created_at),
    );
    // The phases of all jobs, each with its job's place in `news` (from 1).
    let phases = || {
        (news.iter().enumerate()).flat_map(|(n, new)| {
            new.phases
                .iter()
                .enumerate()
                .map(move |p| (n as i64 + 1, p))
        })
    };
    let owners: Vec<i64> = phases().map(|(n, _)| n).collect();
    let indexes: Vec<i64> = phases().map(|(_, (index, _))| index as i64).collect();
    let names: Vec<&str> = phases().map(|(_, (_, p))| p.name.as_str()).collect();
    let plugins: Vec<&str> = phases().map(|(_, (_, p))| p.plugin.as_str()).collect();
    let wanted: Vec<Option<&str>> = phases().map(|(_, (_, p))| p.version.as_deref()).collect();
    let configs: Vec<String> = phases()
        .map(|(_, (_, p))| crate::model::json::text(&p.config))
        .collect();
    let timeouts: Vec<i64> = phases().map(|(_, (_, p))| p.timeout_ms as i64).collect();
    let rows = query(
        tx,
        "WITH input AS (
             SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[],
                                  $5::bigint[], $6::text[], $7::text[], $8::text[], $9::text[],
                                  $10::bigint[], $11::text[])
                 WITH ORDINALITY
                 AS i(id, payload, priority, run_at, max_attempts, backoff, idempotency_key,
                      webhook_url, webhook_secret, created_at, concurrency_key, n)
         ), wanted AS (
             SELECT w.n, w.idx, w.name, w.plugin, w.config, w.timeout_ms,
                    CASE WHEN w.version IS NULL THEN pl.active_version ELSE v.version END
                        AS version
             FROM unnest($12::bigint[], $13::bigint[], $14::text[], $15::text[], $16::text[],
                         $17::text[], $18::bigint[])
                 AS w(n, idx, name, plugin, version, config, timeout_ms)
             LEFT JOIN plugins pl ON pl.name = w.plugin
             LEFT JOIN plugin_versions v ON v.plugin = w.plugin AND v.version = w.version
         ), job AS (
             INSERT INTO jobs (id, status, payload, priority, run_at, max_attempts, backoff,
                               idempotency_key, webhook_url, webhook_secret, created_at,
                               concurrency_key)
             SELECT id, 'pending', payload, priority, run_at, max_attempts, backoff,
                    idempotency_key, webhook_url, webhook_secret, created_at, concurrency_key
             FROM input i
             WHERE NOT EXISTS (SELECT 1 FROM wanted w WHERE w.n = i.n AND w.version IS NULL)
             ORDER BY i.idempotency_key, i.n
             ON CONFLICT (idempotency_key) DO NOTHING
             RETURNING id
         ), stored AS (
             INSERT INTO phases (job_id, idx, name, plugin, version, config, timeout_ms, status)
             SELECT i.id, w.idx, w.name, w.plugin, w.version, w.config, w.timeout_ms, 'pending'
             FROM job JOIN input i ON i.id = job.id JOIN wanted w ON w.n = i.n
         )
         SELECT i.id IN (SELECT id FROM job),
                array_agg(w.version ORDER BY w.idx) FILTER (WHERE w.n IS NOT NULL)
         FROM input i LEFT JOIN wanted w ON w.n = i.n
         GROUP BY i.n, i.id ORDER BY i.n",
        &[
            &ids,
            &payloads,
            &priorities,
            &run_ats,
            &max_attempts,
            &backoffs,
            &keys,
            &urls,
            &secrets,
            &created_ats,
            &concurrency,
            &owners,
            &indexes,
            &names,
            &plugins,
            &wanted,
            &configs,
            &timeouts,
        ],
    )
    .await?;
    if rows.len() != news.len() {
        return Err(corrupt("a batch of creates", "a job without its row"));
    }
    Ok((rows.iter())
        .map(|row| Inserted {
            stored: row.get(0),
            pinned: row.get::<_, Option<_>>(1).unwrap_or_default(),
        })
        .collect())
}

/// What a create that [`insert`] ran comes to: the job stored, with its
/// event; or the phase whose plugin is unknown; or the job its idempotency
/// key already named.
async fn created(
    tx: &Tx<'_>,
    scope: &mut WriteScope,
    new: &NewJob,
    inserted: Inserted,
) -> Result<CreateOutcome> {
    let mut pinned = Vec::with_capacity(inserted.pinned.len());
    for (version, phase) in inserted.pinned.into_iter().zip(&new.phases) {
        match version {
            Some(version) => pinned.push(version),
            None => return Ok(phase.unknown_plugin()),
        }
    }
    if !inserted.stored {
        let row = query_opt(
            tx,
            "SELECT id FROM jobs WHERE idempotency_key = $1",
            &[&new.idempotency_key],
        )
        .await?
        .ok_or_else(|| corrupt("idempotency key without its job", "?"))?;
        let id: String = row.get(0);
        return Ok(CreateOutcome::Existing(must_load(tx, &id).await?));
    }
    let job = new.stored(pinned);
    job_event(tx, scope, &job.id, EventBody::created(&job), new.created_at).await?;
    Ok(CreateOutcome::Created(job, None))
}

/// Whether a pending job other than `job_id` is due at `now` (for a key,
/// one with room).
async fn other_job_due(tx: &Tx<'_>, job_id: &str, now: i64) -> Result<bool> {
    let sql = format!(
        "SELECT EXISTS (SELECT 1 FROM jobs
                        WHERE status = 'pending' AND concurrency_key IS NULL
                          AND run_at <= $1 AND id <> $2)
             OR {}",
        keys::KEY_DUE
    );
    Ok(query_one(tx, &sql, &[&now, &job_id, &1_i64]).await?.get(0))
}

/// Wakes the jobs waiting for plugins that have room again
/// (`storage::plugin_limits`), and claims up to `limit` due jobs (see
/// [`claim_pending`]). Which plugins have jobs waiting is asked beside the
/// claim, pipelined: no round trip more while none do.
pub(super) async fn claim(
    tx: &Tx<'_>,
    scope: &mut WriteScope,
    now: i64,
    limit: usize,
) -> Result<Vec<Claimed>> {
    let (mut claimed, waiting) = futures::try_join!(
        claim_pending(tx, scope, now, limit),
        plugin_limits::waiting_plugins(tx)
    )?;
    if plugin_limits::wake_waiting(tx, &waiting, now).await? && claimed.len() < limit {
        let more = claim_pending(tx, scope, now, limit - claimed.len()).await?;
        claimed.extend(more);
    }
    Ok(claimed)
}

/// Claims up to `limit` due jobs, highest priority first, then earliest
/// `run_at`, skipping rows another claimer holds, and starts the first
/// unfinished phase of each (unless its plugin has limits: its worker asks
/// to start it). While no concurrency key is ready, that is
/// one statement over the jobs without a key; else the claim goes through
/// the rotation (`storage::concurrency`).
async fn claim_pending(
    tx: &Tx<'_>,
    scope: &mut WriteScope,
    now: i64,
    limit: usize,
) -> Result<Vec<Claimed>> {
    let claimed = claim_picked(tx, scope, now, limit, Pick::Unkeyed { keys_ready: false }).await?;
    // Nothing claimed: nothing is due, or a key is ready, whose turn it
    // may be. (Asked only then: a busy queue's claims take jobs, and each
    // statement costs the database more than the round trip.)
    if !claimed.is_empty() || !keys::any_ready(tx, now).await? {
        return Ok(claimed);
    }
    match keys::take_turns(tx, now, limit).await? {
        Some(taken) => {
            let claimed = claim_picked(tx, scope, now, limit, Pick::Ids(&taken.ids)).await?;
            keys::settle(tx, &taken.keys, &taken.turns, &taken.tokens, now).await?;
            Ok(claimed)
        }
        None => claim_picked(tx, scope, now, limit, Pick::Unkeyed { keys_ready: true }).await,
    }
}

/// The jobs a claim takes.
enum Pick<'a> {
    /// Due jobs without a key; unless `keys_ready`, none when a key is
    /// ready (whose turn it may be).
    Unkeyed { keys_ready: bool },
    /// These jobs, chosen by the rotation.
    Ids(&'a [String]),
}

/// Claims the jobs `pick` names, up to `limit` of them: one statement,
/// which returns each claimed job once per phase, with its phases as they
/// were before it.
async fn claim_picked(
    tx: &Tx<'_>,
    scope: &mut WriteScope,
    now: i64,
    limit: usize,
    pick: Pick<'_>,
) -> Result<Vec<Claimed>> {
    let (picked, fourth): (&str, &(dyn ToSql + Sync)) = match &pick {
        Pick::Unkeyed { keys_ready } => (
            "SELECT id FROM jobs
             WHERE status = 'pending' AND concurrency_key IS NULL AND run_at <= $1
               AND ($4::boolean OR NOT EXISTS (SELECT 1 FROM concurrency_keys
                                               WHERE ready_at <= $1))
             ORDER BY priority DESC, run_at, id LIMIT $2
             FOR UPDATE SKIP LOCKED",
            keys_ready,
        ),
        Pick::Ids(ids) => (
            "SELECT id FROM jobs WHERE id = ANY($4::text[]) AND status = 'pending' LIMIT $2
             FOR UPDATE SKIP LOCKED",
            ids,
        ),
    };
    let sql = format!(
        "WITH picked AS ({picked}), claimed AS (
             UPDATE jobs j SET status = 'running', attempt = j.attempt + 1, lease = j.lease + 1,
                              started_at = COALESCE(j.started_at, $1), owner = $3,
                              cancel_requested = false
             FROM picked WHERE j.id = picked.id
             RETURNING {J_JOB_COLUMNS}
         ), first AS (
             SELECT DISTINCT ON (p.job_id) p.job_id, p.idx
             FROM phases p JOIN claimed c ON p.job_id = c.id
             WHERE p.status <> 'completed'
             ORDER BY p.job_id, p.idx
         ), started AS (
             UPDATE phases p SET status = 'running', attempts = p.attempts + 1, started_at = $1,
                                 finished_at = NULL, progress = NULL
             FROM first WHERE p.job_id = first.job_id AND p.idx = first.idx
                          AND p.status = 'pending' AND {FREELY_STARTED}
             RETURNING p.job_id, p.idx
         )
         SELECT c.*, s.idx, {PHASE_COLUMNS}
         FROM claimed c JOIN phases p ON p.job_id = c.id
         LEFT JOIN started s ON s.job_id = c.id
         ORDER BY c.id, p.idx"
    );
    let rows = query(tx, &sql, &[&now, &(limit as i64), &&*scope.host, fourth]).await?;
    // (claimed job, the phase the claim started)
    let mut claimed: Vec<(Claimed, Option<i32>)> = Vec::new();
    for row in &rows {
        if claimed
            .last()
            .is_none_or(|(c, _)| c.job.id != row.get::<_, &str>(0))
        {
            let job = decode_job(row)?;
            let lease = Lease {
                job_id: job.id.clone(),
                attempt: job.attempt,
                token: row.get(LEASE_COLUMN),
            };
            claimed.push((Claimed { job, lease }, row.get(STARTED_COLUMN)));
        }
        let (last, _) = claimed.last_mut().expect("pushed above");
        last.job.phases.push(decode_phase(row, STARTED_COLUMN + 1)?);
    }
    claimed.sort_by(|(a, _), (b, _)| crate::storage::jobs::claim_order(&a.job, &b.job));
    let mut jobs = Vec::with_capacity(claimed.len());
    for (Claimed { mut job, lease }, started) in claimed {
        let attempt = job.attempt;
        job_event(
            tx,
            scope,
            &job.id,
            EventBody::JobStarted(JobStarted { attempt }),
            now,
        )
        .await?;
        if let Some(phase) = started.and_then(|index| job.phases.get_mut(index as usize)) {
            phase.status = PhaseStatus::Running;
            phase.attempts += 1;
            phase.started_at = Some(now);
            phase.finished_at = None;
            phase.progress = None;
            job_event(tx, scope, &job.id, EventBody::phase_started(phase), now).await?;
        }
        jobs.push(Claimed { job, lease });
    }
    Ok(jobs)
}

/// Where a claim's row holds the index of the phase it started, just
/// after the job's columns; the phase's columns follow.
const STARTED_COLUMN: usize = LEASE_COLUMN + 1;

/// Claims the job just created, which the caller knows is due and the only
/// job due: the job and its first phase started in one statement.
async fn claim_created(
    tx: &Tx<'_>,
    scope: &mut WriteScope,
    job: &mut Job,
    now: i64,
) -> Result<Lease> {
    let row = query_one(
        tx,
        &format!(
            "WITH claimed AS (
             UPDATE jobs SET status = 'running', attempt = 1, lease = lease + 1, started_at = $2,
                             owner = $3
             WHERE id = $1 RETURNING lease
         ), started AS (
             UPDATE phases p SET status = 'running', attempts = attempts + 1, started_at = $2
             WHERE job_id = $1 AND idx = 0 AND status = 'pending' AND {FREELY_STARTED}
             RETURNING idx
         )
         SELECT (SELECT lease FROM claimed), (SELECT count(*) FROM started)"
        ),
        &[&job.id, &now, &&*scope.host],
    )
    .await?;
    let token: Option<i64> = row.get(0);
    let token = token.ok_or_else(|| corrupt("job vanished inside its transaction", &job.id))?;
    job.status = JobStatus::Running;
    job.attempt = 1;
    job.started_at = Some(now);
    let started = EventBody::JobStarted(JobStarted { attempt: 1 });
    job_event(tx, scope, &job.id, started, now).await?;
    // A new job's phases are all pending: the first one started.
    if row.get::<_, i64>(1) == 1
        && let Some(first) = job.phases.first_mut()
    {
        first.status = PhaseStatus::Running;
        first.attempts += 1;
        first.started_at = Some(now);
        job_event(tx, scope, &job.id, EventBody::phase_started(first), now).await?;
    }
    Ok(Lease {
        job_id: job.id.clone(),
        attempt: 1,
        token,
    })
}
