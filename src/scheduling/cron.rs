//! Task schedules: a 5-field cron expression (or @hourly and friends) evaluated in an IANA time zone
//! (default UTC). An expression that never fires, or an unknown zone, is an invalid spec, found when the
//! task is first seen — never a tight loop later.
use std::str::FromStr as _;

use chrono::{TimeZone as _, Utc};
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};

/// A parsed schedule.
#[derive(Debug, Clone)]
pub struct Schedule {
    cron: Cron,
    tz: chrono_tz::Tz,
}

/// Parses `expr` in `timezone`; the error says what is wrong.
pub fn parse(expr: &str, timezone: Option<&str>) -> Result<Schedule, String> {
    let expr = expr.trim();
    let fields = expr.split_whitespace().count();
    if !expr.starts_with('@') && fields != 5 {
        return Err(format!(
            "spec.schedule {expr:?} must have 5 fields (minute hour day-of-month month day-of-week), not {fields}"
        ));
    }
    let cron = CronParser::builder()
        .seconds(Seconds::Disallowed)
        .year(Year::Disallowed)
        .build()
        .parse(expr)
        .map_err(|e| format!("spec.schedule {expr:?}: {e}"))?;
    let zone = timezone
        .map(str::trim)
        .filter(|z| !z.is_empty())
        .unwrap_or("UTC");
    let tz = chrono_tz::Tz::from_str(zone)
        .map_err(|_| format!("spec.timezone {zone:?} is not an IANA time zone"))?;
    let schedule = Schedule { cron, tz };
    // Croner searches at most a year ahead; an expression with no time in it (e.g. 30 February) fails.
    if schedule.next_after(jiff::Timestamp::now()).is_none() {
        return Err(format!("spec.schedule {expr:?} never fires"));
    }
    Ok(schedule)
}

impl Schedule {
    /// The first tick strictly after `t`.
    pub fn next_after(&self, t: jiff::Timestamp) -> Option<jiff::Timestamp> {
        let start = Utc
            .timestamp_millis_opt(t.as_millisecond())
            .single()?
            .with_timezone(&self.tz);
        let next = self.cron.find_next_occurrence(&start, false).ok()?;
        jiff::Timestamp::from_millisecond(next.timestamp_millis()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> jiff::Timestamp {
        s.parse().expect("timestamp")
    }

    #[test]
    fn ticks_follow_the_time_zone() {
        let s = parse("30 9 * * *", Some("Europe/Stockholm")).expect("schedule");
        // 09:30 in Stockholm in winter is 08:30 UTC.
        assert_eq!(
            s.next_after(at("2026-01-10T00:00:00Z")),
            Some(at("2026-01-10T08:30:00Z"))
        );
        let s = parse("*/15 * * * *", None).expect("utc");
        assert_eq!(
            s.next_after(at("2026-01-10T00:00:00Z")),
            Some(at("2026-01-10T00:15:00Z"))
        );
        assert!(parse("@hourly", None).is_ok());
    }

    #[test]
    fn bad_expressions_zones_and_never_firing_schedules_are_refused() {
        assert!(
            parse("* * * *", None)
                .expect_err("4 fields")
                .contains("5 fields")
        );
        assert!(parse("0 * * * * *", None).is_err(), "no seconds field");
        assert!(parse("61 * * * *", None).is_err());
        assert!(
            parse("* * * * *", Some("Mars/Olympus"))
                .expect_err("zone")
                .contains("IANA")
        );
        assert!(
            parse("0 0 30 2 *", None)
                .expect_err("never")
                .contains("never fires")
        );
    }
}
