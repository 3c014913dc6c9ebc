//! Pure CPU work with no host calls: `iterations` (config, default 10⁸)
//! steps of xorshift64. Returns `{"checksum": n}`. Used to measure the cost
//! of epoch interruption on compute-bound phases.

use jobhost_plugin::{Context, Input, Phase, PhaseError, Value, export_phase, json};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(default)]
struct Config {
    iterations: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            iterations: 100_000_000,
        }
    }
}

struct Busy;

impl Phase for Busy {
    fn run(ctx: &Context, _: &Input) -> Result<Value, PhaseError> {
        let config: Config = ctx.config()?;
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..config.iterations {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
        }
        Ok(json!({ "checksum": x }))
    }
}

export_phase!(Busy);
