//! Concurrency keys on SQLite: the claim rotation (see
//! `storage::concurrency`), the limits, and the load per key. The writer
//! is the only writer, so reading the rotation and then claiming in one
//! transaction needs no locks.

use std::collections::VecDeque;

use async_trait::async_trait;
use rusqlite::{Connection, params};

use super::SqliteStore;
use super::claim::{DUE_AT_LEVEL, by_priority};
use crate::model::concurrency::LimitRule;
use crate::model::{ConcurrencyLimits, KeyLoad, PluginLoad};
use crate::storage::concurrency::{
    APPLY_LIMITS, Bucket, FORGET_IDLE_KEYS, Group, PENDING_PER_KEY, RUNNING_PER_KEY, busiest,
    take_turns as rotate,
};
use crate::storage::{ConcurrencyStore, Result};

/// The jobs a claim takes in the rotation's order, and the keys to
/// [`settle`] once they are claimed.
pub(super) struct Taken {
    pub ids: Vec<String>,
    pub keys: Vec<Settled>,
}

/// A key whose row a claim writes back: its new turn and the tokens left
/// in its bucket if it was served, and its earliest due time and best
/// priority read again.
pub(super) struct Settled {
    key: String,
    turn: Option<i64>,
    tokens: Option<f64>,
}

/// A key row's bucket, from its `per_second`, `tokens` and `refilled_at`
/// columns at `at`.
fn bucket(row: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<Option<Bucket>> {
    let Some(per_second) = row.get::<_, Option<f64>>(at)? else {
        return Ok(None);
    };
    Ok(Some(Bucket {
        per_second,
        tokens: row.get(at + 1)?,
        refilled_at: row.get(at + 2)?,
    }))
}

/// Whether a key has a job due at `now` by its row (which may be stale):
/// one seek, so that a claim while no key is ready reads none of the keys
/// whose jobs are all scheduled for later.
fn any_key_ready(conn: &Connection, now: i64) -> Result<bool> {
    Ok(conn
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM concurrency_keys INDEXED BY concurrency_keys_ready_at
                            WHERE ready_at IS NOT NULL AND ready_at <= ?1)",
        )?
        .query_row([now], |row| row.get(0))?)
}

/// How many jobs with `key` run now.
fn running(conn: &Connection, key: &str) -> Result<i64> {
    Ok(conn
        .prepare_cached(
            "SELECT COUNT(*) FROM jobs INDEXED BY jobs_keyed_running
             WHERE concurrency_key = ?1 AND status = 'running'",
        )?
        .query_row([key], |row| row.get(0))?)
}

/// How many more jobs with `key` may run, given its limit.
fn room(conn: &Connection, key: &str, max_running: Option<i64>, want: usize) -> Result<usize> {
    Ok(match max_running {
        None => want,
        Some(max) => (max - running(conn, key)?).clamp(0, want as i64) as usize,
    })
}

