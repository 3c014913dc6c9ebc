//! Concurrency keys: limits hold, claims go round-robin across keys (the
//! jobs without a key being one more group), and the rotation follows jobs
//! that are cancelled, retried or completed.

use std::collections::HashSet;
use std::sync::Arc;

use jobhost::model::{AfterFailure, ConcurrencyLimits, KeyLoad};
use jobhost::storage::{CancelOutcome, Guarded, NewJob, PhaseFailed, Storage};

use super::{create, done, fresh, job, with_echo};
use crate::fixture::Backend;

fn keyed(id: &str, key: Option<&str>) -> NewJob {
    NewJob {
        concurrency_key: key.map(Into::into),
        ..job(id, 1)
    }
}

fn limits(default: Option<u32>, keys: &[(&str, u32)]) -> ConcurrencyLimits {
    ConcurrencyLimits {
        default,
        keys: keys.iter().map(|&(k, v)| (k.to_owned(), v)).collect(),
        ..ConcurrencyLimits::default()
    }
}

/// The keys of the jobs one claim takes (`-` for none), sorted.
async fn claim_keys(store: &Arc<Storage>, now: i64, want: usize) -> Vec<String> {
    let mut keys: Vec<String> = store
        .claim_due_jobs(now, want)
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.job.concurrency_key.unwrap_or_else(|| "-".into()))
        .collect();
    keys.sort();
    keys
}

/// At most `limit` jobs with a key run at once; a key at its limit is
/// passed over, and when one of its jobs ends (or the limit rises) the next
/// one is claimed. The dispatcher is not woken for a key that has no room.
pub async fn a_keys_limit_holds_until_its_jobs_end(backend: Backend) {
    let (store, _dir) = fresh(backend).await;
    with_echo(&store).await;
    store
        .set_concurrency_limits(limits(None, &[("k", 2)]))
        .await
        .unwrap();
    assert_eq!(
        store.concurrency_limits().await.unwrap(),
        limits(None, &[("k", 2)])
    );
    for i in 0..5 {
        create(&store, keyed(&format!("k-{i}"), Some("k"))).await;
    }
    let claimed = store.claim_due_jobs(2_000, 10).await.unwrap();
    let ids: Vec<&str> = claimed.iter().map(|c| c.job.id.as_str()).collect();
    assert_eq!(ids, ["k-0", "k-1"], "the earliest two, and no more");
    assert!(store.claim_due_jobs(2_000, 10).await.unwrap().is_empty());
    assert_eq!(
        store.next_due_at().await.unwrap(),
        None,
        "nothing a claim could take"
    );
    let (loads, keys) = store.key_loads(10).await.unwrap();
    let load = KeyLoad {
        key: "k".into(),
        running: 2,
        pending: 3,
        limit: Some(2),
        rate: None,
    };
    assert_eq!((loads, keys), (vec![load], 1));

    // A pending job cancelled: the rotation skips it.
    assert_eq!(
        store.cancel_pending_job("k-2", 2_000).await.unwrap(),
        CancelOutcome::Cancelled
    );
    let lease = claimed[0].lease.clone();
    let outcome = store.complete_phase(&lease, done(0, false, 3_000)).await;
    assert!(matches!(outcome.unwrap(), Guarded::Applied(_)));
    assert_eq!(store.next_due_at().await.unwrap(), Some(1_000));
    let next = store.claim_due_jobs(3_000, 10).await.unwrap();
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].job.id, "k-3");

    store
        .set_concurrency_limits(limits(None, &[("k", 3)]))
        .await
        .unwrap();
    let next = store.claim_due_jobs(3_000, 10).await.unwrap();
    assert_eq!(next.len(), 1, "the raised limit applies to a known key");
    assert_eq!(next[0].job.id, "k-4");
    assert!(store.claim_due_jobs(3_000, 10).await.unwrap().is_empty());
    assert_eq!(store.key_loads(10).await.unwrap().0[0].running, 3);
}

/// A store with 8 jobs of key `big`, then 2 of `small` and 2 without a
/// key, all due.
async fn backlog(backend: Backend) -> (Arc<Storage>, crate::fixture::DataDir) {
    let (store, dir) = fresh(backend).await;
    with_echo(&store).await;
    for i in 0..8 {
        create(&store, keyed(&format!("big-{i}"), Some("big"))).await;
    }
    for i in 0..2 {
        create(&store, keyed(&format!("small-{i}"), Some("small"))).await;
        create(&store, keyed(&format!("none-{i}"), None)).await;
    }
    (store, dir)
}

