//! Job routes: submit, list, show, cancel, retry, delete.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{ApiError, AppJson, AppState, ErrorBody};
use crate::model::{Job, JobSpec, JobStatus, JobSummary};
use crate::queue::Cancelled;
use crate::storage::{JobFilter, MAX_PAGE};

const TAG: &str = "jobs";
/// Jobs per page unless `limit` says otherwise.
const DEFAULT_PAGE: usize = 50;

/// Submit a job.
///
/// Each phase's plugin version is pinned now (the active one when the spec
/// names none). A second submit with the same `idempotency_key` returns the
/// first job with 200 and stores nothing.
#[utoipa::path(post, path = "/jobs", operation_id = "create_job", tag = TAG, request_body = JobSpec,
    responses(
        (status = 201, description = "Created", body = Job, links(
            ("show" = (operation_id = "show_job", parameters(("id" = "$response.body#/id")))),
            ("events" = (operation_id = "stream_job_events", parameters(("id" = "$response.body#/id")))),
            ("cancel" = (operation_id = "cancel_job", parameters(("id" = "$response.body#/id")))),
            ("retry" = (operation_id = "retry_job", parameters(("id" = "$response.body#/id")))),
            ("delete" = (operation_id = "delete_job", parameters(("id" = "$response.body#/id")))),
        )),
        (status = 200, description = "An earlier job with the same idempotency key", body = Job),
        (status = 413, body = ErrorBody),
        (status = 422, description = "Invalid job spec or unknown plugin", body = ErrorBody),
        (status = 429, description = "The pending-jobs quota or the token's rate is used up", body = ErrorBody),
        (status = 503, description = "Storage is full", body = ErrorBody),
    ))]
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

/// Show a job: phases, outputs, errors, attempts and webhook status.
#[utoipa::path(get, path = "/jobs/{id}", operation_id = "show_job", tag = TAG, params(("id" = String, Path)),
    responses((status = 200, body = Job), (status = 404, body = ErrorBody)))]
pub async fn show(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(AppJson(state.queue.job(&id).await?))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// pending, running, completed, failed or cancelled.
    status: Option<String>,
    /// Only jobs with a phase running this plugin.
    plugin: Option<String>,
    /// Only jobs with this concurrency key.
    key: Option<String>,
    /// Page size (1-100, default 50).
    #[param(minimum = 1, maximum = 100)]
    limit: Option<usize>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct JobList {
    /// Summaries: no payloads, configs or outputs (see `GET /jobs/{id}`).
    jobs: Vec<JobSummary>,
    /// Pass as `cursor` for the next page; null on the last page.
    next_cursor: Option<String>,
}

/// List jobs, newest first.
#[utoipa::path(get, path = "/jobs", operation_id = "list_jobs", tag = TAG, params(ListQuery),
    responses((status = 200, body = JobList), (status = 400, body = ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    query: Result<Query<ListQuery>, QueryRejection>,
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
        concurrency_key: query.key.filter(|key| !key.is_empty()),
        limit: match query.limit {
            None => DEFAULT_PAGE,
            Some(limit @ 1..=MAX_PAGE) => limit,
            Some(_) => {
                return Err(ApiError::bad_request(format!(
                    "limit must be between 1 and {MAX_PAGE}"
                )));
            }
        },
        cursor: query.cursor,
    };
    let page = state.queue.list(filter).await?;
    Ok(AppJson(JobList {
        jobs: page.jobs,
        next_cursor: page.next_cursor,
    }))
}

/// Cancel a job.
///
/// A pending job is cancelled at once (200). A running phase is asked to
/// stop through `cancelled()` and stopped by force at the next epoch tick;
/// the answer waits for that (200 when cancelled, 202 if it took more than
/// a few seconds; `job:cancelled` follows). A job that is finished, or that
/// finished before the cancel took effect, is left as it is (409).
#[utoipa::path(post, path = "/jobs/{id}/cancel", operation_id = "cancel_job", tag = TAG, params(("id" = String, Path)),
    responses(
        (status = 200, body = Job), (status = 202, body = Job),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
    ))]
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

#[derive(Deserialize, Default, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryRequest {
    /// Run every phase again, clearing stored outputs. By default the job
    /// resumes at its first unfinished phase and keeps completed outputs.
    #[serde(default)]
    from_start: bool,
}

/// Retry a failed or cancelled job (an empty or `null` body means
/// `from_start: false`).
#[utoipa::path(post, path = "/jobs/{id}/retry", operation_id = "retry_job", tag = TAG, params(("id" = String, Path)),
    request_body(content = Option<RetryRequest>),
    responses(
        (status = 200, body = Job), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 422, description = "The body is not a retry request", body = ErrorBody),
    ))]
pub async fn retry(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let body = body?;
    let text = body.trim_ascii();
    let request: RetryRequest = if text.is_empty() || text == b"null" {
        RetryRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_json",
                e.to_string(),
            )
        })?
    };
    Ok(AppJson(state.queue.retry(&id, request.from_start).await?))
}

/// Delete a finished job with its phases (its events stay in the log).
#[utoipa::path(delete, path = "/jobs/{id}", operation_id = "delete_job", tag = TAG, params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, description = "Not finished", body = ErrorBody)))]
pub async fn delete(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.queue.delete(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}
