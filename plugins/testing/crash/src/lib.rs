//! Crashes: config `{"how": "panic"}` panics (Rust's panic becomes a trap),
//! `{"how": "unreachable"}` executes a wasm `unreachable` directly.

use jobhost_plugin::{Context, Input, Phase, PhaseError, Value, export_phase};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum How {
    Panic,
    Unreachable,
}

#[derive(Deserialize)]
struct Config {
    how: How,
}

struct Crash;

impl Phase for Crash {
    fn run(ctx: &Context, _: &Input) -> Result<Value, PhaseError> {
        let config: Config = ctx.config()?;
        match config.how {
            How::Panic => panic!("crash plugin panicked on purpose"),
            How::Unreachable => unreachable_instruction(),
        }
    }
}

export_phase!(Crash);

#[cfg(target_arch = "wasm32")]
fn unreachable_instruction() -> ! {
    core::arch::wasm32::unreachable()
}

/// Lets the workspace build natively for the other plugins' unit tests.
#[cfg(not(target_arch = "wasm32"))]
fn unreachable_instruction() -> ! {
    std::process::abort()
}
