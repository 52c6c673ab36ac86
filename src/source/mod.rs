//! The source stage: reads the EHR database's logical replication slot and hands
//! committed transactions, change by change, to the next stage.
//!
//! ```text
//!  PostgreSQL walsender ──XLogData/keepalive──▶ replication ──▶ pgoutput::decode
//!        ▲                                                          │
//!        │ status (flush = confirmable LSN)            relation cache (catalog)
//!        │                                                          ▼
//!     progress ◀── durable LSN (watch) ◀── next stage ◀── Event (bounded mpsc)
//! ```
//!
//! Progress tracking (see [`progress`]): the slot is confirmed only up to what the
//! next stage reports durable, or a keepalive position received while nothing was in
//! flight. A lost connection is retried with capped exponential backoff, resuming
//! after the last transaction handed on, so nothing is lost; a transaction cut off
//! mid-way is sent again whole (the next stage may see its first changes twice).
//!
//! Backpressure: the event channel is bounded, by count and by bytes
//! ([`crate::budget`]). While it is full the stage stops
//! reading the socket (TCP pushes back on the walsender) but keeps sending status
//! updates so `wal_sender_timeout` does not end the connection.

pub mod check;
pub mod pgoutput;
pub mod progress;
pub mod relation;
pub mod replication;
pub mod slot;
pub mod snapshot;
pub mod state;
pub mod transform;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::Error;
use crate::event::{Change, Datum, Event, Op, Txn};
use crate::health::Health;
use crate::lsn::Lsn;
use crate::metrics::{metrics, record_error};
use pgoutput::Message;
use progress::Progress;
use relation::RelationCache;
use replication::{ReplicationConn, ReplicationMessage};
use state::{SlotPlan, SourceState, StateLink};

