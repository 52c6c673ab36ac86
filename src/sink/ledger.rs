//! The applied-transactions ledger: `pgferry.ledger` in the target, one row per batch
//! the sink commits, written in the same target transaction as the batch's rows and
//! checkpoints (so it can never disagree with them, whatever crashes), and chained by
//! SHA-256 so that a changed or deleted row shows.
//!
//! ```text
//! batch ──▶ rows + checkpoints + ledger row (seq n, prev_hash = hash of n-1) ──▶ commit
//! ```
//!
//! A row records the source transactions it holds (`txs`: xid, commit LSN and commit
//! time of each), the events it applied per table and op (`counts`, with `dlq` for
//! dead-lettered events), the re-sent events it passed over (`skipped`), the target
//! transaction (`target_xid`) and time (`applied_at`), and the process that wrote it
//! (`run_id`, which `/metrics` exports too, so "since this daemon started" is exact).
//! A batch of only tombstones gets its row too (empty `txs` and `counts`), so every
//! transaction that moves a checkpoint is named here.
//!
//! The hash is computed by the target server, in the insert, from the stored values:
//! `hash = encode(sha256(convert_to(prev_hash || canonical, 'UTF8')), 'hex')` with
//! `canonical` = [`CANONICAL`]. An auditor recomputes it with the same plain SQL; no
//! extension is needed (`sha256(bytea)` is built in since PostgreSQL 11). The previous
//! row is read under a per-consumer advisory transaction lock, so two sinks of one
//! consumer group cannot fork the chain: the second waits for the first to commit.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use tokio_postgres::{Client, Transaction};

use crate::error::Error;
use crate::event::{Op, TableName};
use crate::lsn::Lsn;
use crate::timestamp::PgTimestamp;

use super::decode::SinkEvent;
use super::statements::Statements;

pub const DDL: &str = "begin; select pg_advisory_xact_lock(7012202611);
create schema if not exists pgferry;
create table if not exists pgferry.ledger (
  consumer text not null,
  seq bigint not null,
  run_id text not null,
  txs jsonb not null,
  counts jsonb not null,
  skipped bigint not null,
  target_xid bigint not null,
  applied_at timestamptz not null,
  prev_hash text not null,
  hash text not null,
  primary key (consumer, seq)
);
commit";

/// The canonical text of a ledger row (without `prev_hash` and `hash`), as an SQL
/// expression over its columns. A jsonb array: fixed field order, jsonb's own
/// rendering (object keys sorted, strings escaped), and the time in UTC with
/// microseconds, so it does not depend on the session's TimeZone or DateStyle.
pub const CANONICAL: &str =
    "jsonb_build_array(consumer, seq, run_id, txs, counts, skipped, target_xid, \
     to_char(applied_at at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'))::text";

/// The first row's `prev_hash`.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// `hash` of a row, as an SQL expression over its columns.
fn hash_expr() -> String {
    format!("encode(sha256(convert_to(prev_hash || {CANONICAL}, 'UTF8')), 'hex')")
}

/// Ops as the ledger counts them: the event's own op letter, and `dlq`.
const OPS: [&str; 6] = ["c", "u", "d", "r", "t", "dlq"];

/// This process's run id: 128 random bits in hex, the same for every ledger row it
/// writes and in `pgferry_sink_ledger_run_info{run_id}`.
pub fn run_id() -> &'static str {
    static RUN: OnceLock<String> = OnceLock::new();
    RUN.get_or_init(|| {
        use ring::rand::SecureRandom;
        let mut bytes = [0u8; 16];
        if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
            // No OS randomness: time and pid still tell runs apart.
            let now = PgTimestamp::now().0 as u128;
            bytes = ((now << 32) | u128::from(std::process::id())).to_be_bytes();
        }
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    })
}

pub async fn ensure_table(client: &Client) -> Result<(), Error> {
    client
        .batch_execute(DDL)
        .await
        .map_err(|e| Error::postgres("creating the ledger table pgferry.ledger in the target", e))
}

/// What one batch did, gathered while it is planned.
#[derive(Debug, Default)]
pub struct Entry {
    /// By commit LSN (which names a source transaction): xid, commit time (µs since
    /// the Unix epoch; unknown for an event that was dead-lettered undecoded).
    txs: BTreeMap<Lsn, (Option<u32>, Option<i64>)>,
    /// By the table's name as the ledger writes it (and its parsed form, to find it).
    counts: BTreeMap<String, (TableName, [u64; OPS.len()])>,
    skipped: u64,
}

/// The `pgferry.xid` header (absent from events of earlier pgferry versions).
fn xid(headers: &[super::decode::Header]) -> Option<u32> {
    headers
        .iter()
        .find(|(k, _)| &**k == "pgferry.xid")
        .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse().ok())
}

