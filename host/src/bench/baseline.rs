//! Raw wasmtime, for benchmarks: the same component call with nothing of
//! jobhost around it (no limits, no captured output, no deadline callback,
//! plain WASI context), so that a benchmark can print jobhost's figures beside
//! it and the ratio is the host's overhead. Not used to run jobs.

use anyhow::Context as _;
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, Store, UpdateDeadline};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use jobhost::runtime::{EpochTicker, RuntimeConfig, pooling_config};

use self::bindings::exports::jobhost::plugin::phase;
use self::bindings::jobhost::plugin::host;
use self::bindings::wasi::config::store;
use self::bindings::{Plugin, PluginPre};

/// The contract's bindings, generated for the baseline alone: the
/// runtime's own are not public API.
mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "plugin",
        exports: { default: async },
    });
}

/// The pooling-allocator settings of a raw engine.
pub enum RawPooling {
    /// wasmtime's defaults.
    Defaults,
    /// The settings jobhost derives from this configuration.
    SameAs(Box<RuntimeConfig>),
}

pub struct RawWasmtime {
    engine: Engine,
    pre: PluginPre<RawState>,
    epoch_interruption: bool,
    _ticker: Option<EpochTicker>,
}

struct RawState {
    wasi: WasiCtx,
    table: ResourceTable,
}

impl WasiView for RawState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl host::Host for RawState {
    fn log(&mut self, _: host::Level, _: String) {}
    fn progress(&mut self, _: u8, _: String) {}
    fn cancelled(&mut self) -> bool {
        false
    }
}

impl store::Host for RawState {
    fn get(&mut self, _: String) -> Result<Option<String>, store::Error> {
        Ok(None)
    }
    fn get_all(&mut self) -> Result<Vec<(String, String)>, store::Error> {
        Ok(Vec::new())
    }
}

impl RawWasmtime {
    /// Compiles `wasm` on an engine with the pooling allocator and, when
    /// `epoch_interruption`, a 10 ms epoch ticker whose callback only yields.
    pub fn new(wasm: &[u8], epoch_interruption: bool, pool: RawPooling) -> anyhow::Result<Self> {
        let pool = match pool {
            RawPooling::Defaults => Default::default(),
            RawPooling::SameAs(config) => pooling_config(&config),
        };
        let mut config = Config::new();
        config
            .epoch_interruption(epoch_interruption)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config)?;
        let component = Component::new(&engine, wasm)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        Plugin::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)?;
        let pre = PluginPre::new(linker.instantiate_pre(&component)?)?;
        let ticker = epoch_interruption
            .then(|| EpochTicker::start(&engine, std::time::Duration::from_millis(10)));
        Ok(RawWasmtime {
            engine,
            pre,
            epoch_interruption,
            _ticker: ticker,
        })
    }

    /// Fresh store, instantiate, call `run`; the output or the guest's error.
    pub async fn call(&self, config: &str, payload: &str) -> anyhow::Result<String> {
        let state = RawState {
            wasi: WasiCtx::builder().build(),
            table: ResourceTable::new(),
        };
        let mut store = Store::new(&self.engine, state);
        if self.epoch_interruption {
            store.set_epoch_deadline(1);
            store.epoch_deadline_callback(|_| Ok(UpdateDeadline::Yield(1)));
        }
        let instance = self
            .pre
            .instantiate_async(&mut store)
            .await
            .map_err(anyhow::Error::from)?;
        let context = phase::Context {
            job_id: "bench".into(),
            phase: "bench".into(),
            attempt: 1,
            config: config.into(),
        };
        let input = phase::Input {
            payload: payload.into(),
            previous: Vec::new(),
        };
        let output = instance
            .jobhost_plugin_phase()
            .call_run(&mut store, &context, &input)
            .await
            .map_err(anyhow::Error::from)
            .context("raw call trapped")?;
        output.map_err(|e| anyhow::anyhow!("guest error: {e:?}"))
    }
}
