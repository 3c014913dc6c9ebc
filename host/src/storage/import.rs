//! Moving an embedded installation to PostgreSQL: everything in the SQLite
//! file (plugins with their bytes and grants, jobs with their phases and attempt
//! errors, schedules, the event log with its sequence numbers, the webhook outbox,
//! the pause) copied into an empty PostgreSQL database, in one transaction:
//! all of it or nothing. SSE clients resume across the move: events keep
//! their ids, and new ones follow them. Compiled-artifact digests stay
//! behind (each host keeps its own cache).

use std::path::Path;

use futures::future::try_join_all;
use rusqlite::types::Value;
use tokio_postgres::types::ToSql;

use super::postgres::PgOptions;
use super::{ErrorClass, Result, StorageError};

/// Rows read and written at once.
const BATCH: i64 = 1_000;

/// How a column's SQLite values are written to PostgreSQL.
#[derive(Clone, Copy)]
enum Column {
    Text,
    BigInt,
    Int,
    Bytes,
    Bool,
    Float,
}

/// A table to copy: its name and columns, the same in both schemas.
struct Table {
    name: &'static str,
    columns: &'static [(&'static str, Column)],
}

use Column::{BigInt, Bool, Bytes, Float, Int, Text};

/// Columns PostgreSQL names differently: (table, PostgreSQL's name,
/// SQLite's).
const RENAMED: &[(&str, &str, &str)] = &[("events", "n", "seq")];

