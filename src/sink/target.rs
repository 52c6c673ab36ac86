//! The target side of the mapping: what a target table looks like (columns, types,
//! key), creating it from an event's schema (`create_tables`) and adding new source
//! columns (`schema_evolution = "add_columns"`).

use std::collections::HashMap;

use tokio_postgres::Client;

use super::decode::SinkEvent;
use crate::config::{Config, SchemaEvolution, Table};
use crate::error::Error;
use crate::event::{quote_ident, TableName};

/// A target table as the catalog describes it.
#[derive(Debug, Clone)]
pub struct TargetTable {
    pub name: TableName,
    /// Column -> `format_type` of its type.
    pub types: HashMap<String, String>,
    /// Primary key columns (the conflict target of upserts).
    pub key: Vec<String>,
}

/// How one source table maps onto the target.
#[derive(Debug, Clone)]
pub struct Mapping {
    pub target: TableName,
    pub rename: std::collections::BTreeMap<String, String>,
}

impl Mapping {
    pub fn for_table(config: &Config, source: &TableName) -> Option<Mapping> {
        let t: &Table = config.table(source)?;
        Some(Mapping {
            target: t.target.clone(),
            rename: t.rename.clone(),
        })
    }

    pub fn column<'a>(&'a self, source_column: &'a str) -> &'a str {
        self.rename
            .get(source_column)
            .map(String::as_str)
            .unwrap_or(source_column)
    }
}

pub async fn describe(client: &Client, name: &TableName) -> Result<Option<TargetTable>, Error> {
    let rows = client
        .query(
            "select a.attname::text, format_type(a.atttypid, a.atttypmod),
                    coalesce(array_position(i.indkey::int2[], a.attnum), -1)
             from pg_class c join pg_namespace n on n.oid = c.relnamespace
             join pg_attribute a on a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped
             left join pg_index i on i.indrelid = c.oid and i.indisprimary
             where n.nspname = $1 and c.relname = $2 and c.relkind in ('r', 'p')
             order by a.attnum",
            &[&name.schema, &name.name],
        )
        .await
        .map_err(|e| Error::postgres(format!("reading target table {name}"), e))?;
    if rows.is_empty() {
        return Ok(None);
    }
    let mut key: Vec<(i32, String)> = Vec::new();
    let mut types = HashMap::new();
    for r in &rows {
        let col: String = r.get(0);
        let pos: i32 = r.get(2);
        if pos >= 0 {
            key.push((pos, col.clone()));
        }
        types.insert(col, r.get(1));
    }
    key.sort();
    Ok(Some(TargetTable {
        name: name.clone(),
        types,
        key: key.into_iter().map(|(_, c)| c).collect(),
    }))
}

/// Make the target table ready for `event`: create it if allowed, add new columns if
/// allowed, or fail with what the operator must do.
pub async fn prepare(
    client: &Client,
    config: &Config,
    mapping: &Mapping,
    event: &SinkEvent,
    known: Option<TargetTable>,
) -> Result<TargetTable, Error> {
    let sink = config
        .sink
        .as_ref()
        .ok_or_else(|| Error::operator("no [sink] section"))?;
    let name = &mapping.target;
    let table = match known {
        Some(t) => t,
        None => match describe(client, name).await? {
            Some(t) => t,
            None if sink.create_tables && !event.types.is_empty() => {
                create(client, mapping, event).await?;
                describe(client, name)
                    .await?
                    .ok_or_else(|| Error::fatal(format!("target table {name} vanished right after it was created")))?
            }
            None => {
                return Err(Error::operator(format!("target table {name} does not exist"))
                    .with_hint("create it, or set [sink] create_tables = true (Avro events carry the column types)"))
            }
        },
    };
    let row = event.after.as_ref().or(event.before.as_ref());
    let missing: Vec<&str> = row
        .map(|r| {
            r.iter()
                .map(|(c, _)| mapping.column(c))
                .filter(|c| !table.types.contains_key(*c))
                .collect()
        })
        .unwrap_or_default();
    if missing.is_empty() {
        return Ok(table);
    }
    if sink.schema_evolution != SchemaEvolution::AddColumns || event.types.is_empty() {
        return Err(Error::fatal(format!(
            "target table {name} has no column(s) {}: the source has new columns",
            missing.join(", ")
        ))
        .with_hint("add them to the target table, or use schema_evolution = \"add_columns\" with Avro events"));
    }
    for col in &missing {
        let source_col = event
            .types
            .iter()
            .find(|(c, _)| mapping.column(c) == *col)
            .map(|(_, t)| t.as_str())
            .unwrap_or("text");
        let sql = format!(
            "begin; {}; alter table {} add column if not exists {} {source_col}; commit",
            super::checkpoint::DDL_LOCK,
            name.quoted(),
            quote_ident(col)
        );
        client.batch_execute(&sql).await.map_err(|e| {
            Error::postgres(format!("adding column {col} to target table {name}"), e)
        })?;
        tracing::info!(table = %name, column = %col, "added a new source column to the target");
    }
    describe(client, name)
        .await?
        .ok_or_else(|| Error::fatal(format!("target table {name} vanished")))
}

async fn create(client: &Client, mapping: &Mapping, event: &SinkEvent) -> Result<(), Error> {
    let name = &mapping.target;
    let columns: Vec<String> = event
        .types
        .iter()
        .map(|(c, t)| format!("{} {t}", quote_ident(mapping.column(c))))
        .collect();
    let key: Vec<String> = event
        .key
        .iter()
        .map(|k| quote_ident(mapping.column(k)))
        .collect();
    let mut sql = format!(
        "begin; {}; create schema if not exists {}; create table if not exists {} ({}",
        super::checkpoint::DDL_LOCK,
        quote_ident(&name.schema),
        name.quoted(),
        columns.join(", ")
    );
    if !key.is_empty() {
        sql.push_str(&format!(", primary key ({})", key.join(", ")));
    }
    sql.push_str("); commit");
    client.batch_execute(&sql).await.map_err(|e| {
        Error::postgres(format!("creating target table {name}"), e).with_hint(
            "types of the source must exist in the target (enums, domains): create them first",
        )
    })?;
    tracing::info!(table = %name, "created target table");
    Ok(())
}
