//! A real webhook receiver: an HTTP server on loopback that records every
//! delivery and can be told to fail the first few.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use tokio::sync::{Mutex, Notify};

use crate::server::TIMEOUT;

/// Server flags that let webhooks reach receivers on loopback, which the
/// address policy refuses by default.
pub const ALLOW_LOOPBACK: [&str; 2] = ["--allow-net", "127.0.0.0/8"];

/// A loopback address nobody listens on (yet): connections are refused.
pub fn closed_address() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

#[derive(Debug, Clone)]
pub struct Delivery {
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Delivery {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }
}

#[derive(Clone, Default)]
struct Shared {
    received: Arc<Mutex<Vec<Delivery>>>,
    arrived: Arc<Notify>,
    /// Answer 503 (then 429 with Retry-After) to this many deliveries first.
    failures_left: Arc<AtomicUsize>,
}

pub struct Receiver {
    pub url: String,
    shared: Shared,
    server: tokio::task::JoinHandle<()>,
}

impl Receiver {
    pub async fn start(fail_first: usize) -> Receiver {
        Receiver::start_on("127.0.0.1:0".parse().unwrap(), fail_first).await
    }

    pub async fn start_on(address: SocketAddr, fail_first: usize) -> Receiver {
        let shared = Shared {
            failures_left: Arc::new(AtomicUsize::new(fail_first)),
            ..Shared::default()
        };
        let listener = tokio::net::TcpListener::bind(address).await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let app = Router::new()
            .route("/hook", post(receive))
            .with_state(shared.clone());
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Receiver {
            url,
            shared,
            server,
        }
    }

    /// Waits until at least `count` deliveries arrived; returns them all.
    pub async fn wait_for(&self, count: usize) -> Vec<Delivery> {
        let wait = async {
            loop {
                let arrived = self.shared.arrived.notified();
                tokio::pin!(arrived);
                arrived.as_mut().enable();
                let received = self.shared.received.lock().await.clone();
                if received.len() >= count {
                    return received;
                }
                arrived.await;
            }
        };
        tokio::time::timeout(TIMEOUT, wait)
            .await
            .expect("webhook deliveries did not arrive")
    }

    pub async fn received(&self) -> Vec<Delivery> {
        self.shared.received.lock().await.clone()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn receive(
    State(shared): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    shared
        .received
        .lock()
        .await
        .push(Delivery { headers, body });
    shared.arrived.notify_waiters();
    let left = shared.failures_left.load(Ordering::SeqCst);
    if left == 0 {
        return (StatusCode::NO_CONTENT, HeaderMap::new());
    }
    shared.failures_left.store(left - 1, Ordering::SeqCst);
    if left % 2 == 0 {
        (StatusCode::SERVICE_UNAVAILABLE, HeaderMap::new())
    } else {
        let mut headers = HeaderMap::new();
        headers.insert("retry-after", HeaderValue::from_static("1"));
        (StatusCode::TOO_MANY_REQUESTS, headers)
    }
}

/// A receiver that accepts connections and never answers, holding them
/// until dropped.
pub struct Silent {
    pub url: String,
    server: tokio::task::JoinHandle<()>,
}

impl Silent {
    pub async fn start() -> Silent {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        Silent { url, server }
    }
}

impl Drop for Silent {
    fn drop(&mut self) {
        self.server.abort();
    }
}
