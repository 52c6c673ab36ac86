//! `pgferry tail` against a real PostgreSQL with wal_level=logical: commit order,
//! before/after images, unchanged TOAST, every type of DESIGN's table, crash and
//! reconnect without loss, an idle publication that still confirms, bounded memory.

#![recursion_limit = "256"]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(60);

fn tables(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("[[tables]]\nsource = \"{n}\"\n"))
        .collect()
}

#[test]
fn commit_order_and_images_for_default_and_full_identity() {
    let db = TestDb::new("order");
    db.sql(
        "create table a (id int primary key, v text);
         create table b (id int primary key, v text, w int);
         alter table b replica identity full;",
    );
    let port = free_port();
    let cfg = db.config(
        "p.toml",
        "s_order",
        &format!("{}\n", tables(&["public.a", "public.b"])).replace("[http]", ""),
    );
    // Serve metrics on a port of our own.
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("listen = \"\"", &format!("listen = \"127.0.0.1:{port}\""));
    std::fs::write(&cfg, text).unwrap();
    let mut tail = Pgferry::tail(&cfg, &[]);
    wait_streaming(&db, "s_order");
    db.sql(
        "begin;
         insert into a values (1, 'x');
         insert into b values (1, 'y', 1);
         update a set v = 'x2' where id = 1;
         update b set w = 2 where id = 1;
         update a set id = 2 where id = 1;
         delete from b where id = 1;
         delete from a where id = 2;
         commit;
         truncate a, b;",
    );
    let l = tail.json(9, T);
    let ops: Vec<(&str, &str)> = l
        .iter()
        .map(|v| (v["op"].as_str().unwrap(), v["table"].as_str().unwrap()))
        .collect();
    assert_eq!(
        ops,
        [
            ("c", "a"),
            ("c", "b"),
            ("u", "a"),
            ("u", "b"),
            ("u", "a"),
            ("d", "b"),
            ("d", "a"),
            ("t", "a"),
            ("t", "b")
        ]
    );
    for (i, v) in l[..7].iter().enumerate() {
        assert_eq!(
            v["ordinal"],
            json!(i),
            "ordinals count changes inside the transaction"
        );
        assert_eq!(v["commit_lsn"], l[0]["commit_lsn"]);
        assert_eq!(v["xid"], l[0]["xid"]);
        assert_eq!(v["schema"], "public");
    }
    assert!(lsn(l[7]["commit_lsn"].as_str().unwrap()) > lsn(l[0]["commit_lsn"].as_str().unwrap()));
    // inserts
    assert_eq!(l[0]["before"], Value::Null);
    assert_eq!(l[0]["after"], json!({"id": 1, "v": "x"}));
    assert_eq!(l[0]["key"], json!({"id": 1}));
    // DEFAULT identity, key unchanged: no before image
    assert_eq!(l[2]["before"], Value::Null);
    assert_eq!(l[2]["after"], json!({"id": 1, "v": "x2"}));
    // FULL identity: the whole old row
    assert_eq!(l[3]["before"], json!({"id": 1, "v": "y", "w": 1}));
    assert_eq!(l[3]["after"], json!({"id": 1, "v": "y", "w": 2}));
    // DEFAULT identity, key changed: the old key only
    assert_eq!(l[4]["before"], json!({"id": 1}));
    assert_eq!(l[4]["after"], json!({"id": 2, "v": "x2"}));
    assert_eq!(l[4]["key"], json!({"id": 2}));
    // deletes
    assert_eq!(l[5]["before"], json!({"id": 1, "v": "y", "w": 2}));
    assert_eq!(l[5]["after"], Value::Null);
    assert_eq!(l[6]["before"], json!({"id": 2}));
    assert_eq!(l[6]["key"], json!({"id": 2}));
    // truncates
    assert_eq!(
        (l[7]["before"].clone(), l[7]["after"].clone()),
        (Value::Null, Value::Null)
    );
    for v in &l {
        assert_eq!(v["unchanged"], json!([]));
        assert!(v["commit_ts"].as_str().unwrap().ends_with('Z'));
    }

    // Metrics and health.
    let (code, body) = http_get(port, "/metrics");
    assert_eq!(code, 200);
    for needle in [
        "pgferry_source_changes_total{op=\"c\",table=\"public.a\"} 1",
        "pgferry_source_changes_total{op=\"u\",table=\"public.a\"} 2",
        "pgferry_source_changes_total{op=\"d\",table=\"public.b\"} 1",
        "pgferry_source_changes_total{op=\"t\",table=\"public.b\"} 1",
        "pgferry_source_confirmed_lsn ",
        "pgferry_source_slot_lag_bytes ",
        "process_resident_memory_bytes ",
    ] {
        assert!(body.contains(needle), "/metrics lacks {needle:?}:\n{body}");
    }
    assert_eq!(http_get(port, "/healthz").0, 200);
    assert_eq!(http_get(port, "/readyz").0, 200);

    // Graceful stop confirms everything that was printed.
    let status = tail.terminate();
    assert!(
        status.success(),
        "SIGTERM should exit 0: {status:?}\n{}",
        tail.stderr_text()
    );
    let confirmed = lsn(&db.confirmed_flush("s_order").unwrap());
    assert!(
        confirmed > lsn(l[8]["commit_lsn"].as_str().unwrap()),
        "the truncate's commit is confirmed"
    );
}

