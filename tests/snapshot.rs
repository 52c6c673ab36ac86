//! Issue 10: snapshots. The initial snapshot (exported snapshot, parallel ctid chunks)
//! under a concurrent workload, kill -9 during it, an on-demand re-snapshot with a
//! kill -9 in the middle that also repairs a damaged target, bounded memory, and the
//! clear errors. Checked by `verify`, by an independent SQL comparison of both
//! databases, and by counting the events on the topics.

mod common;
mod kafka_support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use kafka_support::*;

const T: Duration = Duration::from_secs(300);

fn target_url() -> String {
    service_env("PGFERRY_TARGET_URL")
}

fn config(
    src: &TestDb,
    tgt: &TestDb,
    slot: &str,
    source_extra: &str,
    tables: &str,
) -> std::path::PathBuf {
    let prefix = format!("t{}", src.name);
    let path = src.config(
        &format!("{slot}.toml"),
        slot,
        &format!(
            "[kafka]\nbrokers = \"{}\"\ntopic_prefix = \"{prefix}\"\n\
             [sink]\nurl = \"{}\"\nconsumer = \"snap\"\nbatch_linger = \"20ms\"\ncreate_tables = true\n{tables}",
            brokers(),
            tgt.url
        ),
    );
    // Snapshot settings belong in [source], which the helper wrote first.
    let text = std::fs::read_to_string(&path).unwrap().replacen(
        "[http]\n",
        &format!("{source_extra}\n[http]\n"),
        1,
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn run(config: &std::path::Path, tag: &str) -> Pgferry {
    Pgferry::spawn(
        &["run", "--config", config.to_str().unwrap()],
        config.with_extension(format!("{tag}.stderr")),
    )
}

fn verify_equal(config: &std::path::Path) -> bool {
    common::run(&["verify", "--config", config.to_str().unwrap()]).0 == 0
}

fn wait_equal(config: &std::path::Path, p: &Pgferry) {
    let deadline = Instant::now() + T;
    while !verify_equal(config) {
        if Instant::now() > deadline {
            let (_, out, err) = common::run(&["verify", "--config", config.to_str().unwrap()]);
            panic!(
                "verify never became equal:\n{out}{err}\npgferry stderr:\n{}",
                p.stderr_text()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn status(config: &std::path::Path) -> String {
    common::run(&["status", "--config", config.to_str().unwrap()]).1
}

/// Wait until `pgferry status` shows `line_part`.
fn wait_status(config: &std::path::Path, p: &Pgferry, line_part: &str) -> String {
    let deadline = Instant::now() + T;
    loop {
        let s = status(config);
        if s.contains(line_part) {
            return s;
        }
        if Instant::now() > deadline {
            panic!(
                "status never showed {line_part:?}:\n{s}\npgferry stderr:\n{}",
                p.stderr_text()
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The whole table as one digest, computed by each server itself.
fn digest(db: &TestDb, table: &str, order: &str) -> (String, String) {
    let row = db.sql(&format!(
        "set DateStyle = ISO; set TimeZone = 'UTC'; set extra_float_digits = 1; set IntervalStyle = postgres; \
         select count(*)::text, md5(coalesce(string_agg(t::text, '|' order by {order}), '')) from {table} t"
    ));
    let r = row.last().unwrap();
    (r[0].clone().unwrap(), r[1].clone().unwrap())
}

/// Snapshot (`op = r`) events on `topic` by their `source.snapshot` value, read with
/// the JSON format.
fn snapshot_events(topic: &str, at_least: usize) -> Vec<serde_json::Value> {
    consume_all(&brokers(), topic, at_least, T, Duration::from_secs(3))
        .into_iter()
        .filter_map(|r| r.value)
        .map(|v| serde_json::from_slice::<serde_json::Value>(&v).expect("JSON event"))
        // With json_schemas (the default) the event is the payload.
        .map(|v| {
            if v.get("payload").is_some() {
                v["payload"].clone()
            } else {
                v
            }
        })
        .filter(|v| v["op"] == "r")
        .collect()
}

/// A workload on `patients` until `stop`: counter increments (also of rows not yet
/// copied), deletes and inserts. Returns how many statements it ran.
fn workload(url: String, rows: i64, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut n = 0u64;
        let mut next_id = rows + 1;
        let mut seed = 12345u64;
        let mut rnd = |m: i64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % m as u64) as i64 + 1
        };
        while !stop.load(Ordering::Relaxed) {
            let a = rnd(rows);
            let b = rnd(rows);
            let c = rnd(rows);
            sql(
                &url,
                &format!(
                    "update patients set counter = counter + 1 where id in ({a}, {b}, {}); \
                     update patients set counter = counter + 1, note = repeat(md5(counter::text), 300) where id = {c}; \
                     delete from patients where id = {}; \
                     insert into patients (id, counter, name, note) values ({next_id}, 0, 'new', 'n')",
                    rows - a + 1,
                    rnd(rows)
                ),
            );
            next_id += 1;
            n += 1;
            std::thread::sleep(Duration::from_millis(5));
        }
        n
    })
}

const TYPES_DDL: &str = "create extension if not exists citext;
     create type mood as enum ('calm', 'tense');
     create domain posint as int check (value > 0);
     create table types (
       id int primary key, b bool, i2 int2, i8 int8, o oid, f4 float4, f8 float8, f8z float8,
       n numeric(12,4), nn numeric, nnan numeric, m money, t text, vc varchar(10), bp char(3), ci citext,
       nm name, ip inet, cidr cidr, mac macaddr, e mood, r int4range, x xml, iv interval, u uuid,
       j json, jb jsonb, d date, dinf date, tm time, ts timestamp, tsinf timestamp, tz timestamptz,
       ttz timetz, by bytea, ai int[], a2 int[], at text[], dm posint, bt bit(3), ca char(2)[]
     );";

const TYPES_ROWS: &str = r#"insert into types values (
       1, true, -32768, 9223372036854775807, 4294967295, 'NaN', '-Infinity', '-0',
       12345678.1234, '0.000000000000000000000000000001234567890123456789', 'NaN', -1234.56,
       'Émilie 🩺 "q" \ b	tab
newline', 'short', 'ab', 'MiXeD', 'nm', '192.168.0.1/24', '10.0.0.0/8', '08:00:2b:01:02:03',
       'calm', '[1,5)', '<a>1</a>', '1 year 2 mons 3 days 04:05:06.5', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
       '{"b": 1,  "a": [1, 2]}', '{"b": 1}', '2026-11-22', 'infinity', '04:05:06.789',
       '2026-11-22 01:02:03.123456', '-infinity', '2026-11-22 01:02:03.123456+02', '04:05:06+02',
       '\x00ff5c0a', '{1,NULL,3}', '{{1,2},{3,4}}', '{"a b",NULL,"NULL","q\"uote"}', 5, B'101', '{ab,c}');
     insert into types (id) values (2);
     insert into types (id, j, jb, nn, t) values
       (3, '{"a": 1,   "a": 2}', 'null', 12345678901234567890.123456789, E'back\\slash \\N'),
       (4, '[1, "x"]', '[1, {"k": 12345678901234567890.123456789}]', null, '\N');"#;

#[test]
fn initial_snapshot_under_load_is_exact_for_every_type_and_toast() {
    let rows: i64 = 200_000;
    let src = TestDb::new("snapinit");
    let tgt = TestDb::on(&target_url(), "snapinit_t");
    src.sql(&format!(
        "{TYPES_DDL}
         create table patients (id int primary key, counter int not null, name text, note text,
                                born date, seen timestamptz, score numeric(8,2));
         alter table patients alter column note set storage external;
         insert into patients select g, 0, 'patient ' || g,
                case when g % 1000 = 0 then repeat(md5(g::text), 400) else 'n' || g end,
                date '1950-01-01' + (g % 20000), timestamptz '2026-01-01 00:00:00+00' + g * interval '1 minute',
                (g % 100000) / 7.0
         from generate_series(1, {rows}) g;
         analyze patients;
         {TYPES_ROWS}"
    ));
    tgt.sql(TYPES_DDL.split("create table").next().unwrap());
    let cfg = config(
        &src,
        &tgt,
        "si",
        "snapshot_workers = 2\nsnapshot_chunk_rows = 10000",
        "[[tables]]\nsource = \"public.patients\"\n[[tables]]\nsource = \"public.types\"\n",
    );
    let stop = Arc::new(AtomicBool::new(false));
    let mut p = run(&cfg, "run1");
    // The workload starts with the copy: rows in chunks not copied yet change too.
    wait_for("the slot to exist", T, || src.confirmed_flush("si"));
    let load = workload(src.url.clone(), rows, stop.clone());
    wait_status(&cfg, &p, "snapshot public.patients: done");
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    let statements = load.join().unwrap();
    assert!(
        statements > 10,
        "the workload ran during the snapshot ({statements})"
    );
    wait_equal(&cfg, &p);
    assert_eq!(
        digest(&src, "patients", "id"),
        digest(&tgt, "patients", "id"),
        "independent comparison of patients"
    );
    assert_eq!(digest(&src, "types", "id"), digest(&tgt, "types", "id"));
    // The audit trail holds for copied rows too: each was written by a target
    // transaction the ledger names (rows written in a savepoint would carry a
    // subtransaction's xid instead).
    for t in ["patients", "types"] {
        assert_eq!(
            tgt.value(&format!(
                "select count(*) from {t} where xmin::text::bigint not in \
                 (select target_xid % 4294967296 from pgferry.ledger)"
            ))
            .as_deref(),
            Some("0"),
            "rows of {t} written by a transaction the ledger does not name"
        );
    }
    let s = status(&cfg);
    assert!(
        s.contains("snapshot public.types: done (initial), 4 rows"),
        "{s}"
    );
    // Exactly the rows of the exported snapshot, in 20 ctid chunks of about 10,000.
    assert!(
        s.contains("snapshot public.patients: done (initial), 200000 rows of ~"),
        "{s}"
    );
    let chunks: u64 = s
        .lines()
        .find(|l| l.starts_with("snapshot public.patients"))
        .and_then(|l| l.split(", ").find(|p| p.ends_with(" chunks")))
        .and_then(|p| p.trim_end_matches(" chunks").parse().ok())
        .unwrap();
    assert!(chunks >= 10, "{s}");
    assert!(
        p.stderr_text().contains("initial snapshot done"),
        "{}",
        p.stderr_text()
    );
    assert_eq!(p.terminate().code(), Some(0), "{}", p.stderr_text());
}

/// The `rows` of the `snapshot` line of `table` in `pgferry status`.
fn status_rows(status: &str, table: &str) -> Option<u64> {
    let line = status
        .lines()
        .find(|l| l.starts_with(&format!("snapshot {table}:")))?;
    line.split(", ")
        .find(|p| p.contains(" rows of "))
        .and_then(|p| p.split(' ').next())
        .and_then(|n| n.parse().ok())
}

#[test]
fn kill9_during_the_initial_snapshot_three_times() {
    let src = TestDb::new("snapkill");
    let tgt = TestDb::on(&target_url(), "snapkill_t");
    src.sql(
        "create table a (id int primary key, v text);
         create table b (id int primary key, v text);
         create table c (id int primary key, counter int not null, v text);
         insert into a select g, 'a' || g from generate_series(1, 1000) g;
         insert into b select g, 'b' || g from generate_series(1, 1000) g;
         insert into c select g, 0, repeat('c', 50) || g from generate_series(1, 400000) g;
         analyze;",
    );
    // JSON events carry no column types: the target tables exist.
    tgt.sql(
        "create table a (id int primary key, v text);
         create table b (id int primary key, v text);
         create table c (id int primary key, counter int not null, v text);",
    );
    let cfg = config(
        &src,
        &tgt,
        "sk",
        "snapshot_workers = 2\nsnapshot_chunk_rows = 5000",
        "[[tables]]\nsource = \"public.a\"\n[[tables]]\nsource = \"public.b\"\n[[tables]]\nsource = \"public.c\"\n",
    );
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("[kafka]\n", "[kafka]\nformat = \"json\"\n");
    std::fs::write(&cfg, text).unwrap();
    let prefix = format!("t{}", src.name);

    // First run: killed once a and b are recorded done and c is under way.
    let mut p = run(&cfg, "k1");
    // (The target is watched rather than `status`, which is slower than the copy.)
    wait_for("a and b applied, c under way", T, || {
        let n = |t: &str| {
            tgt.value(&format!("select count(*) from {t}"))
                .unwrap()
                .parse::<i64>()
                .unwrap()
        };
        (n("a") == 1000 && n("b") == 1000 && n("c") > 0).then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    p.kill9();
    let s = status(&cfg);
    assert!(
        s.contains("snapshot public.a: done") && s.contains("snapshot public.b: done"),
        "{s}"
    );
    assert!(
        !s.contains("snapshot public.c: done"),
        "killed too late to test anything:\n{s}"
    );
    // Changes while pgferry is down, to rows copied and not copied yet.
    src.sql("update c set counter = counter + 1 where id % 1000 = 1; delete from c where id % 1000 = 2; \
             update a set v = 'changed' where id = 5;");
    // Second and third runs: killed during the copy of c, which now goes on between
    // watermarks while the stream runs.
    for round in 2..=3 {
        let mut p = run(&cfg, &format!("k{round}"));
        let deadline = Instant::now() + T;
        loop {
            let s = status(&cfg);
            if status_rows(&s, "public.c").is_some_and(|n| n > 0)
                && s.contains("snapshot public.c: copying (incremental)")
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "c never got under way again:\n{s}\n{}",
                p.stderr_text()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        src.sql(&format!(
            "update c set counter = counter + {round} where id % 997 = 0"
        ));
        p.kill9();
    }
    let mut p = run(&cfg, "k4");
    wait_status(&cfg, &p, "snapshot public.c: done (incremental)");
    wait_equal(&cfg, &p);
    assert_eq!(digest(&src, "c", "id"), digest(&tgt, "c", "id"));
    assert_eq!(digest(&src, "a", "id"), digest(&tgt, "a", "id"));
    // Finished tables were not copied again: exactly one snapshot event per row.
    for t in ["a", "b"] {
        let events = snapshot_events(&format!("{prefix}.public.{t}"), 1000);
        assert_eq!(events.len(), 1000, "table {t} was copied once");
        assert!(events
            .iter()
            .all(|e| e["source"]["snapshot"] != "incremental"));
    }
    let c = snapshot_events(&format!("{prefix}.public.c"), 400_000);
    assert!(
        c.iter().any(|e| e["source"]["snapshot"] == "incremental"),
        "c was finished by the incremental method"
    );
    assert_eq!(p.terminate().code(), Some(0), "{}", p.stderr_text());
}

#[test]
fn on_demand_resnapshot_with_kill9_resumes_and_repairs_the_target() {
    let rows: i64 = 30_000;
    let src = TestDb::new("snapdemand");
    let tgt = TestDb::on(&target_url(), "snapdemand_t");
    src.sql(&format!(
        "create table patients (id int primary key, counter int not null, name text, note text);
         insert into patients select g, 0, 'patient ' || g, 'n' || g from generate_series(1, {rows}) g;
         create table nokey (v text);
         analyze;"
    ));
    tgt.sql("create table patients (id int primary key, counter int not null, name text, note text); create table nokey (v text unique);");
    let cfg = config(
        &src,
        &tgt,
        "sd",
        "snapshot_chunk_rows = 1000",
        "[[tables]]\nsource = \"public.patients\"\n[[tables]]\nsource = \"public.nokey\"\n",
    );
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("[kafka]\n", "[kafka]\nformat = \"json\"\n");
    std::fs::write(&cfg, text).unwrap();
    let prefix = format!("t{}", src.name);
    let topic = format!("{prefix}.public.patients");
    let mut p = run(&cfg, "d1");
    wait_status(&cfg, &p, "snapshot public.patients: done (initial)");
    wait_equal(&cfg, &p);

    // Clear errors: an unconfigured table, a keyless one.
    let (code, _, err) = common::run(&[
        "snapshot",
        "--config",
        cfg.to_str().unwrap(),
        "--table",
        "public.visits",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("public.visits is not configured"), "{err}");
    let (code, _, err) = common::run(&[
        "snapshot",
        "--config",
        cfg.to_str().unwrap(),
        "--table",
        "public.nokey",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no primary key"), "{err}");

    // Damage the target by hand: deleted and altered rows.
    tgt.sql("delete from patients where id % 100 = 0; update patients set name = 'wrong' where id % 77 = 0");
    assert!(!verify_equal(&cfg));
    let stop = Arc::new(AtomicBool::new(false));
    let load = workload(src.url.clone(), rows, stop.clone());
    let (code, out, err) = common::run(&[
        "snapshot",
        "--config",
        cfg.to_str().unwrap(),
        "--table",
        "public.patients",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("requested"), "{out}");
    // Killed in the middle of the copy.
    let deadline = Instant::now() + T;
    loop {
        let s = status(&cfg);
        if s.contains("snapshot public.patients: copying (incremental)")
            && status_rows(&s, "public.patients").is_some_and(|n| n >= 15_000)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the re-snapshot never got under way:\n{s}\n{}",
            p.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    p.kill9();
    let before_restart = status_rows(&status(&cfg), "public.patients").unwrap();
    let mut p = run(&cfg, "d2");
    wait_status(&cfg, &p, "snapshot public.patients: done (incremental)");
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    wait_equal(&cfg, &p);
    assert_eq!(
        digest(&src, "patients", "id"),
        digest(&tgt, "patients", "id")
    );
    assert!(
        p.stderr_text().contains("resume_after_key=true"),
        "{}",
        p.stderr_text()
    );
    // Resumed, not restarted: the incremental events are about one copy of the table.
    // What was copied after the last recorded progress (recorded at most four times a
    // second) is copied again; starting over would add the 15,000+ rows before.
    let events = snapshot_events(&topic, rows as usize);
    let incremental = events
        .iter()
        .filter(|e| e["source"]["snapshot"] == "incremental")
        .count() as u64;
    let total_rows = src
        .value("select count(*) from patients")
        .unwrap()
        .parse::<u64>()
        .unwrap();
    assert!(before_restart >= 15_000);
    assert!(
        incremental < total_rows + 10_000,
        "{incremental} incremental events for {total_rows} rows: the copy started over"
    );
    assert_eq!(p.terminate().code(), Some(0), "{}", p.stderr_text());
}

#[test]
fn initial_snapshot_of_two_million_rows_stays_below_128_mib() {
    let src = TestDb::new("snapmem");
    let tgt = TestDb::on(&target_url(), "snapmem_t");
    src.sql(
        "create table patients (id bigint primary key, mrn text, name text, born date, ward text,
                                admitted timestamptz, weight numeric(6,2), active bool, notes text, visits int);
         insert into patients select g, 'MRN' || g, 'patient ' || g, date '1940-01-01' + g % 30000,
                'ward ' || g % 40, timestamptz '2020-01-01 00:00:00+00' + g * interval '1 second',
                (g % 15000) / 100.0, g % 3 <> 0, repeat('x', 40), g % 17
         from generate_series(1, 2000000) g;
         analyze patients;",
    );
    let cfg = config(
        &src,
        &tgt,
        "sm",
        "snapshot_workers = 2",
        "[[tables]]\nsource = \"public.patients\"\n",
    );
    let mut p = Pgferry::spawn(
        &["run", "--only", "source", "--config", cfg.to_str().unwrap()],
        cfg.with_extension("mem.stderr"),
    );
    wait_for(
        "the initial snapshot to finish",
        Duration::from_secs(900),
        || {
            p.stderr_text()
                .contains("initial snapshot done")
                .then_some(())
        },
    );
    let peak_mib = p.peak_rss_kib() / 1024;
    // (The state records `done` a moment after the log line.)
    wait_status(
        &cfg,
        &p,
        "snapshot public.patients: done (initial), 2000000 rows",
    );
    assert_eq!(p.terminate().code(), Some(0), "{}", p.stderr_text());
    eprintln!("peak RSS while snapshotting 2,000,000 rows: {peak_mib} MiB");
    assert!(peak_mib > 0 && peak_mib < 128, "peak RSS {peak_mib} MiB");
}

/// Every column type the sink's binary COPY encodes (src/sink/copy_binary.rs), at the
/// edges of each. NULL, extremes, special values, BC and infinite dates and times,
/// 2,001-digit numerics, and text with COPY's own escapes.
const WIRES_DDL: &str = "create table wires (
       id int primary key, b bool, i2 int2, i4 int4, i8 int8, f4 float4, f8 float8, t text,
       vc varchar(12), bp char(4), d date, ts timestamp, tz timestamptz, n numeric,
       n4 numeric(12,4), u uuid, by bytea, j json, jb jsonb
     );
     create table late (id int primary key, tz timestamptz, note text);";

const WIRES_ROWS: &str = r#"insert into wires values
       (1, true, -32768, -2147483648, -9223372036854775808, '-Infinity', 'NaN', '', '', '',
        '4713-01-01 BC', '4713-01-01 00:00:00 BC', '4713-01-01 00:00:00+00 BC', 'NaN', '-0.0001',
        '00000000-0000-0000-0000-000000000000', '\x', '{"a": 1,   "a": 2}', '{}'),
       (2, false, 32767, 2147483647, 9223372036854775807, 'Infinity', '-0',
        E'Émilie 🩺 "q" \\ b\ttab\nnewline\r\\N', 'twelve chars', 'ab', 'infinity', 'infinity',
        '-infinity', '-Infinity', 99999999.9999, 'FFFFFFFF-FFFF-FFFF-FFFF-FFFFFFFFFFFF',
        '\x00ff5c0a0d09', '[1, "x"]', '[1, {"k": 12345678901234567890.123456789}]'),
       (3, null, null, null, null, null, null, null, null, null, null, null, null, null, null,
        null, null, null, null),
       (4, true, 0, 0, 0, 1.17549435e-38, 5e-324, '\N', 'NULL', 'x', '5874897-12-31',
        '294246-12-31 23:59:59.999999', '1999-12-31 23:59:59.999999-03:30',
        (repeat('9', 1000) || '.' || repeat('1', 1000))::numeric, '-0.5', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
        '\x5c', 'null', '"text"'),
       (5, false, -1, -1, -1, 3.4028235e38, 1.7976931348623157e308, ' ', ' a ', ' a  ',
        '2000-01-01', '2000-01-01 00:00:00', '2000-01-01 00:00:00+00', '0.000', '0', null,
        null, '1', '-0.0'),
       (6, true, 1, 10000, 10000, -0.0, 1e-310, 'tab	inside', 'x', 'abcd', '1999-12-31',
        '1999-12-31 23:59:59.5', '1970-01-01 00:00:00+00', '10000', '-10000.0001',
        null, null, '"é"', '{"é": [true, false, null]}');
     insert into wires
     select g, g % 2 = 0, (g % 30000)::int2, g * 1000, g::bigint * 1000000007, g / 7.0, g / 3.0,
            'row ' || g, 'v' || g, 'c' || (g % 100), date '1900-01-01' + g * 37,
            timestamp '1900-01-01' + g * interval '37 hours 1.000001 seconds',
            timestamptz '2026-01-01 00:00:00+00' - g * interval '13 days 1.5 seconds',
            (g * 1.37)::numeric, g / 9.0, md5(g::text)::uuid, decode(md5(g::text), 'hex'),
            json_build_object('g', g), jsonb_build_object('g', g, 'h', g / 3.0)
       from generate_series(100, 2099) g;
     insert into late values (1, '2026-11-29 10:00:00+00', 'ordinary'),
       (2, '294270-01-01 00:00:00+00', 'beyond the binary parser, within PostgreSQL'),
       (3, null, 'null');"#;

#[test]
fn binary_copy_loads_every_type_it_knows_exactly_and_falls_back_to_text() {
    let src = TestDb::new("snapwire");
    let tgt = TestDb::on(&target_url(), "snapwire_t");
    src.sql(&format!("{WIRES_DDL}\n{WIRES_ROWS}"));
    let cfg = config(
        &src,
        &tgt,
        "sw",
        "snapshot_chunk_rows = 500",
        "[[tables]]\nsource = \"public.wires\"\n[[tables]]\nsource = \"public.late\"\n",
    );
    let mut p = run(&cfg, "run1");
    wait_status(&cfg, &p, "snapshot public.wires: done");
    wait_status(&cfg, &p, "snapshot public.late: done");
    wait_equal(&cfg, &p);
    // Streamed inserts take the same plain COPY.
    src.sql(
        "insert into wires select id + 10000, b, i2, i4, i8, f4, f8, t, vc, bp, d, ts, tz, n, n4, u, by, j, jb \
         from wires where id < 10 or id % 97 = 0;
         insert into late values (4, '2026-11-29 11:00:00+00', 'streamed');",
    );
    wait_equal(&cfg, &p);
    for table in ["wires", "late"] {
        assert_eq!(
            digest(&src, table, "id"),
            digest(&tgt, table, "id"),
            "independent comparison of {table}"
        );
    }
    let log = p.stderr_text();
    let copied = |table: &str, format: &str| {
        log.lines().any(|l| {
            l.contains("copied rows into the table")
                && l.contains(&format!("table=public.{table} "))
                && l.contains(&format!("format=\"{format}\""))
        })
    };
    assert!(copied("wires", "binary"), "{log}");
    assert!(!copied("wires", "text"), "{log}");
    // The year 294270 fits PostgreSQL's timestamptz but not pgferry's parser: the
    // batch is loaded again as text, as the table's rows are from then on.
    assert!(
        log.contains("a value of this column has no binary form"),
        "{log}"
    );
    assert!(copied("late", "text"), "{log}");
    assert!(!copied("late", "binary"), "{log}");
    assert_eq!(p.terminate().code(), Some(0), "{}", p.stderr_text());
}

/// Binary values carry no type: after the target's columns change type while pgferry
/// runs (bigint to double precision, integer to bigint), rows are loaded as the new
/// types, not by what pgferry saw first (that would have read an int8 1 as the float8
/// 5e-324, and an int4 as half an int8).
#[test]
fn binary_copy_follows_target_columns_whose_type_changed() {
    let src = TestDb::new("snapretype");
    let tgt = TestDb::on(&target_url(), "snapretype_t");
    let ddl = "create table retyped (id int primary key, big bigint, small int)";
    src.sql(&format!(
        "{ddl}; insert into retyped select g, g, -g from generate_series(1, 100) g"
    ));
    tgt.sql(ddl);
    let cfg = config(
        &src,
        &tgt,
        "sr",
        "",
        "[[tables]]\nsource = \"public.retyped\"\n",
    );
    let mut p = run(&cfg, "run1");
    wait_status(&cfg, &p, "snapshot public.retyped: done");
    wait_equal(&cfg, &p);
    tgt.sql(
        "alter table retyped alter column big type double precision, alter column small type bigint",
    );
    src.sql("insert into retyped select g, g, -g from generate_series(101, 300) g");
    wait_equal(&cfg, &p);
    assert_eq!(
        digest(&src, "retyped", "id"),
        digest(&tgt, "retyped", "id"),
        "independent comparison"
    );
    let log = p.stderr_text();
    assert!(
        log.lines()
            .filter(|l| l.contains("copied rows into the table") && l.contains("format=\"binary\""))
            .count()
            >= 2,
        "{log}"
    );
    assert_eq!(p.terminate().code(), Some(0), "{}", p.stderr_text());
}
