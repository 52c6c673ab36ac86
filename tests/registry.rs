//! Issue 9.4: registry mode against a real schema registry, Apicurio Registry 3 through
//! its Confluent-compatible API (`scripts/services.sh registry up`, started once per
//! test binary): Confluent framing and `<topic>-key`/`<topic>-value` subjects with the
//! registry's own ids, the whole pipeline through the sink across a schema change, and
//! a change the registry refuses (HTTP 409) stopping pgferry before the slot moves past
//! it. (The HTTPS + basic-auth registry tests stay on an in-test server in
//! tests/registry_tls.rs: the local registry speaks plain HTTP without auth.)
//!
//! The registry is shared and lives as long as its process: every test works on its own
//! topic prefix (the TestDb name), so subjects never collide, and reads only its own.

mod common;
mod kafka_support;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::*;
use kafka_support::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(90);
/// The registry `scripts/services.sh registry up` runs, Confluent-compatible API.
const REGISTRY_URL: &str = "http://127.0.0.1:8081/apis/ccompat/v7";
const SERVICES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/services.sh");

/// Start the registry once per test binary (`registry up` is idempotent: quick when it
/// runs already) and return its base URL. A failure fails every test with the script's
/// output: the registry tests never skip.
fn registry() -> &'static str {
    static UP: OnceLock<Result<(), String>> = OnceLock::new();
    let up = UP.get_or_init(|| {
        let started = Instant::now();
        let out = Command::new(SERVICES)
            .args(["registry", "up"])
            .output()
            .map_err(|e| format!("running {SERVICES} registry up: {e}"))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            return Err(format!(
                "`{SERVICES} registry up` failed ({}):\n{text}",
                out.status
            ));
        }
        eprintln!(
            "registry: `services.sh registry up` took {:.1?}\n{}",
            started.elapsed(),
            text.trim_end()
        );
        match http("GET", &format!("{REGISTRY_URL}/subjects"), None) {
            Ok((200, _)) => Ok(()),
            other => Err(format!(
                "`registry up` succeeded but GET {REGISTRY_URL}/subjects answered {other:?}; script output:\n{text}"
            )),
        }
    });
    if let Err(e) = up {
        panic!("the schema registry is not available: {e}");
    }
    REGISTRY_URL
}

/// One HTTP/1.1 request to `url` (`http://host:port/path`): (status, body).
fn http(method: &str, url: &str, body: Option<&str>) -> Result<(u16, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("not an http:// URL: {url}"))?;
    let (authority, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_string()), |(a, p)| (a, format!("/{p}")));
    let mut s = std::net::TcpStream::connect(authority)
        .map_err(|e| format!("{method} {url}: connecting: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\n\
         Content-Type: application/vnd.schemaregistry.v1+json\r\n\
         Accept: application/vnd.schemaregistry.v1+json, application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| format!("{method} {url}: sending: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .map_err(|e| format!("{method} {url}: reading: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("{method} {url}: not an HTTP answer: {text}"))?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((status, body))
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).expect("chunk size");
        if n == 0 {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

/// GET `<registry>/<path>` and parse the JSON answer, which must be a 200.
fn get_json(path: &str) -> Value {
    let url = format!("{}/{path}", registry());
    let (status, body) = http("GET", &url, None).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status, 200, "GET {url}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {url}: not JSON ({e}): {body}"))
}

/// The registry's subjects that belong to `topic` (others' tests share the registry).
fn subjects_of(topic: &str) -> Vec<String> {
    let mut subjects: Vec<String> = get_json("subjects")
        .as_array()
        .expect("a subject list")
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .filter(|s| s.starts_with(&format!("{topic}-")))
        .collect();
    subjects.sort();
    subjects
}

/// The version numbers of `subject`.
fn versions(subject: &str) -> Vec<u64> {
    get_json(&format!("subjects/{subject}/versions"))
        .as_array()
        .expect("a version list")
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect()
}

/// The schema id of `subject`'s `version`.
fn version_id(subject: &str, version: u64) -> u32 {
    let v = get_json(&format!("subjects/{subject}/versions/{version}"));
    assert_eq!(v["subject"], subject, "{v}");
    v["id"].as_u64().unwrap_or_else(|| panic!("no id: {v}")) as u32
}

/// `GET /schemas/ids/<id>` for every id, parsed.
fn schemas_by_id(ids: impl IntoIterator<Item = u32>) -> HashMap<u32, apache_avro::Schema> {
    ids.into_iter()
        .map(|id| {
            let text = get_json(&format!("schemas/ids/{id}"))["schema"]
                .as_str()
                .unwrap_or_else(|| panic!("schema id {id} has no schema"))
                .to_string();
            let schema = apache_avro::Schema::parse_str(&text)
                .unwrap_or_else(|e| panic!("schema id {id} is not Avro ({e}): {text}"));
            (id, schema)
        })
        .collect()
}

/// The id of a Confluent-framed key or value.
fn frame_id(bytes: &[u8]) -> u32 {
    assert!(
        bytes.len() > 5,
        "too short for Confluent framing: {bytes:?}"
    );
    assert_eq!(bytes[0], 0, "Confluent magic byte");
    u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]])
}

