//! `[kafka] format = "json"`: Debezium's JsonConverter shapes, checked against a real
//! PostgreSQL and the broker.
//!
//! 1. The raw messages of an all-types table, for `json_schemas = true` and `false`,
//!    read with serde_json only and compared with values worked out independently of
//!    pgferry's code: from SQL on the source (epoch days, epoch micros, base64 of
//!    bytea) or by hand from Debezium's documented encodings (decimals as base64 of
//!    the unscaled big-endian two's-complement bytes, with the arithmetic in the
//!    comments). The Connect schemas are checked field by field.
//! 2. The whole pipeline with each setting: the sink applies the JSON topics and the
//!    target equals the source (`verify`, and an independent row-by-row comparison).

mod common;
mod kafka_support;

use std::time::Duration;

use common::*;
use kafka_support::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(180);

const TYPES_DDL: &str = "create extension if not exists citext;
     create type mood as enum ('calm', 'tense');
     create domain posint as int check (value > 0);";

const TYPES_TABLE: &str = "create table types (
       id int primary key, b bool, i2 int2, i8 int8, o oid, f4 float4, f8 float8, f8z float8,
       n numeric(12,4), nneg numeric(12,4), nn numeric, nnan numeric, m money,
       t text, e mood, iv interval, u uuid, j jsonb, d date, dinf date, tm time, tm3 time(3),
       ts timestamp, ts3 timestamp(3), tsinf timestamp, tz timestamptz, ttz timetz, by bytea,
       ai int[], a2 int[], an numeric[], scan text, vc varchar(10), ci citext, ip inet, x xml,
       js json, dm posint, f4n float4
     );
     alter table types alter column scan set storage external;";

const ROW_1: &str = r#"insert into types values (
       1, true, -32768, 9223372036854775807, 4294967295, 'NaN', '-Infinity', '-0',
       12345678.1234, -0.5, 3.14159, 'NaN', -1234.56,
       'Émilie 🩺', 'calm', '1 year 2 mons', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{"k": [1]}',
       '2026-11-22', 'infinity', '04:05:06.789', '04:05:06.789', '2026-11-22 01:02:03.123456',
       '2026-11-22 01:02:03.123', '-infinity', '2026-11-22 01:02:03.123456+02', '04:05:06+02',
       '\x00ff00', '{1,NULL,3}', '{{1,2},{3,4}}', '{1.5,NaN,NULL}',
       (select string_agg(md5(g::text), '') from generate_series(1, 400) g),
       'short', 'MiXeD', '192.168.0.1/24', '<a>1</a>', '{"b": 1,  "a": [1]}', 5, 1.5)"#;

fn config(
    db: &TestDb,
    slot: &str,
    prefix: &str,
    json_schemas: bool,
    extra: &str,
) -> std::path::PathBuf {
    db.config(
        &format!("{slot}.toml"),
        slot,
        &format!(
            "[kafka]\nbrokers = \"{}\"\ntopic_prefix = \"{prefix}\"\nformat = \"json\"\n\
             json_schemas = {json_schemas}\n{extra}\n[[tables]]\nsource = \"public.types\"\n",
            brokers()
        ),
    )
}

/// The field named `name` of a Connect struct schema.
fn field<'a>(schema: &'a Value, name: &str) -> &'a Value {
    schema["fields"]
        .as_array()
        .unwrap_or_else(|| panic!("not a struct schema: {schema}"))
        .iter()
        .find(|f| f["field"] == name)
        .unwrap_or_else(|| panic!("no field {name} in {schema}"))
}

/// The message as JsonConverter would hand it over: (schema, payload). Checks the
/// framing that `json_schemas` asks for.
fn split(bytes: &[u8], with_schema: bool) -> (Value, Value) {
    let v: Value = serde_json::from_slice(bytes).expect("the message is JSON");
    let o = v.as_object().expect("an object");
    if with_schema {
        let mut keys: Vec<&String> = o.keys().collect();
        keys.sort();
        assert_eq!(keys, ["payload", "schema"], "{v}");
        (v["schema"].clone(), v["payload"].clone())
    } else {
        assert!(
            !o.contains_key("schema") && !o.contains_key("payload"),
            "{v}"
        );
        (Value::Null, v)
    }
}

