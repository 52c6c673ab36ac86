//! What the Rust benchmarks share beyond the tests' helpers: where results go, and
//! what a process cost.

use std::fs::File;

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
