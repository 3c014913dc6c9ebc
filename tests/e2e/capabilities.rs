//! Grants: what an operator lets a plugin read through `wasi:config/store`
//! and call through `wasi:http`, set over HTTP and used by real components
//! against a real API, with secret values that stay out of every route,
//! event and log.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::routing::{get, post};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::server::{Server, TIMEOUT};

const ADMIN: &str = "adm1n";
const SUBMITTER: &str = "submitter-1";
const SECRET_VALUE: &str = "tok-5ecret-value";

/// Runs `read-config` (at `version`) on `keys`; returns its output.
async fn read(server: &Server, version: &str, keys: &[&str]) -> Value {
    let job = server
        .submit(&json!({
            "phases": [{"name": "read", "plugin": "read-config", "version": version}],
            "payload": {"keys": keys},
        }))
        .await;
    let job = server.wait_finished(job["id"].as_str().unwrap()).await;
    assert_eq!(job["status"], "completed", "{job}");
    job["phases"][0]["output"].clone()
}

async fn put_grants(server: &Server, token: &str, grants: &Value) -> (StatusCode, Value) {
    let request = server
        .client
        .put(server.url("/plugins/read-config/grants"))
        .bearer_auth(token)
        .json(grants);
    let response = request.send().await.unwrap();
    (
        response.status(),
        response.json().await.unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn a_plugin_reads_what_its_version_was_granted_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets.json");
    let file = json!({"mail_token": SECRET_VALUE, "db_password": "not-for-plugins"});
    std::fs::write(&secrets, file.to_string()).unwrap();
    let tokens = format!("{ADMIN},submit:{SUBMITTER}");
    let secrets_arg = secrets.to_str().unwrap();
    let server = Server::start(&["--tokens", &tokens, "--secrets-file", secrets_arg]).await;
    for version in ["1.0.0", "2.0.0"] {
        let (status, body) = server
            .upload("read-config", version, plugin_artifacts::READ_CONFIG)
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }

    // Without grants the plugin loads and runs; its reads fail, naming why.
    let output = read(&server, "1.0.0", &["region"]).await;
    let refused = output["errors"]["region"].as_str().unwrap();
    assert!(refused.contains("has no grants"), "{refused}");
    assert!(
        refused.contains("PUT /plugins/read-config/grants"),
        "{refused}"
    );

    // Grants are the operator's: a submitter may not set them, and grants
    // that name a version the plugin lacks store nothing.
    let grants = json!({
        "versions": ["1.0.0"],
        "config": {"region": "eu-west-1"},
        "secrets": ["mail_token", "smtp_password"],
        "http": [],
    });
    let (status, _) = put_grants(&server, SUBMITTER, &grants).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, body) = put_grants(&server, ADMIN, &json!({"versions": ["9.9.9"]})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["code"], "invalid_grants");
    assert!(body["error"]["message"].as_str().unwrap().contains("9.9.9"));
    let (status, body) = put_grants(&server, ADMIN, &json!({"versions": [], "net": []})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let (_, plugin) = server.get("/plugins/read-config").await;
    assert_eq!(
        plugin["grants"],
        Value::Null,
        "nothing was stored: {plugin}"
    );

    let (status, body) = put_grants(&server, ADMIN, &grants).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // The covered version reads its plain value and its secret; a secret
    // granted but held by no one, and a secret the server holds but did
    // not grant, are refused, each naming what to do.
    let keys = ["region", "mail_token", "smtp_password", "db_password"];
    let output = read(&server, "1.0.0", &keys).await;
    assert_eq!(
        output["values"],
        json!({"region": "eu-west-1", "mail_token": SECRET_VALUE}),
        "{output}"
    );
    let errors = &output["errors"];
    let no_value = errors["smtp_password"].as_str().unwrap();
    assert!(
        no_value.contains("JOBHOST_SECRET_SMTP_PASSWORD"),
        "{no_value}"
    );
    let not_granted = errors["db_password"].as_str().unwrap();
    assert!(
        not_granted.contains("`db_password` is not granted to plugin `read-config` 1.0.0"),
        "{not_granted}"
    );

    // A new version does not inherit the grants.
    let output = read(&server, "2.0.0", &["region"]).await;
    let uncovered = output["errors"]["region"].as_str().unwrap();
    assert!(
        uncovered.contains("do not cover version 2.0.0 (they cover 1.0.0)"),
        "{uncovered}"
    );

    // Grants show by name; the secret's value is nowhere to be read.
    let (_, plugin) = server.get("/plugins/read-config").await;
    assert_eq!(plugin["grants"], grants, "{plugin}");
    let mut events = server
        .events("/events?types=plugin:grants:changed", Some(0))
        .await;
    let changed = events.next_event().await.unwrap();
    assert_eq!(
        changed.data["data"],
        json!({
            "plugin": "read-config",
            "versions": ["1.0.0"],
            "config_keys": ["region"],
            "secrets": ["mail_token", "smtp_password"],
        }),
        "{:?}",
        changed.data
    );
    let log = server.log();
    assert!(
        log.contains("refused a guest's config read") && log.contains("db_password"),
        "refusals are logged on the host"
    );
    for text in [log, plugin.to_string(), changed.data.to_string()] {
        assert!(
            !text.contains(SECRET_VALUE),
            "a secret value leaked: {text}"
        );
    }
}

/// The contract gained an import (`wasi:config/store`) without a version
/// bump: a component built against the contract before it still loads and
/// runs. `tests/fixtures/echo-contract-0.1.0.wasm` is `plugins/testing/echo`
/// built at commit d29ea63, before the import existed.
#[tokio::test]
async fn a_plugin_built_before_config_existed_still_runs() {
    let server = Server::start(&[]).await;
    let old = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/echo-contract-0.1.0.wasm"
    ))
    .unwrap();
    let response = server
        .client
        .put(server.url("/plugins/echo/versions/0.1.0"))
        .body(old)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let job = server
        .submit(&json!({"phases": [{"name": "e", "plugin": "echo"}], "payload": 7}))
        .await;
    let job = server.wait_finished(job["id"].as_str().unwrap()).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["phases"][0]["output"]["payload"], 7);
}

