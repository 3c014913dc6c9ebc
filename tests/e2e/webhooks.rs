//! Webhooks end to end: signed per the Standard Webhooks specification
//! (checked with its reference library, not our signing code), delivered
//! once after `job:completed`, retried with a stable id, durable across a
//! restart, and still delivered after the job was deleted.

use serde_json::{Value, json};

use crate::receiver::{ALLOW_LOOPBACK, Receiver};
use crate::server::Server;

/// A fixed secret, as a user would give it (`whsec_` + base64 of 32 bytes).
const SECRET: &str = "whsec_MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

fn echo_job_with_webhook(url: &str, secret: Option<&str>) -> Value {
    json!({
        "phases": [{"name": "e", "plugin": "echo"}],
        "payload": {"order": 7},
        "webhook": {"url": url, "secret": secret}
    })
}

/// Waits for the job's `job:webhook:delivered` event.
pub async fn wait_delivered(server: &Server, id: &str) {
    let mut events = server
        .events(
            &format!("/events?job={id}&types=job:webhook:delivered"),
            Some(0),
        )
        .await;
    events.next_event().await.expect("delivered event");
}

fn verify(secret: &str, delivery: &crate::receiver::Delivery) {
    let webhook =
        standardwebhooks::Webhook::new(secret).expect("reference library accepts the secret");
    webhook
        .verify(&delivery.body, &delivery.headers)
        .expect("signature verifies with the reference library");
}