impl Entry {
    /// An event applied to the target.
    pub fn applied(&mut self, headers: &[super::decode::Header], event: &SinkEvent) {
        let op = match event.op {
            Op::Create => 0,
            Op::Update => 1,
            Op::Delete => 2,
            Op::Read => 3,
            Op::Truncate => 4,
        };
        // The name is formatted once per table, not per event.
        let counts = match self.counts.iter_mut().find(|(_, (t, _))| *t == event.table) {
            Some((_, (_, c))) => c,
            None => {
                &mut self
                    .counts
                    .entry(event.table.to_string())
                    .or_insert_with(|| (event.table.clone(), [0; OPS.len()]))
                    .1
            }
        };
        counts[op] += 1;
        let tx = self.txs.entry(event.position.0).or_default();
        if tx.0.is_none() {
            tx.0 = xid(headers);
        }
        tx.1 = Some(event.commit_ts_us);
    }

    /// An event sent to the dead-letter topic (its table named by the caller; it may
    /// not have decoded).
    pub fn dead_lettered(&mut self, table: &str, headers: &[super::decode::Header]) {
        self.counts
            .entry(table.to_string())
            .or_insert_with(|| (TableName::new("", ""), [0; OPS.len()]))
            .1[5] += 1;
        if let Ok((lsn, _)) = super::decode::position(headers) {
            let tx = self.txs.entry(lsn).or_default();
            tx.0 = tx.0.or(xid(headers));
        }
    }

    /// A re-sent event, already applied, passed over.
    pub fn skipped(&mut self) {
        self.skipped += 1;
    }

    fn txs_json(&self) -> String {
        let txs: Vec<serde_json::Value> = self
            .txs
            .iter()
            .map(|(lsn, (xid, ts))| {
                serde_json::json!({
                    "xid": xid,
                    "commit_lsn": lsn.to_string(),
                    "commit_ts": ts.map(|us| PgTimestamp(us - PgTimestamp(0).unix_micros()).to_string()),
                })
            })
            .collect();
        serde_json::Value::Array(txs).to_string()
    }

    fn counts_json(&self) -> String {
        let map: serde_json::Map<String, serde_json::Value> = self
            .counts
            .iter()
            .map(|(table, n)| {
                let ops: serde_json::Map<String, serde_json::Value> = OPS
                    .iter()
                    .zip(&n.1)
                    .map(|(op, n)| (op.to_string(), (*n).into()))
                    .collect();
                (table.clone(), ops.into())
            })
            .collect();
        serde_json::Value::Object(map).to_string()
    }
}

/// Append `entry` to `consumer`'s chain inside the batch's transaction.
pub async fn write(
    tx: &Transaction<'_>,
    statements: &mut Statements,
    consumer: &str,
    entry: &Entry,
) -> Result<(), tokio_postgres::Error> {
    static INSERT: OnceLock<String> = OnceLock::new();
    let insert = INSERT.get_or_init(|| {
        format!(
            "with prev as (
               select seq, hash from pgferry.ledger where consumer = $1 order by seq desc limit 1
             ), rec as (
               select $1::text as consumer, coalesce((select seq from prev), 0) + 1 as seq,
                      $2::text as run_id, $3::text::jsonb as txs, $4::text::jsonb as counts,
                      $5::bigint as skipped, txid_current() as target_xid,
                      clock_timestamp() as applied_at,
                      coalesce((select hash from prev), '{GENESIS}') as prev_hash
             )
             insert into pgferry.ledger
               (consumer, seq, run_id, txs, counts, skipped, target_xid, applied_at, prev_hash, hash)
             select consumer, seq, run_id, txs, counts, skipped, target_xid, applied_at, prev_hash, {}
             from rec",
            hash_expr()
        )
    });
    // Held to commit: the next row of this chain waits for this one.
    let lock = statements
        .get(
            tx,
            "select pg_advisory_xact_lock(hashtextextended('pgferry.ledger/' || $1, 0))",
        )
        .await?;
    let insert = statements.get(tx, insert).await?;
    let skipped = entry.skipped as i64;
    let (txs, counts) = (entry.txs_json(), entry.counts_json());
    // One round trip: the server takes the lock before it reads the chain's last row.
    futures_util::future::try_join(
        tx.execute(&lock, &[&consumer]),
        tx.execute(&insert, &[&consumer, &run_id(), &txs, &counts, &skipped]),
    )
    .await
    .map(|_| ())
}

/// One broken link of the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Break {
    /// The sequence number of the row at fault (for a gap: the first missing one).
    pub seq: i64,
    pub what: String,
}