/// Set a subject's compatibility level.
fn set_compatibility(subject: &str, level: &str) {
    let url = format!("{}/config/{subject}", registry());
    let body = json!({ "compatibility": level }).to_string();
    let (status, reply) = http("PUT", &url, Some(&body)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status, 200, "PUT {url}: {reply}");
    let now = get_json(&format!("config/{subject}"));
    assert_eq!(now["compatibilityLevel"], level, "{now}");
}

/// Whether the broker has `topic` (asks for every topic's metadata, creating none).
fn topic_exists(topic: &str) -> bool {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("metadata client");
    let meta = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .expect("broker metadata");
    meta.topics().iter().any(|t| t.name() == topic)
}

/// Like `wait_streaming`, but fails at once with pgferry's stderr if it exits first.
fn streaming(db: &TestDb, tag: &str, p: &mut Pgferry) {
    let query = format!(
        "select count(*) from pg_stat_replication r join pg_replication_slots s on s.active_pid = r.pid \
         where s.slot_name = '{}'",
        db.slot(tag)
    );
    wait_for(
        &format!("slot {} to be streamed", db.slot(tag)),
        Duration::from_secs(180),
        || {
            if let Some(status) = p.child.try_wait().unwrap() {
                panic!(
                    "pgferry exited ({status}) before streaming:\n{}",
                    p.stderr_text()
                );
            }
            (db.value(&query).as_deref() == Some("1")).then_some(())
        },
    );
}

/// A `run --only source` config in registry mode.
fn source_config(db: &TestDb, slot: &str, prefix: &str, table: &str) -> std::path::PathBuf {
    db.config(
        &format!("{slot}.toml"),
        slot,
        &format!(
            "[kafka]\nbrokers = \"{}\"\ntopic_prefix = \"{prefix}\"\nschema_registry = \"{}\"\n\
             [[tables]]\nsource = \"{table}\"\n",
            brokers(),
            registry()
        ),
    )
}

