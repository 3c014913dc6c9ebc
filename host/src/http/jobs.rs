//! Job routes: submit, list, show, cancel, retry, delete.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::json;

use super::{ApiError, AppJson, AppState};
use crate::queue::{Cancelled, JobSpec, JobStatus};
use crate::storage::JobFilter;

/// Jobs per page unless `limit` says otherwise.
const DEFAULT_PAGE: usize = 50;

/// `POST /jobs`: 201 with the job; 200 with the earlier job when the
/// idempotency key was seen before.
pub async fn create(
    State(state): State<AppState>,
    AppJson(spec): AppJson<JobSpec>,
) -> Result<impl IntoResponse, ApiError> {
    let enqueued = state.queue.enqueue(spec).await?;
    let status = if enqueued.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, AppJson(enqueued.job)))
}

pub async fn show(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(AppJson(state.queue.job(&id).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    status: Option<String>,
    plugin: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

/// `GET /jobs?status=&plugin=&limit=&cursor=`: newest first.
pub async fn list(
    State(state): State<AppState>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Query(query) = query?;
    let status = match query.status.as_deref() {
        None | Some("") => None,
        Some(text) => Some(JobStatus::parse(text).ok_or_else(|| {
            ApiError::bad_request(format!(
                "unknown status `{text}`: use pending, running, completed, failed or cancelled"
            ))
        })?),
    };
    let filter = JobFilter {
        status,
        plugin: query.plugin,
        limit: query.limit.unwrap_or(DEFAULT_PAGE),
        cursor: query.cursor,
    };
    let page = state.storage.jobs(filter).await?;
    Ok(AppJson(
        json!({"jobs": page.jobs, "next_cursor": page.next_cursor}),
    ))
}

/// `POST /jobs/{id}/cancel`: 200 when cancelled, 202 while a running phase
/// is being stopped (`job:cancelled` follows), 409 when already finished.
pub async fn cancel(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let outcome = state.queue.cancel(&id).await?;
    let status = match outcome {
        Cancelled::Done => StatusCode::OK,
        Cancelled::Stopping => StatusCode::ACCEPTED,
    };
    Ok((status, AppJson(state.queue.job(&id).await?)))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RetryBody {
    #[serde(default)]
    from_start: bool,
}

/// `POST /jobs/{id}/retry` `{"from_start": false}` (an empty body means
/// `from_start: false`).
pub async fn retry(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let body = body?;
    let body: RetryBody = if body.iter().all(u8::is_ascii_whitespace) {
        RetryBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_json",
                e.to_string(),
            )
        })?
    };
    Ok(AppJson(state.queue.retry(&id, body.from_start).await?))
}

pub async fn delete(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.queue.delete(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}
