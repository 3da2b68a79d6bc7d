//! The `cron` trigger: a replica count during a recurring window, with KEDA's
//! metadata — `timezone` (IANA name), `start` and `end` (five-field cron expressions),
//! `desiredReplicas`.
//!
//! Inside the window, from the latest `start` up to the next `end` (that is, while the
//! latest start is more recent than the latest end), the metric is `desiredReplicas`
//! against a target of 1, so the desire is exactly `desiredReplicas`, and the trigger
//! is active. Outside it, the metric is 0 and the trigger inactive. Times are
//! evaluated in `timezone`, so a window follows its wall clock across DST changes.
//! Nothing is read from the network: a measurement is computed from the clock.

use std::str::FromStr as _;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use futures::FutureExt as _;
use futures::future::BoxFuture;

use super::params::TriggerParams;
use super::{Measurement, PullTrigger, TriggerError};

/// A parsed `cron` trigger.
#[derive(Clone, Debug)]
pub struct CronConfig {
    pub timezone: Tz,
    pub start: Cron,
    pub end: Cron,
    pub desired_replicas: i64,
}

impl CronConfig {
    /// Parses KEDA's metadata. Pure.
    pub fn parse(params: &TriggerParams) -> Result<Self, TriggerError> {
        let zone = params.required("timezone")?;
        let timezone = Tz::from_str(zone).map_err(|_| {
            TriggerError::InvalidMetadata(format!(
                "metadata.timezone must be an IANA time zone name (Europe/Berlin, UTC), not \
                 {zone:?}"
            ))
        })?;
        let start_text = params.required("start")?;
        let end_text = params.required("end")?;
        if start_text.trim() == end_text.trim() {
            return Err(TriggerError::InvalidMetadata(
                "metadata.start and metadata.end must differ".to_owned(),
            ));
        }
        let start = parse_schedule("start", start_text)?;
        let end = parse_schedule("end", end_text)?;
        params.required("desiredReplicas")?;
        let desired_replicas = params.i64_or("desiredReplicas", 0).and_then(|n| {
            if n < 0 || n > i64::from(i32::MAX) {
                Err(TriggerError::InvalidMetadata(
                    "metadata.desiredReplicas must be a replica count (0 or more)".to_owned(),
                ))
            } else {
                Ok(n)
            }
        })?;
        Ok(Self {
            timezone,
            start,
            end,
            desired_replicas,
        })
    }
}

/// A five-field cron expression (minute hour day-of-month month day-of-week; `@daily`
/// and the like too), as KEDA's cron scaler takes them.
fn parse_schedule(key: &str, text: &str) -> Result<Cron, TriggerError> {
    CronParser::builder()
        .seconds(Seconds::Disallowed)
        .year(Year::Disallowed)
        .build()
        .parse(text)
        .map_err(|e| {
            TriggerError::InvalidMetadata(format!(
                "metadata.{key} must be a five-field cron expression, not {text:?}: {e}"
            ))
        })
}

/// Whether `now` falls inside the window: the latest `start` (at or before `now`) is
/// later than the latest `end`. A start and an end at the same minute close it.
pub fn in_window(now: DateTime<Utc>, config: &CronConfig) -> Result<bool, TriggerError> {
    let local = now.with_timezone(&config.timezone);
    let last = |which: &str, cron: &Cron| {
        cron.find_previous_occurrence(&local, true).map_err(|e| {
            TriggerError::InvalidMetadata(format!(
                "metadata.{which} never occurs before {local}: {e}"
            ))
        })
    };
    let last_start = last("start", &config.start)?;
    let last_end = last("end", &config.end)?;
    Ok(last_start > last_end)
}

/// The measurement at `now`: `desiredReplicas` against a target of 1 inside the
/// window, 0 outside; active inside. Pure.
pub fn window_value(now: DateTime<Utc>, config: &CronConfig) -> Result<Measurement, TriggerError> {
    let inside = in_window(now, config)?;
    let value = if inside {
        config.desired_replicas as f64
    } else {
        0.0
    };
    Ok(Measurement::new(value, 1.0, 0.0).with_active(inside))
}

/// A built `cron` trigger.
#[derive(Debug)]
pub struct CronTrigger {
    config: CronConfig,
}

impl CronTrigger {
    pub fn new(params: &TriggerParams) -> Result<Self, TriggerError> {
        Ok(Self {
            config: CronConfig::parse(params)?,
        })
    }

    pub fn config(&self) -> &CronConfig {
        &self.config
    }
}

impl PullTrigger for CronTrigger {
    fn measure(&self) -> BoxFuture<'_, Result<Measurement, TriggerError>> {
        let result = window_value(Utc::now(), &self.config);
        async move { result }.boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone as _;

    fn params(pairs: &[(&str, &str)]) -> TriggerParams {
        TriggerParams::from_metadata(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        )
    }

