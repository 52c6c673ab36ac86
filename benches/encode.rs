//! Avro encode throughput of one change event: pgferry's direct encoder
//! ([`pgferry::codec::avro::encode_key`] + [`pgferry::codec::avro::encode_value`],
//! text values straight into a reused buffer) next to the generic way of the
//! `apache-avro` crate (build an [`apache_avro::types::Value`] tree, then
//! [`apache_avro::to_avro_datum`] it against the parsed schema).
//!
//! The event is a change of a 10-column `patients` table (int8 key, name, date of
//! birth, `char(1)` gender, phone, email, address, a ~200-byte notes text, a
//! `numeric(6,2)` and a timestamptz), built by hand as the source stage would hand it
//! on: text values in a [`Change`] with its [`TableSchema`]. Two shapes: an insert and
//! an update that leaves the key alone (REPLICA IDENTITY DEFAULT), both after image
//! only. Each event is encoded as the Kafka stage does it: key record and `Envelope`
//! value record, with a fixed `now` for `ts_ms`/`ts_us`.
//!
//! The generic cases include building the tree from the text values, which is the
//! real cost of that approach; they parse the texts with the same
//! [`pgferry::codec::pgtext`] functions the direct encoder uses, so what differs is
//! the tree and the generic serializer (which validates the value and resolves the
//! schema's names on every call), not the parsing. `generic tree only` builds and
//! drops the trees without serializing them, to split the generic cost in two.
//!
//! Before timing, both encoders must produce identical key and value bytes for both
//! events, and the direct bytes must read back with `apache_avro::from_avro_datum`.
//!
//! Each case encodes `ENCODE_EVENTS` events (default 200,000) per round, after 2
//! warm-up rounds, for `ENCODE_ROUNDS` timed rounds (default 5, at least 3), and
//! prints the best and the median round, then the direct/generic speedup (medians).
//!
//! Run it with:
//!
//! ```text
//! cargo bench --bench encode
//! ENCODE_EVENTS=50000 ENCODE_ROUNDS=3 cargo bench --bench encode   # quicker
//! ENCODE_ONLY=direct cargo bench --bench encode                    # some cases
//! ```

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use apache_avro::types::Value;
use apache_avro::{Decimal, Schema};
use pgferry::codec::avro::schema::{avro_name, FieldPlan, ValueKind};
use pgferry::codec::avro::{derive, encode_key, encode_value, SourceInfo, TableSchemas};
use pgferry::codec::pgtext::{self, Numeric};
use pgferry::event::{
    Change, Column, Datum, Op, PgType, ReplicaIdentity, Row, TableName, TableSchema, Text, TypeKind,
};
use pgferry::lsn::Lsn;
use pgferry::timestamp::PgTimestamp;

const WARMUP_ROUNDS: usize = 2;
const MIN_ROUNDS: usize = 3;
const TOPIC_PREFIX: &str = "ehr";

/// One patients row in PostgreSQL's text output format, in table column order.
const PATIENT_ROW: [&str; 10] = [
    // id int8
    "4200117",
    // name
    "Margaret O'Connell-Whitfield",
    // dob date
    "1957-03-14",
    // gender char(1)
    "F",
    // contact_number
    "+44 20 7946 0958",
    // email
    "margaret.oconnell-whitfield@example.org",
    // address
    "14 Harbour View Road, Flat 3, Portsmouth PO1 3LJ, United Kingdom",
    // notes: a ~200-byte free-text clinical note
    "Follow-up after laparoscopic cholecystectomy; wound healing well, no signs of infection. \
     Mild post-operative nausea resolved. Continue paracetamol 1g QDS PRN; review bloods in 2 weeks. Diet advice given.",
    // weight numeric(6,2)
    "72.45",
    // updated_at timestamptz
    "2026-11-22 01:02:03.123456+00",
];

/// The same row after `update ... set weight = weight + 1, updated_at = now()`.
const UPDATED_WEIGHT: &str = "73.45";
const UPDATED_AT: &str = "2026-11-22 01:07:41.654321+00";

/// Microseconds since 2000-01-01, the PostgreSQL epoch: 2026-11-22 01:07:41.654321.
const COMMIT_TS: i64 = 848_624_861_654_321;
/// `now` of both encoders: 2026-11-22 01:07:41.700000.
const NOW: PgTimestamp = PgTimestamp(848_624_861_700_000);

