//! The per-run state of a phase ([`PhaseState`], the data of its
//! `wasmtime::Store`) and the host imports a guest may call.
//!
//! A sandbox grants nothing beyond the contract: WASI is linked so that
//! standard libraries work, but its context has no preopened directories, no
//! environment variables, no arguments, no stdin and no network; stdout and
//! stderr go to bounded in-memory captures.

use std::sync::Arc;
use std::time::Instant;

use tokio_util::sync::CancellationToken;
use wasmtime::component::{HasSelf, Linker, ResourceTable};
use wasmtime::{Engine, ResourceLimiter};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use super::bindings::{Plugin, host};
use super::capture::BoundedCapture;
use super::grants::RunGrants;
use super::guest_text::{MAX_PROGRESS_NOTE, cut};
use super::http::{GuestHttp, HttpUsage, OutboundHttp};
use super::run::{LogEntry, LogLevel, PhaseLog, ProgressSink};
use crate::model::Progress;

/// Progress updates closer together than this are coalesced (the latest one
/// is kept and reported with the result). No value bypasses it: a guest
/// that reports 100% in a loop is throttled like any other.
const PROGRESS_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);
/// A single log line longer than this is cut, so one call cannot use the
/// whole log budget.
const MAX_LOG_LINE: usize = 4 << 10;
/// The tracing target of guest `log()` lines, so they can be filtered apart
/// from the host's own.
pub const GUEST_LOG_TARGET: &str = "jobhost::guest";
/// Table elements a guest may grow its tables to.
const MAX_TABLE_ELEMENTS: usize = 100_000;
/// What one table element counts against a run's memory cap (a pointer).
const TABLE_ELEMENT_BYTES: usize = 8;
/// Handles (streams, pollables, …) a run may hold in its resource table at
/// once; past it, the WASI call that would add one fails.
pub(super) const MAX_RESOURCES: usize = 4096;

/// Why the epoch callback stopped a run by force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Interruption {
    Cancelled,
    TimedOut,
}

pub(super) struct PhaseState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(super) limiter: MemoryLimiter,
    log: LogBuffer,
    progress: ProgressGate,
    stdout: BoundedCapture,
    stderr: BoundedCapture,
    pub(super) cancel: CancellationToken,
    pub(super) deadline: Instant,
    /// Epoch ticks this run spent executing guest code.
    pub(super) ticks: u64,
    /// The ticker's count when the callback last ran: a callback that a
    /// stop's bump (not a tick) triggered counts no tick.
    pub(super) last_tick: u64,
    pub(super) interrupted: Option<Interruption>,
    plugin: String,
    granted: Option<Arc<RunGrants>>,
    /// Config reads refused so far (only the first few are logged).
    pub(super) config_refusals: u64,
    http_ctx: WasiHttpCtx,
    http: GuestHttp,
}

/// What a run leaves behind once its store is dropped.
pub(super) struct SandboxReport {
    pub(super) log: PhaseLog,
    pub(super) peak_memory: u64,
    pub(super) memory_exhausted: bool,
    pub(super) ticks: u64,
    pub(super) interrupted: Option<Interruption>,
    pub(super) last_progress: Option<Progress>,
    pub(super) http: Arc<HttpUsage>,
}

pub(super) struct SandboxLimits {
    pub(super) memory: u64,
    pub(super) log_bytes: usize,
    pub(super) captured_output: usize,
}

impl PhaseState {
    pub(super) fn new(
        plugin: &str,
        limits: &SandboxLimits,
        cancel: CancellationToken,
        deadline: Instant,
        progress: Option<ProgressSink>,
        granted: Option<Arc<RunGrants>>,
        http: &Arc<OutboundHttp>,
    ) -> Self {
        let stdout = BoundedCapture::new(limits.captured_output);
        let stderr = BoundedCapture::new(limits.captured_output);
        let wasi = WasiCtxBuilder::new()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let mut table = ResourceTable::new();
        table.set_max_capacity(MAX_RESOURCES);
        PhaseState {
            wasi,
            table,
            limiter: MemoryLimiter::new(limits.memory),
            log: LogBuffer::new(limits.log_bytes),
            progress: ProgressGate {
                sink: progress,
                last_sent: None,
                latest: None,
            },
            stdout,
            stderr,
            cancel,
            deadline,
            ticks: 0,
            last_tick: 0,
            interrupted: None,
            plugin: plugin.to_owned(),
            http: GuestHttp::new(http.clone(), granted.clone(), plugin),
            http_ctx: WasiHttpCtx::new(),
            granted,
            config_refusals: 0,
        }
    }

