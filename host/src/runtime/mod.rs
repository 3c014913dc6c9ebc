//! The WebAssembly side of jobhost: one wasmtime [`Engine`] per process,
//! plugins compiled once (with an on-disk cache of compiled artifacts) and
//! pre-instantiated, and each phase run in a fresh [`wasmtime::Store`] that
//! grants nothing but the contract, with a memory cap, bounded logs and an
//! epoch deadline that enforces cancellation and timeouts even for guests
//! that never yield.
//!
//! Only this module touches wasmtime configuration. The rest of jobhost sees
//! [`Runtime::load`], [`Runtime::run`] and plain result types.

mod bindings;
mod cache;
mod capture;
mod config_store;
mod engine;
mod grants;
mod guest_text;
mod http;
mod plugin;
mod run;
mod sandbox;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::Semaphore;
use wasmtime::Engine;
use wasmtime::component::Linker;

pub use cache::CacheStats;
pub use config_store::secret_variable;
pub use engine::{EpochTicker, pooling_config};
pub use grants::{Covered, Granted, RunGrants};
pub use guest_text::{MAX_METADATA_DESCRIPTION, MAX_METADATA_NAME, MAX_PROGRESS_NOTE};
pub use http::GuestHttpConfig;
pub use plugin::{LoadError, Loaded, LoadedPlugin, PluginMetadata, content_hash};
pub use run::{LogEntry, LogLevel, PhaseFailure, PhaseLog, PhaseResult, PhaseRun, ProgressSink};
pub use tokio_util::sync::CancellationToken;

use sandbox::PhaseState;

/// How the runtime sandboxes and bounds phase runs.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Phases that may run at once. The instance pool is sized from this, so
    /// it is also the most instances that exist at any time.
    pub max_concurrent_runs: u32,
    /// Linear memory a single run may use, in bytes, unless its plugin's
    /// resources say otherwise.
    pub memory_limit: u64,
    /// The most a plugin's resources may give one run, in bytes: the
    /// instance pool is sized for it (address space, not memory).
    pub max_plugin_memory: u64,
    /// Period of the epoch ticker: the granularity of timeouts and forced
    /// cancellation, and how often a busy guest yields to other tasks.
    pub epoch_tick: Duration,
    /// Bytes of `log()` messages kept per run; later lines are counted and dropped.
    pub max_log_bytes: usize,
    /// Bytes of stdout, and separately of stderr, kept per run.
    pub max_captured_output: usize,
    /// Longest failure message kept from a run (a guest's `fail`/`retry`
    /// text, a trap's description); the rest is cut with a marker.
    pub max_error_bytes: usize,
    /// Where compiled artifacts are cached; `None` compiles on every load.
    pub cache_dir: Option<PathBuf>,
    /// Plugin compiles at once: each takes every core it can get.
    pub max_concurrent_compiles: usize,
    /// Most functions a plugin's core modules may define together.
    pub max_functions: u32,
    /// Which addresses guest HTTP may reach (besides those a grant names).
    pub outbound: crate::outbound::AddressPolicy,
    /// Bounds on guest HTTP.
    pub http: GuestHttpConfig,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            max_concurrent_runs: 16,
            memory_limit: 256 << 20,
            max_plugin_memory: 4 << 30,
            epoch_tick: Duration::from_millis(10),
            max_log_bytes: 64 << 10,
            max_captured_output: 64 << 10,
            max_error_bytes: 4 << 10,
            cache_dir: None,
            max_concurrent_compiles: 1,
            max_functions: 100_000,
            outbound: Default::default(),
            http: GuestHttpConfig::default(),
        }
    }
}

/// The process-wide WebAssembly runtime. Cheap to share behind an `Arc`.
pub struct Runtime {
    engine: Engine,
    linker: Linker<PhaseState>,
    cache: cache::ArtifactCache,
    /// One permit per instance slot in the pool: a run waits here rather
    /// than fail instantiation when the pool is full.
    slots: Arc<Semaphore>,
    /// One permit per compile allowed at once.
    compiles: Semaphore,
    http: Arc<http::OutboundHttp>,
    config: RuntimeConfig,
    ticker: engine::EpochTicker,
}

impl Runtime {
    pub fn new(config: RuntimeConfig) -> anyhow::Result<Self> {
        let engine = engine::new_engine(&config)
            .map_err(anyhow::Error::from)
            .context("configuring the wasmtime engine")?;
        let linker = sandbox::linker(&engine)
            .map_err(anyhow::Error::from)
            .context("linking host imports")?;
        let cache = cache::ArtifactCache::new(&engine, config.cache_dir.clone())
            .context("opening the compiled-artifact cache")?;
        let ticker = engine::EpochTicker::start(&engine, config.epoch_tick);
        Ok(Runtime {
            slots: Arc::new(Semaphore::new(config.max_concurrent_runs as usize)),
            compiles: Semaphore::new(config.max_concurrent_compiles.max(1)),
            http: Arc::new(http::OutboundHttp::new(
                config.outbound.clone(),
                config.http.clone(),
            )),
            engine,
            linker,
            cache,
            config,
            ticker,
        })
    }

    pub fn config(&self) -> &RuntimeConfig {
        &self.config
    }

    /// Counters of the compiled-artifact cache: how often a load compiled,
    /// reused a cached artifact, or rejected a bad cache file.
    pub fn cache_stats(&self) -> CacheStats {
        self.cache.stats()
    }

    /// Makes every guest running in guest code run its epoch callback at
    /// its next check instead of at the next tick (up to `epoch_tick`
    /// later): a run whose token was cancelled before this call stops
    /// there; every other one yields once and loses nothing. A guest parked
    /// in a host call needs none of this (its run's select stops it).
    /// Callers cancel first: the epoch counter is relaxed, the token is not.
    pub fn interrupt_guests(&self) {
        self.engine.increment_epoch();
    }

    /// Which engine configuration compiled artifacts are for: with a
    /// component's content hash, the key of its artifact's digest.
    pub fn engine_key(&self) -> &str {
        self.cache.engine_key()
    }
}
