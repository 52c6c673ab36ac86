//! The source's safety rules against the real services (PostgreSQL source and target,
//! Apache Kafka): what it follows, what it skips and what it refuses.
//!
//! - A configured table renamed (or moved with SET SCHEMA) while streaming is followed
//!   by OID under its configured name, with a warning; a restart with the old name stops.
//! - A table of the publication that is not configured is skipped with one warning and
//!   never resolved, so dropping it and a type only it used does not stop the source.
//! - A configured `key` that is not the table's replica identity is refused by `check`
//!   (exit 1), `tail` and `run` (exit 2); REPLICA IDENTITY FULL or USING INDEX on the
//!   key's unique index make it acceptable.
//! - A 10 MB bytea row goes end to end into the target; a row above
//!   `[kafka] max_message_bytes` stops the source (exit 1) without printing its value
//!   and without confirming the slot past it.
//! - With the target down at start, `run` still publishes and confirms; the sink
//!   catches up when the target comes back, and readiness follows.
//! - `[kafka.properties]` that weaken durability are refused (exit 2) naming the key
//!   and the file.
//!
//! Tests that use the target cluster take a lock, because one of them stops it.

mod common;
mod kafka_support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::*;
use kafka_support::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(90);

/// Held by every test that uses the target cluster: one of them stops it.
static TARGET: Mutex<()> = Mutex::new(());

fn target_lock() -> MutexGuard<'static, ()> {
    TARGET.lock().unwrap_or_else(|e| e.into_inner())
}

fn target_url() -> String {
    service_env("PGFERRY_TARGET_URL")
}

static FILES: AtomicU32 = AtomicU32::new(0);

/// A fresh scratch path for captured output.
fn scratch(what: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "pgft_safety_{}_{}.{what}",
        std::process::id(),
        FILES.fetch_add(1, Ordering::SeqCst)
    ))
}

/// `pgferry ARGS` at the operator's log level (info), stdout and stderr to files.
fn spawn_quiet(args: &[&str], stdout: &Path, stderr: &Path) -> Child {
    Command::new(BIN)
        .args(args)
        .env("PGFERRY_LOG", "info")
        .stdout(std::fs::File::create(stdout).unwrap())
        .stderr(std::fs::File::create(stderr).unwrap())
        .stdin(Stdio::null())
        .spawn()
        .expect("spawning pgferry")
}

/// Wait for `child` to exit; kill it and fail (showing `stderr`) after `timeout`.
fn wait_exit(child: &mut Child, timeout: Duration, stderr: &Path) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "pgferry was still running after {timeout:?} but should have stopped; stderr:\n{}",
                std::fs::read_to_string(stderr).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Run `pgferry ARGS`, which must stop by itself within `timeout` (the old code kept
/// streaming where the new one refuses): (exit code, stdout, stderr).
fn run_within(args: &[&str], timeout: Duration) -> (i32, String, String) {
    let (out, err) = (scratch("stdout"), scratch("stderr"));
    let mut child = spawn_quiet(args, &out, &err);
    let status = wait_exit(&mut child, timeout, &err);
    let stdout = std::fs::read_to_string(&out).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err).unwrap_or_default();
    let _ = std::fs::remove_file(out);
    let _ = std::fs::remove_file(err);
    (status.code().unwrap_or(-1), stdout, stderr)
}

/// A query's single value, or None if the server is unreachable or the query fails
/// (a table that does not exist yet, a cluster that is starting).
fn try_value(url: &str, query: &str) -> Option<Option<String>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .ok()?;
        let handle = tokio::spawn(conn);
        let msgs = client.simple_query(query).await.ok();
        drop(client);
        let _ = handle.await;
        let row = msgs?.into_iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).map(str::to_string)),
            _ => None,
        });
        Some(row.flatten())
    })
}

