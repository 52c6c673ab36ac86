//! PostgreSQL text forms <-> the numbers Avro carries.
//!
//! Owns the exact, lossless conversion between what a PostgreSQL 15 server prints for
//! `date`, `time`, `timestamp`, `timestamptz`, `numeric` and `money` and the integers (or
//! ISO-8601 strings and two's-complement decimal bytes) that travel in Avro, in both
//! directions. The text forms are those printed under the session settings pgferry
//! pins: `DateStyle=ISO`, `IntervalStyle=iso_8601`, `TimeZone=UTC`,
//! `extra_float_digits=1`, `lc_monetary=C`.
//!
//! Parsers accept what the server prints and reject the rest instead of guessing: a
//! value that looks odd usually means a session setting drifted (a `DMY` date style, a
//! German `lc_monetary` where `1.234` means a thousand), and silently misreading it would
//! corrupt data downstream. Nothing here panics or allocates in proportion to anything
//! but the input: every failure is a [`TextError`].
//!
//! Calendars are proleptic Gregorian with astronomical year numbering internally
//! (1 BC = year 0), exactly as PostgreSQL computes them.

use std::fmt::Write as _;

/// A value that could not be converted; the message says what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TextError(pub String);

const MICROS_PER_SECOND: i64 = 1_000_000;
const MICROS_PER_MINUTE: i64 = 60 * MICROS_PER_SECOND;
const MICROS_PER_HOUR: i64 = 60 * MICROS_PER_MINUTE;
const MICROS_PER_DAY: i64 = 24 * MICROS_PER_HOUR;

/// PostgreSQL's first date, 4714-11-24 BC: Julian day 0.
const MIN_DATE_DAYS: i64 = days_from_civil(-4713, 11, 24);
/// PostgreSQL's last date, 5874897-12-31: the last whose Julian day fits its `int4`.
const MAX_DATE_DAYS: i64 = days_from_civil(5_874_897, 12, 31);
/// PostgreSQL's first timestamp, 4714-11-24 00:00:00 BC.
const MIN_TIMESTAMP_MICROS: i128 = MIN_DATE_DAYS as i128 * MICROS_PER_DAY as i128;
/// One past PostgreSQL's last timestamp (294276-12-31 23:59:59.999999). This lies beyond
/// `i64::MAX` Unix microseconds, so it is kept in `i128`.
const END_TIMESTAMP_MICROS: i128 = days_from_civil(294_277, 1, 1) as i128 * MICROS_PER_DAY as i128;

/// `numeric`'s limits: digits before and after the decimal point.
const NUMERIC_MAX_INT_DIGITS: usize = 131_072;
const NUMERIC_MAX_SCALE: usize = 16_383;

const DATE_EXPECTED: &str = "a date like 2026-11-22, 0044-03-15 BC or infinity";
const TIME_EXPECTED: &str = "a time like 04:05:06 or 04:05:06.789";
const TIMESTAMP_EXPECTED: &str =
    "a timestamp like 2026-11-22 01:02:03.123456, 0044-03-15 12:00:00 BC or infinity";
const TIMESTAMPTZ_EXPECTED: &str =
    "a timestamptz like 2026-11-21 23:02:03.123456+00, 2026-11-22 04:32:03+05:30 or infinity";
const ISO_EXPECTED: &str =
    "an ISO-8601 timestamp like 2026-11-21T23:02:03.123456Z, -0043-03-15T12:00:00.000000Z or infinity";
const NUMERIC_EXPECTED: &str = "a numeric like 12345678.1234, -0.001, NaN or Infinity";
const MONEY_EXPECTED: &str = "a money amount like $1,234.56, -$1,234.56 or 1234.56";

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

/// The input as it appears in error messages: only its size. The value itself may be
/// PHI (a birth date, a lab result), and these messages reach logs and dead-letter
/// headers; the table and column that go with them say where to look.
fn show(s: &str) -> String {
    format!("a value of {} bytes", s.len())
}

fn malformed(expected: &str, s: &str) -> TextError {
    TextError(format!("expected {expected}, got {}", show(s)))
}

fn out_of_range(what: &str, s: &str) -> TextError {
    TextError(format!("{what} out of range: {}", show(s)))
}

// ---------------------------------------------------------------------------------------
// Calendar arithmetic
// ---------------------------------------------------------------------------------------

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
/// Callers keep `year` within a few million, so nothing here can overflow.
const fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

// The inverse of `days_from_civil` is shared with the event timestamps.
use super::StackText;
use crate::timestamp::civil_from_days;

fn is_leap(year: i64) -> bool {
    year.rem_euclid(4) == 0 && (year.rem_euclid(100) != 0 || year.rem_euclid(400) == 0)
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if is_leap(year) => 29,
        2 => 28,
        _ => 0,
    }
}

/// Days since 1970-01-01 of a validated astronomical `(year, month, day)`.
fn checked_days(year: i64, month: u32, day: u32) -> Option<i64> {
    let valid = (1..=12).contains(&month) && day >= 1 && day <= days_in_month(year, month);
    valid.then(|| days_from_civil(year, month, day))
}

/// PostgreSQL prints astronomical year `y <= 0` as `1 - y` with a ` BC` suffix.
fn pg_year(year: i64) -> (i64, bool) {
    if year <= 0 {
        (1 - year, true)
    } else {
        (year, false)
    }
}

/// Splits Unix microseconds into days and microseconds of the day. Callers range-check
/// first, so the day count fits `i64` easily.
fn split_micros(micros: i128) -> (i64, i64) {
    let days = micros.div_euclid(i128::from(MICROS_PER_DAY)) as i64;
    let tod = micros.rem_euclid(i128::from(MICROS_PER_DAY)) as i64;
    (days, tod)
}

/// A finite timestamp as `i64` Unix microseconds. The two extremes are the infinity
/// sentinels, and the top ~30 years of PostgreSQL's range (from 294247-01-10) do not fit
/// at all, because PostgreSQL counts from 2000 rather than 1970.
fn to_i64_micros(micros: i128, what: &str, s: &str) -> Result<i64, TextError> {
    match i64::try_from(micros) {
        Ok(v) if v != i64::MAX && v != i64::MIN => Ok(v),
        _ => Err(TextError(format!(
            "{what} does not fit in 64-bit microseconds since 1970: {}",
            show(s)
        ))),
    }
}

/// `Some(true)` for `infinity`, `Some(false)` for `-infinity`. PostgreSQL prints them in
/// lower case but reads them case-insensitively, so accept either.
fn infinity(s: &str) -> Option<bool> {
    if s.eq_ignore_ascii_case("infinity") || s.eq_ignore_ascii_case("+infinity") {
        Some(true)
    } else if s.eq_ignore_ascii_case("-infinity") {
        Some(false)
    } else {
        None
    }
}

// ---------------------------------------------------------------------------------------
// A byte cursor: all parsing is on bytes so that no multi-byte input can land a slice
// on a non-character boundary.
// ---------------------------------------------------------------------------------------

