//! Schedules on PostgreSQL. A fire locks its schedule's row: hosts that
//! reach the same tick at once fire it one after the other, and the
//! second finds the tick moved. Creating one takes a transaction-scoped
//! advisory lock, so that hosts creating at once cannot pass the limit.

use async_trait::async_trait;
use deadpool_postgres::GenericClient;
use tokio_postgres::Row;

use super::create::create;
use super::{PgStore, Tx, WriteScope, corrupt, execute, query, query_one, query_opt};
use crate::model::Schedule;
use crate::model::event::ScheduleChange;
use crate::storage::schedules::{
    FirePlan, FireRow, RECORD_FIRE, ScheduleRow, changed, decode_listed, encode_spec,
};
use crate::storage::{Fire, Fired, NewSchedule, Result, ScheduleStore, ScheduleWrite};

/// The advisory lock creating a schedule holds.
const SCHEDULES_LOCK: i64 = 0x6a6f_6268_6f73_7403;

const SELECT: &str = "SELECT s.name, s.spec, s.paused, s.next_tick, s.last_tick, s.last_fired_at,
                             s.last_job_id, j.status, s.created_at, s.updated_at
                      FROM schedules s LEFT JOIN jobs j ON j.id = s.last_job_id";

fn row(row: &Row) -> ScheduleRow {
    ScheduleRow {
        name: row.get(0),
        spec: row.get(1),
        paused: row.get(2),
        next_tick: row.get(3),
        last_tick: row.get(4),
        last_fired_at: row.get(5),
        last_job_id: row.get(6),
        last_job_status: row.get(7),
        created_at: row.get(8),
        updated_at: row.get(9),
    }
}

async fn load(db: &impl GenericClient, name: &str) -> Result<Option<Schedule>> {
    let row = query_opt(db, &format!("{SELECT} WHERE s.name = $1"), &[&name]).await?;
    row.as_ref()
        .map(|found| self::row(found).decode())
        .transpose()
}

async fn stored(
    tx: &Tx<'_>,
    scope: &mut WriteScope,
    name: &str,
    change: ScheduleChange,
    now: i64,
) -> Result<ScheduleWrite> {
    scope.emit(changed(name, change), now);
    let schedule = load(tx, name)
        .await?
        .ok_or_else(|| corrupt("schedule just written", name))?;
    Ok(ScheduleWrite::Stored(Box::new(schedule)))
}

async fn insert(
    tx: &Tx<'_>,
    scope: &mut WriteScope,
    new: &NewSchedule,
    limit: u64,
) -> Result<ScheduleWrite> {
    execute(tx, "SELECT pg_advisory_xact_lock($1)", &[&SCHEDULES_LOCK]).await?;
    let name = &new.spec.name;
    let row = query_one(
        tx,
        "SELECT count(*), count(*) FILTER (WHERE name = $1) FROM schedules",
        &[name],
    )
    .await?;
    let (count, taken): (i64, i64) = (row.get(0), row.get(1));
    if taken > 0 {
        return Ok(ScheduleWrite::Exists);
    }
    if count as u64 >= limit {
        return Ok(ScheduleWrite::OverLimit { limit });
    }
    execute(
        tx,
        "INSERT INTO schedules (name, spec, webhook_secret, paused, next_tick, created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $6)",
        &[
            name,
            &encode_spec(&new.spec),
            &new.webhook_secret,
            &new.spec.paused,
            &new.next_tick,
            &new.now,
        ],
    )
    .await?;
    stored(tx, scope, name, ScheduleChange::Created, new.now).await
}

async fn replace(tx: &Tx<'_>, scope: &mut WriteScope, new: &NewSchedule) -> Result<ScheduleWrite> {
    let updated = execute(
        tx,
        "UPDATE schedules SET spec = $2, webhook_secret = $3, paused = $4, next_tick = $5,
                              updated_at = $6
         WHERE name = $1",
        &[
            &new.spec.name,
            &encode_spec(&new.spec),
            &new.webhook_secret,
            &new.spec.paused,
            &new.next_tick,
            &new.now,
        ],
    )
    .await?;
    if updated == 0 {
        return Ok(ScheduleWrite::NotFound);
    }
    stored(tx, scope, &new.spec.name, ScheduleChange::Replaced, new.now).await
}

async fn set_paused(
    tx: &Tx<'_>,
    scope: &mut WriteScope,
    name: &str,
    paused: bool,
    next_tick: i64,
    now: i64,
) -> Result<ScheduleWrite> {
    // Resuming moves the tick past the pause; pausing keeps it, to show.
    let updated = execute(
        tx,
        "UPDATE schedules SET paused = $2, updated_at = $4,
                              next_tick = CASE WHEN $2 THEN next_tick ELSE $3 END
         WHERE name = $1",
        &[&name, &paused, &next_tick, &now],
    )
    .await?;
    if updated == 0 {
        return Ok(ScheduleWrite::NotFound);
    }
    let change = if paused {
        ScheduleChange::Paused
    } else {
        ScheduleChange::Resumed
    };
    stored(tx, scope, name, change, now).await
}

