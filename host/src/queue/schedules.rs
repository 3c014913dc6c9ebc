//! Schedules: checking a definition, and the timer that fires them. Each
//! host runs the timer; the fire's guard (see `storage::ScheduleStore`)
//! makes one of them win each tick. A host learns of schedules changed
//! elsewhere from the event log, and re-reads the next tick at least every
//! [`SAFETY_NET`].

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;

use super::{QueueConfig, QueueError, Shared, enqueue};
use crate::events::{KindSet, Topic};
use crate::model::event::SkipReason;
use crate::model::schedule::{MAX_CATCH_UP_LIMIT, MISSED_AFTER_MS, check_schedule_name};
use crate::model::{CatchUp, EventKind, Job, Overlap, Recurrence, Schedule, ScheduleSpec};
use crate::storage::{CancelOutcome, Fire, FireAction, Fired, NewSchedule, ScheduleWrite};

/// Longest the timer sleeps before reading the next tick again.
const SAFETY_NET: Duration = Duration::from_secs(30);
/// Pause after a storage error before firing again.
const ERROR_BACKOFF: Duration = Duration::from_secs(1);
/// Ticks looked at to find how often a pattern fires at its densest.
const GAP_SAMPLE: usize = 200;

/// Checks a schedule as submitted, naming the field at fault, and readies
/// it to store with its first tick after `now`.
pub(super) fn new_schedule(
    mut spec: ScheduleSpec,
    config: &QueueConfig,
    now: i64,
) -> Result<NewSchedule, String> {
    check_schedule_name(&spec.name)?;
    let recurrence = Recurrence::parse(&spec.cron, &spec.timezone)?;
    let next_tick = recurrence
        .next_after(now)
        .ok_or_else(|| format!("cron: `{}` never fires", spec.cron))?;
    let floor = config.schedule_min_interval.as_millis() as i64;
    if let Some(gap) = recurrence.shortest_gap(now, GAP_SAMPLE)
        && gap < floor
    {
        return Err(format!(
            "cron: `{}` fires {} ms apart at times, more often than the server's floor of {floor} ms",
            spec.cron, gap
        ));
    }
    if !(1..=MAX_CATCH_UP_LIMIT).contains(&spec.catch_up_limit) {
        return Err(format!(
            "catch_up_limit: must be between 1 and {MAX_CATCH_UP_LIMIT}"
        ));
    }
    let template = &spec.job;
    for (field, given) in [
        ("run_at", template.run_at.is_some()),
        ("delay_ms", template.delay_ms.is_some()),
        ("idempotency_key", template.idempotency_key.is_some()),
    ] {
        if given {
            return Err(format!(
                "job.{field}: a schedule's jobs run at its ticks, each a new job"
            ));
        }
    }
    enqueue::new_job(template.clone(), config, |_| None, now).map_err(|e| format!("job.{e}"))?;
    let webhook_secret = spec.take_webhook_secret();
    Ok(NewSchedule {
        spec,
        webhook_secret,
        next_tick,
        now,
    })
}

/// Fires due schedules, then sleeps until the next tick, a change to a
/// schedule (on any host), or [`SAFETY_NET`]; until the queue drains.
pub(super) async fn fire_schedules(shared: Arc<Shared>) {
    let topic = Topic::Kinds(KindSet::of(&[EventKind::ScheduleChanged]));
    let mut changes = shared.bus.subscribe_batches(topic);
    while !shared.draining.is_cancelled() {
        let wait = match fire_due(&shared).await {
            Ok(Next::Stuck) => ERROR_BACKOFF,
            Ok(Next::At(next)) => {
                Duration::from_millis(next.saturating_sub(shared.now()).max(0) as u64)
            }
            Ok(Next::Unknown) => SAFETY_NET,
            Err(error) => {
                tracing::error!(%error, "firing schedules failed");
                ERROR_BACKOFF
            }
        };
        tokio::select! {
            changed = changes.recv() => {
                if let Err(broadcast::error::RecvError::Closed) = changed {
                    return;
                }
            }
            () = tokio::time::sleep(wait.min(SAFETY_NET)) => {}
            () = shared.draining.cancelled() => return,
        }
    }
}

/// When the timer should fire next.
enum Next {
    At(i64),
    /// No schedule has a next tick (a change will wake the timer).
    Unknown,
    /// A tick is due that could not be fired.
    Stuck,
}

