//! The Kafka stage of the source side: encodes each change (Avro or JSON), produces it
//! to `<prefix>.<schema>.<table>` with the key as message key (so per-key order holds),
//! and reports the durable LSN back to the source.
//!
//! Durability: rdkafka runs with idempotence and `acks=all`; a transaction's end LSN
//! becomes durable only when every message of it and of all earlier transactions is
//! acknowledged (see [`super::acks`]). Retriable errors are retried by librdkafka
//! without reordering; `message.timeout.ms = 0` makes it wait for brokers
//! indefinitely. A delivery that fails anyway is fatal: the stage stops and the slot
//! stays unconfirmed.
//!
//! One produce request in flight per broker, not idempotence's usual 5: a request
//! that fails on a partition the broker holds no state of this producer for (a topic
//! just created, or any partition after a restart of pgferry) can be overtaken by the
//! next one, which the broker then takes whatever its sequence number; librdkafka
//! takes that success as proof the failed messages were written too ("implicitly
//! acked") and reports them delivered. They are not in the log. A report of success
//! without an offset (how such an implicit ack arrives) is a failure here.
//!
//! Backpressure: librdkafka's local queue is bounded (`queue.buffering.max.kbytes`).
//! When it is full, this stage waits for deliveries to free room and stops taking
//! events, so the bounded event channel fills and the source stops reading.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use prometheus::IntCounter;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
use tokio::sync::{mpsc, watch, Notify};

use super::acks::AckTracker;
use super::registry::Registry;
use crate::codec::avro::{self, Framing, SourceInfo, TableSchemas};
use crate::codec::connect::{self, ConnectSchemas};
use crate::codec::StackText;
use crate::config::{Config, Format};
use crate::error::Error;
use crate::event::{Change, Event, Op, TableSchema};
use crate::lsn::Lsn;
use crate::metrics::{metrics, record_error};
use crate::timestamp::PgTimestamp;

const METADATA_TIMEOUT: Duration = Duration::from_secs(10);
/// The producer's last flush at stop; by then the source has stopped confirming, so
/// what is still undelivered is only sent again after a restart.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long messages may wait without a single delivery report before the stage says
/// so (and then again at this interval while it lasts). librdkafka waits for brokers
/// without end (`message.timeout.ms = 0`), so without this an outage is silent here.
const STALL_WARNING: Duration = Duration::from_secs(30);

/// State shared with librdkafka's delivery callback thread.
struct Shared {
    tracker: Mutex<AckTracker>,
    durable: watch::Sender<Lsn>,
    /// The highest durable snapshot mark (see `Event::Mark`).
    marks: watch::Sender<u64>,
    /// The highest mark given to `marks` so far.
    marks_published: AtomicU64,
    failure: Mutex<Option<String>>,
    /// Set once `failure` is: what the stage looks at per event, without the lock.
    failed: AtomicBool,
    /// Woken on every delivery: room in the local queue, or a failure to report.
    delivered: Notify,
    /// `pgferry_kafka_produced_total` of each topic, by the index that travels in the
    /// message's opaque: the delivery callback does no label lookup.
    produced: RwLock<Vec<(String, IntCounter)>>,
    /// Delivery reports so far, good or bad: what [`watch_stalls`] watches move.
    reports: AtomicU64,
}

/// The low bits of a message's opaque hold its topic's index in `Shared::produced`,
/// the high bits its transaction sequence number.
const TOPIC_BITS: u32 = 20;

fn opaque(seq: u64, topic: usize) -> usize {
    // 2^44 transactions in one process, 2^20 topics: far beyond any real run.
    debug_assert!(seq < 1 << (64 - TOPIC_BITS) && topic < 1 << TOPIC_BITS);
    ((seq << TOPIC_BITS) | (topic as u64 & ((1 << TOPIC_BITS) - 1))) as usize
}

impl Shared {
    /// Record the first failure (later ones are its consequences).
    fn fail(&self, text: impl FnOnce() -> String) {
        if let Ok(mut f) = self.failure.lock() {
            f.get_or_insert_with(text);
        }
        self.failed.store(true, Ordering::Release);
    }

    /// The index of `topic`'s produced counter, registered on first use (once per
    /// table version, never per message).
    fn topic_index(&self, topic: &str) -> usize {
        let mut all = self
            .produced
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        all.iter().position(|(t, _)| t == topic).unwrap_or_else(|| {
            all.push((
                topic.to_string(),
                metrics().kafka_produced.with_label_values(&[topic]),
            ));
            all.len() - 1
        })
    }

