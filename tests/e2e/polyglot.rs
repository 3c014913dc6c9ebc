//! A plugin written in Python (componentize-py, from PyPI) runs in the same
//! pipeline as the Rust plugins: csv-parse (Rust) → convert-currency
//! (Python) → aggregate (Rust) → render-report (Rust); and the Python
//! phase fetches its rates from an HTTP API once the operator grants it.

use std::path::PathBuf;
use std::process::Command;

use serde_json::json;

use crate::server::Server;

/// Builds `plugins/python/convert-currency` into the workspace's target
/// directory (installing componentize-py into a virtualenv there).
fn build_python_plugin() -> PathBuf {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = repo.join("target").join("python-plugins");
    let status = Command::new(repo.join("plugins/python/convert-currency/build.sh"))
        .arg(&out)
        .status()
        .expect(
            "running plugins/python/convert-currency/build.sh (needs python3 with venv and pip)",
        );
    assert!(status.success(), "building the Python plugin failed");
    out.join("convert_currency.wasm")
}

#[tokio::test]
async fn python_plugin_runs_in_a_rust_pipeline() {
    let component = tokio::task::spawn_blocking(build_python_plugin)
        .await
        .unwrap();
    let server = Server::start(&[]).await;
    server
        .upload("csv-parse", "1.0.0", plugin_artifacts::CSV_PARSE)
        .await;
    server
        .upload("aggregate", "1.0.0", plugin_artifacts::AGGREGATE)
        .await;
    server
        .upload("render-report", "1.0.0", plugin_artifacts::RENDER_REPORT)
        .await;
    let upload = server
        .client
        .put(server.url("/plugins/convert-currency/versions/1.0.0"));
    let (status, body) = server
        .send(upload.body(std::fs::read(&component).unwrap()))
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        body["metadata"]["description"],
        "Converts record amounts to one currency (written in Python)"
    );

    let csv = "region,amount,currency\nnorth,100,EUR\nsouth,50,USD\nnorth,10,GBP\n";
    let job = server
        .submit(&json!({
            "phases": [
                {"name": "parse", "plugin": "csv-parse"},
                {"name": "convert", "plugin": "convert-currency",
                 "config": {"rates": {"EUR": 1.1, "GBP": 1.25}, "to": "USD"}},
                {"name": "aggregate", "plugin": "aggregate", "config": {"group_by": "region", "sum": ["amount"]}},
                {"name": "report", "plugin": "render-report", "config": {"title": "Sales in USD"}}
            ],
            "payload": {"csv": csv}
        }))
        .await;
    let done = server.wait_finished(job["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(
        done["phases"][1]["output"]["records"][0],
        json!({"region": "north", "amount": 110.0, "currency": "USD"})
    );
    assert_eq!(
        done["phases"][2]["output"]["totals"],
        json!({"amount": 172.5})
    );
    let report = done["phases"][3]["output"]["report"].as_str().unwrap();
    assert!(report.contains("| north | 2 | 122.50 |"), "{report}");
    assert!(report.contains("| south | 1 | 50 |"), "{report}");

    // An unknown currency is a permanent failure that names the record.
    let bad = server
        .submit(&json!({
            "phases": [
                {"name": "parse", "plugin": "csv-parse"},
                {"name": "convert", "plugin": "convert-currency", "config": {"rates": {}}}
            ],
            "payload": {"csv": "amount,currency\n5,JPY\n"}
        }))
        .await;
    let failed = server.wait_finished(bad["id"].as_str().unwrap()).await;
    assert_eq!(failed["status"], "failed");
    assert_eq!(failed["attempt"], 1, "a fail error is not retried");
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains("record 1: no rate for currency 'JPY'"),
        "{failed}"
    );

    // The rates from an HTTP API instead, through wasi:http: refused until
    // the operator grants the API's origin, then fetched and used.
    let rates = axum::Router::new().route(
        "/rates",
        axum::routing::get(|| async { axum::Json(json!({"EUR": 1.1, "GBP": 1.25})) }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, rates).await.unwrap() });
    let from_api = json!({
        "phases": [
            {"name": "parse", "plugin": "csv-parse"},
            {"name": "convert", "plugin": "convert-currency",
             "config": {"rates_url": format!("{origin}/rates"), "to": "USD"}}
        ],
        "payload": {"csv": csv},
        "max_attempts": 1
    });
    let refused = server.submit(&from_api).await;
    let refused = server.wait_finished(refused["id"].as_str().unwrap()).await;
    assert_eq!(refused["status"], "failed");
    let error = refused["error"].as_str().unwrap();
    assert!(error.contains("has no grants"), "{error}");
    let grant = server
        .client
        .put(server.url("/plugins/convert-currency/grants"))
        .json(&json!({"versions": ["1.0.0"], "http": [origin]}));
    let (status, body) = server.send(grant).await;
    assert_eq!(status, 200, "{body}");
    let fetched = server.submit(&from_api).await;
    let fetched = server.wait_finished(fetched["id"].as_str().unwrap()).await;
    assert_eq!(fetched["status"], "completed", "{fetched}");
    assert_eq!(
        fetched["phases"][1]["output"]["records"][0],
        json!({"region": "north", "amount": 110.0, "currency": "USD"})
    );
    assert_eq!(fetched["phases"][1]["usage"]["http_requests"], 1);
}
