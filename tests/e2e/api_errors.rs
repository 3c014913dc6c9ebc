//! Bad input on every route gets the right status and a JSON error body,
//! and nothing is half-stored.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::server::Server;

fn assert_error(status: StatusCode, body: &Value, expected: StatusCode, code: &str) {
    assert_eq!(status, expected, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

#[tokio::test]
async fn bad_requests_get_clear_errors_and_store_nothing() {
    let server = Server::start(&["--max-body-kb", "16", "--max-plugin-mb", "1"]).await;
    let c = &server.client;

    let malformed = c
        .post(server.url("/jobs"))
        .header("content-type", "application/json")
        .body("{not json");
    let (status, body) = server.send(malformed).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_json");

    let (status, body) = server.post("/jobs", &json!({"phases": "nope"})).await;
    assert_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_json",
    );

    let (status, body) = server
        .post(
            "/jobs",
            &json!({"phases": [{"name": "a", "plugin": "ghost"}]}),
        )
        .await;
    assert_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "unknown_plugin",
    );

    let (status, body) = server.post("/jobs", &json!({"phases": []})).await;
    assert_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_job",
    );

    let huge =
        json!({"phases": [{"name": "a", "plugin": "echo"}], "payload": "x".repeat(64 << 10)});
    let (status, body) = server.post("/jobs", &huge).await;
    assert_error(status, &body, StatusCode::PAYLOAD_TOO_LARGE, "too_large");

    let (status, body) = server.get("/jobs/no-such-job").await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    let (status, body) = server.get("/jobs/no-such-job/events").await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    let (status, body) = server.post("/jobs/no-such-job/cancel", &json!({})).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    let (status, body) = server.get("/jobs?status=sleeping").await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "bad_request");

    let upload = |bytes: Vec<u8>| c.put(server.url("/plugins/bad/versions/1.0.0")).body(bytes);
    let (status, body) = server.send(upload(b"plain text".to_vec())).await;
    assert_error(status, &body, StatusCode::UNPROCESSABLE_ENTITY, "not_wasm");
    let (status, body) = server.send(upload(b"\0asm\x01\0\0\0".to_vec())).await;
    assert_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "core_module",
    );
    let (status, body) = server
        .send(upload(plugin_artifacts::bytes(
            plugin_artifacts::WRONG_WORLD,
        )))
        .await;
    assert_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "not_a_plugin",
    );
    let (status, body) = server.send(upload(vec![0; 2 << 20])).await;
    assert_error(status, &body, StatusCode::PAYLOAD_TOO_LARGE, "too_large");
    let (status, body) = server
        .send(
            c.put(server.url("/plugins/bad/active"))
                .json(&json!({"version": "1.0.0"})),
        )
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");

    assert_eq!(server.get("/plugins").await.1, json!({"plugins": []}));
    assert_eq!(
        server.get("/jobs").await.1,
        json!({"jobs": [], "next_cursor": null})
    );
}

/// With tokens, every route but health needs one, of a scope that covers
/// what the route does: `read` views, `submit` also runs jobs, `admin` also
/// owns plugins and the queue. A token without a scope is `admin`.
#[tokio::test]
async fn tokens_guard_every_route_by_scope() {
    let server = Server::start(&["--tokens", "s3cret,read:viewer-1,submit:submitter-1"]).await;
    let c = &server.client;
    let url = server.url("/plugins/echo/versions/1.0.0");
    let bytes = plugin_artifacts::bytes(plugin_artifacts::ECHO);
    let status = |response: reqwest::Response| response.status();

    let response = c.put(&url).body(bytes.clone()).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    for (token, expected) in [
        ("wrong", "the bearer token is not valid"),
        ("submitter-1", "scope `admin`"),
    ] {
        let response = c
            .put(&url)
            .bearer_auth(token)
            .body(bytes.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "forbidden");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains(expected),
            "{body}"
        );
    }
    let response = c
        .put(&url)
        .bearer_auth("s3cret")
        .body(bytes)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);

    // Reads need a token too, of any scope; health does not.
    assert_eq!(
        status(c.get(server.url("/jobs")).send().await.unwrap()),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        status(c.get(server.url("/events")).send().await.unwrap()),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        status(c.get(server.url("/metrics")).send().await.unwrap()),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        status(c.get(server.url("/healthz")).send().await.unwrap()),
        StatusCode::OK
    );
    assert_eq!(
        status(c.get(server.url("/readyz")).send().await.unwrap()),
        StatusCode::OK
    );
    let read = c
        .get(server.url("/jobs"))
        .bearer_auth("viewer-1")
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), StatusCode::OK);

    // Submitting needs `submit`; pausing the queue needs `admin`.
    let spec = json!({"phases": [{"name": "only", "plugin": "echo"}]});
    let post = |token: &'static str, path: &str, body: Value| {
        c.post(server.url(path))
            .bearer_auth(token)
            .json(&body)
            .send()
    };
    assert_eq!(
        status(post("viewer-1", "/jobs", spec.clone()).await.unwrap()),
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        status(post("submitter-1", "/jobs", spec).await.unwrap()),
        StatusCode::CREATED
    );
    assert_eq!(
        status(
            post("submitter-1", "/queue/pause", json!({}))
                .await
                .unwrap()
        ),
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        status(post("s3cret", "/queue/pause", json!({})).await.unwrap()),
        StatusCode::OK
    );
}

#[tokio::test]
async fn sigterm_shuts_down_cleanly() {
    let mut server = Server::start(&[]).await;
    assert_eq!(server.get("/readyz").await.0, StatusCode::OK);
    server
        .upload("sleep", "1.0.0", plugin_artifacts::SLEEP)
        .await;
    let spec = json!({"phases": [
        {"name": "one", "plugin": "sleep", "config": {"ms": 300, "steps": 3}},
        {"name": "two", "plugin": "sleep", "config": {"ms": 300}}
    ]});
    let id = server.submit(&spec).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut events = server.events("/events", None).await;
    events.until(&id, "job:phase:started").await;

    let status = server.terminate();
    assert!(
        status.success(),
        "exit status {status}; log:\n{}",
        server.log()
    );
    // The SSE stream ended cleanly rather than hanging or erroring.
    while events.next_event().await.is_some() {}
    assert!(server.log().contains("shutting down"));

    // The running phase finished; the job waits for the next start.
    let server = server.restart();
    let job = server.wait_finished(&id).await;
    assert_eq!(job["status"], "completed");
    assert_eq!(
        job["phases"][0]["attempts"], 1,
        "the first phase was not interrupted"
    );
    assert_eq!(job["errors"], json!([]));
}
