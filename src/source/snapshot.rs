//! Snapshots: the configured tables' existing rows as `r` events, so that a target
//! starts complete, and any table can be copied again while the stream runs.
//!
//! Two methods (DESIGN §4, README "Snapshots"):
//! - **Initial**: on the first start the slot is created with an exported snapshot.
//!   Workers import it (`SET TRANSACTION SNAPSHOT`) and copy every table in ctid-range
//!   chunks with `COPY … TO STDOUT`, streaming rows into the event channel. Streaming
//!   starts from the slot's consistent point only after the copy is durable on Kafka,
//!   so every change of a key lands after its snapshot row. A table is recorded done
//!   once all its rows are durable; after a crash the exported snapshot is gone and the
//!   tables not done are copied by the incremental method instead.
//! - **Incremental** (`pgferry snapshot`, and resumed copies): key-ordered chunks read
//!   between a low and a high watermark, `pg_logical_emit_message` calls that travel
//!   in the WAL. The source drops from a chunk every key that changed in the stream
//!   between its watermarks (the stream carries the fresher row) and emits the rest
//!   inside the high watermark's transaction, so they take that place in the order.
//!   Progress (the last key) is recorded once the chunk is durable; a restart resumes
//!   after it.
//!
//! Positions (what the sink's exactly-once rule compares): initial rows are
//! `(consistent point − 1, n)` with `n` counting the table's rows in the order they
//! were handed to Kafka; incremental rows are `(high watermark commit LSN, ordinal)`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot, watch, Mutex};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::pgoutput::{Tuple, TupleValue};
use super::relation::{self, RelationCache, RelationState};
use super::Downstream;
use crate::config::Config;
use crate::error::Error;
use crate::event::{Change, Event, Op, Row, SnapshotMark, TableName};
use crate::lsn::Lsn;
use crate::metrics::metrics;
use crate::state::{Method, Phase, SnapshotState, TableSnapshot};
use crate::timestamp::PgTimestamp;

/// The prefix of watermark messages; their content is `<slot> low|high <id> <oid>`.
pub const WATERMARK_PREFIX: &str = "pgferry.watermark";
/// The prefix of `pgferry snapshot` requests; their content is JSON
/// `{"slot": …, "tables": ["schema.table", …]}`.
pub const SIGNAL_PREFIX: &str = "pgferry.signal";
/// The most bytes of row text one incremental chunk holds in memory; a chunk of
/// larger rows ends early.
const CHUNK_MAX_BYTES: usize = 32 << 20;
/// Rows a snapshot worker hands to the feed at once (under one lock); few enough that
/// the other workers' rows interleave finely and memory does not notice.
const FEED_ROWS: usize = 64;
const PROGRESS_LOG_EVERY: Duration = Duration::from_secs(5);

/// Session settings that make the text of every value what the walsender sends
/// (the replication connection's `options`), so snapshot rows and streamed changes of
/// the same value are the same bytes.
pub const SESSION_SQL: &str =
    "set DateStyle = ISO; set IntervalStyle = iso_8601; set TimeZone = UTC; \
     set extra_float_digits = 1; set bytea_output = hex; set lc_monetary = 'C'; \
     set client_encoding = UTF8; set statement_timeout = 0";

/// A snapshot request travelling in the WAL (see [`SIGNAL_PREFIX`]).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Signal {
    pub slot: String,
    pub tables: Vec<String>,
}

/// The key of `table` as it names a table in [`SnapshotState`].
pub fn state_key(table: &TableName) -> String {
    table.to_string()
}

/// The snapshot state a first start begins with: every configured table that takes
/// part, pending, by `method`.
pub fn fresh_state(config: &Config, method: Method) -> SnapshotState {
    let mut state = SnapshotState::default();
    if config.source.snapshot != crate::config::SnapshotMode::Initial {
        return state;
    }
    for t in config.tables.iter().filter(|t| t.snapshot) {
        state.tables.insert(
            state_key(&t.source),
            TableSnapshot {
                method,
                ..TableSnapshot::default()
            },
        );
    }
    state
}

/// Publish `pgferry_snapshot_tables{state}` from `state`.
pub fn publish_gauges(state: &SnapshotState) {
    let g = &metrics().snapshot_tables;
    for phase in [Phase::Pending, Phase::Copying, Phase::Done, Phase::Failed] {
        let n = state.tables.values().filter(|t| t.phase == phase).count();
        g.with_label_values(&[phase.as_str()]).set(n as i64);
    }
}

/// A connection for copying, with the walsender's text settings.
async fn connect(config: &Config, purpose: &str) -> Result<Client, Error> {
    let client = crate::pg::connect(&config.source.url, purpose).await?;
    client
        .batch_execute(SESSION_SQL)
        .await
        .map_err(|e| Error::postgres("preparing a snapshot connection", e))?;
    Ok(client)
}

/// The tables' schemas as the stream would describe them (exclusions, transforms,
/// key), read from the catalog.
async fn describe(
    catalog: &Client,
    config: &Config,
    oids: &HashMap<u32, TableName>,
    tables: &[TableName],
) -> Result<(RelationCache, Vec<(TableName, u32)>), Error> {
    let mut cache = RelationCache::new(oids.clone());
    let mut found = Vec::new();
    for name in tables {
        let Some(table) = config.table(name) else {
            continue;
        };
        let rel = relation::describe(catalog, table).await?;
        let oid = rel.oid;
        cache.update(catalog, config, rel).await?;
        found.push((name.clone(), oid));
    }
    Ok((cache, found))
}

/// The select list: every column the stream sends, in attribute order.
fn select_list(catalog_columns: &[String]) -> String {
    catalog_columns
        .iter()
        .map(|c| crate::event::quote_ident(c))
        .collect::<Vec<_>>()
        .join(", ")
}

