//! Fails with `retry` on attempts 1..=fail_times (config), then succeeds
//! with `{"attempt": n}`.

use jobhost_plugin::{Context, Input, Phase, PhaseError, Value, export_phase, json};
use serde::Deserialize;

#[derive(Deserialize)]
struct Config {
    fail_times: u32,
}

struct Flaky;

impl Phase for Flaky {
    fn run(ctx: &Context, _: &Input) -> Result<Value, PhaseError> {
        let config: Config = ctx.config()?;
        if ctx.attempt <= config.fail_times {
            return Err(PhaseError::retry(format!(
                "planned failure {} of {}",
                ctx.attempt, config.fail_times
            )));
        }
        Ok(json!({ "attempt": ctx.attempt }))
    }
}

export_phase!(Flaky);
