//! The whole pipeline, EHR -> Kafka -> hospital, with two real PostgreSQL clusters and
//! the broker: end to end with every type and the mapping features, `verify` (and an
//! independent SQL comparison), repeated kill -9 with exactly-once effects, and poison
//! events both ways.

mod common;
mod kafka_support;

use std::time::Duration;

use common::*;
use kafka_support::*;

const T: Duration = Duration::from_secs(180);

fn target_url() -> String {
    service_env("PGFERRY_TARGET_URL")
}

/// A source database (`tag`) and a target database (`<tag>_t`) of their own.
fn databases(tag: &str) -> (TestDb, TestDb) {
    let src = TestDb::new(tag);
    let tgt = TestDb::on(&target_url(), &format!("{tag}_t"));
    (src, tgt)
}

/// A full config: source `src`, Kafka with a unique prefix, sink into `tgt`.
fn pipeline_config(
    src: &TestDb,
    tgt: &TestDb,
    slot: &str,
    sink_extra: &str,
    tables: &str,
) -> (std::path::PathBuf, String) {
    let prefix = format!("t{}", src.name);
    let cfg = src.config(
        &format!("{slot}.toml"),
        slot,
        &format!(
            "[kafka]\nbrokers = \"{}\"\ntopic_prefix = \"{prefix}\"\n\
             [sink]\nurl = \"{}\"\nconsumer = \"test\"\nbatch_linger = \"20ms\"\n{sink_extra}\n{tables}",
            brokers(),
            tgt.url
        ),
    );
    (cfg, prefix)
}

