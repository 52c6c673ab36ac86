//! Draining a replication backlog (issues 11 and 12): ROWS rows inserted in one
//! transaction and then all updated in a second (2 × ROWS changes of the 10-column
//! patients table), drained by every side from a slot of its own, all created before
//! the backlog was written, so each decodes exactly the same WAL. In one run:
//!
//! - `pipeline`: EHR -> Kafka -> hospital. `pgferry run` against PostgreSQL's own
//!   publication and subscription (`copy_data = false`), each into a fresh target
//!   database. Time: from start until the target holds every row (count and
//!   sum(weight), checked by SQL); the subscription's end is its slot confirming the
//!   backlog's end LSN (it confirms only what it applied and flushed). pgferry runs
//!   twice: on a one-partition topic (`e2e`), and on two partitions (`e2e2p`), which
//!   the sink's two workers apply over two target connections.
//! - `kafka`: slot -> Kafka. `pgferry run` without a sink against `pg_recvlogical`
//!   writing to /dev/null. Time: until the slot confirms the end LSN (pgferry confirms
//!   only what Kafka acknowledged).
//! - `phi`: the pipeline again with `hmac` on three columns, and with the ledger off,
//!   next to the plain run: what the PHI controls cost.
//!
//! With both `pipeline` and `kafka`, the report ends with the walsender's ceiling: the
//! subscription's time over `pg_recvlogical`'s, the most any client of the slot can
//! reach against the subscription on this host.
//!
//! Every pgferry run ends with `pgferry verify` (exit 0 required). Peak RSS (VmHWM) and
//! CPU seconds of the pgferry process are read from /proc before it stops.
//!
//! ```text
//! scripts/services.sh up && eval "$(scripts/services.sh env)"
//! cargo bench --bench drain                         # ROWS=200000, every scenario
//! ROWS=50000 SCENARIOS=kafka cargo bench --bench drain
//! SINK_EXTRA='batch_max_events = 1000' SCENARIOS=pipeline cargo bench --bench drain
//! ```
//!
//! `DECODING_WORK_MEM=512MB` sets `logical_decoding_work_mem` for every side's
//! walsender alike (see [`decoding_work_mem`]).
//! `SINK_EXTRA` and `KAFKA_EXTRA` add keys to the `[sink]` and `[kafka]` sections of
//! the pipeline runs (`e2e`, `e2e2p`; `KAFKA_EXTRA` also to `kafka`), to try settings. `SHOW_STDERR=1` prints each pgferry
//! run's log after it; `BENCH_LOG` sets its `PGFERRY_LOG` (default `info`).
//!
//! Results: a table on stdout and one JSON line per side in `target/bench-results.jsonl`.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use support::{backlog_sql, env_u64, CpuSampler, Probe, TABLE};

/// The source database with its backlog, and what the target must hold after it.
struct Backlog {
    src: TestDb,
    rows: u64,
    end_lsn: String,
    weight_sum: String,
}

impl Backlog {
    /// A slot per side, then the backlog.
    fn new(rows: u64, slots: &[&str]) -> Backlog {
        let src = TestDb::new("drain");
        src.sql(&format!(
            "{TABLE}; create publication bench for table public.patients"
        ));
        for tag in slots {
            src.sql(&format!(
                "select pg_create_logical_replication_slot('{}', 'pgoutput')",
                src.slot(tag)
            ));
        }
        println!("drain: writing the backlog: {rows} inserts, then {rows} updates");
        src.sql(&backlog_sql(rows));
        let end_lsn = src.value("select pg_current_wal_lsn()::text").unwrap();
        let weight_sum = src
            .value("select sum(weight)::text from public.patients")
            .unwrap();
        src.sql("vacuum analyze public.patients");
        Backlog {
            src,
            rows,
            end_lsn,
            weight_sum,
        }
    }

    fn changes(&self) -> u64 {
        2 * self.rows
    }

    fn slot_done(&self, probe: &Probe, tag: &str) -> bool {
        probe
            .value(&format!(
                "select confirmed_flush_lsn >= '{}'::pg_lsn from pg_replication_slots where slot_name = '{}'",
                self.end_lsn,
                self.src.slot(tag)
            ))
            .as_deref()
            == Some("t")
    }

    fn target_done(&self, target: &Probe) -> bool {
        target
            .value("select count(*) || '/' || coalesce(sum(weight)::text, '') from public.patients")
            .as_deref()
            == Some(&format!("{}/{}", self.rows, self.weight_sum))
    }
}