/// Fires every tick due now, one transaction each; the next tick after.
/// A schedule whose fire fails is left for the next round, so that it
/// holds up no other; so is one storage cannot read (stored by a newer
/// jobhost): then the next tick is already past, and the timer waits
/// [`ERROR_BACKOFF`] before trying again.
async fn fire_due(shared: &Arc<Shared>) -> Result<Next, QueueError> {
    let mut failed = std::collections::HashSet::new();
    loop {
        let now = shared.now();
        let mut due = shared.storage.due_schedules(now).await?;
        due.retain(|schedule| !failed.contains(&schedule.name));
        if due.is_empty() {
            return Ok(match shared.storage.next_schedule_tick().await? {
                // Due at the read, yet not fired.
                Some(next) if next <= now => Next::Stuck,
                Some(next) => Next::At(next),
                None => Next::Unknown,
            });
        }
        for schedule in due {
            if shared.draining.is_cancelled() {
                return Ok(Next::Unknown);
            }
            if let Err(error) = fire_tick(shared, &schedule, now).await {
                tracing::error!(schedule = %schedule.name, %error, "firing a schedule failed");
                failed.insert(schedule.name);
            }
        }
    }
}

/// What the schedule's next tick (due at `now`) does: fire, or skip as
/// its catch-up policy says when it was missed.
async fn fire_tick(shared: &Arc<Shared>, schedule: &Schedule, now: i64) -> Result<(), QueueError> {
    let tick = schedule.next_tick;
    let (following, action) = match Recurrence::parse(&schedule.cron, &schedule.timezone) {
        Ok(recurrence) => plan_tick(schedule, &recurrence, now),
        // Stored definitions were checked, but one a newer jobhost stored
        // may not parse here: it parks rather than spin.
        Err(message) => (
            i64::MAX,
            Some(FireAction::Skip {
                reason: SkipReason::InvalidJob,
                message,
                until: None,
            }),
        ),
    };
    let skip = |reason, message| FireAction::Skip {
        reason,
        message,
        until: None,
    };
    let action = match action {
        Some(skip) => skip,
        None => match template_job(shared, schedule) {
            Err(message) => skip(SkipReason::InvalidJob, message),
            // A schedule's jobs count against the pending-jobs quota too.
            Ok(job) => match shared.check_pending_quota().await {
                Err(full @ QueueError::TooManyPending(_)) => {
                    skip(SkipReason::QueueFull, full.to_string())
                }
                Err(error) => return Err(error),
                Ok(()) => FireAction::Enqueue {
                    job: Box::new(job),
                    skip_if_unfinished: schedule.overlap == Overlap::Skip,
                },
            },
        },
    };
    let fire = Fire {
        schedule: schedule.name.clone(),
        tick: Some((tick, following)),
        action,
        now,
    };
    let outcome = shared.storage.fire_schedule(fire).await?;
    fired(shared, schedule, &outcome, false).await;
    Ok(())
}

/// What the schedule's next tick, due at `now`, does: the tick to move to,
/// and a skip when it was missed and the catch-up policy lets it pass
/// (otherwise it fires).
fn plan_tick(schedule: &Schedule, recurrence: &Recurrence, now: i64) -> (i64, Option<FireAction>) {
    let tick = schedule.next_tick;
    // Past the last tick this pattern will ever have, a schedule parks.
    let after = |at: i64| recurrence.next_after(at).unwrap_or(i64::MAX);
    if now - tick <= MISSED_AFTER_MS {
        return (after(tick), None);
    }
    // The missed ticks run from `tick` to the last one more than
    // MISSED_AFTER_MS ago; later ones are on time and fire as usual.
    let last_missed = recurrence
        .last_at_or_before(now - MISSED_AFTER_MS)
        .unwrap_or(tick)
        .max(tick);
    let missed = "missed while no host ran";
    match schedule.catch_up {
        CatchUp::Skip => (
            after(last_missed),
            Some(skipped_run(SkipReason::Missed, missed, tick, last_missed)),
        ),
        CatchUp::One => (after(last_missed), None),
        CatchUp::All => {
            // Only the latest `catch_up_limit` missed ticks run: the older
            // ones are skipped in one step.
            let mut oldest_kept = last_missed;
            for _ in 1..schedule.catch_up_limit {
                match recurrence.last_at_or_before(oldest_kept - 1) {
                    Some(earlier) if earlier >= tick => oldest_kept = earlier,
                    _ => break,
                }
            }
            if oldest_kept > tick {
                let until = recurrence
                    .last_at_or_before(oldest_kept - 1)
                    .unwrap_or(tick);
                let reason = "missed while no host ran, beyond the catch-up limit";
                (
                    oldest_kept,
                    Some(skipped_run(SkipReason::Missed, reason, tick, until)),
                )
            } else {
                (after(tick), None)
            }
        }
    }
}

