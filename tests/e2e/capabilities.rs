//! Grants: what an operator lets a plugin read through `wasi:config/store`,
//! set over HTTP and read by a real component, with secret values that stay
//! out of every route, event and log.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::server::Server;

const ADMIN: &str = "adm1n";
const SUBMITTER: &str = "submitter-1";
const SECRET_VALUE: &str = "tok-5ecret-value";

/// Runs `read-config` (at `version`) on `keys`; returns its output.
async fn read(server: &Server, version: &str, keys: &[&str]) -> Value {
    let job = server
        .submit(&json!({
            "phases": [{"name": "read", "plugin": "read-config", "version": version}],
            "payload": {"keys": keys},
        }))
        .await;
    let job = server.wait_finished(job["id"].as_str().unwrap()).await;
    assert_eq!(job["status"], "completed", "{job}");
    job["phases"][0]["output"].clone()
}

async fn put_grants(server: &Server, token: &str, grants: &Value) -> (StatusCode, Value) {
    let request = server
        .client
        .put(server.url("/plugins/read-config/grants"))
        .bearer_auth(token)
        .json(grants);
    let response = request.send().await.unwrap();
    (
        response.status(),
        response.json().await.unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn a_plugin_reads_what_its_version_was_granted_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets.json");
    let file = json!({"mail_token": SECRET_VALUE, "db_password": "not-for-plugins"});
    std::fs::write(&secrets, file.to_string()).unwrap();
    let tokens = format!("{ADMIN},submit:{SUBMITTER}");
    let secrets_arg = secrets.to_str().unwrap();
    let server = Server::start(&["--tokens", &tokens, "--secrets-file", secrets_arg]).await;
    for version in ["1.0.0", "2.0.0"] {
        let (status, body) = server
            .upload("read-config", version, plugin_artifacts::READ_CONFIG)
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }

    // Without grants the plugin loads and runs; its reads fail, naming why.
    let output = read(&server, "1.0.0", &["region"]).await;
    let refused = output["errors"]["region"].as_str().unwrap();
    assert!(refused.contains("has no grants"), "{refused}");
    assert!(
        refused.contains("PUT /plugins/read-config/grants"),
        "{refused}"
    );

    // Grants are the operator's: a submitter may not set them, and grants
    // that name a version the plugin lacks store nothing.
    let grants = json!({
        "versions": ["1.0.0"],
        "config": {"region": "eu-west-1"},
        "secrets": ["mail_token", "smtp_password"],
    });
    let (status, _) = put_grants(&server, SUBMITTER, &grants).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, body) = put_grants(&server, ADMIN, &json!({"versions": ["9.9.9"]})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["code"], "invalid_grants");
    assert!(body["error"]["message"].as_str().unwrap().contains("9.9.9"));
    let (status, body) = put_grants(&server, ADMIN, &json!({"versions": [], "http": []})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let (_, plugin) = server.get("/plugins/read-config").await;
    assert_eq!(
        plugin["grants"],
        Value::Null,
        "nothing was stored: {plugin}"
    );

    let (status, body) = put_grants(&server, ADMIN, &grants).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // The covered version reads its plain value and its secret; a secret
    // granted but held by no one, and a secret the server holds but did
    // not grant, are refused, each naming what to do.
    let keys = ["region", "mail_token", "smtp_password", "db_password"];
    let output = read(&server, "1.0.0", &keys).await;
    assert_eq!(
        output["values"],
        json!({"region": "eu-west-1", "mail_token": SECRET_VALUE}),
        "{output}"
    );
    let errors = &output["errors"];
    let no_value = errors["smtp_password"].as_str().unwrap();
    assert!(
        no_value.contains("JOBHOST_SECRET_SMTP_PASSWORD"),
        "{no_value}"
    );
    let not_granted = errors["db_password"].as_str().unwrap();
    assert!(
        not_granted.contains("`db_password` is not granted to plugin `read-config` 1.0.0"),
        "{not_granted}"
    );

    // A new version does not inherit the grants.
    let output = read(&server, "2.0.0", &["region"]).await;
    let uncovered = output["errors"]["region"].as_str().unwrap();
    assert!(
        uncovered.contains("do not cover version 2.0.0 (they cover 1.0.0)"),
        "{uncovered}"
    );

    // Grants show by name; the secret's value is nowhere to be read.
    let (_, plugin) = server.get("/plugins/read-config").await;
    assert_eq!(plugin["grants"], grants, "{plugin}");
    let mut events = server
        .events("/events?types=plugin:grants:changed", Some(0))
        .await;
    let changed = events.next_event().await.unwrap();
    assert_eq!(
        changed.data["data"],
        json!({
            "plugin": "read-config",
            "versions": ["1.0.0"],
            "config_keys": ["region"],
            "secrets": ["mail_token", "smtp_password"],
        }),
        "{:?}",
        changed.data
    );
    let log = server.log();
    assert!(
        log.contains("refused a guest's config read") && log.contains("db_password"),
        "refusals are logged on the host"
    );
    for text in [log, plugin.to_string(), changed.data.to_string()] {
        assert!(
            !text.contains(SECRET_VALUE),
            "a secret value leaked: {text}"
        );
    }
}

/// The contract gained an import (`wasi:config/store`) without a version
/// bump: a component built against the contract before it still loads and
/// runs. `tests/fixtures/echo-contract-0.1.0.wasm` is `plugins/testing/echo`
/// built at commit d29ea63, before the import existed.
#[tokio::test]
async fn a_plugin_built_before_config_existed_still_runs() {
    let server = Server::start(&[]).await;
    let old = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/echo-contract-0.1.0.wasm"
    ))
    .unwrap();
    let response = server
        .client
        .put(server.url("/plugins/echo/versions/0.1.0"))
        .body(old)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let job = server
        .submit(&json!({"phases": [{"name": "e", "plugin": "echo"}], "payload": 7}))
        .await;
    let job = server.wait_finished(job["id"].as_str().unwrap()).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["phases"][0]["output"]["payload"], 7);
}
