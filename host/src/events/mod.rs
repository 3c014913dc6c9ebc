//! The in-process fan-out of events: the [`Bus`], fed by [`fan_out`].
//!
//! Every event is written to the event log by storage in the same transaction
//! as the state change it reports, which gives it its sequence number. A
//! commit only wakes the fan-out, which reads the log by cursor and
//! publishes what it read: subscribers hear events in the log's one order, whichever
//! process committed them. Subscribers (SSE clients, tests, the bench) that
//! fall behind the bus's buffer are told how many batches they missed and
//! catch up from the log, so the queue never waits for them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use bytes::{Bytes, BytesMut};
use tokio::sync::broadcast;

use tokio_util::sync::CancellationToken;

use crate::model::{Event, EventKind};
use crate::storage::Storage;

/// Most events in one batch: a big commit is published as several, so that
/// what the bus keeps stays bounded.
const BATCH_EVENTS: usize = 64;
/// Batches kept in memory for subscribers that are briefly behind: at most
/// 16,384 events per channel, shared between channels.
const BUS_CAPACITY: usize = 256;
/// The same for one job's channel: a job has few events per commit, and a
/// channel per watched job should stay small.
const JOB_CAPACITY: usize = 64;

/// An event as subscribers receive it: shared by all of them, and rendered
/// as an SSE message at most once however many clients send it (a thousand
/// clients each copying and serializing every event cost more than the
/// queue's own work).
#[derive(Debug)]
pub struct Published {
    event: Event,
    sse_message: OnceLock<Bytes>,
}

impl Published {
    pub fn new(event: Event) -> Self {
        Published {
            event,
            sse_message: OnceLock::new(),
        }
    }

    /// The event as `GET /events` sends it: `id:` its sequence number,
    /// `event:` its type, `data:` its JSON (one line: compact JSON escapes
    /// every newline).
    pub fn sse_message(&self) -> &Bytes {
        self.sse_message.get_or_init(|| {
            let json = serde_json::to_string(&self.event).expect("an event always serializes");
            let kind = self.event.kind().name();
            let message = if self.event.live {
                format!("event: {kind}\ndata: {json}\n\n")
            } else {
                format!("id: {}\nevent: {kind}\ndata: {json}\n\n", self.event.seq)
            };
            Bytes::from(message)
        })
    }
}

impl std::ops::Deref for Published {
    type Target = Event;

    fn deref(&self) -> &Event {
        &self.event
    }
}

/// Events of one commit, in order, published together (up to
/// [`BATCH_EVENTS`]): a subscriber wakes once per commit rather than once
/// per event.
#[derive(Debug)]
pub struct Batch {
    events: Vec<Arc<Published>>,
    sse_messages: OnceLock<Bytes>,
}

impl Batch {
    fn new(events: Vec<Arc<Published>>) -> Self {
        Batch {
            events,
            sse_messages: OnceLock::new(),
        }
    }

    pub fn events(&self) -> &[Arc<Published>] {
        &self.events
    }

    /// Every event's SSE message, concatenated once for all the clients
    /// that want the whole batch.
    pub fn sse_messages(&self) -> &Bytes {
        self.sse_messages.get_or_init(|| {
            let mut all = BytesMut::new();
            for event in &self.events {
                all.extend_from_slice(event.sse_message());
            }
            all.freeze()
        })
    }
}

/// Publishes committed events to in-process subscribers. Publishing never
/// blocks: a subscriber that falls more than the buffer behind gets
/// `RecvError::Lagged` and must catch up from the event log.
///
/// Subscribers say what they want to hear about (a [`Topic`]), and each
/// topic has its own channel, so a subscriber wakes only for commits that
/// hold something for it: a thousand clients each watching one job cost
/// nothing when other jobs move.
#[derive(Clone, Default)]
pub struct Bus {
    topics: Arc<Mutex<Topics>>,
}

/// What a subscriber hears about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topic {
    /// Every batch with an event of one of these kinds (all its events).
    Kinds(KindSet),
    /// The events about one job.
    Job(String),
}

/// A set of event kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KindSet(u32);

impl KindSet {
    pub const ALL: KindSet = KindSet(u32::MAX);

    /// The set of `kinds`; empty means all of them.
    pub fn of(kinds: &[EventKind]) -> KindSet {
        if kinds.is_empty() {
            return KindSet::ALL;
        }
        KindSet(kinds.iter().fold(0, |set, &kind| set | KindSet::bit(kind)))
    }

    fn bit(kind: EventKind) -> u32 {
        const { assert!(EventKind::ALL.len() <= 32, "a KindSet is 32 bits") };
        1 << kind as u32
    }

    fn contains(self, kind: EventKind) -> bool {
        self.0 & KindSet::bit(kind) != 0
    }
}

