//! Every metric pgferry exports, named and labelled in one place:
//! `pgferry_<stage>_<what>_<unit>`, labels bounded (table, op, topic, stage, kind).
//! Hot paths update them per batch or per transaction, not per value.

use std::sync::LazyLock;

use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry,
};

pub struct Metrics {
    pub registry: Registry,
    /// `pgferry_source_changes_total{table,op}`: row changes read from the slot.
    pub source_changes: IntCounterVec,
    /// `pgferry_source_confirmed_lsn`: the last flush position confirmed to the slot.
    pub source_confirmed_lsn: IntGauge,
    /// `pgferry_source_slot_lag_bytes`: WAL between the server's insert position and
    /// the slot's `confirmed_flush_lsn` (what the slot pins).
    pub source_slot_lag_bytes: IntGauge,
    /// `pgferry_source_slot_spill_bytes`: bytes the slot's walsender spilled to the
    /// EHR's disk, as `pg_stat_replication_slots` counts them (PostgreSQL 14+).
    pub source_slot_spill_bytes: IntGauge,
    /// `pgferry_kafka_produced_total{topic}`: messages acknowledged by Kafka.
    pub kafka_produced: IntCounterVec,
    /// `pgferry_kafka_delivery_errors_total`: messages Kafka finally refused.
    pub kafka_delivery_errors: IntCounter,
    /// `pgferry_kafka_in_flight_messages`: handed to the producer, not yet acknowledged.
    pub kafka_in_flight: IntGauge,
    /// `pgferry_sink_applied_total{table,op}`: events applied to the target.
    pub sink_applied: IntCounterVec,
    /// `pgferry_sink_batches_total{worker}`: target transactions committed by each
    /// sink worker (how evenly `[sink] workers` share the partitions).
    pub sink_batches: IntCounterVec,
    /// `pgferry_sink_ledger_run_info{run_id}`: 1, labelled with the run id this process
    /// writes into `pgferry.ledger` (one label value per process), so `verify --ledger
    /// --metrics` can find the ledger rows written since it started.
    pub sink_ledger_run_info: IntGaugeVec,
    /// `pgferry_sink_checkpoint_offset{topic,partition}`: next offset to read.
    pub sink_checkpoint_offset: IntGaugeVec,
    /// `pgferry_replication_lag_seconds`: source commit to target commit, of the last
    /// applied batch.
    pub replication_lag_seconds: Gauge,
    /// `pgferry_end_to_end_latency_seconds`: per applied change, from its source commit
    /// to the target commit that applied it (snapshot reads are not counted).
    pub end_to_end_latency: Histogram,
    /// `pgferry_end_to_end_latency_recent_seconds{quantile}`: p50, p99 and max of that
    /// latency over about the last minute (see `sink::latency`), what `status` shows.
    pub end_to_end_latency_recent: GaugeVec,
    /// `pgferry_errors_total{stage,kind}`: errors by stage and policy kind.
    pub errors: IntCounterVec,
    /// `pgferry_snapshot_rows_total{table}`: rows a snapshot handed to Kafka.
    pub snapshot_rows: IntCounterVec,
    /// `pgferry_snapshot_tables{state}`: tables by snapshot state (pending, copying,
    /// done, failed).
    pub snapshot_tables: IntGaugeVec,
}

/// Bucket bounds of the latency histogram, in seconds: fine below 100 ms, where the
/// goal is, coarse up to the minutes an outage takes.
pub const LATENCY_BUCKETS: [f64; 26] = [
    0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
    0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels)
        .expect("metric definitions are static and valid")
}

