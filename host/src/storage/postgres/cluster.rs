//! Several hosts on one database: each host's lease (a heartbeat in
//! `hosts`), and what hosts tell each other through LISTEN/NOTIFY.
//!
//! NOTIFY only wakes: everything it announces is state in a table (due
//! jobs, a cancel request, the pause, the log's last position), re-read whenever the
//! listening connection is (re)established, because notifications sent
//! while it was down are lost. The listener has a connection of its own:
//! a pooled connection would drop them.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::Pool;
use futures::StreamExt;
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

use super::log::Log;
use super::tls::Connector;
use super::{PgOptions, execute, query, query_one};
use crate::storage::{ClusterSignal, ErrorClass, Result, SignalHandler, StorageError};

/// Longest wait before connecting the listener again after a failure.
const MAX_RECONNECT_PAUSE: Duration = Duration::from_secs(5);

/// This host, registered in `hosts`.
pub(super) struct Host {
    pub(super) id: Arc<str>,
    name: String,
    lease: Duration,
    slots: u32,
    started_at: i64,
}

impl Host {
    /// Takes (or renews) the host's lease, before it recovers or claims
    /// anything.
    pub(super) async fn register(pool: &Pool, options: &PgOptions) -> Result<Host> {
        let client = pool.get().await?;
        let started_at: i64 = query_one(&client, "SELECT jobhost_now()", &[])
            .await?
            .get(0);
        let host = Host {
            id: options.host_id.as_str().into(),
            name: options.host_name.clone(),
            lease: options.lease,
            slots: options.slots,
            started_at,
        };
        drop(client);
        host.renew(pool, options.lease).await?;
        Ok(host)
    }

    /// Renews the lease, giving up after `within`, on the server too: a
    /// renewal stuck behind a lock must not leave a pooled connection busy,
    /// and one stuck on a dead connection takes the connection with it.
    async fn renew(&self, pool: &Pool, within: Duration) -> Result<()> {
        let timed_out = || StorageError::new(ErrorClass::Retryable, "renewing the lease timed out");
        let mut client = tokio::time::timeout(within, pool.get())
            .await
            .map_err(|_| timed_out())??;
        let renewal = async {
            let tx = client.transaction().await?;
            tx.batch_execute(&format!(
                "SET LOCAL statement_timeout = {}",
                within.as_millis()
            ))
            .await?;
            execute(
                &tx,
                "INSERT INTO hosts (id, name, started_at, heartbeat_at, lease_until, slots)
                 VALUES ($1, $2, $3, jobhost_now(), jobhost_now() + $4, $5)
                 ON CONFLICT (id) DO UPDATE
                 SET name = EXCLUDED.name, started_at = EXCLUDED.started_at, slots = EXCLUDED.slots,
                     heartbeat_at = EXCLUDED.heartbeat_at, lease_until = EXCLUDED.lease_until",
                &[
                    &&*self.id,
                    &self.name,
                    &self.started_at,
                    &(self.lease.as_millis() as i64),
                    &(self.slots as i32),
                ],
            )
            .await?;
            tx.commit().await?;
            Ok::<_, StorageError>(())
        };
        match tokio::time::timeout(within, renewal).await {
            Ok(renewed) => renewed,
            Err(_) => {
                drop(deadpool_postgres::Object::take(client));
                Err(timed_out())
            }
        }
    }

    /// Renews the lease every quarter of its length until `stop`. When
    /// three quarters of it pass without a renewal, the host is told to
    /// stop its running phases ([`ClusterSignal::LeaseLost`]) before other
    /// hosts may take its jobs over; a later renewal says it holds again.
    /// The watch runs beside the renewals: one stuck until its timeout
    /// must not delay it.
    pub(super) async fn heartbeat_loop(
        self,
        pool: Pool,
        signals: Arc<Signals>,
        stop: CancellationToken,
    ) {
        let every = self.lease / 4;
        let (renewed, renewals) = tokio::sync::watch::channel(tokio::time::Instant::now());
        let renew = async {
            loop {
                tokio::time::sleep(every).await;
                // Counted from before it was sent: the database may have
                // taken it at any moment since.
                let sent = tokio::time::Instant::now();
                match self.renew(&pool, every).await {
                    Ok(()) => {
                        let _ = renewed.send(sent);
                    }
                    Err(error) => tracing::warn!(%error, "renewing this host's lease failed"),
                }
            }
        };
        tokio::select! {
            _ = stop.cancelled() => {}
            () = renew => {}
            () = watch_lease(renewals, self.lease * 3 / 4, &signals) => {}
        }
    }
}

/// Says [`ClusterSignal::LeaseLost`] once `fence_after` passes without a
/// renewal, and [`ClusterSignal::LeaseHeld`] at the next one.
async fn watch_lease(
    mut renewals: tokio::sync::watch::Receiver<tokio::time::Instant>,
    fence_after: Duration,
    signals: &Signals,
) {
    let mut lost = false;
    loop {
        let deadline = *renewals.borrow_and_update() + fence_after;
        tokio::select! {
            changed = renewals.changed() => {
                if changed.is_err() {
                    return;
                }
                if lost {
                    lost = false;
                    tracing::info!("this host renewed its lease again");
                    signals.emit(ClusterSignal::LeaseHeld);
                }
            }
            _ = tokio::time::sleep_until(deadline), if !lost => {
                lost = true;
                signals.emit(ClusterSignal::LeaseLost);
            }
        }
    }
}

