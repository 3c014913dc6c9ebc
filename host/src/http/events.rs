//! Server-Sent Events: `GET /events` and `GET /jobs/{id}/events`.
//!
//! Each client gets a feeder task that subscribes to the bus *before*
//! reading the event log, replays what the client missed (after
//! `Last-Event-ID`), then forwards live events, skipping any it already
//! sent. A client too slow for the bus's buffer is caught up from the log,
//! never silently skipped; its slowness blocks only its own feeder. Under
//! load a client's new events wait briefly for more and go out as one
//! write (see [`linger`]).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::body::Body;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;

use axum::Extension;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use utoipa::IntoParams;

use super::{ApiError, AppState};
use crate::events::{Batch, KindSet, Published, Topic};
use crate::model::{Event, EventKind};
use crate::queue::QueueError;
use crate::storage::EventFilter;

/// Events read from the log per query while catching up.
const CATCH_UP_PAGE: usize = 500;
/// Chunks (a commit's worth of SSE messages or more each) buffered between
/// a feeder and its client.
const CLIENT_BUFFER: usize = 64;
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// A client whose buffer stays full this long is dropped.
const STALLED_CLIENT: Duration = Duration::from_secs(30);
/// Socket writes per second that all SSE clients together should cost at
/// most while events arrive faster than that (see [`linger`]).
const SSE_WRITES_PER_SECOND: f64 = 40_000.0;

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
/// type) and `data:` (the event as JSON). A new stream starts now: its
/// first message is only an `id:` at the newest event, so that a client
/// that reconnects before anything happens misses nothing. Send
/// `Last-Event-ID` (or the `last_event_id` parameter) to resume: missed
/// events are replayed from the log, then live ones follow, with no gap and
/// no duplicate; `0` replays the whole retained log. `job:phase:progress`
/// is live only: it has no `id:` and is not replayed.
#[utoipa::path(get, path = "/events", operation_id = "stream_events", tag = "events",
    params(StreamQuery, ("Last-Event-ID" = Option<i64>, Header, description = "Resume after this event")),
    responses(
        (status = 200, description = "An event stream", content_type = "text/event-stream", body = Event),
        (status = 400, description = "An unknown event type, or a Last-Event-ID that is not a number", body = super::ErrorBody),
        (status = 429, description = "This address has its most streams open", body = super::ErrorBody),
        (status = 503, description = "The server has its most streams open", body = super::ErrorBody),
    ))]
pub async fn stream(
    State(state): State<AppState>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    query: Result<Query<StreamQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query?;
    let permit = state.streams.admit(peer_ip(peer))?;
    let filter = EventFilter {
        job_id: query.job,
        kinds: parse_types(query.types.as_deref())?,
    };
    let start = match resume_point(&headers, query.last_event_id)? {
        Some(after) => Start::After(after),
        None => Start::Now(state.queue.last_event_seq().await?),
    };
    Ok(sse(state, permit, filter, start, false))
}

/// Stream one job's events (SSE); the stream ends with the job: after its
/// terminal event, even when `types` leaves that event out, and at once
/// when resumed after it.
#[utoipa::path(get, path = "/jobs/{id}/events", operation_id = "stream_job_events", tag = "events",
    params(("id" = String, Path), StreamQuery, ("Last-Event-ID" = Option<i64>, Header)),
    responses(
        (status = 200, description = "An event stream", content_type = "text/event-stream", body = Event),
        (status = 400, description = "An unknown event type, or a Last-Event-ID that is not a number", body = super::ErrorBody),
        (status = 404, body = super::ErrorBody),
        (status = 429, description = "This address has its most streams open", body = super::ErrorBody),
        (status = 503, description = "The server has its most streams open", body = super::ErrorBody),
    ))]