/// A backlog of one key does not fill a claim: claims take one job of each
/// group in turn, the jobs without a key being one group, and a group
/// served goes to the back.
pub async fn claims_go_round_robin_across_keys(backend: Backend) {
    let (store, _dir) = backlog(backend).await;
    assert_eq!(
        claim_keys(&store, 2_000, 6).await,
        ["-", "-", "big", "big", "small", "small"]
    );

    let (store, _dir) = backlog(backend).await;
    let mut order = Vec::new();
    for _ in 0..9 {
        order.extend(claim_keys(&store, 2_000, 1).await);
    }
    assert_eq!(
        order,
        [
            "-", "big", "small", "-", "big", "small", "big", "big", "big"
        ]
    );

    // A higher priority goes first, whatever the turn.
    create(
        &store,
        NewJob {
            priority: 5,
            ..keyed("urgent", Some("small"))
        },
    )
    .await;
    create(&store, keyed("none-2", None)).await;
    assert_eq!(claim_keys(&store, 2_000, 1).await, ["small"]);
}

/// A prefix rule caps each key under it on its own, the default caps keys
/// no rule names, and a key's own rule beats both.
pub async fn prefix_and_default_limits_apply_to_each_key(backend: Backend) {
    let (store, _dir) = fresh(backend).await;
    with_echo(&store).await;
    let rules = limits(Some(1), &[("t-*", 2), ("t-vip", 4)]);
    store.set_concurrency_limits(rules.clone()).await.unwrap();
    assert_eq!(store.concurrency_limits().await.unwrap(), rules);
    for key in ["t-1", "t-2", "t-vip", "other"] {
        for i in 0..5 {
            create(&store, keyed(&format!("{key}-{i}"), Some(key))).await;
        }
    }
    let keys = claim_keys(&store, 2_000, 50).await;
    let count = |key: &str| keys.iter().filter(|k| *k == key).count();
    assert_eq!(
        [count("t-1"), count("t-2"), count("t-vip"), count("other")],
        [2, 2, 4, 1]
    );
    let (loads, total) = store.key_loads(2).await.unwrap();
    assert_eq!(total, 4);
    assert_eq!(loads.len(), 2, "capped to the busiest");
    assert_eq!(loads[0].key, "other", "ties go by name");
}

/// A keyed job that fails and waits to retry comes back into the rotation
/// when it is due again.
pub async fn a_retried_keyed_job_rejoins_the_rotation(backend: Backend) {
    let (store, _dir) = fresh(backend).await;
    with_echo(&store).await;
    create(&store, keyed("job", Some("k"))).await;
    let claimed = store.claim_due_jobs(2_000, 1).await.unwrap().remove(0);
    let failed = PhaseFailed {
        index: 0,
        name: "p0".into(),
        error: "boom".into(),
        usage: None,
        after: AfterFailure::Retry { run_at: 5_000 },
        now: 2_500,
    };
    let outcome = store.fail_phase(&claimed.lease, failed).await.unwrap();
    assert_eq!(outcome, Guarded::Applied(()));
    assert!(store.claim_due_jobs(4_000, 1).await.unwrap().is_empty());
    assert_eq!(store.next_due_at().await.unwrap(), Some(5_000));
    let again = store.claim_due_jobs(5_000, 1).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].job.attempt, 2);
}

/// Claimers at once (on PostgreSQL, on several connections) never run more
/// jobs of a key than its limit.
pub async fn concurrent_claimers_respect_a_keys_limit(backend: Backend) {
    let (store, _dir) = fresh(backend).await;
    with_echo(&store).await;
    store
        .set_concurrency_limits(limits(Some(3), &[]))
        .await
        .unwrap();
    for i in 0..40 {
        create(&store, keyed(&format!("a-{i:02}"), Some("a"))).await;
        create(&store, keyed(&format!("b-{i:02}"), Some("b"))).await;
    }
    let claimers = (0..8).map(|_| {
        let store = store.clone();
        tokio::spawn(async move { store.claim_due_jobs(2_000, 2).await.unwrap() })
    });
    let mut ids = Vec::new();
    for claimer in futures::future::join_all(claimers).await {
        ids.extend(claimer.unwrap().into_iter().map(|c| c.job.id));
    }
    let distinct: HashSet<_> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len(), "a job was claimed twice");
    let of = |key: &str| ids.iter().filter(|id| id.starts_with(key)).count();
    assert_eq!((of("a-"), of("b-")), (3, 3));
}

