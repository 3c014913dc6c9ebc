//! Schedules: their definitions, their next tick, and the fire that moves
//! it. A fire is one transaction, guarded by the tick it fires for: it
//! enqueues the job (or records the skip) and advances the tick together,
//! so a tick fires once however many hosts, restarts or crashes meet it.

use async_trait::async_trait;

use super::Result;
use crate::model::event::{ScheduleChange, SkipReason};
use crate::model::{Job, Schedule, ScheduleSpec};

use super::NewJob;

/// A validated schedule to store.
#[derive(Debug, Clone)]
pub struct NewSchedule {
    /// Without its webhook secret, which comes apart.
    pub spec: ScheduleSpec,
    pub webhook_secret: Option<String>,
    /// Its first tick after now.
    pub next_tick: i64,
    pub now: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ScheduleWrite {
    /// Stored; `schedule:changed` logged.
    Stored(Box<Schedule>),
    /// `create`: a schedule of that name exists.
    Exists,
    /// `create`: as many schedules as allowed exist.
    OverLimit { limit: u64 },
    /// `replace`, `pause`, `resume`: no schedule of that name.
    NotFound,
}

/// One fire of a schedule.
#[derive(Debug, Clone)]
pub struct Fire {
    pub schedule: String,
    /// The tick this fire is for, which must still be the schedule's next,
    /// and the tick that follows it; none for a trigger by hand, which
    /// moves no tick.
    pub tick: Option<(i64, i64)>,
    pub action: FireAction,
    pub now: i64,
}

#[derive(Debug, Clone)]
pub enum FireAction {
    /// Enqueue this job (the schedule's webhook secret joins it). With
    /// `skip_if_unfinished`, a tick whose previous job is still pending or
    /// running is skipped instead (reason `overlap`).
    Enqueue {
        job: Box<NewJob>,
        skip_if_unfinished: bool,
    },
    /// Enqueue nothing: log `schedule:skipped` (`until`: the last tick of a
    /// run skipped at once).
    Skip {
        reason: SkipReason,
        message: String,
        until: Option<i64>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Fired {
    /// The job was stored; `previous` is the last fire's job if it is
    /// still pending or running.
    Enqueued {
        job: Box<Job>,
        previous: Option<String>,
    },
    Skipped(SkipReason),
    /// The tick is no longer the schedule's next (another host or an
    /// earlier fire took it, or the schedule changed or is paused), or
    /// there is no such schedule: nothing changed.
    Moved,
}

#[async_trait]
pub trait ScheduleStore: Send + Sync {
    /// Stores a new schedule unless its name is taken or `limit` schedules
    /// exist.
    async fn create_schedule(&self, new: NewSchedule, limit: u64) -> Result<ScheduleWrite>;

    /// Replaces a schedule's definition and next tick, keeping its last
    /// fire and creation time.
    async fn replace_schedule(&self, new: NewSchedule) -> Result<ScheduleWrite>;

    /// Pauses a schedule, or resumes it with the next tick after now.
    async fn set_schedule_paused(
        &self,
        name: &str,
        paused: bool,
        next_tick: i64,
        now: i64,
    ) -> Result<ScheduleWrite>;

    /// Deletes a schedule (its jobs stay); false if there is none.
    async fn delete_schedule(&self, name: &str, now: i64) -> Result<bool>;

    async fn schedule(&self, name: &str) -> Result<Option<Schedule>>;

    /// Every schedule, by name.
    async fn schedules(&self) -> Result<Vec<Schedule>>;

    /// Unpaused schedules whose next tick is at or before `now`.
    async fn due_schedules(&self, now: i64) -> Result<Vec<Schedule>>;

    /// The earliest next tick of an unpaused schedule.
    async fn next_schedule_tick(&self) -> Result<Option<i64>>;

    /// Fires a schedule: enqueues or skips, and moves its tick, in one
    /// transaction guarded by the tick.
    async fn fire_schedule(&self, fire: Fire) -> Result<Fired>;
}

/// The event a schedule write logs.
pub(super) fn changed(schedule: &str, change: ScheduleChange) -> crate::model::NewEvent {
    crate::model::NewEvent::global(crate::model::EventBody::ScheduleChanged(
        crate::model::event::ScheduleChanged {
            schedule: schedule.to_owned(),
            change,
        },
    ))
}

/// A stored definition (the spec, as JSON text on both backends).
pub(super) fn decode_spec(json: &str) -> Result<ScheduleSpec> {
    serde_json::from_str(json).map_err(|e| {
        super::StorageError::new(
            super::ErrorClass::Other,
            format!("a stored schedule does not decode: {e}"),
        )
    })
}

pub(super) fn encode_spec(spec: &ScheduleSpec) -> String {
    serde_json::to_string(spec).expect("a schedule spec always serializes")
}

/// A schedule's row as both backends read it.
pub(super) struct ScheduleRow {
    pub name: String,
    pub spec: String,
    pub paused: bool,
    pub next_tick: i64,
    pub last_tick: Option<i64>,
    pub last_fired_at: Option<i64>,
    pub last_job_id: Option<String>,
    /// The last job's status, if it still exists.
    pub last_job_status: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

/// The rows that decode. One that does not (stored by a newer jobhost
/// during a rolling upgrade, say) is logged and left out, rather than hide
/// every other schedule from listings and from the timer.
pub(super) fn decode_listed(rows: impl IntoIterator<Item = ScheduleRow>) -> Vec<Schedule> {
    rows.into_iter()
        .filter_map(|row| {
            let name = row.name.clone();
            row.decode()
                .inspect_err(|error| {
                    tracing::error!(schedule = %name, %error, "a stored schedule does not decode; it is left out");
                })
                .ok()
        })
        .collect()
}

impl ScheduleRow {
    pub(super) fn decode(self) -> Result<Schedule> {
        let spec = decode_spec(&self.spec)?;
        let job_status = self
            .last_job_status
            .map(|s| {
                crate::model::JobStatus::parse(&s)
                    .ok_or_else(|| super::StorageError::corrupt(format!("job status: {s}")))
            })
            .transpose()?;
        let last_fire = match (self.last_job_id, self.last_fired_at) {
            (Some(job_id), Some(at)) => Some(crate::model::schedule::LastFire {
                tick: self.last_tick,
                at,
                job_id,
                job_status,
            }),
            _ => None,
        };
        Ok(Schedule::from_spec(
            spec,
            self.paused,
            self.next_tick,
            last_fire,
            self.created_at,
            self.updated_at,
        ))
    }
}

/// What a fire finds in its schedule's row (locked, on PostgreSQL).
pub(super) struct FireRow {
    pub paused: bool,
    pub next_tick: i64,
    pub webhook_secret: Option<String>,
    pub last_job_id: Option<String>,
    pub last_job_status: Option<String>,
}

/// What a fire does, decided from its row: the same on both backends.
pub(super) enum FirePlan {
    /// The guard failed: change nothing.
    Moved,
    /// Store this job, then record the fire; `previous` is the last job,
    /// if unfinished.
    Enqueue {
        job: Box<NewJob>,
        previous: Option<String>,
    },
    /// Log this skip (`schedule:skipped`).
    Skip(crate::model::NewEvent, SkipReason),
}

/// What a fire writes once its plan is made and, for an enqueue, its job
/// stored: the same on both backends, which write it with
/// [`RECORD_FIRE`] and log `event`.
pub(super) struct FireRecord {
    /// `schedule:fired` or `schedule:skipped`.
    pub event: crate::model::NewEvent,
    /// The job stored: the schedule's last fire from now on.
    pub job_id: Option<String>,
    pub fired: Fired,
}

/// Records a fire on its schedule's row: the tick it moves to (none for a
/// trigger by hand), and the job it stored, if any, as the last fire.
/// Parameters: name, following tick, job id, now, tick fired (`$N` here;
/// SQLite takes the same text with `?N`).
pub(super) const RECORD_FIRE: &str = "
    UPDATE schedules
    SET next_tick = COALESCE(CAST($2 AS BIGINT), next_tick),
        last_job_id = COALESCE(CAST($3 AS TEXT), last_job_id),
        last_fired_at = CASE WHEN CAST($3 AS TEXT) IS NULL THEN last_fired_at ELSE $4 END,
        last_tick = CASE WHEN CAST($3 AS TEXT) IS NULL THEN last_tick ELSE CAST($5 AS BIGINT) END
    WHERE name = $1";

impl Fire {
    /// Finishes `plan` with what storing its job did (`created`, for an
    /// enqueue); none when the guard failed and nothing is written.
    pub(super) fn record(
        &self,
        plan: FirePlan,
        created: Option<super::CreateOutcome>,
    ) -> Result<Option<FireRecord>> {
        use super::CreateOutcome::{Created, Existing, UnknownPlugin};
        let skipped = |event, reason| FireRecord {
            event,
            job_id: None,
            fired: Fired::Skipped(reason),
        };
        Ok(Some(match (plan, created) {
            (FirePlan::Moved, _) => return Ok(None),
            (FirePlan::Skip(event, reason), _) => skipped(event, reason),
            (FirePlan::Enqueue { previous, .. }, Some(Created(job, _))) => FireRecord {
                event: self.fired(&job.id),
                job_id: Some(job.id.clone()),
                fired: Fired::Enqueued {
                    job: Box::new(job),
                    previous,
                },
            },
            (FirePlan::Enqueue { .. }, Some(UnknownPlugin(message))) => {
                let reason = SkipReason::InvalidJob;
                skipped(self.skipped(reason, message, None), reason)
            }
            (FirePlan::Enqueue { .. }, Some(Existing(_)) | None) => {
                return Err(super::StorageError::corrupt(
                    "a schedule's job: an idempotency key in its template".to_owned(),
                ));
            }
        }))
    }

    pub(super) fn plan(&mut self, row: Option<FireRow>) -> FirePlan {
        let Some(row) = row else {
            return FirePlan::Moved;
        };
        if let Some((tick, _)) = self.tick
            && (row.paused || tick != row.next_tick)
        {
            return FirePlan::Moved;
        }
        let unfinished = matches!(
            row.last_job_status.as_deref(),
            Some("pending" | "running" | "waiting")
        );
        let action = std::mem::replace(
            &mut self.action,
            FireAction::Skip {
                reason: SkipReason::Missed,
                message: String::new(),
                until: None,
            },
        );
        match action {
            FireAction::Enqueue {
                skip_if_unfinished: true,
                ..
            } if unfinished => {
                let reason = SkipReason::Overlap;
                let message = "the job of the previous fire is unfinished".into();
                FirePlan::Skip(self.skipped(reason, message, None), reason)
            }
            FireAction::Enqueue { mut job, .. } => {
                job.webhook_secret = row.webhook_secret;
                FirePlan::Enqueue {
                    job,
                    previous: row.last_job_id.filter(|_| unfinished),
                }
            }
            FireAction::Skip {
                reason,
                message,
                until,
            } => FirePlan::Skip(self.skipped(reason, message, until), reason),
        }
    }

    /// `schedule:skipped` for this fire.
    fn skipped(
        &self,
        reason: SkipReason,
        message: String,
        until: Option<i64>,
    ) -> crate::model::NewEvent {
        crate::model::NewEvent::global(crate::model::EventBody::ScheduleSkipped(
            crate::model::event::ScheduleSkipped {
                schedule: self.schedule.clone(),
                tick: self.tick.map_or(self.now, |(tick, _)| tick),
                until,
                reason,
                message,
            },
        ))
    }

    /// `schedule:fired` for the job this fire stored.
    fn fired(&self, job_id: &str) -> crate::model::NewEvent {
        crate::model::NewEvent::global(crate::model::EventBody::ScheduleFired(
            crate::model::event::ScheduleFired {
                schedule: self.schedule.clone(),
                job_id: job_id.to_owned(),
                tick: self.tick.map(|(tick, _)| tick),
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, spec: &str) -> ScheduleRow {
        ScheduleRow {
            name: name.into(),
            spec: spec.into(),
            paused: false,
            next_tick: 1_000,
            last_tick: None,
            last_fired_at: None,
            last_job_id: None,
            last_job_status: None,
            created_at: 0,
            updated_at: 0,
        }
    }

    /// A definition this build cannot read (a field from a newer jobhost)
    /// is left out; the others are listed.
    #[test]
    fn a_row_that_does_not_decode_hides_no_other() {
        let good = r#"{"name": "good", "cron": "0 * * * *", "job": {"phases": [{"name": "p", "plugin": "echo"}]}}"#;
        let newer =
            r#"{"name": "newer", "cron": "0 * * * *", "jitter_ms": 5, "job": {"phases": []}}"#;
        let listed = decode_listed([row("newer", newer), row("good", good)]);
        let names: Vec<_> = listed.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["good"]);
    }
}
