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

use crate::outbound::AddressPolicy;
use crate::plugins::Secrets;
use crate::queue::QueueConfig;
use crate::runtime::{GuestHttpConfig, RuntimeConfig};
use crate::storage::postgres::{DEFAULT_LEASE, DEFAULT_POOL_SIZE, MIN_LEASE, PgOptions};
use crate::storage::{Durability, PluginQuota};
use crate::webhooks::{self, Secret};

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
    /// PostgreSQL to keep the queue in, as `postgres://user@host:port/db`,
    /// instead of the data directory's SQLite file [default: SQLite].
    #[arg(long, env = "JOBHOST_DATABASE_URL")]
    pub database: Option<String>,
    /// Connections to PostgreSQL this host keeps at most [default: 16].
    #[arg(long, env = "JOBHOST_DB_POOL_SIZE")]
    pub db_pool_size: Option<usize>,
    /// On PostgreSQL, how long this host's lease lasts: renewed every
    /// quarter of it; once it runs out, other hosts recover this host's
    /// jobs [default: 10s].
    #[arg(long, env = "JOBHOST_HOST_LEASE")]
    pub host_lease: Option<HumanDuration>,
    /// Jobs run at once [default: 8].
    #[arg(long, env = "JOBHOST_CONCURRENCY")]
    pub concurrency: Option<usize>,
    /// Phase timeout when a job gives none [default: 60s].
    #[arg(long, env = "JOBHOST_PHASE_TIMEOUT")]
    pub phase_timeout: Option<HumanDuration>,
    /// Linear memory cap per phase run, in MiB [default: 256].
    #[arg(long, env = "JOBHOST_MEMORY_MB")]
    pub memory_mb: Option<u64>,
    /// The most memory a plugin's resources may give one of its runs, in
    /// MiB (`PUT /plugins/{name}/resources`) [default: 4096].
    #[arg(long, env = "JOBHOST_MAX_PLUGIN_MEMORY_MB")]
    pub max_plugin_memory_mb: Option<u64>,
    /// Attempts per job when the job gives none [default: 3].
    #[arg(long, env = "JOBHOST_MAX_ATTEMPTS")]
    pub max_attempts: Option<u32>,
    /// Delete finished jobs older than this; `off` keeps them [default: 7d].
    #[arg(long, env = "JOBHOST_RETENTION")]
    pub retention: Option<HumanDuration>,
    /// `process` survives a crash of jobhost; `full` also power loss (on
    /// PostgreSQL: `synchronous_commit` off or on) [default: process].
    #[arg(long, env = "JOBHOST_DURABILITY", value_enum)]
    pub durability: Option<Durability>,
    /// Bearer tokens, comma-separated, each `[SCOPE:]TOKEN` with SCOPE
    /// `read`, `submit` or `admin` (the default). With tokens every route
    /// but health needs one; without, the server serves loopback only.
    #[arg(
        long,
        env = "JOBHOST_TOKENS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub tokens: Option<Vec<String>>,
    /// A file of tokens, one `[SCOPE:]TOKEN` per line (`#` comments), so
    /// that they never show in `ps`.
    #[arg(long, env = "JOBHOST_TOKENS_FILE")]
    pub tokens_file: Option<PathBuf>,
    /// Serve without tokens on a non-loopback address: anyone who reaches
    /// the port can upload and run code.
    #[arg(long, env = "JOBHOST_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,
    /// Host names (besides loopback ones) that requests may be addressed to
    /// when no tokens are set, comma-separated.
    #[arg(long, env = "JOBHOST_ALLOWED_HOST", value_delimiter = ',')]
    pub allowed_host: Option<Vec<String>>,
    /// Serve `/metrics` without a token.
    #[arg(long, env = "JOBHOST_PUBLIC_METRICS")]
    pub public_metrics: bool,
    /// Connections open at once; more wait to be accepted [default: the
    /// open-file limit (raised to its hard limit at start) less 256 kept for
    /// the database and plugins].
    #[arg(long, env = "JOBHOST_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Most jobs waiting to run at once; submits past it answer 429
    /// [default: 100000].
    #[arg(long, env = "JOBHOST_MAX_PENDING_JOBS")]
    pub max_pending_jobs: Option<u64>,
    /// Most schedules stored; creating more answers 409 [default: 1000].
    #[arg(long, env = "JOBHOST_MAX_SCHEDULES")]
    pub max_schedules: Option<u64>,
    /// The shortest time a schedule may leave between two of its ticks;
    /// a cron pattern that fires more often is refused [default: 1s].
    #[arg(long, env = "JOBHOST_SCHEDULE_MIN_INTERVAL")]
    pub schedule_min_interval: Option<HumanDuration>,
    /// Most plugin versions stored; uploads past it answer 507 [default: 1000].
    #[arg(long, env = "JOBHOST_MAX_PLUGIN_VERSIONS")]
    pub max_plugin_versions: Option<u64>,
    /// Most bytes of plugin components stored, in MiB; uploads past it
    /// answer 507 [default: 2048].
    #[arg(long, env = "JOBHOST_MAX_PLUGIN_STORAGE_MB")]
    pub max_plugin_storage_mb: Option<u64>,
    /// Requests per second each token may make (bursts of as many); past it
    /// requests answer 429 with Retry-After; `0` for no limit [default: 1000].
    #[arg(long, env = "JOBHOST_RATE_LIMIT")]
    pub rate_limit: Option<u32>,
    /// How long a request may take, its body included, before it is
    /// answered 408; event streams and plugin uploads are exempt [default: 30s].
    #[arg(long, env = "JOBHOST_REQUEST_TIMEOUT")]
    pub request_timeout: Option<HumanDuration>,
    /// Largest the database may grow, in MiB; past it writes answer 503
    /// and nothing already stored is lost [default: no limit].
    #[arg(long, env = "JOBHOST_MAX_DB_MB")]
    pub max_db_mb: Option<u64>,
    /// How long a client may take to send a request's headers before its
    /// connection is closed [default: 10s].
    #[arg(long, env = "JOBHOST_HEADER_READ_TIMEOUT")]
    pub header_read_timeout: Option<HumanDuration>,
    /// Event streams (SSE) open at once, in all [default: three quarters of
    /// the connections].
    #[arg(long, env = "JOBHOST_MAX_STREAMS")]
    pub max_streams: Option<usize>,
    /// Event streams open at once from one client address [default: 64].
    #[arg(long, env = "JOBHOST_MAX_STREAMS_PER_IP")]
    pub max_streams_per_ip: Option<usize>,
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
    /// A JSON object of secret name to value, read once at start: the
    /// values of secrets that plugin grants name. `JOBHOST_SECRET_<NAME>`
    /// variables add to it and win [default: none].
    #[arg(long, env = "JOBHOST_SECRETS_FILE")]
    pub secrets_file: Option<PathBuf>,
    /// HTTP requests one phase run may send [default: 100].
    #[arg(long, env = "JOBHOST_GUEST_HTTP_MAX_REQUESTS")]
    pub guest_http_max_requests: Option<u64>,
    /// Bytes of HTTP request bodies one run may send, in KiB [default: 8192].
    #[arg(long, env = "JOBHOST_GUEST_HTTP_MAX_SENT_KB")]
    pub guest_http_max_sent_kb: Option<u64>,
    /// Bytes of HTTP response bodies one run may receive, in KiB
    /// [default: 32768].
    #[arg(long, env = "JOBHOST_GUEST_HTTP_MAX_RECEIVED_KB")]
    pub guest_http_max_received_kb: Option<u64>,
    /// Guest HTTP requests in flight at once on this host, all runs
    /// together; more wait [default: 64].
    #[arg(long, env = "JOBHOST_GUEST_HTTP_MAX_IN_FLIGHT")]
    pub guest_http_max_in_flight: Option<usize>,
    /// Longest wait for a guest HTTP response's headers (connecting
    /// included), and for each next chunk of its body [default: 30s].
    #[arg(long, env = "JOBHOST_GUEST_HTTP_TIMEOUT")]
    pub guest_http_timeout: Option<HumanDuration>,
    /// A PEM file of CA certificates that guest HTTPS trusts besides the
    /// system's roots [default: none].
    #[arg(long, env = "JOBHOST_GUEST_HTTP_CA_FILE")]
    pub guest_http_ca_file: Option<PathBuf>,
    /// An HTTP proxy for every guest HTTP request (`http://10.0.0.3:3128`):
    /// it resolves the names, so give it by address or allow its network
    /// with --allow-net [default: none, guests connect directly].
    #[arg(long, env = "JOBHOST_GUEST_HTTP_PROXY")]
    pub guest_http_proxy: Option<String>,
    /// Timeout of one webhook delivery attempt [default: 10s].
    #[arg(long, env = "JOBHOST_WEBHOOK_TIMEOUT")]
    pub webhook_timeout: Option<HumanDuration>,
    /// Attempts per webhook delivery before it is marked failed [default: 8].
    #[arg(long, env = "JOBHOST_WEBHOOK_MAX_ATTEMPTS")]
    pub webhook_max_attempts: Option<u32>,
    /// How long shutdown may take in all: open connections, then running
    /// phases, which are stopped by force at the end [default: 30s].
    #[arg(long, env = "JOBHOST_SHUTDOWN_TIMEOUT")]
    pub shutdown_timeout: Option<HumanDuration>,
    /// Networks (CIDRs or addresses, comma-separated) that webhooks may
    /// reach although they are loopback, private or link-local [default: none].
    #[arg(long, env = "JOBHOST_ALLOW_NET", value_delimiter = ',')]
    pub allow_net: Option<Vec<String>>,
    /// Bytes of `log()` lines kept per phase run, and of stdout and of
    /// stderr each, in KiB [default: 64].
    #[arg(long, env = "JOBHOST_MAX_LOG_KB")]
    pub max_log_kb: Option<usize>,
    /// Longest failure message kept from a phase run (`fail`/`retry` text,
    /// a trap), in bytes; the rest is cut with a marker [default: 4096].
    #[arg(long, env = "JOBHOST_MAX_ERROR_BYTES")]
    pub max_error_bytes: Option<usize>,
}

