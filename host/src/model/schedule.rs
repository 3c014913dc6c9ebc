//! Recurring schedules: a cron pattern in a time zone that enqueues a job
//! template at each of its ticks. A tick is a UTC instant (Unix ms); the
//! pattern and the zone decide which instants are ticks, with Vixie cron's
//! rules across daylight-saving changes (see [`Recurrence`]).

use serde::{Deserialize, Serialize};

use super::job::{JobSpec, JobStatus};

/// Longest schedule name, in bytes.
pub const MAX_SCHEDULE_NAME: usize = 64;
/// Longest cron pattern, in bytes.
pub const MAX_CRON_LENGTH: usize = 256;
/// Most missed ticks a `catch_up: all` schedule runs after downtime.
pub const MAX_CATCH_UP_LIMIT: u32 = 1000;
/// A tick reached later than this counts as missed, and its schedule's
/// catch-up policy decides what happens to it.
pub const MISSED_AFTER_MS: i64 = 60_000;

/// A schedule as submitted (`POST /schedules`, `PUT /schedules/{name}`).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSpec {
    /// Letters, digits, `.`, `_` and `-`.
    #[schema(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9._-]+$")]
    pub name: String,
    /// Five fields (minute hour day-of-month month day-of-week), or six
    /// with seconds first. `L`, `W` and `#` work as in croner.
    #[schema(min_length = 1, max_length = 256, example = "30 2 * * *")]
    pub cron: String,
    /// An IANA time zone (`Europe/Berlin`); `UTC` if omitted.
    #[serde(default = "utc")]
    #[schema(example = "UTC")]
    pub timezone: String,
    /// The job each tick enqueues: a job spec without `run_at`, `delay_ms`
    /// or `idempotency_key`. A phase that names a `version` pins it; one
    /// that does not runs its plugin's version active at the tick.
    pub job: JobSpec,
    #[serde(default)]
    pub overlap: Overlap,
    #[serde(default)]
    pub catch_up: CatchUp,
    /// With `catch_up: all`, the most missed ticks run: the latest ones.
    #[serde(default = "default_catch_up_limit")]
    #[schema(minimum = 1, maximum = 1000)]
    pub catch_up_limit: u32,
    /// Created paused: it fires only once resumed.
    #[serde(default)]
    pub paused: bool,
}

fn utc() -> String {
    "UTC".into()
}

fn default_catch_up_limit() -> u32 {
    10
}

/// What a tick does while the job of the previous fire is unfinished.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Overlap {
    /// Skip the tick (`schedule:skipped`, reason `overlap`).
    #[default]
    Skip,
    /// Enqueue anyway.
    Allow,
    /// Cancel the previous job, then enqueue.
    CancelPrevious,
}

/// What happens to ticks missed while no host ran (see [`MISSED_AFTER_MS`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CatchUp {
    /// Skip them all (`schedule:skipped`, reason `missed`).
    Skip,
    /// Run one job for them (its tick: the first one missed).
    #[default]
    One,
    /// Run a job for each, up to `catch_up_limit` (the latest ones).
    All,
}

/// A schedule as stored, with when it fires next and what it did last.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Schedule {
    pub name: String,
    pub cron: String,
    pub timezone: String,
    /// The template; a webhook secret is never shown.
    pub job: JobSpec,
    pub overlap: Overlap,
    pub catch_up: CatchUp,
    pub catch_up_limit: u32,
    pub paused: bool,
    /// The next tick, UTC (while paused: the one it had when paused).
    #[serde(serialize_with = "super::time::as_rfc3339::serialize")]
    #[schema(value_type = String, format = DateTime)]
    pub next_tick: i64,
    /// The last fire, by its tick or by hand.
    pub last_fire: Option<LastFire>,
    #[serde(serialize_with = "super::time::as_rfc3339::serialize")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: i64,
    #[serde(serialize_with = "super::time::as_rfc3339::serialize")]
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct LastFire {
    /// The tick it fired for; none for a manual trigger.
    #[serde(serialize_with = "super::time::as_rfc3339::option::serialize")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub tick: Option<i64>,
    #[serde(serialize_with = "super::time::as_rfc3339::serialize")]
    #[schema(value_type = String, format = DateTime)]
    pub at: i64,
    pub job_id: String,
    /// The job's status now; none once it was deleted.
    pub job_status: Option<JobStatus>,
}

impl Schedule {
    /// A stored schedule from its definition and its state.
    pub fn from_spec(
        spec: ScheduleSpec,
        paused: bool,
        next_tick: i64,
        last_fire: Option<LastFire>,
        created_at: i64,
        updated_at: i64,
    ) -> Schedule {
        Schedule {
            name: spec.name,
            cron: spec.cron,
            timezone: spec.timezone,
            job: spec.job,
            overlap: spec.overlap,
            catch_up: spec.catch_up,
            catch_up_limit: spec.catch_up_limit,
            paused,
            next_tick,
            last_fire,
            created_at,
            updated_at,
        }
    }
}

