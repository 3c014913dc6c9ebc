//! Many SSE clients in this process: meeting points that nobody waits at
//! forever once a client failed, and each event's commit time read cheaply.

use std::sync::Arc;

use anyhow::Context as _;
use tokio::sync::Barrier;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use jobhost::model::time::parse_rfc3339;

/// A barrier for the clients and the bench, which nobody waits at forever
/// once a client has failed (it will never arrive).
#[derive(Clone)]
pub struct Rendezvous {
    barrier: Arc<Barrier>,
    failed: CancellationToken,
}

impl Rendezvous {
    pub fn new(clients: usize, failed: &CancellationToken) -> Self {
        Rendezvous {
            barrier: Arc::new(Barrier::new(clients + 1)),
            failed: failed.clone(),
        }
    }

    pub async fn meet(&self) -> anyhow::Result<()> {
        tokio::select! {
            _ = self.barrier.wait() => Ok(()),
            () = self.failed.cancelled() => Err(Abandoned.into()),
        }
    }
}

/// Why a client gave up: another one failed.
#[derive(Debug, thiserror::Error)]
#[error("another SSE client failed")]
struct Abandoned;

/// Runs a client, cancelling `failed` if it fails.
pub fn spawn_client<T: Send + 'static>(
    failed: &CancellationToken,
    client: impl Future<Output = anyhow::Result<T>> + Send + 'static,
) -> JoinHandle<anyhow::Result<T>> {
    let failed = failed.clone();
    tokio::spawn(async move {
        let result = client.await;
        if result.is_err() {
            failed.cancel();
        }
        result
    })
}

/// The error of the client that failed first.
pub async fn failure<T>(clients: Vec<JoinHandle<anyhow::Result<T>>>) -> anyhow::Error {
    let mut first = anyhow::anyhow!("an SSE client failed");
    for client in clients {
        match client.await {
            Ok(Err(error)) if !error.is::<Abandoned>() => return error,
            Err(panicked) => first = panicked.into(),
            _ => {}
        }
    }
    first
}

/// An event's `at`, found in its JSON without parsing the rest: these
/// clients share the server's 2 cores, and parsing 100,000 events in a
/// burst would add its own delay to the one measured.
pub fn committed_at(json: &str) -> anyhow::Result<i64> {
    let at = json
        .split_once(r#""at":""#)
        .and_then(|(_, rest)| rest.split_once('"'))
        .context("no `at` in the event")?
        .0;
    parse_rfc3339(at).map_err(anyhow::Error::msg)
}