/// One channel per topic somebody listens to.
#[derive(Default)]
struct Topics {
    kinds: Vec<(KindSet, broadcast::Sender<Arc<Batch>>)>,
    jobs: HashMap<String, broadcast::Sender<Arc<Batch>>>,
}

impl Bus {
    /// Publishes the events of one commit.
    pub fn publish(&self, events: impl IntoIterator<Item = Event>) {
        let topics = self.topics.lock().expect("the bus lock is never poisoned");
        let events: Vec<_> = events
            .into_iter()
            .map(|event| Arc::new(Published::new(event)))
            .collect();
        // No subscribers is fine: the log has it.
        if events.is_empty() || (topics.kinds.is_empty() && topics.jobs.is_empty()) {
            return;
        }
        let mut jobs: HashMap<&str, Vec<Arc<Published>>> = HashMap::new();
        if !topics.jobs.is_empty() {
            for event in &events {
                if let Some(job) = event.job_id.as_deref()
                    && topics.jobs.contains_key(job)
                {
                    jobs.entry(job).or_default().push(event.clone());
                }
            }
        }
        for (job, events) in jobs {
            for batch in events.chunks(BATCH_EVENTS) {
                let _ = topics.jobs[job].send(Arc::new(Batch::new(batch.to_vec())));
            }
        }
        for batch in events.chunks(BATCH_EVENTS) {
            let batch = Arc::new(Batch::new(batch.to_vec()));
            for (kinds, sender) in &topics.kinds {
                if batch
                    .events
                    .iter()
                    .any(|event| kinds.contains(event.kind()))
                {
                    let _ = sender.send(batch.clone());
                }
            }
        }
    }

    /// Publishes a live-only event (see [`Event::live`]) on its own.
    pub fn publish_live(&self, event: Event) {
        debug_assert!(event.live);
        self.publish([event]);
    }

    /// Events one at a time, all of them.
    pub fn subscribe(&self) -> Subscription {
        Subscription {
            batches: self.subscribe_batches(Topic::Kinds(KindSet::ALL)),
            batch: None,
            next: 0,
        }
    }

    /// Events a batch (a commit, or part of a big one) at a time: the
    /// batches with something on `topic`.
    pub fn subscribe_batches(&self, topic: Topic) -> BatchSubscription {
        let mut topics = self.topics.lock().expect("the bus lock is never poisoned");
        let receiver = match &topic {
            Topic::Kinds(set) => match topics.kinds.iter().find(|(kinds, _)| kinds == set) {
                Some((_, sender)) => sender.subscribe(),
                None => {
                    let sender = broadcast::Sender::new(BUS_CAPACITY);
                    let receiver = sender.subscribe();
                    topics.kinds.push((*set, sender));
                    receiver
                }
            },
            Topic::Job(id) => topics
                .jobs
                .entry(id.clone())
                .or_insert_with(|| broadcast::Sender::new(JOB_CAPACITY))
                .subscribe(),
        };
        BatchSubscription {
            receiver: Some(receiver),
            topic,
            topics: self.topics.clone(),
        }
    }
}

/// A subscriber's channel for one topic; the channel goes when its last
/// subscriber does.
pub struct BatchSubscription {
    receiver: Option<broadcast::Receiver<Arc<Batch>>>,
    topic: Topic,
    topics: Arc<Mutex<Topics>>,
}

impl BatchSubscription {
    /// The next batch on the topic; cancel-safe.
    pub async fn recv(&mut self) -> Result<Arc<Batch>, broadcast::error::RecvError> {
        self.receiver().recv().await
    }

    pub fn try_recv(&mut self) -> Result<Arc<Batch>, broadcast::error::TryRecvError> {
        self.receiver().try_recv()
    }

    fn receiver(&mut self) -> &mut broadcast::Receiver<Arc<Batch>> {
        self.receiver.as_mut().expect("present until dropped")
    }
}

impl Drop for BatchSubscription {
    fn drop(&mut self) {
        // Under the lock, so that nobody subscribes between dropping the
        // receiver and removing a channel nobody hears.
        let Ok(mut topics) = self.topics.lock() else {
            return;
        };
        drop(self.receiver.take());
        match &self.topic {
            Topic::Kinds(set) => topics
                .kinds
                .retain(|(kinds, sender)| kinds != set || sender.receiver_count() > 0),
            Topic::Job(id) => {
                if topics
                    .jobs
                    .get(id)
                    .is_some_and(|sender| sender.receiver_count() == 0)
                {
                    topics.jobs.remove(id);
                }
            }
        }
    }
}