/// A column's name in the SQLite file.
fn source_name(table: &str, column: &'static str) -> &'static str {
    RENAMED
        .iter()
        .find(|(t, name, _)| *t == table && *name == column)
        .map_or(column, |(_, _, source)| source)
}

/// Parents before children (foreign keys).
const TABLES: &[Table] = &[
    Table {
        name: "plugins",
        columns: &[
            ("name", Text),
            ("active_version", Text),
            ("created_at", BigInt),
            ("memory_mb", BigInt),
            ("timeout_ms", BigInt),
        ],
    },
    Table {
        name: "plugin_versions",
        columns: &[
            ("plugin", Text),
            ("version", Text),
            ("content_hash", Text),
            ("size", BigInt),
            ("description", Text),
            ("component", Bytes),
            ("uploaded_at", BigInt),
        ],
    },
    Table {
        name: "plugin_grants",
        columns: &[("plugin", Text), ("grants", Text), ("updated_at", BigInt)],
    },
    Table {
        name: "plugin_limits",
        columns: &[
            ("plugin", Text),
            ("max_running", Int),
            ("per_second", Float),
            ("tokens", Float),
            ("refilled_at", BigInt),
        ],
    },
    // Before the jobs: the trigger that puts a pending job's key in the
    // claim rotation reads its limit.
    Table {
        name: "concurrency_limits",
        columns: &[
            ("pattern", Text),
            ("prefix", Bool),
            ("max_running", Int),
            ("per_second", Float),
        ],
    },
    Table {
        name: "jobs",
        columns: &[
            ("id", Text),
            ("status", Text),
            ("payload", Text),
            ("priority", Int),
            ("run_at", BigInt),
            ("attempt", Int),
            ("max_attempts", Int),
            ("backoff", Text),
            ("idempotency_key", Text),
            ("webhook_url", Text),
            ("webhook_secret", Text),
            ("created_at", BigInt),
            ("started_at", BigInt),
            ("finished_at", BigInt),
            ("error", Text),
            ("lease", BigInt),
            ("concurrency_key", Text),
            ("waiting_for", Text),
        ],
    },
    Table {
        name: "phases",
        columns: &[
            ("job_id", Text),
            ("idx", Int),
            ("name", Text),
            ("plugin", Text),
            ("version", Text),
            ("config", Text),
            ("timeout_ms", BigInt),
            ("status", Text),
            ("output", Text),
            ("error", Text),
            ("attempts", Int),
            ("started_at", BigInt),
            ("finished_at", BigInt),
            ("usage", Text),
            ("progress", Text),
            ("holds_slot", Bool),
        ],
    },
    Table {
        name: "schedules",
        columns: &[
            ("name", Text),
            ("spec", Text),
            ("webhook_secret", Text),
            ("paused", Bool),
            ("next_tick", BigInt),
            ("last_tick", BigInt),
            ("last_fired_at", BigInt),
            ("last_job_id", Text),
            ("created_at", BigInt),
            ("updated_at", BigInt),
        ],
    },
    Table {
        name: "attempt_errors",
        columns: &[
            ("job_id", Text),
            ("attempt", Int),
            ("phase", Text),
            ("error", Text),
            ("at", BigInt),
        ],
    },
    // SQLite's `seq` is the event's position; on PostgreSQL, all of them
    // are numbered within the import's transaction, whose block of
    // positions starts at 0, so each keeps its position.
    Table {
        name: "events",
        columns: &[
            ("n", BigInt),
            ("kind", Text),
            ("job_id", Text),
            ("at", BigInt),
            ("data", Text),
        ],
    },
    Table {
        name: "webhook_deliveries",
        columns: &[
            ("id", Text),
            ("job_id", Text),
            ("url", Text),
            ("secret", Text),
            ("event", Text),
            ("body", Text),
            ("status", Text),
            ("attempts", Int),
            ("next_attempt_at", BigInt),
            ("last_status", Int),
            ("last_error", Text),
            ("created_at", BigInt),
            ("finished_at", BigInt),
        ],
    },
    Table {
        name: "cluster_state",
        columns: &[("paused", Bool)],
    },
];

/// What was copied: rows per table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportReport {
    pub rows: Vec<(&'static str, u64)>,
}

/// Copies the SQLite database at `from` (migrated to this build's schema
/// first) into the PostgreSQL database of `to`, which must hold no jobhost
/// data yet. The SQLite file must not be in use.
pub async fn sqlite_into_postgres(from: &Path, to: &PgOptions) -> Result<ImportReport> {
    // Both migrated first: the columns below are this build's.
    super::open_sqlite(from, super::Durability::Process)?
        .close()
        .await;
    super::postgres::migrate(to).await?;
    let source = from.to_path_buf();
    let read = move |sql: String, after: i64| {
        let source = source.clone();
        tokio::task::spawn_blocking(move || read_batch(&source, &sql, after))
    };
    let mut target = super::postgres::connect(to).await?;
    let tx = target.transaction().await?;
    let occupied: bool = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM plugins) OR EXISTS (SELECT 1 FROM jobs)
                 OR EXISTS (SELECT 1 FROM events)",
            &[],
        )
        .await?
        .get(0);
    if occupied {
        return Err(StorageError::new(
            ErrorClass::Conflict,
            "the PostgreSQL database already holds jobhost data: import into an empty one",
        ));
    }
    // The single row of the target's own, replaced by the source's.
    tx.execute("DELETE FROM cluster_state", &[]).await?;
    let mut report = ImportReport { rows: Vec::new() };
    for table in TABLES {
        let names: Vec<&str> = table.columns.iter().map(|(name, _)| *name).collect();
        let sources: Vec<&str> = names.iter().map(|n| source_name(table.name, n)).collect();
        let select = format!(
            "SELECT rowid, {} FROM {} WHERE rowid > ?1 ORDER BY rowid LIMIT {BATCH}",
            sources.join(", "),
            table.name
        );
        let places: Vec<String> = (1..=names.len()).map(|n| format!("${n}")).collect();
        let insert = tx
            .prepare(&format!(
                "INSERT INTO {} ({}) VALUES ({})",
                table.name,
                names.join(", "),
                places.join(", ")
            ))
            .await?;
        let (mut after, mut copied) = (0, 0u64);
        loop {
            let rows = read(select.clone(), after)
                .await
                .map_err(|e| StorageError::new(ErrorClass::Other, e.to_string()))??;
            let Some((last, _)) = rows.last() else { break };
            after = *last;
            let values: Vec<Vec<Box<dyn ToSql + Sync + Send>>> = rows
                .into_iter()
                .map(|(_, row)| convert(table, row))
                .collect::<Result<_>>()?;
            // Sent together: tokio-postgres pipelines them.
            try_join_all(values.iter().map(|row| {
                let params: Vec<&(dyn ToSql + Sync)> = row
                    .iter()
                    .map(|value| value.as_ref() as &(dyn ToSql + Sync))
                    .collect();
                let (tx, insert) = (&tx, &insert);
                async move { tx.execute(insert, &params).await }
            }))
            .await?;
            copied += values.len() as u64;
        }
        report.rows.push((table.name, copied));
    }
    // Events keep their positions; new ones follow the last ever given
    // (the newest events may have been deleted with their job).
    let source = from.to_path_buf();
    let last = tokio::task::spawn_blocking(move || last_position(&source))
        .await
        .map_err(|e| StorageError::new(ErrorClass::Other, e.to_string()))??;
    tx.execute("UPDATE event_positions SET last = $1", &[&last])
        .await?;
    tx.execute(
        "INSERT INTO event_blocks (xid, base, last)
         SELECT pg_current_xact_id(), 0, $1 WHERE EXISTS (SELECT 1 FROM events)",
        &[&last],
    )
    .await?;
    tx.commit().await?;
    Ok(report)
}

