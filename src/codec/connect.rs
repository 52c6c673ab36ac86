//! Change events as Kafka Connect's `JsonConverter` writes Debezium's records
//! (`kafka.format = "json"`): with `json_schemas = true` each key and value is
//! `{"schema": <Connect schema>, "payload": <value>}` (`schemas.enable=true`), with
//! `false` the payload alone.
//!
//! ```text
//! TableSchema ──avro::derive──▶ plans (ValueKind per column) ──▶ ConnectSchemas (once per table version)
//! Change ──▶ cells (typed JSON, or "special") ──▶ {"schema": …, "payload": {before, after, source, …}}
//! ```
//!
//! The payload mirrors the Avro envelope field for field (same semantic types, same
//! `connect.name`s, same millisecond/microsecond choices), in JsonConverter's value
//! forms: integers and floats as JSON numbers, bytes and decimals as base64 (its
//! default `decimal.format=BASE64`: the unscaled big-endian two's-complement bytes),
//! dates as epoch days, timestamps as epoch micros or millis, timestamptz as ISO text.
//!
//! Lossless rule (DESIGN §2): where the Avro encoding takes its `io.pgferry.Special`
//! branch (numeric NaN/±Infinity, ±infinity dates and timestamps, timestamps past
//! 294246 AD, arrays that are multi-dimensional, have explicit bounds or hold a special
//! element), and for float NaN/±Infinity (JSON has no such numbers; Jackson would write
//! the strings "NaN"/"Infinity", which JsonConverter reads back as 0.0), and for an
//! unchanged TOAST value, the column travels as the struct `io.pgferry.Special`
//! `{"text": <PostgreSQL text or null>, "unchanged": <bool>}`. Connect JSON has no
//! unions, so the schema embedded in that one message declares the column as that
//! struct (in `before` and `after` alike, where both images then use the struct form):
//! a reader holding the schema reads a struct named `io.pgferry.Special`, never a date,
//! number or null; a schemaless reader finds an object where a number or string was
//! expected. Nothing else in a message changes its schema.

use std::fmt::Write as _;
use std::ops::Range;

use base64::Engine as _;
use serde_json::{json, Value as Json};

use super::array::{self, Element};
use super::avro::schema::{FieldPlan, TableSchemas, ValueKind, SNAPSHOT_VALUES, SOURCE_NAME};
use super::avro::{EncodeError, SourceInfo};
use super::json::write_str;
use super::pgtext::{self, Numeric};
use crate::event::{Change, Column, Datum, Row};
use crate::timestamp::PgTimestamp;

/// The struct that carries what a column's Connect type cannot (see the module doc).
pub const SPECIAL_NAME: &str = "io.pgferry.Special";

/// The Connect schemas of one table version, derived once.
#[derive(Debug, Clone)]
pub struct ConnectSchemas {
    /// The key struct's schema as JSON text; `None` for keyless tables.
    key_text: Option<String>,
    /// The envelope schema.
    value: Json,
    /// `value` as JSON text, for messages without specials.
    value_text: String,
    /// Connect field schemas of the row columns (with `optional` and `field`).
    columns: Vec<Json>,
}

impl ConnectSchemas {
    /// Derive from the Avro plans of the same table version (one mapping, two
    /// encodings), under the Avro namespace `<prefix>.<schema>.<table>`.
    pub fn derive(change_table: &crate::event::TableSchema, avro: &TableSchemas) -> Self {
        let ns = &avro.namespace;
        let columns: Vec<Json> = change_table
            .columns
            .iter()
            .zip(&avro.value_fields)
            .map(|(c, p)| field(kind_schema(&p.kind), true, &c.name))
            .collect();
        let key_text = (!change_table.key.is_empty()).then(|| {
            let fields: Vec<Json> = change_table
                .key
                .iter()
                .zip(&avro.key_fields)
                .map(|(&i, p)| {
                    let c = &change_table.columns[i];
                    field(kind_schema(&p.kind), p.nullable, &c.name)
                })
                .collect();
            json!({"type": "struct", "fields": fields, "optional": false, "name": format!("{ns}.Key")})
                .to_string()
        });
        let value = envelope_schema(ns, &columns);
        ConnectSchemas {
            key_text,
            value_text: value.to_string(),
            value,
            columns,
        }
    }

