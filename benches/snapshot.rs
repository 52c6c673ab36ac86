//! The initial copy of an existing table (the Rust port of `snapshot_copy.sh`): how
//! fast pgferry's initial snapshot brings ROWS rows of the 10-column patients table
//! from the EHR to the hospital database (EHR -> Kafka (Avro) -> hospital), next to
//! PostgreSQL's own ways of copying it, on the same table between the same clusters,
//! in the same run. Each side copies into a fresh target database holding the table
//! empty:
//!
//! - `native`: PostgreSQL's initial table sync, `CREATE SUBSCRIPTION ... WITH
//!   (copy_data = true)`, timed from the statement until the table's `srsubstate` is
//!   `r` (ready); the subscription is then dropped and its slot with it.
//! - `pg_dump`: `pg_dump --data-only -t public.patients <source> | psql <target>`,
//!   timed until both have exited.
//! - `pgferry`: `pgferry run` (source and sink) with a fresh slot and `[source]
//!   snapshot = "initial"` (the default), timed from spawning it until the target
//!   holds ROWS rows with the source's sum(weight). Beside it, when its log first said
//!   "initial snapshot done" (every row durable on Kafka). Its peak RSS (VmHWM) and
//!   CPU seconds are read from /proc before it stops; `pgferry verify` must pass.
//!
//! Why the anchors are fair: all three read the same table (vacuumed first, so no side
//! pays for setting hint bits) from the same server and write it into an identical
//! empty table on the same target server. The native sync is the server's own COPY
//! between two walsender-connected backends with no client in between; pg_dump | psql
//! is the classic client-side copy through COPY text; pgferry additionally encodes
//! every row as Avro, makes it durable on Kafka and applies it from there, exactly
//! once. Every target is checked against the source by count and a checksum of every
//! row's text.
//!
//! ```text
//! scripts/services.sh up && eval "$(scripts/services.sh env)"
//! cargo bench --bench snapshot                       # ROWS=1000000
//! ROWS=200000 SNAPSHOT_WORKERS=2 CHUNK_ROWS=50000 cargo bench --bench snapshot
//! ```
//!
//! Knobs: ROWS (default 1000000); SNAPSHOT_WORKERS (`[source] snapshot_workers`,
//! default pgferry's: the cores); CHUNK_ROWS (`[source] snapshot_chunk_rows`, default
//! pgferry's); SINK_EXTRA and KAFKA_EXTRA (keys added to `[sink]` and `[kafka]`, the
//! last section, so a `[kafka.properties]` table may follow); BENCH_LOG (pgferry's
//! `PGFERRY_LOG`, e.g. `info,pgferry=debug`; its log is then kept in
//! `target/snapshot-pgferry.log`); ROUNDS (default 1: each round runs the three sides
//! again on the same source table, and the last lines give each round's ratio and the
//! median, since on a shared host one round's times swing by a fifth or more).
//! Results: a table on stdout per round and one JSON line per side (`"bench":
//! "snapshot"`) in `target/bench-results.jsonl`.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use support::{CpuSampler, Probe, ROWS_SQL, TABLE};

/// The longest any side may take.
const LIMIT: Duration = Duration::from_secs(1800);

/// Count and a checksum of every row's text (in UTC, whatever the server's zone).
const CHECKSUM: &str = "set timezone = 'UTC';
    select count(*) || ':' || coalesce(sum(hashtext(p::text)::bigint), 0) from public.patients p";

/// What pgferry's source logs once every row is durable on Kafka (src/source/snapshot.rs).
const SNAPSHOT_DONE: &str = "initial snapshot done";

/// A positive whole number from the environment, if set.
fn env_opt(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.parse()
            .ok()
            .filter(|&n| n > 0)
            .unwrap_or_else(|| panic!("{name} must be a positive whole number, got {v:?}"))
    })
}

/// The source database with its table, and what every target must hold.
struct Source {
    src: TestDb,
    rows: u64,
    weight_sum: String,
    checksum: String,
    table_mb: f64,
}

