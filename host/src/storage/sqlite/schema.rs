//! Versioned schema migrations. Each entry is applied once, in order, in its
//! own transaction; `PRAGMA user_version` records how far a database got.

use rusqlite::{Connection, OptionalExtension};

use crate::storage::concurrency::rule_of;

/// What the triggers of migration 12 do when a keyed job becomes pending:
/// its key joins `concurrency_keys` at the back of the rotation, or moves
/// its earliest due time and best priority forward.
macro_rules! key_ready {
    () => {
        concat!(
            "INSERT INTO concurrency_keys (key, turn, ready_priority, ready_at, max_running,
                                           per_second)
             VALUES (NEW.concurrency_key, (SELECT next_turn FROM claim_rotation), NEW.priority,
                     NEW.run_at, ",
            rule_of!("max_running", "NEW.concurrency_key"),
            ", ",
            rule_of!("per_second", "NEW.concurrency_key"),
            ")
             ON CONFLICT (key) DO UPDATE SET
                 ready_priority = MAX(COALESCE(ready_priority, excluded.ready_priority),
                                      excluded.ready_priority),
                 ready_at = MIN(COALESCE(ready_at, excluded.ready_at), excluded.ready_at);"
        )
    };
}

/// Whether the row of `NEW`'s key is missing, or says the key is ready
/// later or at a lower priority than `NEW`: only then does [`key_ready`]
/// change it.
macro_rules! key_behind {
    () => {
        "NOT EXISTS (SELECT 1 FROM concurrency_keys k WHERE k.key = NEW.concurrency_key
                        AND k.ready_priority >= NEW.priority AND k.ready_at <= NEW.run_at)"
    };
}