    /// The guest's own name for its plugin (from `describe`).
    pub(super) fn plugin(&self) -> &str {
        &self.plugin
    }

    pub(super) fn granted(&self) -> Option<&RunGrants> {
        self.granted.as_deref()
    }

    pub(super) fn finish(self) -> SandboxReport {
        let (stdout, stdout_bytes) = self.stdout.finish();
        let (stderr, stderr_bytes) = self.stderr.finish();
        SandboxReport {
            log: PhaseLog {
                entries: self.log.entries,
                dropped_entries: self.log.dropped,
                log_bytes: self.log.total_bytes,
                stdout,
                stdout_bytes,
                stderr,
                stderr_bytes,
            },
            peak_memory: self.limiter.peak as u64,
            memory_exhausted: self.limiter.exhausted,
            ticks: self.ticks,
            interrupted: self.interrupted,
            last_progress: self.progress.latest,
            http: self.http.usage,
        }
    }
}

impl WasiView for PhaseState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for PhaseState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http_ctx,
            table: &mut self.table,
            hooks: &mut self.http,
        }
    }
}

impl host::Host for PhaseState {
    fn log(&mut self, level: host::Level, message: String) {
        let level = LogLevel::from(level);
        let plugin = &self.plugin;
        match level {
            LogLevel::Trace => tracing::trace!(target: GUEST_LOG_TARGET, plugin, "{message}"),
            LogLevel::Debug => tracing::debug!(target: GUEST_LOG_TARGET, plugin, "{message}"),
            LogLevel::Info => tracing::info!(target: GUEST_LOG_TARGET, plugin, "{message}"),
            LogLevel::Warn => tracing::warn!(target: GUEST_LOG_TARGET, plugin, "{message}"),
            LogLevel::Error => tracing::error!(target: GUEST_LOG_TARGET, plugin, "{message}"),
        }
        self.log.push(level, message);
    }

    fn progress(&mut self, percent: u8, note: String) {
        self.progress.report(Progress {
            percent: percent.min(100),
            note: cut(note, MAX_PROGRESS_NOTE),
        });
    }

    fn cancelled(&mut self) -> bool {
        self.cancel.is_cancelled()
    }
}

impl From<host::Level> for LogLevel {
    fn from(level: host::Level) -> Self {
        match level {
            host::Level::Trace => LogLevel::Trace,
            host::Level::Debug => LogLevel::Debug,
            host::Level::Info => LogLevel::Info,
            host::Level::Warn => LogLevel::Warn,
            host::Level::Error => LogLevel::Error,
        }
    }
}

/// The linker every plugin is instantiated with: WASI preview 2 (denied by
/// the context above), the `jobhost:plugin/host` imports, and
/// `wasi:config/store` and `wasi:http` (both answered from the run's
/// grants).
pub(super) fn linker(engine: &Engine) -> wasmtime::Result<Linker<PhaseState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
    Plugin::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)?;
    Ok(linker)
}

/// Caps the memory of a run, all its linear memories and tables together
/// (a component may have several of each), and records the peak. A refused
/// growth makes `memory.grow` return -1, as the spec allows; most guests
/// then trap.
pub(super) struct MemoryLimiter {
    limit: usize,
    /// Bytes of every memory and table of the run, now.
    used: usize,
    peak: usize,
    exhausted: bool,
}

impl MemoryLimiter {
    fn new(limit: u64) -> Self {
        MemoryLimiter {
            limit: usize::try_from(limit).unwrap_or(usize::MAX),
            used: 0,
            peak: 0,
            exhausted: false,
        }
    }