impl Source {
    fn new(rows: u64) -> Source {
        let src = TestDb::new("snap");
        src.sql(&format!(
            "{TABLE}; create publication bench for table public.patients"
        ));
        println!("snapshot: writing {rows} patients");
        src.sql(&ROWS_SQL.replace("ROWS", &rows.to_string()));
        // Hint bits and the visibility map set now, not by whichever side reads first.
        src.sql("vacuum analyze public.patients");
        let weight_sum = src
            .value("select sum(weight)::text from public.patients")
            .expect("summing the source's weights");
        let checksum = src.value(CHECKSUM).expect("the source's checksum");
        let table_mb = src
            .value("select pg_total_relation_size('public.patients') / 1e6")
            .and_then(|v| v.parse().ok())
            .expect("the source table's size");
        Source {
            src,
            rows,
            weight_sum,
            checksum,
            table_mb,
        }
    }

    /// A fresh target database holding the table, empty.
    fn target(&self, tag: &str) -> TestDb {
        let t = TestDb::on(&service_env("PGFERRY_TARGET_URL"), &format!("snap_{tag}"));
        t.sql(TABLE);
        t
    }

    /// Cheap enough to poll: every row there, with the source's sum(weight).
    fn target_done(&self, target: &Probe) -> bool {
        target
            .value("select count(*) || '/' || coalesce(sum(weight)::text, '') from public.patients")
            .as_deref()
            == Some(&format!("{}/{}", self.rows, self.weight_sum))
    }

    /// Every row there, identical to the source's.
    fn check(&self, target: &TestDb, side: &str) {
        let got = target.value(CHECKSUM).unwrap_or_default();
        assert_eq!(
            got, self.checksum,
            "{side}: the target holds (count:checksum) {got}, the source {}",
            self.checksum
        );
    }
}

struct Side {
    side: &'static str,
    seconds: f64,
    cpu_s: Option<f64>,
    peak_rss_mb: Option<f64>,
    /// pgferry: when every row was durable on Kafka, from its start.
    kafka_s: Option<f64>,
    /// CPU seconds of each of [`support::GROUPS`] while the side ran.
    cpu_by: [f64; 6],
}

impl Side {
    fn new(side: &'static str, seconds: f64, cpu_by: [f64; 6]) -> Side {
        Side {
            side,
            seconds,
            cpu_s: None,
            peak_rss_mb: None,
            kafka_s: None,
            cpu_by,
        }
    }
}

fn wait(what: &str, mut done: impl FnMut() -> bool) -> f64 {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < LIMIT,
            "{what} did not finish within {LIMIT:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    started.elapsed().as_secs_f64()
}

/// The native side's subscription, dropped without leaving a slot behind on the
/// source, also when the bench panics midway (declared after its target database, so
/// dropped before it: a database with a subscription cannot be dropped).
struct Subscription<'a> {
    src: &'a TestDb,
    target: &'a TestDb,
    name: String,
    live: bool,
}

impl Subscription<'_> {
    /// Disable it, detach it from its slot and drop it, then drop its slots on the
    /// source (the subscription's own and any table sync's left behind): a dropped
    /// subscription without a slot name leaves them there, holding WAL.
    fn drop_now(&mut self) {
        if !self.live {
            return;
        }
        let name = &self.name;
        let exists = self.target.value(&format!(
            "select count(*) from pg_subscription where subname = '{name}'"
        ));
        if exists.as_deref() == Some("1") {
            self.target
                .sql(&format!("alter subscription {name} disable"));
            self.target
                .sql(&format!("alter subscription {name} set (slot_name = none)"));
            self.target.sql(&format!("drop subscription {name}"));
        }
        // Nothing reconnects to these slots any more: end their walsenders, then drop.
        let slots = format!(
            "from pg_replication_slots where database = '{}' \
             and (slot_name = '{name}' or slot_name like 'pg\\_%\\_sync\\_%')",
            self.src.name
        );
        wait_for(
            &format!("the slots of subscription {name} to be dropped"),
            Duration::from_secs(30),
            || {
                self.src.sql(&format!(
                    "select pg_terminate_backend(active_pid) {slots} and active_pid is not null"
                ));
                self.src.sql(&format!(
                    "select pg_drop_replication_slot(slot_name) {slots} and not active"
                ));
                let left = self.src.value(&format!("select count(*) {slots}"));
                (left.as_deref() == Some("0")).then_some(())
            },
        );
        // Not before: if this failed halfway, dropping the guard tries again.
        self.live = false;
    }
}

