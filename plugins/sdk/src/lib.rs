//! The Rust SDK for jobhost phase plugins.
//!
//! It wraps the bindings that `wit-bindgen` generates from `wit/plugin.wit`
//! behind a tiny API: implement [`Phase`] for a type, then call
//! [`export_phase!`] on it. Name, version and description come from the
//! plugin's `Cargo.toml`.
//!
//! ```ignore
//! use jobhost_plugin::{export_phase, Context, Input, Phase, PhaseError, Value};
//!
//! struct Shout;
//!
//! impl Phase for Shout {
//!     fn run(_ctx: &Context, input: &Input) -> Result<Value, PhaseError> {
//!         let text: String = input.payload()?;
//!         Ok(Value::String(text.to_uppercase()))
//!     }
//! }
//!
//! export_phase!(Shout);
//! ```
//!
//! Build it with `cargo build --release --target wasm32-wasip2`; the
//! `.wasm` file under `target/wasm32-wasip2/release/` is the component to
//! upload.

use serde::de::DeserializeOwned;

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "plugin",
        pub_export_macro: true,
        export_macro_name: "__export_plugin",
        default_bindings_module: "jobhost_plugin::bindings",
        // `wasi:config/store` comes from another package: generate it here.
        generate_all,
    });
}

pub use bindings::exports::jobhost::plugin::phase::{
    Context, Error as PhaseError, Input, Metadata,
};
pub use bindings::jobhost::plugin::host::Level;
pub use serde_json::{Value, json};

/// A phase handler. The host calls [`Phase::run`] once per attempt, each
/// time in a fresh sandbox: nothing survives between runs.
pub trait Phase {
    /// Does the work. Return the output (any JSON value), or
    /// [`PhaseError::Retry`] for a transient failure the host should retry,
    /// or [`PhaseError::Fail`] to fail the job at once.
    fn run(ctx: &Context, input: &Input) -> Result<Value, PhaseError>;
}

impl PhaseError {
    /// A failure worth retrying later (a busy dependency, a timeout).
    pub fn retry(message: impl Into<String>) -> Self {
        PhaseError::Retry(message.into())
    }

    /// A permanent failure: bad input or configuration.
    pub fn fail(message: impl Into<String>) -> Self {
        PhaseError::Fail(message.into())
    }
}

impl Context {
    /// This phase's configuration, decoded. An invalid configuration is a
    /// permanent failure.
    pub fn config<T: DeserializeOwned>(&self) -> Result<T, PhaseError> {
        decode("config", &self.config)
    }
}

impl Input {
    /// The job's payload, decoded. An invalid payload is a permanent failure.
    pub fn payload<T: DeserializeOwned>(&self) -> Result<T, PhaseError> {
        decode("payload", &self.payload)
    }

    /// The output of the phase just before this one, decoded: what a phase in
    /// a pipeline usually works on.
    pub fn previous_output<T: DeserializeOwned>(&self) -> Result<T, PhaseError> {
        let (name, output) = self
            .previous
            .last()
            .ok_or_else(|| PhaseError::fail("this phase needs an earlier phase's output"))?;
        decode(&format!("output of phase `{name}`"), output)
    }

    /// The output of the earlier phase called `phase`, decoded.
    pub fn output_of<T: DeserializeOwned>(&self, phase: &str) -> Result<T, PhaseError> {
        let (_, output) = self
            .previous
            .iter()
            .find(|(name, _)| name == phase)
            .ok_or_else(|| PhaseError::fail(format!("no earlier phase is named `{phase}`")))?;
        decode(&format!("output of phase `{phase}`"), output)
    }
}

fn decode<T: DeserializeOwned>(what: &str, json: &str) -> Result<T, PhaseError> {
    serde_json::from_str(json).map_err(|e| PhaseError::fail(format!("invalid {what}: {e}")))
}

/// Appends a line to this run's log (bounded by the host).
pub fn log(level: Level, message: &str) {
    bindings::jobhost::plugin::host::log(level, message);
}

/// Reports progress, 0 to 100, with a short note. Cheap: the host
/// rate-limits what watchers see.
pub fn progress(percent: u8, note: &str) {
    bindings::jobhost::plugin::host::progress(percent, note);
}

/// True once the host asks this run to stop. Poll it in long loops.
pub fn cancelled() -> bool {
    bindings::jobhost::plugin::host::cancelled()
}

/// Configuration values and secrets the operator granted this plugin, read
/// through the standard `wasi:config/store` interface. The host answers
/// only the keys granted to this plugin version; any other key is an error
/// that names the grant to ask for.
pub mod config {
    use crate::PhaseError;
    use crate::bindings::wasi::config::store;

