//! Broker faults on a real three-node Apache Kafka cluster (KRaft, every node both
//! broker and controller, `scripts/services.sh cluster3`), with `pgferry run` (source
//! and sink) under a counter workload. What is checked is DESIGN §1, the durability
//! contract:
//!
//! * nothing lost, nothing applied twice: at the end every counter in the target
//!   equals the number of updates the workload made to it in the source, `verify`
//!   finds source and target equal, and a trigger log in the target shows each key's
//!   values strictly increasing (an event applied twice, or an older one after a
//!   newer one, would repeat or lower a value);
//! * per-key order on the topic: each key lives on one partition, its values never
//!   decrease in offset order, and every value from 0 to its final count is there;
//! * the slot's `confirmed_flush_lsn` moves only past what the brokers acknowledged
//!   with `acks=all`: it stands still while too few brokers are up for
//!   `min.insync.replicas`, and resumes by itself once they are back.
//!
//! pgferry creates the topics with `partitions = 3`, `replication_factor = 3` and
//! `min_insync_replicas = 2`; the tests check on the brokers that the topics got
//! them. The tests change the cluster (kill, stop, restart nodes), so they hold one
//! lock and run one at a time. Each begins with `cluster3 up`, which also starts any
//! node a failed test left stopped; the cluster is left running at the end.

