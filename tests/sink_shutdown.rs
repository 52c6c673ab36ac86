//! Issue 8.5: the checkpoint never passes an event that was neither committed nor
//! dead-lettered. The path that broke it: SIGTERM while the target is down, with an
//! undecodable (poison) event later in the same batch. The interrupted apply used to
//! count as done, so the poison event was dead-lettered and the checkpoint moved past
//! the good event before it, which was then never applied. Now the stop ends the batch
//! there: nothing moves, and a restart applies it all.

mod common;
mod kafka_support;

use std::time::{Duration, Instant};

use common::*;
use kafka_support::*;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;

const T: Duration = Duration::from_secs(120);

/// Starts the target again however the test ends.
struct TargetBack;

impl Drop for TargetBack {
    fn drop(&mut self) {
        services(&["start", "hospital"]);
    }
}

#[test]
fn sigterm_during_a_target_outage_never_checkpoints_past_an_unapplied_event() {
    let src = TestDb::new("sdown");
    let tgt = TestDb::on(&service_env("PGFERRY_TARGET_URL"), "sdown_t");
    src.sql("create table p (id int primary key, v text)");
    tgt.sql("create table p (id int primary key, v text)");
    let prefix = format!("t{}", src.name);
    let topic = format!("{prefix}.public.p");
    let cfg = src.config(
        "s.toml",
        "s",
        &format!(
            "[kafka]\nbrokers = \"{}\"\ntopic_prefix = \"{prefix}\"\nformat = \"json\"\n\
             [sink]\nurl = \"{}\"\nconsumer = \"sdown\"\non_error = \"dlq\"\nbatch_linger = \"500ms\"\n\
             [[tables]]\nsource = \"public.p\"\n",
            brokers(),
            tgt.url
        ),
    );
    // The sink starts while the target is up (it connects and reads its checkpoints),
    // then the target goes away.
    let mut sink = Pgferry::spawn(
        &["run", "--only", "sink", "--config", cfg.to_str().unwrap()],
        src.dir.join("sink1.stderr"),
    );
    wait_for("the sink to connect to the target", T, || {
        tgt.value("select count(*) from pg_tables where schemaname = 'pgferry' and tablename = 'checkpoints'")
            .filter(|n| n == "1")
    });
    let back = TargetBack;
    services(&["stop", "hospital"]);

    // good event, poison event, good event: one after the other on the one partition.
    let mut source = Pgferry::spawn(
        &["run", "--only", "source", "--config", cfg.to_str().unwrap()],
        src.dir.join("source.stderr"),
    );
    wait_streaming(&src, "s");
    src.sql("insert into p values (1, 'first')");
    consume(&brokers(), &topic, 1, T);
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    producer
        .send(BaseRecord::<[u8], [u8]>::to(&topic).payload(b"not an event".as_slice()))
        .map_err(|(e, _)| e)
        .unwrap();
    producer.flush(Duration::from_secs(10)).unwrap();
    src.sql("insert into p values (3, 'third')");
    consume(&brokers(), &topic, 3, T);
    assert!(source.terminate().success(), "{}", source.stderr_text());

    // The sink has the three and cannot apply the first; SIGTERM now.
    wait_for("the sink to try the target", T, || {
        sink.stderr_text()
            .contains("target not available")
            .then_some(())
    });
    let stopping = Instant::now();
    let status = sink.terminate();
    assert!(status.success(), "{}", sink.stderr_text());
    assert!(
        stopping.elapsed() < Duration::from_secs(30),
        "the stop does not wait for the target"
    );
    drop(back);

    // Nothing was checkpointed past the first event: a new sink applies everything,
    // and only the poison event is dead-lettered.
    assert_eq!(
        tgt.value(
            "select count(*) from pgferry.checkpoints where consumer = 'sdown' and next_offset > 0"
        )
        .as_deref(),
        Some("0"),
        "no checkpoint moved while the target was away"
    );
    let mut sink = Pgferry::spawn(
        &["run", "--only", "sink", "--config", cfg.to_str().unwrap()],
        src.dir.join("sink2.stderr"),
    );
    wait_for("both good events in the target", T, || {
        (tgt.value("select string_agg(id::text, ',' order by id) from p")
            .as_deref()
            == Some("1,3"))
        .then_some(())
    });
    let dlq = consume(&brokers(), &format!("{topic}.dlq"), 1, T);
    assert_eq!(dlq.len(), 1);
    assert!(sink.terminate().success(), "{}", sink.stderr_text());
}
