//! PostgreSQL's binary COPY format for the plain loads of [`super::apply::copy_inserts`]
//! (an initial snapshot into an empty table, a stream of new rows).
//!
//! Why: the target parses binary values for a fraction of what their text costs. The
//! benchmark's 1M-row patients table (`bigint`, `date`, `numeric`, `timestamptz` and
//! text columns) loaded with `COPY FROM` in 3.2–4.6 s binary against 5.2–6.9 s text on
//! the hospital server, and during a snapshot that server shares two cores with
//! pgferry, the EHR and the broker.
//!
//! The sink's values arrive as PostgreSQL text. Each is converted by strict parsers that
//! accept only PostgreSQL's own output forms, which are what the sink's decoders write,
//! and that give exactly the value the column's text input function would give. A
//! value in any other form is [`NotBinary`]: the caller loads the batch as text
//! instead, and the target's input function decides, as it always did. A column type
//! without a binary encoder here makes its whole table load as text.

use bytes::{BufMut, BytesMut};

use crate::codec::pgtext;

/// Days from 1970-01-01 to 2000-01-01, PostgreSQL's epoch for binary dates.
const PG_EPOCH_DAYS: i32 = 10_957;
/// The same in microseconds, for binary timestamps.
const PG_EPOCH_MICROS: i64 = PG_EPOCH_DAYS as i64 * 86_400_000_000;

/// A column type the binary format is written for, by its built-in type OID (a domain
/// or a user type of the same name is not one of these, and loads as text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    Bool,
    Int2,
    Int4,
    Int8,
    Float4,
    Float8,
    /// `text`, `varchar`, `bpchar`: the characters (the column's length check applies
    /// to binary input as to text).
    Text,
    Date,
    Timestamp,
    Timestamptz,
    Numeric,
    Uuid,
    Bytea,
    Json,
    Jsonb,
}

impl Wire {
    pub fn for_oid(oid: u32) -> Option<Wire> {
        Some(match oid {
            16 => Wire::Bool,
            21 => Wire::Int2,
            23 => Wire::Int4,
            20 => Wire::Int8,
            700 => Wire::Float4,
            701 => Wire::Float8,
            25 | 1043 | 1042 => Wire::Text,
            1082 => Wire::Date,
            1114 => Wire::Timestamp,
            1184 => Wire::Timestamptz,
            1700 => Wire::Numeric,
            2950 => Wire::Uuid,
            17 => Wire::Bytea,
            114 => Wire::Json,
            3802 => Wire::Jsonb,
            _ => return None,
        })
    }
}

/// A text value this module cannot put in binary form with certainty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotBinary {
    /// Which column of the row (its index in the COPY's column list).
    pub column: usize,
}

/// The file header: signature, flags, header extension length.
pub fn header(buf: &mut BytesMut) {
    buf.put_slice(b"PGCOPY\n\xff\r\n\0");
    buf.put_u32(0);
    buf.put_u32(0);
}

/// The file trailer.
pub fn trailer(buf: &mut BytesMut) {
    buf.put_i16(-1);
}

/// One tuple. On error the buffer holds a partial tuple and must not be sent.
pub fn row(buf: &mut BytesMut, wires: &[Wire], cells: &[Option<&str>]) -> Result<(), NotBinary> {
    // The fields written, which the server checks against the COPY's column list.
    buf.put_i16(wires.len().min(cells.len()) as i16);
    for (column, (wire, cell)) in wires.iter().zip(cells).enumerate() {
        match cell {
            None => buf.put_i32(-1),
            Some(text) => value(buf, *wire, text).ok_or(NotBinary { column })?,
        }
    }
    Ok(())
}