fn column(name: &str, oid: u32, type_name: &str, kind: TypeKind, typmod: i32) -> Column {
    let base = type_name.split('(').next().unwrap_or(type_name);
    Column {
        name: name.into(),
        ty: Arc::new(PgType {
            oid,
            name: base.into(),
            kind,
            delimiter: b',',
        }),
        typmod,
        type_name: type_name.into(),
        nullable: name != "id",
        transform: None,
    }
}

fn patients() -> TableSchema {
    TableSchema {
        oid: 16_385,
        name: TableName::new("public", "patients"),
        columns: vec![
            column("id", 20, "bigint", TypeKind::Int8, -1),
            column("name", 25, "text", TypeKind::Text, -1),
            column("dob", 1082, "date", TypeKind::Date, -1),
            column("gender", 1042, "character(1)", TypeKind::Text, 1 + 4),
            column("contact_number", 25, "text", TypeKind::Text, -1),
            column("email", 25, "text", TypeKind::Text, -1),
            column("address", 25, "text", TypeKind::Text, -1),
            column("notes", 25, "text", TypeKind::Text, -1),
            column(
                "weight",
                1700,
                "numeric(6,2)",
                TypeKind::Numeric,
                ((6 << 16) | 2) + 4,
            ),
            column(
                "updated_at",
                1184,
                "timestamp with time zone",
                TypeKind::Timestamptz,
                -1,
            ),
        ],
        key: vec![0],
        replica_identity: ReplicaIdentity::Default,
    }
}

fn change(table: &Arc<TableSchema>, op: Op, row: &[&str], ordinal: u32) -> Change {
    Change {
        op,
        table: table.clone(),
        xid: 748_213,
        commit_lsn: Lsn(0x0000_0001_6B37_4D78),
        lsn: Lsn(0x0000_0001_6B37_4D48 + u64::from(ordinal) * 0x1A8),
        ordinal,
        commit_ts: PgTimestamp(COMMIT_TS),
        prev_commit_end: Lsn(0x0000_0001_6B37_4C00),
        before: None,
        after: Some(Row {
            values: row
                .iter()
                .map(|v| Datum::Text(Text::from_string((*v).to_string())))
                .collect(),
            key_only: false,
        }),
        snapshot: Default::default(),
    }
}

/// What every case needs: the derived schemas, and the same schemas parsed for the
/// generic encoder together with its field names.
struct Ctx {
    schemas: TableSchemas,
    source: SourceInfo,
    key_schema: Schema,
    value_schema: Schema,
    /// Avro field names of the `Value` record, in column order.
    value_names: Vec<String>,
    /// Avro field names of the `Key` record, in key order.
    key_names: Vec<String>,
}

impl Ctx {
    fn new(table: &TableSchema) -> Ctx {
        let schemas = derive(table, TOPIC_PREFIX);
        let value_schema = Schema::parse(&schemas.value).expect("value schema parses");
        let key_schema = Schema::parse(schemas.key.as_ref().expect("patients has a key"))
            .expect("key schema parses");
        Ctx {
            source: SourceInfo {
                name: TOPIC_PREFIX.into(),
                db: "ehr".into(),
            },
            key_schema,
            value_schema,
            value_names: table.columns.iter().map(|c| avro_name(&c.name)).collect(),
            key_names: table
                .key
                .iter()
                .map(|&i| avro_name(&table.columns[i].name))
                .collect(),
            schemas,
        }
    }
}

// ------------------------------------------------------------- generic encoder --

/// A column value as the generic encoder's tree holds it; `None` means the value
/// has no typed form (numeric NaN / ±Infinity) and goes in the `Special` branch.
/// Only the kinds of the bench table are covered.
fn typed_value(kind: &ValueKind, text: &str) -> Option<Value> {
    Some(match kind {
        ValueKind::Long => Value::Long(text.parse().expect("int8 text")),
        ValueKind::String => Value::String(text.to_owned()),
        ValueKind::Date => Value::Int(pgtext::parse_date(text).expect("date text")),
        ValueKind::Decimal { scale, .. } => {
            match pgtext::parse_numeric_scaled(text, *scale).expect("numeric text") {
                Numeric::Finite { unscaled, .. } => Value::Decimal(Decimal::from(unscaled)),
                _ => return None,
            }
        }
        ValueKind::Timestamptz => Value::String(
            pgtext::timestamptz_to_iso(text)
                .expect("timestamptz text")
                .to_string(),
        ),
        other => unimplemented!("{other:?} is not a column type of the bench table"),
    })
}