fn skipped_run(reason: SkipReason, message: &str, from: i64, until: i64) -> FireAction {
    FireAction::Skip {
        reason,
        message: message.into(),
        until: (until > from).then_some(until),
    }
}

/// The job a schedule's template makes now.
fn template_job(shared: &Shared, schedule: &Schedule) -> Result<crate::storage::NewJob, String> {
    let plugin_timeout = |plugin: &str| shared.plugins.default_timeout(plugin);
    enqueue::new_job(
        schedule.job.clone(),
        &shared.config,
        plugin_timeout,
        shared.now(),
    )
}

/// After a fire: counts it, wakes the dispatcher for the new job and, for
/// `cancel_previous`, stops the previous fire's job.
async fn fired(shared: &Arc<Shared>, schedule: &Schedule, fired: &Fired, by_hand: bool) {
    let outcome = match fired {
        Fired::Enqueued { .. } if by_hand => "triggered",
        Fired::Enqueued { .. } => "fired",
        Fired::Skipped(reason) => reason.as_str(),
        Fired::Moved => return,
    };
    let label = crate::metrics::OutcomeLabel {
        outcome: outcome.into(),
    };
    shared
        .config
        .metrics
        .schedule_ticks
        .get_or_create(&label)
        .inc();
    if let Fired::Enqueued { job, previous } = fired {
        tracing::info!(schedule = %schedule.name, job = %job.id, "schedule fired");
        shared.wake.notify_one();
        if let (Overlap::CancelPrevious, Some(previous)) = (schedule.overlap, previous) {
            stop_previous(shared, previous).await;
        }
    }
}

/// Cancels the previous fire's job: at once if pending; if running, through
/// its worker, here or on the host that runs it.
async fn stop_previous(shared: &Arc<Shared>, id: &str) {
    let stopped = async {
        let running = shared.running.lock().await;
        let outcome = shared.storage.cancel_pending_job(id, shared.now()).await?;
        if let CancelOutcome::Running { .. } = outcome {
            match running.get(id) {
                Some(token) => shared.stop_runs([token]),
                None => {
                    shared.storage.request_cancel(id).await?;
                }
            }
        }
        Ok::<_, QueueError>(())
    };
    if let Err(error) = stopped.await {
        tracing::warn!(job = %id, %error, "cancelling the previous job of a schedule failed");
    }
}

impl super::Queue {
    /// Stores a new schedule, its first tick after now.
    pub async fn create_schedule(&self, spec: ScheduleSpec) -> Result<Schedule, QueueError> {
        let shared = &self.shared;
        let name = spec.name.clone();
        let new = self.checked_schedule(spec).await?;
        let written = shared
            .storage
            .create_schedule(new, shared.config.max_schedules)
            .await?;
        stored(written, &name)
    }

    /// Replaces a schedule's definition; its next tick is the first after
    /// now by the new definition.
    pub async fn replace_schedule(&self, spec: ScheduleSpec) -> Result<Schedule, QueueError> {
        let name = spec.name.clone();
        let new = self.checked_schedule(spec).await?;
        stored(self.shared.storage.replace_schedule(new).await?, &name)
    }

    /// Pauses a schedule (no tick fires), or resumes it from the first
    /// tick after now: ticks passed while paused do not fire.
    pub async fn set_schedule_paused(
        &self,
        name: &str,
        paused: bool,
    ) -> Result<Schedule, QueueError> {
        let shared = &self.shared;
        let now = shared.now();
        let schedule = self.schedule(name).await?;
        let recurrence = Recurrence::parse(&schedule.cron, &schedule.timezone)
            .map_err(QueueError::InvalidSchedule)?;
        let next_tick = recurrence.next_after(now).unwrap_or(i64::MAX);
        let written = shared
            .storage
            .set_schedule_paused(name, paused, next_tick, now)
            .await?;
        stored(written, name)
    }

    pub async fn delete_schedule(&self, name: &str) -> Result<(), QueueError> {
        let shared = &self.shared;
        match shared.storage.delete_schedule(name, shared.now()).await? {
            true => Ok(()),
            false => Err(QueueError::ScheduleNotFound(name.to_owned())),
        }
    }

    pub async fn schedule(&self, name: &str) -> Result<Schedule, QueueError> {
        self.shared
            .storage
            .schedule(name)
            .await?
            .ok_or_else(|| QueueError::ScheduleNotFound(name.to_owned()))
    }

    pub async fn schedules(&self) -> Result<Vec<Schedule>, QueueError> {
        Ok(self.shared.storage.schedules().await?)
    }