fn raw_messages(with_schema: bool) {
    let tag = if with_schema { "jcs" } else { "jcp" };
    let db = TestDb::new(tag);
    db.sql(&format!("{TYPES_DDL} {TYPES_TABLE}"));
    let prefix = format!("t{}", db.name);
    let cfg = config(&db, tag, &prefix, with_schema, "");
    let mut run = run_source(&cfg);
    wait_streaming(&db, tag);
    db.sql(&format!(
        "{ROW_1};
         insert into types (id) values (2);
         update types set i2 = 7 where id = 1;
         delete from types where id = 2;"
    ));
    let topic = format!("{prefix}.public.types");
    // insert, insert, update, delete + tombstone
    let records = consume(&brokers(), &topic, 5, T);
    assert_eq!(records.len(), 5);

    // The oracle: PostgreSQL itself, not pgferry's conversions.
    let oracle = |q: &str| -> i64 { db.value(q).unwrap().parse().unwrap() };
    let epoch_day = oracle("select date '2026-11-22' - date '1970-01-01'");
    let ts_micros = oracle(
        "select (extract(epoch from timestamp '2026-11-22 01:02:03.123456') * 1000000)::bigint",
    );
    let ts3_millis =
        oracle("select (extract(epoch from timestamp '2026-11-22 01:02:03.123') * 1000)::bigint");
    let tm_micros = oracle("select (extract(epoch from time '04:05:06.789') * 1000000)::bigint");
    let bytea_b64 = db
        .value(r"select encode('\x00ff00'::bytea, 'base64')")
        .unwrap();

    let (schema, first) = split(records[0].value.as_ref().unwrap(), with_schema);
    let (key_schema, key) = split(records[0].key.as_ref().unwrap(), with_schema);
    assert_eq!(key, json!({"id": 1}));
    let fp = &records[0].headers["pgferry.schema"];
    assert!(
        fp.len() == 16 && fp.chars().all(|c| c.is_ascii_hexdigit()),
        "{fp}"
    );
    assert_eq!(first["op"], "c");
    assert_eq!(first["before"], Value::Null);
    assert_eq!(first["transaction"], Value::Null);
    assert_eq!(first["source"]["connector"], "postgresql");
    assert_eq!(first["source"]["name"], prefix.as_str());
    assert_eq!(first["source"]["db"], db.name.as_str());
    assert_eq!(first["source"]["table"], "types");
    assert_eq!(first["source"]["snapshot"], "false");
    assert!(first["source"]["ts_us"].as_i64().unwrap() > 1_700_000_000_000_000);
    assert!(first["ts_ns"].as_i64().unwrap() > 1_700_000_000_000_000_000);
    let special = |text: &str| json!({"text": text, "unchanged": false});
    let after = &first["after"];
    let expected = json!({
        "id": 1, "b": true, "i2": -32768, "i8": 9223372036854775807_i64, "o": 4294967295_u64,
        // JSON has no NaN or Infinity numbers.
        "f4": special("NaN"), "f8": special("-Infinity"),
        // 12345678.1234 at scale 4: unscaled 123456781234 = 0x1C_BE98_FBB2, five bytes
        // 1C BE 98 FB B2, base64 "HL6Y+7I=".
        "n": "HL6Y+7I=",
        // -0.5 at scale 4: -5000 = 0xEC78 (two's complement), base64 "7Hg=".
        "nneg": "7Hg=",
        // numeric without typmod: VariableScaleDecimal; 314159 = 0x04CB2F -> "BMsv".
        "nn": {"scale": 5, "value": "BMsv"},
        "nnan": special("NaN"),
        // money at scale 2: -123456 = 0xFE1DC0 -> "/h3A".
        "m": "/h3A",
        "t": "Émilie 🩺", "e": "calm", "iv": "P1Y2M", "u": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        "j": "{\"k\": [1]}", "d": epoch_day, "dinf": special("infinity"), "tm": tm_micros,
        "tm3": tm_micros / 1000, "ts": ts_micros, "ts3": ts3_millis, "tsinf": special("-infinity"),
        "tz": "2026-11-21T23:02:03.123456Z", "ttz": "04:05:06+02", "by": bytea_b64,
        "ai": [1, null, 3], "a2": special("{{1,2},{3,4}}"), "an": special("{1.5,NaN,NULL}"),
        "vc": "short", "ci": "MiXeD", "ip": "192.168.0.1/24", "x": "<a>1</a>",
        "js": "{\"b\": 1,  \"a\": [1]}", "dm": 5, "f4n": 1.5
    });
    for (k, v) in expected.as_object().unwrap() {
        assert_eq!(&after[k], v, "column {k}");
    }
    assert_eq!(
        after["f8z"].to_string(),
        "-0.0",
        "-0 as a float every JSON reader keeps negative"
    );
    assert!(after["scan"].as_str().unwrap().len() > 8000);

    if with_schema {
        assert_eq!(schema["type"], "struct");
        assert_eq!(schema["name"], format!("{prefix}.public.types.Envelope"));
        assert_eq!(
            key_schema,
            json!({"type": "struct", "optional": false, "name": format!("{prefix}.public.types.Key"),
                   "fields": [{"type": "int32", "optional": false, "field": "id"}]})
        );
        let row = field(&schema, "after");
        assert_eq!(row["name"], format!("{prefix}.public.types.Value"));
        assert_eq!(field(&schema, "before")["name"], row["name"]);
        let named = |c: &str| (field(row, c)["type"].clone(), field(row, c)["name"].clone());
        assert_eq!(named("d"), (json!("int32"), json!("io.debezium.time.Date")));
        assert_eq!(
            named("ts"),
            (json!("int64"), json!("io.debezium.time.MicroTimestamp"))
        );
        assert_eq!(
            named("ts3"),
            (json!("int64"), json!("io.debezium.time.Timestamp"))
        );
        assert_eq!(
            named("tm"),
            (json!("int64"), json!("io.debezium.time.MicroTime"))
        );
        assert_eq!(
            named("tm3"),
            (json!("int32"), json!("io.debezium.time.Time"))
        );
        assert_eq!(
            named("tz"),
            (json!("string"), json!("io.debezium.time.ZonedTimestamp"))
        );
        assert_eq!(
            named("u"),
            (json!("string"), json!("io.debezium.data.Uuid"))
        );
        assert_eq!(
            named("j"),
            (json!("string"), json!("io.debezium.data.Json"))
        );
        assert_eq!(
            named("js"),
            (json!("string"), json!("io.debezium.data.Json"))
        );
        assert_eq!(
            named("iv"),
            (json!("string"), json!("io.debezium.time.Interval"))
        );
        assert_eq!(
            named("nn").1,
            json!("io.debezium.data.VariableScaleDecimal")
        );
        assert_eq!(field(row, "i2")["type"], "int16");
        assert_eq!(field(row, "i8")["type"], "int64");
        assert_eq!(field(row, "f4n")["type"], "float");
        assert_eq!(field(row, "by")["type"], "bytes");
        assert_eq!(field(row, "b")["type"], "boolean");
        assert_eq!(field(row, "id")["optional"], true);
        assert_eq!(
            field(row, "n")["parameters"],
            json!({"scale": "4", "connect.decimal.precision": "12"})
        );
        assert_eq!(
            field(row, "n")["name"],
            "org.apache.kafka.connect.data.Decimal"
        );
        assert_eq!(field(row, "m")["parameters"], json!({"scale": "2"}));
        assert_eq!(
            field(row, "ai")["items"],
            json!({"type": "int32", "optional": true})
        );
        // What the Debezium type cannot hold is declared as pgferry's struct in this
        // message, so a reader holding the schema cannot take it for a number or date.
        for c in ["f4", "f8", "nnan", "dinf", "tsinf", "a2", "an"] {
            assert_eq!(field(row, c)["name"], "io.pgferry.Special", "column {c}");
            assert_eq!(field(row, c)["type"], "struct", "column {c}");
        }
        let source = field(&schema, "source");
        assert_eq!(source["name"], "io.debezium.connector.postgresql.Source");
        assert_eq!(field(source, "snapshot")["name"], "io.debezium.data.Enum");
        assert_eq!(field(&schema, "op")["type"], "string");
        assert_eq!(field(&schema, "ts_ms")["type"], "int64");
        assert_eq!(field(&schema, "transaction")["name"], "event.block");
    } else {
        assert_eq!(key_schema, Value::Null);
    }

    // The all-NULL row: no specials, so its schema declares the Debezium types.
    let (nschema, nulls) = split(records[1].value.as_ref().unwrap(), with_schema);
    let nulls = nulls["after"].as_object().unwrap();
    assert!(
        nulls
            .iter()
            .filter(|(k, _)| *k != "id")
            .all(|(_, v)| v.is_null()),
        "{nulls:?}"
    );
    assert_eq!(nulls.len(), 39, "every column is present");
    if with_schema {
        assert_eq!(
            field(field(&nschema, "after"), "dinf")["name"],
            "io.debezium.time.Date"
        );
    }

    // The update that left the TOASTed column unchanged: never null, never a placeholder.
    let (uschema, update) = split(records[2].value.as_ref().unwrap(), with_schema);
    assert_eq!(update["op"], "u");
    assert_eq!(update["after"]["i2"], 7);
    assert_eq!(
        update["after"]["scan"],
        json!({"text": null, "unchanged": true})
    );
    assert_eq!(update["unchanged"], json!(["scan"]));
    assert_eq!(records[2].headers["pgferry.unchanged"], "scan");
    if with_schema {
        assert_eq!(
            field(field(&uschema, "after"), "scan")["name"],
            "io.pgferry.Special"
        );
        assert_eq!(field(field(&uschema, "after"), "t")["type"], "string");
    }

    // The delete: a key-only before image, then a tombstone with the same key.
    let (_, delete) = split(records[3].value.as_ref().unwrap(), with_schema);
    assert_eq!(delete["op"], "d");
    assert_eq!(delete["before"]["id"], 2);
    assert_eq!(delete["after"], Value::Null);
    assert!(records[4].value.is_none(), "a tombstone");
    assert_eq!(records[4].key, records[3].key);

    assert!(run.terminate().success(), "{}", run.stderr_text());
}