/// The CA certificates of a PEM file.
fn read_roots(path: &Path) -> anyhow::Result<Vec<reqwest::Certificate>> {
    let pem = std::fs::read(path)
        .with_context(|| format!("reading guest-http-ca-file {}", path.display()))?;
    let roots = reqwest::Certificate::from_pem_bundle(&pem)
        .with_context(|| format!("guest-http-ca-file {}", path.display()))?;
    anyhow::ensure!(
        !roots.is_empty(),
        "guest-http-ca-file {}: no certificate in it",
        path.display()
    );
    Ok(roots)
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// `None`: SQLite in the data directory.
    pub postgres: Option<PgOptions>,
    pub durability: Durability,
    pub access: Access,
    pub max_plugin_bytes: usize,
    pub max_body_bytes: usize,
    pub shutdown_timeout: Duration,
    /// `None`: use (or create) the secret kept in the data directory.
    pub webhook_secret: Option<Secret>,
    /// Values of the secrets that plugin grants may name.
    pub secrets: Secrets,
    pub webhook_timeout: Duration,
    pub webhook_max_attempts: u32,
    /// Which addresses outbound connections (webhooks) may reach.
    pub outbound: AddressPolicy,
    pub header_read_timeout: Duration,
    pub plugin_quota: PluginQuota,
    /// Requests per second per token; 0 for none.
    pub rate_limit: u32,
    pub request_timeout: Duration,
    /// Largest database, in bytes; `None` for no limit.
    pub max_db_bytes: Option<u64>,
    /// Connections and event streams at once; `None` derives them from the
    /// open-file limit at start.
    pub max_connections: Option<usize>,
    pub max_streams: Option<usize>,
    pub max_streams_per_ip: usize,
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
            max_pending_jobs: self
                .max_pending_jobs
                .or(file.max_pending_jobs)
                .unwrap_or(defaults.max_pending_jobs),
            max_schedules: self
                .max_schedules
                .or(file.max_schedules)
                .unwrap_or(defaults.max_schedules),
            schedule_min_interval: duration(
                self.schedule_min_interval,
                file.schedule_min_interval,
                Some(defaults.schedule_min_interval),
            )
            .unwrap_or_default(),
            ..defaults
        };
        let runtime_defaults = RuntimeConfig::default();
        let log_bytes = self
            .max_log_kb
            .or(file.max_log_kb)
            .map_or(runtime_defaults.max_log_bytes, |kb| kb << 10);
        let runtime = RuntimeConfig {
            // One spare slot, for loading plugins while every worker runs.
            max_concurrent_runs: concurrency as u32 + 1,
            memory_limit: self
                .memory_mb
                .or(file.memory_mb)
                .map_or(runtime_defaults.memory_limit, |mb| mb << 20),
            max_plugin_memory: self
                .max_plugin_memory_mb
                .or(file.max_plugin_memory_mb)
                .map_or(runtime_defaults.max_plugin_memory, |mb| mb << 20),
            max_log_bytes: log_bytes,
            max_captured_output: log_bytes,
            max_error_bytes: self
                .max_error_bytes
                .or(file.max_error_bytes)
                .unwrap_or(runtime_defaults.max_error_bytes),
            cache_dir: Some(data_dir.join("compiled")),
            http: {
                let defaults = GuestHttpConfig::default();
                let timeout = duration(
                    self.guest_http_timeout,
                    file.guest_http_timeout,
                    Some(defaults.timeout),
                )
                .unwrap_or(defaults.timeout);
                GuestHttpConfig {
                    max_requests: self
                        .guest_http_max_requests
                        .or(file.guest_http_max_requests)
                        .unwrap_or(defaults.max_requests),
                    max_request_bytes: self
                        .guest_http_max_sent_kb
                        .or(file.guest_http_max_sent_kb)
                        .map_or(defaults.max_request_bytes, |kb| kb << 10),
                    max_response_bytes: self
                        .guest_http_max_received_kb
                        .or(file.guest_http_max_received_kb)
                        .map_or(defaults.max_response_bytes, |kb| kb << 10),
                    per_host: self
                        .guest_http_max_in_flight
                        .or(file.guest_http_max_in_flight)
                        .unwrap_or(defaults.per_host),
                    timeout,
                    extra_roots: match self.guest_http_ca_file.or(file.guest_http_ca_file) {
                        Some(path) => read_roots(&path)?,
                        None => Vec::new(),
                    },
                    proxy: self
                        .guest_http_proxy
                        .or(file.guest_http_proxy)
                        .map(|url| reqwest::Proxy::all(&url))
                        .transpose()
                        .context("guest-http-proxy")?,
                    ..defaults
                }
            },
            ..runtime_defaults
        };
        let listen = self
            .listen
            .or(file.listen)
            .unwrap_or_else(|| "127.0.0.1:8080".parse().unwrap());
        let mut tokens = self.tokens.or(file.tokens).unwrap_or_default();
        if let Some(path) = self.tokens_file.or(file.tokens_file) {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading tokens file {}", path.display()))?;
            tokens.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|line| !line.starts_with('#'))
                    .map(str::to_owned),
            );
        }
        let tokens = tokens
            .iter()
            .map(String::as_str)
            .filter(|t| !t.trim().is_empty())
            .map(parse_token)
            .collect::<anyhow::Result<Vec<_>>>()?;
        let access = if tokens.is_empty() {
            let insecure = self.insecure_no_auth || file.insecure_no_auth;
            if !listen.ip().to_canonical().is_loopback() && !insecure {
                anyhow::bail!(
                    "refusing to serve {listen} without tokens: anyone who reaches it could upload and run code. \
                     Add a token (--tokens-file FILE with a line `admin:<secret>`, or --tokens), \
                     listen on 127.0.0.1, or pass --insecure-no-auth to insist"
                );
            }
            Access::Open {
                allowed_hosts: self.allowed_host.or(file.allowed_host).unwrap_or_default(),
            }
        } else {
            Access::Tokens {
                tokens,
                public_metrics: self.public_metrics || file.public_metrics,
            }
        };
        let allowed = self.allow_net.or(file.allow_net).unwrap_or_default();
        let outbound = AddressPolicy::new(
            AddressPolicy::parse_allowed(&allowed)
                .map_err(|e| anyhow::anyhow!("allow-net: {e}"))?,
        );
        let host_lease = duration(self.host_lease, file.host_lease, Some(DEFAULT_LEASE))
            .filter(|lease| *lease >= MIN_LEASE)
            .ok_or_else(|| anyhow::anyhow!("host-lease: must be at least {MIN_LEASE:?}"))?;
        let durability = self.durability.or(file.durability).unwrap_or_default();
        let postgres = self.database.or(file.database).map(|url| PgOptions {
            pool_size: self
                .db_pool_size
                .or(file.db_pool_size)
                .unwrap_or(DEFAULT_POOL_SIZE),
            lease: host_lease,
            durability,
            ..PgOptions::new(url)
        });
        Ok(Config {
            listen,
            postgres,
            durability,
            access,
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
            secrets: Secrets::load(
                self.secrets_file.or(file.secrets_file).as_deref(),
                std::env::vars(),
            )?,
            webhook_timeout: duration(
                self.webhook_timeout,
                file.webhook_timeout,
                Some(webhooks::DEFAULT_TIMEOUT),
            )
            .unwrap_or(webhooks::DEFAULT_TIMEOUT),
            webhook_max_attempts: self
                .webhook_max_attempts
                .or(file.webhook_max_attempts)
                .unwrap_or(webhooks::DEFAULT_MAX_ATTEMPTS)
                .max(1),
            plugin_quota: PluginQuota {
                max_versions: self
                    .max_plugin_versions
                    .or(file.max_plugin_versions)
                    .unwrap_or(PluginQuota::default().max_versions),
                max_bytes: self
                    .max_plugin_storage_mb
                    .or(file.max_plugin_storage_mb)
                    .map_or(PluginQuota::default().max_bytes, |mb| mb << 20),
            },
            rate_limit: self.rate_limit.or(file.rate_limit).unwrap_or(1000),
            request_timeout: duration(
                self.request_timeout,
                file.request_timeout,
                Some(Duration::from_secs(30)),
            )
            .unwrap_or(Duration::from_secs(30)),
            max_db_bytes: self.max_db_mb.or(file.max_db_mb).map(|mb| mb << 20),
            header_read_timeout: duration(
                self.header_read_timeout,
                file.header_read_timeout,
                Some(Duration::from_secs(10)),
            )
            .unwrap_or(Duration::from_secs(10)),
            max_connections: self.max_connections.or(file.max_connections),
            max_streams: self.max_streams.or(file.max_streams),
            max_streams_per_ip: self
                .max_streams_per_ip
                .or(file.max_streams_per_ip)
                .unwrap_or(64),
            data_dir,
            queue,
            // Guest HTTP and webhooks share the one address policy.
            runtime: RuntimeConfig {
                outbound: outbound.clone(),
                ..runtime
            },
            outbound,
        })
    }
}