    /// Fires a schedule now, by hand: its job is enqueued whatever the
    /// overlap policy (`cancel_previous` still cancels), and its ticks do
    /// not move.
    pub async fn trigger_schedule(&self, name: &str) -> Result<Job, QueueError> {
        let shared = &self.shared;
        let schedule = self.schedule(name).await?;
        let job = template_job(shared, &schedule).map_err(QueueError::InvalidJob)?;
        shared.check_pending_quota().await?;
        let fire = Fire {
            schedule: name.to_owned(),
            tick: None,
            action: FireAction::Enqueue {
                job: Box::new(job),
                skip_if_unfinished: false,
            },
            now: shared.now(),
        };
        let outcome = shared.storage.fire_schedule(fire).await?;
        fired(shared, &schedule, &outcome, true).await;
        match outcome {
            Fired::Enqueued { job, .. } => Ok(*job),
            Fired::Skipped(_) => Err(QueueError::UnknownPlugin(format!(
                "schedule `{name}`: its template names a plugin or version that is not stored"
            ))),
            Fired::Moved => Err(QueueError::ScheduleNotFound(name.to_owned())),
        }
    }

    /// A submitted schedule, checked; its template's plugins must exist.
    async fn checked_schedule(&self, spec: ScheduleSpec) -> Result<NewSchedule, QueueError> {
        let shared = &self.shared;
        let new = new_schedule(spec, &shared.config, shared.now())
            .map_err(QueueError::InvalidSchedule)?;
        for (index, phase) in new.spec.job.phases.iter().enumerate() {
            let record = shared.storage.plugin(&phase.plugin).await?;
            let known = record.is_some_and(|record| match &phase.version {
                Some(version) => record.versions.iter().any(|v| &v.version == version),
                None => record.active_version.is_some(),
            });
            if !known {
                let what = match &phase.version {
                    Some(version) => {
                        format!("plugin `{}` has no version `{version}`", phase.plugin)
                    }
                    None => format!("no plugin named `{}` is uploaded", phase.plugin),
                };
                return Err(QueueError::InvalidSchedule(format!(
                    "job.phases[{index}].plugin: {what}"
                )));
            }
        }
        Ok(new)
    }
}