#[tokio::test]
async fn webhook_arrives_once_signed_after_completion() {
    let receiver = Receiver::start(0).await;
    let server = Server::start(&ALLOW_LOOPBACK).await;
    server.upload("echo", "1.0.0", plugin_artifacts::ECHO).await;
    let job = server
        .submit(&echo_job_with_webhook(&receiver.url, Some(SECRET)))
        .await;
    let id = job["id"].as_str().unwrap();
    assert!(
        !job.to_string().contains("MDEyMzQ1"),
        "the API never echoes a secret: {job}"
    );

    let mut events = server.events(&format!("/events?job={id}"), Some(0)).await;
    let seen = events.until(id, "job:webhook:delivered").await;
    let position = |kind: &str| seen.iter().position(|e| e.kind == kind).unwrap();
    assert!(position("job:completed") < position("job:webhook:delivered"));
    // The job's own stream, replayed once the webhook's outcome is logged
    // after the job's end, still ends with the job.
    let mut replay = server.events(&format!("/jobs/{id}/events"), None).await;
    let mut kinds = Vec::new();
    while let Some(event) = replay.next_event().await {
        kinds.push(event.kind);
    }
    assert_eq!(kinds.last().unwrap(), "job:completed", "{kinds:?}");

    let deliveries = receiver.wait_for(1).await;
    assert_eq!(deliveries.len(), 1, "delivered once");
    let delivery = &deliveries[0];
    verify(SECRET, delivery);
    assert!(delivery.header("webhook-id").starts_with("msg_"));
    let body: Value = serde_json::from_slice(&delivery.body).unwrap();
    assert_eq!(body["type"], "job:completed");
    assert_eq!(body["data"]["job_id"], id);
    assert_eq!(body["data"]["status"], "completed");

    let (_, job) = server.get(&format!("/jobs/{id}")).await;
    assert_eq!(job["webhook"]["status"], "delivered");
    assert_eq!(job["webhook"]["attempts"], 1);
    assert_eq!(job["webhook"]["id"], delivery.header("webhook-id"));
    assert!(
        !job.to_string().contains("MDEyMzQ1"),
        "the API never echoes a secret: {job}"
    );

    // Settled, the delivery no longer keeps the secret; deleted, the job
    // takes its settled delivery with it.
    let outbox = |query: &str| -> i64 {
        let db = rusqlite::Connection::open_with_flags(
            server.dir.path().join("data/jobhost.db"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        db.query_row(query, [], |row| row.get(0)).unwrap()
    };
    assert_eq!(
        outbox("SELECT COUNT(*) FROM webhook_deliveries WHERE secret IS NOT NULL"),
        0
    );
    let (status, _) = server
        .send(server.client.delete(server.url(&format!("/jobs/{id}"))))
        .await;
    assert_eq!(status, 204);
    assert_eq!(outbox("SELECT COUNT(*) FROM webhook_deliveries"), 0);
}

#[tokio::test]
async fn server_default_secret_signs_jobs_without_one() {
    let receiver = Receiver::start(0).await;
    let server = Server::start(&[
        ALLOW_LOOPBACK[0],
        ALLOW_LOOPBACK[1],
        "--webhook-secret",
        SECRET,
    ])
    .await;
    server.upload("echo", "1.0.0", plugin_artifacts::ECHO).await;
    server
        .submit(&echo_job_with_webhook(&receiver.url, None))
        .await;
    verify(SECRET, &receiver.wait_for(1).await[0]);
}

#[tokio::test]
async fn failing_receiver_gets_retries_with_the_same_webhook_id() {
    let receiver = Receiver::start(2).await; // 503, then 429 with Retry-After: 1
    let server = Server::start(&ALLOW_LOOPBACK).await;
    server.upload("echo", "1.0.0", plugin_artifacts::ECHO).await;
    let job = server
        .submit(&echo_job_with_webhook(&receiver.url, Some(SECRET)))
        .await;
    let id = job["id"].as_str().unwrap();
    let mut events = server
        .events(&format!("/jobs/{id}/events?types=job:completed"), None)
        .await;
    events.next_event().await;
    wait_delivered(&server, id).await;

    let deliveries = receiver.received().await;
    assert_eq!(deliveries.len(), 3);
    let id_header = deliveries[0].header("webhook-id");
    assert!(
        deliveries
            .iter()
            .all(|d| d.header("webhook-id") == id_header),
        "stable id across retries"
    );
    assert!(
        deliveries.iter().all(|d| d.body == deliveries[0].body),
        "same body every attempt"
    );
    for delivery in &deliveries {
        verify(SECRET, delivery);
    }
    let (_, job) = server.get(&format!("/jobs/{id}")).await;
    assert_eq!(job["webhook"]["attempts"], 3);
    assert_eq!(job["webhook"]["status"], "delivered");
}

#[tokio::test]
async fn a_receiver_down_across_a_restart_gets_the_webhook_after_it() {
    let address = crate::receiver::closed_address();
    let url = format!("http://{address}/hook");
    let mut server = Server::start(&ALLOW_LOOPBACK).await;
    server.upload("echo", "1.0.0", plugin_artifacts::ECHO).await;
    let job = server
        .submit(&echo_job_with_webhook(&url, Some(SECRET)))
        .await;
    let id = job["id"].as_str().unwrap().to_owned();
    server.wait_finished(&id).await;
    // The delivery was written with the terminal state; nobody can take it yet.
    let (_, job) = server.get(&format!("/jobs/{id}")).await;
    assert_eq!(job["webhook"]["status"], "pending");
    server.kill();

    let receiver = Receiver::start_on(address, 0).await;
    let server = server.restart();
    let delivery = &receiver.wait_for(1).await[0];
    verify(SECRET, delivery);
    wait_delivered(&server, &id).await;
    let (_, job) = server.get(&format!("/jobs/{id}")).await;
    assert_eq!(job["webhook"]["status"], "delivered");
}

/// DESIGN.md behaviour 6 (over HTTP, with the job deleted as retention
/// would): webhook bookkeeping for a deleted job does not fail.
#[tokio::test]
async fn webhook_for_a_deleted_job_is_still_delivered() {
    let address = crate::receiver::closed_address();
    let url = format!("http://{address}/hook");
    let server = Server::start(&ALLOW_LOOPBACK).await;
    server.upload("echo", "1.0.0", plugin_artifacts::ECHO).await;
    let job = server
        .submit(&echo_job_with_webhook(&url, Some(SECRET)))
        .await;
    let id = job["id"].as_str().unwrap().to_owned();
    server.wait_finished(&id).await;
    let mut events = server
        .events(
            &format!("/events?job={id}&types=job:deleted,job:webhook:delivered"),
            None,
        )
        .await;
    let deleted = server
        .send(server.client.delete(server.url(&format!("/jobs/{id}"))))
        .await;
    assert_eq!(deleted.0, 204);
    assert_eq!(events.next_event().await.unwrap().kind, "job:deleted");

    let receiver = Receiver::start_on(address, 0).await;
    let delivered = events.next_event().await.unwrap();
    assert_eq!(delivered.kind, "job:webhook:delivered");
    assert_eq!(delivered.data["job_id"], id.as_str());
    verify(SECRET, &receiver.wait_for(1).await[0]);
    assert_eq!(server.get(&format!("/jobs/{id}")).await.0, 404);
}
