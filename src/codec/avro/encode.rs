//! Direct Avro binary encoding of change events: values go from their PostgreSQL
//! text straight into the output buffer, following the plans of [`super::schema`].
//! No intermediate value tree: this runs once per change on the hot path.

use super::schema::{FieldPlan, TableSchemas, ValueKind};
use crate::codec::array::{self, Element};
use crate::codec::pgtext::{self, Numeric};
use crate::event::{Change, Column, Datum, Row};
use crate::timestamp::PgTimestamp;

/// A value that cannot be encoded with its table's schema. Names the table and column,
/// never the value (it may be PHI).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("table {table} column {column}: {reason}")]
pub struct EncodeError {
    pub table: String,
    pub column: String,
    pub reason: String,
}

/// Envelope fields that do not come from the change itself.
#[derive(Debug, Clone)]
pub struct SourceInfo {
    /// `source.name`: the topic prefix.
    pub name: String,
    /// `source.db`: the source database.
    pub db: String,
}

pub fn write_long(out: &mut Vec<u8>, v: i64) {
    let mut n = ((v << 1) ^ (v >> 63)) as u64;
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// A union branch index as its one zigzag byte. Unions here have at most four
/// branches (null, value, special, unchanged).
fn branch_byte(branch: u32) -> u8 {
    debug_assert!(
        branch < 64,
        "a union branch index that needs more than one byte"
    );
    (branch << 1) as u8
}

pub fn write_bytes(out: &mut Vec<u8>, b: &[u8]) {
    write_long(out, b.len() as i64);
    out.extend_from_slice(b);
}

fn write_opt_long(out: &mut Vec<u8>, v: Option<i64>) {
    match v {
        Some(v) => {
            write_long(out, 1);
            write_long(out, v);
        }
        None => write_long(out, 0),
    }
}

/// The key record of a change. `Ok(false)` when the table has no key.
pub fn encode_key(
    change: &Change,
    schemas: &TableSchemas,
    out: &mut Vec<u8>,
) -> Result<bool, EncodeError> {
    let Some(key) = change.key() else {
        return Ok(false);
    };
    for ((column, datum), plan) in key.zip(&schemas.key_fields) {
        write_field(out, change, column, plan, datum)?;
    }
    Ok(true)
}

/// The `Envelope` record of a change.
pub fn encode_value(
    change: &Change,
    schemas: &TableSchemas,
    source: &SourceInfo,
    now: PgTimestamp,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    write_row(out, change, schemas, change.before.as_ref())?;
    write_row(out, change, schemas, change.after.as_ref())?;
    // source
    write_bytes(out, env!("CARGO_PKG_VERSION").as_bytes());
    write_bytes(out, b"postgresql");
    write_bytes(out, source.name.as_bytes());
    write_long(out, change.commit_ts.unix_millis());
    write_long(out, 0); // snapshot: the "string" branch
    write_bytes(out, change.snapshot.as_str().as_bytes());
    write_bytes(out, source.db.as_bytes());
    // sequence: [last committed LSN, this change's LSN], as Debezium writes it.
    write_long(out, 1);
    let mut seq = itoa_buf();
    write_bytes(
        out,
        sequence(&mut seq, change.prev_commit_end.0, change.lsn.0).as_bytes(),
    );
    write_opt_long(out, Some(change.commit_ts.unix_micros()));
    write_opt_long(out, change.commit_ts.unix_micros().checked_mul(1000));
    write_bytes(out, change.table.name.schema.as_bytes());
    write_bytes(out, change.table.name.name.as_bytes());
    write_opt_long(out, Some(i64::from(change.xid)));
    write_opt_long(out, Some(change.lsn.0 as i64));
    write_opt_long(out, None); // xmin
    write_long(out, 0); // origin
    write_long(out, 0); // origin_lsn
    write_long(out, 0); // transaction: null
                        // op, ts_ms, ts_us, ts_ns
    write_bytes(out, change.op.as_str().as_bytes());
    write_opt_long(out, Some(now.unix_millis()));
    write_opt_long(out, Some(now.unix_micros()));
    write_opt_long(out, now.unix_micros().checked_mul(1000));
    // unchanged
    let unchanged: Vec<&str> = change.unchanged().collect();
    if !unchanged.is_empty() {
        write_long(out, unchanged.len() as i64);
        for name in unchanged {
            write_bytes(out, name.as_bytes());
        }
    }
    write_long(out, 0);
    Ok(())
}

fn itoa_buf() -> String {
    String::with_capacity(48)
}

/// `["<a>","<b>"]` into `buf`, without a `format!` allocation per change.
fn sequence(buf: &mut String, a: u64, b: u64) -> &str {
    use crate::codec::pgtext::push_digits;
    buf.clear();
    buf.push_str("[\"");
    push_digits(buf, a, 1);
    buf.push_str("\",\"");
    push_digits(buf, b, 1);
    buf.push_str("\"]");
    buf
}

fn write_row(
    out: &mut Vec<u8>,
    change: &Change,
    schemas: &TableSchemas,
    row: Option<&Row>,
) -> Result<(), EncodeError> {
    let Some(row) = row else {
        write_long(out, 0);
        return Ok(());
    };
    write_long(out, 1);
    let table = &change.table;
    for (i, ((column, datum), plan)) in table
        .columns
        .iter()
        .zip(&row.values)
        .zip(&schemas.value_fields)
        .enumerate()
    {
        if row.key_only && !table.key.contains(&i) {
            write_long(out, 0); // not sent by PostgreSQL: null
            continue;
        }
        write_field(out, change, column, plan, datum)?;
    }
    Ok(())
}

fn write_field(
    out: &mut Vec<u8>,
    change: &Change,
    column: &Column,
    plan: &FieldPlan,
    datum: &Datum,
) -> Result<(), EncodeError> {
    let err = |reason: String| EncodeError {
        table: change.table.name.to_string(),
        column: column.name.clone(),
        reason,
    };
    match datum {
        Datum::Null if plan.nullable => write_long(out, 0),
        Datum::Null => return Err(err("NULL in a key column".into())),
        Datum::Unchanged => match plan.unchanged_branch {
            Some(b) => write_long(out, i64::from(b)),
            None => return Err(err("unchanged TOAST value in a key column".into())),
        },
        Datum::Text(text) => {
            let text = text.as_str();
            // The value is written in place, after a one-byte slot for its union
            // branch, which is known only once the value is: a branch index below 64
            // is one zigzag byte. No buffer per field.
            let union = plan.is_union();
            let slot = out.len();
            if union {
                out.push(0);
            }
            let special = write_value(out, &plan.kind, column.ty.delimiter, text).map_err(err)?;
            if special {
                out.truncate(slot + usize::from(union));
            }
            if union {
                let branch = match (special, plan.special_branch) {
                    (true, Some(b)) => b,
                    (true, None) => return Err(err("value has no Avro representation".into())),
                    (false, _) => plan.value_branch,
                };
                out[slot] = branch_byte(branch);
            } else if special {
                return Err(err(
                    "value has no Avro representation in a key column".into()
                ));
            }
            if special {
                // The Special record's one field: the PostgreSQL text.
                write_bytes(out, text.as_bytes());
            }
        }
    }
    Ok(())
}

/// Encode `text` as `kind`. `Ok(true)` means it must travel in the `Special` branch.
fn write_value(
    out: &mut Vec<u8>,
    kind: &ValueKind,
    delimiter: u8,
    text: &str,
) -> Result<bool, String> {
    let bad =
        |what: &str, e: &dyn std::fmt::Display| format!("cannot encode the value as {what}: {e}");
    match kind {
        ValueKind::Boolean => out.push(u8::from(text == "t")),
        ValueKind::Short | ValueKind::Int => write_long(
            out,
            i64::from(text.parse::<i32>().map_err(|e| bad("int", &e))?),
        ),
        ValueKind::Long => write_long(out, text.parse::<i64>().map_err(|e| bad("long", &e))?),
        ValueKind::Float => out.extend_from_slice(
            &text
                .parse::<f32>()
                .map_err(|e| bad("float", &e))?
                .to_le_bytes(),
        ),
        ValueKind::Double => out.extend_from_slice(
            &text
                .parse::<f64>()
                .map_err(|e| bad("double", &e))?
                .to_le_bytes(),
        ),
        ValueKind::Decimal { scale, .. } => {
            match pgtext::parse_numeric_scaled(text, *scale).map_err(|e| bad("decimal", &e))? {
                Numeric::Finite { unscaled, .. } => write_bytes(out, &unscaled),
                _ => return Ok(true),
            }
        }
        ValueKind::VarDecimal => {
            match pgtext::parse_numeric(text).map_err(|e| bad("decimal", &e))? {
                Numeric::Finite { unscaled, scale } => {
                    write_long(out, i64::from(scale));
                    write_bytes(out, &unscaled);
                }
                _ => return Ok(true),
            }
        }
        ValueKind::Money => {
            let cents = pgtext::parse_money(text).map_err(|e| bad("money", &e))?;
            write_bytes(out, &pgtext::i64_to_be_bytes_minimal(cents));
        }
        ValueKind::String | ValueKind::Uuid | ValueKind::Json | ValueKind::Interval => {
            write_bytes(out, text.as_bytes())
        }
        ValueKind::Date => {
            if is_infinity(text) {
                return Ok(true);
            }
            write_long(
                out,
                i64::from(pgtext::parse_date(text).map_err(|e| bad("date", &e))?),
            )
        }
        ValueKind::Time => write_long(out, pgtext::parse_time(text).map_err(|e| bad("time", &e))?),
        ValueKind::TimeMillis => write_long(
            out,
            pgtext::parse_time(text).map_err(|e| bad("time", &e))? / 1000,
        ),
        ValueKind::Timestamp | ValueKind::TimestampMillis => {
            if is_infinity(text) {
                return Ok(true);
            }
            match pgtext::parse_timestamp(text) {
                Ok(micros) if *kind == ValueKind::TimestampMillis => {
                    write_long(out, micros.div_euclid(1000))
                }
                Ok(micros) => write_long(out, micros),
                // PostgreSQL wrote it, so it is a legal timestamp: one past 294246 AD,
                // beyond i64 microseconds. Its text travels instead.
                Err(_) => return Ok(true),
            }
        }
        ValueKind::Timestamptz => {
            if is_infinity(text) {
                return Ok(true);
            }
            write_bytes(
                out,
                pgtext::timestamptz_to_iso(text)
                    .map_err(|e| bad("timestamptz", &e))?
                    .as_bytes(),
            )
        }
        ValueKind::Bytes => write_bytes(
            out,
            &decode_bytea(text).ok_or_else(|| "bytea is not in hex format".to_string())?,
        ),
        ValueKind::Array(elem) => {
            let Some(items) = array::parse(text, delimiter) else {
                return Ok(true);
            };
            if items.iter().any(|i| matches!(i, Element::Array(_))) {
                return Ok(true);
            }
            if !items.is_empty() {
                write_long(out, items.len() as i64);
                for item in &items {
                    match item {
                        Element::Null => write_long(out, 0),
                        Element::Value(v) => {
                            let mut buf = Vec::new();
                            if write_value(&mut buf, elem, b',', v)? {
                                write_long(out, 2);
                                write_bytes(out, v.as_bytes());
                            } else {
                                write_long(out, 1);
                                out.extend_from_slice(&buf);
                            }
                        }
                        Element::Array(_) => unreachable!("checked above"),
                    }
                }
            }
            write_long(out, 0);
        }
    }
    Ok(false)
}

fn is_infinity(text: &str) -> bool {
    matches!(text, "infinity" | "-infinity")
}

/// `\x00ff` -> [0x00, 0xff].
pub fn decode_bytea(text: &str) -> Option<Vec<u8>> {
    let hex = text.strip_prefix("\\x")?;
    if hex.len() % 2 != 0 {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_is_debeziums_json_array_of_decimal_lsns() {
        let mut buf = String::new();
        for (a, b) in [(0, 0), (1, 10), (0x1_6B37_4800, u64::MAX)] {
            assert_eq!(sequence(&mut buf, a, b), format!("[\"{a}\",\"{b}\"]"));
        }
    }

    #[test]
    fn zigzag_varints_match_the_spec() {
        for (v, bytes) in [
            (0i64, vec![0u8]),
            (-1, vec![1]),
            (1, vec![2]),
            (-64, vec![0x7f]),
            (64, vec![0x80, 0x01]),
        ] {
            let mut out = Vec::new();
            write_long(&mut out, v);
            assert_eq!(out, bytes, "{v}");
        }
    }

    #[test]
    fn decodes_bytea_hex() {
        assert_eq!(decode_bytea("\\x00ff00"), Some(vec![0, 255, 0]));
        assert_eq!(decode_bytea("\\x0"), None);
        assert_eq!(decode_bytea("abc"), None);
    }
}