struct Cursor<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Cursor<'a> {
    fn new(s: &'a str) -> Self {
        Cursor {
            b: s.as_bytes(),
            i: 0,
        }
    }

    fn at_end(&self) -> bool {
        self.i >= self.b.len()
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn eat(&mut self, c: u8) -> bool {
        if self.peek() == Some(c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn eat_bytes(&mut self, t: &[u8]) -> bool {
        if self.b.get(self.i..).is_some_and(|rest| rest.starts_with(t)) {
            self.i += t.len();
            true
        } else {
            false
        }
    }

    /// The run of ASCII digits here, whose length must lie in `min..=max` (`max <= 18`,
    /// so the value fits `u64`). `(value, length)`.
    fn digits(&mut self, min: usize, max: usize) -> Option<(u64, usize)> {
        let start = self.i;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.i += 1;
        }
        let n = self.i - start;
        if n < min || n > max {
            return None;
        }
        let v = self.b[start..self.i]
            .iter()
            .fold(0u64, |acc, &c| acc * 10 + u64::from(c - b'0'));
        Some((v, n))
    }

    fn two_digits(&mut self) -> Option<u32> {
        self.digits(2, 2).map(|(v, _)| v as u32)
    }

    /// `YYYY-MM-DD` with at least four year digits, as PostgreSQL's ISO style zero-pads;
    /// a two-digit year would be a different date style. Not yet validated.
    fn ymd(&mut self) -> Option<(i64, u32, u32)> {
        let (year, _) = self.digits(4, 7)?;
        if !self.eat(b'-') {
            return None;
        }
        let month = self.two_digits()?;
        if !self.eat(b'-') {
            return None;
        }
        let day = self.two_digits()?;
        Some((year as i64, month, day))
    }

    /// `HH:MM:SS[.f]` with 1..=6 fractional digits, as microseconds since midnight.
    /// `24:00:00` is midnight at the end of the day, which PostgreSQL allows.
    fn hms(&mut self) -> Option<i64> {
        let h = self.two_digits()?;
        if !self.eat(b':') {
            return None;
        }
        let m = self.two_digits()?;
        if !self.eat(b':') {
            return None;
        }
        let s = self.two_digits()?;
        let mut frac = 0i64;
        if self.eat(b'.') {
            let (v, n) = self.digits(1, 6)?;
            frac = v as i64 * 10i64.pow(6 - n as u32);
        }
        if h > 24 || m > 59 || s > 59 || (h == 24 && (m, s, frac) != (0, 0, 0)) {
            return None;
        }
        Some(
            i64::from(h) * MICROS_PER_HOUR
                + i64::from(m) * MICROS_PER_MINUTE
                + i64::from(s) * MICROS_PER_SECOND
                + frac,
        )
    }

    /// A UTC offset `±HH[:MM[:SS]]` in microseconds east of UTC. PostgreSQL prints
    /// seconds for local-mean-time zones (`+00:19:32` in old Amsterdam) and caps offsets
    /// at 15:59:59.
    fn offset(&mut self) -> Option<i64> {
        let sign = match self.peek()? {
            b'+' => 1,
            b'-' => -1,
            _ => return None,
        };
        self.i += 1;
        let h = self.two_digits()?;
        let mut m = 0;
        let mut s = 0;
        if self.eat(b':') {
            m = self.two_digits()?;
            if self.eat(b':') {
                s = self.two_digits()?;
            }
        }
        if h > 15 || m > 59 || s > 59 {
            return None;
        }
        Some(
            sign * (i64::from(h) * MICROS_PER_HOUR
                + i64::from(m) * MICROS_PER_MINUTE
                + i64::from(s) * MICROS_PER_SECOND),
        )
    }
}

// ---------------------------------------------------------------------------------------
// date
// ---------------------------------------------------------------------------------------

/// Days since 1970-01-01 of a `date` (ISO: "2026-11-22", "0044-03-15 BC" = year -43 proleptic Gregorian, astronomical year numbering: 1 BC = year 0).
/// "infinity" -> i32::MAX, "-infinity" -> i32::MIN.
pub fn parse_date(s: &str) -> Result<i32, TextError> {
    if let Some((year, month, day)) = plain_ymd(s.as_bytes()) {
        // Years 1-9999 lie well inside PostgreSQL's date range and `i32`.
        return Ok(days_from_civil(year, month, day) as i32);
    }
    parse_date_general(s)
}

/// [`parse_date`] of any text PostgreSQL reads (BC, long years, infinity).
fn parse_date_general(s: &str) -> Result<i32, TextError> {
    match infinity(s) {
        Some(true) => return Ok(i32::MAX),
        Some(false) => return Ok(i32::MIN),
        None => {}
    }
    let mut c = Cursor::new(s);
    let (year, month, day) = c.ymd().ok_or_else(|| malformed(DATE_EXPECTED, s))?;
    let bc = c.eat_bytes(b" BC");
    if !c.at_end() {
        return Err(malformed(DATE_EXPECTED, s));
    }
    let days = pg_date_days(year, bc, month, day).ok_or_else(|| malformed(DATE_EXPECTED, s))?;
    if !(MIN_DATE_DAYS..=MAX_DATE_DAYS).contains(&days) {
        return Err(out_of_range("date", s));
    }
    // The range check above keeps the sentinels i32::MIN/MAX unreachable.
    i32::try_from(days).map_err(|_| out_of_range("date", s))
}

/// Days of a date as PostgreSQL prints it: years count from 1 in both eras, so a year 0
/// is malformed rather than 1 BC.
fn pg_date_days(year: i64, bc: bool, month: u32, day: u32) -> Option<i64> {
    if year == 0 {
        return None;
    }
    checked_days(if bc { 1 - year } else { year }, month, day)
}

/// `n` in decimal, zero-padded to at least `width` digits. Dates, times and numerics
/// are printed with this rather than `write!`: they run for every such value on both
/// sides of Kafka, and `core::fmt`'s machinery cost several percent of the CPU there.
pub(crate) fn push_digits(out: &mut impl std::fmt::Write, mut n: u64, width: usize) {
    let mut buf = [b'0'; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let start = i.min(buf.len().saturating_sub(width));
    // SAFETY: `buf` holds only ASCII digits. (Checking it costs more than the digits
    // do: this runs several times for every date and time of a snapshot.)
    let _ = out.write_str(unsafe { std::str::from_utf8_unchecked(&buf[start..]) });
}

/// `YYYY-MM-DD` (the year at least four digits).
fn push_ymd(out: &mut impl std::fmt::Write, year: u64, month: u32, day: u32) {
    push_digits(out, year, 4);
    let _ = out.write_char('-');
    push_digits(out, u64::from(month), 2);
    let _ = out.write_char('-');
    push_digits(out, u64::from(day), 2);
}

/// Inverse of [`parse_date`]; `i32::MAX`/`i32::MIN` print as `infinity`/`-infinity`.
pub fn format_date(days: i32) -> String {
    match days {
        i32::MAX => "infinity".to_owned(),
        i32::MIN => "-infinity".to_owned(),
        _ => {
            let (y, m, d) = civil_from_days(i64::from(days));
            let (year, bc) = pg_year(y);
            let mut out = String::with_capacity(16);
            push_ymd(&mut out, year as u64, m, d);
            if bc {
                out.push_str(" BC");
            }
            out
        }
    }
}

// ---------------------------------------------------------------------------------------
// time
// ---------------------------------------------------------------------------------------

/// Microseconds since midnight of a `time` ("04:05:06", "04:05:06.789", "24:00:00").
pub fn parse_time(s: &str) -> Result<i64, TextError> {
    let mut c = Cursor::new(s);
    match c.hms() {
        Some(micros) if c.at_end() => Ok(micros),
        _ => Err(malformed(TIME_EXPECTED, s)),
    }
}

/// Inverse of [`parse_time`]: `04:05:06.789` style, fractional digits only as needed,
/// `24:00:00` for 86 400 000 000.
///
/// A value outside `0..=86_400_000_000` cannot come from [`parse_time`]; it is printed
/// with a sign and hours past 24 so that PostgreSQL rejects it loudly instead of the
/// value silently wrapping to another time of day.
pub fn format_time(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let u = micros.unsigned_abs();
    let hours = u / MICROS_PER_HOUR as u64;
    let tod = u % MICROS_PER_HOUR as u64;
    let mut out = String::with_capacity(20);
    out.push_str(sign);
    push_digits(&mut out, hours, 2);
    out.push(':');
    push_min_sec(&mut out, tod);
    out
}

/// `MM:SS[.f]` of microseconds within an hour, with PostgreSQL's trailing-zero trimming.
fn push_min_sec(out: &mut String, micros: u64) {
    let m = micros / MICROS_PER_MINUTE as u64;
    let s = micros / MICROS_PER_SECOND as u64 % 60;
    let mut frac = micros % MICROS_PER_SECOND as u64;
    push_digits(out, m, 2);
    out.push(':');
    push_digits(out, s, 2);
    if frac != 0 {
        let mut width = 6;
        while frac % 10 == 0 {
            frac /= 10;
            width -= 1;
        }
        out.push('.');
        push_digits(out, frac, width);
    }
}

// ---------------------------------------------------------------------------------------
// timestamp and timestamptz
// ---------------------------------------------------------------------------------------

/// Unix microseconds (range-checked against PostgreSQL's timestamp range) of
/// `YYYY-MM-DD HH:MM:SS[.f][±offset][ BC]`, the offset being required iff `with_offset`.
fn parse_pg_datetime(s: &str, with_offset: bool, expected: &str) -> Result<i128, TextError> {
    let mut c = Cursor::new(s);
    let (year, month, day) = c.ymd().ok_or_else(|| malformed(expected, s))?;
    if !c.eat(b' ') {
        return Err(malformed(expected, s));
    }
    let tod = c.hms().ok_or_else(|| malformed(expected, s))?;
    let offset = if with_offset {
        c.offset().ok_or_else(|| malformed(expected, s))?
    } else {
        0
    };
    // PostgreSQL puts the era after the offset: "0044-03-15 12:00:00+00 BC".
    let bc = c.eat_bytes(b" BC");
    if !c.at_end() {
        return Err(malformed(expected, s));
    }
    let days = pg_date_days(year, bc, month, day).ok_or_else(|| malformed(expected, s))?;
    // The range applies to the UTC instant: near the ends a zone's local time can lie
    // outside it while the instant does not.
    let micros =
        i128::from(days) * i128::from(MICROS_PER_DAY) + i128::from(tod) - i128::from(offset);
    if !(MIN_TIMESTAMP_MICROS..END_TIMESTAMP_MICROS).contains(&micros) {
        return Err(out_of_range("timestamp", s));
    }
    Ok(micros)
}

/// PostgreSQL's ISO text of Unix microseconds, `tz` (e.g. `+00`) going before the era.
fn format_pg_datetime(micros: i128, tz: &str) -> String {
    let (days, tod) = split_micros(micros);
    let (y, m, d) = civil_from_days(days);
    let (year, bc) = pg_year(y);
    let tod = tod as u64;
    let mut out = String::with_capacity(36);
    push_ymd(&mut out, year as u64, m, d);
    out.push(' ');
    push_digits(&mut out, tod / MICROS_PER_HOUR as u64, 2);
    out.push(':');
    push_min_sec(&mut out, tod % MICROS_PER_HOUR as u64);
    out.push_str(tz);
    if bc {
        out.push_str(" BC");
    }
    out
}

/// Microseconds since 1970-01-01 00:00:00 of a `timestamp` ("2026-11-22 01:02:03.123456", "2026-11-22 01:02:03", "0044-03-15 12:00:00 BC").
/// "infinity" -> i64::MAX, "-infinity" -> i64::MIN.
///
/// PostgreSQL's last ~30 years (294247-01-10 04:00:54.775807 to 294276-12-31) do not fit
/// `i64` Unix microseconds and are rejected.
pub fn parse_timestamp(s: &str) -> Result<i64, TextError> {
    match infinity(s) {
        Some(true) => return Ok(i64::MAX),
        Some(false) => return Ok(i64::MIN),
        None => {}
    }
    let micros = parse_pg_datetime(s, false, TIMESTAMP_EXPECTED)?;
    to_i64_micros(micros, "timestamp", s)
}

/// Inverse of [`parse_timestamp`]: PostgreSQL's ISO text, trailing fractional zeros
/// trimmed, ` BC` for years before 1; `i64::MAX`/`i64::MIN` print as infinities.
pub fn format_timestamp(micros: i64) -> String {
    match micros {
        i64::MAX => "infinity".to_owned(),
        i64::MIN => "-infinity".to_owned(),
        _ => format_pg_datetime(i128::from(micros), ""),
    }
}

/// A `timestamptz` text ("2026-11-21 23:02:03.123456+00", also offsets like "+05:30", "-03", "+00:00:00" in case the session time zone differs)
/// -> ISO-8601 in UTC with exactly 6 fractional digits: "2026-11-21T23:02:03.123456Z". "infinity"/"-infinity" pass through unchanged.
/// Years beyond 9999 are printed with as many digits as needed; BC years as negative astronomical years ("-0043-03-15T12:00:00.000000Z").
///
/// Unlike [`parse_timestamptz`] this covers PostgreSQL's whole range, up to 294276.
/// The text is formatted on the stack: this runs for every timestamptz value streamed.
pub fn timestamptz_to_iso(s: &str) -> Result<StackText<40>, TextError> {
    if let Some(utc) = Utc::of(s.as_bytes(), b' ', b"+00") {
        // What PostgreSQL writes with TimeZone = UTC (as pgferry's sessions set it).
        let mut frac = *b".000000";
        frac[1..=utc.frac.len()].copy_from_slice(utc.frac);
        let mut out = StackText::new();
        for part in [utc.date, b"T", utc.time, &frac, b"Z"] {
            out.push_ascii(part);
        }
        return Ok(out);
    }
    timestamptz_to_iso_general(s)
}

/// [`timestamptz_to_iso`] of any text PostgreSQL reads (offsets, BC, long years).
fn timestamptz_to_iso_general(s: &str) -> Result<StackText<40>, TextError> {
    let mut out = StackText::new();
    match infinity(s) {
        Some(true) => {
            let _ = out.write_str("infinity");
            return Ok(out);
        }
        Some(false) => {
            let _ = out.write_str("-infinity");
            return Ok(out);
        }
        None => {}
    }
    let micros = parse_pg_datetime(s, true, TIMESTAMPTZ_EXPECTED)?;
    let (days, tod) = split_micros(micros);
    let (y, m, d) = civil_from_days(days);
    // At most "-294276-12-31T23:59:59.999999Z", 30 bytes.
    if y < 0 {
        let _ = out.write_char('-');
    }
    push_ymd(&mut out, y.unsigned_abs(), m, d);
    let tod = tod as u64;
    for (part, sep) in [
        (tod / MICROS_PER_HOUR as u64, 'T'),
        (tod / MICROS_PER_MINUTE as u64 % 60, ':'),
        (tod / MICROS_PER_SECOND as u64 % 60, ':'),
    ] {
        let _ = out.write_char(sep);
        push_digits(&mut out, part, 2);
    }
    let _ = out.write_char('.');
    push_digits(&mut out, tod % MICROS_PER_SECOND as u64, 6);
    let _ = out.write_char('Z');
    Ok(out)
}

/// Microseconds since the Unix epoch of the same text (for consumers that want a number), infinity -> i64::MAX/MIN.
///
/// Instants from 294247-01-10 04:00:54.775807 UTC on do not fit and are rejected.
pub fn parse_timestamptz(s: &str) -> Result<i64, TextError> {
    if let Some(utc) = Utc::of(s.as_bytes(), b' ', b"+00") {
        return Ok(utc.unix_micros());
    }
    parse_timestamptz_general(s)
}

/// [`parse_timestamptz`] of any text PostgreSQL reads (offsets, BC, long years).
fn parse_timestamptz_general(s: &str) -> Result<i64, TextError> {
    match infinity(s) {
        Some(true) => return Ok(i64::MAX),
        Some(false) => return Ok(i64::MIN),
        None => {}
    }
    let micros = parse_pg_datetime(s, true, TIMESTAMPTZ_EXPECTED)?;
    to_i64_micros(micros, "timestamptz", s)
}

/// Inverse for the sink: ISO-8601 UTC (as produced above) -> a text PostgreSQL accepts for timestamptz ("2026-11-21 23:02:03.123456+00"); infinity passes through.
///
/// Also accepts a space for `T`, an explicit `+` on the year and numeric offsets instead
/// of `Z` (converted to UTC), since other producers write those.
pub fn iso_to_timestamptz(s: &str) -> Result<String, TextError> {
    if let Some(utc) = Utc::of(s.as_bytes(), b'T', b"Z") {
        // What pgferry's source writes: PostgreSQL's text of it trims the fraction.
        let frac = &utc.frac[..utc
            .frac
            .iter()
            .rposition(|&d| d != b'0')
            .map_or(0, |i| i + 1)];
        let mut out = Vec::with_capacity(30);
        out.extend_from_slice(utc.date);
        out.push(b' ');
        out.extend_from_slice(utc.time);
        if !frac.is_empty() {
            out.push(b'.');
            out.extend_from_slice(frac);
        }
        out.extend_from_slice(b"+00");
        // SAFETY: `Utc::of` accepted only ASCII digits and separators.
        return Ok(unsafe { String::from_utf8_unchecked(out) });
    }
    iso_to_timestamptz_general(s)
}

/// [`iso_to_timestamptz`] of any ISO-8601 text it reads (offsets, signs, long years).
fn iso_to_timestamptz_general(s: &str) -> Result<String, TextError> {
    match infinity(s) {
        Some(true) => return Ok("infinity".to_owned()),
        Some(false) => return Ok("-infinity".to_owned()),
        None => {}
    }
    let micros = parse_iso(s)?;
    Ok(format_pg_datetime(micros, "+00"))
}

/// The number a run of ASCII digits spells (the caller checked them, and their count).
fn ascii_number(digits: &[u8]) -> u32 {
    digits
        .iter()
        .fold(0, |acc, &c| acc * 10 + u32::from(c - b'0'))
}

/// `(year, month, day)` of exactly `YYYY-MM-DD`, year 1 to 9999 and a real calendar
/// day: the common shape of a date's text, for the shortcuts that leave the rest (BC,
/// long years, infinity) to the general way.
fn plain_ymd(date: &[u8]) -> Option<(i64, u32, u32)> {
    let shape_ok = date.len() == 10
        && date[4] == b'-'
        && date[7] == b'-'
        && [0, 1, 2, 3, 5, 6, 8, 9]
            .iter()
            .all(|&i| date[i].is_ascii_digit());
    if !shape_ok {
        return None;
    }
    let n = ascii_number;
    let (year, month, day) = (i64::from(n(&date[..4])), n(&date[5..7]), n(&date[8..]));
    let valid =
        year >= 1 && (1..=12).contains(&month) && day >= 1 && day <= days_in_month(year, month);
    valid.then_some((year, month, day))
}

/// The common shape of a UTC timestamp's text, taken apart without arithmetic:
/// `YYYY-MM-DD<sep>HH:MM:SS[.f{1,6}]<suffix>`, year 1 to 9999, a real calendar day,
/// hours to 23 and seconds to 59. Anything else (other offsets, BC, leap seconds,
/// `24:00:00`, long years) is `None` and goes the general way, which stays the
/// reference: for what this accepts both give the same text (tested below).
struct Utc<'a> {
    date: &'a [u8],
    time: &'a [u8],
    /// The fraction's digits, possibly none.
    frac: &'a [u8],
    /// The numbers of `date` and `time`, as checked.
    ymd: (i64, u32, u32),
    hms: [u32; 3],
}

impl<'a> Utc<'a> {
    fn of(b: &'a [u8], sep: u8, suffix: &[u8]) -> Option<Utc<'a>> {
        let body = b.strip_suffix(suffix)?;
        if body.len() < 19 || body[10] != sep {
            return None;
        }
        let (date, rest) = body.split_at(10);
        let (time, frac) = rest[1..].split_at(8);
        let frac = match frac {
            [] => frac,
            [b'.', digits @ ..] if (1..=6).contains(&digits.len()) => digits,
            _ => return None,
        };
        let ymd = plain_ymd(date)?;
        let shape_ok = time[2] == b':'
            && time[5] == b':'
            && [0, 1, 3, 4, 6, 7].iter().all(|&i| time[i].is_ascii_digit())
            && frac.iter().all(u8::is_ascii_digit);
        if !shape_ok {
            return None;
        }
        let hms = [&time[..2], &time[3..5], &time[6..]].map(ascii_number);
        let valid = hms[0] <= 23 && hms[1] <= 59 && hms[2] <= 59;
        valid.then_some(Utc {
            date,
            time,
            frac,
            ymd,
            hms,
        })
    }

    /// Microseconds since the Unix epoch (years 1-9999 always fit).
    fn unix_micros(&self) -> i64 {
        let (year, month, day) = self.ymd;
        let [h, m, sec] = self.hms.map(i64::from);
        let frac = i64::from(ascii_number(self.frac)) * 10i64.pow(6 - self.frac.len() as u32);
        days_from_civil(year, month, day) * MICROS_PER_DAY
            + h * MICROS_PER_HOUR
            + m * MICROS_PER_MINUTE
            + sec * MICROS_PER_SECOND
            + frac
    }
}

/// Unix microseconds of an ISO-8601 timestamp, range-checked against PostgreSQL's range.
fn parse_iso(s: &str) -> Result<i128, TextError> {
    let mut c = Cursor::new(s);
    let negative = match c.peek() {
        Some(b'-') => {
            c.i += 1;
            true
        }
        Some(b'+') => {
            c.i += 1;
            false
        }
        _ => false,
    };
    let (year, month, day) = c.ymd().ok_or_else(|| malformed(ISO_EXPECTED, s))?;
    if !(c.eat(b'T') || c.eat(b' ')) {
        return Err(malformed(ISO_EXPECTED, s));
    }
    let tod = c.hms().ok_or_else(|| malformed(ISO_EXPECTED, s))?;
    let offset = if c.eat(b'Z') {
        0
    } else {
        c.offset().ok_or_else(|| malformed(ISO_EXPECTED, s))?
    };
    if !c.at_end() {
        return Err(malformed(ISO_EXPECTED, s));
    }
    let year = if negative { -year } else { year };
    let days = checked_days(year, month, day).ok_or_else(|| malformed(ISO_EXPECTED, s))?;
    let micros =
        i128::from(days) * i128::from(MICROS_PER_DAY) + i128::from(tod) - i128::from(offset);
    if !(MIN_TIMESTAMP_MICROS..END_TIMESTAMP_MICROS).contains(&micros) {
        return Err(out_of_range("timestamp", s));
    }
    Ok(micros)
}

// ---------------------------------------------------------------------------------------
// numeric
// ---------------------------------------------------------------------------------------

/// A `numeric` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Numeric {
    /// unscaled value as minimal two's-complement big-endian bytes (Avro decimal encoding; java BigInteger.toByteArray()), and the scale (digits after the point)
    Finite {
        unscaled: Vec<u8>,
        scale: u32,
    },
    NaN,
    Infinity,
    NegInfinity,
}

/// PostgreSQL prints `NaN`, `Infinity`, `-Infinity` but reads the spellings below
/// case-insensitively.
fn numeric_special(s: &str) -> Option<Numeric> {
    let is = |t: &str| s.eq_ignore_ascii_case(t);
    if is("NaN") {
        Some(Numeric::NaN)
    } else if is("Infinity") || is("+Infinity") || is("inf") || is("+inf") {
        Some(Numeric::Infinity)
    } else if is("-Infinity") || is("-inf") {
        Some(Numeric::NegInfinity)
    } else {
        None
    }
}

/// A finite numeric text split into sign, integer digits and fractional digits (ASCII).
struct DecimalText<'a> {
    negative: bool,
    int: &'a [u8],
    frac: &'a [u8],
}

