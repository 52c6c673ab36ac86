//! Interoperability: pgferry's Kafka topics (schema-topic mode, Avro single-object
//! encoding) read by readers we did not write.
//!
//! `tests/interop/read_single_object.py` uses only fastavro and confluent-kafka, in a
//! venv under `$PGFERRY_SERVICES_DIR/interop-venv` that the first test creates (under
//! a `flock`, so parallel test processes do not race; later runs reuse it). It
//! recomputes every schema's CRC-64-AVRO fingerprint with fastavro and requires it to
//! equal the `<prefix>._schemas` key, checks the single-object header of every
//! message, and decodes every key and value twice:
//!
//! 1. generically, with the writer schema only: every record of every type of
//!    DESIGN §2 "Type mapping" decodes, to the right values;
//! 2. with the reader schema that Debezium 3.x would register for the same table
//!    ([`debezium_schemas`], from Debezium's documented type mappings at their
//!    defaults plus `interval.handling.mode=string`): ordinary records give the same
//!    values, and a record that needs pgferry's `io.pgferry.Special` or
//!    `io.pgferry.Unchanged` branch is refused with a schema-resolution error instead
//!    of being read as some other value (the compatibility rule of DESIGN §2).

mod common;
mod kafka_support;

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use common::*;
use kafka_support::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(90);
const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/interop/read_single_object.py"
);

/// The venv's python, creating the venv (fastavro, confluent-kafka from PyPI) once.
/// Fails, never skips, when it cannot be created.
fn python() -> PathBuf {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON
        .get_or_init(|| {
            let dir = PathBuf::from(service_env("PGFERRY_SERVICES_DIR"));
            let venv = dir.join("interop-venv");
            let lock = dir.join("interop-venv.lock");
            // A venv left half-made by a killed run fails the import check and is
            // made again.
            let setup = r#"set -eu
v=$1
if "$v/bin/python" -c 'import fastavro, confluent_kafka' 2>/dev/null; then exit 0; fi
rm -rf "$v"
python3 -m venv "$v"
"$v/bin/pip" install --disable-pip-version-check --quiet 'fastavro>=1.9,<2' 'confluent-kafka>=2.3,<3'
"$v/bin/python" -c 'import fastavro, confluent_kafka'
"#;
            let out = Command::new("flock")
                .args(["--timeout", "900"])
                .arg(&lock)
                .args(["bash", "-c", setup, "interop-venv"])
                .arg(&venv)
                .output()
                .unwrap_or_else(|e| panic!("running flock (util-linux) to create {venv:?}: {e}"));
            assert!(
                out.status.success(),
                "could not create the interop venv {venv:?} (python3 -m venv, then pip install \
                 fastavro confluent-kafka from PyPI; lock {lock:?}): {}\nstdout:\n{}\nstderr:\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            venv.join("bin/python")
        })
        .clone()
}

/// Run the script: (exit status success, stdout lines as JSON, stderr).
fn script(args: &[&str]) -> (bool, Vec<Value>, String) {
    let out = Command::new(python())
        .arg(SCRIPT)
        .args(args)
        .output()
        .expect("running the interop script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines = stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("script printed non-JSON ({e}): {l}\nstderr:\n{stderr}"))
        })
        .collect();
    (out.status.success(), lines, stderr)
}

#[test]
fn fastavro_fingerprints_match_the_test_vectors() {
    let (ok, lines, stderr) = script(&["selftest"]);
    assert!(ok, "selftest failed: {lines:?}\n{stderr}");
    let key = lines
        .iter()
        .find(|l| l["canonical"].as_str().unwrap().contains("patients.Key"))
        .expect("the key vector");
    assert_eq!(
        key["canonical"],
        r#"{"name":"ehr.public.patients.Key","type":"record","fields":[{"name":"id","type":"string"}]}"#
    );
    assert_eq!(key["fingerprint"], "130e58e5a63a1eda");
}