fn run(config: &std::path::Path) -> Pgferry {
    let stderr = config.with_extension(format!(
        "run.{}.stderr",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    Pgferry::spawn(&["run", "--config", config.to_str().unwrap()], stderr)
}

fn verify(config: &std::path::Path) -> (i32, String) {
    let (code, out, err) = common::run(&["verify", "--config", config.to_str().unwrap()]);
    (code, format!("{out}{err}"))
}

fn wait_equal(config: &std::path::Path, p: &Pgferry) {
    let deadline = std::time::Instant::now() + T;
    loop {
        let (code, out) = verify(config);
        if code == 0 {
            return;
        }
        if std::time::Instant::now() > deadline {
            panic!(
                "verify never became equal:\n{out}\npgferry stderr:\n{}",
                p.stderr_text()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Rows as canonical text, for the independent comparison.
fn rows(db: &TestDb, query: &str) -> Vec<Vec<Option<String>>> {
    db.sql(&format!(
        "set DateStyle = ISO; set TimeZone = 'UTC'; set extra_float_digits = 1; {query}"
    ))
}

#[test]
fn end_to_end_every_type_mapping_toast_and_add_column() {
    every_type_end_to_end("avro");
}

/// Issue 8.10: the JSON format carries every type exactly as Avro does (json byte for
/// byte, jsonb null apart from SQL NULL, big numbers, multi-dimensional arrays).
#[test]
fn end_to_end_every_type_in_json_format() {
    every_type_end_to_end("json");
}

fn every_type_end_to_end(format: &str) {
    let (src, tgt) = databases(&format!("e2e{format}"));
    let types_ddl = "create extension if not exists citext;
         create type mood as enum ('calm', 'tense');
         create domain posint as int check (value > 0);";
    let types_table = "create table types (
           id int primary key, b bool, i2 int2, i8 int8, o oid, f4 float4, f8 float8, f8z float8,
           n numeric(12,4), nn numeric, nnan numeric, m money, t text, vc varchar(10), bp char(3), ci citext,
           nm name, ip inet, cidr cidr, mac macaddr, e mood, r int4range, x xml, iv interval, u uuid,
           j json, jb jsonb, d date, dinf date, tm time, ts timestamp, tsinf timestamp, tz timestamptz,
           ttz timetz, by bytea, ai int[], a2 int[], at text[], dm posint, bt bit(3), ca char(2)[]
         );";
    src.sql(&format!(
        "{types_ddl}
         create table patients (id int primary key, name text not null, ssn text, ward text, notes text);
         alter table patients alter column notes set storage external;
         {types_table}"
    ));
    tgt.sql(&format!("{types_ddl} create table patients_h (id int primary key, full_name text not null, ward text, notes text)"));
    // JSON carries no column types: the target tables exist, with the later column.
    let sink_extra = if format == "json" {
        tgt.sql(&format!(
            "{types_table} alter table patients_h add column bed int;"
        ));
        String::new()
    } else {
        "create_tables = true".to_string()
    };
    let (cfg, _) = pipeline_config(
        &src,
        &tgt,
        &format!("s_e2e{format}"),
        &sink_extra,
        "[[tables]]\nsource = \"public.patients\"\ntarget = \"public.patients_h\"\nexclude = [\"ssn\"]\n\
         rename = { name = \"full_name\" }\n[[tables]]\nsource = \"public.types\"\n",
    );
    // The HTTP endpoint on, so that `status` can show the daemon's latency.
    let port = common::free_port();
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("listen = \"\"", &format!("listen = \"127.0.0.1:{port}\""));
    std::fs::write(&cfg, text).unwrap();
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("[kafka]\n", &format!("[kafka]\nformat = \"{format}\"\n"));
    std::fs::write(&cfg, text).unwrap();
    let p = run(&cfg);
    wait_streaming(&src, &format!("s_e2e{format}"));
    src.sql(
        r#"insert into patients select g, 'patient ' || g, 'ssn' || g, 'ward ' || (g % 5),
                  (select string_agg(md5(g::text || h::text), '') from generate_series(1, 500) h)
           from generate_series(1, 200) g;
         update patients set ward = 'icu' where id % 3 = 0;
         update patients set id = id + 1000 where id = 7;
         delete from patients where id % 10 = 0;
         alter table patients add column bed int;
         update patients set bed = id where id % 4 = 0;
         insert into patients values (500, 'late', 'x', 'w', 'short', 5);
         insert into types values (
           1, true, -32768, 9223372036854775807, 4294967295, 'NaN', '-Infinity', '-0',
           12345678.1234, '0.000000000000000000000000000001234567890123456789', 'NaN', -1234.56,
           'Émilie 🩺 "q" \ b', 'short', 'ab', 'MiXeD', 'nm', '192.168.0.1/24', '10.0.0.0/8', '08:00:2b:01:02:03',
           'calm', '[1,5)', '<a>1</a>', '1 year 2 mons 3 days 04:05:06.5', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
           '{"b": 1,  "a": [1, 2]}', '{"b": 1}', '2026-11-22', 'infinity', '04:05:06.789',
           '2026-11-22 01:02:03.123456', '-infinity', '2026-11-22 01:02:03.123456+02', '04:05:06+02',
           '\x00ff00', '{1,NULL,3}', '{{1,2},{3,4}}', '{"a b",NULL,"NULL","q\"uote"}', 5);
         insert into types (id) values (2);
         insert into types (id, t) values (3, 'gone');
         truncate types;
         insert into types (id, t) values (4, 'after truncate');"#,
    );
    src.sql(
        r#"insert into types select 10 + id, b, i2, i8, o, f4, f8, f8z, n, nn, nnan, m, t, vc, bp, ci, nm, ip, cidr, mac, e,
                  r, x, iv, u, j, jb, d, dinf, tm, ts, tsinf, tz, ttz, by, ai, a2, at, dm
           from (values (1, true, '-32768'::int2, 9223372036854775807::int8, 4294967295::oid, 'NaN'::float4,
                  '-Infinity'::float8, '-0'::float8, 12345678.1234::numeric(12,4),
                  '0.000000000000000000000000000001234567890123456789'::numeric, 'NaN'::numeric, '-1234.56'::money,
                  'Émilie'::text, 'short'::varchar(10), 'ab'::char(3), 'MiXeD'::citext, 'nm'::name,
                  '192.168.0.1/24'::inet, '10.0.0.0/8'::cidr, '08:00:2b:01:02:03'::macaddr, 'calm'::mood,
                  '[1,5)'::int4range, '<a>1</a>'::xml, '1 year'::interval, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid,
                  '{"b": 1,  "a": [1, 2]}'::json, '{"b": 1}'::jsonb, '2026-11-22'::date, 'infinity'::date,
                  '04:05:06.789'::time, '2026-11-22 01:02:03.123456'::timestamp, '-infinity'::timestamp,
                  '2026-11-22 01:02:03.123456+02'::timestamptz, '04:05:06+02'::timetz, '\x00ff00'::bytea,
                  '{1,NULL,3}'::int[], '{{1,2},{3,4}}'::int[], '{"a b",NULL,"NULL","q\"uote"}'::text[], 5::posint))
                as v(id, b, i2, i8, o, f4, f8, f8z, n, nn, nnan, m, t, vc, bp, ci, nm, ip, cidr, mac, e, r, x, iv, u, j,
                     jb, d, dinf, tm, ts, tsinf, tz, ttz, by, ai, a2, at, dm);
         insert into types (id) values (12);
         insert into types (id, j, jb, nn) values
           (20, '{"a": 1,   "a": 2}', 'null', 12345678901234567890.123456789),
           (21, '[1, "x"]', '[1, {"k": 12345678901234567890.123456789}]', null),
           (22, '"scalar"', '3', null);
         insert into types (id, bt, ca) values (23, B'101', '{ab,c}');"#,
    );
    wait_equal(&cfg, &p);

    // An independent comparison, row by row.
    let source = rows(
        &src,
        "select id, name, ward, notes, bed from patients order by id",
    );
    let target = rows(
        &tgt,
        "select id, full_name, ward, notes, bed from patients_h order by id",
    );
    assert_eq!(source.len(), 181);
    assert_eq!(source, target);
    let source = rows(&src, "select row(t.*)::text from types t order by id");
    let target = rows(&tgt, "select row(t.*)::text from types t order by id");
    assert_eq!(source.len(), 7);
    assert_eq!(source, target);
    // json byte for byte; a jsonb null is not SQL NULL.
    assert_eq!(
        tgt.value("select j::text || '|' || (jb is null)::text from types where id = 20")
            .as_deref(),
        Some(r#"{"a": 1,   "a": 2}|false"#)
    );
    // Excluded columns never arrive; the added column did.
    assert_eq!(tgt.value("select count(*) from information_schema.columns where table_name = 'patients_h' and column_name = 'ssn'").as_deref(), Some("0"));
    assert_eq!(
        tgt.value("select count(*) from patients_h where bed is not null")
            .as_deref(),
        Some("41")
    );

    // `status` shows the slot and the checkpoints.
    let (code, out, err) = common::run(&["status", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("confirmed_flush_lsn") && out.contains("wal_status reserved"),
        "{out}"
    );
    assert!(out.contains(".public.patients[0] next offset"), "{out}");
    // And the end-to-end latency over the last minute, from the running daemon.
    let line = out
        .lines()
        .find(|l| l.starts_with("latency (source commit to target commit, last minute): p50 "))
        .unwrap_or_else(|| panic!("no latency line: {out}"));
    let p99_ms: f64 = line
        .split("p99 ")
        .nth(1)
        .and_then(|r| r.split(" ms").next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!(p99_ms > 0.0 && p99_ms < 120_000.0, "{line}");

    // One changed cell is found.
    tgt.sql("update patients_h set ward = 'changed' where id = 1");
    let (code, out) = verify(&cfg);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("public.patients") && out.contains("DIFFERENT"),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.contains("public.types") && l.contains("equal")),
        "{out}"
    );
}

/// A tiny deterministic PRNG for kill moments.
fn next(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

/// Three partitions applied by three sink workers, each on its own target connection,
/// killed five times mid-stream.
#[test]
fn repeated_kill9_during_100k_changes_is_exactly_once() {
    let (src, tgt) = databases("crash");
    src.sql("create table c (id int primary key, counter int not null, pad text)");
    let (cfg, prefix) = pipeline_config(
        &src,
        &tgt,
        "s_crash",
        "create_tables = true\nworkers = 3",
        "[[tables]]\nsource = \"public.c\"\n",
    );
    let port = common::free_port();
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("[kafka]\n", "[kafka]\npartitions = 3\n")
        .replace("listen = \"\"", &format!("listen = \"127.0.0.1:{port}\""));
    std::fs::write(&cfg, text).unwrap();
    let mut p = run(&cfg);
    wait_streaming(&src, "s_crash");
    let rows = 1000;
    let rounds = 100;
    src.sql(&format!(
        "insert into c select g, 0, repeat('p', 50) from generate_series(1, {rows}) g"
    ));
    let url = src.url.clone();
    let writer = std::thread::spawn(move || {
        for _ in 0..rounds {
            sql(&url, "update c set counter = counter + 1");
            std::thread::sleep(Duration::from_millis(30));
        }
    });
    let mut seed = 0x9E37_79B9_7F4A_7C15_u64 ^ u64::from(std::process::id());
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(500 + next(&mut seed) % 2500));
        p.kill9();
        p = run(&cfg);
    }
    writer.join().unwrap();
    // One more round for the last process, so that each of its workers has a share.
    src.sql("update c set counter = counter + 1");
    let rounds = rounds + 1;
    wait_equal(&cfg, &p);
    let counts = tgt.sql("select count(*), min(counter), max(counter), sum(counter) from c");
    assert_eq!(
        counts[0],
        [
            Some(rows.to_string()),
            Some(rounds.to_string()),
            Some(rounds.to_string()),
            Some((rows * rounds).to_string())
        ],
        "every update applied exactly once"
    );
    // Every partition has its checkpoint, and every worker applied its share (since
    // the last start, as the counters are the last process's).
    let partitions = tgt.value(&format!(
        "select count(*) from pgferry.checkpoints where topic = '{prefix}.public.c'"
    ));
    assert_eq!(partitions.as_deref(), Some("3"));
    let metrics = http_get(port, "/metrics").1;
    for worker in 0..3 {
        let batches = sample(
            &metrics,
            &format!("pgferry_sink_batches_total{{worker=\"{worker}\"}}"),
        );
        assert!(batches > 0.0, "worker {worker} applied nothing:\n{metrics}");
    }
    // The delivery callback counts by the topic index its messages carry: the last
    // round's 1000 updates were acknowledged by this process.
    let line = format!("pgferry_kafka_produced_total{{topic=\"{prefix}.public.c\"}}");
    let produced = sample(&metrics, &line);
    assert!(produced >= 1000.0, "{line} {produced}");
}

/// The value of the sample `series` (name and labels, as exposed) in a `/metrics` text.
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series))
        .unwrap_or_else(|| panic!("no {series} in /metrics:\n{metrics}"))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{series}: {e}"))
}

/// Stream table `p` (`source_ddl` on the EHR, `target_ddl` on the hospital) while
/// `inserts` run on the EHR, until pgferry stops on a poison event: it must exit with
/// 1 and name the event's offset and `reason` in its log. Returns the target and the
/// topic prefix.
fn stops_on_poison(
    name: &str,
    (source_ddl, target_ddl): (&str, &str),
    inserts: &[&str],
    offset: i64,
    reason: &str,
) -> (TestDb, String) {
    let (src, tgt) = databases(name);
    src.sql(source_ddl);
    tgt.sql(target_ddl);
    let slot = format!("s_{name}");
    let (cfg, prefix) =
        pipeline_config(&src, &tgt, &slot, "", "[[tables]]\nsource = \"public.p\"\n");
    let mut p = run(&cfg);
    wait_streaming(&src, &slot);
    for sql in inserts {
        src.sql(sql);
    }
    let status = wait_for("pgferry to stop", Duration::from_secs(60), || {
        p.child.try_wait().unwrap()
    });
    let stderr = p.stderr_text();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "poison event at topic {prefix}.public.p partition 0 offset {offset}"
        )),
        "{stderr}"
    );
    assert!(stderr.contains(reason), "{stderr}");
    (tgt, prefix)
}

