//! Issue 12.1: PHI column transforms in the source stage. The plaintext of a
//! transformed column never reaches Kafka (every byte of every message on every topic
//! is scanned for it), the target holds exactly the HMAC that PostgreSQL's pgcrypto
//! computes independently, `tail` shows the same, a transformed key column still gets
//! its updates and deletes on the right row, and configuration mistakes are refused
//! before anything streams.

mod common;
mod kafka_support;

use std::time::Duration;

use common::*;
use kafka_support::*;

const T: Duration = Duration::from_secs(120);
const KEY: &str = "a-test-key-of-at-least-sixteen-bytes";

const TABLE: &str = "create table patients (
    mrn text primary key, name text, phone text, dob date, seen timestamptz, ward text
)";

fn transforms() -> &'static str {
    "[tables.transform]\nmrn = \"hmac\"\nname = \"redact\"\nphone = \"null\"\ndob = \"year\"\nseen = \"year\"\n"
}

/// Every byte of every message (keys, values, headers) of the topics with `prefix`.
fn all_bytes(prefix: &str) -> Vec<u8> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", "phi-scan")
        .create()
        .unwrap();
    let meta = c.fetch_metadata(None, Duration::from_secs(10)).unwrap();
    let topics: Vec<String> = meta
        .topics()
        .iter()
        .map(|t| t.name().to_string())
        .filter(|n| n.starts_with(prefix))
        .collect();
    assert!(
        topics.len() >= 3,
        "table, _schemas and _state topics: {topics:?}"
    );
    let mut out = Vec::new();
    for topic in topics {
        for r in consume_all(&brokers(), &topic, 1, T, Duration::from_secs(3)) {
            out.extend(r.key.unwrap_or_default());
            out.extend(r.value.unwrap_or_default());
            for (k, v) in r.headers {
                out.extend(k.into_bytes());
                out.extend(v.into_bytes());
            }
        }
    }
    out
}

#[test]
fn transformed_columns_never_reach_kafka_in_plaintext_and_the_target_holds_the_hmac() {
    let src = TestDb::new("phi");
    let tgt = TestDb::on(&service_env("PGFERRY_TARGET_URL"), "phi_t");
    src.sql(TABLE);
    tgt.sql(&format!("create extension if not exists pgcrypto; {TABLE}"));
    let prefix = format!("t{}", src.name);
    let cfg = src.config(
        "p.toml",
        "s",
        &format!(
            "[phi]\nkey = \"{KEY}\"\n[kafka]\nbrokers = \"{}\"\ntopic_prefix = \"{prefix}\"\n\
             [sink]\nurl = \"{}\"\nconsumer = \"phi\"\nbatch_linger = \"20ms\"\n\
             [[tables]]\nsource = \"public.patients\"\n{}",
            brokers(),
            tgt.url,
            transforms()
        ),
    );
    let mut p = Pgferry::spawn(
        &["run", "--config", cfg.to_str().unwrap()],
        src.dir.join("run.stderr"),
    );
    wait_streaming(&src, "s");
    src.sql(
        "insert into patients values
           ('MRN-PLAIN-0001', 'Ada Plaintext-Lovelace', '+1-555-PLAIN-01', '1815-12-10', '2026-11-22 10:11:12+00', 'w1'),
           ('MRN-PLAIN-0002', 'Grace Plaintext-Hopper', '+1-555-PLAIN-02', '1906-12-09', '2026-11-23 10:11:12+00', 'w2'),
           ('MRN-PLAIN-0003', 'Alan Plaintext-Turing', '+1-555-PLAIN-03', '1912-06-23', '2026-11-24 10:11:12+00', 'w3');
         update patients set ward = 'icu' where mrn = 'MRN-PLAIN-0001';
         update patients set mrn = 'MRN-PLAIN-0004' where mrn = 'MRN-PLAIN-0002';
         delete from patients where mrn = 'MRN-PLAIN-0003';",
    );
    // Exactly pgcrypto's HMAC of the source text (computed in the target, which has
    // pgcrypto), and the other transforms.
    let want = tgt.value(&format!(
        "select string_agg(h || '|REDACTED|null|' || y || '|' || s || '|' || w, ';' order by h)
           from (values
             (encode(hmac('MRN-PLAIN-0001', '{KEY}', 'sha256'), 'hex'), '1815-01-01', '2026-01-01 00:00:00+00', 'icu'),
             (encode(hmac('MRN-PLAIN-0004', '{KEY}', 'sha256'), 'hex'), '1906-01-01', '2026-01-01 00:00:00+00', 'w2'))
           as v(h, y, s, w)"
    ));
    wait_for("the transformed rows in the target", T, || {
        let got = tgt.value(
            "select string_agg(mrn || '|' || name || '|' || coalesce(phone, 'null') || '|' || dob || '|' ||
                               (seen at time zone 'UTC')::date || ' 00:00:00+00' || '|' || ward, ';' order by mrn)
               from patients",
        );
        (got.is_some() && got == want).then_some(())
    });
    assert!(p.terminate().success(), "{}", p.stderr_text());

    // `verify` compares the transformed source with the target: equal now, and a
    // value changed by hand in a transformed column is found. Its output holds no
    // plaintext either.
    let verify = || {
        let (code, out, err) = run(&["verify", "--config", cfg.to_str().unwrap()]);
        assert!(
            !out.contains("PLAIN") && !err.contains("PLAIN"),
            "{out}{err}"
        );
        (code, out)
    };
    let (code, out) = verify();
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("equal"), "{out}");
    tgt.sql("update patients set name = 'Ada Plaintext-Lovelace' where ward = 'icu'");
    let (code, out) = verify();
    assert_eq!(code, 1, "a plaintext name where REDACTED belongs: {out}");
    assert!(out.contains("DIFFERENT: checksums differ"), "{out}");
    tgt.sql("update patients set name = 'REDACTED' where ward = 'icu'");
    assert_eq!(verify().0, 0);

    let bytes = all_bytes(&prefix);
    for plain in [
        "MRN-PLAIN",
        "Plaintext",
        "PLAIN-0",
        "555-PLAIN",
        "1815-12-10",
        "1906-12-09",
        "2026-11-22",
    ] {
        assert!(
            !bytes.windows(plain.len()).any(|w| w == plain.as_bytes()),
            "{plain:?} reached Kafka"
        );
    }
    assert!(
        !p.stderr_text().contains("PLAIN"),
        "no plaintext in the log"
    );
    // The schema says what was done.
    let schemas = String::from_utf8_lossy(&bytes).into_owned();
    assert!(
        schemas.contains("\"pgferry.transform\":\"hmac\""),
        "{schemas}"
    );
}

