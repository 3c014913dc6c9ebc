//! `fetch-url`: downloads a text file over HTTP for the phases after it,
//! e.g. a CSV for `csv-parse`.
//!
//! Config `{"url": "https://…/sales.csv", "max_bytes": 1048576}` (the URL
//! may come from the payload's `url` instead; `max_bytes` defaults to
//! 1 MiB, at most 16 MiB). Output `{"csv": "<text>", "url", "bytes"}`. The
//! operator grants the URL's origin; without the grant the phase fails,
//! naming it. A 5xx or 429 answer, or a refused connection, is retried; a
//! body over the cap, other answers and text that is not UTF-8 fail.

use jobhost_plugin::{Context, Input, Phase, PhaseError, Value, export_phase, http, json};
use serde::Deserialize;

const DEFAULT_MAX_BYTES: usize = 1 << 20;
const MOST_BYTES: usize = 16 << 20;

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct Config {
    url: Option<String>,
    max_bytes: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Payload {
    url: Option<String>,
}

struct FetchUrl;

impl Phase for FetchUrl {
    fn run(ctx: &Context, input: &Input) -> Result<Value, PhaseError> {
        let config: Config = ctx.config()?;
        let payload: Payload = input.payload().unwrap_or_default();
        let url = config
            .url
            .or(payload.url)
            .ok_or_else(|| PhaseError::fail("give the URL as config `url` or payload `url`"))?;
        let cap = config.max_bytes.unwrap_or(DEFAULT_MAX_BYTES);
        if cap == 0 || cap > MOST_BYTES {
            return Err(PhaseError::fail(format!(
                "config max_bytes: must be between 1 and {MOST_BYTES}"
            )));
        }
        let response = http::get(&url)?;
        match response.status {
            200..=299 => {}
            429 | 500..=599 => {
                return Err(PhaseError::retry(format!(
                    "{url} answered {}",
                    response.status
                )));
            }
            status => return Err(PhaseError::fail(format!("{url} answered {status}"))),
        }
        if response.body.len() > cap {
            return Err(PhaseError::fail(format!(
                "{url}: {} bytes is more than max_bytes ({cap})",
                response.body.len()
            )));
        }
        let bytes = response.body.len();
        let text = String::from_utf8(response.body)
            .map_err(|_| PhaseError::fail(format!("{url}: the body is not UTF-8 text")))?;
        Ok(json!({"csv": text, "url": url, "bytes": bytes}))
    }
}

export_phase!(FetchUrl);
