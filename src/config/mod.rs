//! Configuration: the main TOML file plus one file per source table, `${VAR}`
//! interpolation from the environment, and validation of everything before any stage
//! starts. Every error names the file and the key at fault.

mod model;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use model::{parse_duration, Format, KafkaConfig, OnError, SchemaEvolution, SnapshotMode};
use model::{RawConfig, TableConfig};

use crate::event::TableName;
use crate::pg::PgUrl;

/// A configuration problem: which file, which key, what is wrong and what to do.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    /// Dotted key path (`source.url`), empty when the whole file is at fault.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(f, "{}: {}: {}", self.file.display(), self.key, self.message)
        }
    }
}

fn err(file: &Path, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        file: file.to_path_buf(),
        key: key.into(),
        message: message.into(),
    }
}

/// Key material of `hmac` transforms. Its `Debug` never shows it.
#[derive(Clone)]
pub struct PhiKey(pub Vec<u8>);

impl fmt::Debug for PhiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PhiKey(<secret>)")
    }
}

/// The validated configuration.
#[derive(Debug)]
pub struct Config {
    /// The main file, for messages.
    pub path: PathBuf,
    pub source: Source,
    /// The HMAC key of `hmac` transforms; present whenever a table uses one.
    pub phi_key: Option<PhiKey>,
    pub kafka: KafkaConfig,
    pub sink: Option<Sink>,
    /// `None` when `[http].listen` is empty.
    pub http_listen: Option<String>,
    pub tables: Vec<Table>,
}

#[derive(Debug)]
pub struct Source {
    pub url: PgUrl,
    pub slot: String,
    pub publication: String,
    pub heartbeat_interval: Duration,
    pub snapshot: SnapshotMode,
    pub snapshot_workers: usize,
    pub snapshot_chunk_rows: u64,
    /// `logical_decoding_work_mem` for the streaming session, in kB; `None`: the
    /// server's setting.
    pub decoding_work_mem_kb: Option<u64>,
}

#[derive(Debug)]
pub struct Sink {
    pub url: PgUrl,
    pub consumer: String,
    /// Consumer group mode: several sinks split the partitions.
    pub group: Option<String>,
    pub create_tables: bool,
    pub schema_evolution: SchemaEvolution,
    pub on_error: OnError,
    pub batch_max_events: usize,
    pub batch_max_bytes: usize,
    pub batch_linger: Duration,
    /// Write `pgferry.ledger` (see `sink::ledger`).
    pub ledger: bool,
    /// Concurrent target connections, each applying its share of the partitions.
    pub workers: usize,
}

/// One configured source table.
#[derive(Debug, Clone)]
pub struct Table {
    /// The file (or main file) that configures it, for messages.
    pub origin: PathBuf,
    pub source: TableName,
    pub target: TableName,
    /// Key columns; `None` = the primary key.
    pub key: Option<Vec<String>>,
    pub exclude: BTreeSet<String>,
    pub rename: BTreeMap<String, String>,
    /// Source column -> transform (see [`crate::event::Transform`]).
    pub transform: BTreeMap<String, crate::event::Transform>,
    /// Copied by snapshots (`snapshot = false` in its file opts out).
    pub snapshot: bool,
    /// `where = "…"`: the publication's row filter for this table.
    pub row_filter: Option<String>,
}

