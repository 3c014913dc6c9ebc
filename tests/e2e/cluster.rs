//! Several real `jobhost serve` processes on one PostgreSQL database: one
//! platform through crashes and freezes. Skipped, saying so, where no
//! PostgreSQL runs (`JOBHOST_REQUIRE_POSTGRES=1` makes that a failure).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};

use crate::server::{Received, Server, TIMEOUT};
use crate::test_database::{self, TestDatabase};

/// Jobs the three hosts run while one of them is killed again and again.
const JOBS: usize = 2_000;
/// Times the third host is killed (SIGKILL) and restarted meanwhile.
const KILLS: usize = 10;
/// Events a stream reader takes before it moves to another host.
const EVENTS_PER_STREAM: usize = 97;

async fn connect(database: &TestDatabase) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&database.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

/// Three hosts, 2,000 two-phase jobs submitted round-robin, the third host
/// SIGKILLed and restarted ten times while they run: every job completes
/// exactly once with both outputs, and a client that reconnects with
/// `Last-Event-ID` to another host after every 97 events reads exactly the
/// event log, in one increasing order, no gap, no duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_hosts_complete_every_job_once_through_sigkills() {
    if !test_database::available().await {
        return;
    }
    let database = TestDatabase::create().await;
    let url = database.url();
    let args = ["--database", url.as_str(), "--concurrency", "8"];
    let mut hosts = [
        Server::start(&args).await,
        Server::start(&args).await,
        Server::start(&args).await,
    ];
    hosts[0]
        .upload("sleep", "1.0.0", plugin_artifacts::SLEEP)
        .await;
    hosts[0]
        .upload("echo", "1.0.0", plugin_artifacts::ECHO)
        .await;
    let reader = tokio::spawn(read_log_hopping(
        vec![hosts[0].url.clone(), hosts[1].url.clone()],
        JOBS,
    ));

    let submissions = (0..JOBS).map(|n| {
        let host = &hosts[n % 3];
        let spec = json!({
            "phases": [
                {"name": "nap", "plugin": "sleep", "config": {"ms": 100, "steps": 1}},
                {"name": "copy", "plugin": "echo"}
            ],
            "payload": {"n": n},
            "max_attempts": 25,
            "backoff": {"initial_ms": 10, "multiplier": 1.0, "max_ms": 10, "jitter": false},
            "idempotency_key": format!("job-{n}")
        });
        async move { host.submit(&spec).await }
    });
    futures::stream::iter(submissions)
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    // The chaos schedule (not a synchronisation): a kill every 300 ms
    // while the jobs run.
    for _ in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(300)).await;
        hosts[2].kill();
        let restarted = hosts[2].restart();
        hosts[2] = restarted;
    }

    let read = tokio::time::timeout(4 * TIMEOUT, reader)
        .await
        .expect("every job completed in time")
        .unwrap();
    let db = connect(&database).await;
    let completed: i64 = db
        .query_one("SELECT count(*) FROM jobs WHERE status = 'completed'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(completed as usize, JOBS);
    let ended_twice: i64 = db
        .query_one(
            "SELECT count(*) FROM (SELECT job_id FROM events
               WHERE kind IN ('job:completed', 'job:failed', 'job:cancelled')
               GROUP BY job_id HAVING count(*) <> 1) twice",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(ended_twice, 0, "a job ended more than once");
    let outputs: Vec<tokio_postgres::Row> = db
        .query(
            "SELECT j.payload, p.output FROM jobs j JOIN phases p ON p.job_id = j.id
             WHERE p.name = 'copy'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(outputs.len(), JOBS);
    for row in &outputs {
        let payload: Value = serde_json::from_str(row.get(0)).unwrap();
        let output: Value = serde_json::from_str(row.get::<_, Option<&str>>(1).unwrap()).unwrap();
        assert_eq!(output["payload"], payload, "no phase output lost");
    }
    let lost: i64 = db
        .query_one("SELECT count(*) FROM phases WHERE output IS NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(lost, 0);
    let recovered: i64 = db
        .query_one(
            "SELECT count(*) FROM attempt_errors WHERE error LIKE 'interrupted%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        recovered > 0,
        "no kill interrupted a job: the test proved nothing"
    );

    // The stream, read across hosts, is the log.
    let log: Vec<(i64, String, Option<String>)> = db
        .query(
            "SELECT b.base + e.n AS seq, e.kind, e.job_id
             FROM events e JOIN event_blocks b ON b.xid = e.xid ORDER BY seq",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    assert!(
        read.windows(2).all(|w| w[0].0 < w[1].0),
        "ids strictly increase"
    );
    assert_eq!(read.len(), log.len());
    assert_eq!(read, log);
    assert_eq!(
        log.iter().map(|(seq, ..)| *seq).collect::<Vec<_>>(),
        (1..=log.len() as i64).collect::<Vec<_>>(),
        "positions are consecutive"
    );
}

/// Reads `/events` from the start, moving to another of `hosts` after every
/// [`EVENTS_PER_STREAM`] events with `Last-Event-ID`, until `jobs` jobs
/// have completed and the log has no more: every logged event read, as
/// (id, kind, job id).
async fn read_log_hopping(hosts: Vec<String>, jobs: usize) -> Vec<(i64, String, Option<String>)> {
    let client = reqwest::Client::new();
    let mut read: Vec<(i64, String, Option<String>)> = Vec::new();
    let mut completed = 0;
    let mut host = 0;
    loop {
        let last = read.last().map_or(0, |(id, ..)| *id);
        let response = client
            .get(format!("{}/events", hosts[host % hosts.len()]))
            .header("Last-Event-ID", last.to_string())
            .send()
            .await
            .unwrap();
        let mut events = Box::pin(jobhost::cli::sse_events(response));
        let mut taken = 0;
        while taken < EVENTS_PER_STREAM {
            let event = tokio::time::timeout(TIMEOUT, events.next())
                .await
                .expect("an event in time")
                .expect("the stream goes on")
                .expect("a well-formed event");
            if event.event == "job:phase:progress" {
                continue; // live only: no id of its own
            }
            let data: Value = serde_json::from_str(&event.data).unwrap();
            let job = data["job_id"].as_str().map(str::to_owned);
            if event.event == "job:completed" {
                completed += 1;
            }
            read.push((event.id.parse().unwrap(), event.event, job));
            taken += 1;
            if completed == jobs {
                return read;
            }
        }
        host += 1;
    }
}

/// A host frozen (SIGSTOP) past its lease loses its job to another host,
/// which runs it to the end; resumed, the frozen host's late write is
/// refused and logged, and the job completes once. The phase sleeps 4 s in
/// two steps; the first host is frozen after the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_host_cannot_complete_a_job_another_host_took_over() {
    if !test_database::available().await {
        return;
    }
    let database = TestDatabase::create().await;
    let url = database.url();
    let frozen_args = [
        "--database",
        url.as_str(),
        "--concurrency",
        "1",
        "--host-lease",
        "2s",
    ];
    let frozen = Server::start(&frozen_args).await;
    frozen
        .upload("sleep", "1.0.0", plugin_artifacts::SLEEP)
        .await;
    let spec = json!({
        "phases": [{"name": "nap", "plugin": "sleep", "config": {"ms": 4000, "steps": 2}}],
        "max_attempts": 3
    });
    let mut progress = frozen
        .events("/events?types=job:phase:progress", None)
        .await;
    let job = frozen.submit(&spec).await;
    let id = job["id"].as_str().unwrap().to_owned();
    progress
        .next_event()
        .await
        .expect("the phase runs on the first host");
    drop(progress);
    signal(&frozen, "STOP");

    // Only now does the other host start: the job is the frozen host's.
    let survivor = Server::start(&["--database", url.as_str(), "--concurrency", "1"]).await;
    let mut events = survivor
        .events(&format!("/jobs/{id}/events"), Some(0))
        .await;
    events.until(&id, "job:retrying").await;
    events.until(&id, "job:phase:started").await;
    // The survivor runs the phase (4 s); resumed, the frozen host finishes
    // its own run at once (its step's sleep ended while it was frozen).
    signal(&frozen, "CONT");

    let finished = survivor.wait_finished(&id).await;
    assert_eq!(finished["status"], "completed", "{finished}");
    assert_eq!(finished["attempt"], 2, "{finished}");
    assert!(
        finished["errors"][0]["error"]
            .as_str()
            .unwrap()
            .contains("its host stopped renewing its lease"),
        "{finished}"
    );
    let mut kinds: HashMap<String, usize> = HashMap::new();
    let mut all = survivor
        .events(&format!("/jobs/{id}/events"), Some(0))
        .await;
    while let Some(event) = all.next_event().await {
        *kinds.entry(event.kind).or_default() += 1;
    }
    assert_eq!(kinds.get("job:completed"), Some(&1), "{kinds:?}");
    assert_eq!(kinds.get("job:phase:completed"), Some(&1), "{kinds:?}");
    // The frozen host's late write was refused, and it said so.
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while !frozen.log().contains("runs under a newer claim") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no refusal logged:\n{}",
            frozen.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn signal(server: &Server, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([format!("-{signal}"), server.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Three hosts share a schedule that ticks every second, and one of them
/// is killed while it runs: every tick fires exactly one job, on one host
/// or another, and none is skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_sharing_a_schedule_fire_each_tick_once() {
    if !test_database::available().await {
        return;
    }
    let database = TestDatabase::create().await;
    let url = database.url();
    let args = ["--database", url.as_str()];
    let mut hosts = [
        Server::start(&args).await,
        Server::start(&args).await,
        Server::start(&args).await,
    ];
    hosts[0]
        .upload("echo", "1.0.0", plugin_artifacts::ECHO)
        .await;
    let mut fired = hosts[1].events("/events?types=schedule:fired", None).await;
    let schedule = json!({"name": "tick", "cron": "* * * * * *", "overlap": "allow",
        "job": {"phases": [{"name": "e", "plugin": "echo"}]}});
    let (status, body) = hosts[2].post("/schedules", &schedule).await;
    assert_eq!(status, 201, "{body}");
    let mut ticks = Vec::new();
    for round in 0..8 {
        if round == 4 {
            hosts[0].kill();
        }
        let event = fired.next_event().await.unwrap();
        ticks.push(event.data["data"]["tick"].as_i64().unwrap());
    }
    let (status, _) = hosts[1]
        .send(hosts[1].client.delete(hosts[1].url("/schedules/tick")))
        .await;
    assert_eq!(status, 204);
    for pair in ticks.windows(2) {
        assert_eq!(
            pair[1] - pair[0],
            1000,
            "a tick was missed or repeated: {ticks:?}"
        );
    }
    let db = connect(&database).await;
    let row = db
        .query_one(
            "SELECT count(*), count(DISTINCT data::json->>'tick'),
                    (SELECT count(*) FROM jobs)
             FROM events WHERE kind = 'schedule:fired'",
            &[],
        )
        .await
        .unwrap();
    let (fires, distinct_ticks, jobs): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert!(fires >= 8);
    assert_eq!((distinct_ticks, jobs), (fires, fires), "one job per tick");
}

/// Two hosts with 4 workers each on a fresh database, `echo` and `sleep`
/// uploaded; `None` where no PostgreSQL runs.
async fn two_hosts_with_sleep() -> Option<(TestDatabase, [Server; 2])> {
    if !test_database::available().await {
        return None;
    }
    let database = TestDatabase::create().await;
    let url = database.url();
    let args = ["--database", url.as_str(), "--concurrency", "4"];
    let hosts = [Server::start(&args).await, Server::start(&args).await];
    hosts[0]
        .upload("echo", "1.0.0", plugin_artifacts::ECHO)
        .await;
    hosts[0]
        .upload("sleep", "1.0.0", plugin_artifacts::SLEEP)
        .await;
    Some((database, hosts))
}

/// Waits until the jobs `ids` completed, then reads the event log from the
/// start, in the order the database committed its changes (the same on
/// every host), and returns the most spans that were open at once. `span`
/// says whether an event opens (`true`) or closes (`false`) a span, and
/// which one; `spans` is how many there are. The spans' times are no
/// measure: a host stamps a start before its write waits for the limit's
/// lock, so a start may carry a time before the end that made room for it.
async fn most_at_once(
    hosts: &[Server; 2],
    ids: &[Value],
    spans: usize,
    span: impl Fn(&Received) -> Option<(String, bool)>,
) -> usize {
    for id in ids {
        let job = hosts[0].wait_finished(id.as_str().unwrap()).await;
        assert_eq!(job["status"], "completed", "{job}");
    }
    let mut log = hosts[1].events("/events", Some(0)).await;
    let (mut open, mut closed, mut most) = (HashSet::new(), 0, 0);
    while closed < spans {
        let event = log.next_event().await.expect("the log goes on");
        match span(&event) {
            Some((unit, true)) => {
                open.insert(unit);
                most = most.max(open.len());
            }
            Some((unit, false)) => {
                assert!(open.remove(&unit), "{unit} ended before it started");
                closed += 1;
            }
            None => {}
        }
    }
    most
}

/// A key's limit holds across hosts: two hosts with free workers, six
/// jobs of one key limited to 2 submitted to both, and never more than two
/// of them run at once (by the times the database recorded), while jobs
/// without a key run beside them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_limit_holds_across_hosts() {
    let Some((_database, hosts)) = two_hosts_with_sleep().await else {
        return;
    };
    let (status, body) = hosts[1]
        .put("/queue/concurrency", &json!({"keys": {"shared": 2}}))
        .await;
    assert_eq!(status, 200, "{body}");
    let nap = |key: Option<&str>| {
        json!({"phases": [{"name": "nap", "plugin": "sleep", "config": {"ms": 150, "steps": 1}}],
               "concurrency_key": key})
    };
    let mut ids = Vec::new();
    for n in 0..6 {
        ids.push(hosts[n % 2].submit(&nap(Some("shared"))).await["id"].clone());
        hosts[(n + 1) % 2].submit(&nap(None)).await;
    }
    let most = most_at_once(&hosts, &ids, ids.len(), |event| {
        let job = &event.data["job_id"];
        let opens = match event.kind.as_str() {
            "job:started" => true,
            "job:completed" => false,
            _ => return None,
        };
        ids.contains(job).then(|| (job.to_string(), opens))
    })
    .await;
    assert_eq!(most, 2, "the limit is 2");
}

/// A plugin's limit holds across hosts: two hosts with free workers, eight
/// jobs whose second phase is of a plugin limited to 2, and never more than
/// two of its phases run at once (by the times the database recorded);
/// jobs that waited for it were woken, on either host, and all completed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugins_limit_holds_across_hosts() {
    let Some((database, hosts)) = two_hosts_with_sleep().await else {
        return;
    };
    let (status, body) = hosts[1]
        .put("/plugins/sleep/resources", &json!({"max_running": 2}))
        .await;
    assert_eq!(status, 200, "{body}");
    let job = json!({"phases": [
        {"name": "first", "plugin": "echo"},
        {"name": "nap", "plugin": "sleep", "config": {"ms": 150, "steps": 1}},
    ]});
    let mut ids = Vec::new();
    for n in 0..8 {
        ids.push(hosts[n % 2].submit(&job).await["id"].clone());
    }
    let most = most_at_once(&hosts, &ids, ids.len(), |event| {
        let phase = format!("{} {}", event.data["job_id"], event.data["data"]["index"]);
        match event.kind.as_str() {
            "job:phase:started" if event.data["data"]["plugin"] == "sleep" => Some((phase, true)),
            "job:phase:completed" if event.data["data"]["phase"] == "nap" => Some((phase, false)),
            _ => None,
        }
    })
    .await;
    assert_eq!(most, 2, "the limit is 2");
    let waited: i64 = connect(&database)
        .await
        .query_one(
            "SELECT count(*) FROM events WHERE kind = 'job:waiting'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        waited > 0,
        "eight jobs, free workers, two slots: some waited"
    );
}

/// A user outgrows SQLite: stops the server, runs `jobhost migrate --from
/// data/jobhost.db --to postgres://…`, and starts the server on
/// PostgreSQL: the job, its plugin and its event history are there, and a
/// new job runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_installation_moves_to_postgres_with_jobhost_migrate() {
    if !test_database::available().await {
        return;
    }
    let mut embedded = Server::start(&[]).await;
    embedded
        .upload("echo", "1.0.0", plugin_artifacts::ECHO)
        .await;
    let job = embedded
        .submit(&json!({"phases": [{"name": "copy", "plugin": "echo"}], "payload": {"n": 1}}))
        .await;
    let id = job["id"].as_str().unwrap().to_owned();
    let finished = embedded.wait_finished(&id).await;
    let history = events_of(&embedded, &id).await;
    let schedule = json!({"name": "nightly", "cron": "30 2 * * *", "timezone": "Europe/Berlin",
        "paused": true, "job": {"phases": [{"name": "copy", "plugin": "echo"}]}});
    let (status, schedule) = embedded.post("/schedules", &schedule).await;
    assert_eq!(status, 201, "{schedule}");
    assert!(embedded.terminate().success());

    let database = TestDatabase::create().await;
    let url = database.url();
    let migrate = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_jobhost"))
            .arg("migrate")
            .args(args)
            .output()
            .unwrap()
    };
    let file = embedded.dir.path().join("data").join("jobhost.db");
    let moved = migrate(&["--from", file.to_str().unwrap(), "--to", &url]);
    let said = String::from_utf8_lossy(&moved.stdout);
    assert!(
        moved.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&moved.stderr)
    );
    assert!(said.contains("jobs: 1 rows"), "{said}");
    let again = migrate(&["--to", &url]);
    assert!(String::from_utf8_lossy(&again.stdout).contains("schema version"));

    let shared = Server::start(&["--database", url.as_str()]).await;
    let (_, moved_job) = shared.get(&format!("/jobs/{id}")).await;
    assert_eq!(moved_job, finished);
    assert_eq!(events_of(&shared, &id).await, history);
    assert_eq!(shared.get("/schedules/nightly").await.1, schedule);
    let next = shared
        .submit(&json!({"phases": [{"name": "copy", "plugin": "echo"}], "payload": {"n": 2}}))
        .await;
    let next = shared.wait_finished(next["id"].as_str().unwrap()).await;
    assert_eq!(next["status"], "completed");
}

/// A job's logged events as (id, type, data).
async fn events_of(server: &Server, id: &str) -> Vec<(i64, String, Value)> {
    let mut stream = server.events(&format!("/jobs/{id}/events"), Some(0)).await;
    let mut events = Vec::new();
    while let Some(event) = stream.next_event().await {
        events.push((event.id, event.kind, event.data));
    }
    events
}
