//! What the operator grants a plugin ([`PluginGrants`]): the versions the
//! grants cover, plain configuration values, and the names of secrets whose
//! values the host holds. Grants are operator data, set through the admin
//! API and never part of a job spec.
//!
//! A new version of a plugin does not inherit its grants: they name the
//! versions they cover (versions are immutable: other bytes under a stored
//! version are refused), so an upload gets nothing until the operator adds
//! it to `versions`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Bounds on one plugin's grants, so that they stay small operator data.
pub mod limits {
    /// Versions one set of grants may cover.
    pub const MAX_VERSIONS: usize = 100;
    /// Plain configuration values, and secrets, per plugin (each).
    pub const MAX_KEYS: usize = 64;
    /// Longest configuration key or secret name.
    pub const MAX_KEY_LEN: usize = 128;
    /// Longest plain configuration value.
    pub const MAX_VALUE_BYTES: usize = 4 << 10;
}

/// What a plugin's phases may read through `wasi:config/store`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PluginGrants {
    /// The plugin versions these grants cover. A version not named here
    /// runs with no grants at all, and its reads fail naming the version.
    pub versions: Vec<String>,
    /// Plain configuration values, by key.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    /// Secrets granted by name; the values come from the server's secrets
    /// file or `JOBHOST_SECRET_<NAME>` environment variables, never from
    /// the database. A guest reads a secret under its name, like a key.
    #[serde(default)]
    pub secrets: Vec<String>,
}

impl PluginGrants {
    /// Checks the grants' shape and bounds; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        use limits::*;
        if self.versions.len() > MAX_VERSIONS {
            return Err(format!("versions: at most {MAX_VERSIONS} versions"));
        }
        if self.config.len() > MAX_KEYS || self.secrets.len() > MAX_KEYS {
            return Err(format!(
                "config and secrets: at most {MAX_KEYS} entries each"
            ));
        }
        for key in self.config.keys() {
            check_key("config", key, is_config_key_char)?;
        }
        for (key, value) in &self.config {
            if value.len() > MAX_VALUE_BYTES {
                return Err(format!(
                    "config.{key}: a value may have at most {MAX_VALUE_BYTES} bytes"
                ));
            }
        }
        for name in &self.secrets {
            check_key("secrets", name, is_secret_name_char)?;
            if self.config.contains_key(name) {
                return Err(format!(
                    "secrets: `{name}` is also a config key; a guest reads both by name"
                ));
            }
        }
        let mut secrets = self.secrets.clone();
        secrets.sort();
        if secrets.windows(2).any(|pair| pair[0] == pair[1]) {
            return Err("secrets: a name is listed twice".into());
        }
        Ok(())
    }

    /// Whether these grants cover `version` of the plugin.
    pub fn covers(&self, version: &str) -> bool {
        self.versions.iter().any(|v| v == version)
    }
}

fn is_config_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')
}

/// Secret names map onto environment variable names
/// (`JOBHOST_SECRET_<NAME>`, upper-cased), so they are narrower.
fn is_secret_name_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'
}

fn check_key(field: &str, key: &str, allowed: fn(char) -> bool) -> Result<(), String> {
    let max = limits::MAX_KEY_LEN;
    if key.is_empty() || key.len() > max || !key.chars().all(allowed) {
        let chars = if field == "secrets" {
            "lower-case letters, digits and `_`"
        } else {
            "letters, digits, `_`, `-` and `.`"
        };
        return Err(format!("{field}: `{key}` must be 1-{max} {chars}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn grants(value: serde_json::Value) -> Result<PluginGrants, String> {
        let grants: PluginGrants = serde_json::from_value(value).map_err(|e| e.to_string())?;
        grants.validate()?;
        Ok(grants)
    }

    #[test]
    fn valid_grants_read_back() {
        let ok = grants(json!({
            "versions": ["1.0.0"],
            "config": {"region": "eu-west-1", "api.base-url": "https://x"},
            "secrets": ["stripe_key"],
        }))
        .unwrap();
        assert!(ok.covers("1.0.0") && !ok.covers("1.0.1"));
        assert!(grants(json!({"versions": []})).is_ok());
    }

    #[test]
    fn bad_grants_name_the_field() {
        let refused = |value| grants(value).unwrap_err();
        assert!(refused(json!({"config": {}})).contains("versions"));
        assert!(refused(json!({"versions": [], "http": []})).contains("unknown field"));
        assert!(refused(json!({"versions": [], "config": {"a b": "x"}})).starts_with("config:"));
        assert!(refused(json!({"versions": [], "secrets": ["Stripe"]})).starts_with("secrets:"));
        assert!(refused(json!({"versions": [], "secrets": ["a", "a"]})).contains("twice"));
        assert!(
            refused(json!({"versions": [], "config": {"a": "1"}, "secrets": ["a"]}))
                .contains("also a config key")
        );
        let long = "x".repeat(limits::MAX_VALUE_BYTES + 1);
        assert!(refused(json!({"versions": [], "config": {"a": long}})).starts_with("config.a"));
        let many: Vec<String> = (0..=limits::MAX_VERSIONS).map(|i| i.to_string()).collect();
        assert!(refused(json!({ "versions": many })).starts_with("versions"));
    }
}