    /// Publish what a tracker step made durable. Every step that can move either
    /// value goes through here: a commit whose messages were all acknowledged before
    /// it arrived moves the marks with no delivery left to publish them.
    fn publish(&self, moved: Option<Lsn>, mark: u64) {
        if let Some(lsn) = moved {
            self.durable.send_replace(lsn);
        }
        // Most deliveries move no mark: the atomic spares them the watch's write lock.
        if self.marks_published.fetch_max(mark, Ordering::AcqRel) < mark {
            self.marks.send_if_modified(|m| {
                let up = mark > *m;
                *m = (*m).max(mark);
                up
            });
        }
    }
}

struct AckContext(Arc<Shared>);

impl ClientContext for AckContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if super::permanent_client_error(&error, reason) {
            self.0
                .fail(|| super::permanent_client_message(&error, reason));
            self.0.delivered.notify_waiters();
        } else {
            tracing::warn!(%error, %reason, "Kafka client");
        }
    }
}

impl ProducerContext for AckContext {
    /// The transaction sequence number of the message.
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: usize) {
        let seq = opaque as u64 >> TOPIC_BITS;
        let topic = opaque & ((1 << TOPIC_BITS) - 1);
        let m = metrics();
        m.kafka_in_flight.dec();
        self.0.reports.fetch_add(1, Ordering::Relaxed);
        // With acks=all a written message has its offset; librdkafka reports one it only
        // inferred to be written without (see the module doc).
        let failure = match result {
            Ok(msg) if msg.offset() >= 0 => None,
            Ok(msg) => Some((
                msg.topic(),
                msg.partition(),
                "was reported without an offset: librdkafka inferred it from a later \
                 message's success, and it may be missing from the log"
                    .to_string(),
            )),
            Err((e, msg)) => Some((msg.topic(), msg.partition(), format!("failed: {e}"))),
        };
        match failure {
            None => {
                if let Some((_, c)) = self
                    .0
                    .produced
                    .read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get(topic)
                {
                    c.inc();
                }
                let moved = self
                    .0
                    .tracker
                    .lock()
                    .map(|mut t| (t.acked(seq), t.durable_mark()))
                    .ok();
                if let Some((moved, mark)) = moved {
                    self.0.publish(moved, mark);
                }
            }
            Some((topic, partition, what)) => {
                m.kafka_delivery_errors.inc();
                m.errors.with_label_values(&["kafka", "fatal"]).inc();
                self.0
                    .fail(|| format!("delivery to topic {topic} partition {partition} {what}"));
            }
        }
        self.0.delivered.notify_waiters();
    }
}

/// Encoding state of one table version.
struct TableCodec {
    table: Arc<TableSchema>,
    schemas: TableSchemas,
    /// Shared, so that each message takes it without a copy.
    topic: Arc<str>,
    /// The topic's produced counter (see `Shared::produced`).
    topic_index: usize,
    partitions: i32,
    key_framing: Option<Framing>,
    value_framing: Framing,
    /// JSON format: the Connect schemas, and the `pgferry.schema` header (the Avro
    /// value schema's fingerprint, by which the sink finds the column types).
    connect: Option<(ConnectSchemas, String)>,
}

pub struct KafkaStage {
    config: Arc<Config>,
    producer: ThreadedProducer<AckContext>,
    admin: AdminClient<DefaultClientContext>,
    shared: Arc<Shared>,
    codecs: HashMap<u32, TableCodec>,
    /// Partition counts of topics known to exist.
    topics: HashMap<String, i32>,
    /// Fingerprints already on the schema topic.
    published: HashSet<[u8; 8]>,
    registry: Option<Registry>,
    source: SourceInfo,
    key_buf: Vec<u8>,
    value_buf: Vec<u8>,
}

