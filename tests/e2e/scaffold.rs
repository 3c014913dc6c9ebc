//! `jobhost new-plugin` makes a crate that builds into a working component
//! with one command: a text phase that runs locally, and an HTTP phase that
//! calls a real API once granted.

use std::path::{Path, PathBuf};
use std::process::Command;

use axum::Router;
use axum::routing::get;
use reqwest::StatusCode;
use serde_json::json;

use crate::server::Server;

/// Scaffolds `name` (with `flags`) under `root` and builds it; returns its
/// component. Inside the repository's target directory, so the pinned
/// toolchain (with its wasm32-wasip2 target) applies, and builds are cached.
async fn scaffold_and_build(root: &Path, name: &str, flags: &[&str]) -> PathBuf {
    let crate_dir = root.join(name);
    let _ = std::fs::remove_dir_all(&crate_dir);
    std::fs::create_dir_all(root).unwrap();
    let created = Command::new(env!("CARGO_BIN_EXE_jobhost"))
        .args(["new-plugin", name])
        .args(flags)
        .current_dir(root)
        .output()
        .unwrap();
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    assert!(String::from_utf8_lossy(&created.stdout).contains("cargo build --release"));
    let built = tokio::task::spawn_blocking({
        let crate_dir = crate_dir.clone();
        move || {
            Command::new(env!("CARGO"))
                .args(["build", "--release", "--quiet"])
                .current_dir(&crate_dir)
                .env("CARGO_TARGET_DIR", crate_dir.join("../target"))
                .env_remove("RUSTFLAGS")
                .env_remove("CARGO_ENCODED_RUSTFLAGS")
                .status()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(built.success(), "the scaffolded crate {name} did not build");
    let file = format!("{}.wasm", name.replace('-', "_"));
    root.join("target/wasm32-wasip2/release").join(file)
}

fn scaffold_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/scaffold-test")
}

#[tokio::test]
async fn new_plugin_builds_and_runs() {
    let jobhost = env!("CARGO_BIN_EXE_jobhost");
    let component = scaffold_and_build(&scaffold_root(), "shout-loud", &[]).await;
    let ran = Command::new(jobhost)
        .args([
            "run-phase",
            component.to_str().unwrap(),
            "--input",
            r#"{"text": "héllo"}"#,
        ])
        .output()
        .unwrap();
    assert!(
        ran.status.success(),
        "{}",
        String::from_utf8_lossy(&ran.stderr)
    );
    let output: serde_json::Value = serde_json::from_slice(&ran.stdout).unwrap();
    assert_eq!(
        output,
        serde_json::json!({"text": "HÉLLO", "characters": 5})
    );
    let refused = Command::new(jobhost)
        .args(["run-phase", component.to_str().unwrap(), "--input", "{}"])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("the payload needs a \"text\" string")
    );
}

// Two workers: the local API keeps serving while a worker waits for
// `run-phase`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_plugin_http_calls_the_api_it_is_granted() {
    let component = scaffold_and_build(&scaffold_root(), "fetch-page", &["--http"]).await;
    let api = Router::new().route("/status", get(|| async { "all good" }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = format!("http://{}", listener.local_addr().unwrap());
    let _api = tokio::spawn(async move { axum::serve(listener, api).await.unwrap() });

    // Tried locally first: run-phase grants the origin with --allow-http,
    // and refuses it without.
    let run_phase = |allow: &[&str]| {
        let input = json!({"url": format!("{origin}/status")}).to_string();
        let mut command = Command::new(env!("CARGO_BIN_EXE_jobhost"));
        command.args(["run-phase", component.to_str().unwrap(), "--input", &input]);
        command.args(allow);
        command.output().unwrap()
    };
    let allowed = run_phase(&["--allow-http", &origin]);
    assert!(
        allowed.status.success(),
        "{}",
        String::from_utf8_lossy(&allowed.stderr)
    );
    let output: serde_json::Value = serde_json::from_slice(&allowed.stdout).unwrap();
    assert_eq!(output, json!({"status": 200, "body": "all good"}));
    let refused = run_phase(&[]);
    assert_eq!(refused.status.code(), Some(1));
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        said.contains(&format!("origin {origin} is not granted")),
        "{said}"
    );

    let server = Server::start(&[]).await;
    let (status, body) = server
        .upload("fetch-page", "0.1.0", component.to_str().unwrap())
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let grants = json!({"versions": ["0.1.0"], "http": [origin]});
    server.grant("fetch-page", &grants).await;
    let job = server
        .submit(&json!({
            "phases": [{"name": "fetch", "plugin": "fetch-page"}],
            "payload": {"url": format!("{origin}/status")},
        }))
        .await;
    let job = server.wait_finished(job["id"].as_str().unwrap()).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(
        job["phases"][0]["output"],
        json!({"status": 200, "body": "all good"})
    );
}
