//! Claiming due jobs, highest priority first, and starting their first
//! unfinished phase, each under a new lease.

use rusqlite::{Connection, OptionalExtension, params};

use super::rows::{JOB_COLUMNS, LEASE_COLUMN, RawJob, job_row, phases_of};
use super::transitions::{job_event, mark_phase_running};
use super::writer::EventLog;
use super::{keys, plugin_limits};
use crate::model::event::JobStarted;
use crate::model::{EventBody, Job, JobStatus, Phase, PhaseStatus};
use crate::storage::{Claimed, Lease, Result};

/// The priorities of pending jobs, highest first, as the table `levels`
/// (ending with a NULL row): one seek of `jobs_due` each. Every search for
/// due jobs goes one priority at a time. Priority leads that index, so a
/// search for `run_at <= now` across priorities reads every pending job,
/// the ones scheduled for later too (BENCHMARKS.md, "Latency", shows what
/// that cost). Within one priority, the due jobs
/// come first, so a search stops at the first job not yet due. Searches
/// cost a seek per priority they visit: the claim and the check for
/// another due job stop at the first priorities that satisfy them.
pub(super) const PENDING_PRIORITIES: &str = "
    WITH RECURSIVE levels(priority) AS (
        SELECT (SELECT priority FROM jobs INDEXED BY jobs_due WHERE status = 'pending' AND concurrency_key IS NULL
                ORDER BY priority DESC LIMIT 1)
        UNION ALL
        SELECT (SELECT priority FROM jobs INDEXED BY jobs_due
                WHERE status = 'pending' AND concurrency_key IS NULL AND priority < levels.priority
                ORDER BY priority DESC LIMIT 1)
        FROM levels WHERE levels.priority IS NOT NULL
    )";

/// Whether a pending job other than `?2` is due at `?1`.
pub(super) const OTHER_JOB_DUE: &str = "
    SELECT EXISTS (SELECT 1 FROM levels CROSS JOIN jobs INDEXED BY jobs_due
                   WHERE jobs.status = 'pending' AND jobs.concurrency_key IS NULL AND jobs.priority = levels.priority
                     AND jobs.run_at <= ?1 AND jobs.id != ?2)";

/// The earliest `run_at` of any pending job.
pub(super) const NEXT_DUE: &str = "
    SELECT MIN((SELECT run_at FROM jobs INDEXED BY jobs_due
                WHERE status = 'pending' AND concurrency_key IS NULL AND priority = levels.priority
                ORDER BY run_at LIMIT 1))
    FROM levels WHERE priority IS NOT NULL";

/// How many pending jobs are due at `?1`.
pub(super) const DUE_COUNT: &str = "
    SELECT COALESCE(SUM((SELECT COUNT(*) FROM jobs INDEXED BY jobs_due
                         WHERE status = 'pending' AND concurrency_key IS NULL AND priority = levels.priority
                           AND run_at <= ?1)), 0)
    FROM levels WHERE priority IS NOT NULL";

/// Up to `?2` jobs without a key of priority `?3` due at `?1`, earliest
/// first.
pub(super) const DUE_AT_LEVEL: &str = "
    SELECT id FROM jobs INDEXED BY jobs_due
    WHERE status = 'pending' AND concurrency_key IS NULL AND priority = ?3 AND run_at <= ?1
    ORDER BY run_at, id LIMIT ?2";

/// What a claim sets on each job it takes, `?1` being now.
const CLAIM_SET: &str = "UPDATE jobs SET status = 'running', attempt = attempt + 1,
                         lease = lease + 1, started_at = COALESCE(started_at, ?1)";

/// Claims up to `?2` jobs of priority `?3` due at `?1`, earliest first.
pub(super) fn claim_level_sql() -> String {
    format!("{CLAIM_SET} WHERE id IN ({DUE_AT_LEVEL}) RETURNING {JOB_COLUMNS}, lease")
}

/// Whether a pending job other than `job_id` is due at `now` (for a key,
/// one with room).
pub(super) fn other_job_due(conn: &Connection, job_id: &str, now: i64) -> Result<bool> {
    let unkeyed: bool = conn
        .prepare_cached(&format!("{PENDING_PRIORITIES} {OTHER_JOB_DUE}"))?
        .query_row(params![now, job_id], |row| row.get(0))?;
    Ok(unkeyed || keys::key_due(conn, now)?)
}

