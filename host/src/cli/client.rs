//! The HTTP client behind `jobhost plugin|job|events`: one place that turns
//! transport and API failures into messages a person can act on.

use std::time::Duration;

use eventsource_stream::{Event as SseEvent, EventStreamError, Eventsource};
use futures::{Stream, StreamExt};
use reqwest::{Method, RequestBuilder, StatusCode};
use serde_json::Value;

use crate::model::Event;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach jobhost at {url}: is `jobhost serve` running there? (set --url or JOBHOST_URL)"
    )]
    Unreachable { url: String },
    #[error(
        "the server refused the request: {message} (pass a token with --token or JOBHOST_TOKEN)"
    )]
    Auth { message: String },
    #[error("{message} ({status}, {code})")]
    Api {
        status: StatusCode,
        code: String,
        message: String,
    },
    #[error("request to jobhost failed: {0}")]
    Transport(String),
}

#[derive(Clone)]
pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Client {
    pub fn new(base: &str, token: Option<String>) -> Self {
        crate::tls::init();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .user_agent(concat!("jobhost-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("building an HTTP client");
        Client {
            base: base.trim_end_matches('/').to_owned(),
            token,
            http,
        }
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let request = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    fn transport(&self, error: reqwest::Error) -> ClientError {
        if error.is_connect() {
            ClientError::Unreachable {
                url: self.base.clone(),
            }
        } else {
            ClientError::Transport(error.to_string())
        }
    }

    /// Sends the request; a JSON body on success (`Null` when empty), or the
    /// API's error turned into a [`ClientError`].
    pub async fn send(&self, request: RequestBuilder) -> Result<(StatusCode, Value), ClientError> {
        let response = request.send().await.map_err(|e| self.transport(e))?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(|e| self.transport(e))?;
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if status.is_success() {
            return Ok((status, body));
        }
        let message = body["error"]["message"]
            .as_str()
            .map_or_else(|| status.to_string(), str::to_owned);
        let code = body["error"]["code"].as_str().unwrap_or("error").to_owned();
        Err(match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => ClientError::Auth { message },
            _ => ClientError::Api {
                status,
                code,
                message,
            },
        })
    }

    pub async fn get(&self, path: &str) -> Result<Value, ClientError> {
        Ok(self.send(self.request(Method::GET, path)).await?.1)
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        Ok(self
            .send(self.request(Method::POST, path).json(body))
            .await?
            .1)
    }

    pub async fn delete(&self, path: &str) -> Result<Value, ClientError> {
        Ok(self.send(self.request(Method::DELETE, path)).await?.1)
    }

    pub async fn put_json(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        Ok(self
            .send(self.request(Method::PUT, path).json(body))
            .await?
            .1)
    }

    pub async fn put_bytes(
        &self,
        path: &str,
        bytes: Vec<u8>,
    ) -> Result<(StatusCode, Value), ClientError> {
        let request = self
            .request(Method::PUT, path)
            .header("content-type", "application/wasm")
            .body(bytes);
        self.send(request).await
    }

    /// Opens an SSE stream; yields `(id, type, event JSON)`.
    pub async fn events(
        &self,
        path: &str,
    ) -> Result<impl Stream<Item = Result<Event, ClientError>> + use<>, ClientError> {
        let response = self
            .request(Method::GET, path)
            .send()
            .await
            .map_err(|e| self.transport(e))?;
        if !response.status().is_success() {
            let status = response.status();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            let message = body["error"]["message"]
                .as_str()
                .map_or_else(|| status.to_string(), str::to_owned);
            return Err(ClientError::Api {
                status,
                code: "stream".into(),
                message,
            });
        }
        Ok(sse_events(response).map(|event| {
            let event: SseEvent = event.map_err(|e| ClientError::Transport(e.to_string()))?;
            serde_json::from_str(&event.data).map_err(|e| {
                ClientError::Transport(format!("unreadable `{}` event: {e}", event.event))
            })
        }))
    }
}

/// The SSE events of a response. The body goes to the parser a line at a
/// time: eventsource-stream copies the rest of its buffer after every line
/// it parses, which is quadratic in the size of a chunk, and jobhost sends
/// a busy stream's events many to a chunk.
pub fn sse_events(
    response: reqwest::Response,
) -> impl Stream<Item = Result<SseEvent, EventStreamError<reqwest::Error>>> + Send + Unpin + use<> {
    let lines = response.bytes_stream().flat_map(|chunk| {
        let lines: Vec<_> = match chunk {
            Ok(mut rest) => {
                let mut lines = Vec::new();
                while let Some(end) = rest.iter().position(|&byte| byte == b'\n') {
                    lines.push(Ok(rest.split_to(end + 1)));
                }
                if !rest.is_empty() {
                    lines.push(Ok(rest));
                }
                lines
            }
            Err(error) => vec![Err(error)],
        };
        futures::stream::iter(lines)
    });
    lines.eventsource()
}
