//! Guest HTTP: `wasi:http/outgoing-handler` (wasmtime-wasi-http) with
//! jobhost's own `send_request` ([`GuestHttp`]).
//!
//! The default sender would resolve the name again after any check (a
//! DNS-rebinding gap), trust only built-in roots and let the guest raise
//! its timeouts. This one sends through the one address policy
//! ([`AddressPolicy::client`]: the name is resolved once, every address is
//! checked, the connection goes to a checked address with SNI for the
//! name, no proxy from the environment, no redirects), and only to origins
//! the run's grants name. An IP-literal target that is loopback, private or
//! link-local passes only when a grant names that very address; a wildcard
//! never admits one. Timeouts are the host's; a guest may only shorten the
//! wait for a response. Requests, bytes and waiting time are counted per
//! run; requests and bytes are capped per run, requests in flight per run
//! and, until their headers arrive, per host.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyDataStream, BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody, WasiHttpHooks};

use super::grants::{LOGGED_REFUSALS, RunGrants};
use crate::model::grants::HostRule;
use crate::outbound::AddressPolicy;

/// The tracing target of guest HTTP request lines.
const GUEST_HTTP_TARGET: &str = "jobhost::egress";

/// How guest HTTP goes out, and what a run may do with it (see the
/// README's Configuration).
#[derive(Debug, Clone)]
pub struct GuestHttpConfig {
    /// Requests one run may send.
    pub max_requests: u64,
    /// Bytes of request bodies one run may send, all requests together.
    pub max_request_bytes: u64,
    /// Bytes of response bodies one run may receive, all together.
    pub max_response_bytes: u64,
    /// Requests of one run in flight at once; more wait.
    pub per_run: usize,
    /// Requests of all runs of this host in flight at once; more wait.
    pub per_host: usize,
    /// Longest wait for a response's headers (connecting included), and
    /// for each next chunk of its body.
    pub timeout: Duration,
    /// Roots trusted besides the system's (an internal CA).
    pub extra_roots: Vec<reqwest::Certificate>,
    /// An HTTP proxy every guest request goes through (which then
    /// resolves the names and applies the operator's own egress rules).
    pub proxy: Option<reqwest::Proxy>,
}

impl Default for GuestHttpConfig {
    fn default() -> Self {
        GuestHttpConfig {
            max_requests: 100,
            max_request_bytes: 8 << 20,
            max_response_bytes: 32 << 20,
            per_run: 8,
            per_host: 64,
            timeout: Duration::from_secs(30),
            extra_roots: Vec::new(),
            proxy: None,
        }
    }
}

/// What every run of this process shares: the policy, the host-wide cap
/// and the client (built at the first request: most hosts never need it).
pub(super) struct OutboundHttp {
    policy: Arc<AddressPolicy>,
    config: GuestHttpConfig,
    host_slots: Arc<Semaphore>,
    client: OnceLock<Result<reqwest::Client, String>>,
}

impl OutboundHttp {
    pub(super) fn new(policy: AddressPolicy, config: GuestHttpConfig) -> Self {
        OutboundHttp {
            policy: Arc::new(policy),
            host_slots: Arc::new(Semaphore::new(config.per_host.max(1))),
            config,
            client: OnceLock::new(),
        }
    }

    fn client(&self) -> Result<reqwest::Client, Error> {
        self.client
            .get_or_init(|| {
                crate::tls::init();
                let mut client = self
                    .policy
                    .client()
                    .connect_timeout(self.config.timeout)
                    .read_timeout(self.config.timeout);
                for root in &self.config.extra_roots {
                    client = client.add_root_certificate(root.clone());
                }
                if let Some(proxy) = &self.config.proxy {
                    client = client.proxy(proxy.clone());
                }
                client
                    .build()
                    .map_err(|e| format!("building the HTTP client: {e}"))
            })
            .clone()
            .map_err(|e| Error::InternalError(Some(e)))
    }
}

