//! The queue over HTTP: `POST /jobs` by 64 concurrent clients, completion
//! observed on the SSE stream, against a real server on loopback. Printed
//! beside the same workload through the library in the same run, so the
//! ratio is the API's cost.

use std::time::Instant;

use anyhow::Context as _;
use futures::StreamExt;
use serde_json::json;

use super::BenchArgs;
use super::server::{LocalServer, event_stream, upload_echo};
use super::stats::median;
use jobhost::storage::Durability;

const CLIENTS: usize = 64;

async fn sample(args: &BenchArgs, phases: usize) -> anyhow::Result<f64> {
    let server = LocalServer::start(64).await?;
    jobhost::tls::init();
    let http = reqwest::Client::new();
    upload_echo(&http, args, &server.base, "1.0.0").await?;
    let (rate, _) = submit_and_watch(&http, &server.base, phases, args.jobs, 0).await?;
    server.stop().await?;
    Ok(rate)
}

/// Jobs per second: `jobs` trivial jobs of `phases` phases `POST`ed by
/// [`CLIENTS`] concurrent clients to the server at `base`, until the last
/// `job:completed` arrives on an SSE stream opened beforehand; and that last
/// event's id. The stream starts after event `after`, which must be the
/// last completion the server has had.
pub(super) async fn submit_and_watch(
    http: &reqwest::Client,
    base: &str,
    phases: usize,
    jobs: usize,
    after: i64,
) -> anyhow::Result<(f64, i64)> {
    let spec = json!({"phases": (0..phases).map(|i| json!({"name": format!("p{i}"), "plugin": "echo"})).collect::<Vec<_>>()});
    let url = format!("{base}/events?types=job:completed&last_event_id={after}");
    let mut completions = event_stream(http, &url).await?;
    let started = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let (http, url, spec) = (http.clone(), format!("{base}/jobs"), spec.clone());
            tokio::spawn(async move {
                for _ in (client..jobs).step_by(CLIENTS) {
                    http.post(&url)
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
    let mut last = 0;
    for _ in 0..jobs {
        let event = completions
            .next()
            .await
            .context("the event stream ended")??;
        last = event.id.parse()?;
    }
    Ok((jobs as f64 / started.elapsed().as_secs_f64(), last))
}

pub async fn http_throughput(args: &BenchArgs) -> anyhow::Result<()> {
    println!(
        "## Over HTTP: {} trivial jobs by {CLIENTS} concurrent clients, completion seen on SSE (jobs/s, concurrency 64)",
        args.jobs
    );
    let compiled = super::queue::SharedCache::new()?;
    println!("| phases | HTTP + SSE | library, same run | ratio |\n|---:|---:|---:|---:|");
    for phases in [1, 3] {
        let mut over_http = Vec::new();
        for _ in 0..args.samples.min(3) {
            over_http.push(sample(args, phases).await?);
        }
        let http = median(&mut over_http);
        let library = super::queue::throughput(
            args,
            &compiled,
            phases,
            64,
            Durability::Process,
            &super::queue::trivial_payload(),
        )
        .await?
        .jobs_per_second;
        println!(
            "| {phases} | {http:.0} | {library:.0} | {:.2} |",
            http / library
        );
    }
    Ok(())
}
