//! The job routes beyond the happy path: manual retry, delete, listing
//! with filters and cursor pagination, idempotency over HTTP.

use reqwest::StatusCode;
use serde_json::json;

use crate::server::Server;

#[tokio::test]
async fn retry_over_http_resumes_and_keeps_completed_outputs() {
    let server = Server::start(&[]).await;
    server.upload("echo", "1.0.0", plugin_artifacts::ECHO).await;
    server
        .upload("flaky", "1.0.0", plugin_artifacts::FLAKY)
        .await;
    let spec = json!({
        "phases": [
            {"name": "first", "plugin": "echo"},
            {"name": "second", "plugin": "flaky", "config": {"fail_times": 1}}
        ],
        "max_attempts": 1
    });
    let id = server.submit(&spec).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let failed = server.wait_finished(&id).await;
    assert_eq!(failed["status"], "failed");
    assert_eq!(failed["phases"][1]["status"], "failed");

    let (status, retried) = server
        .post(&format!("/jobs/{id}/retry"), &json!({"from_start": false}))
        .await;
    assert_eq!(status, StatusCode::OK, "{retried}");
    assert_eq!(retried["status"], "pending");
    assert_eq!(
        retried["phases"][0]["output"],
        failed["phases"][0]["output"]
    );
    let done = server.wait_finished(&id).await;
    assert_eq!(done["status"], "completed");
    assert_eq!(
        done["phases"][0]["attempts"], 1,
        "the completed phase did not run again"
    );
    let (status, body) = server.post(&format!("/jobs/{id}/retry"), &json!({})).await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "a completed job cannot be retried: {body}"
    );
    let deleted = server
        .send(server.client.delete(server.url(&format!("/jobs/{id}"))))
        .await;
    assert_eq!(deleted.0, StatusCode::NO_CONTENT);
    assert_eq!(
        server.get(&format!("/jobs/{id}")).await.0,
        StatusCode::NOT_FOUND
    );
    // A job that has not finished cannot be deleted.
    let later = json!({"phases": [{"name": "e", "plugin": "echo"}], "delay_ms": 3600000});
    let waiting = server.submit(&later).await;
    let path = format!("/jobs/{}", waiting["id"].as_str().unwrap());
    let (status, body) = server.send(server.client.delete(server.url(&path))).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(server.get(&path).await.1["status"], "pending");
}

#[tokio::test]
async fn listing_filters_and_pages_with_a_cursor() {
    let server = Server::start(&[]).await;
    server.upload("echo", "1.0.0", plugin_artifacts::ECHO).await;
    server
        .upload("sleep", "1.0.0", plugin_artifacts::SLEEP)
        .await;
    let later = json!({"phases": [{"name": "e", "plugin": "echo"}], "delay_ms": 3600000});
    let mut created = Vec::new();
    for _ in 0..5 {
        created.push(
            server.submit(&later).await["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let sleeper = json!({"phases": [{"name": "s", "plugin": "sleep"}], "delay_ms": 3600000});
    let sleeping = server.submit(&sleeper).await["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let (_, page) = server.get("/jobs?plugin=echo&limit=2").await;
    let mut seen: Vec<String> = page["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap().into())
        .collect();
    let mut cursor = page["next_cursor"].as_str().map(str::to_owned);
    while let Some(c) = cursor {
        let (_, page) = server
            .get(&format!("/jobs?plugin=echo&limit=2&cursor={c}"))
            .await;
        seen.extend(
            page["jobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|j| j["id"].as_str().unwrap().to_owned()),
        );
        cursor = page["next_cursor"].as_str().map(str::to_owned);
    }
    created.reverse();
    assert_eq!(seen, created, "newest first, every echo job once");

    let (_, pending) = server.get("/jobs?status=pending&plugin=sleep").await;
    assert_eq!(pending["jobs"].as_array().unwrap().len(), 1);
    assert_eq!(pending["jobs"][0]["id"], sleeping.as_str());
    let (_, none) = server.get("/jobs?status=completed").await;
    assert_eq!(none["jobs"], json!([]));
}

#[tokio::test]
async fn idempotency_key_over_http() {
    let server = Server::start(&[]).await;
    server.upload("echo", "1.0.0", plugin_artifacts::ECHO).await;
    let spec = json!({"phases": [{"name": "e", "plugin": "echo"}], "idempotency_key": "invoice-9", "delay_ms": 3600000});
    let (first_status, first) = server.post("/jobs", &spec).await;
    let (second_status, second) = server.post("/jobs", &spec).await;
    assert_eq!(
        (first_status, second_status),
        (StatusCode::CREATED, StatusCode::OK)
    );
    assert_eq!(first["id"], second["id"]);
    assert_eq!(
        server.get("/jobs").await.1["jobs"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

/// A payload is kept as sent, byte for byte (not parsed and rendered
/// again, which would reorder keys and rewrite numbers and escapes), and
/// still reaches the guest as the same JSON.
#[tokio::test]
async fn a_payload_is_kept_as_sent() {
    let server = Server::start(&[]).await;
    server.upload("echo", "1.0.0", plugin_artifacts::ECHO).await;
    let payload = "{ \"b\": [1, 2.50, \"\\u00e9\"],\n  \"a\": null }";
    let body =
        format!(r#"{{"phases": [{{"name": "e", "plugin": "echo"}}], "payload": {payload}}}"#);
    let response = server
        .client
        .post(server.url("/jobs"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let created = response.text().await.unwrap();
    assert!(created.contains(payload), "{created}");
    let id = serde_json::from_str::<serde_json::Value>(&created).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let done = server.wait_finished(&id).await;
    assert_eq!(done["status"], "completed");
    assert_eq!(
        done["phases"][0]["output"]["payload"],
        json!({"a": null, "b": [1, 2.5, "é"]})
    );
    let shown = server.get_text(&format!("/jobs/{id}")).await;
    assert!(shown.contains(payload), "{shown}");
}