#[test]
fn a_poison_event_stops_the_sink_naming_its_offset() {
    let (tgt, prefix) = stops_on_poison(
        "poison",
        (
            "create table p (id int primary key, v int)",
            "create table p (id int primary key, v int check (v < 100))",
        ),
        &[
            "insert into p values (1, 5)",
            "insert into p values (2, 500)",
        ],
        1,
        "check constraint",
    );
    assert_eq!(
        tgt.value("select string_agg(id::text, ',') from p")
            .as_deref(),
        Some("1")
    );
    let next = tgt.value(&format!(
        "select next_offset from pgferry.checkpoints where topic = '{prefix}.public.p'"
    ));
    assert_eq!(
        next.as_deref(),
        Some("1"),
        "the checkpoint stops before the poison event"
    );
}

#[test]
fn dlq_mode_sets_a_poison_event_aside_and_goes_on() {
    let (src, tgt) = databases("dlq");
    src.sql("create table p (id int primary key, v int)");
    tgt.sql("create table p (id int primary key, v int check (v < 100))");
    let (cfg, prefix) = pipeline_config(
        &src,
        &tgt,
        "s_dlq",
        "on_error = \"dlq\"",
        "[[tables]]\nsource = \"public.p\"\n",
    );
    let p = run(&cfg);
    wait_streaming(&src, "s_dlq");
    src.sql("insert into p values (1, 5)");
    src.sql("insert into p values (2, 500)");
    src.sql("insert into p values (3, 7)");
    wait_for(
        "rows 1 and 3 in the target",
        Duration::from_secs(60),
        || {
            (tgt.value("select string_agg(id::text, ',' order by id) from p")
                .as_deref()
                == Some("1,3"))
            .then_some(())
        },
    );
    let dead = consume(
        &brokers(),
        &format!("{prefix}.public.p.dlq"),
        1,
        Duration::from_secs(30),
    );
    assert!(
        dead[0].headers["pgferry.error"].contains("check constraint"),
        "{:?}",
        dead[0].headers
    );
    assert_eq!(dead[0].headers["pgferry.source_offset"], "1");
    assert!(dead[0].value.is_some());
    assert!(p.child.id() > 0);
    let next = tgt.value(&format!(
        "select next_offset from pgferry.checkpoints where topic = '{prefix}.public.p'"
    ));
    assert_eq!(next.as_deref(), Some("3"));
}

