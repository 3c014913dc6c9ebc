//! Per-plugin limits on SQLite (see `storage::plugin_limits`). The writer
//! is the only writer, so counting a plugin's running phases and starting
//! one in the same transaction needs no lock.

use rusqlite::{Connection, OptionalExtension, params};

use crate::model::{PluginLoad, PluginResources};
use crate::storage::Result;
use crate::storage::plugin_limits::{
    HOLD_SLOTS, KEEP_TOKENS, LIFT_LIMITS, LOADS, PluginSlots, SET_LIMITS, WAITING_PLUGINS, WAKE,
    WAKE_ALL, load, next_wake, wakeable,
};

/// A pending phase's name, with its plugin's limits if it has any; `None`
/// if the phase is not pending.
pub(super) fn of_pending_phase(
    conn: &Connection,
    job_id: &str,
    index: usize,
) -> Result<Option<(String, Option<PluginSlots>)>> {
    let row = conn
        .prepare_cached(
            "SELECT p.name, p.plugin, l.plugin IS NOT NULL, l.max_running, l.per_second, l.tokens,
                    l.refilled_at,
                    CASE WHEN l.plugin IS NULL THEN 0
                         ELSE (SELECT COUNT(*) FROM phases r
                               WHERE r.plugin = p.plugin AND r.status = 'running'
                                 AND r.holds_slot) END
             FROM phases p LEFT JOIN plugin_limits l ON l.plugin = p.plugin
             WHERE p.job_id = ?1 AND p.idx = ?2 AND p.status = 'pending'",
        )?
        .query_row(params![job_id, index as i64], |row| {
            let limited: bool = row.get(2)?;
            let slots = limited
                .then(|| -> rusqlite::Result<PluginSlots> {
                    Ok(PluginSlots {
                        plugin: row.get(1)?,
                        max_running: row.get(3)?,
                        bucket: PluginSlots::bucket(row.get(4)?, row.get(5)?, row.get(6)?),
                        running: row.get(7)?,
                    })
                })
                .transpose()?;
            Ok((row.get(0)?, slots))
        })
        .optional()?;
    Ok(row)
}

/// Writes back a plugin's bucket after a start took a token from it.
pub(super) fn keep_tokens(
    conn: &Connection,
    plugin: &str,
    tokens: Option<f64>,
    now: i64,
) -> Result<()> {
    if let Some(tokens) = tokens {
        conn.prepare_cached(KEEP_TOKENS)?
            .execute(params![tokens, now, plugin])?;
    }
    Ok(())
}

/// Each limited plugin with waiting jobs.
fn waiting_plugins(conn: &Connection) -> Result<Vec<PluginSlots>> {
    let mut statement = conn.prepare_cached(WAITING_PLUGINS)?;
    let rows = statement.query_map([], |row| {
        Ok(PluginSlots {
            plugin: row.get(0)?,
            max_running: row.get(1)?,
            bucket: PluginSlots::bucket(row.get(2)?, row.get(3)?, row.get(4)?),
            running: row.get(5)?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Wakes as many waiting jobs of each limited plugin as it has room and
/// tokens for at `now`: a claim's first step.
pub(super) fn wake_waiting(conn: &Connection, now: i64) -> Result<()> {
    let plugins = waiting_plugins(conn)?;
    for (plugin, n) in wakeable(&plugins, now) {
        conn.prepare_cached(WAKE)?.execute(params![plugin, n])?;
    }
    Ok(())
}

/// When a plugin may next wake waiting jobs.
pub(super) fn next_plugin_wake(conn: &Connection) -> Result<Option<i64>> {
    Ok(next_wake(&waiting_plugins(conn)?))
}

/// Keeps a plugin's limits in `plugin_limits` as its resources now say
/// (its running phases hold slots from now on); lifting them wakes every
/// job waiting for it.
pub(super) fn set_limits(
    conn: &Connection,
    plugin: &str,
    resources: &PluginResources,
) -> Result<()> {
    if resources.limits_starts() {
        conn.prepare_cached(SET_LIMITS)?.execute(params![
            plugin,
            resources.max_running,
            resources.per_second
        ])?;
        conn.prepare_cached(HOLD_SLOTS)?.execute([plugin])?;
    } else {
        conn.prepare_cached(LIFT_LIMITS)?.execute([plugin])?;
        conn.prepare_cached(WAKE_ALL)?.execute([plugin])?;
    }
    Ok(())
}

pub(super) fn loads(conn: &Connection) -> Result<Vec<PluginLoad>> {
    let mut statement = conn.prepare_cached(LOADS)?;
    let rows = statement.query_map([], |row| {
        Ok(load(
            row.get(0)?,
            row.get(1)?,
            row.get(2)?,
            row.get(3)?,
            row.get(4)?,
        ))
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}