/// The librdkafka configuration: our defaults, then `[kafka.properties]` as given.
pub fn client_config(config: &Config) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.kafka.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", "lz4")
        .set("message.timeout.ms", "0")
        // Bounded memory: 16 MiB, or room for the largest message.
        .set(
            "queue.buffering.max.kbytes",
            (config.kafka.max_message_bytes / 1024 + 1024)
                .max(16 << 10)
                .to_string(),
        )
        // And by count: with librdkafka's default (100,000) small messages pile up
        // with a message and header structures each beside their payloads; 10,000 is
        // still over 100 ms of the fastest drain measured.
        .set("queue.buffering.max.messages", "10000")
        .set("linger.ms", "5")
        // See the module doc: a later request must never overtake a failed one.
        .set("max.in.flight.requests.per.connection", "1")
        .set(
            "message.max.bytes",
            config.kafka.max_message_bytes.to_string(),
        )
        .set("client.id", "pgferry");
    for (k, v) in &config.kafka.properties {
        c.set(k, v);
    }
    c
}

impl KafkaStage {
    /// Connect to the brokers (failing fast if none answers) and prepare the stage.
    /// `durable` receives the durable LSN as acknowledgements arrive.
    pub async fn new(
        config: Arc<Config>,
        durable: watch::Sender<Lsn>,
    ) -> Result<KafkaStage, Error> {
        let shared = Arc::new(Shared {
            tracker: Mutex::new(AckTracker::new()),
            durable,
            marks: watch::channel(0).0,
            marks_published: AtomicU64::new(0),
            failure: Mutex::new(None),
            failed: AtomicBool::new(false),
            delivered: Notify::new(),
            produced: RwLock::new(Vec::new()),
            reports: AtomicU64::new(0),
        });
        let client = client_config(&config);
        let producer: ThreadedProducer<AckContext> = client
            .create_with_context(AckContext(shared.clone()))
            .map_err(|e| kafka_config_error(&config, e))?;
        let admin: AdminClient<DefaultClientContext> = client
            .create()
            .map_err(|e| kafka_config_error(&config, e))?;
        let brokers = config.kafka.brokers.clone();
        let p = producer.clone();
        tokio::task::spawn_blocking(move || p.client().fetch_metadata(None, METADATA_TIMEOUT))
            .await
            .map_err(|e| Error::fatal("checking the Kafka connection").with_source(e))?
            .map_err(|e| {
                if let Some(text) = shared.failure.lock().ok().and_then(|f| f.clone()) {
                    return Error::fatal(text);
                }
                Error::transient(format!(
                    "cannot reach the Kafka brokers {brokers} (kafka.brokers)"
                ))
                .with_source(e)
                .with_hint("are the brokers running and is kafka.brokers right?")
            })?;
        let registry = match config.kafka.schema_registry.as_str() {
            "" => None,
            _ => Some(Registry::from_config(&config.kafka)?),
        };
        let source = SourceInfo {
            name: config.kafka.topic_prefix.clone(),
            db: config.source.url.dbname.clone(),
        };
        Ok(KafkaStage {
            config,
            producer,
            admin,
            shared,
            codecs: HashMap::new(),
            topics: HashMap::new(),
            published: HashSet::new(),
            registry,
            source,
            key_buf: Vec::with_capacity(256),
            value_buf: Vec::with_capacity(4096),
        })
    }

    /// Create the topic of every configured table now, so consumers can assign them
    /// before the first change arrives.
    pub async fn create_configured_topics(&mut self) -> Result<(), Error> {
        let prefix = self.config.kafka.topic_prefix.clone();
        let topics: Vec<String> = self
            .config
            .tables
            .iter()
            .map(|t| format!("{prefix}.{}.{}", t.source.schema, t.source.name))
            .collect();
        for topic in topics {
            self.ensure_topic(&topic, false).await?;
        }
        // The source state (see `kafka::state`) must be writable before streaming.
        let state = super::state::state_topic(&self.config);
        if self.config.kafka.create_topics {
            self.ensure_topic(&state, true).await?;
        }
        Ok(())
    }