/// New rows are loaded with a plain COPY; when one of them meets a key the target
/// already holds, the whole batch is rolled back and applied again as upserts, so the
/// source's row wins, nothing is half-written, and the ledger still names every row's
/// writer.
#[test]
fn inserts_meeting_rows_already_in_the_target_are_upserted() {
    let (src, tgt) = databases("preexist");
    src.sql("create table p (id int primary key, v text)");
    tgt.sql("create table p (id int primary key, v text)");
    tgt.sql("insert into p values (7, 'stale'), (3050, 'stale')");
    let (cfg, _) = pipeline_config(
        &src,
        &tgt,
        "s_preexist",
        "",
        "[[tables]]\nsource = \"public.p\"\n",
    );
    let p = run(&cfg);
    wait_streaming(&src, "s_preexist");
    // One transaction, the first batch holding rows 1..2500 or more: rows 1..6 come before
    // the conflicting key, and the batch's COPY (over 128 KiB) goes in several pieces,
    // so the server refuses it while more are still being sent.
    src.sql(
        "insert into p select g, 'first ' || g || repeat('x', 100) from generate_series(1, 3000) g",
    );
    src.sql("insert into p select g, 'second ' || g from generate_series(3001, 3100) g");
    wait_equal(&cfg, &p);
    assert_eq!(
        rows(&tgt, "select v from p where id in (7, 3050) order by id"),
        vec![
            vec![Some(format!("first 7{}", "x".repeat(100)))],
            vec![Some("second 3050".to_string())]
        ]
    );
    assert_eq!(tgt.value("select count(*) from p").as_deref(), Some("3100"));
    // The path under test was taken.
    assert!(
        p.stderr_text()
            .contains("copied rows met keys already in the target table"),
        "{}",
        p.stderr_text()
    );
    let (code, out, err) = common::run(&["verify", "--config", cfg.to_str().unwrap(), "--ledger"]);
    assert_eq!(code, 0, "{out}{err}");
}