/// Source table: every type of DESIGN's type table.
const TABLE: &str = "create extension if not exists citext;
    create type mood as enum ('calm', 'tense');
    create domain posint as int check (value > 0);
    create table types (
      id int primary key, b bool, i2 int2, i8 int8, o oid,
      f4 float4, f8 float8, f8z float8, f8i float8, f4n float4,
      n numeric(12,4), nneg numeric(12,4), nn numeric, nbig numeric, m money,
      t text, e mood, iv interval, u uuid, j jsonb, js json,
      d date, dneg date, tm time, tm24 time, ts timestamp, tz timestamptz, ttz timetz,
      by bytea, ai int[], a2 int[], an numeric[], scan text,
      vc varchar(10), bp char(3), ci citext, nm name, ip inet, cidr cidr, mac macaddr,
      r int4range, x xml, dm posint
    );
    alter table types alter column scan set storage external;";

/// Row 1 has an ordinary value in every column, row 2 only NULLs; rows 3.. each one
/// value that needs pgferry's `Special` branch; then an update leaving the TOASTed
/// `scan` unchanged, a delete (key-only old image, then a tombstone) and a truncate.
const CHANGES: &str = r#"
    insert into types values (
      1, true, -32768, 9223372036854775807, 4294967295,
      'NaN', '-Infinity', '-0', 'Infinity', 1.5,
      12345678.1234, -0.5, 3.14159, '123456789012345678901234567890.123456789', -1234.56,
      'Émilie 🩺', 'calm', '1 year 2 mons 3 days 04:05:06.789',
      'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{"k": [1]}', '{"b": 1,  "a": [1]}',
      '2026-11-22', '1900-01-01', '04:05:06.789', '24:00:00', '2026-11-22 01:02:03.123456',
      '2026-11-22 01:02:03.123456+02', '04:05:06+02',
      '\x00ff00', '{1,NULL,3}', '{5,6}', '{1.5,NULL,-2.25}',
      (select string_agg(md5(g::text), '') from generate_series(1, 400) g),
      'short', 'ab', 'MiXeD', 'nm', '192.168.0.1/24', '10.0.0.0/8', '08:00:2b:01:02:03',
      '[1,5)', '<a>1</a>', 5);
    insert into types (id) values (2);
    insert into types (id, nn) values (3, 'NaN');
    insert into types (id, n) values (4, 'NaN');
    insert into types (id, d) values (5, 'infinity');
    insert into types (id, ts) values (6, '-infinity');
    insert into types (id, tz) values (7, 'infinity');
    insert into types (id, a2) values (8, '{{1,2},{3,4}}');
    insert into types (id, an) values (9, '{1.5,NaN,NULL}');
    insert into types (id, ai) values (10, '[0:1]={1,2}');
    insert into types (id, ts) values (11, '294270-01-01 00:00:00');
    insert into types (id, nbig) values (12, '-Infinity');
    update types set i2 = 7 where id = 1;
    delete from types where id = 2;
    truncate types;"#;

/// Messages on the table topic: 12 inserts, update, delete + tombstone, truncate.
const MESSAGES: usize = 16;

/// Rows whose column is the `Special` record, and its text, as the generic read finds
/// them. Rows 9 (a `Special` array element) and 11 (a timestamp past i64 microseconds)
/// are checked on their own; a Debezium-schema reader must refuse all of 3..=12.
const SPECIAL: [(i64, &str, &str); 8] = [
    (3, "nn", "NaN"),
    (4, "n", "NaN"),
    (5, "d", "infinity"),
    (6, "ts", "-infinity"),
    (7, "tz", "infinity"),
    (8, "a2", "{{1,2},{3,4}}"),
    (10, "ai", "[0:1]={1,2}"),
    (12, "nbig", "-Infinity"),
];