impl Config {
    /// Load and validate the main file and its table files.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = read_toml(path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let source = Source {
            url: parse_url(path, "source.url", &raw.source.url)?,
            slot: validate_slot(path, &raw.source.slot)?,
            publication: non_empty(path, "source.publication", raw.source.publication)?,
            heartbeat_interval: raw.source.heartbeat_interval,
            snapshot: raw.source.snapshot,
            snapshot_workers: match raw.source.snapshot_workers {
                Some(0) => return Err(err(path, "source.snapshot_workers", "must be at least 1")),
                Some(n) => n,
                None => std::thread::available_parallelism().map_or(2, |n| n.get()),
            },
            snapshot_chunk_rows: match raw.source.snapshot_chunk_rows {
                0 => {
                    return Err(err(
                        path,
                        "source.snapshot_chunk_rows",
                        "must be at least 1",
                    ))
                }
                n => n,
            },
            decoding_work_mem_kb: match &raw.source.logical_decoding_work_mem {
                None => None,
                Some(text) => Some(
                    parse_work_mem(text)
                        .map_err(|m| err(path, "source.logical_decoding_work_mem", m))?,
                ),
            },
        };
        if source.heartbeat_interval < Duration::from_millis(100) {
            return Err(err(
                path,
                "source.heartbeat_interval",
                "must be at least 100ms",
            ));
        }
        let sink = match raw.sink {
            Some(s) => {
                if s.group.as_deref().is_some_and(|g| g.trim().is_empty()) {
                    return Err(err(
                        path,
                        "sink.group",
                        "must not be empty (leave it out for one sink reading all partitions)",
                    ));
                }
                if s.batch_max_events == 0 || s.batch_max_bytes == 0 {
                    return Err(err(
                        path,
                        "sink.batch_max_events",
                        "batch limits must be at least 1",
                    ));
                }
                if s.workers == 0 || s.workers > 64 {
                    return Err(err(
                        path,
                        "sink.workers",
                        "must be between 1 and 64 (target connections that apply in parallel)",
                    ));
                }
                Some(Sink {
                    url: parse_url(path, "sink.url", &s.url)?,
                    consumer: non_empty(path, "sink.consumer", s.consumer)?,
                    group: s.group,
                    create_tables: s.create_tables,
                    schema_evolution: s.schema_evolution,
                    on_error: s.on_error,
                    batch_max_events: s.batch_max_events,
                    batch_max_bytes: s.batch_max_bytes,
                    batch_linger: s.batch_linger,
                    ledger: s.ledger,
                    workers: s.workers,
                })
            }
            None => None,
        };
        if raw.kafka.topic_prefix.is_empty() || !raw.kafka.topic_prefix.chars().all(topic_char) {
            return Err(err(
                path,
                "kafka.topic_prefix",
                "must be non-empty and use only letters, digits, '.', '_' and '-'",
            ));
        }
        if raw.kafka.format == Format::Avro && raw.kafka.json_schemas.is_some() {
            return Err(err(
                path,
                "kafka.json_schemas",
                "applies only to format = \"json\": remove it, or set kafka.format = \"json\"",
            ));
        }
        if raw.kafka.partitions < 1 {
            return Err(err(path, "kafka.partitions", "must be at least 1"));
        }
        if raw.kafka.replication_factor == 0 || raw.kafka.replication_factor < -1 {
            return Err(err(
                path,
                "kafka.replication_factor",
                "must be -1 (broker default) or at least 1",
            ));
        }
        for key in raw.kafka.properties.keys() {
            if let Some(why) = durability_property(key) {
                return Err(err(
                    path,
                    format!("kafka.properties.\"{key}\""),
                    format!("pgferry sets {key} itself and does not let it be changed: {why}; remove it"),
                ));
            }
        }
        if let Some(m) = raw.kafka.min_insync_replicas {
            let rf = raw.kafka.replication_factor;
            if m == 0 || (rf > 0 && m as i32 > rf) {
                return Err(err(
                    path,
                    "kafka.min_insync_replicas",
                    format!("must be at least 1 and at most kafka.replication_factor ({rf})"),
                ));
            }
        }
        if !(1 << 20..=1 << 30).contains(&raw.kafka.max_message_bytes) {
            return Err(err(
                path,
                "kafka.max_message_bytes",
                "must be between 1 MiB (1048576) and 1 GiB",
            ));
        }
        if raw.kafka.brokers.trim().is_empty() {
            return Err(err(
                path,
                "kafka.brokers",
                "must name at least one broker (host:port)",
            ));
        }
        let mut tables = Vec::new();
        for (i, t) in raw.tables.into_iter().enumerate() {
            tables.push(validate_table(path, &format!("tables[{i}]."), t)?);
        }
        if let Some(dir) = &raw.tables_dir {
            let dir = base.join(dir);
            let entries = std::fs::read_dir(&dir).map_err(|e| {
                err(
                    path,
                    "tables_dir",
                    format!("cannot read directory {}: {e}", dir.display()),
                )
            })?;
            let mut files: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                .collect();
            files.sort();
            for file in files {
                let t: TableConfig = read_toml(&file)?;
                tables.push(validate_table(&file, "", t)?);
            }
        }
        let phi_key = phi_key(path, base, &raw.phi, &tables)?;
        let mut seen: BTreeMap<&TableName, &Path> = BTreeMap::new();
        for t in &tables {
            if let Some(first) = seen.insert(&t.source, &t.origin) {
                return Err(err(
                    &t.origin,
                    "source",
                    format!(
                        "table {} is already configured in {}; configure each table once",
                        t.source,
                        first.display()
                    ),
                ));
            }
        }
        Ok(Config {
            path: path.to_path_buf(),
            source,
            phi_key,
            kafka: raw.kafka,
            sink,
            http_listen: Some(raw.http.listen).filter(|l| !l.is_empty()),
            tables,
        })
    }

    pub fn table(&self, name: &TableName) -> Option<&Table> {
        self.tables.iter().find(|t| &t.source == name)
    }
}

