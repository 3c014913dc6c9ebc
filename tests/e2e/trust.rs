//! The host under attack by who it does not trust: a legal plugin that
//! floods it through the contract, a submitter with out-of-range specs and
//! webhook URLs aimed inside, web pages and idle clients, and a receiver
//! that never answers. Each test fails on a host without the bound.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::receiver::ALLOW_LOOPBACK;
use crate::server::{Server, TIMEOUT};

/// Bytes of every file under `dir`.
fn size_of(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| {
            let entry = entry.unwrap();
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                size_of(&entry.path())
            } else {
                meta.len()
            }
        })
        .sum()
}

#[tokio::test]
async fn out_of_range_specs_are_refused_and_listing_keeps_working() {
    let server = Server::start(&[]).await;
    server.upload("echo", "1.0.0", plugin_artifacts::ECHO).await;
    let echo = json!([{"name": "e", "plugin": "echo"}]);
    for (field, spec) in [
        (
            "delay_ms",
            json!({"phases": echo, "delay_ms": 9_000_000_000_000_000_u64}),
        ),
        (
            "run_at",
            json!({"phases": echo, "run_at": "9999-12-31T23:59:59Z"}),
        ),
        ("priority", json!({"phases": echo, "priority": 1_000_000})),
        (
            "backoff.max_ms",
            json!({"phases": echo, "backoff": {"max_ms": u64::MAX}}),
        ),
        (
            "phases[0].timeout_ms",
            json!({"phases": [{"name": "e", "plugin": "echo", "timeout_ms": u64::MAX}]}),
        ),
        (
            "idempotency_key",
            json!({"phases": echo, "idempotency_key": "k".repeat(257)}),
        ),
    ] {
        let (status, body) = server.post("/jobs", &spec).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{field}: {body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(field), "`{message}` does not name {field}");
    }
    let (status, page) = server.get("/jobs").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page["jobs"], json!([]), "nothing was stored");
}

/// A plugin that floods progress, logs and failure messages leaves the
/// data directory and its jobs' JSON small.
#[tokio::test]
async fn a_flooding_plugin_cannot_fill_the_disk_or_the_job() {
    let server = Server::start(&[]).await;
    server
        .upload("flood", "1.0.0", plugin_artifacts::FLOOD)
        .await;
    let data = server.dir.path().join("data");
    let before = size_of(&data);

    let floods = [
        json!({"mode": "progress", "count": 3000, "bytes": 65536}),
        json!({"mode": "log", "count": 3000, "bytes": 65536}),
        json!({"mode": "fail", "bytes": 41_943_040}),
    ];
    for config in floods {
        let job = server
            .submit(&json!({"phases": [{"name": "f", "plugin": "flood", "config": config}], "max_attempts": 1}))
            .await;
        let id = job["id"].as_str().unwrap();
        server.wait_finished(id).await;
        let shown = server.get_text(&format!("/jobs/{id}")).await;
        assert!(
            shown.len() < 32 << 10,
            "GET /jobs/{id} is {} bytes",
            shown.len()
        );
    }
    let grown = size_of(&data).saturating_sub(before);
    assert!(grown < 1 << 20, "the data directory grew by {grown} bytes");
}

/// A webhook aimed at the host itself, by address or by a name that
/// resolves to loopback, is refused before any connection; readers see
/// only the category.
#[tokio::test]
async fn webhooks_cannot_reach_the_host_itself() {
    let server = Server::start(&[]).await;
    server.upload("echo", "1.0.0", plugin_artifacts::ECHO).await;
    let port = server.url.rsplit(':').next().unwrap().to_owned();
    for target in [
        format!("http://127.0.0.1:{port}/queue/pause"),
        format!("http://localhost:{port}/queue/pause"),
        format!("http://[::ffff:127.0.0.1]:{port}/queue/pause"),
    ] {
        let job = server
            .submit(
                &json!({"phases": [{"name": "e", "plugin": "echo"}], "webhook": {"url": target}}),
            )
            .await;
        let id = job["id"].as_str().unwrap();
        let mut events = server
            .events(
                &format!("/events?job={id}&types=job:webhook:failed"),
                Some(0),
            )
            .await;
        let failed = events.next_event().await.expect("the delivery fails");
        assert_eq!(
            failed.data["data"]["error"], "refused by policy",
            "{target}"
        );
        let (_, job) = server.get(&format!("/jobs/{id}")).await;
        assert_eq!(job["webhook"]["last_error"], "refused by policy");
    }
    let (_, queue) = server.get("/queue").await;
    assert_eq!(queue["paused"], false, "a webhook paused the queue");
    assert!(server.log().contains("loopback address: refused by policy"));
}

