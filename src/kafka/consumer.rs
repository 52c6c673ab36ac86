//! The Kafka consumer of the sink: manual partition assignment (or a consumer group)
//! at offsets the caller
//! takes from its checkpoints (never Kafka's group offsets), and a reader for the
//! schema topic.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use crate::config::Config;
use crate::error::Error;

const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// Notes group rebalances so the sink can seek newly assigned partitions to their
/// checkpoints (group mode).
#[derive(Default)]
pub struct SinkContext {
    rebalanced: AtomicBool,
    /// A permanent client error (credentials, certificates, ACLs), for the sink to
    /// stop on.
    failure: std::sync::Mutex<Option<String>>,
}

impl SinkContext {
    /// A permanent client error, if one happened.
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().ok().and_then(|f| f.clone())
    }

    /// Whether a rebalance happened since the last call.
    pub fn take_rebalanced(&self) -> bool {
        self.rebalanced.swap(false, Ordering::SeqCst)
    }
}

impl ClientContext for SinkContext {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        if super::permanent_client_error(&error, reason) {
            if let Ok(mut f) = self.failure.lock() {
                f.get_or_insert(super::permanent_client_message(&error, reason));
            }
        } else {
            tracing::warn!(%error, %reason, "Kafka client");
        }
    }
}

impl ConsumerContext for SinkContext {
    /// Newly assigned partitions start at their beginning, not at a committed group
    /// offset (pgferry commits none, and `auto.offset.reset = error` would refuse the
    /// lack of one); the sink then seeks each to the target's checkpoint, and events
    /// read before that are skipped by position.
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            for mut e in tpl.elements() {
                let _ = e.set_offset(Offset::Beginning);
            }
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, _: &Rebalance<'_>) {
        self.rebalanced.store(true, Ordering::SeqCst);
    }
}

pub type SinkConsumer = StreamConsumer<SinkContext>;

fn base_config(config: &Config, purpose: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.kafka.brokers)
        // Required by librdkafka even with manual assignment; offsets are never
        // committed to it.
        .set("group.id", format!("pgferry-{purpose}"))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // Never jump elsewhere: an offset out of range is an error the sink stops on.
        .set("auto.offset.reset", "error")
        .set("enable.partition.eof", "false")
        // Notice topics created after a group subscription soon, not after 5 minutes.
        .set("topic.metadata.refresh.interval.ms", "5000")
        // Bounded prefetch while the target is slow or down. 1 MiB still holds a
        // sink batch of small rows, and fetches come back within milliseconds; 8 MiB
        // (and fetches as large) measured no faster, and every queued message pins
        // its whole decompressed message set (up to a producer batch, 1 MB):
        // heaptrack found 23 MB of those at the two-partition drain's peak.
        .set("queued.max.messages.kbytes", "1024")
        // When that queue is full, fetch again soon after it drains: the default
        // (1 s) starved a sink that had just emptied it.
        .set("fetch.queue.backoff.ms", "20")
        // Fetches are small (memory stays bounded); both limits are soft: a message
        // larger than them still comes, alone. A partition takes at most a quarter
        // of a fetch: with a partition's own limit equal to the whole fetch, the first
        // partition with a backlog filled every fetch, and the sink workers of the
        // others idled until it was drained (two-partition drain: worker 1 applied 11
        // of the first 49 batches, then worked alone at the end). A quarter measured
        // no slower on one partition.
        .set("fetch.message.max.bytes", (256 << 10).to_string())
        .set("fetch.max.bytes", (1 << 20).to_string())
        .set(
            "receive.message.max.bytes",
            (config.kafka.max_message_bytes.max(50 << 20) + (1 << 20)).to_string(),
        )
        .set("client.id", "pgferry-sink");
    for (k, v) in &config.kafka.properties {
        // Producer settings are meaningless here and librdkafka warns about them.
        if !matches!(
            k.as_str(),
            "compression.type" | "linger.ms" | "acks" | "enable.idempotence"
        ) {
            c.set(k, v);
        }
    }
    c
}

/// The sink's consumer; in group mode (`group`) it joins that consumer group.
pub fn stream_consumer(config: &Config, group: Option<&str>) -> Result<SinkConsumer, Error> {
    let mut c = base_config(config, "sink");
    if let Some(g) = group {
        c.set("group.id", g);
    }
    c.create_with_context(SinkContext::default()).map_err(|e| {
        Error::operator("creating the Kafka consumer ([kafka] settings)").with_source(e)
    })
}