/// One field of a `Key` or `Value` record, wrapped in its union branch if any.
fn field_value(plan: &FieldPlan, datum: &Datum) -> Value {
    let (branch, value) = match datum {
        Datum::Null => {
            assert!(plan.nullable, "NULL in a non-null field");
            (0, Value::Null)
        }
        Datum::Unchanged => (
            plan.unchanged_branch.expect("field can be unchanged"),
            Value::Record(Vec::new()),
        ),
        Datum::Text(text) => match typed_value(&plan.kind, text.as_str()) {
            Some(v) => (plan.value_branch, v),
            None => (
                plan.special_branch.expect("field has a Special branch"),
                Value::Record(vec![(
                    "text".into(),
                    Value::String(text.as_str().to_owned()),
                )]),
            ),
        },
    };
    if plan.is_union() {
        Value::Union(branch, Box::new(value))
    } else {
        value
    }
}

/// `["null", "Value"]` with the row record.
fn row_value(ctx: &Ctx, change: &Change, row: Option<&Row>) -> Value {
    let Some(row) = row else {
        return Value::Union(0, Box::new(Value::Null));
    };
    let fields = ctx
        .value_names
        .iter()
        .zip(&ctx.schemas.value_fields)
        .zip(&row.values)
        .enumerate()
        .map(|(i, ((name, plan), datum))| {
            let value = if row.key_only && !change.table.key.contains(&i) {
                Value::Union(0, Box::new(Value::Null))
            } else {
                field_value(plan, datum)
            };
            (name.clone(), value)
        })
        .collect();
    Value::Union(1, Box::new(Value::Record(fields)))
}

fn opt_long(v: Option<i64>) -> Value {
    match v {
        Some(v) => Value::Union(1, Box::new(Value::Long(v))),
        None => Value::Union(0, Box::new(Value::Null)),
    }
}

/// The `Key` record of a change as a tree.
fn key_tree(ctx: &Ctx, change: &Change) -> Value {
    let key = change.key().expect("patients has a key");
    Value::Record(
        ctx.key_names
            .iter()
            .zip(key)
            .zip(&ctx.schemas.key_fields)
            .map(|((name, (_, datum)), plan)| (name.clone(), field_value(plan, datum)))
            .collect(),
    )
}

/// The `Envelope` record of a change as a tree, field for field what
/// `encode_value` writes.
fn value_tree(ctx: &Ctx, change: &Change, now: PgTimestamp) -> Value {
    let s = |v: &str| Value::String(v.to_owned());
    let source = Value::Record(vec![
        ("version".into(), s(env!("CARGO_PKG_VERSION"))),
        ("connector".into(), s("postgresql")),
        ("name".into(), s(&ctx.source.name)),
        ("ts_ms".into(), Value::Long(change.commit_ts.unix_millis())),
        (
            "snapshot".into(),
            Value::Union(
                0,
                Box::new(s(if change.op == Op::Read {
                    "true"
                } else {
                    "false"
                })),
            ),
        ),
        ("db".into(), s(&ctx.source.db)),
        (
            "sequence".into(),
            Value::Union(
                1,
                Box::new(Value::String(format!(
                    "[\"{}\",\"{}\"]",
                    change.prev_commit_end.0, change.lsn.0
                ))),
            ),
        ),
        (
            "ts_us".into(),
            opt_long(Some(change.commit_ts.unix_micros())),
        ),
        (
            "ts_ns".into(),
            opt_long(Some(change.commit_ts.unix_micros() * 1000)),
        ),
        ("schema".into(), s(&change.table.name.schema)),
        ("table".into(), s(&change.table.name.name)),
        ("txId".into(), opt_long(Some(i64::from(change.xid)))),
        ("lsn".into(), opt_long(Some(change.lsn.0 as i64))),
        ("xmin".into(), opt_long(None)),
        ("origin".into(), Value::Union(0, Box::new(Value::Null))),
        ("origin_lsn".into(), opt_long(None)),
    ]);
    Value::Record(vec![
        (
            "before".into(),
            row_value(ctx, change, change.before.as_ref()),
        ),
        (
            "after".into(),
            row_value(ctx, change, change.after.as_ref()),
        ),
        ("source".into(), source),
        ("transaction".into(), Value::Union(0, Box::new(Value::Null))),
        ("op".into(), s(change.op.as_str())),
        ("ts_ms".into(), opt_long(Some(now.unix_millis()))),
        ("ts_us".into(), opt_long(Some(now.unix_micros()))),
        ("ts_ns".into(), opt_long(Some(now.unix_micros() * 1000))),
        (
            "unchanged".into(),
            Value::Array(change.unchanged().map(s).collect()),
        ),
    ])
}