/// What a run's guest HTTP used.
#[derive(Debug, Default)]
pub(super) struct HttpUsage {
    pub(super) requests: AtomicU64,
    pub(super) bytes_out: AtomicU64,
    pub(super) bytes_in: AtomicU64,
    /// Milliseconds from sending each request to its response's headers.
    pub(super) wait_ms: AtomicU64,
    /// Requests refused.
    refusals: AtomicU64,
}

/// One run's `wasi:http` hooks.
pub(super) struct GuestHttp {
    shared: Arc<OutboundHttp>,
    grants: Option<Arc<RunGrants>>,
    /// The guest's own name for its plugin, when the run has no grants.
    plugin: String,
    pub(super) usage: Arc<HttpUsage>,
    run_slots: Arc<Semaphore>,
}

/// A request that passed the grants, on its way.
struct Outgoing {
    method: http::Method,
    origin: String,
    plugin: String,
    job: String,
}

impl GuestHttp {
    pub(super) fn new(
        shared: Arc<OutboundHttp>,
        grants: Option<Arc<RunGrants>>,
        plugin: &str,
    ) -> Self {
        let per_run = shared.config.per_run.max(1);
        GuestHttp {
            shared,
            grants,
            plugin: plugin.to_owned(),
            usage: Arc::default(),
            run_slots: Arc::new(Semaphore::new(per_run)),
        }
    }

    /// Whether the run may send this request, before any connection: the
    /// URL as it will be sent. The URL is parsed the way the client parses
    /// it first, so that what is checked is what is connected to
    /// (`http://2130706433/` is 127.0.0.1, an address, not a name).
    fn admit(&self, method: &http::Method, uri: &http::Uri) -> Result<reqwest::Url, String> {
        if *method == http::Method::CONNECT || *method == http::Method::TRACE {
            return Err(format!("the method {method} is not allowed"));
        }
        let grants = self.grants.as_deref().ok_or("this run has no grants")?;
        let rules = &grants.covered()?.http;
        let url = reqwest::Url::parse(&uri.to_string())
            .map_err(|e| format!("the URL of {} is not valid: {e}", uri_origin(uri)))?;
        let https = match url.scheme() {
            "https" => true,
            "http" => false,
            other => return Err(format!("the scheme {other} is not HTTP")),
        };
        // The parser has turned every form of an address into its plain
        // text (IPv6 in brackets), so a host that parses as an address is one.
        let host = url.host_str().ok_or("the request names no host")?;
        let address = host.trim_matches(['[', ']']).parse::<IpAddr>().ok();
        let port = url
            .port_or_known_default()
            .unwrap_or(if https { 443 } else { 80 });
        let matching: Vec<_> = rules
            .iter()
            .filter(|rule| rule.matches(https, host, port))
            .collect();
        if matching.is_empty() {
            return Err(format!(
                "origin {} is not granted to plugin `{}` {} (`http` in its grants): {}",
                origin(&url),
                grants.plugin,
                grants.version,
                grants.where_to_grant()
            ));
        }
        // A name is checked once resolved (the client's resolver); an
        // address here, unless a grant names that very address.
        if let Some(address) = address
            && !matching
                .iter()
                .any(|rule| rule.host == HostRule::Address(address))
        {
            self.shared
                .policy
                .check(address)
                .map_err(|refused| refused.to_string())?;
        }
        let max = self.shared.config.max_requests;
        self.usage
            .requests
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |sent| {
                (sent < max).then_some(sent + 1)
            })
            .map_err(|_| format!("the run's limit of {max} HTTP requests is reached"))?;
        Ok(url)
    }

    fn names(&self) -> (String, String) {
        match &self.grants {
            Some(grants) => (grants.plugin.clone(), grants.job_id.clone()),
            None => (self.plugin.clone(), "-".to_owned()),
        }
    }
}

/// `scheme://host[:port]` of a request that was not admitted: never its
/// user, path or query, which may hold secrets; the host cut short.
fn uri_origin(uri: &http::Uri) -> String {
    let host: String = uri.host().unwrap_or("?").chars().take(256).collect();
    let port = uri.port_u16().map(|p| format!(":{p}")).unwrap_or_default();
    format!("{}://{host}{port}", uri.scheme_str().unwrap_or("https"))
}