/// The handlers of [`ClusterSignal`]s.
#[derive(Default)]
pub(super) struct Signals {
    handlers: Mutex<Vec<SignalHandler>>,
}

impl Signals {
    pub(super) fn add(&self, handler: SignalHandler) {
        self.handlers.lock().expect("never poisoned").push(handler);
    }

    fn emit(&self, signal: ClusterSignal) {
        for handler in self.handlers.lock().expect("never poisoned").iter() {
            handler(signal.clone());
        }
    }
}

/// Listens until `stop`, connecting again (with a growing pause) whenever
/// the connection fails.
pub(super) async fn listen_loop(
    config: tokio_postgres::Config,
    connector: Connector,
    pool: Pool,
    host: Arc<str>,
    log: Arc<Log>,
    signals: Arc<Signals>,
    stop: CancellationToken,
) {
    let mut pause = Duration::from_millis(100);
    loop {
        let listener = Listener {
            pool: &pool,
            host: &host,
            log: &log,
            signals: &signals,
        };
        match listener.listen(&config, &connector, &stop).await {
            Ok(()) => return,
            Err(error) => tracing::warn!(%error, "listening to other hosts failed; reconnecting"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(MAX_RECONNECT_PAUSE);
    }
}

struct Listener<'a> {
    pool: &'a Pool,
    host: &'a str,
    log: &'a Log,
    signals: &'a Signals,
}

impl Listener<'_> {
    /// One listening connection's life: `Ok` when stopped.
    async fn listen(
        &self,
        config: &tokio_postgres::Config,
        connector: &Connector,
        stop: &CancellationToken,
    ) -> Result<()> {
        let (client, (mut notifications, driver)) = match connector {
            Connector::Plain => {
                let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
                (client, drive(connection))
            }
            Connector::Tls(make, _) => {
                let (client, connection) = config.connect(make.clone()).await?;
                (client, drive(connection))
            }
        };
        let _stop_driver = AbortOnDrop(driver.abort_handle());
        client
            .batch_execute(
                "LISTEN jobhost_log; LISTEN jobhost_jobs; LISTEN jobhost_cancel; LISTEN jobhost_pause",
            )
            .await?;
        self.reread().await?;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                notification = notifications.recv() => match notification {
                    Some((channel, payload)) => self.handle(&channel, &payload),
                    None => {
                        return match driver.await {
                            Ok(Err(error)) => Err(error.into()),
                            _ => Err(crate::storage::StorageError::new(
                                crate::storage::ErrorClass::Retryable,
                                "the listening connection closed",
                            )),
                        };
                    }
                },
            }
        }
    }

    /// What notifications announce, read from the tables: what was
    /// announced while no connection listened is not lost.
    async fn reread(&self) -> Result<()> {
        let client = self.pool.get().await?;
        let paused: bool = query_one(&client, "SELECT paused FROM cluster_state", &[])
            .await?
            .get(0);
        self.signals.emit(ClusterSignal::Paused(paused));
        self.signals.emit(ClusterSignal::JobsDue);
        let requested = query(
            &client,
            "SELECT id FROM jobs WHERE status = 'running' AND owner = $1 AND cancel_requested",
            &[&self.host],
        )
        .await?;
        for row in requested {
            self.signals
                .emit(ClusterSignal::CancelRequested(row.get(0)));
        }
        let last: i64 = query_one(&client, "SELECT last FROM event_positions", &[])
            .await?
            .get(0);
        self.log.saw(last);
        Ok(())
    }

    fn handle(&self, channel: &str, payload: &str) {
        match channel {
            "jobhost_log" => {
                if let Ok(last) = payload.parse() {
                    self.log.saw(last);
                }
            }
            "jobhost_jobs" => self.signals.emit(ClusterSignal::JobsDue),
            "jobhost_pause" => self.signals.emit(ClusterSignal::Paused(payload == "true")),
            "jobhost_cancel" => {
                if let Some((owner, job_id)) = payload.split_once(' ')
                    && owner == self.host
                {
                    self.signals
                        .emit(ClusterSignal::CancelRequested(job_id.to_owned()));
                }
            }
            _ => {}
        }
    }
}

/// Notifications as (channel, payload).
type Notifications = tokio::sync::mpsc::UnboundedReceiver<(String, String)>;
/// The task polling a connection; its end says why the connection closed.
type Driver = tokio::task::JoinHandle<std::result::Result<(), tokio_postgres::Error>>;

/// The notifications a connection receives, and the task that polls it
/// (for the client's queries and the notifications alike).
fn drive<S, T>(mut connection: tokio_postgres::Connection<S, T>) -> (Notifications, Driver)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (notify, notifications) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            if let AsyncMessage::Notification(n) = message? {
                let _ = notify.send((n.channel().to_owned(), n.payload().to_owned()));
            }
        }
        Ok(())
    });
    (notifications, driver)
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
