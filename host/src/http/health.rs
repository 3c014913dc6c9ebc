//! Liveness and readiness.

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use super::{ApiError, AppState};

/// The process is up.
pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// The process can serve: storage answers and the queue is accepting work.
pub async fn readyz(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let last_event = state.storage.last_event_seq().await?;
    if state.shutdown.is_cancelled() {
        return Err(ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the server is shutting down",
        ));
    }
    Ok(Json(
        json!({"status": "ready", "last_event": last_event, "paused": state.queue.is_paused()}),
    ))
}
