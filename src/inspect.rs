//! Read-only commands: `pgferry schema` prints the Avro key and value schemas of the
//! configured tables as the Kafka stage derives them; `pgferry verify` compares source
//! and target tables by row count and an order-independent checksum; `pgferry verify
//! --ledger` checks the target's applied-transactions ledger (see `sink::ledger`).

use std::io::Write;

use crate::codec::avro;
use crate::config::{parse_table_name, Config};
use crate::error::Error;
use crate::event::{quote_ident, TableName};
use crate::source::relation::{describe, RelationCache};

/// Print `{"table", "topic", "key", "value"}` for each configured table (or `only`).
pub async fn schema(config: &Config, only: Option<&str>) -> Result<(), Error> {
    let only = match only {
        Some(t) => Some(parse_table_name(t).map_err(|m| Error::operator(format!("--table: {m}")))?),
        None => None,
    };
    let tables: Vec<_> = config
        .tables
        .iter()
        .filter(|t| only.as_ref().is_none_or(|o| &t.source == o))
        .collect();
    if tables.is_empty() {
        return Err(Error::operator(match &only {
            Some(t) => format!("table {t} is not configured in {}", config.path.display()),
            None => format!("{} configures no tables", config.path.display()),
        }));
    }
    let catalog = crate::pg::connect(&config.source.url, "schema").await?;
    let mut cache = RelationCache::default();
    let prefix = &config.kafka.topic_prefix;
    let mut out = std::io::stdout().lock();
    for table in tables {
        let relation = describe(&catalog, table).await?;
        let state = cache.update(&catalog, config, relation).await?;
        let schemas = avro::derive(&state.schema, prefix);
        let doc = serde_json::json!({
            "table": table.source.to_string(),
            "topic": format!("{prefix}.{}.{}", table.source.schema, table.source.name),
            "key": schemas.key,
            "value": schemas.value,
        });
        let text = serde_json::to_string_pretty(&doc).unwrap_or_default();
        writeln!(out, "{text}").map_err(|e| Error::fatal("writing to stdout").with_source(e))?;
    }
    Ok(())
}

/// Settings that make both sides print values the same way.
const CANONICAL_SESSION: &str =
    "set DateStyle = ISO; set IntervalStyle = postgres; set TimeZone = 'UTC'; \
     set extra_float_digits = 1; set bytea_output = hex";

/// One table's comparison.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Comparison {
    pub table: String,
    pub source_rows: Option<i64>,
    pub target_rows: Option<i64>,
    pub status: String,
}

impl Comparison {
    pub fn equal(&self) -> bool {
        self.status == "equal"
    }
}

/// Count and order-independent checksum of `columns` of `table`: the sum of the first
/// 64 bits of md5(row text) of every row. Streams through the table (an aggregate), so
/// memory stays flat on millions of rows.
async fn fingerprint(
    client: &tokio_postgres::Client,
    table: &TableName,
    columns: &[String],
    filter: Option<&str>,
) -> Result<(i64, String), Error> {
    let row_expr = columns
        .iter()
        .map(|c| quote_ident(c))
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!(
        "select count(*), coalesce(sum(('x' || left(md5(row({row_expr})::text), 16))::bit(64)::bigint::numeric), 0)::text \
         from {}{}",
        table.quoted(),
        filter.map_or(String::new(), |w| format!(" where ({w})"))
    );
    let row = client
        .query_one(&sql, &[])
        .await
        .map_err(|e| Error::postgres(format!("checksumming {table}"), e))?;
    Ok((row.get(0), row.get(1)))
}

async fn columns(
    client: &tokio_postgres::Client,
    table: &TableName,
) -> Result<Option<Vec<String>>, Error> {
    let rows = client
        .query(
            "select a.attname::text from pg_attribute a join pg_class c on c.oid = a.attrelid \
             join pg_namespace n on n.oid = c.relnamespace \
             where n.nspname = $1 and c.relname = $2 and a.attnum > 0 and not a.attisdropped order by a.attnum",
            &[&table.schema, &table.name],
        )
        .await
        .map_err(|e| Error::postgres(format!("reading the columns of {table}"), e))?;
    Ok((!rows.is_empty()).then(|| rows.iter().map(|r| r.get(0)).collect()))
}

