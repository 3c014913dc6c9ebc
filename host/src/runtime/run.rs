//! Running one phase: the request ([`PhaseRun`]), the result
//! ([`PhaseResult`]) and the run itself, with its epoch deadline callback.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use wasmtime::{Store, Trap, UpdateDeadline};

use super::Runtime;
use super::bindings::phase;
use super::grants::RunGrants;
use super::plugin::LoadedPlugin;
use super::sandbox::{Interruption, PhaseState, SandboxLimits, SandboxReport};
use crate::model::{Json, Progress, ResourceUsage};

/// Receives a run's progress updates (already rate-limited).
pub type ProgressSink = Arc<dyn Fn(Progress) + Send + Sync>;

/// One phase run: what to run it on, and how it may be stopped.
#[derive(Clone)]
pub struct PhaseRun {
    pub job_id: String,
    pub phase: String,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// The phase's config, JSON text.
    pub config: String,
    /// The job's payload, JSON text.
    pub payload: String,
    /// (phase name, output JSON text) of the phases before this one.
    pub previous: Vec<(String, String)>,
    pub timeout: Duration,
    /// Cancelling it asks the guest to stop (`cancelled()` turns true) and
    /// stops it by force at the next epoch tick.
    pub cancel: CancellationToken,
    pub progress: Option<ProgressSink>,
    /// What `wasi:config/store` answers; `None` refuses every read.
    pub granted: Option<Arc<RunGrants>>,
    /// This run's memory cap, in bytes, if not the runtime's (at most
    /// [`RuntimeConfig::max_plugin_memory`](super::RuntimeConfig)).
    pub memory_limit: Option<u64>,
}

impl PhaseRun {
    /// A first attempt of a phase called `main` in a job called `local`,
    /// with an empty config and a 60 s timeout.
    pub fn new(payload: impl Into<String>) -> Self {
        PhaseRun {
            job_id: "local".into(),
            phase: "main".into(),
            attempt: 1,
            config: "{}".into(),
            payload: payload.into(),
            previous: Vec::new(),
            timeout: Duration::from_secs(60),
            cancel: CancellationToken::new(),
            progress: None,
            granted: None,
            memory_limit: None,
        }
    }
}

/// Why a run produced no output.
#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "kind", content = "message", rename_all = "snake_case")]
pub enum PhaseFailure {
    /// The guest returned `error::retry`.
    #[error("phase failed and asked to be retried: {0}")]
    Retry(String),
    /// The guest returned `error::fail`.
    #[error("phase failed: {0}")]
    Fail(String),
    /// The run's cancellation token fired.
    #[error("phase was cancelled")]
    Cancelled,
    /// The run exceeded its timeout.
    #[error("phase timed out after {} ms", .0.as_millis())]
    TimedOut(#[serde(with = "millis")] Duration),
    /// The guest needed more linear memory than the limit.
    #[error("phase exceeded its memory limit of {0} bytes")]
    MemoryExhausted(u64),
    /// The guest recursed past the wasm stack limit.
    #[error("phase overflowed its stack")]
    StackOverflow,
    /// The guest panicked (Rust guests print the panic before trapping).
    #[error("phase panicked: {0}")]
    Panicked(String),
    /// Any other trap.
    #[error("phase trapped: {0}")]
    Trapped(String),
    /// The payload, config or an earlier output is not JSON.
    #[error("invalid phase input: {0}")]
    InvalidInput(String),
    /// The guest returned something that is not JSON, or too large.
    #[error("phase returned an invalid output: {0}")]
    InvalidOutput(String),
}

impl PhaseFailure {
    /// A short machine-readable name of the failure, e.g. `timed_out`.
    pub fn kind(&self) -> &'static str {
        match self {
            PhaseFailure::Retry(_) => "retry",
            PhaseFailure::Fail(_) => "fail",
            PhaseFailure::Cancelled => "cancelled",
            PhaseFailure::TimedOut(_) => "timed_out",
            PhaseFailure::MemoryExhausted(_) => "memory_exhausted",
            PhaseFailure::StackOverflow => "stack_overflow",
            PhaseFailure::Panicked(_) => "panicked",
            PhaseFailure::Trapped(_) => "trapped",
            PhaseFailure::InvalidInput(_) => "invalid_input",
            PhaseFailure::InvalidOutput(_) => "invalid_output",
        }
    }