/// Writes one field (length word and bytes), or `None` when `text` is not in a form
/// this module knows for `wire`.
fn value(buf: &mut BytesMut, wire: Wire, text: &str) -> Option<()> {
    match wire {
        Wire::Bool => {
            let b = match text {
                "t" | "true" => 1,
                "f" | "false" => 0,
                _ => return None,
            };
            buf.put_i32(1);
            buf.put_u8(b);
        }
        Wire::Int2 => {
            buf.put_i32(2);
            buf.put_i16(i16::try_from(integer(text)?).ok()?);
        }
        Wire::Int4 => {
            buf.put_i32(4);
            buf.put_i32(i32::try_from(integer(text)?).ok()?);
        }
        Wire::Int8 => {
            buf.put_i32(8);
            buf.put_i64(integer(text)?);
        }
        Wire::Float4 => {
            let f = float(text, |t| t.parse::<f32>().ok().map(f64::from))? as f32;
            buf.put_i32(4);
            buf.put_f32(f);
        }
        Wire::Float8 => {
            let f = float(text, |t| t.parse::<f64>().ok())?;
            buf.put_i32(8);
            buf.put_f64(f);
        }
        Wire::Text | Wire::Json => sized(buf, text.as_bytes()),
        Wire::Jsonb => {
            // Version 1 of jsonb's binary input is its text.
            buf.put_i32(text.len() as i32 + 1);
            buf.put_u8(1);
            buf.put_slice(text.as_bytes());
        }
        // Before version 16 PostgreSQL's input refuses "+infinity", which the shared
        // parsers accept (it reads other spellings of the infinities in any case).
        Wire::Date | Wire::Timestamp | Wire::Timestamptz if text.starts_with('+') => return None,
        Wire::Date => {
            let days = match pgtext::parse_date(text).ok()? {
                d @ (i32::MAX | i32::MIN) => d,
                d => d - PG_EPOCH_DAYS,
            };
            buf.put_i32(4);
            buf.put_i32(days);
        }
        Wire::Timestamp | Wire::Timestamptz => {
            // The parsers insist on the column's form: an offset for timestamptz (a
            // text without one would be read in the session's zone), none for
            // timestamp (whose input ignores one).
            let micros = if wire == Wire::Timestamp {
                pgtext::parse_timestamp(text)
            } else {
                pgtext::parse_timestamptz(text)
            };
            let micros = match micros.ok()? {
                m @ (i64::MAX | i64::MIN) => m,
                m => m.checked_sub(PG_EPOCH_MICROS)?,
            };
            buf.put_i32(8);
            buf.put_i64(micros);
        }
        Wire::Numeric => numeric(buf, text)?,
        Wire::Uuid => {
            let mut out = [0u8; 16];
            let hex = text.as_bytes();
            if hex.len() != 36 || [8, 13, 18, 23].iter().any(|&i| hex[i] != b'-') {
                return None;
            }
            let digits = hex.iter().filter(|&&c| c != b'-');
            let mut nibbles = digits.map(|&c| (c as char).to_digit(16));
            for byte in &mut out {
                *byte = (nibbles.next()?? << 4 | nibbles.next()??) as u8;
            }
            buf.put_i32(16);
            buf.put_slice(&out);
        }
        Wire::Bytea => {
            // `bytea_output = hex`: "\x" then two digits a byte.
            let hex = text.strip_prefix("\\x")?.as_bytes();
            if hex.len() % 2 != 0 {
                return None;
            }
            buf.put_i32(i32::try_from(hex.len() / 2).ok()?);
            for pair in hex.chunks_exact(2) {
                let hi = (pair[0] as char).to_digit(16)?;
                let lo = (pair[1] as char).to_digit(16)?;
                buf.put_u8((hi << 4 | lo) as u8);
            }
        }
    }
    Some(())
}

fn sized(buf: &mut BytesMut, bytes: &[u8]) {
    buf.put_i32(bytes.len() as i32);
    buf.put_slice(bytes);
}

