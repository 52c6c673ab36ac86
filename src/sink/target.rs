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
    /// Column -> its type *without* its modifier (`character varying`, not
    /// `character varying(5)`). Values are cast to this, and the column's own
    /// assignment coercion then checks length, precision and scale exactly as a plain
    /// INSERT does: an explicit cast to `varchar(5)` would silently truncate.
    pub types: HashMap<String, String>,
    /// The conflict target of upserts and the match of updates and deletes: the
    /// primary key, or the configured key when a unique index backs it.
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
            // Without modifier, `character` and `bit` mean length 1: use the
            // unbounded spellings, so the column's own length applies on assignment.
            "select a.attname::text,
                    case when t.oid = 'bpchar'::regtype then 'bpchar'
                         when t.oid = 'bit'::regtype then 'bit varying'
                         when e.oid = 'bpchar'::regtype then 'bpchar[]'
                         when e.oid = 'bit'::regtype then 'bit varying[]'
                         else format_type(a.atttypid, null) end,
                    coalesce(array_position(i.indkey::int2[], a.attnum), -1)
             from pg_class c join pg_namespace n on n.oid = c.relnamespace
             join pg_attribute a on a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped
             join pg_type t on t.oid = a.atttypid
             left join pg_type e on e.oid = t.typelem and t.typcategory = 'A'
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
    let table = with_key(client, config, mapping, event, table).await?;
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
        let source_col = checked_type(client, name, col, source_col).await?;
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
    let mut columns: Vec<String> = Vec::with_capacity(event.types.len());
    for (c, t) in event.types.iter() {
        let col = mapping.column(c);
        let t = checked_type(client, name, col, t).await?;
        columns.push(format!("{} {t}", quote_ident(col)));
    }
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

/// A target without a primary key cannot take updates and deletes by key: use the
/// table's configured `key` when a unique index covers exactly it, else refuse.
async fn with_key(
    client: &Client,
    config: &Config,
    mapping: &Mapping,
    event: &SinkEvent,
    mut table: TargetTable,
) -> Result<TargetTable, Error> {
    if !table.key.is_empty() {
        return Ok(table);
    }
    let name = &table.name;
    let configured: Option<Vec<String>> = config
        .table(&event.table)
        .and_then(|t| t.key.clone())
        .map(|k| k.iter().map(|c| mapping.column(c).to_string()).collect());
    let Some(key) = configured else {
        return Err(Error::operator(format!(
            "target table {name} has no primary key: updates and deletes could not find their row"
        ))
        .with_hint("add a primary key to the target table, or set `key` in the table's file to columns that a unique index covers"));
    };
    let unique = client
        .query_opt(
            "select 1 from pg_index i join pg_class c on c.oid = i.indrelid
             join pg_namespace n on n.oid = c.relnamespace
             where n.nspname = $1 and c.relname = $2 and i.indisunique and i.indpred is null
               and i.indexprs is null
               and (select array_agg(a.attname::text order by a.attname)
                    from pg_attribute a where a.attrelid = c.oid and a.attnum = any(i.indkey::int2[]))
                   = (select array_agg(k order by k) from unnest($3::text[]) k)",
            &[&name.schema, &name.name, &key],
        )
        .await
        .map_err(|e| Error::postgres(format!("reading the unique indexes of target table {name}"), e))?;
    if unique.is_none() {
        return Err(Error::operator(format!(
            "target table {name} has no primary key and no unique index on the configured key ({})",
            key.join(", ")
        ))
        .with_hint("create a unique index on those columns, or a primary key"));
    }
    table.key = key;
    Ok(table)
}