impl Drop for Subscription<'_> {
    fn drop(&mut self) {
        if self.live {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.drop_now()));
        }
    }
}

fn native(s: &Source) -> Side {
    println!("snapshot: native: create subscription with copy_data = true");
    let target = s.target("native");
    let mut sub = Subscription {
        src: &s.src,
        target: &target,
        name: s.src.slot("native"),
        live: true,
    };
    let name = sub.name.clone();
    let probe = Probe::new(&target.url);
    let cpu = CpuSampler::start();
    let started = Instant::now();
    target.sql(&format!(
        "create subscription {name} connection '{}' publication bench with (copy_data = true)",
        s.src.url
    ));
    wait("the native table sync", || {
        // A failing sync retries forever; its errors are counted (and in the server log).
        let errors = probe.value(&format!(
            "select sync_error_count from pg_stat_subscription_stats where subname = '{name}'"
        ));
        assert!(
            matches!(errors.as_deref(), None | Some("0")),
            "the native table sync failed {} times: see the target server's log",
            errors.unwrap_or_default()
        );
        probe
            .value(
                "select srsubstate from pg_subscription_rel where srrelid = 'public.patients'::regclass",
            )
            .as_deref()
            == Some("r")
    });
    let seconds = started.elapsed().as_secs_f64();
    let cpu_by = cpu.stop();
    sub.drop_now();
    s.check(&target, "native");
    Side::new("native", seconds, cpu_by)
}

fn pg_dump(s: &Source) -> Side {
    println!("snapshot: pg_dump --data-only | psql");
    let target = s.target("dump");
    let stderr = |name: &str| {
        std::fs::File::create(s.src.dir.join(name))
            .unwrap_or_else(|e| panic!("creating {name} in the temp dir: {e}"))
    };
    let cpu = CpuSampler::start();
    let started = Instant::now();
    let mut dump = Command::new("pg_dump")
        .args(["--data-only", "-t", "public.patients", "-d", &s.src.url])
        .stdout(Stdio::piped())
        .stderr(stderr("pg_dump.stderr"))
        .spawn()
        .expect("running pg_dump (PostgreSQL's client tools must be on PATH)");
    let pipe = dump.stdout.take().expect("pg_dump's stdout pipe");
    let psql = Command::new("psql")
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", &target.url])
        .stdin(pipe)
        .stdout(Stdio::null())
        .stderr(stderr("psql.stderr"))
        .status()
        .expect("running psql (PostgreSQL's client tools must be on PATH)");
    let dumped = dump.wait().expect("waiting for pg_dump");
    let seconds = started.elapsed().as_secs_f64();
    let cpu_by = cpu.stop();
    let text = |name: &str| std::fs::read_to_string(s.src.dir.join(name)).unwrap_or_default();
    assert!(
        dumped.success(),
        "pg_dump failed ({dumped}):\n{}",
        text("pg_dump.stderr")
    );
    assert!(
        psql.success(),
        "psql failed ({psql}):\n{}",
        text("psql.stderr")
    );
    s.check(&target, "pg_dump");
    Side::new("pg_dump", seconds, cpu_by)
}