/// About 20 kB of incompressible text, stored out of line.
const BIG: &str =
    "(select string_agg(md5(g::text || random()::text), '') from generate_series(1, 640) g)";

#[test]
fn unchanged_toast_columns_are_listed_never_null() {
    let db = TestDb::new("toast");
    db.sql(
        "create table doc (id int primary key, counter int not null, scan text);
         alter table doc alter column scan set storage external;
         create table doc_full (id int primary key, counter int not null, scan text);
         alter table doc_full alter column scan set storage external;
         alter table doc_full replica identity full;",
    );
    let cfg = db.config(
        "p.toml",
        "s_toast",
        &tables(&["public.doc", "public.doc_full"]),
    );
    let mut tail = Pgferry::tail(&cfg, &[]);
    wait_streaming(&db, "s_toast");
    db.sql(&format!(
        "insert into doc values (1, 0, {BIG});
         insert into doc_full values (1, 0, {BIG});
         update doc set counter = counter + 1;
         update doc_full set counter = counter + 1;"
    ));
    let l = tail.json(4, T);
    let scan = l[0]["after"]["scan"].as_str().unwrap().to_string();
    assert!(
        scan.len() > 8000,
        "the value is TOASTed ({} bytes)",
        scan.len()
    );
    // DEFAULT identity: the server does not send the value; we list it.
    assert_eq!(l[2]["op"], "u");
    assert_eq!(l[2]["unchanged"], json!(["scan"]));
    assert_eq!(
        l[2]["after"],
        json!({"id": 1, "counter": 1}),
        "never null, never a placeholder"
    );
    // FULL identity: the old row has it, so the after image is complete.
    let full_scan = l[1]["after"]["scan"].as_str().unwrap();
    assert_eq!(l[3]["unchanged"], json!([]));
    assert_eq!(l[3]["after"]["scan"].as_str().unwrap(), full_scan);
    assert_eq!(l[3]["after"]["counter"], 1);
}