#[test]
fn registry_mode_uses_confluent_framing_and_subjects() {
    let url = registry();
    let db = TestDb::new("rreg");
    db.sql("create table p (id int primary key, name text, born date)");
    let prefix = format!("t{}", db.name);
    let cfg = source_config(&db, "s_rreg", &prefix, "public.p");
    let mut run = run_source(&cfg);
    streaming(&db, "s_rreg", &mut run);
    db.sql("insert into p values (1, 'a', '2000-01-02'); update p set name = 'b';");
    let topic = format!("{prefix}.public.p");
    let records = consume(&brokers(), &topic, 2, T);

    // The subjects, one version each, and the ids the messages carry are theirs.
    let (key_subject, value_subject) = (format!("{topic}-key"), format!("{topic}-value"));
    assert_eq!(
        subjects_of(&topic),
        [key_subject.clone(), value_subject.clone()]
    );
    assert_eq!(versions(&key_subject), [1]);
    assert_eq!(versions(&value_subject), [1]);
    let key_id = version_id(&key_subject, 1);
    let value_id = version_id(&value_subject, 1);
    assert_ne!(key_id, value_id);
    for r in &records {
        assert_eq!(frame_id(r.key.as_ref().unwrap()), key_id);
        assert_eq!(frame_id(r.value.as_ref().unwrap()), value_id);
    }

    // The registry serves the schemas by id; the messages decode with them.
    let schemas = schemas_by_id([key_id, value_id]);
    assert!(
        matches!(&schemas[&value_id], apache_avro::Schema::Record(r) if r.fields.iter().any(|f| f.name == "after")),
        "the value schema is the envelope: {:?}",
        schemas[&value_id]
    );
    let (_, key) = decode_confluent(records[0].key.as_ref().unwrap(), &schemas);
    assert_eq!(to_json(&key), json!({"id": 1}));
    let (_, insert) = decode_confluent(records[0].value.as_ref().unwrap(), &schemas);
    let insert = to_json(&insert);
    assert_eq!(insert["op"], "c");
    assert_eq!(insert["before"], Value::Null);
    assert_eq!(
        insert["after"],
        json!({"id": 1, "name": "a", "born": 10_958})
    );
    assert_eq!(insert["source"]["table"], "p");
    let (_, update) = decode_confluent(records[1].value.as_ref().unwrap(), &schemas);
    let update = to_json(&update);
    assert_eq!(update["op"], "u");
    assert_eq!(
        update["after"],
        json!({"id": 1, "name": "b", "born": 10_958})
    );

    // Registry mode publishes no schema topic.
    assert!(
        !topic_exists(&format!("{prefix}._schemas")),
        "registry {url}: no schema topic expected"
    );
    assert!(run.terminate().success(), "{}", run.stderr_text());
}