/// A phase that uses a secret without printing it: the value is in no
/// route, event, log line, error, or file of the data directory (the
/// database and its WAL included).
#[tokio::test]
async fn a_secret_a_phase_uses_is_in_no_route_log_or_database_file() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets.json");
    std::fs::write(&secrets, json!({"mail_token": SECRET_VALUE}).to_string()).unwrap();
    let mut server = Server::start(&["--secrets-file", secrets.to_str().unwrap()]).await;
    server
        .upload("read-config", "1.0.0", plugin_artifacts::READ_CONFIG)
        .await;
    let grants = json!({"versions": ["1.0.0"], "secrets": ["mail_token"]});
    server.grant("read-config", &grants).await;
    let job = server
        .submit(&json!({
            "phases": [{"name": "read", "plugin": "read-config"}],
            "payload": {"keys": ["mail_token", "missing"], "hide_values": true},
        }))
        .await;
    let id = job["id"].as_str().unwrap();
    let done = server.wait_finished(id).await;
    assert_eq!(
        done["phases"][0]["output"]["values"],
        json!({"mail_token": SECRET_VALUE.len()}),
        "the phase read the secret"
    );
    let mut seen = vec![done.to_string()];
    for route in [
        "/jobs",
        "/plugins",
        "/plugins/read-config",
        "/queue",
        "/metrics",
    ] {
        seen.push(server.get_text(route).await);
    }
    let mut events = server.events(&format!("/jobs/{id}/events"), Some(0)).await;
    while let Some(event) = events.next_event().await {
        seen.push(event.data.to_string());
    }
    assert!(server.terminate().success());
    seen.push(server.log());
    for text in &seen {
        assert!(
            !text.contains(SECRET_VALUE),
            "a secret value leaked: {text}"
        );
    }
    let mut files = vec![server.dir.path().join("data")];
    while let Some(path) = files.pop() {
        if path.is_dir() {
            files.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        assert!(
            !bytes
                .windows(SECRET_VALUE.len())
                .any(|w| w == SECRET_VALUE.as_bytes()),
            "the secret is in {}",
            path.display()
        );
    }
}

