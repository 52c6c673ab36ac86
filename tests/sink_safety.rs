//! The sink never loses, bends or leaks data on its way into the hospital database.
//! Against the real services (two PostgreSQL clusters and the broker), this proves:
//!
//! - a value that does not fit a narrower target column (`varchar(5)`, `numeric(5,2)`,
//!   `varchar(3)[]`) is refused, never truncated: the sink stops naming topic,
//!   partition, offset and SQLSTATE, or dead-letters the event;
//! - a target table without a primary key is refused, unless the table's `key` is
//!   backed by a unique index on exactly those columns, and then updates and deletes
//!   reach the right rows;
//! - an update carrying unchanged TOAST values whose target row is missing is an error
//!   (the checkpoint does not pass it), not a silent no-op;
//! - what retrying or dead-lettering cannot fix (a wrong password, a missing table, a
//!   missing INSERT grant) stops the sink quickly, with nothing dead-lettered;
//! - no row value reaches the log (at the default level) or a dead-letter header,
//!   whatever way the event fails;
//! - an event whose schema never appears on the schema topic stalls the sink (never
//!   skipped, never dead-lettered), and after half a minute an error names it;
//! - a checkpoint beyond the end of a re-created topic stops the sink;
//! - topics that appear, and partitions added, after the sink started are consumed, and
//!   the sink is not ready while a configured table's topic does not exist;
//! - prepared statements that vanish from the target session (as behind a pooling
//!   proxy) make the sink retry and prepare per batch, with nothing lost or
//!   dead-lettered.

mod common;
mod kafka_support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer};

use common::*;
use kafka_support::*;

/// How long anything asynchronous may take on a busy two-core machine.
const T: Duration = Duration::from_secs(120);

/// A row value that must never show up in a log line or a dead-letter header.
const MARKER: &str = "PHI-MARKER-7731";

fn target_url() -> String {
    service_env("PGFERRY_TARGET_URL")
}

/// A config for source `src` and the sink into `tgt_url`, with a topic prefix of its
/// own; returns the file and the prefix. `kafka_extra` and `sink_extra` are lines of those sections.
fn pipeline_config(
    src: &TestDb,
    tgt_url: &str,
    slot: &str,
    kafka_extra: &str,
    sink_extra: &str,
    tables: &str,
) -> (PathBuf, String) {
    let prefix = format!("t{}", src.name);
    let cfg = src.config(
        &format!("{slot}.toml"),
        slot,
        &format!(
            "[kafka]\nbrokers = \"{}\"\ntopic_prefix = \"{prefix}\"\n{kafka_extra}\n\
             [sink]\nurl = \"{tgt_url}\"\nconsumer = \"test\"\nbatch_linger = \"20ms\"\n{sink_extra}\n{tables}",
            brokers()
        ),
    );
    (cfg, prefix)
}

