//! Concurrency keys on PostgreSQL: the claim rotation (see
//! `storage::concurrency`), the limits, and the load per key.
//!
//! Claims that go through the rotation take its row's lock first, so they
//! follow one another across hosts: each one's counts of running jobs are
//! read after the one before it committed, and a key's limit holds however
//! many hosts claim. Claims of jobs without a key, while no key is ready,
//! take no such lock.

use std::collections::VecDeque;

use async_trait::async_trait;
use deadpool_postgres::GenericClient;

use super::{PgStore, Tx, execute, query, query_one};
use crate::model::concurrency::LimitRule;
use crate::model::{ConcurrencyLimits, KeyLoad, PluginLoad};
use crate::storage::concurrency::{
    APPLY_LIMITS, FORGET_IDLE_KEYS, Group, PENDING_PER_KEY, RUNNING_PER_KEY, busiest,
    take_turns as rotate,
};
use crate::storage::{ConcurrencyStore, Result};

/// The jobs a claim takes in the rotation's order, and the keys to
/// [`settle`] once they are claimed, with the new turn of those served.
pub(super) struct Taken {
    pub ids: Vec<String>,
    pub keys: Vec<String>,
    pub turns: Vec<Option<i64>>,
    /// The tokens left in the bucket of each served key with a rate.
    pub tokens: Vec<Option<f64>>,
}

/// The tokens in key `k`'s bucket at `$1` (NULL without a rate), as
/// `storage::concurrency::Bucket` counts them.
macro_rules! tokens {
    () => {
        "CASE WHEN k.per_second IS NULL THEN NULL
              WHEN k.tokens IS NULL THEN GREATEST(1, k.per_second)
              ELSE LEAST(GREATEST(1, k.per_second),
                         k.tokens + GREATEST(0, $1 - k.refilled_at) * k.per_second / 1000.0) END"
    };
}
const TOKENS: &str = tokens!();

/// How many more jobs key `k` may start at `$1`, at most `$want`: its limit
/// and its tokens allowing.
macro_rules! room {
    ($want:literal) => {
        concat!(
            "LEAST(CASE WHEN k.max_running IS NULL THEN ",
            $want,
            "::bigint ELSE LEAST(",
            $want,
            "::bigint, k.max_running - (SELECT COUNT(*) FROM jobs r
                 WHERE r.concurrency_key = k.key AND r.status = 'running')) END,
             COALESCE(floor(",
            tokens!(),
            ")::bigint, ",
            $want,
            "::bigint))"
        )
    };
}
const ROOM: &str = room!("$2");

/// Whether a key has a job due at `now` by its row (which may be stale),
/// room or not.
pub(super) async fn any_ready(tx: &Tx<'_>, now: i64) -> Result<bool> {
    let sql = "SELECT EXISTS (SELECT 1 FROM concurrency_keys WHERE ready_at <= $1)";
    Ok(query_one(tx, sql, &[&now]).await?.get(0))
}

/// Whether a key with room has a job due at `$1`, by the keys' rows (`$3`
/// is 1).
pub(super) const KEY_DUE: &str = concat!(
    "EXISTS (SELECT 1 FROM concurrency_keys k
             WHERE k.ready_at IS NOT NULL AND k.ready_at <= $1 AND ",
    room!("$3"),
    " > 0)"
);

/// The earliest time a key with room has a job due and a token for it, by
/// the keys' rows.
pub(super) const NEXT_KEY_DUE: &str = "
    SELECT MIN(GREATEST(k.ready_at,
                        CASE WHEN k.per_second IS NOT NULL AND k.tokens < 1
                             THEN k.refilled_at + ceil((1 - k.tokens) * 1000 / k.per_second)::bigint
                        END))
    FROM concurrency_keys k
    WHERE k.ready_at IS NOT NULL
      AND (k.max_running IS NULL
           OR k.max_running > (SELECT COUNT(*) FROM jobs r
                               WHERE r.concurrency_key = k.key AND r.status = 'running'))";

