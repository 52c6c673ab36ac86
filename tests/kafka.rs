//! `pgferry run --only source` against the real broker (Apache Kafka, from
//! scripts/services.sh) and rdkafka's mock cluster for faults: events decode with the
//! published schemas, every envelope field and type is right, a crash loses nothing,
//! broker outages stall confirmation without growing memory, retries keep key order.
//! (Registry mode, against a real schema registry: tests/registry.rs.)
#![recursion_limit = "256"]

mod common;
mod kafka_support;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use common::*;
use kafka_support::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(90);

/// Config for `run --only source` into `brokers` with a unique topic prefix.
fn kafka_config(
    db: &TestDb,
    slot: &str,
    brokers: &str,
    prefix: &str,
    extra_kafka: &str,
    tables: &[&str],
) -> std::path::PathBuf {
    let tables: String = tables
        .iter()
        .map(|t| format!("[[tables]]\nsource = \"{t}\"\n"))
        .collect();
    db.config(
        &format!("{slot}.toml"),
        slot,
        &format!("[kafka]\nbrokers = \"{brokers}\"\ntopic_prefix = \"{prefix}\"\n{extra_kafka}\n{tables}"),
    )
}

fn envelope(
    records: &[Record],
    schemas: &HashMap<String, apache_avro::Schema>,
) -> Vec<(Record, Value)> {
    records
        .iter()
        .filter(|r| r.value.is_some())
        .map(|r| {
            (
                r.clone(),
                to_json(&decode_single_object(r.value.as_ref().unwrap(), schemas).1),
            )
        })
        .collect()
}

