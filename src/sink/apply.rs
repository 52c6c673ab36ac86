//! Batch apply: consecutive events of one table become multi-row statements, run in
//! one target transaction together with the checkpoint rows.
//!
//! - snapshot reads and inserts of a keyed table: a plain `COPY` into the table
//!   ([`copy_inserts`]; upserted instead once a key conflict shows the rows may exist);
//! - inserts and updates: `COPY` into the session's staging table of that width, then
//!   `INSERT … SELECT … ON CONFLICT (key) DO UPDATE`; every value travels as PostgreSQL
//!   text and is cast by the target column's own type, so nothing is lost on the way;
//! - updates with unchanged TOAST columns: `UPDATE … FROM unnest(…)` of the other
//!   columns only, leaving those columns untouched;
//! - an update that changes the key: delete the old key, upsert the new row;
//! - deletes: `DELETE … USING unnest(…)`; truncates: `TRUNCATE`.
//!
//! Per-key order holds: statements run in event order, and a run of one statement
//! keeps only the last image of each key.

use std::collections::HashMap;

use tokio_postgres::{Statement, Transaction};

use super::copy_binary::{self, Wire};
use super::decode::{Row, SinkEvent, SinkValue};
use super::statements::Statements;
use super::target::{Mapping, TargetTable};
use crate::event::{quote_ident, Op, TableName};

/// One value of a row: PostgreSQL text (borrowed from the decoded event), or null.
pub type Cell<'a> = Option<&'a str>;

/// One statement's worth of events; its values borrow from the events.
#[derive(Debug)]
pub enum Run<'a> {
    Upsert {
        table: TableName,
        /// Target column names, same for every row.
        columns: Vec<String>,
        rows: Vec<Vec<Cell<'a>>>,
        /// Every row is a snapshot read or an insert: they are tried with a plain
        /// COPY into the table first (see [`copy_inserts`]).
        inserts_only: bool,
    },
    /// Rows with unchanged TOAST columns (left out of `columns`): update only the
    /// sent columns of the target row matching `match_keys` (the old key when the
    /// key changed, which moves the row).
    Update {
        table: TableName,
        columns: Vec<String>,
        rows: Vec<Vec<Cell<'a>>>,
        match_keys: Vec<Vec<Cell<'a>>>,
    },
    Delete {
        table: TableName,
        key: Vec<String>,
        keys: Vec<Vec<Cell<'a>>>,
    },
    Truncate {
        table: TableName,
    },
}

impl Run<'_> {
    /// Snapshot reads and inserts of a keyed table, every key column sent: [`copy_inserts`]
    /// may load them (a key conflict then shows as a unique violation).
    pub fn is_keyed_inserts(&self, target: &TargetTable) -> bool {
        match self {
            Run::Upsert {
                inserts_only: true,
                columns,
                ..
            } => !target.key.is_empty() && target.key.iter().all(|k| columns.contains(k)),
            _ => false,
        }
    }

    pub fn table(&self) -> &TableName {
        match self {
            Run::Upsert { table, .. }
            | Run::Update { table, .. }
            | Run::Delete { table, .. }
            | Run::Truncate { table } => table,
        }
    }
}

/// Applied counts for metrics: (source table, op) -> n.
pub type Counts = HashMap<(String, &'static str), u64>;

/// The answer of the last lookup by table, kept: a batch's events mostly come in runs
/// of one table, and comparing two names costs less than hashing one.
pub struct LastTable<'a, V>(Option<(&'a TableName, V)>);

impl<V> Default for LastTable<'_, V> {
    fn default() -> Self {
        LastTable(None)
    }
}

impl<'a, V: Copy> LastTable<'a, V> {
    /// `look(table)`, or its answer for the same table the last time.
    pub fn get(&mut self, table: &'a TableName, look: impl FnOnce(&TableName) -> V) -> V {
        match self.0 {
            Some((t, v)) if t == table => v,
            _ => {
                let v = look(table);
                self.0 = Some((table, v));
                v
            }
        }
    }
}