    /// The failure with its text cut to `max` bytes (with a marker): a
    /// guest's message, a panic or a trap's backtrace can be any size.
    fn bounded(self, max: usize) -> Self {
        let cut = |text| super::guest_text::cut(text, max);
        match self {
            PhaseFailure::Retry(text) => PhaseFailure::Retry(cut(text)),
            PhaseFailure::Fail(text) => PhaseFailure::Fail(cut(text)),
            PhaseFailure::Panicked(text) => PhaseFailure::Panicked(cut(text)),
            PhaseFailure::Trapped(text) => PhaseFailure::Trapped(cut(text)),
            PhaseFailure::InvalidInput(text) => PhaseFailure::InvalidInput(cut(text)),
            PhaseFailure::InvalidOutput(text) => PhaseFailure::InvalidOutput(cut(text)),
            other @ (PhaseFailure::Cancelled
            | PhaseFailure::TimedOut(_)
            | PhaseFailure::MemoryExhausted(_)
            | PhaseFailure::StackOverflow) => other,
        }
    }

    /// Whether trying again may succeed: the guest said so, or it ran out
    /// of time. Cancellation is the caller's call (shutdown retries, a user's
    /// cancel does not).
    pub fn is_retryable(&self) -> bool {
        matches!(self, PhaseFailure::Retry(_) | PhaseFailure::TimedOut(_))
    }
}

mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    pub level: LogLevel,
    pub message: String,
    /// Milliseconds since the run started.
    pub at_ms: u64,
}

/// What a run said: its `log()` lines and its captured stdout and stderr,
/// each bounded; totals count what the guest wrote, kept or not.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseLog {
    pub entries: Vec<LogEntry>,
    pub dropped_entries: u64,
    pub log_bytes: u64,
    pub stdout: String,
    pub stdout_bytes: u64,
    pub stderr: String,
    pub stderr_bytes: u64,
}

/// The outcome of a run, with its log and resource use.
#[derive(Debug, Clone)]
pub struct PhaseResult {
    /// The output JSON, checked, or why there is none.
    pub outcome: Result<Json, PhaseFailure>,
    pub log: PhaseLog,
    pub usage: ResourceUsage,
    pub last_progress: Option<Progress>,
}

impl PhaseResult {
    /// The result of a run refused before its guest started.
    fn not_run(failure: PhaseFailure, started: Instant) -> Self {
        PhaseResult {
            outcome: Err(failure),
            log: PhaseLog::default(),
            usage: ResourceUsage {
                wall_ms: elapsed_ms(started),
                ..ResourceUsage::default()
            },
            last_progress: None,
        }
    }
}

/// Largest output a phase may return; later phases receive it as input.
const MAX_OUTPUT_BYTES: usize = 4 << 20;