    /// Produce events until the source closes the channel, then flush.
    pub async fn run(
        mut self,
        mut events: mpsc::Receiver<Event>,
        budget: Arc<crate::budget::ByteBudget>,
    ) -> Result<(), Error> {
        let mut open: Option<u64> = None;
        let shared = self.shared.clone();
        let stalls = tokio::spawn(watch_stalls(shared.clone(), self.producer.clone()));
        let mut returns = budget.returns();
        let result = loop {
            if let Err(e) = self.check_failure() {
                break Err(e);
            }
            let event = match events.try_recv() {
                Ok(event) => event,
                Err(mpsc::error::TryRecvError::Disconnected) => break Ok(()),
                Err(mpsc::error::TryRecvError::Empty) => {
                    // About to wait: give back every share first, so no sender waiting
                    // for room waits on this stage.
                    returns.settle();
                    // Wake on deliveries too: a failed delivery must stop the stage
                    // even when no further event arrives. Registered before the
                    // failure is looked at again, so none slips in between.
                    let delivered = shared.delivered.notified();
                    tokio::pin!(delivered);
                    delivered.as_mut().enable();
                    if let Err(e) = self.check_failure() {
                        break Err(e);
                    }
                    let event = tokio::select! {
                        event = events.recv() => event,
                        _ = &mut delivered => continue,
                    };
                    let Some(event) = event else { break Ok(()) };
                    event
                }
            };
            let step = match &event {
                Event::Begin(_) => {
                    // A Begin while a transaction is open means the source reconnected
                    // mid-transaction and sends it again whole: keep counting its
                    // messages under the same sequence number.
                    if open.is_none() {
                        open = Some(self.lock_tracker().begin());
                    }
                    Ok(())
                }
                Event::Change(change) => match open {
                    Some(seq) => self.produce_change(change, seq).await,
                    None => Err(Error::fatal("a change arrived outside a transaction")),
                },
                Event::Commit { end_lsn, .. } => {
                    if let Some(seq) = open.take() {
                        self.commit(seq, *end_lsn);
                    }
                    Ok(())
                }
                Event::Snapshot(change) => {
                    // Its own entry, ending at LSN 0: durable alone, confirming nothing.
                    let seq = self.lock_tracker().begin();
                    let produced = self.produce_change(change, seq).await;
                    self.commit(seq, Lsn::ZERO);
                    produced
                }
                Event::Mark(mark) => {
                    let durable = {
                        let mut t = self.lock_tracker();
                        t.mark(*mark);
                        t.durable_mark()
                    };
                    self.shared.publish(None, durable);
                    Ok(())
                }
            };
            // Produced: its bytes are in librdkafka's own bounded queue now.
            returns.give(&event);
            if let Err(e) = step {
                break Err(e);
            }
        };
        drop(returns);
        stalls.abort();
        let producer = self.producer.clone();
        let flushed = tokio::task::spawn_blocking(move || producer.flush(FLUSH_TIMEOUT)).await;
        if let Ok(Err(e)) = flushed {
            tracing::warn!(error = %e, "not every message was delivered before stopping; the slot stays unconfirmed for them");
        }
        result?;
        self.check_failure()
    }

    /// The highest snapshot mark whose events (and all before them) are durable.
    pub fn marks(&self) -> watch::Receiver<u64> {
        self.shared.marks.subscribe()
    }

    /// Transaction `seq` is complete: publish whatever that made durable.
    fn commit(&self, seq: u64, end: Lsn) {
        let (moved, mark) = {
            let mut t = self.lock_tracker();
            (t.commit(seq, end), t.durable_mark())
        };
        self.shared.publish(moved, mark);
    }

    fn lock_tracker(&self) -> std::sync::MutexGuard<'_, AckTracker> {
        // The callback never panics while holding the lock; recover the data if it did.
        self.shared
            .tracker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn check_failure(&self) -> Result<(), Error> {
        if !self.shared.failed.load(Ordering::Acquire) {
            return Ok(());
        }
        let failure = self.shared.failure.lock().ok().and_then(|f| f.clone());
        match failure {
            Some(text) => Err(Error::fatal(text).with_hint(
                "the slot was not confirmed past the failed message; fix the cause and restart",
            )),
            None => Ok(()),
        }
    }