/// An API a phase may call: counts the requests that reach it.
struct Api {
    url: String,
    hits: watch::Receiver<usize>,
    _server: tokio::task::JoinHandle<()>,
}

impl Api {
    async fn start() -> Api {
        let (counted, hits) = watch::channel(0);
        let counted = Arc::new(counted);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        // The same server under another name: another origin.
        let elsewhere = format!(
            "http://localhost:{}/hello",
            listener.local_addr().unwrap().port()
        );
        let app = Router::new()
            .route("/hello", get(|| async { "hi from the api" }))
            .route(
                "/redirect",
                get(move || async move { axum::response::Redirect::to(&elsewhere) }),
            )
            .route(
                "/echo",
                post(|body: Bytes| async move { format!("got {} bytes", body.len()) }),
            )
            .route("/big", get(|| async { "x".repeat(64 << 10) }))
            .route("/never", get(std::future::pending::<&'static str>))
            .layer(axum::middleware::from_fn(
                move |request: axum::extract::Request, next: axum::middleware::Next| {
                    counted.send_modify(|hits| *hits += 1);
                    next.run(request)
                },
            ));
        let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Api {
            url,
            hits,
            _server: server,
        }
    }

    fn hits(&self) -> usize {
        *self.hits.borrow()
    }

    /// Waits until `count` requests have reached it.
    async fn reached(&self, count: usize) {
        let mut hits = self.hits.clone();
        tokio::time::timeout(TIMEOUT, hits.wait_for(|hits| *hits >= count))
            .await
            .expect("the request never reached the API")
            .unwrap();
    }
}

/// Runs `fetch` 1.0.0 on `requests`; returns the finished job.
async fn fetch(server: &Server, requests: Value, timeout_ms: u64) -> Value {
    let job = server
        .submit(&json!({
            "phases": [{"name": "fetch", "plugin": "fetch", "timeout_ms": timeout_ms}],
            "payload": {"requests": requests},
            "max_attempts": 1,
        }))
        .await;
    server.wait_finished(job["id"].as_str().unwrap()).await
}

async fn grant_http(server: &Server, origins: &[&str]) {
    let grants = json!({"versions": ["1.0.0"], "http": origins});
    server.grant("fetch", &grants).await;
}

/// A redirect reaches the guest as a response (the host follows none), and
/// the guest's own request to where it points is refused when that origin
/// is not granted.
#[tokio::test]
async fn a_redirect_is_the_guests_to_follow_within_its_grants() {
    let api = Api::start().await;
    let server = Server::start(&[]).await;
    server
        .upload("fetch", "1.0.0", plugin_artifacts::FETCH)
        .await;
    grant_http(&server, &[&api.url]).await;
    let port = api.url.rsplit(':').next().unwrap();
    let requests = json!([
        {"url": format!("{}/redirect", api.url)},
        {"url": format!("http://localhost:{port}/hello")},
    ]);
    let job = fetch(&server, requests, 30_000).await;
    let out = &job["phases"][0]["output"];
    assert_eq!(out[0]["status"], 303, "{out}");
    let refused = out[1]["error"].as_str().unwrap();
    assert!(refused.contains("is not granted"), "{refused}");
    assert_eq!(api.hits(), 1, "only the redirect itself reached the API");
}

/// Grants changed while jobs wait apply to the phases that start after the
/// change: a key taken back is refused to a job queued before.
#[tokio::test]
async fn grants_taken_back_while_jobs_wait_apply_to_their_phases() {
    let server = Server::start(&[]).await;
    server
        .upload("read-config", "1.0.0", plugin_artifacts::READ_CONFIG)
        .await;
    let grant = |config: Value| json!({"versions": ["1.0.0"], "config": config});
    server
        .grant("read-config", &grant(json!({"region": "eu"})))
        .await;
    server.post("/queue/pause", &json!({})).await;
    let job = server
        .submit(&json!({
            "phases": [{"name": "read", "plugin": "read-config"}],
            "payload": {"keys": ["region"]},
        }))
        .await;
    server.grant("read-config", &grant(json!({}))).await;
    server.post("/queue/resume", &json!({})).await;
    let done = server.wait_finished(job["id"].as_str().unwrap()).await;
    let output = &done["phases"][0]["output"];
    assert_eq!(output["values"], json!({}), "{output}");
    let refused = output["errors"]["region"].as_str().unwrap();
    assert!(refused.contains("`region` is not granted"), "{refused}");
}

#[tokio::test]
async fn a_plugin_calls_only_the_origins_granted_to_it_within_its_caps() {
    let api = Api::start().await;
    let server = Server::start(&[
        "--guest-http-max-requests",
        "4",
        "--guest-http-max-received-kb",
        "16",
    ])
    .await;
    server
        .upload("fetch", "1.0.0", plugin_artifacts::FETCH)
        .await;
    let hello = format!("{}/hello", api.url);

    // Without grants nothing is sent.
    let job = fetch(&server, json!([{"url": hello}]), 30_000).await;
    let error = job["phases"][0]["output"][0]["error"].as_str().unwrap();
    assert!(error.contains("has no grants"), "{error}");
    assert_eq!(api.hits(), 0);

    grant_http(&server, &[&api.url]).await;
    let port = api.url.rsplit(':').next().unwrap();
    let requests = json!([
        {"url": hello},
        {"url": format!("{}/echo", api.url), "method": "POST", "body": "abcdef"},
        // Another name for the same address is another origin.
        {"url": format!("http://localhost:{port}/hello")},
        {"url": hello},
        // Past the run's 16 KiB of responses: this one, and any after it.
        {"url": format!("{}/big", api.url)},
        {"url": hello},
    ]);
    let job = fetch(&server, requests, 30_000).await;
    assert_eq!(job["status"], "completed", "{job}");
    let out = &job["phases"][0]["output"];
    assert_eq!(out[0], json!({"status": 200, "body": "hi from the api"}));
    assert_eq!(out[1], json!({"status": 200, "body": "got 6 bytes"}));
    let other_origin = out[2]["error"].as_str().unwrap();
    assert!(
        other_origin.contains(&format!(
            "origin http://localhost:{port} is not granted to plugin `fetch` 1.0.0"
        )),
        "{other_origin}"
    );
    assert_eq!(out[3]["status"], 200);
    let too_big = out[4]["error"].as_str().unwrap();
    assert!(
        too_big.contains("response body size exceeds limit: 16384 bytes"),
        "{too_big}"
    );
    let over_cap = out[5]["error"].as_str().unwrap();
    assert!(over_cap.contains("limit of 4 HTTP requests"), "{over_cap}");
    assert_eq!(api.hits(), 4, "refused requests never connect");
    let usage = &job["phases"][0]["usage"];
    assert_eq!(usage["http_requests"], 4, "{usage}");
    assert_eq!(usage["http_bytes_out"], 6, "{usage}");
    // The refused chunk is not counted: usage stays within the cap.
    let received = usage["http_bytes_in"].as_u64().unwrap();
    let bodies = ["hi from the api", "got 6 bytes", "hi from the api"];
    let read: usize = bodies.iter().map(|body| body.len()).sum();
    assert!((read as u64..=16 << 10).contains(&received), "{usage}");

    // A wildcard never admits a loopback address, however it is spelled.
    grant_http(&server, &["http://*:*"]).await;
    let spellings = json!([
        {"url": hello},
        {"url": format!("http://2130706433:{port}/hello")},
        {"url": format!("http://127.1:{port}/hello")},
        {"url": format!("http://[::ffff:127.0.0.1]:{port}/hello")},
    ]);
    let job = fetch(&server, spellings, 30_000).await;
    for out in job["phases"][0]["output"].as_array().unwrap() {
        let error = out["error"].as_str().unwrap_or_else(|| panic!("{out}"));
        assert!(error.contains("loopback address"), "{error}");
    }
    assert_eq!(api.hits(), 4);

    let log = server.log();
    assert!(
        log.contains("refused a guest's HTTP request"),
        "refusals are logged"
    );
    assert!(log.contains("guest HTTP request") && log.contains("status=200"));
    assert!(
        !log.contains("hi from the api"),
        "bodies stay out of the log"
    );
}

#[tokio::test]
async fn a_guest_waiting_on_http_is_stopped_by_its_timeout_and_by_cancel() {
    let api = Api::start().await;
    let server = Server::start(&[]).await;
    server
        .upload("fetch", "1.0.0", plugin_artifacts::FETCH)
        .await;
    grant_http(&server, &[&api.url]).await;
    let never = json!([{"url": format!("{}/never", api.url)}]);

    let job = fetch(&server, never.clone(), 1_000).await;
    assert_eq!(job["status"], "failed", "{job}");
    let error = job["phases"][0]["error"].as_str().unwrap();
    assert!(error.contains("timed out"), "{error}");

    let job = server
        .submit(&json!({
            "phases": [{"name": "fetch", "plugin": "fetch"}],
            "payload": {"requests": never},
        }))
        .await;
    let id = job["id"].as_str().unwrap();
    let mut events = server.events(&format!("/jobs/{id}/events"), None).await;
    events.until(id, "job:phase:started").await;
    api.reached(2).await;
    let (status, cancelled) = server.post(&format!("/jobs/{id}/cancel"), &json!({})).await;
    assert_eq!(status, StatusCode::OK, "{cancelled}");
    assert_eq!(cancelled["status"], "cancelled");
}

/// An HTTPS API at `https://localhost:<port>`, its certificate issued by a
/// CA of its own; returns the URL and the CA's PEM.
async fn https_api() -> (String, String, tokio::task::JoinHandle<()>) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    jobhost::tls::init();
    let config = tokio_rustls::rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            tokio_rustls::rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "https://localhost:{}",
        listener.local_addr().unwrap().port()
    );
    let app = Router::new().route("/hello", get(|| async { "hi over tls" }));
    let server = tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return; // the client refused our certificate
                };
                let service = hyper_util::service::TowerToHyperService::new(app);
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await;
            });
        }
    });
    (url, ca.pem(), server)
}

