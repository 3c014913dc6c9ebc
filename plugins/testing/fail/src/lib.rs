//! Always fails permanently, with the config's `message` if given.

use jobhost_plugin::{Context, Input, Phase, PhaseError, Value, export_phase};
use serde::Deserialize;

#[derive(Deserialize, Default)]
#[serde(default)]
struct Config {
    message: Option<String>,
}

struct Fail;

impl Phase for Fail {
    fn run(ctx: &Context, _: &Input) -> Result<Value, PhaseError> {
        let config: Config = ctx.config()?;
        Err(PhaseError::fail(
            config
                .message
                .unwrap_or_else(|| "this phase always fails".into()),
        ))
    }
}

export_phase!(Fail);