/// Key and value datums the generic way.
fn generic_encode(ctx: &Ctx, change: &Change, now: PgTimestamp) -> (Vec<u8>, Vec<u8>) {
    let key = apache_avro::to_avro_datum(&ctx.key_schema, key_tree(ctx, change))
        .expect("generic key encodes");
    let value = apache_avro::to_avro_datum(&ctx.value_schema, value_tree(ctx, change, now))
        .expect("generic value encodes");
    (key, value)
}

/// Key and value datums the direct way, into the caller's buffers (as the producer
/// does: cleared, not reallocated, per event).
fn direct_encode(
    ctx: &Ctx,
    change: &Change,
    now: PgTimestamp,
    key: &mut Vec<u8>,
    value: &mut Vec<u8>,
) {
    key.clear();
    value.clear();
    let has_key = encode_key(change, &ctx.schemas, key).expect("direct key encodes");
    assert!(has_key);
    encode_value(change, &ctx.schemas, &ctx.source, now, value).expect("direct value encodes");
}

// ------------------------------------------------------------------- checking --

/// Where two byte strings first differ, and both decoded, for the failure message.
fn difference(what: &str, schema: &Schema, direct: &[u8], generic: &[u8]) -> String {
    let at = direct
        .iter()
        .zip(generic)
        .position(|(a, b)| a != b)
        .unwrap_or(direct.len().min(generic.len()));
    let window = |b: &[u8]| format!("{:02x?}", &b[at.saturating_sub(8)..(at + 16).min(b.len())]);
    let read = |b: &[u8]| {
        apache_avro::from_avro_datum(schema, &mut &b[..], None)
            .map(|v| format!("{v:?}"))
            .unwrap_or_else(|e| format!("does not decode: {e}"))
    };
    format!(
        "{what}: direct {} B and generic {} B differ at byte {at}\n  direct  ..{}\n  generic ..{}\n  \
         direct decoded:  {}\n  generic decoded: {}",
        direct.len(),
        generic.len(),
        window(direct),
        window(generic),
        read(direct),
        read(generic),
    )
}

/// Fail loudly before timing if the two encoders disagree on a byte, or the direct
/// bytes do not read back: a fast encoder of wrong bytes is worth nothing.
fn check(ctx: &Ctx, name: &str, change: &Change) -> (usize, usize) {
    let (mut key, mut value) = (Vec::new(), Vec::new());
    direct_encode(ctx, change, NOW, &mut key, &mut value);
    let (gkey, gvalue) = generic_encode(ctx, change, NOW);
    let mut problems = Vec::new();
    if key != gkey {
        problems.push(difference(
            &format!("{name} key"),
            &ctx.key_schema,
            &key,
            &gkey,
        ));
    }
    if value != gvalue {
        problems.push(difference(
            &format!("{name} value"),
            &ctx.value_schema,
            &value,
            &gvalue,
        ));
    }
    assert!(
        problems.is_empty(),
        "the direct and the generic encoder disagree:\n{}",
        problems.join("\n")
    );
    let read = apache_avro::from_avro_datum(&ctx.value_schema, &mut value.as_slice(), None)
        .expect("direct value reads back");
    assert_eq!(
        read,
        value_tree(ctx, change, NOW),
        "{name}: the direct value reads back as something else"
    );
    (key.len(), value.len())
}

// -------------------------------------------------------------------- timing --

#[derive(Clone, Copy)]
enum Encoder {
    Direct,
    Generic,
    /// Build the generic trees and drop them, no serializing.
    GenericTreeOnly,
}

struct Case<'a> {
    name: &'a str,
    change: &'a Change,
    encoder: Encoder,
}

struct Settings {
    events: usize,
    rounds: usize,
}