/// Turn events into runs (in order). `tables` maps source tables to their mapping and
/// target description.
pub fn plan<'a>(
    events: &[&'a SinkEvent],
    tables: &HashMap<TableName, (Mapping, TargetTable)>,
    counts: &mut Counts,
) -> Vec<Run<'a>> {
    let mut runs: Vec<Run<'a>> = Vec::new();
    let mut stretch: Option<(&TableName, &'static str, u64)> = None;
    let mut last = LastTable::default();
    for event in events {
        let Some((mapping, target)) = last.get(&event.table, |t| tables.get(t)) else {
            continue;
        };
        let op_label = match event.op {
            Op::Create => "c",
            Op::Read => "r",
            Op::Update => "u",
            Op::Delete => "d",
            Op::Truncate => "t",
        };
        // Counted per stretch of one table and op (formatting the table's name for
        // every event cost more than applying some of them).
        match &mut stretch {
            Some((t, op, n)) if *t == &event.table && *op == op_label => *n += 1,
            _ => {
                if let Some((t, op, n)) = stretch.replace((&event.table, op_label, 1)) {
                    *counts.entry((t.to_string(), op)).or_default() += n;
                }
            }
        }
        let key = &target.key;
        let key_of = |row: &'a Row| -> Vec<Cell<'a>> {
            key.iter()
                .map(|k| {
                    row.iter()
                        .find(|(c, _)| mapping.column(c) == k)
                        .and_then(|(_, v)| match v {
                            SinkValue::Text(t) => Some(t.as_str()),
                            _ => None,
                        })
                })
                .collect()
        };
        match event.op {
            Op::Truncate => runs.push(Run::Truncate {
                table: mapping.target.clone(),
            }),
            Op::Delete => {
                if let Some(before) = &event.before {
                    push_delete(&mut runs, &mapping.target, key, key_of(before));
                }
            }
            Op::Create | Op::Read | Op::Update => {
                let Some(after) = &event.after else { continue };
                let partial = after.iter().any(|(_, v)| matches!(v, SinkValue::Unchanged));
                // The new key matters only to an update in place or a moved key.
                let new_key = (partial || event.before.is_some()).then(|| key_of(after));
                let old_key =
                    event.before.as_ref().map(key_of).filter(|old| {
                        old.iter().all(Option::is_some) && Some(old) != new_key.as_ref()
                    });
                let mut values = Vec::with_capacity(after.len());
                for (_, v) in after.iter() {
                    match v {
                        SinkValue::Unchanged => {}
                        SinkValue::Null => values.push(None),
                        SinkValue::Text(t) => values.push(Some(t.as_str())),
                    }
                }
                // The target names of the sent columns, compared with the last run's
                // before any is allocated: consecutive events almost always match.
                let sent = || {
                    after
                        .iter()
                        .filter(|(_, v)| !matches!(v, SinkValue::Unchanged))
                        .map(|(c, _)| mapping.column(c))
                };
                let same_columns = |columns: &[String]| {
                    columns.len() == values.len() && sent().zip(columns).all(|(a, b)| a == b)
                };
                let columns = || sent().map(str::to_string).collect::<Vec<String>>();
                if partial {
                    // The unchanged values exist only in the target row: update it in
                    // place (moving it when the key changed). A moved row gets a
                    // statement of its own, so no other row of that statement needs to
                    // see it at its new key.
                    let moved = old_key.is_some();
                    let match_key = old_key.or(new_key).unwrap_or_default();
                    match runs.last_mut() {
                        Some(Run::Update {
                            table,
                            columns: c,
                            rows,
                            match_keys,
                        }) if !moved && *table == mapping.target && same_columns(c) => {
                            rows.push(values);
                            match_keys.push(match_key);
                        }
                        _ => runs.push(Run::Update {
                            table: mapping.target.clone(),
                            columns: columns(),
                            rows: vec![values],
                            match_keys: vec![match_key],
                        }),
                    }
                    if moved {
                        runs.push(Run::Truncate {
                            table: TableName::new("", ""),
                        });
                    }
                    continue;
                }
                if let Some(old) = old_key {
                    push_delete(&mut runs, &mapping.target, key, old);
                }
                match runs.last_mut() {
                    Some(Run::Upsert {
                        table,
                        columns: c,
                        rows,
                        inserts_only,
                    }) if *table == mapping.target && same_columns(c) => {
                        rows.push(values);
                        *inserts_only &= matches!(event.op, Op::Read | Op::Create);
                    }
                    _ => runs.push(Run::Upsert {
                        table: mapping.target.clone(),
                        columns: columns(),
                        rows: vec![values],
                        inserts_only: matches!(event.op, Op::Read | Op::Create),
                    }),
                }
            }
        }
    }
    if let Some((t, op, n)) = stretch {
        *counts.entry((t.to_string(), op)).or_default() += n;
    }
    // (An empty table name only fenced a moved row's statement.)
    runs.retain(|r| !r.table().name.is_empty());
    // One statement cannot touch a row twice: keep the last image of each key.
    for run in &mut runs {
        match run {
            Run::Upsert {
                table,
                columns,
                rows,
                ..
            } => {
                let Some((_, target)) = tables.values().find(|(m, _)| &m.target == table) else {
                    continue;
                };
                let key_idx: Vec<usize> = target
                    .key
                    .iter()
                    .filter_map(|k| columns.iter().position(|c| c == k))
                    .collect();
                if key_idx.len() != target.key.len() || rows.len() < 2 {
                    continue;
                }
                let keys: Vec<Vec<Option<&str>>> = rows
                    .iter()
                    .map(|row| key_idx.iter().map(|&k| row[k]).collect())
                    .collect();
                let keep = last_of_each(&keys);
                if keep.len() < rows.len() {
                    let mut old: Vec<Option<Vec<Cell<'_>>>> =
                        std::mem::take(rows).into_iter().map(Some).collect();
                    *rows = keep.iter().filter_map(|&i| old[i].take()).collect();
                }
            }
            Run::Update {
                rows, match_keys, ..
            } if rows.len() > 1 => {
                let keep = last_of_each(match_keys);
                if keep.len() < rows.len() {
                    let (old_rows, old_keys) = (std::mem::take(rows), std::mem::take(match_keys));
                    *rows = keep.iter().map(|&i| old_rows[i].clone()).collect();
                    *match_keys = keep.iter().map(|&i| old_keys[i].clone()).collect();
                }
            }
            _ => {}
        }
    }
    runs
}

