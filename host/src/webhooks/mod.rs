//! Durable webhook delivery. Storage writes an outbox row in the same
//! transaction as a job's terminal state; the [`Deliverer`] sends it,
//! signed as the Standard Webhooks specification says, retrying timeouts,
//! connection errors, 5xx and 429 (honouring `Retry-After`) with backoff, and
//! giving up at once on other 4xx. Pending rows survive restarts, and a
//! delivery still completes after retention deleted its job.

mod signing;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use signing::Secret;

use crate::metrics::{Metrics, OutcomeLabel};
use crate::model::BackoffPolicy;
use crate::model::time::now_ms;
use crate::outbound::{AddressPolicy, Refused};
use crate::storage::{AttemptOutcome, Delivery, Storage};

/// Beyond an attempt's timeout, how long its host may take to record it
/// before another host may attempt the delivery again.
const HOLD_MARGIN: Duration = Duration::from_secs(10);
/// Per-attempt timeout unless configured (`--webhook-timeout`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts before a delivery is marked failed, unless configured.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 8;

/// Attempts in flight at once, in all.
const MAX_IN_FLIGHT: usize = 32;
/// Attempts in flight at once to one destination (scheme, host and port):
/// a receiver that hangs holds this many, and the others go on.
const PER_DESTINATION: usize = 4;
/// Due deliveries read per look: enough to find some for other
/// destinations while one is at its cap.
const LOOK_AHEAD: usize = 256;
/// Longest `Retry-After` honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// After a failure to read the outbox or record an attempt, the deliverer
/// waits this long, doubling up to [`MAX_PAUSE`], rather than retry at once.
const FIRST_PAUSE: Duration = Duration::from_millis(100);
const MAX_PAUSE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// Signs deliveries of jobs that gave no secret of their own.
    pub default_secret: Secret,
    /// Per-attempt timeout.
    pub timeout: Duration,
    pub max_attempts: u32,
    pub backoff: BackoffPolicy,
    /// Which addresses deliveries may connect to.
    pub policy: Arc<AddressPolicy>,
}

impl WebhookConfig {
    pub fn new(default_secret: Secret) -> Self {
        WebhookConfig {
            default_secret,
            timeout: DEFAULT_TIMEOUT,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            backoff: BackoffPolicy {
                initial_ms: 1000,
                multiplier: 2.0,
                max_ms: 300_000,
                jitter: true,
            },
            policy: Arc::default(),
        }
    }
}

pub struct Deliverer {
    storage: Arc<Storage>,
    config: WebhookConfig,
    client: reqwest::Client,
    metrics: Arc<Metrics>,
}

/// The attempts in flight: which deliveries, and how many per destination
/// (only destinations with one in flight are kept, so the map stays as
/// small as what is in flight, whatever URLs submitters chose).
#[derive(Default)]
struct InFlight {
    tasks: HashMap<tokio::task::Id, (String, String)>,
    deliveries: HashSet<String>,
    per_destination: HashMap<String, usize>,
}

impl InFlight {
    fn admits(&self, delivery: &str, destination: &str) -> bool {
        !self.deliveries.contains(delivery)
            && self.per_destination.get(destination).copied().unwrap_or(0) < PER_DESTINATION
    }

    fn start(&mut self, task: tokio::task::Id, delivery: String, destination: String) {
        self.deliveries.insert(delivery.clone());
        *self.per_destination.entry(destination.clone()).or_default() += 1;
        self.tasks.insert(task, (delivery, destination));
    }

    /// Forgets a task that ended, however it ended.
    fn end(&mut self, task: tokio::task::Id) {
        let Some((delivery, destination)) = self.tasks.remove(&task) else {
            return;
        };
        self.deliveries.remove(&delivery);
        if let Some(count) = self.per_destination.get_mut(&destination) {
            *count -= 1;
            if *count == 0 {
                self.per_destination.remove(&destination);
            }
        }
    }
}

impl Deliverer {
    pub fn new(
        storage: Arc<Storage>,
        config: WebhookConfig,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        crate::tls::init();
        let client = config
            .policy
            .client()
            .timeout(config.timeout)
            .user_agent(concat!("jobhost/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Deliverer {
            storage,
            config,
            client,
            metrics,
        })
    }

    /// How long a delivery this host took is not attempted by another host
    /// sharing the database: its attempt's timeout, and time to record it.
    fn hold(&self) -> Duration {
        self.config.timeout + HOLD_MARGIN
    }

