//! Chaos test (issue 8): the whole pipeline, EHR -> Kafka -> hospital, under a mixed
//! workload while faults are injected one at a time, and at the end the durability
//! contract (DESIGN.md section 1) must hold: nothing lost, nothing applied twice.
//!
//! Workload (two background threads, both tolerant of the source going away):
//! - `pgferry generate` in short chunks (a new seed per chunk, so new ids), the
//!   realistic EHR activity with TOASTed doctor notes and cascading deletes;
//! - counter transactions: each increments 1–3 of [`COUNTERS`] rows of
//!   `chaos_counters` by one and logs itself in `chaos_ops` (source only) in the
//!   same transaction. A commit whose outcome is unknown (the connection died at
//!   COMMIT) is resolved at the end by looking its op id up in `chaos_ops`;
//! - TOAST traffic on `chaos_toast`: rows of ~12 kB of incompressible text stored out
//!   of line (`storage external`), updated mostly in a non-TOAST column (unchanged
//!   TOAST on the wire), sometimes with a new body, and deleted.
//!
//! Faults, chosen with a xorshift PRNG from a seed (the first rounds are a
//! seed-shuffled permutation of the enabled kinds, so even the short CI run sees each
//! kind once; later rounds are uniformly random), each after 2–5 s of normal running:
//! - kill -9 of pgferry (restarted after 0–2 s);
//! - SIGTERM of pgferry: it must exit 0 within 40 s (then it is restarted);
//! - the target cluster stopped for 5–20 s;
//! - the broker restarted (`services.sh restart-broker`);
//! - the source cluster stopped for 0–5 s and started again: pgferry must reconnect
//!   by itself.
//!
//! pgferry must ride out every fault except the ones aimed at it: an exit of its own
//! is a failure (its stderr is printed). After each fault a probe row goes through the
//! whole pipeline (source -> Kafka -> target) before the next fault, and its time is
//! the recovery time. At the end the workload stops, the slot must be confirmed up to
//! the source's WAL end, `pgferry verify` must say equal, and every counter in the
//! target (and in the source) must equal the number of committed increments.
//!
//! Knobs: `PGFERRY_CHAOS_SEED` (default: from the clock), `PGFERRY_CHAOS_ROUNDS`
//! (default 5: each kind once, the short CI run), `PGFERRY_CHAOS_FAULTS` (the kinds to
//! draw from, comma-separated: `kill9,sigterm,target,broker,source`, default all).
//! The seed is printed at start and in every failure message; the pgferry logs of a
//! failed run are kept under `target/tmp/chaos-<seed>/`. A long run:
//! `PGFERRY_CHAOS_ROUNDS=50 cargo test --test chaos -- --nocapture`.
//!
//! It stops and starts the shared clusters and the broker, so it is its own test
//! binary with ONE test, and a guard brings every service back up even on panic.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;

const EHR_SCHEMA: &str = include_str!("../sql/ehr_schema.sql");
const HOSPITAL_SCHEMA: &str = include_str!("../sql/hospital_schema.sql");

/// Rows of `chaos_counters`.
const COUNTERS: usize = 16;
/// How long the pipeline may take to carry a probe row through after a fault.
const RECOVERY: Duration = Duration::from_secs(180);
/// How long the end may take to drain (slot confirmed, verify equal).
const DRAIN: Duration = Duration::from_secs(240);
/// A SIGTERM'd pgferry must be gone within this.
const TERM_LIMIT: Duration = Duration::from_secs(40);

/// The chaos tables, identical on both sides (the target gets them without defaults).
const CHAOS_TABLES: &str = "
create table chaos_counters (id int primary key, n bigint not null);
create table chaos_toast (id int primary key, version int not null, body text not null);
alter table chaos_toast alter column body set storage external;
create table chaos_probe (round int primary key, at timestamptz not null);
";

/// Source only: one row per counter increment, written in the increment's transaction.
const CHAOS_OPS: &str = "create table chaos_ops (op_id bigint not null, counter int not null, \
                         primary key (op_id, counter))";

// ------------------------------------------------------------------ seed, rng --

