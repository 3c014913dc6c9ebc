//! Group commit on PostgreSQL: writes that arrive while every lane of
//! theirs is busy share one transaction, at most `MAX_BATCH` of them; one
//! that fails there fails alone;
//! the jobs a batch of completions claims start after the jobs it ended;
//! a phase completed twice in one batch completes once, and one under a
//! lost lease changes nothing beside the others; two creates with one
//! idempotency key in one batch store one job.
//! A lock on a table, held by the test, keeps the lanes busy.

use std::sync::Arc;
use std::time::Duration;

use jobhost::model::EventKind;
use jobhost::storage::postgres::{LANES, MAX_BATCH};
use jobhost::storage::{
    Completion, CreateOutcome, Guarded, Lease, NewJob, PhaseDone, Result, Storage,
};

use crate::conformance::races::assert_each_stored_but_the_taken_one;
use crate::conformance::{create, done, fresh, job, kinds, with_echo};
use crate::fixture::{Backend, DataDir, postgres};

/// Creates waiting behind the lanes, beyond the first one of each lane.
const QUEUED: usize = 36;

/// A fresh PostgreSQL store with `echo`, its data directory and its
/// database's URL; none where no server runs.
async fn store_with_echo() -> Option<(Arc<Storage>, DataDir, String)> {
    if !postgres::available().await {
        return None;
    }
    let (store, dir) = fresh(Backend::Postgres).await;
    with_echo(&store).await;
    let url = dir.database_url().expect("a PostgreSQL data directory");
    Some((store, dir, url))
}

/// Runs `writes` (each one lane's kind): the first [`LANES`] each take a
/// lane and wait at a lock on `table`, then the others queue behind them,
/// then the lock goes. Their outcomes, in order.
async fn behind_busy_lanes<W: Future + Unpin>(
    url: &str,
    table: &str,
    mut writes: Vec<W>,
) -> Vec<W::Output> {
    let locker = connect(url).await;
    locker
        .batch_execute(&format!(
            "BEGIN; LOCK TABLE {table} IN SHARE ROW EXCLUSIVE MODE"
        ))
        .await
        .unwrap();
    // Another connection watches: one in a transaction sees the activity
    // of others as it was when it first looked.
    let watcher = connect(url).await;
    for (n, write) in writes.iter_mut().enumerate() {
        // Its first poll queues it.
        assert!(futures::poll!(&mut *write).is_pending());
        if n < LANES {
            // One lane more waits at the lock, with this write alone.
            wait_for_lock_waiters(&watcher, n + 1).await;
        }
    }
    locker.batch_execute("COMMIT").await.unwrap();
    futures::future::join_all(writes).await
}

/// Creates the jobs `ids` names behind busy lanes: each id with its
/// outcome.
async fn create_behind_busy_lanes(
    store: &Arc<Storage>,
    url: &str,
    ids: Vec<String>,
) -> Vec<(String, Result<CreateOutcome>)> {
    let creates = ids
        .iter()
        .map(|id| store.create_job(job(id, 1), None))
        .collect();
    let outcomes = behind_busy_lanes(url, "jobs", creates).await;
    ids.into_iter().zip(outcomes).collect()
}

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

