//! Schedules: stored, replaced, paused and deleted with their events, and
//! fired once per tick, guarded by the tick, however many fire at once.

use std::sync::Arc;

use jobhost::model::event::{ScheduleChange, ScheduleChanged, ScheduleFired, SkipReason};
use jobhost::model::{
    CatchUp, EventBody, EventKind, JobSpec, JobStatus, Overlap, PhaseSpec, Schedule, ScheduleSpec,
    WebhookSpec,
};
use jobhost::storage::{EventFilter, Fire, FireAction, Fired, NewSchedule, ScheduleWrite, Storage};

use super::{fresh, job, with_echo};
use crate::fixture::Backend;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn spec(name: &str) -> ScheduleSpec {
    ScheduleSpec {
        name: name.into(),
        cron: "0 * * * *".into(),
        timezone: "Europe/Berlin".into(),
        job: JobSpec {
            phases: vec![PhaseSpec {
                name: "p0".into(),
                plugin: "echo".into(),
                ..PhaseSpec::default()
            }],
            webhook: Some(WebhookSpec {
                url: "http://127.0.0.1:9/hook".into(),
                secret: None,
            }),
            ..JobSpec::default()
        },
        overlap: Overlap::Skip,
        catch_up: CatchUp::One,
        catch_up_limit: 10,
        paused: false,
    }
}

fn new(name: &str, next_tick: i64, now: i64) -> NewSchedule {
    NewSchedule {
        spec: spec(name),
        webhook_secret: Some(SECRET.into()),
        next_tick,
        now,
    }
}

fn stored(written: ScheduleWrite) -> Schedule {
    match written {
        ScheduleWrite::Stored(schedule) => *schedule,
        other => panic!("not stored: {other:?}"),
    }
}

/// Fires `tick` of `name` (moving it to `following`), enqueueing a job
/// made from its template (whose webhook has no secret: storage adds the
/// schedule's).
fn enqueue(name: &str, id: &str, tick: Option<(i64, i64)>, now: i64) -> Fire {
    let job = jobhost::storage::NewJob {
        webhook_url: Some("http://127.0.0.1:9/hook".into()),
        ..job(id, 1)
    };
    Fire {
        schedule: name.into(),
        tick,
        action: FireAction::Enqueue {
            job: Box::new(job),
            skip_if_unfinished: true,
        },
        now,
    }
}

async fn schedule_events(store: &Arc<Storage>, kind: EventKind) -> Vec<EventBody> {
    let filter = EventFilter {
        job_id: None,
        kinds: vec![kind],
    };
    let events = store.events_after(0, filter, 100).await.unwrap();
    events.into_iter().map(|event| event.body).collect()
}