fn env_usize(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .replace('_', "")
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a whole number")),
        Err(_) => default,
    }
}

/// Time one round of `events` encodes.
fn round(ctx: &Ctx, case: &Case, events: usize) -> Duration {
    let change = case.change;
    let (mut key, mut value) = (Vec::with_capacity(64), Vec::with_capacity(1024));
    let start = Instant::now();
    match case.encoder {
        Encoder::Direct => {
            for _ in 0..events {
                direct_encode(ctx, black_box(change), NOW, &mut key, &mut value);
                black_box((&key, &value));
            }
        }
        Encoder::Generic => {
            for _ in 0..events {
                black_box(generic_encode(ctx, black_box(change), NOW));
            }
        }
        Encoder::GenericTreeOnly => {
            for _ in 0..events {
                let change = black_box(change);
                black_box((key_tree(ctx, change), value_tree(ctx, change, NOW)));
            }
        }
    }
    start.elapsed()
}

/// Runs a case and returns its median ns/event.
fn run(ctx: &Ctx, case: &Case, s: &Settings) -> f64 {
    for _ in 0..WARMUP_ROUNDS {
        round(ctx, case, s.events);
    }
    let mut times: Vec<Duration> = (0..s.rounds).map(|_| round(ctx, case, s.events)).collect();
    times.sort();
    let best = times[0];
    let median = times[times.len() / 2];
    let rate = |t: Duration| s.events as f64 / t.as_secs_f64() / 1e3;
    let ns = |t: Duration| t.as_nanos() as f64 / s.events as f64;
    println!(
        "encode: {:<24} best {:>7.0} k events/s {:>7.1} ns/event   median {:>7.0} k events/s {:>7.1} ns/event",
        case.name,
        rate(best),
        ns(best),
        rate(median),
        ns(median),
    );
    ns(median)
}

fn main() {
    let settings = Settings {
        events: env_usize("ENCODE_EVENTS", 200_000).max(1),
        rounds: env_usize("ENCODE_ROUNDS", 5).max(MIN_ROUNDS),
    };
    let table = Arc::new(patients());
    let ctx = Ctx::new(&table);
    let insert = change(&table, Op::Create, &PATIENT_ROW, 0);
    let mut updated = PATIENT_ROW;
    updated[8] = UPDATED_WEIGHT;
    updated[9] = UPDATED_AT;
    let update = change(&table, Op::Update, &updated, 0);
    let (insert_key, insert_value) = check(&ctx, "insert", &insert);
    let (update_key, update_value) = check(&ctx, "update", &update);

    println!(
        "encode: {} events per round, {} warm-up + {} timed rounds; key + value per event, identical bytes \
         from both encoders: insert {insert_key} + {insert_value} B, update {update_key} + {update_value} B",
        settings.events, WARMUP_ROUNDS, settings.rounds,
    );

    let cases = [
        Case {
            name: "direct insert",
            change: &insert,
            encoder: Encoder::Direct,
        },
        Case {
            name: "direct update",
            change: &update,
            encoder: Encoder::Direct,
        },
        Case {
            name: "generic insert",
            change: &insert,
            encoder: Encoder::Generic,
        },
        Case {
            name: "generic update",
            change: &update,
            encoder: Encoder::Generic,
        },
        Case {
            name: "generic tree only insert",
            change: &insert,
            encoder: Encoder::GenericTreeOnly,
        },
        Case {
            name: "generic tree only update",
            change: &update,
            encoder: Encoder::GenericTreeOnly,
        },
    ];
    // ENCODE_ONLY=<substring> runs only the matching cases (handy under a profiler).
    let only = std::env::var("ENCODE_ONLY").unwrap_or_default();
    let medians: Vec<(&str, f64)> = cases
        .iter()
        .filter(|c| c.name.contains(only.as_str()))
        .map(|c| (c.name, run(&ctx, c, &settings)))
        .collect();
    let median = |name: &str| medians.iter().find(|(n, _)| *n == name).map(|&(_, ns)| ns);
    for op in ["insert", "update"] {
        if let (Some(direct), Some(generic)) = (
            median(&format!("direct {op}")),
            median(&format!("generic {op}")),
        ) {
            println!(
                "encode: speedup direct/generic {op}: {:.1}x ({direct:.0} vs {generic:.0} ns/event, medians)",
                generic / direct
            );
        }
    }
}
