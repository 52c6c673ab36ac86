//! Read-only commands: `pgferry schema` prints the Avro key and value schemas of the
//! configured tables as the Kafka stage derives them; `pgferry verify` compares source
//! and target tables by row count and an order-independent checksum; `pgferry verify
//! --ledger` checks the target's applied-transactions ledger (see `sink::ledger`).

use std::collections::HashMap;
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

/// Settings that make both sides print values the same way, and as the walsender
/// prints them, which is the text that transforms saw in the stream.
const CANONICAL_SESSION: &str = crate::source::snapshot::SESSION_SQL;

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

/// The [`fingerprint`] of a table with PHI transforms, computed here rather than in
/// SQL: the source's values go through the same transforms as in the stream (the HMAC
/// key never leaves pgferry, not even as a query parameter the server could log). Both
/// sides are read with `COPY` and hashed the same way, row by row, so memory stays
/// flat. `transforms[i]` applies to `columns[i]` (the target side passes none).
async fn fingerprint_streamed(
    client: &tokio_postgres::Client,
    table: &TableName,
    columns: &[String],
    filter: Option<&str>,
    transforms: &[Option<crate::event::Transform>],
    key: &[u8],
) -> Result<(i64, String), Error> {
    let key = crate::source::transform::HmacKey::new(key);
    use futures_util::StreamExt;
    use std::hash::{Hash, Hasher};
    let sql = format!(
        "copy (select {} from {}{}) to stdout",
        columns
            .iter()
            .map(|c| quote_ident(c))
            .collect::<Vec<_>>()
            .join(", "),
        table.quoted(),
        filter.map_or(String::new(), |w| format!(" where ({w})"))
    );
    let context = |e| Error::postgres(format!("reading {table} to checksum it"), e);
    let stream = client.copy_out(&sql).await.map_err(context)?;
    let mut stream = std::pin::pin!(stream);
    let (mut rows, mut sum) = (0i64, 0u64);
    let mut pending = bytes::BytesMut::new();
    let row_hash = |line: &[u8]| -> Result<u64, Error> {
        let fields = crate::source::snapshot::parse_copy_line(&bytes::Bytes::copy_from_slice(line))
            .map_err(|why| Error::fatal(format!("reading {table} to checksum it: {why}")))?;
        // DefaultHasher::new() has fixed keys: both sides hash alike in this process.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for (i, field) in fields.iter().enumerate() {
            let text = match field {
                crate::source::pgoutput::TupleValue::Text(b) => Some(b.as_ref()),
                _ => None,
            };
            let transformed = match (transforms.get(i).copied().flatten(), text) {
                (Some(t), Some(b)) => {
                    crate::source::transform::apply(t, &key, &String::from_utf8_lossy(b))
                        .map(String::into_bytes)
                }
                (_, b) => b.map(<[u8]>::to_vec),
            };
            transformed.hash(&mut h);
        }
        Ok(h.finish())
    };
    while let Some(chunk) = stream.next().await {
        pending.extend_from_slice(&chunk.map_err(context)?);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line = pending.split_to(end + 1);
            sum = sum.wrapping_add(row_hash(&line)?);
            rows += 1;
        }
    }
    Ok((rows, format!("{sum:016x}")))
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
        let streamed = !table.transform.is_empty();
        let (source_rows, source_sum) = if streamed {
            let transforms: Vec<_> = published
                .iter()
                .map(|c| table.transform.get(c).copied())
                .collect();
            let key = config.phi_key.as_ref().map_or(&[][..], |k| &k.0[..]);
            fingerprint_streamed(
                &source,
                &table.source,
                &published,
                table.row_filter.as_deref(),
                &transforms,
                key,
            )
            .await?
        } else {
            fingerprint(
                &source,
                &table.source,
                &published,
                table.row_filter.as_deref(),
            )
            .await?
        };
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
        let (target_rows, target_sum) = if streamed {
            fingerprint_streamed(&target, &table.target, &mapped, None, &[], &[]).await?
        } else {
            fingerprint(&target, &table.target, &mapped, None).await?
        };
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
    if config.sink.is_some() {
        lines.push(latency_line(config).await);
    }
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

/// The running daemon's end-to-end latency over the last minute, read from its
/// `/metrics` (the window lives in the process; see `sink::latency`).
async fn latency_line(config: &Config) -> String {
    let Some(listen) = &config.http_listen else {
        return "latency: unknown ([http] listen is off, so the daemon cannot be asked)".into();
    };
    // A wildcard listen address is reached on loopback.
    let authority = match listen.rsplit_once(':') {
        Some(("0.0.0.0" | "[::]" | "", port)) => format!("127.0.0.1:{port}"),
        _ => listen.clone(),
    };
    let url = format!("http://{authority}/metrics");
    let body = match tokio::time::timeout(std::time::Duration::from_secs(3), crate::http::get(&url))
        .await
    {
        Ok(Ok(body)) => body,
        Ok(Err(e)) => return format!("latency: unknown (is `pgferry run` up? {e})"),
        Err(_) => return format!("latency: unknown ({url} did not answer within 3 s)"),
    };
    let (mut recent, mut total) = (HashMap::new(), None);
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("pgferry_end_to_end_latency_recent_seconds{") {
            if let Some((labels, value)) = rest.rsplit_once('}') {
                let labels = crate::http::parse_labels(labels);
                if let (Some(q), Ok(v)) = (labels.get("quantile"), value.trim().parse::<f64>()) {
                    recent.insert(q.clone(), v);
                }
            }
        } else if let Some(v) = line.strip_prefix("pgferry_end_to_end_latency_seconds_count ") {
            total = v.trim().parse::<f64>().ok();
        }
    }
    let ms = |q: &str| {
        recent
            .get(q)
            .map_or("-".into(), |v| format!("{:.0} ms", v * 1e3))
    };
    match total {
        Some(n) if n > 0.0 && recent.is_empty() => {
            format!("latency: no change applied in the last minute; {n:.0} changes since start")
        }
        Some(n) if n > 0.0 => format!(
            "latency (source commit to target commit, last minute): p50 {}, p99 {}, max {}; {n:.0} changes since start",
            ms("0.5"),
            ms("0.99"),
            ms("1")
        ),
        _ => "latency: no change applied since the daemon started".into(),
    }
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