/// How often a status update is considered; it is sent when the flush position moved
/// or `wal_sender_timeout / 2` passed.
const STATUS_TICK: Duration = Duration::from_secs(1);
/// Least time between two status updates sent because durability moved.
const STATUS_MIN_GAP: Duration = Duration::from_millis(100);
const BACKOFF_START: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How long a graceful stop waits for in-flight events to become durable (and their
/// position recorded). With the brokers down it ends the stop: what was not durable
/// is not confirmed and is read again on restart. Short enough that SIGTERM stays
/// well inside systemd's stop timeout together with the producer's flush.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

/// A source that passed its startup checks and is ready to stream.
pub struct Source {
    config: Arc<Config>,
    slot: String,
    /// The normal connection for catalog look-ups; opened again after it is lost (a
    /// source restart closes it along with the replication connection).
    catalog: tokio::sync::Mutex<Client>,
    start: Lsn,
    status_interval: Duration,
    /// Stop once this position is confirmed (`tail --end-lsn`).
    end_lsn: Option<Lsn>,
    /// The state to remember (see [`state`]), at the slot's position now.
    state: SourceState,
    /// The configured tables' OIDs at start (renames are followed by OID).
    table_oids: std::collections::HashMap<u32, crate::event::TableName>,
    /// The slot was just created with an exported snapshot: the initial copy runs in it.
    /// (In a mutex only so that `&Source` is `Sync`.)
    exported: std::sync::Mutex<Option<Exported>>,
    /// Whether this source copies tables (`run`), or only streams (`tail`).
    snapshots: bool,
}

/// A slot's exported snapshot, alive while its creating connection stays idle.
struct Exported {
    conn: ReplicationConn,
    name: String,
    consistent_point: Lsn,
}

/// The channels that connect the source to the next stage.
pub struct Downstream {
    pub events: mpsc::Sender<Event>,
    /// Bytes of events in the channel: taken here, given back by the next stage.
    pub budget: Arc<crate::budget::ByteBudget>,
    /// Highest commit end LSN that is durable downstream.
    pub durable: watch::Receiver<Lsn>,
    /// Highest snapshot mark (`Event::Mark`) durable downstream.
    pub marks: watch::Receiver<u64>,
}

/// How a source starts.
pub struct StartOptions {
    pub slot: String,
    /// What was remembered about the source (see [`state`]); `None` on a first start.
    pub remembered: Option<SourceState>,
    /// Where that state lives, for messages.
    pub state_location: String,
    /// Go on past a missing, re-created or advanced slot or another server, with a
    /// warning: the operator accepts that changes were lost.
    pub accept_data_loss: bool,
    /// Copy tables (initial and on-demand snapshots); `tail` does not.
    pub snapshots: bool,
}

impl Source {
    /// Check the server and the slot against what was remembered, create the
    /// publication and (on a first start, or when accepted) the slot. Errors here are
    /// the operator's to fix (wal_level, grants, missing tables, a lost slot) and are
    /// not retried.
    pub async fn prepare(config: Arc<Config>, options: StartOptions) -> Result<Source, Error> {
        let slot = options.slot;
        let catalog = crate::pg::connect(&config.source.url, "source catalog").await?;
        slot::require_logical_wal(&catalog).await?;
        slot::ensure_publication(&catalog, &config).await?;
        let table_oids = slot::configured_tables(&catalog, &config).await?;
        let system = {
            let mut conn = ReplicationConn::connect(&config.source.url).await?;
            let id = conn.identify_system().await?;
            conn.close().await;
            id
        };
        let existing = slot::slot_info(&catalog, &slot).await?;
        let observed = state::Observed {
            system_identifier: system.system_id.clone(),
            timeline: system.timeline,
            database: system.dbname.clone(),
            slot_confirmed: existing.as_ref().map(|i| i.confirmed_flush),
        };
        let plan = state::decide(
            &slot,
            &options.state_location,
            options.remembered.as_ref(),
            &observed,
            options.accept_data_loss,
        )?;
        if plan == SlotPlan::Create && existing.is_none() {
            tracing::info!(%slot, "first start: creating the replication slot");
        }
        let wants_initial = options.snapshots
            && config.source.snapshot == crate::config::SnapshotMode::Initial
            && config.tables.iter().any(|t| t.snapshot);
        let mut exported = None;
        if existing.is_none() && wants_initial {
            let mut conn = ReplicationConn::connect(&config.source.url).await?;
            let (consistent_point, name) = conn.create_slot_exported(&slot).await?;
            tracing::info!(%slot, %consistent_point, "created replication slot with an exported snapshot for the initial copy");
            exported = Some(Exported {
                conn,
                name,
                consistent_point,
            });
        }
        let info = slot::ensure_slot(&catalog, &slot).await?;
        let snapshot = match (&options.remembered, plan) {
            (Some(r), SlotPlan::Use) if options.snapshots => {
                let mut s = r.snapshot.clone();
                // The exported snapshot died with the last run: what the initial copy
                // did not finish is copied while streaming.
                for t in s.tables.values_mut() {
                    if t.method == crate::state::Method::Initial
                        && matches!(
                            t.phase,
                            crate::state::Phase::Pending | crate::state::Phase::Copying
                        )
                    {
                        t.method = crate::state::Method::Incremental;
                        t.phase = crate::state::Phase::Pending;
                        t.last_key = None;
                    }
                }
                s
            }
            (Some(r), SlotPlan::Use) => r.snapshot.clone(),
            _ if options.snapshots => snapshot::fresh_state(
                &config,
                if exported.is_some() {
                    crate::state::Method::Initial
                } else {
                    crate::state::Method::Incremental
                },
            ),
            _ => Default::default(),
        };
        if snapshot.unfinished().next().is_some() {
            tracing::info!(
                tables = snapshot.unfinished().count(),
                initial = exported.is_some(),
                "tables to copy"
            );
        }
        let timeout = slot::wal_sender_timeout(&catalog).await?;
        let status_interval = timeout.map_or(Duration::from_secs(10), |t| {
            (t / 2).min(Duration::from_secs(10))
        });
        let start = info.confirmed_flush.unwrap_or_default();
        tracing::info!(%slot, confirmed_flush_lsn = %start, "source ready");
        let state = SourceState {
            system_identifier: system.system_id,
            timeline: system.timeline,
            database: system.dbname,
            slot: slot.clone(),
            // Never lower than what was remembered: the record only moves forward.
            confirmed_lsn: options
                .remembered
                .as_ref()
                .and_then(|r| r.confirmed().ok())
                .filter(|r| *r > start && plan == SlotPlan::Use)
                .unwrap_or(start)
                .to_string(),
            snapshot,
        };
        Ok(Source {
            config,
            slot,
            catalog: tokio::sync::Mutex::new(catalog),
            start,
            status_interval,
            end_lsn: None,
            state,
            table_oids,
            exported: std::sync::Mutex::new(exported),
            snapshots: options.snapshots,
        })
    }

    /// The state to record before streaming (a first start must be remembered before
    /// anything is confirmed).
    pub fn state(&self) -> &SourceState {
        &self.state
    }

    pub fn stop_at(&mut self, end: Option<Lsn>) {
        self.end_lsn = end;
    }

    /// Stream until `shutdown`, a fatal error, or the next stage going away.
    pub async fn run(
        mut self,
        mut down: Downstream,
        link: StateLink,
        shutdown: CancellationToken,
        health: Arc<Health>,
    ) -> Result<(), Error> {
        snapshot::publish_gauges(&link.snapshot.borrow());
        let marks_next = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let exported = self.exported.get_mut().ok().and_then(|e| e.take());
        if let Some(exported) = exported {
            // A source that is copying is working as it should: ready.
            health.set_source_streaming(true);
            let catalog = self.catalog.lock().await;
            let initial = snapshot::Initial {
                config: &self.config,
                catalog: &catalog,
                table_oids: &self.table_oids,
                snapshot_name: exported.name,
                exporter: exported.conn,
                consistent_point: exported.consistent_point,
                marks: marks_next.clone(),
            };
            match snapshot::run_initial(initial, &down, &link.snapshot, &shutdown).await {
                Ok(()) => {}
                Err(e) if shutdown.is_cancelled() => {
                    tracing::info!(reason = %e, "stopped during the initial snapshot");
                    return Ok(());
                }
                Err(e) => {
                    record_error("source", &e);
                    return Err(e.context("the initial snapshot"));
                }
            }
        }
        let windows = if self.snapshots {
            let (chunks_tx, chunks_rx) = mpsc::channel(1);
            let run = snapshot::run_id();
            tokio::spawn(snapshot::run_incremental(snapshot::Incremental {
                config: self.config.clone(),
                table_oids: self.table_oids.clone(),
                slot: self.slot.clone(),
                chunks: chunks_tx,
                progress: link.snapshot.clone(),
                marks: down.marks.clone(),
                shutdown: shutdown.child_token(),
                run: run.clone(),
            }));
            Some(snapshot::Windows::new(self.slot.clone(), run, chunks_rx))
        } else {
            None
        };
        let (monitor_tx, mut monitor_rx) = mpsc::channel(1);
        let monitor = tokio::spawn(monitor(
            self.config.clone(),
            self.slot.clone(),
            monitor_tx,
            shutdown.child_token(),
        ));
        let mut session = Session {
            source: &self,
            progress: Progress::new(self.start),
            relations: RelationCache::new(self.table_oids.clone()),
            shutdown: &shutdown,
            health: &health,
            downstream_gone: false,
            link,
            windows,
            marks_next,
        };
        let mut backoff = BACKOFF_START;
        let result = loop {
            match session.stream(&mut down, &mut monitor_rx).await {
                Ok(()) => break Ok(()),
                Err(e) if e.is_transient() && !shutdown.is_cancelled() => {
                    // A session that got to streaming starts the backoff afresh
                    // (whatever the sink is doing).
                    if health.source_streaming() {
                        backoff = BACKOFF_START;
                    }
                    health.set_source_streaming(false);
                    record_error("source", &e);
                    session.progress.reset_transaction();
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "source connection lost; reconnecting");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.cancelled() => break Ok(()),
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
                Err(e) => {
                    record_error("source", &e);
                    break Err(e);
                }
            }
        };
        health.set_source_streaming(false);
        monitor.abort();
        result
    }
}

struct Session<'a> {
    source: &'a Source,
    progress: Progress,
    relations: RelationCache,
    shutdown: &'a CancellationToken,
    health: &'a Health,
    /// The next stage closed its channel: stop after confirming what is durable.
    downstream_gone: bool,
    /// Positions are recorded (see [`state`]) before the slot is confirmed to them.
    link: StateLink,
    /// Incremental snapshot chunks and their watermark windows (`None` in `tail`).
    windows: Option<snapshot::Windows>,
    /// The last snapshot mark handed on.
    marks_next: Arc<std::sync::atomic::AtomicU64>,
}

