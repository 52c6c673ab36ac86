//! Issue 8.7: with several partitions, a TRUNCATE is applied once, after every
//! partition has reached it, so rows inserted after it (on whatever partition) survive.
//! Before the barrier, the copy of the truncate on a lagging partition wiped them.

mod common;
mod kafka_support;

use std::time::Duration;

use common::*;
use kafka_support::*;

const T: Duration = Duration::from_secs(180);

#[test]
fn a_truncate_on_several_partitions_keeps_the_rows_inserted_after_it() {
    let src = TestDb::new("trunc");
    let tgt = TestDb::on(&service_env("PGFERRY_TARGET_URL"), "trunc_t");
    src.sql("create table p (id int primary key, v text)");
    tgt.sql("create table p (id int primary key, v text)");
    let prefix = format!("t{}", src.name);
    let cfg = src.config(
        "t.toml",
        "s",
        &format!(
            "[kafka]\nbrokers = \"{}\"\ntopic_prefix = \"{prefix}\"\npartitions = 4\n\
             [sink]\nurl = \"{}\"\nconsumer = \"trunc\"\nworkers = 3\nbatch_max_events = 7\nbatch_linger = \"5ms\"\n\
             [[tables]]\nsource = \"public.p\"\n",
            brokers(),
            tgt.url
        ),
    );
    // Everything is on Kafka before the sink starts, so the sink meets the partitions'
    // copies of each truncate at very different moments.
    let mut source = Pgferry::spawn(
        &["run", "--only", "source", "--config", cfg.to_str().unwrap()],
        src.dir.join("source.stderr"),
    );
    wait_streaming(&src, "s");
    for round in 0..3 {
        let base = round * 1000;
        src.sql(&format!(
            "insert into p select g, 'before' from generate_series({base} + 1, {base} + 200) g;
             truncate p;
             insert into p select g, 'after' from generate_series({base} + 201, {base} + 400) g;
             update p set v = 'updated' where id % 7 = 0;"
        ));
    }
    let end = src.value("select pg_current_wal_lsn()::text").unwrap();
    wait_for("the source to confirm everything", T, || {
        let c = src.confirmed_flush("s")?;
        (lsn(&c) >= lsn(&end)).then_some(())
    });
    assert!(source.terminate().success(), "{}", source.stderr_text());

    let mut sink = Pgferry::spawn(
        &["run", "--only", "sink", "--config", cfg.to_str().unwrap()],
        src.dir.join("sink.stderr"),
    );
    let expected = src.value(
        "select count(*) || ':' || sum(id) || ':' || count(*) filter (where v = 'updated') from p",
    );
    assert_eq!(
        expected.as_deref(),
        Some("200:460100:28"),
        "the source itself"
    );
    wait_for("the target to equal the source", T, || {
        let got = tgt.value(
            "select count(*) || ':' || coalesce(sum(id), 0) || ':' || count(*) filter (where v = 'updated') from p",
        );
        (got == expected).then_some(())
    });
    // And it stays so: nothing late wipes it.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        tgt.value("select count(*) || ':' || coalesce(sum(id), 0) || ':' || count(*) filter (where v = 'updated') from p"),
        expected,
        "{}",
        sink.stderr_text()
    );
    let (code, out, err) = run(&["verify", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(sink.terminate().success(), "{}", sink.stderr_text());
}
