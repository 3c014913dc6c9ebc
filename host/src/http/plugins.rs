//! Plugin routes: upload a version, list, show, activate (hot swap and
//! rollback), delete a version, set grants.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{ApiError, AppJson, AppState, ErrorBody};
use crate::model::{PluginGrants, PluginResources};
use crate::plugins::Uploaded;
use crate::runtime::{PluginMetadata, content_hash};
use crate::storage::PluginRecord;

const TAG: &str = "plugins";

#[derive(Deserialize, IntoParams)]
pub struct UploadQuery {
    /// Make this version active right after the upload.
    #[serde(default)]
    activate: bool,
}

#[derive(Serialize, ToSchema)]
pub struct UploadResponse {
    plugin: String,
    version: String,
    content_hash: String,
    size: usize,
    /// False when the same bytes were already stored under this version.
    created: bool,
    /// Whether this version is now the active one.
    active: bool,
    /// What the component says about itself (on creation).
    metadata: Option<PluginMetadata>,
}

/// Upload a plugin version.
///
/// The body is the WebAssembly component. It is validated against the
/// contract before anything is stored; the first version of a plugin
/// becomes active.
#[utoipa::path(put, path = "/plugins/{name}/versions/{version}", operation_id = "upload_plugin_version", tag = TAG,
    params(("name" = String, Path), ("version" = String, Path), UploadQuery),
    request_body(content = Vec<u8>, content_type = "application/wasm"),
    responses(
        (status = 201, description = "Stored", body = UploadResponse, links(
            ("show" = (operation_id = "show_plugin", parameters(("name" = "$request.path.name")))),
            ("activate" = (operation_id = "activate_plugin", parameters(("name" = "$request.path.name")))),
            ("delete" = (operation_id = "delete_plugin_version", parameters(
                ("name" = "$request.path.name"), ("version" = "$request.path.version")))),
        )),
        (status = 200, description = "The same bytes were already stored", body = UploadResponse),
        (status = 409, description = "Other bytes are stored under this version", body = ErrorBody),
        (status = 413, description = "The component is too large", body = ErrorBody),
        (status = 422, description = "Not a valid jobhost plugin component", body = ErrorBody),
        (status = 507, description = "The plugin store's quota is used up", body = ErrorBody),
    ))]
pub async fn upload(
    State(state): State<AppState>,
    Path((name, version)): Path<(String, String)>,
    Query(query): Query<UploadQuery>,
    body: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let body = body?;
    let (hash, size) = (content_hash(&body), body.len());
    let uploaded = state.plugins.upload(&name, &version, body.to_vec()).await?;
    let mut active = matches!(
        uploaded,
        Uploaded::Created {
            activated: true,
            ..
        }
    );
    if query.activate && !active {
        state.plugins.activate(&name, &version).await?;
        active = true;
    }
    let (status, metadata) = match uploaded {
        Uploaded::Created { metadata, .. } => (StatusCode::CREATED, Some(metadata)),
        Uploaded::Unchanged => (StatusCode::OK, None),
    };
    let created = status == StatusCode::CREATED;
    let body = UploadResponse {
        plugin: name,
        version,
        content_hash: hash,
        size,
        created,
        active,
        metadata,
    };
    Ok((status, AppJson(body)))
}

/// Delete a plugin version.
///
/// Refused while an unfinished job pins the version, and for the active
/// version while other versions exist.
#[utoipa::path(delete, path = "/plugins/{name}/versions/{version}", operation_id = "delete_plugin_version", tag = TAG,
    params(("name" = String, Path), ("version" = String, Path)),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such version", body = ErrorBody),
        (status = 409, description = "Pinned by an unfinished job, or active", body = ErrorBody),
    ))]
pub async fn delete_version(
    State(state): State<AppState>,
    Path((name, version)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    state.plugins.delete_version(&name, &version).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Serialize, ToSchema)]
pub struct PluginList {
    plugins: Vec<PluginRecord>,
}

/// List plugins with their versions and the active version.
#[utoipa::path(get, path = "/plugins", operation_id = "list_plugins", tag = TAG, responses((status = 200, body = PluginList)))]
pub async fn list(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    Ok(AppJson(PluginList {
        plugins: state.plugins.list().await?,
    }))
}