/// A subscriber's view of the bus one event at a time. `Lagged(n)` counts
/// the batches missed, not events.
pub struct Subscription {
    batches: BatchSubscription,
    batch: Option<Arc<Batch>>,
    next: usize,
}

impl Subscription {
    /// The next event; cancel-safe, as `broadcast::Receiver::recv` is.
    pub async fn recv(&mut self) -> Result<Arc<Published>, broadcast::error::RecvError> {
        loop {
            if let Some(event) = self.next_in_batch() {
                return Ok(event);
            }
            let batch = self.batches.recv().await?;
            self.start(batch);
        }
    }

    pub fn try_recv(&mut self) -> Result<Arc<Published>, broadcast::error::TryRecvError> {
        loop {
            if let Some(event) = self.next_in_batch() {
                return Ok(event);
            }
            let batch = self.batches.try_recv()?;
            self.start(batch);
        }
    }

    fn start(&mut self, batch: Arc<Batch>) {
        self.batch = Some(batch);
        self.next = 0;
    }

    fn next_in_batch(&mut self) -> Option<Arc<Published>> {
        let event = self.batch.as_ref()?.events.get(self.next)?.clone();
        self.next += 1;
        Some(event)
    }
}

/// Most events one read of the log's tail takes.
const TAIL_BATCH: usize = 512;
/// Pause after a failed read of the log before trying again.
const TAIL_RETRY: std::time::Duration = std::time::Duration::from_millis(100);

/// Feeds the bus from the event log, by cursor from `after`: whenever
/// storage says the log grew, reads what follows the cursor and publishes
/// it, in log order. The log is the only source of what subscribers hear
/// (besides live progress reports), as it is when other hosts append to
/// it. The wake-up reads the backend's in-memory tail at once, on the
/// committing thread; when that lacks events, the returned task reads the
/// log itself. When `stop` fires, the task publishes what is committed,
/// then returns.
pub fn fan_out(
    storage: &Arc<Storage>,
    bus: Bus,
    after: i64,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let tail = Arc::new(Tail {
        cursor: Mutex::new(after),
        bus,
        behind: tokio::sync::Notify::new(),
    });
    let store = Arc::downgrade(storage);
    let woken = tail.clone();
    storage.on_append(Arc::new(move || {
        let caught_up = store
            .upgrade()
            .is_some_and(|storage| woken.publish_cached(storage.as_ref()));
        if !caught_up {
            woken.behind.notify_one();
        }
    }));
    tokio::spawn(tail_from_log(storage.clone(), tail, stop))
}

/// Where the fan-out is in the log, and where it publishes.
struct Tail {
    /// The last event published. Held while publishing, so that events go
    /// out once each, in order, whichever path read them.
    cursor: Mutex<i64>,
    bus: Bus,
    /// Notified when the in-memory tail lacked events: the log must be read.
    behind: tokio::sync::Notify,
}

impl Tail {
    /// Publishes what the backend holds in memory after the cursor; false
    /// if it does not hold all of it.
    fn publish_cached(&self, storage: &Storage) -> bool {
        let mut cursor = self.cursor.lock().expect("never poisoned");
        loop {
            match storage.tail_cached(*cursor, TAIL_BATCH) {
                None => return false,
                Some(events) if events.is_empty() => return true,
                Some(events) => {
                    *cursor = events.last().map_or(*cursor, |event| event.seq);
                    self.bus.publish(events);
                }
            }
        }
    }

    /// Publishes the events of a read of the log that follow the cursor
    /// (the other path may have published some meanwhile); whether the
    /// read had any.
    fn publish_read(&self, events: Vec<Event>) -> bool {
        let read_any = !events.is_empty();
        let mut cursor = self.cursor.lock().expect("never poisoned");
        let fresh: Vec<Event> = events.into_iter().filter(|e| e.seq > *cursor).collect();
        if let Some(last) = fresh.last() {
            *cursor = last.seq;
            self.bus.publish(fresh);
        }
        read_any
    }
}

