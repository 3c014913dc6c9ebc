//! Hot swap under load: while 16 clients keep submitting jobs (each one
//! every 50 ms, about 300 jobs/s: steady load below capacity, so no backlog
//! of old-version jobs hides the swap), activate a new plugin version;
//! measure the time from the activation's response to the first phase
//! started on the new version, and count failed jobs (which must be 0).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::StreamExt;
use serde_json::json;

use jobhost::model::{Event, EventBody};

use super::BenchArgs;
use super::server::{LocalServer, event_stream, upload_echo};
use super::stats::{median, millis};

const CLIENTS: usize = 16;
/// Pause between one client's submissions.
const PACE: Duration = Duration::from_millis(50);
/// How long the load runs before the swap, and after it (a measured span
/// of the scenario, not a wait for something to happen).
const LOAD_AROUND_SWAP: Duration = Duration::from_millis(500);

async fn sample(args: &BenchArgs) -> anyhow::Result<(f64, u64, u64)> {
    let server = LocalServer::start(8).await?;
    let base = server.base.clone();
    jobhost::tls::init();
    let http = reqwest::Client::new();
    for version in ["1.0.0", "2.0.0"] {
        upload_echo(&http, args, &base, version).await?;
    }

    let load = Arc::new(AtomicBool::new(true));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (http, base, load) = (http.clone(), base.clone(), load.clone());
            tokio::spawn(async move {
                let spec = json!({"phases": [{"name": "e", "plugin": "echo"}]});
                while load.load(Ordering::Relaxed) {
                    http.post(format!("{base}/jobs"))
                        .json(&spec)
                        .send()
                        .await?
                        .error_for_status()?;
                    tokio::time::sleep(PACE).await;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    let mut started =
        event_stream(&http, &format!("{base}/events?types=job:phase:started")).await?;
    // The swap happens under steady load, and the load goes on after it.
    tokio::time::sleep(LOAD_AROUND_SWAP).await;

    let activate = http
        .put(format!("{base}/plugins/echo/active"))
        .json(&json!({"version": "2.0.0"}));
    activate.send().await?.error_for_status()?;
    let answered = Instant::now();
    let mut to_first_v2 = None;
    while to_first_v2.is_none() {
        let event = started.next().await.context("stream ended")??;
        let event: Event = serde_json::from_str(&event.data)?;
        if matches!(&event.body, EventBody::PhaseStarted(started) if started.version == "2.0.0") {
            to_first_v2 = Some(millis(answered.elapsed()));
        }
    }
    tokio::time::sleep(LOAD_AROUND_SWAP).await;
    load.store(false, Ordering::Relaxed);
    for client in clients {
        client.await??;
    }
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    let count = |status: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("jobhost_jobs{{status=\"{status}\"}} ")))
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let (failed, total) = (
        count("failed"),
        ["pending", "running", "completed", "failed", "cancelled"]
            .map(count)
            .iter()
            .sum(),
    );
    server.stop().await?;
    Ok((to_first_v2.unwrap_or_default(), failed, total))
}

pub async fn hot_swap(args: &BenchArgs) -> anyhow::Result<()> {
    let (mut delays, mut failed, mut jobs) = (Vec::new(), 0, 0);
    for _ in 0..args.samples.min(5) {
        let (delay, f, total) = sample(args).await?;
        delays.push(delay);
        failed += f;
        jobs += total;
    }
    println!(
        "## Hot swap under load: {CLIENTS} clients each submitting a 1-phase job every {} ms, `PUT /plugins/echo/active` mid-stream",
        PACE.as_millis()
    );
    println!(
        "| activation → first phase on the new version, ms | jobs submitted | jobs failed |\n|---:|---:|---:|"
    );
    println!("| {:.1} | {jobs} | {failed} |", median(&mut delays));
    Ok(())
}
