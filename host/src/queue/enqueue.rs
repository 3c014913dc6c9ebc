//! Turning a submitted [`JobSpec`] into a [`NewJob`]: every check that can
//! be made before touching storage, each with a message that names the field.

use std::collections::HashSet;

use serde_json::Value;

use super::QueueConfig;
use crate::model::JobSpec;
use crate::model::time::parse_rfc3339;
use crate::storage::{NewJob, NewPhase};

use crate::model::limits::*;

/// `plugin_timeout` is a plugin's default phase timeout, if its operator
/// set one: it comes before the server's.
pub(super) fn new_job(
    spec: JobSpec,
    config: &QueueConfig,
    plugin_timeout: impl Fn(&str) -> Option<std::time::Duration>,
    now: i64,
) -> Result<NewJob, String> {
    if spec.phases.is_empty() {
        return Err("phases: a job needs at least one phase".into());
    }
    if spec.phases.len() > config.max_phases {
        return Err(format!(
            "phases: a job may have at most {} phases, this one has {}",
            config.max_phases,
            spec.phases.len()
        ));
    }
    let max_timeout = config.max_phase_timeout.as_millis() as u64;
    let mut names = HashSet::new();
    for (index, phase) in spec.phases.iter().enumerate() {
        let field = |name: &str| format!("phases[{index}].{name}");
        check_length(&field("name"), &phase.name, 1, MAX_PHASE_NAME)?;
        if !names.insert(phase.name.as_str()) {
            return Err(format!(
                "{}: two phases are named `{}`: phase names must be unique",
                field("name"),
                phase.name
            ));
        }
        check_length(&field("plugin"), &phase.plugin, 1, MAX_PLUGIN_NAME)?;
        if let Some(version) = &phase.version {
            check_length(&field("version"), version, 1, MAX_PLUGIN_NAME)?;
        }
        if let Some(timeout) = phase.timeout_ms {
            check_range(&field("timeout_ms"), timeout, 1, max_timeout)?;
        }
        if let Some(config) = &phase.config {
            let size = crate::model::json::text(config).len();
            if size > MAX_PHASE_CONFIG_BYTES {
                return Err(format!(
                    "{}: {size} bytes is more than the limit of {MAX_PHASE_CONFIG_BYTES}",
                    field("config")
                ));
            }
        }
    }
    let payload_size = spec.payload.as_str().len();
    if payload_size > config.max_payload_bytes {
        return Err(format!(
            "payload: {payload_size} bytes is more than the limit of {}",
            config.max_payload_bytes
        ));
    }
    let max_attempts = spec.max_attempts.unwrap_or(config.default_max_attempts);
    check_range("max_attempts", max_attempts, 1, MAX_ATTEMPTS)?;
    let backoff = spec.backoff.unwrap_or_default();
    backoff.validate()?;
    check_range("priority", spec.priority, MIN_PRIORITY, MAX_PRIORITY)?;
    let run_at = match (spec.delay_ms, &spec.run_at) {
        (Some(_), Some(_)) => {
            return Err("delay_ms: give either delay_ms or run_at, not both".into());
        }
        (Some(delay), None) => {
            check_range("delay_ms", delay, 0, MAX_SCHEDULE_AHEAD_MS)?;
            now + delay as i64
        }
        (None, Some(at)) => {
            check_length("run_at", at, 1, MAX_RUN_AT_LENGTH)?;
            let at = parse_rfc3339(at).map_err(|e| format!("run_at: {e}"))?;
            if at > now.saturating_add(MAX_SCHEDULE_AHEAD_MS as i64) {
                return Err(format!(
                    "run_at: at most {} days ahead",
                    MAX_SCHEDULE_AHEAD_MS / 86_400_000
                ));
            }
            at
        }
        (None, None) => now,
    };
    if let Some(key) = &spec.idempotency_key {
        check_length("idempotency_key", key, 1, MAX_IDEMPOTENCY_KEY)?;
    }
    if let Some(key) = &spec.concurrency_key {
        crate::model::concurrency::check_key(key).map_err(|e| format!("concurrency_key: {e}"))?;
    }
    if let Some(webhook) = &spec.webhook {
        check_length("webhook.url", &webhook.url, 1, MAX_WEBHOOK_URL)?;
        if !(webhook.url.starts_with("http://") || webhook.url.starts_with("https://")) {
            return Err("webhook.url: must be an http:// or https:// URL".into());
        }
        reqwest::Url::parse(&webhook.url).map_err(|e| format!("webhook.url: {e}"))?;
        if let Some(secret) = &webhook.secret {
            check_length("webhook.secret", secret, 1, MAX_WEBHOOK_SECRET)?;
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
                .or_else(|| plugin_timeout(&p.plugin).map(|t| t.as_millis() as u64))
                .unwrap_or(default_timeout)
                .min(max_timeout),
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
        concurrency_key: spec.concurrency_key,
        phases,
        created_at: now,
    })
}