/// A name is resolved once, checked (loopback needs --allow-net) and
/// connected to with SNI; the certificate must chain to a trusted root,
/// which the operator may add.
#[tokio::test]
async fn guest_https_trusts_the_roots_the_operator_gives() {
    let (url, ca_pem, _api) = https_api().await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let hello = json!([{"url": format!("{url}/hello")}]);
    let allow = ["--allow-net", "127.0.0.0/8,::1/128"];

    let server = Server::start(&allow).await;
    server
        .upload("fetch", "1.0.0", plugin_artifacts::FETCH)
        .await;
    grant_http(&server, &[&url]).await;
    let job = fetch(&server, hello.clone(), 30_000).await;
    let error = job["phases"][0]["output"][0]["error"].as_str().unwrap();
    assert!(error.contains("certificate"), "{error}");

    let ca_arg = ["--guest-http-ca-file", ca_file.to_str().unwrap()];
    let server = Server::start(&[allow.as_slice(), ca_arg.as_slice()].concat()).await;
    server
        .upload("fetch", "1.0.0", plugin_artifacts::FETCH)
        .await;
    grant_http(&server, &[&url]).await;
    let job = fetch(&server, hello, 30_000).await;
    let out = &job["phases"][0]["output"][0];
    assert_eq!(*out, json!({"status": 200, "body": "hi over tls"}));
}

