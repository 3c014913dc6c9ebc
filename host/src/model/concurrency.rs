//! Concurrency keys: a job may name one (`tenant-42`), and the operator's
//! [`ConcurrencyLimits`] say how many jobs with a key may run at once.
//! Claims go round-robin across keys, with the jobs that have no key as one
//! more group in the rotation, so one key's backlog cannot starve another
//! key's jobs.
//!
//! Limits are operator data, never part of a job spec: a submitter could
//! otherwise raise its own limit, or invent a fresh key per job to escape
//! it (a rule on a prefix caps each key under it, and the default caps keys
//! nobody named).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Bounds on keys and limits.
pub mod limits {
    /// Longest concurrency key, in bytes.
    pub const MAX_KEY_LEN: usize = 128;
    /// Rules (keys and prefixes) one set of limits may hold.
    pub const MAX_RULES: usize = 1_000;
    /// Largest limit a rule may set.
    pub const MAX_LIMIT: u32 = 100_000;
    /// Largest rate a rule may set, in starts per second.
    pub const MAX_RATE: f64 = 100_000.0;
    /// Keys listed in `GET /queue` and labelled in metrics, busiest first.
    pub const SHOWN_KEYS: usize = 50;
}

/// How many jobs with a key may run at once, and how many may start per
/// second: per key, per key prefix, and a default for keys no rule names.
/// The most specific rule wins: the key itself, then the longest prefix,
/// then the default (limits and rates are resolved on their own). Without
/// a default, keys no rule names have no limit or no rate, and only take
/// their turn.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConcurrencyLimits {
    /// The limit of every key no rule names.
    #[schema(minimum = 0, maximum = 100_000)]
    pub default: Option<u32>,
    /// Limits by key (`tenant-42`) or by prefix (`tenant-*`, each key
    /// under it capped on its own). A limit of 0 holds the key's jobs, and
    /// new jobs with the key are refused.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub keys: BTreeMap<String, u32>,
    /// The rate of every key no rate rule names, in starts per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(exclusive_minimum = 0, maximum = 100_000)]
    pub default_rate: Option<f64>,
    /// Starts per second by key or prefix, as `keys`: at most this many
    /// jobs with the key start in a second, in bursts of at most one
    /// second's worth (and at least one).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schema(value_type = Object)]
    pub rates: BTreeMap<String, f64>,
}

/// One rule as stored: a key, or a prefix (the default is the empty
/// prefix, which every key has), with its limit, its rate, or both.
#[derive(Debug, Clone, PartialEq)]
pub struct LimitRule {
    pub pattern: String,
    pub prefix: bool,
    pub max_running: Option<u32>,
    pub per_second: Option<f64>,
}