/// Like [`wait_streaming`], but fails at once, with pgferry's stderr, if it stops
/// before streaming (`exited` returns why).
fn wait_streaming_while(db: &TestDb, tag: &str, mut exited: impl FnMut() -> Option<String>) {
    let slot = db.slot(tag);
    let query = format!(
        "select count(*) from pg_stat_replication r join pg_replication_slots s on s.active_pid = r.pid \
         where s.slot_name = '{slot}'"
    );
    wait_for(&format!("slot {slot} to be streamed"), T, || {
        if let Some(why) = exited() {
            panic!("pgferry stopped before streaming slot {slot}: {why}");
        }
        (db.value(&query).as_deref() == Some("1")).then_some(())
    });
}

/// [`wait_streaming_while`] a [`Pgferry`] runs.
fn wait_running(db: &TestDb, tag: &str, p: &mut Pgferry) {
    wait_streaming_while(db, tag, || {
        p.child
            .try_wait()
            .unwrap()
            .map(|status| format!("{status}\n{}", p.stderr_text()))
    });
}

fn current_wal_lsn(db: &TestDb) -> u64 {
    lsn(&db.value("select pg_current_wal_lsn()::text").unwrap())
}

fn confirmed(db: &TestDb, tag: &str) -> u64 {
    lsn(&db
        .confirmed_flush(tag)
        .unwrap_or_else(|| panic!("slot {tag} has no confirmed_flush_lsn")))
}

fn tables(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("[[tables]]\nsource = \"{n}\"\n"))
        .collect()
}

/// Serve HTTP on `port` instead of not at all.
fn listen_on(cfg: &Path, port: u16) {
    let text = std::fs::read_to_string(cfg)
        .unwrap()
        .replace("listen = \"\"", &format!("listen = \"127.0.0.1:{port}\""));
    std::fs::write(cfg, text).unwrap();
}

/// `[kafka]` into the real broker with a topic prefix of this database's own.
fn kafka_section(db: &TestDb, extra: &str) -> (String, String) {
    let prefix = format!("t{}", db.name);
    (
        format!(
            "[kafka]\nbrokers = \"{}\"\ntopic_prefix = \"{prefix}\"\n{extra}\n",
            brokers()
        ),
        prefix,
    )
}

/// The `(op, schema, table)` of tail lines.
fn ops(lines: &[Value]) -> Vec<(String, String, String)> {
    lines
        .iter()
        .map(|v| {
            (
                v["op"].as_str().unwrap_or("?").to_string(),
                v["schema"].as_str().unwrap_or("?").to_string(),
                v["table"].as_str().unwrap_or("?").to_string(),
            )
        })
        .collect()
}

fn triple(op: &str, schema: &str, table: &str) -> (String, String, String) {
    (op.to_string(), schema.to_string(), table.to_string())
}

#[test]
fn renamed_or_moved_table_is_followed_under_its_configured_name() {
    let db = TestDb::new("rename");
    db.sql(
        "create table p (id int primary key, v text);
         create table q (id int primary key, v text);
         create schema other;",
    );
    let cfg = db.config("r.toml", "s_rename", &tables(&["public.p", "public.q"]));
    let mut tail = Pgferry::tail(&cfg, &[]);
    wait_running(&db, "s_rename", &mut tail);
    db.sql("insert into p values (1, 'a'); insert into q values (1, 'a');");
    let before = tail.json(2, T);
    assert_eq!(
        ops(&before),
        [triple("c", "public", "p"), triple("c", "public", "q")]
    );

    db.sql(
        "alter table p rename to p2;
         insert into p2 values (2, 'b');
         update p2 set v = 'c' where id = 1;
         alter table q set schema other;
         insert into other.q values (2, 'b');
         update other.q set v = 'c' where id = 1;
         delete from other.q where id = 2;",
    );
    let l = tail.json(5, T);
    assert_eq!(
        ops(&l),
        [
            triple("c", "public", "p"),
            triple("u", "public", "p"),
            triple("c", "public", "q"),
            triple("u", "public", "q"),
            triple("d", "public", "q"),
        ],
        "changes of the renamed and the moved table keep their configured name: {l:?}"
    );
    assert_eq!(l[0]["after"], json!({"id": 2, "v": "b"}));
    assert_eq!(l[1]["after"], json!({"id": 1, "v": "c"}));
    assert_eq!(l[2]["after"], json!({"id": 2, "v": "b"}));
    assert_eq!(l[3]["after"], json!({"id": 1, "v": "c"}));
    assert_eq!(l[4]["key"], json!({"id": 2}));
    let stderr = tail.stderr_text();
    for needle in ["renamed", "public.p2", "other.q"] {
        assert!(
            stderr.contains(needle),
            "stderr should warn about the rename ({needle:?}):\n{stderr}"
        );
    }
    let status = tail.terminate();
    assert!(status.success(), "{status:?}\n{}", tail.stderr_text());

    // The old configuration names tables that no longer exist under those names.
    let (code, _, stderr) = run_within(&["tail", "--config", cfg.to_str().unwrap()], T);
    assert_ne!(code, 0, "a restart with the old names must stop:\n{stderr}");
    assert!(
        stderr.contains("table public.p does not exist"),
        "the error names the table:\n{stderr}"
    );
}

