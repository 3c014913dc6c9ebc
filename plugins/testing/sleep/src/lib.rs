//! Sleeps `ms` (config, default 1000) in `steps` (default 10), reporting
//! progress after each step and returning early when cancelled. Output
//! `{"slept_ms": n}`.

use std::time::Duration;

use jobhost_plugin::{Context, Input, Phase, PhaseError, Value, export_phase, json};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(default)]
struct Config {
    ms: u64,
    steps: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            ms: 1000,
            steps: 10,
        }
    }
}

struct Sleep;

impl Phase for Sleep {
    fn run(ctx: &Context, _: &Input) -> Result<Value, PhaseError> {
        let config: Config = ctx.config()?;
        let steps = config.steps.max(1);
        let step = Duration::from_millis(config.ms / steps);
        for done in 1..=steps {
            if jobhost_plugin::cancelled() {
                return Err(PhaseError::retry("cancelled while sleeping"));
            }
            std::thread::sleep(step);
            jobhost_plugin::progress((done * 100 / steps) as u8, &format!("step {done}/{steps}"));
        }
        Ok(json!({ "slept_ms": config.ms }))
    }
}

export_phase!(Sleep);
