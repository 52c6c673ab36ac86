//! Kafka message -> [`SinkEvent`]: Avro (single-object or Confluent framing) or JSON,
//! with every value turned back into its PostgreSQL text form so the target can cast
//! it with the column's own input function. Pure: schemas come from a lookup the
//! caller provides.

use std::sync::Arc;

use apache_avro::types::Value as Avro;
use serde_json::Value as Json;

use super::avro_plan::EnvelopePlan;
use crate::codec::pgtext;
use crate::event::{Op, TableName};
use crate::lsn::Lsn;

/// One column value on its way into the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkValue {
    Null,
    /// PostgreSQL text form.
    Text(String),
    /// Unchanged TOAST: leave the target column as it is.
    Unchanged,
}

/// A decoded change event.
#[derive(Debug, Clone)]
pub struct SinkEvent {
    /// Order of the change: `(commit_lsn, ordinal)`.
    pub position: (Lsn, u32),
    pub op: Op,
    pub table: TableName,
    /// Commit time, microseconds since the Unix epoch.
    pub commit_ts_us: i64,
    /// Source column names and values, in source order.
    /// (Names are shared with the writer schema: one allocation per column per
    /// schema, not per event.)
    pub before: Option<Row>,
    pub after: Option<Row>,
    /// Source column name -> PostgreSQL type (from the Avro schema), for DDL.
    pub types: Arc<Vec<(String, String)>>,
    /// Key column names (source names).
    pub key: Arc<Vec<String>>,
}

/// A row image: column names and values, in source order. The names are the writer
/// schema's, shared by every row decoded with it: one reference count per row, not one
/// per column.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Row {
    names: Arc<Vec<Arc<str>>>,
    values: Vec<SinkValue>,
}

