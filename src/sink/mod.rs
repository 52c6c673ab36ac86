//! The sink stage: reads the change topics, decodes and maps each event to its target
//! table, and applies batches to the hospital database exactly once.
//!
//! ```text
//! topics ──▶ consumer (manual assignment at checkpoint offsets) ──▶ decode ──▶ batch
//!        ──▶ split by partition over the workers ──▶ per worker, one target
//!            transaction: rows (apply) + checkpoint rows + ledger row ──▶ commit
//! ```
//!
//! While the workers apply batch N, the reader consumes and decodes batch N+1. Every
//! worker has its own target connection; a partition goes to one worker, so its
//! events apply in order and its checkpoint commits with its rows.
//!
//! Exactly once (DESIGN §1): Kafka may hold duplicates after a source restart. Each
//! partition's checkpoint holds the next offset and the last applied
//! `(commit_lsn, ordinal)`; an event whose position is not newer is skipped, and the
//! checkpoint is written in the same transaction as the rows. A crash anywhere leaves
//! either both or neither.
//!
//! Errors: a target outage is retried with backoff while consumption pauses (the
//! consumer's prefetch is bounded). A poison event (undecodable, or refused by the
//! target for a reason that retrying cannot fix) stops the stage naming its topic,
//! partition and offset, or, with `on_error = "dlq"`, goes to `<topic>.dlq` with the
//! error in its headers before the checkpoint moves past it.

pub mod apply;
mod avro_plan;
pub mod barrier;
pub mod checkpoint;
mod copy_binary;
pub mod decode;
pub mod latency;
pub mod ledger;
mod statements;
pub mod target;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::codec::avro::Framing;
use crate::config::{Config, Format, OnError};
use crate::error::{sqlstate_kind, Error, ErrorKind};
use crate::event::TableName;
use crate::health::Health;
use crate::kafka::{consumer, registry::Registry};
use crate::metrics::{metrics, record_error};
use checkpoint::Checkpoint;
use decode::{DecodeError, SinkEvent};
use target::{Mapping, TargetTable};

const BACKOFF_START: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
const ASSIGNMENT_REFRESH: Duration = Duration::from_secs(5);

/// How long the sink's consumer may read nothing while events wait before that is
/// reported, and again before the consumer is replaced.
const CONSUMER_STALL: Duration = Duration::from_secs(30);
/// Reads of the schema topic, half a second apart, before an unknown fingerprint is
/// reported (and waited for with backoff).
const SCHEMA_ATTEMPTS: usize = 6;
/// How long one event may wait to be decoded (its schema not on the schema topic, the
/// registry unreachable) before that is logged as an error with its hint, once.
const DECODE_WAIT_ALERT: Duration = Duration::from_secs(30);

/// One consumed message, owned.
#[derive(Debug, Clone)]
struct Item {
    topic: Arc<str>,
    partition: i32,
    offset: i64,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    headers: Vec<decode::Header>,
    /// The message's Kafka timestamp (ms since the epoch; when pgferry produced it).
    timestamp_ms: Option<i64>,
}

impl Item {
    /// What counts against `batch_max_bytes`: key and value.
    fn size(&self) -> usize {
        self.key.as_ref().map_or(0, Vec::len) + self.value.as_ref().map_or(0, Vec::len)
    }
}

/// What a batch may still take: events and bytes of key and value.
#[derive(Clone, Copy)]
struct Room {
    events: usize,
    bytes: usize,
}

impl Room {
    fn whole(sink: &crate::config::Sink) -> Room {
        Room {
            events: sink.batch_max_events,
            bytes: sink.batch_max_bytes,
        }
    }

    /// What is left after `items` are taken.
    fn take(&mut self, items: &[(Item, Decoded)]) {
        let bytes: usize = items.iter().map(|(i, _)| i.size()).sum();
        self.events = self.events.saturating_sub(items.len());
        self.bytes = self.bytes.saturating_sub(bytes);
    }

    fn is_empty(&self) -> bool {
        self.events == 0 || self.bytes == 0
    }
}

/// Why a batch did not commit. The one place where target errors become policies:
/// retry, stop the stage, or treat one event as poison.
enum Failure {
    /// Worth retrying (target unreachable, serialization failure, …).
    Transient(Error),
    /// Retrying or skipping cannot help and every event would fail the same way (a
    /// wrong password, a missing grant or table): stop the stage for the operator.
    Stop(Error),
    /// The target refused the event at this index of the slice (a value that does
    /// not fit, a constraint): poison, stopped or dead-lettered as configured. The
    /// reason names objects and SQLSTATEs, never values.
    Rejected(usize, String),
}

/// How one attempt at a batch transaction ended, when the target did not fail it.
enum Attempt {
    Committed,
    /// A plain COPY of new rows met a key already in this target table, and the
    /// transaction was rolled back: apply the batch again with that table's inserts
    /// upserted.
    KeysExist(TableName),
    /// A value had no certain binary form for a binary COPY into this target table
    /// (see [`apply::copy_inserts`]), and the transaction was rolled back: apply the
    /// batch again with that table copied as text.
    NotBinary {
        table: TableName,
        why: NotBinaryWhy,
    },
}

/// Why a table's rows go as text from now on.
enum NotBinaryWhy {
    /// A value of this column has no binary form pgferry is certain of.
    Column(String),
    /// The target refused the binary data; the summary names SQLSTATE and objects,
    /// never a value.
    Refused(String),
}

impl Failure {
    /// The policy for an error from preparing or applying a batch.
    fn of(e: Error) -> Failure {
        match e.kind() {
            ErrorKind::Transient => Failure::Transient(e),
            ErrorKind::Operator => Failure::Stop(e),
            ErrorKind::Fatal => Failure::Rejected(0, e.to_string()),
        }
    }

    fn into_error(self) -> Error {
        match self {
            Failure::Transient(e) | Failure::Stop(e) => e,
            Failure::Rejected(_, r) => Error::fatal(r),
        }
    }
}

/// What became of a slice of events.
enum Outcome {
    /// Applied and checkpointed.
    Applied,
    /// The event at this index was refused; those before it are applied.
    Rejected(usize, String),
    /// Shutdown came while the target was unavailable: nothing of the slice was
    /// applied or checkpointed, and nothing after it may be.
    Interrupted,
}

type SchemaEntry = Arc<decode::WriterSchema>;

pub struct SinkStage {
    config: Arc<Config>,
    reader: Reader,
    /// `[sink] workers` appliers, each with its own target connection. Empty only
    /// while they apply a batch on their own tasks.
    appliers: Vec<Applier>,
    /// Which worker applies each partition: fixed once seen, the least busy one.
    owners: HashMap<String, HashMap<i32, usize>>,
    /// What is applied, per partition (shared with the appliers).
    applied: checkpoint::Applied,
    topics: Vec<String>,
    assigned: HashSet<(String, i32)>,
    /// Truncates waiting for their copies on the topic's other partitions.
    barrier: barrier::Barrier<(Item, Decoded)>,
    health: Arc<Health>,
}

/// The reading half: consumes and decodes the next batch while the applier applies
/// the one before it.
struct Reader {
    config: Arc<Config>,
    consumer: consumer::SinkConsumer,
    by_fingerprint: HashMap<[u8; 8], SchemaEntry>,
    by_id: HashMap<u32, SchemaEntry>,
    registry: Option<Registry>,
    health: Arc<Health>,
    /// Topic names and header keys seen so far, shared by every message that carries
    /// them instead of copied into each (see [`intern`]).
    names: HashSet<Arc<str>>,
    /// The header keys of the message before, by position.
    keys: HeaderKeys,
    /// How long the reader has waited for a message since the last one came (time spent
    /// applying is not counted), and where each partition's next message is: what
    /// [`SinkStage::watch_consumer`] needs to tell a stalled consumer from an idle
    /// topic, and to replace it without skipping or re-reading anything.
    idle: Duration,
    next_offsets: HashMap<(Arc<str>, i32), i64>,
    /// When the watermarks were last compared; since when events have waited unread,
    /// once warned.
    checked: Option<Instant>,
    stalled_since: Option<Instant>,
}