/// Indices of the last occurrence of each key, in order.
fn last_of_each<K: std::hash::Hash + Eq>(keys: &[K]) -> Vec<usize> {
    let mut last: HashMap<&K, usize> = HashMap::with_capacity(keys.len());
    for (i, k) in keys.iter().enumerate() {
        last.insert(k, i);
    }
    let mut keep: Vec<usize> = last.into_values().collect();
    keep.sort_unstable();
    keep
}

fn push_delete<'a>(
    runs: &mut Vec<Run<'a>>,
    table: &TableName,
    key: &[String],
    values: Vec<Cell<'a>>,
) {
    match runs.last_mut() {
        Some(Run::Delete { table: t, keys, .. }) if t == table => {
            if !keys.contains(&values) {
                keys.push(values)
            }
        }
        _ => runs.push(Run::Delete {
            table: table.clone(),
            key: key.to_vec(),
            keys: vec![values],
        }),
    }
}

/// Transpose rows into one text array per column (the unnest parameters).
fn columns_of<'a>(rows: &[Vec<Cell<'a>>], n: usize) -> Vec<Vec<Cell<'a>>> {
    let mut cols = vec![Vec::with_capacity(rows.len()); n];
    for row in rows {
        for (i, v) in row.iter().enumerate().take(n) {
            cols[i].push(*v);
        }
    }
    cols
}

fn unnest(n: usize, names: &[String]) -> String {
    let params: Vec<String> = (1..=n).map(|i| format!("${i}::text[]")).collect();
    let aliases: Vec<String> = names.iter().map(|c| quote_ident(c)).collect();
    format!("unnest({}) as u({})", params.join(", "), aliases.join(", "))
}