/// While a batch is applied the next goes on gathering, up to `batch_max_events`
/// (10000 here, with room in bytes). It used to take only what had arrived when the applier started,
/// and then wait idle: under a steady stream and a slow target every batch stayed
/// small, and each paid for a commit, a ledger row and a checkpoint.
#[test]
fn a_batch_gathers_while_the_one_before_is_applied() {
    let (src, tgt) = databases("fullbatch");
    src.sql("create table p (id int primary key, v text)");
    tgt.sql("create table p (id int primary key, v text)");
    let (cfg, _) = pipeline_config(
        &src,
        &tgt,
        "s_fullbatch",
        "batch_max_events = 10000\nbatch_max_bytes = 16777216",
        "[[tables]]\nsource = \"public.p\"\n",
    );
    let p = run(&cfg);
    wait_streaming(&src, "s_fullbatch");
    src.sql("insert into p values (0, 'first')");
    wait_for("the first row in the target", T, || {
        (tgt.value("select count(*) from p").as_deref() == Some("1")).then_some(())
    });
    // The next batch's applier waits on this lock while 20,000 rows arrive, 500 at a
    // time.
    let url = tgt.url.clone();
    let lock = std::thread::spawn(move || {
        common::sql(
            &url,
            "begin; lock table p in access exclusive mode; select pg_sleep(12); commit;",
        )
    });
    wait_for("the lock on the target table", T, || {
        (tgt.value(
            "select count(*) from pg_locks l join pg_class c on c.oid = l.relation \
             where c.relname = 'p' and l.mode = 'AccessExclusiveLock' and l.granted",
        )
        .as_deref()
            == Some("1"))
        .then_some(())
    });
    for k in 0..40 {
        src.sql(&format!(
            "insert into p select g, repeat('x', 300) || g from generate_series({}, {}) g",
            k * 500 + 1,
            (k + 1) * 500
        ));
        std::thread::sleep(Duration::from_millis(100));
    }
    lock.join().expect("the locking session");
    wait_equal(&cfg, &p);
    assert_eq!(
        tgt.value("select count(*) from p").as_deref(),
        Some("20001")
    );
    // One ledger row per batch, with its events by table and op: the first held row 0,
    // the second what had arrived when the lock stopped it, and the third what
    // arrived meanwhile, up to the limit.
    let sizes = tgt.sql(
        "select (counts -> 'public.p' ->> 'c') from pgferry.ledger where consumer = 'test' order by seq",
    );
    let sizes: Vec<u64> = sizes
        .iter()
        .map(|r| r[0].as_deref().unwrap_or("0").parse().unwrap())
        .collect();
    assert_eq!(sizes.iter().sum::<u64>(), 20_001, "{sizes:?}");
    assert_eq!(
        sizes.get(2),
        Some(&10_000),
        "batch sizes {sizes:?}: the batch gathered while its predecessor waited is not full"
    );
    let (code, out, err) = common::run(&["verify", "--config", cfg.to_str().unwrap(), "--ledger"]);
    assert_eq!(code, 0, "{out}{err}");
}