fn check_length(field: &str, value: &str, min: usize, max: usize) -> Result<(), String> {
    if (min..=max).contains(&value.len()) {
        Ok(())
    } else {
        Err(format!("{field}: must be {min}-{max} bytes long"))
    }
}

fn check_range<T: PartialOrd + std::fmt::Display>(
    field: &str,
    value: T,
    min: T,
    max: T,
) -> Result<(), String> {
    if min <= value && value <= max {
        Ok(())
    } else {
        Err(format!("{field}: must be between {min} and {max}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::PhaseSpec;
    use crate::model::json::Json;

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

    /// 2025-11-30T12:00:00Z.
    const NOW: i64 = 1_764_504_000_000;

    fn check(spec: JobSpec) -> Result<NewJob, String> {
        new_job(spec, &QueueConfig::default(), |_| None, NOW)
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
        assert_eq!(job.run_at, NOW + 500);
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

    /// Every bound, crossed by one: the error names the field.
    #[test]
    fn each_bound_crossed_names_its_field() {
        let long = |n: usize| "k".repeat(n);
        let phase = |edit: fn(&mut PhaseSpec)| {
            let mut spec = spec(&["a"]);
            edit(&mut spec.phases[0]);
            spec
        };
        let webhook = |url: String, secret: Option<String>| JobSpec {
            webhook: Some(crate::model::WebhookSpec { url, secret }),
            ..spec(&["a"])
        };
        let cases: Vec<(&str, JobSpec)> = vec![
            ("phases:", spec(&[])),
            (
                "phases:",
                JobSpec {
                    phases: (0..33)
                        .map(|i| PhaseSpec {
                            name: i.to_string(),
                            plugin: "echo".into(),
                            ..PhaseSpec::default()
                        })
                        .collect(),
                    ..JobSpec::default()
                },
            ),
            (
                "phases[0].name",
                phase(|p| p.name = "n".repeat(MAX_PHASE_NAME + 1)),
            ),
            ("phases[0].name", phase(|p| p.name.clear())),
            (
                "phases[0].plugin",
                phase(|p| p.plugin = "p".repeat(MAX_PLUGIN_NAME + 1)),
            ),
            (
                "phases[0].version",
                phase(|p| p.version = Some("v".repeat(MAX_PLUGIN_NAME + 1))),
            ),
            ("phases[0].timeout_ms", phase(|p| p.timeout_ms = Some(0))),
            (
                "phases[0].timeout_ms",
                phase(|p| p.timeout_ms = Some(3_600_001)),
            ),
            (
                "phases[0].config",
                phase(|p| p.config = Some(Value::String("c".repeat(MAX_PHASE_CONFIG_BYTES)))),
            ),
            (
                "max_attempts",
                JobSpec {
                    max_attempts: Some(MAX_ATTEMPTS + 1),
                    ..spec(&["a"])
                },
            ),
            (
                "priority",
                JobSpec {
                    priority: MAX_PRIORITY + 1,
                    ..spec(&["a"])
                },
            ),
            (
                "priority",
                JobSpec {
                    priority: MIN_PRIORITY - 1,
                    ..spec(&["a"])
                },
            ),
            (
                "delay_ms",
                JobSpec {
                    delay_ms: Some(9_000_000_000_000_000),
                    ..spec(&["a"])
                },
            ),
            (
                "run_at",
                JobSpec {
                    run_at: Some("9999-01-01T00:00:00Z".into()),
                    ..spec(&["a"])
                },
            ),
            (
                "run_at",
                JobSpec {
                    run_at: Some(long(65)),
                    ..spec(&["a"])
                },
            ),
            (
                "idempotency_key",
                JobSpec {
                    idempotency_key: Some(long(MAX_IDEMPOTENCY_KEY + 1)),
                    ..spec(&["a"])
                },
            ),
            (
                "idempotency_key",
                JobSpec {
                    idempotency_key: Some(String::new()),
                    ..spec(&["a"])
                },
            ),
            (
                "webhook.url",
                webhook(format!("http://x/{}", long(MAX_WEBHOOK_URL)), None),
            ),
            ("webhook.url", webhook("ftp://x/".into(), None)),
            ("webhook.url", webhook("http://[::1/".into(), None)),
            (
                "webhook.secret",
                webhook("http://x/".into(), Some(long(MAX_WEBHOOK_SECRET + 1))),
            ),
            (
                "backoff.max_ms",
                JobSpec {
                    backoff: Some(crate::model::BackoffPolicy {
                        max_ms: MAX_BACKOFF_MS + 1,
                        ..Default::default()
                    }),
                    ..spec(&["a"])
                },
            ),
        ];
        for (field, spec) in cases {
            let error = check(spec).expect_err(field);
            assert!(error.starts_with(field), "`{error}` does not name {field}");
        }
        // The largest values allowed are accepted.
        let edge = JobSpec {
            max_attempts: Some(MAX_ATTEMPTS),
            priority: MIN_PRIORITY,
            delay_ms: Some(MAX_SCHEDULE_AHEAD_MS),
            ..phase(|p| p.timeout_ms = Some(3_600_000))
        };
        assert_eq!(
            check(edge).unwrap().run_at,
            NOW + MAX_SCHEDULE_AHEAD_MS as i64
        );
    }

    proptest::proptest! {
        /// Whatever numbers a client sends, validation answers without a
        /// panic, and an accepted job's times can be shown.
        #[test]
        fn arbitrary_numbers_never_panic(
            delay in proptest::option::of(proptest::num::u64::ANY),
            run_at in proptest::option::of("[0-9]{1,5}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z"),
            priority in proptest::num::i32::ANY,
            attempts in proptest::option::of(proptest::num::u32::ANY),
            timeout in proptest::option::of(proptest::num::u64::ANY),
            initial in proptest::num::u64::ANY,
            max in proptest::num::u64::ANY,
            multiplier in proptest::num::f64::ANY,
        ) {
            let mut spec = spec(&["a"]);
            spec.phases[0].timeout_ms = timeout;
            spec.delay_ms = delay;
            spec.run_at = run_at;
            spec.priority = priority;
            spec.max_attempts = attempts;
            spec.backoff = Some(crate::model::BackoffPolicy { initial_ms: initial, max_ms: max, multiplier, jitter: true });
            if let Ok(job) = check(spec) {
                proptest::prop_assert!(job.run_at <= NOW + MAX_SCHEDULE_AHEAD_MS as i64);
                let shown = crate::model::time::rfc3339(job.run_at);
                proptest::prop_assert!(crate::model::time::parse_rfc3339(&shown).is_ok());
                let delay = job.backoff.delay(job.max_attempts, 0.5);
                proptest::prop_assert!(delay.as_millis() as u64 <= MAX_BACKOFF_MS);
            }
        }
    }
}