impl ScheduleSpec {
    /// The template's webhook secret, taken out: storage keeps it apart and
    /// never returns it, as for a job.
    pub fn take_webhook_secret(&mut self) -> Option<String> {
        self.job.webhook.as_mut().and_then(|w| w.secret.take())
    }
}

/// When a schedule's ticks are: a parsed cron pattern in a time zone.
///
/// Across daylight-saving changes it follows Vixie cron, as croner does: a
/// fixed-time pattern (single second, minute and hour, e.g. `30 2 * * *`)
/// whose time a spring-forward skips fires once, right after the gap, and
/// fires once, at the first pass, when a fall-back repeats its time. Other
/// patterns (`0 * * * *`, `*/5 …`) fire at each real instant that matches:
/// none inside a skipped hour, both passes of a repeated one.
#[derive(Debug, Clone)]
pub struct Recurrence {
    cron: croner::Cron,
    zone: jiff::tz::TimeZone,
}

impl Recurrence {
    /// Parses a pattern and a zone; an error names the field (`cron`,
    /// `timezone`) and what is wrong.
    pub fn parse(cron: &str, timezone: &str) -> Result<Recurrence, String> {
        if cron.is_empty() || cron.len() > MAX_CRON_LENGTH {
            return Err(format!("cron: must be 1-{MAX_CRON_LENGTH} bytes long"));
        }
        let fields = cron.split_whitespace().count();
        if !(5..=6).contains(&fields) {
            return Err(format!(
                "cron: `{cron}` has {fields} fields; give 5 (minute hour day month weekday) or 6 (seconds first)"
            ));
        }
        let parsed = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Optional)
            .year(croner::parser::Year::Disallowed)
            .build()
            .parse(cron)
            .map_err(|e| format!("cron: `{cron}` is not a valid pattern: {e}"))?;
        let zone = jiff::tz::db()
            .get(timezone)
            .map_err(|_| format!("timezone: `{timezone}` is not an IANA time zone"))?;
        Ok(Recurrence { cron: parsed, zone })
    }

    /// The first tick strictly after `at` (Unix ms); none if the pattern
    /// never matches again (`0 0 30 2 *`) or only past year 9999.
    pub fn next_after(&self, at: i64) -> Option<i64> {
        let from = self.zoned(at.div_euclid(1000) * 1000)?;
        let next = self.cron.find_next_occurrence(&from, false).ok()?;
        Some(next.timestamp().as_millisecond())
    }

    /// The last tick at or before `at`.
    pub fn last_at_or_before(&self, at: i64) -> Option<i64> {
        let from = self.zoned(at.div_euclid(1000) * 1000)?;
        let previous = self.cron.find_previous_occurrence(&from, true).ok()?;
        Some(previous.timestamp().as_millisecond())
    }

    /// The shortest time between two of the `ticks` ticks after `at`: how
    /// often the schedule fires at its densest (patterns repeat, so the
    /// densest stretch shows among the first ticks).
    pub fn shortest_gap(&self, at: i64, ticks: usize) -> Option<i64> {
        let mut previous = self.next_after(at)?;
        let mut shortest = None::<i64>;
        for _ in 1..ticks {
            let Some(next) = self.next_after(previous) else {
                break;
            };
            let gap = next - previous;
            shortest = Some(shortest.map_or(gap, |s| s.min(gap)));
            previous = next;
        }
        shortest
    }

    fn zoned(&self, at: i64) -> Option<jiff::Zoned> {
        let timestamp = jiff::Timestamp::from_millisecond(at).ok()?;
        Some(timestamp.to_zoned(self.zone.clone()))
    }
}

