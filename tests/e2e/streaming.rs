//! SSE: resume after a disconnect, and cancelling a guest that never yields.

use serde_json::json;

use crate::server::Server;

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
    let mut first = server.events(&path, None).await;
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
    let mut stitched: Vec<i64> = before.iter().map(|e| e.id).collect();
    stitched.extend(after.iter().map(|e| e.id));
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

#[tokio::test]
async fn last_event_id_also_works_as_a_query_parameter() {
    let server = Server::start(&[]).await;
    server.upload("echo", "1.0.0", plugin_artifacts::ECHO).await;
    let job = server
        .submit(&json!({"phases": [{"name": "e", "plugin": "echo"}]}))
        .await;
    let id = job["id"].as_str().unwrap();
    server.wait_finished(id).await;
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

    let (status, body) = server.post(&format!("/jobs/{id}/cancel"), &json!({})).await;
    assert!(status == 202 || status == 200, "{status} {body}");
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
