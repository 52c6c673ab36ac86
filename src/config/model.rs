//! The TOML model: what a user may write, with defaults and a doc comment per key.
//! Every struct rejects unknown keys. Nothing here derives `Serialize`, so secrets in
//! URLs cannot be printed by accident.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// The main file, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Directory whose every `*.toml` file describes one source table, relative to the
    /// main file.
    pub tables_dir: Option<PathBuf>,
    pub source: SourceConfig,
    #[serde(default)]
    pub kafka: KafkaConfig,
    pub sink: Option<SinkConfig>,
    #[serde(default)]
    pub http: HttpConfig,
    /// Key material of PHI transforms (`hmac`).
    #[serde(default)]
    pub phi: PhiConfig,
    /// Tables may also be listed inline.
    #[serde(default)]
    pub tables: Vec<TableConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// `postgres://user:password@host:port/db?sslmode=…` of the EHR database.
    pub url: String,
    /// Logical replication slot (created with pgoutput when missing).
    #[serde(default = "default_name")]
    pub slot: String,
    /// Publication (created, and extended to the configured tables, when missing).
    #[serde(default = "default_name")]
    pub publication: String,
    /// How often to write a heartbeat message into the WAL, so an idle publication
    /// does not pin WAL on a busy server. Default 10s.
    #[serde(default = "default_heartbeat", deserialize_with = "duration")]
    pub heartbeat_interval: Duration,
    /// `initial` (default): copy the configured tables when the slot is created;
    /// `never`: carry only changes made after that.
    #[serde(default)]
    pub snapshot: SnapshotMode,
    /// Connections that copy tables in parallel; default: the number of cores.
    #[serde(default)]
    pub snapshot_workers: Option<usize>,
    /// Rows per snapshot chunk (a ctid range, or a key range while streaming).
    #[serde(default = "default_chunk_rows")]
    pub snapshot_chunk_rows: u64,
    /// `logical_decoding_work_mem` of pgferry's own walsender session (PostgreSQL's
    /// memory syntax, e.g. `"256MB"`); default: the server's setting.
    #[serde(default)]
    pub logical_decoding_work_mem: Option<String>,
}

/// Whether a first start copies the existing rows (`[source] snapshot`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotMode {
    #[default]
    Initial,
    Never,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap brokers, `host:port[,host:port…]`.
    #[serde(default = "default_brokers")]
    pub brokers: String,
    /// Topics are `<topic_prefix>.<schema>.<table>`.
    #[serde(default = "default_prefix")]
    pub topic_prefix: String,
    /// `avro` (default) or `json`.
    #[serde(default)]
    pub format: Format,
    /// With `format = "json"`: write each key and value as Kafka Connect's
    /// JsonConverter does with `schemas.enable=true`, `{"schema": …, "payload": …}`
    /// (`true`, the default, as it is Connect's and so what a consumer moved over from
    /// Debezium expects), or the payload alone (`false`). An error with `avro`.
    #[serde(default)]
    pub json_schemas: Option<bool>,
    /// Confluent-compatible schema registry URL (`http://` or `https://`); empty =
    /// schemas on `<prefix>._schemas`.
    #[serde(default)]
    pub schema_registry: String,
    /// CA certificates (PEM) that verify an `https://` registry; default: the system's
    /// bundle (/etc/ssl/certs/ca-certificates.crt).
    #[serde(default)]
    pub schema_registry_ca: Option<std::path::PathBuf>,
    /// Basic-auth user of the registry (with `schema_registry_password`).
    #[serde(default)]
    pub schema_registry_user: Option<String>,
    /// Basic-auth password of the registry; write `${VAR}` to keep it out of the file.
    #[serde(default)]
    pub schema_registry_password: Option<String>,
    /// Passed to librdkafka as is (after pgferry's defaults, so they win).
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// Partitions of the topics pgferry creates. Default 1.
    #[serde(default = "default_partitions")]
    pub partitions: i32,
    /// Replication factor of created topics; -1 = the broker's default.
    #[serde(default = "default_replication_factor")]
    pub replication_factor: i32,
    /// `min.insync.replicas` of created topics: with `acks=all`, how many replicas
    /// must hold an event before it counts as durable (and the slot may move past
    /// it). Unset = the broker's default. Use 2 with a replication factor of 3.
    #[serde(default)]
    pub min_insync_replicas: Option<u32>,
    /// Follow each delete with a tombstone (null value) for log compaction. Default true.
    #[serde(default = "default_true")]
    pub tombstones: bool,
    /// Create missing topics through the admin API. Default true.
    #[serde(default = "default_true")]
    pub create_topics: bool,
    /// Largest message (key + value + headers) pgferry produces or accepts, and the
    /// `max.message.bytes` of the topics it creates. Default 20 MiB: a scanned PDF in a
    /// bytea column is an everyday row. The brokers' `message.max.bytes` must allow it.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
}