/// librdkafka settings (and their aliases) that pgferry's durability contract depends
/// on. A raw property that changed them could confirm the slot past events Kafka never
/// stored, or skip offsets in the sink, so they are refused rather than passed through.
fn durability_property(key: &str) -> Option<&'static str> {
    Some(match key {
        "acks" | "request.required.acks" => "every event must be acknowledged by all in-sync replicas (acks=all) before the slot is confirmed",
        "enable.idempotence" | "enable.gapless.guarantee" => "idempotence keeps retries from reordering or doubling events within a partition",
        "max.in.flight.requests.per.connection" | "max.in.flight" => "with more than one request in flight, a failed request on a partition new to the producer can be overtaken, and librdkafka then reports its messages delivered though the broker never wrote them",
        "message.timeout.ms" | "delivery.timeout.ms" | "message.send.max.retries" | "retries" => "a message is retried until the brokers take it; giving up would drop it",
        "enable.auto.commit" | "enable.auto.offset.store" | "auto.commit.interval.ms" => "the sink's position lives in the target, committed with the rows",
        "auto.offset.reset" => "an offset that is out of range must stop the sink, never skip to another place",
        "isolation.level" => "the sink reads what the source produced, without a transactional filter",
        _ => return None,
    })
}

fn topic_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// Parse a TOML file, interpolate `${VAR}` in its strings, and deserialize it, naming
/// the file and the key path on any failure.
fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| err(path, "", format!("cannot read the file: {e}")))?;
    let mut table: toml::Table =
        toml::from_str(&text).map_err(|e| err(path, "", format!("not valid TOML: {e}")))?;
    for (k, v) in table.iter_mut() {
        interpolate(path, k, v)?;
    }
    serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
        let key = e.path().to_string();
        let key = if key == "." { String::new() } else { key };
        err(path, key, e.into_inner().to_string())
    })
}

fn interpolate(path: &Path, key: &str, value: &mut toml::Value) -> Result<(), ConfigError> {
    match value {
        toml::Value::String(s) => *s = expand_env(s).map_err(|m| err(path, key, m))?,
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                interpolate(path, &format!("{key}[{i}]"), item)?;
            }
        }
        toml::Value::Table(t) => {
            for (k, v) in t.iter_mut() {
                interpolate(path, &format!("{key}.{k}"), v)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// Replace `${NAME}` (and `${NAME:-default}`) from the environment; `$$` is a `$`.
fn expand_env(s: &str) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('{') {
            let end = body
                .find('}')
                .ok_or_else(|| format!("unterminated ${{ in {s:?}: write ${{NAME}}"))?;
            let (name, default) = match body[..end].split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (&body[..end], None),
            };
            let valid = !name.is_empty()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !name.starts_with(|c: char| c.is_ascii_digit());
            if !valid {
                return Err(format!(
                    "${{{name}}} is not a valid environment variable name"
                ));
            }
            match (std::env::var(name), default) {
                (Ok(v), _) => out.push_str(&v),
                (Err(_), Some(d)) => out.push_str(d),
                (Err(_), None) => {
                    return Err(format!(
                        "environment variable {name} is not set; export it or write ${{{name}:-default}}"
                    ))
                }
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn parse_url(file: &Path, key: &str, text: &str) -> Result<PgUrl, ConfigError> {
    PgUrl::parse(text).map_err(|e| err(file, key, e.to_string()))
}

fn non_empty(file: &Path, key: &str, v: String) -> Result<String, ConfigError> {
    if v.trim().is_empty() {
        return Err(err(file, key, "must not be empty"));
    }
    Ok(v)
}

/// A PostgreSQL memory setting (`"256MB"`, `"65536kB"`, `"1GB"`; a bare number is kB,
/// as the server reads it) in kB, within `logical_decoding_work_mem`'s range.
fn parse_work_mem(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = (&t[..split], t[split..].trim());
    let n: u64 = digits.parse().map_err(|_| {
        format!("{text:?} is not a memory size: write a whole number with a unit, e.g. \"256MB\"")
    })?;
    // The server's own units for memory settings, case as it requires.
    let kb = match unit {
        "" | "kB" => Some(n),
        "B" => Some(n / 1024),
        "MB" => n.checked_mul(1 << 10),
        "GB" => n.checked_mul(1 << 20),
        "TB" => n.checked_mul(1 << 30),
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {unit:?}; PostgreSQL's are B, kB, MB, GB and TB"
            ))
        }
    };
    // PostgreSQL's bounds for the setting: 64kB to MAX_KILOBYTES (INT_MAX kB).
    match kb {
        Some(kb) if (64..=i32::MAX as u64).contains(&kb) => Ok(kb),
        _ => Err(format!(
            "{text:?} is outside PostgreSQL's range for logical_decoding_work_mem (64kB to 2147483647kB)"
        )),
    }
}

