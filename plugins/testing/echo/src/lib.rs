//! Returns `{"payload", "previous", "job_id", "phase", "attempt", "config"}`:
//! the cheapest possible phase, for plumbing tests and benchmarks.

use jobhost_plugin::{Context, Input, Phase, PhaseError, Value, export_phase, json};

struct Echo;

impl Phase for Echo {
    fn run(ctx: &Context, input: &Input) -> Result<Value, PhaseError> {
        let payload: Value = input.payload()?;
        let config: Value = ctx.config()?;
        let previous: Vec<&str> = input
            .previous
            .iter()
            .map(|(name, _)| name.as_str())
            .collect();
        Ok(json!({
            "payload": payload,
            "previous": previous,
            "job_id": ctx.job_id,
            "phase": ctx.phase,
            "attempt": ctx.attempt,
            "config": config,
        }))
    }
}

export_phase!(Echo);
