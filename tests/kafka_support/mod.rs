//! Kafka helpers of the integration tests: read topics back with manual partition
//! assignment, and decode pgferry's Avro events (schema topic or registry framing).
#![allow(dead_code)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use apache_avro::types::Value as Avro;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{json, Value};

/// `pgferry run --only source --config FILE`, its stderr beside the config.
pub fn run_source(config: &std::path::Path) -> super::common::Pgferry {
    let stderr = config.with_extension("run.stderr");
    super::common::Pgferry::spawn(
        &[
            "run",
            "--only",
            "source",
            "--config",
            config.to_str().unwrap(),
        ],
        stderr,
    )
}

pub fn brokers() -> String {
    super::common::service_env("PGFERRY_BROKERS")
}

/// One consumed message.
#[derive(Debug, Clone)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: HashMap<String, String>,
}

/// Read `topic` from the beginning until `n` messages arrived (fails after `timeout`).
pub fn consume(brokers: &str, topic: &str, n: usize, timeout: Duration) -> Vec<Record> {
    read(brokers, topic, n, timeout, None)
}

/// Like [`consume`], then keep reading until nothing new arrives for `settle` (to see
/// duplicates, or to show that nothing more comes).
pub fn consume_all(
    brokers: &str,
    topic: &str,
    at_least: usize,
    timeout: Duration,
    settle: Duration,
) -> Vec<Record> {
    read(brokers, topic, at_least, timeout, Some(settle))
}

fn read(
    brokers: &str,
    topic: &str,
    n: usize,
    timeout: Duration,
    settle: Option<Duration>,
) -> Vec<Record> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "pgferry-tests")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()
        .expect("test consumer");
    let deadline = Instant::now() + timeout;
    let partitions = loop {
        let meta = consumer.fetch_metadata(Some(topic), Duration::from_secs(5));
        if let Ok(meta) = meta {
            let n = meta
                .topics()
                .first()
                .map(|t| t.partitions().len())
                .unwrap_or(0);
            if n > 0 {
                break n;
            }
        }
        assert!(
            Instant::now() < deadline,
            "topic {topic} did not appear within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions as i32 {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let mut last_arrival = Instant::now();
    loop {
        if out.len() >= n {
            match settle {
                Some(quiet) if last_arrival.elapsed() < quiet => {}
                _ => break,
            }
        } else {
            assert!(
                Instant::now() < deadline,
                "got {} of {n} messages from {topic} within {timeout:?}",
                out.len()
            );
        }
        if let Some(r) = consumer.poll(Duration::from_millis(200)) {
            last_arrival = Instant::now();
            let m = r.expect("consuming");
            let mut headers = HashMap::new();
            if let Some(h) = m.headers() {
                for header in h.iter() {
                    let v = header
                        .value
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                        .unwrap_or_default();
                    headers.insert(header.key.to_string(), v);
                }
            }
            out.push(Record {
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().map(<[u8]>::to_vec),
                value: m.payload().map(<[u8]>::to_vec),
                headers,
            });
        }
    }
    out
}

/// Schemas published on `<prefix>._schemas`, by fingerprint (hex).
pub fn schema_topic(
    brokers: &str,
    prefix: &str,
    at_least: usize,
) -> HashMap<String, apache_avro::Schema> {
    consume(
        brokers,
        &format!("{prefix}._schemas"),
        at_least,
        Duration::from_secs(60),
    )
    .into_iter()
    .map(|r| {
        let key = String::from_utf8(r.key.unwrap()).unwrap();
        let schema =
            apache_avro::Schema::parse_str(std::str::from_utf8(&r.value.unwrap()).unwrap())
                .unwrap();
        (key, schema)
    })
    .collect()
}

/// Decode a single-object encoded datum with the schema its fingerprint names.
pub fn decode_single_object(
    bytes: &[u8],
    schemas: &HashMap<String, apache_avro::Schema>,
) -> (String, Avro) {
    assert_eq!(&bytes[..2], &[0xC3, 0x01], "single-object marker");
    // The topic's key is the 64-bit fingerprint in hex; the frame carries it little-endian.
    let fp: String = bytes[2..10]
        .iter()
        .rev()
        .map(|b| format!("{b:02x}"))
        .collect();
    let schema = schemas
        .get(&fp)
        .unwrap_or_else(|| panic!("fingerprint {fp} is not on the schema topic"));
    let value = apache_avro::from_avro_datum(schema, &mut &bytes[10..], None)
        .expect("datum decodes with its schema");
    (fp, value)
}

/// Decode a Confluent-framed datum with the registry's schema of that id.
pub fn decode_confluent(bytes: &[u8], schemas: &HashMap<u32, apache_avro::Schema>) -> (u32, Avro) {
    assert_eq!(bytes[0], 0, "Confluent magic byte");
    let id = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
    let schema = schemas
        .get(&id)
        .unwrap_or_else(|| panic!("schema id {id} was not registered"));
    let value =
        apache_avro::from_avro_datum(schema, &mut &bytes[5..], None).expect("datum decodes");
    (id, value)
}

fn float_json(f: f64) -> Value {
    if f.is_nan() {
        json!("NaN")
    } else if f.is_infinite() {
        json!(if f > 0.0 { "Infinity" } else { "-Infinity" })
    } else if f == 0.0 && f.is_sign_negative() {
        json!("-0")
    } else {
        json!(f)
    }
}

fn twos_complement(bytes: &[u8]) -> i128 {
    let mut v: i128 = if bytes.first().is_some_and(|b| b & 0x80 != 0) {
        -1
    } else {
        0
    };
    for b in bytes {
        v = (v << 8) | i128::from(*b);
    }
    v
}

/// An Avro value as JSON for assertions: unions unwrap, the Unchanged record becomes
/// `{"$unchanged": true}`, decimals become `{"unscaled": "…"}`, special floats strings.
pub fn to_json(v: &Avro) -> Value {
    match v {
        Avro::Null => Value::Null,
        Avro::Boolean(b) => json!(b),
        Avro::Int(i) | Avro::Date(i) => json!(i),
        Avro::Long(l)
        | Avro::TimeMicros(l)
        | Avro::LocalTimestampMicros(l)
        | Avro::TimestampMicros(l) => json!(l),
        Avro::Float(f) => float_json(f64::from(*f)),
        Avro::Double(d) => float_json(*d),
        Avro::String(s) => json!(s),
        Avro::Uuid(u) => json!(u.to_string()),
        Avro::Bytes(b) => json!(b.iter().map(|x| format!("{x:02x}")).collect::<String>()),
        Avro::Decimal(d) => {
            let bytes: Vec<u8> = d.try_into().unwrap();
            json!({"unscaled": twos_complement(&bytes).to_string()})
        }
        Avro::Union(_, inner) => match inner.as_ref() {
            Avro::Record(fields) if fields.is_empty() => json!({"$unchanged": true}),
            other => to_json(other),
        },
        Avro::Array(items) => Value::Array(items.iter().map(to_json).collect()),
        Avro::Record(fields) => {
            let mut m = serde_json::Map::new();
            for (k, v) in fields {
                m.insert(k.clone(), to_json(v));
            }
            if m.len() == 2 && m.contains_key("scale") && m.contains_key("value") {
                // VariableScaleDecimal
                let hex = m["value"].as_str().unwrap().to_string();
                let bytes: Vec<u8> = (0..hex.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                    .collect();
                return json!({"scale": m["scale"], "unscaled": twos_complement(&bytes).to_string()});
            }
            Value::Object(m)
        }
        other => json!(format!("{other:?}")),
    }
}
