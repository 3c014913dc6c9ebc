//! The queue over HTTP: `POST /jobs` by 64 concurrent clients, completion
//! observed on the SSE stream, against a real server on loopback. Printed
//! beside the same workload through the library in the same run, so the
//! ratio is the API's cost.

use std::time::Instant;

use anyhow::Context as _;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::json;

use super::BenchArgs;
use super::server::{LocalServer, upload_echo};
use super::stats::median;
use crate::storage::Durability;

const CLIENTS: usize = 64;

async fn sample(args: &BenchArgs, phases: usize) -> anyhow::Result<f64> {
    let server = LocalServer::start(64).await?;
    let base = server.base.clone();
    crate::tls::init();
    let http = reqwest::Client::new();
    upload_echo(&http, args, &base, "1.0.0").await?;
    let spec = json!({"phases": (0..phases).map(|i| json!({"name": format!("p{i}"), "plugin": "echo"})).collect::<Vec<_>>()});

    let events = http
        .get(format!("{base}/events?types=job:completed"))
        .send()
        .await?
        .error_for_status()?;
    let mut completions = events.bytes_stream().eventsource();
    let started = Instant::now();
    let jobs = args.jobs;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let (http, base, spec) = (http.clone(), base.clone(), spec.clone());
            tokio::spawn(async move {
                for _ in (client..jobs).step_by(CLIENTS) {
                    http.post(format!("{base}/jobs"))
                        .json(&spec)
                        .send()
                        .await?
                        .error_for_status()?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for client in clients {
        client.await??;
    }
    for _ in 0..args.jobs {
        completions
            .next()
            .await
            .context("the event stream ended")??;
    }
    let rate = args.jobs as f64 / started.elapsed().as_secs_f64();
    server.stop().await?;
    Ok(rate)
}

pub async fn http_throughput(args: &BenchArgs) -> anyhow::Result<()> {
    println!(
        "## Over HTTP: {} trivial jobs by {CLIENTS} concurrent clients, completion seen on SSE (jobs/s, concurrency 64)",
        args.jobs
    );
    let compiled = tempfile::tempdir()?;
    println!("| phases | HTTP + SSE | library, same run | ratio |\n|---:|---:|---:|---:|");
    for phases in [1, 3] {
        let mut over_http = Vec::new();
        for _ in 0..args.samples.min(3) {
            over_http.push(sample(args, phases).await?);
        }
        let http = median(&mut over_http);
        let library =
            super::queue::throughput(args, compiled.path(), phases, 64, Durability::Process)
                .await?;
        println!(
            "| {phases} | {http:.0} | {library:.0} | {:.2} |",
            http / library
        );
    }
    Ok(())
}