#[test]
fn json_schemas_true_writes_schema_and_payload() {
    raw_messages(true);
}

#[test]
fn json_schemas_false_writes_the_payload_only() {
    raw_messages(false);
}

fn verify(config: &std::path::Path) -> (i32, String) {
    let (code, out, err) = common::run(&["verify", "--config", config.to_str().unwrap()]);
    (code, format!("{out}{err}"))
}

/// Rows as canonical text, for the independent comparison.
fn rows(db: &TestDb, query: &str) -> Vec<Vec<Option<String>>> {
    db.sql(&format!(
        "set DateStyle = ISO; set TimeZone = 'UTC'; set extra_float_digits = 1; {query}"
    ))
}

/// The sink applies JSON topics exactly (the target table exists: `create_tables`
/// refuses the type name `time(3) without time zone`, for Avro events too).
fn pipeline(with_schema: bool) {
    let tag = if with_schema { "jps" } else { "jpp" };
    let src = TestDb::new(tag);
    let tgt = TestDb::on(&service_env("PGFERRY_TARGET_URL"), &format!("{tag}_t"));
    src.sql(&format!("{TYPES_DDL} {TYPES_TABLE}"));
    tgt.sql(&format!("{TYPES_DDL} {TYPES_TABLE}"));
    let prefix = format!("t{}", src.name);
    let cfg = config(
        &src,
        tag,
        &prefix,
        with_schema,
        &format!(
            "[sink]\nurl = \"{}\"\nconsumer = \"test\"\nbatch_linger = \"20ms\"\n",
            tgt.url
        ),
    );
    let mut p = Pgferry::spawn(
        &["run", "--config", cfg.to_str().unwrap()],
        cfg.with_extension("run.stderr"),
    );
    wait_streaming(&src, tag);
    src.sql(&format!(
        "{ROW_1};
         insert into types (id) values (2);
         insert into types (id, j, js, nn, d, ts, tz, an) values
           (3, 'null', '{{\"a\": 1,   \"a\": 2}}', 12345678901234567890.123456789, '-infinity',
            '294276-12-31 23:59:59.999999', '-infinity', '{{}}'),
           (4, '[1, {{\"k\": 12345678901234567890.123456789}}]', '\"s\"', -0.000001, '0001-01-01 BC',
            '1969-12-31 23:59:59.999999', '1900-01-01 00:00:00+01:30', '{{-1.25,NULL}}');
         update types set i2 = 7, f8 = 2.5 where id = 1;
         update types set scan = 'short now', d = 'infinity' where id = 1;
         delete from types where id = 2;"
    ));
    let deadline = std::time::Instant::now() + T;
    loop {
        let (code, out) = verify(&cfg);
        if code == 0 {
            break;
        }
        let exited = p.child.try_wait().unwrap();
        assert!(
            std::time::Instant::now() < deadline && exited.is_none(),
            "verify never became equal:\n{out}\npgferry stderr:\n{}",
            p.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let q = "select row(t.*)::text from types t order by id";
    let source = rows(&src, q);
    assert_eq!(source.len(), 3);
    assert_eq!(source, rows(&tgt, q));
    // A jsonb null is not SQL NULL; json keeps its duplicate keys and spacing.
    assert_eq!(
        tgt.value("select (j is null)::text || '|' || js::text from types where id = 3")
            .as_deref(),
        Some(r#"false|{"a": 1,   "a": 2}"#)
    );
}

#[test]
fn the_sink_applies_json_topics_with_schemas_exactly() {
    pipeline(true);
}

#[test]
fn the_sink_applies_payload_only_json_topics_exactly() {
    pipeline(false);
}
