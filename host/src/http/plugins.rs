//! Plugin routes: upload a version, list, show, activate (hot swap and
//! rollback), delete a version.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::json;

use super::{ApiError, AppJson, AppState};
use crate::plugins::Uploaded;
use crate::runtime::content_hash;

#[derive(Deserialize)]
pub struct UploadQuery {
    /// Make this version active right after the upload.
    #[serde(default)]
    activate: bool,
}

/// `PUT /plugins/{name}/versions/{version}`: 201 when stored, 200 when the
/// same bytes were already there, 409 when other bytes are, 422 when the
/// component is not a valid jobhost plugin (nothing is stored).
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
    let body = json!({
        "plugin": name,
        "version": version,
        "content_hash": hash,
        "size": size,
        "created": status == StatusCode::CREATED,
        "active": active,
        "metadata": metadata,
    });
    Ok((status, AppJson(body)))
}

pub async fn delete_version(
    State(state): State<AppState>,
    Path((name, version)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    state.plugins.delete_version(&name, &version).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn list(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    Ok(AppJson(json!({"plugins": state.plugins.list().await?})))
}

pub async fn show(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    match state.plugins.get(&name).await? {
        Some(plugin) => Ok(AppJson(plugin)),
        None => Err(ApiError::not_found(format!("no plugin named `{name}`"))),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Activate {
    version: String,
}

/// `PUT /plugins/{name}/active` `{"version": "..."}`: new jobs pin this
/// version; phases already running finish on theirs.
pub async fn activate(
    State(state): State<AppState>,
    Path(name): Path<String>,
    AppJson(body): AppJson<Activate>,
) -> Result<impl IntoResponse, ApiError> {
    let previous = state.plugins.activate(&name, &body.version).await?;
    Ok(AppJson(
        json!({"plugin": name, "active_version": body.version, "previous": previous}),
    ))
}
