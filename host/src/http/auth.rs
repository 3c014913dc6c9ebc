//! Bearer tokens on mutating routes. Reads stay open so dashboards and SSE
//! watchers need no secret; with no tokens configured everything is open.

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use subtle::ConstantTimeEq;

use super::{ApiError, AppState};

pub async fn require_token(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let mutating = !matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    );
    if !mutating || state.tokens.is_empty() {
        return Ok(next.run(request).await);
    }
    let refusal = match bearer_token(&request) {
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this route needs `Authorization: Bearer <token>`",
        ),
        Some(presented) if is_valid(&state.tokens, presented) => {
            return Ok(next.run(request).await);
        }
        Some(_) => ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the bearer token is not valid",
        ),
    };
    // Read (and drop) the body before refusing: a client still sending an
    // upload would otherwise see a reset connection instead of the error.
    let limit = state.max_plugin_bytes.max(state.max_body_bytes);
    let _ = axum::body::to_bytes(request.into_body(), limit).await;
    Err(refusal)
}

fn bearer_token(request: &Request) -> Option<&str> {
    request
        .headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

/// Compares against every token, each in constant time.
fn is_valid(tokens: &[String], presented: &str) -> bool {
    tokens.iter().fold(false, |found, token| {
        found | bool::from(token.as_bytes().ct_eq(presented.as_bytes()))
    })
}