struct Side {
    scenario: &'static str,
    side: String,
    seconds: f64,
    cpu_s: Option<f64>,
    peak_rss_mb: Option<f64>,
    /// CPU seconds of each of [`support::GROUPS`] while the side ran.
    cpu_by: [f64; 6],
}

fn wait(what: &str, mut done: impl FnMut() -> bool) -> f64 {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "{what} did not finish within 900 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    started.elapsed().as_secs_f64()
}

/// `DECODING_WORK_MEM` (e.g. `512MB`): `logical_decoding_work_mem` of every side's
/// walsender (the subscription's by its connection's `options`, pg_recvlogical's by
/// `PGOPTIONS`, pgferry's by `[source] logical_decoding_work_mem`); unset: the
/// server's (PostgreSQL's default is 64MB, which the backlog's transactions exceed, so
/// the walsender spills them to disk and reads them back).
fn decoding_work_mem() -> Option<String> {
    std::env::var("DECODING_WORK_MEM")
        .ok()
        .filter(|v| !v.is_empty())
}

fn subscription(b: &Backlog) -> Side {
    let target = TestDb::on(&service_env("PGFERRY_TARGET_URL"), "drain_sub");
    target.sql(TABLE);
    let slot = b.src.slot("sub");
    let conninfo = match decoding_work_mem() {
        Some(mem) => format!(
            "{}{}options=-c%20logical_decoding_work_mem%3D{mem}",
            b.src.url,
            if b.src.url.contains('?') { '&' } else { '?' }
        ),
        None => b.src.url.clone(),
    };
    let probe = Probe::new(&b.src.url);
    let cpu = CpuSampler::start();
    let started = Instant::now();
    target.sql(&format!(
        "create subscription {slot} connection '{conninfo}' publication bench
           with (create_slot = false, slot_name = '{slot}', copy_data = false)"
    ));
    wait("the subscription", || b.slot_done(&probe, "sub"));
    let seconds = started.elapsed().as_secs_f64();
    let cpu_by = cpu.stop();
    assert!(
        b.target_done(&Probe::new(&target.url)),
        "the subscription's target is not complete"
    );
    target.sql(&format!(
        "alter subscription {slot} disable; alter subscription {slot} set (slot_name = none); drop subscription {slot}"
    ));
    Side {
        scenario: "pipeline",
        side: "subscription".into(),
        seconds,
        cpu_s: None,
        peak_rss_mb: None,
        cpu_by,
    }
}

fn recvlogical(b: &Backlog) -> Side {
    let mut recv = Command::new("pg_recvlogical");
    if let Some(mem) = decoding_work_mem() {
        recv.env("PGOPTIONS", format!("-c logical_decoding_work_mem={mem}"));
    }
    let cpu = CpuSampler::start();
    let started = Instant::now();
    let status = recv
        .args([
            "-d",
            &b.src.url,
            "--slot",
            &b.src.slot("recv"),
            "--start",
            "-E",
            &b.end_lsn,
        ])
        .args([
            "-o",
            "proto_version=1",
            "-o",
            "publication_names=bench",
            "-f",
            "/dev/null",
        ])
        .status()
        .expect("running pg_recvlogical (on PATH after `eval \"$(scripts/services.sh env)\"`)");
    let seconds = started.elapsed().as_secs_f64();
    let cpu_by = cpu.stop();
    assert!(status.success(), "pg_recvlogical failed: {status}");
    Side {
        scenario: "kafka",
        side: "pg_recvlogical".into(),
        seconds,
        cpu_s: None,
        peak_rss_mb: None,
        cpu_by,
    }
}