    async fn produce_change(&mut self, change: &Change, seq: u64) -> Result<(), Error> {
        self.ensure_codec(change, seq).await?;
        let codec = &self.codecs[&change.table.oid];
        let now = PgTimestamp::now();
        self.key_buf.clear();
        self.value_buf.clear();
        let has_key = match self.config.kafka.format {
            Format::Avro => {
                if let Some(f) = &codec.key_framing {
                    f.write_header(&mut self.key_buf);
                }
                let has_key = avro::encode_key(change, &codec.schemas, &mut self.key_buf)
                    .map_err(encode_error)?;
                codec.value_framing.write_header(&mut self.value_buf);
                avro::encode_value(
                    change,
                    &codec.schemas,
                    &self.source,
                    now,
                    &mut self.value_buf,
                )
                .map_err(encode_error)?;
                has_key
            }
            Format::Json => {
                let Some((connect, _)) = &codec.connect else {
                    return Err(Error::fatal("no Connect schemas for a JSON table"));
                };
                let with_schema = self.config.kafka.json_schemas();
                let has_key = connect::write_key(
                    change,
                    &codec.schemas,
                    connect,
                    with_schema,
                    &mut self.key_buf,
                )
                .map_err(encode_error)?;
                connect::write_envelope(
                    change,
                    &codec.schemas,
                    connect,
                    &self.source,
                    now,
                    with_schema,
                    &mut self.value_buf,
                )
                .map_err(encode_error)?;
                has_key
            }
        };
        if !has_key {
            self.key_buf.clear();
        }
        let topic = codec.topic.clone();
        let topic_index = codec.topic_index;
        let partitions = codec.partitions;
        let size = self.value_buf.len() + if has_key { self.key_buf.len() } else { 0 };
        if size > self.config.kafka.max_message_bytes {
            return Err(too_large(
                change,
                &topic,
                size,
                self.config.kafka.max_message_bytes,
            ));
        }
        let headers = headers(change, codec.connect.as_ref().map(|(_, fp)| fp.as_str()));
        // The buffers are lent to the messages and taken back: no copy per message.
        let key = has_key.then(|| std::mem::take(&mut self.key_buf));
        let value = std::mem::take(&mut self.value_buf);
        let sent = self
            .send_change(
                change.op,
                (&topic, topic_index),
                partitions,
                key.as_deref(),
                &value,
                headers,
                seq,
            )
            .await;
        self.value_buf = value;
        if let Some(k) = key {
            self.key_buf = k;
        }
        sent
    }

    /// The messages of one change: one, a truncate's one per partition, or a delete's
    /// and its tombstone.
    #[allow(clippy::too_many_arguments)]
    async fn send_change(
        &self,
        op: Op,
        (topic, topic_index): (&str, usize),
        partitions: i32,
        key: Option<&[u8]>,
        value: &[u8],
        headers: OwnedHeaders,
        seq: u64,
    ) -> Result<(), Error> {
        if op == Op::Truncate {
            // A truncate concerns every key: each partition gets it, in its place.
            for p in 0..partitions.max(1) {
                self.send(
                    (topic, topic_index),
                    Some(p),
                    None,
                    Some(value),
                    headers.clone(),
                    seq,
                )
                .await?;
            }
            return Ok(());
        }
        // Keyless tables keep their order on one partition.
        let partition = if key.is_none() { Some(0) } else { None };
        if op == Op::Delete && self.config.kafka.tombstones && key.is_some() {
            self.send(
                (topic, topic_index),
                partition,
                key,
                Some(value),
                headers.clone(),
                seq,
            )
            .await?;
            self.send((topic, topic_index), partition, key, None, headers, seq)
                .await
        } else {
            self.send(
                (topic, topic_index),
                partition,
                key,
                Some(value),
                headers,
                seq,
            )
            .await
        }
    }

