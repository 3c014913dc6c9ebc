//! A phase gets nothing the contract does not grant: no files, no
//! environment, no network.

use crate::{load, output, run, runtime};

#[tokio::test]
async fn file_environment_and_network_are_denied() {
    // SAFETY: set before the runtime exists; no other thread reads it.
    unsafe { std::env::set_var("JOBHOST_TEST_SECRET", "hunter2") };
    let runtime = runtime();
    let escape = load(&runtime, plugin_artifacts::ESCAPE).await;
    let seen = output(&run(&runtime, &escape, "{}", "{}").await);
    for probe in ["read_file", "list_dir", "home", "tcp_connect", "dns"] {
        let outcome = seen[probe].as_str().unwrap();
        assert!(
            outcome.starts_with("denied: "),
            "{probe} was not denied: {outcome}"
        );
    }
    assert_eq!(
        seen["env_vars"],
        serde_json::json!([]),
        "the guest saw environment variables"
    );
}