#[tokio::test]
async fn a_second_server_on_the_same_data_directory_exits_at_once() {
    let server = Server::start(&[]).await;
    let second = Command::new(env!("CARGO_BIN_EXE_jobhost"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(server.dir.path().join("data"))
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains(&format!("another jobhost (pid {})", server.pid())),
        "{stderr}"
    );
    assert_eq!(
        server.get("/healthz").await.0,
        StatusCode::OK,
        "the first still serves"
    );
    // Everything in the data directory is its owner's alone.
    for entry in std::fs::read_dir(server.dir.path().join("data")).unwrap() {
        use std::os::unix::fs::PermissionsExt;
        let entry = entry.unwrap();
        let mode = entry.metadata().unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{:?} is {mode:o}", entry.path());
    }
}

/// Redis's protected mode: without tokens, loopback only, and a page on
/// another site (DNS rebinding, a forged form) cannot use the API.
#[tokio::test]
async fn without_tokens_only_local_clients_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let exposed = Command::new(env!("CARGO_BIN_EXE_jobhost"))
        .args(["serve", "--listen", "0.0.0.0:0", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(exposed.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&exposed.stderr);
    assert!(
        stderr.contains("--tokens-file") && stderr.contains("--insecure-no-auth"),
        "{stderr}"
    );

    let server = Server::start(&["--allowed-host", "jobs.internal"]).await;
    let c = &server.client;
    let get_as = |host: &str| c.get(server.url("/jobs")).header("host", host).send();
    let rebound = get_as("evil.example:8080").await.unwrap();
    assert_eq!(rebound.status(), StatusCode::FORBIDDEN);
    let body: Value = rebound.json().await.unwrap();
    assert_eq!(body["error"]["code"], "forbidden_host");
    assert_eq!(
        get_as("jobs.internal:8080").await.unwrap().status(),
        StatusCode::OK
    );
    assert_eq!(
        get_as("localhost:1").await.unwrap().status(),
        StatusCode::OK
    );

    let post_from = |origin: &str| {
        c.post(server.url("/queue/pause"))
            .header("origin", origin)
            .json(&json!({}))
            .send()
    };
    let forged = post_from("http://evil.example").await.unwrap();
    assert_eq!(forged.status(), StatusCode::FORBIDDEN);
    let body: Value = forged.json().await.unwrap();
    assert_eq!(body["error"]["code"], "forbidden_origin");
    assert_eq!(server.get("/queue").await.1["paused"], false);
    assert_eq!(
        post_from("http://localhost:3000").await.unwrap().status(),
        StatusCode::OK
    );
}

/// Under the common 1,024-file limit, 1,100 idle streams from one address
/// are refused past the per-address cap at once, and the server still
/// answers health checks and submits.
#[tokio::test]
async fn idle_streams_cannot_exhaust_descriptors() {
    let server = Server::start_with_file_limit(&[], 1024).await;
    server.upload("echo", "1.0.0", plugin_artifacts::ECHO).await;
    let attempts = (0..1100).map(|_| async {
        // A client of its own per stream: one connection each.
        let client = reqwest::Client::new();
        let response = client.get(server.url("/events")).send().await.unwrap();
        (response.status(), response)
    });
    let opened = futures::future::join_all(attempts).await;
    let held = opened
        .iter()
        .filter(|(status, _)| *status == StatusCode::OK)
        .count();
    let refused = opened
        .iter()
        .filter(|(status, _)| *status == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert_eq!(held, 64, "the per-address cap");
    assert_eq!(held + refused, 1100);
    assert_eq!(server.get("/healthz").await.0, StatusCode::OK);
    server
        .submit(&json!({"phases": [{"name": "e", "plugin": "echo"}]}))
        .await;
    drop(opened);
}

/// Clients that send their headers a byte at a time (slowloris) are cut
/// off after the header deadline, so they cannot hold every connection:
/// with all four allowed connections taken by them, `/healthz` still
/// answers once their deadline passes.
#[tokio::test]
async fn slow_headers_cannot_hold_the_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = Server::start(&["--max-connections", "4", "--header-read-timeout", "1s"]).await;
    let address = server.url.trim_start_matches("http://").to_owned();
    let mut slow = Vec::new();
    for _ in 0..4 {
        let mut socket = tokio::net::TcpStream::connect(&address).await.unwrap();
        socket
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n")
            .await
            .unwrap();
        slow.push(socket);
    }
    let (status, _) = tokio::time::timeout(TIMEOUT, server.get("/healthz"))
        .await
        .expect("healthz answered while slow clients held the connections");
    assert_eq!(status, StatusCode::OK);
    for mut socket in slow {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(TIMEOUT, socket.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "a slow client was never cut off");
    }
}

/// A full database (here its size limit) answers 503 with a clear error,
/// and loses nothing it had accepted.
#[tokio::test]
async fn a_full_database_answers_503_and_keeps_what_it_accepted() {
    let server = Server::start(&["--max-db-mb", "2"]).await;
    server.upload("echo", "1.0.0", plugin_artifacts::ECHO).await;
    let big = "x".repeat(100 << 10);
    let spec = json!({"phases": [{"name": "e", "plugin": "echo"}], "payload": {"big": big}, "delay_ms": 3_600_000});
    let mut accepted = Vec::new();
    let refusal = loop {
        assert!(accepted.len() < 100, "2 MiB held 100 jobs of 100 KiB");
        let (status, body) = server.post("/jobs", &spec).await;
        match status {
            StatusCode::CREATED => accepted.push(body["id"].as_str().unwrap().to_owned()),
            _ => break (status, body),
        }
    };
    assert_eq!(refusal.0, StatusCode::SERVICE_UNAVAILABLE, "{}", refusal.1);
    assert_eq!(refusal.1["error"]["code"], "storage_full");
    assert!(!accepted.is_empty());
    for id in &accepted {
        let (status, job) = server.get(&format!("/jobs/{id}")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(job["payload"]["big"], big);
    }
    assert_eq!(server.get("/healthz").await.0, StatusCode::OK);
}

/// A client that sends a request's body a byte at a time is answered 408
/// at the request deadline, its connection closed.
#[tokio::test]
async fn a_slow_body_gets_a_408() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = Server::start(&["--request-timeout", "1s"]).await;
    let address = server.url.trim_start_matches("http://").to_owned();
    let mut socket = tokio::net::TcpStream::connect(&address).await.unwrap();
    socket
        .write_all(b"POST /jobs HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(TIMEOUT, socket.read_to_end(&mut answer))
        .await
        .expect("the slow request was never answered")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
}

/// A new `/events` client starts now, told the head in its first message;
/// history is asked for with `Last-Event-ID: 0`.
#[tokio::test]
async fn a_new_stream_starts_now_and_history_is_explicit() {
    let server = Server::start(&[]).await;
    server.upload("echo", "1.0.0", plugin_artifacts::ECHO).await;
    let first = server
        .submit(&json!({"phases": [{"name": "e", "plugin": "echo"}]}))
        .await;
    server.wait_finished(first["id"].as_str().unwrap()).await;
    let head = server.get("/readyz").await.1["last_event"]
        .as_i64()
        .unwrap();
    assert!(head > 1);

    let response = server
        .client
        .get(server.url("/events"))
        .send()
        .await
        .unwrap();
    let mut chunks = response.bytes_stream();
    let opening = chunks.next().await.unwrap().unwrap();
    assert_eq!(opening, format!("id: {head}\n\n").as_bytes());
    let second = server
        .submit(&json!({"phases": [{"name": "e", "plugin": "echo"}]}))
        .await;
    let next = tokio::time::timeout(TIMEOUT, chunks.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&next);
    assert!(
        text.starts_with(&format!("id: {}\nevent: job:created\n", head + 1)),
        "{text}"
    );
    assert!(text.contains(second["id"].as_str().unwrap()));

    let mut history = server.events("/events", Some(0)).await;
    assert_eq!(history.next_event().await.unwrap().kind, "plugin:uploaded");
}

/// Listings carry summaries: no payloads, configs or outputs, at most 100.
#[tokio::test]
async fn job_listings_are_summaries() {
    let server = Server::start(&[]).await;
    server.upload("echo", "1.0.0", plugin_artifacts::ECHO).await;
    let big = "x".repeat(100 << 10);
    let job = server
        .submit(&json!({"phases": [{"name": "e", "plugin": "echo", "config": {"c": 1}}], "payload": {"big": big}}))
        .await;
    let id = job["id"].as_str().unwrap();
    server.wait_finished(id).await;
    let listing = server.get_text("/jobs").await;
    assert!(listing.len() < 4096, "{} bytes", listing.len());
    let page: Value = serde_json::from_str(&listing).unwrap();
    let listed = &page["jobs"][0];
    assert_eq!(listed["id"], id);
    assert_eq!(listed["status"], "completed");
    assert!(listed.get("payload").is_none() && listed["phases"][0].get("output").is_none());
    assert_eq!(
        server.get("/jobs?limit=101").await.0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        server.get(&format!("/jobs/{id}")).await.1["payload"]["big"],
        big
    );
}

/// A receiver that accepts and never answers cannot hold shutdown past its
/// timeout, even beside a phase that ignores cancellation; its delivery
/// stays in the outbox for the next start.
#[tokio::test]
async fn shutdown_is_bounded_by_its_timeout_as_a_whole() {
    let silent = crate::receiver::Silent::start().await;
    let silent_url = silent.url.clone();
    let mut args = ALLOW_LOOPBACK.to_vec();
    args.extend(["--shutdown-timeout", "2s"]);
    let mut server = Server::start(&args).await;
    server.upload("echo", "1.0.0", plugin_artifacts::ECHO).await;
    server.upload("spin", "1.0.0", plugin_artifacts::SPIN).await;
    let hooked = server
        .submit(
            &json!({"phases": [{"name": "e", "plugin": "echo"}], "webhook": {"url": silent_url}}),
        )
        .await;
    let hooked = hooked["id"].as_str().unwrap().to_owned();
    server.wait_finished(&hooked).await;
    let spinning = server
        .submit(&json!({"phases": [{"name": "s", "plugin": "spin"}]}))
        .await;
    let mut events = server
        .events(
            &format!("/jobs/{}/events", spinning["id"].as_str().unwrap()),
            None,
        )
        .await;
    events
        .until(spinning["id"].as_str().unwrap(), "job:phase:started")
        .await;

    let started = Instant::now();
    let status = tokio::task::spawn_blocking(move || {
        let status = server.terminate();
        (status, server)
    });
    let (status, server) = status.await.unwrap();
    let took = started.elapsed();
    assert!(status.success(), "exit status {status}");
    // 2 s of shutdown timeout, a tick to stop the guest, and cleanup; the
    // hung delivery alone used to add its 10 s webhook timeout.
    assert!(took < Duration::from_secs(5), "shutdown took {took:?}");

    let server = server.restart();
    let (_, job) = server.get(&format!("/jobs/{hooked}")).await;
    assert_eq!(job["webhook"]["status"], "pending", "{job}");
}

/// Quotas: pending jobs (429), stored plugin versions (507) and requests
/// per token (429 with Retry-After), each a setting.
#[tokio::test]
async fn quotas_answer_with_clear_errors() {
    let server = Server::start(&["--max-pending-jobs", "3", "--max-plugin-versions", "2"]).await;
    for version in ["1.0.0", "2.0.0"] {
        let (status, body) = server.upload("echo", version, plugin_artifacts::ECHO).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let (status, body) = server.upload("echo", "3.0.0", plugin_artifacts::ECHO).await;
    assert_eq!(status, StatusCode::INSUFFICIENT_STORAGE, "{body}");
    assert_eq!(body["error"]["code"], "plugin_quota");

    let later = json!({"phases": [{"name": "e", "plugin": "echo"}], "delay_ms": 3_600_000});
    for _ in 0..3 {
        server.submit(&later).await;
    }
    let (status, body) = server.post("/jobs", &later).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["error"]["code"], "too_many_pending");

    let small = Server::start(&["--max-plugin-storage-mb", "0"]).await;
    let (status, body) = small.upload("echo", "1.0.0", plugin_artifacts::ECHO).await;
    assert_eq!(status, StatusCode::INSUFFICIENT_STORAGE, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("bytes of plugins"),
        "{body}"
    );

    let limited =
        Server::start(&["--tokens", "read:rate-limited-token", "--rate-limit", "5"]).await;
    let mut refused = None;
    for _ in 0..20 {
        let response = limited
            .client
            .get(limited.url("/jobs"))
            .bearer_auth("rate-limited-token")
            .send()
            .await
            .unwrap();
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            refused = Some(response);
            break;
        }
    }
    let refused = refused.expect("20 requests at once passed a limit of 5 a second");
    assert_eq!(refused.headers()["retry-after"], "1");
    assert_eq!(limited.get("/healthz").await.0, StatusCode::OK);
}

/// A receiver that never answers holds at most its destination's share of
/// the deliveries in flight: a delivery to another receiver, queued behind
/// 40 to the silent one, still goes out at once.
#[tokio::test]
async fn a_silent_receiver_does_not_stall_the_others() {
    let silent = crate::receiver::Silent::start().await;
    let silent_url = silent.url.clone();
    let receiver = crate::receiver::Receiver::start(0).await;
    let mut args = ALLOW_LOOPBACK.to_vec();
    args.extend(["--webhook-timeout", "300s"]);
    let server = Server::start(&args).await;
    server.upload("echo", "1.0.0", plugin_artifacts::ECHO).await;
    let hooked =
        |url: &str| json!({"phases": [{"name": "e", "plugin": "echo"}], "webhook": {"url": url}});
    for _ in 0..40 {
        server.submit(&hooked(&silent_url)).await;
    }
    let last = server.submit(&hooked(&receiver.url)).await;
    let deliveries = receiver.wait_for(1).await;
    let body: Value = serde_json::from_slice(&deliveries[0].body).unwrap();
    assert_eq!(body["data"]["job_id"], last["id"]);
}

/// Requests the published schema allows are taken as such (found by a
/// schema-driven fuzzer): a `null` retry body, a time before 1970.
#[tokio::test]
async fn what_the_schema_allows_is_accepted() {
    let server = Server::start(&[]).await;
    let retry = server
        .send(
            server
                .client
                .post(server.url("/jobs/no-such-job/retry"))
                .header("content-type", "application/json")
                .body("null"),
        )
        .await;
    assert_eq!(retry.0, StatusCode::NOT_FOUND, "{}", retry.1);
    let (status, body) = server
        .post(
            "/queue/purge",
            &json!({"finished_before": "1853-03-01T05:57:20.269135Z"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["deleted"], json!([]));
}

/// The cap on streams in all answers 503 at once; `/metrics` needs a token
/// unless `--public-metrics` says otherwise.
#[tokio::test]
async fn the_stream_cap_in_all_and_public_metrics() {
    let server = Server::start(&["--max-streams", "2", "--max-streams-per-ip", "10"]).await;
    let open = || server.client.get(server.url("/events")).send();
    let (first, second) = (open().await.unwrap(), open().await.unwrap());
    assert_eq!(
        (first.status(), second.status()),
        (StatusCode::OK, StatusCode::OK)
    );
    let third = open().await.unwrap();
    assert_eq!(third.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = third.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_streams");
    drop((first, second));

    let closed = Server::start(&["--tokens", "read:metrics-reader"]).await;
    let metrics = |server: &Server| server.client.get(server.url("/metrics")).send();
    assert_eq!(
        metrics(&closed).await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    let public = Server::start(&["--tokens", "read:metrics-reader", "--public-metrics"]).await;
    assert_eq!(metrics(&public).await.unwrap().status(), StatusCode::OK);
}