/// Two upserts of one table (same width, one staging table) in one target
/// transaction, a delete between them: the second must not apply the first's rows
/// again, which would bring the deleted row back.
#[test]
fn a_staging_table_reused_in_one_batch_holds_only_its_own_run() {
    let (src, tgt) = databases("restage");
    src.sql("create table r (id int primary key, v text)");
    tgt.sql("create table r (id int primary key, v text)");
    let (cfg, _) = pipeline_config(
        &src,
        &tgt,
        "s_restage",
        "",
        "[[tables]]\nsource = \"public.r\"\n",
    );
    let p = Pgferry::spawn_env(
        &["run", "--config", cfg.to_str().unwrap()],
        cfg.with_extension("run.stderr"),
        &[("PGFERRY_LOG", "info,pgferry::sink=debug")],
    );
    wait_streaming(&src, "s_restage");
    src.sql("insert into r values (1, 'a'), (2, 'a')");
    wait_equal(&cfg, &p);
    src.sql(
        "begin;
         update r set v = 'b' where id = 1;
         delete from r where id = 1;
         update r set v = 'c' where id = 2;
         commit;",
    );
    wait_equal(&cfg, &p);
    assert_eq!(
        rows(&tgt, "select id, v from r order by id"),
        vec![vec![Some("2".to_string()), Some("c".to_string())]]
    );
    // The three changes were one batch of three runs: upsert, delete, upsert.
    let log = p.stderr_text();
    assert!(log.contains("batch committed worker=0 runs=3"), "{log}");
}

