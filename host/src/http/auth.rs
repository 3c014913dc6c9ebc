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
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    let Some(presented) = presented else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this route needs `Authorization: Bearer <token>`",
        ));
    };
    // Compare against every token, in constant time per token.
    let matched = state.tokens.iter().fold(false, |found, token| {
        found | bool::from(token.as_bytes().ct_eq(presented.as_bytes()))
    });
    if !matched {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the bearer token is not valid",
        ));
    }
    Ok(next.run(request).await)
}
