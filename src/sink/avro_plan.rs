//! A decode plan for Avro change envelopes, compiled once per writer schema: it reads
//! the binary datum straight into PostgreSQL text, without building apache-avro's
//! generic `Value` tree (a `String` per field name, a `Box` per union, a second pass
//! to turn each value into text). Decoding took a fifth of pgferry's CPU while copying
//! a snapshot through Kafka.
//!
//! The plan covers the shapes pgferry writes and Debezium's semantic types. A schema
//! with anything else compiles to `None`, and its messages take the generic path in
//! [`super::decode`], which gives the same results (the tests compare both).

use std::collections::HashMap;
use std::sync::Arc;

use apache_avro::schema::{Name, Namespace, RecordSchema, ResolvedSchema};
use apache_avro::Schema;
use serde_json::Value as Json;

use super::decode::{bad, float_text, is_named, parse_op, quote_array_element};
use super::decode::{DecodeError, Row, SinkValue};
use crate::codec::pgtext;
use crate::event::Op;

/// How one column value (or an array item) becomes text.
#[derive(Debug, Clone)]
enum Conv {
    Null,
    Bool,
    Int,
    /// Days since the epoch (`date`, `io.debezium.time.Date`).
    IntDate,
    /// Milliseconds of the day (`io.debezium.time.Time`).
    IntTimeMillis,
    Long,
    /// Milliseconds since the epoch (`io.debezium.time.Timestamp`).
    LongTimestampMillis,
    /// Microseconds of the day (`time-micros`, `io.debezium.time.MicroTime`).
    LongTimeMicros,
    /// Microseconds since the epoch, no zone (`local-timestamp-micros`,
    /// `io.debezium.time.MicroTimestamp`).
    LongTimestampMicros,
    Float,
    Double,
    String,
    /// ISO-8601 with offset (`io.debezium.time.ZonedTimestamp`).
    ZonedTimestamp,
    Uuid,
    Bytes,
    /// Big-endian two's complement on `bytes`, at a fixed scale.
    Decimal(u32),
    /// `io.debezium.data.VariableScaleDecimal {scale, value}`; `true` when `scale`
    /// comes first.
    VariableScaleDecimal(bool),
    /// `io.pgferry.Special {text}` inside a union: the text the type could not hold.
    Special,
    /// An empty record inside a union: unchanged TOAST.
    Unchanged,
    Array(Box<Conv>),
    Union(Vec<Conv>),
}

/// How to step over a value the envelope does not need.
#[derive(Debug, Clone)]
enum Skip {
    Nothing,
    Fixed(usize),
    /// A zig-zag varint (int, long, enum, date, ...).
    Varint,
    /// A length, then that many bytes (string, bytes).
    Sized,
    Array(Box<Skip>),
    Map(Box<Skip>),
    Union(Vec<Skip>),
    Record(Vec<Skip>),
}

/// What the envelope does with one of its top-level fields.
#[derive(Debug, Clone)]
enum Field {
    Op,
    Source(Vec<SourceField>),
    /// `before` or `after`: the union's branches, `None` for null; a branch that is
    /// not a row is an error naming the field.
    Row {
        name: &'static str,
        branches: Vec<Option<RowBranch>>,
    },
    Skip(Skip),
}

#[derive(Debug, Clone)]
enum RowBranch {
    Row(Arc<Vec<Conv>>),
    NotRow,
}

#[derive(Debug, Clone)]
enum SourceField {
    Schema,
    Table,
    /// `ts_us` as a union such as `["null", "long"]`: per branch, whether it is the
    /// long, and how to step over it otherwise.
    TsUs(Vec<(bool, Skip)>),
    Skip(Skip),
}

/// A compiled envelope.
#[derive(Debug, Clone)]
pub struct EnvelopePlan {
    fields: Vec<Field>,
}

/// The parts of an envelope the sink keeps.
pub struct Envelope {
    pub op: Op,
    pub schema: String,
    pub table: String,
    pub commit_ts_us: i64,
    pub before: Option<Row>,
    pub after: Option<Row>,
}

struct Names<'s> {
    names: &'s HashMap<Name, &'s Schema>,
}

impl<'s> Names<'s> {
    /// The schema a reference names, as apache-avro resolves it.
    fn resolve(&self, schema: &'s Schema, ns: &Namespace) -> Option<(&'s Schema, Namespace)> {
        let mut schema = schema;
        let mut ns = ns.clone();
        for _ in 0..8 {
            match schema {
                Schema::Ref { name } => {
                    let full = name.fully_qualified_name(&ns);
                    schema = self.names.get(&full)?;
                    ns = full.namespace;
                }
                Schema::Record(RecordSchema { name, .. }) => {
                    if name.namespace.is_some() {
                        ns = name.namespace.clone();
                    }
                    return Some((schema, ns));
                }
                _ => return Some((schema, ns)),
            }
        }
        None
    }