#[test]
fn unconfigured_table_is_skipped_with_one_warning_and_never_resolved() {
    let db = TestDb::new("unconf");
    let publication = db.slot("s_unconf");
    db.sql(&format!(
        "create type mood as enum ('calm', 'tense');
         create table x (id int primary key, m mood);
         create table c (id int primary key);
         create publication {publication} for all tables;"
    ));
    let cfg = db.config("u.toml", "s_unconf", &tables(&["public.c"]));
    let mut tail = Pgferry::tail(&cfg, &[]);
    wait_running(&db, "s_unconf", &mut tail);
    // Commit order: had x's changes been printed, they would come first.
    db.sql(
        "insert into x values (1, 'calm');
         insert into c values (1);
         insert into x values (2, 'tense');
         update x set m = 'calm' where id = 2;
         insert into c values (2);",
    );
    let l = tail.json(2, T);
    assert_eq!(
        ops(&l),
        [triple("c", "public", "c"), triple("c", "public", "c")],
        "only the configured table streams: {l:?}"
    );
    assert_eq!(l[0]["after"], json!({"id": 1}));
    assert_eq!(l[1]["after"], json!({"id": 2}));
    let stderr = tail.stderr_text();
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("not configured"))
        .collect();
    assert_eq!(
        warnings.len(),
        1,
        "one warning for the unconfigured table:\n{stderr}"
    );
    assert!(warnings[0].contains("public.x"), "{}", warnings[0]);
    assert!(tail.terminate().success(), "{}", tail.stderr_text());

    // While nothing streams: a change of x, then x and the type only it used are
    // dropped together. On restart the server decodes x's change with the old
    // catalog, when its type no longer exists in the current one.
    db.sql(
        "insert into x values (3, 'tense');
         begin; drop table x; drop type mood; commit;
         insert into c values (3);",
    );
    let mut again = Pgferry::tail(&cfg, &[]);
    let l = again.json(1, T);
    assert_eq!(ops(&l), [triple("c", "public", "c")], "{l:?}");
    assert_eq!(l[0]["after"], json!({"id": 3}));
    db.sql("insert into c values (4)");
    let l = again.json(1, T);
    assert_eq!(l[0]["after"], json!({"id": 4}), "the source goes on");
    assert!(
        again.child.try_wait().unwrap().is_none(),
        "the source must not stop:\n{}",
        again.stderr_text()
    );
    let stderr = again.stderr_text();
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("not configured") && l.contains("public.x")),
        "the skipped table is named after the restart too:\n{stderr}"
    );
    assert!(again.terminate().success(), "{}", again.stderr_text());
}