/// Splits `-?\d+(\.\d+)?`, the only finite form `numeric_out` produces (never an
/// exponent, never a bare point), enforcing `numeric`'s digit limits.
fn split_decimal(s: &str) -> Result<DecimalText<'_>, TextError> {
    let b = s.as_bytes();
    let (negative, rest) = match b.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, b),
    };
    let (int, frac) = match rest.iter().position(|&c| c == b'.') {
        Some(dot) => (&rest[..dot], &rest[dot + 1..]),
        None => (rest, &rest[rest.len()..]),
    };
    let all_digits = |d: &[u8]| d.iter().all(u8::is_ascii_digit);
    let has_dot = int.len() != rest.len();
    if int.is_empty() || !all_digits(int) || !all_digits(frac) || (has_dot && frac.is_empty()) {
        return Err(malformed(NUMERIC_EXPECTED, s));
    }
    if int.len() > NUMERIC_MAX_INT_DIGITS || frac.len() > NUMERIC_MAX_SCALE {
        return Err(out_of_range("numeric", s));
    }
    Ok(DecimalText {
        negative,
        int,
        frac,
    })
}

/// Parse numeric text: "12345678.1234", "-0.001", "0", "NaN", "Infinity", "-Infinity",
/// arbitrarily many digits (numeric allows up to 131072 digits before the point and 16383 after; handle at least ~1000-digit values correctly and efficiently, i.e. implement decimal-string -> base-256 conversion yourself, no bignum crate).
pub fn parse_numeric(s: &str) -> Result<Numeric, TextError> {
    if let Some(special) = numeric_special(s) {
        return Ok(special);
    }
    let t = split_decimal(s)?;
    let mut digits = Vec::with_capacity(t.int.len() + t.frac.len());
    digits.extend_from_slice(t.int);
    digits.extend_from_slice(t.frac);
    Ok(Numeric::Finite {
        unscaled: decimal_to_twos_complement(t.negative, &digits),
        // split_decimal bounds this by NUMERIC_MAX_SCALE.
        scale: t.frac.len() as u32,
    })
}

/// Like [`parse_numeric`] but rescaled to exactly `scale` digits (for `numeric(p,s)`
/// columns): fewer fractional digits are padded with zeros, more are an error unless
/// the surplus digits are all zero, since dropping them would change the value.
/// `NaN` and the infinities pass through; the caller decides whether the column type
/// can carry them.
pub fn parse_numeric_scaled(s: &str, scale: u32) -> Result<Numeric, TextError> {
    let target = scale as usize;
    if target > NUMERIC_MAX_SCALE {
        return Err(TextError(format!(
            "numeric scale {scale} exceeds PostgreSQL's maximum of {NUMERIC_MAX_SCALE}"
        )));
    }
    if let Some(special) = numeric_special(s) {
        return Ok(special);
    }
    let t = split_decimal(s)?;
    let (kept, dropped) = t.frac.split_at(t.frac.len().min(target));
    if dropped.iter().any(|&c| c != b'0') {
        return Err(TextError(format!(
            "numeric has more than {scale} fractional digits: {}",
            show(s)
        )));
    }
    let mut digits = Vec::with_capacity(t.int.len() + target);
    digits.extend_from_slice(t.int);
    digits.extend_from_slice(kept);
    digits.resize(t.int.len() + target, b'0');
    Ok(Numeric::Finite {
        unscaled: decimal_to_twos_complement(t.negative, &digits),
        scale,
    })
}