    fn skip(&self, schema: &'s Schema, ns: &Namespace, depth: u32) -> Option<Skip> {
        if depth > 32 {
            return None;
        }
        let (schema, ns) = self.resolve(schema, ns)?;
        Some(match schema {
            Schema::Null => Skip::Nothing,
            Schema::Boolean => Skip::Fixed(1),
            Schema::Float => Skip::Fixed(4),
            Schema::Double => Skip::Fixed(8),
            Schema::Int
            | Schema::Long
            | Schema::Date
            | Schema::TimeMillis
            | Schema::TimeMicros
            | Schema::TimestampMillis
            | Schema::TimestampMicros
            | Schema::TimestampNanos
            | Schema::LocalTimestampMillis
            | Schema::LocalTimestampMicros
            | Schema::LocalTimestampNanos
            | Schema::Enum(_) => Skip::Varint,
            Schema::Bytes | Schema::String | Schema::Uuid | Schema::BigDecimal => Skip::Sized,
            Schema::Fixed(f) => Skip::Fixed(f.size),
            Schema::Duration => Skip::Fixed(12),
            Schema::Decimal(d) => self.skip(&d.inner, &ns, depth + 1)?,
            Schema::Array(a) => Skip::Array(Box::new(self.skip(&a.items, &ns, depth + 1)?)),
            Schema::Map(m) => Skip::Map(Box::new(self.skip(&m.types, &ns, depth + 1)?)),
            Schema::Union(u) => Skip::Union(
                u.variants()
                    .iter()
                    .map(|v| self.skip(v, &ns, depth + 1))
                    .collect::<Option<_>>()?,
            ),
            Schema::Record(r) => Skip::Record(
                r.fields
                    .iter()
                    .map(|f| self.skip(&f.schema, &ns, depth + 1))
                    .collect::<Option<_>>()?,
            ),
            Schema::Ref { .. } => return None,
        })
    }

    /// The conversion of a column whose writer type is `schema`, described in JSON by
    /// `ty` (for Debezium's `connect.name`); `None` where the generic path must decide.
    fn conv(&self, schema: &'s Schema, ty: &Json, ns: &Namespace, in_union: bool) -> Option<Conv> {
        let (schema, ns) = self.resolve(schema, ns)?;
        let named = |n: &str| is_named(ty, n);
        Some(match schema {
            Schema::Null => Conv::Null,
            Schema::Boolean => Conv::Bool,
            Schema::Int if named("io.debezium.time.Date") => Conv::IntDate,
            Schema::Int if named("io.debezium.time.Time") => Conv::IntTimeMillis,
            Schema::Int => Conv::Int,
            Schema::Long if named("io.debezium.time.Timestamp") => Conv::LongTimestampMillis,
            Schema::Long if named("io.debezium.time.MicroTime") => Conv::LongTimeMicros,
            Schema::Long if named("io.debezium.time.MicroTimestamp") => Conv::LongTimestampMicros,
            Schema::Long => Conv::Long,
            Schema::Float => Conv::Float,
            Schema::Double => Conv::Double,
            Schema::Date => Conv::IntDate,
            Schema::TimeMicros => Conv::LongTimeMicros,
            Schema::LocalTimestampMicros => Conv::LongTimestampMicros,
            Schema::Uuid => Conv::Uuid,
            Schema::String if named("io.debezium.time.ZonedTimestamp") => Conv::ZonedTimestamp,
            Schema::String => Conv::String,
            Schema::Bytes => Conv::Bytes,
            Schema::Decimal(d) if matches!(*d.inner, Schema::Bytes) => {
                Conv::Decimal(ty["scale"].as_u64().unwrap_or(0) as u32)
            }
            Schema::Array(a) => {
                Conv::Array(Box::new(self.conv(&a.items, &ty["items"], &ns, false)?))
            }
            Schema::Union(u) => {
                let branches = ty.as_array();
                Conv::Union(
                    u.variants()
                        .iter()
                        .enumerate()
                        .map(|(i, v)| {
                            let b = branches.and_then(|b| b.get(i)).unwrap_or(&Json::Null);
                            self.conv(v, b, &ns, true)
                        })
                        .collect::<Option<_>>()?,
                )
            }
            Schema::Record(r) => {
                let names: Vec<&str> = r.fields.iter().map(|f| f.name.as_str()).collect();
                let kinds: Vec<&Schema> = r
                    .fields
                    .iter()
                    .map(|f| self.resolve(&f.schema, &ns).map(|(s, _)| s))
                    .collect::<Option<_>>()?;
                match (names.as_slice(), kinds.as_slice()) {
                    ([], []) if in_union => Conv::Unchanged,
                    (["text"], [Schema::String]) if in_union => Conv::Special,
                    (["scale", "value"], [Schema::Int, Schema::Bytes]) => {
                        Conv::VariableScaleDecimal(true)
                    }
                    (["value", "scale"], [Schema::Bytes, Schema::Int]) => {
                        Conv::VariableScaleDecimal(false)
                    }
                    _ => return None,
                }
            }
            _ => return None,
        })
    }
}