/// Partition counts of the topics that exist now.
pub fn partitions(
    consumer: &SinkConsumer,
    topics: &[String],
) -> Result<HashMap<String, i32>, Error> {
    let meta = consumer
        .fetch_metadata(None, METADATA_TIMEOUT)
        .map_err(|e| {
            Error::transient(format!("reading topic metadata from {}", "the brokers"))
                .with_source(e)
        })?;
    Ok(meta
        .topics()
        .iter()
        .filter(|t| topics.iter().any(|n| n == t.name()) && !t.partitions().is_empty())
        .map(|t| (t.name().to_string(), t.partitions().len() as i32))
        .collect())
}

/// Assign exactly these partitions, each at its offset (`None` = the beginning).
pub fn assign(
    consumer: &SinkConsumer,
    at: &HashMap<(String, i32), Option<i64>>,
) -> Result<(), Error> {
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), offset) in at {
        let offset = offset.map_or(Offset::Beginning, Offset::Offset);
        tpl.add_partition_offset(topic, *partition, offset)
            .map_err(|e| Error::fatal(format!("assigning {topic}/{partition}")).with_source(e))?;
    }
    consumer
        .assign(&tpl)
        .map_err(|e| Error::transient("assigning partitions").with_source(e))
}

/// One record of a topic read whole.
pub struct TopicRecord {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
}

/// A whole (small) topic, every partition read from the beginning up to the high
/// watermark it had when the read began. A topic that does not exist reads as empty.
pub fn read_to_end(config: &Config, topic: &str) -> Result<Vec<TopicRecord>, Error> {
    use rdkafka::Message;
    let consumer: BaseConsumer = base_config(config, "meta")
        .create()
        .map_err(|e| Error::operator("creating the Kafka consumer").with_source(e))?;
    let meta = consumer
        .fetch_metadata(Some(topic), METADATA_TIMEOUT)
        .map_err(|e| Error::transient(format!("reading metadata of {topic}")).with_source(e))?;
    let Some(t) = meta.topics().first().filter(|t| !t.partitions().is_empty()) else {
        return Ok(Vec::new());
    };
    let mut tpl = TopicPartitionList::new();
    // Per partition: the offset the read must reach.
    let mut ends: HashMap<i32, i64> = HashMap::new();
    for p in t.partitions() {
        let (low, high) = consumer
            .fetch_watermarks(topic, p.id(), METADATA_TIMEOUT)
            .map_err(|e| {
                Error::transient(format!("reading the offsets of {topic}/{}", p.id()))
                    .with_source(e)
            })?;
        if high > low {
            ends.insert(p.id(), high);
            tpl.add_partition_offset(topic, p.id(), Offset::Offset(low))
                .map_err(|e| Error::fatal("assigning").with_source(e))?;
        }
    }
    let mut out = Vec::new();
    if ends.is_empty() {
        return Ok(out);
    }
    consumer
        .assign(&tpl)
        .map_err(|e| Error::transient("assigning").with_source(e))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !ends.is_empty() {
        if std::time::Instant::now() > deadline {
            return Err(Error::transient(format!(
                "reading {topic}: partitions {:?} did not reach their end within 60s",
                ends.keys().collect::<Vec<_>>()
            )));
        }
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(m)) => {
                if ends
                    .get(&m.partition())
                    .is_some_and(|end| m.offset() + 1 >= *end)
                {
                    ends.remove(&m.partition());
                }
                out.push(TopicRecord {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(<[u8]>::to_vec),
                    value: m.payload().map(<[u8]>::to_vec),
                });
            }
            // A broker restarting or a refused connection: librdkafka recovers by
            // itself, and the deadline bounds the wait.
            Some(Err(e)) => {
                tracing::debug!(%topic, error = %e, "reading a whole topic; retrying");
                std::thread::sleep(Duration::from_millis(200));
            }
            None => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each fetch has room for several partitions: with a partition's limit as large
    /// as the whole fetch, one partition's backlog filled every fetch and the sink
    /// workers of the others idled until it was drained.
    #[test]
    fn every_partition_gets_a_share_of_each_fetch() {
        let dir = std::env::temp_dir().join(format!("pgferry-consumer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(&path, "[source]\nurl = \"postgres://u@h/d\"\n").unwrap();
        let config = Config::load(&path).unwrap();
        let c = base_config(&config, "sink");
        let limit = |key: &str| -> usize { c.get(key).unwrap().parse().unwrap() };
        assert!(
            limit("fetch.message.max.bytes") * 4 <= limit("fetch.max.bytes"),
            "a partition may take {} of a {}-byte fetch",
            limit("fetch.message.max.bytes"),
            limit("fetch.max.bytes")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
