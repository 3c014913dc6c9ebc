//! A real `jobhost serve` in this process, on a loopback port, for the
//! scenarios that go through the HTTP API.

use anyhow::Context as _;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::BenchArgs;
use jobhost::app::App;
use jobhost::config::ServeArgs;
use jobhost::storage::Durability;

pub struct LocalServer {
    /// `http://127.0.0.1:<port>`
    pub base: String,
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
    _dir: tempfile::TempDir,
}

impl LocalServer {
    /// Starts a server with a fresh data directory.
    pub async fn start(concurrency: usize) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let serve = ServeArgs {
            data_dir: Some(dir.path().to_path_buf()),
            concurrency: Some(concurrency),
            durability: Some(Durability::Process),
            // The fan-out scenarios open thousands of streams from this one
            // address: the per-address cap is lifted for them.
            max_streams_per_ip: Some(usize::MAX),
            ..ServeArgs::default()
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let app = App::start(serve.resolve()?).await?;
        let stop = CancellationToken::new();
        let signal = stop.clone();
        let task = tokio::spawn(async move {
            app.serve(listener, async move { signal.cancelled().await })
                .await
        });
        Ok(LocalServer {
            base,
            stop,
            task,
            _dir: dir,
        })
    }

    /// Shuts the server down as a signal would.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.task.await?
    }
}

/// Uploads the `echo` test component to the server at `base` as `version`.
pub async fn upload_echo(
    http: &reqwest::Client,
    args: &BenchArgs,
    base: &str,
    version: &str,
) -> anyhow::Result<()> {
    let echo = std::fs::read(args.plugins.join("echo.wasm"))
        .context("reading echo.wasm (see ./bench.sh)")?;
    http.put(format!("{base}/plugins/echo/versions/{version}"))
        .body(echo)
        .send()
        .await?
        .error_for_status()?;
    Ok(())
}

/// An open SSE stream of `url` (the response checked, its events parsed).
pub async fn event_stream(
    http: &reqwest::Client,
    url: &str,
) -> anyhow::Result<
    impl futures::Stream<Item = Result<eventsource_stream::Event, EventError>> + Unpin + use<>,
> {
    let response = http.get(url).send().await?.error_for_status()?;
    Ok(jobhost::cli::sse_events(response))
}

type EventError = eventsource_stream::EventStreamError<reqwest::Error>;