fn validate_slot(file: &Path, slot: &str) -> Result<String, ConfigError> {
    let ok = !slot.is_empty()
        && slot.len() <= 63
        && slot
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !ok {
        return Err(err(
            file,
            "source.slot",
            format!("{slot:?} is not a valid slot name: use 1-63 lower-case letters, digits and underscores"),
        ));
    }
    Ok(slot.to_string())
}

/// Parse `schema.table` (`"Quoted"."Names"` allowed; no schema means `public`).
pub fn parse_table_name(text: &str) -> Result<TableName, String> {
    let mut parts = Vec::new();
    let mut chars = text.trim().chars().peekable();
    let mut cur = String::new();
    let mut quoted_part = false;
    while let Some(c) = chars.next() {
        match c {
            '"' if cur.is_empty() && !quoted_part => {
                quoted_part = true;
                loop {
                    match chars.next() {
                        Some('"') if chars.peek() == Some(&'"') => {
                            chars.next();
                            cur.push('"');
                        }
                        Some('"') => break,
                        Some(c) => cur.push(c),
                        None => return Err(format!("unterminated quote in table name {text:?}")),
                    }
                }
            }
            '.' => {
                parts.push(std::mem::take(&mut cur));
                quoted_part = false;
            }
            c if quoted_part => {
                return Err(format!("unexpected {c:?} after a quoted name in {text:?}"))
            }
            c => cur.push(c),
        }
    }
    parts.push(cur);
    let bad = || format!("{text:?} is not a table name: write schema.table, like public.patients");
    match parts.as_slice() {
        [t] if !t.is_empty() => Ok(TableName::new("public", t.clone())),
        [s, t] if !s.is_empty() && !t.is_empty() => Ok(TableName::new(s.clone(), t.clone())),
        _ => Err(bad()),
    }
}

