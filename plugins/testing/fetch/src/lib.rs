//! For `{"requests": [{"url", "method"?, "body"?}]}` sends each request in
//! turn and returns one entry per request: `{"status", "body"}` or
//! `{"error"}`.

use jobhost_plugin::{Context, Input, Phase, PhaseError, Value, export_phase, http, json};

struct Fetch;

impl Phase for Fetch {
    fn run(_ctx: &Context, input: &Input) -> Result<Value, PhaseError> {
        let payload: Value = input.payload()?;
        let mut results = Vec::new();
        for request in payload["requests"].as_array().into_iter().flatten() {
            let url = request["url"].as_str().unwrap_or_default();
            let method = request["method"].as_str().unwrap_or("GET");
            let body = match &request["body"] {
                Value::String(text) => text.clone().into_bytes(),
                Value::Null => Vec::new(),
                other => other.to_string().into_bytes(),
            };
            results.push(match http::send(method, url, &[], body) {
                Ok(response) => json!({
                    "status": response.status,
                    "body": String::from_utf8_lossy(&response.body),
                }),
                Err(PhaseError::Fail(message) | PhaseError::Retry(message)) => {
                    json!({ "error": message })
                }
            });
        }
        Ok(json!(results))
    }
}

export_phase!(Fetch);