    /// Delivers due webhooks until `stop` is cancelled. Attempts run
    /// concurrently, at most [`PER_DESTINATION`] per destination. Attempts
    /// in flight at the stop are abandoned: their deliveries stay pending in
    /// the outbox and go out after the next start.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        // Each task says whether its attempt was recorded.
        let mut tasks: JoinSet<bool> = JoinSet::new();
        let mut in_flight = InFlight::default();
        let mut pause = Duration::ZERO;
        loop {
            if !pause.is_zero() {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(pause) => {}
                }
            }
            match self.storage.due_webhooks(now_ms(), LOOK_AHEAD).await {
                Ok(due) => {
                    for delivery in due {
                        if tasks.len() >= MAX_IN_FLIGHT {
                            break;
                        }
                        let destination = destination(&delivery.url);
                        if !in_flight.admits(&delivery.id, &destination) {
                            continue;
                        }
                        // Another host sharing the database may take it.
                        match self
                            .storage
                            .take_webhook(&delivery, now_ms(), self.hold())
                            .await
                        {
                            Ok(true) => {}
                            Ok(false) => continue,
                            Err(error) => {
                                tracing::warn!(%error, "taking a webhook delivery failed");
                                continue;
                            }
                        }
                        let id = delivery.id.clone();
                        let deliverer = self.clone();
                        let task = tasks.spawn(async move { deliverer.attempt(delivery).await });
                        in_flight.start(task.id(), id, destination);
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "reading the webhook outbox failed");
                    pause = next_pause(pause);
                    continue;
                }
            }
            // Deliveries due now are in flight or wait for their
            // destination: an attempt ending wakes the loop for them.
            let next = self.storage.next_webhook_at().await.ok().flatten();
            let timer = async {
                match next {
                    Some(at) if at > now_ms() => {
                        tokio::time::sleep(Duration::from_millis((at - now_ms()).max(0) as u64))
                            .await
                    }
                    _ => std::future::pending().await,
                }
            };
            tokio::select! {
                () = stop.cancelled() => return,
                () = timer => {}
                () = self.storage.webhook_added() => {}
                Some(ended) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                    let (task, recorded) = match ended {
                        Ok((task, recorded)) => (task, recorded),
                        Err(error) => (error.id(), false),
                    };
                    in_flight.end(task);
                    pause = if recorded { Duration::ZERO } else { next_pause(pause) };
                }
            }
        }
    }

    /// Makes one attempt and records it; false when recording failed.
    async fn attempt(&self, delivery: Delivery) -> bool {
        let outcome = self.send(&delivery).await;
        let label = match &outcome {
            AttemptOutcome::Delivered { .. } => "delivered",
            AttemptOutcome::Retry { .. } => "retry",
            AttemptOutcome::Failed { .. } => "failed",
        };
        self.metrics
            .webhook_attempts
            .get_or_create(&OutcomeLabel {
                outcome: label.into(),
            })
            .inc();
        match &outcome {
            AttemptOutcome::Delivered { status } => {
                tracing::info!(webhook = %delivery.id, job = %delivery.job_id, status, "webhook delivered")
            }
            AttemptOutcome::Retry { error, .. } => {
                tracing::info!(webhook = %delivery.id, job = %delivery.job_id, %error, "webhook attempt failed; will retry")
            }
            AttemptOutcome::Failed { error, .. } => {
                tracing::warn!(webhook = %delivery.id, job = %delivery.job_id, %error, "webhook delivery failed")
            }
        }
        match self
            .storage
            .record_webhook_attempt(delivery, outcome, now_ms())
            .await
        {
            Ok(()) => true,
            Err(error) => {
                tracing::warn!(%error, "recording a webhook attempt failed; it will be retried");
                false
            }
        }
    }

    async fn send(&self, delivery: &Delivery) -> AttemptOutcome {
        let secret = match delivery.secret.as_deref().map(Secret::parse) {
            Some(Ok(secret)) => secret,
            Some(Err(error)) => {
                return AttemptOutcome::Failed {
                    status: None,
                    error,
                };
            }
            None => self.config.default_secret.clone(),
        };
        let Ok(url) = reqwest::Url::parse(&delivery.url) else {
            return AttemptOutcome::Failed {
                status: None,
                error: "invalid url".into(),
            };
        };
        if let Err(refused) = self.config.policy.check_url(&url) {
            tracing::warn!(webhook = %delivery.id, job = %delivery.job_id, %refused, "webhook refused");
            return AttemptOutcome::Failed {
                status: None,
                error: REFUSED.into(),
            };
        }
        let timestamp = now_ms() / 1000;
        let response = self
            .client
            .post(url)
            .header("content-type", "application/json")
            .header("webhook-id", &delivery.id)
            .header("webhook-timestamp", timestamp.to_string())
            .header(
                "webhook-signature",
                secret.sign(&delivery.id, timestamp, &delivery.body),
            )
            .body(delivery.body.clone())
            .send()
            .await;
        let attempts = delivery.attempts + 1;
        let (status, error, retry_after) = match response {
            Ok(response) if response.status().is_success() => {
                return AttemptOutcome::Delivered {
                    status: response.status().as_u16(),
                };
            }
            Ok(response) => {
                let status = response.status();
                let retryable = status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS;
                if !retryable {
                    return AttemptOutcome::Failed {
                        status: Some(status.as_u16()),
                        error: format!("http {}", status.as_u16()),
                    };
                }
                (
                    Some(status.as_u16()),
                    format!("http {}", status.as_u16()),
                    retry_after(&response),
                )
            }
            Err(error) => {
                tracing::info!(webhook = %delivery.id, job = %delivery.job_id, error = %error_chain(&error), "webhook request failed");
                let category = category(&error);
                if category == REFUSED {
                    return AttemptOutcome::Failed {
                        status: None,
                        error: category.into(),
                    };
                }
                (None, category.into(), None)
            }
        };
        if attempts >= self.config.max_attempts {
            return AttemptOutcome::Failed {
                status,
                error: format!("{error} (gave up after {attempts} attempts)"),
            };
        }
        let delay =
            retry_after.unwrap_or_else(|| self.config.backoff.delay(attempts, fastrand::f64()));
        AttemptOutcome::Retry {
            status,
            error,
            next_attempt_at: now_ms() + delay.as_millis() as i64,
        }
    }
}

