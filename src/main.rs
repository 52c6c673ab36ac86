//! The `pgferry` command line: parse arguments, load and validate the configuration,
//! set up logging, run one command, and map its outcome to an exit code
//! (0 success, 1 a problem was found or the daemon failed, 2 bad usage or config).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use pgferry::config::Config;
use pgferry::error::{Error, ErrorKind};
use pgferry::lsn::Lsn;

/// See Cargo.toml: small allocations on many threads are pgferry's hot path.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read before `main`: one arena (pgferry's threads mostly wait,
/// and the thread caches take the hot path), and freed pages returned within 200 ms by
/// a background thread rather than kept for reuse. With its defaults (an arena per
/// core, 10 s decay) the drain's peak RSS was 2-3 times the memory in use.
///
/// jemalloc is built unprefixed (Cargo.toml), so these options also govern librdkafka's
/// and OpenSSL's allocations, which go through `malloc` and `free`. `MALLOC_CONF` in
/// the environment still overrides them.
#[export_name = "malloc_conf"]
pub static MALLOC_CONF: Option<&'static std::ffi::c_char> = Some(unsafe {
    &*c"narenas:1,background_thread:true,dirty_decay_ms:200,muzzy_decay_ms:0".as_ptr()
});

#[derive(Parser)]
#[command(
    name = "pgferry",
    version,
    about = "Change-data-capture from PostgreSQL to Kafka and into PostgreSQL"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum Stage {
    Source,
    Sink,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (source and sink stages per config).
    Run {
        #[arg(long, short)]
        config: PathBuf,
        /// Run only one stage.
        #[arg(long, value_enum)]
        only: Option<Stage>,
        /// Start although the slot is gone, was moved by someone else, or the source
        /// is another server than the one remembered: re-creates the slot, and the
        /// changes in between are lost (resynchronise the target afterwards).
        #[arg(long)]
        accept_data_loss: bool,
    },
    /// Print decoded changes as JSON lines on stdout (no Kafka).
    Tail {
        #[arg(long, short)]
        config: PathBuf,
        /// Read this replication slot instead of the configured one (created if missing).
        #[arg(long)]
        slot: Option<String>,
        /// Stop once everything up to this LSN (X/Y) is printed and confirmed.
        #[arg(long)]
        end_lsn: Option<Lsn>,
        /// Where tail remembers which server and slot it reads and how far
        /// (default: .pgferry/tail-<slot>.json beside the config file).
        #[arg(long)]
        state_file: Option<PathBuf>,
        /// Start although the slot is gone, was moved by someone else, or the source
        /// is another server than the one remembered (re-creates the slot).
        #[arg(long)]
        accept_data_loss: bool,
    },
    /// Validate the config, connectivity and server prerequisites; one line per problem.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print the Avro key and value schemas of the configured tables.
    Schema {
        #[arg(long, short)]
        config: PathBuf,
        /// Only this table (schema.table).
        #[arg(long)]
        table: Option<String>,
    },
    /// Compare source and target tables (row counts and checksums); with --ledger,
    /// check the target's applied-transactions ledger instead.
    Verify {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long, conflicts_with = "ledger")]
        table: Option<String>,
        /// Recompute the hash chain of pgferry.ledger for [sink] consumer, report the
        /// first broken link, and print the totals per table and op.
        #[arg(long)]
        ledger: bool,
        /// With --ledger: the running daemon's metrics URL
        /// (e.g. http://127.0.0.1:9187/metrics); its pgferry_sink_applied_total must
        /// equal the ledger rows it wrote since it started.
        #[arg(long, requires = "ledger", value_name = "URL")]
        metrics: Option<String>,
    },
    /// Ask the running daemon to copy tables again while it streams (an incremental
    /// snapshot; it resumes after a restart). Follow it with `pgferry status`.
    Snapshot {
        #[arg(long, short)]
        config: PathBuf,
        /// A configured table (schema.table); repeat for more.
        #[arg(long = "table", required = true)]
        tables: Vec<String>,
    },
    /// Show slot, lag and checkpoint summary.
    Status {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Generate a synthetic EHR workload.
    Generate {
        #[arg(long)]
        url: String,
        /// Changes per second.
        #[arg(long, default_value_t = 50)]
        rate: u32,
        /// How long to run, e.g. 60s or 5m.
        #[arg(long, default_value = "60s")]
        duration: String,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// First insert N patients with their history (visits, notes, medications,
        /// allergies, lab results), as an EHR in use for years holds them.
        #[arg(long, default_value_t = 0)]
        preload: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pgferry: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(run(cli.command))
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PGFERRY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn load(path: &std::path::Path) -> Result<Arc<Config>, ExitCode> {
    Config::load(path).map(Arc::new).map_err(|e| {
        eprintln!("pgferry: {e}");
        ExitCode::from(2)
    })
}

async fn run(command: Command) -> ExitCode {
    match command {
        Command::Tail {
            config,
            slot,
            end_lsn,
            state_file,
            accept_data_loss,
        } => {
            let config = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            report(
                pgferry::pipeline::tail(config, slot, end_lsn, state_file, accept_data_loss).await,
            )
        }
        Command::Check { config } => {
            let config = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            for w in pgferry::source::check::warnings(&config) {
                eprintln!("pgferry: warning: {w}");
            }
            let problems = pgferry::source::check::check(&config).await;
            for p in &problems {
                println!("{p}");
            }
            if problems.is_empty() {
                println!(
                    "ok: {} is ready ({} tables configured)",
                    config.source.url,
                    config.tables.len()
                );
                ExitCode::SUCCESS
            } else {
                eprintln!("pgferry: check found {} problem(s)", problems.len());
                ExitCode::from(1)
            }
        }
        Command::Run {
            config,
            only,
            accept_data_loss,
        } => {
            let config = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let stages = match only {
                Some(Stage::Source) => pgferry::pipeline::Stages::Source,
                Some(Stage::Sink) => pgferry::pipeline::Stages::Sink,
                None => pgferry::pipeline::Stages::Both,
            };
            report(pgferry::pipeline::run(config, stages, accept_data_loss).await)
        }
        Command::Schema { config, table } => {
            let config = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            report(pgferry::inspect::schema(&config, table.as_deref()).await)
        }
        Command::Verify {
            config,
            table,
            ledger,
            metrics,
        } => {
            let config = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            if ledger {
                return match pgferry::inspect::verify_ledger(&config, metrics.as_deref()).await {
                    Ok(true) => ExitCode::SUCCESS,
                    Ok(false) => ExitCode::from(1),
                    Err(e) => report(Err(e)),
                };
            }
            match pgferry::inspect::verify(&config, table.as_deref()).await {
                Ok(rows) => {
                    println!(
                        "{:<40} {:>14} {:>14}  status",
                        "table", "source rows", "target rows"
                    );
                    let show = |n: Option<i64>| n.map_or("-".to_string(), |n| n.to_string());
                    for r in &rows {
                        println!(
                            "{:<40} {:>14} {:>14}  {}",
                            r.table,
                            show(r.source_rows),
                            show(r.target_rows),
                            r.status
                        );
                    }
                    if rows.iter().all(|r| r.equal()) {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(1)
                    }
                }
                Err(e) => report(Err(e)),
            }
        }
        Command::Snapshot { config, tables } => {
            let config = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match pgferry::source::snapshot::request(&config, &tables).await {
                Ok(lsn) => {
                    println!(
                        "snapshot of {} requested at {lsn}; the running daemon copies it while streaming \
                         (pgferry status shows the progress)",
                        tables.join(", ")
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => report(Err(e)),
            }
        }
        Command::Status { config } => {
            let config = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match pgferry::inspect::status(&config).await {
                Ok(lines) => {
                    for l in lines {
                        println!("{l}");
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => report(Err(e)),
            }
        }
        Command::Generate {
            url,
            rate,
            duration,
            seed,
            preload,
        } => {
            let duration = match pgferry::config::parse_duration(&duration) {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("pgferry: --duration: {e}");
                    return ExitCode::from(2);
                }
            };
            let opts = pgferry::generate::Options {
                url,
                rate,
                duration,
                seed,
                preload,
            };
            report(pgferry::generate::generate(opts).await)
        }
    }
}

/// Print an error the way an operator needs it, and choose the exit code.
fn report(result: Result<(), Error>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pgferry: error: {e}");
            if let Some(hint) = e.hint() {
                eprintln!("pgferry: hint: {hint}");
            }
            match e.kind() {
                ErrorKind::Operator => ExitCode::from(2),
                ErrorKind::Transient | ErrorKind::Fatal => ExitCode::from(1),
            }
        }
    }
}