/// The same config under another name, with its HTTP server on `port`.
fn with_listen(cfg: &Path, port: u16) -> PathBuf {
    let text = std::fs::read_to_string(cfg)
        .unwrap()
        .replace("listen = \"\"", &format!("listen = \"127.0.0.1:{port}\""));
    let path = cfg.with_extension(format!("http{port}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// A copy of a config file under another name, with `from` replaced by `to`.
fn variant(cfg: &Path, name: &str, from: &str, to: &str) -> PathBuf {
    let text = std::fs::read_to_string(cfg).unwrap();
    assert!(text.contains(from), "{from} is not in {}", cfg.display());
    let path = cfg.with_file_name(format!("{name}.toml"));
    std::fs::write(&path, text.replace(from, to)).unwrap();
    path
}

fn unique_stderr(cfg: &Path, what: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    cfg.with_extension(format!("{what}.{nanos}.stderr"))
}

/// `pgferry run [--only STAGE] --config CFG`.
fn spawn(cfg: &Path, only: Option<&str>) -> Pgferry {
    let mut args = vec!["run"];
    if let Some(stage) = only {
        args.extend(["--only", stage]);
    }
    args.extend(["--config", cfg.to_str().unwrap()]);
    Pgferry::spawn(&args, unique_stderr(cfg, only.unwrap_or("run")))
}

/// Wait for the process to exit (failing with its stderr after `timeout`).
fn wait_exit(p: &mut Pgferry, timeout: Duration) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = p.child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            panic!(
                "pgferry still runs after {timeout:?}; stderr:\n{}",
                p.stderr_text()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Wait until the slot `tag` is streamed by `p`, failing early (with its stderr) if
/// `p` exits.
fn streaming(src: &TestDb, tag: &str, p: &mut Pgferry) {
    let query = format!(
        "select count(*) from pg_stat_replication r join pg_replication_slots s on s.active_pid = r.pid \
         where s.slot_name = '{}'",
        src.slot(tag)
    );
    wait_value(src, &query, "1", p);
}

/// Poll `query` on `db` until it returns `want`; fails with the process's stderr, and
/// early if the process exits.
fn wait_value(db: &TestDb, query: &str, want: &str, p: &mut Pgferry) {
    let deadline = Instant::now() + T;
    loop {
        // The sink creates its tables as it starts: until then the query fails.
        let got = std::panic::catch_unwind(|| db.value(query)).ok().flatten();
        if got.as_deref() == Some(want) {
            return;
        }
        if let Some(status) = p.child.try_wait().unwrap() {
            panic!(
                "pgferry exited ({status}) while waiting for `{query}` = {want} (got {got:?}); stderr:\n{}",
                p.stderr_text()
            );
        }
        if Instant::now() > deadline {
            panic!(
                "`{query}` is {got:?}, not {want}, after {T:?}; stderr:\n{}",
                p.stderr_text()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

const IDS: &str = "select coalesce(string_agg(id::text, ',' order by id), '') from";

/// The next offset checkpointed for a partition, if any.
fn next_offset(tgt: &TestDb, topic: &str, partition: i32) -> Option<String> {
    tgt.value(&format!(
        "select next_offset::text from pgferry.checkpoints where topic = '{topic}' and partition = {partition}"
    ))
}

fn checkpoint_rows(tgt: &TestDb, topic: &str) -> String {
    tgt.value(&format!(
        "select count(*) from pgferry.checkpoints where topic = '{topic}'"
    ))
    .unwrap()
}

// ---- Kafka administration -----------------------------------------------------------

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

fn admin() -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("Kafka admin client")
}

fn admin_options() -> AdminOptions {
    AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)))
}

fn metadata_consumer() -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", "pgferry-tests")
        .create()
        .expect("Kafka metadata client")
}

/// (low, high) watermarks of every partition of `topic`, by partition id; `None` when
/// the topic does not exist. (A metadata request for all topics never creates one.)
fn watermarks(topic: &str) -> Option<Vec<(i64, i64)>> {
    let c = metadata_consumer();
    let meta = c
        .fetch_metadata(None, Duration::from_secs(10))
        .expect("Kafka metadata");
    let t = meta
        .topics()
        .iter()
        .find(|t| t.name() == topic && !t.partitions().is_empty())?;
    let mut ids: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
    ids.sort_unstable();
    Some(
        ids.into_iter()
            .map(|p| {
                c.fetch_watermarks(topic, p, Duration::from_secs(10))
                    .expect("watermarks")
            })
            .collect(),
    )
}

/// How many messages `topic` holds (0 when it does not exist).
fn messages_in(topic: &str) -> i64 {
    watermarks(topic).map_or(0, |w| w.iter().map(|(l, h)| h - l).sum())
}

fn create_topic(topic: &str, partitions: i32) {
    let admin = admin();
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    // Right after a deletion the broker may still hold the old topic for a moment.
    wait_for(&format!("creating topic {topic}"), T, || {
        let r = block_on(admin.create_topics([&new], &admin_options())).expect("CreateTopics");
        match &r[0] {
            Ok(_) => Some(()),
            Err((_, code)) => {
                eprintln!("creating topic {topic}: {code}; retrying");
                None
            }
        }
    });
    wait_for(&format!("topic {topic} in the metadata"), T, || {
        watermarks(topic).filter(|w| w.len() == partitions as usize)
    });
}

fn delete_topic(topic: &str) {
    let r = block_on(admin().delete_topics(&[topic], &admin_options())).expect("DeleteTopics");
    assert!(r[0].is_ok(), "deleting topic {topic}: {:?}", r[0]);
    wait_for(&format!("topic {topic} to be gone"), T, || {
        watermarks(topic).is_none().then_some(())
    });
}

fn add_partitions(topic: &str, total: usize) {
    let r =
        block_on(admin().create_partitions([&NewPartitions::new(topic, total)], &admin_options()))
            .expect("CreatePartitions");
    assert!(r[0].is_ok(), "adding partitions to {topic}: {:?}", r[0]);
    wait_for(&format!("{topic} to have {total} partitions"), T, || {
        watermarks(topic).filter(|w| w.len() == total)
    });
}

/// Produce a message as pgferry's source would (same key and headers).
fn produce(topic: &str, partition: i32, record: &Record, value: &[u8]) {
    let producer: rdkafka::producer::BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("test producer");
    let mut headers = OwnedHeaders::new();
    for (k, v) in &record.headers {
        headers = headers.insert(Header {
            key: k,
            value: Some(v.as_bytes()),
        });
    }
    let mut r: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic)
        .partition(partition)
        .payload(value)
        .headers(headers);
    if let Some(k) = &record.key {
        r = r.key(k.as_slice());
    }
    producer.send(r).map_err(|(e, _)| e).expect("producing");
    producer.flush(Duration::from_secs(30)).expect("flushing");
}

fn replace_bytes(haystack: &[u8], needle: &[u8], with: &[u8]) -> Vec<u8> {
    assert_eq!(
        needle.len(),
        with.len(),
        "same length keeps the Avro framing"
    );
    let at = haystack
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap_or_else(|| panic!("{:?} is not in the event", String::from_utf8_lossy(needle)));
    let mut out = haystack.to_vec();
    out[at..at + with.len()].copy_from_slice(with);
    out
}

// ---- 1. Narrower target columns ---------------------------------------------------------

#[test]
fn a_value_too_long_for_its_target_column_stops_the_sink_instead_of_truncating() {
    let src = TestDb::new("narrow");
    let tgt = TestDb::on(&target_url(), "narrow_t");
    src.sql("create table p (id int primary key, name text)");
    tgt.sql("create table p (id int primary key, name varchar(5))");
    let (cfg, prefix) = pipeline_config(
        &src,
        &tgt.url,
        "s_narrow",
        "",
        "",
        "[[tables]]\nsource = \"public.p\"\n",
    );
    let topic = format!("{prefix}.public.p");
    let mut p = spawn(&cfg, None);
    streaming(&src, "s_narrow", &mut p);
    src.sql("insert into p values (1, 'Ann')");
    wait_value(&tgt, &format!("{IDS} p"), "1", &mut p);
    let at = next_offset(&tgt, &topic, 0).expect("a checkpoint after the first row");

    src.sql("insert into p values (2, 'Jonathan Smith-Worthington')");
    let status = wait_exit(&mut p, T);
    let stderr = p.stderr_text();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "poison event at topic {topic} partition 0 offset {at}"
        )),
        "{stderr}"
    );
    assert!(stderr.contains("SQLSTATE 22001"), "{stderr}");
    // Every column of `p` has a binary encoding: the binary COPY was refused first, and
    // the text form judged the value (the same refusal), naming no value on the way.
    let fallback = stderr
        .lines()
        .find(|l| l.contains("the target refused a binary COPY"))
        .unwrap_or_else(|| panic!("no binary-to-text fallback was logged: {stderr}"));
    assert!(
        fallback.contains("WARN") && fallback.contains("public.p") && fallback.contains("22001"),
        "{fallback}"
    );
    assert!(
        !stderr.contains("Jonathan"),
        "a row value reached the log: {stderr}"
    );
    assert_eq!(
        tgt.value("select count(*) from p where id = 2").as_deref(),
        Some("0"),
        "the row must not arrive (truncated or otherwise)"
    );
    assert_eq!(
        next_offset(&tgt, &topic, 0),
        Some(at),
        "the checkpoint stays before the refused event"
    );
}