#[test]
fn fastavro_reads_every_type_and_a_debezium_schema_reader_refuses_only_pgferry_branches() {
    let db = TestDb::new("interop");
    db.sql(TABLE);
    let prefix = format!("t{}", db.name);
    let cfg = db.config(
        "s_interop.toml",
        "s_interop",
        &format!(
            "[kafka]\nbrokers = \"{}\"\ntopic_prefix = \"{prefix}\"\n[[tables]]\nsource = \"public.types\"\n",
            brokers()
        ),
    );
    let mut run = run_source(&cfg);
    wait_streaming(&db, "s_interop");
    db.sql(CHANGES);
    let topic = format!("{prefix}.public.types");
    consume(&brokers(), &topic, MESSAGES, T);
    // key + value schema of the one table version
    consume(&brokers(), &format!("{prefix}._schemas"), 2, T);
    assert!(run.terminate().success(), "{}", run.stderr_text());

    let readers = db.dir.join("debezium-reader-schemas.json");
    std::fs::write(
        &readers,
        serde_json::to_string_pretty(&debezium_schemas(&prefix)).unwrap(),
    )
    .unwrap();
    let (ok, lines, stderr) = script(&[
        "read",
        "--brokers",
        &brokers(),
        "--prefix",
        &prefix,
        "--topic",
        &topic,
        "--reader-schema",
        readers.to_str().unwrap(),
    ]);
    let dump = || {
        lines
            .iter()
            .map(|l| l.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        ok,
        "the fastavro reader found problems:\n{stderr}\noutput:\n{}",
        dump()
    );

    // Every schema's fingerprint, computed by fastavro, is its key on the topic.
    let schemas: Vec<&Value> = lines.iter().filter(|l| l["kind"] == "schema").collect();
    assert_eq!(schemas.len(), 2, "{}", dump());
    for s in &schemas {
        assert_eq!(s["key"], s["fingerprint"], "{s}");
    }
    let mut subjects: Vec<&str> = schemas
        .iter()
        .map(|s| s["subject"].as_str().unwrap())
        .collect();
    subjects.sort();
    assert_eq!(subjects, [format!("{topic}-key"), format!("{topic}-value")]);

    let records: Vec<&Value> = lines.iter().filter(|l| l["kind"] == "record").collect();
    assert_eq!(records.len(), MESSAGES, "{}", dump());
    for r in &records {
        assert!(
            r.get("key_error").is_none() && r.get("value_error").is_none(),
            "generic read failed: {r}"
        );
    }
    generic_values(&records);
    debezium_reader(&records);
}

/// The value event (not the tombstone) of `op` for key `id`.
fn event<'a>(records: &[&'a Value], op: &str, id: i64) -> &'a Value {
    records
        .iter()
        .copied()
        .find(|r| {
            r["value"]["op"] == op && (r["key"]["id"] == id || (op == "t" && r["key"].is_null()))
        })
        .unwrap_or_else(|| panic!("no {op} event for id {id}"))
}

/// A VariableScaleDecimal as read generically ({scale, value: hex}) -> (scale, unscaled).
fn var_decimal(v: &Value) -> (i64, i128) {
    let hex = v["value"]
        .as_str()
        .unwrap_or_else(|| panic!("not a VariableScaleDecimal: {v}"));
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    let mut unscaled: i128 = if bytes.first().is_some_and(|b| b & 0x80 != 0) {
        -1
    } else {
        0
    };
    for b in bytes {
        unscaled = (unscaled << 8) | i128::from(b);
    }
    (v["scale"].as_i64().unwrap(), unscaled)
}