/// Up to `want` jobs of the rotation, or `None` when no key is ready (the
/// claim then takes jobs without a key as it always did). Reads the keys in
/// turn order until it has `want` groups: a key at its limit costs a count
/// of its running jobs, never a read of its backlog; a key whose jobs are
/// all scheduled for later costs a row.
pub(super) fn take_turns(conn: &Connection, now: i64, want: usize) -> Result<Option<Taken>> {
    if !any_key_ready(conn, now)? {
        return Ok(None);
    }
    let mut groups = Vec::new();
    let mut keys = Vec::new();
    {
        let mut ready = conn.prepare_cached(
            "SELECT key, turn, max_running, per_second, tokens, refilled_at
             FROM concurrency_keys INDEXED BY concurrency_keys_ready
             WHERE ready_at IS NOT NULL AND ready_at <= ?1
             ORDER BY ready_priority DESC, turn, key",
        )?;
        let mut due = conn.prepare_cached(
            "SELECT id, priority FROM jobs INDEXED BY jobs_keyed_due
             WHERE concurrency_key = ?1 AND status = 'pending' AND run_at <= ?2
             ORDER BY priority DESC, run_at, id LIMIT ?3",
        )?;
        let mut rows = ready.query([now])?;
        while groups.len() < want
            && let Some(row) = rows.next()?
        {
            let (key, turn): (String, i64) = (row.get(0)?, row.get(1)?);
            let bucket = bucket(row, 3)?;
            let tokens = bucket.map(|b| b.tokens_at(now));
            let room = room(conn, &key, row.get(2)?, want)?
                .min(tokens.map_or(want, |tokens| tokens.floor() as usize));
            if room == 0 {
                continue;
            }
            let jobs = due
                .query_map(params![key, now, room as i64], |row| {
                    Ok((row.get(0)?, row.get(1)?))
                })?
                .collect::<rusqlite::Result<VecDeque<_>>>()?;
            if jobs.is_empty() {
                // Its row was stale: the jobs it counted were cancelled.
                keys.push(Settled {
                    key,
                    turn: None,
                    tokens: None,
                });
                continue;
            }
            groups.push(Group {
                key: Some(key),
                turn,
                due: jobs,
                tokens,
            });
        }
    }
    if groups.is_empty() {
        settle(conn, &keys, now)?;
        return Ok(None);
    }
    let (unkeyed_turn, next_turn): (i64, i64) = conn
        .prepare_cached("SELECT unkeyed_turn, next_turn FROM claim_rotation")?
        .query_row([], |row| Ok((row.get(0)?, row.get(1)?)))?;
    groups.push(Group {
        key: None,
        turn: unkeyed_turn,
        due: due_unkeyed(conn, now, want)?,
        tokens: None,
    });
    let turns = rotate(groups, want, next_turn);
    let mut unkeyed_turn = None;
    for served in turns.served {
        match served.key {
            Some(key) => keys.push(Settled {
                key,
                turn: Some(served.turn),
                tokens: served.tokens,
            }),
            None => unkeyed_turn = Some(served.turn),
        }
    }
    conn.prepare_cached(
        "UPDATE claim_rotation SET next_turn = ?1, unkeyed_turn = COALESCE(?2, unkeyed_turn)",
    )?
    .execute(params![turns.next_turn, unkeyed_turn])?;
    Ok(Some(Taken {
        ids: turns.ids,
        keys,
    }))
}