/// `scheme://host:port` of a URL.
fn origin(url: &reqwest::Url) -> String {
    let port = url.port_or_known_default().unwrap_or_default();
    let host = url.host_str().unwrap_or_default();
    format!("{}://{host}:{port}", url.scheme())
}

type ResponseFuture = Box<
    dyn Future<
            Output = Result<
                (
                    http::Response<WasiBody>,
                    Box<dyn Future<Output = Result<(), Error>> + Send>,
                ),
                Error,
            >,
        > + Send,
>;

impl WasiHttpHooks for GuestHttp {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), Error>> + Send>,
    ) -> ResponseFuture {
        let (plugin, job) = self.names();
        let admitted = self.admit(request.method(), request.uri());
        let outgoing = Outgoing {
            method: request.method().clone(),
            origin: match &admitted {
                Ok(url) => origin(url),
                Err(_) => uri_origin(request.uri()),
            },
            plugin,
            job,
        };
        let url = match admitted {
            Ok(url) => url,
            Err(reason) => {
                // A guest that loops on refused requests logs only its first few.
                if self.usage.refusals.fetch_add(1, Ordering::Relaxed) < LOGGED_REFUSALS {
                    tracing::warn!(
                        target: GUEST_HTTP_TARGET,
                        plugin = %outgoing.plugin, job = %outgoing.job, method = %outgoing.method,
                        origin = %outgoing.origin, %reason, "refused a guest's HTTP request"
                    );
                }
                let refused =
                    Error::InternalError(Some(format!("jobhost refused the request: {reason}")));
                // The guest may be writing the body: take it (up to the cap) and
                // drop it, so that it sees this refusal rather than a broken
                // body stream.
                let mut body = BodyDataStream::new(request.into_body());
                let max = self.shared.config.max_request_bytes;
                return Box::new(async move {
                    let mut taken = 0;
                    while let Some(Ok(chunk)) = body.next().await {
                        taken += chunk.len() as u64;
                        if taken > max {
                            break;
                        }
                    }
                    Err(refused)
                });
            }
        };
        let (shared, usage, run_slots) = (
            self.shared.clone(),
            self.usage.clone(),
            self.run_slots.clone(),
        );
        Box::new(async move {
            let run_slot = run_slots.acquire_owned().await.expect("never closed");
            let host_slot = shared
                .host_slots
                .clone()
                .acquire_owned()
                .await
                .expect("never closed");
            let started = Instant::now();
            let response = send(&shared, usage.clone(), url, request, options, &outgoing).await;
            // The host-wide slot is for requests waiting on the network; a
            // response the guest reads slowly holds only its run's slot.
            drop(host_slot);
            let response = response.inspect_err(|error| {
                tracing::info!(
                    target: GUEST_HTTP_TARGET, plugin = %outgoing.plugin, job = %outgoing.job,
                    method = %outgoing.method, origin = %outgoing.origin, %error, "guest HTTP request failed"
                );
            })?;
            let response =
                counted_response(response, usage, outgoing, run_slot, started, &shared.config);
            let done: Box<dyn Future<Output = Result<(), Error>> + Send> =
                Box::new(async { Ok(()) });
            Ok((response, done))
        })
    }
}