/// xorshift64*: tiny and deterministic for a seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        // splitmix64 once, so that small or similar seeds start far apart (and never 0).
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)).max(1))
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// A duration in [lo_ms, hi_ms].
    fn millis(&mut self, lo_ms: u64, hi_ms: u64) -> Duration {
        Duration::from_millis(lo_ms + self.below(hi_ms - lo_ms + 1))
    }
}

fn env_u64(var: &str) -> Option<u64> {
    std::env::var(var).ok().map(|v| {
        v.trim()
            .parse()
            .unwrap_or_else(|e| panic!("{var}={v:?} is not a number: {e}"))
    })
}

// ------------------------------------------------------------------- faults --

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    Kill9,
    Sigterm,
    TargetOutage,
    BrokerRestart,
    SourceRestart,
}

impl Fault {
    const ALL: [Fault; 5] = [
        Fault::Kill9,
        Fault::Sigterm,
        Fault::TargetOutage,
        Fault::BrokerRestart,
        Fault::SourceRestart,
    ];

    /// The name `PGFERRY_CHAOS_FAULTS` uses.
    fn key(self) -> &'static str {
        match self {
            Fault::Kill9 => "kill9",
            Fault::Sigterm => "sigterm",
            Fault::TargetOutage => "target",
            Fault::BrokerRestart => "broker",
            Fault::SourceRestart => "source",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Fault::Kill9 => "kill -9 pgferry",
            Fault::Sigterm => "SIGTERM pgferry",
            Fault::TargetOutage => "target stopped",
            Fault::BrokerRestart => "broker restarted",
            Fault::SourceRestart => "source restarted",
        }
    }
}

/// The fault kinds to inject: `PGFERRY_CHAOS_FAULTS` (comma-separated keys), else all.
fn enabled_faults() -> Vec<Fault> {
    let Ok(list) = std::env::var("PGFERRY_CHAOS_FAULTS") else {
        return Fault::ALL.to_vec();
    };
    let kinds: Vec<Fault> = list
        .split(',')
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(|k| {
            *Fault::ALL.iter().find(|f| f.key() == k).unwrap_or_else(|| {
                panic!("PGFERRY_CHAOS_FAULTS: unknown fault {k:?} (kill9, sigterm, target, broker, source)")
            })
        })
        .collect();
    assert!(!kinds.is_empty(), "PGFERRY_CHAOS_FAULTS names no fault");
    kinds
}

/// The fault plan: a shuffled permutation of the kinds first, then uniform picks.
fn plan(rng: &mut Rng, kinds: &[Fault], rounds: usize) -> Vec<Fault> {
    let mut first = kinds.to_vec();
    for i in (1..first.len()).rev() {
        first.swap(i, rng.below(i as u64 + 1) as usize);
    }
    (0..rounds)
        .map(|i| {
            if i < first.len() {
                first[i]
            } else {
                kinds[rng.below(kinds.len() as u64) as usize]
            }
        })
        .collect()
}

// ----------------------------------------------------------------- services --

fn services(args: &[&str]) -> Result<(), String> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/services.sh");
    let out = Command::new(script)
        .args(args)
        .output()
        .map_err(|e| format!("running scripts/services.sh: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "scripts/services.sh {args:?} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Brings every service back up when dropped, also when the test panics.
struct Restore;

impl Drop for Restore {
    fn drop(&mut self) {
        for args in [
            &["start", "hospital"][..],
            &["start", "ehr"],
            &["start-broker"],
        ] {
            if let Err(e) = services(args) {
                eprintln!("chaos: could not bring a service back, do it by hand: {e}");
            }
        }
    }
}

/// Copies the pgferry logs of a failed run out of the test directory (which the
/// TestDb removes) so they can be read afterwards.
struct KeepLogsOnPanic {
    dir: PathBuf,
    seed: u64,
}

impl Drop for KeepLogsOnPanic {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let keep = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("chaos-{}", self.seed));
        let _ = std::fs::create_dir_all(&keep);
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "stderr" || x == "toml") {
                    let _ = std::fs::copy(&p, keep.join(e.file_name()));
                }
            }
        }
        eprintln!("chaos: pgferry logs of this run kept in {}", keep.display());
    }
}