    fn config(tz: &str, start: &str, end: &str, desired: &str) -> CronConfig {
        CronConfig::parse(&params(&[
            ("timezone", tz),
            ("start", start),
            ("end", end),
            ("desiredReplicas", desired),
        ]))
        .expect("valid")
    }

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, 0)
            .single()
            .expect("a valid UTC time")
    }

    #[test]
    fn window_table() {
        let office = config("UTC", "0 8 * * 1-5", "0 18 * * 1-5", "5");
        let night = config("UTC", "0 22 * * *", "0 6 * * *", "3");
        // 2026-11-30 is a Monday.
        let table = [
            (&office, utc(2026, 11, 30, 7, 59), false),
            (&office, utc(2026, 11, 30, 8, 0), true),
            (&office, utc(2026, 11, 30, 12, 0), true),
            (&office, utc(2026, 11, 30, 17, 59), true),
            (&office, utc(2026, 11, 30, 18, 0), false),
            (&office, utc(2026, 11, 29, 12, 0), false), // Sunday
            // Wrapping midnight.
            (&night, utc(2026, 11, 30, 21, 59), false),
            (&night, utc(2026, 11, 30, 22, 0), true),
            (&night, utc(2026, 11, 30, 23, 30), true),
            (&night, utc(2026, 12, 1, 3, 0), true),
            (&night, utc(2026, 12, 1, 5, 59), true),
            (&night, utc(2026, 12, 1, 6, 0), false),
            (&night, utc(2026, 12, 1, 12, 0), false),
        ];
        for (config, now, want) in table {
            assert_eq!(in_window(now, config).ok(), Some(want), "{now}");
        }
    }

    #[test]
    fn window_follows_the_wall_clock_across_dst() {
        // Europe/Berlin: CET (UTC+1) until 2026-03-29 02:00, then CEST (UTC+2).
        let early = config("Europe/Berlin", "0 1 * * *", "0 4 * * *", "2");
        let table = [
            // The day before: 03:30 CET is 02:30 UTC, inside.
            (utc(2026, 3, 28, 2, 30), true),
            (utc(2026, 3, 28, 3, 0), false), // 04:00 CET
            // The change day: 01:30 CET = 00:30 UTC inside; 03:30 CEST = 01:30 UTC
            // inside; 04:30 CEST = 02:30 UTC, which was inside the day before, is out.
            (utc(2026, 3, 29, 0, 30), true),
            (utc(2026, 3, 29, 1, 30), true),
            (utc(2026, 3, 29, 2, 0), false), // 04:00 CEST
            (utc(2026, 3, 29, 2, 30), false),
            (utc(2026, 3, 28, 23, 59), false), // 00:59 CET
        ];
        for (now, want) in table {
            assert_eq!(in_window(now, &early).ok(), Some(want), "{now}");
        }
        // New York's window in UTC moves by an hour when its clocks do.
        let ny = config("America/New_York", "0 9 * * *", "0 17 * * *", "1");
        assert_eq!(in_window(utc(2026, 1, 15, 13, 30), &ny).ok(), Some(false)); // 08:30 EST
        assert_eq!(in_window(utc(2026, 7, 15, 13, 30), &ny).ok(), Some(true)); // 09:30 EDT
    }

    #[test]
    fn measurement_gives_desired_replicas_inside() {
        let c = config("UTC", "0 8 * * *", "0 18 * * *", "4");
        let inside = window_value(utc(2026, 11, 30, 9, 0), &c).expect("valid");
        assert_eq!(
            (inside.value, inside.target, inside.active),
            (4.0, 1.0, true)
        );
        let outside = window_value(utc(2026, 11, 30, 19, 0), &c).expect("valid");
        assert_eq!((outside.value, outside.active), (0.0, false));
        let zero = config("UTC", "0 8 * * *", "0 18 * * *", "0");
        let m = window_value(utc(2026, 11, 30, 9, 0), &zero).expect("valid");
        assert_eq!(
            (m.value, m.active),
            (0.0, true),
            "active in the window, as KEDA"
        );
    }

    #[test]
    fn bad_metadata_names_the_key() {
        let base = [
            ("timezone", "UTC"),
            ("start", "0 8 * * *"),
            ("end", "0 18 * * *"),
            ("desiredReplicas", "2"),
        ];
        for (key, value) in [
            ("timezone", "Mars/Olympus"),
            ("start", "every morning"),
            ("end", "0 18 * *"),
            ("start", "0 0 8 * * *"),
            ("desiredReplicas", "two"),
            ("desiredReplicas", "-1"),
            ("end", "0 8 * * *"),
        ] {
            let pairs: Vec<(&str, &str)> = base
                .iter()
                .map(|(k, v)| if *k == key { (*k, value) } else { (*k, *v) })
                .collect();
            let err = CronConfig::parse(&params(&pairs)).expect_err(key);
            assert!(
                matches!(err, TriggerError::InvalidMetadata(_)),
                "{key}: {err:?}"
            );
            assert!(err.to_string().contains(key), "{key}={value}: {err}");
        }
        for missing in ["timezone", "start", "end", "desiredReplicas"] {
            let pairs: Vec<(&str, &str)> = base
                .iter()
                .copied()
                .filter(|(k, _)| *k != missing)
                .collect();
            let err = CronConfig::parse(&params(&pairs)).expect_err(missing);
            assert!(err.to_string().contains(missing), "{err}");
        }
    }
}