/// `pgferry run` from slot `tag`; with a sink unless `sink` is `None` (else its extra
/// keys). `kafka_extra` goes into `[kafka]`, `extra` into the main config,
/// `table_extra` into the table's section.
fn pgferry(
    b: &Backlog,
    scenario: &'static str,
    tag: &str,
    sink: Option<&str>,
    (kafka_extra, extra): (&str, &str),
    table_extra: &str,
) -> Side {
    let target = sink.map(|_| {
        let t = TestDb::on(&service_env("PGFERRY_TARGET_URL"), &format!("drain_{tag}"));
        t.sql(TABLE);
        t
    });
    let path = b.src.dir.join(format!("{tag}.toml"));
    let sink_section = match (&target, sink) {
        (Some(t), Some(sink_extra)) => format!(
            "[sink]\nurl = \"{}\"\nconsumer = \"bench\"\n{sink_extra}\n",
            t.url
        ),
        _ => String::new(),
    };
    std::fs::write(
        &path,
        format!(
            "[source]\nurl = \"{}\"\nslot = \"{}\"\npublication = \"bench\"\nheartbeat_interval = \"10s\"\n{work_mem}\
             # The slot exists before pgferry first starts: no copy, as for the anchors.\nsnapshot = \"never\"\n\
             [kafka]\nbrokers = \"{}\"\ntopic_prefix = \"d{}{tag}\"\n{kafka_extra}\n[http]\nlisten = \"\"\n{extra}\n{sink_section}\
             [[tables]]\nsource = \"public.patients\"\n{table_extra}\n",
            b.src.url,
            b.src.slot(tag),
            service_env("PGFERRY_BROKERS"),
            b.src.name,
            work_mem = decoding_work_mem()
                .map(|m| format!("logical_decoding_work_mem = \"{m}\"\n"))
                .unwrap_or_default(),
        ),
    )
    .unwrap();
    // The kafka scenario polls the source's slot, the others the target.
    let probe = Probe::new(target.as_ref().map_or(&b.src.url, |t| &t.url));
    let cpu = CpuSampler::start();
    let started = Instant::now();
    let mut args = vec!["run", "--config", path.to_str().unwrap()];
    if sink.is_none() {
        args.extend(["--only", "source"]);
    }
    // BENCH_LOG=debug shows the sink's per-batch timings (with SHOW_STDERR=1).
    let log = std::env::var("BENCH_LOG").unwrap_or_else(|_| "info".into());
    let mut p = Pgferry::spawn_env(
        &args,
        b.src.dir.join(format!("{tag}.stderr")),
        &[("PGFERRY_LOG", &log)],
    );
    let running = |p: &mut Pgferry| {
        if let Some(status) = p.child.try_wait().unwrap() {
            panic!("pgferry exited ({status}):\n{}", p.stderr_text());
        }
    };
    match &target {
        Some(_) => {
            // Cheap polls of the checkpoint first; the full count only at the end.
            let messages = b.changes();
            wait("pgferry", || {
                running(&mut p);
                // The sink creates its checkpoint table as it starts.
                let exists = probe.value("select to_regclass('pgferry.checkpoints') is not null");
                if exists.as_deref() != Some("t") {
                    return false;
                }
                let consumed: u64 = probe
                    .value("select coalesce(sum(next_offset), 0)::text from pgferry.checkpoints")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                consumed >= messages && b.target_done(&probe)
            })
        }
        None => wait("pgferry", || {
            running(&mut p);
            b.slot_done(&probe, tag)
        }),
    };
    let seconds = started.elapsed().as_secs_f64();
    let cpu_by = cpu.stop();
    let (cpu_s, peak_rss_mb) = support::usage(p.pid());
    let status = p.terminate();
    assert!(status.success(), "pgferry failed:\n{}", p.stderr_text());
    if std::env::var_os("SHOW_STDERR").is_some() {
        eprintln!("--- pgferry ({tag}) stderr:\n{}", p.stderr_text());
    }
    if target.is_some() {
        let (code, out, err) = run(&["verify", "--config", path.to_str().unwrap()]);
        assert_eq!(code, 0, "verify after {tag}: {out}{err}");
    }
    Side {
        scenario,
        side: format!("pgferry run ({tag})"),
        seconds,
        cpu_s,
        peak_rss_mb,
        cpu_by,
    }
}