    /// The envelope schema of a message in which the columns at `special` travel as
    /// `io.pgferry.Special`.
    fn value_with_specials(&self, special: &[bool]) -> Json {
        let mut value = self.value.clone();
        for image in 0..2 {
            let fields = &mut value["fields"][image]["fields"];
            for (i, s) in special.iter().enumerate() {
                if *s {
                    fields[i] = special_field(&self.columns[i]["field"]);
                }
            }
        }
        value
    }
}

fn field(mut schema: Json, optional: bool, name: &str) -> Json {
    schema["optional"] = json!(optional);
    schema["field"] = json!(name);
    schema
}

fn special_field(name: &Json) -> Json {
    json!({"type": "struct", "fields": [
              {"type": "string", "optional": true, "field": "text"},
              {"type": "boolean", "optional": false, "field": "unchanged"}],
           "optional": true, "name": SPECIAL_NAME, "version": 1, "field": name})
}

fn named(ty: &str, name: &str) -> Json {
    json!({"type": ty, "name": name, "version": 1})
}

/// The Connect schema of one value kind, as Debezium's PostgreSQL connector declares it
/// (without `optional` and `field`).
fn kind_schema(kind: &ValueKind) -> Json {
    match kind {
        ValueKind::Boolean => json!({"type": "boolean"}),
        ValueKind::Short => json!({"type": "int16"}),
        ValueKind::Int => json!({"type": "int32"}),
        ValueKind::Long => json!({"type": "int64"}),
        ValueKind::Float => json!({"type": "float"}),
        ValueKind::Double => json!({"type": "double"}),
        ValueKind::Decimal { precision, scale } => json!({
            "type": "bytes", "name": "org.apache.kafka.connect.data.Decimal", "version": 1,
            "parameters": {"scale": scale.to_string(), "connect.decimal.precision": precision.to_string()}
        }),
        ValueKind::Money => json!({
            "type": "bytes", "name": "org.apache.kafka.connect.data.Decimal", "version": 1,
            "parameters": {"scale": "2"}
        }),
        ValueKind::VarDecimal => json!({
            "type": "struct", "fields": [
                {"type": "int32", "optional": false, "field": "scale"},
                {"type": "bytes", "optional": false, "field": "value"}],
            "name": "io.debezium.data.VariableScaleDecimal", "version": 1,
            "doc": "Variable scaled decimal"
        }),
        ValueKind::String => json!({"type": "string"}),
        ValueKind::Interval => named("string", "io.debezium.time.Interval"),
        ValueKind::Uuid => named("string", "io.debezium.data.Uuid"),
        ValueKind::Json => named("string", "io.debezium.data.Json"),
        ValueKind::Date => named("int32", "io.debezium.time.Date"),
        ValueKind::Time => named("int64", "io.debezium.time.MicroTime"),
        ValueKind::TimeMillis => named("int32", "io.debezium.time.Time"),
        ValueKind::Timestamp => named("int64", "io.debezium.time.MicroTimestamp"),
        ValueKind::TimestampMillis => named("int64", "io.debezium.time.Timestamp"),
        ValueKind::Timestamptz => named("string", "io.debezium.time.ZonedTimestamp"),
        ValueKind::Bytes => json!({"type": "bytes"}),
        ValueKind::Array(elem) => {
            let mut items = kind_schema(elem);
            items["optional"] = json!(true);
            json!({"type": "array", "items": items})
        }
    }
}

