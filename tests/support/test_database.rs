//! Test databases on the PostgreSQL that `JOBHOST_TEST_DATABASE_URL`
//! names (by default this project's machines' own, on 127.0.0.1:5432): one
//! per test, dropped after it. Shared by the integration tests
//! (`host/tests/all`) and the end-to-end tests (`tests/e2e`).

use std::sync::OnceLock;

/// Where this project's machines run PostgreSQL, as the users they have
/// (`postgres`, or `root`), tried in turn.
const DEFAULT_URLS: [&str; 2] = [
    "postgres://postgres@127.0.0.1:5432/postgres",
    "postgres://root@127.0.0.1:5432/postgres",
];

/// The server's URL, with the database that tests connect to first:
/// `JOBHOST_TEST_DATABASE_URL`, or the first default that answered.
pub fn admin_url() -> String {
    if let Ok(url) = std::env::var("JOBHOST_TEST_DATABASE_URL") {
        return url;
    }
    CHOSEN
        .get()
        .cloned()
        .unwrap_or_else(|| DEFAULT_URLS[0].to_owned())
}

static CHOSEN: OnceLock<String> = OnceLock::new();

/// The URL of `database` on the same server.
pub fn url_of(database: &str) -> String {
    let admin = admin_url();
    let (server, _) = admin.rsplit_once('/').expect("a URL with a database");
    format!("{server}/{database}")
}

async fn connect() -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(&admin_url(), tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// Whether PostgreSQL tests run here. Without a server they are
/// skipped, saying so, unless `JOBHOST_REQUIRE_POSTGRES=1` (CI), where
/// a missing server fails them.
pub async fn available() -> bool {
    static AVAILABLE: OnceLock<Result<(), String>> = OnceLock::new();
    if AVAILABLE.get().is_none() {
        let candidates: Vec<String> = match std::env::var("JOBHOST_TEST_DATABASE_URL") {
            Ok(url) => vec![url],
            Err(_) => DEFAULT_URLS.map(str::to_owned).to_vec(),
        };
        let mut probe = Err(String::new());
        for url in candidates {
            match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                Ok(_) => {
                    let _ = CHOSEN.set(url);
                    probe = Ok(());
                    break;
                }
                Err(error) => probe = Err(format!("{url}: {error}")),
            }
        }
        let _ = AVAILABLE.set(probe);
    }
    match AVAILABLE.get().expect("just set") {
        Ok(()) => true,
        Err(error) if std::env::var("JOBHOST_REQUIRE_POSTGRES").as_deref() == Ok("1") => {
            panic!(
                "JOBHOST_REQUIRE_POSTGRES=1, but PostgreSQL at {} is unreachable: {error}",
                admin_url()
            )
        }
        Err(error) => {
            eprintln!(
                "SKIPPED: PostgreSQL at {} is unreachable ({error}). \
                 Set JOBHOST_TEST_DATABASE_URL=postgres://user@host:port/database to run the PostgreSQL tests.",
                admin_url()
            );
            false
        }
    }
}

/// An empty database of a test's own, dropped (with whatever still
/// connects to it) when this is.
pub struct TestDatabase {
    pub name: String,
}

impl TestDatabase {
    pub async fn create() -> TestDatabase {
        TestDatabase {
            name: create_database().await,
        }
    }

    pub fn url(&self) -> String {
        url_of(&self.name)
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        drop_database(std::mem::take(&mut self.name));
    }
}

/// Creates an empty database for one test: its name.
async fn create_database() -> String {
    let name = format!("jobhost_test_{}", uuid::Uuid::now_v7().simple());
    connect()
        .await
        .unwrap()
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    name
}

/// Drops a test's database, closing what still connects to it. Runs
/// on a thread of its own: it is called from `Drop`, maybe inside a
/// runtime that is shutting down.
fn drop_database(name: String) {
    let dropped = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let client = connect().await?;
            client
                .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await
        })
    })
    .join();
    if let Ok(Err(error)) = dropped {
        eprintln!("could not drop a test database: {error}");
    }
}