impl ConcurrencyLimits {
    /// Checks the rules' shape and bounds; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.keys.len() + self.rates.len() > limits::MAX_RULES {
            return Err(format!(
                "keys: at most {} rules, with rates",
                limits::MAX_RULES
            ));
        }
        check_rules(
            "keys",
            "default",
            &self.keys,
            self.default,
            |field, limit| {
                if limit > limits::MAX_LIMIT {
                    Err(format!("{field}: at most {}", limits::MAX_LIMIT))
                } else {
                    Ok(())
                }
            },
        )?;
        check_rules(
            "rates",
            "default_rate",
            &self.rates,
            self.default_rate,
            |field, rate| {
                if rate.is_finite() && rate > 0.0 && rate <= limits::MAX_RATE {
                    Ok(())
                } else {
                    Err(format!(
                        "{field}: a rate above 0, at most {}",
                        limits::MAX_RATE
                    ))
                }
            },
        )
    }

    /// The rules as stored: one per pattern, with its limit and its rate.
    pub fn rules(&self) -> Vec<LimitRule> {
        let mut out = BTreeMap::new();
        let entry = |name: Option<&str>| {
            let (pattern, prefix) = match name {
                None => ("", true),
                Some(name) => match name.strip_suffix('*') {
                    Some(prefix) => (prefix, true),
                    None => (name, false),
                },
            };
            (pattern.to_owned(), prefix)
        };
        let mut set = |name: Option<&str>, change: &dyn Fn(&mut LimitRule)| {
            let (pattern, prefix) = entry(name);
            let rule = out
                .entry((pattern.clone(), prefix))
                .or_insert_with(|| LimitRule {
                    pattern,
                    prefix,
                    max_running: None,
                    per_second: None,
                });
            change(rule);
        };
        let limits = self.default.map(|limit| (None, limit)).into_iter();
        for (name, limit) in limits.chain(self.keys.iter().map(|(k, &v)| (Some(k.as_str()), v))) {
            set(name, &|rule| rule.max_running = Some(limit));
        }
        let rates = self.default_rate.map(|rate| (None, rate)).into_iter();
        for (name, rate) in rates.chain(self.rates.iter().map(|(k, &v)| (Some(k.as_str()), v))) {
            set(name, &|rule| rule.per_second = Some(rate));
        }
        out.into_values().collect()
    }

    /// The limits the stored rules make up.
    pub fn from_rules(rules: impl IntoIterator<Item = LimitRule>) -> Self {
        let mut limits = Self::default();
        for rule in rules {
            let name = match (rule.prefix, rule.pattern.is_empty()) {
                (true, true) => None,
                (true, false) => Some(format!("{}*", rule.pattern)),
                (false, _) => Some(rule.pattern),
            };
            match (&name, rule.max_running) {
                (None, Some(limit)) => limits.default = Some(limit),
                (Some(name), Some(limit)) => {
                    limits.keys.insert(name.clone(), limit);
                }
                (_, None) => {}
            }
            match (name, rule.per_second) {
                (None, Some(rate)) => limits.default_rate = Some(rate),
                (Some(name), Some(rate)) => {
                    limits.rates.insert(name, rate);
                }
                (_, None) => {}
            }
        }
        limits
    }

    /// The limit of `key`: the key's own rule, else its longest prefix
    /// rule, else the default; `None` is no limit.
    pub fn limit_of(&self, key: &str) -> Option<u32> {
        most_specific(&self.keys, self.default, key)
    }

    /// The rate of `key`, resolved as its limit is; `None` is no rate.
    pub fn rate_of(&self, key: &str) -> Option<f64> {
        most_specific(&self.rates, self.default_rate, key)
    }
}

/// Checks the names of one map of rules (`field`) and, with `check`, their
/// values and that of its default (`default_field`).
fn check_rules<T: Copy>(
    field: &str,
    default_field: &str,
    rules: &BTreeMap<String, T>,
    default: Option<T>,
    check: impl Fn(&str, T) -> Result<(), String>,
) -> Result<(), String> {
    if let Some(value) = default {
        check(default_field, value)?;
    }
    for (rule, &value) in rules {
        let key = rule.strip_suffix('*').unwrap_or(rule);
        check_key(key).map_err(|e| format!("{field}.{rule}: {e}"))?;
        check(&format!("{field}.{rule}"), value)?;
    }
    Ok(())
}

/// The value of `key`'s own rule, else of its longest prefix rule, else
/// `default`.
fn most_specific<T: Copy>(rules: &BTreeMap<String, T>, default: Option<T>, key: &str) -> Option<T> {
    if let Some(&value) = rules.get(key) {
        return Some(value);
    }
    rules
        .iter()
        .filter_map(|(rule, &value)| {
            let prefix = rule.strip_suffix('*')?;
            key.starts_with(prefix).then_some((prefix.len(), value))
        })
        .max_by_key(|&(length, _)| length)
        .map(|(_, value)| value)
        .or(default)
}

