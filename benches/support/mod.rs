//! What the Rust benchmarks share beyond the tests' helpers: where results go, and
//! what a process cost. Each harness uses a part of it.
#![allow(dead_code)]

use std::fs::File;
use std::process::Command;
use std::time::{Duration, Instant};

/// One kept connection for a benchmark's polls. A poll that connects anew (what the
/// tests' `TestDb::value` does) costs the server a backend fork and a catalog warm-up;
/// at 20-40 polls a second that took CPU from the side being timed, and most from
/// pgferry's, which keeps both cores busy.
pub struct Probe {
    rt: tokio::runtime::Runtime,
    client: tokio_postgres::Client,
    url: String,
}

impl Probe {
    pub fn new(url: &str) -> Probe {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("building the probe's runtime");
        let client = rt.block_on(async {
            let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                .await
                .unwrap_or_else(|e| panic!("probe: connecting to {url}: {e}"));
            // Driven whenever a query is: the runtime is current-thread.
            tokio::spawn(conn);
            client
        });
        Probe {
            rt,
            client,
            url: url.to_string(),
        }
    }

    /// The single value of a one-row, one-column query (simple protocol, as text).
    pub fn value(&self, query: &str) -> Option<String> {
        let msgs = self
            .rt
            .block_on(self.client.simple_query(query))
            .unwrap_or_else(|e| panic!("probe: running SQL on {}: {e}\n{query}", self.url));
        msgs.into_iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).map(str::to_string)),
            _ => None,
        })?
    }
}

/// The process groups that [`CpuSampler`] tells apart, in the order reports show them.
pub const GROUPS: [&str; 6] = [
    "pgferry",
    "EHR server",
    "hospital server",
    "broker",
    "tools",
    "other",
];

/// CPU seconds per process group while one side runs, sampled from /proc every 100 ms
/// on a thread of its own: who used the host's cores, not only pgferry. A PostgreSQL
/// process belongs to the server whose postmaster (`$PGFERRY_SERVICES_DIR/pg-*/
/// postmaster.pid`) is it or its parent; `tools` are pg_dump, psql and pg_recvlogical;
/// `other` is everything else, this harness included. A process that exits between
/// two samples loses at most its last 100 ms.
pub struct CpuSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<[f64; 6]>,
}