/// The last sequence number SQLite gave an event, kept or not.
fn last_position(source: &Path) -> Result<i64> {
    let conn =
        rusqlite::Connection::open_with_flags(source, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    Ok(conn.query_row(
        "SELECT MAX(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0),
                    COALESCE((SELECT MAX(seq) FROM events), 0))",
        [],
        |row| row.get(0),
    )?)
}

/// Up to [`BATCH`] rows after `after` (rowid), each with its rowid.
fn read_batch(source: &Path, sql: &str, after: i64) -> Result<Vec<(i64, Vec<Value>)>> {
    let conn =
        rusqlite::Connection::open_with_flags(source, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let mut statement = conn.prepare(sql)?;
    let width = statement.column_count();
    let rows = statement.query_map([after], |row| {
        let values = (1..width)
            .map(|i| row.get::<_, Value>(i))
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok((row.get(0)?, values))
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// A SQLite row as PostgreSQL parameters of each column's type.
fn convert(table: &Table, row: Vec<Value>) -> Result<Vec<Box<dyn ToSql + Sync + Send>>> {
    let mismatch = |column: &str, value: &Value| {
        StorageError::corrupt(format!(
            "{}.{column}: unexpected {:?}",
            table.name,
            value.data_type()
        ))
    };
    table
        .columns
        .iter()
        .zip(row)
        .map(
            |(&(name, column), value)| -> Result<Box<dyn ToSql + Sync + Send>> {
                Ok(match (column, value) {
                    (Text, Value::Null) => Box::new(None::<String>),
                    (Text, Value::Text(text)) => Box::new(Some(text)),
                    (BigInt, Value::Null) => Box::new(None::<i64>),
                    (BigInt, Value::Integer(n)) => Box::new(Some(n)),
                    (Int, Value::Null) => Box::new(None::<i32>),
                    (Int, Value::Integer(n)) => Box::new(Some(
                        i32::try_from(n).map_err(|_| mismatch(name, &Value::Integer(n)))?,
                    )),
                    (Bytes, Value::Blob(bytes)) => Box::new(bytes),
                    (Bool, Value::Null) => Box::new(None::<bool>),
                    (Bool, Value::Integer(n)) => Box::new(Some(n != 0)),
                    (Float, Value::Null) => Box::new(None::<f64>),
                    (Float, Value::Real(x)) => Box::new(Some(x)),
                    (Float, Value::Integer(n)) => Box::new(Some(n as f64)),
                    (_, value) => return Err(mismatch(name, &value)),
                })
            },
        )
        .collect()
}
