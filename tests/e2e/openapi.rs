//! `/openapi.json` is generated from the route table: every documented
//! operation exists, and the main routes and schemas are documented.

use serde_json::Value;

use crate::server::Server;

#[tokio::test]
async fn openapi_document_matches_the_routes() {
    let server = Server::start(&[]).await;
    let (status, doc) = server.get("/openapi.json").await;
    assert_eq!(status, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    for (path, methods) in [
        ("/plugins", vec!["get"]),
        ("/plugins/{name}", vec!["get"]),
        ("/plugins/{name}/versions/{version}", vec!["put", "delete"]),
        ("/plugins/{name}/active", vec!["put"]),
        ("/jobs", vec!["get", "post"]),
        ("/jobs/{id}", vec!["get", "delete"]),
        ("/jobs/{id}/cancel", vec!["post"]),
        ("/jobs/{id}/retry", vec!["post"]),
        ("/jobs/{id}/events", vec!["get"]),
        ("/events", vec!["get"]),
        ("/healthz", vec!["get"]),
        ("/readyz", vec!["get"]),
        ("/metrics", vec!["get"]),
    ] {
        for method in methods {
            assert!(
                paths.get(path).and_then(|p| p.get(method)).is_some(),
                "{method} {path} is not documented"
            );
        }
    }
    for schema in [
        "Job",
        "JobSpec",
        "Phase",
        "PluginRecord",
        "Event",
        "EventBody",
        "WebhookBody",
        "ErrorBody",
        "BackoffPolicy",
    ] {
        assert!(
            doc["components"]["schemas"].get(schema).is_some(),
            "schema {schema} missing"
        );
    }
    // Every event type's payload is published: one variant per type, each
    // naming its `type` and describing its `data`.
    let variants = doc["components"]["schemas"]["EventBody"]["oneOf"]
        .as_array()
        .expect("EventBody is one of the event types");
    let mut types: Vec<&str> = variants
        .iter()
        .flat_map(|variant| variant["properties"]["type"]["enum"].as_array().unwrap())
        .map(|name| name.as_str().unwrap())
        .collect();
    types.sort_unstable();
    let mut expected: Vec<&str> = jobhost::model::EventKind::ALL
        .iter()
        .map(|kind| kind.name())
        .collect();
    expected.sort_unstable();
    assert_eq!(types, expected);
    assert!(
        variants
            .iter()
            .all(|variant| variant["properties"].get("data").is_some()),
        "{variants:?}"
    );

    // Every documented operation is served (the fallback answers unknown
    // routes with "no such route").
    for (path, methods) in paths {
        let concrete = path
            .replace("{name}", "x")
            .replace("{version}", "1")
            .replace("{id}", "x");
        for method in methods.as_object().unwrap().keys() {
            let request = match method.as_str() {
                "get" => server.client.get(server.url(&concrete)),
                "post" => server.client.post(server.url(&concrete)),
                "put" => server.client.put(server.url(&concrete)),
                "delete" => server.client.delete(server.url(&concrete)),
                other => panic!("unexpected method {other}"),
            };
            let response = request.send().await.unwrap();
            let status = response.status();
            let body: Value = if path.ends_with("events") || path == "/metrics" {
                Value::Null
            } else {
                response.json().await.unwrap_or(Value::Null)
            };
            assert_ne!(
                body["error"]["message"], "no such route",
                "{method} {path} ({status}) is documented but not routed"
            );
            assert_ne!(status, 405, "{method} {path} is documented but not routed");
        }
    }
}

/// The bounds the server checks are the ones it publishes, so generated
/// clients and fuzzers agree with it; every operation has its own id, and
/// the ids a create returns link to the operations that take them.
#[tokio::test]
async fn the_document_publishes_the_bounds_and_links() {
    use jobhost::model::limits::*;
    let server = Server::start(&[]).await;
    let (_, doc) = server.get("/openapi.json").await;
    let schemas = &doc["components"]["schemas"];
    let spec = &schemas["JobSpec"]["properties"];
    assert_eq!(spec["priority"]["minimum"], MIN_PRIORITY);
    assert_eq!(spec["priority"]["maximum"], MAX_PRIORITY);
    assert_eq!(spec["max_attempts"]["maximum"], MAX_ATTEMPTS);
    assert_eq!(spec["delay_ms"]["maximum"], MAX_SCHEDULE_AHEAD_MS);
    assert_eq!(spec["idempotency_key"]["maxLength"], MAX_IDEMPOTENCY_KEY);
    assert_eq!(spec["run_at"]["maxLength"], MAX_RUN_AT_LENGTH);
    assert_eq!(spec["phases"]["maxItems"], 32);
    let phase = &schemas["PhaseSpec"]["properties"];
    assert_eq!(phase["name"]["maxLength"], MAX_PHASE_NAME);
    assert_eq!(phase["plugin"]["maxLength"], MAX_PLUGIN_NAME);
    assert_eq!(phase["timeout_ms"]["maximum"], 3_600_000);
    let webhook = &schemas["WebhookSpec"]["properties"];
    assert_eq!(webhook["url"]["maxLength"], MAX_WEBHOOK_URL);
    assert_eq!(webhook["secret"]["maxLength"], MAX_WEBHOOK_SECRET);
    let backoff = &schemas["BackoffPolicy"]["properties"];
    assert_eq!(backoff["max_ms"]["maximum"], MAX_BACKOFF_MS);

    let mut ids = std::collections::HashSet::new();
    for methods in doc["paths"].as_object().unwrap().values() {
        for operation in methods.as_object().unwrap().values() {
            let id = operation["operationId"].as_str().expect("an operation id");
            assert!(ids.insert(id.to_owned()), "operation id {id} is used twice");
        }
    }
    let links = &doc["paths"]["/jobs"]["post"]["responses"]["201"]["links"];
    for (name, target) in [
        ("show", "show_job"),
        ("events", "stream_job_events"),
        ("cancel", "cancel_job"),
    ] {
        assert_eq!(links[name]["operationId"], target);
        assert_eq!(links[name]["parameters"]["id"], "$response.body#/id");
    }
    let upload =
        &doc["paths"]["/plugins/{name}/versions/{version}"]["put"]["responses"]["201"]["links"];
    assert_eq!(upload["show"]["operationId"], "show_plugin");
    assert!(ids.contains("show_job") && ids.contains("show_plugin"));
}
