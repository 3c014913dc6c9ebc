//! The HTTP API (axum): plugins, jobs, SSE, health. [`router`] builds it
//! from an [`AppState`]; `crate::app` serves it.

mod auth;
mod error;
mod events;
mod health;
mod jobs;
mod plugins;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRequest};
use axum::routing::{get, post, put};
use tokio_util::sync::CancellationToken;

pub use error::ApiError;

use crate::metrics::Metrics;
use crate::plugins::PluginRegistry;
use crate::queue::Queue;
use crate::storage::Storage;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub queue: Arc<Queue>,
    pub plugins: Arc<PluginRegistry>,
    pub storage: Arc<Storage>,
    pub tokens: Arc<Vec<String>>,
    /// Cancelled when the server shuts down: SSE streams end cleanly.
    pub shutdown: CancellationToken,
    pub max_body_bytes: usize,
    pub max_plugin_bytes: usize,
    pub metrics: Arc<Metrics>,
}

/// `Json` whose rejections become [`ApiError`]s with our error body.
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct AppJson<T>(pub T);

impl<T: serde::Serialize> axum::response::IntoResponse for AppJson<T> {
    fn into_response(self) -> axum::response::Response {
        axum::Json(self.0).into_response()
    }
}

pub fn router(state: AppState) -> Router {
    let plugin_upload = Router::new()
        .route(
            "/plugins/{name}/versions/{version}",
            put(plugins::upload).delete(plugins::delete_version),
        )
        .layer(DefaultBodyLimit::max(state.max_plugin_bytes));
    let api = Router::new()
        .route("/plugins", get(plugins::list))
        .route("/plugins/{name}", get(plugins::show))
        .route("/plugins/{name}/active", put(plugins::activate))
        .route("/jobs", post(jobs::create).get(jobs::list))
        .route("/jobs/{id}", get(jobs::show).delete(jobs::delete))
        .route("/jobs/{id}/cancel", post(jobs::cancel))
        .route("/jobs/{id}/retry", post(jobs::retry))
        .route("/jobs/{id}/events", get(events::job_stream))
        .route("/events", get(events::stream))
        .layer(DefaultBodyLimit::max(state.max_body_bytes));
    Router::new()
        .merge(plugin_upload)
        .merge(api)
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ))
        .fallback(|| async { ApiError::not_found("no such route") })
        .with_state(state)
}
