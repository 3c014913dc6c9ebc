//! Several hosts on one PostgreSQL database, in one process: each host its
//! own queue, runtime and data directory, as `jobhost serve` processes on
//! several machines would be. Skipped, saying so, where no PostgreSQL runs
//! (see `fixture::postgres`).

use std::sync::Arc;
use std::time::Duration;

use jobhost::model::{EventKind, JobStatus};
use jobhost::queue::Cancelled;
use jobhost::storage::{CancelOutcome, Guarded, NewJob, PgOptions};
use serde_json::json;

use crate::conformance::{done, job as stored_job, running, with_echo};
use crate::fixture::{Backend, DataDir, Host, config, echo_job, job, phase};
use jobhost::model::time::now_ms;

/// Two hosts on one database, the first without workers (it only takes
/// requests); `None` where PostgreSQL tests are skipped.
async fn two_hosts() -> Option<(Host, Host)> {
    if !crate::fixture::postgres::available().await {
        return None;
    }
    let a = Host::start_on(Backend::Postgres, config(0)).await;
    let dir = Arc::new(a.dir.beside(Backend::Postgres).await);
    let b = Host::open_on(Backend::Postgres, dir, config(2)).await;
    Some((a, b))
}

/// A store on a database of its own, and a plain connection to that
/// database to look at its tables; `None` where PostgreSQL tests are
/// skipped. The database lives as long as the `DataDir`.
async fn store_with_client() -> Option<(
    DataDir,
    Arc<jobhost::storage::Storage>,
    tokio_postgres::Client,
)> {
    if !crate::fixture::postgres::available().await {
        return None;
    }
    let dir = DataDir::new(Backend::Postgres).await;
    let url = dir.database_url().unwrap();
    let store = jobhost::storage::open_postgres(&PgOptions::new(url.clone()))
        .await
        .unwrap();
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    Some((dir, store, client))
}

/// A job submitted to a host with no free worker runs on another host,
/// and every host's event stream sees it end; a host that shuts down
/// leaves the cluster at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_submitted_to_one_host_runs_on_another() {
    let Some((mut a, mut b)) = two_hosts().await else {
        return;
    };
    a.upload("echo", "1.0.0", plugin_artifacts::ECHO).await;

    let submitted = a.enqueue(echo_job(2)).await;

    b.wait_for(&submitted.id, EventKind::JobCompleted).await;
    let seen_on_a = a.wait_for(&submitted.id, EventKind::JobCompleted).await;
    let finished = a.queue.job(&submitted.id).await.unwrap();
    assert_eq!(finished.status, JobStatus::Completed);
    assert_eq!(
        seen_on_a.seq,
        b.job_events(&submitted.id).await.last().unwrap().seq
    );

    // A host that shuts down leaves: the other sees its lease ended at once.
    b.queue.shutdown(Duration::from_secs(5)).await.unwrap();
    let hosts = a.queue.hosts().await.unwrap();
    let alive = hosts.iter().filter(|host| host.alive).count();
    assert_eq!(alive, 1, "{hosts:?}");
}

/// A cancel sent to one host stops a phase that never yields, running on
/// another host: the cancel answers once the job is cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_sent_to_one_host_stops_a_phase_running_on_another() {
    let Some((a, mut b)) = two_hosts().await else {
        return;
    };
    a.upload("spin", "1.0.0", plugin_artifacts::SPIN).await;
    let submitted = a
        .enqueue(job(vec![phase("forever", "spin", json!({}))], json!({})))
        .await;
    b.wait_for(&submitted.id, EventKind::PhaseStarted).await;
    // Either host sees both, and which one runs the job.
    let hosts = a.queue.hosts().await.unwrap();
    assert_eq!(hosts.len(), 2);
    assert!(hosts.iter().all(|host| host.alive));
    let runners: Vec<_> = hosts
        .iter()
        .filter(|host| !host.running.is_empty())
        .collect();
    assert_eq!(runners.len(), 1);
    assert_eq!(runners[0].running, std::slice::from_ref(&submitted.id));
    // Each host knows whose worker runs it.
    for (host, here) in [(&a, false), (&b, true)] {
        assert_eq!(
            host.storage
                .cancel_pending_job(&submitted.id, 0)
                .await
                .unwrap(),
            CancelOutcome::Running { on_this_host: here }
        );
    }

    assert_eq!(
        a.queue.cancel(&submitted.id).await.unwrap(),
        Cancelled::Done
    );
    let finished = b.wait_until_finished(&submitted.id).await;
    assert_eq!(finished.status, JobStatus::Cancelled);
    b.wait_idle().await;
}