mod common;
mod kafka_support;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use common::*;
use kafka_support::*;
use rdkafka::admin::{AdminClient, AdminOptions, ConfigSource, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

/// Counter rows `c(id, n)`, ids 1..=KEYS.
const KEYS: usize = 50;
/// Pause between two workload transactions (a few hundred updates a second: enough
/// load on a shared 2-core machine).
const WORKLOAD_PAUSE: Duration = Duration::from_millis(5);
/// How long the pipeline gets to catch up once the fault is over.
const CONVERGE: Duration = Duration::from_secs(120);
/// How long confirmation gets to resume after a fault. (90 s was once not enough after
/// a whole-cluster restart in a full CI run on two cores: reconnect backoffs of both
/// librdkafka and pgferry, capped at 30 s, stack up there.)
const RESUME: Duration = Duration::from_secs(150);
/// Ceiling of pgferry's resident memory while the brokers are down.
const RSS_LIMIT_MIB: u64 = 200;
/// The slot tag of every test's source database.
const SLOT: &str = "s";

/// One test at a time on the shared cluster (cargo runs a binary's tests in parallel).
static CLUSTER: Mutex<()> = Mutex::new(());

fn target_url() -> String {
    service_env("PGFERRY_TARGET_URL")
}

/// Run `scripts/services.sh ARGS`; its stdout, or a failure with its output.
fn services(args: &[&str]) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/services.sh");
    let out = Command::new(script)
        .args(args)
        .output()
        .expect("running scripts/services.sh");
    assert!(
        out.status.success(),
        "services.sh {} failed ({}):\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Elapsed time since the test began (after it got the cluster), for the log of its
/// phases.
struct Clock(&'static str, Instant);

impl Clock {
    fn start(test: &'static str) -> Clock {
        Clock(test, Instant::now())
    }

    fn note(&self, what: &str) {
        eprintln!(
            "[{} {:>6.1}s] {what}",
            self.0,
            self.1.elapsed().as_secs_f64()
        );
    }
}

// ------------------------------------------------------------------- the cluster --

/// One partition as the brokers describe it.
#[derive(Debug)]
struct PartitionInfo {
    id: i32,
    leader: i32,
    replicas: Vec<i32>,
    isr: Vec<i32>,
}

/// The three-node cluster, held exclusively by one test.
struct Cluster {
    brokers: String,
    _lock: MutexGuard<'static, ()>,
}

impl Cluster {
    /// Take the lock, start the cluster (idempotent) and wait until all three brokers
    /// are registered, so topics with a replication factor of 3 can be created.
    fn acquire() -> Cluster {
        let lock = CLUSTER.lock().unwrap_or_else(PoisonError::into_inner);
        services(&["cluster3", "up"]);
        let env = services(&["cluster3", "env"]);
        let brokers = env
            .trim()
            .strip_prefix("export PGFERRY_CLUSTER3_BROKERS=")
            .unwrap_or_else(|| panic!("unexpected `cluster3 env` output: {env}"))
            .to_string();
        let cluster = Cluster {
            brokers,
            _lock: lock,
        };
        cluster.wait_live(&[1, 2, 3]);
        cluster
    }

    /// `services.sh cluster3 ACTION N` (kill, stop, start).
    fn node(&self, action: &str, n: i32) {
        services(&["cluster3", action, &n.to_string()]);
    }

    fn client(&self) -> BaseConsumer {
        ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", "pgferry-tests-cluster")
            .create()
            .expect("metadata client")
    }

    /// The brokers the cluster reports alive (registered and not fenced), sorted.
    fn live(&self) -> Option<Vec<i32>> {
        let meta = self
            .client()
            .fetch_metadata(None, Duration::from_secs(5))
            .ok()?;
        let mut ids: Vec<i32> = meta.brokers().iter().map(|b| b.id()).collect();
        ids.sort_unstable();
        Some(ids)
    }

    fn wait_live(&self, nodes: &[i32]) {
        let mut seen = None;
        wait_for(
            &format!("brokers {nodes:?} to be live"),
            Duration::from_secs(120),
            || {
                seen = self.live();
                (seen.as_deref() == Some(nodes)).then_some(())
            },
        );
    }

    /// The partitions of `topic`, or None if the metadata cannot be read now.
    fn partitions(&self, topic: &str) -> Option<Vec<PartitionInfo>> {
        let meta = self
            .client()
            .fetch_metadata(Some(topic), Duration::from_secs(5))
            .ok()?;
        let t = meta.topics().first()?;
        if t.error().is_some() || t.partitions().is_empty() {
            return None;
        }
        let mut parts: Vec<PartitionInfo> = t
            .partitions()
            .iter()
            .map(|p| PartitionInfo {
                id: p.id(),
                leader: p.leader(),
                replicas: p.replicas().to_vec(),
                isr: p.isr().to_vec(),
            })
            .collect();
        parts.sort_by_key(|p| p.id);
        Some(parts)
    }

    /// The node leading `topic`'s `partition`.
    fn leader(&self, topic: &str, partition: i32) -> i32 {
        wait_for(
            &format!("a leader of {topic}/{partition}"),
            Duration::from_secs(30),
            || {
                self.partitions(topic)?
                    .into_iter()
                    .find(|p| p.id == partition && p.leader > 0)
                    .map(|p| p.leader)
            },
        )
    }

    /// Wait until every partition of `topic` has all three replicas in sync again.
    fn wait_in_sync(&self, topic: &str) {
        wait_for(
            &format!("all replicas of {topic} in sync"),
            Duration::from_secs(120),
            || {
                let parts = self.partitions(topic)?;
                parts
                    .iter()
                    .all(|p| p.leader > 0 && p.isr.len() == 3)
                    .then_some(())
            },
        );
    }

    /// A topic configuration entry as the brokers report it: (value, source).
    fn topic_config(&self, topic: &str, name: &str) -> (Option<String>, ConfigSource) {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .create()
            .expect("admin client");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
        let results = rt
            .block_on(admin.describe_configs([&ResourceSpecifier::Topic(topic)], &opts))
            .unwrap_or_else(|e| panic!("describing the configuration of {topic}: {e}"));
        let resource = results
            .into_iter()
            .next()
            .expect("one result")
            .unwrap_or_else(|code| panic!("describing the configuration of {topic}: {code}"));
        let entry = resource
            .entries
            .into_iter()
            .find(|e| e.name == name)
            .unwrap_or_else(|| panic!("topic {topic} has no configuration entry {name}"));
        (entry.value, entry.source)
    }

    /// pgferry created `topic` as configured: 3 partitions (1 for its compacted
    /// topics), 3 replicas each, and `min.insync.replicas = 2` set on the topic itself
    /// (the brokers' default is 2 as well, so the value alone would prove nothing).
    fn check_topic_settings(&self, topic: &str, partitions: usize) {
        let parts = wait_for(
            &format!("metadata of {topic}"),
            Duration::from_secs(30),
            || self.partitions(topic),
        );
        assert_eq!(parts.len(), partitions, "partitions of {topic}: {parts:?}");
        for p in &parts {
            assert_eq!(
                p.replicas.len(),
                3,
                "kafka.replication_factor = 3 for {topic}/{}: {p:?}",
                p.id
            );
        }
        let (value, source) = self.topic_config(topic, "min.insync.replicas");
        assert_eq!(
            value.as_deref(),
            Some("2"),
            "min.insync.replicas of {topic}"
        );
        assert_eq!(
            source,
            ConfigSource::DynamicTopic,
            "min.insync.replicas of {topic} must be set on the topic by pgferry \
             (kafka.min_insync_replicas), not inherited from the brokers"
        );
    }
}

/// Deletes the topics `<prefix>.*` when dropped, so that the cluster does not grow
/// from run to run (a node's restart after kill -9 recovers every partition's log,
/// and slows down with their number). Best effort: a test that failed while nodes
/// were down may leave its topics behind.
struct TopicsOf {
    brokers: String,
    prefix: String,
}

impl Drop for TopicsOf {
    fn drop(&mut self) {
        let timeout = Duration::from_secs(10);
        let Some(names) = topic_names(&self.brokers, timeout) else {
            return;
        };
        let start = format!("{}.", self.prefix);
        let mine = names
            .into_iter()
            .filter(|n| n.starts_with(&start))
            .collect();
        if let Err(e) = delete_topics(&self.brokers, mine, timeout) {
            eprintln!("deleting the topics {start}*: {e}");
        }
    }
}

// ------------------------------------------------------------------ the workload --

/// A tiny deterministic PRNG (xorshift).
fn next(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

/// A connection for the workload, waiting up to 60s for a server that is away.
async fn connect_source(url: &str) -> tokio_postgres::Client {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match tokio_postgres::connect(url, tokio_postgres::NoTls).await {
            Ok((client, conn)) => {
                tokio::spawn(conn);
                return client;
            }
            Err(e) if server_away(&e) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("workload connection: {e}"),
        }
    }
}

/// A background thread that increments random counters, one to three per
/// transaction, on one connection, and counts the updates that committed (a
/// transaction cut off by a server restart is looked up in its ledger `ops`).
struct Workload {
    stop: Arc<AtomicBool>,
    transactions: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<Vec<u64>>>,
}

impl Workload {
    fn start(url: &str) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let transactions = Arc::new(AtomicU64::new(0));
        let (halt, done, url) = (stop.clone(), transactions.clone(), url.to_string());
        let mut seed = 0x9E37_79B9_7F4A_7C15_u64 ^ u64::from(std::process::id());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut client = connect_source(&url).await;
                let mut counts = vec![0u64; KEYS + 1];
                let mut txn: u64 = 0;
                while !halt.load(Ordering::SeqCst) {
                    txn += 1;
                    let want = 1 + (next(&mut seed) % 3) as usize;
                    let mut keys: Vec<usize> = Vec::with_capacity(want);
                    while keys.len() < want {
                        let k = 1 + (next(&mut seed) % KEYS as u64) as usize;
                        if !keys.contains(&k) {
                            keys.push(k);
                        }
                    }
                    // Several statements in one simple query run as one transaction;
                    // the row in `ops` (not published) tells whether it committed.
                    let query: String = std::iter::once(format!("insert into ops values ({txn});"))
                        .chain(
                            keys.iter()
                                .map(|k| format!("update c set n = n + 1 where id = {k};")),
                        )
                        .collect();
                    let committed = match client.simple_query(&query).await {
                        Ok(replies) => {
                            let rows: u64 = replies
                                .iter()
                                .map(|m| match m {
                                    tokio_postgres::SimpleQueryMessage::CommandComplete(n) => *n,
                                    _ => 0,
                                })
                                .sum();
                            assert_eq!(rows, 1 + keys.len() as u64, "workload: rows {keys:?}");
                            true
                        }
                        // The shared source server restarted (other engineers' tests
                        // do that): find out whether the transaction committed.
                        Err(e) if server_away(&e) => {
                            eprintln!("workload: {e}; reconnecting");
                            client = connect_source(&url).await;
                            let found = client
                                .simple_query(&format!("select 1 from ops where id = {txn}"))
                                .await
                                .expect("reading the workload's ledger");
                            found
                                .iter()
                                .any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
                        }
                        Err(e) => {
                            let detail = e.as_db_error().map(|d| d.message().to_string());
                            panic!("workload transaction failed: {e}: {detail:?}")
                        }
                    };
                    if committed {
                        for k in keys {
                            counts[k] += 1;
                        }
                        done.fetch_add(1, Ordering::SeqCst);
                    }
                    tokio::time::sleep(WORKLOAD_PAUSE).await;
                }
                counts
            })
        });
        Workload {
            stop,
            transactions,
            thread: Some(thread),
        }
    }

    fn transactions(&self) -> u64 {
        self.transactions.load(Ordering::SeqCst)
    }

    /// Let at least `n` more transactions commit (the load goes on across a phase).
    fn wait_more(&self, n: u64) {
        let from = self.transactions();
        wait_for(
            &format!("{n} more workload transactions"),
            Duration::from_secs(60),
            || (self.transactions() >= from + n).then_some(()),
        );
    }

    /// Stop and return the committed updates per key (index = id; index 0 unused).
    fn finish(mut self) -> Vec<u64> {
        self.stop.store(true, Ordering::SeqCst);
        let thread = self.thread.take().expect("running");
        thread.join().expect("the workload thread panicked")
    }
}