/// The shared copy of `name` from `names`, added when new: the configured topics and
/// pgferry's few header keys.
fn intern(names: &mut HashSet<Arc<str>>, name: &str) -> Arc<str> {
    if let Some(n) = names.get(name) {
        return n.clone();
    }
    let n: Arc<str> = Arc::from(name);
    // Bounded: a producer writing ever new header keys must not grow it forever.
    if names.len() < 4096 {
        names.insert(n.clone());
    }
    n
}

/// The header keys of the last message, by position: pgferry's producer writes the
/// same keys in the same order on every message, so a key is usually the one before
/// it at that place, and one comparison finds it without hashing.
#[derive(Default)]
struct HeaderKeys(Vec<Arc<str>>);

impl HeaderKeys {
    fn intern(&mut self, i: usize, key: &str, names: &mut HashSet<Arc<str>>) -> Arc<str> {
        match self.0.get(i) {
            Some(k) if **k == *key => k.clone(),
            _ => {
                let k = intern(names, key);
                self.0.truncate(i);
                if self.0.len() == i {
                    self.0.push(k.clone());
                }
                k
            }
        }
    }
}

/// The applying half: owns one target connection; [`checkpoint::Applied`] is shared
/// with the other workers.
struct Applier {
    /// Its index, for logs.
    worker: usize,
    config: Arc<Config>,
    client: Option<Client>,
    /// Prepared on `client`: cleared whenever it is replaced.
    statements: statements::Statements,
    checkpoints: checkpoint::Applied,
    tables: HashMap<TableName, (Mapping, TargetTable)>,
    /// Target tables whose copied reads or inserts met keys already there: upserted,
    /// not copied in (see [`apply::copy_inserts`]).
    upsert_inserts: HashSet<TableName>,
    /// Target tables copied in text format, after a value had no certain binary form.
    text_copies: HashSet<TableName>,
    dlq: Option<FutureProducer>,
    health: Arc<Health>,
    /// Every configured table's topic exists and its partitions are assigned (or, in
    /// group mode, the group gave this sink its share): readiness, once applying works.
    all_topics_consumed: bool,
}

/// Events in the partitions of `at` beyond the offsets given (`None`: from the start),
/// by their high watermarks; `None` when a broker does not answer (asking on would only
/// block).
fn waiting_events(
    consumer: &consumer::SinkConsumer,
    at: &HashMap<(String, i32), Option<i64>>,
) -> Option<i64> {
    let mut waiting = 0;
    for ((topic, partition), offset) in at {
        let (low, high) = consumer
            .fetch_watermarks(topic, *partition, Duration::from_secs(5))
            .ok()?;
        waiting += (high - offset.unwrap_or(low)).max(0);
    }
    Some(waiting)
}

/// What decoding one message gave: `Ok(None)` for a tombstone.
type Decoded = Result<Option<SinkEvent>, DecodeError>;

impl SinkStage {
    /// Connect to the target (failing fast if it is unreachable at start), create the
    /// checkpoint table and read the checkpoints.
    pub async fn new(config: Arc<Config>, health: Arc<Health>) -> Result<SinkStage, Error> {
        let sink = config.sink.as_ref().ok_or_else(|| {
            Error::operator(format!(
                "{}: the sink stage needs a [sink] section",
                config.path.display()
            ))
        })?;
        let client = crate::pg::connect(&sink.url, "sink target").await?;
        checkpoint::ensure_table(&client).await?;
        if sink.ledger {
            ledger::ensure_table(&client).await?;
            metrics()
                .sink_ledger_run_info
                .with_label_values(&[ledger::run_id()])
                .set(1);
        }
        let applied = checkpoint::Applied::new(checkpoint::load(&client, &sink.consumer).await?);
        let topics = topics_of(&config);
        let registry = match config.kafka.schema_registry.as_str() {
            "" => None,
            _ => Some(Registry::from_config(&config.kafka)?),
        };
        let kafka_consumer = consumer::stream_consumer(&config, sink.group.as_deref())?;
        if let Some(group) = &sink.group {
            let owned = topics_of(&config);
            let refs: Vec<&str> = owned.iter().map(String::as_str).collect();
            kafka_consumer.subscribe(&refs).map_err(|e| {
                Error::operator(format!("joining consumer group {group}")).with_source(e)
            })?;
            tracing::info!(%group, "sink joins its consumer group; partitions are sought to the target's checkpoints on every assignment");
        }
        let mut client = Some(client);
        let appliers = (0..sink.workers)
            .map(|worker| Applier {
                worker,
                config: config.clone(),
                // The others connect at their first batch: one connection told
                // that the target is reachable.
                client: client.take(),
                statements: statements::Statements::default(),
                checkpoints: applied.clone(),
                tables: HashMap::new(),
                upsert_inserts: HashSet::new(),
                text_copies: HashSet::new(),
                dlq: None,
                health: health.clone(),
                all_topics_consumed: false,
            })
            .collect();
        Ok(SinkStage {
            reader: Reader {
                config: config.clone(),
                consumer: kafka_consumer,
                by_fingerprint: HashMap::new(),
                by_id: HashMap::new(),
                registry,
                health: health.clone(),
                names: HashSet::new(),
                keys: HeaderKeys::default(),
                idle: Duration::ZERO,
                next_offsets: HashMap::new(),
                checked: None,
                stalled_since: None,
            },
            appliers,
            owners: HashMap::new(),
            applied,
            topics,
            assigned: HashSet::new(),
            barrier: barrier::Barrier::default(),
            health,
            config,
        })
    }

    /// The first worker, which also applies the truncates held at the barrier.
    fn applier(&mut self) -> &mut Applier {
        self.appliers
            .first_mut()
            .expect("the appliers are home between batches")
    }

    fn set_all_topics_consumed(&mut self, consumed: bool) {
        for a in &mut self.appliers {
            a.all_topics_consumed = consumed;
        }
    }

    /// The worker that applies `partition` of `topic`: the one with the fewest
    /// partitions when first seen, then always the same (its target connection has
    /// the table's shape cached).
    fn owner(&mut self, topic: &str, partition: i32) -> usize {
        if let Some(&w) = self.owners.get(topic).and_then(|p| p.get(&partition)) {
            return w;
        }
        let mut load = vec![0usize; self.appliers.len().max(1)];
        for &w in self.owners.values().flat_map(HashMap::values) {
            load[w] += 1;
        }
        let w = (0..load.len()).min_by_key(|&w| load[w]).unwrap_or(0);
        self.owners
            .entry(topic.to_string())
            .or_default()
            .insert(partition, w);
        w
    }

    fn sink(&self) -> &crate::config::Sink {
        self.config.sink.as_ref().expect("checked in new()")
    }

