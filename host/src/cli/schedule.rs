//! `jobhost schedule …`: create, list, show, replace, delete, pause, resume
//! and trigger schedules on a server.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Subcommand;
use serde_json::{Value, json};

use super::remote::{Remote, build_spec, print_job, read_json, text};

#[derive(Debug, Subcommand)]
pub enum ScheduleAction {
    /// Create a schedule from a definition file (JSON, `-` for standard
    /// input), or from --name, --cron and the job's --phase/--payload.
    Create(Definition),
    /// Replace a schedule's definition, given as for `create`.
    Replace(Definition),
    /// List schedules with their next tick.
    List,
    /// Show a schedule.
    Show { name: String },
    /// Delete a schedule (its jobs stay).
    Delete { name: String },
    /// Stop a schedule's ticks until it is resumed.
    Pause { name: String },
    /// Resume a schedule from its next tick after now.
    Resume { name: String },
    /// Enqueue a schedule's job now.
    Trigger { name: String },
}

#[derive(Debug, clap::Args)]
pub struct Definition {
    /// A schedule definition (JSON file); `-` reads standard input.
    file: Option<PathBuf>,
    #[arg(long)]
    name: Option<String>,
    /// Five fields, or six with seconds first, e.g. "30 2 * * *".
    #[arg(long)]
    cron: Option<String>,
    /// An IANA time zone [default: UTC].
    #[arg(long)]
    timezone: Option<String>,
    /// A phase of the job as NAME=PLUGIN or NAME=PLUGIN@VERSION; repeat in
    /// order.
    #[arg(long = "phase", value_name = "NAME=PLUGIN[@VERSION]")]
    phases: Vec<String>,
    /// The job's payload: JSON text or @file.
    #[arg(long)]
    payload: Option<String>,
    /// skip, allow or cancel_previous [default: skip].
    #[arg(long)]
    overlap: Option<String>,
    /// skip, one or all [default: one].
    #[arg(long)]
    catch_up: Option<String>,
}

impl Definition {
    fn body(self) -> anyhow::Result<Value> {
        if let Some(path) = &self.file {
            return read_json(path, "schedule definition");
        }
        let job = build_spec(None, &self.phases, self.payload)?;
        let mut body = json!({
            "name": self.name.context("give a definition file or --name")?,
            "cron": self.cron.context("give a definition file or --cron")?,
            "job": job,
        });
        for (field, value) in [
            ("timezone", self.timezone),
            ("overlap", self.overlap),
            ("catch_up", self.catch_up),
        ] {
            if let Some(value) = value {
                body[field] = Value::String(value);
            }
        }
        Ok(body)
    }
}

pub async fn schedule(remote: &Remote, action: ScheduleAction) -> anyhow::Result<i32> {
    let client = remote.client();
    match action {
        ScheduleAction::Create(definition) => {
            let body = client.post("/schedules", &definition.body()?).await?;
            remote.print(&body, print_schedule);
        }
        ScheduleAction::Replace(definition) => {
            let body = definition.body()?;
            let name = body["name"]
                .as_str()
                .context("the definition has no name")?;
            let body = client
                .put_json(&format!("/schedules/{name}"), &body)
                .await?;
            remote.print(&body, print_schedule);
        }
        ScheduleAction::List => {
            let body = client.get("/schedules").await?;
            remote.print(&body, |b| {
                let schedules = b["schedules"].as_array().cloned().unwrap_or_default();
                if schedules.is_empty() {
                    println!("no schedules");
                }
                for s in &schedules {
                    let state = if s["paused"] == true {
                        "paused"
                    } else {
                        "active"
                    };
                    println!(
                        "{:<24} {:<20} {:<16} {state:<7} next {}",
                        text(&s["name"]),
                        text(&s["cron"]),
                        text(&s["timezone"]),
                        text(&s["next_tick"])
                    );
                }
            });
        }
        ScheduleAction::Show { name } => {
            let body = client.get(&format!("/schedules/{name}")).await?;
            remote.print(&body, print_schedule);
        }
        ScheduleAction::Delete { name } => {
            client.delete(&format!("/schedules/{name}")).await?;
            remote.print(&json!({"deleted": name}), |_| println!("deleted {name}"));
        }
        ScheduleAction::Pause { name } => {
            let body = client
                .post(&format!("/schedules/{name}/pause"), &json!({}))
                .await?;
            remote.print(&body, print_schedule);
        }
        ScheduleAction::Resume { name } => {
            let body = client
                .post(&format!("/schedules/{name}/resume"), &json!({}))
                .await?;
            remote.print(&body, print_schedule);
        }
        ScheduleAction::Trigger { name } => {
            let body = client
                .post(&format!("/schedules/{name}/trigger"), &json!({}))
                .await?;
            remote.print(&body, print_job);
        }
    }
    Ok(0)
}

fn print_schedule(s: &Value) {
    println!(
        "{}: {} ({})",
        text(&s["name"]),
        text(&s["cron"]),
        text(&s["timezone"])
    );
    let state = if s["paused"] == true {
        "paused"
    } else {
        "active"
    };
    println!("  {state}, next tick {}", text(&s["next_tick"]));
    println!(
        "  overlap {}, catch-up {} (limit {})",
        text(&s["overlap"]),
        text(&s["catch_up"]),
        s["catch_up_limit"]
    );
    let phases: Vec<String> = s["job"]["phases"]
        .as_array()
        .map(|phases| {
            phases
                .iter()
                .map(|p| match p["version"].as_str() {
                    Some(version) => {
                        format!("{}={}@{version}", text(&p["name"]), text(&p["plugin"]))
                    }
                    None => format!("{}={}", text(&p["name"]), text(&p["plugin"])),
                })
                .collect()
        })
        .unwrap_or_default();
    println!("  job: {}", phases.join(" → "));
    match s["last_fire"].as_object() {
        Some(last) => println!(
            "  last fire {} (tick {}): job {} {}",
            text(&last["at"]),
            text(&last["tick"]),
            text(&last["job_id"]),
            text(&last["job_status"])
        ),
        None => println!("  never fired"),
    }
}