#[test]
fn configured_key_must_be_the_replica_identity() {
    let db = TestDb::new("keyid");
    db.sql("create table k (id int primary key, mrn text not null unique, v text)");
    let table = "[[tables]]\nsource = \"public.k\"\nkey = [\"mrn\"]\n";
    let tail_cfg = db.config("tail.toml", "s_keyid", table);
    let (kafka, _) = kafka_section(&db, "");
    let run_cfg = db.config("run.toml", "s_keyrun", &format!("{kafka}{table}"));
    let check = || run_within(&["check", "--config", tail_cfg.to_str().unwrap()], T);
    let tail_args = ["tail", "--config", tail_cfg.to_str().unwrap()];
    let run_args = [
        "run",
        "--only",
        "source",
        "--config",
        run_cfg.to_str().unwrap(),
    ];
    let names_problem = |text: &str| {
        text.lines().any(|l| {
            l.contains("public.k")
                && l.contains("key = [mrn]")
                && l.contains("replica identity")
                && l.contains("(id)")
        })
    };

    // REPLICA IDENTITY DEFAULT sends the primary key (id), not mrn.
    let (code, out, err) = check();
    assert_eq!(code, 1, "check must find the problem:\n{out}{err}");
    assert!(
        names_problem(&out),
        "check names table, key and identity:\n{out}"
    );
    for (what, args) in [
        ("tail", &tail_args[..]),
        ("run --only source", &run_args[..]),
    ] {
        let (code, _, err) = run_within(args, T);
        assert_eq!(code, 2, "{what} must refuse the key:\n{err}");
        assert!(
            names_problem(&err),
            "{what} names table, key and identity:\n{err}"
        );
    }

    // Accepted with FULL (whole old rows) ...
    db.sql("alter table k replica identity full");
    let (code, out, err) = check();
    assert_eq!(code, 0, "FULL allows any key:\n{out}{err}");
    let mut tail = Pgferry::tail(&tail_cfg, &[]);
    wait_running(&db, "s_keyid", &mut tail);
    db.sql(
        "insert into k values (1, 'M1', 'a');
         update k set mrn = 'M2' where id = 1;",
    );
    let l = tail.json(2, T);
    assert_eq!(l[0]["key"], json!({"mrn": "M1"}));
    assert_eq!(l[1]["key"], json!({"mrn": "M2"}));
    assert_eq!(l[1]["before"], json!({"id": 1, "mrn": "M1", "v": "a"}));
    assert!(tail.terminate().success(), "{}", tail.stderr_text());
    let mut run = kafka_support::run_source(&run_cfg);
    wait_running(&db, "s_keyrun", &mut run);
    assert!(run.terminate().success(), "{}", run.stderr_text());

    // ... and with the unique index of the key as the replica identity.
    db.sql("alter table k replica identity using index k_mrn_key");
    let (code, out, err) = check();
    assert_eq!(code, 0, "USING INDEX on the key allows it:\n{out}{err}");
    let mut tail = Pgferry::tail(&tail_cfg, &[]);
    wait_running(&db, "s_keyid", &mut tail);
    db.sql(
        "update k set mrn = 'M3' where id = 1;
         delete from k where id = 1;",
    );
    let l = tail.json(2, T);
    assert_eq!(l[0]["op"], "u");
    assert_eq!(l[0]["key"], json!({"mrn": "M3"}));
    assert_eq!(l[0]["before"], json!({"mrn": "M2"}));
    assert_eq!(l[1]["op"], "d");
    assert_eq!(l[1]["key"], json!({"mrn": "M3"}));
    assert!(tail.terminate().success(), "{}", tail.stderr_text());
    let mut run = kafka_support::run_source(&run_cfg);
    wait_running(&db, "s_keyrun", &mut run);
    assert!(run.terminate().success(), "{}", run.stderr_text());
}

/// `n` × 16 random (incompressible) bytes.
fn random_bytea(n: u32) -> String {
    format!(
        "(select decode(string_agg(md5(random()::text), ''), 'hex') from generate_series(1, {n}))"
    )
}