#[test]
fn avro_events_decode_with_the_schema_topic_and_carry_every_field() {
    let db = TestDb::new("kavro");
    db.sql(
        "create extension if not exists citext;
         create type mood as enum ('calm', 'tense');
         create domain posint as int check (value > 0);
         create table types (
           id int primary key, b bool, i2 int2, i8 int8, o oid, f4 float4, f8 float8, f8z float8,
           n numeric(12,4), nneg numeric(12,4), nn numeric, nbig numeric, nnan numeric, m money,
           t text, e mood, iv interval, u uuid, j jsonb, d date, dinf date, tm time, ts timestamp,
           tsinf timestamp, tz timestamptz, ttz timetz, by bytea, ai int[], a2 int[], an numeric[], scan text,
           vc varchar(10), bp char(3), ci citext, nm name, ip inet, cidr cidr, mac macaddr, r int4range,
           x xml, js json, dm posint, f4n float4
         );
         alter table types alter column scan set storage external;",
    );
    let prefix = format!("t{}", db.name);
    let cfg = kafka_config(&db, "s_kavro", &brokers(), &prefix, "", &["public.types"]);
    let port = free_port();
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("listen = \"\"", &format!("listen = \"127.0.0.1:{port}\""));
    std::fs::write(&cfg, text).unwrap();
    let mut run = run_source(&cfg);
    wait_streaming(&db, "s_kavro");
    db.sql(
        r#"insert into types values (
           1, true, -32768, 9223372036854775807, 4294967295, 'NaN', '-Infinity', '-0',
           12345678.1234, -0.5, 3.14159, '123456789012345678901234567890.123456789', 'NaN', -1234.56,
           'Émilie 🩺', 'calm', '1 year 2 mons', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{"k": [1]}',
           '2026-11-22', 'infinity', '04:05:06.789', '2026-11-22 01:02:03.123456', '-infinity',
           '2026-11-22 01:02:03.123456+02', '04:05:06+02', '\x00ff00', '{1,NULL,3}', '{{1,2},{3,4}}',
           '{1.5,NaN,NULL}', (select string_agg(md5(g::text), '') from generate_series(1, 400) g),
           'short', 'ab', 'MiXeD', 'nm', '192.168.0.1/24', '10.0.0.0/8', '08:00:2b:01:02:03', '[1,5)',
           '<a>1</a>', '{"b": 1,  "a": [1]}', 5, 1.5);
         insert into types (id) values (2);
         update types set i2 = 7 where id = 1;
         delete from types where id = 2;
         truncate types;"#,
    );
    let topic = format!("{prefix}.public.types");
    // insert, insert, update, delete + tombstone, truncate
    let records = consume(&brokers(), &topic, 6, T);
    let schemas = schema_topic(&brokers(), &prefix, 2);
    let events = envelope(&records, &schemas);
    assert_eq!(events.len(), 5);
    let ops: Vec<&str> = events
        .iter()
        .map(|(_, v)| v["op"].as_str().unwrap())
        .collect();
    assert_eq!(ops, ["c", "c", "u", "d", "t"]);

    let (rec, first) = &events[0];
    let after = &first["after"];
    let expected = json!({
        "id": 1, "b": true, "i2": -32768, "i8": 9223372036854775807_i64, "o": 4294967295_u64,
        "f4": "NaN", "f8": "-Infinity", "f8z": "-0",
        "n": {"unscaled": "123456781234"}, "nneg": {"unscaled": "-5000"},
        "nn": {"scale": 5, "unscaled": "314159"},
        "nbig": {"scale": 9, "unscaled": "123456789012345678901234567890123456789"},
        "nnan": {"text": "NaN"}, "m": {"unscaled": "-123456"},
        "t": "Émilie 🩺", "e": "calm", "iv": "P1Y2M", "u": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        "j": "{\"k\": [1]}", "d": 20_779, "dinf": {"text": "infinity"}, "tm": 14_706_789_000_i64,
        "ts": 1_795_309_323_123_456_i64, "tsinf": {"text": "-infinity"}, "tz": "2026-11-21T23:02:03.123456Z",
        "ttz": "04:05:06+02", "by": "00ff00", "ai": [1, null, 3], "a2": {"text": "{{1,2},{3,4}}"},
        "an": [{"scale": 1, "unscaled": "15"}, {"text": "NaN"}, null],
        "vc": "short", "bp": "ab ", "ci": "MiXeD", "nm": "nm", "ip": "192.168.0.1/24", "cidr": "10.0.0.0/8",
        "mac": "08:00:2b:01:02:03", "r": "[1,5)", "x": "<a>1</a>", "js": "{\"b\": 1,  \"a\": [1]}", "dm": 5,
        "f4n": 1.5
    });
    for (k, v) in expected.as_object().unwrap() {
        assert_eq!(&after[k], v, "column {k}");
    }
    assert!(after["scan"].as_str().unwrap().len() > 8000);
    assert_eq!(first["before"], Value::Null);
    let source = &first["source"];
    assert_eq!(source["connector"], "postgresql");
    assert_eq!(source["name"], prefix.as_str());
    assert_eq!(source["db"], db.name.as_str());
    assert_eq!(source["schema"], "public");
    assert_eq!(source["table"], "types");
    assert_eq!(source["snapshot"], "false");
    assert!(source["txId"].as_i64().unwrap() > 0);
    assert!(source["lsn"].as_i64().unwrap() > 0);
    assert!(source["ts_ms"].as_i64().unwrap() > 1_700_000_000_000);
    assert!(source["ts_us"].as_i64().unwrap() / 1000 == source["ts_ms"].as_i64().unwrap());
    let seq: Vec<String> = serde_json::from_str(source["sequence"].as_str().unwrap()).unwrap();
    assert_eq!(seq.len(), 2);
    assert!(first["ts_ms"].as_i64().unwrap() >= source["ts_ms"].as_i64().unwrap());
    assert_eq!(first["unchanged"], json!([]));
    assert_eq!(rec.headers["pgferry.ordinal"], "0");
    assert!(rec.headers["pgferry.commit_lsn"].contains('/'));
    // The key is the Key record.
    let key_schema_fp: String = rec.key.as_ref().unwrap()[2..10]
        .iter()
        .rev()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert!(schemas.contains_key(&key_schema_fp));
    let (_, key) = decode_single_object(rec.key.as_ref().unwrap(), &schemas);
    assert_eq!(to_json(&key), json!({"id": 1}));

    // All-NULL row.
    let nulls = events[1].1["after"].as_object().unwrap();
    assert!(
        nulls
            .iter()
            .filter(|(k, _)| *k != "id")
            .all(|(_, v)| v.is_null()),
        "{nulls:?}"
    );

    // Update leaving the TOASTed column unchanged: the Unchanged branch, never null.
    let (urec, update) = &events[2];
    assert_eq!(update["after"]["scan"], json!({"$unchanged": true}));
    assert_eq!(update["after"]["i2"], 7);
    assert_eq!(update["unchanged"], json!(["scan"]));
    assert_eq!(urec.headers["pgferry.unchanged"], "scan");

    // Delete: key-only before image, then a tombstone with the same key.
    let (drec, delete) = &events[3];
    assert_eq!(delete["before"]["id"], 2);
    assert_eq!(delete["after"], Value::Null);
    let tomb = records
        .iter()
        .find(|r| r.value.is_none())
        .expect("a tombstone");
    assert_eq!(tomb.key, drec.key);
    assert_eq!(tomb.offset, drec.offset + 1);

    // Truncate: an event without key.
    let (trec, _) = &events[4];
    assert!(trec.key.is_none());

    // The slot is confirmed past what Kafka acknowledged; SIGTERM exits 0.
    let last_commit = lsn(&events[4].0.headers["pgferry.commit_lsn"]);
    wait_for(
        "the slot to confirm the truncate",
        Duration::from_secs(30),
        || (lsn(&db.confirmed_flush("s_kavro").unwrap()) > last_commit).then_some(()),
    );
    assert!(run.terminate().success(), "{}", run.stderr_text());
}