#[test]
fn values_that_overflow_narrower_columns_go_to_the_dlq_untruncated() {
    let src = TestDb::new("narrowdlq");
    let tgt = TestDb::on(&target_url(), "narrowdlq_t");
    src.sql("create table p (id int primary key, name text, amount numeric, tags text[])");
    tgt.sql(
        "create table p (id int primary key, name varchar(5), amount numeric(5,2), tags varchar(3)[])",
    );
    let (cfg, prefix) = pipeline_config(
        &src,
        &tgt.url,
        "s_narrowdlq",
        "",
        "on_error = \"dlq\"",
        "[[tables]]\nsource = \"public.p\"\n",
    );
    let topic = format!("{prefix}.public.p");
    let mut p = spawn(&cfg, None);
    streaming(&src, "s_narrowdlq", &mut p);
    src.sql(
        "insert into p values (1, 'Ann', 1.5, '{ab}');
         insert into p values (2, 'Jonathan Smith-Worthington', 1.5, '{ab}');
         insert into p values (3, 'Bo', 12345.67, '{ab}');
         insert into p values (4, 'Cy', 1.5, '{ab,abcde}');
         insert into p values (5, 'Di', 999.99, '{abc}');",
    );
    wait_value(&tgt, &format!("{IDS} p"), "1,5", &mut p);
    wait_value(
        &tgt,
        &format!("select next_offset from pgferry.checkpoints where topic = '{topic}'"),
        "5",
        &mut p,
    );
    assert_eq!(
        tgt.sql("select id::text, name::text, amount::text, tags::text from p order by id"),
        [
            [Some("1"), Some("Ann"), Some("1.50"), Some("{ab}")],
            [Some("5"), Some("Di"), Some("999.99"), Some("{abc}")],
        ]
        .map(|r| r.map(|v| v.map(str::to_string)).to_vec())
        .to_vec()
    );
    let dead = consume_all(
        &brokers(),
        &format!("{topic}.dlq"),
        3,
        T,
        Duration::from_secs(2),
    );
    let mut errors: Vec<(String, String)> = dead
        .iter()
        .map(|r| {
            (
                r.headers["pgferry.source_offset"].clone(),
                r.headers["pgferry.error"].clone(),
            )
        })
        .collect();
    errors.sort();
    assert_eq!(errors.len(), 3, "{errors:?}");
    for ((offset, error), (want_offset, want_state)) in
        errors
            .iter()
            .zip([("1", "22001"), ("2", "22003"), ("3", "22001")])
    {
        assert_eq!(offset, want_offset, "{errors:?}");
        assert!(
            error.contains(&format!("SQLSTATE {want_state}")),
            "offset {offset}: {error}"
        );
    }
}

// ---- 2. Keyless targets -----------------------------------------------------------------

/// A copy of `cfg` named `name` whose `tables_dir` holds one table file, `public.k.toml`.
fn with_table_file(cfg: &Path, name: &str, table_file: &str) -> PathBuf {
    let dir = cfg.parent().unwrap().join(format!("{name}.tables"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("public.k.toml"), table_file).unwrap();
    let text = std::fs::read_to_string(cfg).unwrap();
    let path = cfg.with_file_name(format!("{name}.toml"));
    std::fs::write(&path, format!("tables_dir = \"{name}.tables\"\n{text}")).unwrap();
    path
}

#[test]
fn a_target_without_primary_key_is_refused_naming_the_table() {
    let src = TestDb::new("keyless");
    let tgt = TestDb::on(&target_url(), "keyless_t");
    src.sql("create table k (id int primary key, v text)");
    // A unique index, but not on exactly the configured key.
    tgt.sql("create table k (id int not null, v text); create unique index on k (id, v)");
    let (base, prefix) = pipeline_config(&src, &tgt.url, "s_keyless", "", "", "");
    let topic = format!("{prefix}.public.k");

    let cfg = with_table_file(&base, "nokey", "source = \"public.k\"\n");
    let mut p = spawn(&cfg, None);
    streaming(&src, "s_keyless", &mut p);
    src.sql("insert into k values (1, 'a')");
    let status = wait_exit(&mut p, T);
    let stderr = p.stderr_text();
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("target table public.k has no primary key"),
        "{stderr}"
    );

    // A configured key needs a unique index on exactly its columns.
    let cfg = with_table_file(&base, "key", "source = \"public.k\"\nkey = [\"id\"]\n");
    let mut p = spawn(&cfg, None);
    let status = wait_exit(&mut p, T);
    let stderr = p.stderr_text();
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "target table public.k has no primary key and no unique index on the configured key (id)"
        ),
        "{stderr}"
    );
    assert_eq!(tgt.value("select count(*) from k").as_deref(), Some("0"));
    assert_eq!(checkpoint_rows(&tgt, &topic), "0");
}

#[test]
fn a_keyless_target_with_a_configured_key_and_unique_index_takes_updates_and_deletes() {
    let src = TestDb::new("keyed");
    let tgt = TestDb::on(&target_url(), "keyed_t");
    src.sql("create table k (id int primary key, v text)");
    tgt.sql("create table k (id int not null, v text); create unique index k_id on k (id)");
    let (base, _) = pipeline_config(&src, &tgt.url, "s_keyed", "", "", "");
    let cfg = with_table_file(&base, "key", "source = \"public.k\"\nkey = [\"id\"]\n");
    let mut p = spawn(&cfg, None);
    streaming(&src, "s_keyed", &mut p);
    src.sql("insert into k values (1, 'a'), (2, 'b'), (3, 'c'), (4, 'd')");
    wait_value(&tgt, &format!("{IDS} k"), "1,2,3,4", &mut p);
    src.sql(
        "update k set v = 'B' where id = 2;
         delete from k where id = 3;
         update k set id = 10 where id = 1;
         update k set v = v || '!' where id = 4;",
    );
    let rows = "select string_agg(id || ':' || v, ',' order by id) from k";
    wait_value(&tgt, rows, "2:B,4:d!,10:a", &mut p);
    assert_eq!(
        tgt.value("select count(*) from k").as_deref(),
        Some("3"),
        "no duplicate rows"
    );
    assert_eq!(tgt.value(rows), src.value(rows));
}

