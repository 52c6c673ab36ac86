//! Avro schemas derived from a table schema (DESIGN §2, Debezium-compatible names):
//! key record `Key`, value record `Envelope` with row record `Value` and the `Source`
//! block, in namespace `<prefix>.<schema>.<table>`.
//!
//! The rule (DESIGN §2): Debezium 3.x's default encoding wherever it is lossless, its
//! own lossless option where the default loses (`interval.handling.mode=string`), and
//! otherwise a pgferry extension that a reader holding Debezium's schema cannot
//! misread. So no Avro logical type that a legal PostgreSQL value can overflow (dates,
//! times and timestamps carry only Debezium's `connect.name`, as Debezium's do), and
//! what the Debezium type cannot hold travels in a named record branch,
//! `io.pgferry.Special { text }` with the PostgreSQL text: numeric NaN/±Infinity,
//! ±infinity dates and timestamps, timestamps past 294246 AD, arrays that are
//! multi-dimensional or have explicit bounds. A reader resolving against Debezium's
//! schema finds no branch for it and fails on that record instead of reading another
//! value (a `string` branch would have been promoted to the bytes of a decimal).
//!
//! Also: float NaN, ±Infinity and -0 are native IEEE values; money is Debezium's
//! `Decimal` with scale 2 (lc_monetary=C in our session); an unchanged TOAST value is
//! the `io.pgferry.Unchanged` branch, never null, never a placeholder, and the column
//! is also listed in the `unchanged` envelope field.
//!
//! Every `Value` field is nullable, where Debezium makes NOT NULL columns required: a
//! key-only old image (REPLICA IDENTITY DEFAULT) has no values for its other columns,
//! and null says so where a required field would need an invented value.

use serde_json::{json, Value as Json};

use crate::event::{Column, PgType, TableSchema, TypeKind};

pub const UNCHANGED_NAME: &str = "io.pgferry.Unchanged";
pub const SPECIAL_NAME: &str = "io.pgferry.Special";
pub const VARIABLE_SCALE_DECIMAL: &str = "io.debezium.data.VariableScaleDecimal";
pub const SOURCE_NAME: &str = "io.debezium.connector.postgresql.Source";

/// How one value is encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValueKind {
    Boolean,
    /// int2: an Avro int marked `connect.type: int16`, as Debezium marks it.
    Short,
    Int,
    Long,
    Float,
    Double,
    /// numeric(p,s): decimal bytes at this scale.
    Decimal {
        precision: u32,
        scale: u32,
    },
    /// numeric without modifier: VariableScaleDecimal.
    VarDecimal,
    /// money: Debezium's Decimal, scale 2.
    Money,
    String,
    /// interval: ISO 8601 text (Debezium's `interval.handling.mode=string`).
    Interval,
    Uuid,
    Json,
    Date,
    Time,
    /// time(0..3): milliseconds, as Debezium's adaptive precision writes them.
    TimeMillis,
    Timestamp,
    /// timestamp(0..3): milliseconds, as Debezium's adaptive precision writes them.
    TimestampMillis,
    Timestamptz,
    Bytes,
    Array(Box<ValueKind>),
}

impl ValueKind {
    pub fn of(ty: &PgType, typmod: i32) -> ValueKind {
        match &ty.kind {
            TypeKind::Bool => ValueKind::Boolean,
            TypeKind::Int2 => ValueKind::Short,
            TypeKind::Int4 => ValueKind::Int,
            TypeKind::Int8 | TypeKind::Oid => ValueKind::Long,
            TypeKind::Float4 => ValueKind::Float,
            TypeKind::Float8 => ValueKind::Double,
            TypeKind::Numeric => match numeric_typmod(typmod) {
                Some((precision, scale)) if scale >= 0 => ValueKind::Decimal {
                    precision,
                    scale: scale as u32,
                },
                _ => ValueKind::VarDecimal,
            },
            TypeKind::Money => ValueKind::Money,
            TypeKind::Uuid => ValueKind::Uuid,
            TypeKind::Json | TypeKind::Jsonb => ValueKind::Json,
            TypeKind::Date => ValueKind::Date,
            // Debezium's default (adaptive) precision: milliseconds up to a declared
            // precision of 3, microseconds beyond. A reader holding its schema would
            // read microseconds where it expects milliseconds as a value 1000x larger.
            TypeKind::Time if (0..=3).contains(&typmod) => ValueKind::TimeMillis,
            TypeKind::Time => ValueKind::Time,
            TypeKind::Timestamp if (0..=3).contains(&typmod) => ValueKind::TimestampMillis,
            TypeKind::Timestamp => ValueKind::Timestamp,
            TypeKind::Timestamptz => ValueKind::Timestamptz,
            TypeKind::Bytea => ValueKind::Bytes,
            // Element modifiers are not carried by arrays: elements use -1.
            TypeKind::Array(elem) => ValueKind::Array(Box::new(ValueKind::of(elem, -1))),
            TypeKind::Interval => ValueKind::Interval,
            TypeKind::Text | TypeKind::Timetz | TypeKind::Enum | TypeKind::Other => {
                ValueKind::String
            }
        }
    }

