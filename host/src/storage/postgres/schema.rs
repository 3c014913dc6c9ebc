//! Versioned schema migrations, applied at start in one transaction under
//! a transaction-scoped advisory lock (hosts starting together migrate
//! once). `jobhost_schema.version` records how far the database got; a
//! binary older than the database's schema refuses to start, so a rolling
//! upgrade never runs old code on a new schema.

use crate::storage::concurrency::rule_of;
use crate::storage::{ErrorClass, Result, StorageError};

/// The advisory lock migrations hold (any constant unique to jobhost).
const MIGRATION_LOCK: i64 = 0x6a6f_6268_6f73_7401;

pub(super) const MIGRATIONS: &[&str] = &[
    // 1: everything the SQLite schema has at its version 7, plus the event
    // log's positions. Hot tables leave room in each page for updates that
    // touch no index (HOT), and are vacuumed early.
    r#"
    CREATE TABLE plugins (
        name            TEXT PRIMARY KEY,
        active_version  TEXT,
        created_at      BIGINT NOT NULL
    );
    CREATE TABLE plugin_versions (
        plugin          TEXT NOT NULL REFERENCES plugins(name) ON DELETE CASCADE,
        version         TEXT NOT NULL,
        content_hash    TEXT NOT NULL,
        size            BIGINT NOT NULL,
        description     TEXT NOT NULL,
        component       BYTEA NOT NULL,
        uploaded_at     BIGINT NOT NULL,
        PRIMARY KEY (plugin, version)
    );
    CREATE INDEX plugin_versions_content ON plugin_versions (content_hash);
    CREATE TABLE jobs (
        id              TEXT PRIMARY KEY,
        status          TEXT NOT NULL
                        CHECK (status IN ('pending', 'running', 'completed', 'failed', 'cancelled')),
        payload         TEXT NOT NULL,
        priority        INTEGER NOT NULL,
        run_at          BIGINT NOT NULL,
        attempt         INTEGER NOT NULL DEFAULT 0,
        max_attempts    INTEGER NOT NULL,
        backoff         TEXT NOT NULL,
        idempotency_key TEXT UNIQUE,
        webhook_url     TEXT,
        webhook_secret  TEXT,
        created_at      BIGINT NOT NULL,
        started_at      BIGINT,
        finished_at     BIGINT,
        error           TEXT,
        lease           BIGINT NOT NULL DEFAULT 0,
        -- The host whose worker runs it (see `hosts`), and whether a user
        -- asked, on any host, to cancel it while it ran.
        owner           TEXT,
        cancel_requested BOOLEAN NOT NULL DEFAULT false
    ) WITH (fillfactor = 80, autovacuum_vacuum_scale_factor = 0.02,
            autovacuum_analyze_scale_factor = 0.05);
    CREATE INDEX jobs_due ON jobs (priority DESC, run_at, id) WHERE status = 'pending';
    CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;
    CREATE INDEX jobs_status ON jobs (status, id);
    CREATE INDEX jobs_owner ON jobs (owner) WHERE status = 'running';
    -- Hosts sharing the database: each renews its lease (database time, so
    -- hosts' clocks do not matter); the jobs of a host whose lease
    -- expired are recovered by the others.
    CREATE TABLE hosts (
        id              TEXT PRIMARY KEY,
        name            TEXT NOT NULL,
        started_at      BIGINT NOT NULL,
        heartbeat_at    BIGINT NOT NULL,
        lease_until     BIGINT NOT NULL,
        slots           INTEGER NOT NULL
    );
    -- What the platform's users set for every host at once.
    CREATE TABLE cluster_state (paused BOOLEAN NOT NULL);
    INSERT INTO cluster_state VALUES (false);
    CREATE FUNCTION jobhost_now() RETURNS BIGINT LANGUAGE sql VOLATILE
        AS $$ SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint $$;
    CREATE TABLE phases (
        job_id          TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        idx             INTEGER NOT NULL,
        name            TEXT NOT NULL,
        plugin          TEXT NOT NULL,
        version         TEXT NOT NULL,
        config          TEXT NOT NULL,
        timeout_ms      BIGINT NOT NULL,
        status          TEXT NOT NULL
                        CHECK (status IN ('pending', 'running', 'completed', 'failed', 'cancelled')),
        output          TEXT,
        error           TEXT,
        attempts        INTEGER NOT NULL DEFAULT 0,
        started_at      BIGINT,
        finished_at     BIGINT,
        usage           TEXT,
        progress        TEXT,
        PRIMARY KEY (job_id, idx)
    ) WITH (fillfactor = 80, autovacuum_vacuum_scale_factor = 0.02,
            autovacuum_analyze_scale_factor = 0.05);
    CREATE INDEX phases_plugin ON phases (plugin, version);
    CREATE TABLE attempt_errors (
        job_id          TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        attempt         INTEGER NOT NULL,
        phase           TEXT,
        error           TEXT NOT NULL,
        at              BIGINT NOT NULL,
        PRIMARY KEY (job_id, attempt)
    );
    -- Events outlive the jobs they are about (job:deleted must be
    -- replayable). A transaction numbers its events 1.. (`n`) as it
    -- appends them, in one statement; jobhost_stamp_events later gives the
    -- transaction a block of positions (`event_blocks`), so an event's
    -- position is its block's `base` + `n`, and no event row is written
    -- twice.
    CREATE TABLE events (
        xid             xid8 NOT NULL DEFAULT pg_current_xact_id(),
        n               BIGINT NOT NULL,
        kind            TEXT NOT NULL,
        job_id          TEXT,
        at              BIGINT NOT NULL,
        data            TEXT NOT NULL,
        PRIMARY KEY (xid, n)
    ) WITH (autovacuum_vacuum_scale_factor = 0.02);
    CREATE INDEX events_job ON events (job_id);
    -- The positions of a transaction's events: base + 1 ..= last. Blocks
    -- never overlap, and follow each other in the order they were given.
    CREATE TABLE event_blocks (
        xid             xid8 PRIMARY KEY,
        base            BIGINT NOT NULL,
        last            BIGINT NOT NULL
    ) WITH (autovacuum_vacuum_scale_factor = 0.02);
    CREATE INDEX event_blocks_last ON event_blocks (last);
    -- The last position given (positions never go back, even when the
    -- newest events are deleted with their job), and the transaction id
    -- below which every event has its position.
    CREATE TABLE event_positions (last BIGINT NOT NULL, stamped_below xid8 NOT NULL);
    INSERT INTO event_positions VALUES (0, '0');
    -- Gives positions; returns the last one given and `below`: every
    -- event of a transaction with a lower id than it has its position.
    CREATE FUNCTION jobhost_stamp_events(OUT last BIGINT, OUT below BIGINT)
    LANGUAGE plpgsql AS $$
    DECLARE
        horizon xid8;
        done xid8;
        stamped BIGINT;
        highest xid8;
    BEGIN
        -- One stamper at a time, on any host; the statements below take
        -- their snapshots after the lock, so they see the previous
        -- stamper's positions.
        PERFORM pg_advisory_xact_lock(7667050837011394562);
        -- No transaction below this is still running, now or later: every
        -- transaction below the last stamp's horizon had its events
        -- stamped then, so only ids from there on need looking at.
        horizon := pg_snapshot_xmin(pg_current_snapshot());
        SELECT p.last, p.stamped_below INTO last, done FROM event_positions p;
        WITH batch AS (
            SELECT e.xid, count(*) AS appended
            FROM events e
            WHERE e.xid >= done AND e.xid < horizon
              AND NOT EXISTS (SELECT 1 FROM event_blocks b WHERE b.xid = e.xid)
            GROUP BY e.xid
            ORDER BY e.xid
            LIMIT 1000
        ), placed AS (
            INSERT INTO event_blocks (xid, base, last)
            SELECT batch.xid,
                   jobhost_stamp_events.last + sum(appended) OVER w - appended,
                   jobhost_stamp_events.last + sum(appended) OVER w
            FROM batch WINDOW w AS (ORDER BY batch.xid)
            RETURNING event_blocks.xid, event_blocks.last
        )
        SELECT count(*), max(placed.xid), COALESCE(max(placed.last), jobhost_stamp_events.last)
        INTO stamped, highest, jobhost_stamp_events.last FROM placed;
        -- A full batch may have left transactions above its last one.
        IF stamped = 1000 THEN
            horizon := highest;
        END IF;
        IF stamped > 0 THEN
            UPDATE event_positions SET last = jobhost_stamp_events.last, stamped_below = horizon;
            PERFORM pg_notify('jobhost_log', last::text);
        ELSIF horizon > done THEN
            UPDATE event_positions SET stamped_below = horizon;
        END IF;
        below := horizon::text::bigint + (CASE WHEN stamped = 1000 THEN 1 ELSE 0 END);
    END
    $$;
    CREATE TABLE webhook_deliveries (
        id              TEXT PRIMARY KEY,
        job_id          TEXT NOT NULL,
        url             TEXT NOT NULL,
        secret          TEXT,
        event           TEXT NOT NULL,
        body            TEXT NOT NULL,
        status          TEXT NOT NULL CHECK (status IN ('pending', 'delivered', 'failed')),
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at BIGINT NOT NULL,
        last_status     INTEGER,
        last_error      TEXT,
        created_at      BIGINT NOT NULL,
        finished_at     BIGINT
    );
    CREATE INDEX webhook_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
    CREATE INDEX webhook_job ON webhook_deliveries (job_id, created_at);
    CREATE TABLE artifacts (
        content_hash TEXT NOT NULL,
        engine       TEXT NOT NULL,
        digest       TEXT NOT NULL,
        PRIMARY KEY (content_hash, engine)
    );
    "#,
    // 2: what the operator grants each plugin (`model::PluginGrants`, as
    // JSON text, as on SQLite): secret names, never their values.
    r#"
    CREATE TABLE plugin_grants (
        plugin     TEXT PRIMARY KEY,
        grants     TEXT NOT NULL,
        updated_at BIGINT NOT NULL
    );
    "#,
    // 3: what the operator sets aside for a plugin's runs
    // (`model::PluginResources`).
    r#"
    ALTER TABLE plugins ADD COLUMN memory_mb BIGINT;
    ALTER TABLE plugins ADD COLUMN timeout_ms BIGINT;
    "#,
    // 4: schedules (`model::ScheduleSpec` as JSON text, without the webhook
    // secret, as on SQLite), their next tick and last fire.
    r#"
    CREATE TABLE schedules (
        name           TEXT PRIMARY KEY,
        spec           TEXT NOT NULL,
        webhook_secret TEXT,
        paused         BOOLEAN NOT NULL,
        next_tick      BIGINT NOT NULL,
        last_tick      BIGINT,
        last_fired_at  BIGINT,
        last_job_id    TEXT,
        created_at     BIGINT NOT NULL,
        updated_at     BIGINT NOT NULL
    );
    CREATE INDEX schedules_due ON schedules (next_tick) WHERE NOT paused;
    "#,
    // 5: concurrency keys, as on SQLite (its migration 12 says how they
    // work). One trigger function serves inserts and updates.
    concat!(
        r#"
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
        per_second  DOUBLE PRECISION,
        PRIMARY KEY (pattern, prefix)
    );
    CREATE TABLE concurrency_keys (
        key            TEXT PRIMARY KEY,
        turn           BIGINT NOT NULL,
        ready_priority INTEGER,
        ready_at       BIGINT,
        max_running    INTEGER,
        per_second     DOUBLE PRECISION,
        tokens         DOUBLE PRECISION,
        refilled_at    BIGINT
    ) WITH (fillfactor = 70);
    CREATE INDEX concurrency_keys_ready ON concurrency_keys (ready_priority DESC, turn, key)
        WHERE ready_at IS NOT NULL;
    CREATE INDEX concurrency_keys_ready_at ON concurrency_keys (ready_at)
        WHERE ready_at IS NOT NULL;
    CREATE TABLE claim_rotation (unkeyed_turn BIGINT NOT NULL, next_turn BIGINT NOT NULL);
    INSERT INTO claim_rotation VALUES (0, 1);
    CREATE FUNCTION jobhost_key_ready() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO concurrency_keys AS k (key, turn, ready_priority, ready_at, max_running,
                                           per_second)
        VALUES (NEW.concurrency_key, (SELECT next_turn FROM claim_rotation), NEW.priority,
                NEW.run_at, "#,
        rule_of!("max_running", "NEW.concurrency_key"),
        ", ",
        rule_of!("per_second", "NEW.concurrency_key"),
        r#")
        ON CONFLICT (key) DO UPDATE SET
            ready_priority = GREATEST(k.ready_priority, EXCLUDED.ready_priority),
            ready_at = LEAST(k.ready_at, EXCLUDED.ready_at);
        RETURN NULL;
    END $$;
    CREATE TRIGGER jobs_key_ready AFTER INSERT OR UPDATE OF status, run_at, priority ON jobs
        FOR EACH ROW WHEN (NEW.status = 'pending' AND NEW.concurrency_key IS NOT NULL)
        EXECUTE FUNCTION jobhost_key_ready();
    "#
    ),
    // 6: per-plugin limits, as on SQLite (its migration 13 says how they
    // work).
    r#"
    ALTER TABLE jobs DROP CONSTRAINT jobs_status_check;
    ALTER TABLE jobs ADD CONSTRAINT jobs_status_check
        CHECK (status IN ('pending', 'running', 'completed', 'failed', 'cancelled', 'waiting'));
    ALTER TABLE jobs ADD COLUMN waiting_for TEXT;
    CREATE INDEX jobs_waiting ON jobs (waiting_for, priority DESC, run_at, id)
        WHERE status = 'waiting';
    ALTER TABLE phases ADD COLUMN holds_slot BOOLEAN;
    CREATE INDEX phases_holding_slots ON phases (plugin) WHERE status = 'running' AND holds_slot;
    CREATE TABLE plugin_limits (
        plugin      TEXT PRIMARY KEY REFERENCES plugins(name) ON DELETE CASCADE,
        max_running INTEGER,
        per_second  DOUBLE PRECISION,
        tokens      DOUBLE PRECISION,
        refilled_at BIGINT
    ) WITH (fillfactor = 70);
    "#,
];

/// The schema version this build writes.
pub const VERSION: usize = MIGRATIONS.len();

/// Brings the database up to the latest schema, or refuses a newer one.
pub(super) async fn migrate(client: &mut tokio_postgres::Client) -> Result<()> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS jobhost_schema (version INTEGER NOT NULL)")
        .await?;
    let current = match tx
        .query_opt("SELECT version FROM jobhost_schema", &[])
        .await?
    {
        Some(row) => row.get::<_, i32>(0) as usize,
        None => {
            tx.execute("INSERT INTO jobhost_schema VALUES (0)", &[])
                .await?;
            0
        }
    };
    if current > VERSION {
        return Err(StorageError::new(
            ErrorClass::Other,
            format!(
                "the database has schema version {current}, newer than this jobhost knows ({VERSION}): upgrade jobhost"
            ),
        ));
    }
    for migration in &MIGRATIONS[current..] {
        tx.batch_execute(migration).await?;
    }
    tx.execute(
        "UPDATE jobhost_schema SET version = $1",
        &[&(VERSION as i32)],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}