async fn wire_columns(
    catalog: &Client,
    config: &Config,
    name: &TableName,
) -> Result<Vec<String>, Error> {
    let table = config
        .table(name)
        .ok_or_else(|| Error::operator(format!("table {name} is not configured")))?;
    let rel = relation::describe(catalog, table).await?;
    Ok(rel.columns.into_iter().map(|c| c.name).collect())
}

/// Split one line of `COPY … TO STDOUT` text format into a tuple. Fields without
/// escapes share the line's buffer (no copy per field). One pass finds both the field
/// ends and the escapes (with SIMD, as a third of the snapshot's parsing went to
/// scanning each field twice a byte at a time).
pub fn parse_copy_line(whole: &Bytes) -> Result<Tuple, String> {
    let line = whole.strip_suffix(b"\n").unwrap_or(whole);
    let mut out = Vec::with_capacity(16);
    let mut start = 0;
    loop {
        let rest = &line[start..];
        // The first tab or backslash: a backslash means this field has escapes, and
        // its end is the next tab after it.
        let first = memchr::memchr2(b'\t', b'\\', rest);
        let escaped = first.is_some_and(|i| rest[i] == b'\\');
        let end = if escaped {
            memchr::memchr(b'\t', rest)
        } else {
            first
        };
        let field = &rest[..end.unwrap_or(rest.len())];
        out.push(if !escaped {
            TupleValue::Text(whole.slice_ref(field))
        } else if field == b"\\N" {
            TupleValue::Null
        } else {
            TupleValue::Text(Bytes::from(unescape_copy_field(field)?))
        });
        match end {
            Some(i) => start += i + 1,
            None => break,
        }
    }
    Ok(out)
}

/// A COPY text field with its backslash escapes resolved.
fn unescape_copy_field(field: &[u8]) -> Result<Vec<u8>, String> {
    let mut v = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let b = field[i];
        if b != b'\\' {
            v.push(b);
            i += 1;
            continue;
        }
        let Some(&next) = field.get(i + 1) else {
            return Err("a COPY field ends in a lone backslash".into());
        };
        i += 2;
        v.push(match next {
            b'b' => 8,
            b'f' => 12,
            b'n' => b'\n',
            b'r' => b'\r',
            b't' => b'\t',
            b'v' => 11,
            b'0'..=b'7' => {
                // Up to three octal digits.
                let mut n = u32::from(next - b'0');
                for _ in 0..2 {
                    match field.get(i) {
                        Some(&d @ b'0'..=b'7') => {
                            n = n * 8 + u32::from(d - b'0');
                            i += 1;
                        }
                        _ => break,
                    }
                }
                n as u8
            }
            other => other,
        });
    }
    Ok(v)
}

/// The lines of a `COPY … TO STDOUT`, read as they arrive.
struct CopyLines {
    stream: std::pin::Pin<Box<tokio_postgres::CopyOutStream>>,
    pending: BytesMut,
    ended: bool,
}

impl CopyLines {
    async fn open(client: &Client, sql: &str) -> Result<Self, Error> {
        let stream = client
            .copy_out(sql)
            .await
            .map_err(|e| Error::postgres("starting a snapshot copy", e))?;
        Ok(CopyLines {
            stream: Box::pin(stream),
            pending: BytesMut::new(),
            ended: false,
        })
    }

    /// The next line, with its newline.
    async fn next(&mut self) -> Result<Option<Bytes>, Error> {
        loop {
            if let Some(end) = memchr::memchr(b'\n', &self.pending) {
                return Ok(Some(self.pending.split_to(end + 1).freeze()));
            }
            if self.ended {
                return Ok(None);
            }
            match self.stream.next().await {
                Some(chunk) => {
                    let chunk = chunk.map_err(|e| Error::postgres("reading a snapshot copy", e))?;
                    // The server sends one row per message: take it as it is.
                    if self.pending.is_empty()
                        && chunk.last() == Some(&b'\n')
                        && memchr::memchr(b'\n', &chunk[..chunk.len() - 1]).is_none()
                    {
                        return Ok(Some(chunk));
                    }
                    self.pending.extend_from_slice(&chunk);
                }
                None => self.ended = true,
            }
        }
    }
}

fn decode_row(
    state: &RelationState,
    line: &Bytes,
    skip: usize,
) -> Result<(Vec<Option<String>>, Row), Error> {
    let mut tuple = parse_copy_line(line).map_err(|why| {
        Error::fatal(format!(
            "table {}: a snapshot row cannot be read: {why}",
            state.schema.name
        ))
    })?;
    if tuple.len() < skip {
        return Err(Error::fatal(format!(
            "table {}: a snapshot row has {} fields",
            state.schema.name,
            tuple.len()
        )));
    }
    let raw_key = tuple
        .drain(..skip)
        .map(|v| match v {
            TupleValue::Text(b) => Some(String::from_utf8_lossy(&b).into_owned()),
            _ => None,
        })
        .collect();
    Ok((raw_key, state.row(tuple, false)?))
}

/// The ordinals and marks of initial-snapshot events, handed to the channel one at a
/// time so that both grow in channel (and so Kafka) order.
struct Feed {
    inner: Mutex<FeedInner>,
    position: Lsn,
    commit_ts: PgTimestamp,
}

struct FeedInner {
    down_events: mpsc::Sender<Event>,
    budget: Arc<crate::budget::ByteBudget>,
    ordinals: HashMap<u32, u32>,
    first_sent: bool,
    marks: Arc<AtomicU64>,
}