fn envelope_schema(ns: &str, columns: &[Json]) -> Json {
    let row = |image: &str| {
        json!({"type": "struct", "fields": columns, "optional": true,
               "name": format!("{ns}.Value"), "field": image})
    };
    let opt = |ty: &str, name: &str| json!({"type": ty, "optional": true, "field": name});
    let req = |ty: &str, name: &str| json!({"type": ty, "optional": false, "field": name});
    let source = json!({
        "type": "struct", "optional": false, "name": SOURCE_NAME, "version": 1, "field": "source",
        "fields": [
            req("string", "version"), req("string", "connector"), req("string", "name"),
            req("int64", "ts_ms"),
            {"type": "string", "optional": true, "name": "io.debezium.data.Enum", "version": 1,
             "parameters": {"allowed": SNAPSHOT_VALUES}, "default": "false", "field": "snapshot"},
            req("string", "db"), opt("string", "sequence"), opt("int64", "ts_us"),
            opt("int64", "ts_ns"), req("string", "schema"), req("string", "table"),
            opt("int64", "txId"), opt("int64", "lsn"), opt("int64", "xmin"),
            opt("string", "origin"), opt("int64", "origin_lsn")
        ]
    });
    let transaction = json!({
        "type": "struct", "optional": true, "name": "event.block", "version": 1,
        "field": "transaction",
        "fields": [req("string", "id"), req("int64", "total_order"),
                   req("int64", "data_collection_order")]
    });
    json!({
        "type": "struct", "optional": false, "name": format!("{ns}.Envelope"), "version": 2,
        "fields": [
            row("before"), row("after"), source, transaction,
            req("string", "op"), opt("int64", "ts_ms"), opt("int64", "ts_us"), opt("int64", "ts_ns"),
            // pgferry's extension, as in the Avro envelope: columns whose unchanged TOAST
            // value was not sent.
            {"type": "array", "items": {"type": "string", "optional": false}, "optional": false,
             "default": [], "field": "unchanged"}
        ]
    })
}

/// One encoded cell of a row image.
enum Cell {
    Null,
    Unchanged,
    /// A value its Connect type cannot hold: travels as `io.pgferry.Special`.
    Special,
    /// The typed JSON of the value, a range of the scratch buffer.
    Value(Range<usize>),
}

/// Encode the key message. `Ok(false)` when the table has no key (nothing written).
pub fn write_key(
    change: &Change,
    avro: &TableSchemas,
    schemas: &ConnectSchemas,
    with_schema: bool,
    out: &mut Vec<u8>,
) -> Result<bool, EncodeError> {
    let (Some(key), Some(key_text)) = (change.key(), &schemas.key_text) else {
        return Ok(false);
    };
    if with_schema {
        out.extend_from_slice(b"{\"schema\":");
        out.extend_from_slice(key_text.as_bytes());
        out.extend_from_slice(b",\"payload\":");
    }
    out.push(b'{');
    for (i, ((column, datum), plan)) in key.zip(&avro.key_fields).enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(out, &column.name);
        out.push(b':');
        let err = |reason: &str| encode_error(change, column, reason.to_string());
        match datum {
            Datum::Null if plan.nullable => out.extend_from_slice(b"null"),
            Datum::Null => return Err(err("NULL in a key column")),
            Datum::Unchanged => return Err(err("unchanged TOAST value in a key column")),
            Datum::Text(t) => {
                let special = write_value(out, &plan.kind, column.ty.delimiter, t.as_str())
                    .map_err(|e| encode_error(change, column, e))?;
                if special {
                    return Err(err("value has no JSON representation in a key column"));
                }
            }
        }
    }
    out.push(b'}');
    if with_schema {
        out.push(b'}');
    }
    Ok(true)
}