    /// Hand one message to librdkafka, waiting while its queue is full.
    async fn send(
        &self,
        (topic, topic_index): (&str, usize),
        partition: Option<i32>,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: OwnedHeaders,
        seq: u64,
    ) -> Result<(), Error> {
        let mut record: BaseRecord<'_, [u8], [u8], usize> =
            BaseRecord::with_opaque_to(topic, opaque(seq, topic_index)).headers(headers);
        if let Some(k) = key {
            record = record.key(k);
        }
        if let Some(p) = payload {
            record = record.payload(p);
        }
        if let Some(p) = partition {
            record = record.partition(p);
        }
        // Count before sending: the delivery may be reported before `send` returns.
        self.lock_tracker().sent(seq);
        metrics().kafka_in_flight.inc();
        loop {
            let delivered = self.shared.delivered.notified();
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    self.check_failure()?;
                    let _ = tokio::time::timeout(Duration::from_millis(100), delivered).await;
                }
                Err((e, _)) => {
                    metrics().kafka_in_flight.dec();
                    record_error("kafka", &Error::fatal(""));
                    return Err(Error::fatal(format!("producing to topic {topic}")).with_source(e));
                }
            }
        }
    }

    /// Make sure the codec for `change.table` is current: topic created, schemas
    /// derived and registered or published.
    async fn ensure_codec(&mut self, change: &Change, seq: u64) -> Result<(), Error> {
        let table = &change.table;
        if let Some(c) = self.codecs.get_mut(&table.oid) {
            if Arc::ptr_eq(&c.table, table) {
                return Ok(());
            }
            // A relation message after a reconnect repeats an unchanged schema.
            if c.table.columns == table.columns
                && c.table.key == table.key
                && c.table.name == table.name
            {
                c.table = table.clone();
                return Ok(());
            }
        }
        let prefix = self.config.kafka.topic_prefix.clone();
        let topic = format!("{prefix}.{}.{}", table.name.schema, table.name.name);
        let partitions = self.ensure_topic(&topic, false).await?;
        let schemas = avro::derive(table, &prefix);
        let (key_framing, value_framing) = match self.config.kafka.format {
            // The Avro value schema goes to the schema topic even so (never to a
            // registry, whose subject would then claim an Avro topic): it carries the
            // PostgreSQL column types the sink needs to read epoch days, scales and
            // millisecond timestamps back, whether or not the messages embed a schema.
            Format::Json => (
                None,
                Framing::SingleObject(
                    self.publish_schema(&topic, "value", &schemas.value, seq)
                        .await?,
                ),
            ),
            Format::Avro => {
                let key = match &schemas.key {
                    Some(k) => Some(self.schema_framing(&topic, "key", k, seq).await?),
                    None => None,
                };
                (
                    key,
                    self.schema_framing(&topic, "value", &schemas.value, seq)
                        .await?,
                )
            }
        };
        let connect = match (self.config.kafka.format, value_framing) {
            (Format::Json, Framing::SingleObject(fp)) => Some((
                ConnectSchemas::derive(table, &schemas),
                fingerprint_hex(&fp),
            )),
            _ => None,
        };
        tracing::info!(table = %table.name, %topic, "new schema version in use");
        self.codecs.insert(
            table.oid,
            TableCodec {
                table: table.clone(),
                schemas,
                topic_index: self.shared.topic_index(&topic),
                topic: topic.into(),
                partitions,
                key_framing,
                value_framing,
                connect,
            },
        );
        Ok(())
    }

    /// Register the schema (registry mode) or publish it to `<prefix>._schemas`.
    async fn schema_framing(
        &mut self,
        topic: &str,
        part: &str,
        schema: &serde_json::Value,
        seq: u64,
    ) -> Result<Framing, Error> {
        let subject = format!("{topic}-{part}");
        let text = schema.to_string();
        if let Some(registry) = &mut self.registry {
            return Ok(Framing::Registry(registry.register(&subject, &text).await?));
        }
        Ok(Framing::SingleObject(
            self.publish_schema(topic, part, schema, seq).await?,
        ))
    }

    /// Publish the schema to `<prefix>._schemas` (once); its fingerprint.
    async fn publish_schema(
        &mut self,
        topic: &str,
        part: &str,
        schema: &serde_json::Value,
        seq: u64,
    ) -> Result<[u8; 8], Error> {
        let subject = format!("{topic}-{part}");
        let text = schema.to_string();
        let (fp, _) = avro::fingerprint(schema).map_err(|e| {
            Error::fatal(format!("the derived Avro schema of {subject} is invalid")).with_source(e)
        })?;
        if !self.published.contains(&fp) {
            let schema_topic = format!("{}._schemas", self.config.kafka.topic_prefix);
            self.ensure_topic(&schema_topic, true).await?;
            let key = fingerprint_hex(&fp);
            let headers = OwnedHeaders::new().insert(Header {
                key: "pgferry.subject",
                value: Some(subject.as_str()),
            });
            let schema_index = self.shared.topic_index(&schema_topic);
            self.send(
                (&schema_topic, schema_index),
                Some(0),
                Some(key.as_bytes()),
                Some(text.as_bytes()),
                headers,
                seq,
            )
            .await?;
            self.published.insert(fp);
        }
        Ok(fp)
    }

    /// Create the topic if missing; returns its partition count.
    async fn ensure_topic(&mut self, topic: &str, compacted: bool) -> Result<i32, Error> {
        if let Some(p) = self.topics.get(topic) {
            return Ok(*p);
        }
        if self.config.kafka.create_topics {
            let partitions = if compacted {
                1
            } else {
                self.config.kafka.partitions
            };
            let mut new = NewTopic::new(
                topic,
                partitions,
                TopicReplication::Fixed(self.config.kafka.replication_factor),
            );
            if compacted {
                new = new.set("cleanup.policy", "compact");
            }
            let max_bytes = self.config.kafka.max_message_bytes.to_string();
            new = new.set("max.message.bytes", &max_bytes);
            let min_isr = self.config.kafka.min_insync_replicas.map(|m| m.to_string());
            if let Some(m) = &min_isr {
                new = new.set("min.insync.replicas", m);
            }
            let opts = AdminOptions::new().operation_timeout(Some(METADATA_TIMEOUT));
            let results =
                self.admin.create_topics([&new], &opts).await.map_err(|e| {
                    Error::transient(format!("creating topic {topic}")).with_source(e)
                })?;
            for r in results {
                match r {
                    Ok(_) => tracing::info!(%topic, partitions, "created topic"),
                    Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                    Err((_, code)) => {
                        return Err(Error::operator(format!("creating topic {topic}: {code}"))
                            .with_hint(
                                "create it yourself, or check the broker's ACLs and limits",
                            ))
                    }
                }
            }
        }
        // A topic just created may take a moment to show in every broker's metadata.
        let deadline = tokio::time::Instant::now() + METADATA_TIMEOUT;
        loop {
            let producer = self.producer.clone();
            let name = topic.to_string();
            let meta = tokio::task::spawn_blocking(move || {
                producer
                    .client()
                    .fetch_metadata(Some(&name), METADATA_TIMEOUT)
            })
            .await
            .map_err(|e| Error::fatal("reading topic metadata").with_source(e))?
            .map_err(|e| {
                Error::transient(format!("reading the metadata of topic {topic}")).with_source(e)
            })?;
            let partitions = meta
                .topics()
                .first()
                .filter(|t| t.error().is_none())
                .map(|t| t.partitions().len() as i32)
                .filter(|p| *p > 0);
            match partitions {
                Some(p) => {
                    self.topics.insert(topic.to_string(), p);
                    return Ok(p);
                }
                None if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                None => {
                    return Err(Error::operator(format!("topic {topic} does not exist"))
                        .with_hint("create it, or set kafka.create_topics = true"))
                }
            }
        }
    }
}