impl Drop for Workload {
    /// A test that fails stops its workload before its databases go.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

// ------------------------------------------------------------------ the pipeline --

/// Source and target databases, the config of `pgferry run` between them through the
/// cluster, and the table's topic.
struct Pipeline {
    src: TestDb,
    tgt: TestDb,
    cfg: PathBuf,
    prefix: String,
    topic: String,
    brokers: String,
    _topics: TopicsOf,
}

impl Pipeline {
    /// The counter table `c`, plus `more` tables `(id int primary key, body text)`
    /// (e.g. `pad` for bulk volume).
    fn new(cluster: &Cluster, tag: &str, more: &[&str]) -> Pipeline {
        let src = test_db(&source_url(), tag);
        let tgt = test_db(&target_url(), &format!("{tag}_t"));
        // `ops`: the workload's ledger of committed transactions, not published.
        let mut ddl = String::from(
            "create table c (id int primary key, n int not null); create table ops (id bigint primary key);",
        );
        let mut tables = String::from("[[tables]]\nsource = \"public.c\"\n");
        for t in more {
            ddl += &format!("create table {t} (id int primary key, body text not null);");
            tables += &format!("[[tables]]\nsource = \"public.{t}\"\n");
        }
        rows(&src, &ddl);
        // The trigger log: every row version the sink writes, in order.
        rows(
            &tgt,
            "create table c (id int primary key, n int not null);
             create table c_log (seq bigserial primary key, id int not null, n int not null);
             create function log_c() returns trigger language plpgsql as $$
               begin insert into c_log (id, n) values (new.id, new.n); return null; end $$;
             create trigger log_c after insert or update on c
               for each row execute function log_c();",
        );
        let prefix = format!("t{}", src.name);
        let cfg = src.config(
            &format!("{tag}.toml"),
            SLOT,
            &format!(
                "[kafka]\nbrokers = \"{}\"\ntopic_prefix = \"{prefix}\"\npartitions = 3\n\
                 replication_factor = 3\nmin_insync_replicas = 2\n\
                 [kafka.properties]\ndebug = \"eos\"\n\
                 [sink]\nurl = \"{}\"\nconsumer = \"test\"\nbatch_linger = \"20ms\"\ncreate_tables = true\n\
                 {tables}",
                cluster.brokers, tgt.url
            ),
        );
        Pipeline {
            _topics: TopicsOf {
                brokers: cluster.brokers.clone(),
                prefix: prefix.clone(),
            },
            topic: format!("{prefix}.public.c"),
            prefix,
            src,
            tgt,
            cfg,
            brokers: cluster.brokers.clone(),
        }
    }