/// Encode the value message (the envelope).
pub fn write_envelope(
    change: &Change,
    avro: &TableSchemas,
    schemas: &ConnectSchemas,
    source: &SourceInfo,
    now: PgTimestamp,
    with_schema: bool,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    let mut scratch = Vec::new();
    let before = cells(
        change,
        &avro.value_fields,
        change.before.as_ref(),
        &mut scratch,
    )?;
    let after = cells(
        change,
        &avro.value_fields,
        change.after.as_ref(),
        &mut scratch,
    )?;
    let n = change.table.columns.len();
    let special: Vec<bool> = (0..n)
        .map(|i| {
            [&before, &after].iter().any(|image| {
                image
                    .as_ref()
                    .is_some_and(|c| matches!(c[i], Cell::Special | Cell::Unchanged))
            })
        })
        .collect();
    if with_schema {
        out.extend_from_slice(b"{\"schema\":");
        if special.contains(&true) {
            let _ = serde_json::to_writer(&mut *out, &schemas.value_with_specials(&special));
        } else {
            out.extend_from_slice(schemas.value_text.as_bytes());
        }
        out.extend_from_slice(b",\"payload\":");
    }
    out.extend_from_slice(b"{\"before\":");
    write_row(
        out,
        change,
        before.as_deref(),
        change.before.as_ref(),
        &special,
        &scratch,
    );
    out.extend_from_slice(b",\"after\":");
    write_row(
        out,
        change,
        after.as_deref(),
        change.after.as_ref(),
        &special,
        &scratch,
    );
    let _ = write!(
        Vec8(out),
        ",\"source\":{{\"version\":\"{}\",\"connector\":\"postgresql\",\"name\":",
        env!("CARGO_PKG_VERSION")
    );
    write_str(out, &source.name);
    let _ = write!(
        Vec8(out),
        ",\"ts_ms\":{},\"snapshot\":\"{}\",\"db\":",
        change.commit_ts.unix_millis(),
        change.snapshot.as_str()
    );
    write_str(out, &source.db);
    let _ = write!(
        Vec8(out),
        ",\"sequence\":\"[\\\"{}\\\",\\\"{}\\\"]\",\"ts_us\":{},\"ts_ns\":{},\"schema\":",
        change.prev_commit_end.0,
        change.lsn.0,
        change.commit_ts.unix_micros(),
        opt_nanos(change.commit_ts),
    );
    write_str(out, &change.table.name.schema);
    out.extend_from_slice(b",\"table\":");
    write_str(out, &change.table.name.name);
    let _ = write!(
        Vec8(out),
        ",\"txId\":{},\"lsn\":{},\"xmin\":null,\"origin\":null,\"origin_lsn\":null}},\
         \"transaction\":null,\"op\":\"{}\",\"ts_ms\":{},\"ts_us\":{},\"ts_ns\":{},\"unchanged\":[",
        change.xid,
        change.lsn.0,
        change.op.as_str(),
        now.unix_millis(),
        now.unix_micros(),
        opt_nanos(now),
    );
    for (i, name) in change.unchanged().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(out, name);
    }
    out.extend_from_slice(b"]}");
    if with_schema {
        out.push(b'}');
    }
    Ok(())
}

/// Nanoseconds, or `null` where they overflow a long (as the Avro encoding does).
fn opt_nanos(t: PgTimestamp) -> String {
    match t.unix_micros().checked_mul(1000) {
        Some(n) => n.to_string(),
        None => "null".into(),
    }
}

/// `std::fmt::Write` over a byte buffer.
struct Vec8<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Vec8<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

fn encode_error(change: &Change, column: &Column, reason: String) -> EncodeError {
    EncodeError {
        table: change.table.name.to_string(),
        column: column.name.clone(),
        reason,
    }
}

fn cells(
    change: &Change,
    plans: &[FieldPlan],
    row: Option<&Row>,
    scratch: &mut Vec<u8>,
) -> Result<Option<Vec<Cell>>, EncodeError> {
    let Some(row) = row else { return Ok(None) };
    let table = &change.table;
    let mut cells = Vec::with_capacity(row.values.len());
    for (i, ((column, datum), plan)) in table.columns.iter().zip(&row.values).zip(plans).enumerate()
    {
        if row.key_only && !table.key.contains(&i) {
            cells.push(Cell::Null); // not sent by PostgreSQL
            continue;
        }
        cells.push(match datum {
            Datum::Null => Cell::Null,
            Datum::Unchanged => Cell::Unchanged,
            Datum::Text(t) => {
                let start = scratch.len();
                let special = write_value(scratch, &plan.kind, column.ty.delimiter, t.as_str())
                    .map_err(|e| encode_error(change, column, e))?;
                if special {
                    scratch.truncate(start);
                    Cell::Special
                } else {
                    Cell::Value(start..scratch.len())
                }
            }
        });
    }
    Ok(Some(cells))
}

