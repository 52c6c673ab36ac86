//! Batch apply: consecutive events of one table become multi-row statements, run in
//! one target transaction together with the checkpoint rows.
//!
//! - inserts and updates: `INSERT … SELECT … FROM unnest($1::text[], …) ON CONFLICT (key)
//!   DO UPDATE`; every value travels as PostgreSQL text and is cast by the target
//!   column's own type, so nothing is lost on the way;
//! - updates with unchanged TOAST columns: `UPDATE … FROM unnest(…)` of the other
//!   columns only, leaving those columns untouched;
//! - an update that changes the key: delete the old key, upsert the new row;
//! - deletes: `DELETE … USING unnest(…)`; truncates: `TRUNCATE`.
//!
//! Per-key order holds: statements run in event order, and a run of one statement
//! keeps only the last image of each key.

use std::collections::HashMap;

use tokio_postgres::Transaction;

use super::decode::{SinkEvent, SinkValue};
use super::target::{Mapping, TargetTable};
use crate::event::{quote_ident, Op, TableName};

/// One statement's worth of events.
#[derive(Debug)]
pub enum Run {
    Upsert {
        table: TableName,
        /// Target column names, same for every row.
        columns: Vec<String>,
        rows: Vec<Vec<Option<String>>>,
        /// Rows carry unchanged columns (left out of `columns`): update only.
        update_only: bool,
    },
    Delete {
        table: TableName,
        key: Vec<String>,
        keys: Vec<Vec<Option<String>>>,
    },
    Truncate {
        table: TableName,
    },
}

impl Run {
    fn table(&self) -> &TableName {
        match self {
            Run::Upsert { table, .. } | Run::Delete { table, .. } | Run::Truncate { table } => {
                table
            }
        }
    }
}

/// Applied counts for metrics: (source table, op) -> n.
pub type Counts = HashMap<(String, &'static str), u64>;

/// Turn events into runs (in order). `tables` maps source tables to their mapping and
/// target description.
pub fn plan(
    events: &[&SinkEvent],
    tables: &HashMap<TableName, (Mapping, TargetTable)>,
    counts: &mut Counts,
) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::new();
    for event in events {
        let Some((mapping, target)) = tables.get(&event.table) else {
            continue;
        };
        let op_label = match event.op {
            Op::Create | Op::Read => "c",
            Op::Update => "u",
            Op::Delete => "d",
            Op::Truncate => "t",
        };
        *counts
            .entry((event.table.to_string(), op_label))
            .or_default() += 1;
        let key = &target.key;
        let key_of = |row: &[(String, SinkValue)]| -> Vec<Option<String>> {
            key.iter()
                .map(|k| {
                    row.iter()
                        .find(|(c, _)| mapping.column(c) == k)
                        .and_then(|(_, v)| match v {
                            SinkValue::Text(t) => Some(t.clone()),
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
                if let Some(before) = &event.before {
                    let old = key_of(before);
                    if old.iter().all(Option::is_some) && old != key_of(after) {
                        push_delete(&mut runs, &mapping.target, key, old);
                    }
                }
                let update_only = after.iter().any(|(_, v)| matches!(v, SinkValue::Unchanged));
                let mut columns = Vec::new();
                let mut values = Vec::new();
                for (c, v) in after {
                    let value = match v {
                        SinkValue::Unchanged => continue,
                        SinkValue::Null => None,
                        SinkValue::Text(t) => Some(t.clone()),
                    };
                    columns.push(mapping.column(c).to_string());
                    values.push(value);
                }
                match runs.last_mut() {
                    Some(Run::Upsert {
                        table,
                        columns: c,
                        rows,
                        update_only: u,
                    }) if *table == mapping.target && *c == columns && *u == update_only => {
                        rows.push(values)
                    }
                    _ => runs.push(Run::Upsert {
                        table: mapping.target.clone(),
                        columns,
                        rows: vec![values],
                        update_only,
                    }),
                }
            }
        }
    }
    // One statement cannot touch a row twice: keep the last image of each key.
    for run in &mut runs {
        if let Run::Upsert {
            table,
            columns,
            rows,
            ..
        } = run
        {
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
            let mut last: HashMap<Vec<Option<String>>, usize> = HashMap::new();
            for (i, row) in rows.iter().enumerate() {
                last.insert(key_idx.iter().map(|&k| row[k].clone()).collect(), i);
            }
            if last.len() < rows.len() {
                let mut keep: Vec<usize> = last.into_values().collect();
                keep.sort_unstable();
                let old = std::mem::take(rows);
                *rows = keep.into_iter().map(|i| old[i].clone()).collect();
            }
        }
    }
    runs
}

fn push_delete(
    runs: &mut Vec<Run>,
    table: &TableName,
    key: &[String],
    values: Vec<Option<String>>,
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
fn columns_of(rows: &[Vec<Option<String>>], n: usize) -> Vec<Vec<Option<String>>> {
    let mut cols = vec![Vec::with_capacity(rows.len()); n];
    for row in rows {
        for (i, v) in row.iter().enumerate().take(n) {
            cols[i].push(v.clone());
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

/// Execute one run inside the batch transaction.
pub async fn execute(
    tx: &Transaction<'_>,
    run: &Run,
    target: &TargetTable,
) -> Result<u64, tokio_postgres::Error> {
    let name = run.table().quoted();
    match run {
        Run::Truncate { .. } => tx.execute(&format!("truncate {name}"), &[]).await,
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
            tx.execute(&sql, &params).await
        }
        Run::Upsert {
            columns,
            rows,
            update_only,
            ..
        } => {
            let cols = columns_of(rows, columns.len());
            let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
                cols.iter().map(|c| c as _).collect();
            let non_key: Vec<&String> =
                columns.iter().filter(|c| !target.key.contains(c)).collect();
            let sql = if *update_only {
                let set: Vec<String> = non_key
                    .iter()
                    .map(|c| format!("{} = {}", quote_ident(c), cast(c, target)))
                    .collect();
                let cond: Vec<String> = target
                    .key
                    .iter()
                    .map(|k| format!("t.{} = {}", quote_ident(k), cast(k, target)))
                    .collect();
                format!(
                    "update {name} t set {} from {} where {}",
                    set.join(", "),
                    unnest(columns.len(), columns),
                    cond.join(" and ")
                )
            } else {
                let list: Vec<String> = columns.iter().map(|c| quote_ident(c)).collect();
                let casts: Vec<String> = columns.iter().map(|c| cast(c, target)).collect();
                let conflict = if target.key.is_empty() {
                    String::new()
                } else if non_key.is_empty() {
                    format!(
                        " on conflict ({}) do nothing",
                        target
                            .key
                            .iter()
                            .map(|k| quote_ident(k))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                } else {
                    format!(
                        " on conflict ({}) do update set {}",
                        target
                            .key
                            .iter()
                            .map(|k| quote_ident(k))
                            .collect::<Vec<_>>()
                            .join(", "),
                        non_key
                            .iter()
                            .map(|c| format!("{0} = excluded.{0}", quote_ident(c)))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                };
                format!(
                    "insert into {name} ({}) select {} from {}{conflict}",
                    list.join(", "),
                    casts.join(", "),
                    unnest(columns.len(), columns)
                )
            };
            tracing::debug!(%sql, rows = rows.len(), "upsert");
            tx.execute(&sql, &params).await
        }
    }
}