/// What walking a consumer's chain found.
#[derive(Debug, Default)]
pub struct ChainReport {
    pub rows: u64,
    pub transactions: u64,
    pub skipped: i64,
    pub last_seq: i64,
    pub last_hash: String,
    /// table -> op -> events, over every row.
    pub totals: BTreeMap<String, BTreeMap<String, i64>>,
    /// In chain order; empty when intact.
    pub breaks: Vec<Break>,
}

/// Rows read per round trip while walking the chain (memory stays flat).
const FETCH_ROWS: usize = 5000;

/// Walk `consumer`'s chain in order: every row's hash recomputed by the server from its
/// stored values, every `prev_hash` compared with the row before, sequence numbers
/// without gaps from 1. `Ok(None)` when the target has no ledger table.
pub async fn check_chain(
    client: &mut Client,
    consumer: &str,
) -> Result<Option<ChainReport>, Error> {
    let pg = |e| Error::postgres("reading pgferry.ledger", e);
    let exists: Option<String> = client
        .query_one("select to_regclass('pgferry.ledger')::text", &[])
        .await
        .map_err(pg)?
        .get(0);
    if exists.is_none() {
        return Ok(None);
    }
    let tx = client.transaction().await.map_err(pg)?;
    tx.execute(
        &format!(
            "declare chain no scroll cursor for
             select seq, prev_hash, hash, {} as recomputed, counts::text, skipped,
                    jsonb_array_length(txs)
             from pgferry.ledger where consumer = $1 order by seq",
            hash_expr()
        ),
        &[&consumer],
    )
    .await
    .map_err(pg)?;
    let mut report = ChainReport {
        last_hash: GENESIS.to_string(),
        ..ChainReport::default()
    };
    loop {
        let rows = tx
            .query(&format!("fetch {FETCH_ROWS} from chain"), &[])
            .await
            .map_err(pg)?;
        for r in &rows {
            let seq: i64 = r.get(0);
            let prev_hash: String = r.get(1);
            let hash: String = r.get(2);
            let recomputed: String = r.get(3);
            let counts: String = r.get(4);
            let skipped: i64 = r.get(5);
            let txs: i32 = r.get(6);
            let expected = report.last_seq + 1;
            if seq != expected {
                report.breaks.push(Break {
                    seq: expected,
                    what: if seq == expected + 1 {
                        format!("row {expected} is missing (deleted): the chain goes from {} to {seq}", report.last_seq)
                    } else {
                        format!(
                            "rows {expected}..{} are missing (deleted): the chain goes from {} to {seq}",
                            seq - 1,
                            report.last_seq
                        )
                    },
                });
            } else if prev_hash != report.last_hash {
                report.breaks.push(Break {
                    seq,
                    what: format!(
                        "prev_hash {prev_hash} is not the hash {} of row {}: a row was changed and re-hashed, or rows were replaced",
                        report.last_hash, report.last_seq
                    ),
                });
            }
            if hash != recomputed {
                report.breaks.push(Break {
                    seq,
                    what: format!(
                        "hash mismatch: stored {hash}, recomputed from the row's values {recomputed}: the row was changed after it was written"
                    ),
                });
            }
            match serde_json::from_str::<BTreeMap<String, BTreeMap<String, i64>>>(&counts) {
                Ok(c) => {
                    for (table, ops) in c {
                        let t = report.totals.entry(table).or_default();
                        for (op, n) in ops {
                            *t.entry(op).or_default() += n;
                        }
                    }
                }
                Err(_) => report.breaks.push(Break {
                    seq,
                    what: "counts is not an object of tables to op counts".into(),
                }),
            }
            report.rows += 1;
            report.transactions += txs.max(0) as u64;
            report.skipped += skipped;
            report.last_seq = seq;
            report.last_hash = hash;
        }
        if rows.len() < FETCH_ROWS {
            break;
        }
    }
    tx.commit().await.map_err(pg)?;
    Ok(Some(report))
}

/// How the ledger's rows of the daemon's run compare with its counters.
#[derive(Debug)]
pub enum MetricsCheck {
    /// The counters equal the ledger's counts: (table, op) -> n.
    Agree(BTreeMap<(String, String), i64>),
    /// They differ: (table, op) -> (ledger, metrics).
    Differ(BTreeMap<(String, String), (i64, i64)>),
    /// The daemon at the URL writes no ledger (no run id in its metrics).
    NoRun,
    /// The daemon kept applying while the two were read.
    Moving,
}