/// Enqueues racing claims that empty a key never strand the key's jobs:
/// whatever the interleaving (on PostgreSQL, on several connections), every
/// job is claimed in the end.
pub async fn enqueues_racing_claims_never_strand_a_keys_jobs(backend: Backend) {
    let (store, _dir) = fresh(backend).await;
    with_echo(&store).await;
    const SUBMITTERS: usize = 4;
    const EACH: usize = 25;
    let submitters = (0..SUBMITTERS).map(|s| {
        let store = store.clone();
        tokio::spawn(async move {
            for j in 0..EACH {
                create(&store, keyed(&format!("s{s}-{j:02}"), Some("k"))).await;
            }
        })
    });
    let claimers = (0..4).map(|_| {
        let store = store.clone();
        tokio::spawn(async move {
            let mut mine = Vec::new();
            for _ in 0..40 {
                let claimed = store.claim_due_jobs(2_000, 2).await.unwrap();
                mine.extend(claimed.into_iter().map(|c| c.job.id));
                tokio::task::yield_now().await;
            }
            mine
        })
    });
    futures::future::join_all(submitters).await;
    let mut ids = Vec::new();
    for claimer in futures::future::join_all(claimers).await {
        ids.extend(claimer.unwrap());
    }
    loop {
        let claimed = store.claim_due_jobs(2_000, 16).await.unwrap();
        if claimed.is_empty() {
            break;
        }
        ids.extend(claimed.into_iter().map(|c| c.job.id));
    }
    let distinct: HashSet<_> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len(), "a job was claimed twice");
    assert_eq!(ids.len(), SUBMITTERS * EACH, "jobs left unclaimed");
}

/// A key's rate: at most `per_second` of its jobs start a second, in a
/// burst of at most one second's worth; the dispatcher wakes when the next
/// token is due. The rate is resolved like a limit, on its own.
pub async fn a_keys_rate_spaces_its_starts(backend: Backend) {
    let (store, _dir) = fresh(backend).await;
    with_echo(&store).await;
    let rules = ConcurrencyLimits {
        rates: [("k".to_owned(), 2.0)].into(),
        default_rate: Some(0.5),
        ..limits(None, &[("k", 10)])
    };
    store.set_concurrency_limits(rules.clone()).await.unwrap();
    assert_eq!(store.concurrency_limits().await.unwrap(), rules);
    for i in 0..6 {
        create(&store, keyed(&format!("k-{i}"), Some("k"))).await;
    }
    create(&store, keyed("slow-0", Some("slow"))).await;
    create(&store, keyed("slow-1", Some("slow"))).await;
    // A full bucket: two seconds' worth of k (2 tokens), one of slow.
    let mut first = claim_keys(&store, 2_000, 10).await;
    first.sort();
    assert_eq!(first, ["k", "k", "slow"]);
    assert!(store.claim_due_jobs(2_000, 10).await.unwrap().is_empty());
    assert_eq!(
        store.next_due_at().await.unwrap(),
        Some(2_500),
        "k's next token"
    );
    assert!(store.claim_due_jobs(2_400, 10).await.unwrap().is_empty());
    assert_eq!(claim_keys(&store, 2_500, 10).await, ["k"]);
    // A second later: two more tokens, never more than a second's worth.
    assert_eq!(claim_keys(&store, 9_000, 10).await, ["k", "k", "slow"]);
    let (loads, _) = store.key_loads(10).await.unwrap();
    let k = loads.iter().find(|load| load.key == "k").unwrap();
    assert_eq!((k.limit, k.rate), (Some(10), Some(2.0)));
}

/// A key whose jobs all ran keeps its turn, so that it comes back before
/// a key served since; the sweep forgets it once it has no pending or
/// running job, and it then rejoins at the back.
pub async fn idle_keys_keep_their_turn_until_forgotten(backend: Backend) {
    let (store, _dir) = fresh(backend).await;
    with_echo(&store).await;
    let claim_one = |now: i64| {
        let store = store.clone();
        async move {
            let mut claimed = store.claim_due_jobs(now, 1).await.unwrap();
            assert_eq!(claimed.len(), 1, "one job claimed at {now}");
            claimed.remove(0)
        }
    };
    let complete = |claimed: jobhost::storage::Claimed, now: i64| {
        let store = store.clone();
        async move {
            let outcome = store
                .complete_phase(&claimed.lease, done(0, false, now))
                .await;
            assert!(matches!(outcome.unwrap(), Guarded::Applied(_)));
        }
    };
    create(&store, keyed("a-0", Some("a"))).await;
    create(&store, keyed("b-0", Some("b"))).await;
    create(&store, keyed("b-1", Some("b"))).await;
    let a0 = claim_one(2_000).await;
    assert_eq!(a0.job.id, "a-0", "keys that joined together go by name");
    assert_eq!(
        store.forget_idle_keys().await.unwrap(),
        0,
        "a runs a job, b has some pending"
    );
    complete(a0, 3_000).await;
    let b0 = claim_one(3_000).await;
    assert_eq!(b0.job.id, "b-0");

    // a was idle, and comes back before b, which was served since.
    create(&store, keyed("a-1", Some("a"))).await;
    let a1 = claim_one(4_000).await;
    assert_eq!(a1.job.id, "a-1");
    complete(a1, 5_000).await;
    complete(b0, 5_000).await;
    assert_eq!(store.forget_idle_keys().await.unwrap(), 1, "a, not b");

    // Forgotten, a joins at the back.
    create(&store, keyed("a-2", Some("a"))).await;
    assert_eq!(claim_one(6_000).await.job.id, "b-1");
}
