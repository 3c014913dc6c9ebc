//! Schedules on SQLite: each write is one transaction of the writer.

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, Row, params};

use super::SqliteStore;
use super::corrupt;
use super::create::create;
use super::writer::EventLog;
use crate::model::Schedule;
use crate::model::event::ScheduleChange;
use crate::storage::schedules::{
    FirePlan, FireRow, RECORD_FIRE, ScheduleRow, changed, decode_listed, encode_spec,
};
use crate::storage::{Fire, Fired, NewSchedule, Result, ScheduleStore, ScheduleWrite};

const COLUMNS: &str = "s.name, s.spec, s.paused, s.next_tick, s.last_tick, s.last_fired_at,
                       s.last_job_id, j.status, s.created_at, s.updated_at";
const FROM: &str = "FROM schedules s LEFT JOIN jobs j ON j.id = s.last_job_id";

fn row(row: &Row<'_>) -> rusqlite::Result<ScheduleRow> {
    Ok(ScheduleRow {
        name: row.get(0)?,
        spec: row.get(1)?,
        paused: row.get(2)?,
        next_tick: row.get(3)?,
        last_tick: row.get(4)?,
        last_fired_at: row.get(5)?,
        last_job_id: row.get(6)?,
        last_job_status: row.get(7)?,
        created_at: row.get(8)?,
        updated_at: row.get(9)?,
    })
}

fn load(conn: &Connection, name: &str) -> Result<Option<Schedule>> {
    conn.prepare_cached(&format!("SELECT {COLUMNS} {FROM} WHERE s.name = ?1"))?
        .query_row([name], row)
        .optional()?
        .map(ScheduleRow::decode)
        .transpose()
}

fn load_where(conn: &Connection, condition: &str, now: Option<i64>) -> Result<Vec<Schedule>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} {FROM} WHERE {condition} ORDER BY s.name"
    ))?;
    let rows = match now {
        Some(now) => stmt.query_map([now], row)?,
        None => stmt.query_map([], row)?,
    };
    Ok(decode_listed(rows.collect::<rusqlite::Result<Vec<_>>>()?))
}

fn stored(
    conn: &Connection,
    log: &mut EventLog,
    name: &str,
    change: ScheduleChange,
    now: i64,
) -> Result<ScheduleWrite> {
    log.emit(conn, changed(name, change), now)?;
    let schedule = load(conn, name)?.ok_or_else(|| corrupt("schedule just written", name))?;
    Ok(ScheduleWrite::Stored(Box::new(schedule)))
}

fn insert(
    conn: &Connection,
    log: &mut EventLog,
    new: &NewSchedule,
    limit: u64,
) -> Result<ScheduleWrite> {
    let name = &new.spec.name;
    let exists = conn
        .prepare_cached("SELECT 1 FROM schedules WHERE name = ?1")?
        .query_row([name], |_| Ok(()))
        .optional()?
        .is_some();
    if exists {
        return Ok(ScheduleWrite::Exists);
    }
    let count: i64 = conn.query_row("SELECT COUNT(*) FROM schedules", [], |row| row.get(0))?;
    if count as u64 >= limit {
        return Ok(ScheduleWrite::OverLimit { limit });
    }
    conn.prepare_cached(
        "INSERT INTO schedules (name, spec, webhook_secret, paused, next_tick, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
    )?
    .execute(params![
        name,
        encode_spec(&new.spec),
        new.webhook_secret,
        new.spec.paused,
        new.next_tick,
        new.now
    ])?;
    stored(conn, log, name, ScheduleChange::Created, new.now)
}

fn replace(conn: &Connection, log: &mut EventLog, new: &NewSchedule) -> Result<ScheduleWrite> {
    let updated = conn
        .prepare_cached(
            "UPDATE schedules SET spec = ?2, webhook_secret = ?3, paused = ?4, next_tick = ?5,
                                  updated_at = ?6
             WHERE name = ?1",
        )?
        .execute(params![
            new.spec.name,
            encode_spec(&new.spec),
            new.webhook_secret,
            new.spec.paused,
            new.next_tick,
            new.now
        ])?;
    if updated == 0 {
        return Ok(ScheduleWrite::NotFound);
    }
    stored(conn, log, &new.spec.name, ScheduleChange::Replaced, new.now)
}

