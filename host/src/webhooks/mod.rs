//! Durable webhook delivery. Storage writes an outbox row in the same
//! transaction as a job's terminal state; the [`Deliverer`] sends it,
//! signed as the Standard Webhooks specification says, retrying timeouts,
//! connection errors, 5xx and 429 (honouring `Retry-After`) with backoff, and
//! giving up at once on other 4xx. Pending rows survive restarts, and a
//! delivery still completes after retention deleted its job.

mod signing;

use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use tokio_util::sync::CancellationToken;

pub use signing::Secret;

use crate::metrics::{Metrics, OutcomeLabel};
use crate::queue::BackoffPolicy;
use crate::storage::{AttemptOutcome, Delivery, Storage};
use crate::time::now_ms;

/// Deliveries attempted concurrently.
const BATCH: usize = 32;
/// Longest `Retry-After` honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// Signs deliveries of jobs that gave no secret of their own.
    pub default_secret: Secret,
    /// Per-attempt timeout.
    pub timeout: Duration,
    pub max_attempts: u32,
    pub backoff: BackoffPolicy,
}

impl WebhookConfig {
    pub fn new(default_secret: Secret) -> Self {
        WebhookConfig {
            default_secret,
            timeout: Duration::from_secs(10),
            max_attempts: 8,
            backoff: BackoffPolicy {
                initial_ms: 1000,
                multiplier: 2.0,
                max_ms: 300_000,
                jitter: true,
            },
        }
    }
}

pub struct Deliverer {
    storage: Arc<Storage>,
    config: WebhookConfig,
    client: reqwest::Client,
    metrics: Arc<Metrics>,
}

impl Deliverer {
    pub fn new(
        storage: Arc<Storage>,
        config: WebhookConfig,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        crate::tls::init();
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("jobhost/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Deliverer {
            storage,
            config,
            client,
            metrics,
        })
    }

    /// Delivers due webhooks until `stop` is cancelled; a batch in flight
    /// is finished first (each attempt is bounded by the timeout).
    pub async fn run(self, stop: CancellationToken) {
        loop {
            let due = match self.storage.due_webhooks(now_ms(), BATCH).await {
                Ok(due) => due,
                Err(error) => {
                    tracing::warn!(%error, "reading the webhook outbox failed");
                    Vec::new()
                }
            };
            let full = due.len() == BATCH;
            futures::future::join_all(due.into_iter().map(|d| self.attempt(d))).await;
            if stop.is_cancelled() {
                return;
            }
            if full {
                continue;
            }
            let next = self.storage.next_webhook_at().await.ok().flatten();
            let timer = async {
                match next {
                    Some(at) => {
                        tokio::time::sleep(Duration::from_millis(
                            at.saturating_sub(now_ms()).max(0) as u64,
                        ))
                        .await
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = stop.cancelled() => return,
                () = timer => {}
                () = self.storage.webhook_added() => {}
            }
        }
    }

    async fn attempt(&self, delivery: Delivery) {
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
        if let Err(error) = self
            .storage
            .record_webhook_attempt(delivery, outcome, now_ms())
            .await
        {
            tracing::warn!(%error, "recording a webhook attempt failed; it will be retried");
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
        let timestamp = now_ms() / 1000;
        let response = self
            .client
            .post(&delivery.url)
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
                        error: format!("the receiver refused the delivery with {status}"),
                    };
                }
                (
                    Some(status.as_u16()),
                    format!("the receiver answered {status}"),
                    retry_after(&response),
                )
            }
            Err(error) => (None, describe(&error), None),
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

fn describe(error: &reqwest::Error) -> String {
    if error.is_timeout() {
        "the receiver did not answer in time".into()
    } else if error.is_connect() {
        "could not connect to the receiver".into()
    } else {
        format!("the request failed: {error}")
    }
}