fn generic_values(records: &[&Value]) {
    let first = event(records, "c", 1);
    assert_eq!(first["key"], json!({"id": 1}));
    assert_eq!(first["key_fingerprint"].as_str().unwrap().len(), 16);
    let after = &first["value"]["after"];
    let expected = json!({
        "id": 1, "b": true, "i2": -32768, "i8": 9_223_372_036_854_775_807_i64, "o": 4_294_967_295_u64,
        "f4": "NaN", "f8": "-Infinity", "f8z": "-0", "f8i": "Infinity", "f4n": 1.5,
        "n": "12345678.1234", "nneg": "-0.5000", "m": "-1234.56",
        "t": "Émilie 🩺", "e": "calm", "iv": "P1Y2M3DT4H5M6.789S",
        "u": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "j": "{\"k\": [1]}", "js": "{\"b\": 1,  \"a\": [1]}",
        // epoch days, micros of the day, epoch micros: no logical type a legal value
        // could overflow, so fastavro gives the plain numbers
        "d": 20_779, "dneg": -25_567, "tm": 14_706_789_000_i64, "tm24": 86_400_000_000_i64,
        "ts": 1_795_309_323_123_456_i64, "tz": "2026-11-21T23:02:03.123456Z", "ttz": "04:05:06+02",
        "by": "00ff00", "ai": [1, null, 3], "a2": [5, 6],
        "vc": "short", "bp": "ab ", "ci": "MiXeD", "nm": "nm", "ip": "192.168.0.1/24",
        "cidr": "10.0.0.0/8", "mac": "08:00:2b:01:02:03", "r": "[1,5)", "x": "<a>1</a>", "dm": 5
    });
    for (k, v) in expected.as_object().unwrap() {
        assert_eq!(&after[k], v, "column {k}: {after}");
    }
    assert_eq!(var_decimal(&after["nn"]), (5, 314_159));
    assert_eq!(
        var_decimal(&after["nbig"]),
        (9, 123_456_789_012_345_678_901_234_567_890_123_456_789)
    );
    let an = after["an"].as_array().unwrap();
    assert_eq!(var_decimal(&an[0]), (1, 15));
    assert!(an[1].is_null());
    assert_eq!(var_decimal(&an[2]), (2, -225));
    assert!(after["scan"].as_str().unwrap().len() > 8000);
    let source = &first["value"]["source"];
    assert_eq!(source["connector"], "postgresql");
    assert_eq!(source["table"], "types");
    assert_eq!(source["snapshot"], "false");

    let nulls = event(records, "c", 2)["value"]["after"]
        .as_object()
        .unwrap();
    assert!(
        nulls.iter().all(|(k, v)| k == "id" || v.is_null()),
        "{nulls:?}"
    );

    for (id, column, text) in SPECIAL {
        let after = &event(records, "c", id)["value"]["after"];
        assert_eq!(after[column], json!({"text": text}), "id {id}: {after}");
    }
    let an = &event(records, "c", 9)["value"]["after"]["an"];
    assert_eq!(var_decimal(&an[0]), (1, 15));
    assert_eq!(an[1], json!({"text": "NaN"}));
    assert!(an[2].is_null());
    assert_eq!(
        event(records, "c", 11)["value"]["after"]["ts"],
        json!({"text": "294270-01-01 00:00:00"})
    );

    // The Unchanged branch is an empty record, never null or a placeholder.
    let update = &event(records, "u", 1)["value"];
    assert_eq!(update["after"]["scan"], json!({}));
    assert_eq!(update["after"]["i2"], 7);
    assert_eq!(update["unchanged"], json!(["scan"]));

    let delete = event(records, "d", 2);
    assert_eq!(delete["value"]["before"]["id"], 2);
    assert!(delete["value"]["after"].is_null());
    let tombstone = records
        .iter()
        .find(|r| r["value"].is_null())
        .expect("a tombstone");
    assert_eq!(tombstone["key"], json!({"id": 2}));
    assert!(event(records, "t", 0)["key"].is_null());
}

/// Whether a value event needs a pgferry branch: the inserts of rows 3..=12 (a
/// `Special` value each) and the update (its unchanged TOAST column).
fn needs_pgferry_branch(r: &Value) -> bool {
    let id = r["key"]["id"].as_i64().unwrap_or(0);
    match r["value"]["op"].as_str() {
        Some("c") => (3..=12).contains(&id),
        Some("u") => true,
        _ => false,
    }
}

