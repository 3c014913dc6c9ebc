//! Schedule routes: create, list, show, replace, delete, pause, resume and
//! trigger. Writes need the admin scope.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Serialize;
use utoipa::ToSchema;

use super::{ApiError, AppJson, AppState, ErrorBody};
use crate::model::{Job, Schedule, ScheduleSpec};

const TAG: &str = "schedules";

#[derive(Serialize, ToSchema)]
pub struct ScheduleList {
    /// By name.
    schedules: Vec<Schedule>,
}

/// Create a schedule (admin).
///
/// Its first tick is the first after now. Each tick enqueues one job from
/// the template, once across every host; `schedule:fired` or
/// `schedule:skipped` tells what each tick did. The template's plugins
/// must be uploaded.
#[utoipa::path(post, path = "/schedules", operation_id = "create_schedule", tag = TAG,
    request_body = ScheduleSpec,
    responses(
        (status = 201, body = Schedule),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 409, description = "The name is taken, or the server's limit of schedules is reached", body = ErrorBody),
        (status = 422, description = "An invalid field (cron, timezone, job, …), named; nothing is stored", body = ErrorBody),
    ))]
pub async fn create(
    State(state): State<AppState>,
    AppJson(spec): AppJson<ScheduleSpec>,
) -> Result<impl IntoResponse, ApiError> {
    let schedule = state.queue.create_schedule(spec).await?;
    Ok((StatusCode::CREATED, AppJson(schedule)))
}

/// List schedules.
#[utoipa::path(get, path = "/schedules", operation_id = "list_schedules", tag = TAG,
    responses((status = 200, body = ScheduleList)))]
pub async fn list(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    Ok(AppJson(ScheduleList {
        schedules: state.queue.schedules().await?,
    }))
}

/// Show a schedule: its definition, next tick and last fire.
#[utoipa::path(get, path = "/schedules/{name}", operation_id = "show_schedule", tag = TAG,
    params(("name" = String, Path)),
    responses((status = 200, body = Schedule), (status = 404, body = ErrorBody)))]
pub async fn show(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(AppJson(state.queue.schedule(&name).await?))
}

/// Replace a schedule (admin).
///
/// The body is a whole definition whose `name` is the path's. Its next
/// tick is the first after now by the new definition; its last fire stays.
#[utoipa::path(put, path = "/schedules/{name}", operation_id = "replace_schedule", tag = TAG,
    params(("name" = String, Path)),
    request_body = ScheduleSpec,
    responses(
        (status = 200, body = Schedule),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 422, description = "An invalid field, named; nothing is stored", body = ErrorBody),
    ))]
pub async fn replace(
    State(state): State<AppState>,
    Path(name): Path<String>,
    AppJson(spec): AppJson<ScheduleSpec>,
) -> Result<impl IntoResponse, ApiError> {
    if spec.name != name {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_schedule",
            format!(
                "invalid schedule: name: `{}` is not the path's `{name}`",
                spec.name
            ),
        ));
    }
    Ok(AppJson(state.queue.replace_schedule(spec).await?))
}

/// Delete a schedule (admin). The jobs it enqueued stay.
#[utoipa::path(delete, path = "/schedules/{name}", operation_id = "delete_schedule", tag = TAG,
    params(("name" = String, Path)),
    responses((status = 204, description = "Deleted"), (status = 404, body = ErrorBody)))]
pub async fn delete(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    state.queue.delete_schedule(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Pause a schedule (admin): no tick fires until it is resumed.
#[utoipa::path(post, path = "/schedules/{name}/pause", operation_id = "pause_schedule", tag = TAG,
    params(("name" = String, Path)),
    responses((status = 200, body = Schedule), (status = 404, body = ErrorBody)))]
pub async fn pause(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(AppJson(state.queue.set_schedule_paused(&name, true).await?))
}

/// Resume a schedule (admin) from its first tick after now: ticks passed
/// while it was paused do not fire.
#[utoipa::path(post, path = "/schedules/{name}/resume", operation_id = "resume_schedule", tag = TAG,
    params(("name" = String, Path)),
    responses((status = 200, body = Schedule), (status = 404, body = ErrorBody)))]
pub async fn resume(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(AppJson(
        state.queue.set_schedule_paused(&name, false).await?,
    ))
}

/// Fire a schedule now (admin).
///
/// Enqueues its job at once whatever the overlap policy
/// (`cancel_previous` still cancels the previous job); its ticks do not
/// move. Logs `schedule:fired` without a tick.
#[utoipa::path(post, path = "/schedules/{name}/trigger", operation_id = "trigger_schedule", tag = TAG,
    params(("name" = String, Path)),
    responses(
        (status = 201, description = "The job enqueued", body = Job),
        (status = 404, body = ErrorBody),
        (status = 422, description = "The template no longer makes a valid job", body = ErrorBody),
        (status = 429, description = "Too many jobs are waiting", body = ErrorBody),
    ))]
pub async fn trigger(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let job = state.queue.trigger_schedule(&name).await?;
    Ok((StatusCode::CREATED, AppJson(job)))
}