/// With `--guest-http-proxy` every request goes to the proxy, which
/// resolves the name itself (this one resolves nowhere): the grants still
/// decide what may go.
#[tokio::test]
async fn guest_http_goes_through_the_operators_proxy() {
    let proxy =
        Router::new().fallback(|uri: axum::http::Uri| async move { format!("proxied {uri}") });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_url = format!("http://{}", listener.local_addr().unwrap());
    let _proxy = tokio::spawn(async move { axum::serve(listener, proxy).await.unwrap() });
    let server = Server::start(&["--guest-http-proxy", &proxy_url]).await;
    server
        .upload("fetch", "1.0.0", plugin_artifacts::FETCH)
        .await;
    grant_http(&server, &["http://api.example.test"]).await;
    let requests = json!([
        {"url": "http://api.example.test/hello"},
        {"url": "http://other.example.test/hello"},
    ]);
    let job = fetch(&server, requests, 30_000).await;
    let out = &job["phases"][0]["output"];
    assert_eq!(
        out[0],
        json!({"status": 200, "body": "proxied http://api.example.test/hello"})
    );
    let refused = out[1]["error"].as_str().unwrap();
    assert!(refused.contains("is not granted"), "{refused}");
}

/// A plugin's resources: its runs' memory cap, and the timeout of its
/// phases whose job gives none, set while the server runs.
#[tokio::test]
async fn a_plugins_resources_set_its_memory_cap_and_default_timeout() {
    let server = Server::start(&["--memory-mb", "32", "--max-plugin-memory-mb", "128"]).await;
    server
        .upload("hog-memory", "1.0.0", plugin_artifacts::HOG_MEMORY)
        .await;
    server
        .upload("sleep", "1.0.0", plugin_artifacts::SLEEP)
        .await;
    let run = |plugin: &'static str, timeout_ms: Option<u64>| {
        let server = &server;
        async move {
            let mut phase =
                json!({"name": "p", "plugin": plugin, "config": {"ms": 3000, "steps": 3}});
            if let Some(ms) = timeout_ms {
                phase["timeout_ms"] = json!(ms);
            }
            let spec = json!({"phases": [phase], "max_attempts": 1});
            let job = server.submit(&spec).await;
            server.wait_finished(job["id"].as_str().unwrap()).await
        }
    };
    let set = |resources: Value| {
        let server = &server;
        async move {
            let request = server
                .client
                .put(server.url("/plugins/hog-memory/resources"));
            let request = request.json(&resources);
            let hog = server.send(request).await;
            let request = server.client.put(server.url("/plugins/sleep/resources"));
            (hog, server.send(request.json(&resources)).await)
        }
    };

    let job = run("hog-memory", None).await;
    let error = job["phases"][0]["error"].as_str().unwrap();
    assert!(
        error.contains(&format!("memory limit of {} bytes", 32 << 20)),
        "{error}"
    );

    let ((status, body), _) = set(json!({"memory_mb": 129})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("memory_mb")
    );
    let ((status, body), (sleep_status, _)) =
        set(json!({"memory_mb": 96, "timeout_ms": 500})).await;
    assert_eq!(
        (status, sleep_status),
        (StatusCode::OK, StatusCode::OK),
        "{body}"
    );
    let (_, plugin) = server.get("/plugins/hog-memory").await;
    assert_eq!(
        plugin["resources"],
        json!({"memory_mb": 96, "timeout_ms": 500, "max_running": null, "per_second": null})
    );

    let job = run("hog-memory", None).await;
    let error = job["phases"][0]["error"].as_str().unwrap();
    assert!(
        error.contains(&format!("memory limit of {} bytes", 96 << 20)),
        "{error}"
    );
    let job = run("sleep", None).await;
    let error = job["phases"][0]["error"].as_str().unwrap();
    assert!(error.contains("timed out after 500 ms"), "{error}");
    let job = run("sleep", Some(10_000)).await;
    assert_eq!(
        job["status"], "completed",
        "a job's own timeout comes first: {job}"
    );
}