fn debezium_reader(records: &[&Value]) {
    let mut ordinary = 0;
    let mut refused = 0;
    for r in records {
        let alt = &r["with_reader_schema"];
        // Keys are ints: always readable, and the same.
        assert!(alt.get("key_error").is_none(), "key refused: {r}");
        assert_eq!(alt["key"], r["key"], "{r}");
        if r["value"].is_null() {
            assert!(alt["value"].is_null(), "tombstone: {r}");
            continue;
        }
        if needs_pgferry_branch(r) {
            refused += 1;
            let error = alt["value_error"].as_str().unwrap_or_else(|| {
                panic!(
                    "a Debezium-schema reader read a value that needs a pgferry branch \
                     instead of refusing it: {}\ngeneric read: {}",
                    alt["value"], r["value"]
                )
            });
            assert!(alt.get("value").is_none(), "{r}");
            assert!(
                error.contains("SchemaResolutionError"),
                "refused, but not by schema resolution: {error}"
            );
            eprintln!(
                "Debezium-schema reader refused {} {}: {}",
                r["value"]["op"],
                r["key"],
                &error[..error.len().min(160)]
            );
            continue;
        }
        ordinary += 1;
        let value = alt.get("value").unwrap_or_else(|| {
            panic!(
                "a Debezium-schema reader refused an ordinary record: {}\n{r}",
                alt["value_error"]
            )
        });
        let generic = &r["value"];
        for field in [
            "before",
            "after",
            "op",
            "ts_ms",
            "ts_us",
            "ts_ns",
            "transaction",
        ] {
            assert_eq!(value[field], generic[field], "field {field} of {r}");
        }
        for (k, v) in value["source"].as_object().unwrap() {
            assert_eq!(v, &generic["source"][k], "source.{k} of {r}");
        }
    }
    // c 1, c 2, d 2, t; c 3..=12, u 1
    assert_eq!((ordinary, refused), (4, 11));
}