fn pgferry(s: &Source, round: u64, workers: Option<u64>, chunk_rows: Option<u64>) -> Side {
    let target = s.target("ferry");
    // A slot and topics of its own each round: the last round's are done with the
    // snapshot.
    let slot = s.src.slot(&format!("ferry{round}"));
    let path = s.src.dir.join("snapshot.toml");
    let knob = |key: &str, v: Option<u64>| v.map_or(String::new(), |v| format!("{key} = {v}\n"));
    std::fs::write(
        &path,
        format!(
            "[source]\nurl = \"{}\"\nslot = \"{}\"\npublication = \"bench\"\n{}{}\
             [sink]\nurl = \"{}\"\nconsumer = \"bench\"\n{}\n[http]\nlisten = \"\"\n\
             [[tables]]\nsource = \"public.patients\"\n\
             [kafka]\nbrokers = \"{}\"\ntopic_prefix = \"s{}r{round}\"\n{}\n",
            s.src.url,
            slot,
            knob("snapshot_workers", workers),
            knob("snapshot_chunk_rows", chunk_rows),
            target.url,
            std::env::var("SINK_EXTRA").unwrap_or_default(),
            service_env("PGFERRY_BROKERS"),
            s.src.name,
            std::env::var("KAFKA_EXTRA").unwrap_or_default(),
        ),
    )
    .expect("writing the pgferry config");
    let config = path.to_str().expect("a UTF-8 temp path");
    println!("snapshot: pgferry run --config {config}");
    let probe = Probe::new(&target.url);
    let cpu = CpuSampler::start();
    let started = Instant::now();
    // BENCH_LOG=debug: the sink's per-batch timings, kept in target/snapshot-pgferry.log.
    let log = std::env::var("BENCH_LOG").ok();
    let mut p = Pgferry::spawn_env(
        &["run", "--config", config],
        s.src.dir.join("ferry.stderr"),
        &[("PGFERRY_LOG", log.as_deref().unwrap_or("info"))],
    );
    let mut kafka_s = None;
    // When the source first logged that every row is durable on Kafka.
    let durable = |p: &Pgferry, kafka_s: &mut Option<f64>| {
        if kafka_s.is_none() && p.stderr_text().contains(SNAPSHOT_DONE) {
            *kafka_s = Some(started.elapsed().as_secs_f64());
        }
    };
    wait("pgferry", || {
        if let Some(status) = p.child.try_wait().expect("checking on pgferry") {
            panic!("pgferry exited ({status}):\n{}", p.stderr_text());
        }
        durable(&p, &mut kafka_s);
        // Cheap polls of the checkpoints first (the sink creates their table as it
        // starts); the count and sum only once it consumed a message per row.
        let exists = probe.value("select to_regclass('pgferry.checkpoints') is not null");
        if exists.as_deref() != Some("t") {
            return false;
        }
        let consumed: u64 = probe
            .value("select coalesce(sum(next_offset), 0)::text from pgferry.checkpoints")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        consumed >= s.rows && s.target_done(&probe)
    });
    let seconds = started.elapsed().as_secs_f64();
    let cpu_by = cpu.stop();
    let (cpu_s, peak_rss_mb) = support::usage(p.pid());
    // The sink may apply the last rows a moment before the source hears Kafka's ack.
    let deadline = Instant::now() + Duration::from_secs(30);
    while kafka_s.is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        durable(&p, &mut kafka_s);
    }
    if kafka_s.is_none() {
        println!("snapshot: pgferry never logged {SNAPSHOT_DONE:?}; no Kafka time");
    }
    let status = p.terminate();
    assert!(status.success(), "pgferry failed:\n{}", p.stderr_text());
    // Its WAL is not to be kept through the next round (the walsender lets go of the
    // slot a moment after pgferry exits).
    wait("the slot to be dropped", || {
        s.src
            .value(&format!(
                "select count(*) from (select pg_drop_replication_slot(slot_name) from pg_replication_slots \
                  where slot_name = '{slot}' and not active) d"
            ))
            .is_some()
            && s.src
                .value(&format!(
                    "select count(*) from pg_replication_slots where slot_name = '{slot}'"
                ))
                .as_deref()
                == Some("0")
    });
    if log.is_some() {
        let kept = concat!(env!("CARGO_MANIFEST_DIR"), "/target/snapshot-pgferry.log");
        std::fs::write(kept, p.stderr_text()).expect("keeping pgferry's log");
        println!("snapshot: pgferry's log is in {kept}");
    }
    s.check(&target, "pgferry");
    let (code, out, err) = run(&["verify", "--config", config]);
    assert_eq!(code, 0, "pgferry verify failed: {out}{err}");
    Side {
        side: "pgferry",
        seconds,
        cpu_s,
        peak_rss_mb,
        kafka_s,
        cpu_by,
    }
}