/// When a job will be due that a claim could take: a key's only once it
/// has room (a worker that finishes wakes the dispatcher), and a job
/// waiting for a plugin once the plugin may wake it.
pub(super) fn next_due_at(conn: &Connection) -> Result<Option<i64>> {
    let unkeyed: Option<i64> = conn
        .prepare_cached(&format!("{PENDING_PRIORITIES} {NEXT_DUE}"))?
        .query_row([], |row| row.get(0))?;
    let keyed = keys::next_key_due(conn)?;
    let waiting = plugin_limits::next_plugin_wake(conn)?;
    Ok(unkeyed.into_iter().chain(keyed).chain(waiting).min())
}

/// The highest priority of a pending job below `?1`: one index seek.
pub(super) const PRIORITY_BELOW: &str = "
    SELECT priority FROM jobs INDEXED BY jobs_due WHERE status = 'pending' AND concurrency_key IS NULL AND priority < ?1
    ORDER BY priority DESC LIMIT 1";

pub(super) fn pending_priority_below(conn: &Connection, below: i64) -> Result<Option<i64>> {
    Ok(conn
        .prepare_cached(PRIORITY_BELOW)?
        .query_row([below], |row| row.get(0))
        .optional()?)
}

/// Wakes the jobs waiting for plugins that have room again
/// (`storage::plugin_limits`), then claims due jobs, highest priority
/// first, and starts the first unfinished phase of each (unless its plugin
/// has limits: its worker asks to start it): in the rotation's order when a concurrency key is ready
/// (`storage::concurrency`), else from `jobs_due` alone. Without `INDEXED BY`, SQLite chose `jobs_status` and
/// sorted every pending job on each claim, so claims slowed down as the
/// backlog grew. The claimed rows come back from the update itself, and the
/// started phase is updated in memory rather than read again: claims are
/// most of the writer's work.
pub(super) fn claim(
    conn: &Connection,
    log: &mut EventLog,
    now: i64,
    limit: usize,
) -> Result<Vec<Claimed>> {
    plugin_limits::wake_waiting(conn, now)?;
    let claimed = match keys::take_turns(conn, now, limit)? {
        Some(turns) => {
            let mut claim_one = conn.prepare_cached(&format!(
                "{CLAIM_SET} WHERE id = ?2 AND status = 'pending' RETURNING {JOB_COLUMNS}, lease"
            ))?;
            let mut claimed = Vec::with_capacity(turns.ids.len());
            for id in &turns.ids {
                claimed.push(claim_one.query_row(params![now, id], |row| {
                    Ok((job_row(row)?, row.get(LEASE_COLUMN)?))
                })?);
            }
            keys::settle(conn, &turns.keys, now)?;
            claimed
        }
        None => claim_unkeyed(conn, now, limit)?,
    };
    let mut jobs = Vec::with_capacity(claimed.len());
    for (raw, token) in claimed {
        let mut job = raw.decode()?;
        job.phases = phases_of(conn, &job.id)?;
        start_claimed(conn, log, &mut job, now)?;
        let lease = Lease {
            job_id: job.id.clone(),
            attempt: job.attempt,
            token,
        };
        jobs.push(Claimed { job, lease });
    }
    // RETURNING has no order.
    crate::storage::jobs::in_claim_order(&mut jobs);
    Ok(jobs)
}