// ---- 3. Unchanged TOAST values without a target row ------------------------------------------

#[test]
fn an_unchanged_toast_update_whose_target_row_is_missing_is_an_error() {
    let src = TestDb::new("toast");
    let tgt = TestDb::on(&target_url(), "toast_t");
    src.sql(
        "create table t (id int primary key, big text, n int);
         alter table t alter column big set storage external;
         alter table t replica identity default;",
    );
    tgt.sql("create table t (id int primary key, big text, n int)");
    let tables = "[[tables]]\nsource = \"public.t\"\n";
    let (cfg, prefix) = pipeline_config(&src, &tgt.url, "s_toast", "", "", tables);
    let topic = format!("{prefix}.public.t");
    let mut p = spawn(&cfg, None);
    streaming(&src, "s_toast", &mut p);
    // 16 kB of hex digits, stored out of line: an update of `n` sends `big` as unchanged.
    src.sql(
        "insert into t select g, (select string_agg(md5(g::text || h::text), '') \
         from generate_series(1, 500) h), 0 from generate_series(1, 2) g",
    );
    wait_value(
        &tgt,
        "select count(*) from t where length(big) = 16000",
        "2",
        &mut p,
    );
    let at = next_offset(&tgt, &topic, 0).expect("a checkpoint after the inserts");
    tgt.sql("delete from t where id = 1");
    src.sql("update t set n = 1 where id = 1");

    let status = wait_exit(&mut p, T);
    let stderr = p.stderr_text();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "poison event at topic {topic} partition 0 offset {at}"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains("found 0 of 1 rows in target table public.t"),
        "{stderr}"
    );
    assert_eq!(
        next_offset(&tgt, &topic, 0),
        Some(at.clone()),
        "the checkpoint does not pass the update"
    );

    // With dead-lettering the update is set aside, and the next one applies.
    let dlq_cfg = variant(
        &cfg,
        "dlq",
        "batch_linger = \"20ms\"\n",
        "batch_linger = \"20ms\"\non_error = \"dlq\"\n",
    );
    let mut p = spawn(&dlq_cfg, None);
    src.sql("update t set n = 2 where id = 2");
    wait_value(&tgt, "select n from t where id = 2", "2", &mut p);
    let dead = consume(&brokers(), &format!("{topic}.dlq"), 1, T);
    assert_eq!(dead[0].headers["pgferry.source_offset"], at);
    assert_eq!(dead[0].headers["pgferry.unchanged"], "big");
    assert!(
        dead[0].headers["pgferry.error"].contains("found 0 of 1 rows"),
        "{:?}",
        dead[0].headers
    );
    assert_eq!(
        tgt.value("select count(*) from t").as_deref(),
        Some("1"),
        "the missing row is not invented"
    );
    let big = "select md5(big) from t where id = 2";
    assert_eq!(
        tgt.value(big),
        src.value(big),
        "the unchanged value is kept"
    );
}

// ---- 4. Errors that retrying or dead-lettering cannot fix --------------------------------

#[test]
fn a_wrong_target_password_stops_the_sink_instead_of_retrying() {
    let src = TestDb::new("tgtpw");
    let tgt = TestDb::on(&target_url(), "tgtpw_t");
    src.sql("create table w (id int primary key, v text)");
    // The target's pg_hba asks this role (only) for a SCRAM password on TCP.
    tgt.sql(&format!(
        "do $$ begin create role pgferry_scram login; exception when duplicate_object then null; end $$;
         set password_encryption = 'scram-sha-256';
         alter role pgferry_scram password 'pw-scram-target';
         grant create on database {} to pgferry_scram;
         create table w (id int primary key, v text);
         grant select, insert, update, delete on w to pgferry_scram;",
        tgt.name
    ));
    let right = tgt
        .url
        .replace("postgres@", "pgferry_scram:pw-scram-target@");
    assert_ne!(right, tgt.url);
    let (cfg, prefix) = pipeline_config(
        &src,
        &right,
        "s_tgtpw",
        "",
        "",
        "[[tables]]\nsource = \"public.w\"\n",
    );
    let topic = format!("{prefix}.public.w");
    let no_secret = |stderr: &str| {
        for secret in ["pw-scram-target", "not-the-password"] {
            assert!(!stderr.contains(secret), "a password in the log: {stderr}");
        }
    };

    // Wrong from the start.
    let wrong = variant(&cfg, "wrong", "pw-scram-target@", "not-the-password@");
    let mut sink = spawn(&wrong, Some("sink"));
    let status = wait_exit(&mut sink, Duration::from_secs(30));
    let stderr = sink.stderr_text();
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("password authentication failed"),
        "{stderr}"
    );
    no_secret(&stderr);

    // Wrong when the sink reconnects (the password changed under it): no retrying forever.
    let mut source = spawn(&cfg, Some("source"));
    let mut sink = spawn(&cfg, Some("sink"));
    streaming(&src, "s_tgtpw", &mut source);
    src.sql("insert into w values (1, 'a')");
    wait_value(&tgt, &format!("{IDS} w"), "1", &mut sink);
    tgt.sql(
        "alter role pgferry_scram password 'pw-changed';
         select pg_terminate_backend(pid) from pg_stat_activity where usename = 'pgferry_scram';",
    );
    src.sql("insert into w values (2, 'b')");
    let status = wait_exit(&mut sink, Duration::from_secs(30));
    let stderr = sink.stderr_text();
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("password authentication failed"),
        "{stderr}"
    );
    no_secret(&stderr);
    assert_eq!(tgt.value(&format!("{IDS} w")).as_deref(), Some("1"));
    assert_eq!(next_offset(&tgt, &topic, 0).as_deref(), Some("1"));
}