#[test]
fn schema_change_mid_stream_uses_a_new_version() {
    let db = TestDb::new("kddl");
    db.sql("create table p (id int primary key, name text)");
    let prefix = format!("t{}", db.name);
    let cfg = kafka_config(&db, "s_kddl", &brokers(), &prefix, "", &["public.p"]);
    let _run = run_source(&cfg);
    wait_streaming(&db, "s_kddl");
    db.sql("insert into p values (1, 'a')");
    db.sql("alter table p add column ward text");
    db.sql("insert into p values (2, 'b', 'icu')");
    let records = consume(&brokers(), &format!("{prefix}.public.p"), 2, T);
    // key v1 (unchanged by ADD COLUMN), value v1, value v2
    let schemas = schema_topic(&brokers(), &prefix, 3);
    let (fp1, v1) = decode_single_object(records[0].value.as_ref().unwrap(), &schemas);
    let (fp2, v2) = decode_single_object(records[1].value.as_ref().unwrap(), &schemas);
    assert_ne!(fp1, fp2, "a new schema version after ADD COLUMN");
    assert_eq!(to_json(&v1)["after"], json!({"id": 1, "name": "a"}));
    assert_eq!(
        to_json(&v2)["after"],
        json!({"id": 2, "name": "b", "ward": "icu"})
    );
}

#[test]
fn json_format_writes_the_debezium_envelope() {
    let db = TestDb::new("kjson");
    db.sql("create table p (id int primary key, name text)");
    let prefix = format!("t{}", db.name);
    let cfg = kafka_config(
        &db,
        "s_kjson",
        &brokers(),
        &prefix,
        "format = \"json\"\njson_schemas = false\ntombstones = false",
        &["public.p"],
    );
    let _run = run_source(&cfg);
    wait_streaming(&db, "s_kjson");
    db.sql("insert into p values (1, 'a'); delete from p;");
    let records = consume(&brokers(), &format!("{prefix}.public.p"), 2, T);
    let v: Value = serde_json::from_slice(records[0].value.as_ref().unwrap()).unwrap();
    assert_eq!(v["op"], "c");
    assert_eq!(v["after"], json!({"id": 1, "name": "a"}));
    assert_eq!(v["source"]["table"], "p");
    let k: Value = serde_json::from_slice(records[0].key.as_ref().unwrap()).unwrap();
    assert_eq!(k, json!({"id": 1}));
    let d: Value = serde_json::from_slice(records[1].value.as_ref().unwrap()).unwrap();
    assert_eq!(d["op"], "d");
    let more = consume_all(
        &brokers(),
        &format!("{prefix}.public.p"),
        2,
        T,
        Duration::from_secs(3),
    );
    assert_eq!(more.len(), 2, "no tombstone when disabled");
}

/// Per key, the counter values seen in order, and the commit LSN of each message.
fn per_key(events: &[(Record, Value)]) -> BTreeMap<i64, Vec<(i64, u64)>> {
    let mut m: BTreeMap<i64, Vec<(i64, u64)>> = BTreeMap::new();
    for (r, v) in events {
        let after = &v["after"];
        m.entry(after["id"].as_i64().unwrap()).or_default().push((
            after["counter"].as_i64().unwrap(),
            lsn(&r.headers["pgferry.commit_lsn"]),
        ));
    }
    m
}