/// Repeat `pgferry verify` until it exits 0 (fails with its output and pgferry's stderr).
fn wait_equal(config: &std::path::Path, p: &Pgferry) {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let (code, out, err) = common::run(&["verify", "--config", config.to_str().unwrap()]);
        if code == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "verify never became equal (exit {code}):\n{out}{err}\npgferry stderr:\n{}",
            p.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn end_to_end_through_the_registry_with_a_schema_change() {
    let url = registry();
    let src = TestDb::new("rpipe");
    let tgt = TestDb::on(&service_env("PGFERRY_TARGET_URL"), "rpipe_t");
    src.sql("create table p (id int primary key, name text not null, born date)");
    let prefix = format!("t{}", src.name);
    let cfg = src.config(
        "s_rpipe.toml",
        "s_rpipe",
        &format!(
            "[kafka]\nbrokers = \"{}\"\ntopic_prefix = \"{prefix}\"\nschema_registry = \"{url}\"\n\
             [sink]\nurl = \"{}\"\nconsumer = \"test\"\nbatch_linger = \"20ms\"\ncreate_tables = true\n\
             [[tables]]\nsource = \"public.p\"\n",
            brokers(),
            tgt.url
        ),
    );
    let mut p = Pgferry::spawn(
        &["run", "--config", cfg.to_str().unwrap()],
        cfg.with_extension("run.stderr"),
    );
    streaming(&src, "s_rpipe", &mut p);
    src.sql(
        "insert into p select g, 'patient ' || g, date '2000-01-01' + g from generate_series(1, 100) g;
         update p set name = name || ' (seen)' where id % 3 = 0;
         delete from p where id % 10 = 0;",
    );
    wait_equal(&cfg, &p);

    // A column added mid-stream: a second value version, used from then on.
    src.sql(
        "alter table p add column ward text;
         update p set ward = 'ward ' || (id % 4) where id % 2 = 0;
         insert into p values (500, 'late', '2020-02-29', 'icu');",
    );
    wait_equal(&cfg, &p);
    let (code, out, err) = common::run(&["verify", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");

    let canonical = "set DateStyle = ISO; select id, name, born, ward from p order by id";
    let source = src.sql(canonical);
    assert_eq!(source.len(), 91);
    assert_eq!(source, tgt.sql(canonical), "target rows equal the source's");
    assert_eq!(
        tgt.value("select count(*) from p where ward is not null")
            .as_deref(),
        Some("41")
    );

    let topic = format!("{prefix}.public.p");
    let (key_subject, value_subject) = (format!("{topic}-key"), format!("{topic}-value"));
    assert_eq!(
        subjects_of(&topic),
        [key_subject.clone(), value_subject.clone()]
    );
    assert_eq!(versions(&key_subject), [1], "ADD COLUMN keeps the key");
    assert_eq!(versions(&value_subject), [1, 2], "a second value version");
    let key_id = version_id(&key_subject, 1);
    let (v1, v2) = (version_id(&value_subject, 1), version_id(&value_subject, 2));
    assert_ne!(v1, v2);

    // 100 inserts, 33 updates, 10 deletes + 10 tombstones; then 40 updates, 1 insert.
    let records = consume(&brokers(), &topic, 194, T);
    let schemas = schemas_by_id([key_id, v1, v2]);
    let ids: Vec<u32> = records
        .iter()
        .filter_map(|r| r.value.as_deref().map(frame_id))
        .collect();
    let first_v2 = ids.iter().position(|id| *id == v2).expect("v2 is used");
    assert_eq!(first_v2, 143, "v1 until the ALTER: {ids:?}");
    assert!(ids[..first_v2].iter().all(|id| *id == v1), "{ids:?}");
    assert!(ids[first_v2..].iter().all(|id| *id == v2), "{ids:?}");
    let last = records.last().unwrap();
    assert_eq!(frame_id(last.key.as_ref().unwrap()), key_id);
    let (_, v) = decode_confluent(last.value.as_ref().unwrap(), &schemas);
    assert_eq!(
        to_json(&v)["after"],
        json!({"id": 500, "name": "late", "born": 18_321, "ward": "icu"})
    );
}

/// Once pgferry has stopped on the refused insert: the slot's confirmed_flush_lsn and
/// the LSN where that insert's transaction commits, read by peeking the slot (which
/// decodes from confirmed_flush_lsn on, as a restart does). Fails unless the insert is
/// still there and the slot is confirmed short of its commit.
fn refused_change_kept(db: &TestDb, tag: &str) -> (String, String) {
    let slot = db.slot(tag);
    wait_for(
        &format!("slot {slot} to be released"),
        Duration::from_secs(30),
        || {
            (db.value(&format!(
                "select active::text from pg_replication_slots where slot_name = '{slot}'"
            ))
            .as_deref()
                == Some("false"))
            .then_some(())
        },
    );
    let confirmed = db.confirmed_flush(tag).unwrap();
    // pgoutput messages: their first byte is the type (B, R, I, C...). The refused
    // insert is the last change of the database.
    let rows = db.sql(&format!(
        "select lsn::text, chr(get_byte(data, 0)) from pg_logical_slot_peek_binary_changes(\
         '{slot}', null, null, 'proto_version', '1', 'publication_names', '{slot}')"
    ));
    let kinds: Vec<(String, String)> = rows
        .into_iter()
        .map(|r| (r[0].clone().unwrap(), r[1].clone().unwrap()))
        .collect();
    let insert = kinds
        .iter()
        .rposition(|(_, k)| k == "I")
        .unwrap_or_else(|| {
            panic!("the slot (confirmed {confirmed}) no longer holds the refused insert: {kinds:?}")
        });
    let commit = kinds[insert..]
        .iter()
        .find(|(_, k)| k == "C")
        .map(|(l, _)| l.clone())
        .unwrap_or_else(|| panic!("no commit after the insert: {kinds:?}"));
    assert!(
        lsn(&confirmed) < lsn(&commit),
        "confirmed_flush_lsn {confirmed} is past the refused transaction's commit {commit}"
    );
    (confirmed, commit)
}

#[test]
fn an_incompatible_change_refused_by_the_registry_stops_before_the_slot_moves() {
    let url = registry();
    let db = TestDb::new("rcompat");
    db.sql("create table p (id int primary key, v int)");
    let prefix = format!("t{}", db.name);
    let cfg = source_config(&db, "s_rcompat", &prefix, "public.p");
    let spawn = |n: u32| {
        Pgferry::spawn(
            &["run", "--only", "source", "--config", cfg.to_str().unwrap()],
            cfg.with_extension(format!("run{n}.stderr")),
        )
    };
    let stops = |p: &mut Pgferry| -> String {
        let status = wait_for("pgferry to stop", T, || p.child.try_wait().unwrap());
        let stderr = p.stderr_text();
        assert!(!status.success(), "exit {status}: {stderr}");
        assert!(
            stderr.contains(&format!("schema registry {url}")) && stderr.contains("HTTP 409"),
            "the message names the registry and HTTP 409: {stderr}"
        );
        stderr
    };
    let mut run = spawn(1);
    streaming(&db, "s_rcompat", &mut run);
    db.sql("insert into p values (1, 1)");
    let topic = format!("{prefix}.public.p");
    consume(&brokers(), &topic, 1, T);
    let value_subject = format!("{topic}-value");
    assert_eq!(versions(&value_subject), [1]);
    set_compatibility(&value_subject, "BACKWARD");

    // int -> text: the new reader schema cannot read the old int data.
    let before_alter = db.value("select pg_current_wal_lsn()::text").unwrap();
    db.sql("alter table p alter column v type text");
    let before_change = db.value("select pg_current_wal_lsn()::text").unwrap();
    db.sql("insert into p values (2, 'two')");
    let stderr = stops(&mut run);
    assert!(stderr.contains(&value_subject), "{stderr}");
    // The slot is not confirmed past the refused transaction. (Idle keepalives may move
    // it past `before_change`, over other databases' WAL, but not past that commit.)
    let (confirmed, commit) = refused_change_kept(&db, "s_rcompat");
    eprintln!(
        "registry 409: ALTER at {before_alter}, insert after {before_change}, its commit ends at \
         {commit}; confirmed_flush_lsn {confirmed}"
    );
    assert!(lsn(&commit) > lsn(&before_change));
    assert_eq!(
        versions(&value_subject),
        [1],
        "the registry kept one version"
    );
    let records = consume_all(&brokers(), &topic, 1, T, Duration::from_secs(3));
    assert_eq!(records.len(), 1, "nothing after the refused change");

    // The change was kept: a restart meets it again...
    let mut again = spawn(2);
    stops(&mut again);
    assert_eq!(refused_change_kept(&db, "s_rcompat").1, commit);

    // ...and delivers it once the subject accepts it.
    set_compatibility(&value_subject, "NONE");
    let mut last = spawn(3);
    let records = consume(&brokers(), &topic, 2, T);
    assert_eq!(versions(&value_subject), [1, 2]);
    let v2 = version_id(&value_subject, 2);
    assert_eq!(frame_id(records[1].value.as_ref().unwrap()), v2);
    let key_id = frame_id(records[1].key.as_ref().unwrap());
    let schemas = schemas_by_id([key_id, v2]);
    let (_, v) = decode_confluent(records[1].value.as_ref().unwrap(), &schemas);
    assert_eq!(to_json(&v)["after"], json!({"id": 2, "v": "two"}));
    assert!(last.terminate().success(), "{}", last.stderr_text());
}
