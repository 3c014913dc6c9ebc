//! Engine configuration and the epoch ticker.
//!
//! The pooling allocator is sized from one setting,
//! [`RuntimeConfig::max_concurrent_runs`], so that a semaphore with that many
//! permits is enough to guarantee instantiation never fails for lack of slots.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use wasmtime::{Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::RuntimeConfig;

/// Core instances one plugin instance may need: the guest's own module plus
/// the small adapter/shim modules that component tooling adds.
const CORE_INSTANCES_PER_RUN: u32 = 16;
/// Linear memories and tables per plugin instance (the guest's own, plus shims).
const MEMORIES_PER_RUN: u32 = 2;
const TABLES_PER_RUN: u32 = 4;
/// Instance slots returned to the pool before their memory is decommitted
/// in one go.
const DECOMMIT_BATCH: usize = 16;
/// Bytes of each linear memory kept resident between runs where the kernel
/// has `PAGEMAP_SCAN` (Linux 6.7+): the pages a run dirtied, up to this
/// much, are reset with `memset`/`memcpy` instead of decommitted. Resetting
/// a whole MiB costs less than faulting 256 pages back in; the bound caps
/// the memory an idle slot keeps.
const SCANNED_KEEP_RESIDENT: usize = 1 << 20;
/// Without the scan, the first bytes of each memory and table are kept,
/// dirtied or not, and reset with `memset` every run: more than 64 KiB cost
/// more in `memset` than it saved (BENCHMARKS.md).
const KEEP_RESIDENT: usize = 64 << 10;
/// Wasm stack per run. Deep recursion traps with a stack overflow here.
const MAX_WASM_STACK: usize = 1 << 20;

pub(super) fn new_engine(config: &RuntimeConfig) -> wasmtime::Result<Engine> {
    let mut wasm = Config::new();
    wasm.wasm_component_model(true)
        .epoch_interruption(true)
        .max_wasm_stack(MAX_WASM_STACK)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pooling_config(config)));
    Engine::new(&wasm)
}

/// The pooling allocator's settings the runtime derives from `config`
/// (public so that a benchmark's raw-wasmtime baseline can compare like
/// with like).
pub fn pooling_config(config: &RuntimeConfig) -> PoolingAllocationConfig {
    let runs = config.max_concurrent_runs.max(1);
    let mut pool = PoolingAllocationConfig::new();
    pool.total_component_instances(runs)
        .total_core_instances(runs * CORE_INSTANCES_PER_RUN)
        .max_core_instances_per_component(CORE_INSTANCES_PER_RUN)
        .total_memories(runs * MEMORIES_PER_RUN)
        .max_memories_per_component(MEMORIES_PER_RUN)
        .total_tables(runs * TABLES_PER_RUN)
        .max_tables_per_component(TABLES_PER_RUN)
        .total_stacks(runs)
        .max_memory_size(
            usize::try_from(config.memory_limit.max(config.max_plugin_memory))
                .unwrap_or(usize::MAX),
        )
        // Returning slots to the pool costs a madvise each, and with it a TLB
        // shootdown across cores; batching them is much faster (figures in
        // BENCHMARKS.md, "Phase overhead").
        .decommit_batch_size(DECOMMIT_BATCH)
        // Pages a run dirtied are reset in place instead of decommitted, so
        // the next run does not fault them in again. Without the scan only
        // the first pages can be kept, and a Rust guest's hot pages are
        // elsewhere: the top of its stack, at 1 MiB, and its data and heap
        // above it. The scan's gain is in BENCHMARKS.md, "Phase overhead".
        .pagemap_scan(Enabled::Auto)
        .linear_memory_keep_resident(if PoolingAllocationConfig::is_pagemap_scan_available() {
            SCANNED_KEEP_RESIDENT
        } else {
            KEEP_RESIDENT
        })
        .table_keep_resident(KEEP_RESIDENT);
    pool
}

/// Advances the engine's epoch every `tick` on a background thread, until
/// dropped. Holds only a weak reference, so it never keeps an engine alive.
/// Counts its ticks apart from the epoch, which stops also bump
/// (`Runtime::interrupt_guests`): resource use counts ticks.
pub struct EpochTicker {
    stop: Arc<AtomicBool>,
    ticks: Arc<AtomicU64>,
}

impl EpochTicker {
    pub fn start(engine: &Engine, tick: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ticks = Arc::new(AtomicU64::new(0));
        let engine = engine.weak();
        let (stopped, counted) = (stop.clone(), ticks.clone());
        thread::Builder::new()
            .name("jobhost-epoch".into())
            .spawn(move || {
                while !stopped.load(Ordering::Relaxed) {
                    thread::sleep(tick);
                    match engine.upgrade() {
                        Some(engine) => {
                            counted.fetch_add(1, Ordering::Relaxed);
                            engine.increment_epoch();
                        }
                        None => break,
                    }
                }
            })
            .expect("spawning the epoch ticker thread");
        EpochTicker { stop, ticks }
    }

    /// The ticks so far.
    pub fn ticks(&self) -> Arc<AtomicU64> {
        self.ticks.clone()
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
