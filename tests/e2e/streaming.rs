//! SSE: resume after a disconnect, many clients, a stalled client, and
//! cancelling a guest that never yields.

use serde_json::json;

use crate::server::{EventStream, Server};

#[tokio::test]
async fn resume_with_last_event_id_gets_exactly_the_missed_events() {
    let server = Server::start(&[]).await;
    server
        .upload("sleep", "1.0.0", plugin_artifacts::SLEEP)
        .await;
    let job = server
        .submit(&json!({"phases": [
            {"name": "one", "plugin": "sleep", "config": {"ms": 600, "steps": 6}},
            {"name": "two", "plugin": "sleep", "config": {"ms": 600, "steps": 6}}
        ]}))
        .await;
    let id = job["id"].as_str().unwrap();
    let path = format!("/events?job={id}");

    // Read until the first phase has started, then disconnect mid-job.
    let mut first = server.events(&path, Some(0)).await;
    let before = first.until(id, "job:phase:started").await;
    let last_seen = before.last().unwrap().id;
    drop(first);

    // Resume: the rest arrives, from the log then live, ending in completion.
    let mut resumed = server.events(&path, Some(last_seen)).await;
    let after = resumed.until(id, "job:completed").await;

    // Compare with the full log of this job.
    let mut full = server.events(&format!("/jobs/{id}/events"), None).await;
    let mut all = Vec::new();
    while let Some(event) = full.next_event().await {
        all.push(event.id);
    }
    // Progress is live-only: not in the log, so not part of the comparison.
    let logged = |events: &[crate::server::Received]| -> Vec<i64> {
        events.iter().map(|e| e.id).filter(|&id| id != 0).collect()
    };
    let mut stitched = logged(&before);
    stitched.extend(logged(&after));
    assert_eq!(
        stitched, all,
        "no gap and no duplicate across the reconnect"
    );
    assert!(
        after
            .iter()
            .any(|e| e.kind == "job:phase:started" && e.data["data"]["phase"] == "two")
    );
}

/// A server with one 1-phase `echo` job, finished; and the job's id.
async fn one_finished_job() -> (Server, String) {
    let server = Server::start(&[]).await;
    server.upload("echo", "1.0.0", plugin_artifacts::ECHO).await;
    let job = server
        .submit(&json!({"phases": [{"name": "e", "plugin": "echo"}]}))
        .await;
    let id = job["id"].as_str().unwrap().to_owned();
    server.wait_finished(&id).await;
    (server, id)
}

#[tokio::test]
async fn last_event_id_also_works_as_a_query_parameter() {
    let (server, id) = one_finished_job().await;
    let mut stream = server
        .events(&format!("/jobs/{id}/events?last_event_id=0"), None)
        .await;
    assert_eq!(stream.next_event().await.unwrap().kind, "job:created");
    let mut later = server
        .events(
            "/events?last_event_id=2&types=plugin:activated,job:completed",
            None,
        )
        .await;
    let first = later.next_event().await.unwrap();
    assert_eq!(
        first.kind, "job:completed",
        "plugin events up to id 2 were skipped"
    );
}

#[tokio::test]
async fn cancel_over_http_stops_a_guest_that_never_yields() {
    let server = Server::start(&[]).await;
    server.upload("spin", "1.0.0", plugin_artifacts::SPIN).await;
    let job = server
        .submit(&json!({"phases": [{"name": "forever", "plugin": "spin"}], "max_attempts": 5}))
        .await;
    let id = job["id"].as_str().unwrap();
    let mut events = server.events(&format!("/jobs/{id}/events"), None).await;
    events.until(id, "job:phase:started").await;

    // The answer waits for the forced stop and says what happened.
    let (status, body) = server.post(&format!("/jobs/{id}/cancel"), &json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "cancelled", "{body}");
    let rest = events.until(id, "job:cancelled").await;
    assert!(
        events.next_event().await.is_none(),
        "the job stream ends after its terminal event"
    );
    assert_eq!(rest.iter().filter(|e| e.kind == "job:cancelled").count(), 1);

    let (_, job) = server.get(&format!("/jobs/{id}")).await;
    assert_eq!(job["status"], "cancelled");
    assert_eq!(job["phases"][0]["status"], "cancelled");
    let (status, body) = server.post(&format!("/jobs/{id}/cancel"), &json!({})).await;
    assert_eq!(
        status, 409,
        "cancelling a finished job changes nothing and says so: {body}"
    );
}

/// A job's stream ends with the job: resumed after its last event, and
/// filtered to kinds that leave out the event that ends it.
#[tokio::test]
async fn a_jobs_stream_ends_with_the_job_whatever_it_asks_for() {
    let (server, id) = one_finished_job().await;
    let path = format!("/jobs/{id}/events");
    let mut all = server.events(&path, None).await;
    let mut last = None;
    while let Some(event) = all.next_event().await {
        last = Some(event);
    }
    let last = last.expect("the job has events");
    assert_eq!(last.kind, "job:completed");

    let mut resumed = server.events(&path, Some(last.id)).await;
    assert!(
        resumed.next_event().await.is_none(),
        "resumed after the end, the stream ends"
    );
    let mut filtered = server
        .events(&format!("{path}?types=job:phase:started"), None)
        .await;
    assert_eq!(
        filtered.next_event().await.unwrap().kind,
        "job:phase:started"
    );
    assert!(
        filtered.next_event().await.is_none(),
        "the stream ends with the job"
    );
}

