//! Crash safety with the real binary: jobs mid-phase when the process is
//! killed with SIGKILL each reach exactly one terminal state after a
//! restart, with no phase output lost or duplicated, and the recovery on
//! record.

use serde_json::json;

use crate::server::Server;

#[tokio::test]
async fn jobs_survive_sigkill_mid_phase() {
    let mut server = Server::start(&["--concurrency", "4"]).await;
    server
        .upload("sleep", "1.0.0", plugin_artifacts::SLEEP)
        .await;
    server.upload("echo", "1.0.0", plugin_artifacts::ECHO).await;
    let mut events = server
        .events("/events?types=job:phase:progress", None)
        .await;
    let mut ids = Vec::new();
    for n in 0..4 {
        let spec = json!({
            "phases": [
                {"name": "nap", "plugin": "sleep", "config": {"ms": 3000, "steps": 30}},
                {"name": "after", "plugin": "echo"}
            ],
            "payload": {"n": n},
            "max_attempts": 3
        });
        ids.push(
            server.submit(&spec).await["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    // Every job is mid-phase once each has reported progress.
    let mut progressing = std::collections::HashSet::new();
    while progressing.len() < ids.len() {
        let event = events.next_event().await.expect("progress events");
        progressing.insert(event.data["job_id"].as_str().unwrap().to_owned());
    }
    drop(events);
    server.kill();

    let server = server.restart();
    for id in &ids {
        let job = server.wait_finished(id).await;
        assert_eq!(job["status"], "completed", "{job}");
        assert_eq!(job["attempt"], 2, "{job}");
        assert_eq!(job["phases"][0]["output"], json!({"slept_ms": 3000}));
        assert_eq!(job["phases"][0]["attempts"], 2);
        assert_eq!(job["phases"][1]["output"]["payload"], job["payload"]);
        let errors = job["errors"].as_array().unwrap();
        assert_eq!(errors.len(), 1, "{job}");
        assert_eq!(errors[0]["phase"], "nap");
        assert_eq!(errors[0]["attempt"], 1);
        assert!(
            errors[0]["error"]
                .as_str()
                .unwrap()
                .contains("during phase `nap` (attempt 1)")
        );

        // Exactly one terminal event, and each phase completed exactly once.
        let mut stream = server.events(&format!("/jobs/{id}/events"), None).await;
        let mut kinds = Vec::new();
        while let Some(event) = stream.next_event().await {
            kinds.push((
                event.kind,
                event.data["data"]["phase"].as_str().map(str::to_owned),
            ));
        }
        let count = |kind: &str, phase: Option<&str>| {
            kinds
                .iter()
                .filter(|(k, p)| k == kind && (phase.is_none() || p.as_deref() == phase))
                .count()
        };
        let terminal =
            count("job:completed", None) + count("job:failed", None) + count("job:cancelled", None);
        assert_eq!(terminal, 1, "{kinds:?}");
        assert_eq!(count("job:phase:completed", Some("nap")), 1, "{kinds:?}");
        assert_eq!(count("job:phase:completed", Some("after")), 1, "{kinds:?}");
        assert_eq!(
            count("job:retrying", None),
            1,
            "the recovery is on record: {kinds:?}"
        );
    }
}