/// Reads the log after the cursor until caught up: at start, whenever the
/// in-memory tail lacked events, and once more when stopping.
async fn tail_from_log(storage: Arc<Storage>, tail: Arc<Tail>, stop: CancellationToken) {
    loop {
        loop {
            let after = *tail.cursor.lock().expect("never poisoned");
            match storage.tail_log(after, TAIL_BATCH).await {
                Ok(events) => {
                    if !tail.publish_read(events) {
                        break;
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "reading the event log failed; trying again");
                    tokio::select! {
                        () = tokio::time::sleep(TAIL_RETRY) => {}
                        () = stop.cancelled() => return,
                    }
                }
            }
        }
        if stop.is_cancelled() {
            return;
        }
        tokio::select! {
            () = tail.behind.notified() => {}
            () = stop.cancelled() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An event of `kind` (with a made-up payload: only kinds matter here).
    fn event(seq: i64, kind: EventKind, job: Option<&str>) -> Event {
        use crate::model::event::*;
        let body = match kind {
            EventKind::JobCreated => EventBody::JobCreated(JobCreated {
                run_at: 0,
                priority: 0,
                phases: vec![],
            }),
            EventKind::JobStarted => EventBody::JobStarted(JobStarted { attempt: 1 }),
            EventKind::JobCompleted => EventBody::JobCompleted(JobCompleted {}),
            EventKind::PluginUploaded => EventBody::PluginUploaded(PluginUploaded {
                plugin: "p".into(),
                version: "1".into(),
                content_hash: String::new(),
                size: 0,
            }),
            other => unreachable!("no test publishes {other}"),
        };
        Event {
            seq,
            job_id: job.map(str::to_owned),
            at: 0,
            body,
            live: false,
        }
    }

    fn seqs(batch: &Batch) -> Vec<i64> {
        batch.events().iter().map(|event| event.seq).collect()
    }

    /// Subscribers hear only the commits with something on their topic: a
    /// job's watcher its job's events, a kind filter whole commits holding
    /// one of its kinds.
    #[test]
    fn subscribers_hear_only_their_topic() {
        let bus = Bus::default();
        let mut job_a = bus.subscribe_batches(Topic::Job("a".into()));
        let mut completions =
            bus.subscribe_batches(Topic::Kinds(KindSet::of(&[EventKind::JobCompleted])));
        let mut everything = bus.subscribe_batches(Topic::Kinds(KindSet::of(&[])));

        bus.publish([
            event(1, EventKind::JobCreated, Some("b")),
            event(2, EventKind::PluginUploaded, None),
        ]);
        bus.publish([
            event(3, EventKind::JobStarted, Some("a")),
            event(4, EventKind::JobCompleted, Some("b")),
            event(5, EventKind::JobCompleted, Some("a")),
        ]);

        assert_eq!(seqs(&job_a.try_recv().unwrap()), [3, 5]);
        assert!(job_a.try_recv().is_err(), "woken for job b");
        assert_eq!(seqs(&completions.try_recv().unwrap()), [3, 4, 5]);
        assert!(
            completions.try_recv().is_err(),
            "woken without a completion"
        );
        assert_eq!(seqs(&everything.try_recv().unwrap()), [1, 2]);
        assert_eq!(seqs(&everything.try_recv().unwrap()), [3, 4, 5]);
    }

    /// A big commit goes out in bounded batches, in order.
    #[test]
    fn a_big_commit_is_published_in_bounded_batches() {
        let bus = Bus::default();
        let mut all = bus.subscribe_batches(Topic::Kinds(KindSet::ALL));
        let commit = 2 * BATCH_EVENTS as i64 + 22;
        bus.publish((0..commit).map(|seq| event(seq, EventKind::JobCreated, None)));
        let mut sizes = Vec::new();
        let mut seen = Vec::new();
        while let Ok(batch) = all.try_recv() {
            sizes.push(batch.events().len());
            seen.extend(seqs(&batch));
        }
        assert_eq!(sizes, [BATCH_EVENTS, BATCH_EVENTS, 22]);
        assert_eq!(seen, (0..commit).collect::<Vec<_>>());
    }

    /// A topic's channel lives as long as somebody listens to it.
    #[test]
    fn a_topic_goes_with_its_last_subscriber() {
        let bus = Bus::default();
        let channels = |bus: &Bus| {
            let topics = bus.topics.lock().unwrap();
            (topics.kinds.len(), topics.jobs.len())
        };
        let first = bus.subscribe_batches(Topic::Job("a".into()));
        let second = bus.subscribe_batches(Topic::Job("a".into()));
        let all = bus.subscribe();
        assert_eq!(channels(&bus), (1, 1));
        drop(first);
        assert_eq!(channels(&bus), (1, 1), "one subscriber still listens");
        drop((second, all));
        assert_eq!(channels(&bus), (0, 0));
    }

    #[tokio::test]
    async fn a_lagging_subscriber_does_not_block_publishing() {
        let bus = Bus::default();
        let mut slow = bus.subscribe();
        let created = |seq| event(seq, EventKind::JobCreated, None);
        // Commits of two events each.
        for commit in 0..BUS_CAPACITY as i64 + 10 {
            bus.publish([created(2 * commit), created(2 * commit + 1)]);
        }
        assert!(matches!(
            slow.recv().await,
            Err(broadcast::error::RecvError::Lagged(10))
        ));
        // The oldest commit kept, event by event, then the next commit.
        for seq in 20..23 {
            assert_eq!(slow.recv().await.unwrap().seq, seq);
        }
    }
}
