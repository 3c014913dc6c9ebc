//! Concurrency keys in storage: the operator's limits, and the claim
//! rotation that both backends follow.
//!
//! Jobs without a key are claimed as before, from the due index, which no
//! longer holds keyed jobs: when nobody uses keys, a claim costs what it
//! did. Keyed jobs are claimed through `concurrency_keys`, one row per key
//! with pending jobs (kept by triggers: a keyed job that becomes pending,
//! anywhere, puts its key there). A row holds the key's earliest due time
//! and best priority (bounds: a claim that finds them stale refreshes
//! them), its limit, and its turn.
//!
//! When a key is ready, a claim goes round-robin ([`take_turns`]): the
//! highest priority first, and among groups whose next job has the same
//! priority, the group served least recently, which then goes to the back.
//! The jobs without a key are one group among them. A new key starts at
//! the back; a key whose jobs all ran keeps its row, and its turn, until a
//! sweep forgets idle keys (every minute), so that a key that comes and
//! goes is not sent to the back each time. A key at its limit is
//! passed over without reading its backlog: the running count comes from
//! the jobs' state (an index of running keyed jobs), never from a counter,
//! so it holds across restarts, crashes and hosts.

use std::collections::VecDeque;

use async_trait::async_trait;

use super::Result;
use crate::model::{ConcurrencyLimits, KeyLoad, PluginLoad};

/// The limits of concurrency keys, how busy the busiest keys are, and how
/// busy the plugins with limits are (`storage::plugin_limits`; the limits
/// themselves are a plugin's resources).
#[async_trait]
pub trait ConcurrencyStore: Send + Sync {
    /// Replaces the limits, and applies them to the keys that have jobs.
    async fn set_concurrency_limits(&self, limits: ConcurrencyLimits) -> Result<()>;

    async fn concurrency_limits(&self) -> Result<ConcurrencyLimits>;

    /// Takes out of the rotation the keys with no pending or running job;
    /// returns how many. An idle key keeps its turn until then, so that a
    /// key that comes back soon is served before a key that never paused.
    async fn forget_idle_keys(&self) -> Result<u64>;

    /// The `shown` keys with the most pending and running jobs, busiest
    /// first, and how many keys have such jobs.
    async fn key_loads(&self, shown: usize) -> Result<(Vec<KeyLoad>, u64)>;

    /// Every plugin with a limit or a rate: its running phases and waiting
    /// jobs.
    async fn plugin_loads(&self) -> Result<Vec<PluginLoad>>;

    /// A phase of `plugin`, which has limits, ended: hosts that share the
    /// database are told, if jobs wait for the plugin, so that their
    /// claims wake them. (A database one host owns needs no telling: that
    /// host's worker wakes its dispatcher.)
    async fn plugin_slot_freed(&self, plugin: &str) -> Result<()>;
}

/// A key's limit (`max_running`) or rate (`per_second`), as an SQL
/// expression over the `concurrency_limits` rules (the same on both
/// backends): the key's own rule that sets it, else its longest prefix rule
/// that does (the default is the empty prefix); NULL is none.
macro_rules! rule_of {
    ($column:literal, $key:literal) => {
        concat!(
            "(SELECT l.",
            $column,
            " FROM concurrency_limits l WHERE l.",
            $column,
            " IS NOT NULL AND ((NOT l.prefix AND l.pattern = ",
            $key,
            ") OR (l.prefix AND substr(",
            $key,
            ", 1, length(l.pattern)) = l.pattern))
              ORDER BY l.prefix, length(l.pattern) DESC LIMIT 1)"
        )
    };
}
pub(super) use rule_of;

/// Gives every key row the limit and rate the rules now set.
pub(super) const APPLY_LIMITS: &str = concat!(
    "UPDATE concurrency_keys SET max_running = ",
    rule_of!("max_running", "concurrency_keys.key"),
    ", per_second = ",
    rule_of!("per_second", "concurrency_keys.key")
);

/// A key's rate as a token bucket: `per_second` tokens a second, holding at
/// most one second's worth (and at least one); full until first used.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Bucket {
    pub per_second: f64,
    pub tokens: Option<f64>,
    pub refilled_at: Option<i64>,
}