/// `Retry-After` in seconds (the HTTP-date form is treated as absent).
fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    let seconds: u64 = response
        .headers()
        .get("retry-after")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(seconds).min(MAX_RETRY_AFTER))
}

/// What readers of a job (and its events) are told went wrong: a
/// category, never the error's text, which could tell a submitter about
/// the host's network. The details go to the log.
const REFUSED: &str = "refused by policy";

fn category(error: &reqwest::Error) -> &'static str {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(cause) = source {
        if cause.is::<Refused>() {
            return REFUSED;
        }
        source = cause.source();
    }
    if error.is_timeout() {
        "timeout"
    } else if error.is_connect() {
        "connect"
    } else {
        "request"
    }
}

fn error_chain(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Where a delivery goes, for the per-destination cap: scheme, host, port.
fn destination(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(url) => format!(
            "{}://{}:{}",
            url.scheme(),
            url.host_str().unwrap_or_default(),
            url.port_or_known_default().unwrap_or_default()
        ),
        Err(_) => url.to_owned(),
    }
}

fn next_pause(pause: Duration) -> Duration {
    (pause * 2).clamp(FIRST_PAUSE, MAX_PAUSE)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// In-flight bookkeeping caps each destination and forgets it once
    /// nothing is in flight there.
    #[tokio::test]
    async fn in_flight_caps_destinations_and_forgets_them() {
        let mut tasks = JoinSet::new();
        let mut in_flight = InFlight::default();
        let mut ids = Vec::new();
        for n in 0..PER_DESTINATION {
            let delivery = format!("msg_{n}");
            assert!(in_flight.admits(&delivery, "http://a:80"));
            let task = tasks.spawn(async {});
            in_flight.start(task.id(), delivery, "http://a:80".into());
            ids.push(task.id());
        }
        assert!(
            !in_flight.admits("msg_more", "http://a:80"),
            "the destination is at its cap"
        );
        assert!(
            !in_flight.admits("msg_0", "http://b:80"),
            "a delivery runs once"
        );
        assert!(in_flight.admits("msg_more", "http://b:80"));
        for id in ids {
            in_flight.end(id);
        }
        assert!(in_flight.per_destination.is_empty() && in_flight.deliveries.is_empty());
    }
}
