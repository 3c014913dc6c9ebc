//! The composition root of `jobhost serve`: opens storage, starts the
//! runtime, plugin registry and queue, serves the HTTP API, and shuts it all
//! down in order on one signal.

use std::future::Future;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::events::Bus;
use crate::http::{AppState, router};
use crate::metrics::Metrics;
use crate::plugins::PluginRegistry;
use crate::queue::{Queue, QueueConfig};
use crate::runtime::Runtime;
use crate::storage::Storage;
use crate::webhooks::{Secret, WebhookConfig};

pub struct App {
    pub state: AppState,
    pub config: Config,
}

impl App {
    /// Opens the data directory and starts every component but HTTP.
    pub async fn start(config: Config) -> anyhow::Result<App> {
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
        let db = config.data_dir.join("jobhost.db");
        let storage = Arc::new(
            Storage::open(&db, config.durability, Bus::default())
                .with_context(|| format!("opening {}", db.display()))?,
        );
        let runtime = Arc::new(Runtime::new(config.runtime.clone())?);
        let plugins = Arc::new(PluginRegistry::new(runtime, storage.clone()));
        let loaded = plugins.preload().await.context("loading stored plugins")?;
        let mut webhooks = WebhookConfig::new(webhook_secret(&config)?);
        webhooks.timeout = config.webhook_timeout;
        webhooks.max_attempts = config.webhook_max_attempts;
        let metrics = Arc::new(Metrics::default());
        let queue_config = QueueConfig {
            webhooks: Some(webhooks),
            metrics: metrics.clone(),
            ..config.queue.clone()
        };
        let (queue, recovered) =
            Queue::start(storage.clone(), plugins.clone(), queue_config).await?;
        tracing::info!(plugins = loaded, recovered = recovered.len(), db = %db.display(), "jobhost started");
        let state = AppState {
            queue: Arc::new(queue),
            plugins,
            storage,
            tokens: Arc::new(config.tokens.clone()),
            shutdown: CancellationToken::new(),
            max_body_bytes: config.max_body_bytes,
            max_plugin_bytes: config.max_plugin_bytes,
            metrics,
            sse_activity: Arc::default(),
        };
        Ok(App { state, config })
    }

    /// Serves HTTP on `listener` until `signal` resolves, then shuts down:
    /// HTTP stops accepting and drains, SSE streams end, the queue drains
    /// (forcing phases past the shutdown timeout) and storage closes.
    pub async fn serve(
        self,
        listener: TcpListener,
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let state = self.state.clone();
        let shutdown = state.shutdown.clone();
        let server =
            axum::serve(listener, router(state.clone())).with_graceful_shutdown(async move {
                signal.await;
                tracing::info!("shutting down");
                shutdown.cancel();
            });
        // Connections get the shutdown timeout to finish: an SSE client
        // that stopped reading would otherwise hold up shutdown forever.
        let drain_limit = {
            let (shutdown, limit) = (state.shutdown.clone(), self.config.shutdown_timeout);
            async move {
                shutdown.cancelled().await;
                tokio::time::sleep(limit).await;
            }
        };
        let served = tokio::select! {
            served = server.into_future() => served.context("HTTP server failed"),
            () = drain_limit => {
                tracing::warn!("connections still open after the shutdown timeout; closing them");
                Ok(())
            }
        };
        state.shutdown.cancel();
        let drained = state.queue.shutdown(self.config.shutdown_timeout).await;
        served?;
        match drained {
            Ok(_) => Ok(()),
            Err(timed_out) => {
                tracing::warn!(jobs = ?timed_out.report.forced, "{timed_out}");
                Ok(())
            }
        }
    }
}

/// The configured default webhook secret, or the one kept in the data
/// directory (generated on first start, readable only by its owner).
fn webhook_secret(config: &Config) -> anyhow::Result<Secret> {
    if let Some(secret) = &config.webhook_secret {
        return Ok(secret.clone());
    }
    let path = config.data_dir.join("webhook-secret");
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            Secret::parse(text.trim()).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let secret = Secret::generate();
            write_private(&path, &secret.to_whsec())?;
            tracing::info!(path = %path.display(), "generated the default webhook secret");
            Ok(secret)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn write_private(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    writeln!(file, "{text}")?;
    Ok(())
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