#[test]
fn every_type_is_printed_faithfully() {
    let db = TestDb::new("types");
    db.sql(
        "create extension if not exists citext;
         create type mood as enum ('calm', 'tense');
         create domain posint as int check (value > 0);
         create table types (
           id int primary key, b bool, i2 int2, i4 int4, i8 int8, o oid, f4 float4, f8 float8, f8z float8,
           n numeric(12,4), nn numeric, nbig numeric, ninf numeric, m money,
           t text, vc varchar(10), bp char(3), ci citext, nm name, ip inet, cidr cidr, mac macaddr,
           e mood, r int4range, x xml, iv interval, u uuid, j json, jb jsonb,
           d date, dinf date, tm time, ts timestamp, tsinf timestamp, tz timestamptz, ttz timetz,
           by bytea, ai int[], at text[], dm posint
         );",
    );
    let cfg = db.config("p.toml", "s_types", &tables(&["public.types"]));
    let mut tail = Pgferry::tail(&cfg, &[]);
    wait_streaming(&db, "s_types");
    db.sql(
        r#"insert into types values (
           1, true, -32768, 2147483647, 9223372036854775807, 4294967295, 'NaN', '-Infinity', '-0',
           12345678.1234, 'NaN', '0.000000000000000000000000000001234567890123456789012345678901234567890',
           'Infinity', 1234.56,
           'unicode: Émilie 🩺 "quoted" \ back', 'short', 'ab', 'MiXeD', 'nm', '192.168.0.1/24', '10.0.0.0/8', '08:00:2b:01:02:03',
           'calm', '[1,5)', '<a>1</a>', '1 year 2 mons 3 days 04:05:06.5', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
           '{"b": 1,  "a": [1, 2]}', '{"b": 1, "a": [1, 2]}',
           '2026-11-22', 'infinity', '04:05:06.789', '2026-11-22 01:02:03.123456', '-infinity',
           '2026-11-22 01:02:03.123456+02', '04:05:06+02',
           '\x00ff00', '{1,NULL,3}', '{{"a b",NULL},{"NULL","x"}}', 5);
         insert into types (id) values (2);"#,
    );
    let raw = tail.lines(2, T);
    let l: Vec<Value> = raw
        .iter()
        .map(|r| serde_json::from_str(r).unwrap())
        .collect();
    let a = &l[0]["after"];
    let expected = json!({
        "id": 1, "b": true, "i2": -32768, "i4": 2147483647, "i8": 9223372036854775807_i64, "o": 4294967295_u64,
        "f4": "NaN", "f8": "-Infinity", "f8z": "-0",
        "n": "12345678.1234", "nn": "NaN",
        "nbig": "0.000000000000000000000000000001234567890123456789012345678901234567890",
        "ninf": "Infinity", "m": "$1,234.56",
        "t": "unicode: Émilie 🩺 \"quoted\" \\ back", "vc": "short", "bp": "ab ", "ci": "MiXeD", "nm": "nm",
        "ip": "192.168.0.1/24", "cidr": "10.0.0.0/8", "mac": "08:00:2b:01:02:03",
        "e": "calm", "r": "[1,5)", "x": "<a>1</a>", "iv": "P1Y2M3DT4H5M6.5S",
        "u": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        "j": {"b": 1, "a": [1, 2]}, "jb": {"a": [1, 2], "b": 1},
        "d": "2026-11-22", "dinf": "infinity", "tm": "04:05:06.789", "ts": "2026-11-22 01:02:03.123456",
        "tsinf": "-infinity", "tz": "2026-11-21 23:02:03.123456+00", "ttz": "04:05:06+02",
        "by": "\\x00ff00", "ai": [1, null, 3], "at": [["a b", null], ["NULL", "x"]], "dm": 5
    });
    let (got, want) = (a.as_object().unwrap(), expected.as_object().unwrap());
    for (k, v) in want {
        assert_eq!(got.get(k), Some(v), "column {k}");
    }
    assert_eq!(got.len(), want.len(), "no extra columns: {a}");
    // json keeps its text exactly (whitespace and key order included).
    assert!(
        raw[0].contains(r#""j":{"b": 1,  "a": [1, 2]}"#),
        "{}",
        raw[0]
    );
    let nulls = l[1]["after"].as_object().unwrap();
    assert_eq!(nulls.len(), want.len());
    assert!(
        nulls
            .iter()
            .filter(|(k, _)| *k != "id")
            .all(|(_, v)| v.is_null()),
        "{nulls:?}"
    );
}

fn ids_with_commits(lines: &[Value]) -> Vec<(i64, u64)> {
    lines
        .iter()
        .map(|v| {
            (
                v["after"]["id"].as_i64().unwrap(),
                lsn(v["commit_lsn"].as_str().unwrap()),
            )
        })
        .collect()
}