/// A job that ended and was retried goes on: its stream replays past the
/// first end and ends with the last one.
#[tokio::test]
async fn a_retried_jobs_stream_replays_past_its_first_end() {
    let server = Server::start(&[]).await;
    server.upload("echo", "1.0.0", plugin_artifacts::ECHO).await;
    let job = server
        .submit(&json!({"phases": [{"name": "e", "plugin": "echo"}], "delay_ms": 3_600_000}))
        .await;
    let id = job["id"].as_str().unwrap();
    let (status, _) = server.post(&format!("/jobs/{id}/cancel"), &json!({})).await;
    assert_eq!(status, 200);
    let (status, _) = server
        .post(&format!("/jobs/{id}/retry"), &json!({"from_start": true}))
        .await;
    assert_eq!(status, 200);
    let mut events = server.events(&format!("/jobs/{id}/events"), None).await;
    let mut kinds = Vec::new();
    while let Some(event) = events.next_event().await {
        kinds.push(event.kind);
    }
    let first_end = kinds
        .iter()
        .position(|k| k == "job:cancelled")
        .expect("cancelled");
    assert_eq!(kinds[first_end + 1], "job:retrying", "{kinds:?}");
    assert_eq!(kinds.last().unwrap(), "job:completed", "{kinds:?}");
}

/// With hundreds of clients connected, each client's new events wait a few
/// milliseconds for more and go out together. Every client still gets every
/// event once and in order, the last ones included (sent when the wait
/// ends, with nothing new arriving to push them out).
#[tokio::test]
async fn hundreds_of_clients_each_get_every_event_in_order() {
    let server = Server::start(&["--concurrency", "8", "--max-streams-per-ip", "400"]).await;
    server.upload("echo", "1.0.0", plugin_artifacts::ECHO).await;
    let clients =
        futures::future::join_all((0..400).map(|_| server.events("/events", Some(0)))).await;

    let jobs = 50;
    let spec =
        json!({"phases": [{"name": "a", "plugin": "echo"}, {"name": "b", "plugin": "echo"}]});
    let submits = (0..jobs).map(|_| server.post("/jobs", &spec));
    for (status, job) in futures::future::join_all(submits).await {
        assert_eq!(status, 201, "{job}");
    }

    let reads = clients.into_iter().map(|mut client| async move {
        let (mut seen, mut completions) = (Vec::new(), 0);
        while completions < jobs {
            let event = client.next_event().await.expect("stream still open");
            completions += usize::from(event.kind == "job:completed");
            seen.push(event.id);
        }
        seen
    });
    for seen in futures::future::join_all(reads).await {
        assert_eq!(seen[0], 1, "the stream starts at the first event");
        assert!(
            seen.windows(2).all(|w| w[1] == w[0] + 1),
            "a gap, a duplicate or a reordering: {seen:?}"
        );
    }
}

const STALLED_BEHIND_JOBS: usize = 4000;

/// Opens a client on `GET /events` that then reads nothing while
/// [`STALLED_BEHIND_JOBS`] 3-phase jobs run: far more events than the bus
/// keeps (256 batches) and the sockets buffer. Every job finishes: the
/// queue is not held up by the client.
async fn stall_a_client(server: &Server) -> EventStream {
    server.upload("echo", "1.0.0", plugin_artifacts::ECHO).await;
    let mut stalled = server.events("/events", Some(0)).await;
    stalled.next_event().await.expect("the stream is open");
    let spec = json!({"phases": [{"name": "a", "plugin": "echo"}, {"name": "b", "plugin": "echo"}, {"name": "c", "plugin": "echo"}]});
    let submits = (0..STALLED_BEHIND_JOBS).map(|_| server.post("/jobs", &spec));
    for (status, job) in futures::future::join_all(submits).await {
        assert_eq!(status, 201, "{job}");
    }
    server.wait_for_completed_jobs(STALLED_BEHIND_JOBS).await;
    stalled
}

/// A client that stopped reading does not hold up shutdown: SIGTERM stops
/// the server within its shutdown timeout.
#[tokio::test]
async fn a_stalled_client_does_not_hold_up_shutdown() {
    let mut server = Server::start(&["--concurrency", "16", "--shutdown-timeout", "1s"]).await;
    let stalled = stall_a_client(&server).await;
    let terminate = tokio::task::spawn_blocking(move || server.terminate());
    let status = tokio::time::timeout(crate::server::TIMEOUT, terminate)
        .await
        .expect("the server did not exit: the stalled client held up shutdown")
        .unwrap();
    assert!(status.success(), "exit status {status}");
    drop(stalled);
}

/// A client that stops reading falls behind the in-memory bus; it blocks
/// only itself, and when it reads again it is caught up from the log with
/// no event skipped.
#[tokio::test]
async fn a_stalled_client_is_caught_up_from_the_log_without_gaps() {
    let server = Server::start(&["--concurrency", "16"]).await;
    let mut stalled = stall_a_client(&server).await;

    // Now read everything: ids strictly increase with nothing missing.
    let mut seen = vec![];
    let mut completions = 0;
    while completions < STALLED_BEHIND_JOBS {
        let event = stalled.next_event().await.expect("stream still open");
        if event.kind == "job:completed" {
            completions += 1;
        }
        seen.push(event.id);
    }
    assert!(
        seen.windows(2).all(|w| w[1] == w[0] + 1),
        "a gap or a duplicate in the caught-up stream"
    );
    assert!(
        server
            .log()
            .contains("fell behind the bus; catching it up from the log"),
        "the catch-up path was not taken"
    );
}