    /// `pgferry run` (source and sink), then the counter rows, once they are in the
    /// target. pgferry's first start on fresh topics fails on this cluster (see
    /// [`run_starts_on_fresh_topics_right_after_a_broker_rejoined`]): such an exit before the
    /// test's load begins is printed and pgferry started again (at most 5 times), so
    /// that the fault tests test the faults.
    fn start(&self) -> Pgferry {
        let mut exits = Vec::new();
        let mut p = self.spawn(0);
        self.until_started(&mut p, &mut exits, "the slot to be streamed", || {
            streaming(&self.src, SLOT)
        });
        rows(
            &self.src,
            &format!("insert into c select g, 0 from generate_series(1, {KEYS}) g"),
        );
        self.until_started(&mut p, &mut exits, "the counter rows in the target", || {
            self.target_counts().iter().flatten().count() == KEYS
        });
        if !exits.is_empty() {
            eprintln!(
                "NOTE: pgferry exited {} time(s) while starting and was started again:\n{}",
                exits.len(),
                exits.join("\n")
            );
        }
        p
    }

    fn spawn(&self, attempt: usize) -> Pgferry {
        let stderr = self.cfg.with_extension(format!("run{attempt}.stderr"));
        // librdkafka's idempotent-producer states (debug "eos", above) go to the log:
        // what it was waiting for shows when confirmation stalls after a fault.
        Pgferry::spawn_env(
            &["run", "--config", self.cfg.to_str().unwrap()],
            stderr,
            &[("PGFERRY_LOG", "info,pgferry=debug,librdkafka=debug")],
        )
    }

