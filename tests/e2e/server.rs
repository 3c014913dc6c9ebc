//! The shared fixture: a real `jobhost serve` process on an ephemeral port
//! with its own data directory, a real HTTP client, and a real SSE parser.
//! The server's log is printed when a test fails.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use eventsource_stream::Event as SseEvent;
use futures::{Stream, StreamExt};
use reqwest::StatusCode;
use serde_json::Value;

/// Longest a test waits for the server or an event.
pub const TIMEOUT: Duration = Duration::from_secs(60);

pub struct Server {
    pub url: String,
    pub dir: Arc<tempfile::TempDir>,
    pub client: reqwest::Client,
    token: Option<String>,
    child: Child,
    extra_args: Vec<String>,
    file_limit: Option<u64>,
}

impl Server {
    pub async fn start(extra_args: &[&str]) -> Server {
        Server::start_in(
            Arc::new(tempfile::tempdir().unwrap()),
            extra_args.iter().map(|a| a.to_string()).collect(),
            None,
        )
    }

    /// A server whose open-file limit, soft and hard, is `limit`.
    pub async fn start_with_file_limit(extra_args: &[&str], limit: u64) -> Server {
        Server::start_in(
            Arc::new(tempfile::tempdir().unwrap()),
            extra_args.iter().map(|a| a.to_string()).collect(),
            Some(limit),
        )
    }

    fn start_in(
        dir: Arc<tempfile::TempDir>,
        extra_args: Vec<String>,
        file_limit: Option<u64>,
    ) -> Server {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.path().join("server.log"))
            .unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_jobhost"));
        if let Some(limit) = file_limit {
            let limit = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            // SAFETY: only setrlimit runs between fork and exec.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut command, move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let mut child = command
            .arg("serve")
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(&extra_args)
            .env("JOBHOST_LOG", "info,jobhost::guest=off")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("starting jobhost");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let url = line
            .trim()
            .strip_prefix("jobhost listening on ")
            .unwrap_or_else(|| {
                panic!(
                    "unexpected first line {line:?}; log:\n{}",
                    read_log(dir.path())
                )
            })
            .to_owned();
        let token = extra_args
            .windows(2)
            .find(|w| w[0] == "--tokens")
            .map(|w| w[1].split(',').next().unwrap().to_owned());
        jobhost::tls::init();
        Server {
            url,
            dir,
            client: reqwest::Client::new(),
            token,
            child,
            extra_args,
            file_limit,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the process (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Asks the process to stop (SIGTERM) and waits for it to exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        self.child.wait().unwrap()
    }

    /// A new process on the same data directory and flags.
    pub fn restart(&self) -> Server {
        Server::start_in(self.dir.clone(), self.extra_args.clone(), self.file_limit)
    }

    pub fn log(&self) -> String {
        read_log(self.dir.path())
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    fn authorized(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// Sends a request (with the server's first token, if any) and returns
    /// the status and JSON body (`Null` when empty).
    pub async fn send(&self, request: reqwest::RequestBuilder) -> (StatusCode, Value) {
        let response = self
            .authorized(request)
            .send()
            .await
            .expect("request failed");
        let status = response.status();
        let bytes = response.bytes().await.unwrap();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("JSON body")
        };
        (status, body)
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.send(self.client.get(self.url(path))).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        self.send(self.client.post(self.url(path)).json(body)).await
    }

    pub async fn put(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        self.send(self.client.put(self.url(path)).json(body)).await
    }

    /// Sets a plugin's grants, which must be accepted.
    pub async fn grant(&self, plugin: &str, grants: &Value) {
        let (status, body) = self.put(&format!("/plugins/{plugin}/grants"), grants).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }

    /// Uploads a plugin component built from `plugins/`.
    pub async fn upload(&self, name: &str, version: &str, component: &str) -> (StatusCode, Value) {
        let path = format!("/plugins/{name}/versions/{version}");
        self.send(
            self.client
                .put(self.url(&path))
                .body(plugin_artifacts::bytes(component)),
        )
        .await
    }

    /// Submits a job that must be accepted; returns it.
    pub async fn submit(&self, spec: &Value) -> Value {
        let (status, job) = self.post("/jobs", spec).await;
        assert_eq!(status, StatusCode::CREATED, "{job}");
        job
    }

    /// Opens an SSE stream at `path`, optionally resuming after `last_event_id`.
    pub async fn events(&self, path: &str, last_event_id: Option<i64>) -> EventStream {
        let mut request = self.authorized(self.client.get(self.url(path)));
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id.to_string());
        }
        let response = request.send().await.unwrap();
        assert_eq!(
            response.status(),
            StatusCode::OK,
            "{}",
            response.text().await.unwrap()
        );
        EventStream {
            inner: Box::pin(jobhost::cli::sse_events(response)),
        }
    }

    /// Waits until `/metrics` counts `jobs` completed jobs.
    pub async fn wait_for_completed_jobs(&self, jobs: usize) {
        self.wait_for_metric(&format!("jobhost_jobs{{status=\"completed\"}} {jobs}"))
            .await;
    }

    /// A GET's body as text, whatever its status.
    pub async fn get_text(&self, path: &str) -> String {
        self.authorized(self.client.get(self.url(path)))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Waits until `/metrics` has this line.
    pub async fn wait_for_metric(&self, wanted: &str) {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let metrics = self.get_text("/metrics").await;
            if metrics.lines().any(|line| line == wanted) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no `{wanted}` in /metrics in time:\n{metrics}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Waits until the job is completed, failed or cancelled.
    pub async fn wait_finished(&self, id: &str) -> Value {
        let mut events = self.events(&format!("/jobs/{id}/events"), None).await;
        while events.next_event().await.is_some() {}
        let (_, job) = self.get(&format!("/jobs/{id}")).await;
        assert!(
            ["completed", "failed", "cancelled"].contains(&job["status"].as_str().unwrap()),
            "{job}"
        );
        job
    }
}

fn read_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("server.log")).unwrap_or_default()
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- jobhost server log ----\n{}", self.log());
        }
    }
}

type SseStream = std::pin::Pin<
    Box<
        dyn Stream<Item = Result<SseEvent, eventsource_stream::EventStreamError<reqwest::Error>>>
            + Send,
    >,
>;

/// A parsed SSE stream of jobhost events.
pub struct EventStream {
    inner: SseStream,
}

/// One received event: SSE `id:` and `event:`, and the JSON `data:`.
#[derive(Debug, Clone)]
pub struct Received {
    /// 0 for a live-only event (`job:phase:progress`), which has no `id:`.
    pub id: i64,
    pub kind: String,
    pub data: Value,
}

impl EventStream {
    /// The next event, or `None` when the server ended the stream.
    pub async fn next_event(&mut self) -> Option<Received> {
        let next = tokio::time::timeout(TIMEOUT, self.inner.next())
            .await
            .expect("no SSE event in time")?;
        let event = next.expect("SSE stream error");
        let live = event.event == "job:phase:progress";
        Some(Received {
            id: if live {
                0
            } else {
                event.id.parse().expect("numeric SSE id")
            },
            kind: event.event,
            data: serde_json::from_str(&event.data).expect("JSON SSE data"),
        })
    }

    /// Reads events until one of `kind` about `job` arrives; returns all read.
    pub async fn until(&mut self, job: &str, kind: &str) -> Vec<Received> {
        let mut seen = Vec::new();
        loop {
            let event = self
                .next_event()
                .await
                .unwrap_or_else(|| panic!("stream ended before {kind}"));
            let done = event.kind == kind && event.data["job_id"] == job;
            seen.push(event);
            if done {
                return seen;
            }
        }
    }
}