/// A guest that floods the host with refused reads gets its refusals, and
/// the host logs only the first few, with keys cut short.
#[tokio::test]
async fn refused_config_reads_stay_small_in_the_log() {
    let server = Server::start(&[]).await;
    server
        .upload("read-config", "1.0.0", plugin_artifacts::READ_CONFIG)
        .await;
    let huge = "k".repeat(512 << 10);
    let mut keys: Vec<String> = (0..20).map(|i| format!("key{i}")).collect();
    keys.push(huge.clone());
    let job = server
        .submit(&json!({
            "phases": [{"name": "read", "plugin": "read-config"}],
            "payload": {"keys": keys},
        }))
        .await;
    let job = server.wait_finished(job["id"].as_str().unwrap()).await;
    let errors = job["phases"][0]["output"]["errors"].as_object().unwrap();
    assert_eq!(errors.len(), 21, "every read is refused");
    let cut = errors[&huge].as_str().unwrap();
    assert!(
        cut.len() < 1024 && cut.contains("truncated"),
        "{}",
        cut.len()
    );
    let log = server.log();
    assert_eq!(log.matches("refused a guest's config read").count(), 10);
    assert!(
        log.len() < 64 << 10,
        "the log stays small: {} bytes",
        log.len()
    );
}

/// The server's bounds on guest HTTP: bytes sent per run, and the wait for
/// a response, which a guest cannot lengthen.
#[tokio::test]
async fn guest_http_sent_bytes_and_response_wait_are_bounded() {
    let api = Api::start().await;
    let server = Server::start(&[
        "--guest-http-max-sent-kb",
        "1",
        "--guest-http-timeout",
        "1s",
    ])
    .await;
    server
        .upload("fetch", "1.0.0", plugin_artifacts::FETCH)
        .await;
    grant_http(&server, &[&api.url]).await;
    let requests = json!([
        {"url": format!("{}/echo", api.url), "method": "POST", "body": "x".repeat(2048)},
        {"url": format!("{}/never", api.url)},
    ]);
    let job = fetch(&server, requests, 30_000).await;
    assert_eq!(job["status"], "completed", "{job}");
    let out = &job["phases"][0]["output"];
    let too_much = out[0]["error"].as_str().unwrap();
    assert!(
        too_much.contains("request body size exceeds limit: 1024 bytes"),
        "{too_much}"
    );
    let waited = out[1]["error"].as_str().unwrap();
    assert!(waited.to_lowercase().contains("timeout"), "{waited}");
    assert!(
        job["phases"][0]["usage"]["http_bytes_out"]
            .as_u64()
            .unwrap()
            <= 1024
    );
}