impl KafkaConfig {
    /// Whether JSON messages embed their Connect schema (default true).
    pub fn json_schemas(&self) -> bool {
        self.json_schemas.unwrap_or(true)
    }
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: default_brokers(),
            topic_prefix: default_prefix(),
            format: Format::default(),
            json_schemas: None,
            schema_registry: String::new(),
            schema_registry_ca: None,
            schema_registry_user: None,
            schema_registry_password: None,
            properties: BTreeMap::new(),
            partitions: default_partitions(),
            replication_factor: default_replication_factor(),
            min_insync_replicas: None,
            tombstones: true,
            create_topics: true,
            max_message_bytes: default_max_message_bytes(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    #[default]
    Avro,
    Json,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// `postgres://…` of the hospital (target) database.
    pub url: String,
    /// Owner name of the checkpoint rows in the target.
    #[serde(default = "default_consumer")]
    pub consumer: String,
    /// Consumer group to split partitions among several sinks (offsets still come
    /// from the target).
    pub group: Option<String>,
    /// Create missing target tables from the event schema, keyed by the event key.
    #[serde(default)]
    pub create_tables: bool,
    /// `add_columns` (default): new source columns are added to the target; `none`:
    /// a new column stops the sink.
    #[serde(default)]
    pub schema_evolution: SchemaEvolution,
    /// `stop` (default): a poison event stops the sink; `dlq`: it goes to
    /// `<topic>.dlq` with the error in headers and the sink goes on.
    #[serde(default)]
    pub on_error: OnError,
    /// Most events per target transaction.
    #[serde(default = "default_batch_events")]
    pub batch_max_events: usize,
    /// Most bytes of Kafka messages per target transaction.
    #[serde(default = "default_batch_bytes")]
    pub batch_max_bytes: usize,
    /// How long a batch waits for more events before it is applied. The default, 0,
    /// takes what has arrived and applies it at once: while one batch is applied the
    /// next one gathers by itself, so batches grow with the load and latency stays low.
    #[serde(default = "default_linger", deserialize_with = "duration")]
    pub batch_linger: Duration,
    /// Write the applied-transactions ledger `pgferry.ledger` (one hash-chained row
    /// per batch, in the batch's transaction). On by default: it is the audit trail
    /// of what reached the target, and costs one insert per batch.
    #[serde(default = "default_true")]
    pub ledger: bool,
    /// Target connections that apply concurrently, each its own share of the
    /// partitions (a partition is applied by one worker at a time, so per-key order
    /// holds). Default 1: on two cores a second worker measured no faster (every core
    /// is busy), and only partitions run in parallel: one table on a one-partition
    /// topic uses one worker whatever this says.
    #[serde(default = "default_sink_workers")]
    pub workers: usize,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SchemaEvolution {
    #[default]
    AddColumns,
    None,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    #[default]
    Stop,
    Dlq,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of `/metrics`, `/healthz` and `/readyz`; empty disables the server.
    #[serde(default = "default_listen")]
    pub listen: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: default_listen(),
        }
    }
}