/// Checks a schedule's name: it is used in paths.
pub fn check_schedule_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_SCHEDULE_NAME {
        return Err(format!("name: must be 1-{MAX_SCHEDULE_NAME} bytes long"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(format!(
            "name: `{name}` may hold only letters, digits, `.`, `_` and `-`"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::time::{parse_rfc3339, rfc3339};

    fn at(text: &str) -> i64 {
        parse_rfc3339(text).unwrap()
    }

    /// The ticks after `from` up to `until`, as RFC 3339 (UTC).
    fn ticks(cron: &str, zone: &str, from: &str, until: &str) -> Vec<String> {
        let recurrence = Recurrence::parse(cron, zone).unwrap();
        let mut tick = at(from);
        let mut seen = Vec::new();
        while let Some(next) = recurrence.next_after(tick) {
            if next > at(until) {
                break;
            }
            seen.push(rfc3339(next));
            tick = next;
        }
        seen
    }

    /// Berlin springs forward on 2026-03-29: 02:00 CET becomes 03:00 CEST
    /// (01:00 UTC). 02:30 never happens that day: the fixed-time schedule
    /// fires once, right after the gap; the hourly one fires in each real
    /// hour, so not in the skipped one.
    #[test]
    fn a_skipped_hour_fires_fixed_times_once_after_the_gap() {
        let nightly = ticks(
            "30 2 * * *",
            "Europe/Berlin",
            "2026-03-28T00:00:00Z",
            "2026-03-30T12:00:00Z",
        );
        assert_eq!(
            nightly,
            [
                "2026-03-28T01:30:00.000Z", // 02:30 CET
                "2026-03-29T01:00:00.000Z", // 03:00 CEST, right after the gap
                "2026-03-30T00:30:00.000Z", // 02:30 CEST
            ]
        );
        let hourly = ticks(
            "0 * * * *",
            "Europe/Berlin",
            "2026-03-28T23:30:00Z",
            "2026-03-29T02:30:00Z",
        );
        assert_eq!(
            hourly,
            [
                "2026-03-29T00:00:00.000Z", // 01:00 CET
                "2026-03-29T01:00:00.000Z", // 03:00 CEST
                "2026-03-29T02:00:00.000Z", // 04:00 CEST
            ]
        );
    }

    /// Berlin falls back on 2026-10-25: 03:00 CEST becomes 02:00 CET, so
    /// 02:00-03:00 happens twice. The fixed-time schedule fires once, at
    /// the first pass; the hourly one fires at both.
    #[test]
    fn a_repeated_hour_fires_fixed_times_once_and_intervals_twice() {
        let nightly = ticks(
            "30 2 * * *",
            "Europe/Berlin",
            "2026-10-24T12:00:00Z",
            "2026-10-26T12:00:00Z",
        );
        assert_eq!(
            nightly,
            [
                "2026-10-25T00:30:00.000Z", // 02:30 CEST, first pass
                "2026-10-26T01:30:00.000Z", // 02:30 CET
            ]
        );
        let hourly = ticks(
            "0 * * * *",
            "Europe/Berlin",
            "2026-10-24T23:30:00Z",
            "2026-10-25T02:30:00Z",
        );
        assert_eq!(
            hourly,
            [
                "2026-10-25T00:00:00.000Z", // 02:00 CEST
                "2026-10-25T01:00:00.000Z", // 02:00 CET, the repeat
                "2026-10-25T02:00:00.000Z", // 03:00 CET
            ]
        );
    }

    #[test]
    fn seconds_are_optional_and_bad_patterns_name_the_field() {
        let every_second = Recurrence::parse("* * * * * *", "UTC").unwrap();
        assert_eq!(
            every_second.shortest_gap(at("2026-01-01T00:00:00Z"), 10),
            Some(1000)
        );
        let burst = Recurrence::parse("0,1 0 * * * *", "UTC").unwrap();
        assert_eq!(
            burst.shortest_gap(at("2026-01-01T00:30:00Z"), 100),
            Some(1000)
        );
        let hourly = Recurrence::parse("0 * * * *", "UTC").unwrap();
        assert_eq!(
            hourly.next_after(at("2026-01-01T00:00:00.500Z")),
            Some(at("2026-01-01T01:00:00Z"))
        );
        assert_eq!(
            hourly.last_at_or_before(at("2026-01-01T01:00:00Z")),
            Some(at("2026-01-01T01:00:00Z"))
        );
        for (cron, zone, wanted) in [
            ("* * * *", "UTC", "cron: `* * * *` has 4 fields"),
            (
                "61 * * * *",
                "UTC",
                "cron: `61 * * * *` is not a valid pattern",
            ),
            ("0 0 * * * * 2030", "UTC", "has 7 fields"),
            (
                "0 * * * *",
                "Mars/Olympus",
                "timezone: `Mars/Olympus` is not an IANA time zone",
            ),
        ] {
            let error = Recurrence::parse(cron, zone).unwrap_err();
            assert!(error.contains(wanted), "{error}");
        }
        let too_long = Recurrence::parse(&"0 ".repeat(129), "UTC").unwrap_err();
        assert!(
            too_long.contains("cron: must be 1-256 bytes long"),
            "{too_long}"
        );
        let never = Recurrence::parse("0 0 30 2 *", "UTC").unwrap();
        assert_eq!(never.next_after(at("2026-01-01T00:00:00Z")), None);
    }

    #[test]
    fn names_are_path_safe() {
        assert!(check_schedule_name("nightly-report_v2.1").is_ok());
        assert!(check_schedule_name("").is_err());
        assert!(check_schedule_name("a/b").is_err());
        assert!(check_schedule_name(&"a".repeat(65)).is_err());
    }
}