impl EnvelopePlan {
    /// Compile the plan of a value schema whose row columns are `columns` (their JSON
    /// types, in order). `None`: use the generic decoder.
    pub fn compile(avro: &Schema, columns: &[(Arc<str>, Json)]) -> Option<EnvelopePlan> {
        if columns.is_empty() {
            return None;
        }
        let resolved = ResolvedSchema::try_from(avro).ok()?;
        let names = Names {
            names: resolved.get_names(),
        };
        let Schema::Record(envelope) = avro else {
            return None;
        };
        let ns = envelope.name.namespace.clone();
        let mut rows: HashMap<Name, Arc<Vec<Conv>>> = HashMap::new();
        let mut fields = Vec::with_capacity(envelope.fields.len());
        let mut seen = (false, false, false, false);
        for f in &envelope.fields {
            let field = match f.name.as_str() {
                "op" => {
                    seen.0 = true;
                    match names.resolve(&f.schema, &ns)?.0 {
                        Schema::String => Field::Op,
                        _ => return None,
                    }
                }
                "source" => {
                    seen.1 = true;
                    let (Schema::Record(source), sns) = names.resolve(&f.schema, &ns)? else {
                        return None;
                    };
                    let parts = source
                        .fields
                        .iter()
                        .map(|sf| {
                            let kind = names.resolve(&sf.schema, &sns)?.0;
                            Some(match (sf.name.as_str(), kind) {
                                ("schema", Schema::String) => SourceField::Schema,
                                ("table", Schema::String) => SourceField::Table,
                                ("ts_us", Schema::Union(u)) => SourceField::TsUs(
                                    u.variants()
                                        .iter()
                                        .map(|v| {
                                            let skip = names.skip(v, &sns, 0)?;
                                            Some((matches!(v, Schema::Long), skip))
                                        })
                                        .collect::<Option<_>>()?,
                                ),
                                // Read as the generic path reads them (or not at all).
                                ("schema" | "table" | "ts_us", _) => return None,
                                _ => SourceField::Skip(names.skip(&sf.schema, &sns, 0)?),
                            })
                        })
                        .collect::<Option<Vec<_>>>()?;
                    let has = |want: fn(&SourceField) -> bool| parts.iter().any(want);
                    if !has(|p| matches!(p, SourceField::Schema))
                        || !has(|p| matches!(p, SourceField::Table))
                    {
                        return None;
                    }
                    Field::Source(parts)
                }
                name @ ("before" | "after") => {
                    if name == "before" {
                        seen.2 = true;
                    } else {
                        seen.3 = true;
                    }
                    let Schema::Union(u) = names.resolve(&f.schema, &ns)?.0 else {
                        return None;
                    };
                    let branches = u
                        .variants()
                        .iter()
                        .map(|v| {
                            let (s, rns) = names.resolve(v, &ns)?;
                            Some(match s {
                                Schema::Null => None,
                                Schema::Record(r) => {
                                    if r.fields.len() != columns.len() {
                                        return None;
                                    }
                                    let convs = match rows.get(&r.name) {
                                        Some(c) => c.clone(),
                                        None => {
                                            let c = Arc::new(
                                                r.fields
                                                    .iter()
                                                    .zip(columns)
                                                    .map(|(rf, (_, ty))| {
                                                        names.conv(&rf.schema, ty, &rns, false)
                                                    })
                                                    .collect::<Option<Vec<_>>>()?,
                                            );
                                            rows.insert(r.name.clone(), c.clone());
                                            c
                                        }
                                    };
                                    Some(RowBranch::Row(convs))
                                }
                                _ => Some(RowBranch::NotRow),
                            })
                        })
                        .collect::<Option<Vec<_>>>()?;
                    Field::Row {
                        name: if name == "before" { "before" } else { "after" },
                        branches,
                    }
                }
                _ => Field::Skip(names.skip(&f.schema, &ns, 0)?),
            };
            fields.push(field);
        }
        // Without these the generic path reports what is missing.
        (seen == (true, true, true, true)).then_some(EnvelopePlan { fields })
    }