/// A real pipeline from the web: `fetch-url` downloads a CSV from an
/// origin the operator granted, `csv-parse` and `aggregate` work on it;
/// past its `max_bytes` the download fails, naming the cap.
#[tokio::test]
async fn fetch_url_feeds_csv_parse_from_a_granted_origin() {
    let app = Router::new().route(
        "/sales.csv",
        get(|| async { "region,amount\nnorth,3\nsouth,4\nnorth,5\n" }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = format!("http://{}", listener.local_addr().unwrap());
    let _api = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let server = Server::start(&[]).await;
    for (name, component) in [
        ("fetch-url", plugin_artifacts::FETCH_URL),
        ("csv-parse", plugin_artifacts::CSV_PARSE),
        ("aggregate", plugin_artifacts::AGGREGATE),
    ] {
        let (status, body) = server.upload(name, "1.0.0", component).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let grants = json!({"versions": ["1.0.0"], "http": [origin]});
    server.grant("fetch-url", &grants).await;
    let pipeline = |max_bytes: u64| {
        json!({
            "phases": [
                {"name": "download", "plugin": "fetch-url",
                 "config": {"url": format!("{origin}/sales.csv"), "max_bytes": max_bytes}},
                {"name": "parse", "plugin": "csv-parse"},
                {"name": "totals", "plugin": "aggregate",
                 "config": {"group_by": "region", "sum": ["amount"]}}
            ],
            "max_attempts": 1,
        })
    };
    let job = server.submit(&pipeline(1000)).await;
    let done = server.wait_finished(job["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["phases"][0]["output"]["bytes"], 38);
    assert_eq!(done["phases"][1]["output"]["rows"], 3);
    assert_eq!(
        done["phases"][2]["output"]["totals"],
        json!({"amount": 12.0})
    );

    let job = server.submit(&pipeline(10)).await;
    let capped = server.wait_finished(job["id"].as_str().unwrap()).await;
    assert_eq!(capped["status"], "failed");
    let error = capped["error"].as_str().unwrap();
    assert!(
        error.contains("38 bytes is more than max_bytes (10)"),
        "{error}"
    );

    let job = server.submit(&pipeline(16 * 1024 * 1024 + 1)).await;
    let refused = server.wait_finished(job["id"].as_str().unwrap()).await;
    let error = refused["error"].as_str().unwrap();
    assert!(
        error.contains("max_bytes: must be between 1 and 16777216"),
        "{error}"
    );
}