/// What a schedule write answers.
fn stored(written: ScheduleWrite, name: &str) -> Result<Schedule, QueueError> {
    match written {
        ScheduleWrite::Stored(schedule) => Ok(*schedule),
        ScheduleWrite::Exists => Err(QueueError::ScheduleExists(name.to_owned())),
        ScheduleWrite::OverLimit { limit } => Err(QueueError::TooManySchedules(limit)),
        ScheduleWrite::NotFound => Err(QueueError::ScheduleNotFound(name.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::time::parse_rfc3339;
    use crate::model::{JobSpec, PhaseSpec};

    fn at(text: &str) -> i64 {
        parse_rfc3339(text).unwrap()
    }

    fn hourly(catch_up: CatchUp, next_tick: &str) -> (Schedule, Recurrence) {
        let spec = ScheduleSpec {
            name: "hourly".into(),
            cron: "0 * * * *".into(),
            timezone: "UTC".into(),
            job: JobSpec {
                phases: vec![PhaseSpec {
                    name: "p".into(),
                    plugin: "echo".into(),
                    ..PhaseSpec::default()
                }],
                ..JobSpec::default()
            },
            overlap: Overlap::Allow,
            catch_up,
            catch_up_limit: 3,
            paused: false,
        };
        let recurrence = Recurrence::parse(&spec.cron, &spec.timezone).unwrap();
        (
            Schedule::from_spec(spec, false, at(next_tick), None, 0, 0),
            recurrence,
        )
    }

    fn skip_range(action: Option<FireAction>) -> Option<(SkipReason, Option<i64>)> {
        action.map(|action| match action {
            FireAction::Skip { reason, until, .. } => (reason, until),
            FireAction::Enqueue { .. } => panic!("a plan never enqueues itself"),
        })
    }

    /// A tick reached on time fires and moves to the next; one reached
    /// late (a host was down) follows the catch-up policy.
    #[test]
    fn missed_ticks_follow_the_catch_up_policy() {
        let on_time = at("2026-01-01T10:00:30Z");
        for catch_up in [CatchUp::Skip, CatchUp::One, CatchUp::All] {
            let (schedule, recurrence) = hourly(catch_up, "2026-01-01T10:00:00Z");
            let (following, skip) = plan_tick(&schedule, &recurrence, on_time);
            assert_eq!(
                (following, skip_range(skip)),
                (at("2026-01-01T11:00:00Z"), None)
            );
        }
        // Down from 09:30 to 15:20: the ticks of 10:00 to 15:00 were missed.
        let back = at("2026-01-01T15:20:00Z");
        let (schedule, recurrence) = hourly(CatchUp::Skip, "2026-01-01T10:00:00Z");
        let (following, skip) = plan_tick(&schedule, &recurrence, back);
        assert_eq!(following, at("2026-01-01T16:00:00Z"));
        assert_eq!(
            skip_range(skip),
            Some((SkipReason::Missed, Some(at("2026-01-01T15:00:00Z"))))
        );
        let (schedule, recurrence) = hourly(CatchUp::One, "2026-01-01T10:00:00Z");
        let (following, skip) = plan_tick(&schedule, &recurrence, back);
        assert_eq!(
            (following, skip_range(skip)),
            (at("2026-01-01T16:00:00Z"), None)
        );
        // Back at 11:00:20: 10:00 was missed, 11:00 is on time and fires
        // as usual after the missed one is dealt with.
        let just_back = at("2026-01-01T11:00:20Z");
        let (schedule, recurrence) = hourly(CatchUp::Skip, "2026-01-01T10:00:00Z");
        let (following, skip) = plan_tick(&schedule, &recurrence, just_back);
        assert_eq!(following, at("2026-01-01T11:00:00Z"));
        assert_eq!(skip_range(skip), Some((SkipReason::Missed, None)));
        let (schedule, recurrence) = hourly(CatchUp::One, "2026-01-01T10:00:00Z");
        let (following, skip) = plan_tick(&schedule, &recurrence, just_back);
        assert_eq!(following, at("2026-01-01T11:00:00Z"));
        assert!(skip.is_none());
        // `all` with a limit of 3: 10:00-12:00 skipped at once, then 13:00,
        // 14:00 and 15:00 fire one after the other.
        let (mut schedule, recurrence) = hourly(CatchUp::All, "2026-01-01T10:00:00Z");
        let (following, skip) = plan_tick(&schedule, &recurrence, back);
        assert_eq!(following, at("2026-01-01T13:00:00Z"));
        assert_eq!(
            skip_range(skip),
            Some((SkipReason::Missed, Some(at("2026-01-01T12:00:00Z"))))
        );
        let mut fired = Vec::new();
        schedule.next_tick = following;
        while schedule.next_tick <= back {
            let (following, skip) = plan_tick(&schedule, &recurrence, back);
            assert!(skip.is_none());
            fired.push(schedule.next_tick);
            schedule.next_tick = following;
        }
        let expected = ["13:00", "14:00", "15:00"].map(|t| at(&format!("2026-01-01T{t}:00Z")));
        assert_eq!(fired, expected);
        assert_eq!(schedule.next_tick, at("2026-01-01T16:00:00Z"));
    }

    #[test]
    fn a_definition_is_checked_field_by_field() {
        let config = QueueConfig {
            schedule_min_interval: Duration::from_secs(60),
            ..QueueConfig::default()
        };
        let now = at("2026-01-01T00:00:00Z");
        let (schedule, _) = hourly(CatchUp::One, "2026-01-01T00:00:00Z");
        let base = ScheduleSpec {
            name: schedule.name,
            cron: schedule.cron,
            timezone: schedule.timezone,
            job: schedule.job,
            overlap: Overlap::Skip,
            catch_up: CatchUp::One,
            catch_up_limit: 10,
            paused: false,
        };
        let ok = new_schedule(base.clone(), &config, now).unwrap();
        assert_eq!(ok.next_tick, at("2026-01-01T01:00:00Z"));
        let check = |change: &dyn Fn(&mut ScheduleSpec)| {
            let mut spec = base.clone();
            change(&mut spec);
            new_schedule(spec, &config, now).unwrap_err()
        };
        type Change<'a> = &'a dyn Fn(&mut ScheduleSpec);
        let cases: [(Change, &str); 7] = [
            (&|s| s.name = "a b".into(), "name:"),
            (
                &|s| s.cron = "*/30 * * * * *".into(),
                "more often than the server's floor of 60000 ms",
            ),
            (&|s| s.cron = "0 0 30 2 *".into(), "never fires"),
            (&|s| s.timezone = "Nowhere/Land".into(), "timezone:"),
            (&|s| s.catch_up_limit = 0, "catch_up_limit:"),
            (
                &|s| s.job.idempotency_key = Some("k".into()),
                "job.idempotency_key:",
            ),
            (&|s| s.job.phases.clear(), "job.phases:"),
        ];
        for (change, wanted) in cases {
            let error = check(change);
            assert!(error.contains(wanted), "{error} lacks {wanted}");
        }
    }
}
