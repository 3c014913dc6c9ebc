//! Who may call what.
//!
//! With tokens configured, every route but `/healthz`, `/readyz`, the
//! dashboard page, `/openapi.json` (and `/metrics` with `--public-metrics`)
//! needs `Authorization: Bearer <token>` of a scope that covers it:
//! `read` views and streams, `submit` also creates, cancels and retries
//! jobs (submitters are not trusted with more), `admin` also owns plugins,
//! the queue and job deletion.
//!
//! Without tokens the server is open, and therefore serves loopback only
//! (checked at start, see `config`). There, `Host` must name a loopback
//! address or an `--allowed-host`, and a state-changing request from a
//! cross-site page is refused: a web page the operator visits cannot reach
//! the API by DNS rebinding or a forged form post.

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use subtle::ConstantTimeEq;

use super::{ApiError, AppState};
use crate::config::{Access, Scope};

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    Nothing,
    Scope(Scope),
}

/// The scope each route needs, from its method and matched path.
fn need(method: &Method, path: &str, public_metrics: bool) -> Need {
    match (method, path) {
        (_, "/healthz" | "/readyz" | "/" | "/openapi.json") => Need::Nothing,
        (_, "/metrics") if public_metrics => Need::Nothing,
        (&Method::GET | &Method::HEAD, _) => Need::Scope(Scope::Read),
        (&Method::POST, "/jobs" | "/jobs/{id}/cancel" | "/jobs/{id}/retry") => {
            Need::Scope(Scope::Submit)
        }
        _ => Need::Scope(Scope::Admin),
    }
}

pub async fn authorize(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let refusal = match &*state.access {
        Access::Open { allowed_hosts } => {
            check_open(request.method(), request.headers(), allowed_hosts)
        }
        Access::Tokens {
            tokens,
            public_metrics,
        } => {
            let path = request
                .extensions()
                .get::<MatchedPath>()
                .map_or("", MatchedPath::as_str);
            match need(request.method(), path, *public_metrics) {
                Need::Nothing => None,
                Need::Scope(needed) => {
                    match check_token(tokens, bearer_token(request.headers()), needed) {
                        Ok(token) => state.rate_limiter.admit(token).err(),
                        Err(refusal) => Some(refusal),
                    }
                }
            }
        }
    };
    let Some(refusal) = refusal else {
        return Ok(next.run(request).await);
    };
    // Read (and drop) the body before refusing: a client still sending an
    // upload would otherwise see a reset connection instead of the error.
    let limit = state.max_plugin_bytes.max(state.max_body_bytes);
    let _ = axum::body::to_bytes(request.into_body(), limit).await;
    Err(refusal)
}

/// The index of the presented token, if it has the scope `needed`.
fn check_token(
    tokens: &[(Scope, String)],
    presented: Option<&str>,
    needed: Scope,
) -> Result<usize, ApiError> {
    let Some(presented) = presented else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this route needs `Authorization: Bearer <token>`",
        ));
    };
    match find_token(tokens, presented) {
        Some((index, scope)) if scope >= needed => Ok(index),
        Some((_, scope)) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "this route needs a token of scope `{}`; this one has `{}`",
                needed.name(),
                scope.name()
            ),
        )),
        None => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the bearer token is not valid",
        )),
    }
}

/// Without tokens: the request must be addressed to this host by a
/// loopback name (or an allowed one), and must not change state on behalf
/// of another site's page.
fn check_open(method: &Method, headers: &HeaderMap, allowed_hosts: &[String]) -> Option<ApiError> {
    let host = headers
        .get(header::HOST)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    if !is_local_authority(host, allowed_hosts) {
        return Some(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden_host",
            format!(
                "without tokens this server answers only requests addressed to a loopback name, not `{host}`; \
                 add it with --allowed-host, or configure tokens"
            ),
        ));
    }
    let safe = matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
    let cross_site = headers
        .get(header::ORIGIN)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|origin| {
            let authority = origin.split_once("://").map_or(origin, |(_, rest)| rest);
            origin == "null" || !is_local_authority(authority, allowed_hosts)
        })
        || headers
            .get("sec-fetch-site")
            .is_some_and(|site| site.as_bytes() == b"cross-site");
    if !safe && cross_site {
        return Some(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden_origin",
            "a request from another site's page may not change anything here",
        ));
    }
    None
}

/// Whether `authority` (`host[:port]`) is a loopback name or address, or
/// one of `allowed` (any port).
fn is_local_authority(authority: &str, allowed: &[String]) -> bool {
    let host = match authority.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => authority
            .rsplit_once(':')
            .map_or(authority, |(host, _)| host),
    };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    host == "localhost"
        || host.ends_with(".localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
        || allowed.iter().any(|name| name.eq_ignore_ascii_case(&host))
}

fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

/// The index and scope of the presented token, comparing against every
/// token, each in constant time.
fn find_token(tokens: &[(Scope, String)], presented: &str) -> Option<(usize, Scope)> {
    tokens
        .iter()
        .enumerate()
        .fold(None, |found, (index, (scope, token))| {
            let matches = bool::from(token.as_bytes().ct_eq(presented.as_bytes()));
            if matches {
                Some((index, *scope))
            } else {
                found
            }
        })
}

/// Requests per second per token, as token buckets that hold a second's
/// worth: a token that asks faster is answered 429 with `Retry-After`.
pub struct RateLimiter {
    per_second: u32,
    buckets: std::sync::Mutex<std::collections::HashMap<usize, Bucket>>,
}

struct Bucket {
    available: f64,
    at: std::time::Instant,
}

impl RateLimiter {
    /// `per_second` 0 admits everything.
    pub fn new(per_second: u32) -> Self {
        RateLimiter {
            per_second,
            buckets: Default::default(),
        }
    }

    fn admit(&self, token: usize) -> Result<(), ApiError> {
        if self.per_second == 0 {
            return Ok(());
        }
        let rate = f64::from(self.per_second);
        let now = std::time::Instant::now();
        let mut buckets = self.buckets.lock().expect("never poisoned");
        let bucket = buckets.entry(token).or_insert(Bucket {
            available: rate,
            at: now,
        });
        let refilled = now.duration_since(bucket.at).as_secs_f64() * rate;
        bucket.available = (bucket.available + refilled).min(rate);
        bucket.at = now;
        if bucket.available >= 1.0 {
            bucket.available -= 1.0;
            return Ok(());
        }
        let wait = (1.0 - bucket.available) / rate;
        Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!("this token may make {} requests a second", self.per_second),
        )
        .retry_after(std::time::Duration::from_secs_f64(wait)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_route_needs_the_scope_of_what_it_does() {
        let need = |method: Method, path| need(&method, path, false);
        assert_eq!(need(Method::GET, "/healthz"), Need::Nothing);
        assert_eq!(need(Method::GET, "/jobs/{id}"), Need::Scope(Scope::Read));
        assert_eq!(need(Method::GET, "/metrics"), Need::Scope(Scope::Read));
        assert_eq!(need(Method::GET, "/cluster"), Need::Scope(Scope::Read));
        assert_eq!(super::need(&Method::GET, "/metrics", true), Need::Nothing);
        assert_eq!(need(Method::POST, "/jobs"), Need::Scope(Scope::Submit));
        assert_eq!(
            need(Method::POST, "/jobs/{id}/retry"),
            Need::Scope(Scope::Submit)
        );
        assert_eq!(
            need(Method::DELETE, "/jobs/{id}"),
            Need::Scope(Scope::Admin)
        );
        assert_eq!(
            need(Method::POST, "/queue/pause"),
            Need::Scope(Scope::Admin)
        );
        assert_eq!(
            need(Method::PUT, "/plugins/{name}/versions/{version}"),
            Need::Scope(Scope::Admin)
        );
        assert_eq!(need(Method::POST, "/schedules"), Need::Scope(Scope::Admin));
        assert_eq!(
            need(Method::POST, "/schedules/{name}/trigger"),
            Need::Scope(Scope::Admin)
        );
        assert_eq!(need(Method::GET, "/schedules"), Need::Scope(Scope::Read));
    }

    #[test]
    fn a_token_gets_its_rate_then_waits() {
        let limiter = RateLimiter::new(3);
        for _ in 0..3 {
            assert!(limiter.admit(0).is_ok());
        }
        let refused = limiter.admit(0).unwrap_err();
        assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
        assert!(limiter.admit(1).is_ok(), "another token has its own bucket");
        assert!(RateLimiter::new(0).admit(0).is_ok(), "0 is no limit");
    }

    #[test]
    fn loopback_names_are_local_and_others_only_when_allowed() {
        for local in [
            "localhost:8080",
            "127.0.0.1",
            "127.0.0.1:1",
            "[::1]:8080",
            "app.localhost",
            "LOCALHOST.",
        ] {
            assert!(is_local_authority(local, &[]), "{local}");
        }
        for remote in [
            "evil.example:8080",
            "10.0.0.1:8080",
            "localhost.evil.example",
            "",
        ] {
            assert!(!is_local_authority(remote, &[]), "{remote}");
        }
        assert!(is_local_authority(
            "jobs.internal:8080",
            &["jobs.internal".into()]
        ));
    }
}
