//! `PgTimestamp`: PostgreSQL's wire timestamps (microseconds since 2000-01-01 UTC).
//!
//! The replication protocol and pgoutput carry times in this form; events print them as
//! ISO-8601 UTC with microseconds and convert them to Unix time for Kafka.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

/// Microseconds between 1970-01-01 and 2000-01-01.
const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

/// Microseconds since 2000-01-01 00:00:00 UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PgTimestamp(pub i64);

impl PgTimestamp {
    pub fn now() -> Self {
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0);
        PgTimestamp(unix - PG_EPOCH_UNIX_MICROS)
    }

    pub fn unix_micros(self) -> i64 {
        self.0.saturating_add(PG_EPOCH_UNIX_MICROS)
    }

    pub fn unix_millis(self) -> i64 {
        self.unix_micros().div_euclid(1000)
    }
}

/// `(year, month, day)` of the proleptic Gregorian calendar for days since 1970-01-01
/// (H. Hinnant's `civil_from_days`).
pub(crate) fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

impl fmt::Display for PgTimestamp {
    /// `2026-11-22T01:02:03.123456Z`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unix = self.unix_micros();
        let secs = unix.div_euclid(1_000_000);
        let micros = unix.rem_euclid(1_000_000);
        let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
        let sod = secs.rem_euclid(86_400);
        write!(
            f,
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}Z",
            sod / 3600,
            sod / 60 % 60,
            sod % 60
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_pg_epoch_and_later_times() {
        assert_eq!(PgTimestamp(0).to_string(), "2000-01-01T00:00:00.000000Z");
        // 2026-11-22T01:02:03.123456Z
        let unix = 1_795_309_323_123_456_i64;
        let ts = PgTimestamp(unix - PG_EPOCH_UNIX_MICROS);
        assert_eq!(ts.to_string(), "2026-11-22T01:02:03.123456Z");
        assert_eq!(ts.unix_millis(), 1_795_309_323_123);
    }

    #[test]
    fn formats_times_before_the_epoch() {
        assert_eq!(PgTimestamp(-1).to_string(), "1999-12-31T23:59:59.999999Z");
    }
}