/// A pause sent to one host stops new phases on every host, and a resume
/// sent to it starts them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_sent_to_one_host_holds_every_host() {
    let Some((a, mut b)) = two_hosts().await else {
        return;
    };
    a.upload("echo", "1.0.0", plugin_artifacts::ECHO).await;
    a.queue.pause().await.unwrap();
    until(|| b.queue.is_paused()).await;

    let held = a.enqueue(echo_job(1)).await;
    // The window in which a host that missed the pause would start it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        b.queue.job(&held.id).await.unwrap().status,
        JobStatus::Pending
    );

    a.queue.resume().await.unwrap();
    assert_eq!(
        b.wait_until_finished(&held.id).await.status,
        JobStatus::Completed
    );
    assert!(!b.queue.is_paused());
}

/// Waits (up to 10 s) until `condition` holds.
async fn until(condition: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met in 10 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A host that stops renewing its lease (it crashed, or froze) has its
/// running job recovered by another host, which runs it to the end; the
/// first host's late writes under its old lease are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_job_of_a_host_whose_lease_expired_runs_on_another() {
    if !crate::fixture::postgres::available().await {
        return;
    }
    let dir = DataDir::new(Backend::Postgres).await;
    let mut survivor = Host::open_on(
        Backend::Postgres,
        Arc::new(dir.beside(Backend::Postgres).await),
        config(1),
    )
    .await;
    survivor.queue.pause().await.unwrap();
    survivor
        .upload("echo", "1.0.0", plugin_artifacts::ECHO)
        .await;
    // The host that will stop: a store with a short lease that claims a
    // job and then closes, as a host that died would stop renewing.
    let lost = {
        let options = PgOptions {
            lease: Duration::from_millis(400),
            ..PgOptions::new(dir.database_url().unwrap())
        };
        let store = jobhost::storage::open_postgres(&options).await.unwrap();
        store
            .create_job(stored_job("orphan", 1), None)
            .await
            .unwrap();
        let mut claimed = store.claim_due_jobs(2_000, 1).await.unwrap();
        assert_eq!(claimed.len(), 1);
        store.close().await;
        claimed.remove(0)
    };

    survivor.queue.resume().await.unwrap();
    let finished = survivor.wait_until_finished("orphan").await;
    assert_eq!(finished.status, JobStatus::Completed);
    assert_eq!(finished.attempt, 2, "the lost attempt counts");
    assert!(
        finished.errors[0]
            .error
            .contains("its host stopped renewing its lease during phase `p0`"),
        "{:?}",
        finished.errors
    );
    // The lost host's worker, writing late, changes nothing.
    let late = survivor
        .storage
        .complete_phase(&lost.lease, done(0, false, 5_000))
        .await
        .unwrap();
    assert!(matches!(late, Guarded::Stale | Guarded::Fenced), "{late:?}");
    let after = survivor.queue.job("orphan").await.unwrap();
    assert_eq!(after.phases[0].output, finished.phases[0].output);
}

/// A webhook delivery is attempted by one host at a time: a second host
/// cannot take one the first took, until the hold runs out with no attempt
/// recorded (the first host is presumed dead).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_delivery_is_taken_by_one_host_at_a_time() {
    if !crate::fixture::postgres::available().await {
        return;
    }
    let dir = DataDir::new(Backend::Postgres).await;
    let url = dir.database_url().unwrap();
    let first = jobhost::storage::open_postgres(&PgOptions::new(url.clone()))
        .await
        .unwrap();
    let second = jobhost::storage::open_postgres(&PgOptions::new(url))
        .await
        .unwrap();
    with_echo(&first).await;
    let hooked = NewJob {
        webhook_url: Some("http://127.0.0.1:9/hook".into()),
        ..stored_job("hooked", 1)
    };
    let claimed = running(&first, hooked).await;
    first
        .complete_phase(&claimed.lease, done(0, false, 3_000))
        .await
        .unwrap();
    let (seen_first, seen_second) = (
        first.due_webhooks(3_000, 10).await.unwrap(),
        second.due_webhooks(3_000, 10).await.unwrap(),
    );
    assert_eq!(seen_first.len(), 1);
    assert_eq!(seen_second.len(), 1, "both hosts see it due");
    let hold = Duration::from_secs(20);

    assert!(
        first
            .take_webhook(&seen_first[0], 3_000, hold)
            .await
            .unwrap()
    );
    assert!(
        !second
            .take_webhook(&seen_second[0], 3_000, hold)
            .await
            .unwrap()
    );
    assert!(second.due_webhooks(3_000, 10).await.unwrap().is_empty());
    // Nothing recorded within the hold: due again, for any host.
    let later = 3_000 + hold.as_millis() as i64;
    let again = second.due_webhooks(later, 10).await.unwrap();
    assert_eq!(again.len(), 1);
    assert!(second.take_webhook(&again[0], later, hold).await.unwrap());
}

