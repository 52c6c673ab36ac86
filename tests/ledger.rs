//! The applied-transactions ledger (`pgferry.ledger`) against real PostgreSQL and the
//! broker: its counts equal the workload and the daemon's counters, its hash chain
//! recomputes with plain SQL, `verify --ledger` names a changed or deleted row, kill -9
//! leaves every source transaction in it exactly once, and `ledger = false` writes none.

mod common;
mod kafka_support;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use kafka_support::*;

const T: Duration = Duration::from_secs(120);

fn target_url() -> String {
    service_env("PGFERRY_TARGET_URL")
}

/// A full config: source `src`, Kafka with a unique prefix, sink into `tgt` as
/// consumer "test"; `http` is the `[http]` listen address ("" for none).
fn pipeline_config(
    src: &TestDb,
    tgt: &TestDb,
    slot: &str,
    sink_extra: &str,
    tables: &str,
    http: &str,
) -> std::path::PathBuf {
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
    if !http.is_empty() {
        let text = std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("listen = \"\"", &format!("listen = \"{http}\""));
        std::fs::write(&cfg, text).unwrap();
    }
    cfg
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

fn verify_ledger(config: &std::path::Path, extra: &[&str]) -> (i32, String) {
    let mut args = vec!["verify", "--config", config.to_str().unwrap(), "--ledger"];
    args.extend_from_slice(extra);
    let (code, out, err) = common::run(&args);
    (code, format!("{out}{err}"))
}

/// The ledger's events per (table, op), summed with SQL.
fn ledger_totals(tgt: &TestDb) -> BTreeMap<(String, String), i64> {
    tgt.sql(
        "select t.key, o.key, sum(o.value::bigint) from pgferry.ledger l, jsonb_each(l.counts) t, \
         jsonb_each_text(t.value) o where l.consumer = 'test' group by 1, 2 having sum(o.value::bigint) <> 0",
    )
    .into_iter()
    .map(|r| {
        (
            (r[0].clone().unwrap(), r[1].clone().unwrap()),
            r[2].as_deref().unwrap().parse().unwrap(),
        )
    })
    .collect()
}

/// Wait until the ledger counts at least `n` events (with pgferry's stderr on timeout).
fn wait_ledger(tgt: &TestDb, n: i64, p: &Pgferry) {
    let deadline = std::time::Instant::now() + T;
    while total_events(tgt) < n {
        if std::time::Instant::now() > deadline {
            panic!(
                "the ledger holds {} of {n} events\npgferry stderr:\n{}",
                total_events(tgt),
                p.stderr_text()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn total_events(tgt: &TestDb) -> i64 {
    if tgt
        .value("select to_regclass('pgferry.ledger')::text")
        .is_none()
    {
        return 0;
    }
    ledger_totals(tgt).values().sum()
}

/// The chain recomputed independently, with plain SQL and nothing of pgferry's code:
/// (rows, rows whose hash matches, rows whose prev_hash is the previous row's hash,
/// rows whose seq is the previous + 1).
const SQL_CHAIN_CHECK: &str = "select count(*),
   count(*) filter (where hash = encode(sha256(convert_to(prev_hash || jsonb_build_array(consumer, seq, run_id, txs,
       counts, skipped, target_xid, to_char(applied_at at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'))::text,
       'UTF8')), 'hex')),
   count(*) filter (where prev_hash = coalesce(prev, repeat('0', 64))),
   count(*) filter (where seq = coalesce(prev_seq, 0) + 1)
 from (select l.*, lag(hash) over w as prev, lag(seq) over w as prev_seq
       from pgferry.ledger l where consumer = 'test' window w as (order by seq)) c";

/// Checkpoint rows written by a target transaction that no ledger row names (0).
const CHECKPOINTS_NOT_IN_LEDGER: &str =
    "select count(*) from pgferry.checkpoints where xmin::text::bigint \
     not in (select target_xid % 4294967296 from pgferry.ledger)";

fn map(pairs: &[(&str, &str, i64)]) -> BTreeMap<(String, String), i64> {
    pairs
        .iter()
        .map(|(t, o, n)| ((t.to_string(), o.to_string()), *n))
        .collect()
}

/// Item 1: the ledger's counts are the workload's, dead-lettered events included; the
/// chain recomputes with plain SQL; every source transaction is named by its xid;
/// every target row and checkpoint was written by a transaction the ledger names; and
/// `verify --ledger --metrics` agrees with the daemon's counters.
#[test]
fn ledger_counts_the_workload_and_its_chain_recomputes_in_sql() {
    let src = TestDb::new("ledger");
    let tgt = TestDb::on(&target_url(), "ledger_t");
    src.sql(
        "create table a (id int primary key, v int); create table b (id int primary key, t text)",
    );
    tgt.sql("create table a (id int primary key, v int check (v < 1000)); create table b (id int primary key, t text)");
    let port = free_port();
    let cfg = pipeline_config(
        &src,
        &tgt,
        "s_ledger",
        "on_error = \"dlq\"",
        "[[tables]]\nsource = \"public.a\"\n[[tables]]\nsource = \"public.b\"\n",
        &format!("127.0.0.1:{port}"),
    );
    let mut p = run(&cfg);
    wait_streaming(&src, "s_ledger");
    let mut xids = Vec::new();
    xids.push(
        src.value("insert into a select g, g from generate_series(1, 30) g returning txid_current() % 4294967296")
            .unwrap(),
    );
    // A poison event: the target's check refuses it, and it is dead-lettered.
    xids.push(
        src.value("insert into a values (31, 5000) returning txid_current() % 4294967296")
            .unwrap(),
    );
    for i in 1..=10 {
        xids.push(
            src.value(&format!(
                "insert into b values ({i}, 'b{i}') returning txid_current() % 4294967296"
            ))
            .unwrap(),
        );
    }
    xids.push(
        src.value("update a set v = v + 1 where id <= 7 returning txid_current() % 4294967296")
            .unwrap(),
    );
    xids.push(
        src.value("delete from a where id between 27 and 30 returning txid_current() % 4294967296")
            .unwrap(),
    );
    xids.push(
        src.value("delete from b where id > 8 returning txid_current() % 4294967296")
            .unwrap(),
    );
    let expected = map(&[
        ("public.a", "c", 30),
        ("public.a", "dlq", 1),
        ("public.a", "u", 7),
        ("public.a", "d", 4),
        ("public.b", "c", 10),
        ("public.b", "d", 2),
    ]);
    wait_ledger(&tgt, 54, &p);
    assert_eq!(
        ledger_totals(&tgt),
        expected,
        "ledger counts per table and op"
    );
    // The same, from the target's rows: inserts minus deletes.
    assert_eq!(tgt.value("select count(*) from a").as_deref(), Some("26"));
    assert_eq!(tgt.value("select count(*) from b").as_deref(), Some("8"));
    assert_eq!(
        tgt.value("select count(*) from a where v <> id").as_deref(),
        Some("7")
    );

    let chain = tgt.sql(SQL_CHAIN_CHECK);
    let n = chain[0][0].clone().unwrap();
    assert!(n.parse::<i64>().unwrap() >= 2, "several batches: {n}");
    assert_eq!(
        chain[0],
        vec![Some(n.clone()); 4],
        "hash, link and sequence of every row"
    );
    assert_eq!(
        tgt.value("select prev_hash from pgferry.ledger where seq = 1")
            .as_deref(),
        Some("0".repeat(64).as_str())
    );

    // Every source transaction, with its commit LSN and (applied) time. (A transaction
    // of several rows may be split across batches, so here it is at least once; the
    // kill -9 test checks exactly once with single-row transactions.)
    let mut in_ledger: Vec<String> = tgt
        .sql(
            "select distinct x->>'xid' from pgferry.ledger, jsonb_array_elements(txs) x \
              where (x->>'commit_lsn')::pg_lsn > '0/0'",
        )
        .into_iter()
        .map(|r| r[0].clone().unwrap())
        .collect();
    in_ledger.sort();
    xids.sort();
    assert_eq!(in_ledger, xids, "source xids in the ledger");
    assert_eq!(
        tgt.value("select count(*) from pgferry.ledger, jsonb_array_elements(txs) x \
                   where x->>'commit_ts' is null and coalesce(counts->'public.a'->>'dlq', '0') = '0'")
            .as_deref(),
        Some("0"),
        "commit_ts known for every applied transaction"
    );

    // Same transaction: every target row and checkpoint was written by one the ledger names.
    for q in [
        "select count(*) from a where xmin::text::bigint not in (select target_xid % 4294967296 from pgferry.ledger)",
        "select count(*) from b where xmin::text::bigint not in (select target_xid % 4294967296 from pgferry.ledger)",
        CHECKPOINTS_NOT_IN_LEDGER,
    ] {
        assert_eq!(tgt.value(q).as_deref(), Some("0"), "{q}");
    }

    let metrics = format!("http://127.0.0.1:{port}/metrics");
    let (code, out) = verify_ledger(&cfg, &["--metrics", &metrics]);
    assert_eq!(code, 0, "{out}\n{}", p.stderr_text());
    assert!(out.contains("chain intact"), "{out}");
    assert!(out.contains("equals the ledger rows"), "{out}");
    assert!(out.contains("public.a") && out.contains("dlq"), "{out}");
    // Without --metrics the comparison is skipped, and says so.
    let (code, out) = verify_ledger(&cfg, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("metrics: not compared"), "{out}");
    assert!(p.terminate().success());
}

/// Item 2: a changed count, a row changed and re-hashed, and a deleted row are each
/// named by their sequence number; undoing the change makes the chain intact again.
#[test]
fn verify_ledger_names_a_changed_and_a_deleted_row() {
    let src = TestDb::new("ledgertamper");
    let tgt = TestDb::on(&target_url(), "ledgertamper_t");
    src.sql("create table t (id int primary key)");
    let cfg = pipeline_config(
        &src,
        &tgt,
        "s_ltamper",
        "create_tables = true",
        "[[tables]]\nsource = \"public.t\"\n",
        "",
    );
    let mut p = run(&cfg);
    wait_streaming(&src, "s_ltamper");
    // One transaction at a time, each applied before the next: one ledger row each.
    for i in 1..=6 {
        src.sql(&format!("insert into t values ({i})"));
        wait_ledger(&tgt, i, &p);
    }
    assert!(p.terminate().success());
    assert_eq!(
        tgt.value("select max(seq) from pgferry.ledger").as_deref(),
        Some("6")
    );
    let (code, out) = verify_ledger(&cfg, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("seq 1..6"), "{out}");

    let original = tgt
        .value("select counts::text from pgferry.ledger where seq = 3")
        .unwrap();
    tgt.sql(
        "update pgferry.ledger set counts = jsonb_set(counts, '{public.t,c}', '2') where seq = 3",
    );
    let (code, out) = verify_ledger(&cfg, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("BROKEN at seq 3: hash mismatch"), "{out}");
    assert!(
        !out.contains("seq 4"),
        "only the changed row is named: {out}"
    );

    // The changed row re-hashed to match: the next row's link no longer does.
    tgt.sql(
        "update pgferry.ledger set hash = encode(sha256(convert_to(prev_hash || jsonb_build_array(consumer, seq, run_id, \
         txs, counts, skipped, target_xid, to_char(applied_at at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'))::text, \
         'UTF8')), 'hex') where seq = 3",
    );
    let (code, out) = verify_ledger(&cfg, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("BROKEN at seq 4: prev_hash"), "{out}");

    // Undone (the original hash is still row 4's prev_hash): intact again.
    tgt.sql(&format!(
        "update pgferry.ledger set counts = '{original}', hash = (select prev_hash from pgferry.ledger where seq = 4) \
         where seq = 3"
    ));
    let (code, out) = verify_ledger(&cfg, &[]);
    assert_eq!(code, 0, "{out}");

    tgt.sql("delete from pgferry.ledger where seq = 2");
    let (code, out) = verify_ledger(&cfg, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("BROKEN at seq 2: row 2 is missing (deleted): the chain goes from 1 to 3"),
        "{out}"
    );
}

/// A batch of only a tombstone (one event per batch here, so a delete's tombstone is
/// always alone) moves its checkpoint in a transaction the ledger names, with empty
/// `txs` and `counts`; the chain stays intact. Before, such a batch wrote no ledger row.
#[test]
fn a_batch_of_only_a_tombstone_has_its_ledger_row() {
    let src = TestDb::new("ledgertomb");
    let tgt = TestDb::on(&target_url(), "ledgertomb_t");
    src.sql("create table t (id int primary key, v text)");
    let cfg = pipeline_config(
        &src,
        &tgt,
        "s_ltomb",
        "create_tables = true\nbatch_max_events = 1",
        "[[tables]]\nsource = \"public.t\"\n",
        "",
    );
    let p = run(&cfg);
    wait_streaming(&src, "s_ltomb");
    src.sql("insert into t values (1, 'a'), (2, 'b'), (3, 'c')");
    src.sql("delete from t where id = 2");
    wait_ledger(&tgt, 4, &p);
    // The tombstone after the delete: its own batch, so its own row.
    wait_for("the tombstone's ledger row", T, || {
        (tgt.value("select count(*) from pgferry.ledger where counts = '{}' and txs = '[]'")
            .as_deref()
            == Some("1"))
        .then_some(())
    });
    assert_eq!(
        tgt.value(CHECKPOINTS_NOT_IN_LEDGER).as_deref(),
        Some("0"),
        "every checkpoint was written by a transaction the ledger names"
    );
    // Its checkpoint is past the tombstone: the topic's 5 messages (3 inserts, the
    // delete, the tombstone) are all checkpointed.
    assert_eq!(
        tgt.value("select max(next_offset) from pgferry.checkpoints where consumer = 'test'")
            .as_deref(),
        Some("5")
    );
    let (code, out) = verify_ledger(&cfg, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("chain intact"), "{out}");
}

/// Item 3: kill -9 of `pgferry run` twice during N single-row transactions: the
/// ledger counts exactly N inserts, and names every source transaction exactly once.
#[test]
fn kill9_twice_leaves_every_transaction_in_the_ledger_exactly_once() {
    let src = TestDb::new("ledgercrash");
    let tgt = TestDb::on(&target_url(), "ledgercrash_t");
    // Each row records the transaction that wrote it.
    src.sql("create table c (id serial primary key, x bigint not null default txid_current() % 4294967296, pad text)");
    let cfg = pipeline_config(
        &src,
        &tgt,
        "s_lcrash",
        "create_tables = true",
        "[[tables]]\nsource = \"public.c\"\n",
        "",
    );
    let mut p = run(&cfg);
    wait_streaming(&src, "s_lcrash");
    // Long enough that both kills land before the last row, even in a release build.
    let rounds = 40;
    let per_round = 150;
    let n = (rounds * per_round) as i64;
    let url = src.url.clone();
    let writer = std::thread::spawn(move || {
        for _ in 0..rounds {
            // One transaction per row: COMMIT inside a DO block.
            sql(
                &url,
                &format!(
                    "do $$ begin for i in 1..{per_round} loop insert into c (pad) values (repeat('p', 40)); commit; end loop; end $$"
                ),
            );
            std::thread::sleep(Duration::from_millis(150));
        }
    });
    let mut seed = 0x9E37_79B9_7F4A_7C15_u64 ^ u64::from(std::process::id());
    for _ in 0..2 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(800 + seed % 1500));
        let applied = total_events(&tgt);
        p.kill9();
        assert!(applied < n, "killed mid-way ({applied} of {n} applied)");
        p = run(&cfg);
    }
    writer.join().unwrap();
    wait_ledger(&tgt, n, &p);
    // A little longer: nothing more may come (a doubled event would).
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(ledger_totals(&tgt), map(&[("public.c", "c", n)]));
    assert_eq!(
        tgt.value("select count(*) from c").as_deref(),
        Some(n.to_string().as_str())
    );
    let mut source: Vec<String> = src
        .sql("select x::text from c")
        .into_iter()
        .map(|r| r[0].clone().unwrap())
        .collect();
    let mut ledger: Vec<String> = tgt
        .sql("select x->>'xid' from pgferry.ledger, jsonb_array_elements(txs) x")
        .into_iter()
        .map(|r| r[0].clone().unwrap())
        .collect();
    source.sort();
    ledger.sort();
    assert_eq!(source.len() as i64, n);
    assert_eq!(ledger, source, "each source xid exactly once");
    let (code, out) = verify_ledger(&cfg, &[]);
    assert_eq!(code, 0, "{out}\n{}", p.stderr_text());
    let runs = tgt
        .value("select count(distinct run_id) from pgferry.ledger")
        .unwrap();
    assert!(
        runs.parse::<i32>().unwrap() >= 2,
        "rows from several runs: {runs}"
    );
    assert!(p.terminate().success());
}

/// Item 4: `ledger = false` writes no ledger (not even its table), and the rows still
/// arrive; `verify --ledger` then reports that there is none.
#[test]
fn ledger_false_writes_no_ledger_rows() {
    let src = TestDb::new("ledgeroff");
    let tgt = TestDb::on(&target_url(), "ledgeroff_t");
    src.sql("create table t (id int primary key)");
    let cfg = pipeline_config(
        &src,
        &tgt,
        "s_loff",
        "create_tables = true\nledger = false",
        "[[tables]]\nsource = \"public.t\"\n",
        "",
    );
    let mut p = run(&cfg);
    wait_streaming(&src, "s_loff");
    src.sql("insert into t select generate_series(1, 20)");
    src.sql("delete from t where id > 15");
    wait_for("the rows in the target", T, || {
        (tgt.value("select to_regclass('public.t')::text").is_some()
            && tgt.value("select count(*) from t").as_deref() == Some("15"))
        .then_some(())
    });
    assert_eq!(
        tgt.value("select to_regclass('pgferry.ledger')::text"),
        None,
        "no ledger table"
    );
    assert_eq!(
        tgt.value("select count(*) from pgferry.checkpoints")
            .as_deref(),
        Some("1")
    );
    let (code, out) = verify_ledger(&cfg, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("no pgferry.ledger"), "{out}");
    assert!(p.terminate().success());
}
