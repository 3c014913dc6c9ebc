//! Retry policy: when a failed attempt runs again. A pure function of the
//! policy, the attempt number and a jitter sample, so it is tested without
//! clocks or randomness.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Exponential backoff: `initial_ms * multiplier^(attempt-1)`, capped at
/// `max_ms`; with `jitter`, a uniformly random delay between half of that
/// and all of it, so retries of many jobs do not arrive in lockstep.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct BackoffPolicy {
    #[schema(minimum = 0, maximum = 604_800_000)]
    pub initial_ms: u64,
    #[schema(minimum = 1, maximum = 100)]
    pub multiplier: f64,
    #[schema(minimum = 0, maximum = 604_800_000)]
    pub max_ms: u64,
    pub jitter: bool,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        BackoffPolicy {
            initial_ms: 500,
            multiplier: 2.0,
            max_ms: 60_000,
            jitter: true,
        }
    }
}

impl BackoffPolicy {
    /// Checks the numbers make sense; the message names the bad field.
    pub fn validate(&self) -> Result<(), String> {
        if !(1.0..=100.0).contains(&self.multiplier) {
            return Err("backoff.multiplier must be between 1 and 100".into());
        }
        let most = super::limits::MAX_BACKOFF_MS;
        if self.max_ms > most {
            return Err(format!("backoff.max_ms must be at most {most}"));
        }
        if self.initial_ms > self.max_ms {
            return Err("backoff.initial_ms must not exceed backoff.max_ms".into());
        }
        Ok(())
    }

    /// The delay before attempt `failed_attempt + 1`. `jitter_sample` is a
    /// uniform sample in [0, 1), used only when the policy has jitter.
    pub fn delay(&self, failed_attempt: u32, jitter_sample: f64) -> Duration {
        let exponent = failed_attempt.saturating_sub(1).min(1000) as i32;
        let raw = self.initial_ms as f64 * self.multiplier.powi(exponent);
        let capped = raw.min(self.max_ms as f64);
        let ms = if self.jitter {
            capped * (0.5 + 0.5 * jitter_sample.clamp(0.0, 1.0))
        } else {
            capped
        };
        Duration::from_millis(ms as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(jitter: bool) -> BackoffPolicy {
        BackoffPolicy {
            initial_ms: 100,
            multiplier: 2.0,
            max_ms: 1000,
            jitter,
        }
    }

    #[test]
    fn grows_exponentially_then_caps() {
        let delays: Vec<u64> = (1..=6)
            .map(|a| policy(false).delay(a, 0.7).as_millis() as u64)
            .collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn jitter_stays_between_half_and_full() {
        assert_eq!(policy(true).delay(3, 0.0), Duration::from_millis(200));
        assert_eq!(policy(true).delay(3, 0.5), Duration::from_millis(300));
        assert!(policy(true).delay(3, 0.999_999) <= Duration::from_millis(400));
    }

    #[test]
    fn huge_attempt_numbers_do_not_overflow() {
        assert_eq!(
            policy(false).delay(u32::MAX, 0.0),
            Duration::from_millis(1000)
        );
    }

    #[test]
    fn rejects_nonsense() {
        let bad = BackoffPolicy {
            multiplier: 0.5,
            ..policy(false)
        };
        assert!(bad.validate().unwrap_err().contains("multiplier"));
        let bad = BackoffPolicy {
            initial_ms: 5000,
            ..policy(false)
        };
        assert!(bad.validate().unwrap_err().contains("initial_ms"));
    }
}
