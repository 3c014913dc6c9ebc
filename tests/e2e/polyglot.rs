//! Plugins in three languages in one pipeline: csv-parse (Rust) →
//! convert-currency (Python, componentize-py from PyPI) → aggregate (Rust)
//! → render-report (Rust) → notify (JavaScript, ComponentizeJS from npm),
//! which posts the report to a real receiver with a bearer secret. The
//! Python phase also fetches its rates from an HTTP API once the operator
//! grants it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use axum::http::HeaderMap;
use serde_json::{Value, json};

use crate::server::Server;

/// Runs `plugins/<dir>/build.sh` into the workspace's target directory;
/// the component's path.
fn build_plugin(dir: &str, out: &str, component: &str) -> PathBuf {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = repo.join("target").join(out);
    let status = Command::new(repo.join("plugins").join(dir).join("build.sh"))
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("running plugins/{dir}/build.sh: {e}"));
    assert!(status.success(), "building plugins/{dir} failed");
    out.join(component)
}

/// Uploads a component built here as version 1.0.0, which must say this
/// of itself.
async fn upload_built(server: &Server, name: &str, component: &Path, description: &str) {
    let (status, body) = server
        .upload(name, "1.0.0", component.to_str().unwrap())
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["metadata"]["description"], description);
}

/// What the receiver got: the Authorization header and the body.
type Received = Arc<Mutex<Vec<(String, Value)>>>;

/// An HTTP API for the pipeline: `/rates` answers exchange rates, `/hook`
/// records what is posted to it. Its origin, and what `/hook` received.
async fn api() -> (String, Received) {
    let received = Received::default();
    let hook = received.clone();
    let app = axum::Router::new()
        .route(
            "/rates",
            axum::routing::get(|| async { axum::Json(json!({"EUR": 1.1, "GBP": 1.25})) }),
        )
        .route(
            "/hook",
            axum::routing::post(
                move |headers: HeaderMap, body: axum::Json<Value>| async move {
                    let bearer = headers
                        .get("authorization")
                        .map_or(String::new(), |v| v.to_str().unwrap().to_owned());
                    hook.lock().unwrap().push((bearer, body.0));
                    axum::http::StatusCode::CREATED
                },
            ),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (origin, received)
}

const NOTIFY_TOKEN: &str = "notify-t0ken";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_and_javascript_plugins_run_in_a_rust_pipeline() {
    let python = tokio::task::spawn_blocking(|| {
        build_plugin(
            "python/convert-currency",
            "python-plugins",
            "convert_currency.wasm",
        )
    });
    let javascript =
        tokio::task::spawn_blocking(|| build_plugin("js/notify", "js-plugins", "notify.wasm"));
    let (component, notify) = (python.await.unwrap(), javascript.await.unwrap());
    let (origin, received) = api().await;
    let secrets = tempfile::tempdir().unwrap();
    let secrets_file = secrets.path().join("secrets.json");
    std::fs::write(
        &secrets_file,
        json!({"notify_token": NOTIFY_TOKEN}).to_string(),
    )
    .unwrap();
    let server = Server::start(&["--secrets-file", secrets_file.to_str().unwrap()]).await;
    server
        .upload("csv-parse", "1.0.0", plugin_artifacts::CSV_PARSE)
        .await;
    server
        .upload("aggregate", "1.0.0", plugin_artifacts::AGGREGATE)
        .await;
    server
        .upload("render-report", "1.0.0", plugin_artifacts::RENDER_REPORT)
        .await;
    let python = "Converts record amounts to one currency (written in Python)";
    upload_built(&server, "convert-currency", &component, python).await;
    let javascript = "Posts a report to a URL with a bearer secret (written in JavaScript)";
    upload_built(&server, "notify", &notify, javascript).await;
    let grants = json!({"versions": ["1.0.0"], "secrets": ["notify_token"], "http": [origin]});
    server.grant("notify", &grants).await;

    let csv = "region,amount,currency\nnorth,100,EUR\nsouth,50,USD\nnorth,10,GBP\n";
    let job = server
        .submit(&json!({
            "phases": [
                {"name": "parse", "plugin": "csv-parse"},
                {"name": "convert", "plugin": "convert-currency",
                 "config": {"rates": {"EUR": 1.1, "GBP": 1.25}, "to": "USD"}},
                {"name": "aggregate", "plugin": "aggregate", "config": {"group_by": "region", "sum": ["amount"]}},
                {"name": "report", "plugin": "render-report", "config": {"title": "Sales in USD"}},
                {"name": "notify", "plugin": "notify",
                 "config": {"url": format!("{origin}/hook"), "token_secret": "notify_token"}}
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
    assert_eq!(
        done["phases"][4]["output"],
        json!({"posted": true, "status": 201})
    );
    let posted = received.lock().unwrap().clone();
    assert_eq!(posted.len(), 1, "{posted:?}");
    let (bearer, body) = &posted[0];
    assert_eq!(bearer, &format!("Bearer {NOTIFY_TOKEN}"));
    assert_eq!(body["job_id"], done["id"]);
    assert_eq!(body["phase"], "report");
    assert_eq!(body["report"], done["phases"][3]["output"]["report"]);

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
    let grants = json!({"versions": ["1.0.0"], "http": [origin]});
    server.grant("convert-currency", &grants).await;
    let fetched = server.submit(&from_api).await;
    let fetched = server.wait_finished(fetched["id"].as_str().unwrap()).await;
    assert_eq!(fetched["status"], "completed", "{fetched}");
    assert_eq!(
        fetched["phases"][1]["output"]["records"][0],
        json!({"region": "north", "amount": 110.0, "currency": "USD"})
    );
    assert_eq!(fetched["phases"][1]["usage"]["http_requests"], 1);
}