/// A unique value other than the key is no key conflict to upsert around: the
/// event is poison, named as such, and the sink does not loop on it.
#[test]
fn a_unique_violation_outside_the_key_is_poison() {
    let (tgt, _) = stops_on_poison(
        "uniqv",
        (
            "create table p (id int primary key, v text)",
            "create table p (id int primary key, v text unique)",
        ),
        &["insert into p values (1, 'a'), (2, 'b'), (3, 'a')"],
        2,
        "unique constraint",
    );
    assert_eq!(
        tgt.value("select string_agg(id::text, ',' order by id) from p")
            .as_deref(),
        Some("1,2")
    );
}

#[test]
fn two_sinks_in_a_group_split_the_partitions_exactly_once() {
    let (src, tgt) = databases("group");
    src.sql("create table g (id int primary key, counter int not null)");
    let prefix = format!("t{}", src.name);
    let group = format!("g{}", src.name);
    // Short session timeouts: consumer-group joins are slow on the local broker.
    let cfg = src.config(
        "g.toml",
        "s_group",
        &format!(
            "[kafka]\nbrokers = \"{}\"\ntopic_prefix = \"{prefix}\"\npartitions = 2\n\
             [kafka.properties]\n\"session.timeout.ms\" = \"6000\"\n\"heartbeat.interval.ms\" = \"1000\"\n\
             [sink]\nurl = \"{}\"\nconsumer = \"test\"\ngroup = \"{group}\"\ncreate_tables = true\n\
             [[tables]]\nsource = \"public.g\"\n",
            brokers(),
            tgt.url
        ),
    );
    let spawn = |stage: &str, n: u32| {
        Pgferry::spawn(
            &["run", "--only", stage, "--config", cfg.to_str().unwrap()],
            cfg.with_extension(format!("{stage}{n}.stderr")),
        )
    };
    let _source = spawn("source", 0);
    let mut sink1 = spawn("sink", 1);
    let sink2 = spawn("sink", 2);
    wait_streaming(&src, "s_group");
    src.sql("insert into g select n, 0 from generate_series(1, 200) n");
    let rounds = 30;
    for round in 0..rounds {
        src.sql("update g set counter = counter + 1");
        if round == 10 {
            // One sink dies; the other takes its partitions from their checkpoints.
            sink1.kill9();
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    wait_equal(&cfg, &sink2);
    let counts = tgt.sql("select count(*), min(counter), max(counter) from g");
    assert_eq!(
        counts[0],
        [
            Some("200".into()),
            Some(rounds.to_string()),
            Some(rounds.to_string())
        ]
    );
    assert!(
        sink2.stderr_text().contains("sink assignment changed"),
        "{}",
        sink2.stderr_text()
    );
}

/// Types whose modifier PostgreSQL writes inside the name (`time(3) without time
/// zone`) are created in the target with it, and their values arrive.
#[test]
fn create_tables_keeps_the_precision_of_time_types() {
    let (src, tgt) = databases("prec");
    let columns = "id int primary key, t3 time(3), ts0 timestamp(0), tz3 timestamptz(3), \
                   tt2 timetz(2), n numeric(5,2), v varchar(7), a time(1)[]";
    src.sql(&format!("create table prec ({columns})"));
    let (cfg, _) = pipeline_config(
        &src,
        &tgt,
        "s_prec",
        "create_tables = true",
        "[[tables]]\nsource = \"public.prec\"\n",
    );
    let p = run(&cfg);
    wait_streaming(&src, "s_prec");
    src.sql(
        "insert into prec values (1, '04:05:06.789', '2026-11-28 01:02:03', '2026-11-28 01:02:03.456+00', \
         '04:05:06.78+02', 123.45, 'seven77', '{01:02:03.4}')",
    );
    wait_equal(&cfg, &p);
    let shape = "select string_agg(attname || ' ' || format_type(atttypid, atttypmod), ', ' order by attnum) \
                 from pg_attribute where attrelid = 'public.prec'::regclass and attnum > 0";
    assert_eq!(tgt.value(shape), src.value(shape));
    let row = "set TimeZone = 'UTC'; select row(p.*)::text from prec p";
    assert_eq!(tgt.sql(row), src.sql(row));
}