#[test]
fn a_missing_target_table_stops_the_sink_even_in_dlq_mode() {
    let src = TestDb::new("notable");
    let tgt = TestDb::on(&target_url(), "notable_t");
    src.sql("create table m (id int primary key, v text)");
    let (cfg, prefix) = pipeline_config(
        &src,
        &tgt.url,
        "s_notable",
        "",
        "create_tables = false\non_error = \"dlq\"",
        "[[tables]]\nsource = \"public.m\"\n",
    );
    let topic = format!("{prefix}.public.m");
    let mut p = spawn(&cfg, None);
    streaming(&src, "s_notable", &mut p);
    src.sql("insert into m values (1, 'a'); insert into m values (2, 'b');");
    let status = wait_exit(&mut p, T);
    let stderr = p.stderr_text();
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("target table public.m does not exist"),
        "{stderr}"
    );
    assert!(messages_in(&topic) >= 1, "the events are in Kafka");
    assert_eq!(
        messages_in(&format!("{topic}.dlq")),
        0,
        "nothing is dead-lettered"
    );
    assert_eq!(checkpoint_rows(&tgt, &topic), "0");
}

/// Drops a cluster-wide role at the end of a test (declare it before the databases
/// the role has privileges in, so that they are dropped first).
struct Role {
    admin_url: String,
    name: String,
}

impl Drop for Role {
    fn drop(&mut self) {
        let _ = std::panic::catch_unwind(|| {
            sql(
                &self.admin_url,
                &format!("drop role if exists {}", self.name),
            )
        });
    }
}

#[test]
fn a_target_role_without_insert_privilege_stops_the_sink_even_in_dlq_mode() {
    let role = Role {
        admin_url: with_db(&target_url(), "postgres"),
        name: format!("pgft_noinsert_{}", std::process::id()),
    };
    let src = TestDb::new("noins");
    let tgt = TestDb::on(&target_url(), "noins_t");
    src.sql("create table g (id int primary key, v text)");
    tgt.sql(&format!(
        "drop role if exists {r}; create role {r} login;
         grant create on database {db} to {r};
         create table g (id int primary key, v text);
         grant select, update, delete on g to {r};",
        r = role.name,
        db = tgt.name
    ));
    let url = tgt.url.replace("postgres@", &format!("{}@", role.name));
    let (cfg, prefix) = pipeline_config(
        &src,
        &url,
        "s_noins",
        "",
        "on_error = \"dlq\"",
        "[[tables]]\nsource = \"public.g\"\n",
    );
    let topic = format!("{prefix}.public.g");
    let mut p = spawn(&cfg, None);
    streaming(&src, "s_noins", &mut p);
    src.sql("insert into g values (1, 'a'); insert into g values (2, 'b');");
    let status = wait_exit(&mut p, T);
    let stderr = p.stderr_text();
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("permission denied for table g") && stderr.contains("42501"),
        "{stderr}"
    );
    assert!(messages_in(&topic) >= 1, "the events are in Kafka");
    assert_eq!(
        messages_in(&format!("{topic}.dlq")),
        0,
        "nothing is dead-lettered"
    );
    assert_eq!(checkpoint_rows(&tgt, &topic), "0");
    assert_eq!(tgt.value("select count(*) from g").as_deref(), Some("0"));
}

// ---- 5. No PHI in logs or dead-letter headers ---------------------------------------------

/// `pgferry run` at the default log level (no debug), stderr to a file.
struct InfoRun {
    child: Child,
    stderr: PathBuf,
}

impl InfoRun {
    fn spawn(cfg: &Path) -> InfoRun {
        let stderr = unique_stderr(cfg, "info");
        let child = Command::new(BIN)
            .args(["run", "--config", cfg.to_str().unwrap()])
            .env("PGFERRY_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("spawning pgferry");
        InfoRun { child, stderr }
    }

    fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("pgferry exited ({status}); stderr:\n{}", self.stderr_text());
        }
    }
}