    /// The value granted under `key` (a plain value or a secret). A key
    /// that was not granted fails the phase permanently: retrying would not
    /// help until an operator grants it.
    pub fn get(key: &str) -> Result<String, PhaseError> {
        match store::get(key) {
            Ok(Some(value)) => Ok(value),
            Ok(None) => Err(PhaseError::fail(format!("config key `{key}` is not set"))),
            Err(error) => Err(PhaseError::fail(message(error))),
        }
    }

    /// Every granted key with its value.
    pub fn get_all() -> Result<Vec<(String, String)>, PhaseError> {
        store::get_all().map_err(|error| PhaseError::fail(message(error)))
    }

    fn message(error: store::Error) -> String {
        match error {
            store::Error::Upstream(message) | store::Error::Io(message) => message,
        }
    }
}

/// HTTP requests to the origins the operator granted this plugin
/// (`wasi:http`, through the `wstd` crate), blocking: a phase is a plain
/// function. A request to an origin that was not granted fails the phase
/// permanently, naming the grant; a network failure is worth a retry.
///
/// ```ignore
/// let rates: Value = jobhost_plugin::http::get("https://api.example.com/rates")?.json()?;
/// ```
pub mod http {
    use serde::de::DeserializeOwned;
    use wstd::http::{Body, Client, Request};

    use crate::{PhaseError, Value};

    /// A response, read to the end.
    #[derive(Debug, Clone)]
    pub struct Response {
        pub status: u16,
        pub headers: Vec<(String, String)>,
        pub body: Vec<u8>,
    }

    impl Response {
        /// The body as UTF-8 text.
        pub fn text(&self) -> Result<&str, PhaseError> {
            std::str::from_utf8(&self.body)
                .map_err(|e| PhaseError::fail(format!("the response is not UTF-8: {e}")))
        }

        /// The body decoded from JSON.
        pub fn json<T: DeserializeOwned>(&self) -> Result<T, PhaseError> {
            serde_json::from_slice(&self.body).map_err(|e| {
                PhaseError::fail(format!("the response is not the JSON expected: {e}"))
            })
        }
    }

    pub fn get(url: &str) -> Result<Response, PhaseError> {
        send("GET", url, &[], Vec::new())
    }

    /// POSTs `body` as JSON.
    pub fn post_json(url: &str, body: &Value) -> Result<Response, PhaseError> {
        let headers = [("content-type", "application/json")];
        send("POST", url, &headers, body.to_string().into_bytes())
    }

    /// Sends any request and reads the whole response.
    pub fn send(
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Result<Response, PhaseError> {
        let mut request = Request::builder().method(method).uri(url);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request
            .body(Body::from(body))
            .map_err(|e| PhaseError::fail(format!("invalid request to {url}: {e}")))?;
        wstd::runtime::block_on(async {
            let response = Client::new()
                .send(request)
                .await
                .map_err(|e| failed(url, e))?;
            let status = response.status().as_u16();
            let headers = response
                .headers()
                .iter()
                .map(|(name, value)| {
                    let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
                    (name.as_str().to_owned(), value)
                })
                .collect();
            let mut body = response.into_body();
            let body = body.contents().await.map_err(|e| failed(url, e))?.to_vec();
            Ok(Response {
                status,
                headers,
                body,
            })
        })
    }

    /// A refusal by the host is permanent; anything else may pass.
    fn failed(url: &str, error: wstd::http::Error) -> PhaseError {
        let message = format!("request to {url} failed: {error:#}");
        if message.contains("jobhost refused the request") {
            PhaseError::fail(message)
        } else {
            PhaseError::retry(message)
        }
    }
}

/// Serializes a phase's output. Plugin outputs are JSON values, so this
/// cannot fail for them; it is public for the export macro only.
#[doc(hidden)]
pub fn __encode_output(value: Result<Value, PhaseError>) -> Result<String, PhaseError> {
    value.map(|v| v.to_string())
}

/// Exports a [`Phase`] implementation as this component's `phase` interface,
/// with metadata from the crate's `Cargo.toml` (name, version, description).
#[macro_export]
macro_rules! export_phase {
    ($phase:ident) => {
        impl $crate::bindings::exports::jobhost::plugin::phase::Guest for $phase {
            fn describe() -> $crate::Metadata {
                $crate::Metadata {
                    name: env!("CARGO_PKG_NAME").into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    description: env!("CARGO_PKG_DESCRIPTION").into(),
                }
            }

            fn run(
                ctx: $crate::Context,
                input: $crate::Input,
            ) -> Result<String, $crate::PhaseError> {
                $crate::__encode_output(<$phase as $crate::Phase>::run(&ctx, &input))
            }
        }

        $crate::bindings::__export_plugin!($phase with_types_in $crate::bindings);
    };
}