impl Row {
    /// `names` and `values` pair up by position; extra ones of either are ignored.
    pub fn new(names: Arc<Vec<Arc<str>>>, mut values: Vec<SinkValue>) -> Row {
        values.truncate(names.len());
        Row { names, values }
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Column names and values, in source order.
    pub fn iter(&self) -> impl Iterator<Item = (&Arc<str>, &SinkValue)> + Clone {
        self.names.iter().zip(&self.values)
    }

    /// The value of column `name`, if the row has it.
    pub fn get(&self, name: &str) -> Option<&SinkValue> {
        self.iter().find(|(n, _)| &***n == name).map(|(_, v)| v)
    }

    /// The value of column `name`, to change, if the row has it.
    pub fn get_mut(&mut self, name: &str) -> Option<&mut SinkValue> {
        let i = self.names.iter().position(|n| &**n == name)?;
        self.values.get_mut(i)
    }

    /// Set column `name` to `value`, adding the column when the row lacks it.
    pub fn set(&mut self, name: &str, value: SinkValue) {
        match self.get_mut(name) {
            Some(v) => *v = value,
            None => {
                Arc::make_mut(&mut self.names).push(Arc::from(name));
                self.values.push(value);
            }
        }
    }
}

impl FromIterator<(Arc<str>, SinkValue)> for Row {
    fn from_iter<I: IntoIterator<Item = (Arc<str>, SinkValue)>>(iter: I) -> Row {
        let (names, values) = iter.into_iter().unzip();
        Row {
            names: Arc::new(names),
            values,
        }
    }
}

/// A message that cannot be decoded: the reason (never a value).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(pub String);

pub(super) fn bad(m: impl Into<String>) -> DecodeError {
    DecodeError(m.into())
}

/// One Kafka header of a consumed message: its key (shared, see the sink's reader)
/// and value.
pub type Header = (Arc<str>, Vec<u8>);

/// Order position from the `pgferry.commit_lsn` / `pgferry.ordinal` headers.
pub fn position(headers: &[Header]) -> Result<(Lsn, u32), DecodeError> {
    let get = |k: &str| {
        headers
            .iter()
            .find(|(hk, _)| **hk == *k)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
            .ok_or_else(|| bad(format!("header {k} is missing: not a pgferry change event")))
    };
    let lsn: Lsn = get("pgferry.commit_lsn")?
        .parse()
        .map_err(|e| bad(format!("header pgferry.commit_lsn: {e}")))?;
    let ordinal = get("pgferry.ordinal")?
        .parse()
        .map_err(|_| bad("header pgferry.ordinal is not a number"))?;
    Ok((lsn, ordinal))
}

/// A writer schema, prepared once for every message written with it: apache-avro's
/// `from_avro_datum` resolves the schema's names again on each call, and reading the
/// columns' names and types out of the JSON per message cost as much as decoding.
pub struct WriterSchema {
    pub avro: apache_avro::Schema,
    pub json: Json,
    /// Decodes with the names resolved once (an empty single-object header: the
    /// framing was already taken off).
    reader: apache_avro::GenericSingleObjectReader,
    /// Of a value schema: each row column's name and Avro type, in order.
    columns: Vec<(Arc<str>, Json)>,
    /// The same names, shared by every row decoded with this schema.
    names: Arc<Vec<Arc<str>>>,
    /// Of a value schema: each column's name and PostgreSQL type (`pgferry.type`).
    types: Arc<Vec<(String, String)>>,
    /// Of a key schema: the key columns' names.
    key: Arc<Vec<String>>,
    /// Of a value schema in the shapes it covers: the compiled decoder.
    pub(super) plan: Option<EnvelopePlan>,
}

struct NoHeader;

impl apache_avro::headers::HeaderBuilder for NoHeader {
    fn build_header(&self) -> Vec<u8> {
        Vec::new()
    }
}

impl WriterSchema {
    pub fn parse(text: &str) -> Result<WriterSchema, String> {
        let json: Json = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let avro = apache_avro::Schema::parse(&json).map_err(|e| e.to_string())?;
        let reader =
            apache_avro::GenericSingleObjectReader::new_with_header_builder(avro.clone(), NoHeader)
                .map_err(|e| e.to_string())?;
        let fields = row_schema_fields(&json);
        let columns: Vec<(Arc<str>, Json)> = fields
            .into_iter()
            .flatten()
            .map(|f| (Arc::from(column_name(f)), f["type"].clone()))
            .collect();
        let types = fields
            .into_iter()
            .flatten()
            .map(|f| {
                (
                    column_name(f),
                    f["pgferry.type"].as_str().unwrap_or("text").to_string(),
                )
            })
            .collect();
        let key = json["fields"]
            .as_array()
            .map(|fs| fs.iter().map(column_name).collect())
            .unwrap_or_default();
        let plan = EnvelopePlan::compile(&avro, &columns);
        let names = Arc::new(columns.iter().map(|(n, _)| n.clone()).collect());
        Ok(WriterSchema {
            names,
            plan,
            avro,
            reader,
            columns,
            types: Arc::new(types),
            key: Arc::new(key),
            json,
        })
    }
}

/// Decode an Avro envelope written with `schema`; `key` is the key's writer schema.
pub fn avro_envelope(
    datum: &[u8],
    schema: &WriterSchema,
    key: Option<&WriterSchema>,
    position: (Lsn, u32),
) -> Result<SinkEvent, DecodeError> {
    let Some(plan) = &schema.plan else {
        return avro_envelope_generic(datum, schema, key, position);
    };
    let e = plan.decode(datum, &schema.names)?;
    Ok(SinkEvent {
        position,
        op: e.op,
        table: TableName::new(e.schema, e.table),
        commit_ts_us: e.commit_ts_us,
        before: e.before,
        after: e.after,
        types: schema.types.clone(),
        key: key.map(|k| k.key.clone()).unwrap_or_default(),
    })
}

/// [`avro_envelope`] through apache-avro's generic values: for schemas outside the
/// compiled plan's shapes.
pub(super) fn avro_envelope_generic(
    datum: &[u8],
    schema: &WriterSchema,
    key: Option<&WriterSchema>,
    position: (Lsn, u32),
) -> Result<SinkEvent, DecodeError> {
    let value = schema.reader.read_value(&mut &datum[..]).map_err(|e| {
        bad(format!(
            "the Avro value does not decode with its schema: {e}"
        ))
    })?;
    let Avro::Record(fields) = value else {
        return Err(bad("the Avro value is not a record"));
    };
    let field = |name: &str| fields.iter().find(|(n, _)| n == name).map(|(_, v)| v);
    if schema.columns.is_empty() {
        return Err(bad("the schema has no Value record"));
    }
    let op = match field("op") {
        Some(Avro::String(s)) => parse_op(s)?,
        _ => return Err(bad("the envelope has no op")),
    };
    let source = match field("source") {
        Some(Avro::Record(s)) => s,
        _ => return Err(bad("the envelope has no source block")),
    };
    let source_str = |name: &str| {
        source
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| match v {
                Avro::String(s) => Some(s.clone()),
                _ => None,
            })
    };
    let table = TableName::new(
        source_str("schema").ok_or_else(|| bad("source.schema is missing"))?,
        source_str("table").ok_or_else(|| bad("source.table is missing"))?,
    );
    let commit_ts_us = source
        .iter()
        .find(|(n, _)| n == "ts_us")
        .and_then(|(_, v)| match v {
            Avro::Union(_, b) => match b.as_ref() {
                Avro::Long(l) => Some(*l),
                _ => None,
            },
            _ => None,
        })
        .unwrap_or(0);
    let row = |name: &str| -> Result<Option<Row>, DecodeError> {
        match field(name) {
            Some(Avro::Union(_, inner)) => match inner.as_ref() {
                Avro::Null => Ok(None),
                Avro::Record(values) => Ok(Some(
                    values
                        .iter()
                        .zip(&schema.columns)
                        .map(|((_, v), (name, ty))| Ok((name.clone(), avro_text(v, ty)?)))
                        .collect::<Result<_, DecodeError>>()?,
                )),
                _ => Err(bad(format!("{name} is not a row"))),
            },
            _ => Err(bad(format!("the envelope has no {name}"))),
        }
    };
    let types = schema.types.clone();
    let key = key.map(|k| k.key.clone()).unwrap_or_default();
    Ok(SinkEvent {
        position,
        op,
        table,
        commit_ts_us,
        before: row("before")?,
        after: row("after")?,
        types,
        key,
    })
}

