//! The HTTP API (axum): plugins, jobs, SSE, health, metrics. [`router`]
//! builds it from an [`AppState`]; `crate::app` serves it. The OpenAPI
//! document at `/openapi.json` is generated from the same route table
//! (utoipa), so it lists exactly the routes that exist.

mod admin;
mod auth;
mod error;
mod events;
mod health;
mod jobs;
mod plugins;
mod schedules;
pub mod serve;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRequest};
use axum::routing::get;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use utoipa::openapi::OpenApi;
use utoipa::{OpenApi as _, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use auth::RateLimiter;
pub use error::ApiError;
pub use events::StreamLimits;

use crate::metrics::Metrics;
use crate::plugins::PluginRegistry;
use crate::queue::Queue;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub queue: Arc<Queue>,
    pub plugins: Arc<PluginRegistry>,
    pub access: Arc<crate::config::Access>,
    /// Cancelled when the server shuts down: SSE streams end cleanly.
    pub shutdown: CancellationToken,
    pub max_body_bytes: usize,
    pub max_plugin_bytes: usize,
    pub metrics: Arc<Metrics>,
    /// How many SSE clients are busy, which sets how long their events
    /// linger.
    pub sse_activity: Arc<events::SseActivity>,
    /// Caps on concurrent event streams.
    pub streams: Arc<events::StreamLimits>,
    /// Requests per second per token.
    pub rate_limiter: Arc<auth::RateLimiter>,
    /// How long a request (but a stream or an upload) may take, body included.
    pub request_timeout: std::time::Duration,
}

/// `Json` whose rejections become [`ApiError`]s with our error body.
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct AppJson<T>(pub T);

impl<T: serde::Serialize> axum::response::IntoResponse for AppJson<T> {
    fn into_response(self) -> axum::response::Response {
        axum::Json(self.0).into_response()
    }
}

/// Every error response: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `not_found`, `invalid_job`.
    code: String,
    message: String,
}

#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "jobhost", description = "Run multi-phase jobs whose phases are sandboxed WebAssembly components."),
    modifiers(&BearerAuth),
    components(schemas(crate::model::webhook::WebhookBody)),
    tags(
        (name = "plugins", description = "Upload, list, activate (hot swap) and delete plugin versions"),
        (name = "jobs", description = "Submit, inspect, cancel, retry and delete jobs"),
        (name = "events", description = "Live lifecycle events over Server-Sent Events"),
        (name = "queue", description = "Operators: queue state, pause and resume, purge, concurrency limits"),
        (name = "schedules", description = "Recurring jobs: cron patterns in a time zone, fired once per tick across hosts"),
        (name = "operations", description = "Health, readiness and metrics"),
    )
)]
struct ApiDoc;

/// Declares the bearer scheme that routes need when tokens are set.
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        let scheme = HttpBuilder::new()
            .scheme(HttpAuthScheme::Bearer)
            .description(Some(
                "Needed on every route but /healthz, /readyz, / and /openapi.json when the server \
                 has tokens: scope `read` for views and streams, `submit` to create, cancel and \
                 retry jobs, `admin` for plugins, the queue, schedules and deleting jobs",
            ));
        components.add_security_scheme("bearer", SecurityScheme::Http(scheme.build()));
    }
}

/// The route table, with its OpenAPI description.
fn routes(state: &AppState) -> OpenApiRouter<AppState> {
    let uploads = OpenApiRouter::new()
        .routes(routes!(plugins::upload, plugins::delete_version))
        .layer(DefaultBodyLimit::max(state.max_plugin_bytes));
    let api = OpenApiRouter::new()
        .routes(routes!(plugins::list))
        .routes(routes!(plugins::show))
        .routes(routes!(plugins::activate))
        .routes(routes!(plugins::set_grants))
        .routes(routes!(plugins::set_resources))
        .routes(routes!(jobs::create, jobs::list))
        .routes(routes!(jobs::show, jobs::delete))
        .routes(routes!(jobs::cancel))
        .routes(routes!(jobs::retry))
        .routes(routes!(schedules::create, schedules::list))
        .routes(routes!(
            schedules::show,
            schedules::replace,
            schedules::delete
        ))
        .routes(routes!(schedules::pause))
        .routes(routes!(schedules::resume))
        .routes(routes!(schedules::trigger))
        .routes(routes!(health::healthz))
        .routes(routes!(health::readyz))
        .routes(routes!(health::metrics))
        .routes(routes!(health::dashboard))
        .routes(routes!(admin::show))
        .routes(routes!(admin::cluster))
        .routes(routes!(admin::pause))
        .routes(routes!(admin::resume))
        .routes(routes!(admin::purge))
        .routes(routes!(admin::concurrency, admin::set_concurrency))
        .layer(DefaultBodyLimit::max(state.max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(
            state.request_timeout,
            request_deadline,
        ));
    // Streams last as long as their clients want; uploads may be large on a
    // slow link. Neither gets the request deadline.
    let streams = OpenApiRouter::new()
        .routes(routes!(events::job_stream))
        .routes(routes!(events::stream));
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(uploads)
        .merge(streams)
        .merge(api)
}

/// A request (its body included) must be answered within the deadline: a
/// client that sends its body a byte at a time gets 408 instead of holding
/// a connection and a handler.
async fn request_deadline(
    axum::extract::State(deadline): axum::extract::State<std::time::Duration>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Result<axum::response::Response, ApiError> {
    tokio::time::timeout(deadline, next.run(request))
        .await
        .map_err(|_| {
            ApiError::new(
                axum::http::StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!("the request took more than {} s", deadline.as_secs_f64()),
            )
            .closing()
        })
}

pub fn router(state: AppState) -> Router {
    let (router, openapi) = routes(&state).split_for_parts();
    let openapi = Arc::new(openapi);
    router
        .route(
            "/openapi.json",
            get(move || async move { axum::Json(openapi.as_ref().clone()) }),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::authorize,
        ))
        .fallback(|| async { ApiError::not_found("no such route") })
        .with_state(state)
}
