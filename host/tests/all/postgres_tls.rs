//! TLS to PostgreSQL, against this machine's server (TLS on, with a
//! self-signed certificate for `localhost`, as Debian installs it). Skipped,
//! saying so, where PostgreSQL does not run or does not offer TLS.

use std::sync::Arc;

use jobhost::storage::{PgOptions, Storage};

use crate::fixture::postgres::{self, TestDatabase};

/// A test database on a server that offers TLS, and the server's
/// certificate file; `None` (said) otherwise.
async fn with_tls() -> Option<(TestDatabase, tokio_postgres::Client, String)> {
    if !postgres::available().await {
        return None;
    }
    let database = TestDatabase::create().await;
    let (admin, connection) = tokio_postgres::connect(&database.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let ssl: String = admin.query_one("SHOW ssl", &[]).await.unwrap().get(0);
    if ssl != "on" {
        // Where PostgreSQL is required (CI), so is its TLS.
        assert!(
            std::env::var("JOBHOST_REQUIRE_POSTGRES").as_deref() != Ok("1"),
            "JOBHOST_REQUIRE_POSTGRES=1, but this PostgreSQL does not offer TLS (ssl = {ssl})"
        );
        eprintln!("SKIPPED: this PostgreSQL does not offer TLS (ssl = {ssl})");
        return None;
    }
    let certificate: String = admin
        .query_one("SHOW ssl_cert_file", &[])
        .await
        .unwrap()
        .get(0);
    Some((database, admin, certificate))
}

async fn open(url: String) -> Result<Arc<Storage>, String> {
    jobhost::storage::open_postgres(&PgOptions::new(url))
        .await
        .map_err(|e| e.to_string())
}

/// Whether every connection jobhost has open to `database` is encrypted;
/// panics if it has none.
async fn all_encrypted(admin: &tokio_postgres::Client, database: &TestDatabase) -> bool {
    let row = admin
        .query_one(
            "SELECT count(*), bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.datname = $1 AND a.application_name = 'jobhost'",
            &[&database.name],
        )
        .await
        .unwrap();
    assert!(row.get::<_, i64>(0) > 0, "no connection of jobhost's");
    row.get(1)
}

/// The same URL naming the server `localhost`, the name its certificate
/// is for.
fn via_localhost(url: &str) -> String {
    url.replacen("@127.0.0.1:", "@localhost:", 1)
}

#[tokio::test]
async fn verify_full_connects_to_the_server_its_root_certifies() {
    let Some((database, admin, certificate)) = with_tls().await else {
        return;
    };
    let url = format!(
        "{}?sslmode=verify-full&sslrootcert={certificate}",
        via_localhost(&database.url())
    );
    let store = open(url).await.unwrap();
    store.plugins().await.unwrap();
    assert!(all_encrypted(&admin, &database).await);
    store.close().await;
}

#[tokio::test]
async fn verify_full_refuses_a_certificate_for_another_name_and_verify_ca_takes_it() {
    let Some((database, admin, certificate)) = with_tls().await else {
        return;
    };
    // Connected as 127.0.0.1: the certificate names localhost only.
    let refused = open(format!(
        "{}?sslmode=verify-full&sslrootcert={certificate}",
        database.url()
    ))
    .await
    .err()
    .expect("a certificate for another name is refused");
    assert!(
        refused.contains("certificate not valid for name \"127.0.0.1\""),
        "{refused}"
    );

    let store = open(format!(
        "{}?sslmode=verify-ca&sslrootcert={certificate}",
        database.url()
    ))
    .await
    .unwrap();
    store.plugins().await.unwrap();
    assert!(all_encrypted(&admin, &database).await);
    store.close().await;
}

#[tokio::test]
async fn verify_full_refuses_a_certificate_no_given_root_signed() {
    let Some((database, _admin, _)) = with_tls().await else {
        return;
    };
    // Some other authority: the system's bundle, which does not hold the
    // server's self-signed certificate.
    let other = "/etc/ssl/certs/ca-certificates.crt";
    let refused = open(format!(
        "{}?sslmode=verify-full&sslrootcert={other}",
        via_localhost(&database.url())
    ))
    .await
    .err()
    .expect("an unknown issuer is refused");
    assert!(
        refused.contains("invalid peer certificate: UnknownIssuer"),
        "{refused}"
    );
}

#[tokio::test]
async fn require_and_prefer_encrypt_and_disable_does_not() {
    let Some((database, admin, _)) = with_tls().await else {
        return;
    };
    for (mode, encrypted) in [("require", true), ("prefer", true), ("disable", false)] {
        let store = open(format!("{}?sslmode={mode}", database.url()))
            .await
            .unwrap();
        store.plugins().await.unwrap();
        assert_eq!(all_encrypted(&admin, &database).await, encrypted, "{mode}");
        store.close().await;
    }
    // Without sslmode: prefer, as libpq.
    let store = open(database.url()).await.unwrap();
    store.plugins().await.unwrap();
    assert!(all_encrypted(&admin, &database).await);
    store.close().await;
}

#[tokio::test]
async fn an_unknown_sslmode_is_refused_clearly() {
    let Some((database, _, _)) = with_tls().await else {
        return;
    };
    let refused = open(format!("{}?sslmode=allow-anything", database.url()))
        .await
        .err()
        .unwrap();
    assert!(
        refused.contains(
            "sslmode=allow-anything: use disable, prefer, require, verify-ca or verify-full"
        ),
        "{refused}"
    );
}