/// A version uploaded to one host is compiled by every host as it learns
/// of the upload, not at its first job; each host records its own
/// artifact's digest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_host_compiles_an_upload_when_it_learns_of_it() {
    let Some((a, b)) = two_hosts().await else {
        return;
    };
    a.upload("echo", "1.0.0", plugin_artifacts::ECHO).await;
    let stored = a.plugins.get("echo").await.unwrap().unwrap();
    let hash = stored.versions[0].content_hash.clone();
    let engine = b.plugins.runtime().engine_key();
    let compiled_on_b = async {
        loop {
            if b.storage
                .artifact_digest(&hash, engine)
                .await
                .unwrap()
                .is_some()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), compiled_on_b)
        .await
        .expect("the other host compiled the upload");
    let digest_on_a = a.storage.artifact_digest(&hash, engine).await.unwrap();
    assert!(digest_on_a.is_some(), "the uploading host recorded its own");
}

/// A host that cannot renew its lease stops its running phase before the
/// lease runs out (so that no other host runs the job beside it), requeues
/// the job as interrupted, and claims nothing until it renews again; then
/// the job runs to the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_cannot_renew_its_lease_stops_its_phases_in_time() {
    if !crate::fixture::postgres::available().await {
        return;
    }
    let mut dir = DataDir::new(Backend::Postgres).await;
    dir.lease = Duration::from_secs(2);
    let url = dir.database_url().unwrap();
    let mut host = Host::open_on(Backend::Postgres, Arc::new(dir), config(1)).await;
    host.upload("sleep", "1.0.0", plugin_artifacts::SLEEP).await;
    let mut spec = job(
        vec![phase("nap", "sleep", json!({"ms": 3000, "steps": 300}))],
        json!({}),
    );
    spec.max_attempts = Some(3);
    let submitted = host.enqueue(spec).await;
    host.wait_for(&submitted.id, EventKind::PhaseStarted).await;

    // Renewals block behind a lock on `hosts`. A table lock, not a row
    // lock: that would give the blocker a transaction id, which holds the
    // event log's watermark back (and with it the event awaited below).
    let (mut blocker, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let lock = blocker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE hosts IN EXCLUSIVE MODE")
        .await
        .unwrap();
    // Read with the lock held: no renewal commits after this one.
    let lease_until: i64 = lock
        .query_one("SELECT lease_until FROM hosts", &[])
        .await
        .unwrap()
        .get(0);

    let stopped = host.wait_for(&submitted.id, EventKind::PhaseFailed).await;
    assert!(
        stopped.at < lease_until,
        "stopped at {}, after the lease ran out at {lease_until}",
        stopped.at
    );
    let interrupted = host.queue.job(&submitted.id).await.unwrap();
    assert_eq!(interrupted.status, JobStatus::Pending);
    assert!(
        interrupted.errors[0]
            .error
            .contains("this host could not renew its lease"),
        "{:?}",
        interrupted.errors
    );

    lock.rollback().await.unwrap();
    let finished = host.wait_until_finished(&submitted.id).await;
    assert_eq!(finished.status, JobStatus::Completed);
    assert_eq!(finished.attempt, 2);
}

/// A hot swap on one host reaches every host at once: jobs submitted to
/// any host after the activation pin the new version, and no job fails
/// across the swap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_activation_on_one_host_pins_new_jobs_everywhere() {
    let Some((a, mut b)) = two_hosts().await else {
        return;
    };
    a.upload("echo", "1.0.0", plugin_artifacts::ECHO).await;
    a.upload("echo", "2.0.0", plugin_artifacts::ECHO).await;
    let before: Vec<_> = futures::future::join_all((0..10).map(|_| a.enqueue(echo_job(2)))).await;

    a.plugins.activate("echo", "2.0.0").await.unwrap();
    let mut after = Vec::new();
    for n in 0..10 {
        let host = if n % 2 == 0 { &a } else { &b };
        after.push(host.enqueue(echo_job(2)).await);
    }

    for job in &after {
        assert!(
            job.phases.iter().all(|phase| phase.version == "2.0.0"),
            "{job:?}"
        );
    }
    for job in before.iter().chain(&after) {
        let finished = b.wait_until_finished(&job.id).await;
        assert_eq!(finished.status, JobStatus::Completed, "{finished:?}");
    }
}

