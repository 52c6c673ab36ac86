//! Shared helpers of the integration tests: the real services (from
//! `scripts/services.sh`), a unique database per test, SQL, config files, and a
//! `pgferry` child process whose stdout lines can be awaited.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_pgferry");

/// The binary `Pgferry::spawn` and `run` start: `PGFERRY_TEST_BIN` if set (a copy of
/// this tree's build, when a target directory is shared with another checkout whose
/// builds replace `target/debug/pgferry`), else cargo's.
pub fn bin() -> String {
    std::env::var("PGFERRY_TEST_BIN").unwrap_or_else(|_| BIN.to_string())
}

/// A service URL from the environment, or a failure saying how to start the services.
/// Integration tests never skip silently.
pub fn service_env(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!(
            "{var} is not set: the integration tests need the local services. Run\n    \
             scripts/services.sh up && eval \"$(scripts/services.sh env)\"\n\
             (or run the whole suite with scripts/test.sh)"
        )
    })
}

pub fn source_url() -> String {
    service_env("PGFERRY_SOURCE_URL")
}

/// Replace the database of a `postgres://…/db` URL.
pub fn with_db(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let slash = base[scheme_end..]
        .find('/')
        .map(|i| i + scheme_end)
        .unwrap_or(base.len());
    format!("{}/{db}{query}", &base[..slash])
}

/// Run SQL with the simple query protocol; rows come back as text.
pub fn sql(url: &str, query: &str) -> Vec<Vec<Option<String>>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
        let handle = tokio::spawn(conn);
        let msgs = client.simple_query(query).await.unwrap_or_else(|e| {
            let detail = e
                .as_db_error()
                .map(|d| d.message().to_string())
                .unwrap_or_default();
            panic!("running SQL on {url}: {e}: {detail}\n{query}")
        });
        drop(client);
        let _ = handle.await;
        msgs.into_iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => {
                    Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
                }
                _ => None,
            })
            .collect()
    })
}