#[test]
fn sigkill_mid_stream_loses_nothing_and_keeps_key_order() {
    let db = TestDb::new("kcrash");
    db.sql("create table c (id int primary key, counter int not null)");
    let prefix = format!("t{}", db.name);
    let cfg = kafka_config(
        &db,
        "s_kcrash",
        &brokers(),
        &prefix,
        "partitions = 3",
        &["public.c"],
    );
    let mut first = run_source(&cfg);
    wait_streaming(&db, "s_kcrash");
    let keys = 50;
    let rounds = 40;
    db.sql(&format!(
        "insert into c select g, 0 from generate_series(1, {keys}) g"
    ));
    let workload: String = (0..rounds)
        .map(|_| "update c set counter = counter + 1;\n")
        .collect();
    let topic = format!("{prefix}.public.c");
    let writer = {
        let url = db.url.clone();
        std::thread::spawn(move || sql(&url, &workload))
    };
    consume(&brokers(), &topic, 500, T);
    first.kill9();
    let confirmed = lsn(&db.confirmed_flush("s_kcrash").unwrap());
    writer.join().unwrap();
    let _second = run_source(&cfg);
    let total_changes = keys * (rounds + 1);
    let records = consume_all(
        &brokers(),
        &topic,
        total_changes as usize,
        T,
        Duration::from_secs(5),
    );
    let schemas = schema_topic(&brokers(), &prefix, 2);
    let events = envelope(&records, &schemas);
    let by_key = per_key(&events);
    assert_eq!(by_key.len(), keys as usize);
    let mut duplicates = 0;
    for (key, seen) in &by_key {
        // Every counter value 0..=rounds arrived.
        let distinct: std::collections::BTreeSet<i64> = seen.iter().map(|(c, _)| *c).collect();
        assert_eq!(distinct, (0..=rounds).collect(), "key {key} lost a change");
        // Per key, first occurrences come in order, and a repeat is a re-send of a
        // transaction that was not confirmed.
        let mut max = -1;
        let mut firsts = std::collections::BTreeSet::new();
        for (c, commit) in seen {
            if !firsts.insert(*c) {
                duplicates += 1;
                assert!(
                    *commit >= confirmed,
                    "key {key}: counter {c} was confirmed yet sent again"
                );
            } else {
                assert!(*c > max, "key {key}: counter {c} after {max}");
                max = *c;
            }
        }
    }
    eprintln!(
        "kafka kill -9: {} events, {duplicates} re-sent",
        events.len()
    );
}

/// A test database's topics are deleted when it is dropped (left behind, thousands of
/// them slowed the shared broker's restarts), and only its own: `…_1` is not `…_10`.
#[test]
fn a_test_databases_topics_are_deleted_with_it() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    assert!(topic_of("tpgft_x_1_1.public.p", "pgft_x_1_1"));
    assert!(topic_of("dpgft_x_1_1e2e._state", "pgft_x_1_1"));
    assert!(!topic_of("tpgft_x_1_10.public.p", "pgft_x_1_1"));

    let brokers = brokers();
    let db = TestDb::new("topics");
    let mine = format!("t{}.public.p", db.name);
    // Another database's name that continues this one's with a digit.
    let other = format!("t{}0.public.p", db.name);
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let topics = [&mine, &other].map(|t| NewTopic::new(t, 1, TopicReplication::Fixed(1)));
    for r in rt
        .block_on(admin.create_topics(&topics, &AdminOptions::new()))
        .unwrap()
    {
        r.unwrap();
    }
    let names = topic_names(&brokers, T).unwrap();
    assert!(names.contains(&mine) && names.contains(&other));

    drop(db);
    wait_for("the dropped database's topic to go", T, || {
        (!topic_names(&brokers, T).unwrap().contains(&mine)).then_some(())
    });
    assert!(
        topic_names(&brokers, T).unwrap().contains(&other),
        "a topic of another database was deleted"
    );
    delete_topics(&brokers, vec![other], T).unwrap();
}
