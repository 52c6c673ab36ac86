//! The wiring of stages, in one place. Each command that streams builds its pipeline
//! here: the stages, the bounded channels between them, the durable-LSN feedback, the
//! HTTP server and the shutdown signal.
//!
//! `tail`: source ──Event──▶ stdout writer ──durable LSN──▶ source. A transaction is
//! durable once its lines are written and flushed to stdout.

use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::budget::ByteBudget;
use crate::codec::json;
use crate::config::Config;
use crate::error::Error;
use crate::event::Event;
use crate::health::Health;
use crate::lsn::Lsn;
use crate::source::state::{self as source_state, FileStore, SourceState, StateLink, StateStore};
use crate::source::{Downstream, Source, StartOptions};

/// Events buffered between the source and the next stage. Bounded so that a slow
/// consumer pushes back on the replication connection instead of growing memory.
pub const EVENT_CHANNEL_CAPACITY: usize = 4096;
/// Bytes of output gathered before a write to stdout.
const TAIL_WRITE_CHUNK: usize = 64 * 1024;

/// Cancel `token` on SIGTERM or SIGINT.
pub fn cancel_on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGTERM");
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping gracefully"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping gracefully"),
        }
        crate::systemd::notify("STOPPING=1");
        token.cancel();
    });
}

async fn start_http(config: &Config, health: &Arc<Health>) -> Result<(), Error> {
    if let Some(listen) = &config.http_listen {
        crate::http::serve(listen, health.clone()).await?;
    }
    Ok(())
}

/// Load what `store` remembers and prepare the source against it; record the state a
/// first start (or an accepted loss) begins with before anything streams.
async fn prepare_source<S: StateStore>(
    config: &Arc<Config>,
    slot: String,
    mut store: S,
    accept_data_loss: bool,
    snapshots: bool,
) -> Result<
    (
        Source,
        StateLink,
        tokio::task::JoinHandle<Result<(), Error>>,
    ),
    Error,
> {
    let remembered = store.load().await?;
    let source = Source::prepare(
        config.clone(),
        StartOptions {
            slot,
            remembered: remembered.clone(),
            state_location: store.describe(),
            accept_data_loss,
            snapshots,
        },
    )
    .await?;
    let state: SourceState = source.state().clone();
    if remembered.as_ref() != Some(&state) {
        store.save(&state).await.map_err(|e| {
            e.context(format!(
                "recording the source state in {}",
                store.describe()
            ))
        })?;
    }
    let initial = state.confirmed()?;
    let (want_tx, want_rx) = watch::channel(initial);
    let (recorded_tx, recorded_rx) = watch::channel(initial);
    let (snapshot_tx, snapshot_rx) = watch::channel(state.snapshot.clone());
    let keeper = tokio::spawn(source_state::keep(
        store,
        state,
        want_rx,
        recorded_tx,
        snapshot_rx,
    ));
    let link = StateLink {
        want: want_tx,
        recorded: recorded_rx,
        snapshot: Arc::new(snapshot_tx),
    };
    Ok((source, link, keeper))
}

/// The source's result, unless the state keeper failed first (its error is the cause).
async fn with_keeper(
    source: Result<(), Error>,
    keeper: tokio::task::JoinHandle<Result<(), Error>>,
) -> Result<(), Error> {
    if source.is_ok() {
        keeper.abort();
        return source;
    }
    match tokio::time::timeout(std::time::Duration::from_secs(1), keeper).await {
        Ok(Ok(Err(e))) => Err(e),
        _ => source,
    }
}

/// Where `tail` remembers its source by default: beside the config file, one file per
/// slot (see `source::state`).
pub fn default_tail_state_file(config: &Config, slot: &str) -> std::path::PathBuf {
    config
        .path
        .parent()
        .unwrap_or(std::path::Path::new("."))
        .join(".pgferry")
        .join(format!("tail-{slot}.json"))
}

