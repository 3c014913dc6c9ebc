//! Schedules through the real server: ticks fire jobs that run, pause and
//! trigger do what they say, bad definitions are refused naming the field,
//! and a template's webhook secret never comes back.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::server::{EventStream, Received, Server};

fn every_second(name: &str) -> Value {
    json!({
        "name": name,
        "cron": "* * * * * *",
        "timezone": "Europe/Berlin",
        "overlap": "allow",
        "job": {
            "phases": [{"name": "e", "plugin": "echo"}],
            "payload": {"from": "schedule"},
            "webhook": {"url": "http://127.0.0.1:9/hook", "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}
        }
    })
}

/// The next event of `kind` on the stream.
async fn next_of(events: &mut EventStream, kind: &str) -> Received {
    loop {
        let event = events.next_event().await.expect("the stream ended");
        if event.kind == kind {
            return event;
        }
    }
}

#[tokio::test]
async fn a_schedule_fires_at_each_tick_and_obeys_pause_trigger_and_delete() {
    let server = Server::start(&[]).await;
    server.upload("echo", "1.0.0", plugin_artifacts::ECHO).await;
    let mut events = server
        .events("/events?types=schedule:fired,schedule:changed", None)
        .await;
    let (status, created) = server.post("/schedules", &every_second("heartbeat")).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(
        created["job"]["webhook"]["secret"],
        Value::Null,
        "the secret stays in"
    );
    assert_eq!(created["paused"], false);
    assert_eq!(
        next_of(&mut events, "schedule:changed").await.data["data"]["change"],
        "created"
    );

    // Two ticks, a second apart, each with its own job that runs.
    let first = next_of(&mut events, "schedule:fired").await.data["data"].clone();
    let second = next_of(&mut events, "schedule:fired").await.data["data"].clone();
    let (tick_1, tick_2) = (
        first["tick"].as_i64().unwrap(),
        second["tick"].as_i64().unwrap(),
    );
    assert_eq!(tick_2 - tick_1, 1000, "{first} {second}");
    assert_eq!(tick_1 % 1000, 0);
    for fired in [&first, &second] {
        let job = server
            .wait_finished(fired["job_id"].as_str().unwrap())
            .await;
        assert_eq!(job["status"], "completed");
        assert_eq!(job["payload"], json!({"from": "schedule"}));
        assert_eq!(job["phases"][0]["version"], "1.0.0");
    }
    assert_ne!(first["job_id"], second["job_id"]);

    // Paused, it fires no tick; a trigger still enqueues, without one.
    let (status, paused) = server.post("/schedules/heartbeat/pause", &json!({})).await;
    assert_eq!((status, &paused["paused"]), (StatusCode::OK, &json!(true)));
    // Long enough for two ticks to have passed, had it not been paused.
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let (status, job) = server
        .post("/schedules/heartbeat/trigger", &json!({}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{job}");
    let mut after_pause = Vec::new();
    loop {
        let event = events.next_event().await.unwrap();
        after_pause.push(event.data["data"].clone());
        if event.kind == "schedule:fired" && event.data["data"]["tick"].is_null() {
            break;
        }
    }
    let ticks: Vec<_> = after_pause
        .iter()
        .filter(|d| d["tick"].as_i64().is_some_and(|t| t > tick_2))
        .collect();
    // A tick already due when the pause landed may still have fired; none
    // after it.
    assert!(
        ticks.len() <= 1,
        "ticks fired while paused: {after_pause:?}"
    );
    assert_eq!(after_pause.last().unwrap()["job_id"], job["id"]);
    let (_, shown) = server.get("/schedules/heartbeat").await;
    assert_eq!(shown["last_fire"]["job_id"], job["id"]);
    assert_eq!(shown["last_fire"]["tick"], Value::Null);

    // Resumed, it fires again from the next tick.
    let (status, _) = server.post("/schedules/heartbeat/resume", &json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let resumed = next_of(&mut events, "schedule:fired").await;
    assert!(resumed.data["data"]["tick"].as_i64().unwrap() > tick_2 + 2_000);

    let (status, _) = server
        .send(server.client.delete(server.url("/schedules/heartbeat")))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = server.get("/schedules/heartbeat").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, listed) = server.get("/schedules").await;
    assert_eq!(listed["schedules"], json!([]));
}

#[tokio::test]
async fn bad_definitions_are_refused_naming_the_field_and_store_nothing() {
    let server = Server::start(&["--schedule-min-interval", "1m", "--max-schedules", "1"]).await;
    server.upload("echo", "1.0.0", plugin_artifacts::ECHO).await;
    let hourly = || {
        let mut spec = every_second("hourly");
        spec["cron"] = json!("0 * * * *");
        spec
    };
    type Change<'a> = &'a dyn Fn(&mut Value);
    let cases: Vec<(Change, &str)> = vec![
        (
            &|s| s["cron"] = json!("61 * * * *"),
            "cron: `61 * * * *` is not a valid pattern",
        ),
        (
            &|s| s["cron"] = json!("* * * *"),
            "cron: `* * * *` has 4 fields",
        ),
        (
            &|s| s["cron"] = json!("*/10 * * * * *"),
            "more often than the server's floor of 60000 ms",
        ),
        (
            &|s| s["timezone"] = json!("Mars/Olympus"),
            "timezone: `Mars/Olympus`",
        ),
        (
            &|s| s["job"]["phases"] = json!([]),
            "job.phases: a job needs at least one phase",
        ),
        (
            &|s| s["job"]["run_at"] = json!("2030-01-01T00:00:00Z"),
            "job.run_at:",
        ),
        (
            &|s| s["job"]["phases"][0]["plugin"] = json!("nope"),
            "job.phases[0].plugin: no plugin named `nope`",
        ),
        (
            &|s| s["job"]["phases"][0]["version"] = json!("9.9.9"),
            "plugin `echo` has no version `9.9.9`",
        ),
        (&|s| s["name"] = json!("a/b"), "name:"),
    ];
    for (change, wanted) in cases {
        let mut spec = hourly();
        change(&mut spec);
        let (status, body) = server.post("/schedules", &spec).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{spec}: {body}");
        assert_eq!(body["error"]["code"], "invalid_schedule");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(wanted), "{message} lacks {wanted}");
    }
    let mut unknown_field = hourly();
    unknown_field["every"] = json!("day");
    let (status, _) = server.post("/schedules", &unknown_field).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (_, listed) = server.get("/schedules").await;
    assert_eq!(listed["schedules"], json!([]), "nothing was stored");

    let (status, _) = server.post("/schedules", &hourly()).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, body) = server.post("/schedules", &hourly()).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (StatusCode::CONFLICT, &json!("schedule_exists"))
    );
    let mut second = hourly();
    second["name"] = json!("second");
    let (status, body) = server.post("/schedules", &second).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (StatusCode::CONFLICT, &json!("too_many_schedules"))
    );
    let (status, body) = server.put("/schedules/hourly", &second).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let (status, _) = server.post("/schedules/nope/trigger", &json!({})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

/// A paused queue still fires schedules, and their jobs wait; past the
/// pending-jobs quota a tick is skipped, saying why.
#[tokio::test]
async fn ticks_past_the_pending_quota_are_skipped() {
    let server = Server::start(&["--max-pending-jobs", "1"]).await;
    server.upload("echo", "1.0.0", plugin_artifacts::ECHO).await;
    let (status, _) = server.post("/queue/pause", &json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let mut events = server
        .events("/events?types=schedule:fired,schedule:skipped", None)
        .await;
    let (status, _) = server.post("/schedules", &every_second("flood")).await;
    assert_eq!(status, StatusCode::CREATED);
    let fired = next_of(&mut events, "schedule:fired").await;
    let skipped = next_of(&mut events, "schedule:skipped").await.data["data"].clone();
    assert_eq!(skipped["reason"], "queue_full", "{skipped}");
    assert!(skipped["tick"].as_i64() > fired.data["data"]["tick"].as_i64());
    let (_, job) = server
        .get(&format!(
            "/jobs/{}",
            fired.data["data"]["job_id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(
        job["status"], "pending",
        "the paused queue keeps it waiting"
    );
}