async fn fire(tx: &Tx<'_>, scope: &mut WriteScope, mut fire: Fire) -> Result<Fired> {
    // The schedule's row alone is locked; the last job's status is read
    // after the lock is held, so a fire that waited for another (a trigger)
    // sees the job that one stored.
    let row = query_opt(
        tx,
        "SELECT paused, next_tick, webhook_secret, last_job_id FROM schedules
         WHERE name = $1 FOR UPDATE",
        &[&fire.schedule],
    )
    .await?;
    let row = match row {
        Some(row) => {
            let last_job_id: Option<String> = row.get(3);
            let status =
                query_opt(tx, "SELECT status FROM jobs WHERE id = $1", &[&last_job_id]).await?;
            Some(FireRow {
                paused: row.get(0),
                next_tick: row.get(1),
                webhook_secret: row.get(2),
                last_job_id,
                last_job_status: status.map(|row| row.get(0)),
            })
        }
        None => None,
    };
    let plan = fire.plan(row);
    let created = match &plan {
        FirePlan::Enqueue { job, .. } => Some(create(tx, scope, job).await?),
        _ => None,
    };
    let Some(record) = fire.record(plan, created)? else {
        return Ok(Fired::Moved);
    };
    execute(
        tx,
        RECORD_FIRE,
        &[
            &fire.schedule,
            &fire.tick.map(|(_, following)| following),
            &record.job_id,
            &fire.now,
            &fire.tick.map(|(tick, _)| tick),
        ],
    )
    .await?;
    scope.emit(record.event, fire.now);
    // A job stored: hosts with free workers are told.
    scope.jobs_due |= record.job_id.is_some();
    Ok(record.fired)
}

#[async_trait]
impl ScheduleStore for PgStore {
    async fn create_schedule(&self, new: NewSchedule, limit: u64) -> Result<ScheduleWrite> {
        self.write(move |tx, scope| Box::pin(async move { insert(tx, scope, &new, limit).await }))
            .await
    }

    async fn replace_schedule(&self, new: NewSchedule) -> Result<ScheduleWrite> {
        self.write(move |tx, scope| Box::pin(async move { replace(tx, scope, &new).await }))
            .await
    }

    async fn set_schedule_paused(
        &self,
        name: &str,
        paused: bool,
        next_tick: i64,
        now: i64,
    ) -> Result<ScheduleWrite> {
        let name = name.to_owned();
        self.write(move |tx, scope| {
            Box::pin(async move { set_paused(tx, scope, &name, paused, next_tick, now).await })
        })
        .await
    }

    async fn delete_schedule(&self, name: &str, now: i64) -> Result<bool> {
        let name = name.to_owned();
        self.write(move |tx, scope| {
            Box::pin(async move {
                let deleted =
                    execute(tx, "DELETE FROM schedules WHERE name = $1", &[&name]).await? > 0;
                if deleted {
                    scope.emit(changed(&name, ScheduleChange::Deleted), now);
                }
                Ok(deleted)
            })
        })
        .await
    }

    async fn schedule(&self, name: &str) -> Result<Option<Schedule>> {
        let client = self.client().await?;
        load(&client, name).await
    }

    async fn schedules(&self) -> Result<Vec<Schedule>> {
        let client = self.client().await?;
        let rows = query(&client, &format!("{SELECT} ORDER BY s.name"), &[]).await?;
        Ok(decode_listed(rows.iter().map(row)))
    }

    async fn due_schedules(&self, now: i64) -> Result<Vec<Schedule>> {
        let client = self.client().await?;
        let rows = query(
            &client,
            &format!("{SELECT} WHERE NOT s.paused AND s.next_tick <= $1 ORDER BY s.name"),
            &[&now],
        )
        .await?;
        Ok(decode_listed(rows.iter().map(row)))
    }

    async fn next_schedule_tick(&self) -> Result<Option<i64>> {
        let client = self.client().await?;
        let row = query_one(
            &client,
            "SELECT min(next_tick) FROM schedules WHERE NOT paused",
            &[],
        )
        .await?;
        Ok(row.get(0))
    }

    async fn fire_schedule(&self, fire: Fire) -> Result<Fired> {
        self.write(move |tx, scope| Box::pin(async move { self::fire(tx, scope, fire).await }))
            .await
    }
}
