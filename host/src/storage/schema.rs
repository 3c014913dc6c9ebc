//! Versioned schema migrations. Each entry is applied once, in order, in its
//! own transaction; `PRAGMA user_version` records how far a database got.

use rusqlite::Connection;

const MIGRATIONS: &[&str] = &[
    // 1: plugins, jobs, phases, attempt errors, the event log.
    "
    CREATE TABLE plugins (
        name            TEXT PRIMARY KEY,
        active_version  TEXT,
        created_at      INTEGER NOT NULL
    );
    CREATE TABLE plugin_versions (
        plugin          TEXT NOT NULL REFERENCES plugins(name) ON DELETE CASCADE,
        version         TEXT NOT NULL,
        content_hash    TEXT NOT NULL,
        size            INTEGER NOT NULL,
        description     TEXT NOT NULL,
        component       BLOB NOT NULL,
        uploaded_at     INTEGER NOT NULL,
        PRIMARY KEY (plugin, version)
    );
    CREATE TABLE jobs (
        id              TEXT PRIMARY KEY,
        status          TEXT NOT NULL
                        CHECK (status IN ('pending', 'running', 'completed', 'failed', 'cancelled')),
        payload         TEXT NOT NULL,
        priority        INTEGER NOT NULL,
        run_at          INTEGER NOT NULL,
        attempt         INTEGER NOT NULL DEFAULT 0,
        max_attempts    INTEGER NOT NULL,
        backoff         TEXT NOT NULL,
        idempotency_key TEXT UNIQUE,
        webhook_url     TEXT,
        webhook_secret  TEXT,
        created_at      INTEGER NOT NULL,
        started_at      INTEGER,
        finished_at     INTEGER,
        error           TEXT
    );
    CREATE INDEX jobs_due ON jobs (priority DESC, run_at, id) WHERE status = 'pending';
    CREATE INDEX jobs_finished ON jobs (finished_at)
        WHERE status IN ('completed', 'failed', 'cancelled');
    CREATE INDEX jobs_status ON jobs (status, id);
    CREATE TABLE phases (
        job_id          TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        idx             INTEGER NOT NULL,
        name            TEXT NOT NULL,
        plugin          TEXT NOT NULL,
        version         TEXT NOT NULL,
        config          TEXT NOT NULL,
        timeout_ms      INTEGER NOT NULL,
        status          TEXT NOT NULL
                        CHECK (status IN ('pending', 'running', 'completed', 'failed', 'cancelled')),
        output          TEXT,
        error           TEXT,
        attempts        INTEGER NOT NULL DEFAULT 0,
        started_at      INTEGER,
        finished_at     INTEGER,
        usage           TEXT,
        PRIMARY KEY (job_id, idx)
    );
    CREATE INDEX phases_plugin ON phases (plugin, version);
    CREATE TABLE attempt_errors (
        job_id          TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        attempt         INTEGER NOT NULL,
        phase           TEXT,
        error           TEXT NOT NULL,
        at              INTEGER NOT NULL,
        PRIMARY KEY (job_id, attempt)
    );
    -- Events outlive the jobs they are about (job:deleted must be replayable).
    CREATE TABLE events (
        seq             INTEGER PRIMARY KEY AUTOINCREMENT,
        kind            TEXT NOT NULL,
        job_id          TEXT,
        at              INTEGER NOT NULL,
        data            TEXT NOT NULL
    );
    CREATE INDEX events_job ON events (job_id, seq);
    ",
    // 2: the webhook outbox. No foreign key to jobs: a delivery outlives
    // the job's retention.
    "
    CREATE TABLE webhook_deliveries (
        id              TEXT PRIMARY KEY,
        job_id          TEXT NOT NULL,
        url             TEXT NOT NULL,
        secret          TEXT,
        event           TEXT NOT NULL,
        body            TEXT NOT NULL,
        status          TEXT NOT NULL CHECK (status IN ('pending', 'delivered', 'failed')),
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at INTEGER NOT NULL,
        last_status     INTEGER,
        last_error      TEXT,
        created_at      INTEGER NOT NULL,
        finished_at     INTEGER
    );
    CREATE INDEX webhook_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
    CREATE INDEX webhook_job ON webhook_deliveries (job_id, created_at);
    ",
];

/// Brings the database up to the latest schema.
pub(crate) fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let current = conn.query_row("PRAGMA user_version", [], |row| row.get::<_, i64>(0))? as usize;
    if current > MIGRATIONS.len() {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "the database has schema version {current}, newer than this jobhost knows ({}): upgrade jobhost",
            MIGRATIONS.len()
        )));
    }
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(current) {
        let tx = conn.transaction()?;
        tx.execute_batch(migration)?;
        tx.pragma_update(None, "user_version", index as i64 + 1)?;
        tx.commit()?;
    }
    Ok(())
}

/// The schema version this build writes.
pub const VERSION: usize = MIGRATIONS.len();