pub async fn a_schedule_is_stored_replaced_paused_and_deleted(backend: Backend) {
    let (store, _dir) = fresh(backend).await;
    let created = stored(
        store
            .create_schedule(new("hourly", 3_600_000, 10), 2)
            .await
            .unwrap(),
    );
    assert_eq!(created.name, "hourly");
    assert_eq!(created.timezone, "Europe/Berlin");
    assert_eq!(created.next_tick, 3_600_000);
    assert_eq!((created.created_at, created.updated_at), (10, 10));
    assert!(!created.paused && created.last_fire.is_none());
    assert_eq!(
        created.job.webhook.as_ref().unwrap().secret,
        None,
        "a webhook secret is never read back"
    );
    assert_eq!(
        store.schedule("hourly").await.unwrap(),
        Some(created.clone())
    );
    assert_eq!(
        store
            .create_schedule(new("hourly", 1, 11), 2)
            .await
            .unwrap(),
        ScheduleWrite::Exists
    );
    stored(
        store
            .create_schedule(new("daily", 7_200_000, 12), 2)
            .await
            .unwrap(),
    );
    assert_eq!(
        store.create_schedule(new("third", 1, 13), 2).await.unwrap(),
        ScheduleWrite::OverLimit { limit: 2 }
    );
    let names: Vec<_> = store
        .schedules()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["daily", "hourly"]);
    assert_eq!(store.next_schedule_tick().await.unwrap(), Some(3_600_000));

    let mut replacement = new("hourly", 5_400_000, 20);
    replacement.spec.cron = "30 * * * *".into();
    let replaced = stored(store.replace_schedule(replacement).await.unwrap());
    assert_eq!(replaced.cron, "30 * * * *");
    assert_eq!(
        (replaced.next_tick, replaced.created_at, replaced.updated_at),
        (5_400_000, 10, 20)
    );
    assert_eq!(
        store.replace_schedule(new("nope", 1, 21)).await.unwrap(),
        ScheduleWrite::NotFound
    );

    let paused = stored(
        store
            .set_schedule_paused("hourly", true, 0, 30)
            .await
            .unwrap(),
    );
    assert!(paused.paused);
    assert_eq!(
        paused.next_tick, 5_400_000,
        "pausing keeps the tick, to show"
    );
    assert_eq!(store.next_schedule_tick().await.unwrap(), Some(7_200_000));
    assert!(
        store
            .due_schedules(i64::MAX)
            .await
            .unwrap()
            .iter()
            .all(|s| s.name != "hourly")
    );
    let resumed = stored(
        store
            .set_schedule_paused("hourly", false, 9_000_000, 40)
            .await
            .unwrap(),
    );
    assert!(!resumed.paused);
    assert_eq!(
        resumed.next_tick, 9_000_000,
        "resuming moves the tick past the pause"
    );
    assert_eq!(
        store
            .set_schedule_paused("nope", true, 0, 41)
            .await
            .unwrap(),
        ScheduleWrite::NotFound
    );

    assert!(store.delete_schedule("hourly", 50).await.unwrap());
    assert!(!store.delete_schedule("hourly", 51).await.unwrap());
    assert_eq!(store.schedule("hourly").await.unwrap(), None);
    let changes: Vec<_> = schedule_events(&store, EventKind::ScheduleChanged)
        .await
        .into_iter()
        .map(|body| match body {
            EventBody::ScheduleChanged(ScheduleChanged { schedule, change }) => (schedule, change),
            other => panic!("{other:?}"),
        })
        .collect();
    let hourly = |change| ("hourly".to_owned(), change);
    assert_eq!(
        changes,
        [
            hourly(ScheduleChange::Created),
            ("daily".to_owned(), ScheduleChange::Created),
            hourly(ScheduleChange::Replaced),
            hourly(ScheduleChange::Paused),
            hourly(ScheduleChange::Resumed),
            hourly(ScheduleChange::Deleted),
        ]
    );
}

