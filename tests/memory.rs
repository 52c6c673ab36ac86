//! Issue 8.20: the source → next-stage channel is bounded by bytes, not only by count.
//! A reader that stops reading must not make pgferry hold thousands of large rows: here
//! `tail` writes into a pipe nobody reads while 40 rows of 10 MB each arrive, and its
//! peak memory stays far below those 400 MB.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

#[test]
fn large_rows_behind_a_stalled_reader_keep_memory_bounded() {
    let db = TestDb::new("bigrows");
    db.sql("create table scans (id int primary key, pdf bytea)");
    let cfg = db.config("m.toml", "s", "[[tables]]\nsource = \"public.scans\"\n");
    let stderr = std::fs::File::create(db.dir.join("tail.stderr")).unwrap();
    // stdout is a pipe this test never reads: once its 64 KiB fill, tail blocks.
    let mut child = Command::new(BIN)
        .args(["tail", "--config", cfg.to_str().unwrap()])
        .env("PGFERRY_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap();
    wait_streaming(&db, "s");
    // 40 rows of 10 MB of incompressible bytes, each its own transaction.
    for id in 0..40 {
        db.sql(&format!(
            "insert into scans select {id}, decode(string_agg(md5(random()::text), ''), 'hex') \
             from generate_series(1, 625000)"
        ));
    }
    let status = |field: &str| -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", child.id()))
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    // Let the source read as far as it will.
    std::thread::sleep(Duration::from_secs(10));
    let peak_mib = status("VmHWM:") / 1024;
    eprintln!("tail behind a stalled reader, 400 MB of rows pending: peak RSS {peak_mib} MiB");
    assert!(
        child.try_wait().unwrap().is_none(),
        "tail is still running, blocked"
    );
    assert!(
        peak_mib < 300,
        "memory must stay bounded by bytes: peak RSS {peak_mib} MiB"
    );
    let _ = child.kill();
    let _ = child.wait();
}