impl Feed {
    /// Send `rows` in order, each marked `true` but the last, which is marked `last`.
    /// One lock for the lot: taken per row, it cost more than the row's own send.
    async fn send(
        &self,
        state: &RelationState,
        rows: impl ExactSizeIterator<Item = Row>,
        last: SnapshotMark,
    ) -> Result<(), Error> {
        let count = rows.len();
        if count == 0 {
            return Ok(());
        }
        let mut inner = self.inner.lock().await;
        let ordinal = inner.ordinals.entry(state.schema.oid).or_insert(0);
        let first = *ordinal;
        *ordinal = u32::try_from(count)
            .ok()
            .and_then(|c| ordinal.checked_add(c))
            .ok_or_else(|| {
                Error::fatal(format!(
                    "table {} has more than {} rows: too many for one initial snapshot",
                    state.schema.name,
                    u32::MAX
                ))
            })?;
        for (i, row) in rows.enumerate() {
            let mut mark = if i + 1 == count {
                last
            } else {
                SnapshotMark::True
            };
            if !inner.first_sent {
                inner.first_sent = true;
                if mark == SnapshotMark::True {
                    mark = SnapshotMark::First;
                }
            }
            let event = Event::Snapshot(Change {
                op: Op::Read,
                table: state.schema.clone(),
                xid: 0,
                commit_lsn: self.position,
                lsn: self.position,
                ordinal: first + i as u32,
                commit_ts: self.commit_ts,
                prev_commit_end: self.position,
                before: None,
                after: Some(row),
                snapshot: mark,
            });
            inner.push(event).await?;
        }
        Ok(())
    }

    async fn mark(&self) -> Result<u64, Error> {
        let inner = self.inner.lock().await;
        let m = inner.marks.fetch_add(1, Ordering::AcqRel) + 1;
        inner.push(Event::Mark(m)).await?;
        Ok(m)
    }
}

impl FeedInner {
    /// Take the event's share of the byte budget (the Kafka stage gives back what each
    /// weighs) and hand it on.
    async fn push(&self, event: Event) -> Result<(), Error> {
        self.budget.take(&event).await;
        self.down_events
            .send(event)
            .await
            .map_err(|_| Error::fatal("the Kafka stage stopped during the initial snapshot"))
    }
}

/// One ctid range of a table (pages `[from, to)`; `to = None`: to the end).
#[derive(Debug, Clone)]
struct CtidChunk {
    table: usize,
    from: u64,
    to: Option<u64>,
}

/// Plan ctid chunks of about `chunk_rows` rows for each table.
async fn plan_chunks(
    catalog: &Client,
    oids: &[(TableName, u32)],
    chunk_rows: u64,
) -> Result<(Vec<CtidChunk>, Vec<i64>), Error> {
    let mut chunks = Vec::new();
    let mut estimates = Vec::new();
    for (i, (name, oid)) in oids.iter().enumerate() {
        let row = catalog
            .query_one(
                "select c.relkind::text, (pg_relation_size(c.oid) / current_setting('block_size')::bigint)::bigint, \
                        greatest(c.reltuples, 0)::bigint, greatest(c.relpages, 0)::bigint \
                 from pg_class c where c.oid = $1",
                &[oid],
            )
            .await
            .map_err(|e| Error::postgres(format!("sizing table {name} for its snapshot"), e))?;
        let kind: String = row.get(0);
        let pages: i64 = row.get(1);
        let tuples: i64 = row.get(2);
        let relpages: i64 = row.get(3);
        estimates.push(tuples);
        if kind != "r" || pages <= 1 {
            // Partitioned tables have no ctids of their own: one chunk.
            chunks.push(CtidChunk {
                table: i,
                from: 0,
                to: None,
            });
            continue;
        }
        let per_page = if tuples > 0 && relpages > 0 {
            (tuples / relpages).max(1)
        } else {
            50
        };
        let step = (chunk_rows / per_page as u64).max(1);
        let mut from = 0u64;
        while from + step < pages as u64 {
            chunks.push(CtidChunk {
                table: i,
                from,
                to: Some(from + step),
            });
            from += step;
        }
        chunks.push(CtidChunk {
            table: i,
            from,
            to: None,
        });
    }
    Ok((chunks, estimates))
}

/// What the initial copy needs from the source.
pub struct Initial<'a> {
    pub config: &'a Arc<Config>,
    pub catalog: &'a Client,
    pub table_oids: &'a HashMap<u32, TableName>,
    /// The name `CREATE_REPLICATION_SLOT … EXPORT_SNAPSHOT` returned, and the
    /// connection that keeps it alive until every worker imported it.
    pub snapshot_name: String,
    pub exporter: super::replication::ReplicationConn,
    /// The slot's consistent point.
    pub consistent_point: Lsn,
    /// The counter of snapshot marks (shared with the incremental snapshots after).
    pub marks: Arc<AtomicU64>,
}