pub async fn a_tick_fires_once_and_moves_the_schedule_on(backend: Backend) {
    let (store, _dir) = fresh(backend).await;
    with_echo(&store).await;
    stored(
        store
            .create_schedule(new("hourly", 1_000, 0), 10)
            .await
            .unwrap(),
    );
    assert_eq!(store.due_schedules(999).await.unwrap(), vec![]);
    assert_eq!(store.due_schedules(1_000).await.unwrap().len(), 1);

    let fired = store
        .fire_schedule(enqueue("hourly", "j1", Some((1_000, 2_000)), 1_005))
        .await
        .unwrap();
    let Fired::Enqueued {
        job: first,
        previous,
    } = fired
    else {
        panic!("not enqueued: {fired:?}");
    };
    assert_eq!((first.id.as_str(), previous), ("j1", None));
    let after = store.schedule("hourly").await.unwrap().unwrap();
    assert_eq!(after.next_tick, 2_000);
    let last = after.last_fire.unwrap();
    assert_eq!(
        (last.tick, last.at, last.job_id.as_str()),
        (Some(1_000), 1_005, "j1")
    );
    assert_eq!(last.job_status, Some(JobStatus::Pending));
    assert_eq!(
        schedule_events(&store, EventKind::ScheduleFired).await,
        [EventBody::ScheduleFired(ScheduleFired {
            schedule: "hourly".into(),
            job_id: "j1".into(),
            tick: Some(1_000),
        })]
    );

    // The same tick again (a second host, a retry after a lost reply):
    // the guard finds it moved, and nothing is stored.
    let again = enqueue("hourly", "j1-again", Some((1_000, 2_000)), 1_006);
    assert_eq!(store.fire_schedule(again).await.unwrap(), Fired::Moved);
    assert_eq!(store.job("j1-again").await.unwrap(), None);

    // Overlap: the next tick finds j1 unfinished and skips.
    let overlapping = enqueue("hourly", "j2", Some((2_000, 3_000)), 2_001);
    assert_eq!(
        store.fire_schedule(overlapping).await.unwrap(),
        Fired::Skipped(SkipReason::Overlap)
    );
    assert_eq!(store.job("j2").await.unwrap(), None);
    assert_eq!(
        store.schedule("hourly").await.unwrap().unwrap().next_tick,
        3_000
    );

    // The job ends: its webhook carries the schedule's secret.
    store.cancel_pending_job("j1", 2_500).await.unwrap();
    let delivery = store.due_webhooks(i64::MAX, 10).await.unwrap().remove(0);
    assert_eq!(
        (delivery.job_id.as_str(), delivery.secret.as_deref()),
        ("j1", Some(SECRET))
    );

    // With j1 finished, the next tick enqueues, and says j1 is not running.
    let next = store
        .fire_schedule(enqueue("hourly", "j3", Some((3_000, 4_000)), 3_001))
        .await
        .unwrap();
    assert!(
        matches!(next, Fired::Enqueued { previous: None, .. }),
        "{next:?}"
    );

    // Allowed overlap reports the unfinished previous job (for
    // `cancel_previous`); a trigger by hand moves no tick.
    let by_hand = Fire {
        action: FireAction::Enqueue {
            job: Box::new(job("j4", 1)),
            skip_if_unfinished: false,
        },
        ..enqueue("hourly", "j4", None, 3_500)
    };
    let triggered = store.fire_schedule(by_hand).await.unwrap();
    assert!(
        matches!(&triggered, Fired::Enqueued { previous: Some(p), .. } if p == "j3"),
        "{triggered:?}"
    );
    let after = store.schedule("hourly").await.unwrap().unwrap();
    assert_eq!(after.next_tick, 4_000);
    assert_eq!(after.last_fire.unwrap().tick, None);

    // A run of missed ticks skipped at once, and a template whose plugin is
    // gone: both move the tick and say why.
    let missed = Fire {
        schedule: "hourly".into(),
        tick: Some((4_000, 9_000)),
        action: FireAction::Skip {
            reason: SkipReason::Missed,
            message: "missed".into(),
            until: Some(8_000),
        },
        now: 8_500,
    };
    assert_eq!(
        store.fire_schedule(missed).await.unwrap(),
        Fired::Skipped(SkipReason::Missed)
    );
    let mut unknown = job("j5", 1);
    unknown.phases[0].plugin = "gone".into();
    let invalid = Fire {
        action: FireAction::Enqueue {
            job: Box::new(unknown),
            skip_if_unfinished: false,
        },
        ..enqueue("hourly", "j5", Some((9_000, 10_000)), 9_001)
    };
    assert_eq!(
        store.fire_schedule(invalid).await.unwrap(),
        Fired::Skipped(SkipReason::InvalidJob)
    );
    assert_eq!(store.job("j5").await.unwrap(), None);
    let skipped: Vec<_> = schedule_events(&store, EventKind::ScheduleSkipped)
        .await
        .into_iter()
        .map(|body| match body {
            EventBody::ScheduleSkipped(s) => (s.tick, s.until, s.reason),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        skipped,
        [
            (2_000, None, SkipReason::Overlap),
            (4_000, Some(8_000), SkipReason::Missed),
            (9_000, None, SkipReason::InvalidJob),
        ]
    );

    // A paused schedule's tick does not fire.
    store
        .set_schedule_paused("hourly", true, 0, 9_500)
        .await
        .unwrap();
    let paused = enqueue("hourly", "j6", Some((10_000, 11_000)), 10_001);
    assert_eq!(store.fire_schedule(paused).await.unwrap(), Fired::Moved);
}

/// Hosts reaching one tick at once: one of them enqueues, the others
/// find the tick moved.
pub async fn hosts_firing_one_tick_at_once_enqueue_one_job(backend: Backend) {
    let (store, _dir) = fresh(backend).await;
    with_echo(&store).await;
    stored(
        store
            .create_schedule(new("hourly", 1_000, 0), 10)
            .await
            .unwrap(),
    );
    let fires = (0..8).map(|i| {
        let store = store.clone();
        tokio::spawn(async move {
            let fire = enqueue("hourly", &format!("host-{i}"), Some((1_000, 2_000)), 1_001);
            store.fire_schedule(fire).await.unwrap()
        })
    });
    let outcomes: Vec<_> = futures::future::join_all(fires)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let enqueued = outcomes
        .iter()
        .filter(|o| matches!(o, Fired::Enqueued { .. }))
        .count();
    assert_eq!(enqueued, 1, "{outcomes:?}");
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, Fired::Enqueued { .. } | Fired::Moved))
    );
    assert_eq!(
        schedule_events(&store, EventKind::ScheduleFired)
            .await
            .len(),
        1
    );
    let page = store
        .jobs(jobhost::storage::JobFilter {
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.jobs.len(), 1);
}