fn set_paused(
    conn: &Connection,
    log: &mut EventLog,
    name: &str,
    paused: bool,
    next_tick: i64,
    now: i64,
) -> Result<ScheduleWrite> {
    // Resuming moves the tick past the pause; pausing keeps it, to show.
    let updated = conn
        .prepare_cached(
            "UPDATE schedules SET paused = ?2, updated_at = ?4,
                                  next_tick = CASE WHEN ?2 THEN next_tick ELSE ?3 END
             WHERE name = ?1",
        )?
        .execute(params![name, paused, next_tick, now])?;
    if updated == 0 {
        return Ok(ScheduleWrite::NotFound);
    }
    let change = if paused {
        ScheduleChange::Paused
    } else {
        ScheduleChange::Resumed
    };
    stored(conn, log, name, change, now)
}

fn delete(conn: &Connection, log: &mut EventLog, name: &str, now: i64) -> Result<bool> {
    let deleted = conn
        .prepare_cached("DELETE FROM schedules WHERE name = ?1")?
        .execute([name])?;
    if deleted > 0 {
        log.emit(conn, changed(name, ScheduleChange::Deleted), now)?;
    }
    Ok(deleted > 0)
}

fn fire(conn: &Connection, log: &mut EventLog, mut fire: Fire) -> Result<Fired> {
    let row = conn
        .prepare_cached(
            "SELECT s.paused, s.next_tick, s.webhook_secret, s.last_job_id, j.status
             FROM schedules s LEFT JOIN jobs j ON j.id = s.last_job_id WHERE s.name = ?1",
        )?
        .query_row([&fire.schedule], |row| {
            Ok(FireRow {
                paused: row.get(0)?,
                next_tick: row.get(1)?,
                webhook_secret: row.get(2)?,
                last_job_id: row.get(3)?,
                last_job_status: row.get(4)?,
            })
        })
        .optional()?;
    let plan = fire.plan(row);
    let created = match &plan {
        FirePlan::Enqueue { job, .. } => Some(create(conn, log, job)?),
        _ => None,
    };
    let Some(record) = fire.record(plan, created)? else {
        return Ok(Fired::Moved);
    };
    conn.prepare_cached(&RECORD_FIRE.replace('$', "?"))?
        .execute(params![
            fire.schedule,
            fire.tick.map(|(_, following)| following),
            record.job_id,
            fire.now,
            fire.tick.map(|(tick, _)| tick),
        ])?;
    log.emit(conn, record.event, fire.now)?;
    Ok(record.fired)
}

#[async_trait]
impl ScheduleStore for SqliteStore {
    async fn create_schedule(&self, new: NewSchedule, limit: u64) -> Result<ScheduleWrite> {
        self.write(move |conn, log| insert(conn, log, &new, limit))
            .await
    }

    async fn replace_schedule(&self, new: NewSchedule) -> Result<ScheduleWrite> {
        self.write(move |conn, log| replace(conn, log, &new)).await
    }

    async fn set_schedule_paused(
        &self,
        name: &str,
        paused: bool,
        next_tick: i64,
        now: i64,
    ) -> Result<ScheduleWrite> {
        let name = name.to_owned();
        self.write(move |conn, log| set_paused(conn, log, &name, paused, next_tick, now))
            .await
    }

    async fn delete_schedule(&self, name: &str, now: i64) -> Result<bool> {
        let name = name.to_owned();
        self.write(move |conn, log| delete(conn, log, &name, now))
            .await
    }

    async fn schedule(&self, name: &str) -> Result<Option<Schedule>> {
        let name = name.to_owned();
        self.read(move |conn| load(conn, &name)).await
    }

    async fn schedules(&self) -> Result<Vec<Schedule>> {
        self.read(|conn| load_where(conn, "1", None)).await
    }

    async fn due_schedules(&self, now: i64) -> Result<Vec<Schedule>> {
        self.read(move |conn| load_where(conn, "NOT s.paused AND s.next_tick <= ?1", Some(now)))
            .await
    }

    async fn next_schedule_tick(&self) -> Result<Option<i64>> {
        self.read(|conn| {
            Ok(conn
                .prepare_cached("SELECT MIN(next_tick) FROM schedules WHERE NOT paused")?
                .query_row([], |row| row.get(0))?)
        })
        .await
    }

    async fn fire_schedule(&self, fire: Fire) -> Result<Fired> {
        self.write(move |conn, log| self::fire(conn, log, fire.clone()))
            .await
    }
}