#[test]
fn a_10_mb_row_goes_end_to_end() {
    let _target = target_lock();
    let src = TestDb::new("big");
    let tgt = TestDb::on(&target_url(), "big_t");
    src.sql("create table scans (id int primary key, pdf bytea)");
    let (kafka, _) = kafka_section(&src, "");
    let cfg = src.config(
        "big.toml",
        "s_big",
        &format!(
            "{kafka}[sink]\nurl = \"{}\"\nconsumer = \"test\"\ncreate_tables = true\nbatch_linger = \"20ms\"\n{}",
            tgt.url,
            tables(&["public.scans"])
        ),
    );
    let mut p = Pgferry::spawn(
        &["run", "--config", cfg.to_str().unwrap()],
        cfg.with_extension("stderr"),
    );
    wait_running(&src, "s_big", &mut p);
    src.sql(&format!(
        "insert into scans values (1, {});
         insert into scans values (2, '\\x00ff');",
        random_bytea(625_000)
    ));
    let query = "select md5(pdf) || ' ' || length(pdf) from scans where id = 1";
    let want = src.value(query).unwrap();
    assert!(want.ends_with(" 10000000"), "a 10 MB value: {want}");
    let mut alive = || {
        if let Some(status) = p.child.try_wait().unwrap() {
            panic!("pgferry stopped ({status}):\n{}", p.stderr_text());
        }
    };
    let got = wait_for(
        "the 10 MB row in the target",
        Duration::from_secs(180),
        || {
            alive();
            try_value(&tgt.url, query).flatten()
        },
    );
    assert_eq!(got, want, "the target holds the same bytes");
    let small = wait_for("the next row", T, || {
        try_value(
            &tgt.url,
            "select encode(pdf, 'hex') from scans where id = 2",
        )
        .flatten()
    });
    assert_eq!(small, "00ff");
    alive();
    assert!(p.terminate().success(), "{}", p.stderr_text());
}

#[test]
fn a_row_over_max_message_bytes_stops_the_source_without_confirming_it() {
    let db = TestDb::new("huge");
    db.sql("create table scans (id int primary key, pdf bytea)");
    let (kafka, _) = kafka_section(&db, "max_message_bytes = 1048576");
    let slot = db.slot("s_huge");
    let cfg = db.config(
        "huge.toml",
        "s_huge",
        &format!("{kafka}{}", tables(&["public.scans"])),
    );
    let (out, err) = (scratch("stdout"), scratch("stderr"));
    let mut child = spawn_quiet(
        &["run", "--only", "source", "--config", cfg.to_str().unwrap()],
        &out,
        &err,
    );
    wait_streaming_while(&db, "s_huge", || {
        child.try_wait().unwrap().map(|status| {
            format!(
                "{status}\n{}",
                std::fs::read_to_string(&err).unwrap_or_default()
            )
        })
    });

    // A small row is confirmed: confirmation works.
    let start = current_wal_lsn(&db);
    db.sql("insert into scans values (1, '\\x0102')");
    wait_for("the small row to be confirmed", T, || {
        (confirmed(&db, "s_huge") > start).then_some(())
    });

    let before = current_wal_lsn(&db);
    db.sql(&format!(
        "insert into scans values (2, {})",
        random_bytea(125_000)
    ));
    let hex = db
        .value("select encode(substring(pdf from 1000001 for 16), 'hex') from scans where id = 2")
        .unwrap();
    assert_eq!(hex.len(), 32);
    let status = wait_exit(&mut child, T, &err);
    let stderr = std::fs::read_to_string(&err).unwrap_or_default();
    let _ = std::fs::remove_file(&out);
    let _ = std::fs::remove_file(&err);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("public.scans") && stderr.contains("max_message_bytes"),
        "the error names the table and the setting:\n{stderr}"
    );
    assert!(
        !stderr.contains(&hex),
        "the value must not be printed (found {hex})"
    );
    // The server still has the row to send, in a transaction whose commit the slot
    // has not passed. (Its position may be past `before`: a keepalive received while
    // the big transaction was still being written is confirmable, since a transaction
    // is decoded again whenever its commit lies beyond confirmed_flush_lsn.)
    wait_for("the slot to be released", T, || {
        (db.value(&format!(
            "select active::text from pg_replication_slots where slot_name = '{slot}'"
        ))
        .as_deref()
            == Some("false"))
        .then_some(())
    });
    let after = confirmed(&db, "s_huge");
    let pending = db.sql(&format!(
        "with m as (select xid, data from pg_logical_slot_peek_binary_changes('{slot}', null, null, \
                    'proto_version', '1', 'publication_names', '{slot}')) \
         select ('x' || encode(substring(b.data from 2 for 8), 'hex'))::bit(64)::bigint::text \
         from m b where get_byte(b.data, 0) = 66 \
           and b.xid in (select xid from m where get_byte(data, 0) = 73 and octet_length(data) > 4000000)"
    ));
    assert_eq!(
        pending.len(),
        1,
        "the big row must still be ahead of the slot (confirmed {after:X}): {pending:?}"
    );
    let commit: u64 = pending[0][0].as_deref().unwrap().parse().unwrap();
    assert!(
        commit > before,
        "the big row commits after {before:X}: {commit:X}"
    );
    assert!(
        after <= commit,
        "the slot must not be confirmed past the refused row: {after:X} > commit {commit:X}"
    );
}