async fn send(
    shared: &OutboundHttp,
    usage: Arc<HttpUsage>,
    url: reqwest::Url,
    request: http::Request<WasiBody>,
    options: Option<RequestOptions>,
    outgoing: &Outgoing,
) -> Result<http::Response<reqwest::Body>, Error> {
    let client = shared.client()?;
    let (mut parts, body) = request.into_parts();
    // reqwest sets Host from the URL.
    parts.headers.remove(http::header::HOST);
    let max_out = shared.config.max_request_bytes;
    let sent = usage.clone();
    let body = BodyDataStream::new(body).map(move |chunk| {
        let chunk = chunk?;
        if !take(&sent.bytes_out, chunk.len(), max_out) {
            return Err(Error::HttpRequestBodySize(Some(max_out)));
        }
        Ok::<Bytes, Error>(chunk)
    });
    let request = client
        .request(parts.method, url)
        .headers(parts.headers)
        .body(reqwest::Body::wrap_stream(body));
    // The guest may shorten the wait for headers, never lengthen it.
    let wait = options
        .and_then(|o| o.first_byte_timeout)
        .map_or(shared.config.timeout, |t| t.min(shared.config.timeout));
    let started = Instant::now();
    let sent = tokio::time::timeout(wait, request.send()).await;
    usage
        .wait_ms
        .fetch_add(started.elapsed().as_millis() as u64, Ordering::Relaxed);
    match sent {
        Err(_) => Err(Error::HttpResponseTimeout),
        Ok(Err(error)) if error.is_timeout() => Err(Error::ConnectionTimeout),
        // Without the URL: its path or query may hold a secret.
        Ok(Err(error)) => Err(Error::InternalError(Some(format!(
            "{} {}: {}",
            outgoing.method,
            outgoing.origin,
            error_chain(&error.without_url())
        )))),
        Ok(Ok(response)) => Ok(response.into()),
    }
}

/// Counts `bytes` against a run's `max`, if they fit: what is refused is
/// not counted, so usage never reports more than the cap.
fn take(counter: &AtomicU64, bytes: usize, max: u64) -> bool {
    counter
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
            let total = used + bytes as u64;
            (total <= max).then_some(total)
        })
        .is_ok()
}

/// An error with its causes: the address policy's refusal is a cause.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The response with a body that counts and caps the bytes the run
/// receives (the client's read timeout bounds the wait for each chunk),
/// and logs the request once the guest is done with it.
fn counted_response(
    response: http::Response<reqwest::Body>,
    usage: Arc<HttpUsage>,
    outgoing: Outgoing,
    run_slot: OwnedSemaphorePermit,
    started: Instant,
    config: &GuestHttpConfig,
) -> http::Response<WasiBody> {
    let (parts, body) = response.into_parts();
    let mut log = RequestLog {
        outgoing,
        status: parts.status.as_u16(),
        started,
        bytes_in: 0,
        usage: usage.clone(),
        _run_slot: run_slot,
    };
    let max_in = config.max_response_bytes;
    let chunks = BodyDataStream::new(body).map(move |chunk| {
        let chunk = chunk.map_err(|e| {
            if e.is_timeout() {
                Error::ConnectionReadTimeout
            } else {
                Error::InternalError(Some(error_chain(&e)))
            }
        })?;
        // The whole guard moves into the closure (not only this field), so
        // it logs when the body is dropped.
        let log = &mut log;
        if !take(&usage.bytes_in, chunk.len(), max_in) {
            return Err(Error::HttpResponseBodySize(Some(max_in)));
        }
        log.bytes_in += chunk.len() as u64;
        Ok(Frame::data(chunk))
    });
    let body = StreamBody::new(chunks).boxed_unsync();
    http::Response::from_parts(parts, body)
}

/// Logs one request when its response is dropped (read to the end or not):
/// method, origin, status, bytes and time, never headers or bodies.
struct RequestLog {
    outgoing: Outgoing,
    status: u16,
    started: Instant,
    bytes_in: u64,
    usage: Arc<HttpUsage>,
    _run_slot: OwnedSemaphorePermit,
}

impl Drop for RequestLog {
    fn drop(&mut self) {
        let o = &self.outgoing;
        tracing::info!(
            target: GUEST_HTTP_TARGET,
            plugin = %o.plugin, job = %o.job, method = %o.method, origin = %o.origin,
            status = self.status, bytes_in = self.bytes_in,
            run_bytes_out = self.usage.bytes_out.load(Ordering::Relaxed),
            ms = self.started.elapsed().as_millis() as u64,
            "guest HTTP request"
        );
    }
}