pub async fn job_stream(
    State(state): State<AppState>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    query: Result<Query<StreamQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query?;
    let permit = state.streams.admit(peer_ip(peer))?;
    // Only whether the job exists: a thousand watchers connecting at once
    // should not load a thousand jobs whole.
    state.queue.job_status(&id).await?;
    // A job's stream starts at the job's first event.
    let after = resume_point(&headers, query.last_event_id)?.unwrap_or(0);
    let filter = EventFilter {
        job_id: Some(id),
        kinds: parse_types(query.types.as_deref())?,
    };
    Ok(sse(state, permit, filter, Start::After(after), true))
}

fn peer_ip(peer: Option<Extension<ConnectInfo<SocketAddr>>>) -> Option<IpAddr> {
    peer.map(|Extension(ConnectInfo(address))| address.ip().to_canonical())
}

/// Where a stream starts.
#[derive(Debug, Clone, Copy)]
enum Start {
    /// After this event, as a resuming client asked.
    After(i64),
    /// After the newest event, announced to the client as its first message.
    Now(i64),
}

fn resume_point(headers: &HeaderMap, from_query: Option<i64>) -> Result<Option<i64>, ApiError> {
    match headers.get("last-event-id") {
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|text| text.trim().parse::<i64>().ok())
            .map(Some)
            .ok_or_else(|| ApiError::bad_request("Last-Event-ID must be an event sequence number")),
        None => Ok(from_query),
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

/// The SSE response. Messages are rendered once per event and shared by
/// every client (axum's `Sse` would frame each event again per client,
/// which a thousand clients pay a thousand times); the feeder sends a
/// client a commit's worth of events or more as one chunk.
fn sse(
    state: AppState,
    permit: StreamPermit,
    filter: EventFilter,
    start: Start,
    end_after_terminal: bool,
) -> Response {
    let (tx, rx) = mpsc::channel(CLIENT_BUFFER);
    tokio::spawn(async move {
        // Held while the feeder runs: the stream counts against the caps.
        let _permit = permit;
        feed(state, filter, start, end_after_terminal, tx).await;
    });
    let chunks = futures::stream::unfold(rx, |mut rx| async move {
        let chunk = match tokio::time::timeout(KEEP_ALIVE, rx.recv()).await {
            Ok(chunk) => chunk?,
            // An SSE comment, so that proxies keep an idle stream open.
            Err(_idle) => Bytes::from_static(b":\n\n"),
        };
        Some((Ok::<_, Infallible>(chunk), rx))
    });
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(chunks),
    )
        .into_response()
}

/// Caps on concurrent SSE streams, in all and per client address, so that
/// idle streams cannot take every file descriptor of the server. A stream
/// over a cap is refused at once with 503 (in all) or 429 (per address).
#[derive(Debug)]
pub struct StreamLimits {
    max_total: usize,
    max_per_ip: usize,
    open: Mutex<OpenStreams>,
}

#[derive(Debug, Default)]
struct OpenStreams {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

impl StreamLimits {
    pub fn new(max_total: usize, max_per_ip: usize) -> Arc<Self> {
        Arc::new(StreamLimits {
            max_total,
            max_per_ip,
            open: Mutex::default(),
        })
    }

    fn admit(self: &Arc<Self>, ip: Option<IpAddr>) -> Result<StreamPermit, ApiError> {
        let mut open = self.open.lock().expect("never poisoned");
        if open.total >= self.max_total {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_streams",
                format!(
                    "the server has {} event streams open, its limit; try again later",
                    self.max_total
                ),
            )
            .closing());
        }
        if let Some(ip) = ip {
            let count = open.per_ip.entry(ip).or_default();
            if *count >= self.max_per_ip {
                return Err(ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_streams",
                    format!(
                        "{ip} has {} event streams open, the limit per address",
                        self.max_per_ip
                    ),
                )
                .closing());
            }
            *count += 1;
        }
        open.total += 1;
        Ok(StreamPermit {
            limits: self.clone(),
            ip,
        })
    }
}