/// A database whose schema is newer than this build's is refused at
/// start, saying so: a rolling upgrade never runs old code on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_schema_is_refused() {
    if !crate::fixture::postgres::available().await {
        return;
    }
    let dir = DataDir::new(Backend::Postgres).await;
    let options = PgOptions::new(dir.database_url().unwrap());
    jobhost::storage::open_postgres(&options)
        .await
        .unwrap()
        .close()
        .await;
    let (admin, connection) =
        tokio_postgres::connect(&dir.database_url().unwrap(), tokio_postgres::NoTls)
            .await
            .unwrap();
    tokio::spawn(connection);
    admin
        .batch_execute("UPDATE jobhost_schema SET version = 999")
        .await
        .unwrap();
    let refused = jobhost::storage::open_postgres(&options)
        .await
        .err()
        .expect("a newer schema is refused");
    assert!(
        refused
            .to_string()
            .contains("schema version 999, newer than this jobhost knows"),
        "{refused}"
    );
}

/// A transaction left open anywhere holds the event log's order back: a
/// commit's events wait for their positions (readers do not see them yet),
/// and the backlog says so, for operators to alert on; once it ends, they
/// come through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_transaction_holding_the_log_back_shows_in_the_backlog() {
    let Some((_dir, store, mut blocker)) = store_with_client().await else {
        return;
    };
    let open = blocker.transaction().await.unwrap();
    open.query_one("SELECT pg_current_xact_id()", &[])
        .await
        .unwrap();

    // Returns once its wait for positions (1 s at most) gives up.
    with_echo(&store).await;
    let backlog = store.log_backlog(now_ms()).await.unwrap();
    assert!(backlog.events > 0, "{backlog:?}");
    assert!(backlog.oldest_ms >= 0, "{backlog:?}");
    let log = || store.events_after(0, Default::default(), 100);
    assert!(
        log().await.unwrap().is_empty(),
        "no position is given past the open transaction"
    );

    open.rollback().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while log().await.unwrap().len() < backlog.events as usize {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the events never came through"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(store.log_backlog(now_ms()).await.unwrap().events, 0);
}

/// Deleting a job deletes its events and the position blocks they leave
/// empty; a block another job's events share stays, and what is left of
/// the log keeps its positions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_job_leaves_no_empty_position_blocks() {
    let Some((_dir, store, db)) = store_with_client().await else {
        return;
    };
    with_echo(&store).await;
    // The first job's completion claims the second: one transaction logs
    // events of both.
    let first = running(&store, stored_job("first", 1)).await;
    crate::conformance::create(&store, stored_job("second", 1)).await;
    let mut completion = done(0, false, 2_000);
    completion.claim_next = true;
    let completed = store
        .complete_phase(&first.lease, completion)
        .await
        .unwrap();
    assert!(
        matches!(
            completed,
            Guarded::Applied(jobhost::storage::Completion::Claimed(_))
        ),
        "{completed:?}"
    );
    let before = store
        .events_after(0, Default::default(), 1000)
        .await
        .unwrap();
    let empty_blocks = || async {
        db.query_one(
            "SELECT count(*) FROM event_blocks b
             WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.xid = b.xid)",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
    };
    let blocks = || async {
        db.query_one("SELECT count(*) FROM event_blocks", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    let blocks_before = blocks().await;

    store.delete_job("first", 3_000).await.unwrap();

    // Its own event has its position once the stamper passes it (a write
    // waits a second at most for that; other tests' transactions on this
    // server can hold the watermark back longer).
    let deleted = || async {
        let log = store
            .events_after(0, Default::default(), 1000)
            .await
            .unwrap();
        log.iter()
            .any(|event| event.kind() == EventKind::JobDeleted)
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !deleted().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "job:deleted never logged"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(empty_blocks().await, 0);
    // The first job's create and claim blocks went; the shared one and
    // the delete's own came or stayed.
    assert_eq!(blocks().await, blocks_before - 2 + 1);
    let after = store
        .events_after(0, Default::default(), 1000)
        .await
        .unwrap();
    let kept: Vec<_> = before
        .iter()
        .filter(|event| event.job_id.as_deref() != Some("first"))
        .map(|event| (event.seq, event.kind()))
        .collect();
    let survived: Vec<_> = after
        .iter()
        .filter(|event| event.kind() != EventKind::JobDeleted)
        .map(|event| (event.seq, event.kind()))
        .collect();
    assert_eq!(survived, kept, "the rest of the log keeps its positions");
}

/// A plugin's resources set on one host hold on every host: the memory cap
/// of the runs it takes, the default timeout of the jobs it is given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resources_set_on_one_host_reach_every_host() {
    let Some((a, b)) = two_hosts().await else {
        return;
    };
    a.upload("echo", "1.0.0", plugin_artifacts::ECHO).await;
    let resources = jobhost::model::PluginResources {
        memory_mb: Some(64),
        timeout_ms: Some(1234),
        ..Default::default()
    };
    a.plugins.set_resources("echo", resources).await.unwrap();
    until(|| b.plugins.memory_limit("echo") == Some(64 << 20)).await;
    let timeout = b.plugins.default_timeout("echo");
    assert_eq!(timeout, Some(Duration::from_millis(1234)));
}