/// Up to `want` jobs of the rotation, or `None` when no key with room is
/// ready. Up to `want` ready keys with room are read, each with at most as
/// many due jobs as it has room for; a key at its limit costs a count of
/// its running jobs, never a read of its backlog.
pub(super) async fn take_turns(tx: &Tx<'_>, now: i64, want: usize) -> Result<Option<Taken>> {
    let rotation = query_one(
        tx,
        "SELECT unkeyed_turn, next_turn FROM claim_rotation FOR UPDATE",
        &[],
    )
    .await?;
    let (unkeyed_turn, next_turn): (i64, i64) = (rotation.get(0), rotation.get(1));
    let want_ = want as i64;
    let sql = format!(
        "WITH ready AS (
             SELECT k.key, k.turn, k.ready_priority, room.n AS room, {TOKENS} AS tokens
             FROM concurrency_keys k CROSS JOIN LATERAL (SELECT {ROOM} AS n) room
             WHERE k.ready_at IS NOT NULL AND k.ready_at <= $1 AND room.n > 0
             ORDER BY k.ready_priority DESC, k.turn, k.key
             LIMIT $2
         )
         SELECT r.key, r.turn, d.id, d.priority, r.tokens
         FROM ready r LEFT JOIN LATERAL (
             SELECT j.id, j.priority, j.run_at FROM jobs j
             WHERE j.concurrency_key = r.key AND j.status = 'pending' AND j.run_at <= $1
             ORDER BY j.priority DESC, j.run_at, j.id LIMIT r.room
         ) d ON true
         ORDER BY r.ready_priority DESC, r.turn, r.key, d.priority DESC, d.run_at, d.id"
    );
    let mut groups: Vec<Group> = Vec::new();
    let (mut keys, mut key_turns, mut key_tokens) = (Vec::new(), Vec::new(), Vec::new());
    for row in query(tx, &sql, &[&now, &want_]).await? {
        let key: String = row.get(0);
        let Some(id) = row.get::<_, Option<String>>(2) else {
            // Its row was stale: the jobs it counted were cancelled.
            keys.push(key);
            key_turns.push(None);
            key_tokens.push(None);
            continue;
        };
        let job = (id, row.get::<_, i32>(3));
        match groups.last_mut() {
            Some(group) if group.key.as_deref() == Some(&key) => group.due.push_back(job),
            _ => groups.push(Group {
                key: Some(key),
                turn: row.get(1),
                due: VecDeque::from([job]),
                tokens: row.get(4),
            }),
        }
    }
    if groups.is_empty() {
        settle(tx, &keys, &key_turns, &key_tokens, now).await?;
        return Ok(None);
    }
    let unkeyed = query(
        tx,
        "SELECT id, priority FROM jobs
         WHERE status = 'pending' AND concurrency_key IS NULL AND run_at <= $1
         ORDER BY priority DESC, run_at, id LIMIT $2",
        &[&now, &want_],
    )
    .await?;
    groups.push(Group {
        key: None,
        turn: unkeyed_turn,
        due: unkeyed.iter().map(|row| (row.get(0), row.get(1))).collect(),
        tokens: None,
    });
    let turns = rotate(groups, want, next_turn);
    let mut new_unkeyed_turn = None;
    for served in turns.served {
        match served.key {
            Some(key) => {
                keys.push(key);
                key_turns.push(Some(served.turn));
                key_tokens.push(served.tokens);
            }
            None => new_unkeyed_turn = Some(served.turn),
        }
    }
    execute(
        tx,
        "UPDATE claim_rotation SET next_turn = $1, unkeyed_turn = COALESCE($2, unkeyed_turn)",
        &[&turns.next_turn, &new_unkeyed_turn],
    )
    .await?;
    Ok(Some(Taken {
        ids: turns.ids,
        keys,
        turns: key_turns,
        tokens: key_tokens,
    }))
}

