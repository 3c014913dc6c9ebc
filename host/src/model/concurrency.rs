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
    /// Keys listed in `GET /queue` and labelled in metrics, busiest first.
    pub const SHOWN_KEYS: usize = 50;
}

/// How many jobs with a key may run at once: per key, per key prefix, and
/// a default for keys no rule names. The most specific rule wins: the key
/// itself, then the longest prefix, then the default. Without a default,
/// keys no rule names have no limit, and only take their turn.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
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
}

/// One rule as stored: a key, or a prefix (the default is the empty
/// prefix, which every key has).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitRule {
    pub pattern: String,
    pub prefix: bool,
    pub max_running: u32,
}

impl ConcurrencyLimits {
    /// Checks the rules' shape and bounds; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.keys.len() > limits::MAX_RULES {
            return Err(format!("keys: at most {} rules", limits::MAX_RULES));
        }
        let check = |field: &str, limit: u32| {
            if limit > limits::MAX_LIMIT {
                Err(format!("{field}: at most {}", limits::MAX_LIMIT))
            } else {
                Ok(())
            }
        };
        if let Some(default) = self.default {
            check("default", default)?;
        }
        for (rule, &limit) in &self.keys {
            let key = rule.strip_suffix('*').unwrap_or(rule);
            check_key(key).map_err(|e| format!("keys.{rule}: {e}"))?;
            check(&format!("keys.{rule}"), limit)?;
        }
        Ok(())
    }

    /// The rules as stored.
    pub fn rules(&self) -> Vec<LimitRule> {
        let default = self.default.map(|max_running| LimitRule {
            pattern: String::new(),
            prefix: true,
            max_running,
        });
        let named = self.keys.iter().map(|(rule, &max_running)| {
            let (pattern, prefix) = match rule.strip_suffix('*') {
                Some(prefix) => (prefix, true),
                None => (rule.as_str(), false),
            };
            LimitRule {
                pattern: pattern.to_owned(),
                prefix,
                max_running,
            }
        });
        default.into_iter().chain(named).collect()
    }

    /// The limits the stored rules make up.
    pub fn from_rules(rules: impl IntoIterator<Item = LimitRule>) -> Self {
        let mut limits = Self::default();
        for rule in rules {
            match (rule.prefix, rule.pattern.is_empty()) {
                (true, true) => limits.default = Some(rule.max_running),
                (true, false) => {
                    limits
                        .keys
                        .insert(format!("{}*", rule.pattern), rule.max_running);
                }
                (false, _) => {
                    limits.keys.insert(rule.pattern, rule.max_running);
                }
            }
        }
        limits
    }

    /// The limit of `key`: the key's own rule, else its longest prefix
    /// rule, else the default; `None` is no limit.
    pub fn limit_of(&self, key: &str) -> Option<u32> {
        if let Some(&limit) = self.keys.get(key) {
            return Some(limit);
        }
        self.keys
            .iter()
            .filter_map(|(rule, &limit)| {
                let prefix = rule.strip_suffix('*')?;
                key.starts_with(prefix).then_some((prefix.len(), limit))
            })
            .max_by_key(|&(length, _)| length)
            .map(|(_, limit)| limit)
            .or(self.default)
    }
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct KeyLoad {
    pub key: String,
    pub running: u64,
    pub pending: u64,
    /// Its limit; absent when it has none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(default: Option<u32>, keys: &[(&str, u32)]) -> ConcurrencyLimits {
        ConcurrencyLimits {
            default,
            keys: keys.iter().map(|&(k, v)| (k.to_owned(), v)).collect(),
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
        let limits = limits(Some(0), &[("a*", 2), ("b", 9)]);
        assert_eq!(ConcurrencyLimits::from_rules(limits.rules()), limits);
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
            default: None,
            keys: many.into_iter().collect(),
        };
        assert!(refused(many).starts_with("keys: at most"));
        assert!(check_key(&"k".repeat(limits::MAX_KEY_LEN + 1)).is_err());
        assert!(check_key("tenant-42/eu@x:1.a_b").is_ok());
    }
}
