//! Prometheus metrics (the `prometheus-client` crate), served at `/metrics`.
//! Counters and histograms are updated where things happen; job counts and
//! queue depth are read from storage when scraped, so they are never stale.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub plugin: String,
    /// `completed` or a failure kind (`retry`, `fail`, `timed_out`, …).
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyLabels {
    pub key: String,
    /// `running` or `pending`.
    pub status: String,
}

/// A plugin with limits, and `running` (phases) or `waiting` (jobs).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginStatusLabels {
    pub plugin: String,
    pub status: String,
}

pub struct Metrics {
    registry: Registry,
    pub phase_duration: Family<PhaseLabels, Histogram>,
    pub webhook_attempts: Family<OutcomeLabel, Counter>,
    pub schedule_ticks: Family<OutcomeLabel, Counter>,
    pub sse_clients: Gauge,
    pub jobs: Family<StatusLabel, Gauge>,
    pub queue_depth: Gauge,
    pub running_jobs: Gauge,
    /// Only the busiest keys, so that cardinality stays bounded.
    pub key_jobs: Family<KeyLabels, Gauge>,
    pub keys: Gauge,
    /// Only plugins with limits (uploaded plugins are bounded in number).
    pub plugin_slots: Family<PluginStatusLabels, Gauge>,
    pub log_backlog: Gauge,
    pub log_lag_ms: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("jobhost");
        let phase_duration = Family::<PhaseLabels, Histogram>::new_with_constructor(|| {
            // 1 ms to ~65 s.
            Histogram::new(exponential_buckets(0.001, 2.0, 17))
        });
        registry.register(
            "phase_duration_seconds",
            "Wall time of phase runs",
            phase_duration.clone(),
        );
        let webhook_attempts = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "webhook_attempts",
            "Webhook delivery attempts by outcome (delivered, retry, failed)",
            webhook_attempts.clone(),
        );
        let schedule_ticks = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "schedule_ticks",
            "Schedule fires on this host by outcome (fired, triggered, or why a tick was skipped)",
            schedule_ticks.clone(),
        );
        let sse_clients = Gauge::default();
        registry.register("sse_clients", "Connected SSE clients", sse_clients.clone());
        let jobs = Family::<StatusLabel, Gauge>::default();
        registry.register("jobs", "Stored jobs by status", jobs.clone());
        let queue_depth = Gauge::default();
        registry.register(
            "queue_depth",
            "Pending jobs that are due now",
            queue_depth.clone(),
        );
        let running_jobs = Gauge::default();
        registry.register(
            "running_jobs",
            "Jobs this process is running",
            running_jobs.clone(),
        );
        let log_backlog = Gauge::default();
        registry.register(
            "event_log_backlog",
            "Committed events not yet in the log's order (PostgreSQL: held back by an open transaction)",
            log_backlog.clone(),
        );
        let log_lag_ms = Gauge::default();
        registry.register(
            "event_log_lag_milliseconds",
            "How long the oldest of them has waited",
            log_lag_ms.clone(),
        );
        let key_jobs = Family::<KeyLabels, Gauge>::default();
        registry.register(
            "concurrency_key_jobs",
            "Running and pending jobs of the 50 busiest concurrency keys",
            key_jobs.clone(),
        );
        let keys = Gauge::default();
        registry.register(
            "concurrency_keys",
            "Concurrency keys with running or pending jobs",
            keys.clone(),
        );
        let plugin_slots = Family::<PluginStatusLabels, Gauge>::default();
        registry.register(
            "plugin_limited",
            "Running phases and waiting jobs of each plugin with a limit or a rate",
            plugin_slots.clone(),
        );
        Metrics {
            registry,
            key_jobs,
            keys,
            plugin_slots,
            phase_duration,
            webhook_attempts,
            schedule_ticks,
            sse_clients,
            jobs,
            queue_depth,
            running_jobs,
            log_backlog,
            log_lag_ms,
        }
    }
}

impl Metrics {
    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String");
        text
    }
}
