//! Liveness and readiness.

use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use crate::metrics::{KeyLabels, PluginStatusLabels, StatusLabel};
use crate::model::JobStatus;
use serde_json::{Value, json};

use super::{ApiError, AppState};

/// Liveness: the process is up.
#[utoipa::path(get, path = "/healthz", operation_id = "healthz", tag = "operations", responses((status = 200, description = "`{\"status\": \"ok\"}`")))]
pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Prometheus metrics; job counts and queue depth are read at scrape time.
#[utoipa::path(get, path = "/metrics", operation_id = "metrics", tag = "operations",
    responses((status = 200, description = "OpenMetrics text", content_type = "application/openmetrics-text")))]
pub async fn metrics(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let metrics = &state.metrics;
    let counts = state.queue.counts().await?;
    for status in JobStatus::ALL {
        let count = counts
            .iter()
            .find(|(s, _)| *s == status)
            .map_or(0, |(_, n)| *n);
        metrics
            .jobs
            .get_or_create(&StatusLabel {
                status: status.as_str().into(),
            })
            .set(count as i64);
    }
    metrics
        .queue_depth
        .set(state.queue.due_count().await? as i64);
    metrics.running_jobs.set(state.queue.running().await as i64);
    let keys = state.queue.keys().await?;
    metrics.keys.set(keys.key_count as i64);
    metrics.key_jobs.clear();
    for load in keys.keys {
        for (status, count) in [("running", load.running), ("pending", load.pending)] {
            let labels = KeyLabels {
                key: load.key.clone(),
                status: status.into(),
            };
            metrics.key_jobs.get_or_create(&labels).set(count as i64);
        }
    }
    metrics.plugin_slots.clear();
    for load in state.queue.plugin_loads().await? {
        for (status, count) in [("running", load.running), ("waiting", load.waiting)] {
            let labels = PluginStatusLabels {
                plugin: load.plugin.clone(),
                status: status.into(),
            };
            metrics
                .plugin_slots
                .get_or_create(&labels)
                .set(count as i64);
        }
    }
    let backlog = state.queue.log_backlog().await?;
    metrics.log_backlog.set(backlog.events as i64);
    metrics.log_lag_ms.set(backlog.oldest_ms);
    let content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    Ok(([(header::CONTENT_TYPE, content_type)], metrics.encode()))
}

/// Readiness: storage answers and the server is not shutting down.
#[utoipa::path(get, path = "/readyz", operation_id = "readyz", tag = "operations",
    responses((status = 200, description = "Ready"), (status = 503, body = super::ErrorBody)))]
pub async fn readyz(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let last_event = state.queue.last_event_seq().await?;
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

/// The dashboard: one self-contained page (no external assets) that lists
/// plugins and jobs and follows them live over SSE. Its policy lets the
/// page run only its own inline script and style (by hash), talk only to
/// this server, and be framed by nobody.
#[utoipa::path(get, path = "/", operation_id = "dashboard", tag = "operations", responses((status = 200, description = "HTML", content_type = "text/html")))]
pub async fn dashboard() -> impl IntoResponse {
    (
        [
            (header::CONTENT_SECURITY_POLICY, dashboard_policy()),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        axum::response::Html(DASHBOARD),
    )
}

const DASHBOARD: &str = include_str!("dashboard.html");

fn dashboard_policy() -> &'static str {
    static POLICY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    POLICY.get_or_init(|| {
        format!(
            "default-src 'none'; script-src '{}'; style-src '{}'; connect-src 'self'; \
             img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            inline_hash(DASHBOARD, "<script>", "</script>"),
            inline_hash(DASHBOARD, "<style>", "</style>"),
        )
    })
}

/// `sha256-<base64>` of the text between `open` and `close` in `page`.
fn inline_hash(page: &str, open: &str, close: &str) -> String {
    use base64::Engine as _;
    use sha2::Digest as _;
    let start = page.find(open).expect("the dashboard has the tag") + open.len();
    let end = start + page[start..].find(close).expect("the tag is closed");
    let digest = sha2::Sha256::digest(&page.as_bytes()[start..end]);
    format!(
        "sha256-{}",
        base64::engine::general_purpose::STANDARD.encode(digest)
    )
}
