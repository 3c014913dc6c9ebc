//! `jobhost serve` configuration: flags, then `JOBHOST_*` environment
//! variables, then an optional TOML file (`--config`), then defaults that
//! work out of the box (SQLite under `./data`, listening on 127.0.0.1:8080).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use serde::Deserialize;

use crate::queue::QueueConfig;
use crate::runtime::RuntimeConfig;
use crate::storage::Durability;
use crate::webhooks::Secret;

/// A duration written for people: `500ms`, `30s`, `7d`; `0` or `off` for none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Option<Duration>);

impl FromStr for HumanDuration {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text.trim() {
            "0" | "off" | "never" => Ok(HumanDuration(None)),
            other => humantime::parse_duration(other)
                .map(|d| HumanDuration(Some(d)))
                .map_err(|e| format!("`{other}` is not a duration like 30s or 7d: {e}")),
        }
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Every setting of `jobhost serve`. Each is optional here; [`ServeArgs::resolve`]
/// fills the gaps from the config file and the defaults.
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServeArgs {
    /// TOML file with any of these settings (keys as the long flags, without `--`).
    #[arg(long, env = "JOBHOST_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "JOBHOST_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Directory for the SQLite database and compiled artifacts [default: ./data].
    #[arg(long, env = "JOBHOST_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Jobs run at once [default: 8].
    #[arg(long, env = "JOBHOST_CONCURRENCY")]
    pub concurrency: Option<usize>,
    /// Phase timeout when a job gives none [default: 60s].
    #[arg(long, env = "JOBHOST_PHASE_TIMEOUT")]
    pub phase_timeout: Option<HumanDuration>,
    /// Linear memory cap per phase run, in MiB [default: 256].
    #[arg(long, env = "JOBHOST_MEMORY_MB")]
    pub memory_mb: Option<u64>,
    /// Attempts per job when the job gives none [default: 3].
    #[arg(long, env = "JOBHOST_MAX_ATTEMPTS")]
    pub max_attempts: Option<u32>,
    /// Delete finished jobs older than this; `off` keeps them [default: 7d].
    #[arg(long, env = "JOBHOST_RETENTION")]
    pub retention: Option<HumanDuration>,
    /// `process` survives a crash of jobhost; `full` also power loss [default: process].
    #[arg(long, env = "JOBHOST_DURABILITY", value_enum)]
    pub durability: Option<Durability>,
    /// Bearer tokens accepted on mutating routes, comma-separated; none = open.
    #[arg(long, env = "JOBHOST_TOKENS", value_delimiter = ',')]
    pub tokens: Option<Vec<String>>,
    /// Largest plugin upload, in MiB [default: 50].
    #[arg(long, env = "JOBHOST_MAX_PLUGIN_MB")]
    pub max_plugin_mb: Option<usize>,
    /// Largest JSON request body, in KiB [default: 2048].
    #[arg(long, env = "JOBHOST_MAX_BODY_KB")]
    pub max_body_kb: Option<usize>,
    /// Most phases in one job [default: 32].
    #[arg(long, env = "JOBHOST_MAX_PHASES")]
    pub max_phases: Option<usize>,
    /// Largest job payload, in KiB [default: 1024].
    #[arg(long, env = "JOBHOST_MAX_PAYLOAD_KB")]
    pub max_payload_kb: Option<usize>,
    /// Signs webhooks of jobs that give no secret (`whsec_<base64>`)
    /// [default: generated once, kept in <data-dir>/webhook-secret].
    #[arg(long, env = "JOBHOST_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,
    /// Timeout of one webhook delivery attempt [default: 10s].
    #[arg(long, env = "JOBHOST_WEBHOOK_TIMEOUT")]
    pub webhook_timeout: Option<HumanDuration>,
    /// Attempts per webhook delivery before it is marked failed [default: 8].
    #[arg(long, env = "JOBHOST_WEBHOOK_MAX_ATTEMPTS")]
    pub webhook_max_attempts: Option<u32>,
    /// How long shutdown waits for running phases before stopping them [default: 30s].
    #[arg(long, env = "JOBHOST_SHUTDOWN_TIMEOUT")]
    pub shutdown_timeout: Option<HumanDuration>,
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub durability: Durability,
    pub tokens: Vec<String>,
    pub max_plugin_bytes: usize,
    pub max_body_bytes: usize,
    pub shutdown_timeout: Duration,
    /// `None`: use (or create) the secret kept in the data directory.
    pub webhook_secret: Option<Secret>,
    pub webhook_timeout: Duration,
    pub webhook_max_attempts: u32,
    pub queue: QueueConfig,
    pub runtime: RuntimeConfig,
}

impl ServeArgs {
    /// Flags and environment first, then the config file, then defaults.
    pub fn resolve(self) -> anyhow::Result<Config> {
        let file = match &self.config {
            Some(path) => read_file(path)?,
            None => ServeArgs::default(),
        };
        let defaults = QueueConfig::default();
        let concurrency = self
            .concurrency
            .or(file.concurrency)
            .unwrap_or(defaults.concurrency)
            .max(1);
        let data_dir = self
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from("data"));
        let duration =
            |a: Option<HumanDuration>, b: Option<HumanDuration>, default: Option<Duration>| {
                a.or(b).map_or(default, |d| d.0)
            };
        let queue = QueueConfig {
            concurrency,
            default_phase_timeout: duration(
                self.phase_timeout,
                file.phase_timeout,
                Some(defaults.default_phase_timeout),
            )
            .unwrap_or(defaults.max_phase_timeout),
            default_max_attempts: self
                .max_attempts
                .or(file.max_attempts)
                .unwrap_or(defaults.default_max_attempts),
            max_phases: self
                .max_phases
                .or(file.max_phases)
                .unwrap_or(defaults.max_phases),
            max_payload_bytes: self
                .max_payload_kb
                .or(file.max_payload_kb)
                .map_or(defaults.max_payload_bytes, |kb| kb << 10),
            retention: duration(self.retention, file.retention, defaults.retention),
            ..defaults
        };
        let runtime = RuntimeConfig {
            // One spare slot, for loading plugins while every worker runs.
            max_concurrent_runs: concurrency as u32 + 1,
            memory_limit: self.memory_mb.or(file.memory_mb).unwrap_or(256) << 20,
            cache_dir: Some(data_dir.join("compiled")),
            ..RuntimeConfig::default()
        };
        Ok(Config {
            listen: self
                .listen
                .or(file.listen)
                .unwrap_or_else(|| "127.0.0.1:8080".parse().unwrap()),
            durability: self.durability.or(file.durability).unwrap_or_default(),
            tokens: self
                .tokens
                .or(file.tokens)
                .unwrap_or_default()
                .into_iter()
                .filter(|t| !t.is_empty())
                .collect(),
            max_plugin_bytes: self.max_plugin_mb.or(file.max_plugin_mb).unwrap_or(50) << 20,
            max_body_bytes: self.max_body_kb.or(file.max_body_kb).unwrap_or(2048) << 10,
            shutdown_timeout: duration(
                self.shutdown_timeout,
                file.shutdown_timeout,
                Some(Duration::from_secs(30)),
            )
            .unwrap_or(Duration::ZERO),
            webhook_secret: self
                .webhook_secret
                .or(file.webhook_secret)
                .map(|s| Secret::parse(&s))
                .transpose()
                .map_err(|e| anyhow::anyhow!("webhook-secret: {e}"))?,
            webhook_timeout: duration(
                self.webhook_timeout,
                file.webhook_timeout,
                Some(Duration::from_secs(10)),
            )
            .unwrap_or(Duration::from_secs(10)),
            webhook_max_attempts: self
                .webhook_max_attempts
                .or(file.webhook_max_attempts)
                .unwrap_or(8)
                .max(1),
            data_dir,
            queue,
            runtime,
        })
    }
}