/// One open stream, counted until dropped.
pub struct StreamPermit {
    limits: Arc<StreamLimits>,
    ip: Option<IpAddr>,
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let mut open = self.limits.open.lock().expect("never poisoned");
        open.total -= 1;
        if let Some(ip) = self.ip
            && let Some(count) = open.per_ip.get_mut(&ip)
        {
            *count -= 1;
            if *count == 0 {
                open.per_ip.remove(&ip);
            }
        }
    }
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
    start: Start,
    end_after_terminal: bool,
    tx: mpsc::Sender<Bytes>,
) {
    let (after, announce) = match start {
        Start::After(after) => (after, None),
        Start::Now(head) => (head, Some(Bytes::from(format!("id: {head}\n\n")))),
    };
    let _client = ClientGauge::connect(&state);
    let topic = match &filter.job_id {
        Some(job) => Topic::Job(job.clone()),
        None => Topic::Kinds(KindSet::of(&filter.kinds)),
    };
    let mut live = state.queue.bus().subscribe_batches(topic);
    let mut client = Client {
        filter,
        last: after,
        end_after_terminal,
        tx,
        shutdown: state.shutdown.clone(),
        pending: announce.into_iter().collect(),
        busy_in_second: 0,
        ended: false,
        flushed_at: None,
    };
    if client.catch_up(&state).await.is_err() {
        return;
    }
    if let Some(job) = client.filter.job_id.clone()
        && client.end_after_terminal
        && job_has_ended(&state, &job).await
    {
        // The client resumed after the job's end, or the job ended since
        // the log was read: then the event that ended it is in the log now.
        let _ = client.catch_up(&state).await;
        return;
    }
    loop {
        let received = tokio::select! {
            () = state.shutdown.cancelled() => return,
            () = client.tx.closed() => return,
            received = live.recv() => received,
        };
        if client.receive(received, &state).await.is_err() {
            return;
        }
        // Under load, wait out the linger without waking for each commit,
        // then take everything that arrived meanwhile.
        if let Some(at) = client.flush_at(linger(&state))
            && at > Instant::now()
            && !client.ended
        {
            tokio::select! {
                () = state.shutdown.cancelled() => return,
                () = client.tx.closed() => return,
                () = tokio::time::sleep_until(at.into()) => {}
            }
        }
        loop {
            match live.try_recv() {
                Ok(batch) => {
                    if client.receive(Ok(batch), &state).await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::TryRecvError::Empty) => break,
                Err(broadcast::error::TryRecvError::Lagged(missed)) => {
                    let lagged = Err(broadcast::error::RecvError::Lagged(missed));
                    if client.receive(lagged, &state).await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::TryRecvError::Closed) => return,
            }
        }
        let sending = !client.pending.is_empty();
        if client.flush().await.is_err() {
            return;
        }
        if sending {
            state.sse_activity.count_busy(&mut client.busy_in_second);
        }
    }
}

/// How long a client's new events may wait for more before they are sent,
/// once it has just been sent some: longer the more clients are busy (were
/// sent live events in the last second or two), so that all of them
/// together cost at most about [`SSE_WRITES_PER_SECOND`] socket writes
/// (the linger grows with the busy clients). A client that has not been
/// sent anything for that long gets new events at once. Clients that are
/// connected but quiet (watching a job that waits) do not count: they cost
/// no writes, and would otherwise hold back everybody else's events.
/// Against no lingering, this trades a little delay for much more job
/// throughput when many clients receive every completion (BENCHMARKS.md,
/// "SSE fan-out", has the figures and the budgets tried).
fn linger(state: &AppState) -> Duration {
    let busy = state.sse_activity.busy_clients().max(1);
    Duration::from_secs_f64(busy as f64 / SSE_WRITES_PER_SECOND)
}

/// How many SSE clients are busy: each is counted once in every second in
/// which it is sent live events.
#[derive(Default)]
pub struct SseActivity {
    /// The second (since the Unix epoch) the counts are for.
    second: AtomicU64,
    /// Busy clients, by the parity of the second: the current one and the
    /// one before.
    busy: [AtomicU64; 2],
}

impl SseActivity {
    /// Counts a client that was just sent live events, once per second;
    /// `counted_in` is the second it was last counted in.
    fn count_busy(&self, counted_in: &mut u64) {
        self.count_busy_at(current_second(), counted_in);
    }