pub(super) const MIGRATIONS: &[&str] = &[
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
    // 3: the status checks as comparisons instead of IN lists, and the
    // index of finished jobs keyed on `finished_at` being set: SQLite builds
    // a temporary b-tree for an IN list of more than two values each time it
    // evaluates one, which was every insert and update of a job or phase.
    // A CHECK cannot be altered, so both tables are rebuilt (the documented
    // procedure: new table, copy, drop, rename; foreign keys are off
    // meanwhile, see `migrate`).
    "
    CREATE TABLE jobs_v3 (
        id              TEXT PRIMARY KEY,
        status          TEXT NOT NULL
                        CHECK (status = 'pending' OR status = 'running' OR status = 'completed'
                               OR status = 'failed' OR status = 'cancelled'),
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
    INSERT INTO jobs_v3 SELECT * FROM jobs;
    DROP TABLE jobs;
    ALTER TABLE jobs_v3 RENAME TO jobs;
    CREATE INDEX jobs_due ON jobs (priority DESC, run_at, id) WHERE status = 'pending';
    CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;
    CREATE INDEX jobs_status ON jobs (status, id);
    CREATE TABLE phases_v3 (
        job_id          TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        idx             INTEGER NOT NULL,
        name            TEXT NOT NULL,
        plugin          TEXT NOT NULL,
        version         TEXT NOT NULL,
        config          TEXT NOT NULL,
        timeout_ms      INTEGER NOT NULL,
        status          TEXT NOT NULL
                        CHECK (status = 'pending' OR status = 'running' OR status = 'completed'
                               OR status = 'failed' OR status = 'cancelled'),
        output          TEXT,
        error           TEXT,
        attempts        INTEGER NOT NULL DEFAULT 0,
        started_at      INTEGER,
        finished_at     INTEGER,
        usage           TEXT,
        PRIMARY KEY (job_id, idx)
    );
    INSERT INTO phases_v3 SELECT * FROM phases;
    DROP TABLE phases;
    ALTER TABLE phases_v3 RENAME TO phases;
    CREATE INDEX phases_plugin ON phases (plugin, version);
    ",
    // 4: a phase keeps its run's last progress report (progress is live-only
    // on the event stream, not one logged event per report).
    "
    ALTER TABLE phases ADD COLUMN progress TEXT;
    ",
    // 5: the digest of each compiled artifact, by component and engine: an
    // artifact on disk is loaded only if it still has this digest.
    "
    CREATE TABLE artifacts (
        content_hash TEXT NOT NULL,
        engine       TEXT NOT NULL,
        digest       TEXT NOT NULL,
        PRIMARY KEY (content_hash, engine)
    );
    ",
    // 6: `types=` filters for kinds that not every job emits read an index
    // instead of the log. Kinds every job emits are left out of it: they are
    // most of the log, so indexing them would add an index write to every
    // step of every job, and a scan for one of them finds a match every few
    // rows anyway. The
    // condition is written as comparisons, not `NOT IN`: SQLite builds a
    // temporary b-tree for an IN list each time it evaluates one, here on
    // every insert (see 3).
    "
    CREATE INDEX events_rare_kind ON events (kind, seq)
        WHERE kind <> 'job:created' AND kind <> 'job:started' AND kind <> 'job:phase:started'
          AND kind <> 'job:phase:completed' AND kind <> 'job:completed';
    ",
    // 7: each claim's lease token (see `storage::Lease`): every worker write
    // is guarded by it, so a worker whose job was recovered and claimed
    // again cannot write over the new claim.
    "
    ALTER TABLE jobs ADD COLUMN lease INTEGER NOT NULL DEFAULT 0;
    ",
    // 8: what users set for the whole platform (a pause outlives a
    // restart, as on PostgreSQL).
    "
    CREATE TABLE cluster_state (paused INTEGER NOT NULL);
    INSERT INTO cluster_state VALUES (0);
    ",
    // 9: what the operator grants each plugin (`model::PluginGrants`, as
    // JSON): secret names, never their values.
    "
    CREATE TABLE plugin_grants (
        plugin     TEXT PRIMARY KEY,
        grants     TEXT NOT NULL,
        updated_at INTEGER NOT NULL
    );
    ",
    // 10: what the operator sets aside for a plugin's runs
    // (`model::PluginResources`).
    "
    ALTER TABLE plugins ADD COLUMN memory_mb INTEGER;
    ALTER TABLE plugins ADD COLUMN timeout_ms INTEGER;
    ",
    // 11: schedules (`model::ScheduleSpec` as JSON, without the webhook
    // secret), their next tick and last fire.
    "
    CREATE TABLE schedules (
        name           TEXT PRIMARY KEY,
        spec           TEXT NOT NULL,
        webhook_secret TEXT,
        paused         INTEGER NOT NULL,
        next_tick      INTEGER NOT NULL,
        last_tick      INTEGER,
        last_fired_at  INTEGER,
        last_job_id    TEXT,
        created_at     INTEGER NOT NULL,
        updated_at     INTEGER NOT NULL
    );
    CREATE INDEX schedules_due ON schedules (next_tick) WHERE NOT paused;
    ",
    // 12: concurrency keys (`storage::concurrency`). Jobs with a key leave
    // `jobs_due`, whose searches stay as they were for jobs without one:
    // they are claimed through `concurrency_keys`, the keys that have
    // pending jobs, in rotation. The triggers keep that set: a keyed job
    // that becomes pending puts its key in (or moves its earliest due time
    // and best priority forward), wherever in the code that happens.
    // `claim_rotation` holds the turn of the jobs without a key and the
    // next turn to hand out.
    concat!(
        "
    ALTER TABLE jobs ADD COLUMN concurrency_key TEXT;
    DROP INDEX jobs_due;
    CREATE INDEX jobs_due ON jobs (priority DESC, run_at, id)
        WHERE status = 'pending' AND concurrency_key IS NULL;
    CREATE INDEX jobs_keyed_due ON jobs (concurrency_key, priority DESC, run_at, id)
        WHERE status = 'pending' AND concurrency_key IS NOT NULL;
    CREATE INDEX jobs_keyed_due_at ON jobs (concurrency_key, run_at)
        WHERE status = 'pending' AND concurrency_key IS NOT NULL;
    CREATE INDEX jobs_keyed_running ON jobs (concurrency_key)
        WHERE status = 'running' AND concurrency_key IS NOT NULL;
    CREATE TABLE concurrency_limits (
        pattern     TEXT NOT NULL,
        prefix      BOOLEAN NOT NULL,
        max_running INTEGER,
        per_second  REAL,
        PRIMARY KEY (pattern, prefix)
    );
    CREATE TABLE concurrency_keys (
        key            TEXT PRIMARY KEY,
        turn           INTEGER NOT NULL,
        ready_priority INTEGER,
        ready_at       INTEGER,
        max_running    INTEGER,
        per_second     REAL,
        tokens         REAL,
        refilled_at    INTEGER
    );
    CREATE INDEX concurrency_keys_ready ON concurrency_keys (ready_priority DESC, turn, key)
        WHERE ready_at IS NOT NULL;
    CREATE INDEX concurrency_keys_ready_at ON concurrency_keys (ready_at) WHERE ready_at IS NOT NULL;
    CREATE TABLE claim_rotation (unkeyed_turn INTEGER NOT NULL, next_turn INTEGER NOT NULL);
    INSERT INTO claim_rotation VALUES (0, 1);
    CREATE TRIGGER jobs_key_ready_on_insert AFTER INSERT ON jobs
        WHEN NEW.status = 'pending' AND NEW.concurrency_key IS NOT NULL
    BEGIN ", key_ready!(), " END;
    CREATE TRIGGER jobs_key_ready_on_update AFTER UPDATE OF status, run_at, priority ON jobs
        WHEN NEW.status = 'pending' AND NEW.concurrency_key IS NOT NULL
    BEGIN ", key_ready!(), " END;
    "
    ),
    // 13: per-plugin limits (`storage::plugin_limits`). A job whose next
    // phase finds its plugin full waits in the new status `waiting`,
    // holding no worker, in `jobs_waiting` by plugin; `plugin_limits` has
    // a row only for a plugin with a limit or a rate, and its bucket.
    // A plugin's running phases are counted from `phases_holding_slots`,
    // never kept: only phases of limited plugins hold a slot, so the
    // phases of other plugins never enter that index (an index of all
    // running phases cost every phase about 2 µs of the writer). The
    // status CHECK cannot be altered, so `jobs` is rebuilt as in 3, with
    // its indexes and triggers.
    concat!(
        "
    CREATE TABLE jobs_v13 (
        id              TEXT PRIMARY KEY,
        status          TEXT NOT NULL
                        CHECK (status = 'pending' OR status = 'running' OR status = 'completed'
                               OR status = 'failed' OR status = 'cancelled'
                               OR status = 'waiting'),
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
        error           TEXT,
        lease           INTEGER NOT NULL DEFAULT 0,
        concurrency_key TEXT,
        waiting_for     TEXT
    );
    INSERT INTO jobs_v13 SELECT *, NULL FROM jobs;
    DROP TABLE jobs;
    ALTER TABLE jobs_v13 RENAME TO jobs;
    CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;
    CREATE INDEX jobs_status ON jobs (status, id);
    CREATE INDEX jobs_due ON jobs (priority DESC, run_at, id)
        WHERE status = 'pending' AND concurrency_key IS NULL;
    CREATE INDEX jobs_keyed_due ON jobs (concurrency_key, priority DESC, run_at, id)
        WHERE status = 'pending' AND concurrency_key IS NOT NULL;
    CREATE INDEX jobs_keyed_due_at ON jobs (concurrency_key, run_at)
        WHERE status = 'pending' AND concurrency_key IS NOT NULL;
    CREATE INDEX jobs_keyed_running ON jobs (concurrency_key)
        WHERE status = 'running' AND concurrency_key IS NOT NULL;
    CREATE INDEX jobs_waiting ON jobs (waiting_for, priority DESC, run_at, id)
        WHERE status = 'waiting';
    ALTER TABLE phases ADD COLUMN holds_slot BOOLEAN;
    CREATE INDEX phases_holding_slots ON phases (plugin) WHERE status = 'running' AND holds_slot;
    CREATE TABLE plugin_limits (
        plugin      TEXT PRIMARY KEY REFERENCES plugins(name) ON DELETE CASCADE,
        max_running INTEGER,
        per_second  REAL,
        tokens      REAL,
        refilled_at INTEGER
    );
    CREATE TRIGGER jobs_key_ready_on_insert AFTER INSERT ON jobs
        WHEN NEW.status = 'pending' AND NEW.concurrency_key IS NOT NULL
    BEGIN ", key_ready!(), " END;
    CREATE TRIGGER jobs_key_ready_on_update AFTER UPDATE OF status, run_at, priority ON jobs
        WHEN NEW.status = 'pending' AND NEW.concurrency_key IS NOT NULL
    BEGIN ", key_ready!(), " END;
    "
    ),
    // 14: a keyed job that becomes pending leaves its key's row alone when
    // the row already says what the job would make it say (ready as early,
    // at a priority as high). The upsert rewrote the row and both of its
    // indexes each time: a keyed insert took about 22 µs of the writer
    // against 4 µs without a key. Sound on SQLite, whose one writer runs
    // every claim that could empty the key before or after this check,
    // never beside it (PostgreSQL keeps its upsert, whose row lock orders
    // it after such a claim).
    concat!(
        "
    DROP TRIGGER jobs_key_ready_on_insert;
    DROP TRIGGER jobs_key_ready_on_update;
    CREATE TRIGGER jobs_key_ready_on_insert AFTER INSERT ON jobs
        WHEN NEW.status = 'pending' AND NEW.concurrency_key IS NOT NULL AND ",
        key_behind!(),
        "
    BEGIN ",
        key_ready!(),
        " END;
    CREATE TRIGGER jobs_key_ready_on_update AFTER UPDATE OF status, run_at, priority ON jobs
        WHEN NEW.status = 'pending' AND NEW.concurrency_key IS NOT NULL AND ",
        key_behind!(),
        "
    BEGIN ",
        key_ready!(),
        " END;
    "
    ),
];

/// Brings the database up to the latest schema.
pub fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let current = conn.query_row("PRAGMA user_version", [], |row| row.get::<_, i64>(0))? as usize;
    if current > MIGRATIONS.len() {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "the database has schema version {current}, newer than this jobhost knows ({}): upgrade jobhost",
            MIGRATIONS.len()
        )));
    }
    // Rebuilding a table (drop, rename) must not cascade to the rows that
    // reference it, and the pragma has no effect inside a transaction.
    conn.pragma_update(None, "foreign_keys", "off")?;
    let migrated = apply(conn, current);
    conn.pragma_update(None, "foreign_keys", "on")?;
    migrated
}