#[test]
fn tail_shows_the_transformed_values() {
    let db = TestDb::new("phitail");
    db.sql(TABLE);
    let cfg = db.config(
        "t.toml",
        "s",
        &format!(
            "[phi]\nkey = \"{KEY}\"\n[[tables]]\nsource = \"public.patients\"\n{}",
            transforms()
        ),
    );
    let mut tail = Pgferry::tail(&cfg, &[]);
    wait_streaming(&db, "s");
    db.sql("insert into patients values ('MRN-9', 'Name', '555', '2001-07-04', '2026-11-22 10:11:12+00', 'w')");
    let l = tail.json(1, T);
    let after = &l[0]["after"];
    assert_eq!(after["mrn"].as_str().unwrap().len(), 64, "{after}");
    assert_eq!(
        l[0]["key"]["mrn"], after["mrn"],
        "the transformed key is the key"
    );
    assert_eq!(after["name"], "REDACTED");
    assert_eq!(after["phone"], serde_json::Value::Null);
    assert_eq!(after["dob"], "2001-01-01");
    assert_eq!(after["seen"], "2026-01-01 00:00:00+00");
}

#[test]
fn transform_mistakes_are_refused_before_streaming() {
    let db = TestDb::new("phibad");
    db.sql(&format!(
        "{TABLE}; create table other (id int primary key, n int)"
    ));
    // hmac without a key: a config error, never a default key.
    let no_key = db.config(
        "nokey.toml",
        "s",
        &format!("[[tables]]\nsource = \"public.patients\"\n{}", transforms()),
    );
    let (code, _, err) = run(&["tail", "--config", no_key.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("[phi] key"), "{err}");
    // A column that does not exist, and a type a transform cannot apply to.
    for (file, table, transform, says) in [
        (
            "missing.toml",
            "public.patients",
            "nosuch = \"redact\"",
            "no column \"nosuch\"",
        ),
        (
            "redactint.toml",
            "public.other",
            "n = \"redact\"",
            "cannot apply to column n",
        ),
        (
            "yeartext.toml",
            "public.patients",
            "ward = \"year\"",
            "cannot apply to column ward",
        ),
    ] {
        let cfg = db.config(
            file,
            "s",
            &format!("[[tables]]\nsource = \"{table}\"\n[tables.transform]\n{transform}\n"),
        );
        let (code, _, err) = run(&["tail", "--config", cfg.to_str().unwrap()]);
        assert_eq!(code, 2, "{file}: {err}");
        assert!(err.contains(says), "{file}: {err}");
        let (code, out, _) = run(&["check", "--config", cfg.to_str().unwrap()]);
        assert_eq!(code, 1, "{file}: check: {out}");
        assert!(out.contains(says), "{file}: check: {out}");
    }
}

/// Issue 12 "transforms in every path": the initial snapshot, the stream and an
/// on-demand (incremental) snapshot give the same transformed values for the same row,
/// and none of them carries the plaintext.
#[test]
fn snapshots_and_the_stream_transform_a_row_identically() {
    let src = TestDb::new("phisnap");
    let tgt = TestDb::on(&service_env("PGFERRY_TARGET_URL"), "phisnap_t");
    src.sql(TABLE);
    src.sql(
        "insert into patients values
           ('MRN-PLAIN-0001', 'Ada Plaintext-Lovelace', '+1-555-PLAIN-01', '1815-12-10', '2026-11-22 10:11:12+00', 'w1'),
           ('MRN-PLAIN-0002', 'Grace Plaintext-Hopper', '+1-555-PLAIN-02', '1906-12-09', '2026-11-23 10:11:12+00', 'w2')",
    );
    tgt.sql(TABLE);
    let prefix = format!("t{}", src.name);
    let cfg = src.config(
        "p.toml",
        "s",
        &format!(
            "[phi]\nkey = \"{KEY}\"\n[kafka]\nbrokers = \"{}\"\ntopic_prefix = \"{prefix}\"\nformat = \"json\"\njson_schemas = false\n\
             [sink]\nurl = \"{}\"\nconsumer = \"phi\"\nbatch_linger = \"20ms\"\n\
             [[tables]]\nsource = \"public.patients\"\n{}",
            brokers(),
            tgt.url,
            transforms()
        ),
    );
    let mut p = Pgferry::spawn(
        &["run", "--config", cfg.to_str().unwrap()],
        src.dir.join("run.stderr"),
    );
    wait_streaming(&src, "s");
    // The same rows through the stream: an update that changes nothing transformed.
    src.sql("update patients set ward = ward");
    let (code, out, err) = run(&[
        "snapshot",
        "--config",
        cfg.to_str().unwrap(),
        "--table",
        "public.patients",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let topic = format!("{prefix}.public.patients");
    // 2 initial rows, 2 updates, 2 incremental rows.
    let events: Vec<serde_json::Value> =
        consume_all(&brokers(), &topic, 6, T, Duration::from_secs(3))
            .into_iter()
            .filter_map(|r| r.value)
            .map(|v| serde_json::from_slice(&v).unwrap())
            .collect();
    assert!(p.terminate().success(), "{}", p.stderr_text());
    let mut by_key: std::collections::BTreeMap<String, Vec<(String, String, serde_json::Value)>> =
        Default::default();
    for e in &events {
        let after = e["after"].clone();
        let key = after["mrn"].as_str().unwrap().to_string();
        by_key.entry(key).or_default().push((
            e["op"].as_str().unwrap().to_string(),
            e["source"]["snapshot"].as_str().unwrap().to_string(),
            after,
        ));
    }
    assert_eq!(by_key.len(), 2, "{events:?}");
    for (key, seen) in &by_key {
        assert_eq!(key.len(), 64, "the key is the HMAC: {key}");
        let paths: Vec<(&str, &str)> = seen
            .iter()
            .map(|(o, s, _)| (o.as_str(), s.as_str()))
            .collect();
        assert!(
            paths.iter().any(|(o, s)| *o == "r" && *s != "incremental"),
            "initial snapshot: {paths:?}"
        );
        assert!(paths.contains(&("u", "false")), "stream: {paths:?}");
        assert!(
            paths.contains(&("r", "incremental")),
            "incremental snapshot: {paths:?}"
        );
        for (_, _, after) in seen {
            assert_eq!(
                after, &seen[0].2,
                "row {key}: every path gives the same values"
            );
        }
        assert_eq!(seen[0].2["name"], "REDACTED");
        assert!(seen[0].2["phone"].is_null());
    }
    let text = events.iter().map(|e| e.to_string()).collect::<String>();
    assert!(!text.contains("PLAIN"), "no plaintext on the topic");
}