/// What a token may do; each scope includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// Views and event streams.
    Read,
    /// Also creates, cancels and retries jobs.
    Submit,
    /// Also plugins, the queue (pause, resume, purge) and job deletion.
    Admin,
}

impl Scope {
    pub fn name(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Submit => "submit",
            Scope::Admin => "admin",
        }
    }
}

/// Who may use the API.
#[derive(Clone)]
pub enum Access {
    /// No tokens: loopback only, with `Host` and `Origin` checked.
    Open { allowed_hosts: Vec<String> },
    /// Every route but health needs a token of the right scope.
    Tokens {
        tokens: Vec<(Scope, String)>,
        public_metrics: bool,
    },
}

/// Never prints a token.
impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Access::Open { allowed_hosts } => f
                .debug_struct("Open")
                .field("allowed_hosts", allowed_hosts)
                .finish(),
            Access::Tokens {
                tokens,
                public_metrics,
            } => f
                .debug_struct("Tokens")
                .field(
                    "scopes",
                    &tokens
                        .iter()
                        .map(|(scope, _)| scope.name())
                        .collect::<Vec<_>>(),
                )
                .field("public_metrics", public_metrics)
                .finish(),
        }
    }
}

/// `[SCOPE:]TOKEN`; no scope means `admin`, which is what a token could do
/// before there were scopes.
fn parse_token(entry: &str) -> anyhow::Result<(Scope, String)> {
    let entry = entry.trim();
    let (scope, token) = match entry.split_once(':') {
        Some(("read", token)) => (Scope::Read, token),
        Some(("submit", token)) => (Scope::Submit, token),
        Some(("admin", token)) => (Scope::Admin, token),
        _ => (Scope::Admin, entry),
    };
    if token.is_empty() {
        anyhow::bail!("`{}:` names a scope but no token", scope.name());
    }
    Ok((scope, token.to_owned()))
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
            tokens: Some(vec!["t0ken".into()]),
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

    /// Redis's protected mode: no tokens means loopback only, unless the
    /// operator insists.
    #[test]
    fn without_tokens_only_loopback_is_served() {
        let open = |listen: &str, insecure| {
            ServeArgs {
                listen: Some(listen.parse().unwrap()),
                insecure_no_auth: insecure,
                ..ServeArgs::default()
            }
            .resolve()
        };
        let refused = open("0.0.0.0:8080", false).unwrap_err().to_string();
        assert!(
            refused.contains("--tokens-file") && refused.contains("--insecure-no-auth"),
            "{refused}"
        );
        assert!(open("[::]:8080", false).is_err());
        assert!(open("127.0.0.1:8080", false).is_ok());
        assert!(open("[::1]:8080", false).is_ok());
        assert!(matches!(
            open("0.0.0.0:8080", true).unwrap().access,
            Access::Open { .. }
        ));
    }

    #[test]
    fn tokens_come_with_scopes_from_flags_and_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tokens");
        std::fs::write(&file, "# operators\nadmin:root-token\n\nread:viewer\n").unwrap();
        let config = ServeArgs {
            listen: Some("0.0.0.0:8080".parse().unwrap()),
            tokens: Some(vec!["submit:ci-token".into(), "legacy".into()]),
            tokens_file: Some(file),
            ..ServeArgs::default()
        }
        .resolve()
        .unwrap();
        let Access::Tokens { tokens, .. } = &config.access else {
            panic!("tokens were configured");
        };
        let expected = [
            (Scope::Submit, "ci-token"),
            (Scope::Admin, "legacy"),
            (Scope::Admin, "root-token"),
            (Scope::Read, "viewer"),
        ];
        let tokens: Vec<(Scope, &str)> = tokens.iter().map(|(s, t)| (*s, t.as_str())).collect();
        assert_eq!(tokens, expected);
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("root-token") && !shown.contains("viewer"),
            "{shown}"
        );
    }

    /// `--database` with its settings; a lease below the minimum is
    /// refused, naming the flag.
    #[test]
    fn postgres_settings_resolve_and_a_too_short_lease_is_refused() {
        let args = |lease: &str| ServeArgs {
            database: Some("postgres://jobhost@db/jobs".into()),
            db_pool_size: Some(4),
            host_lease: Some(lease.parse().unwrap()),
            ..ServeArgs::default()
        };
        let config = args("3s").resolve().unwrap();
        let postgres = config.postgres.expect("PostgreSQL chosen");
        assert_eq!(
            (postgres.pool_size, postgres.lease, postgres.durability),
            (4, Duration::from_secs(3), Durability::Process)
        );
        let refused = args("500ms").resolve().unwrap_err().to_string();
        assert!(
            refused.contains("host-lease: must be at least 1s"),
            "{refused}"
        );
        assert!(ServeArgs::default().resolve().unwrap().postgres.is_none());
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