fn apply(conn: &mut Connection, current: usize) -> rusqlite::Result<()> {
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(current) {
        let tx = conn.transaction()?;
        tx.execute_batch(migration)?;
        let dangling: Option<String> = tx
            .query_row("PRAGMA foreign_key_check", [], |row| row.get(0))
            .optional()?;
        if let Some(table) = dangling {
            return Err(rusqlite::Error::InvalidParameterName(format!(
                "migration {} left a row of `{table}` without its parent",
                index + 1
            )));
        }
        tx.pragma_update(None, "user_version", index as i64 + 1)?;
        tx.commit()?;
    }
    Ok(())
}

/// The schema version this build writes.
pub const VERSION: usize = MIGRATIONS.len();

#[cfg(test)]
mod tests {
    use super::*;

    /// Migration 3 rebuilds `jobs` and `phases`: their rows survive, and
    /// the foreign keys still hold and cascade afterwards.
    #[test]
    fn rebuilding_tables_keeps_rows_and_foreign_keys() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.pragma_update(None, "foreign_keys", "on").unwrap();
        for migration in &MIGRATIONS[..2] {
            conn.execute_batch(migration).unwrap();
        }
        conn.pragma_update(None, "user_version", 2).unwrap();
        conn.execute_batch(
            "INSERT INTO jobs (id, status, payload, priority, run_at, max_attempts, backoff, created_at, finished_at)
             VALUES ('j1', 'completed', '{}', 0, 0, 3, '{}', 0, 5);
             INSERT INTO phases (job_id, idx, name, plugin, version, config, timeout_ms, status, output)
             VALUES ('j1', 0, 'p0', 'echo', '1.0.0', '{}', 1000, 'completed', '{\"n\":1}');
             INSERT INTO attempt_errors (job_id, attempt, error, at) VALUES ('j1', 1, 'boom', 1);",
        )
        .unwrap();

        migrate(&mut conn).unwrap();

        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .unwrap();
        assert_eq!(version as usize, VERSION);
        let output: String = conn
            .query_row("SELECT output FROM phases WHERE job_id = 'j1'", [], |row| {
                row.get(0)
            })
            .unwrap();
        assert_eq!(output, r#"{"n":1}"#);
        let bad_status = conn.execute(
            "INSERT INTO jobs (id, status, payload, priority, run_at, max_attempts, backoff, created_at)
             VALUES ('j2', 'exploded', '{}', 0, 0, 3, '{}', 0)",
            [],
        );
        assert!(bad_status.is_err(), "the status check still holds");
        conn.execute("DELETE FROM jobs WHERE id = 'j1'", [])
            .unwrap();
        let left: i64 = conn
            .query_row(
                "SELECT (SELECT COUNT(*) FROM phases) + (SELECT COUNT(*) FROM attempt_errors)",
                [],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(left, 0, "deleting a job still cascades to its rows");
    }
}
