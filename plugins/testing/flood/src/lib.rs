//! A hostile but legal plugin: floods the host through the contract itself.
//! Config `{"mode": "progress" | "log" | "fail" | "retry" | "resources",
//! "count": n, "bytes": n}`: `count` progress reports or log lines of
//! `bytes` each, one failure whose message is `bytes` long, or `count` WASI
//! pollables held and never dropped. Returns `{"sent": count}`.

use jobhost_plugin::{Context, Input, Level, Phase, PhaseError, Value, export_phase, json};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum Mode {
    Progress,
    Log,
    Fail,
    Retry,
    Resources,
}

#[derive(Deserialize)]
struct Config {
    mode: Mode,
    #[serde(default = "one")]
    count: u32,
    #[serde(default)]
    bytes: usize,
}

fn one() -> u32 {
    1
}

struct Flood;

impl Phase for Flood {
    fn run(ctx: &Context, _: &Input) -> Result<Value, PhaseError> {
        let config: Config = ctx.config()?;
        let text = "x".repeat(config.bytes);
        match config.mode {
            Mode::Progress => (0..config.count).for_each(|_| jobhost_plugin::progress(100, &text)),
            Mode::Log => (0..config.count).for_each(|_| jobhost_plugin::log(Level::Info, &text)),
            Mode::Fail => return Err(PhaseError::fail(text)),
            Mode::Retry => return Err(PhaseError::retry(text)),
            Mode::Resources => (0..config.count).for_each(|_| {
                std::mem::forget(wasip2::clocks::monotonic_clock::subscribe_duration(1))
            }),
        }
        Ok(json!({ "sent": config.count }))
    }
}

export_phase!(Flood);
