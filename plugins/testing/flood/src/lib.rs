//! A hostile but legal plugin: floods the host through the contract itself.
//! Config `{"mode": "progress" | "log" | "fail" | "retry", "count": n,
//! "bytes": n}`: `count` progress reports or log lines of `bytes` each, or
//! one failure whose message is `bytes` long. Returns `{"sent": count}`.

use jobhost_plugin::{Context, Input, Level, Phase, PhaseError, Value, export_phase, json};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum Mode {
    Progress,
    Log,
    Fail,
    Retry,
}

#[derive(Deserialize)]
struct Config {
    mode: Mode,
    #[serde(default = "one")]
    count: u32,
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
        }
        Ok(json!({ "sent": config.count }))
    }
}

export_phase!(Flood);