    /// Whether some values need the union's `Special` branch (numeric specials,
    /// infinite or far-future dates and timestamps, arrays that do not fit a
    /// one-dimensional Avro array).
    pub fn has_special_branch(&self) -> bool {
        matches!(
            self,
            ValueKind::Decimal { .. }
                | ValueKind::VarDecimal
                | ValueKind::Date
                | ValueKind::Timestamp
                | ValueKind::TimestampMillis
                | ValueKind::Timestamptz
                | ValueKind::Array(_)
        )
    }

    /// Whether the value may be an out-of-line TOAST value, so "unchanged" can occur.
    pub fn toastable(&self) -> bool {
        matches!(
            self,
            ValueKind::String
                | ValueKind::Json
                | ValueKind::Bytes
                | ValueKind::Array(_)
                | ValueKind::Decimal { .. }
                | ValueKind::VarDecimal
                | ValueKind::Interval
        )
    }
}

fn numeric_typmod(typmod: i32) -> Option<(u32, i32)> {
    if typmod < 4 {
        return None;
    }
    let m = typmod - 4;
    Some((((m >> 16) & 0xFFFF) as u32, ((m & 0x7FF) ^ 1024) - 1024))
}

/// The encoding plan of one column: its kind and the positions of its union branches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldPlan {
    pub kind: ValueKind,
    pub nullable: bool,
    /// Union index of the `Special` branch, if any.
    pub special_branch: Option<u32>,
    /// Union index of the `Unchanged` branch, if any.
    pub unchanged_branch: Option<u32>,
    /// Union index of the value itself (0 when the field is not a union).
    pub value_branch: u32,
}

impl FieldPlan {
    fn new(kind: ValueKind, nullable: bool, allow_unchanged: bool) -> FieldPlan {
        let mut next = 0;
        let mut take = || {
            let i = next;
            next += 1;
            i
        };
        let _null = nullable.then(&mut take);
        let value_branch = take();
        let special_branch = kind.has_special_branch().then(&mut take);
        let unchanged_branch = (allow_unchanged && kind.toastable()).then(&mut take);
        FieldPlan {
            kind,
            nullable,
            special_branch,
            unchanged_branch,
            value_branch,
        }
    }

    pub fn is_union(&self) -> bool {
        self.nullable || self.special_branch.is_some() || self.unchanged_branch.is_some()
    }
}

