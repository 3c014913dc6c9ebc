//! Per-plugin limits in storage: at most `max_running` phases of a plugin
//! run at once, and at most `per_second` start each second, on every host
//! together. What both backends share.
//!
//! A plugin with a limit or a rate has a row in `plugin_limits` (with its
//! token bucket); other plugins have none, and their phases start as
//! before, inside the claim or the completion of the phase before. A phase
//! of a limited plugin starts only through `start_phase`, which counts the
//! plugin's running phases that hold a slot (from their state, through an
//! index of those phases: never a counter), takes a token, and starts the
//! phase holding a slot, in one write; on PostgreSQL, under the lock of
//! the plugin's row, so that starts on any host follow one another. A phase that finds the plugin full does not
//! hold its worker: its job goes to `waiting`, in `jobs_waiting` by
//! plugin. Each claim first wakes (back to pending) as many waiting jobs of
//! each plugin as it has room and tokens for, by priority then age; a
//! worker whose limited phase ended wakes its dispatcher (and, on a shared
//! database, every host), and a plugin whose next token is due sets the
//! dispatcher's timer. A woken job is claimed as any other (its key's limit
//! and turn hold), and starts its phase through `start_phase` again, which
//! is the only check that counts.

use super::concurrency::Bucket;
use crate::model::PluginLoad;

/// Each limited plugin with waiting jobs: its limit, rate and bucket, and
/// how many of its phases run. The same on both backends.
///
/// A running phase of a limited plugin holds a slot (`holds_slot`): the
/// phases `start_phase` starts, and those already running when the limit
/// was set ([`HOLD_SLOTS`]). Phases of plugins without limits never hold
/// one, so they stay out of the index that counts them.
pub(super) const WAITING_PLUGINS: &str = "
    SELECT l.plugin, l.max_running, l.per_second, l.tokens, l.refilled_at,
           (SELECT COUNT(*) FROM phases p WHERE p.plugin = l.plugin AND p.status = 'running' AND p.holds_slot)
    FROM plugin_limits l
    WHERE EXISTS (SELECT 1 FROM jobs j WHERE j.status = 'waiting' AND j.waiting_for = l.plugin)";

/// Wakes up to `$2` waiting jobs of plugin `$1`, by priority then age. The
/// outer status check keeps a job that another writer moved meanwhile.
/// (SQLite numbers `$n` parameters in the order they first appear.)
pub(super) const WAKE: &str = "
    UPDATE jobs SET status = 'pending', waiting_for = NULL
    WHERE status = 'waiting' AND id IN (
        SELECT id FROM jobs WHERE status = 'waiting' AND waiting_for = $1
        ORDER BY priority DESC, run_at, id LIMIT $2)";

/// Wakes every waiting job of plugin `$1` (its limits were lifted).
pub(super) const WAKE_ALL: &str = "
    UPDATE jobs SET status = 'pending', waiting_for = NULL
    WHERE status = 'waiting' AND waiting_for = $1";

/// Sets plugin `$1`'s limit (`$2`) and rate (`$3`), keeping its bucket.
pub(super) const SET_LIMITS: &str = "
    INSERT INTO plugin_limits (plugin, max_running, per_second) VALUES ($1, $2, $3)
    ON CONFLICT (plugin) DO UPDATE SET max_running = excluded.max_running,
                                       per_second = excluded.per_second";

/// Lifts plugin `$1`'s limits (then [`WAKE_ALL`]).
pub(super) const LIFT_LIMITS: &str = "DELETE FROM plugin_limits WHERE plugin = $1";

/// Writes back plugin `$3`'s bucket (`$1` tokens at `$2`) after a start.
/// (The parameters go in the order they appear: SQLite numbers `$n` so.)
pub(super) const KEEP_TOKENS: &str =
    "UPDATE plugin_limits SET tokens = $1, refilled_at = $2 WHERE plugin = $3";

/// Marks the running phases of plugin `$1` as holding slots: a limit just
/// set counts them. (A scan of the plugin's phases, once per change.)
pub(super) const HOLD_SLOTS: &str = "
    UPDATE phases SET holds_slot = TRUE WHERE plugin = $1 AND status = 'running'";

/// Counts the running phases of plugin `$1` that hold a slot.
pub(super) const SLOTS_HELD: &str =
    "SELECT COUNT(*) FROM phases WHERE plugin = $1 AND status = 'running' AND holds_slot";