/// Writes back the rows of `keys` after a claim: the new turn of each
/// served (`turns`) and the tokens left in its bucket at `now` (`tokens`),
/// and the earliest due time and best priority of their pending jobs. A
/// key without any stays, idle, with its turn, until `forget_idle_keys`.
/// The rows are locked first, so that the reads see what enqueues holding
/// them committed.
pub(super) async fn settle(
    tx: &Tx<'_>,
    keys: &[String],
    turns: &[Option<i64>],
    tokens: &[Option<f64>],
    now: i64,
) -> Result<()> {
    if keys.is_empty() {
        return Ok(());
    }
    query(
        tx,
        "SELECT 1 FROM concurrency_keys WHERE key = ANY($1) ORDER BY key FOR UPDATE",
        &[&keys],
    )
    .await?;
    execute(
        tx,
        "UPDATE concurrency_keys k SET
             turn = COALESCE(t.turn, k.turn),
             tokens = COALESCE(t.tokens, k.tokens),
             refilled_at = CASE WHEN t.tokens IS NULL THEN k.refilled_at ELSE $4 END,
             ready_priority = (SELECT j.priority FROM jobs j
                               WHERE j.concurrency_key = k.key AND j.status = 'pending'
                               ORDER BY j.priority DESC LIMIT 1),
             ready_at = (SELECT j.run_at FROM jobs j
                         WHERE j.concurrency_key = k.key AND j.status = 'pending'
                         ORDER BY j.run_at LIMIT 1)
         FROM unnest($1::text[], $2::bigint[], $3::float8[]) AS t(key, turn, tokens)
         WHERE k.key = t.key",
        &[&keys, &turns, &tokens, &now],
    )
    .await?;
    Ok(())
}

async fn limits(db: &impl GenericClient) -> Result<ConcurrencyLimits> {
    let rows = query(
        db,
        "SELECT pattern, prefix, max_running, per_second FROM concurrency_limits",
        &[],
    )
    .await?;
    Ok(ConcurrencyLimits::from_rules(rows.iter().map(|row| {
        LimitRule {
            pattern: row.get(0),
            prefix: row.get(1),
            max_running: row.get::<_, Option<i32>>(2).map(|limit| limit as u32),
            per_second: row.get(3),
        }
    })))
}

async fn per_key(db: &impl GenericClient, sql: &str) -> Result<Vec<(String, i64)>> {
    let rows = query(db, sql, &[]).await?;
    Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
}

#[async_trait]
impl ConcurrencyStore for PgStore {
    async fn set_concurrency_limits(&self, limits: ConcurrencyLimits) -> Result<()> {
        self.write(move |tx, scope| {
            Box::pin(async move {
                // Hosts waiting for room in a key try again.
                scope.jobs_due = true;
                let rules = limits.rules();
                let patterns: Vec<&str> = rules.iter().map(|r| r.pattern.as_str()).collect();
                let prefixes: Vec<bool> = rules.iter().map(|r| r.prefix).collect();
                let maxima: Vec<Option<i32>> = rules
                    .iter()
                    .map(|r| r.max_running.map(|limit| limit as i32))
                    .collect();
                let rates: Vec<Option<f64>> = rules.iter().map(|r| r.per_second).collect();
                execute(tx, "DELETE FROM concurrency_limits", &[]).await?;
                execute(
                    tx,
                    "INSERT INTO concurrency_limits (pattern, prefix, max_running, per_second)
                     SELECT * FROM unnest($1::text[], $2::boolean[], $3::int[], $4::float8[])",
                    &[&patterns, &prefixes, &maxima, &rates],
                )
                .await?;
                execute(tx, APPLY_LIMITS, &[]).await?;
                Ok(())
            })
        })
        .await
    }

    async fn concurrency_limits(&self) -> Result<ConcurrencyLimits> {
        limits(&self.client().await?).await
    }

    async fn forget_idle_keys(&self) -> Result<u64> {
        let client = self.client().await?;
        Ok(client.execute(FORGET_IDLE_KEYS, &[]).await?)
    }

    async fn key_loads(&self, shown: usize) -> Result<(Vec<KeyLoad>, u64)> {
        let client = self.client().await?;
        let running = per_key(&client, RUNNING_PER_KEY).await?;
        let pending = per_key(&client, PENDING_PER_KEY).await?;
        Ok(busiest(running, pending, &limits(&client).await?, shown))
    }

    async fn plugin_loads(&self) -> Result<Vec<PluginLoad>> {
        super::plugin_limits::loads(&self.client().await?).await
    }

    async fn plugin_slot_freed(&self, plugin: &str) -> Result<()> {
        super::plugin_limits::slot_freed(&self.client().await?, plugin).await
    }
}
