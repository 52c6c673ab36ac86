//! Draining a replication backlog to stdout (the Rust port of `drain_tail.sh`):
//! `pgferry tail --end-lsn <end>` next to `pg_recvlogical --start -E <end>`, both
//! draining the same backlog in the same run. The backlog is that of the drain bench:
//! ROWS rows of the 10-column patients table inserted in one transaction, then all
//! updated in a second (2 × ROWS changes).
//!
//! Why the anchor is fair: both sides read the same server through the same kind of
//! slot (logical, pgoutput, proto_version 1, publication `bench`), both slots created
//! before the backlog was written, so the walsender decodes exactly the same WAL for
//! each: the server-side work (WAL reading, logical decoding, the reorder buffer
//! spilling the big transactions, pgoutput encoding) is the same, only the client
//! differs. pg_recvlogical copies the raw pgoutput bytes to /dev/null; pgferry decodes
//! every message, converts each row to its event model and writes one JSON line per
//! change to stdout (a pipe the harness counts lines from, 2 × ROWS required). So the
//! ratio is how close pgferry's client side gets to a client that does nothing. Both
//! times run from spawning the process until it has exited, connecting and stopping
//! included. CPU seconds (user + system, of the client process only: the walsender's
//! work is the same for both) are read from the exited process's /proc entry before
//! it is reaped, peak RSS (VmHWM) is sampled while it runs.
//!
//! ```text
//! scripts/services.sh up && eval "$(scripts/services.sh env)"
//! cargo bench --bench tail                  # ROWS=200000
//! ROWS=50000 cargo bench --bench tail
//! ```
//!
//! Knobs: ROWS (default 200000). Results: a table on stdout and one JSON line per side
//! (`"bench": "tail"`) in `target/bench-results.jsonl`.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use support::{backlog_sql, env_u64, TABLE};

/// The longest either side may take.
const LIMIT: Duration = Duration::from_secs(900);

/// The source database with its two slots and the backlog behind them.
struct Backlog {
    src: TestDb,
    rows: u64,
    end_lsn: String,
    wal_mb: f64,
}

impl Backlog {
    fn new(rows: u64) -> Backlog {
        let src = TestDb::new("tail");
        src.sql(&format!(
            "{TABLE}; create publication bench for table public.patients"
        ));
        for tag in ["recv", "tail"] {
            src.sql(&format!(
                "select pg_create_logical_replication_slot('{}', 'pgoutput')",
                src.slot(tag)
            ));
        }
        let start_lsn = src
            .value("select pg_current_wal_lsn()::text")
            .expect("reading the WAL position before the backlog");
        println!("tail: writing the backlog: {rows} inserts, then {rows} updates");
        src.sql(&backlog_sql(rows));
        let end_lsn = src
            .value("select pg_current_wal_lsn()::text")
            .expect("reading the WAL position after the backlog");
        let wal_mb = src
            .value(&format!(
                "select pg_wal_lsn_diff('{end_lsn}', '{start_lsn}') / 1e6"
            ))
            .and_then(|v| v.parse().ok())
            .expect("computing the backlog's size in WAL");
        Backlog {
            src,
            rows,
            end_lsn,
            wal_mb,
        }
    }

    fn changes(&self) -> u64 {
        2 * self.rows
    }
}

struct Side {
    side: &'static str,
    seconds: f64,
    cpu_s: Option<f64>,
    peak_rss_mb: Option<f64>,
    /// pgferry: when its last line arrived, from its start.
    last_line_s: Option<f64>,
}

/// Watch `child` until it exits by itself (or kill it after `LIMIT`), then reap it:
/// what it cost. It must succeed.
fn measure(
    what: &str,
    child: &mut std::process::Child,
    started: Instant,
    stderr: &std::path::Path,
) -> support::Exit {
    let exit = support::watch_exit(child.id(), started, LIMIT);
    let Some(exit) = exit else {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "{what} did not finish within {LIMIT:?}; its stderr:\n{}",
            std::fs::read_to_string(stderr).unwrap_or_default()
        );
    };
    let status = child
        .wait()
        .unwrap_or_else(|e| panic!("waiting for {what}: {e}"));
    assert!(
        status.success(),
        "{what} failed ({status}); its stderr:\n{}",
        std::fs::read_to_string(stderr).unwrap_or_default()
    );
    exit
}

fn recvlogical(b: &Backlog) -> Side {
    println!("tail: pg_recvlogical --start -E {}", b.end_lsn);
    let stderr = b.src.dir.join("recv.stderr");
    let started = Instant::now();
    let mut child = Command::new("pg_recvlogical")
        .args(["-d", &b.src.url, "--slot", &b.src.slot("recv"), "--start"])
        .args(["-E", &b.end_lsn, "-o", "proto_version=1"])
        .args(["-o", "publication_names=bench", "-f", "/dev/null"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).expect("creating pg_recvlogical's stderr file"))
        .spawn()
        .expect("running pg_recvlogical (on PATH after `eval \"$(scripts/services.sh env)\"`)");
    let exit = measure("pg_recvlogical", &mut child, started, &stderr);
    Side {
        side: "pg_recvlogical",
        seconds: exit.seconds,
        cpu_s: exit.cpu_s,
        peak_rss_mb: exit.peak_rss_mb,
        last_line_s: None,
    }
}

