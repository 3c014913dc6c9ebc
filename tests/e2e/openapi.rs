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
        "ErrorBody",
        "BackoffPolicy",
    ] {
        assert!(
            doc["components"]["schemas"].get(schema).is_some(),
            "schema {schema} missing"
        );
    }

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