fn row_schema_fields(schema: &Json) -> Option<&Vec<Json>> {
    let before = schema["fields"]
        .as_array()?
        .iter()
        .find(|f| f["name"] == "before")?;
    before["type"]
        .as_array()?
        .iter()
        .find_map(|t| t["fields"].as_array())
}

fn column_name(field: &Json) -> String {
    field["pgferry.column"]
        .as_str()
        .or_else(|| field["name"].as_str())
        .unwrap_or_default()
        .to_string()
}

pub(super) fn parse_op(s: &str) -> Result<Op, DecodeError> {
    Ok(match s {
        "c" => Op::Create,
        "u" => Op::Update,
        "d" => Op::Delete,
        "t" => Op::Truncate,
        "r" => Op::Read,
        other => return Err(bad(format!("unknown op {other:?}"))),
    })
}

/// The branch of a union type (or the type itself).
fn branch(ty: &Json, index: u32) -> &Json {
    match ty.as_array() {
        Some(branches) => branches.get(index as usize).unwrap_or(&Json::Null),
        None => ty,
    }
}

pub(super) fn is_named(ty: &Json, name: &str) -> bool {
    ty.as_str() == Some(name) || ty["connect.name"].as_str() == Some(name)
}

/// An Avro value back to PostgreSQL text, guided by its writer type.
fn avro_text(v: &Avro, ty: &Json) -> Result<SinkValue, DecodeError> {
    if let Avro::Union(i, inner) = v {
        let b = branch(ty, *i);
        if let Avro::Record(fields) = inner.as_ref() {
            if fields.is_empty() {
                return Ok(SinkValue::Unchanged);
            }
            // io.pgferry.Special: the PostgreSQL text of a value the field's type
            // cannot hold.
            if let [(name, Avro::String(text))] = fields.as_slice() {
                if name == "text" {
                    return Ok(SinkValue::Text(text.clone()));
                }
            }
        }
        return avro_text(inner, b);
    }
    Ok(match v {
        Avro::Null => SinkValue::Null,
        other => SinkValue::Text(plain_text(other, ty)?),
    })
}

