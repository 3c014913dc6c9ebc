//! `jobhost queue …`: the queue's state, pause and resume, and the
//! concurrency limits.

use std::path::PathBuf;

use clap::Subcommand;
use serde_json::{Value, json};

use super::remote::{Remote, read_json, text};

#[derive(Debug, Subcommand)]
pub enum QueueAction {
    /// Show the queue: jobs per status, running and due jobs, the busiest
    /// concurrency keys.
    Show,
    /// Start no new phase, on any host, until resumed.
    Pause,
    Resume,
    /// Show the concurrency limits and the busiest keys, or replace the
    /// limits from a file (JSON, `-` for standard input), e.g.
    /// {"default": 4, "keys": {"tenant-*": 2}, "rates": {"tenant-*": 10}}.
    Limits {
        file: Option<PathBuf>,
    },
}

pub async fn queue(remote: &Remote, action: QueueAction) -> anyhow::Result<i32> {
    let client = remote.client();
    match action {
        QueueAction::Show => {
            let body = client.get("/queue").await?;
            remote.print(&body, print_queue);
        }
        QueueAction::Pause => {
            let body = client.post("/queue/pause", &json!({})).await?;
            remote.print(&body, print_queue);
        }
        QueueAction::Resume => {
            let body = client.post("/queue/resume", &json!({})).await?;
            remote.print(&body, print_queue);
        }
        QueueAction::Limits { file } => {
            let body = match file {
                Some(path) => {
                    let limits: Value = read_json(&path, "set of concurrency limits")?;
                    client.put_json("/queue/concurrency", &limits).await?
                }
                None => client.get("/queue/concurrency").await?,
            };
            remote.print(&body, print_concurrency);
        }
    }
    Ok(0)
}

fn print_queue(q: &Value) {
    let state = if q["paused"] == true {
        "paused"
    } else {
        "running"
    };
    println!(
        "{state}: {} of {} slots busy here, {} jobs due",
        q["running"], q["concurrency"], q["due"]
    );
    let counts: Vec<String> = q["jobs"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(status, count)| format!("{status} {count}"))
        .collect();
    println!("jobs: {}", counts.join(", "));
    print_concurrency(&q["keys"]);
}

fn print_concurrency(c: &Value) {
    let limits = &c["limits"];
    let mut rules: Vec<String> = limits["keys"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(rule, limit)| format!("{rule} {limit}"))
        .collect();
    if let Some(default) = limits["default"].as_u64() {
        rules.push(format!("default {default}"));
    }
    for (rule, rate) in limits["rates"].as_object().into_iter().flatten() {
        rules.push(format!("{rule} {rate}/s"));
    }
    if let Some(rate) = limits["default_rate"].as_f64() {
        rules.push(format!("default {rate}/s"));
    }
    if rules.is_empty() {
        println!("no concurrency limits");
    } else {
        println!("limits: {}", rules.join(", "));
    }
    println!("{} keys with jobs", c["key_count"]);
    for key in c["keys"].as_array().into_iter().flatten() {
        let mut limit = key["limit"]
            .as_u64()
            .map_or("no limit".to_owned(), |l| format!("limit {l}"));
        if let Some(rate) = key["rate"].as_f64() {
            limit.push_str(&format!(", {rate}/s"));
        }
        println!(
            "  {:<32} running {:<5} pending {:<7} {limit}",
            text(&key["key"]),
            key["running"],
            key["pending"]
        );
    }
}