    /// Consume and apply until `shutdown`; a poison event with `on_error = "stop"` or a
    /// fatal error ends it with an error.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), Error> {
        let result = self.run_inner(&shutdown).await;
        self.health.set_sink_streaming(false);
        if let Err(e) = &result {
            record_error("sink", e);
        }
        result
    }

    async fn run_inner(&mut self, shutdown: &CancellationToken) -> Result<(), Error> {
        let mut last_refresh = Instant::now() - ASSIGNMENT_REFRESH;
        let group_mode = self.sink().group.is_some();
        // Read and decoded, not yet through the barrier nor applied.
        let mut ready: Vec<(Item, Decoded)> = Vec::new();
        loop {
            if group_mode {
                if self.reader.consumer.context().take_rebalanced() {
                    self.seek_assigned().await?;
                    // What was read of a partition this sink no longer owns is the
                    // new owner's to apply (from the target's checkpoint). Partitions
                    // it keeps go on where they are: their events must not be dropped,
                    // the consumer is already past them.
                    let assigned = &self.assigned;
                    ready.retain(|(i, _)| assigned.contains(&(i.topic.to_string(), i.partition)));
                }
            } else if last_refresh.elapsed() >= ASSIGNMENT_REFRESH {
                // Always: topics appear and gain partitions at any time.
                match self.refresh_assignment() {
                    Ok(()) => {}
                    Err(e) if e.is_transient() => {
                        if let Some(text) = self.reader.consumer.context().failure() {
                            return Err(Error::fatal(text));
                        }
                        // A restarting broker: keep consuming what is assigned.
                        record_error("sink", &e);
                        tracing::warn!(error = %e, "cannot refresh the partition assignment; retrying");
                    }
                    Err(e) => return Err(e),
                }
                self.watch_consumer().await?;
                last_refresh = Instant::now();
            }
            // Each worker applies its partitions' share of this batch on its own
            // task while this one reads and decodes the next: decoding, encoding the
            // COPY and the target's work overlap. The barrier sees events in order,
            // after everything before them applied, exactly as if nothing overlapped.
            // (Events are moved once, into their share: a batch is a few MB of them.)
            let workers = self.appliers.len();
            let mut shares: Vec<Vec<(Item, Decoded)>> = (0..workers)
                .map(|_| Vec::with_capacity(if workers == 1 { ready.len() } else { 0 }))
                .collect();
            // The worker of the event before, when it was of the same partition.
            let mut last: Option<(Arc<str>, i32, usize)> = None;
            for (item, event) in ready.drain(..) {
                if let Some((item, event)) = self.through_barrier(item, event)? {
                    let w = match &last {
                        Some((t, p, w)) if *p == item.partition && Arc::ptr_eq(t, &item.topic) => {
                            *w
                        }
                        _ => {
                            let w = self.owner(&item.topic, item.partition);
                            last = Some((item.topic.clone(), item.partition, w));
                            w
                        }
                    };
                    shares[w].push((item, event));
                }
            }
            let done = Arc::new(tokio::sync::Notify::new());
            let applying: Vec<_> = std::mem::take(&mut self.appliers)
                .into_iter()
                .zip(shares)
                .map(|(mut applier, share)| {
                    let stop = shutdown.clone();
                    let done = done.clone();
                    tokio::spawn(async move {
                        let applied = applier.apply_decoded(&share, &stop).await;
                        done.notify_one();
                        (applier, applied)
                    })
                })
                .collect();
            // A task spawned here waits in this worker's LIFO slot, which other
            // workers cannot steal, until this one yields: let it start, so that the
            // two run on two workers.
            tokio::task::yield_now().await;
            // Whatever the reading gives, every applier comes home first: no
            // transaction is left behind.
            let mut next = self
                .reader
                .next_batch(shutdown, Room::whole(self.sink()), None)
                .await;
            // While the appliers still work, a batch that is not full goes on
            // gathering. Under a backlog batches then fill to their limits instead of
            // stopping at what the consumer had prefetched (about 1 MiB), and fewer,
            // larger target transactions spend less on each commit, ledger row and
            // checkpoint; under a light load the appliers finish first and nothing
            // waits longer than it did.
            let mut room = Room::whole(self.sink());
            if let Ok(Some(batch)) = &next {
                room.take(batch);
            }
            while applying.iter().any(|t| !t.is_finished()) {
                let Ok(Some(batch)) = &mut next else { break };
                if room.is_empty() {
                    break;
                }
                match self.reader.next_batch(shutdown, room, Some(&done)).await {
                    Ok(Some(more)) => {
                        room.take(&more);
                        batch.extend(more);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        next = Err(e);
                        break;
                    }
                }
            }
            let mut outcome = Ok(true);
            for task in applying {
                let (applier, applied) = task
                    .await
                    .map_err(|e| Error::fatal("the sink's apply task failed").with_source(e))?;
                self.appliers.push(applier);
                outcome = match (outcome, applied) {
                    (Err(e), _) | (Ok(_), Err(e)) => Err(e),
                    (Ok(a), Ok(b)) => Ok(a && b),
                };
            }
            if !outcome? {
                // Interrupted: nothing after an unapplied event may be checkpointed.
                // Other workers' partitions committed what they applied, each with
                // its own checkpoint.
                return Ok(());
            }
            self.release_barriers(shutdown).await?;
            if shutdown.is_cancelled() {
                return Ok(());
            }
            match next? {
                Some(next) if next.is_empty() => latency::observe([]),
                Some(next) => ready = next,
                None => return Ok(()),
            }
        }
    }

    /// A consumer that reads nothing while its partitions hold events is stalled, not
    /// idle: after a restart of the whole Kafka cluster, the sink's consumer was seen
    /// reading nothing for minutes while the brokers (and pgferry's own producer) were
    /// long back (tests/kafka_cluster.rs, `whole_cluster_restart_under_load`). After
    /// [`CONSUMER_STALL`] without a message, the high watermarks are compared with
    /// where the reader is; if events wait, say so, and after another
    /// [`CONSUMER_STALL`] replace the consumer with a new one assigned where the old
    /// one stood. Nothing is skipped or read twice: the reader's next offsets are
    /// exactly what the old consumer would have fetched next.
    async fn watch_consumer(&mut self) -> Result<(), Error> {
        let reader = &mut self.reader;
        if reader.idle < CONSUMER_STALL || self.assigned.is_empty() {
            reader.stalled_since = None;
            return Ok(());
        }
        // A sink idle for hours asks the brokers twice a minute, not every refresh.
        if reader
            .checked
            .is_some_and(|c| c.elapsed() < CONSUMER_STALL / 2)
        {
            return Ok(());
        }
        reader.checked = Some(Instant::now());
        let at: HashMap<(String, i32), Option<i64>> = self
            .assigned
            .iter()
            .map(|(t, p)| {
                let read = reader
                    .next_offsets
                    .iter()
                    .find(|((topic, partition), _)| &**topic == t && partition == p)
                    .map(|(_, o)| *o);
                let offset = read.or_else(|| self.applied.get(t, *p).map(|c| c.next_offset));
                ((t.clone(), *p), offset)
            })
            .collect();
        // The consumer's own client may be the stuck part: if it cannot get an answer,
        // a new client asks. Brokers that answer neither are an outage, not a stalled
        // consumer: nothing that waits there can be read.
        let waiting = match tokio::task::block_in_place(|| waiting_events(&reader.consumer, &at)) {
            Some(n) => n,
            None => {
                let probe = consumer::stream_consumer(&self.config, None)?;
                let n = tokio::task::block_in_place(|| waiting_events(&probe, &at));
                tokio::task::spawn_blocking(move || drop(probe));
                n.unwrap_or(0)
            }
        };
        if waiting == 0 {
            reader.stalled_since = None;
            return Ok(());
        }
        let idle_s = reader.idle.as_secs();
        let Some(since) = reader.stalled_since else {
            record_error("sink", &Error::transient(""));
            tracing::warn!(
                idle_s,
                waiting,
                "the sink's Kafka consumer has read nothing while events wait in its partitions; \
                 it is replaced if this goes on"
            );
            reader.stalled_since = Some(Instant::now());
            return Ok(());
        };
        if since.elapsed() < CONSUMER_STALL {
            return Ok(());
        }
        let fresh = consumer::stream_consumer(&self.config, None)?;
        consumer::assign(&fresh, &at)?;
        let old = std::mem::replace(&mut reader.consumer, fresh);
        // Closing a client whose connections hang may take a while: not on this task.
        tokio::task::spawn_blocking(move || drop(old));
        tracing::warn!(
            idle_s,
            waiting,
            "replaced the sink's Kafka consumer, which read nothing while events waited; \
             the new one goes on where it stood"
        );
        reader.stalled_since = None;
        reader.idle = Duration::ZERO;
        Ok(())
    }

    /// Assign every partition of the topics that exist, at its checkpoint offset,
    /// following the topics' metadata as it changes.
    fn refresh_assignment(&mut self) -> Result<(), Error> {
        let counts = tokio::task::block_in_place(|| {
            consumer::partitions(&self.reader.consumer, &self.topics)
        })?;
        let mut at = HashMap::new();
        for (topic, n) in &counts {
            for p in 0..*n {
                let offset = self.applied.get(topic, p).map(|c| c.next_offset);
                at.insert((topic.clone(), p), offset);
            }
        }
        let missing: Vec<String> = self
            .topics
            .iter()
            .filter(|t| !counts.contains_key(*t))
            .cloned()
            .collect();
        if !missing.is_empty() {
            tracing::info!(topics = ?missing, "waiting for topics to exist; not ready until they are consumed");
        }
        let now: HashSet<(String, i32)> = at.keys().cloned().collect();
        if now != self.assigned {
            for k in now.difference(&self.assigned) {
                self.check_position(&k.0, k.1, at[k])?;
            }
            consumer::assign(&self.reader.consumer, &at)?;
            tracing::info!(
                partitions = now.len(),
                "sink assigned partitions at their checkpoint offsets"
            );
            self.assigned = now;
        }
        let consumed = missing.is_empty();
        self.set_all_topics_consumed(consumed);
        self.health.set_sink_streaming(consumed);
        Ok(())
    }

    /// The checkpoint must lie inside what the partition holds. Before its start,
    /// retention deleted events this sink never applied; past its end, the topic was
    /// re-created (or the broker lost data) and offsets mean other events now. Either
    /// way reading on would skip or misplace changes: stop.
    fn check_position(&self, topic: &str, partition: i32, next: Option<i64>) -> Result<(), Error> {
        let (low, high) = tokio::task::block_in_place(|| {
            self.reader
                .consumer
                .fetch_watermarks(topic, partition, Duration::from_secs(10))
        })
        .map_err(|e| {
            Error::transient(format!(
                "reading the offsets of topic {topic} partition {partition}"
            ))
            .with_source(e)
        })?;
        let at = format!("topic {topic} partition {partition}");
        match next {
            Some(next) if next > high => Err(Error::fatal(format!(
                "the target's checkpoint for {at} is at offset {next}, beyond the partition's end {high}: \
                 the topic was deleted and re-created, or the brokers lost acknowledged data"
            ))
            .with_hint("the offsets no longer name the events that were applied; resynchronise the target \
                        (re-snapshot) and delete this consumer's rows in pgferry.checkpoints for that topic")),
            Some(next) if next < low => Err(Error::fatal(format!(
                "the target's checkpoint for {at} is at offset {next}, but the partition now starts at {low}: \
                 events {next}..{} were deleted (retention) before this sink applied them",
                low - 1
            ))
            .with_hint("raise the topic's retention; resynchronise the target (re-snapshot)")),
            None if low > 0 => Err(Error::fatal(format!(
                "this sink has no checkpoint for {at}, and the partition starts at offset {low}: \
                 the events before it were deleted before this sink applied them"
            ))
            .with_hint("load the table by a snapshot first; or, if the target already holds them, \
                        insert a checkpoint row for that partition")),
            _ => Ok(()),
        }
    }

    /// Group mode: after a rebalance, move every newly assigned partition to the
    /// offset checkpointed in the target (read now: another sink may have moved it).
    async fn seek_assigned(&mut self) -> Result<(), Error> {
        let assignment = self
            .reader
            .consumer
            .assignment()
            .map_err(|e| Error::transient("reading the partition assignment").with_source(e))?;
        let now: HashSet<(String, i32)> = assignment
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect();
        let added: Vec<(String, i32)> = now.difference(&self.assigned).cloned().collect();
        if !added.is_empty() {
            let consumer_name = self.sink().consumer.clone();
            let client = self.applier().target().await.map_err(Failure::into_error)?;
            let fresh = checkpoint::load(client, &consumer_name).await?;
            for (topic, partition) in &added {
                let k = (topic.clone(), *partition);
                self.check_position(topic, *partition, fresh.get(&k).map(|c| c.next_offset))?;
                let offset = fresh.get(&k).map_or(rdkafka::Offset::Beginning, |c| {
                    rdkafka::Offset::Offset(c.next_offset)
                });
                if let Some(c) = fresh.get(&k) {
                    self.applied.insert(k.0.clone(), k.1, *c);
                }
                // The fetcher may not run yet right after the rebalance: retry briefly.
                // Should it never take, positions still make re-read events no-ops.
                let mut sought = false;
                for _ in 0..20 {
                    if self
                        .reader
                        .consumer
                        .seek(topic, *partition, offset, Duration::from_secs(2))
                        .is_ok()
                    {
                        sought = true;
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                if !sought {
                    tracing::warn!(%topic, partition, "could not seek to the checkpoint; reading from the group's start position");
                }
            }
            tracing::info!(
                partitions = now.len(),
                added = added.len(),
                "sink assignment changed"
            );
        }
        self.assigned = now;
        self.set_all_topics_consumed(true);
        self.health.set_sink_streaming(true);
        Ok(())
    }

    /// Partitions of `topic` this sink consumes.
    fn partition_count(&self, topic: &str) -> usize {
        self.assigned.iter().filter(|(t, _)| t == topic).count()
    }

    /// Hold a truncate of a multi-partition topic at the barrier (see [`barrier`]), and
    /// drop what a held partition delivers past it (it is read again on release).
    /// Everything else passes. Group mode, where one sink may not own every
    /// partition, applies truncates as they come.
    fn through_barrier(
        &mut self,
        item: Item,
        event: Decoded,
    ) -> Result<Option<(Item, Decoded)>, Error> {
        if self.barrier.blocks(&item.topic, item.partition) {
            return Ok(None);
        }
        let truncate = match &event {
            Ok(Some(e)) if e.op == crate::event::Op::Truncate => e.position,
            _ => return Ok(Some((item, event))),
        };
        let resent = self
            .applied
            .get(&item.topic, item.partition)
            .is_some_and(|c| truncate <= c.position);
        if resent || self.sink().group.is_some() || self.partition_count(&item.topic) < 2 {
            return Ok(Some((item, event)));
        }
        let mut tpl = rdkafka::TopicPartitionList::new();
        tpl.add_partition(&item.topic, item.partition);
        self.reader.consumer.pause(&tpl).map_err(|e| {
            Error::transient(format!(
                "pausing topic {} partition {} at a truncate",
                item.topic, item.partition
            ))
            .with_source(e)
        })?;
        tracing::debug!(topic = %item.topic, partition = item.partition, offset = item.offset,
            "truncate held until every partition reaches it");
        let (topic, partition, offset) = (item.topic.clone(), item.partition, item.offset);
        self.barrier
            .hold(&topic, partition, truncate, (item, event))
            .map_err(|held| {
                Error::fatal(format!(
                    "topic {topic} partition {partition} offset {offset} carries a truncate at {}/{} while \
                     another partition waits at the truncate at {}/{}: the partitions disagree on their order",
                    truncate.0, truncate.1, held.0, held.1
                ))
            })?;
        Ok(None)
    }

    /// Apply each truncate that every partition of its topic reached, in one target
    /// transaction with all their checkpoints, then let the partitions go on from
    /// just past it.
    async fn release_barriers(&mut self, shutdown: &CancellationToken) -> Result<(), Error> {
        if self.barrier.is_empty() {
            return Ok(());
        }
        let assigned = self.assigned.clone();
        let complete = self
            .barrier
            .complete(|t| assigned.iter().filter(|(a, _)| a == t).count());
        for (topic, copies) in complete {
            let slice: Vec<(&Item, Option<&SinkEvent>)> = copies
                .iter()
                .map(|(i, e)| (i, e.as_ref().ok().and_then(Option::as_ref)))
                .collect();
            match self.applier().apply_with_retry(&slice, shutdown, false).await? {
                Outcome::Applied => {}
                // Nothing moved: on restart the barrier forms again from the checkpoints.
                Outcome::Interrupted => return Ok(()),
                Outcome::Rejected(_, reason) => {
                    return Err(Error::fatal(format!(
                        "the target refused the truncate of topic {topic}: {reason}"
                    ))
                    .with_hint("a truncate cannot be dead-lettered; fix the target (e.g. foreign keys onto the table) and restart"))
                }
            }
            let mut tpl = rdkafka::TopicPartitionList::new();
            for (item, _) in &copies {
                let next = rdkafka::Offset::Offset(item.offset + 1);
                let mut sought = false;
                for _ in 0..20 {
                    if self
                        .reader
                        .consumer
                        .seek(&item.topic, item.partition, next, Duration::from_secs(2))
                        .is_ok()
                    {
                        sought = true;
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                if !sought {
                    // Re-assigning at the checkpoints puts every partition right.
                    self.assigned.clear();
                }
                tpl.add_partition(&item.topic, item.partition);
            }
            self.reader.consumer.resume(&tpl).map_err(|e| {
                Error::transient(format!("resuming topic {topic} after its truncate"))
                    .with_source(e)
            })?;
            tracing::info!(%topic, partitions = copies.len(), "truncate applied once every partition reached it");
        }
        Ok(())
    }
}

impl Reader {
    fn sink(&self) -> &crate::config::Sink {
        self.config.sink.as_ref().expect("checked in new()")
    }

    /// The next batch, read and decoded (`None` at shutdown). A registry or broker
    /// hiccup, or a schema not visible yet, is waited out: never a reason to stop,
    /// nor to dead-letter the event.
    async fn next_batch(
        &mut self,
        shutdown: &CancellationToken,
        room: Room,
        until: Option<&tokio::sync::Notify>,
    ) -> Result<Option<Vec<(Item, Decoded)>>, Error> {
        let batch = tokio::select! {
            b = self.collect(room, until) => b?,
            _ = shutdown.cancelled() => return Ok(None),
        };
        let started = Instant::now();
        let events = batch.len();
        let mut decoded = Vec::with_capacity(batch.len());
        for item in batch {
            let mut backoff = BACKOFF_START;
            let mut waiting_since = None;
            let mut escalated = false;
            let event = loop {
                match self.decode(&item).await {
                    Ok(event) => break event,
                    Err(e) if e.is_transient() => {
                        self.health.set_sink_streaming(false);
                        record_error("sink", &e);
                        let waited = waiting_since.get_or_insert_with(Instant::now).elapsed();
                        if waited >= DECODE_WAIT_ALERT && !escalated {
                            // Once, louder: what was "not yet" may be "never".
                            escalated = true;
                            tracing::error!(error = %e, hint = e.hint().unwrap_or(""),
                                topic = %item.topic, partition = item.partition,
                                offset = item.offset, waited_s = waited.as_secs(),
                                "the sink has waited {} s to decode this event and applies \
                                 nothing after it until it can", waited.as_secs());
                        }
                        tracing::warn!(error = %e, topic = %item.topic, partition = item.partition,
                            offset = item.offset, retry_in_ms = backoff.as_millis() as u64,
                            "cannot decode the event yet; waiting");
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            // Nothing of this batch was applied: it is read again.
                            _ = shutdown.cancelled() => return Ok(None),
                        }
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                    Err(e) => return Err(e),
                }
            };
            decoded.push((item, event));
        }
        if events > 0 {
            tracing::debug!(
                events,
                decode_us = started.elapsed().as_micros() as u64,
                "batch decoded"
            );
        }
        Ok(Some(decoded))
    }

    /// Gather a batch: up to the count and byte limits of `room`, waiting at most the
    /// linger after the first message (and at most the assignment refresh for the
    /// first), or until `until` is notified (between two messages: none is lost).
    async fn collect(
        &mut self,
        room: Room,
        until: Option<&tokio::sync::Notify>,
    ) -> Result<Vec<Item>, Error> {
        let (max_events, max_bytes, linger) = (room.events, room.bytes, self.sink().batch_linger);
        let mut batch = Vec::new();
        let mut bytes = 0;
        let started = Instant::now();
        let mut deadline = tokio::time::Instant::now() + ASSIGNMENT_REFRESH;
        // The topic, partition and next offset of the message before.
        let mut last: Option<(Arc<str>, i32, i64)> = None;
        while batch.len() < max_events && bytes < max_bytes {
            if let Some(text) = self.consumer.context().failure() {
                return Err(Error::fatal(text));
            }
            let msg = tokio::select! {
                // A message already here is taken before the deadline is looked at: a
                // zero linger still takes everything that is ready.
                biased;
                m = self.consumer.recv() => m,
                _ = tokio::time::sleep_until(deadline) => break,
                _ = async {
                    match until {
                        Some(done) => done.notified().await,
                        None => std::future::pending().await,
                    }
                } => break,
            };
            let m = match msg {
                Ok(m) => m,
                Err(rdkafka::error::KafkaError::MessageConsumption(
                    code @ (rdkafka::types::RDKafkaErrorCode::OffsetOutOfRange
                    | rdkafka::types::RDKafkaErrorCode::AutoOffsetReset),
                )) => {
                    return Err(Error::fatal(format!(
                        "a partition's offset is out of range ({code}): events the sink has not applied \
                         were deleted, or the topic was re-created"
                    ))
                    .with_hint("the sink never skips; resynchronise the target (re-snapshot)"));
                }
                Err(e) => {
                    // Broker trouble or a topic that does not exist yet: librdkafka
                    // recovers by itself; note it and keep waiting. It queues one
                    // error per failed connect while a broker is down, so a long
                    // pause per error made the sink crawl through stale ones at two a
                    // second after the broker was back (a 62 s stall in the chaos
                    // test); a short one only keeps this from spinning.
                    record_error("sink", &Error::transient(""));
                    tracing::warn!(error = %e, "consuming from Kafka");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            };
            let headers = m
                .headers()
                .map(|h| {
                    h.iter()
                        .enumerate()
                        .map(|(i, x)| {
                            (
                                self.keys.intern(i, x.key, &mut self.names),
                                x.value.map(<[u8]>::to_vec).unwrap_or_default(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            self.idle = Duration::ZERO;
            let topic = match &last {
                Some((t, _, _)) if **t == *m.topic() => t.clone(),
                _ => intern(&mut self.names, m.topic()),
            };
            // Offsets are noted once per run of one partition's messages, not per
            // message: the map is only read when the reader is idle.
            if let Some((t, p, next)) = last.take() {
                if *t != *topic || p != m.partition() {
                    self.next_offsets.insert((t, p), next);
                }
            }
            last = Some((topic.clone(), m.partition(), m.offset() + 1));
            let item = Item {
                topic,
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().map(<[u8]>::to_vec),
                value: m.payload().map(<[u8]>::to_vec),
                headers,
                timestamp_ms: m.timestamp().to_millis(),
            };
            bytes += item.size();
            if batch.is_empty() {
                deadline = tokio::time::Instant::now() + linger;
            }
            batch.push(item);
        }
        if let Some((t, p, next)) = last {
            self.next_offsets.insert((t, p), next);
        }
        if batch.is_empty() {
            self.idle += started.elapsed();
        }
        Ok(batch)
    }

    /// `Ok(None)`: a tombstone or something to skip (the checkpoint still moves).
    async fn decode(
        &mut self,
        item: &Item,
    ) -> Result<Result<Option<SinkEvent>, DecodeError>, Error> {
        let Some(value) = &item.value else {
            return Ok(Ok(None));
        };
        let position = match decode::position(&item.headers) {
            Ok(p) => p,
            Err(e) => return Ok(Err(e)),
        };
        if self.config.kafka.format == Format::Json {
            let fp = match decode::json_schema_header(&item.headers) {
                None => {
                    return Ok(decode::json_envelope(value, item.key.as_deref(), position).map(Some))
                }
                Some(Err(e)) => return Ok(Err(e)),
                Some(Ok(fp)) => fp,
            };
            let Some(schema) = self.schema(Framing::SingleObject(fp)).await? else {
                return Ok(Err(DecodeError(format!(
                    "its schema {} is unknown",
                    crate::kafka::producer::fingerprint_hex(&fp)
                ))));
            };
            return Ok(decode::connect_envelope(
                value,
                item.key.as_deref(),
                &schema.json,
                position,
            )
            .map(Some));
        }
        let Some((framing, datum)) = Framing::parse(value) else {
            return Ok(Err(DecodeError(
                "not an Avro message (no single-object or Confluent header)".into(),
            )));
        };
        let Some(value_schema) = self.schema(framing).await? else {
            return Ok(Err(DecodeError(format!(
                "its schema {framing:?} is unknown"
            ))));
        };
        let key_schema = match item.key.as_deref().and_then(Framing::parse) {
            Some((kf, _)) => self.schema(kf).await?,
            None => None,
        };
        Ok(decode::avro_envelope(datum, &value_schema, key_schema.as_deref(), position).map(Some))
    }

    /// The writer schema of a framing: from the registry, or from the schema topic
    /// (re-read when an unknown fingerprint appears).
    async fn schema(&mut self, framing: Framing) -> Result<Option<SchemaEntry>, Error> {
        match framing {
            Framing::Registry(id) => {
                if let Some(s) = self.by_id.get(&id) {
                    return Ok(Some(s.clone()));
                }
                let Some(registry) = &self.registry else {
                    return Err(Error::operator(
                        "events carry schema registry ids but kafka.schema_registry is empty",
                    ));
                };
                let text = registry.fetch(id).await?;
                let entry = parse_schema(&text)
                    .map_err(|e| Error::fatal(format!("registry schema {id}: {e}")))?;
                self.by_id.insert(id, entry.clone());
                Ok(Some(entry))
            }
            Framing::SingleObject(fp) => {
                if let Some(s) = self.by_fingerprint.get(&fp) {
                    return Ok(Some(s.clone()));
                }
                // The schema is produced before the first event that uses it, but to
                // another topic: it may become visible a moment later.
                for attempt in 0..SCHEMA_ATTEMPTS {
                    if attempt > 0 {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    self.load_schema_topic().await?;
                    if let Some(s) = self.by_fingerprint.get(&fp) {
                        return Ok(Some(s.clone()));
                    }
                }
                Err(Error::transient(format!(
                    "the schema with fingerprint {} is not on {}._schemas (yet)",
                    crate::kafka::producer::fingerprint_hex(&fp),
                    self.config.kafka.topic_prefix
                ))
                .with_hint(
                    "pgferry's source publishes a schema before the first event that uses it, \
                     so a schema that never comes was lost (the schema topic deleted or \
                     re-created, or given a time retention) or the event was not written by \
                     pgferry; restarting the source publishes the schemas it uses again; the \
                     sink never skips the event",
                ))
            }
        }
    }

    async fn load_schema_topic(&mut self) -> Result<(), Error> {
        let config = self.config.clone();
        let topic = format!("{}._schemas", config.kafka.topic_prefix);
        let records = tokio::task::spawn_blocking(move || consumer::read_to_end(&config, &topic))
            .await
            .map_err(|e| Error::fatal("reading the schema topic").with_source(e))??;
        for value in records.into_iter().filter_map(|r| r.value) {
            let Ok(entry) = std::str::from_utf8(&value)
                .map_err(|e| e.to_string())
                .and_then(parse_schema)
            else {
                continue;
            };
            if let Ok((fp, _)) = crate::codec::avro::fingerprint(&entry.json) {
                self.by_fingerprint.insert(fp, entry);
            }
        }
        Ok(())
    }
}

impl Applier {
    fn sink(&self) -> &crate::config::Sink {
        self.config.sink.as_ref().expect("checked in new()")
    }

    /// Apply a decoded batch in order; poison events are handled as configured.
    /// `false`: shutdown came while the target was unavailable, and nothing from the
    /// first unapplied event on was applied or checkpointed.
    async fn apply_decoded(
        &mut self,
        decoded: &[(Item, Decoded)],
        shutdown: &CancellationToken,
    ) -> Result<bool, Error> {
        if decoded.is_empty() {
            return Ok(true);
        }
        let started = Instant::now();
        // Where the time of the oldest event went: source commit to produce, and
        // produce to now (in Kafka, and in this sink's queue).
        let produced_ms = decoded.iter().filter_map(|(i, _)| i.timestamp_ms).min();
        let committed_ms = decoded
            .iter()
            .filter_map(|(_, e)| e.as_ref().ok().and_then(Option::as_ref))
            .map(|e| e.commit_ts_us / 1000)
            .filter(|&t| t > 0)
            .min();
        let now_ms = crate::timestamp::PgTimestamp::now().unix_micros() / 1000;
        let mut start = 0;
        while start < decoded.len() {
            let end = decoded[start..]
                .iter()
                .position(|(_, e)| e.is_err())
                .map_or(decoded.len(), |i| start + i);
            if end > start {
                let slice: Vec<(&Item, Option<&SinkEvent>)> = decoded[start..end]
                    .iter()
                    .map(|(i, e)| (i, e.as_ref().ok().and_then(Option::as_ref)))
                    .collect();
                match self.apply_with_retry(&slice, shutdown, false).await? {
                    Outcome::Applied => start = end,
                    Outcome::Rejected(i, reason) => {
                        let poison = start + i;
                        self.poison(&decoded[poison].0, &reason).await?;
                        start = poison + 1;
                        continue;
                    }
                    // Nothing after an unapplied event may be checkpointed: a poison
                    // event later in the batch would move the checkpoint past it.
                    Outcome::Interrupted => return Ok(false),
                }
            }
            if end < decoded.len() {
                let reason = match &decoded[end].1 {
                    Err(e) => format!("cannot decode: {e}"),
                    Ok(_) => String::new(),
                };
                self.poison(&decoded[end].0, &reason).await?;
                start = end + 1;
            }
        }
        tracing::debug!(
            worker = self.worker,
            events = decoded.len(),
            commit_to_produce_ms = produced_ms.zip(committed_ms).map(|(p, c)| p - c),
            produce_to_sink_ms = produced_ms.map(|p| now_ms - p),
            apply_us = started.elapsed().as_micros() as u64,
            "batch applied"
        );
        Ok(true)
    }

    /// Apply `items`, retrying transient failures with backoff (consumption pauses
    /// meanwhile). Returns the index of an event the target refused, if any; the
    /// items before it are applied.
    /// `dead_lettered`: `items` is one event just sent to the dead-letter topic.
    async fn apply_with_retry(
        &mut self,
        items: &[(&Item, Option<&SinkEvent>)],
        shutdown: &CancellationToken,
        dead_lettered: bool,
    ) -> Result<Outcome, Error> {
        let mut backoff = BACKOFF_START;
        loop {
            let outcome = match self.apply(items, dead_lettered).await {
                Err(Failure::Rejected(_, _)) if items.len() > 1 => {
                    self.apply_one_by_one(items).await
                }
                other => other.map(|_| None),
            };
            match outcome {
                Ok(r) => {
                    self.health.set_sink_streaming(self.all_topics_consumed);
                    return Ok(match r {
                        None => Outcome::Applied,
                        Some((i, reason)) => Outcome::Rejected(i, reason),
                    });
                }
                Err(Failure::Rejected(i, reason)) => return Ok(Outcome::Rejected(i, reason)),
                Err(Failure::Stop(e)) => return Err(e),
                Err(Failure::Transient(e)) => {
                    self.health.set_sink_streaming(false);
                    record_error("sink", &e);
                    self.client = None;
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "target not available; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        // Nothing was applied or checkpointed: the batch is read again.
                        _ = shutdown.cancelled() => return Ok(Outcome::Interrupted),
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    async fn apply_one_by_one(
        &mut self,
        items: &[(&Item, Option<&SinkEvent>)],
    ) -> Result<Option<(usize, String)>, Failure> {
        for i in 0..items.len() {
            match self.apply(&items[i..=i], false).await {
                Ok(()) => {}
                Err(Failure::Rejected(_, reason)) => return Ok(Some((i, reason))),
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    async fn target(&mut self) -> Result<&Client, Failure> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            let url = self.sink().url.clone();
            let client = crate::pg::connect(&url, "sink target")
                .await
                .map_err(Failure::of)?;
            self.statements.clear();
            self.client = Some(client);
        }
        Ok(self.client.as_ref().expect("just connected"))
    }

    /// One target transaction: the rows of every event not yet applied, the
    /// checkpoints of every partition in `items`, and (unless `ledger = false`) the
    /// ledger row that accounts for them. `dead_lettered`: `items` is one event just
    /// sent to the dead-letter topic, checkpointed past and counted as `dlq`.
    async fn apply(
        &mut self,
        items: &[(&Item, Option<&SinkEvent>)],
        dead_lettered: bool,
    ) -> Result<(), Failure> {
        loop {
            match self.apply_once(items, dead_lettered).await? {
                Attempt::Committed => return Ok(()),
                // Only tables not yet upserted (or not yet copied as text) report
                // these, so the loop ends.
                Attempt::KeysExist(table) => {
                    // Worth an operator's notice: loading this table gets slower.
                    tracing::info!(worker = self.worker, %table, "copied rows met keys already in the target table; the batch was rolled back and is upserted, as this table's inserts are from now on");
                    self.upsert_inserts.insert(table);
                }
                Attempt::NotBinary { table, why } => {
                    match why {
                        NotBinaryWhy::Column(column) => {
                            tracing::info!(worker = self.worker, %table, column, "a value of this column has no binary form pgferry is certain of; the batch was rolled back and is copied as text, as this table's rows are from now on")
                        }
                        // Worth a warning: a value the text form also refuses is then
                        // judged as always; one it takes points at pgferry's encoder.
                        NotBinaryWhy::Refused(error) => {
                            tracing::warn!(worker = self.worker, %table, error, "the target refused a binary COPY; the batch was rolled back and is copied as text, as this table's rows are from now on")
                        }
                    }
                    self.text_copies.insert(table);
                }
            }
        }
    }

    async fn apply_once(
        &mut self,
        items: &[(&Item, Option<&SinkEvent>)],
        dead_lettered: bool,
    ) -> Result<Attempt, Failure> {
        // Target tables first (DDL runs outside the batch transaction). Events written
        // with one Avro schema carry the same columns: one look per schema and batch.
        let mut seen: Vec<(usize, &TableName)> = Vec::new();
        for (_, event) in items {
            let Some(event) = event else { continue };
            let shape = (Arc::as_ptr(&event.types) as usize, &event.table);
            if !event.types.is_empty() {
                if seen.contains(&shape) {
                    continue;
                }
                seen.push(shape);
            }
            let needs =
                match self.tables.get(&event.table) {
                    None => true,
                    Some((mapping, t)) => event
                        .after
                        .as_ref()
                        .or(event.before.as_ref())
                        .is_some_and(|r| {
                            r.iter()
                                .any(|(c, _)| !t.types.contains_key(mapping.column(c)))
                        }),
                };
            if !needs {
                continue;
            }
            let Some(mapping) = Mapping::for_table(&self.config, &event.table) else {
                continue;
            };
            let known = self.tables.get(&event.table).map(|(_, t)| t.clone());
            let config = self.config.clone();
            let client = self.target().await?;
            let table = target::prepare(client, &config, &mapping, event, known)
                .await
                .map_err(Failure::of)?;
            self.tables.insert(event.table.clone(), (mapping, table));
        }
        // Skip what was already applied: Kafka may hold re-sent events.
        // Keyed by the shared topic name: no allocation per event.
        // A batch holds a few partitions, in runs: a short list (one entry per
        // partition) searched from its end finds the entry without hashing the topic
        // for every event.
        let mut next: Vec<((Arc<str>, i32), Checkpoint)> = Vec::new();
        let mut fresh = Vec::new();
        let mut entry = ledger::Entry::default();
        let mut known = apply::LastTable::default();
        for (item, event) in items {
            if dead_lettered && event.is_none() {
                entry.dead_lettered(&self.table_of_topic(&item.topic), &item.headers);
            }
            let at = next
                .iter()
                .rposition(|((t, p), _)| *p == item.partition && t == &item.topic);
            let at = at.unwrap_or_else(|| {
                let cp = self
                    .checkpoints
                    .get(&item.topic, item.partition)
                    .unwrap_or(Checkpoint {
                        next_offset: 0,
                        position: (crate::lsn::Lsn::ZERO, 0),
                    });
                next.push(((item.topic.clone(), item.partition), cp));
                next.len() - 1
            });
            let cp = &mut next[at].1;
            cp.next_offset = cp.next_offset.max(item.offset + 1);
            // Positions grow along a partition; one that does not is a re-send of
            // something already applied.
            if let Some(event) = event {
                if event.position > cp.position {
                    cp.position = event.position;
                    fresh.push(*event);
                    // What `apply::plan` applies (and counts for the metrics).
                    if known.get(&event.table, |t| self.tables.contains_key(t)) {
                        entry.applied(&item.headers, event);
                    }
                } else {
                    entry.skipped();
                }
            } else if let Ok(position) = decode::position(&item.headers) {
                // A tombstone, or a dead-lettered event: passed over, and its position
                // too, so a re-send of it is not taken up again.
                cp.position = cp.position.max(position);
            }
        }
        let mut counts = apply::Counts::new();
        let timer = Instant::now();
        let runs = apply::plan(&fresh, &self.tables, &mut counts);
        let plan_us = timer.elapsed().as_micros() as u64;
        let consumer_name = self.sink().consumer.clone();
        let self_group = self.sink().group.is_some();
        // Every transaction that commits gets its row, one of only tombstones too (with
        // empty counts): an auditor finds every checkpoint's writer in the ledger.
        let write_ledger = self.sink().ledger;
        self.target().await?;
        let tables = &self.tables;
        let client = self.client.as_mut().expect("connected");
        let statements = &mut self.statements;
        statements.begin();
        let statement_lost = statements.lost();
        let classify = |e: tokio_postgres::Error| {
            match e.code().map(|c| sqlstate_kind(c.code())) {
            // Not the batch's fault: a pooling proxy lost a prepared statement. Counted
            // as transient (SQLSTATE class 26 alone would say fatal).
            _ if statement_lost(&e) => Failure::Transient(Error::transient(
                "applying a batch to the target: a statement prepared on this connection is gone (SQLSTATE 26000)",
            )),
            None | Some(ErrorKind::Transient) => {
                Failure::Transient(Error::postgres("applying a batch to the target", e))
            }
            Some(ErrorKind::Operator) => {
                Failure::Stop(Error::postgres("applying a batch to the target", e))
            }
            Some(ErrorKind::Fatal) => {
                tracing::debug!(error = %e, "the target refused a batch (full text; may carry values)");
                Failure::Rejected(0, crate::error::postgres_summary(&e))
            }
        }
        };
        let classify_apply = |e: apply::ApplyError| {
            match e {
            apply::ApplyError::Postgres(e) => classify(e),
            apply::ApplyError::MissingRows {
                table,
                expected,
                found,
            } => Failure::Rejected(
                0,
                format!(
                    "an update with unchanged TOAST columns found {found} of {expected} rows in target table {table}: \
                     the target lacks rows the source has, and those columns can only be kept from the target row"
                ),
            ),
        }
        };
        let tx = client.transaction().await.map_err(classify)?;
        if self_group {
            // Several sinks may own a partition in turn: the target's checkpoint, locked
            // for this transaction, is the truth about what is applied.
            // Only this batch's own partitions: locking a whole topic's rows made two
            // sinks that share a topic wait on (and re-plan against) each other.
            let topics: Vec<String> = next.iter().map(|((t, _), _)| t.to_string()).collect();
            let partitions: Vec<i32> = next.iter().map(|((_, p), _)| *p).collect();
            let lock = statements
                .get(
                    &tx,
                    "select topic, partition, next_offset, commit_lsn::text, ordinal from pgferry.checkpoints \
                     where consumer = $1 and (topic, partition) in (select * from unnest($2::text[], $3::int[])) \
                     for update",
                )
                .await
                .map_err(classify)?;
            let rows = tx
                .query(&lock, &[&consumer_name, &topics, &partitions])
                .await
                .map_err(classify)?;
            let mut stale = false;
            for r in rows {
                let k: (String, i32) = (r.get(0), r.get(1));
                let lsn: String = r.get(3);
                let stored = Checkpoint {
                    next_offset: r.get(2),
                    position: (lsn.parse().unwrap_or_default(), r.get::<_, i32>(4) as u32),
                };
                if self.checkpoints.get(&k.0, k.1) != Some(stored) {
                    stale = true;
                    self.checkpoints.insert(k.0, k.1, stored);
                }
            }
            if stale {
                // Another sink moved on meanwhile: plan again from the stored positions.
                let _ = tx.rollback().await;
                return Err(Failure::Transient(Error::transient(
                    "another sink of the group applied some of this batch; re-planning",
                )));
            }
        }
        let rows_started = Instant::now();
        let mut staged = HashSet::new();
        for run in &runs {
            let target = tables
                .values()
                .find(|(m, _)| &m.target == run.table())
                .map(|(_, t)| t)
                .expect("planned runs only name prepared tables");
            if run.is_keyed_inserts(target) && !self.upsert_inserts.contains(run.table()) {
                let binary = !self.text_copies.contains(run.table());
                match apply::copy_inserts(&tx, statements, run, binary).await {
                    Ok(_) => continue,
                    // Dropping `tx` rolls the whole batch back.
                    Err(apply::CopyError::Postgres(e)) if apply::is_key_conflict(&e) => {
                        return Ok(Attempt::KeysExist(run.table().clone()))
                    }
                    Err(apply::CopyError::NotBinary { column }) => {
                        return Ok(Attempt::NotBinary {
                            table: run.table().clone(),
                            why: NotBinaryWhy::Column(column),
                        })
                    }
                    Err(apply::CopyError::Refused(e)) => {
                        return Ok(Attempt::NotBinary {
                            table: run.table().clone(),
                            why: NotBinaryWhy::Refused(crate::error::postgres_summary(&e)),
                        })
                    }
                    Err(apply::CopyError::Postgres(e)) => return Err(classify(e)),
                }
            }
            apply::execute(&tx, statements, run, target, &mut staged)
                .await
                .map_err(classify_apply)?;
        }
        let rows_us = rows_started.elapsed().as_micros() as u64;
        let checkpoints_started = Instant::now();
        // Prepared here, not in `checkpoint::save`: `ledger::write` holds the
        // statements while the saves are in flight beside it.
        let save = statements
            .get(&tx, checkpoint::SAVE)
            .await
            .map_err(classify)?;
        // The checkpoints and the ledger row in one round trip, sent in this order.
        let saves =
            futures_util::future::try_join_all(next.iter().map(|((topic, partition), cp)| {
                checkpoint::save(&tx, &save, &consumer_name, topic, *partition, cp)
            }));
        let ledger = async {
            if write_ledger {
                // Last: its per-consumer lock is held only from here to the commit.
                ledger::write(&tx, statements, &consumer_name, &entry).await
            } else {
                Ok(())
            }
        };
        futures_util::future::try_join(saves, ledger)
            .await
            .map_err(classify)?;
        let checkpoints_us = checkpoints_started.elapsed().as_micros() as u64;
        let commit_started = Instant::now();
        tx.commit().await.map_err(classify)?;
        tracing::debug!(
            worker = self.worker,
            runs = runs.len(),
            plan_us,
            rows_us,
            checkpoints_us,
            commit_us = commit_started.elapsed().as_micros() as u64,
            "batch committed"
        );
        // Committed: now the in-memory view may move.
        let m = metrics();
        m.sink_batches
            .with_label_values(&[&self.worker.to_string()])
            .inc();
        for ((table, op), n) in counts {
            m.sink_applied.with_label_values(&[&table, op]).inc_by(n);
        }
        for ((topic, partition), cp) in next {
            m.sink_checkpoint_offset
                .with_label_values(&[&topic, &partition.to_string()])
                .set(cp.next_offset);
            self.checkpoints.insert(topic.to_string(), partition, cp);
        }
        let now = crate::timestamp::PgTimestamp::now().unix_micros();
        let streamed = || {
            fresh
                .iter()
                .filter(|e| e.op != crate::event::Op::Read && e.commit_ts_us > 0)
        };
        latency::observe(streamed().map(|e| (now - e.commit_ts_us) as f64 / 1e6));
        if let Some(last) = streamed().map(|e| e.commit_ts_us).max() {
            m.replication_lag_seconds
                .set((now - last).max(0) as f64 / 1e6);
        }
        Ok(Attempt::Committed)
    }

    /// The configured source table whose topic is `topic` (`schema.table`), or the
    /// topic itself.
    fn table_of_topic(&self, topic: &str) -> String {
        let prefix = &self.config.kafka.topic_prefix;
        self.config
            .tables
            .iter()
            .find(|t| format!("{prefix}.{}.{}", t.source.schema, t.source.name) == topic)
            .map_or_else(|| topic.to_string(), |t| t.source.to_string())
    }

    /// A poison event: stop, or send it to `<topic>.dlq` and checkpoint past it.
    async fn poison(&mut self, item: &Item, reason: &str) -> Result<(), Error> {
        let at = format!(
            "topic {} partition {} offset {}",
            item.topic, item.partition, item.offset
        );
        metrics()
            .errors
            .with_label_values(&["sink", "poison"])
            .inc();
        if self.sink().on_error == OnError::Stop {
            return Err(Error::fatal(format!("poison event at {at}: {reason}"))
                .with_hint("fix the cause (the target table, or the event) and restart; or set [sink] on_error = \"dlq\""));
        }
        let dlq_topic = format!("{}.dlq", item.topic);
        if self.dlq.is_none() {
            let producer: FutureProducer = crate::kafka::producer::client_config(&self.config)
                .create()
                .map_err(|e| Error::operator("creating the dead-letter producer").with_source(e))?;
            self.dlq = Some(producer);
        }
        let producer = self.dlq.as_ref().expect("just created");
        let partition = item.partition.to_string();
        let offset = item.offset.to_string();
        let mut headers = OwnedHeaders::new();
        for (k, v) in &item.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        headers = headers
            .insert(Header {
                key: "pgferry.error",
                value: Some(reason),
            })
            .insert(Header {
                key: "pgferry.source_topic",
                value: Some(&*item.topic),
            })
            .insert(Header {
                key: "pgferry.source_partition",
                value: Some(partition.as_str()),
            })
            .insert(Header {
                key: "pgferry.source_offset",
                value: Some(offset.as_str()),
            });
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&dlq_topic).headers(headers);
        if let Some(k) = &item.key {
            record = record.key(k.as_slice());
        }
        if let Some(v) = &item.value {
            record = record.payload(v.as_slice());
        }
        producer
            .send(record, Duration::from_secs(60))
            .await
            .map_err(|(e, _)| {
                Error::transient(format!("writing the poison event at {at} to {dlq_topic}"))
                    .with_source(e)
            })?;
        tracing::warn!(%at, dlq = %dlq_topic, %reason, "poison event sent to the dead-letter topic");
        // Checkpoint past it, alone in its transaction.
        let skip = [(item, None)];
        let never = CancellationToken::new();
        match self.apply_with_retry(&skip, &never, true).await? {
            Outcome::Applied | Outcome::Interrupted => Ok(()),
            Outcome::Rejected(_, r) => Err(Error::fatal(format!(
                "checkpointing past the poison event at {at}: {r}"
            ))),
        }
    }
}

/// The topics of the configured tables.
fn topics_of(config: &Config) -> Vec<String> {
    let prefix = &config.kafka.topic_prefix;
    config
        .tables
        .iter()
        .map(|t| format!("{prefix}.{}.{}", t.source.schema, t.source.name))
        .collect()
}

fn parse_schema(text: &str) -> Result<SchemaEntry, String> {
    decode::WriterSchema::parse(text).map(Arc::new)
}