pub(super) fn float_text(f: f64, single: bool) -> String {
    if f.is_nan() {
        "NaN".into()
    } else if f.is_infinite() {
        if f > 0.0 { "Infinity" } else { "-Infinity" }.into()
    } else if f == 0.0 && f.is_sign_negative() {
        "-0".into()
    } else if single {
        (f as f32).to_string()
    } else {
        f.to_string()
    }
}

fn plain_text(v: &Avro, ty: &Json) -> Result<String, DecodeError> {
    Ok(match v {
        Avro::Boolean(b) => if *b { "t" } else { "f" }.into(),
        // Debezium's semantic types carry no Avro logical type: the name says.
        Avro::Int(d) if is_named(ty, "io.debezium.time.Date") => pgtext::format_date(*d),
        Avro::Int(ms) if is_named(ty, "io.debezium.time.Time") => {
            pgtext::format_time(i64::from(*ms) * 1000)
        }
        Avro::Long(ms) if is_named(ty, "io.debezium.time.Timestamp") => {
            pgtext::format_timestamp(ms.saturating_mul(1000))
        }
        Avro::Long(t) if is_named(ty, "io.debezium.time.MicroTime") => pgtext::format_time(*t),
        Avro::Long(t) if is_named(ty, "io.debezium.time.MicroTimestamp") => {
            pgtext::format_timestamp(*t)
        }
        Avro::Int(i) => i.to_string(),
        Avro::Long(l) => l.to_string(),
        Avro::Float(f) => float_text(f64::from(*f), true),
        Avro::Double(d) => float_text(*d, false),
        Avro::Date(d) => pgtext::format_date(*d),
        Avro::TimeMicros(t) => pgtext::format_time(*t),
        Avro::LocalTimestampMicros(t) => pgtext::format_timestamp(*t),
        Avro::Uuid(u) => u.to_string(),
        Avro::String(s) if is_named(ty, "io.debezium.time.ZonedTimestamp") => {
            pgtext::iso_to_timestamptz(s).map_err(|e| bad(format!("timestamptz: {e}")))?
        }
        Avro::String(s) => s.clone(),
        Avro::Bytes(b) => {
            let mut s = String::with_capacity(2 + b.len() * 2);
            s.push_str("\\x");
            for byte in b {
                s.push_str(&format!("{byte:02x}"));
            }
            s
        }
        Avro::Decimal(d) => {
            let bytes: Vec<u8> = d.try_into().map_err(|e| bad(format!("decimal: {e}")))?;
            let scale = ty["scale"].as_u64().unwrap_or(0) as u32;
            pgtext::format_decimal(&bytes, scale)
        }
        Avro::Record(fields) => {
            // VariableScaleDecimal {scale, value}
            let scale = fields.iter().find(|(n, _)| n == "scale").map(|(_, v)| v);
            let value = fields.iter().find(|(n, _)| n == "value").map(|(_, v)| v);
            match (scale, value) {
                (Some(Avro::Int(scale)), Some(Avro::Bytes(b))) => {
                    pgtext::format_decimal(b, (*scale).max(0) as u32)
                }
                _ => return Err(bad("unexpected record value")),
            }
        }
        Avro::Array(items) => {
            let item_ty = &ty["items"];
            let mut out = String::from("{");
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                match avro_text(item, item_ty)? {
                    SinkValue::Null => out.push_str("NULL"),
                    SinkValue::Text(t) => quote_array_element(&mut out, &t),
                    SinkValue::Unchanged => return Err(bad("unchanged marker inside an array")),
                }
            }
            out.push('}');
            out
        }
        other => {
            return Err(bad(format!(
                "unsupported Avro value {:?}",
                std::mem::discriminant(other)
            )))
        }
    })
}

