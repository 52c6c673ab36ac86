//! What the Rust benchmarks share beyond the tests' helpers: where results go, and
//! what a process cost. Each harness uses a part of it.
#![allow(dead_code)]

use std::fs::File;
use std::process::Command;
use std::time::{Duration, Instant};

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
