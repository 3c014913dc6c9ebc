//! Per-plugin limits through the real server: a plugin's `max_running`
//! holds, a job waiting for its slot gives its worker back to other jobs,
//! the load shows in `GET /queue` and metrics, and bad limits are refused
//! naming the field.

use std::collections::HashSet;

use serde_json::{Value, json};

use crate::server::Server;

/// A quick `echo` phase, then a `sleep` phase of `ms`.
fn echo_then_sleep(ms: u64) -> Value {
    json!({"phases": [
        {"name": "first", "plugin": "echo"},
        {"name": "nap", "plugin": "sleep", "config": {"ms": ms, "steps": 1}},
    ]})
}

#[tokio::test]
async fn a_plugins_limit_holds_and_waiting_jobs_give_their_worker_back() {
    let server = Server::start(&["--concurrency", "3"]).await;
    server.upload("echo", "1.0.0", plugin_artifacts::ECHO).await;
    server
        .upload("sleep", "1.0.0", plugin_artifacts::SLEEP)
        .await;
    for (bad, field) in [
        (json!({"max_running": 0}), "max_running:"),
        (json!({"max_running": 100_001}), "max_running:"),
        (json!({"per_second": 0.0}), "per_second:"),
        (json!({"per_second": 100_000.5}), "per_second:"),
    ] {
        let (status, body) = server.put("/plugins/sleep/resources", &bad).await;
        assert_eq!(status, 422, "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(field), "{message}");
    }
    let (_, unchanged) = server.get("/plugins/sleep").await;
    assert_eq!(
        unchanged["resources"]["max_running"],
        Value::Null,
        "nothing stored"
    );
    let (status, body) = server
        .put("/plugins/sleep/resources", &json!({"max_running": 1}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["resources"]["max_running"], 1);

    let mut events = server.events("/events", None).await;
    let mut sleepers = HashSet::new();
    for _ in 0..3 {
        let job = server.submit(&echo_then_sleep(500)).await;
        sleepers.insert(job["id"].as_str().unwrap().to_owned());
    }
    // Once a job waits for `sleep`, quick jobs are submitted: the waiting
    // jobs hold no worker, so they run while the first nap does. (Held
    // workers would leave none free until a sleeper's job completes: one
    // runs `sleep`, two would wait for it.)
    let mut quick = HashSet::new();
    let (mut naps, mut most_naps, mut sleepers_left) = (0, 0, sleepers.len());
    let mut quick_done_before_a_sleeper = 0;
    while sleepers_left > 0 {
        let event = events.next_event().await.expect("stream open");
        let job_id = event.data["job_id"].as_str().unwrap_or_default().to_owned();
        match event.kind.as_str() {
            "job:waiting" => {
                assert_eq!(event.data["data"]["plugin"], "sleep");
                if quick.is_empty() {
                    let (_, queue) = server.get("/queue").await;
                    let load = &queue["plugins"][0];
                    assert_eq!(
                        (load["plugin"].as_str(), load["max_running"].as_u64()),
                        (Some("sleep"), Some(1)),
                        "{queue}"
                    );
                    assert!(load["waiting"].as_u64() >= Some(1), "{queue}");
                    let metrics = server.get_text("/metrics").await;
                    assert!(
                        metrics.contains(
                            "jobhost_plugin_limited{plugin=\"sleep\",status=\"waiting\"}"
                        ),
                        "{metrics}"
                    );
                    for _ in 0..3 {
                        let job = server
                            .submit(&json!({"phases": [{"name": "only", "plugin": "echo"}]}))
                            .await;
                        quick.insert(job["id"].as_str().unwrap().to_owned());
                    }
                }
            }
            "job:phase:started" if event.data["data"]["plugin"] == "sleep" => {
                naps += 1;
                most_naps = most_naps.max(naps);
            }
            "job:phase:completed" if event.data["data"]["phase"] == "nap" => naps -= 1,
            "job:completed" if sleepers.contains(&job_id) => sleepers_left -= 1,
            "job:completed" if quick.contains(&job_id) && sleepers_left == sleepers.len() => {
                quick_done_before_a_sleeper += 1
            }
            _ => {}
        }
    }
    assert_eq!(most_naps, 1, "sleep's limit is 1");
    assert_eq!(
        quick_done_before_a_sleeper, 3,
        "the quick jobs ran while jobs waited for sleep"
    );
    for id in &sleepers {
        let (_, job) = server.get(&format!("/jobs/{id}")).await;
        assert_eq!(job["status"], "completed", "{job}");
    }
}