    /// Wait for `done`, starting pgferry again whenever it exits.
    fn until_started(
        &self,
        p: &mut Pgferry,
        exits: &mut Vec<String>,
        what: &str,
        done: impl Fn() -> bool,
    ) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !done() {
            if let Some(status) = p.child.try_wait().unwrap() {
                let text = p.stderr_text();
                let errors: Vec<&str> = text
                    .lines()
                    .filter(|l| l.starts_with("pgferry: error"))
                    .collect();
                exits.push(format!("  {status}: {}", errors.join(" / ")));
                assert!(
                    exits.len() <= 5,
                    "pgferry does not start:\n{}",
                    exits.join("\n")
                );
                *p = self.spawn(exits.len());
                continue;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; pgferry stderr:\n{}",
                stderr_tail(p)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The source's current WAL position.
    fn wal(&self) -> u64 {
        lsn(&value(&self.src, "select pg_current_wal_lsn()::text").unwrap())
    }

    fn confirmed(&self) -> u64 {
        lsn(&confirmed_flush(&self.src, SLOT))
    }

    /// How far the walsender has sent the slot's changes to pgferry.
    fn sent(&self) -> Option<u64> {
        value(
            &self.src,
            &format!(
                "select r.sent_lsn::text from pg_stat_replication r \
                 join pg_replication_slots s on s.active_pid = r.pid where s.slot_name = '{}'",
                self.src.slot(SLOT)
            ),
        )
        .map(|t| lsn(&t))
    }

    /// Wait until the slot is confirmed at or past `at`.
    fn wait_confirmed(&self, p: &mut Pgferry, at: u64, timeout: Duration) {
        wait_alive(
            p,
            "confirmed_flush_lsn to pass a WAL position",
            timeout,
            || {
                let c = self.confirmed();
                if c >= at {
                    Ok(())
                } else {
                    Err(format!("confirmed {} < wanted {}", hex(c), hex(at)))
                }
            },
        );
    }

    /// The target's counters, index = id.
    fn target_counts(&self) -> Vec<Option<u64>> {
        let mut out = vec![None; KEYS + 1];
        for row in rows(&self.tgt, "select id, n from c") {
            let id: usize = row[0].as_deref().unwrap().parse().unwrap();
            if id <= KEYS {
                out[id] = row[1].as_deref().map(|n| n.parse().unwrap());
            }
        }
        out
    }

    /// Everything the workload did arrived, once, in order, and the slot caught up.
    fn converge_and_check(
        &self,
        cluster: &Cluster,
        p: &mut Pgferry,
        counts: &[u64],
        clock: &Clock,
    ) {
        let updates: u64 = counts.iter().sum();
        clock.note(&format!(
            "workload stopped after {updates} updates; waiting for the pipeline to catch up"
        ));
        // The workload's own bookkeeping matches the source.
        let source: Vec<u64> = rows(&self.src, "select n from c order by id")
            .into_iter()
            .map(|r| r[0].as_deref().unwrap().parse().unwrap())
            .collect();
        assert_eq!(
            source,
            counts[1..],
            "source counters vs the workload's count"
        );

        let end = self.wal();
        wait_alive(
            p,
            "every counter in the target to be exact",
            CONVERGE,
            || {
                let target = self.target_counts();
                let wrong: Vec<String> = (1..=KEYS)
                    .filter(|&k| target[k] != Some(counts[k]))
                    .map(|k| format!("id {k}: target {:?}, updates {}", target[k], counts[k]))
                    .collect();
                if wrong.is_empty() {
                    Ok(())
                } else {
                    Err(format!(
                        "{} keys differ, e.g. {:?}",
                        wrong.len(),
                        &wrong[..wrong.len().min(5)]
                    ))
                }
            },
        );
        clock.note("target counters exact");
        self.wait_confirmed(p, end, RESUME);
        clock.note("slot confirmed past the end of the workload");

        // Other tables (the bulk `pad`) may still be on their way.
        wait_alive(
            p,
            "pgferry verify to find source and target equal",
            CONVERGE,
            || {
                let (code, out, err) =
                    common::run(&["verify", "--config", self.cfg.to_str().unwrap()]);
                if code == 0 {
                    Ok(())
                } else {
                    Err(format!("exit {code}:\n{out}{err}"))
                }
            },
        );
        clock.note("verify: equal");

        self.check_applied_once(counts);
        self.check_topic(counts);
        clock.note("target applied once and in order; topic complete and in order");
        for (topic, partitions) in [
            (self.topic.clone(), 3),
            (format!("{}._state", self.prefix), 1),
            (format!("{}._schemas", self.prefix), 1),
        ] {
            cluster.check_topic_settings(&topic, partitions);
        }
    }

    /// The trigger log: per key strictly increasing values ending at the count.
    fn check_applied_once(&self, counts: &[u64]) {
        let mut per_key: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
        for row in rows(&self.tgt, "select id, n from c_log order by seq") {
            per_key
                .entry(row[0].as_deref().unwrap().parse().unwrap())
                .or_default()
                .push(row[1].as_deref().unwrap().parse().unwrap());
        }
        for (k, &count) in counts.iter().enumerate().skip(1) {
            let values = per_key.get(&k).map(Vec::as_slice).unwrap_or_default();
            if let Some(w) = values.windows(2).find(|w| w[1] <= w[0]) {
                panic!(
                    "id {k}: the sink wrote n = {} after n = {} (applied twice or out of order); \
                     its writes: {values:?}",
                    w[1], w[0]
                );
            }
            assert_eq!(values.last(), Some(&count), "id {k}: last value written");
        }
    }

    /// Read the whole topic: each key on one partition, values never decreasing in
    /// offset order, and every value from 0 to the key's count present.
    fn check_topic(&self, counts: &[u64]) {
        let expected = KEYS + counts.iter().sum::<u64>() as usize;
        let schemas = schema_topic(&self.brokers, &self.prefix, 2);
        let records = consume_all(
            &self.brokers,
            &self.topic,
            expected,
            CONVERGE,
            Duration::from_secs(2),
        );
        // id -> (partition, offset, n), as read.
        let mut per_key: HashMap<u64, Vec<(i32, i64, u64)>> = HashMap::new();
        for r in &records {
            let value = r
                .value
                .as_deref()
                .unwrap_or_else(|| panic!("unexpected tombstone at {}/{}", r.partition, r.offset));
            let (_, datum) = decode_single_object(value, &schemas);
            let event = to_json(&datum);
            let id = event["after"]["id"].as_u64().expect("after.id");
            let n = event["after"]["n"].as_u64().expect("after.n");
            per_key
                .entry(id)
                .or_default()
                .push((r.partition, r.offset, n));
        }
        eprintln!(
            "topic {}: {} records for {expected} changes ({} duplicates)",
            self.topic,
            records.len(),
            records.len() - expected.min(records.len())
        );
        for (k, &count) in counts.iter().enumerate().skip(1) {
            let mut events = per_key.remove(&(k as u64)).unwrap_or_default();
            events.sort_unstable();
            let partitions: std::collections::BTreeSet<i32> = events.iter().map(|e| e.0).collect();
            assert_eq!(
                partitions.len(),
                1,
                "id {k} is on partitions {partitions:?}"
            );
            if let Some(w) = events.windows(2).find(|w| w[1].2 < w[0].2) {
                panic!(
                    "id {k}: n = {} at offset {} after n = {} at offset {} on partition {}",
                    w[1].2, w[1].1, w[0].2, w[0].1, w[0].0
                );
            }
            let mut values: Vec<u64> = events.iter().map(|e| e.2).collect();
            values.dedup();
            assert_eq!(
                values,
                (0..=count).collect::<Vec<_>>(),
                "id {k}: every value from 0 to {count} on the topic, none lost"
            );
        }
        assert!(per_key.is_empty(), "unexpected keys: {:?}", per_key.keys());
    }
}

impl Drop for Pipeline {
    /// A failed test keeps pgferry's stderr (the test databases' directory goes).
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let keep = std::env::temp_dir().join(format!("kafka_cluster_{}", self.src.name));
        let _ = std::fs::create_dir_all(&keep);
        for entry in std::fs::read_dir(&self.src.dir)
            .into_iter()
            .flatten()
            .flatten()
        {
            let path = entry.path();
            if path.to_string_lossy().ends_with(".stderr") {
                let _ = std::fs::copy(&path, keep.join(entry.file_name()));
            }
        }
        eprintln!("pgferry's stderr kept in {}", keep.display());
    }
}

/// `TestDb::on`, waiting (up to 60s) for a server that other engineers' tests
/// stopped for a moment.
fn test_db(server_url: &str, tag: &str) -> TestDb {
    let admin = with_db(server_url, "postgres");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let up = rt.block_on(async {
            tokio_postgres::connect(&admin, tokio_postgres::NoTls)
                .await
                .is_ok()
        });
        if up || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    // It may still go away between that check and the database's creation.
    match std::panic::catch_unwind(|| TestDb::on(server_url, tag)) {
        Ok(db) => db,
        Err(_) => {
            std::thread::sleep(Duration::from_secs(5));
            TestDb::on(server_url, tag)
        }
    }
}

/// Whether an error is the server being away (restarting, refusing connections)
/// rather than the statement failing.
fn server_away(e: &tokio_postgres::Error) -> bool {
    match e.as_db_error() {
        None => true,
        Some(d) => matches!(&d.code().code()[..2], "08" | "57"),
    }
}

/// Run SQL (simple protocol, text rows) on `db`. Other engineers' tests stop and start
/// the shared PostgreSQL clusters now and then: a server that is away is waited for
/// (up to 60s) instead of failing the test.
fn rows(db: &TestDb, query: &str) -> Vec<Vec<Option<String>>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut waited = false;
    loop {
        let result = rt.block_on(async {
            let (client, conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls).await?;
            let conn = tokio::spawn(conn);
            let replies = client.simple_query(query).await;
            drop(client);
            let _ = conn.await;
            replies
        });
        match result {
            Ok(replies) => {
                return replies
                    .into_iter()
                    .filter_map(|m| match m {
                        tokio_postgres::SimpleQueryMessage::Row(r) => {
                            Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
                        }
                        _ => None,
                    })
                    .collect()
            }
            Err(e) if server_away(&e) && Instant::now() < deadline => {
                if !waited {
                    eprintln!("{}: {e}; waiting for the server", db.name);
                    waited = true;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => {
                let detail = e.as_db_error().map(|d| d.message().to_string());
                panic!("running SQL on {}: {e} {detail:?}\n{query}", db.url)
            }
        }
    }
}

/// The single value of a one-row, one-column query.
fn value(db: &TestDb, query: &str) -> Option<String> {
    rows(db, query)
        .into_iter()
        .next()
        .and_then(|r| r.into_iter().next().flatten())
}

/// The slot's confirmed_flush_lsn as text.
fn confirmed_flush(db: &TestDb, tag: &str) -> String {
    value(
        db,
        &format!(
            "select confirmed_flush_lsn::text from pg_replication_slots where slot_name = '{}'",
            db.slot(tag)
        ),
    )
    .unwrap_or_else(|| panic!("slot {} exists", db.slot(tag)))
}

/// Whether a walsender streams the slot `tag` (as `common::wait_streaming` waits for).
fn streaming(db: &TestDb, tag: &str) -> bool {
    value(
        db,
        &format!(
            "select count(*) from pg_stat_replication r join pg_replication_slots s \
         on s.active_pid = r.pid where s.slot_name = '{}'",
            db.slot(tag)
        ),
    )
    .as_deref()
        == Some("1")
}

fn hex(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// The last lines of pgferry's stderr, for failure messages.
fn stderr_tail(p: &Pgferry) -> String {
    let text = p.stderr_text();
    let lines: Vec<&str> = text.lines().collect();
    // The sink's retries fill the tail during an outage; the source side's own words
    // (a stall of deliveries, a reconnect) and librdkafka's are kept apart.
    let source: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| {
            l.contains("librdkafka")
                || (!l.contains(" DEBUG ")
                    && (l.contains("pgferry::kafka::producer") || l.contains("pgferry::source")))
        })
        .collect();
    format!(
        "--- the source side's and librdkafka's last lines:\n{}\n--- the last lines:\n{}",
        source[source.len().saturating_sub(30)..].join("\n"),
        lines[lines.len().saturating_sub(40)..].join("\n")
    )
}

/// Fail if pgferry is no longer running.
fn assert_running(p: &mut Pgferry, when: &str) {
    if let Some(status) = p.child.try_wait().unwrap() {
        panic!(
            "pgferry exited ({status}) {when}; it must ride out broker faults. stderr:\n{}",
            stderr_tail(p)
        );
    }
}

/// Poll `f` until Ok, failing with its last Err, or at once if pgferry exits.
fn wait_alive<T>(
    p: &mut Pgferry,
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match f() {
            Ok(v) => return v,
            Err(e) => e,
        };
        assert_running(p, &format!("while waiting for {what} ({last})"));
        if Instant::now() > deadline {
            panic!(
                "timed out after {timeout:?} waiting for {what}: {last}\npgferry stderr:\n{}",
                stderr_tail(p)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A line of /proc/PID/status in MiB (VmRSS, VmHWM).
fn memory_mib(p: &Pgferry, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", p.pid())).unwrap();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{}/status", p.pid()))
        / 1024
}

/// Start the pipeline and the workload, and wait until changes flow end to end.
fn start_under_load(
    cluster: &Cluster,
    tag: &str,
    more: &[&str],
    clock: &Clock,
) -> (Pipeline, Pgferry, Workload) {
    let pipe = Pipeline::new(cluster, tag, more);
    let mut p = pipe.start();
    cluster.check_topic_settings(&pipe.topic, 3);
    let work = Workload::start(&pipe.src.url);
    work.wait_more(200);
    let at = pipe.wal();
    pipe.wait_confirmed(&mut p, at, Duration::from_secs(60));
    wait_alive(&mut p, "the sink to apply", Duration::from_secs(60), || {
        let applied: u64 = pipe.target_counts().iter().flatten().sum();
        if applied > 0 {
            Ok(())
        } else {
            Err("no update in the target yet".into())
        }
    });
    clock.note("pipeline streaming under load");
    (pipe, p, work)
}

#[test]
fn killing_a_partition_leader_loses_nothing_and_confirmation_resumes() {
    let cluster = Cluster::acquire();
    let clock = Clock::start("leader-kill");
    let (pipe, mut p, work) = start_under_load(&cluster, "kleader", &[], &clock);

    let leader = cluster.leader(&pipe.topic, 0);
    cluster.node("kill", leader);
    let at_kill = pipe.wal();
    let killed = Instant::now();
    clock.note(&format!(
        "killed node {leader} (leader of {}/0) at WAL {}",
        pipe.topic,
        hex(at_kill)
    ));
    // Transactions committed around and after the kill become durable on the
    // remaining two replicas: confirmation moves past the kill's WAL position.
    pipe.wait_confirmed(&mut p, at_kill + 1, RESUME);
    clock.note(&format!(
        "confirmation resumed {:.1}s after the kill",
        killed.elapsed().as_secs_f64()
    ));
    let new_leader = cluster.leader(&pipe.topic, 0);
    assert_ne!(
        new_leader, leader,
        "a surviving replica leads {}/0",
        pipe.topic
    );
    work.wait_more(200);

    cluster.node("start", leader);
    cluster.wait_live(&[1, 2, 3]);
    cluster.wait_in_sync(&pipe.topic);
    clock.note(&format!("node {leader} back and in sync"));
    work.wait_more(200);
    assert_running(&mut p, "after the leader was killed and restarted");

    let counts = work.finish();
    pipe.converge_and_check(&cluster, &mut p, &counts, &clock);
    let status = p.terminate();
    assert!(
        status.success(),
        "graceful stop: {status}\n{}",
        stderr_tail(&p)
    );
}

#[test]
fn two_brokers_down_stall_confirmation_with_bounded_memory_then_catch_up() {
    let cluster = Cluster::acquire();
    let clock = Clock::start("two-down");
    let (pipe, mut p, work) = start_under_load(&cluster, "ktwo", &["pad"], &clock);

    // Leave only one node: below min.insync.replicas = 2, and no controller quorum.
    let first = cluster.leader(&pipe.topic, 0);
    let second = (1..=3).find(|&n| n != first).unwrap();
    cluster.node("stop", first);
    cluster.node("stop", second);
    let down = pipe.wal();
    // A change after the brokers went down: it cannot be durable, so no confirmed
    // position (commit end or idle keepalive) may lie beyond its commit.
    rows(
        &pipe.src,
        "insert into pad values (0, 'after the outage began')",
    );
    let bound = pipe.wal();
    clock.note(&format!(
        "stopped nodes {first} and {second} at WAL {}; first change after it commits before {}",
        hex(down),
        hex(bound)
    ));

    // ~120 MB of changes while the brokers are away, on top of the counters.
    for chunk in 0..6 {
        let from = 1 + chunk * 10_000;
        let to = from + 9_999;
        let insert = format!(
            "insert into pad select g, repeat(md5(g::text), 62) from generate_series({from}, {to}) g"
        );
        rows(&pipe.src, &insert);
    }
    let bulk_end = pipe.wal();
    clock.note(&format!("bulk insert done at WAL {}", hex(bulk_end)));
    // pgferry takes changes until its bounded buffers are full: wait until the
    // walsender has stopped sending (or sent everything).
    let mut last = (0, Instant::now());
    wait_alive(
        &mut p,
        "the walsender to stall or finish",
        Duration::from_secs(90),
        || {
            let sent = pipe.sent().unwrap_or(0);
            if sent != last.0 {
                last = (sent, Instant::now());
            }
            if sent >= bulk_end || last.1.elapsed() >= Duration::from_secs(3) {
                Ok(())
            } else {
                Err(format!("sent {}", hex(sent)))
            }
        },
    );
    let sent = pipe.sent().unwrap_or(0);
    // Standing still can only be seen over time.
    let confirmed_1 = pipe.confirmed();
    std::thread::sleep(Duration::from_secs(5));
    let confirmed_2 = pipe.confirmed();
    let rss = memory_mib(&p, "VmRSS:");
    let peak = memory_mib(&p, "VmHWM:");
    clock.note(&format!(
        "brokers down: confirmed {} then {}, walsender sent {} of {}, RSS {rss} MiB (peak {peak} MiB)",
        hex(confirmed_1),
        hex(confirmed_2),
        hex(sent),
        hex(bulk_end)
    ));
    assert_running(&mut p, "while two brokers were down");
    assert!(
        confirmed_2 < bound,
        "confirmed_flush_lsn {} is past {}, which precedes the commit of a change made after \
         the brokers went down (down at {})",
        hex(confirmed_2),
        hex(bound),
        hex(down)
    );
    assert_eq!(
        hex(confirmed_2),
        hex(confirmed_1),
        "confirmed_flush_lsn must not move while nothing can be acknowledged"
    );
    assert!(
        sent < bulk_end,
        "the walsender sent everything ({}): pgferry went on taking changes it could not produce",
        hex(sent)
    );
    assert!(
        peak < RSS_LIMIT_MIB,
        "pgferry's memory must stay bounded while the brokers are down: RSS {rss} MiB, peak {peak} MiB"
    );

    cluster.node("start", first);
    cluster.node("start", second);
    cluster.wait_live(&[1, 2, 3]);
    clock.note("nodes started again");
    let back = pipe.wal();
    pipe.wait_confirmed(&mut p, back, RESUME + CONVERGE);
    clock.note("confirmation resumed past the outage");
    work.wait_more(200);

    let counts = work.finish();
    pipe.converge_and_check(&cluster, &mut p, &counts, &clock);
    assert_eq!(
        value(&pipe.tgt, "select count(*) from pad").as_deref(),
        Some("60001"),
        "every bulk row arrived"
    );
    let status = p.terminate();
    assert!(
        status.success(),
        "graceful stop: {status}\n{}",
        stderr_tail(&p)
    );
}

#[test]
fn whole_cluster_restart_under_load_is_ridden_out() {
    let cluster = Cluster::acquire();
    let clock = Clock::start("cluster-restart");
    let (pipe, mut p, work) = start_under_load(&cluster, "krestart", &[], &clock);

    services(&["cluster3", "restart"]);
    clock.note("cluster restarted");
    assert_running(&mut p, "across a restart of the whole cluster");
    cluster.wait_live(&[1, 2, 3]);
    let back = pipe.wal();
    pipe.wait_confirmed(&mut p, back, RESUME);
    clock.note("confirmation resumed after the restart");
    work.wait_more(200);

    let counts = work.finish();
    pipe.converge_and_check(&cluster, &mut p, &counts, &clock);
    assert_running(&mut p, "at the end");
    let status = p.terminate();
    assert!(
        status.success(),
        "graceful stop: {status}\n{}",
        stderr_tail(&p)
    );
}

#[test]
fn restarting_a_broker_while_the_sink_applies_applies_exactly_once() {
    let cluster = Cluster::acquire();
    let clock = Clock::start("sink-restart");
    let (pipe, mut p, work) = start_under_load(&cluster, "ksink", &[], &clock);

    // The broker the sink fetches partition 0 from, stopped while writes arrive.
    let node = cluster.leader(&pipe.topic, 0);
    let applied = |pipe: &Pipeline| -> u64 {
        value(&pipe.tgt, "select count(*) from c_log")
            .unwrap()
            .parse()
            .unwrap()
    };
    let before = applied(&pipe);
    wait_alive(
        &mut p,
        "the sink to be applying",
        Duration::from_secs(30),
        || {
            let now = applied(&pipe);
            if now > before {
                Ok(())
            } else {
                Err(format!("{now} row writes"))
            }
        },
    );
    cluster.node("stop", node);
    clock.note(&format!("stopped node {node} (leader of {}/0)", pipe.topic));
    work.wait_more(200);
    cluster.node("start", node);
    cluster.wait_live(&[1, 2, 3]);
    cluster.wait_in_sync(&pipe.topic);
    clock.note(&format!("node {node} back and in sync"));
    work.wait_more(200);
    assert_running(&mut p, "after a broker restart");

    let counts = work.finish();
    pipe.converge_and_check(&cluster, &mut p, &counts, &clock);
    let status = p.terminate();
    assert!(
        status.success(),
        "graceful stop: {status}\n{}",
        stderr_tail(&p)
    );
}

/// Right after a broker (re)joins, a topic that was just created is not yet known
/// to every broker, nor led everywhere: metadata and offset requests may answer
/// "unknown topic" or "not leader" for a moment. pgferry must not take that for a
/// missing topic, nor stop on it: `run` on fresh topics streams, and confirms a first
/// change, at its first start. Three times, each right after a node came back from a
/// kill -9 (a rolling restart, then a deploy with new tables).
#[test]
fn run_starts_on_fresh_topics_right_after_a_broker_rejoined() {
    const TABLES: usize = 10;
    let cluster = Cluster::acquire();
    let clock = Clock::start("fresh-topics");
    let db = test_db(&source_url(), "kfresh");
    let tgt = test_db(&target_url(), "kfresh_t");
    let ddl: String = (0..TABLES)
        .map(|t| format!("create table f{t} (id int primary key);"))
        .collect();
    rows(&db, &ddl);
    let tables: String = (0..TABLES)
        .map(|t| format!("[[tables]]\nsource = \"public.f{t}\"\n"))
        .collect();
    for attempt in 0..3 {
        let node = attempt + 1;
        cluster.node("kill", node);
        cluster.node("start", node);
        cluster.wait_live(&[1, 2, 3]);
        clock.note(&format!("node {node} killed and started again"));
        let tag = format!("s{attempt}");
        let prefix = format!("t{}_{attempt}", db.name);
        let _topics = TopicsOf {
            brokers: cluster.brokers.clone(),
            prefix: prefix.clone(),
        };
        let cfg = db.config(
            &format!("{tag}.toml"),
            &tag,
            &format!(
                "[kafka]\nbrokers = \"{}\"\ntopic_prefix = \"{prefix}\"\npartitions = 3\n\
                 replication_factor = 3\nmin_insync_replicas = 2\n\
                 [kafka.properties]\ndebug = \"eos\"\n\
                 [sink]\nurl = \"{}\"\nconsumer = \"c{attempt}\"\ncreate_tables = true\n{tables}",
                cluster.brokers, tgt.url
            ),
        );
        let mut p = Pgferry::spawn(
            &["run", "--config", cfg.to_str().unwrap()],
            cfg.with_extension("stderr"),
        );
        wait_alive(
            &mut p,
            "the slot to be streamed",
            Duration::from_secs(60),
            || {
                if streaming(&db, &tag) {
                    Ok(())
                } else {
                    Err("not streaming yet".into())
                }
            },
        );
        // The first change also creates the schema topic.
        let insert: String = (0..TABLES)
            .map(|t| format!("insert into f{t} values ({attempt});"))
            .collect();
        rows(&db, &insert);
        let at = lsn(&value(&db, "select pg_current_wal_lsn()::text").unwrap());
        wait_alive(
            &mut p,
            "the first change to be confirmed",
            Duration::from_secs(60),
            || {
                let c = lsn(&confirmed_flush(&db, &tag));
                if c >= at {
                    Ok(())
                } else {
                    Err(format!("confirmed {}", hex(c)))
                }
            },
        );
        let status = p.terminate();
        assert!(
            status.success(),
            "graceful stop: {status}\n{}",
            stderr_tail(&p)
        );
        clock.note(&format!("fresh prefix {attempt}: streamed and confirmed"));
    }
}
