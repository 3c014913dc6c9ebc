//! Health, readiness and Prometheus metrics.

use serde_json::json;

use crate::receiver::Receiver;
use crate::server::Server;

#[tokio::test]
async fn health_readiness_and_metrics() {
    let server = Server::start(&crate::receiver::ALLOW_LOOPBACK).await;
    assert_eq!(
        server.get("/healthz").await,
        (reqwest::StatusCode::OK, json!({"status": "ok"}))
    );
    let (status, ready) = server.get("/readyz").await;
    assert_eq!(status, 200);
    assert_eq!(ready["status"], "ready");

    let receiver = Receiver::start(0).await;
    server.upload("echo", "1.0.0", plugin_artifacts::ECHO).await;
    let job = server
        .submit(
            &json!({"phases": [{"name": "e", "plugin": "echo"}], "webhook": {"url": receiver.url}}),
        )
        .await;
    let id = job["id"].as_str().unwrap();
    let mut delivered = server
        .events(
            &format!("/events?job={id}&types=job:webhook:delivered"),
            Some(0),
        )
        .await;
    delivered.next_event().await.expect("delivered");
    let waiting = server
        .submit(&json!({"phases": [{"name": "e", "plugin": "echo"}], "delay_ms": 3600000}))
        .await;
    assert_eq!(waiting["status"], "pending");

    let response = server
        .client
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap();
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    let text = response.text().await.unwrap();
    for line in [
        "jobhost_jobs{status=\"completed\"} 1",
        "jobhost_jobs{status=\"pending\"} 1",
        "jobhost_queue_depth 0",
        "jobhost_phase_duration_seconds_count{plugin=\"echo\",outcome=\"completed\"} 1",
        "jobhost_webhook_attempts_total{outcome=\"delivered\"} 1",
        // The delivered-event stream above is still open.
        "jobhost_sse_clients 1",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing `{line}` in:\n{text}"
        );
    }
}
