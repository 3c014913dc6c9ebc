//! Moving an embedded installation to PostgreSQL (`jobhost migrate --from`):
//! what the SQLite file held reads back the same from PostgreSQL, and the
//! event log goes on from where it was. Skipped, saying so, where no
//! PostgreSQL runs.

use std::sync::Arc;

use jobhost::model::{ConcurrencyLimits, PluginGrants, PluginResources};
use jobhost::storage::{
    AfterFailure, ErrorClass, EventFilter, Guarded, NewJob, PgOptions, PhaseFailed, PhaseStart,
    Storage,
};

use crate::conformance::{create, done, job, running, with_echo};
use crate::fixture::postgres::{self, TestDatabase};

/// An installation with some of everything: plugin versions with grants
/// and limits, a completed job with a webhook delivery waiting, a failed
/// job, a running one, a pending one, one waiting for its plugin, a deleted
/// one (whose events went with it), and a pause.
async fn fill(store: &Arc<Storage>) -> Vec<String> {
    with_echo(store).await;
    let grants = PluginGrants {
        versions: vec!["2.0.0".into()],
        config: [("region".to_owned(), "eu".to_owned())].into(),
        secrets: vec!["token".into()],
        http: vec!["https://api.example.com".into()],
    };
    store
        .set_plugin_grants("echo", &grants, 2_000)
        .await
        .unwrap();
    let hooked = NewJob {
        webhook_url: Some("http://127.0.0.1:9/hook".into()),
        ..job("completed", 2)
    };
    let claimed = running(store, hooked).await;
    store
        .complete_phase(&claimed.lease, done(0, true, 2_100))
        .await
        .unwrap();
    store
        .complete_phase(&claimed.lease, done(1, false, 2_200))
        .await
        .unwrap();
    let failing = running(
        store,
        NewJob {
            max_attempts: 1,
            ..job("failed", 1)
        },
    )
    .await;
    let failed = PhaseFailed {
        index: 0,
        name: "p0".into(),
        error: "boom".into(),
        usage: None,
        after: AfterFailure::Fail,
        now: 2_300,
    };
    store.fail_phase(&failing.lease, failed).await.unwrap();
    running(store, job("running", 2)).await;
    create(store, job("pending", 1)).await;
    let limits = ConcurrencyLimits {
        keys: [("tenant".to_owned(), 1)].into(),
        rates: [("tenant".to_owned(), 2.5)].into(),
        ..ConcurrencyLimits::default()
    };
    store.set_concurrency_limits(limits).await.unwrap();
    let keyed = NewJob {
        concurrency_key: Some("tenant".into()),
        ..job("keyed", 1)
    };
    create(store, keyed).await;
    let deleted = running(store, job("deleted", 1)).await;
    store
        .complete_phase(&deleted.lease, done(0, false, 2_400))
        .await
        .unwrap();
    store.delete_job("deleted", 2_500).await.unwrap();
    // `echo` limited to one phase at a time, which `running` holds: a job
    // waits for it.
    let limited = PluginResources {
        max_running: Some(1),
        per_second: Some(4.0),
        ..PluginResources::default()
    };
    store
        .set_plugin_resources("echo", limited, 2_600)
        .await
        .unwrap();
    let first = NewJob {
        priority: 5,
        ..job("waiting", 1)
    };
    let waiting = running(store, first).await;
    let start = store.start_phase(&waiting.lease, 0, 2_700).await.unwrap();
    assert_eq!(start, Guarded::Applied(PhaseStart::Waiting));
    store.set_paused(true).await.unwrap();
    [
        "completed",
        "failed",
        "running",
        "pending",
        "keyed",
        "waiting",
    ]
    .map(str::to_owned)
    .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_installation_moves_to_postgres_whole() {
    if !postgres::available().await {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("jobhost.db");
    let sqlite = jobhost::storage::open_sqlite(&file, Default::default()).unwrap();
    let ids = fill(&sqlite).await;
    sqlite.close().await;
    let database = TestDatabase::create().await;
    let options = PgOptions::new(database.url());

    let report = jobhost::storage::import::sqlite_into_postgres(&file, &options)
        .await
        .unwrap();
    assert!(report.rows.contains(&("jobs", 6)), "{report:?}");

    let sqlite = jobhost::storage::open_sqlite(&file, Default::default()).unwrap();
    let pg = jobhost::storage::open_postgres(&options).await.unwrap();
    assert_eq!(pg.plugins().await.unwrap(), sqlite.plugins().await.unwrap());
    assert_eq!(
        pg.plugin_loads().await.unwrap(),
        sqlite.plugin_loads().await.unwrap(),
        "the plugin's limits and its waiting job came over"
    );
    assert!(
        pg.plugin_grants("echo").await.unwrap().is_some(),
        "grants came over"
    );
    assert_eq!(
        pg.plugin_component("echo", "2.0.0").await.unwrap(),
        sqlite.plugin_component("echo", "2.0.0").await.unwrap()
    );
    for id in &ids {
        assert_eq!(
            pg.job(id).await.unwrap(),
            sqlite.job(id).await.unwrap(),
            "{id}"
        );
    }
    let log = |store: Arc<Storage>| async move {
        store
            .events_after(0, EventFilter::default(), 10_000)
            .await
            .unwrap()
    };
    let events = log(sqlite.clone()).await;
    assert_eq!(log(pg.clone()).await, events);
    let last = sqlite.last_event_seq().await.unwrap();
    assert_eq!(pg.last_event_seq().await.unwrap(), last);
    let due = |store: Arc<Storage>| async move {
        let due = store.due_webhooks(10_000, 10).await.unwrap();
        due.into_iter().map(|d| (d.id, d.body)).collect::<Vec<_>>()
    };
    assert_eq!(due(pg.clone()).await.len(), 1);
    assert_eq!(due(pg.clone()).await, due(sqlite.clone()).await);
    assert!(pg.paused().await.unwrap());

    // The log goes on after the last position SQLite gave.
    create(&pg, job("after-the-move", 1)).await;
    let next = pg
        .events_after(last, EventFilter::default(), 10)
        .await
        .unwrap();
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].seq, last + 1);

    // A second import finds the database in use.
    let again = jobhost::storage::import::sqlite_into_postgres(&file, &options)
        .await
        .unwrap_err();
    assert_eq!(again.class(), ErrorClass::Conflict);
    assert!(
        again.to_string().contains("already holds jobhost data"),
        "{again}"
    );

    // Keyed jobs came over into the claim rotation, with their limits.
    assert_eq!(
        pg.concurrency_limits().await.unwrap(),
        sqlite.concurrency_limits().await.unwrap()
    );
    let mut claimed: Vec<String> = pg
        .claim_due_jobs(10_000, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.job.id)
        .collect();
    claimed.sort();
    assert_eq!(
        claimed,
        ["after-the-move", "keyed", "pending"],
        "the waiting job still waits: `running` holds echo's one slot"
    );
    pg.close().await;
    sqlite.close().await;
}