/// Inverse: unscaled two's-complement big-endian bytes + scale -> PostgreSQL numeric text
/// ("-0.001", "12345678.1234"; "0.00" keeps the scale's zeros as PostgreSQL does).
///
/// Empty bytes read as zero. A scale beyond `numeric`'s 16383 cannot be stored exactly,
/// so such values come out in exponent form (`123e-20000`): compact rather than a
/// gigabyte of zeros, and PostgreSQL rejects it instead of silently rounding.
pub fn format_decimal(unscaled: &[u8], scale: u32) -> String {
    // Up to 16 bytes (every `numeric` a row is likely to hold) fit an i128: its digits
    // come without the big-number division and its four allocations.
    let mut small = StackText::<40>::new();
    let (negative, big);
    let digits: &str = if unscaled.len() <= 16 {
        let v = small_unscaled(unscaled);
        negative = v < 0;
        push_digits_u128(&mut small, v.unsigned_abs());
        &small
    } else {
        let (n, magnitude) = twos_complement_to_magnitude(unscaled);
        negative = n;
        big = magnitude_to_decimal(&magnitude);
        &big
    };
    let sign = if negative { "-" } else { "" };
    let scale_len = scale as usize;
    if scale_len > NUMERIC_MAX_SCALE {
        return format!("{sign}{digits}e-{scale}");
    }
    let mut out = String::with_capacity(digits.len() + scale_len + 3);
    out.push_str(sign);
    if scale_len == 0 {
        out.push_str(digits);
    } else if digits.len() > scale_len {
        // `digits` is ASCII, so any byte index is a character boundary.
        let (int, frac) = digits.split_at(digits.len() - scale_len);
        out.push_str(int);
        out.push('.');
        out.push_str(frac);
    } else {
        out.push_str("0.");
        out.extend(std::iter::repeat_n('0', scale_len - digits.len()));
        out.push_str(digits);
    }
    out
}

/// A big-endian two's complement of at most 16 bytes (empty: zero).
fn small_unscaled(b: &[u8]) -> i128 {
    let negative = b.first().is_some_and(|&x| x & 0x80 != 0);
    b.iter().fold(if negative { -1 } else { 0 }, |v: i128, &x| {
        (v << 8) | i128::from(x)
    })
}

/// The decimal digits of `n`, at least one: by [`push_digits`], 19 digits at a time
/// (a `u128` division costs many `u64` ones).
fn push_digits_u128(out: &mut impl std::fmt::Write, n: u128) {
    const TEN_19: u128 = 10_000_000_000_000_000_000;
    match u64::try_from(n) {
        Ok(n) => push_digits(out, n, 1),
        Err(_) => {
            push_digits_u128(out, n / TEN_19);
            push_digits(out, (n % TEN_19) as u64, 19);
        }
    }
}

/// PostgreSQL's text of a whole number (what `to_string` gives, without the
/// formatting machinery).
pub fn format_integer(n: i64) -> String {
    let mut out = String::with_capacity(20);
    if n < 0 {
        out.push('-');
    }
    push_digits(&mut out, n.unsigned_abs(), 1);
    out
}

/// Nine decimal digits per `u32` limb keeps every intermediate product in `u64`, so both
/// conversions use plain machine multiplication and division.
const LIMB_DECIMAL: u64 = 1_000_000_000;
const LIMB_DIGITS: usize = 9;

/// Minimal two's-complement big-endian bytes of a (possibly negated) ASCII digit string.
fn decimal_to_twos_complement(negative: bool, digits: &[u8]) -> Vec<u8> {
    // Little-endian base-2^32 limbs; each 9-digit chunk is folded in as x = x*10^k + chunk.
    let mut limbs: Vec<u32> = Vec::with_capacity(digits.len() / 9 + 1);
    let first = match digits.len() % LIMB_DIGITS {
        0 => LIMB_DIGITS,
        n => n,
    };
    let mut start = 0;
    let mut len = first.min(digits.len());
    while start < digits.len() {
        let chunk = digits[start..start + len]
            .iter()
            .fold(0u64, |acc, &c| acc * 10 + u64::from(c - b'0'));
        let mul = 10u64.pow(len as u32);
        let mut carry = chunk;
        for limb in &mut limbs {
            let t = u64::from(*limb) * mul + carry;
            *limb = t as u32;
            carry = t >> 32;
        }
        if carry != 0 {
            limbs.push(carry as u32);
        }
        start += len;
        len = LIMB_DIGITS;
    }
    let mut magnitude: Vec<u8> = Vec::with_capacity(limbs.len() * 4 + 1);
    for limb in limbs.iter().rev() {
        magnitude.extend_from_slice(&limb.to_be_bytes());
    }
    magnitude_to_twos_complement(negative, magnitude)
}

/// Two's complement of a big-endian magnitude, minimal.
fn magnitude_to_twos_complement(negative: bool, magnitude: Vec<u8>) -> Vec<u8> {
    // A leading zero byte leaves room for the sign bit; minimize() drops it if unneeded.
    let mut v = Vec::with_capacity(magnitude.len() + 1);
    v.push(0u8);
    v.extend_from_slice(&magnitude);
    if negative {
        negate_in_place(&mut v);
    }
    minimize(&v)
}

/// Two's-complement negation of a big-endian integer (invert, add one).
fn negate_in_place(v: &mut [u8]) {
    let mut carry = true;
    for byte in v.iter_mut().rev() {
        let (sum, overflow) = (!*byte).overflowing_add(u8::from(carry));
        *byte = sum;
        carry = overflow;
    }
}

/// Drops leading bytes that only repeat the sign, as `BigInteger.toByteArray()` does;
/// zero is `[0x00]`.
fn minimize(b: &[u8]) -> Vec<u8> {
    let mut i = 0;
    while i + 1 < b.len()
        && ((b[i] == 0x00 && b[i + 1] & 0x80 == 0) || (b[i] == 0xFF && b[i + 1] & 0x80 != 0))
    {
        i += 1;
    }
    if b.is_empty() {
        vec![0]
    } else {
        b[i..].to_vec()
    }
}

/// `(negative, big-endian magnitude)` of two's-complement bytes.
fn twos_complement_to_magnitude(b: &[u8]) -> (bool, Vec<u8>) {
    let negative = b.first().is_some_and(|&x| x & 0x80 != 0);
    let mut magnitude = b.to_vec();
    if negative {
        // Fits in the same width: |-2^(8n-1)| = 2^(8n-1) < 2^(8n).
        negate_in_place(&mut magnitude);
    }
    (negative, magnitude)
}