    /// Decode one datum. `names` are the row's column names, in order.
    pub fn decode(
        &self,
        datum: &[u8],
        names: &Arc<Vec<Arc<str>>>,
    ) -> Result<Envelope, DecodeError> {
        let mut r = Reader { buf: datum };
        let mut op = None;
        let mut schema = None;
        let mut table = None;
        let mut ts_us = 0;
        let mut before = None;
        let mut after = None;
        for f in &self.fields {
            match f {
                Field::Op => op = Some(parse_op(r.str()?)?),
                Field::Source(parts) => {
                    for p in parts {
                        match p {
                            SourceField::Schema => schema = Some(r.str()?.to_string()),
                            SourceField::Table => table = Some(r.str()?.to_string()),
                            SourceField::TsUs(branches) => {
                                let i = r.branch(branches.len())?;
                                match &branches[i] {
                                    (true, _) => ts_us = r.long()?,
                                    (false, skip) => r.skip(skip)?,
                                }
                            }
                            SourceField::Skip(s) => r.skip(s)?,
                        }
                    }
                }
                Field::Row { name, branches } => {
                    let i = r.branch(branches.len())?;
                    let row = match &branches[i] {
                        None => None,
                        Some(RowBranch::Row(convs)) => {
                            let mut values = Vec::with_capacity(convs.len());
                            for conv in convs.iter() {
                                values.push(r.value(conv)?);
                            }
                            Some(Row::new(names.clone(), values))
                        }
                        Some(RowBranch::NotRow) => return Err(bad(format!("{name} is not a row"))),
                    };
                    if *name == "before" {
                        before = row;
                    } else {
                        after = row;
                    }
                }
                Field::Skip(s) => r.skip(s)?,
            }
        }
        Ok(Envelope {
            op: op.ok_or_else(|| bad("the envelope has no op"))?,
            schema: schema.ok_or_else(|| bad("source.schema is missing"))?,
            table: table.ok_or_else(|| bad("source.table is missing"))?,
            commit_ts_us: ts_us,
            before,
            after,
        })
    }
}