/// The target cluster, stopped for a test and started again however the test ends.
struct TargetStopped {
    started: bool,
}

fn services(args: &[&str]) -> bool {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/services.sh");
    Command::new(script)
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

impl TargetStopped {
    fn stop() -> TargetStopped {
        let mut guard = TargetStopped { started: false };
        if !services(&["stop", "hospital"]) {
            guard.start();
            panic!("scripts/services.sh stop hospital failed");
        }
        guard
    }

    fn start(&mut self) {
        if !self.started {
            self.started = true;
            assert!(
                services(&["start", "hospital"]),
                "scripts/services.sh start hospital failed"
            );
        }
    }
}

impl Drop for TargetStopped {
    fn drop(&mut self) {
        if !self.started {
            self.started = true;
            if !services(&["start", "hospital"]) {
                eprintln!("scripts/services.sh start hospital failed: start it by hand");
            }
        }
    }
}

#[test]
fn target_down_at_start_does_not_stop_the_source() {
    let _target = target_lock();
    let src = TestDb::new("tdown");
    let tgt = TestDb::on(&target_url(), "tdown_t");
    src.sql("create table o (id int primary key, v text)");
    let (kafka, prefix) = kafka_section(&src, "");
    let cfg = src.config(
        "tdown.toml",
        "s_tdown",
        &format!(
            "{kafka}[sink]\nurl = \"{}\"\nconsumer = \"test\"\ncreate_tables = true\nbatch_linger = \"20ms\"\n{}",
            tgt.url,
            tables(&["public.o"])
        ),
    );
    let port = free_port();
    listen_on(&cfg, port);

    let mut down = TargetStopped::stop();
    let mut p = Pgferry::spawn(
        &["run", "--config", cfg.to_str().unwrap()],
        cfg.with_extension("stderr"),
    );
    wait_running(&src, "s_tdown", &mut p);
    src.sql("insert into o select g, 'v' || g from generate_series(1, 50) g");
    src.sql("update o set v = 'changed' where id = 7");
    let written = current_wal_lsn(&src);

    // The source publishes to Kafka ...
    let records = consume(&brokers(), &format!("{prefix}.public.o"), 51, T);
    let schemas = schema_topic(&brokers(), &prefix, 2);
    let events: Vec<Value> = records
        .iter()
        .filter_map(|r| r.value.as_ref())
        .map(|v| to_json(&decode_single_object(v, &schemas).1))
        .collect();
    let ids: BTreeSet<i64> = events
        .iter()
        .filter(|e| e["op"] == "c")
        .map(|e| e["after"]["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, (1..=50).collect::<BTreeSet<i64>>());
    assert!(
        events
            .iter()
            .any(|e| e["op"] == "u" && e["after"]["v"] == "changed"),
        "{events:?}"
    );
    // ... and confirms the slot past those changes.
    wait_for("the slot to be confirmed past the inserts", T, || {
        (confirmed(&src, "s_tdown") >= written).then_some(())
    });
    assert!(
        p.child.try_wait().unwrap().is_none(),
        "pgferry must keep running:\n{}",
        p.stderr_text()
    );
    assert_eq!(
        http_get(port, "/healthz").0,
        200,
        "the process is alive and serving"
    );
    let (ready, body) = http_get(port, "/readyz");
    assert_ne!(ready, 200, "not ready while the sink has no target: {body}");
    assert!(
        p.stderr_text().contains("the target is not available"),
        "{}",
        p.stderr_text()
    );

    // The target comes back: the sink catches up and the process becomes ready.
    down.start();
    let query =
        "select count(*) || ' rows: ' || string_agg(id || ':' || v, ',' order by id) from o";
    let want = src.value(query).unwrap();
    assert!(want.starts_with("50 rows: "), "{want}");
    wait_for("the rows in the target", Duration::from_secs(180), || {
        if let Some(status) = p.child.try_wait().unwrap() {
            panic!("pgferry stopped ({status}):\n{}", p.stderr_text());
        }
        (try_value(&tgt.url, query).flatten().as_deref() == Some(want.as_str())).then_some(())
    });
    wait_for("/readyz to be 200", T, || {
        (http_get(port, "/readyz").0 == 200).then_some(())
    });
    assert!(p.terminate().success(), "{}", p.stderr_text());
}

#[test]
fn kafka_properties_that_weaken_durability_are_refused() {
    let db = TestDb::new("durable");
    db.sql("create table d (id int primary key)");
    let sink_url = with_db(&target_url(), "pgft_never_used");
    for (key, value) in [("acks", "1"), ("enable.auto.commit", "true")] {
        let (kafka, _) =
            kafka_section(&db, &format!("[kafka.properties]\n\"{key}\" = \"{value}\""));
        let file = format!("{}.toml", key.replace('.', "_"));
        let cfg = db.config(
            &file,
            "s_durable",
            &format!(
                "{kafka}[sink]\nurl = \"{sink_url}\"\n{}",
                tables(&["public.d"])
            ),
        );
        let path = cfg.to_str().unwrap();
        for args in [
            &["check", "--config", path][..],
            &["run", "--config", path][..],
        ] {
            let (code, out, err) = run_within(args, T);
            assert_eq!(code, 2, "{args:?} with {key} = {value}:\n{out}{err}");
            let named = format!("kafka.properties.\"{key}\"");
            assert!(
                err.contains(&named) && err.contains(path),
                "{args:?}: the error names {named} and {path}:\n{err}"
            );
        }
    }
    let slot = db.slot("s_durable");
    assert_eq!(
        db.value(&format!(
            "select count(*) from pg_replication_slots where slot_name = '{slot}'"
        ))
        .as_deref(),
        Some("0"),
        "nothing was started"
    );
}

#[test]
fn a_new_table_under_a_renamed_tables_name_is_not_merged_into_it() {
    let db = TestDb::new("reuse");
    let publication = db.slot("s_reuse");
    db.sql(&format!(
        "create table p (id int primary key, v text);
         create publication {publication} for all tables;"
    ));
    let cfg = db.config("r.toml", "s_reuse", &tables(&["public.p"]));
    let mut tail = Pgferry::tail(&cfg, &[]);
    wait_running(&db, "s_reuse", &mut tail);
    db.sql("insert into p values (1, 'old')");
    assert_eq!(tail.json(1, T)[0]["after"], json!({"id": 1, "v": "old"}));
    // A table swap: the configured table is renamed and a new one takes its name.
    db.sql(
        "alter table p rename to p2;
         create table p (id int primary key, w int);
         insert into p values (1, 42);
         insert into p2 values (2, 'old2');",
    );
    // The configured table (followed by OID) goes on; the new, unrelated table must
    // not be published under the same name (or the source must stop).
    let v = &tail.json(1, T)[0];
    assert_eq!(
        v["after"],
        json!({"id": 2, "v": "old2"}),
        "a different table (another OID) was published as public.p: {v}"
    );
}
