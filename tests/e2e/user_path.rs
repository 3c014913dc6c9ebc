//! The path every user takes: upload the pipeline plugins, trigger a
//! 3-phase job, watch it live, hot swap a plugin and roll back.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::server::Server;

const SALES_CSV: &str = "region,amount\nnorth,120.5\nsouth,80\nnorth,19.5\neast,oops\n";

async fn upload_pipeline(server: &Server) {
    for (name, component) in [
        ("csv-parse", plugin_artifacts::CSV_PARSE),
        ("aggregate", plugin_artifacts::AGGREGATE),
        ("render-report", plugin_artifacts::RENDER_REPORT),
    ] {
        let (status, body) = server.upload(name, "1.0.0", component).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert_eq!(body["active"], true, "the first version becomes active");
    }
}

fn pipeline_job() -> Value {
    json!({
        "phases": [
            {"name": "parse", "plugin": "csv-parse"},
            {"name": "aggregate", "plugin": "aggregate", "config": {"group_by": "region", "sum": ["amount"]}},
            {"name": "report", "plugin": "render-report", "config": {"title": "Sales"}}
        ],
        "payload": {"csv": SALES_CSV}
    })
}

#[tokio::test]
async fn upload_trigger_and_watch_a_pipeline() {
    let server = Server::start(&[]).await;
    upload_pipeline(&server).await;
    let (status, plugins) = server.get("/plugins").await;
    assert_eq!(status, StatusCode::OK);
    let names: Vec<&str> = plugins["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["aggregate", "csv-parse", "render-report"]);
    let version = &plugins["plugins"][1]["versions"][0];
    assert_eq!(
        version["size"],
        plugin_artifacts::bytes(plugin_artifacts::CSV_PARSE).len()
    );
    assert_eq!(version["content_hash"].as_str().unwrap().len(), 64);

    let mut events = server.events("/events", None).await;
    let job = server.submit(&pipeline_job()).await;
    let id = job["id"].as_str().unwrap();
    // An idle server claims the job in the write that stores it.
    assert_eq!(job["status"], "running");
    assert_eq!(job["phases"][0]["status"], "running");
    assert_eq!(job["phases"][0]["version"], "1.0.0", "pinned at enqueue");

    let seen = events.until(id, "job:completed").await;
    let kinds: Vec<&str> = seen
        .iter()
        .filter(|e| e.data["job_id"] == id)
        .map(|e| e.kind.as_str())
        .collect();
    let without_progress: Vec<&str> = kinds
        .iter()
        .copied()
        .filter(|k| *k != "job:phase:progress")
        .collect();
    assert_eq!(
        without_progress,
        [
            "job:created",
            "job:started",
            "job:phase:started",
            "job:phase:completed",
            "job:phase:started",
            "job:phase:completed",
            "job:phase:started",
            "job:phase:completed",
            "job:completed"
        ]
    );
    // Progress is live-only (no id of its own); logged events' ids increase.
    let ids: Vec<i64> = seen.iter().map(|e| e.id).filter(|&id| id != 0).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase: {ids:?}");
    assert!(
        done_progress_is_kept(&server, id).await,
        "the aggregate phase's last progress is kept on the phase"
    );

    let (_, done) = server.get(&format!("/jobs/{id}")).await;
    assert_eq!(done["status"], "completed");
    let report = done["phases"][2]["output"]["report"].as_str().unwrap();
    assert!(
        report.starts_with("# Sales\n\n3 valid records, 1 invalid."),
        "{report}"
    );
    assert!(report.contains("| north | 2 | 140 |"), "{report}");
    assert!(
        done["phases"][1]["usage"]["peak_memory_bytes"]
            .as_u64()
            .unwrap()
            > 0
    );
}

#[tokio::test]
async fn hot_swap_and_rollback_over_http() {
    let server = Server::start(&[]).await;
    server
        .upload("worker", "1.0.0", plugin_artifacts::SLEEP)
        .await;
    let long = server
        .submit(&json!({"phases": [{"name": "w", "plugin": "worker", "config": {"ms": 800, "steps": 8}}]}))
        .await;
    let long_id = long["id"].as_str().unwrap();
    let mut events = server
        .events(&format!("/jobs/{long_id}/events"), None)
        .await;
    events.until(long_id, "job:phase:started").await;

    let (status, _) = server
        .upload("worker", "2.0.0", plugin_artifacts::ECHO)
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let swap = server
        .client
        .put(server.url("/plugins/worker/active"))
        .json(&json!({"version": "2.0.0"}));
    let (status, body) = server.send(swap).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["previous"], "1.0.0");
    let next = server
        .submit(&json!({"phases": [{"name": "w", "plugin": "worker"}], "payload": {"v": 2}}))
        .await;

    let long_done = server.wait_finished(long_id).await;
    assert_eq!(long_done["status"], "completed");
    assert_eq!(long_done["phases"][0]["version"], "1.0.0");
    assert_eq!(long_done["phases"][0]["output"], json!({"slept_ms": 800}));
    let next_done = server.wait_finished(next["id"].as_str().unwrap()).await;
    assert_eq!(next_done["phases"][0]["version"], "2.0.0");
    assert_eq!(next_done["phases"][0]["output"]["payload"], json!({"v": 2}));

    let rollback = server
        .client
        .put(server.url("/plugins/worker/active"))
        .json(&json!({"version": "1.0.0"}));
    assert_eq!(server.send(rollback).await.0, StatusCode::OK);
    let (_, plugin) = server.get("/plugins/worker").await;
    assert_eq!(plugin["active_version"], "1.0.0");
    let (_, failed) = server.get("/jobs?status=failed").await;
    assert_eq!(
        failed["jobs"],
        json!([]),
        "no job failed because of the swap"
    );
}

#[tokio::test]
async fn reupload_is_idempotent_and_other_bytes_conflict() {
    let server = Server::start(&[]).await;
    assert_eq!(
        server
            .upload("echo", "1.0.0", plugin_artifacts::ECHO)
            .await
            .0,
        StatusCode::CREATED
    );
    assert_eq!(
        server
            .upload("echo", "1.0.0", plugin_artifacts::ECHO)
            .await
            .0,
        StatusCode::OK
    );
    let (status, body) = server
        .upload("echo", "1.0.0", plugin_artifacts::SLEEP)
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["error"]["code"], "version_conflict");
}

/// Whether the job's `aggregate` phase kept its last progress report.
async fn done_progress_is_kept(server: &Server, id: &str) -> bool {
    let (_, job) = server.get(&format!("/jobs/{id}")).await;
    job["phases"][1]["progress"]["percent"] == 100
}
