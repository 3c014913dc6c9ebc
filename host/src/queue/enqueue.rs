//! Turning a submitted [`JobSpec`] into a [`NewJob`]: every check that can
//! be made before touching storage, each with a message that names the field.

use std::collections::HashSet;

use serde_json::Value;

use super::{JobSpec, QueueConfig};
use crate::storage::{NewJob, NewPhase};
use crate::time::parse_rfc3339;

/// Longest phase name accepted.
const MAX_PHASE_NAME: usize = 64;
const MAX_ATTEMPTS_LIMIT: u32 = 100;
const MAX_IDEMPOTENCY_KEY: usize = 256;

pub(super) fn new_job(spec: JobSpec, config: &QueueConfig, now: i64) -> Result<NewJob, String> {
    if spec.phases.is_empty() {
        return Err("a job needs at least one phase".into());
    }
    if spec.phases.len() > config.max_phases {
        return Err(format!(
            "a job may have at most {} phases, this one has {}",
            config.max_phases,
            spec.phases.len()
        ));
    }
    let mut names = HashSet::new();
    for phase in &spec.phases {
        if phase.name.is_empty() || phase.name.len() > MAX_PHASE_NAME {
            return Err(format!("phase names must be 1-{MAX_PHASE_NAME} characters"));
        }
        if !names.insert(phase.name.as_str()) {
            return Err(format!(
                "two phases are named `{}`: phase names must be unique",
                phase.name
            ));
        }
        if phase.plugin.is_empty() {
            return Err(format!("phase `{}` names no plugin", phase.name));
        }
        if phase.timeout_ms == Some(0) {
            return Err(format!(
                "phase `{}`: timeout_ms must be positive",
                phase.name
            ));
        }
    }
    let payload_size = spec.payload.as_str().len();
    if payload_size > config.max_payload_bytes {
        return Err(format!(
            "the payload is {payload_size} bytes, more than the limit of {}",
            config.max_payload_bytes
        ));
    }
    let max_attempts = spec.max_attempts.unwrap_or(config.default_max_attempts);
    if !(1..=MAX_ATTEMPTS_LIMIT).contains(&max_attempts) {
        return Err(format!(
            "max_attempts must be between 1 and {MAX_ATTEMPTS_LIMIT}"
        ));
    }
    let backoff = spec.backoff.unwrap_or_default();
    backoff.validate()?;
    let run_at = match (spec.delay_ms, &spec.run_at) {
        (Some(_), Some(_)) => return Err("give either delay_ms or run_at, not both".into()),
        (Some(delay), None) => now.saturating_add(delay.min(i64::MAX as u64) as i64),
        (None, Some(at)) => parse_rfc3339(at)?,
        (None, None) => now,
    };
    if let Some(key) = &spec.idempotency_key
        && (key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY)
    {
        return Err(format!(
            "idempotency_key must be 1-{MAX_IDEMPOTENCY_KEY} characters"
        ));
    }
    if let Some(webhook) = &spec.webhook {
        if !(webhook.url.starts_with("http://") || webhook.url.starts_with("https://")) {
            return Err("webhook.url must be an http:// or https:// URL".into());
        }
        if let Some(secret) = &webhook.secret {
            crate::webhooks::Secret::parse(secret).map_err(|e| format!("webhook.secret: {e}"))?;
        }
    }
    let default_timeout = config.default_phase_timeout.as_millis() as u64;
    let phases = spec
        .phases
        .into_iter()
        .map(|p| NewPhase {
            timeout_ms: p
                .timeout_ms
                .unwrap_or(default_timeout)
                .min(config.max_phase_timeout.as_millis() as u64),
            config: p
                .config
                .unwrap_or_else(|| Value::Object(Default::default())),
            name: p.name,
            plugin: p.plugin,
            version: p.version,
        })
        .collect();
    Ok(NewJob {
        id: uuid::Uuid::now_v7().to_string(),
        payload: spec.payload,
        priority: spec.priority,
        run_at,
        max_attempts,
        backoff,
        idempotency_key: spec.idempotency_key,
        webhook_url: spec.webhook.as_ref().map(|w| w.url.clone()),
        webhook_secret: spec.webhook.and_then(|w| w.secret),
        phases,
        created_at: now,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json::Json;
    use crate::queue::PhaseSpec;

    fn spec(phases: &[&str]) -> JobSpec {
        JobSpec {
            phases: phases
                .iter()
                .map(|name| PhaseSpec {
                    name: (*name).into(),
                    plugin: "echo".into(),
                    ..PhaseSpec::default()
                })
                .collect(),
            ..JobSpec::default()
        }
    }

    fn check(spec: JobSpec) -> Result<NewJob, String> {
        new_job(spec, &QueueConfig::default(), 1_000)
    }

    #[test]
    fn rejects_bad_specs_naming_the_problem() {
        assert!(check(spec(&[])).unwrap_err().contains("at least one phase"));
        assert!(
            check(spec(&["a", "a"]))
                .unwrap_err()
                .contains("two phases are named `a`")
        );
        assert!(
            check(JobSpec {
                max_attempts: Some(0),
                ..spec(&["a"])
            })
            .unwrap_err()
            .contains("max_attempts")
        );
        let both = JobSpec {
            delay_ms: Some(5),
            run_at: Some("2030-01-01T00:00:00Z".into()),
            ..spec(&["a"])
        };
        assert!(check(both).unwrap_err().contains("not both"));
        let big = JobSpec {
            payload: Json::from_value(&Value::String("x".repeat(2 << 20))),
            ..spec(&["a"])
        };
        assert!(check(big).unwrap_err().contains("payload"));
    }

    #[test]
    fn fills_defaults_and_schedules() {
        let job = check(JobSpec {
            delay_ms: Some(500),
            ..spec(&["a", "b"])
        })
        .unwrap();
        assert_eq!(job.run_at, 1_500);
        assert_eq!(
            job.max_attempts,
            QueueConfig::default().default_max_attempts
        );
        assert_eq!(job.phases[1].config, serde_json::json!({}));
        assert_eq!(job.phases[0].version, None);
        let at = check(JobSpec {
            run_at: Some("2030-01-01T00:00:00Z".into()),
            ..spec(&["a"])
        })
        .unwrap();
        assert_eq!(at.run_at, 1_893_456_000_000);
    }
}