fn truncated() -> DecodeError {
    bad("the Avro value does not decode with its schema: it ends early")
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.buf.len() {
            return Err(truncated());
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn long(&mut self) -> Result<i64, DecodeError> {
        let mut n: u64 = 0;
        for shift in (0..64).step_by(7) {
            let [b, rest @ ..] = self.buf else {
                return Err(truncated());
            };
            self.buf = rest;
            n |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok((n >> 1) as i64 ^ -((n & 1) as i64));
            }
        }
        Err(bad(
            "the Avro value does not decode with its schema: a varint is too long",
        ))
    }

    fn int(&mut self) -> Result<i32, DecodeError> {
        let l = self.long()?;
        i32::try_from(l)
            .map_err(|_| bad("the Avro value does not decode with its schema: an int overflows"))
    }

    fn len(&mut self) -> Result<usize, DecodeError> {
        let l = self.long()?;
        usize::try_from(l)
            .map_err(|_| bad("the Avro value does not decode with its schema: a negative length"))
    }

    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.len()?;
        self.take(n)
    }

    fn str(&mut self) -> Result<&'a str, DecodeError> {
        std::str::from_utf8(self.bytes()?).map_err(|_| {
            bad("the Avro value does not decode with its schema: a string is not UTF-8")
        })
    }

    fn branch(&mut self, n: usize) -> Result<usize, DecodeError> {
        let i = self.long()?;
        usize::try_from(i).ok().filter(|i| *i < n).ok_or_else(|| {
            bad("the Avro value does not decode with its schema: a union branch is out of range")
        })
    }

    /// The item count of the next block of an array or map (0 at its end).
    fn block(&mut self) -> Result<usize, DecodeError> {
        let n = self.long()?;
        if n < 0 {
            // A negative count is followed by the block's size in bytes.
            self.long()?;
        }
        usize::try_from(n.unsigned_abs())
            .map_err(|_| bad("the Avro value does not decode with its schema: a block is too long"))
    }

    fn skip(&mut self, s: &Skip) -> Result<(), DecodeError> {
        match s {
            Skip::Nothing => {}
            Skip::Fixed(n) => {
                self.take(*n)?;
            }
            Skip::Varint => {
                self.long()?;
            }
            Skip::Sized => {
                self.bytes()?;
            }
            Skip::Array(item) => loop {
                let n = self.block()?;
                if n == 0 {
                    break;
                }
                for _ in 0..n {
                    self.skip(item)?;
                }
            },
            Skip::Map(value) => loop {
                let n = self.block()?;
                if n == 0 {
                    break;
                }
                for _ in 0..n {
                    self.bytes()?;
                    self.skip(value)?;
                }
            },
            Skip::Union(branches) => {
                let i = self.branch(branches.len())?;
                self.skip(&branches[i])?;
            }
            Skip::Record(fields) => {
                for f in fields {
                    self.skip(f)?;
                }
            }
        }
        Ok(())
    }

    fn value(&mut self, conv: &Conv) -> Result<SinkValue, DecodeError> {
        Ok(match conv {
            Conv::Null => SinkValue::Null,
            Conv::Unchanged => SinkValue::Unchanged,
            Conv::Union(branches) => {
                let i = self.branch(branches.len())?;
                self.value(&branches[i])?
            }
            other => SinkValue::Text(self.text(other)?),
        })
    }

    fn text(&mut self, conv: &Conv) -> Result<String, DecodeError> {
        Ok(match conv {
            Conv::Bool => {
                match self.take(1)?[0] {
                    0 => "f".into(),
                    1 => "t".into(),
                    _ => return Err(bad(
                        "the Avro value does not decode with its schema: a boolean is not 0 or 1",
                    )),
                }
            }
            Conv::Int => pgtext::format_integer(i64::from(self.int()?)),
            Conv::IntDate => pgtext::format_date(self.int()?),
            Conv::IntTimeMillis => pgtext::format_time(i64::from(self.int()?) * 1000),
            Conv::Long => pgtext::format_integer(self.long()?),
            Conv::LongTimestampMillis => {
                pgtext::format_timestamp(self.long()?.saturating_mul(1000))
            }
            Conv::LongTimeMicros => pgtext::format_time(self.long()?),
            Conv::LongTimestampMicros => pgtext::format_timestamp(self.long()?),
            Conv::Float => {
                let b = self.take(4)?;
                float_text(
                    f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                    true,
                )
            }
            Conv::Double => {
                let b: [u8; 8] = self.take(8)?.try_into().map_err(|_| truncated())?;
                float_text(f64::from_le_bytes(b), false)
            }
            Conv::String | Conv::Special => self.str()?.to_string(),
            Conv::ZonedTimestamp => pgtext::iso_to_timestamptz(self.str()?)
                .map_err(|e| bad(format!("timestamptz: {e}")))?,
            Conv::Uuid => uuid_text(self.bytes()?)?,
            Conv::Bytes => {
                let b = self.bytes()?;
                let mut s = String::with_capacity(2 + b.len() * 2);
                s.push_str("\\x");
                for byte in b {
                    s.push(char::from(HEX[usize::from(byte >> 4)]));
                    s.push(char::from(HEX[usize::from(byte & 15)]));
                }
                s
            }
            Conv::Decimal(scale) => pgtext::format_decimal(self.bytes()?, *scale),
            Conv::VariableScaleDecimal(scale_first) => {
                let (scale, value) = if *scale_first {
                    let s = self.int()?;
                    (s, self.bytes()?)
                } else {
                    let v = self.bytes()?;
                    (self.int()?, v)
                };
                pgtext::format_decimal(value, scale.max(0) as u32)
            }
            Conv::Array(item) => {
                let mut out = String::from("{");
                let mut first = true;
                loop {
                    let n = self.block()?;
                    if n == 0 {
                        break;
                    }
                    for _ in 0..n {
                        if !first {
                            out.push(',');
                        }
                        first = false;
                        match self.value(item)? {
                            SinkValue::Null => out.push_str("NULL"),
                            SinkValue::Text(t) => quote_array_element(&mut out, &t),
                            SinkValue::Unchanged => {
                                return Err(bad("unchanged marker inside an array"))
                            }
                        }
                    }
                }
                out.push('}');
                out
            }
            Conv::Null | Conv::Unchanged | Conv::Union(_) => match self.value(conv)? {
                SinkValue::Text(t) => t,
                _ => return Err(bad("unexpected null inside a value")),
            },
        })
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// A UUID as apache-avro reads one: 16 raw bytes, or its text (hyphenated or not,
/// either case); always written back hyphenated in lower case.
fn uuid_text(b: &[u8]) -> Result<String, DecodeError> {
    let invalid = || bad("the Avro value does not decode with its schema: not a UUID");
    let mut hex = [0u8; 32];
    match b.len() {
        16 => {
            for (i, byte) in b.iter().enumerate() {
                hex[2 * i] = HEX[usize::from(byte >> 4)];
                hex[2 * i + 1] = HEX[usize::from(byte & 15)];
            }
        }
        32 | 36 => {
            let mut n = 0;
            for (i, &c) in b.iter().enumerate() {
                if b.len() == 36 && matches!(i, 8 | 13 | 18 | 23) {
                    if c != b'-' {
                        return Err(invalid());
                    }
                    continue;
                }
                if !c.is_ascii_hexdigit() {
                    return Err(invalid());
                }
                hex[n] = c.to_ascii_lowercase();
                n += 1;
            }
        }
        _ => return Err(invalid()),
    }
    let mut s = String::with_capacity(36);
    for (i, c) in hex.iter().enumerate() {
        if matches!(i, 8 | 12 | 16 | 20) {
            s.push('-');
        }
        s.push(char::from(*c));
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use apache_avro::types::Value;
    use apache_avro::{Decimal, Schema};

    use super::super::decode::{avro_envelope, avro_envelope_generic, SinkValue, WriterSchema};
    use crate::lsn::Lsn;

    /// An envelope in pgferry's shape whose row covers every conversion of the plan,
    /// Debezium's semantic types included; `after` refers to `before`'s record by name.
    const SCHEMA: &str = r#"{"type": "record", "name": "Envelope", "namespace": "t.public.x",
      "fields": [
        {"name": "before", "type": ["null", {"type": "record", "name": "Value", "fields": [
          {"name": "b", "type": ["null", "boolean"]},
          {"name": "i", "type": ["null", "int"]},
          {"name": "l", "type": ["null", "long", {"type": "record", "name": "Special",
             "namespace": "io.pgferry", "fields": [{"name": "text", "type": "string"}]}]},
          {"name": "f", "type": ["null", "float"]},
          {"name": "d", "type": ["null", "double"]},
          {"name": "s", "type": ["null", "string", {"type": "record", "name": "Unchanged",
             "namespace": "io.pgferry", "fields": []}]},
          {"name": "by", "type": ["null", "bytes"]},
          {"name": "dec", "type": ["null", {"type": "bytes", "logicalType": "decimal",
             "precision": 8, "scale": 2}, "io.pgferry.Special"]},
          {"name": "u", "type": ["null", {"type": "string", "logicalType": "uuid"}]},
          {"name": "dt", "type": ["null", {"type": "int", "logicalType": "date"}]},
          {"name": "tm", "type": ["null", {"type": "long", "logicalType": "time-micros"}]},
          {"name": "ts", "type": ["null", {"type": "long", "logicalType": "local-timestamp-micros"}]},
          {"name": "tz", "type": ["null", {"type": "string",
             "connect.name": "io.debezium.time.ZonedTimestamp"}]},
          {"name": "ddate", "type": {"type": "int", "connect.name": "io.debezium.time.Date"}},
          {"name": "dtime", "type": {"type": "int", "connect.name": "io.debezium.time.Time"}},
          {"name": "dts", "type": {"type": "long", "connect.name": "io.debezium.time.Timestamp"}},
          {"name": "dmt", "type": {"type": "long", "connect.name": "io.debezium.time.MicroTime"}},
          {"name": "dmts", "type": {"type": "long",
             "connect.name": "io.debezium.time.MicroTimestamp"}},
          {"name": "vsd", "type": ["null", {"type": "record", "name": "VariableScaleDecimal",
             "namespace": "io.debezium.data", "fields": [{"name": "scale", "type": "int"},
             {"name": "value", "type": "bytes"}]}]},
          {"name": "arr", "type": ["null", {"type": "array", "items": ["null", "string"]}]},
          {"name": "iarr", "type": {"type": "array", "items": "long"}}
        ]}]},
        {"name": "after", "type": ["null", "Value"]},
        {"name": "source", "type": {"type": "record", "name": "Source", "fields": [
          {"name": "version", "type": "string"},
          {"name": "ts_ms", "type": "long"},
          {"name": "sequence", "type": ["null", "string"]},
          {"name": "ts_us", "type": ["null", "long"]},
          {"name": "schema", "type": "string"},
          {"name": "table", "type": "string"},
          {"name": "tags", "type": {"type": "map", "values": "int"}},
          {"name": "fx", "type": {"type": "fixed", "name": "F3", "size": 3}}
        ]}},
        {"name": "transaction", "type": ["null", {"type": "record", "name": "Block",
          "fields": [{"name": "id", "type": "string"}, {"name": "n", "type": "long"}]}]},
        {"name": "op", "type": "string"},
        {"name": "ts_ms", "type": ["null", "long"]},
        {"name": "unchanged", "type": {"type": "array", "items": "string"}}
      ]}"#;

    fn u(i: u32, v: Value) -> Value {
        Value::Union(i, Box::new(v))
    }

    fn special(text: &str) -> Value {
        Value::Record(vec![("text".into(), Value::String(text.into()))])
    }

    fn row(n: i64) -> Value {
        let fields: Vec<(&str, Value)> = vec![
            ("b", u(1, Value::Boolean(n % 2 == 0))),
            ("i", u(1, Value::Int(-(n as i32) * 7))),
            (
                "l",
                if n == 2 {
                    u(2, special("Infinity"))
                } else {
                    u(1, Value::Long(n * 1_000_000_007))
                },
            ),
            (
                "f",
                u(
                    1,
                    Value::Float(if n == 1 { f32::NAN } else { 1.5 / n as f32 }),
                ),
            ),
            (
                "d",
                u(
                    1,
                    Value::Double(if n == 3 { -0.0 } else { 1e300 / n as f64 }),
                ),
            ),
            (
                "s",
                if n == 2 {
                    u(2, Value::Record(vec![]))
                } else {
                    u(1, Value::String(format!("Ünïcode \"{n}\" \\ {{x}}")))
                },
            ),
            ("by", u(1, Value::Bytes(vec![0, 0xff, n as u8, b'\\']))),
            (
                "dec",
                if n == 3 {
                    u(2, special("NaN"))
                } else {
                    u(1, Value::Decimal(Decimal::from(vec![0xfe, 0x57 + n as u8])))
                },
            ),
            (
                "u",
                u(
                    1,
                    Value::String(format!("A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A1{n}")),
                ),
            ),
            ("dt", u(1, Value::Date(-700 + n as i32 * 9000))),
            ("tm", u(1, Value::TimeMicros(n * 3_600_000_123))),
            (
                "ts",
                u(1, Value::LocalTimestampMicros(n * 86_400_000_000_321)),
            ),
            (
                "tz",
                if n == 1 {
                    u(0, Value::Null)
                } else {
                    u(1, Value::String("2026-11-22T01:02:03.123456Z".into()))
                },
            ),
            ("ddate", Value::Int(19_000 + n as i32)),
            ("dtime", Value::Int(45_296_789)),
            ("dts", Value::Long(1_700_000_000_123 * n)),
            ("dmt", Value::Long(45_296_789_012)),
            ("dmts", Value::Long(1_700_000_000_123_456 - n)),
            (
                "vsd",
                u(
                    1,
                    Value::Record(vec![
                        ("scale".into(), Value::Int(n as i32)),
                        ("value".into(), Value::Bytes(vec![0x30, 0x39])),
                    ]),
                ),
            ),
            (
                "arr",
                u(
                    1,
                    Value::Array(vec![
                        u(1, Value::String("a,b".into())),
                        u(0, Value::Null),
                        u(1, Value::String("\"q\"".into())),
                    ]),
                ),
            ),
            ("iarr", Value::Array((0..n).map(Value::Long).collect())),
        ];
        Value::Record(fields.into_iter().map(|(k, v)| (k.into(), v)).collect())
    }

    fn envelope(op: &str, before: Option<i64>, after: Option<i64>, ts_us: Option<i64>) -> Value {
        let image = |r: Option<i64>| r.map_or(u(0, Value::Null), |n| u(1, row(n)));
        Value::Record(vec![
            ("before".into(), image(before)),
            ("after".into(), image(after)),
            (
                "source".into(),
                Value::Record(vec![
                    ("version".into(), Value::String("1".into())),
                    ("ts_ms".into(), Value::Long(5)),
                    (
                        "sequence".into(),
                        u(1, Value::String("[\"1\",\"2\"]".into())),
                    ),
                    (
                        "ts_us".into(),
                        ts_us.map_or(u(0, Value::Null), |t| u(1, Value::Long(t))),
                    ),
                    ("schema".into(), Value::String("public".into())),
                    ("table".into(), Value::String("x".into())),
                    (
                        "tags".into(),
                        Value::Map([("a".to_string(), Value::Int(1))].into_iter().collect()),
                    ),
                    ("fx".into(), Value::Fixed(3, vec![1, 2, 3])),
                ]),
            ),
            (
                "transaction".into(),
                u(
                    1,
                    Value::Record(vec![
                        ("id".into(), Value::String("tx".into())),
                        ("n".into(), Value::Long(9)),
                    ]),
                ),
            ),
            ("op".into(), Value::String(op.into())),
            ("ts_ms".into(), u(1, Value::Long(77))),
            (
                "unchanged".into(),
                Value::Array(vec![Value::String("s".into())]),
            ),
        ])
    }

    #[test]
    fn the_plan_reads_what_apache_avro_writes_as_the_generic_path_does() {
        let schema = WriterSchema::parse(SCHEMA).expect("the test schema parses");
        assert!(
            schema.plan.is_some(),
            "the test schema must compile to a plan"
        );
        let avro = Schema::parse_str(SCHEMA).unwrap();
        let cases = [
            envelope("c", None, Some(1), Some(1_700_000_000_000_001)),
            envelope("u", Some(2), Some(3), None),
            envelope("d", Some(3), None, Some(-4)),
            envelope("r", None, Some(2), Some(0)),
        ];
        for (n, value) in cases.into_iter().enumerate() {
            let datum = apache_avro::to_avro_datum(&avro, value).expect("the case encodes");
            let at = (Lsn(n as u64), n as u32);
            let fast = avro_envelope(&datum, &schema, None, at).expect("plan decodes");
            let generic =
                avro_envelope_generic(&datum, &schema, None, at).expect("generic decodes");
            assert_eq!(fast.op, generic.op, "case {n}");
            assert_eq!(fast.table, generic.table, "case {n}");
            assert_eq!(fast.commit_ts_us, generic.commit_ts_us, "case {n}");
            assert_eq!(fast.before, generic.before, "case {n}");
            assert_eq!(fast.after, generic.after, "case {n}");
            let some = fast.after.as_ref().or(fast.before.as_ref()).unwrap();
            assert!(some.iter().any(|(_, v)| matches!(v, SinkValue::Text(_))));
            // Cut short anywhere, both refuse it (and neither panics).
            for cut in 0..datum.len() {
                let short = &datum[..cut];
                assert!(
                    avro_envelope(short, &schema, None, at).is_err(),
                    "case {n} cut {cut}"
                );
            }
        }
        // The special values came through as their text, the unchanged as unchanged.
        let datum = apache_avro::to_avro_datum(&avro, envelope("u", None, Some(2), None)).unwrap();
        let e = avro_envelope(&datum, &schema, None, (Lsn(1), 0)).unwrap();
        let after = e.after.unwrap();
        let get = |c: &str| after.get(c).unwrap().clone();
        assert_eq!(get("l"), SinkValue::Text("Infinity".into()));
        assert_eq!(get("s"), SinkValue::Unchanged);
        assert_eq!(
            get("u"),
            SinkValue::Text("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a12".into())
        );
    }

    #[test]
    fn shapes_outside_the_plan_take_the_generic_path() {
        // timestamp-micros is not a type pgferry writes: the generic path decides.
        let odd = SCHEMA.replace("local-timestamp-micros", "timestamp-micros");
        assert!(WriterSchema::parse(&odd).unwrap().plan.is_none());
        // No op field: the generic path says what is missing.
        let no_op = SCHEMA.replace(r#"{"name": "op", "type": "string"},"#, "");
        assert!(WriterSchema::parse(&no_op).unwrap().plan.is_none());
    }

    #[test]
    fn every_schema_pgferry_derives_compiles_to_a_plan() {
        use crate::codec::avro::derive;
        use crate::event::{Column, PgType, ReplicaIdentity, TableName, TableSchema, TypeKind};
        let ty = |kind: TypeKind| {
            std::sync::Arc::new(PgType {
                oid: 0,
                name: "t".into(),
                kind,
                delimiter: b',',
            })
        };
        let kinds = [
            TypeKind::Bool,
            TypeKind::Int2,
            TypeKind::Int4,
            TypeKind::Int8,
            TypeKind::Oid,
            TypeKind::Float4,
            TypeKind::Float8,
            TypeKind::Numeric,
            TypeKind::Money,
            TypeKind::Text,
            TypeKind::Uuid,
            TypeKind::Json,
            TypeKind::Jsonb,
            TypeKind::Date,
            TypeKind::Time,
            TypeKind::Timestamp,
            TypeKind::Timestamptz,
            TypeKind::Timetz,
            TypeKind::Interval,
            TypeKind::Bytea,
            TypeKind::Enum,
            TypeKind::Other,
            TypeKind::Array(Box::new(PgType {
                oid: 0,
                name: "t".into(),
                kind: TypeKind::Int4,
                delimiter: b',',
            })),
        ];
        let mut columns = Vec::new();
        for (i, kind) in kinds.iter().enumerate() {
            // Default precision, a short one (millis) and a numeric with a scale.
            for (j, typmod) in [-1, 3, ((10 << 16) | 2) + 4].into_iter().enumerate() {
                columns.push(Column {
                    name: format!("c{i}_{j}"),
                    ty: ty(kind.clone()),
                    typmod,
                    type_name: "t".into(),
                    nullable: j != 0,
                    transform: None,
                });
            }
        }
        let table = TableSchema {
            oid: 1,
            name: TableName::new("public", "every"),
            columns,
            key: vec![0],
            replica_identity: ReplicaIdentity::Default,
        };
        let s = derive(&table, "ehr");
        let text = serde_json::to_string(&s.value).unwrap();
        let schema = WriterSchema::parse(&text).expect("the derived schema parses");
        assert!(
            schema.plan.is_some(),
            "pgferry's own value schema must take the compiled path"
        );
    }
}
