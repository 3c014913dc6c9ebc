//! The CLI's user path against a real server: push, grant, resources, activate, submit
//! --wait (exit codes), show, list, watch, cancel, retry, and clear errors.

use std::process::{Command, Output, Stdio};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout};

use crate::server::{Server, TIMEOUT};

fn jobhost(url: &str, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_jobhost"));
    command
        .args(args)
        .env("JOBHOST_URL", url)
        .env_remove("JOBHOST_TOKEN");
    command
}

/// Runs a CLI command to completion (on a blocking thread).
async fn run(url: &str, args: &[&str]) -> Output {
    let mut command = jobhost(url, args);
    tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap()
}

/// A CLI command left running (`jobhost events` follows the stream until
/// stopped), its output read a line at a time; killed when dropped.
struct Running {
    _child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Running {
    fn start(url: &str, args: &[&str]) -> Running {
        let mut child = tokio::process::Command::from(jobhost(url, args))
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Running {
            _child: child,
            lines,
        }
    }

    /// The next line it prints, which must be JSON.
    async fn next_json(&mut self) -> Value {
        let line = tokio::time::timeout(TIMEOUT, self.lines.next_line())
            .await
            .expect("no output in time")
            .unwrap()
            .expect("the command exited");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    }
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn json(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", stdout(output), stderr(output)))
}

#[tokio::test]
async fn cli_user_path() {
    let server = Server::start(&[]).await;
    let url = server.url.as_str();

    // push: the version defaults to the one the component reports.
    let pushed = run(url, &["plugin", "push", "echo", plugin_artifacts::ECHO]).await;
    assert!(pushed.status.success(), "{}", stderr(&pushed));
    assert!(
        stdout(&pushed).starts_with("echo 0.1.0 uploaded, active"),
        "{}",
        stdout(&pushed)
    );
    for (name, file) in [
        ("fail", plugin_artifacts::FAIL),
        ("spin", plugin_artifacts::SPIN),
    ] {
        assert!(
            run(url, &["plugin", "push", name, file])
                .await
                .status
                .success()
        );
    }

    // grant: what a plugin's phases may read, shown with the plugin.
    let grant = [
        "plugin",
        "grant",
        "echo",
        "--version",
        "0.1.0",
        "--config",
        "region=eu",
        "--secret",
        "api_key",
        "--http",
        "https://*.example.org",
    ];
    let granted = run(url, &grant).await;
    assert!(granted.status.success(), "{}", stderr(&granted));
    let shown = stdout(&run(url, &["plugin", "show", "echo"]).await);
    for line in [
        "grants for versions: 0.1.0",
        "config: region",
        "secrets: api_key",
        "http: https://*.example.org",
    ] {
        assert!(shown.contains(line), "{shown}");
    }
    let sized = run(
        url,
        &[
            "plugin",
            "resources",
            "echo",
            "--memory-mb",
            "64",
            "--max-running",
            "4",
        ],
    )
    .await;
    assert!(sized.status.success(), "{}", stderr(&sized));
    let shown = stdout(&run(url, &["plugin", "show", "echo"]).await);
    assert!(
        shown.contains(
            "resources: memory 64 MiB, default timeout server default, limit 4 running, rate none"
        ),
        "{shown}"
    );
    let malformed = run(url, &["plugin", "grant", "echo", "--config", "region"]).await;
    assert!(!malformed.status.success());
    assert!(
        stderr(&malformed).contains("KEY=VALUE"),
        "{}",
        stderr(&malformed)
    );

    // submit --wait: 0 when the job completes, 1 when it fails.
    let ok = run(
        url,
        &[
            "job",
            "submit",
            "--phase",
            "e=echo",
            "--payload",
            r#"{"x": 1}"#,
            "--wait",
            "--json",
        ],
    )
    .await;
    assert_eq!(ok.status.code(), Some(0), "{}", stderr(&ok));
    let done = json(&ok);
    assert_eq!(done["status"], "completed");
    assert_eq!(done["phases"][0]["output"]["payload"]["x"], 1);

    let failed = run(
        url,
        &[
            "job",
            "submit",
            "--phase",
            "f=fail@0.1.0",
            "--wait",
            "--json",
        ],
    )
    .await;
    assert_eq!(failed.status.code(), Some(1), "{}", stderr(&failed));
    let id = json(&failed)["id"].as_str().unwrap().to_owned();
    let shown = run(url, &["job", "show", &id]).await;
    assert!(stdout(&shown).contains("failed"), "{}", stdout(&shown));
    assert!(
        stdout(&shown).contains("this phase always fails"),
        "{}",
        stdout(&shown)
    );
    let retried = run(url, &["job", "retry", &id, "--json"]).await;
    assert!(retried.status.success(), "{}", stderr(&retried));
    assert_eq!(json(&retried)["status"], "pending");

    // cancel: a watcher of a job that never yields exits non-zero.
    let submitted = run(url, &["job", "submit", "--phase", "s=spin", "--json"]).await;
    let spin_id = json(&submitted)["id"].as_str().unwrap().to_owned();
    let watcher = jobhost(url, &["job", "watch", &spin_id])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut events = server
        .events(&format!("/jobs/{spin_id}/events"), None)
        .await;
    events.until(&spin_id, "job:phase:started").await;
    let cancelled = run(url, &["job", "cancel", &spin_id]).await;
    assert!(cancelled.status.success(), "{}", stderr(&cancelled));
    let watched = tokio::task::spawn_blocking(move || watcher.wait_with_output().unwrap())
        .await
        .unwrap();
    assert_eq!(
        watched.status.code(),
        Some(1),
        "a cancelled job is not a success"
    );

    // activate: hot swap from the CLI.
    assert!(
        run(
            url,
            &[
                "plugin",
                "push",
                "echo",
                plugin_artifacts::SLEEP,
                "--version",
                "2.0.0"
            ]
        )
        .await
        .status
        .success()
    );
    let activated = run(url, &["plugin", "activate", "echo", "2.0.0"]).await;
    assert!(
        stdout(&activated).contains("active version 2.0.0 (was 0.1.0)"),
        "{}",
        stdout(&activated)
    );
    let shown = json(&run(url, &["plugin", "show", "echo", "--json"]).await);
    assert_eq!(shown["active_version"], "2.0.0");
    let listed = run(url, &["job", "list", "--status", "completed"]).await;
    assert_eq!(stdout(&listed).lines().count(), 1, "{}", stdout(&listed));
}

#[tokio::test]
async fn cli_errors_are_clear() {
    let server = Server::start(&["--tokens", "s3cret"]).await;
    let url = server.url.as_str();
    let missing = run(url, &["plugin", "show", "ghost", "--token", "s3cret"]).await;
    assert_eq!(missing.status.code(), Some(2));
    assert!(
        stderr(&missing).contains("no plugin named `ghost`"),
        "{}",
        stderr(&missing)
    );

    let refused = run(url, &["plugin", "push", "echo", plugin_artifacts::ECHO]).await;
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        stderr(&refused).contains("--token or JOBHOST_TOKEN"),
        "{}",
        stderr(&refused)
    );
    let allowed = run(
        url,
        &[
            "plugin",
            "push",
            "echo",
            plugin_artifacts::ECHO,
            "--token",
            "s3cret",
        ],
    )
    .await;
    assert!(allowed.status.success(), "{}", stderr(&allowed));

    let closed = crate::receiver::closed_address();
    let unreachable = run(&format!("http://{closed}"), &["job", "list"]).await;
    assert_eq!(unreachable.status.code(), Some(2));
    assert!(
        stderr(&unreachable).contains("cannot reach jobhost"),
        "{}",
        stderr(&unreachable)
    );
}

/// `jobhost events` tails the stream: it prints what happens after it
/// starts, not the server's whole log first; `--since 0` replays the log.
#[tokio::test]
async fn events_tail_from_now_unless_asked_for_the_log() {
    let server = Server::start(&[]).await;
    let url = server.url.as_str();
    let pushed = run(url, &["plugin", "push", "echo", plugin_artifacts::ECHO]).await;
    assert!(pushed.status.success(), "{}", stderr(&pushed));
    let spec = json!({"phases": [{"name": "e", "plugin": "echo"}]});
    let earlier = server.submit(&spec).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    server.wait_finished(&earlier).await;
    server.wait_for_metric("jobhost_sse_clients 0").await;

    let mut tail = Running::start(url, &["events", "--json"]);
    // Connected, so its starting point is fixed: the job below is later.
    server.wait_for_metric("jobhost_sse_clients 1").await;
    let later = server.submit(&spec).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    loop {
        let event = tail.next_json().await;
        assert_eq!(
            event["job_id"],
            later.as_str(),
            "only events after the tail started: {event}"
        );
        if event["type"] == "job:completed" {
            break;
        }
    }

    let mut replay = Running::start(url, &["events", "--json", "--since", "0"]);
    let first = replay.next_json().await;
    assert_eq!(first["type"], "plugin:uploaded", "{first}");
    loop {
        let event = replay.next_json().await;
        if event["job_id"] == earlier.as_str() && event["type"] == "job:completed" {
            break;
        }
    }
}

/// Guest text reaches the terminal with its control characters shown, not
/// obeyed: a failure message cannot clear the screen or fake a line.
#[tokio::test]
async fn guest_text_cannot_drive_the_terminal() {
    let server = Server::start(&[]).await;
    server.upload("fail", "1.0.0", plugin_artifacts::FAIL).await;
    let job = server
        .submit(&json!({"phases": [{"name": "f", "plugin": "fail", "config": {"message": "\u{1b}[2J\u{1b}[Hall good\nfake: line"}}]}))
        .await;
    let id = job["id"].as_str().unwrap();
    server.wait_finished(id).await;
    let shown = run(&server.url, &["job", "show", id]).await;
    assert!(shown.status.success());
    let stdout = String::from_utf8(shown.stdout).unwrap();
    assert!(!stdout.contains('\u{1b}'), "{stdout:?}");
    assert!(
        stdout.contains(r"\u{1b}[2J\u{1b}[Hall good\u{a}fake: line"),
        "{stdout}"
    );
}

/// `jobhost schedule …`: create from flags, list, show, trigger, pause,
/// replace from a file, and delete, each printing what the server did.
#[tokio::test]
async fn schedules_from_the_cli() {
    let server = Server::start(&[]).await;
    let url = server.url.as_str();
    server.upload("echo", "1.0.0", plugin_artifacts::ECHO).await;
    let create = [
        "schedule",
        "create",
        "--name",
        "nightly",
        "--cron",
        "30 2 * * *",
        "--timezone",
        "Europe/Berlin",
        "--phase",
        "report=echo",
        "--payload",
        r#"{"kind":"nightly"}"#,
    ];
    let created = run(url, &create).await;
    assert!(created.status.success(), "{}", stderr(&created));
    let text = stdout(&created);
    assert!(
        text.starts_with("nightly: 30 2 * * * (Europe/Berlin)"),
        "{text}"
    );
    assert!(
        text.contains("overlap skip, catch-up one (limit 10)"),
        "{text}"
    );
    assert!(
        text.contains("job: report=echo") && text.contains("never fired"),
        "{text}"
    );

    let listed = stdout(&run(url, &["schedule", "list"]).await);
    assert!(
        listed.starts_with("nightly") && listed.contains("active"),
        "{listed}"
    );

    let triggered = run(url, &["schedule", "trigger", "nightly", "--json"]).await;
    let job = json(&triggered);
    let done = server.wait_finished(job["id"].as_str().unwrap()).await;
    assert_eq!(done["payload"], json!({"kind": "nightly"}));
    let shown = stdout(&run(url, &["schedule", "show", "nightly"]).await);
    assert!(
        shown.contains(&format!("job {}", job["id"].as_str().unwrap())),
        "{shown}"
    );

    let paused = stdout(&run(url, &["schedule", "pause", "nightly"]).await);
    assert!(paused.contains("paused, next tick"), "{paused}");

    let definition = server.dir.path().join("nightly.json");
    let mut replacement = server.get("/schedules/nightly").await.1;
    replacement["cron"] = json!("0 3 * * *");
    let spec = json!({"name": "nightly", "cron": "0 3 * * *", "timezone": "UTC",
        "job": replacement["job"], "paused": true});
    std::fs::write(&definition, spec.to_string()).unwrap();
    let replaced = run(url, &["schedule", "replace", definition.to_str().unwrap()]).await;
    assert!(
        stdout(&replaced).starts_with("nightly: 0 3 * * * (UTC)"),
        "{}",
        stderr(&replaced)
    );

    let bad = run(
        url,
        &[
            "schedule", "create", "--name", "x", "--cron", "nope", "--phase", "a=echo",
        ],
    )
    .await;
    assert_eq!(bad.status.code(), Some(2));
    assert!(stderr(&bad).contains("cron: `nope`"), "{}", stderr(&bad));

    let deleted = run(url, &["schedule", "delete", "nightly"]).await;
    assert_eq!(stdout(&deleted).trim(), "deleted nightly");
    let missing = run(url, &["schedule", "show", "nightly"]).await;
    assert_eq!(missing.status.code(), Some(2));
    assert!(
        stderr(&missing).contains("no schedule named `nightly`"),
        "{}",
        stderr(&missing)
    );
}

/// `jobhost queue …` and keys: limits set from a file and shown, jobs
/// submitted with a key and listed by it, the queue paused and resumed.
#[tokio::test]
async fn queue_and_concurrency_limits_from_the_cli() {
    let server = Server::start(&[]).await;
    let url = server.url.as_str();
    server.upload("echo", "1.0.0", plugin_artifacts::ECHO).await;
    let file = server.dir.path().join("limits.json");
    std::fs::write(&file, r#"{"default": 2, "keys": {"tenant-*": 1}}"#).unwrap();
    let set = run(url, &["queue", "limits", file.to_str().unwrap()]).await;
    assert!(set.status.success(), "{}", stderr(&set));
    assert!(
        stdout(&set).starts_with("limits: tenant-* 1, default 2"),
        "{}",
        stdout(&set)
    );

    let paused = stdout(&run(url, &["queue", "pause"]).await);
    assert!(paused.starts_with("paused:"), "{paused}");
    let submit = [
        "job", "submit", "--phase", "a=echo", "--key", "tenant-7", "--json",
    ];
    let job = json(&run(url, &submit).await);
    assert_eq!(job["concurrency_key"], "tenant-7");
    let shown = stdout(&run(url, &["queue", "show"]).await);
    assert!(
        shown.contains("1 keys with jobs") && shown.contains("tenant-7"),
        "{shown}"
    );
    assert!(
        shown.contains("pending 1") && shown.contains("limit 1"),
        "{shown}"
    );
    let listed = stdout(&run(url, &["job", "list", "--key", "tenant-7"]).await);
    assert!(listed.contains(job["id"].as_str().unwrap()), "{listed}");
    let other = stdout(&run(url, &["job", "list", "--key", "tenant-8"]).await);
    assert!(other.trim().is_empty(), "{other}");

    run(url, &["queue", "resume"]).await;
    let done = server.wait_finished(job["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "completed");

    std::fs::write(&file, r#"{"keys": {"a b": 1}}"#).unwrap();
    let bad = run(url, &["queue", "limits", file.to_str().unwrap()]).await;
    assert_eq!(bad.status.code(), Some(2));
    assert!(stderr(&bad).contains("keys.a b:"), "{}", stderr(&bad));
}

/// `jobhost run-phase` grants a local run what an operator would grant a
/// plugin: config values, secrets from JOBHOST_SECRET_<NAME>, and nothing
/// else.
#[tokio::test]
async fn run_phase_grants_config_values_and_secrets() {
    let input = json!({"keys": ["region", "api_key", "other"]}).to_string();
    let args = [
        "run-phase",
        plugin_artifacts::READ_CONFIG,
        "--input",
        &input,
        "--config-value",
        "region=eu",
        "--secret",
        "api_key",
    ];
    let mut command = jobhost("http://127.0.0.1:9", &args);
    command.env("JOBHOST_SECRET_API_KEY", "s3cret-value");
    let ran = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    assert!(ran.status.success(), "{}", stderr(&ran));
    let out = json(&ran);
    assert_eq!(
        out["values"],
        json!({"region": "eu", "api_key": "s3cret-value"})
    );
    assert!(out["errors"]["other"].is_string(), "{out}");
    assert_eq!(out["all"], json!(["api_key", "region"]));

    let bad = run(
        "http://127.0.0.1:9",
        &[
            "run-phase",
            plugin_artifacts::READ_CONFIG,
            "--config-value",
            "novalue",
        ],
    )
    .await;
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        stderr(&bad).contains("--config-value \"novalue\" is not KEY=VALUE"),
        "{}",
        stderr(&bad)
    );
}