/// Avro field names: `[A-Za-z_][A-Za-z0-9_]*`. Other characters become `_`.
pub fn avro_name(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

/// An Avro namespace from dot-separated parts.
pub fn namespace(prefix: &str, schema: &str, table: &str) -> String {
    prefix
        .split('.')
        .chain([schema, table])
        .map(avro_name)
        .collect::<Vec<_>>()
        .join(".")
}

/// Schemas and encoding plans of one table version.
#[derive(Debug, Clone)]
pub struct TableSchemas {
    pub namespace: String,
    /// `None` when the table has no key.
    pub key: Option<Json>,
    pub value: Json,
    /// Plans of the `Value` record fields, aligned with the table's columns.
    pub value_fields: Vec<FieldPlan>,
    /// Plans of the `Key` record fields, aligned with the table's key.
    pub key_fields: Vec<FieldPlan>,
}

/// Tracks which named types a schema has defined, so later uses refer by name.
#[derive(Default)]
struct Names(Vec<String>);

impl Names {
    /// The full definition the first time, the name afterwards.
    fn define(&mut self, name: &str, definition: impl FnOnce() -> Json) -> Json {
        if self.0.iter().any(|n| n == name) {
            Json::String(name.to_string())
        } else {
            self.0.push(name.to_string());
            definition()
        }
    }
}

/// The `Special` record: its definition the first time, its name afterwards.
fn special(names: &mut Names) -> Json {
    names.define(SPECIAL_NAME, || {
        json!({"type": "record", "name": "Special", "namespace": "io.pgferry",
               "fields": [{"name": "text", "type": "string"}],
               "doc": "a value the field's Debezium type cannot hold, as PostgreSQL text"})
    })
}

fn type_json(kind: &ValueKind, names: &mut Names) -> Json {
    match kind {
        ValueKind::Boolean => json!("boolean"),
        ValueKind::Short => json!({"type": "int", "connect.type": "int16"}),
        ValueKind::Int => json!("int"),
        ValueKind::Long => json!("long"),
        ValueKind::Float => json!("float"),
        ValueKind::Double => json!("double"),
        ValueKind::Decimal { precision, scale } => json!({
            "type": "bytes", "logicalType": "decimal", "precision": precision.max(&1), "scale": scale,
            "connect.version": 1, "connect.name": "org.apache.kafka.connect.data.Decimal",
            "connect.parameters": {"scale": scale.to_string(), "connect.decimal.precision": precision.to_string()}
        }),
        // Debezium: Decimal with money.fraction.digits (2) and no declared precision,
        // which Kafka Connect's Avro converter writes as 64.
        ValueKind::Money => json!({
            "type": "bytes", "logicalType": "decimal", "precision": 64, "scale": 2,
            "connect.version": 1, "connect.name": "org.apache.kafka.connect.data.Decimal",
            "connect.parameters": {"scale": "2"}
        }),
        ValueKind::VarDecimal => names.define(VARIABLE_SCALE_DECIMAL, || {
            json!({
                "type": "record", "name": "VariableScaleDecimal", "namespace": "io.debezium.data",
                "fields": [{"name": "scale", "type": "int"}, {"name": "value", "type": "bytes"}],
                "connect.version": 1, "connect.name": VARIABLE_SCALE_DECIMAL,
                "connect.doc": "Variable scaled decimal"
            })
        }),
        ValueKind::String => json!("string"),
        ValueKind::Interval => json!({
            "type": "string", "connect.version": 1, "connect.name": "io.debezium.time.Interval"
        }),
        ValueKind::Uuid => json!({
            "type": "string", "logicalType": "uuid", "connect.version": 1,
            "connect.name": "io.debezium.data.Uuid"
        }),
        ValueKind::Json => {
            json!({"type": "string", "connect.version": 1, "connect.name": "io.debezium.data.Json"})
        }
        ValueKind::Date => {
            json!({"type": "int", "connect.version": 1, "connect.name": "io.debezium.time.Date"})
        }
        ValueKind::Time => json!({
            "type": "long", "connect.version": 1, "connect.name": "io.debezium.time.MicroTime"
        }),
        ValueKind::Timestamp => json!({
            "type": "long", "connect.version": 1, "connect.name": "io.debezium.time.MicroTimestamp"
        }),
        ValueKind::TimeMillis => json!({
            "type": "int", "connect.version": 1, "connect.name": "io.debezium.time.Time"
        }),
        ValueKind::TimestampMillis => json!({
            "type": "long", "connect.version": 1, "connect.name": "io.debezium.time.Timestamp"
        }),
        ValueKind::Timestamptz => json!({
            "type": "string", "connect.version": 1, "connect.name": "io.debezium.time.ZonedTimestamp"
        }),
        ValueKind::Bytes => json!("bytes"),
        ValueKind::Array(elem) => {
            let mut items = vec![json!("null"), type_json(elem, names)];
            if elem.has_special_branch() {
                items.push(special(names));
            }
            json!({"type": "array", "items": items})
        }
    }
}

fn field_type(plan: &FieldPlan, names: &mut Names) -> Json {
    let value = type_json(&plan.kind, names);
    if !plan.is_union() {
        return value;
    }
    let mut branches = Vec::new();
    if plan.nullable {
        branches.push(json!("null"));
    }
    branches.push(value);
    if plan.special_branch.is_some() {
        branches.push(special(names));
    }
    if plan.unchanged_branch.is_some() {
        branches.push(names.define(UNCHANGED_NAME, || {
            json!({"type": "record", "name": "Unchanged", "namespace": "io.pgferry", "fields": [],
                   "doc": "an unchanged TOASTed value that PostgreSQL did not send"})
        }));
    }
    Json::Array(branches)
}

fn field(column: &Column, plan: &FieldPlan, names: &mut Names) -> Json {
    // The PostgreSQL type travels with the field, so a sink can create or extend its
    // tables with the exact type (Avro alone cannot tell text from varchar(10)).
    let mut f = json!({"name": avro_name(&column.name), "type": field_type(plan, names),
                       "pgferry.type": column.type_name});
    if plan.nullable {
        f["default"] = Json::Null;
    }
    if avro_name(&column.name) != column.name {
        f["pgferry.column"] = json!(column.name);
    }
    if let Some(t) = column.transform {
        f["pgferry.transform"] = json!(t.as_str());
    }
    f
}

/// Derive the key and value schemas of a table version.
pub fn derive(table: &TableSchema, prefix: &str) -> TableSchemas {
    let ns = namespace(prefix, &table.name.schema, &table.name.name);
    let value_fields: Vec<FieldPlan> = table
        .columns
        .iter()
        .map(|c| FieldPlan::new(ValueKind::of(&c.ty, c.typmod), true, true))
        .collect();
    let key_fields: Vec<FieldPlan> = table
        .key
        .iter()
        .map(|&i| {
            let c = &table.columns[i];
            FieldPlan::new(ValueKind::of(&c.ty, c.typmod), c.nullable, false)
        })
        .collect();

    let mut names = Names::default();
    let row_fields: Vec<Json> = table
        .columns
        .iter()
        .zip(&value_fields)
        .map(|(c, p)| field(c, p, &mut names))
        .collect();
    let value = json!({
        "type": "record", "name": "Envelope", "namespace": ns,
        "connect.version": 2, "connect.name": format!("{ns}.Envelope"),
        "fields": [
            {"name": "before", "type": ["null", {"type": "record", "name": "Value", "fields": row_fields,
                                                 "connect.name": format!("{ns}.Value")}], "default": null},
            {"name": "after", "type": ["null", "Value"], "default": null},
            {"name": "source", "type": source_schema()},
            {"name": "transaction", "type": ["null", transaction_schema()], "default": null},
            {"name": "op", "type": "string"},
            {"name": "ts_ms", "type": ["null", "long"], "default": null},
            {"name": "ts_us", "type": ["null", "long"], "default": null},
            {"name": "ts_ns", "type": ["null", "long"], "default": null},
            // pgferry's extension: the columns whose unchanged TOAST value was not sent.
            {"name": "unchanged", "type": {"type": "array", "items": "string"}, "default": []}
        ]
    });
    let key = (!table.key.is_empty()).then(|| {
        let mut names = Names::default();
        let fields: Vec<Json> = table
            .key
            .iter()
            .zip(&key_fields)
            .map(|(&i, p)| field(&table.columns[i], p, &mut names))
            .collect();
        json!({"type": "record", "name": "Key", "namespace": ns, "fields": fields, "connect.name": format!("{ns}.Key")})
    });
    TableSchemas {
        namespace: ns,
        key,
        value,
        value_fields,
        key_fields,
    }
}

/// The allowed values of `source.snapshot`, as Debezium declares them.
pub const SNAPSHOT_VALUES: &str =
    "true,first,first_in_data_collection,last_in_data_collection,last,false,incremental";

fn source_schema() -> Json {
    let opt = |name: &str, ty: &str| json!({"name": name, "type": ["null", ty], "default": null});
    json!({
        "type": "record", "name": "Source", "namespace": "io.debezium.connector.postgresql",
        "connect.version": 1, "connect.name": SOURCE_NAME,
        "fields": [
            {"name": "version", "type": "string"},
            {"name": "connector", "type": "string"},
            {"name": "name", "type": "string"},
            {"name": "ts_ms", "type": "long"},
            {"name": "snapshot", "type": [{"type": "string", "connect.version": 1,
                "connect.parameters": {"allowed": SNAPSHOT_VALUES}, "connect.default": "false",
                "connect.name": "io.debezium.data.Enum"}, "null"], "default": "false"},
            {"name": "db", "type": "string"},
            opt("sequence", "string"),
            opt("ts_us", "long"),
            opt("ts_ns", "long"),
            {"name": "schema", "type": "string"},
            {"name": "table", "type": "string"},
            opt("txId", "long"),
            opt("lsn", "long"),
            opt("xmin", "long"),
            opt("origin", "string"),
            opt("origin_lsn", "long")
        ]
    })
}

/// Debezium's transaction metadata block (`event.block`); pgferry writes null, as
/// Debezium does without `provide.transaction.metadata`.
fn transaction_schema() -> Json {
    json!({
        "type": "record", "name": "block", "namespace": "event",
        "connect.version": 1, "connect.name": "event.block",
        "fields": [
            {"name": "id", "type": "string"},
            {"name": "total_order", "type": "long"},
            {"name": "data_collection_order", "type": "long"}
        ]
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::event::{ReplicaIdentity, TableName};

    pub(crate) fn column(name: &str, kind: TypeKind, typmod: i32, nullable: bool) -> Column {
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
            nullable,
            transform: None,
        }
    }

    #[test]
    fn times_follow_debeziums_adaptive_precision() {
        let ty = |kind| PgType {
            oid: 0,
            name: "t".into(),
            kind,
            delimiter: b',',
        };
        assert_eq!(
            ValueKind::of(&ty(TypeKind::Timestamp), 3),
            ValueKind::TimestampMillis
        );
        assert_eq!(
            ValueKind::of(&ty(TypeKind::Timestamp), 0),
            ValueKind::TimestampMillis
        );
        assert_eq!(
            ValueKind::of(&ty(TypeKind::Timestamp), 4),
            ValueKind::Timestamp
        );
        assert_eq!(
            ValueKind::of(&ty(TypeKind::Timestamp), -1),
            ValueKind::Timestamp
        );
        assert_eq!(ValueKind::of(&ty(TypeKind::Time), 2), ValueKind::TimeMillis);
        assert_eq!(ValueKind::of(&ty(TypeKind::Time), -1), ValueKind::Time);
    }

    #[test]
    fn derives_parseable_debezium_named_schemas() {
        let table = TableSchema {
            oid: 1,
            name: TableName::new("public", "pa-tients"),
            columns: vec![
                column("id", TypeKind::Int8, -1, false),
                column("amount", TypeKind::Numeric, ((10 << 16) | 2) + 4, true),
                column("free", TypeKind::Numeric, -1, true),
                column("price", TypeKind::Money, -1, true),
                column("notes", TypeKind::Text, -1, true),
                column("2nd name", TypeKind::Text, -1, true),
            ],
            key: vec![0],
            replica_identity: ReplicaIdentity::Default,
        };
        let s = derive(&table, "ehr");
        assert_eq!(s.namespace, "ehr.public.pa_tients");
        let value = apache_avro::Schema::parse(&s.value).expect("value schema parses");
        let key = apache_avro::Schema::parse(s.key.as_ref().unwrap()).expect("key schema parses");
        assert!(value
            .canonical_form()
            .contains("\"name\":\"ehr.public.pa_tients.Envelope\""));
        assert!(value
            .canonical_form()
            .contains("io.debezium.connector.postgresql.Source"));
        assert!(key.canonical_form().contains("ehr.public.pa_tients.Key"));
        // null, decimal, Special, Unchanged
        assert_eq!(s.value_fields[1].special_branch, Some(2));
        assert_eq!(s.value_fields[1].unchanged_branch, Some(3));
        assert_eq!(
            s.value_fields[0].unchanged_branch, None,
            "an int8 is never TOASTed"
        );
        assert!(!s.key_fields[0].is_union());
        let text = serde_json::to_string(&s.value).unwrap();
        assert_eq!(
            text.matches("\"name\":\"VariableScaleDecimal\"").count(),
            1,
            "defined once"
        );
        assert!(text.contains("\"name\":\"_2nd_name\""));
    }
}