/// Show one plugin.
#[utoipa::path(get, path = "/plugins/{name}", operation_id = "show_plugin", tag = TAG, params(("name" = String, Path)),
    responses((status = 200, body = PluginRecord), (status = 404, body = ErrorBody)))]
pub async fn show(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    match state.plugins.get(&name).await? {
        Some(plugin) => Ok(AppJson(plugin)),
        None => Err(ApiError::not_found(format!("no plugin named `{name}`"))),
    }
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ActivateRequest {
    version: String,
}

#[derive(Serialize, ToSchema)]
pub struct ActivateResponse {
    plugin: String,
    active_version: String,
    previous: Option<String>,
}

/// Activate a version (hot swap or rollback).
///
/// Jobs enqueued from now on pin this version; phases already running
/// finish on the version they started with.
#[utoipa::path(put, path = "/plugins/{name}/active", operation_id = "activate_plugin", tag = TAG, params(("name" = String, Path)),
    request_body = ActivateRequest,
    responses(
        (status = 200, body = ActivateResponse),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 422, description = "A body that is not an activation", body = ErrorBody),
    ))]
pub async fn activate(
    State(state): State<AppState>,
    Path(name): Path<String>,
    AppJson(body): AppJson<ActivateRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let previous = state.plugins.activate(&name, &body.version).await?;
    Ok(AppJson(ActivateResponse {
        plugin: name,
        active_version: body.version,
        previous,
    }))
}

#[derive(Serialize, ToSchema)]
pub struct GrantsResponse {
    plugin: String,
    grants: PluginGrants,
}

/// Set a plugin's grants (admin).
///
/// Replaces what the plugin's phases may read through `wasi:config/store`:
/// plain `config` values, and `secrets` by name (their values come from the
/// server's secrets file or `JOBHOST_SECRET_<NAME>` variables). The grants
/// cover only the `versions` they name: a new version gets nothing until it
/// is added. A phase reads the grants in force when it starts. Logs
/// `plugin:grants:changed` (with names, not values).
#[utoipa::path(put, path = "/plugins/{name}/grants", operation_id = "set_plugin_grants", tag = TAG, params(("name" = String, Path)),
    request_body = PluginGrants,
    responses(
        (status = 200, body = GrantsResponse),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 404, description = "No such plugin", body = ErrorBody),
        (status = 422, description = "Invalid grants, or a version the plugin does not have; nothing is stored", body = ErrorBody),
    ))]
pub async fn set_grants(
    State(state): State<AppState>,
    Path(name): Path<String>,
    AppJson(grants): AppJson<PluginGrants>,
) -> Result<impl IntoResponse, ApiError> {
    state.plugins.set_grants(&name, &grants).await?;
    Ok(AppJson(GrantsResponse {
        plugin: name,
        grants,
    }))
}

#[derive(Serialize, ToSchema)]
pub struct ResourcesResponse {
    plugin: String,
    resources: PluginResources,
}

/// Set a plugin's resources (admin).
///
/// The memory cap of each of its runs, and the timeout of its phases whose
/// job spec gives none; `null` keeps the server's default. They apply to
/// every version, from the next phase that starts (memory) or the next job
/// submitted (timeout), on every host. `max_running` and `per_second` limit
/// how many of its phases run at once and start each second, on all hosts
/// together, from the next start; a job whose next phase finds the plugin
/// full waits (status `waiting`) without holding a worker. `null`: no
/// limit, and jobs waiting for one are woken. Logs
/// `plugin:resources:changed`.
#[utoipa::path(put, path = "/plugins/{name}/resources", operation_id = "set_plugin_resources", tag = TAG, params(("name" = String, Path)),
    request_body = PluginResources,
    responses(
        (status = 200, body = ResourcesResponse),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 404, description = "No such plugin", body = ErrorBody),
        (status = 422, description = "A value out of range; nothing is stored", body = ErrorBody),
    ))]
pub async fn set_resources(
    State(state): State<AppState>,
    Path(name): Path<String>,
    AppJson(resources): AppJson<PluginResources>,
) -> Result<impl IntoResponse, ApiError> {
    state.plugins.set_resources(&name, resources).await?;
    Ok(AppJson(ResourcesResponse {
        plugin: name,
        resources,
    }))
}