/// Waits until `count` of jobhost's connections wait for a lock (those
/// waiting to parse a statement show as idle, so the state is not asked).
async fn wait_for_lock_waiters(watcher: &tokio_postgres::Client, count: usize) {
    let sql = "SELECT count(*) FROM pg_stat_activity
               WHERE application_name = 'jobhost' AND datname = current_database()
                 AND wait_event_type = 'Lock'";
    let waited = tokio::time::timeout(Duration::from_secs(10), async {
        while (watcher.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) as usize) < count {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    waited.await.expect("the lanes reach the lock");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_that_arrive_while_the_lanes_are_busy_share_one_transaction() {
    let Some((store, _dir, url)) = store_with_echo().await else {
        return;
    };
    let before = store.writer_stats();
    let ids = (0..LANES + QUEUED).map(|i| format!("new-{i}")).collect();
    let outcomes = create_behind_busy_lanes(&store, &url, ids).await;
    assert_each_stored_but_the_taken_one(outcomes);
    let writes = store.writer_stats().since(before);
    // One transaction for each lane's first create, and one for the rest.
    assert_eq!(
        (writes.commits, writes.writes),
        ((LANES + 1) as u64, (LANES + QUEUED) as u64)
    );
    assert_eq!(
        store.pending_count().await.unwrap(),
        (LANES + QUEUED) as u64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_holds_at_most_max_batch_writes() {
    let Some((store, _dir, url)) = store_with_echo().await else {
        return;
    };
    let before = store.writer_stats();
    let queued = MAX_BATCH + 1;
    let ids = (0..LANES + queued).map(|i| format!("new-{i}")).collect();
    let outcomes = create_behind_busy_lanes(&store, &url, ids).await;
    assert_each_stored_but_the_taken_one(outcomes);
    // The queued creates take two transactions: a full one, and one more.
    let writes = store.writer_stats().since(before);
    assert_eq!(
        (writes.commits, writes.writes),
        ((LANES + 2) as u64, (LANES + queued) as u64)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_with_one_idempotency_key_in_one_batch_store_one_job() {
    let Some((store, _dir, url)) = store_with_echo().await else {
        return;
    };
    let keyed = |id: &str| NewJob {
        idempotency_key: Some("once".into()),
        ..job(id, 1)
    };
    let before = store.writer_stats();
    // Each lane's first create waits at the lock; the two keyed ones queue
    // for one batch, so one statement inserts both.
    let news = (0..LANES)
        .map(|i| job(&format!("first-{i}"), 1))
        .chain([keyed("keyed-a"), keyed("keyed-b")]);
    let creates = news.map(|new| store.create_job(new, None)).collect();
    let outcomes = behind_busy_lanes(&url, "jobs", creates).await;
    match (&outcomes[LANES], &outcomes[LANES + 1]) {
        (Ok(CreateOutcome::Created(created, _)), Ok(CreateOutcome::Existing(existing))) => {
            assert_eq!(
                (created.id.as_str(), existing.id.as_str()),
                ("keyed-a", "keyed-a")
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        store.writer_stats().since(before).commits,
        (LANES + 1) as u64
    );
    assert_eq!(store.pending_count().await.unwrap(), (LANES + 1) as u64);
    assert_eq!(kinds(&store, "keyed-b").await, Vec::<&str>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_that_fails_in_a_shared_transaction_fails_alone() {
    let Some((store, _dir, url)) = store_with_echo().await else {
        return;
    };
    create(&store, job("taken", 1)).await;
    // The taken id is queued with the others, in the middle.
    let ids: Vec<String> = (0..LANES + QUEUED)
        .map(|i| match i == LANES + QUEUED / 2 {
            true => "taken".to_owned(),
            false => format!("new-{i}"),
        })
        .collect();
    let outcomes = create_behind_busy_lanes(&store, &url, ids.clone()).await;
    assert_each_stored_but_the_taken_one(outcomes);
    assert_eq!(
        store.pending_count().await.unwrap(),
        (LANES + QUEUED) as u64
    );
    for id in &ids {
        // The shared attempt left nothing: each event is logged once.
        assert_eq!(kinds(&store, id).await, ["job:created"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_a_batch_of_completions_claims_start_after_those_it_ended_in_the_log() {
    let Some((store, _dir, url)) = store_with_echo().await else {
        return;
    };
    let running = LANES + QUEUED;
    for i in 0..running {
        create(&store, job(&format!("running-{i:02}"), 1)).await;
    }
    let claimed = store.claim_due_jobs(2_000, running).await.unwrap();
    assert_eq!(claimed.len(), running);
    for i in 0..QUEUED {
        create(&store, job(&format!("next-{i:02}"), 1)).await;
    }
    // Each lane's first completion ends its job; the queued ones, batched,
    // each claim their worker's next job.
    let completions = claimed.iter().enumerate().map(|(n, claimed)| {
        let done = PhaseDone {
            claim_next: n >= LANES,
            ..done(0, false, 3_000)
        };
        store.complete_phase(&claimed.lease, done)
    });
    let before = store.writer_stats();
    let outcomes = behind_busy_lanes(&url, "phases", completions.collect()).await;
    let next = outcomes
        .iter()
        .filter(|outcome| matches!(outcome, Ok(Guarded::Applied(Completion::Claimed(_)))));
    assert_eq!(next.count(), QUEUED, "{outcomes:?}");
    // One transaction for each lane's first completion, one for the rest.
    assert_eq!(
        store.writer_stats().since(before).commits,
        (LANES + 1) as u64
    );
    // Walking the log, the workers never run more jobs than there are.
    let log = store.tail_log(0, 10_000).await.unwrap();
    let (mut at_once, mut most) = (0_i64, 0_i64);
    for event in &log {
        match event.kind() {
            EventKind::JobStarted => at_once += 1,
            EventKind::JobCompleted => at_once -= 1,
            _ => {}
        }
        most = most.max(at_once);
    }
    assert_eq!(
        most, running as i64,
        "jobs running at once, in the log's order"
    );
    assert_eq!(at_once, QUEUED as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_phase_completed_twice_in_one_batch_completes_once() {
    let Some((store, _dir, url)) = store_with_echo().await else {
        return;
    };
    for i in 0..=LANES {
        create(&store, job(&format!("job-{i}"), 1)).await;
    }
    let claimed = store.claim_due_jobs(2_000, LANES + 1).await.unwrap();
    assert_eq!(claimed.len(), LANES + 1);
    // Each lane's first completion waits at the lock; the last job's phase
    // is completed twice under its lease, both queued for one batch.
    let twice = &claimed[LANES];
    let before = store.writer_stats();
    let completions = (claimed.iter().chain([twice]))
        .map(|claimed| store.complete_phase(&claimed.lease, done(0, false, 3_000)))
        .collect();
    let outcomes = behind_busy_lanes(&url, "phases", completions).await;
    let recorded = |outcome: &&Result<Guarded<Completion>>| {
        matches!(outcome, Ok(Guarded::Applied(Completion::Recorded)))
    };
    assert_eq!(
        outcomes[LANES..].iter().filter(recorded).count(),
        1,
        "{outcomes:?}"
    );
    assert!(
        (outcomes[LANES..].iter()).any(|outcome| matches!(outcome, Ok(Guarded::Stale))),
        "{outcomes:?}"
    );
    // In one batch: the second completion's statement saw the first's.
    assert_eq!(
        store.writer_stats().since(before).commits,
        (LANES + 1) as u64
    );
    let logged = kinds(&store, &twice.lease.job_id).await;
    for kind in ["job:phase:completed", "job:completed"] {
        let times = logged.iter().filter(|logged| **logged == kind).count();
        assert_eq!(times, 1, "{kind} in {logged:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_under_a_lost_lease_in_a_batch_changes_nothing() {
    let Some((store, _dir, url)) = store_with_echo().await else {
        return;
    };
    for i in 0..LANES + 2 {
        create(&store, job(&format!("job-{i}"), 1)).await;
    }
    let claimed = store.claim_due_jobs(2_000, LANES + 2).await.unwrap();
    assert_eq!(claimed.len(), LANES + 2);
    // The job's lease has moved on (as when another host took it over).
    let lost = Lease {
        token: claimed[LANES].lease.token + 1,
        ..claimed[LANES].lease.clone()
    };
    let leases = (claimed.iter().map(|claimed| &claimed.lease))
        .enumerate()
        .map(|(n, lease)| if n == LANES { &lost } else { lease });
    let before = store.writer_stats();
    let completions = leases
        .map(|lease| store.complete_phase(lease, done(0, false, 3_000)))
        .collect();
    let outcomes = behind_busy_lanes(&url, "phases", completions).await;
    assert!(
        matches!(outcomes[LANES], Ok(Guarded::Fenced)),
        "{outcomes:?}"
    );
    assert!(
        matches!(
            outcomes[LANES + 1],
            Ok(Guarded::Applied(Completion::Recorded))
        ),
        "{outcomes:?}"
    );
    // In one batch, not each write alone.
    assert_eq!(
        store.writer_stats().since(before).commits,
        (LANES + 1) as u64
    );
    let untouched = kinds(&store, &lost.job_id).await;
    assert_eq!(
        untouched,
        ["job:created", "job:started", "job:phase:started"]
    );
}