/// Decimal digits of a big-endian magnitude, `"0"` for zero.
fn magnitude_to_decimal(magnitude: &[u8]) -> String {
    let mut limbs: Vec<u32> = Vec::with_capacity(magnitude.len() / 4 + 1);
    for chunk in magnitude.rchunks(4) {
        limbs.push(chunk.iter().fold(0u32, |acc, &c| (acc << 8) | u32::from(c)));
    }
    // Repeated division by 10^9 yields nine digits per pass, least significant first.
    let mut groups: Vec<u32> = Vec::with_capacity(limbs.len() * 32 / 29 + 1);
    loop {
        while limbs.last() == Some(&0) {
            limbs.pop();
        }
        if limbs.is_empty() {
            break;
        }
        let mut rem = 0u64;
        for limb in limbs.iter_mut().rev() {
            let cur = (rem << 32) | u64::from(*limb);
            *limb = (cur / LIMB_DECIMAL) as u32;
            rem = cur % LIMB_DECIMAL;
        }
        groups.push(rem as u32);
    }
    let mut out = String::with_capacity(groups.len() * LIMB_DIGITS + 1);
    match groups.split_last() {
        None => out.push('0'),
        Some((top, rest)) => {
            push_digits(&mut out, u64::from(*top), 1);
            for g in rest.iter().rev() {
                push_digits(&mut out, u64::from(*g), LIMB_DIGITS);
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// money
// ---------------------------------------------------------------------------------------

/// A `money` value printed with lc_monetary=C: "$1,234.56", "-$1,234.56", "$0.00", "-$92,233,720,368,547,758.08" (the minimum, i64::MIN cents).
/// -> the unscaled amount in cents (i64) — scale is always 2 with lc_monetary=C.
/// Also accept the plain forms "1234.56" / "-1234.56" in case a server prints money without symbol.
///
/// Thousands separators must sit every three digits and exactly two fractional digits
/// are required: under another `lc_monetary` "1.234,56" or "¥1,235" would otherwise be
/// misread by orders of magnitude instead of rejected.
pub fn parse_money(s: &str) -> Result<i64, TextError> {
    let b = s.as_bytes();
    let (negative, b) = match b.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, b),
    };
    let b = b.strip_prefix(b"$").unwrap_or(b);
    let Some(dot) = b.iter().position(|&c| c == b'.') else {
        return Err(malformed(MONEY_EXPECTED, s));
    };
    let (int, frac) = (&b[..dot], &b[dot + 1..]);
    if frac.len() != 2 || !frac.iter().all(u8::is_ascii_digit) {
        return Err(malformed(MONEY_EXPECTED, s));
    }
    let groups: Vec<&[u8]> = int.split(|&c| c == b',').collect();
    let grouped_ok = groups.iter().enumerate().all(|(i, g)| {
        let len_ok = match (i, groups.len()) {
            (_, 1) => !g.is_empty(),
            (0, _) => (1..=3).contains(&g.len()),
            _ => g.len() == 3,
        };
        len_ok && g.iter().all(u8::is_ascii_digit)
    });
    if !grouped_ok {
        return Err(malformed(MONEY_EXPECTED, s));
    }
    // 30 digits cannot overflow i128 and already exceed any i64.
    let digit_count = int.len() - (groups.len() - 1);
    if digit_count > 30 {
        return Err(out_of_range("money", s));
    }
    let cents = int
        .iter()
        .chain(frac)
        .filter(|c| c.is_ascii_digit())
        .fold(0i128, |acc, &c| acc * 10 + i128::from(c - b'0'));
    let cents = if negative { -cents } else { cents };
    i64::try_from(cents).map_err(|_| out_of_range("money", s))
}

/// Minimal two's-complement big-endian bytes of an i64 (helper used for money -> Avro decimal bytes).
pub fn i64_to_be_bytes_minimal(v: i64) -> Vec<u8> {
    minimize(&v.to_be_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// splitmix64: deterministic, dependency-free, good enough to spread test values.
    struct Rng(u64);

    impl Rng {
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        /// Uniform-ish in `lo..=hi` (modulo bias is irrelevant here).
        fn range(&mut self, lo: i128, hi: i128) -> i128 {
            let span = (hi - lo + 1) as u128;
            let r = (u128::from(self.next_u64()) << 64) | u128::from(self.next_u64());
            lo + (r % span) as i128
        }

        fn i128(&mut self) -> i128 {
            ((u128::from(self.next_u64()) << 64) | u128::from(self.next_u64())) as i128
        }
    }

    // ---- calendar ------------------------------------------------------------------

    #[test]
    fn calendar_constants_match_postgresql() {
        // The Julian day number of 1970-01-01 is 2440588, and PostgreSQL's first date is
        // Julian day 0.
        assert_eq!(MIN_DATE_DAYS, -2_440_588);
        // PostgreSQL's DATE_END_JULIAN is 2147483494 (5874898-01-01).
        assert_eq!(MAX_DATE_DAYS, 2_147_483_494 - 1 - 2_440_588);
        // PostgreSQL's END_TIMESTAMP is 9223371331200000000 µs after 2000-01-01.
        assert_eq!(
            END_TIMESTAMP_MICROS,
            9_223_371_331_200_000_000i128 + 946_684_800_000_000
        );
        assert_eq!(
            MIN_TIMESTAMP_MICROS,
            -211_813_488_000_000_000i128 + 946_684_800_000_000
        );
    }

    #[test]
    fn civil_round_trip_is_exact_across_eras() {
        for days in (-3_000_000i64..3_000_000).step_by(97) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
            assert_eq!(checked_days(y, m, d), Some(days));
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(1, 1, 1), -719_162);
    }

    // ---- date ----------------------------------------------------------------------

    #[test]
    fn date_known_values() {
        assert_eq!(parse_date("1970-01-01"), Ok(0));
        assert_eq!(parse_date("1970-01-02"), Ok(1));
        assert_eq!(parse_date("1969-12-31"), Ok(-1));
        assert_eq!(parse_date("2026-11-22"), Ok(20_779));
        assert_eq!(parse_date("0001-01-01"), Ok(-719_162));
        // 1 BC is astronomical year 0, immediately before AD 1.
        assert_eq!(parse_date("0001-12-31 BC"), Ok(-719_163));
        assert_eq!(
            parse_date("0044-03-15 BC"),
            Ok(days_from_civil(-43, 3, 15) as i32)
        );
        assert_eq!(parse_date("4714-11-24 BC"), Ok(-2_440_588));
        assert_eq!(parse_date("5874897-12-31"), Ok(2_145_042_905));
        assert_eq!(parse_date("infinity"), Ok(i32::MAX));
        assert_eq!(parse_date("-infinity"), Ok(i32::MIN));
        assert_eq!(parse_date("Infinity"), Ok(i32::MAX));
        assert_eq!(format_date(i32::MAX), "infinity");
        assert_eq!(format_date(i32::MIN), "-infinity");
        assert_eq!(format_date(0), "1970-01-01");
        assert_eq!(format_date(-719_163), "0001-12-31 BC");
    }

    #[test]
    fn date_round_trips() {
        for s in [
            "1970-01-01",
            "2026-11-22",
            "2024-02-29",
            "2000-02-29",
            "1900-02-28",
            "1900-03-01",
            "1600-02-29",
            "0001-01-01",
            "0001-12-31 BC",
            "0001-02-29 BC",
            "0005-02-29 BC",
            "0044-03-15 BC",
            "0999-12-31",
            "1000-01-01",
            "9999-12-31",
            "10000-01-01",
            "12345-06-07",
            "275760-09-13",
            "4714-11-24 BC",
            "4713-01-01 BC",
            "5874897-12-31",
            "infinity",
            "-infinity",
        ] {
            let days = parse_date(s).unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(format_date(days), s);
        }
    }

    #[test]
    fn date_leap_days() {
        assert_eq!(
            parse_date("1900-02-28").map(|d| d + 1),
            parse_date("1900-03-01")
        );
        assert_eq!(
            parse_date("2000-02-28").map(|d| d + 2),
            parse_date("2000-03-01")
        );
        assert!(parse_date("1900-02-29").is_err());
        assert!(parse_date("2023-02-29").is_err());
        assert!(parse_date("2100-02-29").is_err());
        // Astronomical year -1 (2 BC) is not a leap year; year -4 (5 BC) is.
        assert!(parse_date("0002-02-29 BC").is_err());
        assert!(parse_date("0005-02-29 BC").is_ok());
        assert_eq!(
            format_date(parse_date("2024-02-28").unwrap() + 1),
            "2024-02-29"
        );
    }

    #[test]
    fn date_rejects_malformed_and_out_of_range() {
        for s in [
            "",
            " ",
            "garbage",
            "2026-13-01",
            "2026-00-01",
            "2026-01-00",
            "2026-04-31",
            "2026-1-01",
            "2026-01-1",
            "26-01-01",
            "026-01-01",
            "2026/01/01",
            "2026-01-01 ",
            " 2026-01-01",
            "2026-01-01 AD",
            "2026-01-01 bc",
            "2026-01-01BC",
            "0000-01-01",
            "0000-01-01 BC",
            "2026-01-01 00:00:00",
            "infinityx",
            "-2026-01-01",
            "２０２６-01-01",
            "2026-01-0\u{e9}",
            "99999999-01-01",
            "4714-11-23 BC",
            "4715-01-01 BC",
            "5874898-01-01",
        ] {
            assert!(parse_date(s).is_err(), "{s:?} should be rejected");
        }
        let e = parse_date("2026-13-01").unwrap_err();
        // The message says what was expected and how long the value was, never the
        // value itself (it may be PHI).
        assert!(
            !e.0.contains("2026-13-01") && e.0.contains("expected") && e.0.contains("10 bytes"),
            "{e}"
        );
    }

    #[test]
    fn format_date_never_panics() {
        for d in [i32::MAX - 1, i32::MIN + 1, 0, -1, 1] {
            let _ = format_date(d);
        }
    }

    /// The hand-rolled digit printing against `format!`'s padding, over values spread
    /// across PostgreSQL's whole range (the formatters these replaced, kept as oracles).
    #[test]
    fn digit_printing_matches_format_padding() {
        let mut seed = 0x9E37_79B9_7F4A_7C15_u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let span = (END_TIMESTAMP_MICROS - MIN_TIMESTAMP_MICROS) as u128;
        for i in 0..20_000u64 {
            let n = next();
            let mut p = String::new();
            push_digits(&mut p, n >> (i % 64), (i % 12) as usize);
            assert_eq!(p, format!("{:0w$}", n >> (i % 64), w = (i % 12) as usize));

            // Every fourth value on a whole second or millisecond, to trim zeros.
            let mut micros = MIN_TIMESTAMP_MICROS + (u128::from(n) % span) as i128;
            match i % 4 {
                0 => micros -= micros.rem_euclid(1_000_000),
                1 => micros -= micros.rem_euclid(1_000),
                _ => {}
            }
            let (days, tod) = split_micros(micros);
            let (y, m, d) = civil_from_days(days);
            let (year, bc) = pg_year(y);
            let tod = tod as u64;
            let frac = tod % MICROS_PER_SECOND as u64;
            let mut want = format!(
                "{year:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
                tod / MICROS_PER_HOUR as u64,
                tod / MICROS_PER_MINUTE as u64 % 60,
                tod / MICROS_PER_SECOND as u64 % 60
            );
            if frac != 0 {
                want.push('.');
                want.push_str(format!("{frac:06}").trim_end_matches('0'));
            }
            want.push_str("+00");
            if bc {
                want.push_str(" BC");
            }
            assert_eq!(format_pg_datetime(micros, "+00"), want);
            let iso = format!(
                "{}{:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{frac:06}Z",
                if y < 0 { "-" } else { "" },
                y.unsigned_abs(),
                tod / MICROS_PER_HOUR as u64,
                tod / MICROS_PER_MINUTE as u64 % 60,
                tod / MICROS_PER_SECOND as u64 % 60
            );
            assert_eq!(&*timestamptz_to_iso(&want).unwrap(), iso, "{want}");
            assert_eq!(iso_to_timestamptz(&iso).unwrap(), want);
            if let Ok(days) = i32::try_from(days) {
                let date = format!("{year:04}-{m:02}-{d:02}{}", if bc { " BC" } else { "" });
                assert_eq!(format_date(days), date);
            }
        }
    }

    // ---- time ----------------------------------------------------------------------

    #[test]
    fn time_round_trips() {
        for (s, micros) in [
            ("00:00:00", 0),
            ("04:05:06", 14_706_000_000),
            ("04:05:06.7", 14_706_700_000),
            ("04:05:06.78", 14_706_780_000),
            ("04:05:06.789", 14_706_789_000),
            ("04:05:06.7891", 14_706_789_100),
            ("04:05:06.78912", 14_706_789_120),
            ("04:05:06.789123", 14_706_789_123),
            ("04:05:06.000001", 14_706_000_001),
            ("04:05:06.1", 14_706_100_000),
            ("23:59:59.999999", 86_399_999_999),
            ("24:00:00", 86_400_000_000),
        ] {
            assert_eq!(parse_time(s), Ok(micros), "{s}");
            assert_eq!(format_time(micros), s);
        }
        // Trailing zeros are accepted on input and trimmed on output, like PostgreSQL.
        assert_eq!(parse_time("04:05:06.500000"), Ok(14_706_500_000));
        assert_eq!(format_time(14_706_500_000), "04:05:06.5");
        assert_eq!(parse_time("24:00:00.000"), Ok(86_400_000_000));
    }

    #[test]
    fn time_rejects_malformed() {
        for s in [
            "",
            "garbage",
            "25:00:00",
            "24:00:01",
            "24:00:00.000001",
            "24:01:00",
            "23:60:00",
            "23:59:60",
            "4:05:06",
            "04:5:06",
            "04:05:6",
            "04:05",
            "04:05:06.",
            "04:05:06.1234567",
            "04:05:06+00",
            "04:05:06 ",
            "-04:05:06",
            "04-05-06",
            "04:05:06.12a",
            "\u{e9}",
        ] {
            assert!(parse_time(s).is_err(), "{s:?} should be rejected");
        }
    }

    #[test]
    fn format_time_out_of_range_is_visible() {
        assert_eq!(format_time(-1), "-00:00:00.000001");
        assert_eq!(format_time(86_400_000_001), "24:00:00.000001");
        assert!(parse_time(&format_time(-1)).is_err());
        assert!(parse_time(&format_time(86_400_000_001)).is_err());
        assert!(parse_time(&format_time(i64::MAX)).is_err());
        assert!(parse_time(&format_time(i64::MIN)).is_err());
    }

    // ---- timestamp -----------------------------------------------------------------

    #[test]
    fn timestamp_known_values() {
        assert_eq!(parse_timestamp("1970-01-01 00:00:00"), Ok(0));
        assert_eq!(parse_timestamp("1969-12-31 23:59:59.999999"), Ok(-1));
        assert_eq!(
            parse_timestamp("2026-11-22 01:02:03.123456"),
            Ok(20_779 * MICROS_PER_DAY + 3_723_123_456)
        );
        assert_eq!(
            parse_timestamp("2000-01-01 00:00:00"),
            Ok(946_684_800_000_000)
        );
        assert_eq!(parse_timestamp("infinity"), Ok(i64::MAX));
        assert_eq!(parse_timestamp("-infinity"), Ok(i64::MIN));
        assert_eq!(format_timestamp(i64::MAX), "infinity");
        assert_eq!(format_timestamp(i64::MIN), "-infinity");
        // 24:00:00 is midnight of the next day on input; PostgreSQL never prints it.
        assert_eq!(
            parse_timestamp("2026-11-22 24:00:00"),
            parse_timestamp("2026-11-23 00:00:00")
        );
    }

    #[test]
    fn timestamp_round_trips() {
        for s in [
            "2026-11-22 01:02:03.123456",
            "2026-11-22 01:02:03",
            "2026-11-22 01:02:03.1",
            "2026-11-22 01:02:03.12",
            "2026-11-22 01:02:03.123",
            "2026-11-22 01:02:03.1234",
            "2026-11-22 01:02:03.12345",
            "2026-11-22 01:02:03.000001",
            "2024-02-29 23:59:59.999999",
            "2000-02-29 12:00:00",
            "1900-02-28 00:00:00",
            "1969-12-31 23:59:59.999999",
            "1970-01-01 00:00:00",
            "0001-01-01 00:00:00",
            "0001-12-31 23:59:59.5 BC",
            "0044-03-15 12:00:00 BC",
            "4714-11-24 00:00:00 BC",
            "9999-12-31 23:59:59.999999",
            "10000-01-01 00:00:00",
            "294246-12-31 23:59:59.999999",
            "294247-01-10 04:00:54.775806",
            "infinity",
            "-infinity",
        ] {
            let micros = parse_timestamp(s).unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(format_timestamp(micros), s);
        }
    }

    #[test]
    fn timestamp_top_of_postgresql_range_does_not_fit_i64() {
        assert_eq!(
            parse_timestamp("294247-01-10 04:00:54.775806"),
            Ok(i64::MAX - 1)
        );
        // Exactly i64::MAX would collide with the infinity sentinel.
        assert!(parse_timestamp("294247-01-10 04:00:54.775807").is_err());
        assert!(parse_timestamp("294276-12-31 23:59:59.999999").is_err());
        assert!(parse_timestamptz("294276-12-31 23:59:59.999999+00").is_err());
        // ...but the ISO form covers PostgreSQL's full range.
        assert_eq!(
            timestamptz_to_iso("294276-12-31 23:59:59.999999+00").as_deref(),
            Ok("294276-12-31T23:59:59.999999Z")
        );
    }

    #[test]
    fn timestamp_rejects_malformed_and_out_of_range() {
        for s in [
            "",
            "garbage",
            "2026-13-01 00:00:00",
            "2026-11-22",
            "2026-11-22 25:00:00",
            "2026-11-22T01:02:03",
            "2026-11-22  01:02:03",
            "2026-11-22 01:02:03+00",
            "2026-11-22 01:02:03.",
            "2026-11-22 01:02:03.1234567",
            "2026-11-22 01:02:03 BC ",
            "2026-11-22 01:02:03 AD",
            "2026-02-30 01:02:03",
            "0000-01-01 00:00:00",
            "4714-11-23 23:59:59.999999 BC",
            "294277-01-01 00:00:00",
            "1.2.3",
        ] {
            assert!(parse_timestamp(s).is_err(), "{s:?} should be rejected");
        }
    }

    // ---- timestamptz ---------------------------------------------------------------

    #[test]
    fn timestamptz_to_iso_utc() {
        let cases = [
            (
                "2026-11-21 23:02:03.123456+00",
                "2026-11-21T23:02:03.123456Z",
            ),
            ("2026-11-21 23:02:03+00", "2026-11-21T23:02:03.000000Z"),
            ("2026-11-21 23:02:03.5+00", "2026-11-21T23:02:03.500000Z"),
            (
                "2026-11-21 23:02:03+00:00:00",
                "2026-11-21T23:02:03.000000Z",
            ),
            ("0044-03-15 12:00:00+00 BC", "-0043-03-15T12:00:00.000000Z"),
            ("0001-01-01 00:00:00+00 BC", "0000-01-01T00:00:00.000000Z"),
            ("4714-11-24 00:00:00+00 BC", "-4713-11-24T00:00:00.000000Z"),
            ("10000-01-01 00:00:00+00", "10000-01-01T00:00:00.000000Z"),
            ("0999-01-01 00:00:00+00", "0999-01-01T00:00:00.000000Z"),
        ];
        for (pg, iso) in cases {
            assert_eq!(timestamptz_to_iso(pg).as_deref(), Ok(iso), "{pg}");
        }
        assert_eq!(timestamptz_to_iso("infinity").as_deref(), Ok("infinity"));
        assert_eq!(timestamptz_to_iso("-infinity").as_deref(), Ok("-infinity"));
    }

    #[test]
    fn timestamptz_offsets_convert_to_utc() {
        let cases = [
            // Local time ahead of UTC: subtract, rolling back over midnight.
            (
                "2026-11-22 04:32:03.123456+05:30",
                "2026-11-21T23:02:03.123456Z",
            ),
            ("2026-01-01 02:00:00+05:30", "2025-12-31T20:30:00.000000Z"),
            // Behind UTC: add, rolling forward over midnight and a leap day.
            ("2026-11-21 22:00:00-03", "2026-11-22T01:00:00.000000Z"),
            ("2024-02-28 23:30:00-01", "2024-02-29T00:30:00.000000Z"),
            ("2023-12-31 23:00:00-02", "2024-01-01T01:00:00.000000Z"),
            // Local mean time offsets carry seconds.
            (
                "1900-01-01 00:00:00+00:19:32",
                "1899-12-31T23:40:28.000000Z",
            ),
            (
                "1900-01-01 12:00:00-04:56:02",
                "1900-01-01T16:56:02.000000Z",
            ),
            // Crossing the era boundary.
            ("0001-01-01 01:00:00+02", "0000-12-31T23:00:00.000000Z"),
            ("0001-12-31 23:00:00-02 BC", "0001-01-01T01:00:00.000000Z"),
        ];
        for (pg, iso) in cases {
            assert_eq!(timestamptz_to_iso(pg).as_deref(), Ok(iso), "{pg}");
            let back = iso_to_timestamptz(iso).unwrap();
            assert_eq!(parse_timestamptz(&back), parse_timestamptz(pg), "{pg}");
        }
        assert_eq!(
            parse_timestamptz("2026-11-22 04:32:03.123456+05:30"),
            parse_timestamptz("2026-11-21 23:02:03.123456+00")
        );
        assert_eq!(
            parse_timestamptz("2026-11-21 23:02:03.123456+00"),
            parse_timestamp("2026-11-21 23:02:03.123456")
        );
    }

    #[test]
    fn timestamptz_range_applies_to_the_utc_instant() {
        // The first instant, printed in a zone west of UTC, has a local time before it.
        assert_eq!(
            timestamptz_to_iso("4714-11-23 20:00:00-04 BC").as_deref(),
            Ok("-4713-11-24T00:00:00.000000Z")
        );
        assert!(timestamptz_to_iso("4714-11-24 00:00:00+01 BC").is_err());
        assert!(timestamptz_to_iso("294277-01-01 00:30:00+01").is_ok());
        assert!(timestamptz_to_iso("294277-01-01 00:30:00-01").is_err());
    }

    #[test]
    fn timestamptz_parse_numbers() {
        assert_eq!(parse_timestamptz("1970-01-01 00:00:00+00"), Ok(0));
        assert_eq!(parse_timestamptz("1970-01-01 05:30:00+05:30"), Ok(0));
        assert_eq!(parse_timestamptz("1969-12-31 21:00:00-03"), Ok(0));
        assert_eq!(parse_timestamptz("infinity"), Ok(i64::MAX));
        assert_eq!(parse_timestamptz("-infinity"), Ok(i64::MIN));
    }

    #[test]
    fn iso_to_timestamptz_forms() {
        let cases = [
            (
                "2026-11-21T23:02:03.123456Z",
                "2026-11-21 23:02:03.123456+00",
            ),
            ("2026-11-21T23:02:03.000000Z", "2026-11-21 23:02:03+00"),
            ("2026-11-21T23:02:03Z", "2026-11-21 23:02:03+00"),
            ("2026-11-21 23:02:03.1Z", "2026-11-21 23:02:03.1+00"),
            (
                "2026-11-22T04:32:03.123456+05:30",
                "2026-11-21 23:02:03.123456+00",
            ),
            ("2026-11-21 23:02:03+00", "2026-11-21 23:02:03+00"),
            ("-0043-03-15T12:00:00.000000Z", "0044-03-15 12:00:00+00 BC"),
            (
                "0000-12-31T23:59:59.999999Z",
                "0001-12-31 23:59:59.999999+00 BC",
            ),
            ("10000-01-01T00:00:00.000000Z", "10000-01-01 00:00:00+00"),
            ("+10000-01-01T00:00:00.000000Z", "10000-01-01 00:00:00+00"),
            (
                "294276-12-31T23:59:59.999999Z",
                "294276-12-31 23:59:59.999999+00",
            ),
            ("infinity", "infinity"),
            ("-infinity", "-infinity"),
        ];
        for (iso, pg) in cases {
            assert_eq!(iso_to_timestamptz(iso).as_deref(), Ok(pg), "{iso}");
        }
    }

    #[test]
    fn timestamptz_round_trips() {
        for pg in [
            "2026-11-21 23:02:03.123456+00",
            "2026-11-21 23:02:03+00",
            "2026-11-21 23:02:03.12+00",
            "2024-02-29 00:00:00.000001+00",
            "0044-03-15 12:00:00+00 BC",
            "4714-11-24 00:00:00+00 BC",
            "10000-01-01 00:00:00+00",
            "294276-12-31 23:59:59.999999+00",
            "infinity",
            "-infinity",
        ] {
            let iso = timestamptz_to_iso(pg).unwrap_or_else(|e| panic!("{pg}: {e}"));
            assert_eq!(iso_to_timestamptz(&iso).as_deref(), Ok(pg), "{iso}");
        }
    }

    #[test]
    fn timestamptz_rejects_malformed() {
        for s in [
            "",
            "garbage",
            "2026-11-21 23:02:03",
            "2026-11-21 23:02:03 BC",
            "2026-11-21 23:02:03Z",
            "2026-11-21 23:02:03+0",
            "2026-11-21 23:02:03+000",
            "2026-11-21 23:02:03+0530",
            "2026-11-21 23:02:03+05:3",
            "2026-11-21 23:02:03+05:30:",
            "2026-11-21 23:02:03+16",
            "2026-11-21 23:02:03+05:60",
            "2026-11-21 23:02:03+00 UTC",
            "2026-11-21 23:02:03 UTC",
            "2026-11-21 23:02:03+00BC",
            "2026-11-21 23:02:03 BC+00",
            "2026-13-01 00:00:00+00",
            "2026-11-21 25:00:00+00",
            "2026-11-21T23:02:03.123456Z",
        ] {
            assert!(timestamptz_to_iso(s).is_err(), "{s:?} should be rejected");
            assert!(parse_timestamptz(s).is_err(), "{s:?} should be rejected");
        }
        for s in [
            "",
            "garbage",
            "2026-11-21T23:02:03.123456",
            "2026-11-21T23:02:03.1234567Z",
            "2026-11-21T23:02:03.Z",
            "2026-11-21X23:02:03Z",
            "2026-13-21T23:02:03Z",
            "2026-11-21T23:02:03Zjunk",
            "0044-03-15 12:00:00+00 BC",
            "--2026-11-21T23:02:03Z",
            "-4714-01-01T00:00:00Z",
            "294277-01-01T00:00:00Z",
        ] {
            assert!(iso_to_timestamptz(s).is_err(), "{s:?} should be rejected");
        }
    }

    // ---- randomized round trips ----------------------------------------------------

    #[test]
    fn random_dates_round_trip() {
        let mut rng = Rng(1);
        for i in 0..10_000 {
            // Half near the present, half across PostgreSQL's whole range.
            let days = if i % 2 == 0 {
                rng.range(-800_000, 3_000_000) as i32
            } else {
                rng.range(i128::from(MIN_DATE_DAYS), i128::from(MAX_DATE_DAYS)) as i32
            };
            let text = format_date(days);
            assert_eq!(parse_date(&text), Ok(days), "{text}");
        }
    }

    #[test]
    fn random_timestamps_round_trip() {
        let mut rng = Rng(2);
        for i in 0..10_000 {
            let micros = if i % 2 == 0 {
                rng.range(-100_000_000_000_000_000, 100_000_000_000_000_000) as i64
            } else {
                rng.range(MIN_TIMESTAMP_MICROS, i128::from(i64::MAX - 1)) as i64
            };
            // Exercise short fractions too.
            let micros = match i % 4 {
                1 => micros - micros.rem_euclid(1_000),
                3 => micros - micros.rem_euclid(1_000_000),
                _ => micros,
            };
            let text = format_timestamp(micros);
            assert_eq!(parse_timestamp(&text), Ok(micros), "{text}");
        }
    }

    #[test]
    fn random_times_round_trip() {
        let mut rng = Rng(3);
        for i in 0..10_000 {
            let micros = rng.range(0, i128::from(MICROS_PER_DAY)) as i64;
            let micros = if i % 3 == 0 {
                micros - micros % 10_000
            } else {
                micros
            };
            let text = format_time(micros);
            assert_eq!(parse_time(&text), Ok(micros), "{text}");
        }
    }

    /// How PostgreSQL would print `utc` in a zone `offset_secs` east of UTC.
    fn pg_timestamptz_text(utc: i64, offset_secs: i64) -> String {
        let local = format_timestamp(utc + offset_secs * MICROS_PER_SECOND);
        let sign = if offset_secs < 0 { '-' } else { '+' };
        let a = offset_secs.abs();
        let mut tz = format!("{sign}{:02}", a / 3600);
        if a % 3600 != 0 {
            let _ = write!(tz, ":{:02}", a / 60 % 60);
            if a % 60 != 0 {
                let _ = write!(tz, ":{:02}", a % 60);
            }
        }
        match local.strip_suffix(" BC") {
            Some(head) => format!("{head}{tz} BC"),
            None => format!("{local}{tz}"),
        }
    }

    #[test]
    fn random_timestamptz_round_trip() {
        let mut rng = Rng(4);
        for _ in 0..10_000 {
            let utc = rng.range(
                MIN_TIMESTAMP_MICROS + i128::from(MICROS_PER_DAY),
                9_000_000_000_000_000_000,
            ) as i64;
            let offset = match rng.next_u64() % 4 {
                0 => 0,
                1 => rng.range(-15, 15) as i64 * 3600,
                2 => rng.range(-15 * 4, 15 * 4) as i64 * 900,
                _ => rng.range(-57_599, 57_599) as i64,
            };
            let pg = pg_timestamptz_text(utc, offset);
            assert_eq!(parse_timestamptz(&pg), Ok(utc), "{pg}");
            let iso = timestamptz_to_iso(&pg).unwrap();
            let back = iso_to_timestamptz(&iso).unwrap();
            assert_eq!(back, pg_timestamptz_text(utc, 0), "{pg} -> {iso}");
            assert_eq!(parse_timestamptz(&back), Ok(utc));
        }
    }

    // ---- numeric -------------------------------------------------------------------

    fn finite(unscaled: &[u8], scale: u32) -> Numeric {
        Numeric::Finite {
            unscaled: unscaled.to_vec(),
            scale,
        }
    }

    /// Minimal two's complement of an i128 (independent oracle for the bignum code).
    fn i128_minimal(v: i128) -> Vec<u8> {
        minimize(&v.to_be_bytes())
    }

    #[test]
    fn numeric_known_values() {
        assert_eq!(parse_numeric("0"), Ok(finite(&[0], 0)));
        assert_eq!(parse_numeric("0.00"), Ok(finite(&[0], 2)));
        assert_eq!(parse_numeric("-0.001"), Ok(finite(&[0xFF], 3)));
        assert_eq!(parse_numeric("127"), Ok(finite(&[0x7F], 0)));
        assert_eq!(parse_numeric("1.28"), Ok(finite(&[0x00, 0x80], 2)));
        assert_eq!(parse_numeric("-1.28"), Ok(finite(&[0x80], 2)));
        assert_eq!(parse_numeric("-12.9"), Ok(finite(&[0xFF, 0x7F], 1)));
        assert_eq!(
            parse_numeric("12345678.1234"),
            Ok(finite(&i128_minimal(123_456_781_234), 4))
        );
        assert_eq!(parse_numeric("NaN"), Ok(Numeric::NaN));
        assert_eq!(parse_numeric("Infinity"), Ok(Numeric::Infinity));
        assert_eq!(parse_numeric("-Infinity"), Ok(Numeric::NegInfinity));
        assert_eq!(parse_numeric("nan"), Ok(Numeric::NaN));
        // PostgreSQL never prints "-0", but it means zero.
        assert_eq!(parse_numeric("-0.0"), Ok(finite(&[0], 1)));
        assert_eq!(parse_numeric("007"), Ok(finite(&[7], 0)));
    }

    #[test]
    fn numeric_round_trips() {
        for s in [
            "0",
            "0.00",
            "0.0000000001",
            "1",
            "-1",
            "127",
            "128",
            "-128",
            "-129",
            "255",
            "256",
            "-0.001",
            "12345678.1234",
            "-12345678.1234",
            "9223372036854775807",
            "-9223372036854775808",
            "9223372036854775808",
            "170141183460469231731687303715884105727",
            "-170141183460469231731687303715884105728",
            "340282366920938463463374607431768211456",
            "1000000000",
            "999999999.999999999",
            "0.100",
        ] {
            let Ok(Numeric::Finite { unscaled, scale }) = parse_numeric(s) else {
                panic!("{s}")
            };
            assert_eq!(format_decimal(&unscaled, scale), s);
        }
    }

    #[test]
    fn numeric_matches_i128_oracle() {
        let mut rng = Rng(5);
        for i in 0..10_000 {
            let bits = (i % 127) + 1;
            let v = rng.i128() >> (127 - bits);
            let scale = (rng.next_u64() % 45) as u32;
            let text = format_decimal(&i128_minimal(v), scale);
            // Build the expected text from the i128 with std formatting.
            let digits = v.unsigned_abs().to_string();
            let padded = format!("{digits:0>width$}", width = scale as usize + 1);
            let (int, frac) = padded.split_at(padded.len() - scale as usize);
            let sign = if v < 0 { "-" } else { "" };
            let expected = if scale == 0 {
                format!("{sign}{int}")
            } else {
                format!("{sign}{int}.{frac}")
            };
            assert_eq!(text, expected);
            assert_eq!(parse_numeric(&text), Ok(finite(&i128_minimal(v), scale)));
        }
    }

    /// Decimal digits of 2^n by schoolbook doubling: an oracle independent of the limbs.
    fn pow2_decimal(n: u32) -> String {
        let mut d = vec![1u8];
        for _ in 0..n {
            let mut carry = 0;
            for x in &mut d {
                let t = *x * 2 + carry;
                *x = t % 10;
                carry = t / 10;
            }
            if carry > 0 {
                d.push(carry);
            }
        }
        d.iter().rev().map(|x| char::from(b'0' + x)).collect()
    }

    #[test]
    fn numeric_big_powers_of_two() {
        let p1000 = pow2_decimal(1000);
        let mut expected = vec![0x01];
        expected.extend([0u8; 125]);
        assert_eq!(parse_numeric(&p1000), Ok(finite(&expected, 0)));
        let mut neg = vec![0xFF];
        neg.extend([0u8; 125]);
        assert_eq!(parse_numeric(&format!("-{p1000}")), Ok(finite(&neg, 0)));
        // 2^1007 needs a zero sign byte; -2^1007 does not.
        let p1007 = pow2_decimal(1007);
        let mut pos = vec![0x00, 0x80];
        pos.extend([0u8; 125]);
        assert_eq!(parse_numeric(&p1007), Ok(finite(&pos, 0)));
        let mut neg = vec![0x80];
        neg.extend([0u8; 125]);
        assert_eq!(parse_numeric(&format!("-{p1007}")), Ok(finite(&neg, 0)));
        assert_eq!(format_decimal(&neg, 0), format!("-{p1007}"));
        assert_eq!(format_decimal(&pos, 7).replace('.', ""), p1007);
    }

    #[test]
    fn numeric_thousand_digits_round_trip() {
        let mut rng = Rng(6);
        let mut s = String::from("-");
        s.push(char::from(b'1' + (rng.next_u64() % 9) as u8));
        for _ in 1..600 {
            s.push(char::from(b'0' + (rng.next_u64() % 10) as u8));
        }
        s.push('.');
        for _ in 0..399 {
            s.push(char::from(b'0' + (rng.next_u64() % 10) as u8));
        }
        s.push('7');
        let Ok(Numeric::Finite { unscaled, scale }) = parse_numeric(&s) else {
            panic!("parse failed")
        };
        assert_eq!(scale, 400);
        // ~1000 digits * log2(10) / 8 ≈ 416 bytes.
        assert!((410..=420).contains(&unscaled.len()), "{}", unscaled.len());
        assert!(unscaled[0] & 0x80 != 0);
        assert_eq!(format_decimal(&unscaled, scale), s);
    }

    #[test]
    fn numeric_at_postgresql_limits() {
        let int = "9".repeat(NUMERIC_MAX_INT_DIGITS);
        let frac = "1".repeat(NUMERIC_MAX_SCALE);
        let s = format!("{int}.{frac}");
        let Ok(Numeric::Finite { unscaled, scale }) = parse_numeric(&s) else {
            panic!("parse failed")
        };
        assert_eq!(scale as usize, NUMERIC_MAX_SCALE);
        assert_eq!(format_decimal(&unscaled, scale), s);
        assert!(parse_numeric(&format!("9{int}")).is_err());
        assert!(parse_numeric(&format!("0.{frac}1")).is_err());
    }

    #[test]
    fn numeric_rejects_malformed() {
        for s in [
            "",
            "-",
            ".",
            "garbage",
            "1.2.3",
            "1.",
            ".5",
            "-.5",
            "+1",
            "--1",
            "1e5",
            "1,000",
            " 1",
            "1 ",
            "0x10",
            "NaNx",
            "Infinityy",
            "١",
            "1.\u{e9}",
        ] {
            assert!(parse_numeric(s).is_err(), "{s:?} should be rejected");
            assert!(
                parse_numeric_scaled(s, 2).is_err(),
                "{s:?} should be rejected"
            );
        }
    }

    #[test]
    fn numeric_scaled() {
        let cents = |v: i128| Ok(finite(&i128_minimal(v), 2));
        assert_eq!(parse_numeric_scaled("12.34", 2), cents(1234));
        assert_eq!(parse_numeric_scaled("12.3", 2), cents(1230));
        assert_eq!(parse_numeric_scaled("12", 2), cents(1200));
        assert_eq!(parse_numeric_scaled("-12", 2), cents(-1200));
        assert_eq!(parse_numeric_scaled("12.3400", 2), cents(1234));
        assert_eq!(parse_numeric_scaled("0", 2), cents(0));
        assert!(parse_numeric_scaled("12.345", 2).is_err());
        assert!(parse_numeric_scaled("-0.001", 2).is_err());
        assert!(parse_numeric_scaled("12.34", 0).is_err());
        assert_eq!(parse_numeric_scaled("12.00", 0), Ok(finite(&[12], 0)));
        assert_eq!(parse_numeric_scaled("NaN", 2), Ok(Numeric::NaN));
        assert_eq!(parse_numeric_scaled("Infinity", 2), Ok(Numeric::Infinity));
        assert_eq!(
            parse_numeric_scaled("-Infinity", 2),
            Ok(Numeric::NegInfinity)
        );
        assert!(parse_numeric_scaled("1", 16_384).is_err());
        assert!(parse_numeric_scaled("1", u32::MAX).is_err());
        assert_eq!(
            parse_numeric_scaled("1", 1000),
            Ok(finite(
                &decimal_to_twos_complement(false, format!("1{}", "0".repeat(1000)).as_bytes()),
                1000
            ))
        );
        let Ok(Numeric::Finite { unscaled, scale }) = parse_numeric_scaled("-1.5", 4) else {
            panic!()
        };
        assert_eq!(format_decimal(&unscaled, scale), "-1.5000");
    }

    #[test]
    fn small_decimals_read_as_the_big_number_path_reads_them() {
        let mut rng = Rng(11);
        for i in 0..20_000 {
            // Every length up to 16 bytes, minimal or not, both signs.
            let len = i % 17;
            let bytes: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            let (negative, magnitude) = twos_complement_to_magnitude(&bytes);
            let big = magnitude_to_decimal(&magnitude);
            let v = small_unscaled(&bytes);
            assert_eq!(v < 0, negative, "{bytes:?}");
            let mut small = String::new();
            push_digits_u128(&mut small, v.unsigned_abs());
            assert_eq!(small, big, "{bytes:?}");
        }
    }

    #[test]
    fn integers_print_as_to_string_does() {
        let mut rng = Rng(13);
        for n in [0, 1, -1, 9, 10, -10, i64::MAX, i64::MIN, i64::MIN + 1] {
            assert_eq!(format_integer(n), n.to_string());
        }
        for _ in 0..10_000 {
            let n = (rng.next_u64() as i64) >> (rng.next_u64() % 64);
            assert_eq!(format_integer(n), n.to_string());
        }
    }

    #[test]
    fn format_decimal_edge_cases() {
        assert_eq!(format_decimal(&[0], 0), "0");
        assert_eq!(format_decimal(&[0], 2), "0.00");
        assert_eq!(format_decimal(&[], 0), "0");
        assert_eq!(format_decimal(&[], 3), "0.000");
        assert_eq!(format_decimal(&[0xFF], 3), "-0.001");
        assert_eq!(format_decimal(&[0x80], 0), "-128");
        assert_eq!(format_decimal(&[0xFF, 0x7F], 0), "-129");
        assert_eq!(format_decimal(&[0x00, 0x80], 0), "128");
        // Non-minimal encodings mean the same number.
        assert_eq!(format_decimal(&[0x00, 0x00, 0x01], 0), "1");
        assert_eq!(format_decimal(&[0xFF, 0xFF, 0xFF], 1), "-0.1");
        assert_eq!(format_decimal(&[0x01], 16_383).len(), 16_385);
        assert_eq!(format_decimal(&[0x7B], 16_384), "123e-16384");
        assert_eq!(format_decimal(&[0x85], u32::MAX), "-123e-4294967295");
    }

    #[test]
    fn twos_complement_boundaries() {
        let cases: [(i64, &[u8]); 12] = [
            (0, &[0x00]),
            (1, &[0x01]),
            (127, &[0x7F]),
            (128, &[0x00, 0x80]),
            (255, &[0x00, 0xFF]),
            (256, &[0x01, 0x00]),
            (32_767, &[0x7F, 0xFF]),
            (32_768, &[0x00, 0x80, 0x00]),
            (-1, &[0xFF]),
            (-128, &[0x80]),
            (-129, &[0xFF, 0x7F]),
            (-32_769, &[0xFF, 0x7F, 0xFF]),
        ];
        for (v, bytes) in cases {
            assert_eq!(i64_to_be_bytes_minimal(v), bytes, "{v}");
            let (s, scale) = (v.to_string(), 0);
            assert_eq!(parse_numeric(&s), Ok(finite(bytes, scale)), "{v}");
            assert_eq!(format_decimal(bytes, 0), s);
        }
        assert_eq!(
            i64_to_be_bytes_minimal(i64::MAX),
            [0x7F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]
        );
        assert_eq!(
            i64_to_be_bytes_minimal(i64::MIN),
            [0x80, 0, 0, 0, 0, 0, 0, 0]
        );
        let mut rng = Rng(7);
        for _ in 0..10_000 {
            let v = (rng.next_u64() as i64) >> (rng.next_u64() % 64);
            let bytes = i64_to_be_bytes_minimal(v);
            assert_eq!(bytes, i128_minimal(i128::from(v)));
            assert_eq!(format_decimal(&bytes, 0), v.to_string());
        }
    }

    // ---- money ---------------------------------------------------------------------

    #[test]
    fn money_values() {
        for (s, cents) in [
            ("$0.00", 0),
            ("$0.01", 1),
            ("-$0.01", -1),
            ("$1.00", 100),
            ("$999.99", 99_999),
            ("$1,000.00", 100_000),
            ("$1,234.56", 123_456),
            ("-$1,234.56", -123_456),
            ("$12,345,678.90", 1_234_567_890),
            ("$92,233,720,368,547,758.07", i64::MAX),
            ("-$92,233,720,368,547,758.08", i64::MIN),
            ("1234.56", 123_456),
            ("-1234.56", -123_456),
            ("$1234.56", 123_456),
            ("0.00", 0),
            ("92233720368547758.07", i64::MAX),
            ("-92233720368547758.08", i64::MIN),
        ] {
            assert_eq!(parse_money(s), Ok(cents), "{s}");
        }
    }

    #[test]
    fn money_rejects_malformed_and_out_of_range() {
        for s in [
            "",
            "$",
            "-$",
            "garbage",
            "$1,2x",
            "$1,2.00",
            "$1,23.00",
            "$1,2345.00",
            "$1234,567.00",
            "$,123.00",
            "$1,.00",
            "$1,234,.00",
            "$1.2",
            "$1.234",
            "$1",
            "1",
            "$.50",
            "1.234,56",
            "1.234,56 €",
            "¥1,235",
            "$-1.00",
            "--1.00",
            "($1.00)",
            "$1.00 ",
            " $1.00",
            "$1.0a",
            "$92,233,720,368,547,758.08",
            "-$92,233,720,368,547,758.09",
            "$1000000000000000000000000000000000000.00",
            "1.2.3",
        ] {
            assert!(parse_money(s).is_err(), "{s:?} should be rejected");
        }
    }

    #[test]
    fn error_messages_are_bounded() {
        let long = "x".repeat(1_000_000);
        for e in [
            parse_date(&long).unwrap_err(),
            parse_time(&long).unwrap_err(),
            parse_timestamp(&long).unwrap_err(),
            parse_timestamptz(&long).unwrap_err(),
            timestamptz_to_iso(&long).unwrap_err(),
            iso_to_timestamptz(&long).unwrap_err(),
            parse_numeric(&long).unwrap_err(),
            parse_money(&long).unwrap_err(),
        ] {
            assert!(e.0.len() < 300, "{}", e.0.len());
        }
    }

    #[test]
    fn nothing_panics_on_arbitrary_bytes() {
        let alphabet = b"0123456789-+:.$, TZBCinfityNa\xc3\xa9";
        let mut rng = Rng(8);
        for _ in 0..20_000 {
            let len = (rng.next_u64() % 40) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| alphabet[(rng.next_u64() % alphabet.len() as u64) as usize])
                .collect();
            let s = String::from_utf8_lossy(&bytes);
            let _ = parse_date(&s);
            let _ = parse_time(&s);
            let _ = parse_timestamp(&s);
            let _ = parse_timestamptz(&s);
            let _ = timestamptz_to_iso(&s);
            let _ = iso_to_timestamptz(&s);
            let _ = parse_numeric(&s);
            let _ = parse_numeric_scaled(&s, (rng.next_u64() % 20) as u32);
            let _ = parse_money(&s);
            let _ = format_decimal(&bytes, (rng.next_u64() % 20) as u32);
        }
    }

    /// The shortcuts of [`timestamptz_to_iso`], [`iso_to_timestamptz`],
    /// [`parse_timestamptz`] and [`parse_date`] give the general way's answer for
    /// everything: PostgreSQL's own text of random instants in years 1-9999 (which the
    /// shortcuts must take), and those texts with random bytes changed (which they must
    /// take only where the general way agrees).
    #[test]
    fn the_utc_shortcut_answers_as_the_general_way() {
        let mut rng = Rng(7);
        let (lo, hi) = (
            i128::from(days_from_civil(1, 1, 1)) * i128::from(MICROS_PER_DAY),
            i128::from(days_from_civil(9999, 12, 31) + 1) * i128::from(MICROS_PER_DAY) - 1,
        );
        let alphabet = b"0123456789-: T.Z+BC\xc3";
        let mut taken = 0;
        for i in 0..200_000 {
            let mut micros = rng.range(lo, hi);
            // Whole seconds and short fractions too, not only six digits.
            match i % 4 {
                0 => micros -= micros.rem_euclid(1_000_000),
                1 => micros -= micros.rem_euclid(1_000),
                _ => {}
            }
            let pg = format_pg_datetime(micros, "+00");
            assert_eq!(parse_timestamptz(&pg), Ok(micros as i64), "{pg}");
            let date = &pg[..10];
            assert_eq!(parse_date(date), parse_date_general(date), "{date}");
            assert!(plain_ymd(date.as_bytes()).is_some(), "{date}");
            let iso = timestamptz_to_iso(&pg).unwrap();
            assert!(Utc::of(pg.as_bytes(), b' ', b"+00").is_some(), "{pg}");
            assert_eq!(&*iso, &*timestamptz_to_iso_general(&pg).unwrap());
            assert!(Utc::of(iso.as_bytes(), b'T', b"Z").is_some(), "{iso}");
            assert_eq!(iso_to_timestamptz(&iso).unwrap(), pg);
            assert_eq!(iso_to_timestamptz_general(&iso).unwrap(), pg);
            // One to three bytes changed.
            for text in [pg.clone(), iso.to_string()] {
                let mut b = text.into_bytes();
                for _ in 0..=rng.next_u64() % 3 {
                    let at = (rng.next_u64() as usize) % b.len();
                    b[at] = alphabet[(rng.next_u64() as usize) % alphabet.len()];
                }
                let Ok(s) = String::from_utf8(b) else {
                    continue;
                };
                let fast = timestamptz_to_iso(&s).map(|t| t.to_string());
                let general = timestamptz_to_iso_general(&s).map(|t| t.to_string());
                assert_eq!(fast, general, "{s:?}");
                assert_eq!(
                    iso_to_timestamptz(&s),
                    iso_to_timestamptz_general(&s),
                    "{s:?}"
                );
                assert_eq!(
                    parse_timestamptz(&s),
                    parse_timestamptz_general(&s),
                    "{s:?}"
                );
                for date in [s.get(..10), s.get(..11), s.get(..9)].into_iter().flatten() {
                    assert_eq!(parse_date(date), parse_date_general(date), "{date:?}");
                }
                taken += usize::from(Utc::of(s.as_bytes(), b' ', b"+00").is_some());
            }
        }
        // Mutants the shortcut took (a digit for a digit, mostly) were compared too.
        assert!(taken > 10_000, "{taken}");
        // The edges the shortcut leaves to the general way.
        for s in [
            "2024-02-29 10:00:00+00",
            "2023-02-29 10:00:00+00",
            "2024-04-31 10:00:00+00",
            "2024-13-01 10:00:00+00",
            "2024-00-10 10:00:00+00",
            "2024-01-00 10:00:00+00",
            "2024-01-01 24:00:00+00",
            "2024-01-01 23:60:00+00",
            "2024-01-01 23:59:60+00",
            "0000-01-01 00:00:00+00",
            "0001-01-01 00:00:00+00 BC",
            "10000-01-01 00:00:00+00",
            "2024-01-01 10:00:00+05",
            "2024-01-01 10:00:00.1234567+00",
            "2024-01-01 10:00:00.+00",
            "2024-01-01 10:00:00.5+00",
        ] {
            let general = timestamptz_to_iso_general(s).map(|t| t.to_string());
            assert_eq!(timestamptz_to_iso(s).map(|t| t.to_string()), general, "{s}");
            assert_eq!(parse_timestamptz(s), parse_timestamptz_general(s), "{s}");
            for date in [
                &s[..10],
                s.split(' ').next().unwrap(),
                "0001-01-01",
                "9999-12-31",
            ] {
                assert_eq!(parse_date(date), parse_date_general(date), "{date}");
            }
            let iso = s.replacen(' ', "T", 1).replace("+00", "Z");
            assert_eq!(
                iso_to_timestamptz(&iso),
                iso_to_timestamptz_general(&iso),
                "{iso}"
            );
        }
    }
}