fn cast(column: &str, target: &TargetTable) -> String {
    let ty = target
        .types
        .get(column)
        .map(String::as_str)
        .unwrap_or("text");
    format!("u.{}::{ty}", quote_ident(column))
}

/// The session's staging table for runs of `width` columns (all text).
fn stage_table(width: usize) -> String {
    format!("pg_temp.pgferry_stage_{width}")
}

/// COPY data is sent in pieces of this size as it is written: the server parses and
/// inserts the first rows while the rest are formatted, and no whole-batch buffer is
/// held.
const PIECE: usize = 128 << 10;

/// COPY `rows` into `table` (`columns`: its column list) in text format.
async fn copy_rows(
    tx: &Transaction<'_>,
    statements: &mut Statements,
    table: &str,
    columns: &str,
    width: usize,
    rows: &[Vec<Cell<'_>>],
) -> Result<(), tokio_postgres::Error> {
    let text_row = |buf: &mut bytes::BytesMut, row: &[Cell<'_>]| {
        for (i, v) in row.iter().enumerate().take(width) {
            if i > 0 {
                buf.extend_from_slice(b"\t");
            }
            match v {
                None => buf.extend_from_slice(b"\\N"),
                Some(text) => copy_escape(buf, text),
            }
        }
        buf.extend_from_slice(b"\n");
        Ok::<_, tokio_postgres::Error>(())
    };
    let statement = statements
        .get(tx, &format!("copy {table} ({columns}) from stdin"))
        .await?;
    copy_in_pieces(tx, &statement, rows, |_| {}, text_row, |_| {}).await
}

/// Run the COPY `statement` with `rows` written by `row` between `start` and `end`,
/// sent in pieces of [`PIECE`] as they are written. An error from `row` drops the
/// unfinished COPY, which sends CopyFail: nothing of it stays.
async fn copy_in_pieces<'a, E: From<tokio_postgres::Error>>(
    tx: &Transaction<'_>,
    statement: &Statement,
    rows: &[Vec<Cell<'a>>],
    start: impl FnOnce(&mut bytes::BytesMut),
    mut row: impl FnMut(&mut bytes::BytesMut, &[Cell<'a>]) -> Result<(), E>,
    end: impl FnOnce(&mut bytes::BytesMut),
) -> Result<(), E> {
    use futures_util::SinkExt;
    let sink = tx.copy_in(statement).await?;
    futures_util::pin_mut!(sink);
    let mut buf = bytes::BytesMut::with_capacity(PIECE + 4096);
    start(&mut buf);
    for r in rows {
        row(&mut buf, r)?;
        if buf.len() >= PIECE {
            sink.send(buf.split().freeze()).await?;
        }
    }
    end(&mut buf);
    if !buf.is_empty() {
        sink.send(buf.freeze()).await?;
    }
    sink.finish().await?;
    Ok(())
}

/// COPY text format: backslash, tab, newline and carriage return are escaped.
/// Runs without such a byte are copied whole (most values have none).
fn copy_escape(buf: &mut bytes::BytesMut, text: &str) {
    let mut rest = text.as_bytes();
    while let Some(i) = rest
        .iter()
        .position(|b| matches!(b, b'\\' | b'\t' | b'\n' | b'\r'))
    {
        buf.extend_from_slice(&rest[..i]);
        buf.extend_from_slice(match rest[i] {
            b'\\' => b"\\\\",
            b'\t' => b"\\t",
            b'\n' => b"\\n",
            _ => b"\\r",
        });
        rest = &rest[i + 1..];
    }
    buf.extend_from_slice(rest);
}

/// Load a run of snapshot reads and inserts ([`Run::is_keyed_inserts`]) with a plain
/// COPY into the table, no staging and no upsert: what an initial snapshot into an
/// empty table, or a stream of new rows, amounts to. An absent key is inserted by COPY
/// exactly as the upsert would insert it, and each column's input function checks the
/// value as the upsert's cast does. (Earlier runs of the batch, a delete of the same
/// key included, ran before in the same transaction.)
///
/// With `binary`, and every column of a type [`copy_binary`] knows, the COPY is in
/// binary format, which the target parses at a fraction of text's cost; a value that
/// has no certain binary form aborts it with [`CopyError::NotBinary`], and the caller
/// loads the batch again as text; so does the target refusing the binary data in a
/// way its text form might not be refused ([`CopyError::Refused`]): the text form, not
/// pgferry's encoding, decides whether a value is poison.
///
/// A key already in the table (a re-copied row, or a table that was not empty) fails
/// the COPY with a unique violation ([`is_key_conflict`]); the caller then rolls the
/// whole transaction back and applies the batch again with upserts. Not a savepoint:
/// rows written in one carry the subtransaction's xid, which the ledger does not name,
/// and the ledger promises that every target row was written by a transaction it
/// names. Not a lookup of the keys first either: probing the index for every key of
/// every batch cost the target as much as a third of the COPY itself.
pub async fn copy_inserts(
    tx: &Transaction<'_>,
    statements: &mut Statements,
    run: &Run<'_>,
    binary: bool,
) -> Result<u64, CopyError> {
    let Run::Upsert { columns, rows, .. } = run else {
        return Ok(0);
    };
    let table = run.table().quoted();
    let wires = if binary {
        live_wires(tx, statements, &table, columns).await?
    } else {
        None
    };
    let format = match wires {
        Some(wires) => {
            copy_binary_rows(tx, statements, &table, columns, &wires, rows)
                .await
                .map_err(|e| match e {
                    CopyError::Postgres(e) if binary_may_be_at_fault(&e) => CopyError::Refused(e),
                    other => other,
                })?;
            "binary"
        }
        None => {
            let list: Vec<String> = columns.iter().map(|c| quote_ident(c)).collect();
            copy_rows(
                tx,
                statements,
                &table,
                &list.join(", "),
                columns.len(),
                rows,
            )
            .await?;
            "text"
        }
    };
    tracing::debug!(table = %run.table(), rows = rows.len(), format, "copied rows into the table");
    Ok(rows.len() as u64)
}

/// Why [`copy_inserts`] did not load its run.
#[derive(Debug)]
pub enum CopyError {
    Postgres(tokio_postgres::Error),
    /// A value of this column has no binary form [`copy_binary`] is certain of; the
    /// COPY was aborted (its transaction with it).
    NotBinary {
        column: String,
    },
    /// The target refused the binary COPY with an error that its text form might not
    /// meet: a data exception (class 22: a value, or the binary format itself, as
    /// `22P03`) or a protocol violation (`08P01`). The COPY was aborted (its
    /// transaction with it).
    Refused(tokio_postgres::Error),
}

/// Whether an error from a binary COPY may be the binary format's own doing. Binary
/// values are pgferry's encoding, not the target's input functions: before a value is
/// judged poison, or a batch retried forever, the text form decides. A unique
/// violation (class 23) and transient errors (a lost connection, a serialization
/// failure) mean the same in both forms and keep their own handling.
pub fn binary_may_be_at_fault(e: &tokio_postgres::Error) -> bool {
    e.code()
        .is_some_and(|c| c.code().starts_with("22") || c.code() == "08P01")
}

impl From<tokio_postgres::Error> for CopyError {
    fn from(e: tokio_postgres::Error) -> Self {
        CopyError::Postgres(e)
    }
}

/// The binary encoding of each of `columns`, from the table's column types as they are
/// now, or `None` when one has no encoder in [`copy_binary`]. Binary values carry no
/// type: bytes encoded for a type the column no longer has would be read as the new
/// one (an `int8` 1 as the `float8` 5e-324, an `int4` 5 as the date 2000-01-06), so a
/// cached description will not do. The COPY's own lock is taken first, so that no
/// `ALTER … TYPE` can come between this look and the COPY.
///
/// Also `None` on a server older than PostgreSQL 12, whose `float4` input rounded
/// through `double`, which a binary `float4` would not.
async fn live_wires(
    tx: &Transaction<'_>,
    statements: &mut Statements,
    table: &str,
    columns: &[String],
) -> Result<Option<Vec<Wire>>, tokio_postgres::Error> {
    let types = statements
        .get(
            tx,
            "select a.attname::text, a.atttypid, current_setting('server_version_num')::int \
             from pg_attribute a \
             where a.attrelid = $1::text::regclass and a.attnum > 0 and not a.attisdropped",
        )
        .await?;
    // One round trip: the server runs them in the order sent, the lock first.
    let lock = format!("lock table {table} in row exclusive mode");
    let ((), rows) =
        futures_util::future::try_join(tx.batch_execute(&lock), tx.query(&types, &[&table]))
            .await?;
    if rows.first().is_none_or(|r| r.get::<_, i32>(2) < 120_000) {
        return Ok(None);
    }
    let oids: HashMap<String, u32> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    Ok(columns
        .iter()
        .map(|c| oids.get(c).copied().and_then(Wire::for_oid))
        .collect())
}

/// [`copy_rows`] in binary format, `wires` giving each column's encoding.
async fn copy_binary_rows(
    tx: &Transaction<'_>,
    statements: &mut Statements,
    table: &str,
    columns: &[String],
    wires: &[Wire],
    rows: &[Vec<Cell<'_>>],
) -> Result<(), CopyError> {
    let list: Vec<String> = columns.iter().map(|c| quote_ident(c)).collect();
    let statement = statements
        .get(
            tx,
            &format!(
                "copy {table} ({}) from stdin (format binary)",
                list.join(", ")
            ),
        )
        .await?;
    copy_in_pieces(
        tx,
        &statement,
        rows,
        copy_binary::header,
        |buf, row| {
            copy_binary::row(buf, wires, row).map_err(|e| CopyError::NotBinary {
                column: columns[e.column].clone(),
            })
        },
        copy_binary::trailer,
    )
    .await
}

/// A COPY of [`copy_inserts`] met a key (or another unique value) already in the table.
pub fn is_key_conflict(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
}

/// Why a run did not apply.
#[derive(Debug)]
pub enum ApplyError {
    Postgres(tokio_postgres::Error),
    /// An update of only the sent columns (the others are unchanged TOAST values that
    /// exist only in the target row) found fewer rows than it had changes: the target
    /// lacks rows the source has, and the change would be lost.
    MissingRows {
        table: TableName,
        expected: u64,
        found: u64,
    },
}

impl From<tokio_postgres::Error> for ApplyError {
    fn from(e: tokio_postgres::Error) -> Self {
        ApplyError::Postgres(e)
    }
}

/// Execute one run inside the batch transaction. `staged`: the widths of the staging
/// tables this transaction has filled so far (start each transaction with an empty set).
pub async fn execute(
    tx: &Transaction<'_>,
    statements: &mut Statements,
    run: &Run<'_>,
    target: &TargetTable,
    staged: &mut std::collections::HashSet<usize>,
) -> Result<u64, ApplyError> {
    let name = run.table().quoted();
    match run {
        Run::Truncate { .. } => Ok(tx.execute(&format!("truncate {name}"), &[]).await?),
        Run::Delete { key, keys, .. } => {
            let cols = columns_of(keys, key.len());
            let cond: Vec<String> = key
                .iter()
                .map(|k| format!("t.{} = {}", quote_ident(k), cast(k, target)))
                .collect();
            let sql = format!(
                "delete from {name} t using {} where {}",
                unnest(key.len(), key),
                cond.join(" and ")
            );
            let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
                cols.iter().map(|c| c as _).collect();
            Ok(tx.execute(&sql, &params).await?)
        }
        Run::Update {
            columns,
            rows,
            match_keys,
            ..
        } => {
            let key = &target.key;
            let match_names: Vec<String> =
                key.iter().map(|k| format!("pgferry_match_{k}")).collect();
            let mut all_rows = Vec::with_capacity(rows.len());
            for (row, m) in rows.iter().zip(match_keys) {
                let mut r = m.clone();
                r.extend(row.iter().cloned());
                all_rows.push(r);
            }
            let names: Vec<String> = match_names.iter().chain(columns.iter()).cloned().collect();
            let cols = columns_of(&all_rows, names.len());
            let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
                cols.iter().map(|c| c as _).collect();
            let set: Vec<String> = columns
                .iter()
                .map(|c| format!("{} = {}", quote_ident(c), cast(c, target)))
                .collect();
            let cond: Vec<String> = key
                .iter()
                .zip(&match_names)
                .map(|(k, m)| {
                    let ty = target.types.get(k).map(String::as_str).unwrap_or("text");
                    format!("t.{} = u.{}::{ty}", quote_ident(k), quote_ident(m))
                })
                .collect();
            let sql = format!(
                "update {name} t set {} from {} where {}",
                set.join(", "),
                unnest(names.len(), &names),
                cond.join(" and ")
            );
            tracing::debug!(%sql, rows = rows.len(), "update");
            let found = tx.execute(&sql, &params).await?;
            let expected = rows.len() as u64;
            if found < expected {
                return Err(ApplyError::MissingRows {
                    table: run.table().clone(),
                    expected,
                    found,
                });
            }
            Ok(found)
        }
        Run::Upsert { columns, rows, .. } => {
            let list: Vec<String> = columns.iter().map(|c| quote_ident(c)).collect();
            // COPY into a staging table, then one INSERT … SELECT: measured ~1.8x
            // faster than unnest() of text arrays (benches/apply_strategies.sh).
            let stage = stage_table(columns.len());
            if staged.insert(columns.len()) {
                tx.batch_execute(&format!(
                    "create temp table if not exists {stage} ({}) on commit delete rows",
                    (1..=columns.len())
                        .map(|i| format!("c{i} text"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
                .await?;
            } else {
                // An earlier run of this width in this transaction left its rows
                // there. Emptied only then: a TRUNCATE gives the table a new file
                // (created, extended, the old one unlinked at commit), which after
                // every run cost the target ~5% of its CPU while it applied updates;
                // `on commit delete rows` empties the file in place.
                tx.batch_execute(&format!("truncate {stage}")).await?;
            }
            let stage_columns = (1..=columns.len())
                .map(|i| format!("c{i}"))
                .collect::<Vec<_>>()
                .join(", ");
            copy_rows(tx, statements, &stage, &stage_columns, columns.len(), rows).await?;
            let non_key: Vec<&String> =
                columns.iter().filter(|c| !target.key.contains(c)).collect();
            let casts: Vec<String> = columns
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let ty = target.types.get(c).map(String::as_str).unwrap_or("text");
                    format!("s.c{}::{ty}", i + 1)
                })
                .collect();
            let key_list = target
                .key
                .iter()
                .map(|k| quote_ident(k))
                .collect::<Vec<_>>()
                .join(", ");
            let conflict = if target.key.is_empty() {
                String::new()
            } else if non_key.is_empty() {
                format!(" on conflict ({key_list}) do nothing")
            } else {
                let set: Vec<String> = non_key
                    .iter()
                    .map(|c| format!("{0} = excluded.{0}", quote_ident(c)))
                    .collect();
                format!(" on conflict ({key_list}) do update set {}", set.join(", "))
            };
            let sql = format!(
                "insert into {name} ({}) select {} from {stage} s{conflict}",
                list.join(", "),
                casts.join(", "),
            );
            tracing::debug!(%sql, rows = rows.len(), "upsert");
            // Prepared once: it has no parameters, so its plan (a scan of the staging
            // table) is the one a fresh statement would get. The deletes and updates
            // above are not: their plans depend on how many keys they are given.
            let upsert = statements.get(tx, &sql).await?;
            Ok(tx.execute(&upsert, &[]).await?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_text_escapes_what_the_format_needs() {
        let mut buf = bytes::BytesMut::new();
        copy_escape(&mut buf, "a\tb\nc\\d\re \\N");
        assert_eq!(&buf[..], b"a\\tb\\nc\\\\d\\re \\\\N");
        buf.clear();
        copy_escape(&mut buf, "\\plain text\n");
        assert_eq!(&buf[..], b"\\\\plain text\\n");
        buf.clear();
        copy_escape(&mut buf, "");
        assert!(buf.is_empty());
    }

    #[test]
    fn last_image_of_each_key_wins() {
        let k = |s: &str| vec![Some(s.to_string())];
        assert_eq!(
            last_of_each(&[k("1"), k("2"), k("1"), k("3")]),
            vec![1, 2, 3]
        );
    }

    fn event(op: Op, table: &str, after: Option<&[(&str, SinkValue)]>, ts: u32) -> SinkEvent {
        let row = |r: &[(&str, SinkValue)]| {
            r.iter()
                .map(|(c, v)| (std::sync::Arc::from(*c), v.clone()))
                .collect()
        };
        SinkEvent {
            position: (crate::lsn::Lsn(1), ts),
            op,
            table: TableName::new("public", table),
            commit_ts_us: 0,
            before: None,
            after: after.map(row),
            types: Default::default(),
            key: Default::default(),
        }
    }

    #[test]
    fn plan_groups_runs_counts_stretches_and_keeps_the_last_image() {
        let text = |s: &str| SinkValue::Text(s.into());
        let mut tables = HashMap::new();
        for t in ["a", "b"] {
            let name = TableName::new("public", t);
            tables.insert(
                name.clone(),
                (
                    Mapping {
                        target: name.clone(),
                        rename: [("n".to_string(), "renamed".to_string())].into(),
                    },
                    TargetTable {
                        name,
                        types: HashMap::new(),
                        key: vec!["id".into()],
                    },
                ),
            );
        }
        let full = |id: &str, n: &str| vec![("id", text(id)), ("n", text(n))];
        let events = [
            event(Op::Read, "a", Some(&full("1", "x")), 0),
            event(Op::Read, "a", Some(&full("2", "y")), 1),
            event(Op::Create, "a", Some(&full("1", "z")), 2),
            // Another column set: a run of its own.
            event(Op::Update, "a", Some(&[("id", text("3"))]), 3),
            event(Op::Create, "b", Some(&full("9", "q")), 4),
            event(Op::Read, "a", Some(&full("4", "w")), 5),
        ];
        let refs: Vec<&SinkEvent> = events.iter().collect();
        let mut counts = Counts::new();
        let runs = plan(&refs, &tables, &mut counts);
        let shapes: Vec<(String, Vec<String>, usize, bool)> = runs
            .iter()
            .map(|r| match r {
                Run::Upsert {
                    table,
                    columns,
                    rows,
                    inserts_only,
                } => (
                    table.to_string(),
                    columns.clone(),
                    rows.len(),
                    *inserts_only,
                ),
                other => panic!("unexpected run {other:?}"),
            })
            .collect();
        let cols = |c: &[&str]| c.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            shapes,
            vec![
                // Key 1 twice: only its last image stays, after key 2.
                // Reads and inserts only: tried with a plain COPY first.
                ("public.a".into(), cols(&["id", "renamed"]), 2, true),
                ("public.a".into(), cols(&["id"]), 1, false),
                ("public.b".into(), cols(&["id", "renamed"]), 1, true),
                ("public.a".into(), cols(&["id", "renamed"]), 1, true),
            ]
        );
        let Run::Upsert { rows, .. } = &runs[0] else {
            unreachable!()
        };
        assert_eq!(
            rows,
            &vec![vec![Some("2"), Some("y")], vec![Some("1"), Some("z")]]
        );
        let count = |t: &str, op: &'static str| counts.get(&(t.to_string(), op)).copied();
        assert_eq!(count("public.a", "r"), Some(3));
        assert_eq!(count("public.a", "c"), Some(1));
        assert_eq!(count("public.a", "u"), Some(1));
        assert_eq!(count("public.b", "c"), Some(1));
        assert_eq!(counts.len(), 4);
    }
}