/// Transaction state while between Begin and Commit.
struct OpenTxn {
    txn: Txn,
    ordinal: u32,
}

impl Session<'_> {
    async fn stream(
        &mut self,
        down: &mut Downstream,
        monitor: &mut mpsc::Receiver<Error>,
    ) -> Result<(), Error> {
        let src = self.source;
        let config = &src.config;
        let mut conn = ReplicationConn::connect_decoding(
            &config.source.url,
            config.source.decoding_work_mem_kb,
        )
        .await?;
        let start = self.progress.resume_point();
        let info = {
            let mut catalog = src.catalog.lock().await;
            if catalog.is_closed() {
                *catalog = crate::pg::connect(&config.source.url, "source catalog").await?;
            }
            slot::slot_info(&catalog, &src.slot).await?
        }
            .ok_or_else(|| Error::fatal(format!("replication slot {} was dropped while pgferry used it", src.slot))
                .with_hint("changes since then are lost to pgferry; recreate the slot and resynchronise the target"))?;
        slot::check_slot_health(&src.slot, &info)?;
        if let Some(confirmed) = info.confirmed_flush.filter(|c| *c > start) {
            return Err(Error::fatal(format!(
                "replication slot {} was advanced to {confirmed} by someone else while pgferry was at {start}; \
                 the changes in between were skipped",
                src.slot
            ))
            .with_hint("do not advance or share pgferry's slot; resynchronise the target"));
        }
        conn.start_replication(&src.slot, start, &config.source.publication)
            .await?;
        self.health.set_source_streaming(true);
        tracing::info!(slot = %src.slot, %start, "streaming");

        let mut tick = tokio::time::interval(STATUS_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_status = Instant::now();
        let mut open: Option<OpenTxn> = None;
        loop {
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => {
                    return self.finish(conn, down).await;
                }
                Some(err) = monitor.recv() => return Err(err),
                changed = down.durable.changed() => {
                    if changed.is_err() {
                        // The next stage is gone: confirm what it made durable and stop.
                        return self.finish(conn, down).await;
                    }
                    self.progress.durable(*down.durable.borrow_and_update());
                    self.request_record();
                    if src.end_lsn.is_some_and(|end| self.progress.flush_position() >= end) {
                        return self.finish(conn, down).await;
                    }
                    // Confirm promptly (the slot's lag is what operators watch), but
                    // not more than ten times a second.
                    if last_status.elapsed() >= STATUS_MIN_GAP && self.confirmable() > self.progress.last_confirmed() {
                        self.status(&mut conn, false).await?;
                        last_status = Instant::now();
                    }
                }
                recorded = self.link.recorded.changed() => {
                    if recorded.is_err() {
                        return Err(Error::fatal(
                            "the source position can no longer be recorded; stopping without confirming more",
                        ));
                    }
                    if last_status.elapsed() >= STATUS_MIN_GAP && self.confirmable() > self.progress.last_confirmed() {
                        self.status(&mut conn, false).await?;
                        last_status = Instant::now();
                    }
                }
                _ = tick.tick() => {
                    self.request_record();
                    let flush = self.confirmable();
                    if flush > self.progress.last_confirmed() || last_status.elapsed() >= src.status_interval {
                        self.status(&mut conn, false).await?;
                        last_status = Instant::now();
                    }
                    if src.end_lsn.is_some_and(|end| self.progress.last_confirmed() >= end) {
                        return self.finish(conn, down).await;
                    }
                }
                msg = conn.next_message() => match msg? {
                    ReplicationMessage::Keepalive { wal_end, reply_requested } => {
                        self.progress.keepalive(wal_end);
                        if reply_requested {
                            self.status(&mut conn, false).await?;
                            last_status = Instant::now();
                        }
                    }
                    ReplicationMessage::XLogData { wal_start, wal_end, payload } => {
                        self.progress.received(wal_start);
                        let message = pgoutput::decode(payload).map_err(|e| {
                            Error::fatal(format!("decoding the change at {wal_start}")).with_source(e)
                        })?;
                        self.handle(message, wal_start, wal_end, &mut open, &mut conn, down).await?;
                        if self.downstream_gone {
                            return self.finish(conn, down).await;
                        }
                    }
                }
            }
        }
    }

    async fn handle(
        &mut self,
        message: Message,
        lsn: Lsn,
        wal_end: Lsn,
        open: &mut Option<OpenTxn>,
        conn: &mut ReplicationConn,
        down: &mut Downstream,
    ) -> Result<(), Error> {
        let config = &self.source.config;
        let (op, relation, before, after) = match message {
            Message::Begin {
                final_lsn,
                commit_ts,
                xid,
            } => {
                let txn = Txn {
                    xid,
                    commit_lsn: final_lsn,
                    commit_ts,
                    prev_commit_end: self.progress.forwarded(),
                };
                *open = Some(OpenTxn { txn, ordinal: 0 });
                self.progress.begin();
                return self.send(Event::Begin(txn), conn, down).await;
            }
            Message::Commit { end_lsn, .. } => {
                let txn = open
                    .take()
                    .ok_or_else(|| Error::fatal(format!("commit at {lsn} without a begin")))?
                    .txn;
                self.send(Event::Commit { txn, end_lsn }, conn, down)
                    .await?;
                self.progress.commit(end_lsn);
                return Ok(());
            }
            Message::Relation(rel) => {
                let catalog = self.source.catalog.lock().await;
                self.relations.update(&catalog, config, rel).await?;
                return Ok(());
            }
            Message::Type { oid, .. } => {
                self.relations.forget_type(oid);
                return Ok(());
            }
            Message::Origin { .. } => return Ok(()),
            Message::Message {
                transactional,
                prefix,
                content,
                ..
            } => {
                if !transactional && open.is_none() {
                    self.progress.keepalive(wal_end.max(lsn));
                }
                if prefix == snapshot::WATERMARK_PREFIX {
                    return self.watermark(&content, lsn, open, conn, down).await;
                }
                if prefix == snapshot::SIGNAL_PREFIX {
                    self.signal(&content, lsn);
                }
                return Ok(());
            }
            Message::Truncate { relations, .. } => {
                for oid in relations {
                    if let Some(w) = self.windows.as_mut() {
                        w.truncated(oid);
                    }
                    let state = self.relation(oid, lsn)?;
                    if state.selected {
                        let table = state.schema.clone();
                        state.count(Op::Truncate);
                        self.change(
                            Op::Truncate,
                            table,
                            None,
                            None,
                            lsn,
                            open,
                            conn,
                            down,
                            crate::event::SnapshotMark::No,
                        )
                        .await?;
                    }
                }
                return Ok(());
            }
            Message::Insert { relation, new } => (Op::Create, relation, None, Some(new)),
            Message::Update { relation, old, new } => (Op::Update, relation, old, Some(new)),
            Message::Delete { relation, old } => (Op::Delete, relation, Some(old), None),
        };
        let state = self.relation(relation, lsn)?;
        if !state.selected {
            return Ok(());
        }
        let before = before.map(|o| state.old_row(o)).transpose()?;
        let mut after = after.map(|t| state.row(t, false)).transpose()?;
        // An unchanged TOAST value can be filled in from a full old row.
        if let (Some(after), Some(before)) =
            (after.as_mut(), before.as_ref().filter(|b| !b.key_only))
        {
            for (a, b) in after.values.iter_mut().zip(&before.values) {
                if matches!(a, Datum::Unchanged) && matches!(b, Datum::Text(_)) {
                    *a = b.clone();
                }
            }
        }
        state.count(op);
        let table = state.schema.clone();
        if let Some(w) = self.windows.as_mut() {
            for row in [&before, &after].into_iter().flatten() {
                w.changed(table.oid, || Some(snapshot::key_of(row, &table.key)));
            }
        }
        self.change(
            op,
            table,
            before,
            after,
            lsn,
            open,
            conn,
            down,
            crate::event::SnapshotMark::No,
        )
        .await
    }

    /// A watermark of an incremental snapshot: open a window, or close it and emit the
    /// chunk's rows that the stream did not change meanwhile, in this transaction.
    async fn watermark(
        &mut self,
        content: &[u8],
        lsn: Lsn,
        open: &mut Option<OpenTxn>,
        conn: &mut ReplicationConn,
        down: &mut Downstream,
    ) -> Result<(), Error> {
        let Some(windows) = self.windows.as_mut() else {
            return Ok(());
        };
        let Some(mark) = windows.parse(content) else {
            return Ok(());
        };
        let (chunk, rows) = match mark {
            snapshot::Watermark::Low { seq, oid } => {
                windows.low(seq, oid);
                return Ok(());
            }
            snapshot::Watermark::High { seq, .. } => match windows.high(seq) {
                Some(found) => found,
                None => {
                    tracing::debug!(chunk = seq, %lsn, "high watermark without its whole window; the chunk is read again");
                    return Ok(());
                }
            },
        };
        if open.is_none() {
            // Watermarks are transactional; without a transaction, read it again.
            return Ok(());
        }
        for row in rows {
            self.change(
                Op::Read,
                chunk.schema.clone(),
                None,
                Some(row),
                lsn,
                open,
                conn,
                down,
                crate::event::SnapshotMark::Incremental,
            )
            .await?;
        }
        let m = self
            .marks_next
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel)
            + 1;
        self.send(Event::Mark(m), conn, down).await?;
        let _ = chunk.emitted.send(m);
        Ok(())
    }

    /// A `pgferry snapshot` request: record the tables as pending (before the slot is
    /// confirmed past the request, so a crash does not lose it).
    fn signal(&mut self, content: &[u8], lsn: Lsn) {
        if self.windows.is_none() {
            return;
        }
        let Ok(signal) = serde_json::from_slice::<snapshot::Signal>(content) else {
            tracing::warn!(%lsn, "ignoring a malformed pgferry.signal message");
            return;
        };
        if signal.slot != self.source.slot {
            return;
        }
        let config = &self.source.config;
        for name in &signal.tables {
            let Some(table) = config
                .tables
                .iter()
                .find(|t| snapshot::state_key(&t.source) == *name)
            else {
                tracing::warn!(table = %name, "snapshot requested for a table that is not configured; ignored");
                continue;
            };
            if !table.snapshot {
                tracing::warn!(table = %name, "snapshot requested for a table with snapshot = false; ignored");
                continue;
            }
            tracing::info!(table = %name, %lsn, "snapshot requested");
            self.link.snapshot.send_modify(|s| {
                s.tables.insert(
                    name.clone(),
                    crate::state::TableSnapshot {
                        method: crate::state::Method::Incremental,
                        ..Default::default()
                    },
                );
            });
        }
        snapshot::publish_gauges(&self.link.snapshot.borrow());
    }

    fn relation(&self, oid: u32, lsn: Lsn) -> Result<&relation::RelationState, Error> {
        self.relations.get(oid).ok_or_else(|| {
            Error::fatal(format!(
                "change at {lsn} for relation {oid} arrived before its relation message"
            ))
        })
    }

    #[allow(clippy::too_many_arguments)]
    async fn change(
        &mut self,
        op: Op,
        table: Arc<crate::event::TableSchema>,
        before: Option<crate::event::Row>,
        after: Option<crate::event::Row>,
        lsn: Lsn,
        open: &mut Option<OpenTxn>,
        conn: &mut ReplicationConn,
        down: &mut Downstream,
        mark: crate::event::SnapshotMark,
    ) -> Result<(), Error> {
        let o = open
            .as_mut()
            .ok_or_else(|| Error::fatal(format!("row change at {lsn} outside a transaction")))?;
        let change = Change {
            op,
            table,
            xid: o.txn.xid,
            commit_lsn: o.txn.commit_lsn,
            lsn,
            ordinal: o.ordinal,
            commit_ts: o.txn.commit_ts,
            prev_commit_end: o.txn.prev_commit_end,
            before,
            after,
            snapshot: mark,
        };
        o.ordinal += 1;
        self.send(Event::Change(change), conn, down).await
    }

    /// Hand an event on, waiting for room; status updates continue meanwhile.
    async fn send(
        &mut self,
        event: Event,
        conn: &mut ReplicationConn,
        down: &mut Downstream,
    ) -> Result<(), Error> {
        // Room by bytes first (status updates go on while waiting), then by count.
        // Mostly there is room: no timer is armed for the wait then (two per change,
        // each reading the clock, showed in the source's profile).
        if !down.budget.try_take(&event) {
            let budget = down.budget.clone();
            let taken = budget.take(&event);
            tokio::pin!(taken);
            loop {
                tokio::select! {
                    _ = &mut taken => break,
                    _ = tokio::time::sleep(self.source.status_interval) => {
                        self.progress.durable(*down.durable.borrow());
                        self.status(conn, false).await?;
                    }
                }
            }
        }
        match down.events.try_reserve() {
            Ok(permit) => {
                permit.send(event);
                return Ok(());
            }
            Err(mpsc::error::TrySendError::Closed(())) => {
                self.downstream_gone = true;
                return Ok(());
            }
            Err(mpsc::error::TrySendError::Full(())) => {}
        }
        loop {
            tokio::select! {
                permit = down.events.reserve() => {
                    match permit {
                        Ok(permit) => permit.send(event),
                        Err(_) => self.downstream_gone = true,
                    }
                    return Ok(());
                }
                _ = tokio::time::sleep(self.source.status_interval) => {
                    self.progress.durable(*down.durable.borrow());
                    self.status(conn, false).await?;
                }
            }
        }
    }

    /// Ask for the durable position to be recorded, so that it can be confirmed.
    fn request_record(&self) {
        let want = self.progress.flush_position();
        self.link.want.send_if_modified(|w| {
            let moved = want > *w;
            if moved {
                *w = want;
            }
            moved
        });
    }

    /// What may be confirmed: durable downstream and recorded in the source state.
    fn confirmable(&self) -> Lsn {
        self.progress
            .flush_position()
            .min(*self.link.recorded.borrow())
    }

    async fn status(&mut self, conn: &mut ReplicationConn, reply: bool) -> Result<(), Error> {
        self.request_record();
        let flush = self.confirmable();
        conn.send_status(self.progress.write_position(), flush, reply)
            .await?;
        self.progress.confirmed(flush);
        metrics().source_confirmed_lsn.set(flush.0 as i64);
        Ok(())
    }

    /// Graceful stop: wait (bounded) until what was handed on is durable, confirm it,
    /// and end the stream.
    async fn finish(
        &mut self,
        mut conn: ReplicationConn,
        down: &mut Downstream,
    ) -> Result<(), Error> {
        let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
        loop {
            self.progress.durable(*down.durable.borrow_and_update());
            if self.progress.flush_position() >= self.progress.resume_point() {
                break;
            }
            tokio::select! {
                changed = down.durable.changed() => if changed.is_err() { self.progress.durable(*down.durable.borrow()); break },
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::warn!("stopping before every event was durable; they will be read again on restart");
                    break;
                }
            }
        }
        self.request_record();
        while *self.link.recorded.borrow() < self.progress.flush_position() {
            tokio::select! {
                changed = self.link.recorded.changed() => if changed.is_err() { break },
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::warn!("stopping before the last position was recorded; it will be read again on restart");
                    break;
                }
            }
        }
        self.status(&mut conn, false).await?;
        tracing::info!(confirmed = %self.progress.last_confirmed(), "source stopped");
        conn.finish().await
    }
}