/// `pgferry verify`: compare every configured table (or `only`) on both sides.
pub async fn verify(config: &Config, only: Option<&str>) -> Result<Vec<Comparison>, Error> {
    let sink = config.sink.as_ref().ok_or_else(|| {
        Error::operator(format!(
            "{}: verify needs a [sink] section (the target)",
            config.path.display()
        ))
    })?;
    let only = match only {
        Some(t) => Some(parse_table_name(t).map_err(|m| Error::operator(format!("--table: {m}")))?),
        None => None,
    };
    let source = crate::pg::connect(&config.source.url, "verify source").await?;
    let target = crate::pg::connect(&sink.url, "verify target").await?;
    for c in [&source, &target] {
        c.batch_execute(CANONICAL_SESSION)
            .await
            .map_err(|e| Error::postgres("setting the verify session", e))?;
    }
    let mut out = Vec::new();
    for table in config
        .tables
        .iter()
        .filter(|t| only.as_ref().is_none_or(|o| &t.source == o))
    {
        let name = table.source.to_string();
        let Some(source_columns) = columns(&source, &table.source).await? else {
            out.push(Comparison {
                table: name,
                source_rows: None,
                target_rows: None,
                status: "missing on the source".into(),
            });
            continue;
        };
        let published: Vec<String> = source_columns
            .into_iter()
            .filter(|c| !table.exclude.contains(c))
            .collect();
        let mapped: Vec<String> = published
            .iter()
            .map(|c| table.rename.get(c).cloned().unwrap_or_else(|| c.clone()))
            .collect();
        let (source_rows, source_sum) = fingerprint(
            &source,
            &table.source,
            &published,
            table.row_filter.as_deref(),
        )
        .await?;
        let Some(target_columns) = columns(&target, &table.target).await? else {
            out.push(Comparison {
                table: name,
                source_rows: Some(source_rows),
                target_rows: None,
                status: format!("DIFFERENT: target table {} is missing", table.target),
            });
            continue;
        };
        let missing: Vec<&String> = mapped
            .iter()
            .filter(|c| !target_columns.contains(c))
            .collect();
        if !missing.is_empty() {
            out.push(Comparison {
                table: name,
                source_rows: Some(source_rows),
                target_rows: None,
                status: format!(
                    "DIFFERENT: target lacks column(s) {}",
                    missing
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
            continue;
        }
        let (target_rows, target_sum) = fingerprint(&target, &table.target, &mapped, None).await?;
        let status = if source_rows != target_rows {
            "DIFFERENT: row counts differ".to_string()
        } else if source_sum != target_sum {
            "DIFFERENT: checksums differ".to_string()
        } else {
            "equal".to_string()
        };
        out.push(Comparison {
            table: name,
            source_rows: Some(source_rows),
            target_rows: Some(target_rows),
            status,
        });
    }
    if out.is_empty() {
        return Err(Error::operator(format!(
            "{}: no configured table matches",
            config.path.display()
        )));
    }
    Ok(out)
}

/// `pgferry status`: where the slot stands on the source and where each partition
/// stands in the target's checkpoints, as lines of text.
pub async fn status(config: &std::sync::Arc<Config>) -> Result<Vec<String>, Error> {
    let mut lines = Vec::new();
    let source = crate::pg::connect(&config.source.url, "status").await?;
    let slot = &config.source.slot;
    match crate::source::slot::slot_info(&source, slot).await? {
        Some(info) => lines.push(format!(
            "slot {slot}: confirmed_flush_lsn {}, lag {} bytes, wal_status {}",
            info.confirmed_flush.map_or("-".into(), |l| l.to_string()),
            info.lag_bytes.map_or("-".into(), |b| b.to_string()),
            info.wal_status.as_deref().unwrap_or("-"),
        )),
        None => lines.push(format!(
            "slot {slot}: does not exist yet (pgferry creates it on start)"
        )),
    }
    snapshot_lines(config, &source, &mut lines).await;
    if let Some(sink) = &config.sink {
        let target = crate::pg::connect(&sink.url, "status").await?;
        let rows = target
            .query(
                "select topic, partition, next_offset, commit_lsn::text, ordinal, \
                        extract(epoch from now() - updated_at)::float8 \
                 from pgferry.checkpoints where consumer = $1 order by topic, partition",
                &[&sink.consumer],
            )
            .await;
        match rows {
            Ok(rows) if rows.is_empty() => {
                lines.push(format!("sink {}: no checkpoints yet", sink.consumer))
            }
            Ok(rows) => {
                for r in rows {
                    lines.push(format!(
                        "sink {}: {}[{}] next offset {}, applied up to {}#{}, {:.0}s ago",
                        sink.consumer,
                        r.get::<_, String>(0),
                        r.get::<_, i32>(1),
                        r.get::<_, i64>(2),
                        r.get::<_, String>(3),
                        r.get::<_, i32>(4),
                        r.get::<_, f64>(5),
                    ));
                }
            }
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => lines
                .push(format!(
                    "sink {}: no checkpoint table yet (created when the sink starts)",
                    sink.consumer
                )),
            Err(e) => return Err(Error::postgres("reading checkpoints from the target", e)),
        }
    }
    Ok(lines)
}

/// Each table's snapshot progress, from the state `run` records on Kafka: rows copied
/// against `pg_class.reltuples`, chunks done, and its state.
async fn snapshot_lines(
    config: &std::sync::Arc<Config>,
    source: &tokio_postgres::Client,
    lines: &mut Vec<String>,
) {
    use crate::state::StateStore;
    let store = crate::kafka::state::KafkaStateStore::new(config.clone(), &config.source.slot);
    let state = match store {
        Ok(mut store) => store.load().await,
        Err(e) => Err(e),
    };
    let state = match state {
        Ok(Some(s)) => s,
        Ok(None) => return,
        Err(e) => {
            lines.push(format!("snapshot: progress unavailable ({e})"));
            return;
        }
    };
    for (table, t) in &state.snapshot.tables {
        let estimate: Option<i64> = source
            .query_opt(
                "select greatest(reltuples, 0)::bigint from pg_class where oid = to_regclass($1)",
                &[&crate::event::TableName::new(
                    table.split_once('.').map_or("", |(s, _)| s),
                    table.split_once('.').map_or(table.as_str(), |(_, n)| n),
                )
                .quoted()],
            )
            .await
            .ok()
            .flatten()
            .map(|r| r.get(0));
        let mut line = format!(
            "snapshot {table}: {} ({}), {} rows of ~{}, {} chunks",
            t.phase.as_str(),
            match t.method {
                crate::state::Method::Initial => "initial",
                crate::state::Method::Incremental => "incremental",
            },
            t.rows,
            estimate.map_or("?".into(), |e| e.to_string()),
            t.chunks
        );
        if let Some(e) = &t.error {
            line.push_str(&format!(": {e}"));
        }
        lines.push(line);
    }
}

/// `pgferry verify --ledger`: walk the configured consumer's ledger chain, print the
/// first broken link (or that it is intact) and the totals per table and op, and, with
/// `metrics_url`, compare the running daemon's counters with the ledger rows it wrote.
/// `Ok(true)` when everything checked agrees.
pub async fn verify_ledger(config: &Config, metrics_url: Option<&str>) -> Result<bool, Error> {
    use crate::sink::ledger::{self, MetricsCheck};
    let sink = config.sink.as_ref().ok_or_else(|| {
        Error::operator(format!(
            "{}: verify --ledger needs a [sink] section (the target)",
            config.path.display()
        ))
    })?;
    let consumer = &sink.consumer;
    let mut client = crate::pg::connect(&sink.url, "verify --ledger").await?;
    let Some(report) = ledger::check_chain(&mut client, consumer).await? else {
        println!("the target has no pgferry.ledger: no sink with ledger = true has run against it");
        return Ok(false);
    };
    let mut ok = true;
    if report.rows == 0 {
        println!("ledger of consumer {consumer:?}: no rows");
    }
    match report.breaks.first() {
        None if report.rows > 0 => println!(
            "ledger of consumer {consumer:?}: chain intact: {} batches (seq 1..{}), {} source transactions, \
             {} re-sent events skipped; last hash {}",
            report.rows, report.last_seq, report.transactions, report.skipped, report.last_hash
        ),
        None => {}
        Some(first) => {
            ok = false;
            println!(
                "ledger of consumer {consumer:?}: BROKEN at seq {}: {}",
                first.seq, first.what
            );
            for b in report.breaks.iter().skip(1).take(20) {
                println!("  also at seq {}: {}", b.seq, b.what);
            }
            if report.breaks.len() > 21 {
                println!("  … {} more", report.breaks.len() - 21);
            }
        }
    }
    println!("{:<40} {:>4} {:>14}", "table", "op", "events");
    for (table, ops) in &report.totals {
        for (op, n) in ops.iter().filter(|(_, n)| **n != 0) {
            println!("{table:<40} {op:>4} {n:>14}");
        }
    }
    match metrics_url {
        None => println!(
            "metrics: not compared (give --metrics URL of the running daemon to check the ledger against pgferry_sink_applied_total)"
        ),
        Some(url) => match ledger::compare_metrics(&client, consumer, url).await? {
            MetricsCheck::Agree(counts) => println!(
                "metrics: pgferry_sink_applied_total at {url} equals the ledger rows of this daemon's run ({} events)",
                counts.values().sum::<i64>()
            ),
            MetricsCheck::Differ(differ) => {
                ok = false;
                println!("metrics: pgferry_sink_applied_total at {url} DIFFERS from the ledger rows of this daemon's run:");
                for ((table, op), (l, m)) in differ {
                    println!("  {table} {op}: ledger {l}, metrics {m}");
                }
            }
            MetricsCheck::NoRun => {
                ok = false;
                println!("metrics: the daemon at {url} exports no pgferry_sink_ledger_run_info: it runs no sink, or one with ledger = false");
            }
            MetricsCheck::Moving => println!(
                "metrics: not compared: the daemon kept applying while the counters and the ledger were read; run it again once it is caught up"
            ),
        },
    }
    Ok(ok)
}