/// Compare the ledger rows written by the daemon whose `/metrics` is at `url` (found
/// by its run id) with its `pgferry_sink_applied_total`. Ledger `c` and `r` are both
/// the counter's `c`; dead-lettered events are not in that counter. The counters are
/// read before and after the ledger: a daemon that moved in between is read again.
pub async fn compare_metrics(
    client: &Client,
    consumer: &str,
    url: &str,
) -> Result<MetricsCheck, Error> {
    for _ in 0..10 {
        let before = scrape(url).await?;
        let Some(run) = before.run_id.clone() else {
            return Ok(MetricsCheck::NoRun);
        };
        let rows = client
            .query(
                "select t.key, o.key, sum(o.value::bigint)::bigint
                 from pgferry.ledger l, jsonb_each(l.counts) t, jsonb_each_text(t.value) o
                 where l.consumer = $1 and l.run_id = $2 group by 1, 2",
                &[&consumer, &run],
            )
            .await
            .map_err(|e| Error::postgres("reading pgferry.ledger", e))?;
        let after = scrape(url).await?;
        if after.applied != before.applied || after.run_id != before.run_id {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            continue;
        }
        let mut ledger: BTreeMap<(String, String), i64> = BTreeMap::new();
        for r in rows {
            let op: String = r.get(1);
            let op = match op.as_str() {
                "r" => "c".to_string(),
                "dlq" => continue,
                _ => op,
            };
            *ledger.entry((r.get(0), op)).or_default() += r.get::<_, i64>(2);
        }
        ledger.retain(|_, n| *n != 0);
        let mut metrics = before.applied;
        metrics.retain(|_, n| *n != 0);
        if ledger == metrics {
            return Ok(MetricsCheck::Agree(ledger));
        }
        let mut differ = BTreeMap::new();
        for k in ledger.keys().chain(metrics.keys()) {
            let (l, m) = (
                ledger.get(k).copied().unwrap_or(0),
                metrics.get(k).copied().unwrap_or(0),
            );
            if l != m {
                differ.insert(k.clone(), (l, m));
            }
        }
        return Ok(MetricsCheck::Differ(differ));
    }
    Ok(MetricsCheck::Moving)
}

#[derive(Debug, Default)]
struct Scrape {
    run_id: Option<String>,
    applied: BTreeMap<(String, String), i64>,
}

/// GET `url` (plain `http://host:port/path`) and pick out the run id and
/// `pgferry_sink_applied_total`.
async fn scrape(url: &str) -> Result<Scrape, Error> {
    let body = crate::http::get(url)
        .await
        .map_err(|e| e.context("--metrics"))?;
    Ok(parse_metrics(&body))
}

fn parse_metrics(body: &str) -> Scrape {
    let mut out = Scrape::default();
    for line in body.lines() {
        let Some((name, rest)) = line.split_once('{') else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once('}') else {
            continue;
        };
        let labels = crate::http::parse_labels(labels);
        match name {
            "pgferry_sink_ledger_run_info" => {
                out.run_id = labels.get("run_id").cloned();
            }
            "pgferry_sink_applied_total" => {
                let n = value.trim().parse::<f64>().unwrap_or(0.0) as i64;
                if let (Some(t), Some(o)) = (labels.get("table"), labels.get("op")) {
                    out.applied.insert((t.clone(), o.clone()), n);
                }
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_text_gives_run_id_and_applied_counts() {
        let text = "# HELP x\n\
            pgferry_sink_applied_total{op=\"c\",table=\"public.a\"} 3\n\
            pgferry_sink_applied_total{op=\"u\",table=\"we\\\"ird.t\"} 1e0\n\
            pgferry_sink_ledger_run_info{run_id=\"abc\"} 1\n\
            pgferry_errors_total{kind=\"x\",stage=\"sink\"} 2\n";
        let s = parse_metrics(text);
        assert_eq!(s.run_id.as_deref(), Some("abc"));
        assert_eq!(s.applied[&("public.a".into(), "c".into())], 3);
        assert_eq!(s.applied[&("we\"ird.t".into(), "u".into())], 1);
        assert_eq!(s.applied.len(), 2);
    }

    #[test]
    fn entry_json_is_per_transaction_and_per_table_op() {
        let mut e = Entry::default();
        assert_eq!(e.counts_json(), "{}");
        let headers: Vec<crate::sink::decode::Header> = vec![
            ("pgferry.commit_lsn".into(), b"0/10".to_vec()),
            ("pgferry.ordinal".into(), b"0".to_vec()),
            ("pgferry.xid".into(), b"771".to_vec()),
        ];
        e.dead_lettered("public.p", &headers);
        e.skipped();
        let counts: serde_json::Value = serde_json::from_str(&e.counts_json()).unwrap();
        assert_eq!(counts["public.p"]["dlq"], 1);
        assert_eq!(counts["public.p"]["c"], 0);
        let txs: serde_json::Value = serde_json::from_str(&e.txs_json()).unwrap();
        assert_eq!(txs[0]["xid"], 771);
        assert_eq!(txs[0]["commit_lsn"], "0/10");
        assert!(txs[0]["commit_ts"].is_null());
    }
}