fn write_row(
    out: &mut Vec<u8>,
    change: &Change,
    cells: Option<&[Cell]>,
    row: Option<&Row>,
    special: &[bool],
    scratch: &[u8],
) {
    let (Some(cells), Some(row)) = (cells, row) else {
        out.extend_from_slice(b"null");
        return;
    };
    out.push(b'{');
    for (i, (column, cell)) in change.table.columns.iter().zip(cells).enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(out, &column.name);
        out.push(b':');
        match cell {
            Cell::Null => out.extend_from_slice(b"null"),
            Cell::Unchanged => out.extend_from_slice(b"{\"text\":null,\"unchanged\":true}"),
            Cell::Value(_) | Cell::Special if special[i] => {
                let Datum::Text(t) = &row.values[i] else {
                    unreachable!("only text values have cells")
                };
                out.extend_from_slice(b"{\"text\":");
                write_str(out, t.as_str());
                out.extend_from_slice(b",\"unchanged\":false}");
            }
            Cell::Value(r) => out.extend_from_slice(&scratch[r.clone()]),
            Cell::Special => unreachable!("a special cell marks its column"),
        }
    }
    out.push(b'}');
}

fn base64(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(b'"');
    let mut s = String::new();
    base64::engine::general_purpose::STANDARD.encode_string(bytes, &mut s);
    out.extend_from_slice(s.as_bytes());
    out.push(b'"');
}

