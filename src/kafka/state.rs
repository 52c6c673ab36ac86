//! `run`'s source state store: the compacted topic `<prefix>._state`, one record per
//! slot (key `source/<slot>`, value the JSON of [`SourceState`]). It lives beside the
//! events it describes, so a restore of Kafka restores both together, and it needs
//! nothing on the EHR database. Writes wait for `acks=all`.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord, Producer, PurgeConfig};
use rdkafka::util::Timeout;

use crate::config::Config;
use crate::error::Error;
use crate::state::{SourceState, StateStore};

/// The state topic of a configuration.
pub fn state_topic(config: &Config) -> String {
    format!("{}._state", config.kafka.topic_prefix)
}

/// How long one write of the state may go unacknowledged before it is written again
/// through a new producer. After a restart of the whole cluster this producer, idle
/// between writes, was once seen to wait for minutes while the event producer (same
/// settings, busy) had long delivered again; a new one got through.
const WRITE_PATIENCE: Duration = Duration::from_secs(20);

fn state_producer(config: &Config) -> Result<FutureProducer, Error> {
    super::producer::client_config(config)
        .create()
        .map_err(|e| {
            Error::operator("creating the Kafka producer of the state topic").with_source(e)
        })
}

pub struct KafkaStateStore {
    config: Arc<Config>,
    topic: String,
    key: String,
    producer: FutureProducer,
}

impl KafkaStateStore {
    /// The store of `slot`'s state. The topic must exist (the producer stage creates it).
    pub fn new(config: Arc<Config>, slot: &str) -> Result<Self, Error> {
        let producer = state_producer(&config)?;
        Ok(KafkaStateStore {
            topic: state_topic(&config),
            key: format!("source/{slot}"),
            config,
            producer,
        })
    }
}

impl StateStore for KafkaStateStore {
    fn describe(&self) -> String {
        format!("Kafka topic {}, key {}", self.topic, self.key)
    }

    async fn load(&mut self) -> Result<Option<SourceState>, Error> {
        // A topic just created, or a broker just rejoined, may not answer for its
        // partitions at once: retry transient errors for a while.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let records = loop {
            let config = self.config.clone();
            let topic = self.topic.clone();
            let read =
                tokio::task::spawn_blocking(move || super::consumer::read_to_end(&config, &topic))
                    .await
                    .map_err(|e| Error::fatal("reading the state topic").with_source(e))?;
            match read {
                Ok(r) => break r,
                Err(e) if e.is_transient() && tokio::time::Instant::now() < deadline => {
                    tracing::info!(error = %e, "the state topic is not readable yet; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e),
            }
        };
        let Some(last) = records
            .into_iter()
            .filter(|r| r.key.as_deref() == Some(self.key.as_bytes()))
            .max_by_key(|r| r.offset)
        else {
            return Ok(None);
        };
        let Some(value) = last.value else {
            return Ok(None);
        };
        serde_json::from_slice(&value).map(Some).map_err(|e| {
            Error::operator(format!(
                "the source state in {} at partition {} offset {} is not valid",
                self.topic, last.partition, last.offset
            ))
            .with_source(e)
            .with_hint(
                "pgferry wrote it; if something else wrote to that topic, remove that record's key",
            )
        })
    }

    async fn save(&mut self, state: &SourceState) -> Result<(), Error> {
        let value = serde_json::to_vec(state)
            .map_err(|e| Error::fatal("serializing the source state").with_source(e))?;
        let mut attempt = 1u32;
        loop {
            let record = FutureRecord::to(&self.topic)
                .key(&self.key)
                .payload(&value)
                .partition(0);
            // message.timeout.ms = 0: while the brokers are away this waits, and so do
            // confirms (a newer position is only ever written after this one is acked).
            let write = self
                .producer
                .send(record, Timeout::After(Duration::from_secs(60)));
            match tokio::time::timeout(WRITE_PATIENCE, write).await {
                Ok(written) => {
                    return written.map(|_| ()).map_err(|(e, _)| {
                        Error::fatal(format!("writing the source state to {}", self.topic))
                            .with_source(e)
                    })
                }
                Err(_) => {
                    tracing::warn!(
                        topic = %self.topic,
                        attempt,
                        "the source state was not acknowledged within {} s; writing it again \
                         through a new Kafka producer",
                        WRITE_PATIENCE.as_secs()
                    );
                    // The old one's queued and in-flight copy is purged before the new
                    // write, so it cannot land after it; purging and destroying block.
                    let stale =
                        std::mem::replace(&mut self.producer, state_producer(&self.config)?);
                    if let Ok(stale) = tokio::task::spawn_blocking(move || {
                        stale.purge(PurgeConfig::default().queue().inflight());
                        stale
                    })
                    .await
                    {
                        tokio::task::spawn_blocking(move || drop(stale));
                    }
                    attempt += 1;
                }
            }
        }
    }
}