fn validate_table(file: &Path, prefix: &str, t: TableConfig) -> Result<Table, ConfigError> {
    let key = |k: &str| format!("{prefix}{k}");
    let source = parse_table_name(&t.source).map_err(|m| err(file, key("source"), m))?;
    let target = match &t.target {
        Some(n) => parse_table_name(n).map_err(|m| err(file, key("target"), m))?,
        None => source.clone(),
    };
    let exclude: BTreeSet<String> = t.exclude.into_iter().collect();
    if let Some(k) = &t.key {
        if k.is_empty() {
            return Err(err(
                file,
                key("key"),
                "must name at least one column (or leave it out to use the primary key)",
            ));
        }
        if let Some(c) = k.iter().find(|c| exclude.contains(*c)) {
            return Err(err(
                file,
                key("key"),
                format!("key column {c:?} is also in exclude; a key column must be published"),
            ));
        }
    }
    for (from, to) in &t.rename {
        if exclude.contains(from) {
            return Err(err(
                file,
                key("rename"),
                format!("column {from:?} is excluded, so it cannot be renamed"),
            ));
        }
        if to.is_empty() {
            return Err(err(
                file,
                key("rename"),
                format!("column {from:?} is renamed to an empty name"),
            ));
        }
    }
    let mut targets = BTreeSet::new();
    for to in t.rename.values() {
        if !targets.insert(to) {
            return Err(err(
                file,
                key("rename"),
                format!("two columns are renamed to {to:?}"),
            ));
        }
    }
    for column in t.transform.keys() {
        if exclude.contains(column) {
            return Err(err(
                file,
                key("transform"),
                format!("column {column:?} is excluded; it cannot also be transformed"),
            ));
        }
    }
    Ok(Table {
        origin: file.to_path_buf(),
        source,
        target,
        key: t.key,
        exclude,
        rename: t.rename,
        transform: t.transform,
        snapshot: t.snapshot,
        row_filter: match t.row_filter {
            Some(w) if w.trim().is_empty() => {
                return Err(err(
                    file,
                    format!("{prefix}where"),
                    "must not be empty (leave it out to publish every row)",
                ))
            }
            Some(w) if w.contains(';') => {
                return Err(err(
                    file,
                    format!("{prefix}where"),
                    "must be one SQL expression (no ';')",
                ))
            }
            w => w,
        },
    })
}