impl Bucket {
    fn burst(&self) -> f64 {
        self.per_second.max(1.0)
    }

    /// The tokens it holds at `now` (Unix ms).
    pub fn tokens_at(&self, now: i64) -> f64 {
        match (self.tokens, self.refilled_at) {
            (Some(tokens), Some(at)) => {
                let earned = (now - at).max(0) as f64 * self.per_second / 1000.0;
                (tokens + earned).min(self.burst())
            }
            _ => self.burst(),
        }
    }

    /// When it next holds a whole token, if it holds none now.
    pub fn next_token_at(&self) -> Option<i64> {
        match (self.tokens, self.refilled_at) {
            (Some(tokens), Some(at)) if tokens < 1.0 => {
                Some(at + ((1.0 - tokens) * 1000.0 / self.per_second).ceil() as i64)
            }
            _ => None,
        }
    }
}

/// Deletes the rows of keys with no pending or running job.
pub(super) const FORGET_IDLE_KEYS: &str = "DELETE FROM concurrency_keys
     WHERE ready_at IS NULL
       AND NOT EXISTS (SELECT 1 FROM jobs WHERE jobs.concurrency_key = concurrency_keys.key
                                            AND jobs.status IN ('pending', 'running', 'waiting'))";

/// Running keyed jobs, per key.
pub(super) const RUNNING_PER_KEY: &str = "SELECT concurrency_key, COUNT(*) FROM jobs
     WHERE status = 'running' AND concurrency_key IS NOT NULL GROUP BY concurrency_key";

/// Pending keyed jobs, per key.
pub(super) const PENDING_PER_KEY: &str = "SELECT concurrency_key, COUNT(*) FROM jobs
     WHERE status = 'pending' AND concurrency_key IS NOT NULL GROUP BY concurrency_key";

/// The busiest `shown` keys of the counts per key, and how many keys there
/// are; limits from `limits`.
pub(super) fn busiest(
    running: Vec<(String, i64)>,
    pending: Vec<(String, i64)>,
    limits: &ConcurrencyLimits,
    shown: usize,
) -> (Vec<KeyLoad>, u64) {
    let mut loads = std::collections::BTreeMap::<String, (u64, u64)>::new();
    for (key, count) in running {
        loads.entry(key).or_default().0 = count as u64;
    }
    for (key, count) in pending {
        loads.entry(key).or_default().1 = count as u64;
    }
    let keys = loads.len() as u64;
    let mut loads: Vec<KeyLoad> = loads
        .into_iter()
        .map(|(key, (running, pending))| KeyLoad {
            limit: limits.limit_of(&key),
            rate: limits.rate_of(&key),
            key,
            running,
            pending,
        })
        .collect();
    loads.sort_by(|a, b| {
        (b.running + b.pending)
            .cmp(&(a.running + a.pending))
            .then_with(|| a.key.cmp(&b.key))
    });
    loads.truncate(shown);
    (loads, keys)
}

/// A group in the claim rotation: one key's due jobs, or those of the jobs
/// without a key (`key: None`), in the order the group would claim them.
#[derive(Debug)]
pub(super) struct Group {
    pub key: Option<String>,
    pub turn: i64,
    /// (job id, priority).
    pub due: VecDeque<(String, i32)>,
    /// The tokens in the key's bucket now, if it has a rate (the caller
    /// read no more due jobs than it may start).
    pub tokens: Option<f64>,
}

/// A group a claim served: its new turn, and the tokens left in its
/// bucket.
#[derive(Debug, PartialEq)]
pub(super) struct Served {
    pub key: Option<String>,
    pub turn: i64,
    pub tokens: Option<f64>,
}

/// What a claim takes from the rotation.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Turns {
    /// The jobs to claim, in claim order.
    pub ids: Vec<String>,
    pub served: Vec<Served>,
    /// The turn a key joining the rotation from now on gets: after every
    /// turn handed out.
    pub next_turn: i64,
}