/// Encode `text` as `kind` (typed JSON). `Ok(true)`: it needs `io.pgferry.Special`
/// (nothing was written).
fn write_value(
    out: &mut Vec<u8>,
    kind: &ValueKind,
    delimiter: u8,
    text: &str,
) -> Result<bool, String> {
    let bad =
        |what: &str, e: &dyn std::fmt::Display| format!("cannot encode the value as {what}: {e}");
    let start = out.len();
    match kind {
        ValueKind::Boolean => out.extend_from_slice(if text == "t" { b"true" } else { b"false" }),
        ValueKind::Short | ValueKind::Int => num(
            out,
            i64::from(text.parse::<i32>().map_err(|e| bad("int", &e))?),
        ),
        ValueKind::Long => num(out, text.parse::<i64>().map_err(|e| bad("long", &e))?),
        ValueKind::Float => {
            let f = text.parse::<f32>().map_err(|e| bad("float", &e))?;
            // Debug keeps `.0` and the sign of -0.0: every reader parses it as a
            // float (Jackson reads `-0` as the integer 0).
            if !f.is_finite() {
                return Ok(true);
            }
            let _ = write!(Vec8(out), "{f:?}");
        }
        ValueKind::Double => {
            let f = text.parse::<f64>().map_err(|e| bad("double", &e))?;
            if !f.is_finite() {
                return Ok(true);
            }
            let _ = write!(Vec8(out), "{f:?}");
        }
        ValueKind::Decimal { scale, .. } => {
            match pgtext::parse_numeric_scaled(text, *scale).map_err(|e| bad("decimal", &e))? {
                Numeric::Finite { unscaled, .. } => base64(out, &unscaled),
                _ => return Ok(true),
            }
        }
        ValueKind::VarDecimal => {
            match pgtext::parse_numeric(text).map_err(|e| bad("decimal", &e))? {
                Numeric::Finite { unscaled, scale } => {
                    let _ = write!(Vec8(out), "{{\"scale\":{scale},\"value\":");
                    base64(out, &unscaled);
                    out.push(b'}');
                }
                _ => return Ok(true),
            }
        }
        ValueKind::Money => {
            let cents = pgtext::parse_money(text).map_err(|e| bad("money", &e))?;
            base64(out, &pgtext::i64_to_be_bytes_minimal(cents));
        }
        ValueKind::String | ValueKind::Uuid | ValueKind::Json | ValueKind::Interval => {
            write_str(out, text)
        }
        ValueKind::Date => {
            if is_infinity(text) {
                return Ok(true);
            }
            num(
                out,
                i64::from(pgtext::parse_date(text).map_err(|e| bad("date", &e))?),
            )
        }
        ValueKind::Time => num(out, pgtext::parse_time(text).map_err(|e| bad("time", &e))?),
        ValueKind::TimeMillis => num(
            out,
            pgtext::parse_time(text).map_err(|e| bad("time", &e))? / 1000,
        ),
        ValueKind::Timestamp | ValueKind::TimestampMillis => {
            if is_infinity(text) {
                return Ok(true);
            }
            match pgtext::parse_timestamp(text) {
                Ok(micros) if *kind == ValueKind::TimestampMillis => {
                    num(out, micros.div_euclid(1000))
                }
                Ok(micros) => num(out, micros),
                // Legal in PostgreSQL, past i64 microseconds (294246 AD).
                Err(_) => return Ok(true),
            }
        }
        ValueKind::Timestamptz => {
            if is_infinity(text) {
                return Ok(true);
            }
            write_str(
                out,
                &pgtext::timestamptz_to_iso(text).map_err(|e| bad("timestamptz", &e))?,
            )
        }
        ValueKind::Bytes => base64(
            out,
            &super::avro::encode::decode_bytea(text)
                .ok_or_else(|| "bytea is not in hex format".to_string())?,
        ),
        ValueKind::Array(elem) => {
            let Some(items) = array::parse(text, delimiter) else {
                return Ok(true);
            };
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                let special = match item {
                    Element::Null => {
                        out.extend_from_slice(b"null");
                        false
                    }
                    Element::Value(v) => write_value(out, elem, b',', v)?,
                    Element::Array(_) => true,
                };
                if special {
                    // The whole array travels as its text.
                    out.truncate(start);
                    return Ok(true);
                }
            }
            out.push(b']');
        }
    }
    Ok(false)
}

fn num(out: &mut Vec<u8>, n: i64) {
    let _ = write!(Vec8(out), "{n}");
}