impl Drop for InfoRun {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every DLQ record of `topic` (at least `n`), checked for the marker in its headers.
fn assert_no_marker_in_dlq_headers(dlq: &str, n: usize) -> Vec<Record> {
    let dead = consume_all(&brokers(), dlq, n, T, Duration::from_secs(3));
    assert_eq!(
        dead.len(),
        n,
        "{:?}",
        dead.iter().map(|r| &r.headers).collect::<Vec<_>>()
    );
    for r in &dead {
        for (k, v) in &r.headers {
            assert!(
                !k.contains(MARKER) && !v.contains(MARKER),
                "a row value in dead-letter header {k}: {v}"
            );
        }
        // The payload is the original event: the value is there, so the check above
        // had something to find.
        let payload = r.value.as_deref().unwrap_or_default();
        assert!(
            payload
                .windows(MARKER.len())
                .any(|w| w == MARKER.as_bytes()),
            "the event at offset {} does not carry the marker",
            r.headers["pgferry.source_offset"]
        );
    }
    dead
}

#[test]
fn row_values_refused_by_the_target_never_reach_logs_or_dlq_headers() {
    let src = TestDb::new("phi");
    let tgt = TestDb::on(&target_url(), "phi_t");
    src.sql(
        "create table phi (id int primary key, name text, age text, mrn text, tags text[], note text, ward text)",
    );
    tgt.sql(
        "create table phi (id int primary key, name varchar(5), age integer, mrn text unique,
                           tags varchar(3)[], note text check (length(note) < 20), ward text not null)",
    );
    let (cfg, prefix) = pipeline_config(
        &src,
        &tgt.url,
        "s_phi",
        "",
        "on_error = \"dlq\"",
        "[[tables]]\nsource = \"public.phi\"\n",
    );
    let topic = format!("{prefix}.public.phi");
    let mut p = InfoRun::spawn(&cfg);
    wait_streaming(&src, "s_phi");
    let m = MARKER;
    src.sql(&format!(
        "insert into phi values (1, 'Ann', '42', '{m}', '{{ab}}', 'ok', 'w1');
         insert into phi values (2, '{m}', '42', 'mrn-2', '{{ab}}', 'ok', 'w1');         -- 22001
         insert into phi values (3, 'Bo', '{m}', 'mrn-3', '{{ab}}', 'ok', 'w1');         -- 22P02
         insert into phi values (4, 'Cy', '42', '{m}', '{{ab}}', 'ok', 'w1');            -- 23505
         insert into phi values (5, 'Di', '42', 'mrn-5', '{{ab,{m}}}', 'ok', 'w1');      -- 22001
         insert into phi values (6, 'Ed', '42', 'mrn-6', '{{ab}}', '{m} {m}', 'w1');     -- 23514
         insert into phi values (7, 'Flo', '42', 'mrn-7', '{{ab}}', '{m}', null);        -- 23502
         insert into phi values (8, 'Gus', '42', 'mrn-8', '{{ab}}', 'ok', 'w2');"
    ));
    let deadline = Instant::now() + T;
    while tgt.value(&format!("{IDS} phi")).as_deref() != Some("1,8") {
        p.assert_running();
        assert!(
            Instant::now() < deadline,
            "rows 1 and 8 did not arrive; stderr:\n{}",
            p.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let dead = assert_no_marker_in_dlq_headers(&format!("{topic}.dlq"), 6);
    let mut states: Vec<String> = dead
        .iter()
        .map(|r| {
            let e = &r.headers["pgferry.error"];
            let at = e.find("SQLSTATE ").expect("the error names its SQLSTATE") + 9;
            e[at..at + 5].to_string()
        })
        .collect();
    states.sort();
    assert_eq!(
        states,
        ["22001", "22001", "22P02", "23502", "23505", "23514"]
    );
    p.assert_running();
    let stderr = p.stderr_text();
    assert_eq!(
        stderr
            .matches("poison event sent to the dead-letter topic")
            .count(),
        6,
        "{stderr}"
    );
    assert!(
        !stderr.contains(MARKER),
        "a row value in the log:\n{stderr}"
    );
}

/// A running `on_error = "dlq"` pipeline of table `x` (`columns`, the same in source
/// and target) at the default log level, with the row `values` (id 1) applied; its
/// Kafka message is returned to be copied in altered forms.
struct OneRow {
    src: TestDb,
    tgt: TestDb,
    prefix: String,
    topic: String,
    p: InfoRun,
    original: Record,
}

fn one_row_applied(tag: &str, columns: &str, values: &str) -> OneRow {
    let src = TestDb::new(tag);
    let tgt = TestDb::on(&target_url(), &format!("{tag}_t"));
    src.sql(&format!("create table x ({columns})"));
    tgt.sql(&format!("create table x ({columns})"));
    let slot = format!("s_{tag}");
    let (cfg, prefix) = pipeline_config(
        &src,
        &tgt.url,
        &slot,
        "",
        "on_error = \"dlq\"",
        "[[tables]]\nsource = \"public.x\"\n",
    );
    let topic = format!("{prefix}.public.x");
    let mut p = InfoRun::spawn(&cfg);
    wait_streaming(&src, &slot);
    src.sql(&format!("insert into x values ({values})"));
    let deadline = Instant::now() + T;
    while tgt.value(&format!("{IDS} x")).as_deref() != Some("1") {
        p.assert_running();
        assert!(Instant::now() < deadline, "{}", p.stderr_text());
        std::thread::sleep(Duration::from_millis(200));
    }
    let original = consume(&brokers(), &topic, 1, T).remove(0);
    OneRow {
        src,
        tgt,
        prefix,
        topic,
        p,
        original,
    }
}

#[test]
fn row_values_of_undecodable_events_never_reach_logs_or_dlq_headers() {
    // The databases are bound so that they live (and are dropped) with the test.
    let OneRow {
        src: _src,
        tgt: _tgt,
        prefix: _,
        topic,
        mut p,
        original,
    } = one_row_applied(
        "phidec",
        "id int primary key, name text, seen timestamptz",
        &format!("1, '{MARKER} x', '2026-11-22 01:02:03.123456+00'"),
    );
    // Two corrupted copies of that event: invalid UTF-8 right after the marker in a
    // text value, and the marker as the text of a timestamptz value.
    let value = original.value.clone().unwrap();
    let mut invalid = format!("{MARKER} ").into_bytes();
    invalid.push(0xff);
    let bad_utf8 = replace_bytes(&value, format!("{MARKER} x").as_bytes(), &invalid);
    let bad_time = replace_bytes(&value, b"2026-11-22T01:02:03", b"PHI-MARKER-7731xxxx");
    produce(&topic, 0, &original, &bad_utf8);
    produce(&topic, 0, &original, &bad_time);

    let dead = assert_no_marker_in_dlq_headers(&format!("{topic}.dlq"), 2);
    for r in &dead {
        assert!(
            r.headers["pgferry.error"].contains("cannot decode"),
            "{:?}",
            r.headers
        );
    }
    p.assert_running();
    let stderr = p.stderr_text();
    assert!(
        !stderr.contains(MARKER),
        "a row value in the log:\n{stderr}"
    );
}

/// An event naming a schema that is not on `<prefix>._schemas` (here: its fingerprint
/// altered; in life, a schema topic deleted or re-created) is neither skipped nor
/// dead-lettered, even with `on_error = "dlq"`: the sink waits, applies nothing after
/// it, and after half a minute says so once at error level, naming the fingerprint,
/// the event's place and what to do.
#[test]
fn an_event_whose_schema_never_comes_stalls_the_sink_with_an_error_naming_it() {
    let OneRow {
        src,
        tgt,
        prefix,
        topic,
        mut p,
        original,
    } = one_row_applied("noschema", "id int primary key, name text", "1, 'one'");
    // A copy of that event whose single-object header names another fingerprint
    // (bytes 2..10 after the C3 01 marker), then a new row behind it.
    let mut value = original.value.clone().unwrap();
    assert_eq!(&value[..2], &[0xC3, 0x01], "single-object framing");
    value[2..10].copy_from_slice(&[0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x08]);
    let stalled_at = messages_in(&topic);
    produce(&topic, 0, &original, &value);
    src.sql("insert into x values (2, 'two')");

    // The fingerprint as the schema topic's key spells it (u64 of the LE bytes).
    let fingerprint = "0877665544332211";
    let deadline = Instant::now() + T;
    let alert = loop {
        p.assert_running();
        let stderr = p.stderr_text();
        if let Some(line) = stderr
            .lines()
            .find(|l| l.contains("ERROR") && l.contains("has waited"))
        {
            break line.to_string();
        }
        assert!(Instant::now() < deadline, "no error after {T:?}:\n{stderr}");
        std::thread::sleep(Duration::from_millis(500));
    };
    for part in [
        fingerprint,
        &format!("{prefix}._schemas"),
        &format!("offset={stalled_at}"),
        "restarting the source publishes the schemas it uses again",
        "never skips",
    ] {
        assert!(alert.contains(part), "{part:?} not in {alert}");
    }
    // Said once, not on every retry.
    std::thread::sleep(Duration::from_secs(15));
    p.assert_running();
    let stderr = p.stderr_text();
    assert_eq!(stderr.matches("has waited").count(), 1, "{stderr}");
    // Nothing passed the stalled event: not the row behind it, not the checkpoint, and
    // nothing went to the dead-letter topic.
    assert_eq!(tgt.value(&format!("{IDS} x")).as_deref(), Some("1"));
    assert_eq!(
        next_offset(&tgt, &topic, 0).as_deref(),
        Some(stalled_at.to_string().as_str())
    );
    assert_eq!(messages_in(&format!("{topic}.dlq")), 0);
}

// ---- 6. Offsets ---------------------------------------------------------------------------

#[test]
fn a_checkpoint_beyond_the_end_of_a_recreated_topic_stops_the_sink() {
    let src = TestDb::new("recreate");
    let tgt = TestDb::on(&target_url(), "recreate_t");
    src.sql("create table o (id int primary key, v int)");
    let (cfg, prefix) = pipeline_config(
        &src,
        &tgt.url,
        "s_recreate",
        "",
        "create_tables = true",
        "[[tables]]\nsource = \"public.o\"\n",
    );
    let topic = format!("{prefix}.public.o");
    let mut p = spawn(&cfg, None);
    streaming(&src, "s_recreate", &mut p);
    src.sql(
        "insert into o values (1, 1); insert into o values (2, 2); insert into o values (3, 3);",
    );
    wait_value(
        &tgt,
        &format!("select next_offset from pgferry.checkpoints where topic = '{topic}'"),
        "3",
        &mut p,
    );
    let status = p.terminate();
    assert!(status.success(), "{}", p.stderr_text());

    delete_topic(&topic);
    create_topic(&topic, 1);
    assert_eq!(watermarks(&topic), Some(vec![(0, 0)]));

    let mut sink = spawn(&cfg, Some("sink"));
    let status = wait_exit(&mut sink, T);
    let stderr = sink.stderr_text();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "the target's checkpoint for topic {topic} partition 0 is at offset 3, beyond the partition's end 0"
        )),
        "{stderr}"
    );
    assert_eq!(next_offset(&tgt, &topic, 0).as_deref(), Some("3"));
}