    /// Clients busy in the current second or the one before.
    fn busy_clients(&self) -> u64 {
        self.busy_clients_at(current_second())
    }

    fn count_busy_at(&self, second: u64, counted_in: &mut u64) {
        self.turn_to(second);
        if *counted_in != second {
            *counted_in = second;
            self.busy[(second % 2) as usize].fetch_add(1, Ordering::Relaxed);
        }
    }

    fn busy_clients_at(&self, second: u64) -> u64 {
        self.turn_to(second);
        let [even, odd] = &self.busy;
        even.load(Ordering::Relaxed)
            .max(odd.load(Ordering::Relaxed))
    }

    /// Empties the counts of the seconds that have passed. The second only
    /// moves forward; a caller that read the clock just before it turned
    /// counts in the second before, which is still counted. (A client
    /// counted just as another empties its bucket can be missed: the count
    /// is an estimate, and one client more or less does not matter.)
    fn turn_to(&self, second: u64) {
        let last = self.second.fetch_max(second, Ordering::Relaxed);
        if second > last {
            self.busy[(second % 2) as usize].store(0, Ordering::Relaxed);
            if second > last + 1 {
                self.busy[((second + 1) % 2) as usize].store(0, Ordering::Relaxed);
            }
        }
    }
}

fn current_second() -> u64 {
    crate::model::time::now_ms() as u64 / 1000
}

/// Whether a job's stream ends with this event: the job ended, or it is gone.
fn ends_job(kind: EventKind) -> bool {
    kind.is_job_terminal() || kind == EventKind::JobDeleted
}

/// Whether the job has ended (or is gone).
async fn job_has_ended(state: &AppState, id: &str) -> bool {
    match state.queue.job_status(id).await {
        Ok(status) => status.is_terminal(),
        Err(QueueError::NotFound(_)) => true,
        Err(_) => false,
    }
}

/// What a feeder knows about its client.
struct Client {
    filter: EventFilter,
    /// The last event taken for the client.
    last: i64,
    end_after_terminal: bool,
    tx: mpsc::Sender<Bytes>,
    shutdown: CancellationToken,
    /// SSE messages taken and not yet sent.
    pending: Vec<Bytes>,
    /// The second it was last counted busy in ([`SseActivity`]).
    busy_in_second: u64,
    /// A job's stream has taken its terminal event.
    ended: bool,
    flushed_at: Option<Instant>,
}

