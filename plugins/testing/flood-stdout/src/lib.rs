//! Writes `bytes` (config, default 64 MiB) to stdout and a little to
//! stderr, then returns `{"written": n}`.

use std::io::Write;

use jobhost_plugin::{Context, Input, Phase, PhaseError, Value, export_phase, json};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(default)]
struct Config {
    bytes: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config { bytes: 64 << 20 }
    }
}

struct FloodStdout;

impl Phase for FloodStdout {
    fn run(ctx: &Context, _: &Input) -> Result<Value, PhaseError> {
        let config: Config = ctx.config()?;
        let line = [b'x'; 1023];
        let mut stdout = std::io::stdout().lock();
        let mut written = 0u64;
        while written < config.bytes {
            stdout
                .write_all(&line)
                .and_then(|_| stdout.write_all(b"\n"))
                .map_err(|e| {
                    PhaseError::fail(format!("stdout refused a write after {written} bytes: {e}"))
                })?;
            written += 1024;
        }
        stdout
            .flush()
            .map_err(|e| PhaseError::fail(e.to_string()))?;
        eprintln!("flood-stdout wrote {written} bytes");
        Ok(json!({ "written": written }))
    }
}

export_phase!(FloodStdout);