impl Runtime {
    /// Runs one phase of `plugin` in a fresh sandbox. Never fails as a call:
    /// every problem, including guest traps, becomes a [`PhaseFailure`].
    pub async fn run(&self, plugin: &LoadedPlugin, run: PhaseRun) -> PhaseResult {
        let started = Instant::now();
        if let Err(failure) = validate_input(&run) {
            return PhaseResult::not_run(failure, started);
        }
        let _slot = tokio::select! {
            biased;
            () = run.cancel.cancelled() => return PhaseResult::not_run(PhaseFailure::Cancelled, started),
            slot = self.slots.acquire() => slot.expect("instance slots are never closed"),
        };
        let limits = SandboxLimits {
            memory: run.memory_limit.map_or(self.config.memory_limit, |limit| {
                limit.min(self.config.max_plugin_memory.max(self.config.memory_limit))
            }),
            log_bytes: self.config.max_log_bytes,
            captured_output: self.config.max_captured_output,
        };
        let deadline = Instant::now() + run.timeout;
        let state = PhaseState::new(
            &plugin.metadata.name,
            &limits,
            run.cancel.clone(),
            deadline,
            run.progress.clone(),
            run.granted.clone(),
            &self.http,
        );
        let mut store = sandboxed_store(self, state);
        let context = phase::Context {
            job_id: run.job_id,
            phase: run.phase,
            attempt: run.attempt,
            config: run.config,
        };
        let input = phase::Input {
            payload: run.payload,
            previous: run.previous,
        };

        let call = async {
            let instance = plugin.pre.instantiate_async(&mut store).await?;
            instance
                .jobhost_plugin_phase()
                .call_run(&mut store, &context, &input)
                .await
        };
        // The epoch callback stops guest code; this also stops a guest that
        // is parked in an async host call, where no epoch check happens.
        let returned = tokio::select! {
            biased;
            returned = call => Some(returned),
            () = run.cancel.cancelled() => None,
            () = tokio::time::sleep_until(deadline.into()) => None,
        };
        let mut state = store.into_data();
        if returned.is_none() && state.interrupted.is_none() {
            state.interrupted = Some(if run.cancel.is_cancelled() {
                Interruption::Cancelled
            } else {
                Interruption::TimedOut
            });
        }
        let report = state.finish();
        let outcome = match returned {
            Some(Ok(Ok(output))) => check_output(output),
            Some(Ok(Err(phase::Error::Retry(message)))) => Err(PhaseFailure::Retry(message)),
            Some(Ok(Err(phase::Error::Fail(message)))) => Err(PhaseFailure::Fail(message)),
            Some(Err(error)) => Err(classify_trap(&error, &report, &limits, run.timeout)),
            None => Err(interruption_failure(report.interrupted, run.timeout)),
        }
        .map_err(|failure| failure.bounded(self.config.max_error_bytes));
        let usage = ResourceUsage {
            wall_ms: elapsed_ms(started),
            epoch_ticks: report.ticks,
            peak_memory_bytes: report.peak_memory,
            output_bytes: outcome.as_ref().map_or(0, |o| o.as_str().len() as u64),
            log_bytes: report.log.log_bytes + report.log.stdout_bytes + report.log.stderr_bytes,
            http_requests: report.http.requests.load(Ordering::Relaxed),
            http_bytes_out: report.http.bytes_out.load(Ordering::Relaxed),
            http_bytes_in: report.http.bytes_in.load(Ordering::Relaxed),
            http_wait_ms: report.http.wait_ms.load(Ordering::Relaxed),
        };
        PhaseResult {
            outcome,
            log: report.log,
            usage,
            last_progress: report.last_progress,
        }
    }
}

/// A store for one run: memory cap, and an epoch deadline one tick away
/// whose callback counts ticks, interrupts a cancelled or overdue guest,
/// and otherwise yields so that a busy guest never starves other tasks.
pub(super) fn sandboxed_store(runtime: &Runtime, state: PhaseState) -> Store<PhaseState> {
    let mut store = Store::new(&runtime.engine, state);
    store.limiter(|state| &mut state.limiter);
    store.set_epoch_deadline(1);
    let ticker = runtime.ticker.ticks();
    store.epoch_deadline_callback(move |mut ctx| {
        let state = ctx.data_mut();
        let tick = ticker.load(std::sync::atomic::Ordering::Relaxed);
        if tick != state.last_tick {
            state.ticks += 1;
            state.last_tick = tick;
        }
        if state.cancel.is_cancelled() {
            state.interrupted = Some(Interruption::Cancelled);
            return Ok(UpdateDeadline::Interrupt);
        }
        if Instant::now() >= state.deadline {
            state.interrupted = Some(Interruption::TimedOut);
            return Ok(UpdateDeadline::Interrupt);
        }
        Ok(UpdateDeadline::Yield(1))
    });
    store
}

fn validate_input(run: &PhaseRun) -> Result<(), PhaseFailure> {
    let is_json = |text: &str| serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok();
    if !is_json(&run.payload) {
        return Err(PhaseFailure::InvalidInput(
            "the payload is not valid JSON".into(),
        ));
    }
    if !is_json(&run.config) {
        return Err(PhaseFailure::InvalidInput(
            "the phase config is not valid JSON".into(),
        ));
    }
    if let Some((name, _)) = run.previous.iter().find(|(_, output)| !is_json(output)) {
        return Err(PhaseFailure::InvalidInput(format!(
            "the output of phase `{name}` is not valid JSON"
        )));
    }
    Ok(())
}

fn check_output(output: String) -> Result<Json, PhaseFailure> {
    if output.len() > MAX_OUTPUT_BYTES {
        return Err(PhaseFailure::InvalidOutput(format!(
            "{} bytes is more than the limit of {MAX_OUTPUT_BYTES}",
            output.len()
        )));
    }
    Json::parse(output).map_err(|e| PhaseFailure::InvalidOutput(format!("not JSON: {e}")))
}