impl Client {
    /// Takes a commit from the bus, or, when the client fell behind it,
    /// sends what it missed from the log.
    async fn receive(
        &mut self,
        received: Result<Arc<Batch>, broadcast::error::RecvError>,
        state: &AppState,
    ) -> Result<(), Done> {
        match received {
            Ok(batch) => {
                self.take_batch(&batch);
                Ok(())
            }
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::info!(
                    missed,
                    "an SSE client fell behind the bus; catching it up from the log"
                );
                self.catch_up(state).await
            }
            Err(broadcast::error::RecvError::Closed) => Err(Done::Finished),
        }
    }

    /// Sends every logged event after `last` that matches.
    async fn catch_up(&mut self, state: &AppState) -> Result<(), Done> {
        // A job's stream reads all the job's events, whatever kinds it asked
        // for, so that it sees the job end even when that event is not one
        // of them.
        let filter = EventFilter {
            job_id: self.filter.job_id.clone(),
            kinds: if self.end_after_terminal {
                Vec::new()
            } else {
                self.filter.kinds.clone()
            },
        };
        let mut read_up_to = self.last;
        loop {
            let page = match state
                .queue
                .events_after(read_up_to, filter.clone(), CATCH_UP_PAGE)
                .await
            {
                Ok(page) => page,
                Err(error) => {
                    tracing::warn!(%error, "SSE catch-up failed; closing the stream");
                    return Err(Done::Finished);
                }
            };
            let full = page.len() == CATCH_UP_PAGE;
            if let Some(newest) = page.last() {
                read_up_to = newest.seq;
            }
            let page: Vec<_> = page.into_iter().map(Published::new).collect();
            self.take(page.iter());
            self.flush().await?;
            if !full {
                return Ok(());
            }
        }
    }

    /// Live-only events have no place in the log's order: a client takes
    /// each one it hears, and its resume point stays where it was.
    fn wants(&self, event: &Event) -> bool {
        !self.ended && (event.live || event.seq > self.last) && self.filter.matches(event)
    }

    /// Takes the messages of a commit's events that the client wants: the
    /// batch's shared chunk when that is all of them.
    fn take_batch(&mut self, batch: &Batch) {
        let events = batch.events();
        if !self.end_after_terminal && events.iter().all(|event| self.wants(event) && !event.live) {
            if let Some(newest) = events.last() {
                self.last = newest.seq;
                self.pending.push(batch.sse_messages().clone());
            }
        } else {
            self.take(events.iter().map(|event| &**event));
        }
    }

    /// Takes the messages of the `events` the client wants, and notes
    /// whether the last of them ends a job's stream (whether it wants that
    /// one or not).
    fn take<'a>(&mut self, events: impl Iterator<Item = &'a Published>) {
        let mut messages = BytesMut::new();
        for event in events {
            if self.ended {
                // A retry after the job's end: the job goes on, and so does
                // its stream (replaying a retried job's history). Anything
                // else after the end (its webhook's outcome) is not sent.
                if event.kind() != EventKind::JobRetrying {
                    continue;
                }
                self.ended = false;
            }
            if self.wants(event) {
                if !event.live {
                    self.last = event.seq;
                }
                messages.extend_from_slice(event.sse_message());
            }
            if self.end_after_terminal && ends_job(event.kind()) {
                self.ended = true;
            }
        }
        if !messages.is_empty() {
            self.pending.push(messages.freeze());
        }
    }

    /// When the pending messages are due, if there are any.
    fn flush_at(&self, linger: Duration) -> Option<Instant> {
        if self.pending.is_empty() {
            return None;
        }
        Some(self.flushed_at.map_or_else(Instant::now, |at| at + linger))
    }

    /// Sends the pending messages as one chunk.
    async fn flush(&mut self) -> Result<(), Done> {
        let chunk = match self.pending.len() {
            0 => None,
            1 => self.pending.pop(),
            _ => {
                let mut chunk = BytesMut::new();
                for messages in self.pending.drain(..) {
                    chunk.extend_from_slice(&messages);
                }
                Some(chunk.freeze())
            }
        };
        if let Some(chunk) = chunk {
            self.flushed_at = Some(Instant::now());
            // A client that stopped reading must not hold up shutdown, nor
            // its feeder and stream slot for long: it is dropped, and can
            // resume with `Last-Event-ID`.
            tokio::select! {
                sent = self.tx.send(chunk) => sent.map_err(|_| Done::Finished)?,
                () = self.shutdown.cancelled() => return Err(Done::Finished),
                () = tokio::time::sleep(STALLED_CLIENT) => {
                    tracing::info!("dropping an SSE client that stopped reading");
                    return Err(Done::Finished);
                }
            }
        }
        if self.ended {
            Err(Done::Finished)
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client counts once per second it is busy in, for that second and
    /// the next; after that it no longer counts.
    #[test]
    fn busy_clients_are_those_sent_events_in_the_last_second_or_two() {
        let activity = SseActivity::default();
        let (mut first, mut second) = (0, 0);
        activity.count_busy_at(100, &mut first);
        activity.count_busy_at(100, &mut first);
        activity.count_busy_at(100, &mut second);
        assert_eq!(activity.busy_clients_at(100), 2, "each client once");
        assert_eq!(
            activity.busy_clients_at(101),
            2,
            "still busy a second later"
        );
        activity.count_busy_at(101, &mut first);
        assert_eq!(activity.busy_clients_at(102), 1, "only the one busy in 101");
        assert_eq!(
            activity.busy_clients_at(104),
            0,
            "nobody after a quiet while"
        );
    }
}