/// Heartbeats and slot health, on its own connection, every `heartbeat_interval`.
/// A lost or dropped slot is reported as a fatal error; connection trouble is retried.
async fn monitor(
    config: Arc<Config>,
    slot_name: String,
    errors: mpsc::Sender<Error>,
    shutdown: CancellationToken,
) {
    let mut client: Option<Client> = None;
    let mut interval = tokio::time::interval(config.source.heartbeat_interval);
    let mut heartbeat_warned = false;
    // Spill statistics exist from PostgreSQL 14; a server without the view is asked
    // once (a failed query would be an ERROR in the EHR's log every interval).
    let mut spill_stats = true;
    let mut spill_told = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = interval.tick() => {}
        }
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            match crate::pg::connect(&config.source.url, "source monitor").await {
                Ok(c) => client = Some(c),
                Err(e) => {
                    tracing::debug!(error = %e, "slot monitor cannot connect; will retry");
                    continue;
                }
            }
        }
        let Some(c) = client.as_ref() else { continue };
        if let Err(e) = slot::heartbeat(c).await {
            if !heartbeat_warned {
                tracing::warn!(error = %e, "cannot write heartbeat messages; an idle publication may pin WAL");
                heartbeat_warned = true;
            }
        }
        match slot::slot_info(c, &slot_name).await {
            Ok(Some(info)) => {
                if let Some(lag) = info.lag_bytes {
                    metrics().source_slot_lag_bytes.set(lag);
                }
                if let Err(e) = slot::check_slot_health(&slot_name, &info) {
                    let _ = errors.send(e).await;
                    return;
                }
            }
            Ok(None) => {
                let e = Error::fatal(format!(
                    "replication slot {slot_name} was dropped while pgferry used it"
                ));
                let _ = errors.send(e).await;
                return;
            }
            Err(e) => tracing::debug!(error = %e, "slot monitor query failed; will retry"),
        }
        if spill_stats {
            match slot::spill_bytes(c, &slot_name).await {
                Ok(slot::Spill::Bytes(bytes)) => {
                    metrics().source_slot_spill_bytes.set(bytes);
                    if bytes > 0 && !spill_told {
                        spill_told = true;
                        tracing::info!(
                            slot = %slot_name,
                            spill_bytes = bytes,
                            "the slot's walsender spills transactions larger than logical_decoding_work_mem to the EHR's disk and reads them back; [source] logical_decoding_work_mem raises that limit for pgferry's session (see pgferry_source_slot_spill_bytes)"
                        );
                    }
                }
                Ok(slot::Spill::NoSlot) => {}
                Ok(slot::Spill::Unsupported) => {
                    tracing::debug!(
                        "no spill statistics on this server (PostgreSQL 14+); not asking again"
                    );
                    spill_stats = false;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "slot spill statistics query failed; will retry")
                }
            }
        }
    }
}