/// The load of every limited plugin, by name.
pub(super) const LOADS: &str = "
    SELECT l.plugin, l.max_running, l.per_second,
           (SELECT COUNT(*) FROM phases p WHERE p.plugin = l.plugin AND p.status = 'running' AND p.holds_slot),
           (SELECT COUNT(*) FROM jobs j WHERE j.status = 'waiting' AND j.waiting_for = l.plugin)
    FROM plugin_limits l ORDER BY l.plugin";

/// A limited plugin as a start sees it: its limit, its bucket, and how many
/// of its phases run.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct PluginSlots {
    pub plugin: String,
    pub max_running: Option<i64>,
    pub bucket: Option<Bucket>,
    pub running: i64,
}

impl PluginSlots {
    /// A row's bucket columns as a bucket (none without a rate).
    pub fn bucket(
        per_second: Option<f64>,
        tokens: Option<f64>,
        refilled_at: Option<i64>,
    ) -> Option<Bucket> {
        per_second.map(|per_second| Bucket {
            per_second,
            tokens,
            refilled_at,
        })
    }

    /// How many more phases may start at `now`: its room, and its whole
    /// tokens (`i64::MAX` for no bound).
    pub fn starts_allowed(&self, now: i64) -> i64 {
        let room = self
            .max_running
            .map_or(i64::MAX, |max| (max - self.running).max(0));
        let tokens = self
            .bucket
            .map_or(i64::MAX, |bucket| bucket.tokens_at(now).floor() as i64);
        room.min(tokens)
    }

    /// Takes a start at `now`, if one is allowed: the tokens left in the
    /// bucket to write back (none without a rate).
    pub fn take(&self, now: i64) -> Option<Option<f64>> {
        (self.starts_allowed(now) > 0)
            .then(|| self.bucket.map(|bucket| bucket.tokens_at(now) - 1.0))
    }

    /// When its waiting jobs may be woken, by its row: at its next token
    /// if its bucket was empty then, else at once (0); never while it is
    /// full (a phase that ends wakes them).
    pub fn wakes_at(&self) -> Option<i64> {
        if self.max_running.is_some_and(|max| self.running >= max) {
            return None;
        }
        Some(
            self.bucket
                .and_then(|bucket| bucket.next_token_at())
                .unwrap_or(0),
        )
    }
}

/// The plugins that may wake waiting jobs at `now`, with how many each.
pub(super) fn wakeable(plugins: &[PluginSlots], now: i64) -> Vec<(&str, i64)> {
    plugins
        .iter()
        .map(|slots| (slots.plugin.as_str(), slots.starts_allowed(now)))
        .filter(|&(_, n)| n > 0)
        .collect()
}

/// When the first of `plugins` may wake waiting jobs.
pub(super) fn next_wake(plugins: &[PluginSlots]) -> Option<i64> {
    plugins.iter().filter_map(PluginSlots::wakes_at).min()
}

/// A row of [`LOADS`].
pub(super) fn load(
    plugin: String,
    max_running: Option<i64>,
    per_second: Option<f64>,
    running: i64,
    waiting: i64,
) -> PluginLoad {
    PluginLoad {
        plugin,
        running: running as u64,
        waiting: waiting as u64,
        max_running: max_running.map(|n| n as u32),
        per_second,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots(max_running: Option<i64>, running: i64, bucket: Option<Bucket>) -> PluginSlots {
        PluginSlots {
            plugin: "p".into(),
            max_running,
            bucket,
            running,
        }
    }

    #[test]
    fn starts_are_bounded_by_room_and_tokens() {
        assert_eq!(slots(Some(3), 1, None).starts_allowed(0), 2);
        assert_eq!(
            slots(Some(3), 4, None).starts_allowed(0),
            0,
            "over after a change"
        );
        let empty = Bucket {
            per_second: 2.0,
            tokens: Some(0.0),
            refilled_at: Some(1_000),
        };
        let limited = slots(Some(3), 0, Some(empty));
        assert_eq!(limited.starts_allowed(1_000), 0);
        assert_eq!(limited.take(1_000), None);
        assert_eq!(limited.wakes_at(), Some(1_500), "at the next token");
        assert_eq!(limited.starts_allowed(1_500), 1);
        assert_eq!(limited.take(1_500), Some(Some(0.0)));
        assert_eq!(
            slots(None, 9, None).take(0),
            Some(None),
            "no rate: no tokens"
        );
        assert_eq!(
            slots(Some(1), 1, None).wakes_at(),
            None,
            "full: a phase end wakes"
        );
        assert_eq!(slots(Some(2), 1, None).wakes_at(), Some(0), "room: at once");
    }
}