/// The `[phi]` key, required (and only then read) when some table uses `hmac`.
fn phi_key(
    path: &Path,
    base: &Path,
    phi: &model::PhiConfig,
    tables: &[Table],
) -> Result<Option<PhiKey>, ConfigError> {
    let needed = tables.iter().find(|t| {
        t.transform
            .values()
            .any(|x| *x == crate::event::Transform::Hmac)
    });
    let key = match (&phi.key, &phi.key_file) {
        (Some(_), Some(_)) => {
            return Err(err(path, "phi", "set key or key_file, not both"));
        }
        (Some(k), None) => Some(k.as_bytes().to_vec()),
        (None, Some(file)) => {
            let file = base.join(file);
            let bytes = std::fs::read(&file).map_err(|e| {
                err(
                    path,
                    "phi.key_file",
                    format!("cannot read {}: {e}", file.display()),
                )
            })?;
            let text = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
            Some(text.strip_suffix(b"\r").unwrap_or(text).to_vec())
        }
        (None, None) => None,
    };
    match (key, needed) {
        (Some(k), _) if k.is_empty() => Err(err(path, "phi.key", "the key is empty")),
        (Some(k), _) if k.len() < 16 => Err(err(
            path,
            "phi.key",
            "the key is shorter than 16 bytes; use at least 32 random bytes",
        )),
        (None, Some(t)) => Err(err(
            &t.origin,
            "transform",
            format!(
                "table {} uses an hmac transform, but {} has no [phi] key or key_file; \
                 there is no default key: set key = \"${{PGFERRY_PHI_KEY}}\"",
                t.source,
                path.display()
            ),
        )),
        (k, _) => Ok(k.map(PhiKey)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        p
    }

    /// A fresh directory, removed with its files when the test ends.
    struct TempDir(PathBuf);

    impl std::ops::Deref for TempDir {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn tempdir(tag: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("pgferry-config-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }

    #[test]
    fn loads_main_file_table_files_and_inline_tables() {
        let d = tempdir("load");
        let main = write(
            &d,
            "pgferry.toml",
            r#"
tables_dir = "tables"
[source]
url = "postgres://u@h:5433/ehr"
[[tables]]
source = "public.visits"
"#,
        );
        write(&d, "tables/a.toml", "source = \"public.patients\"\ntarget = \"hosp.patients\"\nexclude = [\"ssn\"]\nrename = { name = \"full_name\" }\n");
        write(&d, "tables/ignored.txt", "not toml");
        let c = Config::load(&main).unwrap();
        assert_eq!(c.source.slot, "pgferry");
        assert_eq!(c.source.heartbeat_interval, Duration::from_secs(10));
        assert_eq!(c.http_listen.as_deref(), Some("127.0.0.1:9187"));
        let names: Vec<String> = c.tables.iter().map(|t| t.source.to_string()).collect();
        assert_eq!(names, ["public.visits", "public.patients"]);
        assert_eq!(c.tables[1].target.to_string(), "hosp.patients");
        assert_eq!(c.tables[1].rename["name"], "full_name");
    }

    #[test]
    fn decoding_work_mem_reads_postgresql_memory_units() {
        assert_eq!(parse_work_mem("256MB"), Ok(256 << 10));
        assert_eq!(parse_work_mem(" 1 GB "), Ok(1 << 20));
        assert_eq!(parse_work_mem("65536"), Ok(65536));
        assert_eq!(parse_work_mem("64kB"), Ok(64));
        for bad in [
            "",
            "MB",
            "256mb",
            "-1MB",
            "1.5GB",
            "63kB",
            "2TB",
            "99999999999999999999",
        ] {
            let e = parse_work_mem(bad).expect_err(bad);
            assert!(e.contains(&format!("{bad:?}")), "{bad}: {e}");
        }
        let d = tempdir("workmem");
        let main = write(
            &d,
            "main.toml",
            "[source]\nurl = \"postgres://u@h/d\"\nlogical_decoding_work_mem = \"256 megabytes\"\n",
        );
        let e = Config::load(&main).unwrap_err().to_string();
        assert!(
            e.contains("main.toml")
                && e.contains("source.logical_decoding_work_mem")
                && e.contains("unknown unit"),
            "{e}"
        );
        let ok = write(
            &d,
            "ok.toml",
            "[source]\nurl = \"postgres://u@h/d\"\nlogical_decoding_work_mem = \"512MB\"\n",
        );
        assert_eq!(
            Config::load(&ok).unwrap().source.decoding_work_mem_kb,
            Some(512 << 10)
        );
    }

    #[test]
    fn unknown_keys_name_file_and_key() {
        let d = tempdir("unknown");
        let main = write(
            &d,
            "main.toml",
            "[source]\nurl = \"postgres://u@h/d\"\nslott = \"x\"\n",
        );
        let e = Config::load(&main).unwrap_err();
        assert!(e.file.ends_with("main.toml"));
        assert_eq!(e.key, "source.slott");
        assert!(e.message.contains("unknown field `slott`"), "{e}");

        write(
            &d,
            "t/x.toml",
            "source = \"public.a\"\nexclude = [\"b\"]\nrenamed = {}\n",
        );
        let main = write(
            &d,
            "main2.toml",
            "tables_dir = \"t\"\n[source]\nurl = \"postgres://u@h/d\"\n",
        );
        let e = Config::load(&main).unwrap_err();
        assert!(e.file.ends_with("t/x.toml"), "{e}");
        assert!(e.message.contains("renamed"), "{e}");
    }

    #[test]
    fn interpolates_environment_variables() {
        std::env::set_var("PGFERRY_TEST_PW", "s3cret");
        assert_eq!(expand_env("a${PGFERRY_TEST_PW}b").unwrap(), "as3cretb");
        assert_eq!(expand_env("${PGFERRY_TEST_UNSET:-x}").unwrap(), "x");
        assert_eq!(expand_env("$$5 and $x").unwrap(), "$5 and $x");
        assert!(expand_env("${PGFERRY_TEST_UNSET}")
            .unwrap_err()
            .contains("PGFERRY_TEST_UNSET"));
        assert!(expand_env("${oops").is_err());

        let d = tempdir("env");
        let main = write(
            &d,
            "m.toml",
            "[source]\nurl = \"postgres://u:${PGFERRY_TEST_MISSING}@h/d\"\n",
        );
        let e = Config::load(&main).unwrap_err();
        assert_eq!(e.key, "source.url");
        assert!(e.message.contains("PGFERRY_TEST_MISSING"));
    }

    #[test]
    fn rejects_bad_values_with_their_key() {
        let d = tempdir("bad");
        let cases = [
            ("[source]\nurl = \"mysql://x\"\n", "source.url"),
            ("[source]\nurl = \"postgres://u@h/d\"\nslot = \"Bad-Slot\"\n", "source.slot"),
            ("[source]\nurl = \"postgres://u@h/d\"\nheartbeat_interval = \"soon\"\n", "source.heartbeat_interval"),
            ("[source]\nurl = \"postgres://u@h/d\"\n[kafka]\nformat = \"xml\"\n", "kafka.format"),
            ("[source]\nurl = \"postgres://u@h/d\"\n[kafka]\njson_schemas = false\n", "kafka.json_schemas"),
            ("[source]\nurl = \"postgres://u@h/d\"\n[[tables]]\nsource = \"a.b.c\"\n", "tables[0].source"),
            ("[source]\nurl = \"postgres://u@h/d\"\n[sink]\nurl = \"postgres://u@h/t\"\nworkers = 0\n", "sink.workers"),
            ("[source]\nurl = \"postgres://u@h/d\"\n[[tables]]\nsource = \"a\"\nkey = [\"id\"]\nexclude = [\"id\"]\n", "tables[0].key"),
        ];
        for (i, (text, key)) in cases.iter().enumerate() {
            let f = write(&d, &format!("c{i}.toml"), text);
            let e = Config::load(&f).unwrap_err();
            assert_eq!(&e.key, key, "{text} -> {e}");
        }
    }

    #[test]
    fn the_ledger_is_on_unless_turned_off() {
        let d = tempdir("ledger");
        let base = "[source]\nurl = \"postgres://u@h/d\"\n[sink]\nurl = \"postgres://u@h/t\"\n";
        let on = write(&d, "on.toml", base);
        assert!(Config::load(&on).unwrap().sink.unwrap().ledger);
        let off = write(&d, "off.toml", &format!("{base}ledger = false\n"));
        assert!(!Config::load(&off).unwrap().sink.unwrap().ledger);
        let bad = write(&d, "bad.toml", &format!("{base}ledger = \"no\"\n"));
        assert_eq!(Config::load(&bad).unwrap_err().key, "sink.ledger");
    }

    #[test]
    fn properties_that_weaken_durability_are_refused() {
        let d = tempdir("durability");
        for (i, key) in [
            "acks",
            "request.required.acks",
            "enable.idempotence",
            "max.in.flight.requests.per.connection",
            "message.timeout.ms",
            "enable.auto.commit",
            "auto.offset.reset",
        ]
        .iter()
        .enumerate()
        {
            let text = format!(
                "[source]\nurl = \"postgres://u@h/d\"\n[kafka.properties]\n\"{key}\" = \"1\"\n"
            );
            let f = write(&d, &format!("p{i}.toml"), &text);
            let e = Config::load(&f).unwrap_err();
            assert_eq!(e.key, format!("kafka.properties.\"{key}\""), "{e}");
            assert!(e.message.contains("remove it"), "{e}");
        }
        let ok = write(
            &d,
            "ok.toml",
            "[source]\nurl = \"postgres://u@h/d\"\n[kafka.properties]\n\"compression.type\" = \"zstd\"\n\"security.protocol\" = \"SASL_SSL\"\n",
        );
        Config::load(&ok).unwrap();
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let d = tempdir("syntax");
        let f = write(&d, "syntax.toml", "[source\nurl=1");
        let e = Config::load(&f).unwrap_err();
        assert!(e.message.contains("not valid TOML"), "{e}");
        assert!(e.message.contains("line 1"), "{e}");
    }

    #[test]
    fn duplicate_tables_are_rejected() {
        let d = tempdir("dup");
        let main = write(&d, "m.toml", "[source]\nurl = \"postgres://u@h/d\"\n[[tables]]\nsource = \"public.a\"\n[[tables]]\nsource = \"a\"\n");
        let e = Config::load(&main).unwrap_err();
        assert!(e.message.contains("already configured"), "{e}");
    }

    #[test]
    fn parses_quoted_table_names() {
        assert_eq!(
            parse_table_name("\"My\".\"T.x\"").unwrap(),
            TableName::new("My", "T.x")
        );
        assert_eq!(
            parse_table_name("patients").unwrap(),
            TableName::new("public", "patients")
        );
        assert!(parse_table_name("a.").is_err());
        assert!(parse_table_name("\"a").is_err());
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;

    #[test]
    fn the_shipped_example_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/pgferry.toml");
        let c = Config::load(&path).unwrap();
        assert_eq!(c.tables.len(), 6);
        assert_eq!(c.tables[4].source.to_string(), "public.patients");
        assert_eq!(c.tables[4].rename["name"], "full_name");
        assert!(c.tables[4].exclude.contains("ssn"));
        assert!(c.sink.is_some());
    }
}
