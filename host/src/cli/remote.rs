//! Client commands: `jobhost plugin …`, `jobhost job …`, `jobhost events`.
//! Human-readable by default, `--json` for scripts. Exit codes: 0 success,
//! 1 a job that failed or was cancelled (`submit --wait`), 2 any error.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use futures::StreamExt;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::{Value, json};

use super::client::Client;
use crate::model::time::rfc3339;
use crate::model::{EventBody, JobSpec, PhaseSpec};

/// Where the server is, and how to print.
#[derive(Debug, Clone, Args)]
pub struct Remote {
    /// The jobhost server.
    #[arg(
        long,
        env = "JOBHOST_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub url: String,
    /// Bearer token for mutating requests.
    #[arg(long, env = "JOBHOST_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
}

impl Remote {
    pub(super) fn client(&self) -> Client {
        Client::new(&self.url, self.token.clone())
    }

    pub(super) fn print(&self, value: &Value, human: impl FnOnce(&Value)) {
        if self.json {
            println!(
                "{}",
                serde_json::to_string_pretty(value).unwrap_or_default()
            );
        } else {
            human(value);
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum PluginAction {
    /// Upload a component as a plugin version (validated by the server).
    Push {
        name: String,
        file: PathBuf,
        /// The version to store [default: the version the component reports].
        #[arg(long)]
        version: Option<String>,
        /// Make it the active version right away.
        #[arg(long)]
        activate: bool,
    },
    /// List plugins and their versions.
    List,
    /// Show one plugin.
    Show { name: String },
    /// Make a version active (hot swap or rollback).
    Activate { name: String, version: String },
    /// Set what a plugin's phases may read through `wasi:config/store`,
    /// replacing its grants. Only the versions named get them.
    Grant {
        name: String,
        /// A version the grants cover; repeat for several.
        #[arg(long = "version", value_name = "VERSION")]
        versions: Vec<String>,
        /// A plain configuration value; repeat for several.
        #[arg(long = "config", value_name = "KEY=VALUE")]
        config: Vec<String>,
        /// A secret, by name: its value comes from the server's secrets
        /// file or JOBHOST_SECRET_<NAME>; repeat for several.
        #[arg(long = "secret", value_name = "NAME")]
        secrets: Vec<String>,
        /// An origin its phases may call, e.g. https://api.example.com or
        /// https://*.example.org; repeat for several.
        #[arg(long = "http", value_name = "ORIGIN")]
        http: Vec<String>,
    },
    /// Set the memory cap of a plugin's runs, the timeout of its phases
    /// whose job gives none (every version), and how many of its phases run
    /// at once or start per second on all hosts; omitted: the server's
    /// default, or no limit.
    Resources {
        name: String,
        #[arg(long)]
        memory_mb: Option<u64>,
        #[arg(long)]
        timeout_ms: Option<u64>,
        #[arg(long)]
        max_running: Option<u32>,
        #[arg(long)]
        per_second: Option<f64>,
    },
}

#[derive(Debug, Subcommand)]
pub enum JobAction {
    /// Submit a job from a spec file, or from --phase/--payload.
    Submit {
        /// A job spec (JSON file); `-` reads standard input.
        spec: Option<PathBuf>,
        /// A phase as NAME=PLUGIN or NAME=PLUGIN@VERSION; repeat in order.
        #[arg(long = "phase", value_name = "NAME=PLUGIN[@VERSION]")]
        phases: Vec<String>,
        /// The payload: JSON text or @file.
        #[arg(long)]
        payload: Option<String>,
        /// The job's concurrency key (e.g. a tenant).
        #[arg(long)]
        key: Option<String>,
        /// Follow the job live and exit non-zero unless it completes.
        #[arg(long)]
        wait: bool,
    },
    /// Follow a job live until it ends; exits non-zero unless it completes.
    Watch { id: String },
    /// Show a job with its phases, outputs and errors.
    Show { id: String },
    /// List jobs, newest first.
    List {
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        plugin: Option<String>,
        /// Only jobs with this concurrency key.
        #[arg(long)]
        key: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Cancel a job.
    Cancel { id: String },
    /// Retry a failed or cancelled job.
    Retry {
        id: String,
        /// Run every phase again instead of resuming.
        #[arg(long)]
        from_start: bool,
    },
}

pub async fn plugin(remote: &Remote, action: PluginAction) -> anyhow::Result<i32> {
    let client = remote.client();
    match action {
        PluginAction::Push {
            name,
            file,
            version,
            activate,
        } => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let version = match version {
                Some(version) => version,
                None => component_version(&bytes)
                    .await
                    .with_context(|| format!("loading {}", file.display()))?,
            };
            let query = if activate { "?activate=true" } else { "" };
            let (status, body) = client
                .put_bytes(&format!("/plugins/{name}/versions/{version}{query}"), bytes)
                .await?;
            remote.print(&body, |b| {
                let what = if status.as_u16() == 201 {
                    "uploaded"
                } else {
                    "already uploaded (same bytes)"
                };
                let active = if b["active"] == true { ", active" } else { "" };
                println!(
                    "{name} {version} {what}{active} ({} bytes, sha256 {})",
                    b["size"],
                    text(&b["content_hash"])
                );
            });
        }
        PluginAction::List => {
            let body = client.get("/plugins").await?;
            remote.print(&body, |b| {
                for plugin in b["plugins"].as_array().into_iter().flatten() {
                    print_plugin(plugin);
                }
            });
        }
        PluginAction::Show { name } => {
            let body = client.get(&format!("/plugins/{name}")).await?;
            remote.print(&body, print_plugin);
        }
        PluginAction::Grant {
            name,
            versions,
            config,
            secrets,
            http,
        } => {
            let config = config
                .iter()
                .map(|pair| {
                    pair.split_once('=')
                        .map(|(key, value)| (key.to_owned(), Value::String(value.to_owned())))
                        .with_context(|| format!("--config {pair}: expected KEY=VALUE"))
                })
                .collect::<anyhow::Result<serde_json::Map<_, _>>>()?;
            let grants = json!({
                "versions": versions,
                "config": config,
                "secrets": secrets,
                "http": http,
            });
            let body = client
                .put_json(&format!("/plugins/{name}/grants"), &grants)
                .await?;
            remote.print(&body, |b| print_grants(&b["grants"]));
        }
        PluginAction::Resources {
            name,
            memory_mb,
            timeout_ms,
            max_running,
            per_second,
        } => {
            let resources = json!({
                "memory_mb": memory_mb,
                "timeout_ms": timeout_ms,
                "max_running": max_running,
                "per_second": per_second,
            });
            let body = client
                .put_json(&format!("/plugins/{name}/resources"), &resources)
                .await?;
            remote.print(&body, |b| print_resources(&b["resources"]));
        }
        PluginAction::Activate { name, version } => {
            let body = client
                .put_json(
                    &format!("/plugins/{name}/active"),
                    &json!({"version": version}),
                )
                .await?;
            remote.print(&body, |b| {
                println!(
                    "{name}: active version {version} (was {})",
                    text(&b["previous"])
                );
            });
        }
    }
    Ok(0)
}

/// The version a component reports through `describe()`, read by loading
/// it locally (which also validates it before the upload).
async fn component_version(bytes: &[u8]) -> anyhow::Result<String> {
    let runtime = crate::runtime::Runtime::new(crate::runtime::RuntimeConfig {
        max_concurrent_runs: 1,
        ..Default::default()
    })?;
    Ok(runtime
        .load(bytes, None)
        .await?
        .plugin
        .metadata
        .version
        .clone())
}

fn print_resources(resources: &Value) {
    let or_default = |value: &Value, unit: &str| match value.as_u64() {
        Some(n) => format!("{n} {unit}"),
        None => "server default".to_owned(),
    };
    let limit = |value: &Value, unit: &str| match value.as_f64() {
        Some(n) => format!("{n} {unit}"),
        None => "none".to_owned(),
    };
    println!(
        "  resources: memory {}, default timeout {}, limit {}, rate {}",
        or_default(&resources["memory_mb"], "MiB"),
        or_default(&resources["timeout_ms"], "ms"),
        limit(&resources["max_running"], "running"),
        limit(&resources["per_second"], "starts/s")
    );
}

fn print_grants(grants: &Value) {
    let list = |value: &Value| {
        let names: Vec<&str> = value
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        if names.is_empty() {
            "-".to_owned()
        } else {
            names.join(", ")
        }
    };
    let keys = Value::Array(
        grants["config"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(key, _)| Value::String(key.clone()))
            .collect(),
    );
    println!("  grants for versions: {}", list(&grants["versions"]));
    println!("    config: {}", list(&keys));
    println!("    secrets: {}", list(&grants["secrets"]));
    println!("    http: {}", list(&grants["http"]));
}

fn print_plugin(plugin: &Value) {
    let active = plugin["active_version"].as_str().unwrap_or("-");
    println!("{} (active {active})", text(&plugin["name"]));
    for version in plugin["versions"].as_array().into_iter().flatten() {
        let marker = if version["version"].as_str() == Some(active) {
            "*"
        } else {
            " "
        };
        println!(
            "  {marker} {:<12} {:>8} bytes  {}  {}",
            text(&version["version"]),
            version["size"],
            text(&version["uploaded_at"]),
            text(&version["description"])
        );
    }
    print_resources(&plugin["resources"]);
    if !plugin["grants"].is_null() {
        print_grants(&plugin["grants"]);
    }
}

pub async fn job(remote: &Remote, action: JobAction) -> anyhow::Result<i32> {
    let client = remote.client();
    match action {
        JobAction::Submit {
            spec,
            phases,
            payload,
            key,
            wait,
        } => {
            let mut spec = build_spec(spec, &phases, payload)?;
            if key.is_some() {
                spec.concurrency_key = key;
            }
            let job = client.post("/jobs", &serde_json::to_value(&spec)?).await?;
            let id = text(&job["id"]).into_owned();
            if !wait {
                remote.print(&job, |j| {
                    println!("submitted job {id} ({})", text(&j["status"]))
                });
                return Ok(0);
            }
            if !remote.json {
                eprintln!("submitted job {id}");
            }
            return follow(remote, &client, &job).await;
        }
        JobAction::Watch { id } => {
            let job = client.get(&format!("/jobs/{id}")).await?;
            return follow(remote, &client, &job).await;
        }
        JobAction::Show { id } => {
            let job = client.get(&format!("/jobs/{id}")).await?;
            remote.print(&job, print_job);
        }
        JobAction::List {
            status,
            plugin,
            key,
            limit,
        } => {
            let mut query = format!("/jobs?limit={limit}");
            if let Some(key) = key {
                query.push_str(&format!("&key={key}"));
            }
            if let Some(status) = status {
                query.push_str(&format!("&status={status}"));
            }
            if let Some(plugin) = plugin {
                query.push_str(&format!("&plugin={plugin}"));
            }
            let body = client.get(&query).await?;
            remote.print(&body, |b| {
                for job in b["jobs"].as_array().into_iter().flatten() {
                    let phases: Vec<_> = job["phases"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|p| text(&p["name"]))
                        .collect();
                    println!(
                        "{}  {:<9}  {}  {}",
                        text(&job["id"]),
                        text(&job["status"]),
                        text(&job["created_at"]),
                        phases.join(" → ")
                    );
                }
            });
        }
        JobAction::Cancel { id } => {
            let job = client
                .post(&format!("/jobs/{id}/cancel"), &json!({}))
                .await?;
            remote.print(&job, |j| println!("job {id}: {}", text(&j["status"])));
        }
        JobAction::Retry { id, from_start } => {
            let job = client
                .post(
                    &format!("/jobs/{id}/retry"),
                    &json!({"from_start": from_start}),
                )
                .await?;
            remote.print(&job, |j| {
                println!("job {id}: {} (retrying)", text(&j["status"]))
            });
        }
    }
    Ok(0)
}

/// A JSON file (`-`: standard input) holding `what`.
pub(super) fn read_json<T: serde::de::DeserializeOwned>(
    path: &std::path::Path,
    what: &str,
) -> anyhow::Result<T> {
    let text = if path.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).with_context(|| format!("reading the {what}"))?
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
    };
    serde_json::from_str(&text).with_context(|| format!("{} is not a valid {what}", path.display()))
}

pub(super) fn build_spec(
    file: Option<PathBuf>,
    phases: &[String],
    payload: Option<String>,
) -> anyhow::Result<JobSpec> {
    let mut spec: JobSpec = match &file {
        Some(path) => read_json(path, "job spec")?,
        None => JobSpec::default(),
    };
    for phase in phases {
        let (name, target) = phase
            .split_once('=')
            .with_context(|| format!("--phase {phase:?} is not NAME=PLUGIN[@VERSION]"))?;
        let (plugin, version) = match target.split_once('@') {
            Some((plugin, version)) => (plugin, Some(version.to_owned())),
            None => (target, None),
        };
        spec.phases.push(PhaseSpec {
            name: name.into(),
            plugin: plugin.into(),
            version,
            ..PhaseSpec::default()
        });
    }
    if let Some(payload) = payload {
        let text = match payload.strip_prefix('@') {
            Some(path) => {
                std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?
            }
            None => payload,
        };
        spec.payload = serde_json::from_str(&text).context("--payload is not valid JSON")?;
    }
    anyhow::ensure!(
        !spec.phases.is_empty(),
        "give a spec file or at least one --phase"
    );
    Ok(spec)
}

/// Follows a job's event stream with a progress bar per phase; the exit
/// code says how it ended.
async fn follow(remote: &Remote, client: &Client, job: &Value) -> anyhow::Result<i32> {
    let id = text(&job["id"]).into_owned();
    let bars = MultiProgress::new();
    if remote.json {
        bars.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let style = ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos:>3}% {msg}")
        .expect("valid template")
        .progress_chars("=> ");
    let phase_bars: Vec<(String, ProgressBar)> = job["phases"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|phase| {
            let bar = bars.add(ProgressBar::new(100).with_style(style.clone()));
            let name = text(&phase["name"]).into_owned();
            bar.set_prefix(name.clone());
            bar.set_message(format!(
                "pending ({}@{})",
                text(&phase["plugin"]),
                text(&phase["version"])
            ));
            (name, bar)
        })
        .collect();
    let bar_of = |name: &str| {
        phase_bars
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, bar)| bar)
    };
    let mut stream = std::pin::pin!(client.events(&format!("/jobs/{id}/events")).await?);
    let mut outcome = None;
    while let Some(event) = stream.next().await {
        let event = event?;
        match &event.body {
            EventBody::PhaseStarted(started) => {
                if let Some(bar) = bar_of(&started.phase) {
                    bar.set_message(format!("running (attempt {})", started.attempt))
                }
            }
            EventBody::PhaseProgress(progress) => {
                if let Some(bar) = bar_of(&progress.phase) {
                    bar.set_position(progress.percent.into());
                    bar.set_message(super::printable(&progress.note, false).into_owned());
                }
            }
            EventBody::PhaseCompleted(completed) => {
                if let Some(bar) = bar_of(&completed.phase) {
                    bar.set_position(100);
                    bar.finish_with_message(format!("done in {} ms", completed.usage.wall_ms));
                }
            }
            EventBody::PhaseFailed(failed) => {
                if let Some(bar) = bar_of(&failed.phase) {
                    let next = if failed.retrying {
                        "will retry"
                    } else {
                        "failed"
                    };
                    let error = super::printable(&failed.error, false);
                    bar.set_message(format!("{next}: {error}"));
                }
            }
            body if body.kind().is_job_terminal() => {
                outcome = Some(body.kind().name().trim_start_matches("job:").to_owned());
            }
            _ => {}
        }
    }
    for (_, bar) in &phase_bars {
        if !bar.is_finished() {
            bar.abandon();
        }
    }
    let final_job = client.get(&format!("/jobs/{id}")).await?;
    let outcome = outcome.unwrap_or_else(|| text(&final_job["status"]).into_owned());
    remote.print(&final_job, |j| {
        println!("job {id} {outcome}");
        if j["error"].is_string() {
            println!("error: {}", text(&j["error"]));
        }
        if let Some(last) = j["phases"].as_array().and_then(|p| p.last())
            && !last["output"].is_null()
        {
            println!(
                "{}",
                serde_json::to_string_pretty(&last["output"]).unwrap_or_default()
            );
        }
    });
    Ok(if outcome == "completed" { 0 } else { 1 })
}

