//! One error type for every route, mapped to a status in one place. The
//! body is always `{"error": {"code": "...", "message": "..."}}`.

use axum::Json;
use axum::extract::rejection::{BytesRejection, JsonRejection, QueryRejection};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::plugins::PluginError;
use crate::queue::QueueError;
use crate::runtime::LoadError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Ask the client to close the connection after this answer.
    close: bool,
    /// Tell the client when to try again.
    retry_after: Option<std::time::Duration>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            close: status == StatusCode::PAYLOAD_TOO_LARGE,
            retry_after: None,
            code,
            message: message.into(),
        }
    }

    /// The answer closes the connection: for a refused client that should
    /// not keep holding one (an SSE stream over its cap).
    pub fn closing(mut self) -> Self {
        self.close = true;
        self
    }

    /// The answer carries `Retry-After` (whole seconds, at least one).
    pub fn retry_after(mut self, wait: std::time::Duration) -> Self {
        self.retry_after = Some(wait);
        self
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// The details go to the log only, under an id the client is given:
    /// an internal error's text could tell a client about the host.
    fn internal(error: impl std::fmt::Display) -> Self {
        let id = uuid::Uuid::now_v7().simple().to_string();
        tracing::error!(%error, request_id = %id, "internal error");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("internal error (request id {id}); the server's log has the details"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        let mut response = (self.status, Json(body)).into_response();
        if let Some(wait) = self.retry_after {
            let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        // After a 413 the rest of the oversized body was never read: the
        // connection cannot carry another request.
        if self.close {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

impl From<QueueError> for ApiError {
    fn from(error: QueueError) -> Self {
        let message = error.to_string();
        match error {
            QueueError::InvalidJob(_) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_job", message)
            }
            QueueError::UnknownPlugin(_) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "unknown_plugin", message)
            }
            QueueError::NotFound(_) => ApiError::not_found(message),
            QueueError::Conflict { .. } => ApiError::new(StatusCode::CONFLICT, "conflict", message),
            QueueError::TooManyPending(_) => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "too_many_pending", message)
            }
            QueueError::ShuttingDown => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", message)
            }
            QueueError::InvalidSchedule(_) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_schedule",
                message,
            ),
            QueueError::InvalidLimits(_) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_limits", message)
            }
            QueueError::ScheduleNotFound(_) => ApiError::not_found(message),
            QueueError::ScheduleExists(_) => {
                ApiError::new(StatusCode::CONFLICT, "schedule_exists", message)
            }
            QueueError::TooManySchedules(_) => {
                ApiError::new(StatusCode::CONFLICT, "too_many_schedules", message)
            }
            QueueError::Webhooks(_) => ApiError::internal(message),
            QueueError::Storage(e) => ApiError::from(e),
        }
    }
}

impl From<PluginError> for ApiError {
    fn from(error: PluginError) -> Self {
        let message = error.to_string();
        match error {
            PluginError::InvalidName { .. } => ApiError::bad_request(message),
            PluginError::Invalid(load) => {
                let code = match load {
                    LoadError::NotWasm => "not_wasm",
                    LoadError::CoreModule => "core_module",
                    LoadError::Invalid(_) => "invalid_component",
                    LoadError::UnsupportedImports(_) => "unsupported_imports",
                    LoadError::NotAPlugin(_) => "not_a_plugin",
                    LoadError::Describe(_) => "describe_failed",
                    LoadError::TooLarge(_) => "too_large",
                };
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
            }
            PluginError::VersionConflict { .. } => {
                ApiError::new(StatusCode::CONFLICT, "version_conflict", message)
            }
            PluginError::OverQuota(_) => {
                ApiError::new(StatusCode::INSUFFICIENT_STORAGE, "plugin_quota", message)
            }
            PluginError::NotFound { .. } | PluginError::NoSuchPlugin(_) => {
                ApiError::not_found(message)
            }
            PluginError::InvalidGrants(_) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_grants", message)
            }
            PluginError::InvalidResources(_) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_resources",
                message,
            ),
            PluginError::InUse { .. } => {
                ApiError::new(StatusCode::CONFLICT, "version_in_use", message)
            }
            PluginError::Active { .. } => {
                ApiError::new(StatusCode::CONFLICT, "version_active", message)
            }
            PluginError::Storage(e) => ApiError::from(e),
        }
    }
}

impl From<crate::storage::StorageError> for ApiError {
    fn from(error: crate::storage::StorageError) -> Self {
        if error.is_full() {
            tracing::error!(%error, "storage is full");
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "storage_full",
                "the server's storage is full: nothing was stored; try again when an operator has made room",
            );
        }
        ApiError::internal(error)
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        match rejection {
            JsonRejection::BytesRejection(_)
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE =>
            {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    rejection.body_text(),
                )
            }
            JsonRejection::JsonDataError(_) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_json",
                rejection.body_text(),
            ),
            _ => ApiError::new(rejection.status(), "invalid_json", rejection.body_text()),
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        ApiError::bad_request(rejection.body_text())
    }
}

impl From<BytesRejection> for ApiError {
    fn from(rejection: BytesRejection) -> Self {
        let status = rejection.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "too_large"
        } else {
            "bad_request"
        };
        ApiError::new(status, code, rejection.body_text())
    }
}
