//! Server-Sent Events: `GET /events` and `GET /jobs/{id}/events`.
//!
//! Each client gets a feeder task that subscribes to the bus *before*
//! reading the event log, replays what the client missed (after
//! `Last-Event-ID`), then forwards live events, skipping any it already
//! sent. A client too slow for the bus's buffer is caught up from the log,
//! never silently skipped; its slowness blocks only its own feeder.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures::Stream;
use serde::Deserialize;
use tokio::sync::{broadcast, mpsc};
use utoipa::IntoParams;

use super::{ApiError, AppState};
use crate::events::{Event, EventKind, Published};
use crate::storage::EventFilter;

/// Events read from the log per query while catching up.
const CATCH_UP_PAGE: usize = 500;
/// Events buffered between a feeder and its client.
const CLIENT_BUFFER: usize = 64;
const KEEP_ALIVE: Duration = Duration::from_secs(15);

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct StreamQuery {
    /// Only events about this job.
    job: Option<String>,
    /// Comma-separated event types, e.g. `job:completed,job:failed`.
    types: Option<String>,
    /// For clients that cannot set the `Last-Event-ID` header.
    last_event_id: Option<i64>,
}

/// Stream events (Server-Sent Events).
///
/// Each SSE message has `id:` (the event's sequence number), `event:` (its
/// type) and `data:` (the event as JSON). Send `Last-Event-ID` (or the
/// `last_event_id` parameter) to resume: missed events are replayed from the
/// log, then live ones follow, with no gap and no duplicate.
#[utoipa::path(get, path = "/events", tag = "events",
    params(StreamQuery, ("Last-Event-ID" = Option<i64>, Header, description = "Resume after this event")),
    responses((status = 200, description = "An event stream", content_type = "text/event-stream", body = Event)))]
pub async fn stream(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<StreamQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let Query(query) = query?;
    let after = resume_point(&headers, query.last_event_id)?;
    let filter = EventFilter {
        job_id: query.job,
        kinds: parse_types(query.types.as_deref())?,
    };
    Ok(sse(state, filter, after, false))
}

/// Stream one job's events (SSE); the stream ends after its terminal event.
#[utoipa::path(get, path = "/jobs/{id}/events", tag = "events",
    params(("id" = String, Path), StreamQuery, ("Last-Event-ID" = Option<i64>, Header)),
    responses(
        (status = 200, description = "An event stream", content_type = "text/event-stream", body = Event),
        (status = 404, body = super::ErrorBody),
    ))]
pub async fn job_stream(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    query: Result<Query<StreamQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let Query(query) = query?;
    state.queue.job(&id).await?;
    let after = resume_point(&headers, query.last_event_id)?;
    let filter = EventFilter {
        job_id: Some(id),
        kinds: parse_types(query.types.as_deref())?,
    };
    Ok(sse(state, filter, after, true))
}

fn resume_point(headers: &HeaderMap, from_query: Option<i64>) -> Result<i64, ApiError> {
    match headers.get("last-event-id") {
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|text| text.trim().parse::<i64>().ok())
            .ok_or_else(|| ApiError::bad_request("Last-Event-ID must be an event sequence number")),
        None => Ok(from_query.unwrap_or(0)),
    }
}

fn parse_types(types: Option<&str>) -> Result<Vec<EventKind>, ApiError> {
    let Some(types) = types else {
        return Ok(Vec::new());
    };
    types
        .split(',')
        .filter(|t| !t.trim().is_empty())
        .map(|t| {
            EventKind::from_name(t.trim())
                .ok_or_else(|| ApiError::bad_request(format!("unknown event type `{t}`")))
        })
        .collect()
}

fn sse(
    state: AppState,
    filter: EventFilter,
    after: i64,
    end_after_terminal: bool,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let (tx, rx) = mpsc::channel(CLIENT_BUFFER);
    tokio::spawn(feed(state, filter, after, end_after_terminal, tx));
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        let event: Arc<Published> = rx.recv().await?;
        let sse = SseEvent::default()
            .id(event.seq.to_string())
            .event(event.kind.name())
            .data(event.json());
        Some((Ok(sse), rx))
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
}

/// Counts a connected client in the `sse_clients` gauge while alive.
struct ClientGauge(prometheus_client::metrics::gauge::Gauge);

impl ClientGauge {
    fn connect(state: &AppState) -> Self {
        state.metrics.sse_clients.inc();
        ClientGauge(state.metrics.sse_clients.clone())
    }
}

impl Drop for ClientGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Why a feeder stops.
enum Done {
    /// The client went away, or the job's stream reached its end.
    Finished,
}

async fn feed(
    state: AppState,
    filter: EventFilter,
    after: i64,
    end_after_terminal: bool,
    tx: mpsc::Sender<Arc<Published>>,
) {
    let _client = ClientGauge::connect(&state);
    let mut live = state.storage.bus().subscribe();
    let mut last = after;
    if catch_up(&state, &filter, &mut last, end_after_terminal, &tx)
        .await
        .is_err()
    {
        return;
    }
    loop {
        let received = tokio::select! {
            () = state.shutdown.cancelled() => return,
            () = tx.closed() => return,
            received = live.recv() => received,
        };
        let result = match received {
            Ok(event) if event.seq > last && filter.matches(&event) => {
                last = event.seq;
                send(&tx, event, end_after_terminal).await
            }
            Ok(_) => Ok(()),
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::info!(
                    missed,
                    "an SSE client fell behind the bus; catching it up from the log"
                );
                catch_up(&state, &filter, &mut last, end_after_terminal, &tx).await
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if result.is_err() {
            return;
        }
    }
}

/// Sends every logged event after `last` that matches, advancing `last`.
async fn catch_up(
    state: &AppState,
    filter: &EventFilter,
    last: &mut i64,
    end_after_terminal: bool,
    tx: &mpsc::Sender<Arc<Published>>,
) -> Result<(), Done> {
    loop {
        let page = match state
            .storage
            .events_after(*last, filter.clone(), CATCH_UP_PAGE)
            .await
        {
            Ok(page) => page,
            Err(error) => {
                tracing::warn!(%error, "SSE catch-up failed; closing the stream");
                return Err(Done::Finished);
            }
        };
        let full = page.len() == CATCH_UP_PAGE;
        for event in page {
            *last = event.seq;
            send(tx, Arc::new(Published::new(event)), end_after_terminal).await?;
        }
        if !full {
            return Ok(());
        }
    }
}

async fn send(
    tx: &mpsc::Sender<Arc<Published>>,
    event: Arc<Published>,
    end_after_terminal: bool,
) -> Result<(), Done> {
    let terminal = event.kind.is_job_terminal();
    tx.send(event).await.map_err(|_| Done::Finished)?;
    if end_after_terminal && terminal {
        Err(Done::Finished)
    } else {
        Ok(())
    }
}