pub(super) fn print_job(job: &Value) {
    println!("job {}  {}", text(&job["id"]), text(&job["status"]));
    println!(
        "  created {}  attempt {}/{}",
        text(&job["created_at"]),
        job["attempt"],
        job["max_attempts"]
    );
    if job["error"].is_string() {
        println!("  error: {}", text(&job["error"]));
    }
    for phase in job["phases"].as_array().into_iter().flatten() {
        println!(
            "  - {} ({}@{}): {}, {} attempt(s)",
            text(&phase["name"]),
            text(&phase["plugin"]),
            text(&phase["version"]),
            text(&phase["status"]),
            phase["attempts"]
        );
        if phase["error"].is_string() {
            println!("      error: {}", text(&phase["error"]));
        }
        if !phase["output"].is_null() {
            let output = phase["output"].to_string();
            let shown: String = output.chars().take(200).collect();
            println!(
                "      output: {shown}{}",
                if output.len() > shown.len() {
                    "…"
                } else {
                    ""
                }
            );
        }
    }
    if !job["webhook"].is_null() {
        let w = &job["webhook"];
        println!(
            "  webhook: {} after {} attempt(s)",
            text(&w["status"]),
            w["attempts"]
        );
    }
}

/// Follows the event stream, printing one line per event: from the newest
/// event on, unless `since` says where to start or `job` names a job (whose
/// history is short). Without a start, the server would replay its whole
/// log first: every event of every job it retains.
pub async fn events(
    remote: &Remote,
    job: Option<String>,
    types: Option<String>,
    since: Option<i64>,
) -> anyhow::Result<i32> {
    let client = remote.client();
    let since = match (since, &job) {
        (Some(since), _) => since,
        (None, Some(_)) => 0,
        (None, None) => client.get("/readyz").await?["last_event"]
            .as_i64()
            .context("the server's /readyz names no last_event")?,
    };
    let mut query = vec![format!("last_event_id={since}")];
    if let Some(job) = &job {
        query.push(format!("job={job}"));
    }
    if let Some(types) = &types {
        query.push(format!("types={types}"));
    }
    let path = format!("/events?{}", query.join("&"));
    let mut stream = std::pin::pin!(client.events(&path).await?);
    while let Some(event) = stream.next().await {
        let event = event?;
        if remote.json {
            println!("{}", serde_json::to_string(&event)?);
        } else {
            let subject = event.job_id.as_deref().unwrap_or("");
            let data = serde_json::to_value(&event.body)?;
            println!(
                "{:>6} {} {:<22} {subject} {}",
                event.seq,
                rfc3339(event.at),
                event.kind().name(),
                data["data"]
            );
        }
    }
    Ok(0)
}

/// A string field of the server's JSON, safe to print.
pub(super) fn text(value: &Value) -> std::borrow::Cow<'_, str> {
    super::printable(value.as_str().unwrap_or("-"), false)
}