fn read_file(path: &Path) -> anyhow::Result<ServeArgs> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("in config file {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_beat_the_file_which_beats_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("jobhost.toml");
        std::fs::write(
            &file,
            "concurrency = 3\nretention = \"off\"\nlisten = \"127.0.0.1:9000\"\nmemory-mb = 64\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(file),
            listen: Some("0.0.0.0:1".parse().unwrap()),
            ..ServeArgs::default()
        };
        let config = args.resolve().unwrap();
        assert_eq!(config.listen.to_string(), "0.0.0.0:1");
        assert_eq!(config.queue.concurrency, 3);
        assert_eq!(config.queue.retention, None);
        assert_eq!(config.runtime.memory_limit, 64 << 20);
        assert_eq!(config.runtime.max_concurrent_runs, 4);
        assert_eq!(config.shutdown_timeout, Duration::from_secs(30));
    }

    #[test]
    fn unknown_file_keys_are_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("jobhost.toml");
        std::fs::write(&file, "concurency = 3\n").unwrap();
        let error = ServeArgs {
            config: Some(file),
            ..ServeArgs::default()
        }
        .resolve()
        .unwrap_err();
        assert!(
            format!("{error:#}").contains("unknown field `concurency`"),
            "{error:#}"
        );
    }

    #[test]
    fn durations_read_like_people_write_them() {
        assert_eq!(
            "7d".parse::<HumanDuration>().unwrap().0,
            Some(Duration::from_secs(7 * 86400))
        );
        assert_eq!("off".parse::<HumanDuration>().unwrap().0, None);
        assert!("soon".parse::<HumanDuration>().is_err());
    }
}
