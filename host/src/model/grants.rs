//! What the operator grants a plugin ([`PluginGrants`]): the versions the
//! grants cover, plain configuration values, the names of secrets whose
//! values the host holds, and the origins its phases may call over HTTP
//! ([`OriginRule`]). Grants are operator data, set through the admin
//! API and never part of a job spec.
//!
//! A new version of a plugin does not inherit its grants: they name the
//! versions they cover (versions are immutable: other bytes under a stored
//! version are refused), so an upload gets nothing until the operator adds
//! it to `versions`.

use std::collections::BTreeMap;
use std::net::IpAddr;

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
    /// Origins one plugin may call.
    pub const MAX_ORIGINS: usize = 64;
    /// Longest origin rule.
    pub const MAX_ORIGIN_LEN: usize = 256;
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
    /// Origins the plugin's phases may send HTTP requests to, as
    /// `scheme://host[:port]`: `https://api.example.com`,
    /// `https://*.example.org` (any subdomain), `http://127.0.0.1:9000`,
    /// `https://api.example.com:*` (any port). Anything else is refused
    /// before any connection.
    #[serde(default)]
    pub http: Vec<String>,
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
            check_secret_name(name)?;
            if self.config.contains_key(name) {
                return Err(format!(
                    "secrets: `{name}` is also a config key; a guest reads both by name"
                ));
            }
        }
        if self.http.len() > MAX_ORIGINS {
            return Err(format!("http: at most {MAX_ORIGINS} origins"));
        }
        for rule in &self.http {
            OriginRule::parse(rule).map_err(|e| format!("http: `{rule}`: {e}"))?;
        }
        let mut secrets = self.secrets.clone();
        secrets.sort();
        if secrets.windows(2).any(|pair| pair[0] == pair[1]) {
            return Err("secrets: a name is listed twice".into());
        }
        Ok(())
    }

    /// The parsed `http` rules (the grants were validated when set).
    pub fn origin_rules(&self) -> Vec<OriginRule> {
        self.http
            .iter()
            .filter_map(|rule| OriginRule::parse(rule).ok())
            .collect()
    }

    /// Whether these grants cover `version` of the plugin.
    pub fn covers(&self, version: &str) -> bool {
        self.versions.iter().any(|v| v == version)
    }
}

/// What the operator sets aside for a plugin's runs, whatever its version:
/// a JavaScript or Python component needs far more memory than a Rust one,
/// and a phase that calls a fragile API may need fewer runs at once.
/// `None` keeps the server's default (`--memory-mb`, `--phase-timeout`), or
/// no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PluginResources {
    /// Memory cap of each run, in MiB (1 to the server's
    /// `--max-plugin-memory-mb`).
    #[serde(default)]
    pub memory_mb: Option<u64>,
    /// Timeout of a phase whose job spec gives none, in ms (1 to the
    /// server's largest phase timeout).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Most phases of the plugin running at once, on all hosts together.
    /// A job whose next phase finds them all taken waits (status
    /// `waiting`) without holding a worker.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 100_000)]
    pub max_running: Option<u32>,
    /// Most phases of the plugin started per second, on all hosts together
    /// (a token bucket holding one second's worth, at least one).
    #[serde(default)]
    #[schema(exclusive_minimum = 0, maximum = 100_000)]
    pub per_second: Option<f64>,
}

impl PluginResources {
    /// Checks the ranges; the error names the field.
    pub fn validate(&self, max_memory_mb: u64, max_timeout_ms: u64) -> Result<(), String> {
        if let Some(mb) = self.memory_mb
            && !(1..=max_memory_mb).contains(&mb)
        {
            return Err(format!("memory_mb: must be 1 to {max_memory_mb}"));
        }
        if let Some(ms) = self.timeout_ms
            && !(1..=max_timeout_ms).contains(&ms)
        {
            return Err(format!("timeout_ms: must be 1 to {max_timeout_ms}"));
        }
        if let Some(n) = self.max_running
            && !(1..=crate::model::concurrency::limits::MAX_LIMIT).contains(&n)
        {
            return Err(format!(
                "max_running: must be 1 to {}",
                crate::model::concurrency::limits::MAX_LIMIT
            ));
        }
        if let Some(rate) = self.per_second
            && !(rate.is_finite()
                && rate > 0.0
                && rate <= crate::model::concurrency::limits::MAX_RATE)
        {
            return Err(format!(
                "per_second: must be above 0 and at most {}",
                crate::model::concurrency::limits::MAX_RATE
            ));
        }
        Ok(())
    }

    /// Whether starts of the plugin's phases are limited.
    pub fn limits_starts(&self) -> bool {
        self.max_running.is_some() || self.per_second.is_some()
    }
}

/// One allowed origin of outbound HTTP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginRule {
    pub https: bool,
    pub host: HostRule,
    /// `None`: any port.
    pub port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostRule {
    /// This host name, lower-cased.
    Name(String),
    /// This address: the one kind of rule that admits a loopback, private
    /// or link-local target (the operator named it).
    Address(IpAddr),
    /// Any subdomain of this suffix (`*.example.org`), not the suffix.
    Subdomains(String),
    /// Any host (`*`).
    Any,
}