fn is_infinity(text: &str) -> bool {
    matches!(text, "infinity" | "-infinity")
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use serde_json::Value;

    use super::*;
    use crate::event::{PgType, ReplicaIdentity, TableName, TableSchema, Text, TypeKind};
    use crate::lsn::Lsn;

    fn column(name: &str, kind: TypeKind, typmod: i32) -> Column {
        Column {
            name: name.into(),
            ty: Arc::new(PgType {
                oid: 0,
                name: "t".into(),
                kind,
                delimiter: b',',
            }),
            typmod,
            type_name: "t".into(),
            nullable: name != "id",
            transform: None,
        }
    }

    /// A table of most kinds, and a change whose `after` holds `values` (None = NULL,
    /// "<unchanged>" = unchanged TOAST).
    pub(crate) fn sample(values: &[Option<&str>], before: Option<&[Option<&str>]>) -> Change {
        let int4 = PgType {
            oid: 0,
            name: "int4".into(),
            kind: TypeKind::Int4,
            delimiter: b',',
        };
        let table = Arc::new(TableSchema {
            oid: 1,
            name: TableName::new("public", "types"),
            columns: vec![
                column("id", TypeKind::Int4, -1),
                column("d", TypeKind::Date, -1),
                column("n", TypeKind::Numeric, ((12 << 16) | 4) + 4),
                column("m", TypeKind::Money, -1),
                column("f8", TypeKind::Float8, -1),
                column("by", TypeKind::Bytea, -1),
                column("ts", TypeKind::Timestamp, -1),
                column("tz", TypeKind::Timestamptz, -1),
                column("tm", TypeKind::Time, 3),
                column("nn", TypeKind::Numeric, -1),
                column("ai", TypeKind::Array(Box::new(int4)), -1),
                column("t", TypeKind::Text, -1),
                column("i2", TypeKind::Int2, -1),
            ],
            key: vec![0],
            replica_identity: ReplicaIdentity::Default,
        });
        let row = |vals: &[Option<&str>]| Row {
            values: vals
                .iter()
                .map(|v| match v {
                    None => Datum::Null,
                    Some("<unchanged>") => Datum::Unchanged,
                    Some(t) => Datum::Text(Text::from_string(t.to_string())),
                })
                .collect(),
            key_only: false,
        };
        Change {
            op: if before.is_some() {
                crate::event::Op::Update
            } else {
                crate::event::Op::Create
            },
            table,
            xid: 771,
            commit_lsn: Lsn(0x200),
            lsn: Lsn(0x100),
            ordinal: 0,
            commit_ts: PgTimestamp(0),
            prev_commit_end: Lsn(0x80),
            before: before.map(row),
            after: Some(row(values)),
            snapshot: Default::default(),
        }
    }

    pub(crate) const ROW: [Option<&str>; 13] = [
        Some("1"),
        Some("2026-11-22"),
        Some("12345678.1234"),
        Some("-$1,234.56"),
        Some("-0"),
        Some("\\x00ff00"),
        Some("2026-11-22 01:02:03.123456"),
        Some("2026-11-22 01:02:03.123456+00"),
        Some("04:05:06.789"),
        Some("3.14159"),
        Some("{1,NULL,3}"),
        None,
        Some("-32768"),
    ];

    pub(crate) fn encode(change: &Change, with_schema: bool) -> (Value, Value, TableSchemas) {
        let avro = super::super::avro::derive(&change.table, "ehr");
        let connect = ConnectSchemas::derive(&change.table, &avro);
        let source = SourceInfo {
            name: "ehr".into(),
            db: "ehrdb".into(),
        };
        let (mut k, mut v) = (Vec::new(), Vec::new());
        assert!(write_key(change, &avro, &connect, with_schema, &mut k).unwrap());
        write_envelope(
            change,
            &avro,
            &connect,
            &source,
            PgTimestamp(1_000_000),
            with_schema,
            &mut v,
        )
        .unwrap();
        (
            serde_json::from_slice(&k).expect("key is JSON"),
            serde_json::from_slice(&v).expect("value is JSON"),
            avro,
        )
    }

    fn field<'a>(schema: &'a Value, name: &str) -> &'a Value {
        schema["fields"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["field"] == name)
            .unwrap_or_else(|| panic!("no field {name}"))
    }

    /// Expected values worked out by hand / by Python from Debezium's documented
    /// encodings, not by pgferry's code.
    #[test]
    fn values_are_debeziums_jsonconverter_forms() {
        let (key, value, _) = encode(&sample(&ROW, None), true);
        assert_eq!(key["payload"], json!({"id": 1}));
        assert_eq!(key["schema"]["name"], "ehr.public.types.Key");
        assert_eq!(
            field(&key["schema"], "id"),
            &json!({"type": "int32", "optional": false, "field": "id"})
        );
        let after = &value["payload"]["after"];
        assert_eq!(after["id"], 1);
        assert_eq!(
            after["d"], 20779,
            "2026-11-22 is day 20779 after 1970-01-01"
        );
        assert_eq!(after["n"], "HL6Y+7I=", "123456781234 (scale 4), 5 bytes");
        assert_eq!(after["m"], "/h3A", "-123456 cents");
        assert_eq!(after["f8"].to_string(), "-0.0");
        assert_eq!(after["by"], "AP8A");
        assert_eq!(after["ts"], 1_795_309_323_123_456_i64);
        assert_eq!(after["tz"], "2026-11-22T01:02:03.123456Z");
        assert_eq!(after["tm"], 14_706_789, "time(3): milliseconds, int32");
        assert_eq!(after["nn"], json!({"scale": 5, "value": "BMsv"}));
        assert_eq!(after["ai"], json!([1, null, 3]));
        assert_eq!(after["t"], Value::Null);
        assert_eq!(after["i2"], -32768);
        assert_eq!(value["payload"]["before"], Value::Null);
        assert_eq!(value["payload"]["op"], "c");
        assert_eq!(value["payload"]["source"]["db"], "ehrdb");
        assert_eq!(value["payload"]["unchanged"], json!([]));

        let schema = &value["schema"];
        assert_eq!(schema["name"], "ehr.public.types.Envelope");
        assert_eq!(schema["type"], "struct");
        let row = field(schema, "after");
        assert_eq!(row["name"], "ehr.public.types.Value");
        assert_eq!(row["optional"], true);
        assert_eq!(
            field(row, "n"),
            &json!({"type": "bytes", "optional": true, "name": "org.apache.kafka.connect.data.Decimal",
                    "version": 1, "parameters": {"scale": "4", "connect.decimal.precision": "12"}, "field": "n"})
        );
        assert_eq!(field(row, "d")["name"], "io.debezium.time.Date");
        assert_eq!(field(row, "d")["type"], "int32");
        assert_eq!(field(row, "ts")["name"], "io.debezium.time.MicroTimestamp");
        assert_eq!(field(row, "tz")["name"], "io.debezium.time.ZonedTimestamp");
        assert_eq!(field(row, "tm")["name"], "io.debezium.time.Time");
        assert_eq!(field(row, "i2")["type"], "int16");
        assert_eq!(field(row, "ai")["items"]["type"], "int32");
        assert_eq!(
            field(row, "nn")["name"],
            "io.debezium.data.VariableScaleDecimal"
        );
        assert_eq!(
            field(field(schema, "source"), "snapshot")["name"],
            "io.debezium.data.Enum"
        );

        let (_, bare, _) = encode(&sample(&ROW, None), false);
        assert_eq!(bare, value["payload"], "payload only: the same payload");
    }

    #[test]
    fn specials_and_unchanged_travel_as_a_declared_struct() {
        let mut row = ROW;
        row[1] = Some("infinity");
        row[2] = Some("NaN");
        row[4] = Some("NaN");
        row[10] = Some("{{1,2},{3,4}}");
        row[11] = Some("<unchanged>");
        let mut old = ROW;
        old[1] = Some("2026-11-22");
        let (_, value, _) = encode(&sample(&row, Some(&old)), true);
        let p = &value["payload"];
        assert_eq!(
            p["after"]["d"],
            json!({"text": "infinity", "unchanged": false})
        );
        assert_eq!(
            p["before"]["d"],
            json!({"text": "2026-11-22", "unchanged": false}),
            "both images use the column's struct form in this message"
        );
        assert_eq!(p["after"]["n"], json!({"text": "NaN", "unchanged": false}));
        assert_eq!(p["after"]["f8"], json!({"text": "NaN", "unchanged": false}));
        assert_eq!(
            p["after"]["ai"],
            json!({"text": "{{1,2},{3,4}}", "unchanged": false})
        );
        assert_eq!(p["after"]["t"], json!({"text": null, "unchanged": true}));
        assert_eq!(p["unchanged"], json!(["t"]));
        assert_eq!(p["after"]["m"], "/h3A", "other columns keep their type");
        for image in ["before", "after"] {
            let row = field(&value["schema"], image);
            for c in ["d", "n", "f8", "ai", "t"] {
                assert_eq!(field(row, c)["name"], SPECIAL_NAME, "{image}.{c}");
                assert_eq!(field(row, c)["type"], "struct");
            }
            assert_eq!(
                field(row, "m")["name"],
                "org.apache.kafka.connect.data.Decimal"
            );
        }
    }
}
