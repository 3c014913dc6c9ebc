//! The composition root of `jobhost serve`: opens storage, starts the
//! runtime, plugin registry and queue, serves the HTTP API, and shuts it all
//! down in order on one signal.

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::data_dir::{self, DataDirLock};
use crate::events::Bus;
use crate::http::serve::ConnectionLimits;
use crate::http::{AppState, RateLimiter, StreamLimits, router};
use crate::metrics::Metrics;
use crate::plugins::PluginRegistry;
use crate::queue::{Queue, QueueConfig};
use crate::runtime::Runtime;
use crate::storage;
use crate::webhooks::{Secret, WebhookConfig};

pub struct App {
    pub state: AppState,
    pub config: Config,
    max_connections: usize,
    /// Held until the server has shut down and closed storage.
    _data_dir: DataDirLock,
}

impl App {
    /// Opens the data directory and starts every component but HTTP.
    pub async fn start(config: Config) -> anyhow::Result<App> {
        let data_dir = data_dir::open(&config.data_dir)?;
        let (storage, db) = match &config.postgres {
            Some(options) => {
                let db = options.redacted_url();
                let options = storage::PgOptions {
                    host_id: data_dir::host_id(&config.data_dir)?,
                    host_name: host_name(&config),
                    slots: config.queue.concurrency as u32,
                    ..options.clone()
                };
                let storage = storage::open_postgres(&options)
                    .await
                    .with_context(|| format!("opening {db}"))?;
                (storage, db)
            }
            None => {
                let db = config.data_dir.join("jobhost.db");
                let storage = storage::open_sqlite(&db, config.durability)
                    .with_context(|| format!("opening {}", db.display()))?;
                (storage, db.display().to_string())
            }
        };
        if let Some(bytes) = config.max_db_bytes {
            storage
                .limit_size(bytes)
                .await
                .context("limiting the database's size")?;
        }
        let runtime = Arc::new(Runtime::new(config.runtime.clone())?);
        let plugins = Arc::new(
            PluginRegistry::with_quota(runtime, storage.clone(), config.plugin_quota)
                .with_secrets(config.secrets.clone())
                .with_max_phase_timeout(config.queue.max_phase_timeout),
        );
        let loaded = plugins.preload().await.context("loading stored plugins")?;
        let mut webhooks = WebhookConfig::new(webhook_secret(&config)?);
        webhooks.timeout = config.webhook_timeout;
        webhooks.max_attempts = config.webhook_max_attempts;
        webhooks.policy = Arc::new(config.outbound.clone());
        let metrics = Arc::new(Metrics::default());
        let queue_config = QueueConfig {
            webhooks: Some(webhooks),
            metrics: metrics.clone(),
            ..config.queue.clone()
        };
        let (queue, recovered) =
            Queue::start(storage, plugins.clone(), Bus::default(), queue_config).await?;
        tracing::info!(plugins = loaded, recovered = recovered.len(), %db, "jobhost started");
        let (max_connections, max_streams) = descriptor_budget(&config);
        let state = AppState {
            queue: Arc::new(queue),
            plugins,
            access: Arc::new(config.access.clone()),
            shutdown: CancellationToken::new(),
            max_body_bytes: config.max_body_bytes,
            max_plugin_bytes: config.max_plugin_bytes,
            metrics,
            sse_activity: Arc::default(),
            streams: StreamLimits::new(max_streams, config.max_streams_per_ip),
            rate_limiter: Arc::new(RateLimiter::new(config.rate_limit)),
            request_timeout: config.request_timeout,
        };
        Ok(App {
            state,
            config,
            max_connections,
            _data_dir: data_dir,
        })
    }

    /// Serves HTTP on `listener` until `signal` resolves, then shuts down
    /// within the shutdown timeout as a whole: HTTP stops accepting and
    /// drains, SSE streams end, the queue drains in what time is left
    /// (forcing phases past it) and storage closes.
    pub async fn serve(
        self,
        listener: TcpListener,
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let state = self.state.clone();
        let shutdown = state.shutdown.clone();
        let signalled = Arc::new(OnceLock::new());
        let server = {
            let signalled = signalled.clone();
            let signal = async move {
                signal.await;
                tracing::info!("shutting down");
                signalled.get_or_init(Instant::now);
                shutdown.cancel();
            };
            let limits = ConnectionLimits {
                max_connections: self.max_connections,
                header_read_timeout: self.config.header_read_timeout,
            };
            crate::http::serve::serve(listener, router(state.clone()), limits, signal)
        };
        let limit = self.config.shutdown_timeout;
        // Connections get the shutdown timeout to finish: an SSE client
        // that stopped reading would otherwise hold up shutdown forever.
        let drain_limit = {
            let shutdown = state.shutdown.clone();
            async move {
                shutdown.cancelled().await;
                tokio::time::sleep(limit).await;
            }
        };
        let served = tokio::select! {
            () = server => Ok::<(), anyhow::Error>(()),
            () = drain_limit => {
                tracing::warn!("connections still open after the shutdown timeout; closing them");
                Ok(())
            }
        };
        state.shutdown.cancel();
        let spent = signalled.get_or_init(Instant::now).elapsed();
        let drained = state.queue.shutdown(limit.saturating_sub(spent)).await;
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

/// Descriptors kept for everything but event streams: the database,
/// plugins, the artifact cache, webhooks and ordinary requests.
const DESCRIPTOR_HEADROOM: u64 = 256;

/// How many connections, and of them event streams, may be open at once:
/// raises the soft open-file limit to the hard one, then gives connections
/// all of it but [`DESCRIPTOR_HEADROOM`], and streams three quarters of
/// that, so that neither can take the descriptors the database and plugins
/// need, and idle streams leave room for `/healthz` and submits.
fn descriptor_budget(config: &Config) -> (usize, usize) {
    let limit = raise_open_file_limit();
    let connections = config
        .max_connections
        .unwrap_or(limit.saturating_sub(DESCRIPTOR_HEADROOM).max(1) as usize);
    let streams = config.max_streams.unwrap_or((connections * 3 / 4).max(1));
    tracing::info!(
        open_file_limit = limit,
        max_connections = connections,
        max_streams = streams,
        "descriptor budget"
    );
    (connections, streams)
}

/// Raises the soft limit on open files to the hard one; returns the soft
/// limit in force.
pub fn raise_open_file_limit() -> u64 {
    #[cfg(unix)]
    {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit and setrlimit only read and write `limit`.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
                return 1024;
            }
            if limit.rlim_cur < limit.rlim_max {
                let raised = libc::rlimit {
                    rlim_cur: limit.rlim_max,
                    rlim_max: limit.rlim_max,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                    limit = raised;
                }
            }
        }
        limit.rlim_cur
    }
    #[cfg(not(unix))]
    1024
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

/// This host's name for people: the machine's, and the address it serves.
fn host_name(config: &Config) -> String {
    let machine = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_else(|_| "jobhost".to_owned());
    format!("{machine} ({})", config.listen)
}
