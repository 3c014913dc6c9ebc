//! Per-plugin limits on PostgreSQL (see `storage::plugin_limits`). A start
//! of a limited plugin's phase locks the plugin's `plugin_limits` row, so
//! that starts on every host follow one another: each counts the running
//! phases after the one before it committed, and the limit holds however
//! many hosts start phases.

use deadpool_postgres::GenericClient;
use tokio_postgres::Row;

use super::{Tx, WriteScope, execute, query, query_one, query_opt};
use crate::model::{PluginLoad, PluginResources};
use crate::storage::Result;
use crate::storage::plugin_limits::{
    HOLD_SLOTS, KEEP_TOKENS, LIFT_LIMITS, LOADS, PluginSlots, SET_LIMITS, SLOTS_HELD,
    WAITING_PLUGINS, WAKE, WAKE_ALL, load, next_wake, wakeable,
};

/// A pending phase's name and plugin, with the plugin's limits if it has
/// any (its row locked); `None` if the phase is not pending.
pub(super) async fn of_pending_phase(
    tx: &Tx<'_>,
    job_id: &str,
    index: usize,
) -> Result<Option<(String, Option<PluginSlots>)>> {
    let Some(phase) = query_opt(
        tx,
        "SELECT name, plugin FROM phases WHERE job_id = $1 AND idx = $2 AND status = 'pending'",
        &[&job_id, &(index as i32)],
    )
    .await?
    else {
        return Ok(None);
    };
    let plugin: String = phase.get(1);
    let limits = query_opt(
        tx,
        "SELECT max_running, per_second, tokens, refilled_at FROM plugin_limits
         WHERE plugin = $1 FOR UPDATE",
        &[&plugin],
    )
    .await?;
    let Some(limits) = limits else {
        return Ok(Some((phase.get(0), None)));
    };
    // Counted in a statement of its own, after the lock: a statement that
    // waited for the lock still reads what it saw before.
    let running = query_one(tx, SLOTS_HELD, &[&plugin]).await?;
    let slots = PluginSlots {
        max_running: limits.get::<_, Option<i32>>(0).map(i64::from),
        bucket: PluginSlots::bucket(limits.get(1), limits.get(2), limits.get(3)),
        running: running.get(0),
        plugin,
    };
    Ok(Some((phase.get(0), Some(slots))))
}

/// Records a start that `slots` allowed: the phase (just started) holds a
/// slot, and the bucket gives up a token.
pub(super) async fn hold_slot(
    tx: &Tx<'_>,
    job_id: &str,
    index: usize,
    plugin: &str,
    tokens: Option<f64>,
    now: i64,
) -> Result<()> {
    execute(
        tx,
        "UPDATE phases SET holds_slot = TRUE WHERE job_id = $1 AND idx = $2",
        &[&job_id, &(index as i32)],
    )
    .await?;
    if let Some(tokens) = tokens {
        execute(tx, KEEP_TOKENS, &[&tokens, &now, &plugin]).await?;
    }
    Ok(())
}

fn slots_of(row: &Row) -> PluginSlots {
    PluginSlots {
        plugin: row.get(0),
        max_running: row.get::<_, Option<i32>>(1).map(i64::from),
        bucket: PluginSlots::bucket(row.get(2), row.get(3), row.get(4)),
        running: row.get(5),
    }
}

/// Each limited plugin with waiting jobs.
pub(super) async fn waiting_plugins(db: &impl GenericClient) -> Result<Vec<PluginSlots>> {
    let rows = query(db, WAITING_PLUGINS, &[]).await?;
    Ok(rows.iter().map(slots_of).collect())
}

/// Wakes as many waiting jobs of each of `plugins` as it has room and
/// tokens for at `now`; whether any woke.
pub(super) async fn wake_waiting(tx: &Tx<'_>, plugins: &[PluginSlots], now: i64) -> Result<bool> {
    let mut woken = 0;
    for (plugin, n) in wakeable(plugins, now) {
        woken += execute(tx, WAKE, &[&plugin, &n]).await?;
    }
    Ok(woken > 0)
}

/// When a plugin may next wake waiting jobs.
pub(super) async fn next_plugin_wake(db: &impl GenericClient) -> Result<Option<i64>> {
    Ok(next_wake(&waiting_plugins(db).await?))
}

/// Keeps a plugin's limits in `plugin_limits` as its resources now say
/// (its running phases hold slots from now on); lifting them wakes every
/// job waiting for it. Hosts try their claims
/// again: jobs may wait for room that the change made.
pub(super) async fn set_limits(
    tx: &Tx<'_>,
    scope: &mut WriteScope,
    plugin: &str,
    resources: &PluginResources,
) -> Result<()> {
    if resources.limits_starts() {
        execute(
            tx,
            SET_LIMITS,
            &[
                &plugin,
                &resources.max_running.map(|n| n as i32),
                &resources.per_second,
            ],
        )
        .await?;
        execute(tx, HOLD_SLOTS, &[&plugin]).await?;
    } else {
        execute(tx, LIFT_LIMITS, &[&plugin]).await?;
        execute(tx, WAKE_ALL, &[&plugin]).await?;
    }
    scope.jobs_due = true;
    Ok(())
}

pub(super) async fn loads(db: &impl GenericClient) -> Result<Vec<PluginLoad>> {
    let rows = query(db, LOADS, &[]).await?;
    Ok(rows
        .iter()
        .map(|row| {
            load(
                row.get(0),
                row.get::<_, Option<i32>>(1).map(i64::from),
                row.get(2),
                row.get(3),
                row.get(4),
            )
        })
        .collect())
}

/// Tells every host that jobs wait for `plugin`, whose phase just ended,
/// if any do.
pub(super) async fn slot_freed(db: &impl GenericClient, plugin: &str) -> Result<()> {
    query(
        db,
        &format!(
            "{} WHERE EXISTS (SELECT 1 FROM jobs WHERE status = 'waiting' AND waiting_for = $1)",
            super::log::NOTIFY_JOBS_DUE
        ),
        &[&plugin],
    )
    .await?;
    Ok(())
}