/// `[phi]`: the HMAC key of `hmac` transforms, from the config (`key = "${VAR}"`) or a
/// file. Never a default: a missing key with an `hmac` transform is a config error.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PhiConfig {
    /// The key itself; write `"${PGFERRY_PHI_KEY}"` to keep it out of the file.
    pub key: Option<String>,
    /// A file whose content (without a trailing newline) is the key.
    pub key_file: Option<PathBuf>,
}

impl std::fmt::Debug for PhiConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PhiConfig")
            .field("key", &self.key.as_ref().map(|_| "<secret>"))
            .field("key_file", &self.key_file)
            .finish()
    }
}

/// One source table (a file in `tables_dir` or an entry of `[[tables]]`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableConfig {
    /// `schema.table` on the source.
    pub source: String,
    /// `schema.table` on the target; default: the same name.
    pub target: Option<String>,
    /// Key columns; default: the primary key.
    pub key: Option<Vec<String>>,
    /// Columns that never leave the source.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Source column -> target column.
    #[serde(default)]
    pub rename: BTreeMap<String, String>,
    /// `false`: never copy this table's existing rows (initial or on demand).
    #[serde(default = "yes")]
    pub snapshot: bool,
    /// A row filter: only rows for which this SQL expression is true are published
    /// (a PostgreSQL 15+ publication row filter; snapshots apply it too).
    #[serde(default, rename = "where")]
    pub row_filter: Option<String>,
    /// Source column -> PHI transform applied before anything leaves the source:
    /// `hmac`, `redact`, `null` or `year`.
    #[serde(default)]
    pub transform: BTreeMap<String, crate::event::Transform>,
}

fn default_name() -> String {
    "pgferry".into()
}
fn yes() -> bool {
    true
}
fn default_chunk_rows() -> u64 {
    20_000
}
fn default_heartbeat() -> Duration {
    Duration::from_secs(10)
}
fn default_brokers() -> String {
    "127.0.0.1:9092".into()
}
fn default_prefix() -> String {
    "ehr".into()
}
fn default_partitions() -> i32 {
    1
}
fn default_replication_factor() -> i32 {
    -1
}
fn default_max_message_bytes() -> usize {
    20 << 20
}
fn default_true() -> bool {
    true
}
fn default_sink_workers() -> usize {
    1
}
fn default_batch_events() -> usize {
    // Two batches are in memory at once (one applied, the next gathered while it is),
    // and memory grows with their events. In the snapshot benchmark (1M rows) 10000
    // took pgferry from about 18.8 s (2500) to 16.5 s and the target's CPU from about
    // 8 to 6.3 s, but its peak RSS from 47-52 to 82-90 MB, and the end-to-end drain
    // of tests/memory.rs to 82 MiB in CI against its bound of 80. 5000 halves the
    // per-batch work (commit, ledger row, checkpoint) of 2500 at 61-64 MB.
    5_000
}
fn default_batch_bytes() -> usize {
    4 << 20
}
fn default_linger() -> Duration {
    Duration::ZERO
}
fn default_consumer() -> String {
    "pgferry".into()
}
fn default_listen() -> String {
    "127.0.0.1:9187".into()
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    parse_duration(&text).map_err(serde::de::Error::custom)
}

/// `250ms`, `10s`, `5m`, `1h` (a number and a unit; fractions allowed: `1.5s`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let bad = || {
        format!("invalid duration {text:?}: write a number and a unit (ms, s, m, h), like \"10s\"")
    };
    let value: f64 = number.parse().map_err(|_| bad())?;
    let secs = match unit.trim() {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(bad()),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_durations_with_units() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1.5m").unwrap(), Duration::from_secs(90));
        for bad in ["", "10", "s", "10 parsecs", "-1s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }
}