// ---- 7. Topic discovery -------------------------------------------------------------------

/// `/readyz`'s status, or `None` while nothing listens yet.
fn readyz(port: u16) -> Option<u16> {
    std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    Some(http_get(port, "/readyz").0)
}

#[test]
fn the_sink_is_not_ready_until_every_topic_exists_and_consumes_topics_created_later() {
    let src = TestDb::new("discover");
    let tgt = TestDb::on(&target_url(), "discover_t");
    let ddl = "create table a (id int primary key, v text);
               create table b (id int primary key, v text);";
    src.sql(ddl);
    tgt.sql(ddl);
    let (cfg, prefix) = pipeline_config(
        &src,
        &tgt.url,
        "s_discover",
        "partitions = 2",
        "",
        "[[tables]]\nsource = \"public.a\"\n[[tables]]\nsource = \"public.b\"\n",
    );
    let (topic_a, topic_b) = (format!("{prefix}.public.a"), format!("{prefix}.public.b"));
    let port = free_port();
    let mut sink = spawn(&with_listen(&cfg, port), Some("sink"));

    // No topic yet.
    wait_for("the sink to look for its topics", T, || {
        sink.stderr_text()
            .contains("waiting for topics to exist")
            .then_some(())
    });
    let code = readyz(port);
    assert!(code.is_some() && code != Some(200), "/readyz: {code:?}");

    // One of the two topics.
    create_topic(&topic_a, 2);
    wait_for("the sink to assign the first topic", T, || {
        sink.stderr_text()
            .contains("sink assigned partitions")
            .then_some(())
    });
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        let code = readyz(port);
        assert!(
            code != Some(200),
            "ready while topic {topic_b} does not exist:\n{}",
            sink.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(watermarks(&topic_b), None);

    // The source creates the other one.
    let mut source = spawn(&cfg, Some("source"));
    streaming(&src, "s_discover", &mut source);
    src.sql("insert into a select g, 'a' || g from generate_series(1, 10) g");
    wait_value(&tgt, "select count(*) from a", "10", &mut sink);
    assert!(
        watermarks(&topic_b).is_some(),
        "the source creates every configured topic"
    );
    src.sql("insert into b select g, 'b' || g from generate_series(1, 10) g");
    wait_value(&tgt, "select count(*) from b", "10", &mut sink);
    wait_for("/readyz to be 200", T, || {
        (readyz(port) == Some(200)).then_some(())
    });
}

#[test]
fn a_partition_added_to_a_topic_later_is_consumed() {
    let src = TestDb::new("addpart");
    let tgt = TestDb::on(&target_url(), "addpart_t");
    let ddl = "create table a (id int primary key, v text)";
    src.sql(ddl);
    tgt.sql(ddl);
    let (cfg, prefix) = pipeline_config(
        &src,
        &tgt.url,
        "s_addpart",
        "partitions = 2",
        "",
        "[[tables]]\nsource = \"public.a\"\n",
    );
    let topic = format!("{prefix}.public.a");
    let mut sink = spawn(&cfg, Some("sink"));
    let mut source = spawn(&cfg, Some("source"));
    streaming(&src, "s_addpart", &mut source);
    src.sql("insert into a select g, 'a' || g from generate_series(1, 20) g");
    wait_value(&tgt, "select count(*) from a", "20", &mut sink);

    add_partitions(&topic, 3);
    // A producer learns the new partition count when it starts.
    let status = source.terminate();
    assert!(status.success(), "{}", source.stderr_text());
    let mut source = spawn(&cfg, Some("source"));
    streaming(&src, "s_addpart", &mut source);
    src.sql("insert into a select g, 'a' || g from generate_series(21, 100) g");
    let marks = wait_for("the new rows in Kafka", T, || {
        watermarks(&topic).filter(|w| w.iter().map(|(l, h)| h - l).sum::<i64>() >= 100)
    });
    assert!(
        marks[2].1 > 0,
        "the source produced nothing to the new partition: {marks:?}"
    );
    wait_value(&tgt, "select count(*) from a", "100", &mut sink);
    // Everything is produced now (all rows arrived): the new partition's end.
    let marks = watermarks(&topic).unwrap();
    wait_value(
        &tgt,
        &format!(
            "select next_offset from pgferry.checkpoints where topic = '{topic}' and partition = 2"
        ),
        &marks[2].1.to_string(),
        &mut sink,
    );
    let rows = "select string_agg(id || ':' || v, ',' order by id) from a";
    assert_eq!(tgt.value(rows), src.value(rows));
}

// ---- 8. Prepared statements lost from the target session ---------------------------------

/// The sink prepares its statements once per connection. A proxy that pools the
/// target's sessions by transaction (PgBouncer in transaction mode) can hand the next
/// batch a server session that never saw them, and the target answers `26000`. That is
/// not the batch's fault: it must be retried (never judged poison, never dead-lettered),
/// and the applier must prepare per transaction from then on. Simulated here on the real
/// target by a trigger that runs `DEALLOCATE ALL` in the sink's own session, once.
#[test]
fn prepared_statements_lost_from_the_target_session_are_prepared_again_and_nothing_is_lost() {
    let src = TestDb::new("dealloc");
    let tgt = TestDb::on(&target_url(), "dealloc_t");
    src.sql("create table d (id int primary key, v text, n int not null default 0)");
    tgt.sql(
        "create table d (id int primary key, v text, n int not null default 0);
         create table fired (done bool not null);
         insert into fired values (false);
         create function forget_statements() returns trigger language plpgsql as $$
         begin
           update fired set done = true where not done;
           if found then execute 'deallocate all'; end if;
           return null;
         end $$;",
    );
    let (cfg, prefix) = pipeline_config(
        &src,
        &tgt.url,
        "s_dealloc",
        "",
        "on_error = \"dlq\"\nbatch_max_events = 50",
        "[[tables]]\nsource = \"public.d\"\n",
    );
    let port = free_port();
    let mut p = spawn(&with_listen(&cfg, port), None);
    streaming(&src, "s_dealloc", &mut p);
    // Batches that cache every statement first: copies, upserts, updates, deletes.
    let workload = |from: i32| {
        src.sql(&format!(
            "insert into d (id, v) select g, 'row ' || g from generate_series({from}, {from} + 199) g;
             update d set n = n + 1, v = v || '!' where id % 3 = 0;
             delete from d where id % 10 = 7;
             insert into d (id, v) values ({from} + 100000, 'late') on conflict (id) do update set n = d.n + 1;"
        ))
    };
    workload(1);
    let rows = "select count(*) || ':' || sum(id) || ':' || sum(n) || ':' || md5(string_agg(v, ',' order by id)) from d";
    wait_value(&tgt, rows, &src.value(rows).unwrap(), &mut p);
    // From the next row the sink writes, its session has no prepared statement left.
    tgt.sql(
        "create trigger forget after insert or update on d
         for each statement execute function forget_statements()",
    );
    for round in 0..5 {
        workload(2000 + round * 300);
    }
    wait_value(&tgt, rows, &src.value(rows).unwrap(), &mut p);
    assert_eq!(tgt.value("select done from fired").as_deref(), Some("t"));
    let stderr = p.stderr_text();
    assert_eq!(
        stderr
            .matches("statements are prepared per batch from now on")
            .count(),
        1,
        "the loss is reported once:\n{stderr}"
    );
    assert_eq!(
        messages_in(&format!("{prefix}.public.d.dlq")),
        0,
        "nothing was dead-lettered:\n{stderr}"
    );
    // Counted as the retry it is, not as a fatal error.
    let (_, metrics) = http_get(port, "/metrics");
    assert!(
        metrics.contains("pgferry_errors_total{kind=\"transient\",stage=\"sink\"}"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("pgferry_errors_total{kind=\"fatal\",stage=\"sink\"}"),
        "{metrics}"
    );
    let (code, out, err) = run(&["verify", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(p.terminate().success(), "{}", p.stderr_text());
}