impl OriginRule {
    pub fn parse(rule: &str) -> Result<OriginRule, String> {
        if rule.len() > limits::MAX_ORIGIN_LEN {
            return Err(format!("at most {} bytes", limits::MAX_ORIGIN_LEN));
        }
        let (https, rest) = if let Some(rest) = rule.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = rule.strip_prefix("http://") {
            (false, rest)
        } else {
            return Err("must start with http:// or https://".into());
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '?', '#', '@']) {
            return Err("an origin has no path, query or user".into());
        }
        let (host, port) = split_port(rest)?;
        let default_port = if https { 443 } else { 80 };
        let port = match port {
            None => Some(default_port),
            Some("*") => None,
            Some(port) => Some(port.parse().map_err(|_| format!("bad port `{port}`"))?),
        };
        let host = if host == "*" {
            HostRule::Any
        } else if let Some(suffix) = host.strip_prefix("*.") {
            check_host_name(suffix)?;
            HostRule::Subdomains(suffix.to_ascii_lowercase())
        } else if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            HostRule::Address(v6.parse().map_err(|_| format!("bad address `{v6}`"))?)
        } else if let Ok(address) = host.parse::<IpAddr>() {
            HostRule::Address(address)
        } else {
            check_host_name(host)?;
            HostRule::Name(host.to_ascii_lowercase())
        };
        Ok(OriginRule { https, host, port })
    }

    /// Whether a request to `scheme://host:port` passes this rule; `host`
    /// as in a URL (IPv6 in brackets or not).
    pub fn matches(&self, https: bool, host: &str, port: u16) -> bool {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let host_matches = match &self.host {
            HostRule::Any => true,
            HostRule::Name(name) => host.eq_ignore_ascii_case(name),
            HostRule::Address(address) => host.parse::<IpAddr>().is_ok_and(|a| a == *address),
            HostRule::Subdomains(suffix) => {
                let host = host.to_ascii_lowercase();
                host.len() > suffix.len() + 1
                    && host.ends_with(suffix.as_str())
                    && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
            }
        };
        self.https == https && host_matches && self.port.is_none_or(|p| p == port)
    }
}

/// `host[:port]`, with an IPv6 host in brackets.
fn split_port(authority: &str) -> Result<(&str, Option<&str>), String> {
    if authority.starts_with('[') {
        let end = authority.find(']').ok_or("unclosed `[`")?;
        let (host, rest) = authority.split_at(end + 1);
        return match rest.strip_prefix(':') {
            Some(port) => Ok((host, Some(port))),
            None if rest.is_empty() => Ok((host, None)),
            None => Err("junk after the address".into()),
        };
    }
    Ok(match authority.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (authority, None),
    })
}

fn check_host_name(host: &str) -> Result<(), String> {
    let valid = !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    // A name that ends in a number is an address to URL parsers
    // (`2130706433`, `*.0.0.1`): give addresses as addresses.
    let numeric = host
        .rsplit('.')
        .next()
        .is_some_and(|last| last.chars().all(|c| c.is_ascii_digit()));
    if valid && !numeric {
        Ok(())
    } else {
        Err(format!("bad host `{host}`"))
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

/// Whether `name` may name a secret (in grants, the secrets file or a
/// `JOBHOST_SECRET_*` variable).
pub fn check_secret_name(name: &str) -> Result<(), String> {
    check_key("secrets", name, is_secret_name_char)
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
    fn origin_rules_match_scheme_host_and_port() {
        let rule = |text| OriginRule::parse(text).unwrap();
        let exact = rule("https://api.example.com");
        assert!(exact.matches(true, "API.example.com", 443));
        assert!(!exact.matches(false, "api.example.com", 443), "scheme");
        assert!(!exact.matches(true, "api.example.com", 8443), "port");
        assert!(!exact.matches(true, "evil.api.example.com", 443));
        let subdomains = rule("https://*.example.org");
        assert!(subdomains.matches(true, "a.b.example.org", 443));
        assert!(
            !subdomains.matches(true, "example.org", 443),
            "not the apex"
        );
        assert!(!subdomains.matches(true, "badexample.org", 443));
        let local = rule("http://127.0.0.1:9000");
        assert_eq!(local.host, HostRule::Address("127.0.0.1".parse().unwrap()));
        assert!(local.matches(false, "127.0.0.1", 9000));
        assert!(rule("http://[::1]:*").matches(false, "[::1]", 1234));
        assert!(rule("https://*").matches(true, "anything.example", 443));
        for bad in [
            "ftp://x",
            "https://x/path",
            "https://user@x",
            "https://x:99999",
            "https://exa mple.com",
            "https://",
            "https://*.0.0.1",
            "http://2130706433",
        ] {
            assert!(OriginRule::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_grants_name_the_field() {
        let refused = |value| grants(value).unwrap_err();
        assert!(refused(json!({"config": {}})).contains("versions"));
        assert!(refused(json!({"versions": [], "net": []})).contains("unknown field"));
        assert!(refused(json!({"versions": [], "http": ["api.example.com"]})).starts_with("http:"));
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
