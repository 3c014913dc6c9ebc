//! Operator routes for the queue: state, pause/resume, purge.

use axum::extract::State;
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{ApiError, AppJson, AppState, ErrorBody};
use crate::model::time::parse_rfc3339;
use crate::model::{ConcurrencyLimits, KeyLoad, PluginLoad};
use crate::queue::KeysState;
use crate::storage::HostRecord;

const TAG: &str = "queue";

#[derive(Serialize, ToSchema)]
pub struct QueueState {
    /// While paused no new phase starts; running phases finish.
    paused: bool,
    /// Jobs this server is running now.
    running: usize,
    /// Pending jobs that are due now.
    due: u64,
    concurrency: usize,
    /// Jobs stored in each status, on every host.
    jobs: std::collections::BTreeMap<&'static str, u64>,
    /// Concurrency keys: the limits and the busiest keys.
    keys: ConcurrencyState,
    /// The plugins with a limit or a rate (a plugin's resources): their
    /// running phases and the jobs waiting for them, on every host.
    plugins: Vec<PluginLoad>,
}

#[derive(Serialize, ToSchema)]
pub struct ConcurrencyState {
    limits: ConcurrencyLimits,
    /// The keys with pending or running jobs, at most 50, busiest first.
    keys: Vec<KeyLoad>,
    /// How many keys have pending or running jobs.
    key_count: u64,
}

async fn concurrency_state(state: &AppState) -> Result<ConcurrencyState, ApiError> {
    let KeysState { keys, key_count } = state.queue.keys().await?;
    Ok(ConcurrencyState {
        limits: state.queue.concurrency_limits().await?,
        keys,
        key_count,
    })
}

async fn queue_state(state: &AppState) -> Result<QueueState, ApiError> {
    let mut jobs: std::collections::BTreeMap<_, _> = crate::model::JobStatus::ALL
        .iter()
        .map(|status| (status.as_str(), 0))
        .collect();
    for (status, count) in state.queue.counts().await? {
        jobs.insert(status.as_str(), count);
    }
    Ok(QueueState {
        paused: state.queue.is_paused(),
        running: state.queue.running().await,
        due: state.queue.due_count().await?,
        concurrency: state.queue.config().concurrency,
        jobs,
        keys: concurrency_state(state).await?,
        plugins: state.queue.plugin_loads().await?,
    })
}

/// The queue's state.
#[utoipa::path(get, path = "/queue", operation_id = "queue_state", tag = TAG, responses((status = 200, body = QueueState)))]
pub async fn show(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    Ok(AppJson(queue_state(&state).await?))
}

#[derive(Serialize, ToSchema)]
pub struct ClusterState {
    /// Paused for every host.
    paused: bool,
    /// The hosts serving from this database, oldest first (on SQLite,
    /// this host alone).
    hosts: Vec<HostRecord>,
}

/// The hosts sharing this server's database: their heartbeats, slots and
/// the jobs each runs.
#[utoipa::path(get, path = "/cluster", operation_id = "cluster_state", tag = TAG, responses((status = 200, body = ClusterState)))]
pub async fn cluster(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    Ok(AppJson(ClusterState {
        paused: state.queue.is_paused(),
        hosts: state.queue.hosts().await?,
    }))
}

/// Pause: no new phase starts, on any host, until resumed; running phases
/// finish and their jobs wait, keeping completed phases.
#[utoipa::path(post, path = "/queue/pause", operation_id = "pause_queue", tag = TAG, responses((status = 200, body = QueueState)))]
pub async fn pause(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    state.queue.pause().await?;
    Ok(AppJson(queue_state(&state).await?))
}

/// Resume after a pause.
#[utoipa::path(post, path = "/queue/resume", operation_id = "resume_queue", tag = TAG, responses((status = 200, body = QueueState)))]
pub async fn resume(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    state.queue.resume().await?;
    Ok(AppJson(queue_state(&state).await?))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PurgeRequest {
    /// Delete finished jobs that finished before this time (RFC 3339).
    #[schema(format = DateTime, max_length = 64)]
    finished_before: String,
}

#[derive(Serialize, ToSchema)]
pub struct PurgeResponse {
    deleted: Vec<String>,
}

/// Delete every finished job that finished before a time (each emits
/// `job:deleted`). The retention sweep does the same periodically.
#[utoipa::path(post, path = "/queue/purge", operation_id = "purge_jobs", tag = TAG, request_body = PurgeRequest,
    responses(
        (status = 200, body = PurgeResponse),
        (status = 400, description = "Malformed JSON or time", body = ErrorBody),
        (status = 422, description = "A body that is not a purge request", body = ErrorBody),
    ))]
pub async fn purge(
    State(state): State<AppState>,
    AppJson(request): AppJson<PurgeRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let cutoff = parse_rfc3339(&request.finished_before).map_err(ApiError::bad_request)?;
    Ok(AppJson(PurgeResponse {
        deleted: state.queue.purge_finished_before(cutoff).await?,
    }))
}

/// The limits on how many jobs with one concurrency key run at once, and
/// the busiest keys.
#[utoipa::path(get, path = "/queue/concurrency", operation_id = "concurrency", tag = TAG,
    responses((status = 200, body = ConcurrencyState)))]
pub async fn concurrency(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    Ok(AppJson(concurrency_state(&state).await?))
}

/// Replace the concurrency limits: per key (`tenant-42`), per prefix
/// (`tenant-*`, each key under it capped on its own) and a default for
/// keys no rule names. They apply at once, on every host, to jobs already
/// waiting too.
#[utoipa::path(put, path = "/queue/concurrency", operation_id = "set_concurrency", tag = TAG,
    request_body = ConcurrencyLimits,
    responses(
        (status = 200, body = ConcurrencyState),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 422, description = "A rule out of bounds, named", body = ErrorBody),
    ))]
pub async fn set_concurrency(
    State(state): State<AppState>,
    AppJson(limits): AppJson<ConcurrencyLimits>,
) -> Result<impl IntoResponse, ApiError> {
    state.queue.set_concurrency_limits(limits).await?;
    Ok(AppJson(concurrency_state(&state).await?))
}