/// The single value of a one-row, one-column query.
pub fn sql_value(url: &str, query: &str) -> Option<String> {
    sql(url, query)
        .into_iter()
        .next()
        .and_then(|r| r.into_iter().next().flatten())
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A database of its own on the source server, dropped (with its slots) at the end.
pub struct TestDb {
    pub name: String,
    pub url: String,
    admin_url: String,
    pub dir: PathBuf,
}

impl TestDb {
    pub fn new(tag: &str) -> TestDb {
        Self::on(&source_url(), tag)
    }

    pub fn on(server_url: &str, tag: &str) -> TestDb {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("pgft_{tag}_{}_{n}", std::process::id());
        let admin_url = with_db(server_url, "postgres");
        sql(
            &admin_url,
            &format!("drop database if exists {name} with (force)"),
        );
        sql(&admin_url, &format!("create database {name}"));
        let dir = std::env::temp_dir().join(&name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TestDb {
            url: with_db(server_url, &name),
            name,
            admin_url,
            dir,
        }
    }

    pub fn sql(&self, query: &str) -> Vec<Vec<Option<String>>> {
        sql(&self.url, query)
    }

    pub fn value(&self, query: &str) -> Option<String> {
        sql_value(&self.url, query)
    }

    /// The cluster-wide unique slot name for a test's slot `tag` (slots are global
    /// to the server, so two runs of the suite must not share them).
    pub fn slot(&self, tag: &str) -> String {
        format!("{}_{tag}", self.name)
    }

    /// The slot's confirmed_flush_lsn as text.
    pub fn confirmed_flush(&self, tag: &str) -> Option<String> {
        self.value(&format!(
            "select confirmed_flush_lsn::text from pg_replication_slots where slot_name = '{}'",
            self.slot(tag)
        ))
    }

    /// Write a config file for this database; `extra` is appended (tables, http…).
    pub fn config(&self, file: &str, slot_tag: &str, extra: &str) -> PathBuf {
        self.config_with_url(file, &self.url, slot_tag, extra)
    }

    pub fn config_with_url(&self, file: &str, url: &str, slot_tag: &str, extra: &str) -> PathBuf {
        let slot = self.slot(slot_tag);
        let path = self.dir.join(file);
        let text = format!(
            "[source]\nurl = \"{url}\"\nslot = \"{slot}\"\npublication = \"{slot}\"\nheartbeat_interval = \"1s\"\n\
             [http]\nlisten = \"\"\n{extra}\n"
        );
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let _ = std::panic::catch_unwind(|| {
            // A walsender takes a moment to let go of its slot after its client went
            // away or was terminated; a slot left behind keeps WAL forever (and its
            // database cannot be dropped), so wait for each to become inactive.
            for _ in 0..50 {
                let left = sql_value(
                    &self.admin_url,
                    &format!(
                        "select count(*) from (
                           select pg_terminate_backend(active_pid) from pg_replication_slots
                            where database = '{0}' and active_pid is not null
                           union all
                           select null from pg_replication_slots
                            where database = '{0}' and active) a",
                        self.name
                    ),
                );
                sql(
                    &self.admin_url,
                    &format!(
                        "select pg_drop_replication_slot(slot_name) from pg_replication_slots \
                         where database = '{0}' and not active",
                        self.name
                    ),
                );
                if left.as_deref() == Some("0") {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            sql(
                &self.admin_url,
                &format!("drop database if exists {} with (force)", self.name),
            );
        });
        delete_topics_of(&self.name);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether `topic` was made for the database `name`: the tests' and benches' topic
/// prefixes hold the source database's name (`t<name>`, `d<name><tag>`), and the name
/// must not continue with a digit (`…_1` is not `…_10`).
pub fn topic_of(topic: &str, name: &str) -> bool {
    topic.match_indices(name).any(|(i, _)| {
        !topic[i + name.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit())
    })
}

/// The names of the topics on `brokers` (every topic's metadata; none is created), or
/// `None` if the brokers do not answer within `timeout`.
pub fn topic_names(brokers: &str, timeout: Duration) -> Option<Vec<String>> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("log_level", "0")
        .create()
        .ok()?;
    let metadata = consumer.fetch_metadata(None, timeout).ok()?;
    Some(
        metadata
            .topics()
            .iter()
            .map(|t| t.name().to_string())
            .collect(),
    )
}

/// Delete `topics` on `brokers`, waiting at most `timeout` for the brokers' answer. On a
/// thread of its own: the admin call needs a runtime, and the caller may run on one.
pub fn delete_topics(brokers: &str, topics: Vec<String>, timeout: Duration) -> Result<(), String> {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    if topics.is_empty() {
        return Ok(());
    }
    let brokers = brokers.to_string();
    std::thread::spawn(move || {
        let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("log_level", "0")
            .create()
            .map_err(|e| e.to_string())?;
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        let options = AdminOptions::new()
            .operation_timeout(Some(timeout))
            .request_timeout(Some(timeout));
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?
            .block_on(admin.delete_topics(&names, &options))
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
    .join()
    .unwrap_or_else(|_| Err("the deleting thread panicked".into()))
}

/// Delete the local broker's topics of a test database once its test is over. Left
/// behind, thousands of them (a few per test, every run) made the shared broker take
/// over 40 s to restart, which the outage tests do, and slowed every later benchmark.
/// Best effort: a broker that is down or slow to answer leaves them (5 s at most).
fn delete_topics_of(name: &str) {
    let Ok(brokers) = std::env::var("PGFERRY_BROKERS") else {
        return;
    };
    let timeout = Duration::from_secs(5);
    if let Some(names) = topic_names(&brokers, timeout) {
        let mine = names.into_iter().filter(|t| topic_of(t, name)).collect();
        let _ = delete_topics(&brokers, mine, timeout);
    }
}

/// A running `pgferry` with its stdout lines collected on a thread.
pub struct Pgferry {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    stderr: PathBuf,
}

impl Pgferry {
    pub fn spawn(args: &[&str], stderr: PathBuf) -> Pgferry {
        Self::spawn_env(args, stderr, &[])
    }

    pub fn spawn_env(args: &[&str], stderr: PathBuf, env: &[(&str, &str)]) -> Pgferry {
        let err = std::fs::File::create(&stderr).unwrap();
        let mut child = Command::new(bin())
            .env("PGFERRY_LOG", "info,pgferry=debug")
            .envs(env.iter().copied())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .expect("spawning pgferry");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                match line {
                    Ok(l) => {
                        if tx.send(l).is_err() {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
        });
        Pgferry {
            child,
            lines: rx,
            stderr,
        }
    }

    /// `pgferry tail --config FILE [extra args]`.
    pub fn tail(config: &std::path::Path, extra: &[&str]) -> Pgferry {
        let mut args = vec!["tail", "--config", config.to_str().unwrap()];
        args.extend_from_slice(extra);
        let stderr =
            config.with_extension(format!("stderr.{}", COUNTER.fetch_add(1, Ordering::SeqCst)));
        Pgferry::spawn(&args, stderr)
    }

    /// The next `n` lines, failing with the process's stderr after `timeout`.
    pub fn lines(&mut self, n: usize, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => out.push(l),
                Err(_) => panic!(
                    "got {} of {n} lines within {timeout:?}; stderr:\n{}",
                    out.len(),
                    self.stderr_text()
                ),
            }
        }
        out
    }

    /// The next `n` lines parsed as JSON.
    pub fn json(&mut self, n: usize, timeout: Duration) -> Vec<serde_json::Value> {
        self.lines(n, timeout)
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }

    /// Lines that arrive within `wait` (for asserting that nothing more comes).
    pub fn drain(&mut self, wait: Duration) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(l) = self.lines.recv_timeout(wait) {
            out.push(l);
        }
        out
    }

    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        // Never signal a pid that was already reaped: it may belong to another
        // process by now (the broker was hit that way once).
        if let Some(status) = self.child.try_wait().unwrap() {
            return status;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                self.kill9();
                panic!(
                    "pgferry did not stop within 40s of SIGTERM; stderr:\n{}",
                    self.stderr_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Peak resident memory (VmHWM) in KiB, read from /proc.
    pub fn peak_rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Pgferry {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill9();
        }
    }
}

/// Run `pgferry ARGS` to completion: (exit code, stdout, stderr).
pub fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin())
        .args(args)
        .output()
        .expect("running pgferry");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Poll `f` until it returns Some, or fail with `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Parse "X/Y" into a number for comparisons.
pub fn lsn(text: &str) -> u64 {
    let (hi, lo) = text.split_once('/').expect("LSN X/Y");
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

/// A TCP port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET `path` from a local HTTP server: (status code, body).
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s =
        std::net::TcpStream::connect(("127.0.0.1", port)).expect("connecting to the HTTP server");
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let code = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

/// Wait until the slot `tag` is being streamed from (the tail is connected and streaming).
pub fn wait_streaming(db: &TestDb, tag: &str) {
    let slot = db.slot(tag);
    // `active` alone is not enough: the backend creating the slot holds it while it
    // waits for a consistent point, and changes made before that are not decoded.
    // A walsender streaming it is what counts.
    // Nor is a walsender: the one that created the slot with an exported snapshot
    // holds it, in state `startup`, while the initial copy runs.
    let query = format!(
        "select count(*) from pg_stat_replication r join pg_replication_slots s on s.active_pid = r.pid \
         where s.slot_name = '{slot}' and r.state in ('catchup', 'streaming')"
    );
    // Creating a slot waits for every transaction open on the server to end, and
    // other tests run long ones: allow for it.
    wait_for(
        &format!("slot {slot} to be streamed"),
        Duration::from_secs(180),
        || (db.value(&query).as_deref() == Some("1")).then_some(()),
    );
}

/// Run `scripts/services.sh` (stop/start a shared cluster or the broker); panics if it
/// fails.
pub fn services(args: &[&str]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/services.sh");
    let status = std::process::Command::new(script)
        .args(args)
        .status()
        .expect("running scripts/services.sh");
    assert!(status.success(), "scripts/services.sh {args:?} failed");
}