fn gauge(name: &str, help: &str) -> IntGauge {
    IntGauge::new(name, help).expect("metric definitions are static and valid")
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let registry = Registry::new();
    let m = Metrics {
        source_changes: counter_vec(
            "pgferry_source_changes_total",
            "Row changes read from the replication slot.",
            &["table", "op"],
        ),
        source_confirmed_lsn: gauge(
            "pgferry_source_confirmed_lsn",
            "Last LSN confirmed to the replication slot (flush position), as a number.",
        ),
        source_slot_lag_bytes: gauge(
            "pgferry_source_slot_lag_bytes",
            "Bytes of WAL between the server's current position and the slot's confirmed_flush_lsn.",
        ),
        source_slot_spill_bytes: gauge(
            "pgferry_source_slot_spill_bytes",
            "Bytes of decoded transactions larger than logical_decoding_work_mem that the slot's walsender spilled to disk (pg_stat_replication_slots.spill_bytes).",
        ),
        kafka_produced: counter_vec(
            "pgferry_kafka_produced_total",
            "Messages acknowledged by Kafka (acks=all).",
            &["topic"],
        ),
        kafka_delivery_errors: IntCounter::new(
            "pgferry_kafka_delivery_errors_total",
            "Messages whose delivery to Kafka finally failed.",
        )
        .expect("metric definitions are static and valid"),
        kafka_in_flight: gauge(
            "pgferry_kafka_in_flight_messages",
            "Messages handed to the producer and not yet acknowledged.",
        ),
        sink_applied: counter_vec(
            "pgferry_sink_applied_total",
            "Change events applied to the target.",
            &["table", "op"],
        ),
        sink_batches: counter_vec(
            "pgferry_sink_batches_total",
            "Target transactions committed, per sink worker.",
            &["worker"],
        ),
        sink_ledger_run_info: IntGaugeVec::new(
            Opts::new("pgferry_sink_ledger_run_info", "The run id this process writes into pgferry.ledger."),
            &["run_id"],
        )
        .expect("metric definitions are static and valid"),
        sink_checkpoint_offset: IntGaugeVec::new(
            Opts::new("pgferry_sink_checkpoint_offset", "Next offset to read, as checkpointed in the target."),
            &["topic", "partition"],
        )
        .expect("metric definitions are static and valid"),
        replication_lag_seconds: Gauge::new(
            "pgferry_replication_lag_seconds",
            "Seconds from the source commit to the target commit of the last applied change.",
        )
        .expect("metric definitions are static and valid"),
        end_to_end_latency: Histogram::with_opts(
            HistogramOpts::new(
                "pgferry_end_to_end_latency_seconds",
                "Seconds from a change's source commit to the target commit that applied it.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .expect("metric definitions are static and valid"),
        end_to_end_latency_recent: GaugeVec::new(
            Opts::new(
                "pgferry_end_to_end_latency_recent_seconds",
                "End-to-end latency over about the last minute: quantile 0.5, 0.99 and 1 (the max).",
            ),
            &["quantile"],
        )
        .expect("metric definitions are static and valid"),
        errors: counter_vec("pgferry_errors_total", "Errors by stage and kind.", &["stage", "kind"]),
        snapshot_rows: counter_vec(
            "pgferry_snapshot_rows_total",
            "Rows copied by snapshots (initial or on demand) and handed to Kafka.",
            &["table"],
        ),
        snapshot_tables: IntGaugeVec::new(
            Opts::new("pgferry_snapshot_tables", "Configured tables by snapshot state: pending, copying, done, failed."),
            &["state"],
        )
        .expect("metric definitions are static and valid"),
        registry,
    };
    let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
        Box::new(m.source_changes.clone()),
        Box::new(m.source_confirmed_lsn.clone()),
        Box::new(m.source_slot_lag_bytes.clone()),
        Box::new(m.source_slot_spill_bytes.clone()),
        Box::new(m.kafka_produced.clone()),
        Box::new(m.kafka_delivery_errors.clone()),
        Box::new(m.kafka_in_flight.clone()),
        Box::new(m.sink_applied.clone()),
        Box::new(m.sink_batches.clone()),
        Box::new(m.sink_ledger_run_info.clone()),
        Box::new(m.sink_checkpoint_offset.clone()),
        Box::new(m.replication_lag_seconds.clone()),
        Box::new(m.end_to_end_latency.clone()),
        Box::new(m.end_to_end_latency_recent.clone()),
        Box::new(m.errors.clone()),
        Box::new(m.snapshot_rows.clone()),
        Box::new(m.snapshot_tables.clone()),
        Box::new(prometheus::process_collector::ProcessCollector::for_self()),
    ];
    for c in collectors {
        m.registry.register(c).expect("metric names are unique");
    }
    m
});

pub fn metrics() -> &'static Metrics {
    &METRICS
}

/// Count an error of `stage` by its policy kind.
pub fn record_error(stage: &str, err: &crate::error::Error) {
    metrics()
        .errors
        .with_label_values(&[stage, err.kind().as_str()])
        .inc();
}

/// The Prometheus text exposition of every metric.
pub fn render() -> String {
    let families = metrics().registry.gather();
    prometheus::TextEncoder::new()
        .encode_to_string(&families)
        .unwrap_or_else(|e| format!("# encoding metrics failed: {e}\n"))
}