/// Quote one element of an array literal (always quoted: safe for every type).
pub(super) fn quote_array_element(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

/// The `pgferry.schema` header of a JSON message: the fingerprint of the Avro value
/// schema that describes its columns. `None` for messages of pgferry versions before
/// the Debezium JSON shapes (values as in `tail` lines, see [`json_envelope`]).
pub fn json_schema_header(headers: &[Header]) -> Option<Result<[u8; 8], DecodeError>> {
    let (_, v) = headers.iter().find(|(k, _)| &**k == "pgferry.schema")?;
    Some(
        std::str::from_utf8(v)
            .ok()
            .filter(|t| t.len() == 16)
            .and_then(|t| u64::from_str_radix(t, 16).ok())
            .map(u64::to_le_bytes)
            .ok_or_else(|| bad("header pgferry.schema is not a 16-digit hex fingerprint")),
    )
}

/// The payload of a JsonConverter message: `payload` of `{"schema", "payload"}`, or the
/// message itself (`schemas.enable=false`).
fn connect_payload(v: Json) -> Json {
    match v {
        Json::Object(mut o) if o.len() == 2 && o.contains_key("schema") => {
            o.remove("payload").unwrap_or(Json::Null)
        }
        other => other,
    }
}

/// Decode a Debezium JSON envelope (`kafka.format = "json"`, with or without embedded
/// Connect schemas), reading each value back by the Avro value schema of the same
/// table version (`schema_json`, from the schema topic): it names the PostgreSQL type
/// and the Debezium semantic type (epoch days, millis or micros, decimal scale) of
/// every column.
pub fn connect_envelope(
    value: &[u8],
    key: Option<&[u8]>,
    schema_json: &Json,
    position: (Lsn, u32),
) -> Result<SinkEvent, DecodeError> {
    let v: Json = serde_json::from_slice(value).map_err(|e| bad(format!("not JSON: {e}")))?;
    let v = connect_payload(v);
    let row_fields =
        row_schema_fields(schema_json).ok_or_else(|| bad("the schema has no Value record"))?;
    let op = parse_op(
        v["op"]
            .as_str()
            .ok_or_else(|| bad("the envelope has no op"))?,
    )?;
    let table = TableName::new(
        v["source"]["schema"]
            .as_str()
            .ok_or_else(|| bad("source.schema is missing"))?,
        v["source"]["table"]
            .as_str()
            .ok_or_else(|| bad("source.table is missing"))?,
    );
    let row = |name: &str| -> Result<Option<Row>, DecodeError> {
        match &v[name] {
            Json::Null => Ok(None),
            Json::Object(o) => row_fields
                .iter()
                .map(|f| {
                    let column = column_name(f);
                    let value = o.get(&column).unwrap_or(&Json::Null);
                    let value = connect_cell(value, &f["type"])
                        .map_err(|e| bad(format!("{name}.{column}: {}", e.0)))?;
                    Ok((Arc::from(column), value))
                })
                .collect::<Result<_, _>>()
                .map(Some),
            _ => Err(bad(format!("{name} is not a row"))),
        }
    };
    let types = row_fields
        .iter()
        .map(|f| {
            (
                column_name(f),
                f["pgferry.type"].as_str().unwrap_or("text").to_string(),
            )
        })
        .collect();
    let mut after = row("after")?;
    if let (Some(after), Some(unchanged)) = (after.as_mut(), v["unchanged"].as_array()) {
        for u in unchanged.iter().filter_map(|u| u.as_str()) {
            if let Some(v) = after.get_mut(u) {
                *v = SinkValue::Unchanged;
            }
        }
    }
    let key = key
        .and_then(|k| serde_json::from_slice::<Json>(k).ok())
        .map(connect_payload)
        .and_then(|k| k.as_object().map(|o| o.keys().cloned().collect()))
        .map(Arc::new)
        .unwrap_or_default();
    Ok(SinkEvent {
        position,
        op,
        table,
        commit_ts_us: v["source"]["ts_us"].as_i64().unwrap_or(0),
        before: row("before")?,
        after,
        types: Arc::new(types),
        key,
    })
}

/// The Avro type of a field's value: the union branch that is neither null nor one of
/// pgferry's records.
fn value_branch(ty: &Json) -> &Json {
    match ty.as_array() {
        Some(branches) => branches
            .iter()
            .find(|b| {
                b.as_str() != Some("null")
                    && !b.as_str().is_some_and(|n| n.starts_with("io.pgferry."))
                    && b["namespace"] != "io.pgferry"
            })
            .unwrap_or(&Json::Null),
        None => ty,
    }
}

/// One JSON cell back to PostgreSQL text, by the field's Avro type.
fn connect_cell(v: &Json, ty: &Json) -> Result<SinkValue, DecodeError> {
    if v.is_null() {
        return Ok(SinkValue::Null);
    }
    // io.pgferry.Special {text, unchanged}: the struct where the column's type has no
    // room for the value (no Debezium struct has a field `unchanged`).
    if let Json::Object(o) = v {
        if let Some(Json::Bool(unchanged)) = o.get("unchanged") {
            if *unchanged {
                return Ok(SinkValue::Unchanged);
            }
            return match o.get("text") {
                Some(Json::String(t)) => Ok(SinkValue::Text(t.clone())),
                _ => Err(bad("io.pgferry.Special without text")),
            };
        }
    }
    let ty = value_branch(ty);
    if v.is_object() && !is_named(ty, crate::codec::avro::schema::VARIABLE_SCALE_DECIMAL) {
        return Err(bad("an object that is not io.pgferry.Special"));
    }
    connect_text(v, ty).map(SinkValue::Text)
}

fn base64_bytes(v: &Json) -> Result<Vec<u8>, DecodeError> {
    use base64::Engine as _;
    let s = v
        .as_str()
        .ok_or_else(|| bad("bytes are not a base64 string"))?;
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|e| bad(format!("bytes are not base64: {e}")))
}

