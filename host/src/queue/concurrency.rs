//! The operator's concurrency limits, the load per key (see
//! `storage::concurrency` for how claims honour them), and the load of the
//! plugins with limits (`storage::plugin_limits`).

use crate::model::concurrency::limits::SHOWN_KEYS;
use crate::model::{ConcurrencyLimits, KeyLoad, PluginLoad};

use super::QueueError;

/// The busiest keys, and how many keys have pending or running jobs.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct KeysState {
    /// At most 50, busiest first.
    pub keys: Vec<KeyLoad>,
    pub key_count: u64,
}

impl super::Queue {
    /// Replaces the limits; keys with jobs get their new limit at once,
    /// and claims waiting for room are retried.
    pub async fn set_concurrency_limits(
        &self,
        limits: ConcurrencyLimits,
    ) -> Result<ConcurrencyLimits, QueueError> {
        limits.validate().map_err(QueueError::InvalidLimits)?;
        self.shared
            .storage
            .set_concurrency_limits(limits.clone())
            .await?;
        self.shared.wake.notify_one();
        Ok(limits)
    }

    pub async fn concurrency_limits(&self) -> Result<ConcurrencyLimits, QueueError> {
        Ok(self.shared.storage.concurrency_limits().await?)
    }

    pub async fn keys(&self) -> Result<KeysState, QueueError> {
        let (keys, key_count) = self.shared.storage.key_loads(SHOWN_KEYS).await?;
        Ok(KeysState { keys, key_count })
    }

    /// The plugins with limits: their running phases and waiting jobs.
    pub async fn plugin_loads(&self) -> Result<Vec<PluginLoad>, QueueError> {
        Ok(self.shared.storage.plugin_loads().await?)
    }

    /// Refuses a job whose key's limit is 0: it could never run.
    pub(super) async fn check_key_limit(&self, key: &str) -> Result<(), QueueError> {
        let limits = self.shared.storage.concurrency_limits().await?;
        if limits.limit_of(key) == Some(0) {
            return Err(QueueError::InvalidJob(format!(
                "concurrency_key: the limit of `{key}` is 0, so its jobs cannot run"
            )));
        }
        Ok(())
    }
}