/// Say when messages wait for Kafka and no delivery report comes for
/// [`STALL_WARNING`] (brokers down, unreachable or refusing), again at that interval
/// while it lasts, and once when reports come again: the operator learns why the slot
/// is not confirmed and lag grows, where librdkafka itself only retries.
async fn watch_stalls(shared: Arc<Shared>, producer: ThreadedProducer<AckContext>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen = shared.reports.load(Ordering::Relaxed);
    let mut quiet_since = tokio::time::Instant::now();
    let mut warned_at: Option<tokio::time::Instant> = None;
    loop {
        tick.tick().await;
        let reports = shared.reports.load(Ordering::Relaxed);
        let waiting = producer.in_flight_count();
        if reports != seen || waiting == 0 {
            if warned_at.take().is_some() {
                tracing::info!(
                    stalled_s = quiet_since.elapsed().as_secs(),
                    "Kafka acknowledges messages again"
                );
            }
            seen = reports;
            quiet_since = tokio::time::Instant::now();
            continue;
        }
        let quiet = quiet_since.elapsed();
        if quiet >= STALL_WARNING && warned_at.is_none_or(|w| w.elapsed() >= STALL_WARNING) {
            tracing::warn!(
                waiting,
                stalled_s = quiet.as_secs(),
                "no message acknowledged by Kafka for {} s; waiting for the brokers without \
                 limit, and the slot is not confirmed past the waiting changes (check the \
                 brokers and the Kafka client warnings above)",
                quiet.as_secs()
            );
            warned_at = Some(tokio::time::Instant::now());
        }
    }
}

