//! Group commit on PostgreSQL: creates that arrive while every lane of
//! theirs is busy share one transaction, and one that fails there fails
//! alone. A lock on `jobs`, held by the test, keeps the lanes busy.

use std::sync::Arc;
use std::time::Duration;

use jobhost::storage::postgres::LANES;
use jobhost::storage::{CreateOutcome, Result, Storage};

use crate::conformance::races::assert_each_stored_but_the_taken_one;
use crate::conformance::{create, fresh, job, kinds, with_echo};
use crate::fixture::{Backend, postgres};

/// Creates waiting behind the lanes, beyond the first one of each lane.
const QUEUED: usize = 36;

/// Creates the jobs `ids` names: the first [`LANES`] each take a lane and
/// wait at the lock, then the others queue behind them, then the lock goes.
/// Each id with its outcome.
async fn behind_busy_lanes(
    store: &Arc<Storage>,
    url: &str,
    ids: Vec<String>,
) -> Vec<(String, Result<CreateOutcome>)> {
    let locker = connect(url).await;
    locker
        .batch_execute("BEGIN; LOCK TABLE jobs IN SHARE ROW EXCLUSIVE MODE")
        .await
        .unwrap();
    // Another connection watches: one in a transaction sees the activity
    // of others as it was when it first looked.
    let watcher = connect(url).await;
    let mut creates: Vec<_> = ids
        .iter()
        .map(|id| store.create_job(job(id, 1), None))
        .collect();
    for (n, create) in creates.iter_mut().enumerate() {
        // Its first poll queues it.
        assert!(futures::poll!(create.as_mut()).is_pending());
        if n < LANES {
            // One lane more waits at the lock, with this create alone.
            wait_for_lock_waiters(&watcher, n + 1).await;
        }
    }
    locker.batch_execute("COMMIT").await.unwrap();
    let outcomes = futures::future::join_all(creates).await;
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
    if !postgres::available().await {
        return;
    }
    let (store, dir) = fresh(Backend::Postgres).await;
    with_echo(&store).await;
    let before = store.writer_stats();
    let ids = (0..LANES + QUEUED).map(|i| format!("new-{i}")).collect();
    let outcomes = behind_busy_lanes(&store, &dir.database_url().unwrap(), ids).await;
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
async fn a_create_that_fails_in_a_shared_transaction_fails_alone() {
    if !postgres::available().await {
        return;
    }
    let (store, dir) = fresh(Backend::Postgres).await;
    with_echo(&store).await;
    create(&store, job("taken", 1)).await;
    // The taken id is queued with the others, in the middle.
    let ids: Vec<String> = (0..LANES + QUEUED)
        .map(|i| match i == LANES + QUEUED / 2 {
            true => "taken".to_owned(),
            false => format!("new-{i}"),
        })
        .collect();
    let outcomes = behind_busy_lanes(&store, &dir.database_url().unwrap(), ids.clone()).await;
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