fn main() {
    support::warn_of_distortions();
    let rows = env_u64("ROWS", 200_000);
    let scenarios = std::env::var("SCENARIOS").unwrap_or_else(|_| "pipeline,kafka,phi".into());
    let want = |s: &str| scenarios.split(',').any(|x| x.trim() == s);
    // `e2e`: only pgferry's plain pipeline run, without its anchor (to try settings).
    let anchored = want("pipeline") || want("phi");
    let mut slots = Vec::new();
    if anchored {
        slots.push("sub");
    }
    if anchored || want("e2e") {
        slots.push("e2e");
    }
    if want("pipeline") {
        slots.push("e2e2p");
    }
    if want("kafka") {
        slots.extend(["recv", "kafka"]);
    }
    if want("phi") {
        slots.extend(["hmac", "noledger"]);
    }
    let b = Backlog::new(rows, &slots);
    let mut sides = Vec::new();
    if anchored {
        sides.push(subscription(&b));
    }
    // Knobs to try settings on the pipeline runs: SINK_EXTRA (keys of [sink]) and
    // KAFKA_EXTRA (keys of [kafka], e.g. a [kafka.properties] table).
    let sink_extra = std::env::var("SINK_EXTRA").unwrap_or_default();
    let kafka_extra = std::env::var("KAFKA_EXTRA").unwrap_or_default();
    if anchored || want("e2e") {
        sides.push(pgferry(
            &b,
            "pipeline",
            "e2e",
            Some(&sink_extra),
            (&kafka_extra, ""),
            "",
        ));
    }
    if want("pipeline") {
        // Two partitions: the sink's two workers apply one each.
        let kafka = format!("partitions = 2\n{kafka_extra}");
        sides.push(pgferry(
            &b,
            "pipeline",
            "e2e2p",
            Some(&format!("workers = 2\n{sink_extra}")),
            (&kafka, ""),
            "",
        ));
    }
    if want("kafka") {
        sides.push(recvlogical(&b));
        sides.push(pgferry(&b, "kafka", "kafka", None, (&kafka_extra, ""), ""));
    }
    if want("phi") {
        let key = "[phi]\nkey = \"a-benchmark-key-of-at-least-sixteen-bytes\"";
        let transform =
            "[tables.transform]\nname = \"hmac\"\ncontact_number = \"hmac\"\nemail = \"hmac\"";
        sides.push(pgferry(&b, "phi", "hmac", Some(""), ("", key), transform));
        sides.push(pgferry(
            &b,
            "phi",
            "noledger",
            Some("ledger = false"),
            ("", ""),
            "",
        ));
    }
    report(&b, &sides);
}

fn report(b: &Backlog, sides: &[Side]) {
    let changes = b.changes() as f64;
    let anchor = |scenario: &str| {
        let name = if scenario == "kafka" {
            "pg_recvlogical"
        } else {
            "subscription"
        };
        sides
            .iter()
            .find(|s| s.side == name)
            .map(|s| changes / s.seconds)
    };
    println!(
        "\ndrain: {} changes ({} rows inserted, then updated), end LSN {}",
        b.changes(),
        b.rows,
        b.end_lsn
    );
    println!(
        "{:<10} {:<26} {:>8} {:>10} {:>7} {:>8} {:>7}",
        "scenario", "side", "seconds", "changes/s", "CPU s", "RSS MB", "ratio"
    );
    let mut out = support::results_file();
    let plain = sides
        .iter()
        .find(|s| s.side == "pgferry run (e2e)")
        .map(|s| changes / s.seconds);
    for s in sides {
        let rate = changes / s.seconds;
        // pgferry against its anchor; the phi runs against the plain pgferry run.
        let ratio = if s.side.starts_with("pgferry") {
            match s.scenario {
                "phi" => plain.map(|p| rate / p),
                sc => anchor(sc).map(|a| rate / a),
            }
        } else {
            None
        };
        let opt = |v: Option<f64>, p: usize| v.map_or("-".into(), |v| format!("{v:.p$}"));
        println!(
            "{:<10} {:<26} {:>8.2} {:>10.0} {:>7} {:>8} {:>7}",
            s.scenario,
            s.side,
            s.seconds,
            rate,
            opt(s.cpu_s, 2),
            opt(s.peak_rss_mb, 0),
            opt(ratio, 2)
        );
        let line = serde_json::json!({
            "bench": "drain", "scenario": s.scenario, "side": s.side, "changes": b.changes(),
            "seconds": s.seconds, "changes_per_s": rate, "cpu_s": s.cpu_s,
            "peak_rss_mb": s.peak_rss_mb, "ratio": ratio,
            "cpu_s_by_group": support::cpu_json(&s.cpu_by),
        });
        writeln!(out, "{line}").unwrap();
    }
    println!(
        "(ratio: changes/s against the anchor of its scenario; for phi, against the plain pgferry run)"
    );
    println!("\nCPU seconds by process group while each side ran (sampled from /proc):");
    for s in sides {
        println!("  {:<26} {}", s.side, support::cpu_line(&s.cpu_by));
    }
    // What the slot itself allows: pg_recvlogical does nothing with what it reads,
    // so no client of a slot drains it faster than the walsender feeds it.
    let seconds = |name: &str| sides.iter().find(|s| s.side == name).map(|s| s.seconds);
    if let (Some(sub), Some(recv)) = (seconds("subscription"), seconds("pg_recvlogical")) {
        println!(
            "ceiling: the walsender fed pg_recvlogical in {recv:.2} s and the subscription took \
             {sub:.2} s end to end, so no client of the slot can pass {:.2}x the subscription here",
            sub / recv
        );
        writeln!(
            out,
            "{}",
            serde_json::json!({"bench": "drain", "scenario": "ceiling", "ratio": sub / recv})
        )
        .unwrap();
    }
}
