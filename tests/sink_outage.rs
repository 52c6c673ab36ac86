//! The target PostgreSQL goes away for 20 s mid-stream: the sink retries with backoff
//! while consumption pauses, and catches up with nothing lost. Its own test binary,
//! because it stops the shared target cluster (test binaries run one at a time).

mod common;
mod kafka_support;

use std::time::Duration;

use common::*;
use kafka_support::*;

#[test]
fn target_outage_of_20s_is_caught_up_without_loss() {
    let src = TestDb::new("outage");
    let tgt = TestDb::on(&service_env("PGFERRY_TARGET_URL"), "outage_t");
    src.sql("create table o (id int primary key, counter int not null)");
    let prefix = format!("t{}", src.name);
    let port = free_port();
    let cfg = src.config(
        "o.toml",
        "s_outage",
        &format!(
            "[kafka]\nbrokers = \"{}\"\ntopic_prefix = \"{prefix}\"\npartitions = 3\n\
             [sink]\nurl = \"{}\"\nconsumer = \"test\"\nworkers = 3\ncreate_tables = true\n[[tables]]\nsource = \"public.o\"\n",
            brokers(),
            tgt.url
        ),
    );
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("listen = \"\"", &format!("listen = \"127.0.0.1:{port}\""));
    std::fs::write(&cfg, text).unwrap();
    let p = Pgferry::spawn(
        &["run", "--config", cfg.to_str().unwrap()],
        cfg.with_extension("stderr"),
    );
    wait_streaming(&src, "s_outage");
    src.sql("insert into o select g, 0 from generate_series(1, 500) g");
    let url = src.url.clone();
    let writer = std::thread::spawn(move || {
        for _ in 0..60 {
            sql(&url, "update o set counter = counter + 1");
            std::thread::sleep(Duration::from_millis(500));
        }
    });
    wait_for("readiness", Duration::from_secs(30), || {
        (http_get(port, "/readyz").0 == 200).then_some(())
    });
    std::thread::sleep(Duration::from_secs(3));
    services(&["stop", "hospital"]);
    std::thread::sleep(Duration::from_secs(5));
    let during = http_get(port, "/readyz").0;
    std::thread::sleep(Duration::from_secs(15));
    services(&["start", "hospital"]);
    writer.join().unwrap();
    wait_for("the target to catch up", Duration::from_secs(120), || {
        let (code, _, _) = run(&["verify", "--config", cfg.to_str().unwrap()]);
        (code == 0).then_some(())
    });
    assert_eq!(during, 503, "not ready while the target is down");
    assert_eq!(
        tgt.value("select sum(counter) from o").as_deref(),
        Some("30000"),
        "every update applied exactly once"
    );
    let (_, metrics) = http_get(port, "/metrics");
    for needle in [
        "pgferry_sink_applied_total{op=\"u\",table=\"public.o\"}",
        &format!("pgferry_sink_checkpoint_offset{{partition=\"0\",topic=\"{prefix}.public.o\"}}"),
        "pgferry_replication_lag_seconds ",
        "pgferry_errors_total{kind=\"transient\",stage=\"sink\"}",
    ] {
        assert!(
            metrics.contains(needle),
            "/metrics lacks {needle}:\n{metrics}"
        );
    }
    assert!(
        p.stderr_text().contains("target not available"),
        "{}",
        p.stderr_text()
    );
}
