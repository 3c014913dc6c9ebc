//! `jobhost new-plugin` makes a crate that builds into a working component
//! with one command.

use std::path::PathBuf;
use std::process::Command;

#[tokio::test]
async fn new_plugin_builds_and_runs() {
    // Inside the repository's target directory, so the pinned toolchain
    // (with its wasm32-wasip2 target) applies, and builds are cached.
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/scaffold-test");
    let crate_dir = root.join("shout-loud");
    let _ = std::fs::remove_dir_all(&crate_dir);
    std::fs::create_dir_all(&root).unwrap();
    let jobhost = env!("CARGO_BIN_EXE_jobhost");

    let created = Command::new(jobhost)
        .args(["new-plugin", "shout-loud"])
        .current_dir(&root)
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
    assert!(built.success(), "the scaffolded crate did not build");

    let component = root.join("target/wasm32-wasip2/release/shout_loud.wasm");
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