// ---------------------------------------------------------------------- SQL --

/// Run SQL (simple query protocol) without panicking: the source may be down.
fn try_sql(url: &str, query: &str) -> Result<Vec<Vec<Option<String>>>, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let work = async {
            let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                .await
                .map_err(|e| format!("connecting: {e}"))?;
            let handle = tokio::spawn(conn);
            let msgs = client
                .simple_query(query)
                .await
                .map_err(|e| format!("{e}"))?;
            drop(client);
            let _ = handle.await;
            Ok(rows_of(msgs))
        };
        tokio::time::timeout(Duration::from_secs(30), work)
            .await
            .map_err(|_| "timed out".to_string())?
    })
}

fn rows_of(msgs: Vec<tokio_postgres::SimpleQueryMessage>) -> Vec<Vec<Option<String>>> {
    msgs.into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
            }
            _ => None,
        })
        .collect()
}

/// `select id, n from chaos_counters` as a vector indexed by id.
fn counters(url: &str) -> Result<Vec<u64>, String> {
    let mut out = vec![0; COUNTERS];
    for r in try_sql(url, "select id, n from chaos_counters order by id")? {
        let id: usize = r[0].as_deref().unwrap().parse().unwrap();
        out[id] = r[1].as_deref().unwrap().parse().unwrap();
    }
    Ok(out)
}

// ----------------------------------------------------------------- workload --

/// What the counter/TOAST thread did.
#[derive(Default)]
struct OpsReport {
    /// Increments per counter of transactions known to have committed.
    committed: Vec<u64>,
    /// Counter transactions whose outcome is unknown: (op id, counters).
    unknown: Vec<(u64, Vec<usize>)>,
    counter_txns: u64,
    toast_ops: u64,
    failed: u64,
}

/// Counter transactions and TOAST traffic until `stop`, reconnecting as needed.
fn ops_workload(url: String, seed: u64, stop: Arc<AtomicBool>) -> OpsReport {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut rng = Rng::new(seed ^ 0x0005_eed0_f0b5);
    let mut report = OpsReport {
        committed: vec![0; COUNTERS],
        ..OpsReport::default()
    };
    let mut client: Option<tokio_postgres::Client> = None;
    let mut op_id = 0u64;
    let mut next_toast = 1u64;
    while !stop.load(Ordering::Relaxed) {
        let c = match &client {
            Some(c) if !c.is_closed() => c,
            _ => {
                let connected = rt.block_on(async {
                    let (c, conn) = tokio::time::timeout(
                        Duration::from_secs(10),
                        tokio_postgres::connect(&url, tokio_postgres::NoTls),
                    )
                    .await
                    .ok()?
                    .ok()?;
                    tokio::spawn(conn);
                    Some(c)
                });
                if connected.is_none() {
                    std::thread::sleep(Duration::from_millis(200));
                }
                client = connected;
                continue;
            }
        };
        let roll = rng.below(100);
        let (query, counter_op) = if roll < 60 {
            op_id += 1;
            let n = 1 + rng.below(3) as usize;
            let mut ks: Vec<usize> = Vec::with_capacity(n);
            while ks.len() < n {
                let k = rng.below(COUNTERS as u64) as usize;
                if !ks.contains(&k) {
                    ks.push(k);
                }
            }
            let ids: Vec<String> = ks.iter().map(|k| k.to_string()).collect();
            let logs: Vec<String> = ks.iter().map(|k| format!("({op_id}, {k})")).collect();
            (
                format!(
                    "begin; update chaos_counters set n = n + 1 where id in ({}); \
                     insert into chaos_ops (op_id, counter) values {}; commit",
                    ids.join(", "),
                    logs.join(", ")
                ),
                Some((op_id, ks)),
            )
        } else {
            let pick = "(select id from chaos_toast order by random() limit 1)";
            // ~12.8 kB of md5 hex per body: incompressible enough, and stored out of
            // line uncompressed anyway (storage external).
            let body = "(select string_agg(md5(random()::text || g::text), '') \
                        from generate_series(1, 400) g)";
            let q = match roll {
                60..=69 => {
                    next_toast += 1;
                    format!(
                        "insert into chaos_toast values ({}, 0, {body})",
                        next_toast - 1
                    )
                }
                // Unchanged TOAST: only the version changes.
                70..=89 => {
                    format!("update chaos_toast set version = version + 1 where id = {pick}")
                }
                90..=91 => format!(
                    "update chaos_toast set version = version + 1 where id % 5 = {}",
                    rng.below(5)
                ),
                92..=95 => {
                    format!("update chaos_toast set body = {body}, version = version + 1 where id = {pick}")
                }
                _ => format!("delete from chaos_toast where id = {pick}"),
            };
            (q, None)
        };
        let result = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(30), c.simple_query(&query)).await
        });
        match (result, counter_op) {
            (Ok(Ok(_)), Some((_, ks))) => {
                for k in ks {
                    report.committed[k] += 1;
                }
                report.counter_txns += 1;
            }
            (Ok(Ok(_)), None) => report.toast_ops += 1,
            (_, op) => {
                // Whatever happened, start over on a fresh connection (an error inside
                // the explicit transaction leaves this one aborted).
                report.failed += 1;
                if let Some(op) = op {
                    report.unknown.push(op);
                }
                client = None;
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        }
        std::thread::sleep(Duration::from_millis(5 + rng.below(20)));
    }
    report
}