    /// Grows the run's total from `current` to `desired` bytes of one
    /// memory or table, if the total stays within the limit.
    fn grow(&mut self, current: usize, desired: usize) -> bool {
        let total = (self.used - current.min(self.used)).saturating_add(desired);
        if total > self.limit {
            self.exhausted = true;
            return false;
        }
        self.used = total;
        self.peak = self.peak.max(total);
        true
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(self.grow(current, desired))
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS
            && self.grow(current * TABLE_ELEMENT_BYTES, desired * TABLE_ELEMENT_BYTES))
    }
}

struct LogBuffer {
    entries: Vec<LogEntry>,
    limit: usize,
    kept_bytes: usize,
    total_bytes: u64,
    dropped: u64,
    started: Instant,
}

impl LogBuffer {
    fn new(limit: usize) -> Self {
        LogBuffer {
            entries: Vec::new(),
            limit,
            kept_bytes: 0,
            total_bytes: 0,
            dropped: 0,
            started: Instant::now(),
        }
    }

    fn push(&mut self, level: LogLevel, message: String) {
        self.total_bytes += message.len() as u64;
        let message = cut(message, MAX_LOG_LINE);
        if self.kept_bytes + message.len() > self.limit {
            self.dropped += 1;
            return;
        }
        self.kept_bytes += message.len();
        let at_ms = self.started.elapsed().as_millis() as u64;
        self.entries.push(LogEntry {
            level,
            message,
            at_ms,
        });
    }
}

struct ProgressGate {
    sink: Option<ProgressSink>,
    last_sent: Option<Instant>,
    latest: Option<Progress>,
}

impl ProgressGate {
    fn report(&mut self, progress: Progress) {
        let due = self
            .last_sent
            .is_none_or(|at| at.elapsed() >= PROGRESS_INTERVAL);
        if let Some(sink) = &self.sink
            && due
        {
            sink(progress.clone());
            self.last_sent = Some(Instant::now());
        }
        self.latest = Some(progress);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_keeps_lines_within_budget_and_counts_the_rest() {
        let mut log = LogBuffer::new(10);
        log.push(LogLevel::Info, "12345".into());
        log.push(LogLevel::Info, "123456".into());
        log.push(LogLevel::Warn, "1234".into());
        let kept: Vec<&str> = log.entries.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(kept, ["12345", "1234"]);
        assert_eq!((log.dropped, log.total_bytes), (1, 15));
    }

    #[test]
    fn progress_is_rate_limited_even_at_completion() {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink_seen = seen.clone();
        let mut gate = ProgressGate {
            sink: Some(std::sync::Arc::new(move |p: Progress| {
                sink_seen.lock().unwrap().push(p.percent)
            })),
            last_sent: None,
            latest: None,
        };
        for percent in [10, 20, 100, 100, 100] {
            gate.report(Progress {
                percent,
                note: String::new(),
            });
        }
        assert_eq!(*seen.lock().unwrap(), [10], "no bypass at 100%");
        assert_eq!(
            gate.latest.map(|p| p.percent),
            Some(100),
            "the latest is kept"
        );
    }

    /// The cap covers every memory and table of a run together.
    #[test]
    fn memory_cap_covers_all_memories_and_tables_together() {
        let mut limiter = MemoryLimiter::new(100 << 10);
        assert!(limiter.memory_growing(0, 60 << 10, None).unwrap());
        // A second memory of 60 KiB would fit alone, not beside the first.
        assert!(!limiter.memory_growing(0, 60 << 10, None).unwrap());
        assert!(limiter.exhausted);
        assert!(limiter.memory_growing(0, 30 << 10, None).unwrap());
        // 10 KiB are left: a table of 2,000 pointers (16 KiB) does not fit.
        assert!(!limiter.table_growing(0, 2_000, None).unwrap());
        assert!(limiter.table_growing(0, 1_000, None).unwrap());
        // Growing the first memory counts only what it adds.
        assert!(limiter.memory_growing(60 << 10, 61 << 10, None).unwrap());
        assert_eq!(limiter.peak, (91 << 10) + 8_000);
    }
}