/// Takes up to `want` of the groups' jobs, one at a time: the highest
/// priority first, and among groups whose next job has that priority, the
/// one with the lowest turn, which then goes to the back of the rotation:
/// after `next_turn` too, the turn of keys that joined since the last
/// claim, which waited longer.
pub(super) fn take_turns(mut groups: Vec<Group>, want: usize, next_turn: i64) -> Turns {
    let mut turns = Turns::default();
    let mut next_turn = next_turn + 1;
    while turns.ids.len() < want {
        let Some(group) = groups
            .iter_mut()
            .filter(|g| !g.due.is_empty())
            .min_by_key(|g| (-g.due[0].1, g.turn))
        else {
            break;
        };
        let (id, _) = group.due.pop_front().expect("not empty");
        turns.ids.push(id);
        group.turn = next_turn;
        next_turn += 1;
        if let Some(tokens) = &mut group.tokens {
            *tokens -= 1.0;
        }
        let served = Served {
            key: group.key.clone(),
            turn: group.turn,
            tokens: group.tokens,
        };
        match turns.served.iter_mut().find(|s| s.key == group.key) {
            Some(earlier) => *earlier = served,
            None => turns.served.push(served),
        }
    }
    turns.next_turn = next_turn;
    turns
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(key: Option<&str>, turn: i64, jobs: &[(&str, i32)]) -> Group {
        Group {
            key: key.map(Into::into),
            turn,
            due: jobs.iter().map(|&(id, p)| (id.to_owned(), p)).collect(),
            tokens: None,
        }
    }

    #[test]
    fn claims_go_round_robin_within_a_priority() {
        let groups = vec![
            group(
                Some("big"),
                1,
                &[("b1", 0), ("b2", 0), ("b3", 0), ("b4", 0)],
            ),
            group(Some("small"), 5, &[("s1", 0)]),
            group(None, 3, &[("u1", 0), ("u2", 0)]),
        ];
        let mut groups = groups;
        groups[0].tokens = Some(4.5);
        let turns = take_turns(groups, 6, 10);
        assert_eq!(turns.ids, ["b1", "u1", "s1", "b2", "u2", "b3"]);
        let served = |key: Option<&str>, turn, tokens| Served {
            key: key.map(Into::into),
            turn,
            tokens,
        };
        assert_eq!(
            turns.served,
            [
                served(Some("big"), 16, Some(1.5)),
                served(None, 15, None),
                served(Some("small"), 13, None)
            ]
        );
        assert_eq!(turns.next_turn, 17, "after every turn handed out");
    }

    #[test]
    fn a_higher_priority_goes_first_whatever_the_turn() {
        let groups = vec![
            group(Some("a"), 1, &[("a1", 0)]),
            group(Some("b"), 9, &[("b1", 5), ("b2", 0)]),
        ];
        assert_eq!(take_turns(groups, 3, 10).ids, ["b1", "a1", "b2"]);
    }

    /// A key that joined since the last claim holds `next_turn`; a group
    /// served now goes after it, whatever its turn was.
    #[test]
    fn a_key_that_joined_waits_less_than_one_served_again() {
        let groups = vec![
            group(Some("served"), 3, &[("s1", 0), ("s2", 0)]),
            group(Some("joined"), 10, &[("j1", 0)]),
        ];
        assert_eq!(take_turns(groups, 3, 10).ids, ["s1", "j1", "s2"]);
    }

    #[test]
    fn a_bucket_holds_a_seconds_worth_and_refills() {
        let fresh = Bucket {
            per_second: 2.0,
            tokens: None,
            refilled_at: None,
        };
        assert_eq!(fresh.tokens_at(0), 2.0, "full until first used");
        let used = Bucket {
            tokens: Some(0.0),
            refilled_at: Some(1_000),
            ..fresh
        };
        assert_eq!(used.tokens_at(1_250), 0.5);
        assert_eq!(
            used.tokens_at(9_000),
            2.0,
            "never more than a second's worth"
        );
        assert_eq!(used.next_token_at(), Some(1_500));
        let slow = Bucket {
            per_second: 0.5,
            ..used
        };
        assert_eq!(slow.tokens_at(9_000), 1.0, "at least one");
        assert_eq!(slow.next_token_at(), Some(3_000));
    }
}