/// `-?[0-9]+` that fits `i64`: what `int8out` and its smaller kin write.
fn integer(text: &str) -> Option<i64> {
    let digits = text.strip_prefix('-').unwrap_or(text);
    if digits.is_empty() || digits.len() > 19 || !digits.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// A float's text, parsed only where the result is certain to equal `float4in`'s or
/// `float8in`'s: finite digits that neither overflow nor underflow to zero (both
/// errors in PostgreSQL), and the three special spellings PostgreSQL writes.
fn float(text: &str, parse: impl Fn(&str) -> Option<f64>) -> Option<f64> {
    match text {
        "NaN" => return Some(f64::NAN),
        "Infinity" => return Some(f64::INFINITY),
        "-Infinity" => return Some(f64::NEG_INFINITY),
        _ => {}
    }
    let plain = text
        .bytes()
        .all(|c| c.is_ascii_digit() || matches!(c, b'-' | b'+' | b'.' | b'e' | b'E'));
    if !plain || !text.bytes().any(|c| c.is_ascii_digit()) {
        return None;
    }
    let f = parse(text)?;
    let zero_digits = text
        .split(['e', 'E'])
        .next()
        .unwrap_or("")
        .bytes()
        .all(|c| !matches!(c, b'1'..=b'9'));
    if !f.is_finite() || (f == 0.0 && !zero_digits) {
        return None;
    }
    Some(f)
}

/// `numeric`'s binary form: digit count, weight (of the first base-10000 digit),
/// sign, display scale, then the base-10000 digits, from `numeric_out`'s
/// `-?\d+(\.\d+)?`, `NaN` or the infinities.
fn numeric(buf: &mut BytesMut, text: &str) -> Option<()> {
    let special = match text {
        "NaN" => Some(0xC000u16),
        "Infinity" => Some(0xD000),
        "-Infinity" => Some(0xF000),
        _ => None,
    };
    if let Some(sign) = special {
        buf.put_i32(8);
        buf.put_i16(0);
        buf.put_i16(0);
        buf.put_u16(sign);
        buf.put_i16(0);
        return Some(());
    }
    let (negative, rest) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (int, frac) = rest.split_once('.').unwrap_or((rest, ""));
    let all_digits = |d: &str| d.bytes().all(|c| c.is_ascii_digit());
    if int.is_empty()
        || !all_digits(int)
        || !all_digits(frac)
        || (rest.contains('.') && frac.is_empty())
        || frac.len() > 0x3FFF
    {
        return None;
    }
    // Base-10000 digits aligned on the point: the integer part grouped from the right,
    // the fraction from the left and padded with zeros.
    let int = int.trim_start_matches('0').as_bytes();
    let lead = (4 - int.len() % 4) % 4;
    let group = |chunk: &[u8]| {
        chunk
            .iter()
            .fold(0i16, |acc, &c| acc * 10 + (c - b'0') as i16)
    };
    let mut digits: Vec<i16> = Vec::with_capacity((int.len() + frac.len()) / 4 + 2);
    let mut padded = [0u8; 4];
    let first = (4 - lead) % 4;
    if first > 0 {
        padded[..lead].fill(b'0');
        padded[lead..].copy_from_slice(&int[..first]);
        digits.push(group(&padded));
    }
    digits.extend(int[first..].chunks(4).map(group));
    let mut weight = digits.len() as i32 - 1;
    for chunk in frac.as_bytes().chunks(4) {
        padded = *b"0000";
        padded[..chunk.len()].copy_from_slice(chunk);
        digits.push(group(&padded));
    }
    // Zeros at either end are implied by weight and scale.
    let skip = digits.iter().take_while(|&&d| d == 0).count();
    weight -= skip as i32;
    let end = digits.len() - digits.iter().rev().take_while(|&&d| d == 0).count();
    let digits = if skip >= end {
        &[][..]
    } else {
        &digits[skip..end]
    };
    if digits.is_empty() {
        weight = 0;
    }
    let weight = i16::try_from(weight).ok()?;
    buf.put_i32(8 + 2 * digits.len() as i32);
    buf.put_i16(digits.len() as i16);
    buf.put_i16(weight);
    buf.put_u16(if negative && !digits.is_empty() {
        0x4000
    } else {
        0
    });
    buf.put_i16(frac.len() as i16);
    for d in digits {
        buf.put_i16(*d);
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(wire: Wire, text: &str) -> Option<Vec<u8>> {
        let mut buf = BytesMut::new();
        value(&mut buf, wire, text).map(|()| buf.to_vec())
    }

    #[test]
    fn numeric_groups_digits_on_the_point() {
        // 12345.678: digits [1, 2345, 6780], weight 1, scale 3.
        let expected = [
            0, 0, 0, 14, 0, 3, 0, 1, 0, 0, 0, 3, 0, 1, 0x09, 0x29, 0x1A, 0x7C,
        ];
        assert_eq!(field(Wire::Numeric, "12345.678").unwrap(), expected);
        // -0.0001: [1], weight -1, negative, scale 4.
        let expected = [0, 0, 0, 10, 0, 1, 0xFF, 0xFF, 0x40, 0, 0, 4, 0, 1];
        assert_eq!(field(Wire::Numeric, "-0.0001").unwrap(), expected);
        // 0.00: no digits, scale kept, never negative.
        let expected = [0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 2];
        assert_eq!(field(Wire::Numeric, "-0.00").unwrap(), expected);
        // 10000: [1], weight 1 (the trailing zero group is implied).
        let expected = [0, 0, 0, 10, 0, 1, 0, 1, 0, 0, 0, 0, 0, 1];
        assert_eq!(field(Wire::Numeric, "10000").unwrap(), expected);
    }

    #[test]
    fn forms_postgresql_does_not_write_are_left_to_text() {
        for (wire, text) in [
            (Wire::Int4, "1.5"),
            (Wire::Int4, " 1"),
            (Wire::Int4, "+1"),
            (Wire::Int2, "40000"),
            (Wire::Int8, "99999999999999999999"),
            (Wire::Bool, "yes"),
            (Wire::Numeric, "1e5"),
            (Wire::Numeric, "1."),
            (Wire::Numeric, ".5"),
            (Wire::Float4, "1e39"),
            (Wire::Float8, "1e-400"),
            (Wire::Float8, "inf"),
            (Wire::Date, "Jan 8 1999"),
            (Wire::Timestamptz, "2026-11-29 10:00:00"),
            (Wire::Timestamp, "2026-11-29 10:00:00+05"),
            (Wire::Timestamp, "+infinity"),
            (Wire::Date, "+infinity"),
            (Wire::Uuid, "a0eebc999c0b4ef8bb6d6bb9bd380a12"),
            (Wire::Uuid, "g0eebc99-9c0b-4ef8-bb6d-6bb9bd380a12"),
            (Wire::Bytea, "\\x0"),
            (Wire::Bytea, "\\001"),
        ] {
            assert_eq!(field(wire, text), None, "{wire:?} {text:?}");
        }
    }

    #[test]
    fn a_bad_value_names_its_column() {
        let mut buf = BytesMut::new();
        let wires = [Wire::Int8, Wire::Date];
        assert_eq!(
            row(&mut buf, &wires, &[Some("1"), Some("someday")]),
            Err(NotBinary { column: 1 })
        );
        buf.clear();
        assert_eq!(row(&mut buf, &wires, &[Some("1"), None]), Ok(()));
    }
}