/// `pgferry tail`: decoded changes as JSON lines on stdout.
pub async fn tail(
    config: Arc<Config>,
    slot: Option<String>,
    end_lsn: Option<Lsn>,
    state_file: Option<std::path::PathBuf>,
    accept_data_loss: bool,
) -> Result<(), Error> {
    let health = Arc::new(Health::new(true, false));
    start_http(&config, &health).await?;
    let slot = slot.unwrap_or_else(|| config.source.slot.clone());
    let state_file = state_file.unwrap_or_else(|| default_tail_state_file(&config, &slot));
    let (mut source, link, keeper) = prepare_source(
        &config,
        slot,
        FileStore::new(state_file),
        accept_data_loss,
        false,
    )
    .await?;
    source.stop_at(end_lsn);

    let shutdown = CancellationToken::new();
    cancel_on_signals(shutdown.clone());
    let (events_tx, events) = mpsc::channel(EVENT_CHANNEL_CAPACITY);
    let (durable_tx, durable_rx) = watch::channel(Lsn::ZERO);
    let budget = Arc::new(ByteBudget::new(crate::budget::DEFAULT_BYTES));
    // tail copies no tables: its marks never move.
    let (_marks_tx, marks) = watch::channel(0);
    let downstream = Downstream {
        events: events_tx,
        budget: budget.clone(),
        durable: durable_rx,
        marks,
    };
    let source_task = tokio::spawn(source.run(downstream, link, shutdown.clone(), health));

    // A plain thread writes stdout: tokio's stdout hands every write to its blocking
    // pool, and the thread hops cost more than the JSON itself.
    let writer = std::thread::spawn(move || write_tail_lines(events, &budget, durable_tx));
    let result = source_task
        .await
        .map_err(|e| Error::fatal("the source task failed").with_source(e))?;
    let result = with_keeper(result, keeper).await;
    let written = tokio::task::spawn_blocking(move || writer.join())
        .await
        .map_err(|e| Error::fatal("the stdout writer failed").with_source(e))?
        .map_err(|_| Error::fatal("the stdout writer panicked"))?;
    match written {
        // A closed pipe (`pgferry tail | head`) is a normal way to stop reading.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => result,
        Err(e) => Err(Error::fatal("writing to stdout").with_source(e)),
        Ok(()) => result,
    }
}

/// The `tail` sink: JSON lines to stdout; a commit is reported durable only once its
/// lines are written and flushed. Returning drops the receiver and the durable
/// sender, which tells the source to confirm what is durable and stop.
fn write_tail_lines(
    mut events: mpsc::Receiver<Event>,
    budget: &ByteBudget,
    durable: watch::Sender<Lsn>,
) -> std::io::Result<()> {
    use std::io::Write;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut buf = Vec::with_capacity(TAIL_WRITE_CHUNK * 2);
    let mut pending: Option<Lsn> = None;
    while let Some(event) = events.blocking_recv() {
        budget.give(&event);
        match event {
            Event::Change(change) | Event::Snapshot(change) => {
                json::write_tail_line(&change, &mut buf)
            }
            Event::Mark(_) => {}
            Event::Commit { end_lsn, .. } => pending = Some(end_lsn),
            Event::Begin(_) => {}
        }
        // Write when a chunk is full or the source has nothing more right now.
        if buf.len() >= TAIL_WRITE_CHUNK || events.is_empty() {
            out.write_all(&buf)?;
            out.flush()?;
            buf.clear();
            if let Some(end) = pending.take() {
                let _ = durable.send(end);
            }
        }
    }
    Ok(())
}

/// Which stages `pgferry run` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stages {
    Both,
    Source,
    Sink,
}