fn interruption_failure(interrupted: Option<Interruption>, timeout: Duration) -> PhaseFailure {
    match interrupted {
        Some(Interruption::TimedOut) => PhaseFailure::TimedOut(timeout),
        _ => PhaseFailure::Cancelled,
    }
}

/// Turns a trap (or instantiation error) into a failure a user understands.
fn classify_trap(
    error: &wasmtime::Error,
    report: &SandboxReport,
    limits: &SandboxLimits,
    timeout: Duration,
) -> PhaseFailure {
    let trap = error.downcast_ref::<Trap>();
    if trap == Some(&Trap::Interrupt) || report.interrupted.is_some() {
        return interruption_failure(report.interrupted, timeout);
    }
    if trap == Some(&Trap::StackOverflow) || is_shadow_stack_overflow(error) {
        return PhaseFailure::StackOverflow;
    }
    if report.memory_exhausted {
        return PhaseFailure::MemoryExhausted(limits.memory);
    }
    if let Some(panic) = panic_message(&report.log.stderr) {
        return PhaseFailure::Panicked(panic);
    }
    PhaseFailure::Trapped(format!("{error:#}"))
}

/// LLVM-compiled guests (Rust, C, …) keep a shadow stack in linear memory
/// that grows down from a fixed size; overflowing it wraps the stack pointer
/// below zero, and the next access faults just under 4 GiB. wasmtime only
/// exposes the fault address in the error's text.
fn is_shadow_stack_overflow(error: &wasmtime::Error) -> bool {
    const WRAPPED_BELOW_ZERO: u64 = 0xffff_0000;
    let text = format!("{error:#}");
    text.split("memory fault at wasm address 0x")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_hexdigit()).next())
        .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        .is_some_and(|address| (WRAPPED_BELOW_ZERO..=u32::MAX as u64).contains(&address))
}

/// The message of a Rust panic, as the guest's standard library printed it
/// to stderr: "thread '…' panicked at src/lib.rs:1:2:\n<message>".
fn panic_message(stderr: &str) -> Option<String> {
    let start = stderr.find("panicked at ")?;
    let rest = &stderr[start + "panicked at ".len()..];
    let (location, message) = rest.split_once(":\n").unwrap_or((rest, ""));
    let message = message.lines().next().unwrap_or("").trim();
    Some(format!("{message} (at {location})"))
}

fn elapsed_ms(since: Instant) -> u64 {
    since.elapsed().as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_rust_panic_from_stderr() {
        let stderr = "\nthread '<unnamed>' panicked at src/lib.rs:30:25:\nboom went the plugin\nnote: run with `RUST_BACKTRACE=1`\n";
        assert_eq!(
            panic_message(stderr).unwrap(),
            "boom went the plugin (at src/lib.rs:30:25)"
        );
        assert_eq!(panic_message("just some output"), None);
    }

    #[test]
    fn output_must_be_bounded_json() {
        assert!(check_output("{\"a\": 1}".into()).is_ok());
        assert!(matches!(
            check_output("not json".into()),
            Err(PhaseFailure::InvalidOutput(_))
        ));
        let huge = format!("\"{}\"", "x".repeat(MAX_OUTPUT_BYTES));
        assert!(matches!(
            check_output(huge),
            Err(PhaseFailure::InvalidOutput(_))
        ));
    }

    #[test]
    fn failure_texts_are_bounded() {
        let huge = "m".repeat(40 << 20);
        let PhaseFailure::Fail(text) = PhaseFailure::Fail(huge).bounded(4096) else {
            unreachable!()
        };
        assert!(text.len() < 4096 + 64);
        assert!(
            text.ends_with("… [truncated 41938944 bytes]"),
            "{}",
            &text[4000..]
        );
    }

    #[test]
    fn only_guest_retries_and_timeouts_are_retryable() {
        assert!(PhaseFailure::Retry("busy".into()).is_retryable());
        assert!(PhaseFailure::TimedOut(Duration::from_secs(1)).is_retryable());
        assert!(!PhaseFailure::Fail("bad".into()).is_retryable());
        assert!(!PhaseFailure::Cancelled.is_retryable());
        assert!(!PhaseFailure::StackOverflow.is_retryable());
    }
}
