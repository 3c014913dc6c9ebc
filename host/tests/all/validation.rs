//! Invalid plugins are rejected at load time, each with its own error.

use jobhost::runtime::LoadError;

use crate::runtime;

#[tokio::test]
async fn bytes_that_are_not_wasm() {
    let err = runtime()
        .load(b"#!/bin/sh\necho not a plugin\n")
        .await
        .unwrap_err();
    assert!(matches!(err, LoadError::NotWasm), "{err}");
}

#[tokio::test]
async fn a_core_module_instead_of_a_component() {
    // The smallest valid core module: header and version 1, no sections.
    let err = runtime().load(b"\0asm\x01\0\0\0").await.unwrap_err();
    assert!(matches!(err, LoadError::CoreModule), "{err}");
    assert!(err.to_string().contains("wasm32-wasip2"));
}

#[tokio::test]
async fn a_truncated_component() {
    let mut bytes = plugin_artifacts::bytes(plugin_artifacts::ECHO);
    bytes.truncate(bytes.len() / 2);
    let err = runtime().load(&bytes).await.unwrap_err();
    assert!(matches!(err, LoadError::Invalid(_)), "{err}");
}

#[tokio::test]
async fn a_component_of_another_world() {
    let bytes = plugin_artifacts::bytes(plugin_artifacts::WRONG_WORLD);
    let err = runtime().load(&bytes).await.unwrap_err();
    assert!(matches!(err, LoadError::NotAPlugin(_)), "{err}");
    assert!(
        err.to_string().contains("jobhost:plugin/phase@0.1.0"),
        "{err}"
    );
}