impl CpuSampler {
    pub fn start() -> CpuSampler {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let ticks = clock_ticks();
            let dir = std::env::var("PGFERRY_SERVICES_DIR")
                .unwrap_or_else(|_| "/var/lib/pgferry-services".into());
            let postmaster = |cluster: &str| -> Option<u32> {
                std::fs::read_to_string(format!("{dir}/{cluster}/postmaster.pid"))
                    .ok()?
                    .lines()
                    .next()?
                    .trim()
                    .parse()
                    .ok()
            };
            let (ehr, hospital) = (postmaster("pg-ehr"), postmaster("pg-hospital"));
            // pid -> (group, CPU ticks when last seen); processes already running start
            // from what they had used.
            let mut seen: std::collections::HashMap<u32, (usize, u64)> = Default::default();
            let mut total = [0.0; 6];
            let mut first = true;
            // A child of this harness between fork and exec still shows the harness's
            // command line: it is grouped once it shows its own (one round of the
            // snapshot counted pgferry's 19 CPU-s as "other" when caught so).
            let me = std::process::id();
            let own_cmd = std::fs::read(format!("/proc/{me}/cmdline")).unwrap_or_default();
            loop {
                let done = flag.load(std::sync::atomic::Ordering::Relaxed);
                let mut alive = std::collections::HashSet::new();
                for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
                    let Some(pid) = entry
                        .file_name()
                        .to_str()
                        .and_then(|n| n.parse::<u32>().ok())
                    else {
                        continue;
                    };
                    let Some(fields) = stat_fields(pid) else {
                        continue;
                    };
                    let (Some(ppid), Some(cpu)) = (
                        fields.get(1).and_then(|v| v.parse::<u32>().ok()),
                        fields.get(11).zip(fields.get(12)).and_then(|(u, s)| {
                            Some(u.parse::<u64>().ok()? + s.parse::<u64>().ok()?)
                        }),
                    ) else {
                        continue;
                    };
                    alive.insert(pid);
                    match seen.get_mut(&pid) {
                        Some((group, last)) => {
                            total[*group] += cpu.saturating_sub(*last) as f64 / ticks;
                            *last = cpu;
                        }
                        None => {
                            let cmd =
                                std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                            if pid != me && cmd == own_cmd {
                                continue;
                            }
                            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
                            let server =
                                |pm: Option<u32>| pm.is_some_and(|pm| pid == pm || ppid == pm);
                            let group = if cmd.contains("pgferry") && cmd.contains(" run ") {
                                0
                            } else if server(ehr) {
                                1
                            } else if server(hospital) {
                                2
                            } else if cmd.contains("kafka.Kafka") {
                                3
                            } else if ["pg_dump", "psql", "pg_recvlogical"].iter().any(|t| {
                                // Debian's client tools may run under its Perl wrapper.
                                cmd.split(' ').take(2).any(|c| c.ends_with(t))
                            }) {
                                4
                            } else {
                                5
                            };
                            let base = if first { cpu } else { 0 };
                            total[group] += cpu.saturating_sub(base) as f64 / ticks;
                            seen.insert(pid, (group, cpu));
                        }
                    }
                }
                seen.retain(|pid, _| alive.contains(pid));
                first = false;
                if done {
                    return total;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        CpuSampler { stop, thread }
    }

    /// CPU seconds of each of [`GROUPS`] since [`CpuSampler::start`].
    pub fn stop(self) -> [f64; 6] {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().expect("the CPU sampler panicked")
    }
}

/// A report's line of CPU seconds per process group (and their sum).
pub fn cpu_line(cpu: &[f64; 6]) -> String {
    let parts: Vec<String> = GROUPS
        .iter()
        .zip(cpu)
        .map(|(g, s)| format!("{g} {s:.2}"))
        .collect();
    format!(
        "{} (total {:.2})",
        parts.join(", "),
        cpu.iter().sum::<f64>()
    )
}

/// The same as a JSON object, for the results file.
pub fn cpu_json(cpu: &[f64; 6]) -> serde_json::Value {
    GROUPS
        .iter()
        .zip(cpu)
        .map(|(g, s)| {
            (
                g.to_string(),
                serde_json::json!((s * 100.0).round() / 100.0),
            )
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// `target/bench-results.jsonl`, opened for appending one JSON line per result.
pub fn results_file() -> File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/target/bench-results.jsonl"
        ))
        .expect("opening target/bench-results.jsonl")
}

/// Peak RSS (VmHWM) of a live process, in MB.
pub fn peak_rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// Clock ticks per second (`getconf CLK_TCK`), the unit of /proc/<pid>/stat's times.
pub fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// The fields of /proc/<pid>/stat after the process's name: the state is `[0]`, utime
/// and stime (fields 14 and 15) are `[11]` and `[12]`.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(
        s.rsplit_once(") ")?
            .1
            .split(' ')
            .map(str::to_string)
            .collect(),
    )
}

fn cpu_of(fields: &[String]) -> Option<f64> {
    let t = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(t / clock_ticks())
}

/// CPU seconds (user + system, all threads) of a process that is alive, or exited
/// but not yet reaped (a zombie still has its times in /proc).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    cpu_of(&stat_fields(pid)?)
}

/// (CPU seconds, peak RSS MB) of a live process.
pub fn usage(pid: u32) -> (Option<f64>, Option<f64>) {
    (cpu_seconds(pid), peak_rss_mb(pid))
}

/// What a process that ended by itself cost, as seen by [`watch_exit`].
pub struct Exit {
    /// From `started` until the process had exited (within a few ms).
    pub seconds: f64,
    pub cpu_s: Option<f64>,
    pub peak_rss_mb: Option<f64>,
}