/// Run the initial snapshot of the tables pending in `progress`, recording each table
/// done once its rows are durable. Returns when everything is durable.
pub async fn run_initial(
    init: Initial<'_>,
    down: &Downstream,
    progress: &Arc<watch::Sender<SnapshotState>>,
    shutdown: &CancellationToken,
) -> Result<(), Error> {
    let config = init.config;
    let names: Vec<TableName> = progress
        .borrow()
        .unfinished()
        .filter(|(_, t)| t.method == Method::Initial)
        .filter_map(|(k, _)| {
            config
                .tables
                .iter()
                .find(|t| state_key(&t.source) == *k)
                .map(|t| t.source.clone())
        })
        .collect();
    if names.is_empty() {
        init.exporter.close().await;
        return Ok(());
    }
    let (cache, tables) = describe(init.catalog, config, init.table_oids, &names).await?;
    let cache = Arc::new(cache);
    let mut columns = Vec::new();
    for (name, _) in &tables {
        columns.push(select_list(
            &wire_columns(init.catalog, config, name).await?,
        ));
    }
    let (chunks, estimates) =
        plan_chunks(init.catalog, &tables, config.source.snapshot_chunk_rows).await?;
    let workers = config.source.snapshot_workers.min(chunks.len()).max(1);
    tracing::info!(tables = tables.len(), chunks = chunks.len(), workers, consistent_point = %init.consistent_point,
        "initial snapshot: copying the configured tables before streaming");

    // Every worker imports the exported snapshot before the exporter lets it go.
    let mut clients = Vec::new();
    for i in 0..workers {
        let c = connect(config, "snapshot worker").await?;
        c.batch_execute(&format!(
            "begin isolation level repeatable read read only; set transaction snapshot '{}'",
            init.snapshot_name.replace('\'', "''")
        ))
        .await
        .map_err(|e| {
            Error::postgres(
                format!("snapshot worker {i} importing the slot's snapshot"),
                e,
            )
        })?;
        clients.push(c);
    }
    init.exporter.close().await;

    let position = Lsn(init.consistent_point.0.saturating_sub(1));
    let feed = Arc::new(Feed {
        inner: Mutex::new(FeedInner {
            down_events: down.events.clone(),
            budget: down.budget.clone(),
            ordinals: HashMap::new(),
            first_sent: false,
            marks: init.marks.clone(),
        }),
        position,
        commit_ts: PgTimestamp::now(),
    });
    let per_table_chunks: Vec<usize> = (0..tables.len())
        .map(|i| chunks.iter().filter(|c| c.table == i).count())
        .collect();
    let queue = Arc::new(std::sync::Mutex::new(VecDeque::from(chunks)));
    let remaining = Arc::new(AtomicUsize::new(queue.lock().map(|q| q.len()).unwrap_or(0)));
    let rows: Arc<Vec<AtomicU64>> =
        Arc::new((0..tables.len()).map(|_| AtomicU64::new(0)).collect());
    // (mark, table) of every finished chunk, for the progress below.
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(u64, usize)>();
    progress.send_modify(|s| {
        for (name, _) in &tables {
            if let Some(t) = s.tables.get_mut(&state_key(name)) {
                t.phase = Phase::Copying;
            }
        }
    });
    publish_gauges(&progress.borrow());

    let mut handles = tokio::task::JoinSet::new();
    for client in clients {
        let ctx = WorkerCtx {
            client,
            cache: cache.clone(),
            tables: tables.clone(),
            columns: columns.clone(),
            filters: tables
                .iter()
                .map(|(n, _)| config.table(n).and_then(|t| t.row_filter.clone()))
                .collect(),
            queue: queue.clone(),
            remaining: remaining.clone(),
            rows: rows.clone(),
            feed: feed.clone(),
            done: done_tx.clone(),
        };
        handles.spawn(ctx.run());
    }
    drop(done_tx);

    // Record tables as their chunks become durable; log progress meanwhile.
    let mut marks = down.marks.clone();
    let mut waiting: Vec<(u64, usize)> = Vec::new();
    let mut chunks_left = per_table_chunks.clone();
    let mut workers_done = false;
    let mut last_log = Instant::now();
    let started = Instant::now();
    loop {
        if workers_done && waiting.is_empty() && chunks_left.iter().all(|&n| n == 0) {
            break;
        }
        tokio::select! {
            _ = shutdown.cancelled() => {
                return Err(Error::transient("stopped during the initial snapshot; the tables not recorded done are copied again (incrementally) on the next start"));
            }
            joined = handles.join_next(), if !workers_done => match joined {
                None => workers_done = true,
                Some(r) => r
                    .map_err(|e| Error::fatal("a snapshot worker failed").with_source(e))
                    .and_then(|r| r)?,
            },
            Some(done) = done_rx.recv() => waiting.push(done),
            changed = marks.changed() => {
                if changed.is_err() {
                    return Err(Error::fatal("the Kafka stage stopped during the initial snapshot"));
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        let durable = *marks.borrow();
        let mut finished = Vec::new();
        waiting.retain(|&(m, table)| {
            if m <= durable {
                chunks_left[table] -= 1;
                if chunks_left[table] == 0 {
                    finished.push(table);
                }
                false
            } else {
                true
            }
        });
        if !finished.is_empty() || last_log.elapsed() >= PROGRESS_LOG_EVERY {
            progress.send_modify(|s| {
                for (i, (name, _)) in tables.iter().enumerate() {
                    if let Some(t) = s.tables.get_mut(&state_key(name)) {
                        t.rows = rows[i].load(Ordering::Relaxed);
                        t.chunks = (per_table_chunks[i] - chunks_left[i]) as u64;
                        if finished.contains(&i) {
                            t.phase = Phase::Done;
                        }
                    }
                }
            });
            publish_gauges(&progress.borrow());
            for &i in &finished {
                tracing::info!(table = %tables[i].0, rows = rows[i].load(Ordering::Relaxed), "initial snapshot: table done");
            }
        }
        if last_log.elapsed() >= PROGRESS_LOG_EVERY {
            last_log = Instant::now();
            let total: u64 = rows.iter().map(|r| r.load(Ordering::Relaxed)).sum();
            let estimate: i64 = estimates.iter().sum();
            tracing::info!(
                rows = total,
                estimate,
                seconds = started.elapsed().as_secs(),
                tables_done = chunks_left.iter().filter(|&&n| n == 0).count(),
                tables = tables.len(),
                "initial snapshot: copying"
            );
        }
        // A worker that ended (with the queue empty) and left no chunk waiting.
        if workers_done
            && done_rx.is_empty()
            && waiting.is_empty()
            && chunks_left.iter().any(|&n| n > 0)
        {
            return Err(Error::fatal("the initial snapshot lost track of a chunk"));
        }
    }
    let total: u64 = rows.iter().map(|r| r.load(Ordering::Relaxed)).sum();
    tracing::info!(
        rows = total,
        seconds = started.elapsed().as_secs_f64(),
        "initial snapshot done; streaming from the consistent point"
    );
    Ok(())
}

struct WorkerCtx {
    client: Client,
    cache: Arc<RelationCache>,
    tables: Vec<(TableName, u32)>,
    columns: Vec<String>,
    /// Row filters (`where`) by table.
    filters: Vec<Option<String>>,
    queue: Arc<std::sync::Mutex<VecDeque<CtidChunk>>>,
    remaining: Arc<AtomicUsize>,
    rows: Arc<Vec<AtomicU64>>,
    feed: Arc<Feed>,
    done: mpsc::UnboundedSender<(u64, usize)>,
}

impl WorkerCtx {
    async fn run(self) -> Result<(), Error> {
        loop {
            let chunk = self.queue.lock().ok().and_then(|mut q| q.pop_front());
            let Some(chunk) = chunk else { break };
            let (name, oid) = &self.tables[chunk.table];
            let state = self
                .cache
                .get(*oid)
                .ok_or_else(|| Error::fatal(format!("table {name} has no description")))?;
            let whole = chunk.from == 0 && chunk.to.is_none();
            let mut conditions = Vec::new();
            if !whole {
                conditions.push(format!("ctid >= '({},0)'::tid", chunk.from));
            }
            if let Some(to) = chunk.to {
                conditions.push(format!("ctid < '({to},0)'::tid"));
            }
            // The publication's row filter: the snapshot carries what the stream would.
            if let Some(w) = &self.filters[chunk.table] {
                conditions.push(format!("({w})"));
            }
            let filter = if conditions.is_empty() {
                String::new()
            } else {
                format!(" where {}", conditions.join(" and "))
            };
            // A whole table may be partitioned: the parent gathers its partitions.
            let sql = format!(
                "copy (select {} from {}{}{filter}) to stdout",
                self.columns[chunk.table],
                if whole { "" } else { "only " },
                name.quoted()
            );
            // Rows go to the feed a few at a time; one is always held back so that the
            // last row of the whole copy can say so.
            let mut pending: Vec<Row> = Vec::with_capacity(FEED_ROWS + 1);
            let mut n = 0u64;
            let context = |e: Error| e.context(format!("copying table {name}"));
            let mut lines = CopyLines::open(&self.client, &sql).await.map_err(context)?;
            while let Some(line) = lines.next().await.map_err(context)? {
                let (_, row) = decode_row(state, &line, 0)?;
                pending.push(row);
                if pending.len() > FEED_ROWS {
                    let held = pending.pop();
                    self.feed
                        .send(state, pending.drain(..), SnapshotMark::True)
                        .await?;
                    pending.extend(held);
                }
                n += 1;
            }
            let last = self.remaining.fetch_sub(1, Ordering::AcqRel) == 1;
            let mark = if last {
                SnapshotMark::Last
            } else {
                SnapshotMark::True
            };
            self.feed.send(state, pending.drain(..), mark).await?;
            self.rows[chunk.table].fetch_add(n, Ordering::Relaxed);
            metrics()
                .snapshot_rows
                .with_label_values(&[&name.to_string()])
                .inc_by(n);
            let m = self.feed.mark().await?;
            let _ = self.done.send((m, chunk.table));
        }
        let _ = self.client.batch_execute("commit").await;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------
// Incremental snapshots.

/// A row's key: the text of each key column.
pub type RowKey = Vec<Option<String>>;

/// A chunk read between watermarks, waiting for its high watermark in the stream.
pub struct Chunk {
    /// Its number in this run: chunks are read one at a time, in this order.
    pub seq: u64,
    /// The table as the rows were read.
    pub schema: Arc<crate::event::TableSchema>,
    pub rows: Vec<Row>,
    /// Told, once the rows were handed on, the mark that follows them. Dropped
    /// unanswered when the chunk cannot be emitted: its reader reads it again.
    pub emitted: oneshot::Sender<u64>,
}

/// The source session's side of incremental snapshots: watermark windows and the
/// keys that changed inside them.
pub struct Windows {
    slot: String,
    /// This run's watermarks carry it; others (an earlier run's, read again after a
    /// restart) are ignored.
    run: String,
    chunks: mpsc::Receiver<Chunk>,
    /// The open window: (chunk seq, table OID, keys changed in the stream since).
    open: Option<(u64, u32, HashSet<RowKey>)>,
    pending: Option<Chunk>,
}

/// A parsed watermark message.
#[derive(Debug, PartialEq, Eq)]
pub enum Watermark {
    Low { seq: u64, oid: u32 },
    High { seq: u64, oid: u32 },
}

impl Windows {
    pub fn new(slot: String, run: String, chunks: mpsc::Receiver<Chunk>) -> Self {
        Windows {
            slot,
            run,
            chunks,
            open: None,
            pending: None,
        }
    }

    /// A watermark of this slot and run, if `content` is one.
    pub fn parse(&self, content: &[u8]) -> Option<Watermark> {
        let text = std::str::from_utf8(content).ok()?;
        let mut parts = text.split(' ');
        if parts.next()? != self.slot {
            return None;
        }
        let kind = parts.next()?;
        let (run, seq) = parts.next()?.split_once('-')?;
        if run != self.run {
            return None;
        }
        let seq = seq.parse().ok()?;
        let oid = parts.next()?.parse().ok()?;
        match kind {
            "low" => Some(Watermark::Low { seq, oid }),
            "high" => Some(Watermark::High { seq, oid }),
            _ => None,
        }
    }

    pub fn low(&mut self, seq: u64, oid: u32) {
        self.open = Some((seq, oid, HashSet::new()));
        // Chunks before this one will never see their high watermark: let their
        // reader know (it reads them again), and make room for this one.
        if let Some(chunk) = self.take_chunk(seq) {
            self.pending = Some(chunk);
        }
    }

    /// The chunk `seq` if it is here; earlier ones are dropped, a later one is kept.
    fn take_chunk(&mut self, seq: u64) -> Option<Chunk> {
        loop {
            let chunk = match self.pending.take() {
                Some(c) => c,
                None => self.chunks.try_recv().ok()?,
            };
            if chunk.seq == seq {
                return Some(chunk);
            }
            if chunk.seq > seq {
                self.pending = Some(chunk);
                return None;
            }
        }
    }

    /// A streamed change of table `oid` with key `key`.
    pub fn changed(&mut self, oid: u32, key: impl FnOnce() -> Option<Vec<Option<String>>>) {
        if let Some((_, o, keys)) = self.open.as_mut() {
            if *o == oid {
                if let Some(k) = key() {
                    keys.insert(k);
                }
            }
        }
    }

    /// A truncate of table `oid` inside a window: every row of the chunk is stale.
    pub fn truncated(&mut self, oid: u32) {
        if self.open.as_ref().is_some_and(|(_, o, _)| *o == oid) {
            self.open = None;
        }
    }

    /// The high watermark `seq`: the chunk's rows that the stream did not change in
    /// the window. `None` when there is nothing to emit: a window not watched from its
    /// low watermark (a reconnect in between), whose chunk is then dropped and read
    /// again by its reader.
    pub fn high(&mut self, seq: u64) -> Option<(Chunk, Vec<Row>)> {
        let window = self.open.take();
        // The reader hands the chunk over before it writes the high watermark.
        let mut chunk = self.take_chunk(seq)?;
        let (open_seq, _, keys) = window?;
        if open_seq != seq {
            return None;
        }
        let rows = std::mem::take(&mut chunk.rows);
        let rows = rows
            .into_iter()
            .filter(|row| !keys.contains(&key_of(row, &chunk.schema.key)))
            .collect();
        Some((chunk, rows))
    }
}

/// The key of a row image: the text of each key column.
pub fn key_of(row: &Row, key: &[usize]) -> Vec<Option<String>> {
    key.iter()
        .map(|&i| match row.values.get(i) {
            Some(crate::event::Datum::Text(t)) => Some(t.as_str().to_string()),
            _ => None,
        })
        .collect()
}

/// What the incremental reader needs.
pub struct Incremental {
    pub config: Arc<Config>,
    pub table_oids: HashMap<u32, TableName>,
    pub slot: String,
    pub chunks: mpsc::Sender<Chunk>,
    pub progress: Arc<watch::Sender<SnapshotState>>,
    pub marks: watch::Receiver<u64>,
    pub shutdown: CancellationToken,
    /// This run's mark on its watermarks (see [`Windows`]).
    pub run: String,
}

/// A name for this run's watermarks.
pub fn run_id() -> String {
    format!(
        "{:x}",
        (PgTimestamp::now().0 as u64) ^ (u64::from(std::process::id()) << 40)
    )
}

/// Copy the unfinished tables in key-ordered chunks between watermarks, for as long
/// as the source runs; wait for a `pgferry snapshot` request when none is left.
/// Connection trouble is retried; a table that cannot be copied this way is marked
/// failed with the reason.
pub async fn run_incremental(inc: Incremental) {
    let mut wake = inc.progress.subscribe();
    let mut backoff = Duration::from_millis(500);
    let mut seq = 0u64;
    loop {
        let next = inc
            .progress
            .borrow()
            .unfinished()
            .map(|(k, _)| k.clone())
            .next();
        let Some(key) = next else {
            tokio::select! {
                _ = inc.shutdown.cancelled() => return,
                changed = wake.changed() => if changed.is_err() { return },
            }
            continue;
        };
        match copy_table(&inc, &key, &mut seq).await {
            Ok(()) => backoff = Duration::from_millis(500),
            Err(e) if inc.shutdown.is_cancelled() => {
                tracing::debug!(error = %e, "incremental snapshot stopped");
                return;
            }
            Err(e) if e.is_transient() => {
                tracing::warn!(table = %key, error = %e, retry_in_ms = backoff.as_millis() as u64,
                    "incremental snapshot interrupted; resuming from its last durable chunk");
                tokio::select! {
                    _ = inc.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
            Err(e) => {
                tracing::error!(table = %key, error = %e, "the table cannot be copied; it stays incomplete in the target until this is fixed and `pgferry snapshot` is run for it");
                crate::metrics::record_error("source", &e);
                inc.progress.send_modify(|s| {
                    if let Some(t) = s.tables.get_mut(&key) {
                        t.phase = Phase::Failed;
                        t.error = Some(e.to_string());
                    }
                });
                publish_gauges(&inc.progress.borrow());
            }
        }
    }
}

/// Why a table cannot be copied while streaming, if it cannot.
pub fn incremental_problem(state: &RelationState) -> Option<String> {
    state.schema.key.is_empty().then(|| {
        format!(
            "table {} has no primary key or other unique key (replica identity index, or `key` in its table file), \
             so it cannot be copied while the stream runs: a copied row could not be told from a changed one",
            state.schema.name
        )
    })
}

async fn copy_table(inc: &Incremental, key: &str, seq: &mut u64) -> Result<(), Error> {
    let config = &inc.config;
    let Some(table) = config.tables.iter().find(|t| state_key(&t.source) == key) else {
        // No longer configured: nothing to copy.
        inc.progress.send_modify(|s| {
            s.tables.remove(key);
        });
        return Ok(());
    };
    let name = table.source.clone();
    let client = connect(config, "incremental snapshot").await?;
    let (cache, found) = describe(
        &client,
        config,
        &inc.table_oids,
        std::slice::from_ref(&name),
    )
    .await?;
    let Some(&(_, oid)) = found.first() else {
        return Err(Error::operator(format!("table {name} is not configured")));
    };
    let state = cache
        .get(oid)
        .ok_or_else(|| Error::fatal(format!("table {name} has no description")))?;
    if let Some(why) = incremental_problem(state) {
        return Err(Error::operator(why)
            .with_hint("give the table a primary key, or set `key` in its table file"));
    }
    let key_names: Vec<String> = state
        .schema
        .key
        .iter()
        .map(|&i| state.schema.columns[i].name.clone())
        .collect();
    // The resume key is kept in the state topic only when it is not PHI.
    let persist_key = state
        .schema
        .key
        .iter()
        .all(|&i| state.schema.columns[i].transform.is_none());
    let key_types: Vec<String> = {
        let mut types = Vec::new();
        for k in &key_names {
            let row = client
                .query_one(
                    "select format_type(atttypid, null) from pg_attribute where attrelid = $1 and attname = $2",
                    &[&oid, k],
                )
                .await
                .map_err(|e| Error::postgres(format!("reading the key of {name}"), e))?;
            types.push(row.get(0));
        }
        types
    };
    let quoted_keys = key_names
        .iter()
        .map(|k| crate::event::quote_ident(k))
        .collect::<Vec<_>>()
        .join(", ");
    let columns = select_list(&wire_columns(&client, config, &name).await?);
    let mut last_key: Option<Vec<Option<String>>> = {
        let s = inc.progress.borrow();
        let t = s.tables.get(key);
        if t.is_some_and(|t| t.phase == Phase::Pending || t.method == Method::Initial) {
            None
        } else if persist_key {
            t.and_then(|t| t.last_key.clone())
        } else {
            None
        }
    };
    inc.progress.send_modify(|s| {
        if let Some(t) = s.tables.get_mut(key) {
            if t.phase == Phase::Pending || t.method == Method::Initial {
                t.rows = 0;
                t.chunks = 0;
                t.last_key = None;
            }
            t.phase = Phase::Copying;
            t.method = Method::Incremental;
            t.error = None;
        }
    });
    publish_gauges(&inc.progress.borrow());
    tracing::info!(table = %name, resume_after_key = last_key.is_some(), "incremental snapshot: copying");
    let limit = config.source.snapshot_chunk_rows;
    let mut last_log = Instant::now();
    loop {
        *seq += 1;
        let this = *seq;
        let emit = |kind: &str| format!("{} {kind} {}-{this} {oid}", inc.slot, inc.run);
        client
            .execute(
                "select pg_logical_emit_message(true, $1::text, $2::text)",
                &[&WATERMARK_PREFIX, &emit("low")],
            )
            .await
            .map_err(|e| Error::postgres("writing a snapshot watermark", e))?;
        let filter = match &last_key {
            None => String::new(),
            Some(k) => {
                let literals = k
                    .iter()
                    .zip(&key_types)
                    .map(|(v, ty)| match v {
                        Some(v) => format!("'{}'::{ty}", v.replace('\'', "''")),
                        None => format!("null::{ty}"),
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                format!(" where ({quoted_keys}) > ({literals})")
            }
        };
        // The publication's row filter: the copy carries what the stream would.
        let filter = match (&table.row_filter, filter.is_empty()) {
            (Some(w), true) => format!(" where ({w})"),
            (Some(w), false) => format!("{filter} and ({w})"),
            (None, _) => filter,
        };
        let sql = format!(
            "copy (select {quoted_keys}, {columns} from {}{filter} order by {quoted_keys} limit {limit}) to stdout",
            name.quoted()
        );
        let mut rows = Vec::new();
        let mut bytes = 0usize;
        let mut read = 0u64;
        let mut capped = false;
        let mut chunk_last: Option<Vec<Option<String>>> = None;
        let context = |e: Error| e.context(format!("copying table {name}"));
        let mut lines = CopyLines::open(&client, &sql).await.map_err(context)?;
        while let Some(line) = lines.next().await.map_err(context)? {
            read += 1;
            if capped {
                continue;
            }
            let (raw, row) = decode_row(state, &line, key_names.len())?;
            bytes += line.len();
            rows.push(row);
            chunk_last = Some(raw);
            if bytes > CHUNK_MAX_BYTES {
                capped = true;
            }
        }
        let finished = read < limit && !capped;
        // Handed over before the high watermark is written, so that the source has it
        // when the watermark arrives.
        let (emitted_tx, emitted_rx) = oneshot::channel();
        let n = rows.len() as u64;
        let chunk = Chunk {
            seq: this,
            schema: state.schema.clone(),
            rows,
            emitted: emitted_tx,
        };
        if inc.chunks.send(chunk).await.is_err() {
            return Err(Error::transient("the source stopped"));
        }
        client
            .execute(
                "select pg_logical_emit_message(true, $1::text, $2::text)",
                &[&WATERMARK_PREFIX, &emit("high")],
            )
            .await
            .map_err(|e| Error::postgres("writing a snapshot watermark", e))?;
        let mark = tokio::select! {
            m = emitted_rx => m,
            _ = inc.shutdown.cancelled() => return Err(Error::transient("stopping")),
        };
        let Ok(mark) = mark else {
            // Its window was not watched whole (a reconnect): read it again.
            tracing::debug!(table = %name, chunk = this, "snapshot chunk dropped; reading it again");
            continue;
        };
        let mut marks = inc.marks.clone();
        loop {
            if *marks.borrow_and_update() >= mark {
                break;
            }
            tokio::select! {
                changed = marks.changed() => if changed.is_err() { return Err(Error::transient("the Kafka stage stopped")) },
                _ = inc.shutdown.cancelled() => return Err(Error::transient("stopping")),
            }
        }
        if chunk_last.is_some() {
            last_key = chunk_last;
        }
        metrics().snapshot_rows.with_label_values(&[key]).inc_by(n);
        let mut restarted = false;
        inc.progress.send_modify(|s| {
            if let Some(t) = s.tables.get_mut(key) {
                if t.phase == Phase::Pending {
                    // Asked for again meanwhile: start over.
                    restarted = true;
                    return;
                }
                t.rows += n;
                t.chunks += 1;
                t.last_key = if persist_key { last_key.clone() } else { None };
                if finished {
                    t.phase = Phase::Done;
                }
            }
        });
        if restarted {
            tracing::info!(table = %name, "incremental snapshot requested again; starting over");
            return Ok(());
        }
        if last_log.elapsed() >= PROGRESS_LOG_EVERY || finished {
            last_log = Instant::now();
            let rows = inc.progress.borrow().tables.get(key).map_or(0, |t| t.rows);
            tracing::info!(table = %name, rows, done = finished, "incremental snapshot: progress");
        }
        if finished {
            publish_gauges(&inc.progress.borrow());
            return Ok(());
        }
    }
}

/// `pgferry snapshot`: ask the running daemon to copy `tables` again, by a message in
/// the WAL that reaches it in order with the changes (no table on the EHR needed).
/// Checks first that each table is configured, takes part in snapshots, and has a key.
/// Returns the request's LSN.
pub async fn request(config: &Config, tables: &[String]) -> Result<Lsn, Error> {
    let catalog = crate::pg::connect(&config.source.url, "snapshot request").await?;
    let mut names = Vec::new();
    for t in tables {
        let name = match t.split_once('.') {
            Some((schema, table)) => TableName::new(schema, table),
            None => TableName::new("public", t.as_str()),
        };
        let Some(table) = config.table(&name) else {
            return Err(Error::operator(format!(
                "table {name} is not configured in {}: pgferry copies only configured tables",
                config.path.display()
            ))
            .with_hint("add a table file for it (and restart pgferry), or check the spelling: schema.table"));
        };
        if !table.snapshot {
            return Err(Error::operator(format!(
                "{}: table {name} has snapshot = false",
                table.origin.display()
            )));
        }
        let oids: HashMap<u32, TableName> = HashMap::new();
        let (cache, found) = describe(&catalog, config, &oids, std::slice::from_ref(&name)).await?;
        if let Some(state) = found.first().and_then(|(_, oid)| cache.get(*oid)) {
            if let Some(why) = incremental_problem(state) {
                return Err(Error::operator(why).with_hint(
                    "give the table a primary key or a replica identity index, or set `key` in its table file",
                ));
            }
        }
        names.push(state_key(&name));
    }
    let signal = serde_json::to_string(&Signal {
        slot: config.source.slot.clone(),
        tables: names,
    })
    .map_err(|e| Error::fatal("encoding the snapshot request").with_source(e))?;
    let row = catalog
        .query_one(
            "select pg_logical_emit_message(true, $1::text, $2::text)::text",
            &[&SIGNAL_PREFIX, &signal],
        )
        .await
        .map_err(|e| Error::postgres("writing the snapshot request into the WAL", e))?;
    let lsn: String = row.get(0);
    lsn.parse()
        .map_err(|e| Error::fatal(format!("the request's LSN {lsn}")).with_source(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The straightforward reading of a COPY text line: split at tabs, then resolve
    /// each field's escapes. [`parse_copy_line`] must agree with it on every line.
    fn reference(whole: &Bytes) -> Result<Vec<Option<Vec<u8>>>, String> {
        let line = whole.strip_suffix(b"\n").unwrap_or(whole);
        line.split(|&b| b == b'\t')
            .map(|field| match field {
                b"\\N" => Ok(None),
                _ => unescape_copy_field(field).map(Some),
            })
            .collect()
    }

    fn plain(tuple: Tuple) -> Vec<Option<Vec<u8>>> {
        tuple
            .into_iter()
            .map(|v| match v {
                TupleValue::Text(b) => Some(b.to_vec()),
                TupleValue::Null => None,
                other => panic!("a COPY line gave {other:?}"),
            })
            .collect()
    }

    #[test]
    fn copy_lines_split_and_unescape_as_the_plain_reading_does() {
        for line in [
            &b""[..],
            b"\n",
            b"1\tMargaret Smith\t\\N\n",
            b"\t\t",
            b"a\\tb\tc\\\\d\t\\N\t\\Nx\t\\101\\7\\0a\n",
            b"ends in a lone backslash\\",
        ] {
            let whole = Bytes::copy_from_slice(line);
            assert_eq!(
                parse_copy_line(&whole).map(plain),
                reference(&whole),
                "{line:?}"
            );
        }
        // Random lines over the bytes that matter (tab, backslash, N, digits, newline
        // inside a field's escape) and a few others.
        let alphabet = b"\t\\N017ntrbfvx \xc3\xa9";
        let mut state = 0x9E37_79B9_7F4A_7C15_u64;
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 24) as usize;
            let mut line: Vec<u8> = (0..len)
                .map(|i| alphabet[((state >> (i % 8 * 8)) as usize + i) % alphabet.len()])
                .collect();
            if state & 1 == 0 {
                line.push(b'\n');
            }
            let whole = Bytes::from(line.clone());
            assert_eq!(
                parse_copy_line(&whole).map(plain),
                reference(&whole),
                "{line:?}"
            );
        }
    }
}
