//! Operator routes: pause and resume, purge, queue state.

use std::time::Duration;

use serde_json::{Value, json};

use crate::server::{Server, TIMEOUT};

async fn wait_for_status(server: &Server, id: &str, status: &str) -> Value {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let (_, job) = server.get(&format!("/jobs/{id}")).await;
        if job["status"] == status {
            return job;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "job never became {status}: {job}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn pause_lets_running_phases_finish_and_starts_nothing_new() {
    let server = Server::start(&[]).await;
    server
        .upload("sleep", "1.0.0", plugin_artifacts::SLEEP)
        .await;
    let spec = json!({"phases": [
        {"name": "one", "plugin": "sleep", "config": {"ms": 400, "steps": 4}},
        {"name": "two", "plugin": "sleep", "config": {"ms": 10}}
    ]});
    let id = server.submit(&spec).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut events = server.events(&format!("/jobs/{id}/events"), None).await;
    events.until(&id, "job:phase:started").await;

    let (status, paused) = server.post("/queue/pause", &json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(paused["paused"], true);
    events.until(&id, "job:phase:completed").await;
    // The job is handed back between phases, keeping the completed one.
    let waiting = wait_for_status(&server, &id, "pending").await;
    assert_eq!(waiting["phases"][0]["status"], "completed");
    assert_eq!(waiting["phases"][1]["status"], "pending");
    let (_, queue) = server.get("/queue").await;
    assert_eq!(
        (queue["running"].as_u64(), queue["due"].as_u64()),
        (Some(0), Some(1)),
        "{queue}"
    );

    server.post("/queue/resume", &json!({})).await;
    let done = server.wait_finished(&id).await;
    assert_eq!(done["status"], "completed");
    assert_eq!(done["phases"][0]["attempts"], 1);
}

#[tokio::test]
async fn purge_deletes_finished_jobs_before_a_time() {
    let server = Server::start(&[]).await;
    server.upload("echo", "1.0.0", plugin_artifacts::ECHO).await;
    let id = server
        .submit(&json!({"phases": [{"name": "e", "plugin": "echo"}]}))
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    server.wait_finished(&id).await;
    let (status, body) = server
        .post(
            "/queue/purge",
            &json!({"finished_before": "2000-01-01T00:00:00Z"}),
        )
        .await;
    assert_eq!((status.as_u16(), &body["deleted"]), (200, &json!([])));
    let (_, body) = server
        .post(
            "/queue/purge",
            &json!({"finished_before": "2999-01-01T00:00:00Z"}),
        )
        .await;
    assert_eq!(body["deleted"], json!([id]));
    let (status, body) = server
        .post("/queue/purge", &json!({"finished_before": "yesterday"}))
        .await;
    assert_eq!(status, 400, "{body}");
}
