//! For `{"keys": [..]}` returns `{"values": {key: value}, "errors": {key:
//! message}, "all": [keys] or {"error": message}}`: what the host granted
//! this plugin, and how it refuses the rest. With `"hide_values": true` it
//! uses the values without showing them: `values` holds their lengths.

use jobhost_plugin::{Context, Input, Phase, PhaseError, Value, config, export_phase, json};

struct ReadConfig;

impl Phase for ReadConfig {
    fn run(_ctx: &Context, input: &Input) -> Result<Value, PhaseError> {
        let payload: Value = input.payload()?;
        let hide = payload["hide_values"] == json!(true);
        let (mut values, mut errors) = (json!({}), json!({}));
        for key in payload["keys"].as_array().into_iter().flatten() {
            let key = key.as_str().unwrap_or_default();
            match config::get(key) {
                Ok(value) if hide => values[key] = json!(value.len()),
                Ok(value) => values[key] = json!(value),
                Err(PhaseError::Fail(message) | PhaseError::Retry(message)) => {
                    errors[key] = json!(message)
                }
            }
        }
        let all = match config::get_all() {
            Ok(pairs) => json!(pairs.into_iter().map(|(key, _)| key).collect::<Vec<_>>()),
            Err(PhaseError::Fail(message) | PhaseError::Retry(message)) => {
                json!({ "error": message })
            }
        };
        Ok(json!({"values": values, "errors": errors, "all": all}))
    }
}

export_phase!(ReadConfig);