/// A column type named by an event (the `pgferry.type` schema property), checked before
/// it goes into DDL: anyone who can write the schema topic or the registry writes this
/// text, so it must be a type name and nothing else, and the type must exist here.
async fn checked_type(
    client: &Client,
    table: &TableName,
    column: &str,
    type_name: &str,
) -> Result<String, Error> {
    let refuse = |why: &str| {
        Error::operator(format!(
            "target table {table}, column {column}: the event's type is {why}"
        ))
        .with_hint("create the column (or table) in the target yourself; only plain type names are used in DDL")
    };
    let base = type_name_base(type_name).ok_or_else(|| refuse("not a plain type name"))?;
    let known: Option<String> = client
        .query_one("select to_regtype($1)::text", &[&base])
        .await
        .map_err(|e| Error::postgres(format!("looking up type {base} in the target"), e))?
        .get(0);
    if known.is_none() {
        return Err(refuse("a type that does not exist in the target database"));
    }
    Ok(type_name.to_string())
}

/// The name part of a type (without modifier and array brackets) when `t` is a plain
/// type name: words, dots and quoted identifiers, then optionally `(n[,m])` and `[]`s.
/// Anything else (quotes, semicolons, comments, commas outside the modifier) is `None`.
pub(crate) fn type_name_base(t: &str) -> Option<&str> {
    let bytes = t.as_bytes();
    let mut i = 0;
    let mut in_quotes = false;
    while i < bytes.len() {
        let c = bytes[i];
        if in_quotes {
            match c {
                b'"' if bytes.get(i + 1) == Some(&b'"') => i += 1,
                b'"' => in_quotes = false,
                0 => return None,
                _ => {}
            }
        } else {
            match c {
                b'"' => in_quotes = true,
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b' ' | b'.' => {}
                b'(' | b'[' => break,
                _ => return None,
            }
        }
        i += 1;
    }
    if in_quotes {
        return None;
    }
    let (base, rest) = t.split_at(i);
    let base = base.trim_end();
    // Each dotted part is one quoted identifier, or words (`double precision`).
    let plain_part = |p: &str| {
        if let Some(q) = p.strip_prefix('"').and_then(|q| q.strip_suffix('"')) {
            return !q.is_empty() && !q.contains('"');
        }
        p.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && !p.ends_with(' ')
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b' ')
    };
    if !base.split('.').all(plain_part) {
        return None;
    }
    let mut rest = rest;
    if let Some(r) = rest.strip_prefix('(') {
        let close = r.find(')')?;
        let inside = &r[..close];
        if inside.is_empty()
            || !inside
                .bytes()
                .all(|b| b.is_ascii_digit() || b == b',' || b == b' ')
        {
            return None;
        }
        rest = &r[close + 1..];
        // PostgreSQL writes the precision of time and timestamp inside the name:
        // `time(3) without time zone`, `timestamp(0) with time zone`.
        if matches!(base, "time" | "timestamp") {
            for zone in [" with time zone", " without time zone"] {
                if let Some(r) = rest.strip_prefix(zone) {
                    rest = r;
                    break;
                }
            }
        }
    }
    while let Some(r) = rest.strip_prefix("[]") {
        rest = r;
    }
    rest.is_empty().then_some(base)
}

#[cfg(test)]
mod tests {
    use super::type_name_base;

    #[test]
    fn only_plain_type_names_pass() {
        for (t, base) in [
            ("integer", "integer"),
            ("character varying(5)", "character varying"),
            ("numeric(10,2)", "numeric"),
            ("timestamp with time zone", "timestamp with time zone"),
            ("public.mood", "public.mood"),
            ("\"Odd Type\"[]", "\"Odd Type\""),
            ("text[][]", "text"),
            ("time(3) without time zone", "time"),
            ("timestamp(0) with time zone[]", "timestamp"),
        ] {
            assert_eq!(type_name_base(t), Some(base), "{t}");
        }
        for bad in [
            "int); drop table patients; --",
            "text default 'x'",
            "int, evil int",
            "text collate \"C\"",
            "int4 /* */",
            "numeric(1)(2)",
            "\"unterminated",
            "",
            "(5)",
            "integer(3) with time zone",
            "time(3) with time zone; drop table x",
        ] {
            assert_eq!(type_name_base(bad), None, "{bad}");
        }
    }
}
