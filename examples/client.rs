//! A jobhost client in plain Rust: reqwest for HTTP, eventsource-stream
//! to parse the SSE stream. It uploads the sample pipeline plugins, submits
//! the sales-report job, prints its events live, then the report.
//!
//! With a server running (`cargo run -p jobhost -- serve`) and the plugins
//! built (`cargo build --release --target wasm32-wasip2 --manifest-path plugins/Cargo.toml`):
//!
//!     cargo run -p jobhost --example client -- http://127.0.0.1:8080

use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::Value;

const PLUGINS: &str = "plugins/target/wasm32-wasip2/release";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let base = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "http://127.0.0.1:8080".into());
    jobhost::tls::init();
    let http = reqwest::Client::new();

    for plugin in ["csv-parse", "aggregate", "render-report"] {
        let wasm = std::fs::read(format!("{PLUGINS}/{}.wasm", plugin.replace('-', "_")))?;
        let response = http
            .put(format!("{base}/plugins/{plugin}/versions/1.0.0"))
            .body(wasm)
            .send()
            .await?;
        println!("upload {plugin}: {}", response.status());
    }

    let spec: Value = serde_json::from_str(&std::fs::read_to_string(
        "examples/specs/sales-report.json",
    )?)?;
    let job: Value = http
        .post(format!("{base}/jobs"))
        .json(&spec)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let id = job["id"].as_str().ok_or("no job id")?.to_owned();
    println!("submitted {id}");

    // The job's stream replays its events from the start and ends after the
    // terminal one; `Last-Event-ID` would resume after a disconnect.
    let response = http
        .get(format!("{base}/jobs/{id}/events"))
        .send()
        .await?
        .error_for_status()?;
    let mut events = response.bytes_stream().eventsource();
    while let Some(event) = events.next().await {
        let event = event?;
        let data: Value = serde_json::from_str(&event.data)?;
        println!("#{:<4} {:<22} {}", event.id, event.event, data["data"]);
    }

    let job: Value = http
        .get(format!("{base}/jobs/{id}"))
        .send()
        .await?
        .json()
        .await?;
    println!("\njob {}\n", job["status"]);
    if let Some(report) = job["phases"][2]["output"]["report"].as_str() {
        println!("{report}");
    }
    Ok(())
}