/// `pgferry.commit_lsn`, `pgferry.ordinal`, `pgferry.xid` (the source transaction id,
/// for the sink's ledger), `pgferry.unchanged` (when any) and, for
/// JSON messages, `pgferry.schema`: the fingerprint (hex, as the schema topic's key)
/// of the Avro value schema that describes the columns.
fn headers(change: &Change, schema: Option<&str>) -> OwnedHeaders {
    // Formatted on the stack: these run for every change.
    let commit_lsn = StackText::<24>::lsn(change.commit_lsn);
    let ordinal = StackText::<12>::decimal(change.ordinal.into());
    let xid = StackText::<12>::decimal(change.xid.into());
    let mut h = OwnedHeaders::new_with_capacity(5)
        .insert(Header {
            key: "pgferry.commit_lsn",
            value: Some(&*commit_lsn),
        })
        .insert(Header {
            key: "pgferry.ordinal",
            value: Some(&*ordinal),
        })
        .insert(Header {
            key: "pgferry.xid",
            value: Some(&*xid),
        });
    let unchanged: Vec<&str> = change.unchanged().collect();
    if !unchanged.is_empty() {
        let list = unchanged.join(",");
        h = h.insert(Header {
            key: "pgferry.unchanged",
            value: Some(list.as_str()),
        });
    }
    if let Some(fp) = schema {
        h = h.insert(Header {
            key: "pgferry.schema",
            value: Some(fp),
        });
    }
    h
}

/// The schema topic's key: the fingerprint as the 16-digit hex of its 64-bit value (what
/// Java's `Long.toHexString(parsingFingerprint64(s))` prints, zero-padded), not of the
/// little-endian bytes that single-object framing carries.
pub fn fingerprint_hex(fp: &[u8; 8]) -> String {
    format!("{:016x}", u64::from_le_bytes(*fp))
}

/// A row too large for a Kafka message: named by table, key columns and position,
/// never by value. The slot is not confirmed past it.
fn too_large(change: &Change, topic: &str, size: usize, max: usize) -> Error {
    let key: Vec<&str> = change
        .table
        .key
        .iter()
        .map(|&i| change.table.columns[i].name.as_str())
        .collect();
    Error::fatal(format!(
        "a change of table {} (key columns {}; commit {}, change {}) is {size} bytes encoded, \
         more than [kafka] max_message_bytes = {max}, for topic {topic}",
        change.table.name,
        if key.is_empty() {
            "none".to_string()
        } else {
            key.join(", ")
        },
        change.commit_lsn,
        change.ordinal
    ))
    .with_hint(
        "raise [kafka] max_message_bytes together with the brokers' message.max.bytes and the \
                topic's max.message.bytes, then restart; nothing past it was confirmed",
    )
}

fn encode_error(e: avro::EncodeError) -> Error {
    Error::fatal("encoding a change").with_source(e).with_hint(
        "this is a pgferry bug or an unsupported value; the slot was not confirmed past it",
    )
}

fn kafka_config_error(config: &Config, e: KafkaError) -> Error {
    Error::operator(format!(
        "{}: [kafka] / [kafka.properties]: librdkafka rejected the configuration",
        config.path.display()
    ))
    .with_source(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_opaque_carries_the_sequence_and_the_topic() {
        for (seq, topic) in [
            (0, 0),
            (1, 7),
            (u64::MAX >> TOPIC_BITS, (1 << TOPIC_BITS) - 1),
        ] {
            let o = opaque(seq, topic) as u64;
            assert_eq!(o >> TOPIC_BITS, seq);
            assert_eq!(o as usize & ((1 << TOPIC_BITS) - 1), topic);
        }
    }

    #[test]
    fn headers_are_formatted_like_their_display() {
        let lsn = Lsn(0x16_B374_D848);
        let text = StackText::<24>::of(lsn);
        assert_eq!(&*text, lsn.to_string());
        assert_eq!(&*StackText::<12>::of(u32::MAX), "4294967295");
        // What the headers use, against `Display`.
        let mut state = 0x2545_F491_4F6C_DD1D_u64;
        for shift in (0..64).chain([0; 2000]) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let lsn = Lsn(state >> shift);
            assert_eq!(&*StackText::<24>::lsn(lsn), lsn.to_string());
            let n = (state >> shift) as u32;
            assert_eq!(&*StackText::<12>::decimal(n.into()), n.to_string());
        }
        for lsn in [Lsn(0), Lsn(u64::MAX), Lsn(1 << 32)] {
            assert_eq!(&*StackText::<24>::lsn(lsn), lsn.to_string());
        }
        // Too long for the buffer: nothing partial is claimed beyond what fit.
        let cut = StackText::<4>::of("abcdefgh");
        assert!(cut.len() <= 4);
    }
}