/// What the generate thread did.
#[derive(Default)]
struct GenerateReport {
    runs: u64,
    failed: u64,
    last_failure: String,
}

/// `pgferry generate` in 4 s chunks until `stop`, each with a seed of its own.
fn generate_workload(url: String, seed: u64, stop: Arc<AtomicBool>) -> GenerateReport {
    let mut report = GenerateReport::default();
    while !stop.load(Ordering::Relaxed) {
        let chunk_seed = seed
            .wrapping_mul(1000)
            .wrapping_add(report.runs)
            .to_string();
        let (code, _, err) = run(&[
            "generate",
            "--url",
            &url,
            "--rate",
            "25",
            "--duration",
            "4s",
            "--seed",
            &chunk_seed,
        ]);
        report.runs += 1;
        if code != 0 {
            report.failed += 1;
            report.last_failure = err.lines().last().unwrap_or_default().to_string();
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    report
}

/// The two workload threads; dropping it (also on panic) tells them to stop.
struct Workload {
    stop: Arc<AtomicBool>,
    ops: Option<JoinHandle<OpsReport>>,
    generate: Option<JoinHandle<GenerateReport>>,
}

impl Workload {
    fn start(url: &str, seed: u64) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let (u, s) = (url.to_string(), stop.clone());
        let ops = std::thread::spawn(move || ops_workload(u, seed, s));
        let (u, s) = (url.to_string(), stop.clone());
        let generate = std::thread::spawn(move || generate_workload(u, seed, s));
        Workload {
            stop,
            ops: Some(ops),
            generate: Some(generate),
        }
    }

    fn finish(mut self) -> (OpsReport, GenerateReport) {
        self.stop.store(true, Ordering::Relaxed);
        let ops = self.ops.take().unwrap().join().expect("the ops thread");
        let generate = self
            .generate
            .take()
            .unwrap()
            .join()
            .expect("the generate thread");
        (ops, generate)
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

// ------------------------------------------------------------------ pgferry --

/// The pgferry daemon under test and what is needed to restart and judge it.
struct Ferry {
    seed: u64,
    cfg: PathBuf,
    dir: PathBuf,
    spawns: u32,
    p: Pgferry,
}

impl Ferry {
    fn spawn_process(cfg: &Path, dir: &Path, n: u32) -> Pgferry {
        Pgferry::spawn(
            &["run", "--config", cfg.to_str().unwrap()],
            dir.join(format!("pgferry.{n:03}.stderr")),
        )
    }

    fn start(seed: u64, cfg: PathBuf, dir: PathBuf) -> Ferry {
        let p = Self::spawn_process(&cfg, &dir, 0);
        Ferry {
            seed,
            cfg,
            dir,
            spawns: 1,
            p,
        }
    }

    fn respawn(&mut self) {
        self.p = Self::spawn_process(&self.cfg, &self.dir, self.spawns);
        self.spawns += 1;
    }

    /// The last `lines` lines of the current pgferry's stderr above debug level.
    fn tail(&self, lines: usize) -> String {
        let text = self.p.stderr_text();
        let all: Vec<&str> = text.lines().filter(|l| !l.contains(" DEBUG ")).collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Fail if pgferry exited by itself.
    fn check_alive(&mut self, during: &str) {
        if let Some(status) = self.p.child.try_wait().unwrap() {
            panic!(
                "chaos seed {}: pgferry exited by itself ({status}) {during}; stderr (last 80 lines):\n{}",
                self.seed,
                self.tail(80)
            );
        }
    }

    /// Sleep `d` while watching that pgferry stays up.
    fn sleep_alive(&mut self, d: Duration, during: &str) {
        let end = Instant::now() + d;
        while Instant::now() < end {
            self.check_alive(during);
            std::thread::sleep(Duration::from_millis(200).min(end - Instant::now()));
        }
        self.check_alive(during);
    }

    /// SIGTERM: exit 0 within [`TERM_LIMIT`]. Returns how long it took.
    fn terminate(&mut self) -> Duration {
        self.check_alive("before SIGTERM");
        let t0 = Instant::now();
        let status = Command::new("kill")
            .args(["-TERM", &self.p.pid().to_string()])
            .status()
            .unwrap();
        assert!(
            status.success(),
            "chaos seed {}: kill -TERM failed",
            self.seed
        );
        loop {
            if let Some(status) = self.p.child.try_wait().unwrap() {
                assert_eq!(
                    status.code(),
                    Some(0),
                    "chaos seed {}: pgferry must exit 0 after SIGTERM, got {status}; stderr (last 80 lines):\n{}",
                    self.seed,
                    self.tail(80)
                );
                return t0.elapsed();
            }
            if t0.elapsed() > TERM_LIMIT {
                self.p.kill9();
                panic!(
                    "chaos seed {}: pgferry did not exit within {TERM_LIMIT:?} of SIGTERM; stderr (last 80 lines):\n{}",
                    self.seed,
                    self.tail(80)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `pgferry verify`: (exit code, output).
    fn verify(&self) -> (i32, String) {
        let (code, out, err) = run(&["verify", "--config", self.cfg.to_str().unwrap()]);
        (code, format!("{out}{err}"))
    }
}

// --------------------------------------------------------------------- setup --

/// The demo's table files plus the chaos tables, in `dir/tables`; the main config
/// (unique slot, publication, topic prefix) in `dir/chaos.toml`.
fn write_config(src: &TestDb, tgt: &TestDb) -> PathBuf {
    let tables = src.dir.join("tables");
    std::fs::create_dir_all(&tables).unwrap();
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tables");
    for e in std::fs::read_dir(&demo).unwrap().flatten() {
        std::fs::copy(e.path(), tables.join(e.file_name())).unwrap();
    }
    for t in ["chaos_counters", "chaos_toast", "chaos_probe"] {
        std::fs::write(
            tables.join(format!("public.{t}.toml")),
            format!("source = \"public.{t}\"\n"),
        )
        .unwrap();
    }
    let slot = src.slot("chaos");
    let cfg = src.dir.join("chaos.toml");
    std::fs::write(
        &cfg,
        format!(
            "tables_dir = \"tables\"\n\
             [source]\nurl = \"{}\"\nslot = \"{slot}\"\npublication = \"{slot}\"\nheartbeat_interval = \"1s\"\n\
             [kafka]\nbrokers = \"{}\"\ntopic_prefix = \"t{}\"\npartitions = 3\n\
             [sink]\nurl = \"{}\"\nconsumer = \"chaos\"\nworkers = 3\nbatch_linger = \"20ms\"\n\
             [http]\nlisten = \"\"\n",
            src.url,
            service_env("PGFERRY_BROKERS"),
            src.name,
            tgt.url
        ),
    )
    .unwrap();
    cfg
}

/// Insert probe row `round` at the source (retrying while it comes back) and wait
/// until the target has it: the whole pipeline works again. Returns the time taken.
fn probe(ferry: &mut Ferry, src: &TestDb, tgt: &TestDb, round: usize) -> Duration {
    let seed = ferry.seed;
    let t0 = Instant::now();
    loop {
        match try_sql(
            &src.url,
            &format!("insert into chaos_probe values ({round}, now()) on conflict do nothing"),
        ) {
            Ok(_) => break,
            Err(e) if t0.elapsed() > RECOVERY => {
                panic!("chaos seed {seed}: the source did not come back for probe {round}: {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
    let query = format!("select count(*) from chaos_probe where round = {round}");
    loop {
        ferry.check_alive(&format!("while probe {round} travels"));
        if try_sql(&tgt.url, &query)
            .ok()
            .and_then(|r| r.into_iter().next())
            .and_then(|r| r.into_iter().next().flatten())
            .as_deref()
            == Some("1")
        {
            return t0.elapsed();
        }
        if t0.elapsed() > RECOVERY {
            panic!(
                "chaos seed {seed}: probe {round} did not reach the target within {RECOVERY:?}: \
                 the pipeline did not recover; pgferry stderr (last 80 lines):\n{}",
                ferry.tail(80)
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// min / mean / max of some durations, for the summary.
fn stats(ds: &[Duration]) -> String {
    if ds.is_empty() {
        return "-".into();
    }
    let min = ds.iter().min().unwrap().as_secs_f64();
    let max = ds.iter().max().unwrap().as_secs_f64();
    let mean = ds.iter().map(Duration::as_secs_f64).sum::<f64>() / ds.len() as f64;
    format!("min {min:.1}s mean {mean:.1}s max {max:.1}s")
}

// ---------------------------------------------------------------------- test --

#[test]
fn mixed_ehr_workload_survives_random_faults_exactly_once() {
    let seed = env_u64("PGFERRY_CHAOS_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            % 1_000_000_000
    });
    let rounds = env_u64("PGFERRY_CHAOS_ROUNDS").unwrap_or(5) as usize;
    let kinds = enabled_faults();
    let keys: Vec<&str> = kinds.iter().map(|f| f.key()).collect();
    let rerun = format!(
        "PGFERRY_CHAOS_SEED={seed} PGFERRY_CHAOS_ROUNDS={rounds} PGFERRY_CHAOS_FAULTS={}",
        keys.join(",")
    );
    eprintln!("chaos: seed {seed}, {rounds} faults of {keys:?} (rerun with {rerun})");
    let default_hook = std::panic::take_hook();
    let hook_rerun = rerun.clone();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        eprintln!(
            "chaos: FAILED with seed {seed}; rerun with {hook_rerun} cargo test --test chaos -- --nocapture"
        );
    }));
    let started = Instant::now();
    let mut rng = Rng::new(seed);
    let faults = plan(&mut rng, &kinds, rounds);

    // Drop order (reverse of declaration) matters: pgferry and the workload stop
    // first, then the services come back, then the logs are kept, then the databases go.
    let src = TestDb::new("chaos");
    let tgt = TestDb::on(&service_env("PGFERRY_TARGET_URL"), "chaos_t");
    let _keep = KeepLogsOnPanic {
        dir: src.dir.clone(),
        seed,
    };
    let _restore = Restore;

    src.sql(EHR_SCHEMA);
    src.sql(CHAOS_TABLES);
    src.sql(CHAOS_OPS);
    src.sql(&format!(
        "insert into chaos_counters select g, 0 from generate_series(0, {}) g",
        COUNTERS - 1
    ));
    tgt.sql(HOSPITAL_SCHEMA);
    tgt.sql(CHAOS_TABLES);
    let cfg = write_config(&src, &tgt);
    let (code, out, err) = run(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "chaos seed {seed}: pgferry check:\n{out}{err}");

    let mut ferry = Ferry::start(seed, cfg, src.dir.clone());
    wait_streaming(&src, "chaos");
    // The counters' initial rows were written before the slot existed: the initial
    // snapshot copies them.
    wait_for(
        "the initial snapshot of chaos_counters in the target",
        Duration::from_secs(120),
        || {
            (try_sql(&tgt.url, "select count(*) from chaos_counters")
                .ok()
                .and_then(|r| r.into_iter().next())
                .and_then(|r| r.into_iter().next().flatten())
                == Some(COUNTERS.to_string()))
            .then_some(())
        },
    );
    let first = probe(&mut ferry, &src, &tgt, 0);
    eprintln!("chaos: pipeline up (first probe in {first:.1?}); starting the workload");
    let workload = Workload::start(&src.url, seed);

    let mut recovery: BTreeMap<Fault, Vec<Duration>> = BTreeMap::new();
    let mut term_times = Vec::new();
    for (i, &fault) in faults.iter().enumerate() {
        let round = i + 1;
        let calm = rng.millis(2000, 5000);
        ferry.sleep_alive(calm, &format!("in normal running before fault {round}"));
        let t0 = Instant::now();
        let detail = match fault {
            Fault::Kill9 => {
                ferry.check_alive("before kill -9");
                ferry.p.kill9();
                let down = rng.millis(0, 2000);
                std::thread::sleep(down);
                ferry.respawn();
                format!("down {down:.1?}")
            }
            Fault::Sigterm => {
                let took = ferry.terminate();
                term_times.push(took);
                ferry.respawn();
                format!("exited 0 in {took:.1?}")
            }
            Fault::TargetOutage => {
                let down = rng.millis(5000, 20000);
                services(&["stop", "hospital"])
                    .unwrap_or_else(|e| panic!("chaos seed {seed}: {e}"));
                ferry.sleep_alive(down, "while the target was down");
                services(&["start", "hospital"])
                    .unwrap_or_else(|e| panic!("chaos seed {seed}: {e}"));
                ferry.check_alive("after the target came back");
                format!("down {down:.1?}")
            }
            Fault::BrokerRestart => {
                services(&["restart-broker"]).unwrap_or_else(|e| panic!("chaos seed {seed}: {e}"));
                ferry.check_alive("after the broker restart");
                format!("restart took {:.1?}", t0.elapsed())
            }
            Fault::SourceRestart => {
                let down = rng.millis(0, 5000);
                services(&["stop", "ehr"]).unwrap_or_else(|e| panic!("chaos seed {seed}: {e}"));
                ferry.sleep_alive(down, "while the source was down");
                services(&["start", "ehr"]).unwrap_or_else(|e| panic!("chaos seed {seed}: {e}"));
                ferry.check_alive("after the source came back");
                format!("down {down:.1?}")
            }
        };
        let applied = t0.elapsed();
        let back = probe(&mut ferry, &src, &tgt, round);
        recovery.entry(fault).or_default().push(back);
        eprintln!(
            "chaos: seed {seed} fault {round}/{rounds}: {} ({detail}; fault {applied:.1?}), \
             pipeline recovered in {back:.1?} [{:.0?} elapsed]",
            fault.name(),
            started.elapsed()
        );
    }

    // The end: stop writing, let everything drain, compare.
    let (ops, generated) = workload.finish();
    ferry.check_alive("after the workload stopped");
    let end_lsn = src
        .value("select pg_current_wal_lsn()::text")
        .expect("current WAL LSN");
    let drain_start = Instant::now();
    wait_for(
        &format!("chaos seed {seed}: the slot to be confirmed up to {end_lsn}"),
        DRAIN,
        || {
            ferry.check_alive("while draining");
            src.confirmed_flush("chaos")
                .filter(|c| lsn(c) >= lsn(&end_lsn))
        },
    );
    // Unknown outcomes: the op log, written in the same transaction, says.
    let mut expected = ops.committed.clone();
    let mut resolved_committed = 0;
    for (op_id, ks) in &ops.unknown {
        let found = src
            .value(&format!(
                "select count(*) from chaos_ops where op_id = {op_id}"
            ))
            .unwrap();
        if found != "0" {
            assert_eq!(
                found,
                ks.len().to_string(),
                "chaos seed {seed}: op {op_id} half committed"
            );
            resolved_committed += 1;
            for &k in ks {
                expected[k] += 1;
            }
        }
    }
    let deadline = Instant::now() + DRAIN;
    let (verify_code, verify_out) = loop {
        ferry.check_alive("while waiting for verify");
        let (code, out) = ferry.verify();
        let target = counters(&tgt.url);
        if code == 0 && target.as_ref() == Ok(&expected) {
            break (code, out);
        }
        if Instant::now() > deadline {
            break (code, format!("{out}\ntarget counters {target:?}"));
        }
        std::thread::sleep(Duration::from_millis(1000));
    };
    let drained = drain_start.elapsed();
    assert_eq!(
        verify_code, 0,
        "chaos seed {seed}: verify never said equal within {DRAIN:?}:\n{verify_out}\npgferry stderr (last 80 lines):\n{}",
        ferry.tail(80)
    );
    let source_counters = counters(&src.url).unwrap();
    let target_counters = counters(&tgt.url).unwrap();
    let logged: Vec<u64> = {
        let mut v = vec![0; COUNTERS];
        for r in src.sql("select counter, count(*) from chaos_ops group by counter") {
            v[r[0].as_deref().unwrap().parse::<usize>().unwrap()] =
                r[1].as_deref().unwrap().parse().unwrap();
        }
        v
    };
    assert_eq!(
        source_counters, expected,
        "chaos seed {seed}: source counters vs committed increments"
    );
    assert_eq!(
        logged, expected,
        "chaos seed {seed}: op log vs committed increments"
    );
    assert_eq!(
        target_counters, expected,
        "chaos seed {seed}: every target counter must equal its number of committed increments"
    );
    // Still equal a little later: nothing arrives twice after the fact.
    std::thread::sleep(Duration::from_secs(3));
    let (code, out) = ferry.verify();
    assert_eq!(code, 0, "chaos seed {seed}: verify after settling:\n{out}");
    assert_eq!(
        counters(&tgt.url).unwrap(),
        expected,
        "chaos seed {seed}: target counters after settling"
    );
    let took = ferry.terminate();

    // Summary.
    let rows = |db: &TestDb, q: &str| db.value(q).unwrap_or_default();
    eprintln!(
        "chaos: PASSED seed {seed}, {rounds} faults in {:.0?}",
        started.elapsed()
    );
    for (fault, times) in &recovery {
        eprintln!(
            "chaos:   {:<17} x{:<3} recovery {}",
            fault.name(),
            times.len(),
            stats(times)
        );
    }
    eprintln!(
        "chaos:   SIGTERM exit times {}; final SIGTERM {took:.1?}; drain + verify {drained:.1?}",
        stats(&term_times)
    );
    eprintln!(
        "chaos:   counter txns {} committed (+{} resolved of {} unknown), {} increments; toast ops {}; \
         failed statements {}; generate chunks {} ({} failed{}); pgferry started {} times",
        ops.counter_txns,
        resolved_committed,
        ops.unknown.len(),
        expected.iter().sum::<u64>(),
        ops.toast_ops,
        ops.failed,
        generated.runs,
        generated.failed,
        if generated.last_failure.is_empty() {
            String::new()
        } else {
            format!(", last: {}", generated.last_failure)
        },
        ferry.spawns
    );
    eprintln!(
        "chaos:   rows now: patients {}, visits {}, doctor_notes {}, lab_results {}, chaos_toast {}",
        rows(&src, "select count(*) from patients"),
        rows(&src, "select count(*) from visits"),
        rows(&src, "select count(*) from doctor_notes"),
        rows(&src, "select count(*) from lab_results"),
        rows(&src, "select count(*) from chaos_toast"),
    );
    eprintln!("chaos: verify:\n{out}");
}