/// Claims due jobs without a key, highest priority first.
fn claim_unkeyed(conn: &Connection, now: i64, limit: usize) -> Result<Vec<(RawJob, i64)>> {
    by_priority(conn, limit, |priority, wanted| {
        Ok(conn
            .prepare_cached(&claim_level_sql())?
            .query_map(params![now, wanted, priority], |row| {
                Ok((job_row(row)?, row.get(LEASE_COLUMN)?))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?)
    })
}

/// What `take(priority, wanted)` takes from each priority of pending jobs
/// without a key, highest first, until `want` are taken. Priorities are
/// visited only until then: there may be many of them.
pub(super) fn by_priority<T>(
    conn: &Connection,
    want: usize,
    mut take: impl FnMut(i64, i64) -> Result<Vec<T>>,
) -> Result<Vec<T>> {
    let mut taken = Vec::new();
    let mut below = i64::MAX;
    while taken.len() < want
        && let Some(priority) = pending_priority_below(conn, below)?
    {
        taken.extend(take(priority, (want - taken.len()) as i64)?);
        below = priority;
    }
    Ok(taken)
}

/// Claims the job just created, which the caller knows is due and the only
/// job due: what [`claim`] would do, without searching for it or reading
/// back what was just written.
pub(super) fn claim_created(
    conn: &Connection,
    log: &mut EventLog,
    job: &mut Job,
    now: i64,
) -> Result<Lease> {
    conn.prepare_cached(
        "UPDATE jobs SET status = 'running', attempt = 1, lease = 1, started_at = ?2 WHERE id = ?1",
    )?
    .execute(params![job.id, now])?;
    job.status = JobStatus::Running;
    job.attempt = 1;
    job.started_at = Some(now);
    start_claimed(conn, log, job, now)?;
    Ok(Lease {
        job_id: job.id.clone(),
        attempt: 1,
        token: 1,
    })
}

/// Announces a job just marked running and starts its first unfinished
/// phase, in the job's copy too.
pub(super) fn start_claimed(
    conn: &Connection,
    log: &mut EventLog,
    job: &mut Job,
    now: i64,
) -> Result<()> {
    let started = EventBody::JobStarted(JobStarted {
        attempt: job.attempt,
    });
    job_event(conn, log, &job.id, started, now)?;
    if let Some(first) = job
        .phases
        .iter_mut()
        .find(|p| p.status != PhaseStatus::Completed)
    {
        start_loaded_phase(conn, log, &job.id, first, now)?;
    }
    Ok(())
}

/// Starts a pending phase of a running job whose row the caller has just
/// read, and updates that copy to match.
pub(super) fn start_loaded_phase(
    conn: &Connection,
    log: &mut EventLog,
    job_id: &str,
    phase: &mut Phase,
    now: i64,
) -> Result<bool> {
    if !mark_phase_running(conn, job_id, phase.index, now)? {
        return Ok(false);
    }
    phase.status = PhaseStatus::Running;
    phase.attempts += 1;
    phase.started_at = Some(now);
    phase.finished_at = None;
    job_event(conn, log, job_id, EventBody::phase_started(phase), now)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use rusqlite::Connection;
    use serde_json::json;

    use super::super::create::{INSERT_JOB, create};
    use super::super::writer::EventLog;
    use super::*;
    use crate::model::{BackoffPolicy, Json};
    use crate::storage::{NewJob, NewPhase};

    /// A job of two `echo` phases, "first" (the active version) and
    /// "second" (2.0.0), with every option set.
    fn two_phase_job(id: &str) -> NewJob {
        let phase = |name: &str, version: Option<&str>| NewPhase {
            name: name.into(),
            plugin: "echo".into(),
            version: version.map(Into::into),
            config: json!({"name": name}),
            timeout_ms: 1234,
        };
        NewJob {
            id: id.into(),
            payload: Json::from_value(&json!({"rows": [1, 2, 3], "note": "é"})),
            priority: 7,
            run_at: 1_000,
            max_attempts: 4,
            backoff: BackoffPolicy {
                initial_ms: 10,
                multiplier: 1.5,
                max_ms: 100,
                jitter: false,
            },
            idempotency_key: Some("key-1".into()),
            webhook_url: Some("http://127.0.0.1:9/hook".into()),
            webhook_secret: Some("whsec_c2VjcmV0".into()),
            concurrency_key: None,
            phases: vec![phase("first", None), phase("second", Some("2.0.0"))],
            created_at: 900,
        }
    }

    /// A connection set up like the writer's, on an in-memory database
    /// with the plugin versions `two_phase_job` pins.
    fn writer_with_echo() -> Connection {
        let mut conn = Connection::open_in_memory().unwrap();
        super::super::migrate(&mut conn).unwrap();
        super::super::tune(&conn).unwrap();
        conn.execute_batch(
            "INSERT INTO plugins (name, active_version, created_at) VALUES ('echo', '1.0.0', 0);
             INSERT INTO plugin_versions (plugin, version, content_hash, size, description, component, uploaded_at)
             VALUES ('echo', '1.0.0', 'a', 1, '', x'00', 0), ('echo', '2.0.0', 'b', 1, '', x'00', 0);",
        )
        .unwrap();
        conn
    }

    /// The SQLite VM steps these cached statements took since the last
    /// call, which starts counting anew.
    fn steps_of(conn: &Connection, statements: &[String]) -> i32 {
        statements
            .iter()
            .map(|sql| {
                let statement = conn.prepare_cached(sql).unwrap();
                statement.reset_status(rusqlite::StatementStatus::VmStep)
            })
            .sum()
    }

    /// Jobs scheduled for later cost the searches for due jobs nothing: a
    /// claim, the check at enqueue for another due job, the dispatcher's
    /// next wake-up and the due count take as many SQLite steps with 5,000
    /// of them as with 5. (Scanning `jobs_due` for `run_at <= now` across
    /// priorities read them all.)
    #[test]
    fn searches_for_due_jobs_skip_jobs_scheduled_for_later() {
        let steps = |scheduled: usize| -> i32 {
            let conn = writer_with_echo();
            let mut log = EventLog::default();
            let job = |id: String, priority: i32, run_at: i64| NewJob {
                id,
                priority,
                run_at,
                idempotency_key: None,
                ..two_phase_job("")
            };
            for i in 0..scheduled {
                let later = job(format!("later-{i}"), i as i32 % 3, 1_000_000);
                create(&conn, &mut log, &later).unwrap();
            }
            create(&conn, &mut log, &job("due".into(), 1, 0)).unwrap();

            let searches = [
                format!("{PENDING_PRIORITIES} {OTHER_JOB_DUE}"),
                format!("{PENDING_PRIORITIES} {NEXT_DUE}"),
                format!("{PENDING_PRIORITIES} {DUE_COUNT}"),
                PRIORITY_BELOW.to_owned(),
                claim_level_sql(),
            ];
            steps_of(&conn, &searches);
            assert!(other_job_due(&conn, "another", 1_000).unwrap());
            assert_eq!(next_due_at(&conn).unwrap(), Some(0));
            let due: i64 = conn
                .prepare_cached(&searches[2])
                .unwrap()
                .query_row([1_000], |row| row.get(0))
                .unwrap();
            assert_eq!(due, 1);
            let claimed = claim(&conn, &mut log, 1_000, 8).unwrap();
            assert_eq!(claimed.len(), 1);
            assert_eq!(claimed[0].job.id, "due");
            steps_of(&conn, &searches)
        };
        let (few, many) = (steps(5), steps(5_000));
        assert!(
            many < 2 * few,
            "{few} SQLite steps with 5 jobs scheduled for later, {many} with 5,000"
        );
    }

    /// A keyed job leaves its key's row alone when the row already says the
    /// key is ready as early and at a priority as high (migration 14): its
    /// insert takes the SQLite steps of one without a key, not those of the
    /// upsert, and the row still moves when a job is due earlier.
    #[test]
    fn a_keyed_job_behind_its_ready_key_leaves_the_keys_row_alone() {
        let conn = writer_with_echo();
        let mut log = EventLog::default();
        let insert = [INSERT_JOB.to_owned()];
        let mut steps = |id: &str, key: Option<&str>, run_at: i64| {
            let job = NewJob {
                id: id.into(),
                run_at,
                idempotency_key: None,
                concurrency_key: key.map(Into::into),
                ..two_phase_job("")
            };
            steps_of(&conn, &insert);
            create(&conn, &mut log, &job).unwrap();
            steps_of(&conn, &insert)
        };
        let unkeyed = steps("unkeyed", None, 10);
        let first = steps("first", Some("tenant"), 10);
        let behind = steps("behind", Some("tenant"), 20);
        let earlier = steps("earlier", Some("tenant"), 5);
        assert!(
            behind < unkeyed + 40 && first > behind + 40 && earlier > behind + 40,
            "SQLite steps of an insert: {unkeyed} without a key, {first} making the key's row, \
             {behind} behind it, {earlier} moving it"
        );
        let ready_at: i64 = conn
            .query_row(
                "SELECT ready_at FROM concurrency_keys WHERE key = 'tenant'",
                [],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(ready_at, 5);
    }

    /// A claim visits priorities only until it is full: with every pending
    /// job due and each at a priority of its own, claiming 8 takes as many
    /// SQLite steps with 5,000 priorities as with 20.
    #[test]
    fn a_claim_visits_only_the_priorities_it_takes_jobs_from() {
        let steps = |priorities: usize| -> i32 {
            let conn = writer_with_echo();
            let mut log = EventLog::default();
            for i in 0..priorities {
                let job = NewJob {
                    id: format!("job-{i}"),
                    priority: i as i32,
                    run_at: 0,
                    idempotency_key: None,
                    ..two_phase_job("")
                };
                create(&conn, &mut log, &job).unwrap();
            }
            let searches = [PRIORITY_BELOW.to_owned(), claim_level_sql()];
            steps_of(&conn, &searches);
            let claimed = claim(&conn, &mut log, 1_000, 8).unwrap();
            let priorities_claimed: Vec<i32> = claimed.iter().map(|c| c.job.priority).collect();
            let top = priorities as i32 - 1;
            assert_eq!(
                priorities_claimed,
                (top - 7..=top).rev().collect::<Vec<_>>()
            );
            steps_of(&conn, &searches)
        };
        let (few, many) = (steps(20), steps(5_000));
        assert!(
            many < 2 * few,
            "{few} SQLite steps with 20 priorities, {many} with 5,000"
        );
    }

    /// Runs `f`, counting the SQLite VM instructions it takes.
    fn instructions<T>(conn: &mut Connection, f: impl FnOnce(&Connection) -> T) -> (T, u64) {
        use std::sync::atomic::{AtomicU64, Ordering};
        let counted = std::sync::Arc::new(AtomicU64::new(0));
        let counter = counted.clone();
        let count = move || {
            counter.fetch_add(1, Ordering::Relaxed);
            false
        };
        conn.progress_handler(1, Some(count)).unwrap();
        let result = f(conn);
        conn.progress_handler(0, None::<fn() -> bool>).unwrap();
        (result, counted.load(Ordering::Relaxed))
    }

    fn keyed(id: String, key: &str, run_at: i64) -> NewJob {
        NewJob {
            id,
            concurrency_key: Some(key.into()),
            run_at,
            idempotency_key: None,
            ..two_phase_job("")
        }
    }

    /// A key at its limit is passed over for a count of its running jobs,
    /// never a read of its backlog: claiming another key's job costs as
    /// many SQLite instructions with 5,000 of the full key's jobs pending as
    /// with 5 (whichever way the rotation turns).
    #[test]
    fn a_key_at_its_limit_is_passed_over_without_reading_its_backlog() {
        let cost = |backlog: usize| -> u64 {
            let mut conn = writer_with_echo();
            let mut log = EventLog::default();
            conn.execute(
                "INSERT INTO concurrency_limits (pattern, prefix, max_running) VALUES ('full', false, 1)",
                [],
            )
            .unwrap();
            for i in 0..backlog {
                create(&conn, &mut log, &keyed(format!("full-{i}"), "full", 0)).unwrap();
            }
            assert_eq!(claim(&conn, &mut log, 1_000, 8).unwrap().len(), 1);
            create(&conn, &mut log, &keyed("other".into(), "other", 0)).unwrap();
            let (claimed, cost) = instructions(&mut conn, |conn| claim(conn, &mut log, 1_000, 8));
            let claimed = claimed.unwrap();
            assert_eq!(claimed.len(), 1);
            assert_eq!(claimed[0].job.id, "other");
            cost
        };
        let (few, many) = (cost(5), cost(5_000));
        assert!(
            many < 2 * few,
            "{few} SQLite instructions with 5 jobs of the full key, {many} with 5,000"
        );
    }

    /// Keys whose jobs are all scheduled for later cost a claim nothing
    /// while no key is ready: claiming a job without a key takes as many
    /// instructions beside 5,000 such keys as beside 5.
    #[test]
    fn keys_scheduled_for_later_cost_a_claim_nothing() {
        let cost = |keys: usize| -> u64 {
            let mut conn = writer_with_echo();
            let mut log = EventLog::default();
            for i in 0..keys {
                let later = keyed(format!("later-{i}"), &format!("k{i}"), 1_000_000);
                create(&conn, &mut log, &later).unwrap();
            }
            let due = NewJob {
                id: "due".into(),
                run_at: 0,
                idempotency_key: None,
                ..two_phase_job("")
            };
            create(&conn, &mut log, &due).unwrap();
            let (claimed, cost) = instructions(&mut conn, |conn| claim(conn, &mut log, 1_000, 8));
            assert_eq!(claimed.unwrap().len(), 1);
            cost
        };
        let (few, many) = (cost(5), cost(5_000));
        assert!(
            many < 2 * few,
            "{few} SQLite instructions beside 5 keys scheduled for later, {many} beside 5,000"
        );
    }
}
