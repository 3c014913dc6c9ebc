//! Invalid plugins are rejected at load time, each with its own error.

use jobhost::runtime::LoadError;

use crate::runtime;

#[tokio::test]
async fn bytes_that_are_not_wasm() {
    let err = runtime()
        .load(b"#!/bin/sh\necho not a plugin\n", None)
        .await
        .unwrap_err();
    assert!(matches!(err, LoadError::NotWasm), "{err}");
}

#[tokio::test]
async fn a_core_module_instead_of_a_component() {
    // The smallest valid core module: header and version 1, no sections.
    let err = runtime().load(b"\0asm\x01\0\0\0", None).await.unwrap_err();
    assert!(matches!(err, LoadError::CoreModule), "{err}");
    assert!(err.to_string().contains("wasm32-wasip2"));
}

#[tokio::test]
async fn a_truncated_component() {
    let mut bytes = plugin_artifacts::bytes(plugin_artifacts::ECHO);
    bytes.truncate(bytes.len() / 2);
    let err = runtime().load(&bytes, None).await.unwrap_err();
    assert!(matches!(err, LoadError::Invalid(_)), "{err}");
}

#[tokio::test]
async fn a_component_of_another_world() {
    let bytes = plugin_artifacts::bytes(plugin_artifacts::WRONG_WORLD);
    let err = runtime().load(&bytes, None).await.unwrap_err();
    assert!(matches!(err, LoadError::NotAPlugin(_)), "{err}");
    assert!(
        err.to_string().contains("jobhost:plugin/phase@0.1.0"),
        "{err}"
    );
}

/// Compile cost grows with the functions a component defines: past the
/// bound it is refused before anything is compiled.
#[tokio::test]
async fn a_component_with_too_many_functions() {
    let runtime = jobhost::runtime::Runtime::new(jobhost::runtime::RuntimeConfig {
        max_functions: 10,
        ..crate::test_config()
    })
    .unwrap();
    let bytes = plugin_artifacts::bytes(plugin_artifacts::ECHO);
    let err = runtime.load(&bytes, None).await.unwrap_err();
    assert!(matches!(err, LoadError::TooLarge(_)), "{err}");
    assert!(
        err.to_string().contains("more than the limit of 10"),
        "{err}"
    );
    assert_eq!(
        runtime.cache_stats().compiled,
        0,
        "refused before compiling"
    );
}