/// Checks a concurrency key: 1 to 128 bytes of letters, digits and
/// `.` `_` `-` `:` `/` `@` (no `*`, which makes a rule a prefix).
pub fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > limits::MAX_KEY_LEN {
        return Err(format!("must be 1-{} bytes long", limits::MAX_KEY_LEN));
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || "._-:/@".contains(c);
    if !key.chars().all(allowed) {
        return Err("may hold only letters, digits and . _ - : / @".into());
    }
    Ok(())
}

/// One key's jobs right now, for `GET /queue` and metrics.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct KeyLoad {
    pub key: String,
    pub running: u64,
    pub pending: u64,
    /// Its limit; absent when it has none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// Its rate in starts per second; absent when it has none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
}

/// One limited plugin's phases right now, for `GET /queue` and metrics.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct PluginLoad {
    pub plugin: String,
    /// Its phases running, on every host.
    pub running: u64,
    /// Jobs waiting for a slot of it (status `waiting`).
    pub waiting: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_running: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_second: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(default: Option<u32>, keys: &[(&str, u32)]) -> ConcurrencyLimits {
        ConcurrencyLimits {
            default,
            keys: keys.iter().map(|&(k, v)| (k.to_owned(), v)).collect(),
            ..ConcurrencyLimits::default()
        }
    }

    #[test]
    fn the_most_specific_rule_wins() {
        let limits = limits(
            Some(3),
            &[("tenant-*", 2), ("tenant-4*", 5), ("tenant-42", 1)],
        );
        assert_eq!(limits.limit_of("tenant-42"), Some(1));
        assert_eq!(limits.limit_of("tenant-43"), Some(5));
        assert_eq!(limits.limit_of("tenant-7"), Some(2));
        assert_eq!(limits.limit_of("other"), Some(3));
        assert_eq!(self::limits(None, &[]).limit_of("other"), None);
    }

    #[test]
    fn rules_round_trip_through_storage() {
        let mut limits = limits(Some(0), &[("a*", 2), ("b", 9)]);
        limits.rates = [("a*".to_owned(), 2.5), ("c".to_owned(), 1.0)].into();
        limits.default_rate = Some(0.5);
        let rules = limits.rules();
        assert_eq!(rules.len(), 4, "one row per pattern: {rules:?}");
        assert_eq!(ConcurrencyLimits::from_rules(rules), limits);
    }

    #[test]
    fn bad_rules_are_refused_naming_the_field() {
        let refused = |limits: ConcurrencyLimits| limits.validate().unwrap_err();
        assert!(refused(limits(Some(100_001), &[])).starts_with("default:"));
        assert!(refused(limits(None, &[("t*x", 1)])).starts_with("keys.t*x:"));
        assert!(refused(limits(None, &[("", 1)])).starts_with("keys.:"));
        assert!(refused(limits(None, &[("ok", 100_001)])).starts_with("keys.ok:"));
        let many: Vec<(String, u32)> = (0..=limits::MAX_RULES)
            .map(|i| (format!("k{i}"), 1))
            .collect();
        let many = ConcurrencyLimits {
            keys: many.into_iter().collect(),
            ..ConcurrencyLimits::default()
        };
        assert!(refused(many).starts_with("keys: at most"));
        let mut rated = limits(None, &[]);
        rated.rates = [("r".to_owned(), 0.0)].into();
        assert!(refused(rated.clone()).starts_with("rates.r:"));
        rated.rates = [("r".to_owned(), limits::MAX_RATE * 1.01)].into();
        assert!(refused(rated.clone()).starts_with("rates.r:"));
        rated.rates = [("r".to_owned(), limits::MAX_RATE)].into();
        assert_eq!(rated.validate(), Ok(()));
        rated.rates = [("r".to_owned(), f64::NAN)].into();
        assert!(refused(rated).starts_with("rates.r:"));
        assert!(check_key(&"k".repeat(limits::MAX_KEY_LEN + 1)).is_err());
        assert!(check_key("tenant-42/eu@x:1.a_b").is_ok());
    }
}