fn connect_text(v: &Json, ty: &Json) -> Result<String, DecodeError> {
    let int = || v.as_i64().ok_or_else(|| bad("not an integer"));
    let base = ty["type"].as_str().or_else(|| ty.as_str()).unwrap_or("");
    Ok(match base {
        "boolean" => match v.as_bool() {
            Some(b) => if b { "t" } else { "f" }.into(),
            None => return Err(bad("not a boolean")),
        },
        "int" if is_named(ty, "io.debezium.time.Date") => {
            pgtext::format_date(i32::try_from(int()?).map_err(|_| bad("date out of range"))?)
        }
        "int" if is_named(ty, "io.debezium.time.Time") => pgtext::format_time(int()? * 1000),
        "long" if is_named(ty, "io.debezium.time.Timestamp") => {
            pgtext::format_timestamp(int()?.saturating_mul(1000))
        }
        "long" if is_named(ty, "io.debezium.time.MicroTime") => pgtext::format_time(int()?),
        "long" if is_named(ty, "io.debezium.time.MicroTimestamp") => {
            pgtext::format_timestamp(int()?)
        }
        "int" | "long" => int()?.to_string(),
        "float" | "double" => {
            let f = v.as_f64().ok_or_else(|| bad("not a number"))?;
            float_text(f, base == "float")
        }
        "bytes" if ty["logicalType"] == "decimal" => {
            let scale = ty["scale"].as_u64().unwrap_or(0) as u32;
            pgtext::format_decimal(&base64_bytes(v)?, scale)
        }
        "bytes" => {
            let b = base64_bytes(v)?;
            let mut s = String::with_capacity(2 + b.len() * 2);
            s.push_str("\\x");
            for byte in b {
                s.push_str(&format!("{byte:02x}"));
            }
            s
        }
        "string" if is_named(ty, "io.debezium.time.ZonedTimestamp") => {
            let s = v.as_str().ok_or_else(|| bad("not a string"))?;
            pgtext::iso_to_timestamptz(s).map_err(|e| bad(format!("timestamptz: {e}")))?
        }
        "string" => v.as_str().ok_or_else(|| bad("not a string"))?.to_string(),
        "array" => {
            let items = v.as_array().ok_or_else(|| bad("not an array"))?;
            let item_ty = &ty["items"];
            let mut out = String::from("{");
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                match connect_cell(item, item_ty)? {
                    SinkValue::Null => out.push_str("NULL"),
                    SinkValue::Text(t) => quote_array_element(&mut out, &t),
                    SinkValue::Unchanged => return Err(bad("unchanged marker inside an array")),
                }
            }
            out.push('}');
            out
        }
        _ if is_named(ty, crate::codec::avro::schema::VARIABLE_SCALE_DECIMAL) => {
            let scale = v["scale"]
                .as_i64()
                .ok_or_else(|| bad("decimal without scale"))?;
            pgtext::format_decimal(&base64_bytes(&v["value"])?, scale.max(0) as u32)
        }
        _ => return Err(bad("a value of an unknown type")),
    })
}