/// Due jobs without a key, up to `want`, in claim order, with their
/// priorities.
fn due_unkeyed(conn: &Connection, now: i64, want: usize) -> Result<VecDeque<(String, i32)>> {
    let due = by_priority(conn, want, |priority, wanted| {
        Ok(conn
            .prepare_cached(DUE_AT_LEVEL)?
            .query_map(params![now, wanted, priority], |row| {
                Ok((row.get(0)?, priority as i32))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?)
    })?;
    Ok(due.into())
}

/// Writes back the rows of `keys` after a claim: the new turn of each
/// served, and the earliest due time and best priority of their pending
/// jobs. A key without any stays, idle, with its turn, until
/// `forget_idle_keys` (a trigger makes it ready again when one of its jobs
/// is pending).
pub(super) fn settle(conn: &Connection, keys: &[Settled], now: i64) -> Result<()> {
    let mut update = conn.prepare_cached(
        "UPDATE concurrency_keys SET
             turn = COALESCE(?2, turn),
             tokens = COALESCE(?3, tokens),
             refilled_at = CASE WHEN ?3 IS NULL THEN refilled_at ELSE ?4 END,
             ready_priority = (SELECT priority FROM jobs INDEXED BY jobs_keyed_due
                               WHERE concurrency_key = ?1 AND status = 'pending'
                               ORDER BY priority DESC LIMIT 1),
             ready_at = (SELECT run_at FROM jobs INDEXED BY jobs_keyed_due_at
                         WHERE concurrency_key = ?1 AND status = 'pending'
                         ORDER BY run_at LIMIT 1)
         WHERE key = ?1",
    )?;
    for Settled { key, turn, tokens } in keys {
        update.execute(params![key, turn, tokens, now])?;
    }
    Ok(())
}

/// The earliest time a key with room has a job due and a token for it, by
/// the keys' rows.
pub(super) fn next_key_due(conn: &Connection) -> Result<Option<i64>> {
    let mut ready = conn.prepare_cached(
        "SELECT key, ready_at, max_running, per_second, tokens, refilled_at
         FROM concurrency_keys INDEXED BY concurrency_keys_ready_at
         WHERE ready_at IS NOT NULL ORDER BY ready_at",
    )?;
    let mut rows = ready.query([])?;
    let mut earliest: Option<i64> = None;
    while let Some(row) = rows.next()? {
        let ready_at: i64 = row.get(1)?;
        if earliest.is_some_and(|earliest| ready_at >= earliest) {
            break;
        }
        let key: String = row.get(0)?;
        if room(conn, &key, row.get(2)?, 1)? > 0 {
            let token_at = bucket(row, 3)?.and_then(|b| b.next_token_at());
            let due = token_at.map_or(ready_at, |at| at.max(ready_at));
            earliest = Some(earliest.map_or(due, |earliest| earliest.min(due)));
        }
    }
    Ok(earliest)
}

/// Whether a key with room has a job due at `now`.
pub(super) fn key_due(conn: &Connection, now: i64) -> Result<bool> {
    Ok(next_key_due(conn)?.is_some_and(|at| at <= now))
}

fn set_limits(conn: &Connection, limits: &ConcurrencyLimits) -> Result<()> {
    conn.execute("DELETE FROM concurrency_limits", [])?;
    let mut insert = conn.prepare_cached(
        "INSERT INTO concurrency_limits (pattern, prefix, max_running, per_second)
         VALUES (?1, ?2, ?3, ?4)",
    )?;
    for rule in limits.rules() {
        insert.execute(params![
            rule.pattern,
            rule.prefix,
            rule.max_running,
            rule.per_second
        ])?;
    }
    conn.execute(APPLY_LIMITS, [])?;
    Ok(())
}

fn limits(conn: &Connection) -> Result<ConcurrencyLimits> {
    let rules = conn
        .prepare_cached("SELECT pattern, prefix, max_running, per_second FROM concurrency_limits")?
        .query_map([], |row| {
            Ok(LimitRule {
                pattern: row.get(0)?,
                prefix: row.get(1)?,
                max_running: row.get(2)?,
                per_second: row.get(3)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(ConcurrencyLimits::from_rules(rules))
}

/// Counts per key, from `sql` (`RUNNING_PER_KEY` or `PENDING_PER_KEY`).
fn per_key(conn: &Connection, sql: &str) -> Result<Vec<(String, i64)>> {
    Ok(conn
        .prepare_cached(sql)?
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?)
}

#[async_trait]
impl ConcurrencyStore for SqliteStore {
    async fn set_concurrency_limits(&self, limits: ConcurrencyLimits) -> Result<()> {
        self.write(move |conn, _| set_limits(conn, &limits)).await
    }

    async fn concurrency_limits(&self) -> Result<ConcurrencyLimits> {
        self.read(limits).await
    }

    async fn forget_idle_keys(&self) -> Result<u64> {
        self.write(|conn, _| Ok(conn.execute(FORGET_IDLE_KEYS, [])? as u64))
            .await
    }

    async fn key_loads(&self, shown: usize) -> Result<(Vec<KeyLoad>, u64)> {
        self.read(move |conn| {
            let running = per_key(conn, RUNNING_PER_KEY)?;
            let pending = per_key(conn, PENDING_PER_KEY)?;
            Ok(busiest(running, pending, &limits(conn)?, shown))
        })
        .await
    }

    async fn plugin_loads(&self) -> Result<Vec<PluginLoad>> {
        self.read(super::plugin_limits::loads).await
    }

    async fn plugin_slot_freed(&self, _plugin: &str) -> Result<()> {
        Ok(())
    }
}