/// Watch a child process until it exits by itself: its peak RSS is sampled while it
/// runs (a zombie has no memory left to report), its CPU seconds are read once it has
/// exited, from its zombie. The caller must not reap the child (`wait`, `try_wait`)
/// before this returns. `None` if it is still running after `limit`.
pub fn watch_exit(pid: u32, started: Instant, limit: Duration) -> Option<Exit> {
    let mut peak = None;
    let mut last_rss: Option<Instant> = None;
    loop {
        let fields = stat_fields(pid);
        let state = fields.as_ref().and_then(|f| f.first()).map(String::as_str);
        if matches!(state, None | Some("Z" | "X")) {
            return Some(Exit {
                seconds: started.elapsed().as_secs_f64(),
                cpu_s: fields.as_deref().and_then(cpu_of),
                peak_rss_mb: peak,
            });
        }
        if last_rss.is_none_or(|t| t.elapsed() >= Duration::from_millis(50)) {
            // VmHWM only grows: the latest reading is the peak so far.
            peak = peak_rss_mb(pid).or(peak);
            last_rss = Some(Instant::now());
        }
        if started.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The benchmarks' table: the 10-column patients table.
pub const TABLE: &str = "create table public.patients (
    id bigint primary key, name text, dob date, gender char(1), contact_number text,
    email text, address text, notes text, weight numeric(6,2), updated_at timestamptz
)";

/// ROWS realistic rows of [`TABLE`] (`ROWS` is replaced by the count): names,
/// addresses and a clinical note of ~200 bytes.
pub const ROWS_SQL: &str = "
insert into public.patients
select g,
       (array['Margaret','James','Aisha','Oliver','Priya','Thomas','Chloe','Mohammed','Eleanor','Daniel'])[1 + g % 10]
         || ' ' || (array['Smith','O''Connell','Patel','Jones','Nowak','Williams','Okafor','Brown','Taylor','Whitfield'])[1 + (g / 10) % 10],
       date '1930-01-01' + (g * 37 % 32000),
       case when g % 2 = 0 then 'F' else 'M' end,
       '+44 7' || lpad((g::bigint * 7919 % 1000000000)::text, 9, '0'),
       'patient' || g || '@example.org',
       (g % 240 + 1) || ' ' || (array['Harbour View Road','Mill Lane','Station Road','Church Street'])[1 + g % 4]
         || ', ' || (array['Portsmouth','Leeds','Bristol','Norwich','Exeter','York'])[1 + (g / 5) % 6] || ', United Kingdom',
       'Follow-up after laparoscopic cholecystectomy; wound healing well, no signs of infection. '
         || 'Mild post-operative nausea resolved. Continue paracetamol 1g QDS PRN; review bloods in 2 weeks. Ref ' || g || '.',
       round((45 + (g % 700) / 10.0)::numeric, 2),
       now() - (g % 100000) * interval '1 minute'
  from generate_series(1, ROWS) as g";

/// The drains' backlog: `rows` rows inserted in one transaction, then all updated in
/// a second.
pub fn backlog_sql(rows: u64) -> String {
    format!(
        "{};\nupdate public.patients set weight = weight + 1, updated_at = now();",
        ROWS_SQL.replace("ROWS", &rows.to_string())
    )
}

/// A whole-number knob from the environment, or `default`.
pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).map_or(default, |v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name} must be a whole number, got {v:?}"))
    })
}

/// Say so when something would distort the run: the on-demand services of the fault
/// tests beside it (the three-node cluster and the schema registry are four JVMs that
/// take CPU from every side; after a test run they slowed even the native sync from 3.7
/// to 4.4–5.8 s), or a broker that has only just started.
pub fn warn_of_distortions() {
    let extra = [
        (
            "127.0.0.1:19092",
            "the three-node Kafka cluster",
            "cluster3 down",
        ),
        ("127.0.0.1:8081", "the schema registry", "registry down"),
    ];
    for (addr, what, stop) in extra {
        let Ok(addr) = addr.parse() else { continue };
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            eprintln!(
                "bench: warning: {what} is running and takes CPU from this run; \
                 stop it with `scripts/services.sh {stop}`"
            );
        }
    }
    // A broker's JVM compiles its hot paths during its first heavy minutes: the first
    // two snapshot runs after a start measured 4.0 and 8.8 broker CPU-s against 1.6-2.3
    // later (its C2 compiler thread alone 7% of the host's samples).
    let uptime = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|u| u.split(' ').next()?.parse::<f64>().ok());
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if !String::from_utf8_lossy(&cmd).contains("kafka.Kafka") {
            continue;
        }
        let started = stat_fields(pid)
            .and_then(|f| f.get(19)?.parse::<f64>().ok())
            .map(|ticks| ticks / clock_ticks());
        if let Some(age) = uptime.zip(started).map(|(u, s)| u - s) {
            if age < 300.0 {
                eprintln!(
                    "bench: warning: a Kafka broker (pid {pid}) started {age:.0} s ago and is \
                     still compiling its hot paths; the first runs after a start cost it 2-4 \
                     times the CPU: run once to warm it, and count the runs after"
                );
            }
        }
    }
}