/// Decode a JSON envelope of pgferry before the Debezium JSON shapes (no
/// `pgferry.schema` header): values as in `tail` lines, unchanged columns left out.
pub fn json_envelope(
    value: &[u8],
    key: Option<&[u8]>,
    position: (Lsn, u32),
) -> Result<SinkEvent, DecodeError> {
    let v: Json = serde_json::from_slice(value).map_err(|e| bad(format!("not JSON: {e}")))?;
    let op = parse_op(
        v["op"]
            .as_str()
            .ok_or_else(|| bad("the envelope has no op"))?,
    )?;
    let table = TableName::new(
        v["source"]["schema"]
            .as_str()
            .ok_or_else(|| bad("source.schema is missing"))?,
        v["source"]["table"]
            .as_str()
            .ok_or_else(|| bad("source.table is missing"))?,
    );
    let row = |r: &Json| -> Option<Row> {
        r.as_object().map(|o| {
            o.iter()
                .map(|(k, v)| (Arc::from(k.as_str()), json_text(v)))
                .collect()
        })
    };
    let mut after = row(&v["after"]);
    if let (Some(after), Some(unchanged)) = (after.as_mut(), v["unchanged"].as_array()) {
        for u in unchanged.iter().filter_map(|u| u.as_str()) {
            after.set(u, SinkValue::Unchanged);
        }
    }
    let key = key
        .and_then(|k| serde_json::from_slice::<Json>(k).ok())
        .and_then(|k| k.as_object().map(|o| o.keys().cloned().collect()))
        .map(Arc::new)
        .unwrap_or_default();
    Ok(SinkEvent {
        position,
        op,
        table,
        commit_ts_us: v["source"]["ts_us"].as_i64().unwrap_or(0),
        before: row(&v["before"]),
        after,
        types: Default::default(),
        key,
    })
}