/// `pgferry run`: the source side (source ──Event──▶ Kafka producer ──durable LSN──▶
/// source: a transaction is durable once Kafka acknowledged all its messages and
/// those of every earlier transaction) and the sink side (topics ──▶ target, exactly
/// once), each optional. SIGTERM stops both gracefully; a failure of one stops the
/// other and is reported.
pub async fn run(config: Arc<Config>, stages: Stages, accept_data_loss: bool) -> Result<(), Error> {
    let with_source = stages != Stages::Sink;
    let with_sink = stages != Stages::Source;
    if with_sink && config.sink.is_none() {
        return Err(Error::operator(format!(
            "{}: the sink stage needs a [sink] section (or run --only source)",
            config.path.display()
        )));
    }
    for w in crate::source::check::warnings(&config) {
        tracing::warn!("{w}");
    }
    let health = Arc::new(Health::new(with_source, with_sink));
    start_http(&config, &health).await?;
    let shutdown = CancellationToken::new();
    cancel_on_signals(shutdown.clone());
    crate::systemd::supervise(health.clone(), shutdown.clone());

    // The sink connects in its own task: a hospital-database outage at start must not
    // keep the source from publishing (and confirming) the EHR's changes.
    let sink = with_sink.then(|| {
        let config = config.clone();
        let health = health.clone();
        let stop = shutdown.clone();
        async move { start_sink(config, health, stop).await }
    });
    let source_side = if with_source {
        let (durable_tx, durable_rx) = watch::channel(Lsn::ZERO);
        let mut kafka = crate::kafka::producer::KafkaStage::new(config.clone(), durable_tx).await?;
        kafka.create_configured_topics().await?;
        let slot = config.source.slot.clone();
        let store = crate::kafka::state::KafkaStateStore::new(config.clone(), &slot)?;
        let (source, link, keeper) =
            prepare_source(&config, slot, store, accept_data_loss, true).await?;
        let (events_tx, events) = mpsc::channel(EVENT_CHANNEL_CAPACITY);
        let budget = Arc::new(ByteBudget::new(crate::budget::DEFAULT_BYTES));
        let downstream = Downstream {
            events: events_tx,
            budget: budget.clone(),
            durable: durable_rx,
            marks: kafka.marks(),
        };
        let source_task =
            tokio::spawn(source.run(downstream, link, shutdown.clone(), health.clone()));
        let stop = shutdown.clone();
        Some(tokio::spawn(async move {
            let kafka_result = kafka.run(events, budget).await;
            if kafka_result.is_err() {
                // The producer (and with it the durable channel) is gone: the source
                // stops without confirming anything more.
                stop.cancel();
            }
            let source_result = source_task
                .await
                .map_err(|e| Error::fatal("the source task failed").with_source(e))?;
            let source_result = with_keeper(source_result, keeper).await;
            kafka_result.and(source_result)
        }))
    } else {
        None
    };
    let sink_task = sink.map(|start| {
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let r = match start.await {
                Ok(Some(s)) => s.run(stop.clone()).await,
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            };
            if r.is_err() {
                stop.cancel();
            }
            r
        })
    });
    let join = |r: Result<Result<(), Error>, tokio::task::JoinError>| {
        r.map_err(|e| Error::fatal("a stage task failed").with_source(e))
            .and_then(|x| x)
    };
    let source_result = match source_side {
        Some(t) => join(t.await),
        None => Ok(()),
    };
    if source_result.is_err() {
        shutdown.cancel();
    }
    let sink_result = match sink_task {
        Some(t) => join(t.await),
        None => Ok(()),
    };
    source_result.and(sink_result)
}

/// Connect the sink, retrying while the target is unreachable; `None` when shutdown
/// came first. Errors other than transient ones (a wrong password, a missing grant)
/// stop it.
async fn start_sink(
    config: Arc<Config>,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> Result<Option<crate::sink::SinkStage>, Error> {
    let mut backoff = std::time::Duration::from_millis(200);
    loop {
        match crate::sink::SinkStage::new(config.clone(), health.clone()).await {
            Ok(s) => return Ok(Some(s)),
            Err(e) if e.is_transient() => {
                crate::metrics::record_error("sink", &e);
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64,
                    "the target is not available; the sink waits for it while the source goes on");
            }
            Err(e) => return Err(e),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.cancelled() => return Ok(None),
        }
        backoff = (backoff * 2).min(std::time::Duration::from_secs(10));
    }
}
