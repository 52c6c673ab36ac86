//! The broker goes away for a minute mid-stream, with three sink workers on three
//! partitions: the producer and the sink's consumer wait for it without exiting, and
//! once it is back the pipeline catches up with every change applied exactly once.
//! (A broker whose restart took over 40 s once left a three-worker sink cut off from it
//! in the chaos test; chaos restarts the broker for seconds only, this for longer.)
//! Its own test binary, because it stops the shared broker (test binaries run one at a
//! time).

mod common;
mod kafka_support;

use std::time::{Duration, Instant};

use common::*;
use kafka_support::*;

const DOWN: Duration = Duration::from_secs(60);
const ROWS: u64 = 600;
const ROUNDS: u64 = 90;

/// Starts the broker again if the test stops halfway, so later tests find it.
struct BrokerBack;

impl Drop for BrokerBack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = std::panic::catch_unwind(|| services(&["start-broker"]));
        }
    }
}

#[test]
fn a_minute_without_the_broker_is_caught_up_exactly_once_by_three_workers() {
    let src = TestDb::new("brokerout");
    let tgt = TestDb::on(&service_env("PGFERRY_TARGET_URL"), "brokerout_t");
    src.sql("create table o (id int primary key, counter int not null)");
    tgt.sql("create table o (id int primary key, counter int not null)");
    let prefix = format!("t{}", src.name);
    let cfg = src.config(
        "o.toml",
        "s_brokerout",
        &format!(
            "[kafka]\nbrokers = \"{}\"\ntopic_prefix = \"{prefix}\"\npartitions = 3\n\
             [sink]\nurl = \"{}\"\nconsumer = \"test\"\nworkers = 3\n\
             [[tables]]\nsource = \"public.o\"\n",
            brokers(),
            tgt.url
        ),
    );
    let mut p = Pgferry::spawn(
        &["run", "--config", cfg.to_str().unwrap()],
        cfg.with_extension("stderr"),
    );
    wait_streaming(&src, "s_brokerout");
    src.sql(&format!(
        "insert into o select g, 0 from generate_series(1, {ROWS}) g"
    ));
    let url = src.url.clone();
    // Changes go on at the source all through the outage.
    let writer = std::thread::spawn(move || {
        for _ in 0..ROUNDS {
            sql(&url, "update o set counter = counter + 1");
            std::thread::sleep(Duration::from_millis(500));
        }
    });
    wait_for(
        "the first rows in the target",
        Duration::from_secs(60),
        || (tgt.value("select count(*) from o") == Some(ROWS.to_string())).then_some(()),
    );
    let _back = BrokerBack;
    services(&["stop-broker"]);
    std::thread::sleep(DOWN);
    assert!(
        p.child.try_wait().unwrap().is_none(),
        "pgferry exited while the broker was down:\n{}",
        p.stderr_text()
    );
    // A minute without a delivery report, changes waiting: the source says so (after
    // 30 s), where before it waited in silence.
    assert!(
        p.stderr_text()
            .contains("no message acknowledged by Kafka for"),
        "no warning of the stalled deliveries during the outage:\n{}",
        p.stderr_text()
    );
    services(&["start-broker"]);
    let back = Instant::now();
    writer.join().unwrap();
    let expected = (ROWS * ROUNDS).to_string();
    wait_for(
        "the target to catch up after the broker came back",
        Duration::from_secs(120),
        || (tgt.value("select sum(counter) from o") == Some(expected.clone())).then_some(()),
    );
    eprintln!(
        "broker_outage: caught up {:.1}s after the broker was started again",
        back.elapsed().as_secs_f64()
    );
    assert!(
        p.stderr_text()
            .contains("Kafka acknowledges messages again"),
        "no word that deliveries resumed after the outage:\n{}",
        p.stderr_text()
    );
    let (code, out, err) = run(&["verify", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "verify after the outage:\n{out}\n{err}");
    assert!(
        p.child.try_wait().unwrap().is_none(),
        "pgferry exited after the outage:\n{}",
        p.stderr_text()
    );
    assert_eq!(p.terminate().code(), Some(0), "{}", p.stderr_text());
}