fn json_text(v: &Json) -> SinkValue {
    match v {
        Json::Null => SinkValue::Null,
        Json::Bool(b) => SinkValue::Text(if *b { "t" } else { "f" }.into()),
        Json::Number(n) => SinkValue::Text(n.to_string()),
        Json::String(s) => SinkValue::Text(s.clone()),
        Json::Array(items) => {
            let mut out = String::from("{");
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                match (item, json_text(item)) {
                    // A sub-array of a multi-dimensional array: its literal, unquoted.
                    (Json::Array(_), SinkValue::Text(t)) => out.push_str(&t),
                    (_, SinkValue::Text(t)) => quote_array_element(&mut out, &t),
                    _ => out.push_str("NULL"),
                }
            }
            out.push('}');
            SinkValue::Text(out)
        }
        // json/jsonb values arrive embedded; their text is the JSON itself.
        Json::Object(_) => SinkValue::Text(v.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrays_round_trip_as_quoted_literals() {
        let mut out = String::new();
        quote_array_element(&mut out, "a \"b\" \\c");
        assert_eq!(out, r#""a \"b\" \\c""#);
        assert_eq!(
            json_text(&serde_json::json!([1, null, "x y"])),
            SinkValue::Text(r#"{"1",NULL,"x y"}"#.into())
        );
        assert_eq!(
            json_text(&serde_json::json!([[1, 2], [3, null]])),
            SinkValue::Text(r#"{{"1","2"},{"3",NULL}}"#.into())
        );
    }

    #[test]
    fn floats_keep_their_special_values() {
        assert_eq!(float_text(f64::NAN, false), "NaN");
        assert_eq!(float_text(-0.0, false), "-0");
        assert_eq!(float_text(f64::NEG_INFINITY, false), "-Infinity");
        assert_eq!(float_text(1.5, true), "1.5");
        assert_eq!(float_text(f64::from(0.1f32), true), "0.1");
    }

    #[test]
    fn position_comes_from_headers() {
        let h: Vec<Header> = vec![
            ("pgferry.commit_lsn".into(), b"0/10".to_vec()),
            ("pgferry.ordinal".into(), b"3".to_vec()),
        ];
        assert_eq!(position(&h).unwrap(), (Lsn(16), 3));
        assert!(position(&h[..1]).is_err());
    }

    #[test]
    fn connect_json_reads_back_as_postgresql_text() {
        use crate::codec::connect::tests::{encode, sample, ROW};
        let mut row = ROW;
        row[2] = Some("NaN");
        row[9] = Some("-Infinity");
        row[11] = Some("<unchanged>");
        for with_schema in [true, false] {
            let (key, value, avro) = encode(&sample(&row, Some(&ROW)), with_schema);
            let e = connect_envelope(
                value.to_string().as_bytes(),
                Some(key.to_string().as_bytes()),
                &avro.value,
                (Lsn(1), 0),
            )
            .unwrap();
            assert_eq!(*e.key, ["id"]);
            assert_eq!(e.op, Op::Update);
            let text = |r: &Row, c: &str| r.get(c).unwrap().clone();
            let t = |s: &str| SinkValue::Text(s.into());
            let after = e.after.unwrap();
            let before = e.before.unwrap();
            assert_eq!(text(&after, "d"), t("2026-11-22"));
            assert_eq!(text(&after, "n"), t("NaN"));
            assert_eq!(text(&before, "n"), t("12345678.1234"));
            assert_eq!(text(&after, "m"), t("-1234.56"));
            assert_eq!(text(&after, "f8"), t("-0"));
            assert_eq!(text(&after, "by"), t("\\x00ff00"));
            assert_eq!(text(&after, "ts"), t("2026-11-22 01:02:03.123456"));
            assert_eq!(text(&after, "tm"), t("04:05:06.789"));
            assert_eq!(text(&after, "nn"), t("-Infinity"));
            assert_eq!(text(&before, "nn"), t("3.14159"));
            assert_eq!(text(&after, "ai"), t(r#"{"1",NULL,"3"}"#));
            assert_eq!(text(&after, "t"), SinkValue::Unchanged);
            assert_eq!(text(&before, "t"), SinkValue::Null);
            assert_eq!(text(&after, "i2"), t("-32768"));
            assert!(
                matches!(text(&after, "tz"), SinkValue::Text(s) if s.starts_with("2026-11-22 01:02:03.123456"))
            );
        }
        // An object where a date is expected, that is no io.pgferry.Special, is refused.
        assert!(connect_cell(&serde_json::json!({"x": 1}), &serde_json::json!("int")).is_err());
    }
}