/// What pgferry wrote to stdout, counted as it streamed past.
struct Output {
    lines: u64,
    bytes: u64,
    last_line_s: Option<f64>,
    /// The start of the first line.
    sample: String,
}

/// Count the lines of `out` without keeping them.
fn count_lines(mut out: impl Read, started: Instant) -> Output {
    let mut buf = vec![0u8; 1 << 16];
    let (mut lines, mut bytes, mut last_line_s) = (0u64, 0u64, None);
    let mut sample = Vec::new();
    loop {
        let n = match out.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => panic!("reading pgferry tail's stdout: {e}"),
        };
        let chunk = &buf[..n];
        if lines == 0 && sample.len() < 300 {
            let end = chunk.iter().position(|&c| c == b'\n').unwrap_or(n);
            sample.extend_from_slice(&chunk[..end.min(300 - sample.len())]);
        }
        let newlines = chunk.iter().filter(|&&c| c == b'\n').count() as u64;
        if newlines > 0 {
            last_line_s = Some(started.elapsed().as_secs_f64());
        }
        lines += newlines;
        bytes += n as u64;
    }
    Output {
        lines,
        bytes,
        last_line_s,
        sample: String::from_utf8_lossy(&sample).into_owned(),
    }
}

fn pgferry_tail(b: &Backlog) -> Side {
    let config = b.src.dir.join("tail.toml");
    std::fs::write(
        &config,
        format!(
            "[source]\nurl = \"{}\"\nslot = \"{}\"\npublication = \"bench\"\nheartbeat_interval = \"10s\"\n\
             [http]\nlisten = \"\"\n[[tables]]\nsource = \"public.patients\"\n",
            b.src.url,
            b.src.slot("tail"),
        ),
    )
    .expect("writing the tail config");
    let config_arg = config.to_str().expect("a UTF-8 temp path");
    println!(
        "tail: pgferry tail --config {config_arg} --end-lsn {}",
        b.end_lsn
    );
    let stderr = b.src.dir.join("tail.stderr");
    let started = Instant::now();
    let mut child = Command::new(bin())
        .args(["tail", "--config", config_arg, "--end-lsn", &b.end_lsn])
        .env("PGFERRY_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr).expect("creating pgferry's stderr file"))
        .spawn()
        .expect("spawning pgferry tail");
    let stdout = child.stdout.take().expect("pgferry's stdout pipe");
    let counter = std::thread::spawn(move || count_lines(stdout, started));
    let exit = measure("pgferry tail", &mut child, started, &stderr);
    let out = counter.join().expect("the line counter panicked");
    assert_eq!(
        out.lines,
        b.changes(),
        "pgferry tail printed {} lines, expected {} (2 × {} rows); its stderr:\n{}",
        out.lines,
        b.changes(),
        b.rows,
        std::fs::read_to_string(&stderr).unwrap_or_default()
    );
    println!(
        "tail: pgferry wrote {:.1} MB of JSON; first line: {}",
        out.bytes as f64 / 1e6,
        out.sample
    );
    Side {
        side: "pgferry tail",
        seconds: exit.seconds,
        cpu_s: exit.cpu_s,
        peak_rss_mb: exit.peak_rss_mb,
        last_line_s: out.last_line_s,
    }
}

fn main() {
    support::warn_of_distortions();
    let rows = env_u64("ROWS", 200_000);
    let b = Backlog::new(rows);
    let sides = [recvlogical(&b), pgferry_tail(&b)];
    report(&b, &sides);
}

fn report(b: &Backlog, sides: &[Side]) {
    let changes = b.changes() as f64;
    let anchor = sides
        .iter()
        .find(|s| s.side == "pg_recvlogical")
        .map(|s| changes / s.seconds);
    println!(
        "\ntail: {} rows, {} changes (insert + update, 2 transactions), {:.1} MB of WAL, end LSN {}",
        b.rows,
        b.changes(),
        b.wal_mb,
        b.end_lsn
    );
    println!(
        "{:<16} {:>8} {:>10} {:>7} {:>8} {:>12} {:>7}",
        "side", "seconds", "changes/s", "CPU s", "RSS MB", "last line s", "ratio"
    );
    let mut out = support::results_file();
    for s in sides {
        let rate = changes / s.seconds;
        let ratio = anchor.map(|a| rate / a);
        let opt = |v: Option<f64>, p: usize| v.map_or("-".into(), |v| format!("{v:.p$}"));
        println!(
            "{:<16} {:>8.2} {:>10.0} {:>7} {:>8} {:>12} {:>7}",
            s.side,
            s.seconds,
            rate,
            opt(s.cpu_s, 2),
            opt(s.peak_rss_mb, 0),
            opt(s.last_line_s, 2),
            opt(ratio, 2)
        );
        let line = serde_json::json!({
            "bench": "tail", "side": s.side, "rows": b.rows, "changes": b.changes(),
            "wal_mb": b.wal_mb, "seconds": s.seconds, "changes_per_s": rate, "cpu_s": s.cpu_s,
            "peak_rss_mb": s.peak_rss_mb, "last_line_s": s.last_line_s, "ratio": ratio,
        });
        writeln!(out, "{line}").expect("appending to target/bench-results.jsonl");
    }
    println!(
        "(ratio: changes/s against pg_recvlogical, >1 means faster; CPU s: the client process only)"
    );
}