/// The key and value schemas that Debezium 3.x (PostgreSQL connector, Avro converter
/// with its connect.* metadata) declares for `public.types`, from Debezium's
/// documented mappings: decimal.handling.mode=precise, time.precision.mode=adaptive,
/// interval.handling.mode=string, money.fraction.digits=2. NOT NULL columns are
/// required fields, nullable ones `["null", T]` with default null.
fn debezium_schemas(prefix: &str) -> Value {
    let ns = format!("{prefix}.public.types");
    let named =
        |ty: &str, name: &str| json!({"type": ty, "connect.version": 1, "connect.name": name});
    let decimal = |precision: Option<u32>, scale: u32| {
        let mut parameters = json!({"scale": scale.to_string()});
        if let Some(p) = precision {
            parameters["connect.decimal.precision"] = json!(p.to_string());
        }
        json!({"type": "bytes", "scale": scale, "precision": precision.unwrap_or(64),
               "connect.version": 1, "connect.parameters": parameters,
               "connect.name": "org.apache.kafka.connect.data.Decimal", "logicalType": "decimal"})
    };
    let vsd = "io.debezium.data.VariableScaleDecimal";
    let columns = vec![
        ("b", json!("boolean")),
        ("i2", json!({"type": "int", "connect.type": "int16"})),
        ("i8", json!("long")),
        ("o", json!("long")),
        ("f4", json!("float")),
        ("f8", json!("double")),
        ("f8z", json!("double")),
        ("f8i", json!("double")),
        ("f4n", json!("float")),
        ("n", decimal(Some(12), 4)),
        ("nneg", decimal(Some(12), 4)),
        (
            "nn",
            json!({"type": "record", "name": "VariableScaleDecimal", "namespace": "io.debezium.data",
                   "fields": [{"name": "scale", "type": "int"}, {"name": "value", "type": "bytes"}],
                   "connect.doc": "Variable scaled decimal", "connect.version": 1, "connect.name": vsd}),
        ),
        ("nbig", json!(vsd)),
        ("m", decimal(None, 2)),
        ("t", json!("string")),
        (
            "e",
            json!({"type": "string", "connect.version": 1, "connect.parameters": {"allowed": "calm,tense"},
                   "connect.name": "io.debezium.data.Enum"}),
        ),
        ("iv", named("string", "io.debezium.time.Interval")),
        ("u", named("string", "io.debezium.data.Uuid")),
        ("j", named("string", "io.debezium.data.Json")),
        ("js", named("string", "io.debezium.data.Json")),
        ("d", named("int", "io.debezium.time.Date")),
        ("dneg", named("int", "io.debezium.time.Date")),
        ("tm", named("long", "io.debezium.time.MicroTime")),
        ("tm24", named("long", "io.debezium.time.MicroTime")),
        ("ts", named("long", "io.debezium.time.MicroTimestamp")),
        ("tz", named("string", "io.debezium.time.ZonedTimestamp")),
        ("ttz", named("string", "io.debezium.time.ZonedTime")),
        ("by", json!("bytes")),
        ("ai", json!({"type": "array", "items": ["null", "int"]})),
        ("a2", json!({"type": "array", "items": ["null", "int"]})),
        ("an", json!({"type": "array", "items": ["null", vsd]})),
        ("scan", json!("string")),
        ("vc", json!("string")),
        ("bp", json!("string")),
        ("ci", json!("string")),
        ("nm", json!("string")),
        ("ip", json!("string")),
        ("cidr", json!("string")),
        ("mac", json!("string")),
        ("r", json!("string")),
        ("x", named("string", "io.debezium.data.Xml")),
        ("dm", json!("int")),
    ];
    let mut fields = vec![json!({"name": "id", "type": "int"})];
    fields.extend(
        columns
            .into_iter()
            .map(|(name, ty)| json!({"name": name, "type": ["null", ty], "default": null})),
    );
    let opt = |name: &str, ty: &str| json!({"name": name, "type": ["null", ty], "default": null});
    let source = json!({
        "type": "record", "name": "Source", "namespace": "io.debezium.connector.postgresql",
        "connect.version": 1, "connect.name": "io.debezium.connector.postgresql.Source",
        "fields": [
            {"name": "version", "type": "string"},
            {"name": "connector", "type": "string"},
            {"name": "name", "type": "string"},
            {"name": "ts_ms", "type": "long"},
            {"name": "snapshot", "type": [{"type": "string", "connect.version": 1,
                "connect.parameters": {"allowed": "true,first,first_in_data_collection,last_in_data_collection,last,false,incremental"},
                "connect.default": "false", "connect.name": "io.debezium.data.Enum"}, "null"],
             "default": "false"},
            {"name": "db", "type": "string"},
            opt("sequence", "string"),
            opt("ts_us", "long"),
            opt("ts_ns", "long"),
            {"name": "schema", "type": "string"},
            {"name": "table", "type": "string"},
            opt("txId", "long"),
            opt("lsn", "long"),
            opt("xmin", "long")
        ]
    });
    let value = json!({
        "type": "record", "name": "Envelope", "namespace": ns,
        "connect.version": 2, "connect.name": format!("{ns}.Envelope"),
        "fields": [
            {"name": "before", "type": ["null", {"type": "record", "name": "Value", "fields": fields,
                                                 "connect.name": format!("{ns}.Value")}], "default": null},
            {"name": "after", "type": ["null", "Value"], "default": null},
            {"name": "source", "type": source},
            {"name": "transaction", "type": ["null", {
                "type": "record", "name": "block", "namespace": "event",
                "connect.version": 1, "connect.name": "event.block",
                "fields": [
                    {"name": "id", "type": "string"},
                    {"name": "total_order", "type": "long"},
                    {"name": "data_collection_order", "type": "long"}
                ]}], "default": null},
            {"name": "op", "type": "string"},
            opt("ts_ms", "long"),
            opt("ts_us", "long"),
            opt("ts_ns", "long")
        ]
    });
    let key = json!({"type": "record", "name": "Key", "namespace": ns,
                     "fields": [{"name": "id", "type": "int"}], "connect.name": format!("{ns}.Key")});
    json!({"key": key, "value": value})
}