#[test]
fn sigkill_mid_stream_loses_nothing_and_repeats_only_unconfirmed() {
    let db = TestDb::new("kill");
    db.sql("create table seq (id int primary key, pad text)");
    let cfg = db.config("p.toml", "s_kill", &tables(&["public.seq"]));
    let mut first = Pgferry::tail(&cfg, &[]);
    wait_streaming(&db, "s_kill");
    let txns = 400;
    let per = 10;
    let workload: String = (0..txns)
        .map(|t| {
            format!(
                "begin; insert into seq select g, repeat('x', 100) from generate_series({}, {}) g; commit;\n",
                t * per + 1,
                t * per + per
            )
        })
        .collect();
    // The workload keeps committing while the first tail is killed.
    let url = db.url.clone();
    let writer = std::thread::spawn(move || {
        for chunk in workload.lines().collect::<Vec<_>>().chunks(20) {
            sql(&url, &chunk.join("\n"));
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let mut seen_first = first.json(1500, T);
    first.kill9();
    // Lines it printed before it died count as seen (they may all be confirmed).
    for line in first.drain(Duration::from_millis(500)) {
        seen_first.push(serde_json::from_str(&line).unwrap());
    }
    let confirmed = lsn(&db.confirmed_flush("s_kill").unwrap());
    writer.join().unwrap();
    let first_ids = ids_with_commits(&seen_first);

    let mut second = Pgferry::tail(&cfg, &[]);
    let mut all: BTreeSet<i64> = first_ids.iter().map(|(id, _)| *id).collect();
    let mut second_lines = Vec::new();
    while all.len() < txns * per {
        let batch = second.json(1, T);
        all.insert(batch[0]["after"]["id"].as_i64().unwrap());
        second_lines.extend(batch);
    }
    second_lines.extend(
        second
            .drain(Duration::from_secs(2))
            .iter()
            .map(|l| serde_json::from_str(l).unwrap()),
    );
    assert_eq!(all.len(), txns * per, "every change arrived");
    let first_set: BTreeMap<i64, u64> = first_ids.into_iter().collect();
    let mut repeats = 0;
    for (id, commit) in ids_with_commits(&second_lines) {
        if first_set.contains_key(&id) {
            repeats += 1;
            assert!(
                commit >= confirmed,
                "id {id} (commit {commit:X}) was confirmed ({confirmed:X}) yet sent again"
            );
        }
    }
    // Within one run, nothing repeats.
    let second_ids: BTreeSet<i64> = second_lines
        .iter()
        .map(|v| v["after"]["id"].as_i64().unwrap())
        .collect();
    assert_eq!(second_ids.len(), second_lines.len());
    eprintln!(
        "kill -9 test: {} lines before the kill, {} after, {repeats} repeated",
        seen_first.len(),
        second_lines.len()
    );
}

#[test]
fn reconnects_after_the_walsender_is_killed_without_loss() {
    let db = TestDb::new("reconnect");
    db.sql("create table r (id int primary key)");
    let cfg = db.config("p.toml", "s_reconnect", &tables(&["public.r"]));
    let mut tail = Pgferry::tail(&cfg, &[]);
    wait_streaming(&db, "s_reconnect");
    db.sql("insert into r select generate_series(1, 50)");
    tail.json(50, T);
    db.sql(&format!(
        "select pg_terminate_backend(active_pid) from pg_replication_slots where slot_name = '{}'",
        db.slot("s_reconnect")
    ));
    let workload: String = (51..=100)
        .map(|i| format!("insert into r values ({i});\n"))
        .collect();
    db.sql(&workload);
    let mut ids = BTreeSet::new();
    while ids.len() < 50 {
        let v = &tail.json(1, T)[0];
        ids.insert(v["after"]["id"].as_i64().unwrap());
    }
    assert_eq!(ids, (51..=100).collect());
    assert!(
        tail.stderr_text().contains("reconnecting"),
        "{}",
        tail.stderr_text()
    );
    assert!(
        tail.child.try_wait().unwrap().is_none(),
        "tail keeps running"
    );
}

#[test]
fn idle_publication_still_advances_the_slot() {
    let db = TestDb::new("idle");
    db.sql("create table watched (id int primary key); create table noise (id serial primary key, pad text)");
    let cfg = db.config("p.toml", "s_idle", &tables(&["public.watched"]));
    let _tail = Pgferry::tail(&cfg, &[]);
    wait_streaming(&db, "s_idle");
    let start = lsn(&db.confirmed_flush("s_idle").unwrap());
    for _ in 0..5 {
        db.sql("insert into noise (pad) select repeat('n', 200) from generate_series(1, 2000)");
    }
    let noise_end = lsn(&db.value("select pg_current_wal_lsn()::text").unwrap());
    assert!(noise_end > start);
    let confirmed = wait_for(
        "confirmed_flush_lsn to pass the noise",
        Duration::from_secs(45),
        || {
            let c = lsn(&db.confirmed_flush("s_idle").unwrap());
            (c >= noise_end).then_some(c)
        },
    );
    assert!(confirmed >= noise_end);
}

#[test]
fn a_100k_row_transaction_streams_with_bounded_memory() {
    let db = TestDb::new("big");
    db.sql("create table big (id int primary key, payload text)");
    let cfg = db.config("p.toml", "s_big", &tables(&["public.big"]));
    let mut tail = Pgferry::tail(&cfg, &[]);
    wait_streaming(&db, "s_big");
    db.sql("insert into big select g, repeat(md5(g::text), 6) from generate_series(1, 100000) g");
    let lines = tail.lines(100_000, Duration::from_secs(300));
    let peak = tail.peak_rss_kib();
    let last: Value = serde_json::from_str(&lines[99_999]).unwrap();
    assert_eq!(last["ordinal"], 99_999);
    eprintln!(
        "100k-row transaction: peak RSS of pgferry tail = {} MiB",
        peak / 1024
    );
    // The transaction's text alone is ~20 MB and its JSON ~30 MB; a bounded pipeline
    // holds a small window of it.
    assert!(
        peak > 0 && peak < 96 * 1024,
        "peak RSS {} MiB is not bounded",
        peak / 1024
    );
}

/// `[source] logical_decoding_work_mem` reaches pgferry's walsender: a transaction of
/// about 400 kB is spilled to the EHR's disk under "64kB", and not under the server's
/// own setting (64MB); its rows arrive whole either way. pgferry exports the spill
/// (`pgferry_source_slot_spill_bytes`) and says once, at info, what would avoid it.
#[test]
fn decoding_work_mem_reaches_the_walsender() {
    let db = TestDb::new("workmem");
    db.sql("create table w (id int primary key, payload text)");
    for (round, (tag, setting, spills)) in [
        ("s_wm_small", "logical_decoding_work_mem = \"64kB\"\n", true),
        ("s_wm_server", "", false),
    ]
    .into_iter()
    .enumerate()
    {
        let cfg = db.config("p.toml", tag, &tables(&["public.w"]));
        let port = free_port();
        let text = std::fs::read_to_string(&cfg)
            .unwrap()
            .replacen(
                "heartbeat_interval = \"1s\"\n",
                &format!("heartbeat_interval = \"1s\"\n{setting}"),
                1,
            )
            .replace("listen = \"\"", &format!("listen = \"127.0.0.1:{port}\""));
        std::fs::write(&cfg, text).unwrap();
        let mut tail = Pgferry::tail(&cfg, &[]);
        wait_streaming(&db, tag);
        let first = round * 2000 + 1;
        db.sql(&format!(
            "insert into w select g, repeat(md5(g::text), 6) from generate_series({first}, {}) g",
            first + 1999
        ));
        let lines = tail.json(2000, T);
        let ids: BTreeSet<i64> = lines
            .iter()
            .map(|v| v["after"]["id"].as_i64().unwrap())
            .collect();
        assert_eq!(ids.len(), 2000, "{tag}: every row once");
        let spill = |db: &TestDb| {
            db.value(&format!(
                "select spill_txns from pg_stat_replication_slots where slot_name = '{}'",
                db.slot(tag)
            ))
            .and_then(|v| v.parse::<i64>().ok())
        };
        // What pgferry's slot monitor (every heartbeat_interval, 1s here) exports.
        let exported = || {
            let (_, body) = http_get(port, "/metrics");
            body.lines()
                .find_map(|l| l.strip_prefix("pgferry_source_slot_spill_bytes "))
                .and_then(|v| v.trim().parse::<i64>().ok())
        };
        if spills {
            let n = wait_for("the walsender to report its spill", T, || {
                spill(&db).filter(|&n| n > 0)
            });
            assert!(n >= 1);
            let bytes = wait_for("pgferry to export the spill", T, || {
                exported().filter(|&b| b > 0)
            });
            assert!(bytes > 64 * 1024, "{bytes} bytes spilled");
            let log = wait_for("pgferry to tell of the spill", T, || {
                let text = tail.stderr_text();
                text.contains("[source] logical_decoding_work_mem raises that limit")
                    .then_some(text)
            });
            assert!(log.contains("spill_bytes="), "{log}");
        } else {
            // The stats are written when the transaction is decoded, before its rows
            // reach pgferry: read now, they would show a spill had there been one.
            assert_eq!(
                spill(&db),
                Some(0),
                "{tag}: spilled under the server's 64MB"
            );
            std::thread::sleep(Duration::from_millis(1500));
            assert_eq!(exported(), Some(0), "{tag}: the exported spill");
            assert!(!tail
                .stderr_text()
                .contains("logical_decoding_work_mem raises"));
        }
        tail.terminate();
    }
}

#[test]
fn slot_flag_reads_another_slot_and_restart_resumes() {
    let db = TestDb::new("slotflag");
    db.sql("create table s (id int primary key)");
    let cfg = db.config("p.toml", "s_main", &tables(&["public.s"]));
    let mut tail = Pgferry::tail(&cfg, &["--slot", &db.slot("s_other")]);
    wait_streaming(&db, "s_other");
    db.sql("insert into s values (1)");
    assert_eq!(tail.json(1, T)[0]["after"]["id"], 1);
    assert!(tail.terminate().success());
    let main_slot = db.slot("s_main");
    let count = db.value(&format!(
        "select count(*) from pg_replication_slots where slot_name = '{main_slot}'"
    ));
    assert_eq!(
        count.as_deref(),
        Some("0"),
        "the configured slot was not used"
    );
    // A restart resumes after what was printed and confirmed.
    db.sql("insert into s values (2)");
    let mut again = Pgferry::tail(&cfg, &["--slot", &db.slot("s_other")]);
    assert_eq!(again.json(1, T)[0]["after"]["id"], 2);
    assert!(
        again.drain(Duration::from_secs(2)).is_empty(),
        "nothing is repeated after a graceful stop"
    );
}