fn main() {
    support::warn_of_distortions();
    let rows = env_opt("ROWS").unwrap_or(1_000_000);
    let workers = env_opt("SNAPSHOT_WORKERS");
    let chunk_rows = env_opt("CHUNK_ROWS");
    let rounds = env_opt("ROUNDS").unwrap_or(1);
    let s = Source::new(rows);
    // pgferry's rows/s against the native sync's and pg_dump's, per round.
    let mut ratios: Vec<(f64, f64)> = Vec::new();
    for round in 1..=rounds {
        if rounds > 1 {
            println!("\nsnapshot: round {round} of {rounds}");
        }
        let sides = [
            native(&s),
            pg_dump(&s),
            pgferry(&s, round, workers, chunk_rows),
        ];
        report(&s, &sides, workers, chunk_rows);
        let [native, dump, ferry] = &sides;
        ratios.push((native.seconds / ferry.seconds, dump.seconds / ferry.seconds));
    }
    if rounds > 1 {
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            let n = v.len();
            (v[(n - 1) / 2] + v[n / 2]) / 2.0
        };
        let list = |v: &[f64]| {
            v.iter()
                .map(|r| format!("{r:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let (vs_native, vs_dump): (Vec<f64>, Vec<f64>) = ratios.into_iter().unzip();
        println!("\nsnapshot: pgferry against each anchor, {rounds} rounds");
        println!(
            "  x native:  {} (median {:.2})",
            list(&vs_native),
            median(vs_native.clone())
        );
        println!(
            "  x pg_dump: {} (median {:.2})",
            list(&vs_dump),
            median(vs_dump.clone())
        );
    }
}

fn report(s: &Source, sides: &[Side], workers: Option<u64>, chunk_rows: Option<u64>) {
    let rows = s.rows as f64;
    let rate_of = |name: &str| {
        sides
            .iter()
            .find(|x| x.side == name)
            .map(|x| rows / x.seconds)
    };
    let (native, dump) = (rate_of("native"), rate_of("pg_dump"));
    let default = |v: Option<u64>| v.map_or("pgferry's default".into(), |v| v.to_string());
    println!(
        "\nsnapshot: initial copy of {} rows ({:.0} MB with its index); snapshot_workers: {}, snapshot_chunk_rows: {}",
        s.rows,
        s.table_mb,
        default(workers),
        default(chunk_rows)
    );
    println!(
        "{:<44} {:>8} {:>9} {:>7} {:>7} {:>8} {:>9}",
        "side", "seconds", "rows/s", "CPU s", "RSS MB", "x native", "x pg_dump"
    );
    let opt = |v: Option<f64>, p: usize| v.map_or("-".into(), |v| format!("{v:.p$}"));
    let mut out = support::results_file();
    for x in sides {
        let rate = rows / x.seconds;
        let (vs_native, vs_dump) = (native.map(|n| rate / n), dump.map(|d| rate / d));
        let label = match x.side {
            "native" => "native subscription (copy_data = true)",
            "pg_dump" => "pg_dump --data-only | psql",
            _ => "pgferry run (EHR -> Kafka -> hospital)",
        };
        println!(
            "{:<44} {:>8.2} {:>9.0} {:>7} {:>7} {:>8} {:>9}",
            label,
            x.seconds,
            rate,
            opt(x.cpu_s, 2),
            opt(x.peak_rss_mb, 0),
            opt(vs_native, 2),
            opt(vs_dump, 2)
        );
        if let Some(k) = x.kafka_s {
            println!(
                "{:<44} {:>8.2} {:>9.0}",
                "  of which EHR -> Kafka (durable)",
                k,
                rows / k
            );
        }
        let line = serde_json::json!({
            "bench": "snapshot", "side": x.side, "rows": s.rows, "table_mb": s.table_mb,
            "seconds": x.seconds, "rows_per_s": rate, "cpu_s": x.cpu_s,
            "peak_rss_mb": x.peak_rss_mb, "kafka_durable_s": x.kafka_s,
            "ratio_native": vs_native, "ratio_pg_dump": vs_dump,
            "snapshot_workers": workers, "snapshot_chunk_rows": chunk_rows,
            "cpu_s_by_group": support::cpu_json(&x.cpu_by),
        });
        writeln!(out, "{line}").expect("appending to target/bench-results.jsonl");
    }
    println!(
        "(x native, x pg_dump: rows/s against that side's, >1 means faster; CPU s and RSS: the pgferry process only)"
    );
    println!("\nCPU seconds by process group while each side ran (sampled from /proc):");
    for x in sides {
        println!("  {:<8} {}", x.side, support::cpu_line(&x.cpu_by));
    }
}
