//! Concurrency keys through the real server: one key's backlog does not
//! hold back another key's jobs, the operator's limits hold, and bad keys
//! and limits are refused naming the field.

use std::collections::HashSet;

use serde_json::{Value, json};

use crate::server::Server;

fn sleeping(ms: u64, key: &str) -> Value {
    json!({
        "phases": [{"name": "nap", "plugin": "sleep", "config": {"ms": ms, "steps": 1}}],
        "concurrency_key": key,
    })
}

#[tokio::test]
async fn a_small_keys_jobs_do_not_wait_for_a_big_keys_backlog() {
    let server = Server::start(&["--concurrency", "2"]).await;
    server
        .upload("sleep", "1.0.0", plugin_artifacts::SLEEP)
        .await;
    let mut events = server.events("/events", None).await;
    // Everything is queued before anything runs: the backlog comes first.
    server.post("/queue/pause", &json!({})).await;
    for _ in 0..60 {
        server.submit(&sleeping(10, "big")).await;
    }
    let mut small = HashSet::new();
    for _ in 0..5 {
        let job = server.submit(&sleeping(10, "small")).await;
        small.insert(job["id"].as_str().unwrap().to_owned());
    }
    server.post("/queue/resume", &json!({})).await;
    let mut backlog_done = 0;
    while !small.is_empty() {
        let event = events.next_event().await.expect("stream open");
        if event.kind == "job:completed" && !small.remove(event.data["job_id"].as_str().unwrap()) {
            backlog_done += 1;
        }
    }
    // Taking turns, about one backlog job runs per small job; first come
    // first served, all 60 would have run first.
    assert!(
        backlog_done <= 10,
        "{backlog_done} backlog jobs ran before the small key's 5"
    );
}

#[tokio::test]
async fn limits_are_operator_data_and_hold() {
    let server = Server::start(&["--concurrency", "4"]).await;
    server
        .upload("sleep", "1.0.0", plugin_artifacts::SLEEP)
        .await;
    let limits = json!({"default": 0, "keys": {"tenant-*": 1, "tenant-vip": 3},
                        "rates": {"tenant-vip": 50.0}});
    let (status, state) = server.put("/queue/concurrency", &limits).await;
    assert_eq!(status, 200, "{state}");
    assert_eq!(state["limits"], limits);

    // A key whose limit is 0 could never run: refused, nothing stored.
    let (status, body) = server.post("/jobs", &sleeping(10, "unnamed")).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("concurrency_key: the limit of `unnamed` is 0"),
        "{body}"
    );
    let (_, queue) = server.get("/queue").await;
    assert_eq!(queue["jobs"]["pending"], 0);
    for (bad, field) in [
        (json!({"keys": {"tenant 1": 1}}), "keys.tenant 1:"),
        (json!({"default": 100_001}), "default:"),
        (json!({"rates": {"tenant-1": 0}}), "rates.tenant-1:"),
    ] {
        let (status, body) = server.put("/queue/concurrency", &bad).await;
        assert_eq!(status, 422, "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(field), "{message}");
    }
    let (_, unchanged) = server.get("/queue/concurrency").await;
    assert_eq!(
        unchanged["limits"], limits,
        "a refused change changes nothing"
    );
    let long_key = "k".repeat(129);
    let (status, body) = server.post("/jobs", &sleeping(10, &long_key)).await;
    assert_eq!(status, 422, "{body}");

    // tenant-1 runs one job at a time though workers are free.
    let mut events = server.events("/events", None).await;
    let mut ids = HashSet::new();
    for _ in 0..3 {
        let job = server.submit(&sleeping(150, "tenant-1")).await;
        ids.insert(job["id"].as_str().unwrap().to_owned());
    }
    let (_, queue) = server.get("/queue").await;
    let load = &queue["keys"]["keys"][0];
    assert_eq!(
        (load["key"].as_str(), load["limit"].as_u64()),
        (Some("tenant-1"), Some(1)),
        "{queue}"
    );
    let metrics = server.get_text("/metrics").await;
    assert!(
        metrics.contains("jobhost_concurrency_key_jobs{key=\"tenant-1\""),
        "{metrics}"
    );
    let (mut running, mut most, mut finished) = (0, 0, 0);
    while finished < ids.len() {
        let event = events.next_event().await.expect("stream open");
        if !ids.contains(event.data["job_id"].as_str().unwrap_or_default()) {
            continue;
        }
        match event.kind.as_str() {
            "job:started" => running += 1,
            "job:completed" => {
                running -= 1;
                finished += 1;
            }
            _ => {}
        }
        most = most.max(running);
    }
    assert_eq!(most, 1, "tenant-1's limit is 1");
}
