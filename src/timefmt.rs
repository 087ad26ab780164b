//! Calendar dates of Unix times, in UTC, for the few fixed formats oxserve prints (log lines,
//! metric log lines, worker start times, token expiry, snapshot names).
//!
//! TorchServe gets these from Java's date classes; oxserve needs only UTC and a handful of fixed
//! patterns, so a civil-from-days conversion replaces a date crate (and its time-zone database).

use std::time::{SystemTime, UNIX_EPOCH};

/// (year, month, day, hour, minute, second) of a Unix time in UTC (Howard Hinnant's
/// civil-from-days algorithm).
pub fn civil_utc(secs: u64) -> (i64, i64, i64, u64, u64, u64) {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day, rem / 3600, (rem / 60) % 60, rem % 60)
}

/// `YYYY-MM-DDTHH:MM:SS,mmm` in UTC: log4j2's `%d{ISO8601}`, the time stamp of TorchServe's log
/// and metric log lines.
pub fn log4j_timestamp(secs: u64, millis: u32) -> String {
    let (year, month, day, h, m, s) = civil_utc(secs);
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02},{millis:03}")
}

/// RFC 3339 in UTC with milliseconds, `2026-11-28T12:00:00.123Z`: TorchServe's worker startTime,
/// and what log stores parse natively.
pub fn rfc3339_millis(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let (year, month, day, h, m, s) = civil_utc(d.as_secs());
    format!(
        "{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{:03}Z",
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_are_civil_utc() {
        assert_eq!(
            log4j_timestamp(1_717_105_563, 626),
            "2024-05-30T21:46:03,626"
        );
        assert_eq!(log4j_timestamp(0, 0), "1970-01-01T00:00:00,000");
        // A leap day, and the turn of a century that is not a leap year.
        assert_eq!(civil_utc(951_782_400), (2000, 2, 29, 0, 0, 0));
        assert_eq!(civil_utc(4_107_542_399), (2100, 2, 28, 23, 59, 59));
        assert_eq!(
            rfc3339_millis(UNIX_EPOCH + Duration::from_millis(1_764_331_200_123)),
            "2025-11-28T12:00:00.123Z"
        );
    }
}
