//! Slot and publication management on the source, over a normal connection: create the
//! publication and slot when missing, extend the publication to the configured tables,
//! watch the slot's health (`wal_status`, lag), and write heartbeats.

use std::collections::HashMap;
use std::time::Duration;

use tokio_postgres::Client;

use crate::config::{Config, Table};
use crate::error::Error;
use crate::event::{quote_ident, TableName};
use crate::lsn::Lsn;

/// The slot as `pg_replication_slots` shows it.
#[derive(Debug, Clone)]
pub struct SlotInfo {
    pub slot_type: String,
    pub plugin: Option<String>,
    pub database: Option<String>,
    pub confirmed_flush: Option<Lsn>,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
    pub lag_bytes: Option<i64>,
}

pub async fn slot_info(client: &Client, slot: &str) -> Result<Option<SlotInfo>, Error> {
    let row = client
        .query_opt(
            "select slot_type::text, plugin::text, database::text, confirmed_flush_lsn::text, wal_status::text, \
                    pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint \
             from pg_replication_slots where slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| Error::postgres(format!("reading replication slot {slot}"), e))?;
    Ok(row.map(|r| SlotInfo {
        slot_type: r.get(0),
        plugin: r.get(1),
        database: r.get(2),
        confirmed_flush: r.get::<_, Option<String>>(3).and_then(|s| s.parse().ok()),
        wal_status: r.get(4),
        lag_bytes: r.get(5),
    }))
}

/// What `pg_stat_replication_slots` says of a slot's spilling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spill {
    /// Bytes the slot's walsender has spilled to disk.
    Bytes(i64),
    /// The view does not show the slot.
    NoSlot,
    /// The server has no such view (before PostgreSQL 14).
    Unsupported,
}

pub async fn spill_bytes(client: &Client, slot: &str) -> Result<Spill, Error> {
    match client
        .query_opt(
            "select spill_bytes from pg_stat_replication_slots where slot_name = $1",
            &[&slot],
        )
        .await
    {
        Ok(row) => Ok(row.map_or(Spill::NoSlot, |r| Spill::Bytes(r.get(0)))),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => {
            Ok(Spill::Unsupported)
        }
        Err(e) => Err(Error::postgres(
            format!("reading the statistics of slot {slot}"),
            e,
        )),
    }
}

/// Fail unless the source is configured for logical decoding.
pub async fn require_logical_wal(client: &Client) -> Result<(), Error> {
    let level = show(client, "wal_level").await?;
    if level != "logical" {
        return Err(Error::operator(format!(
            "the source server has wal_level = {level}, but logical decoding needs logical"
        ))
        .with_hint("set wal_level = logical in postgresql.conf and restart PostgreSQL"));
    }
    Ok(())
}

pub async fn show(client: &Client, setting: &str) -> Result<String, Error> {
    let row = client
        .query_one("select current_setting($1)", &[&setting])
        .await
        .map_err(|e| Error::postgres(format!("reading setting {setting}"), e))?;
    Ok(row.get(0))
}

/// `wal_sender_timeout` (0 = disabled, reported as None).
pub async fn wal_sender_timeout(client: &Client) -> Result<Option<Duration>, Error> {
    let row = client
        .query_one(
            "select setting::bigint from pg_settings where name = 'wal_sender_timeout'",
            &[],
        )
        .await
        .map_err(|e| Error::postgres("reading wal_sender_timeout", e))?;
    let ms: i64 = row.get(0);
    Ok((ms > 0).then(|| Duration::from_millis(ms as u64)))
}

/// Create the publication if missing and add configured tables it lacks.
pub async fn ensure_publication(client: &Client, config: &Config) -> Result<(), Error> {
    let publication = &config.source.publication;
    for t in &config.tables {
        let exists = client
            .query_opt(
                "select 1 from pg_class c join pg_namespace n on n.oid = c.relnamespace \
                        where n.nspname = $1 and c.relname = $2 and c.relkind in ('r', 'p')",
                &[&t.source.schema, &t.source.name],
            )
            .await
            .map_err(|e| Error::postgres("looking up configured tables", e))?
            .is_some();
        if !exists {
            return Err(Error::operator(format!(
                "{}: table {} does not exist on the source",
                t.origin.display(),
                t.source
            ))
            .with_hint("create the table, or fix `source` in that file"));
        }
    }
    let all_tables: Option<bool> = client
        .query_opt(
            "select puballtables from pg_publication where pubname = $1",
            &[publication],
        )
        .await
        .map_err(|e| Error::postgres(format!("reading publication {publication}"), e))?
        .map(|r| r.get(0));
    let quoted_pub = quote_ident(publication);
    let list = |tables: &[&TableName]| {
        tables
            .iter()
            .map(
                |t| match config.table(t).and_then(|c| c.row_filter.as_deref()) {
                    Some(w) => format!("{} WHERE ({w})", t.quoted()),
                    None => t.quoted(),
                },
            )
            .collect::<Vec<_>>()
            .join(", ")
    };
    let filtered = config.tables.iter().any(|t| t.row_filter.is_some());
    if filtered {
        let version: i32 = show(client, "server_version_num")
            .await?
            .parse()
            .unwrap_or(0);
        if version < 150000 {
            return Err(Error::operator(
                "a table file sets `where`, but row filters need PostgreSQL 15 or later on the source",
            ));
        }
        // Every filter is checked before any publication carries it: a bad one would
        // make PostgreSQL refuse the EHR's own UPDATEs.
        for t in &config.tables {
            if let Some(w) = &t.row_filter {
                deparse_filter(client, t, w).await?;
            }
        }
    }
    match all_tables {
        None => {
            let tables: Vec<&TableName> = config.tables.iter().map(|t| &t.source).collect();
            let sql = if tables.is_empty() {
                format!("CREATE PUBLICATION {quoted_pub}")
            } else {
                format!(
                    "CREATE PUBLICATION {quoted_pub} FOR TABLE {}",
                    list(&tables)
                )
            };
            client
                .batch_execute(&sql)
                .await
                .map_err(|e| publication_error(publication, e))?;
            client
                .batch_execute(&format!(
                    "COMMENT ON PUBLICATION {quoted_pub} IS '{MANAGED}'"
                ))
                .await
                .map_err(|e| publication_error(publication, e))?;
            tracing::info!(%publication, tables = tables.len(), "created publication");
        }
        Some(true) if filtered => {
            return Err(Error::operator(format!(
                "publication {publication} is FOR ALL TABLES, which cannot filter rows, but a table file sets `where`"
            ))
            .with_hint("use a publication that lists its tables (or let pgferry create one)"));
        }
        Some(true) => {}
        Some(false) => {
            let rows = client
                .query("select schemaname::text, tablename::text from pg_publication_tables where pubname = $1", &[publication])
                .await
                .map_err(|e| Error::postgres(format!("reading publication {publication}"), e))?;
            let published: Vec<TableName> = rows
                .iter()
                .map(|r| TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
                .collect();
            let missing: Vec<&TableName> = config
                .tables
                .iter()
                .map(|t| &t.source)
                .filter(|t| !published.contains(t))
                .collect();
            if !missing.is_empty() {
                let sql = format!(
                    "ALTER PUBLICATION {quoted_pub} ADD TABLE {}",
                    list(&missing)
                );
                client
                    .batch_execute(&sql)
                    .await
                    .map_err(|e| publication_error(publication, e))?;
                tracing::info!(%publication, added = missing.len(), "extended publication");
            }
        }
    }
    if filtered || all_tables == Some(false) {
        check_row_filters(client, config).await?;
    }
    Ok(())
}

/// The comment on publications pgferry created: it may change their row filters.
const MANAGED: &str = "managed by pgferry";

/// Make the publication's row filter of each configured table what its file says:
/// changed in a publication pgferry created, refused in any other. A filter must use
/// only replica identity columns (unless FULL): PostgreSQL would otherwise refuse
/// every UPDATE and DELETE of the table on the EHR.
async fn check_row_filters(client: &Client, config: &Config) -> Result<(), Error> {
    let publication = &config.source.publication;
    let quoted_pub = quote_ident(publication);
    let managed: bool = client
        .query_one(
            "select coalesce(obj_description(oid, 'pg_publication') = $2, false) from pg_publication where pubname = $1",
            &[publication, &MANAGED],
        )
        .await
        .map_err(|e| Error::postgres(format!("reading publication {publication}"), e))?
        .get(0);
    let version: i32 = show(client, "server_version_num")
        .await?
        .parse()
        .unwrap_or(0);
    if version < 150000 {
        return Ok(());
    }
    for t in &config.tables {
        let published: Option<Option<String>> = client
            .query_opt(
                "select rowfilter from pg_publication_tables where pubname = $1 and schemaname = $2 and tablename = $3",
                &[publication, &t.source.schema, &t.source.name],
            )
            .await
            .map_err(|e| Error::postgres(format!("reading publication {publication}"), e))?
            .map(|r| r.get(0));
        let Some(published) = published else { continue };
        let wanted = match &t.row_filter {
            Some(w) => Some(deparse_filter(client, t, w).await?),
            None => None,
        };
        if published == wanted {
            continue;
        }
        let describe = |f: &Option<String>| f.clone().unwrap_or_else(|| "no filter".into());
        if !managed {
            return Err(Error::operator(format!(
                "{}: publication {publication} publishes table {} with {}, but the file says {}",
                t.origin.display(),
                t.source,
                describe(&published),
                describe(&wanted)
            ))
            .with_hint("make the file's `where` match the publication (or change the publication with ALTER PUBLICATION … SET TABLE)"));
        }
        let add = match &t.row_filter {
            Some(w) => format!("{} WHERE ({w})", t.source.quoted()),
            None => t.source.quoted(),
        };
        client
            .batch_execute(&format!(
                "BEGIN; ALTER PUBLICATION {quoted_pub} DROP TABLE {0}; ALTER PUBLICATION {quoted_pub} ADD TABLE {add}; COMMIT",
                t.source.quoted()
            ))
            .await
            .map_err(|e| publication_error(publication, e))?;
        tracing::warn!(table = %t.source, from = %describe(&published), to = %describe(&wanted),
            "changed the publication's row filter; rows already in the target that the new filter excludes stay there");
    }
    Ok(())
}

/// The filter as PostgreSQL stores and shows it, from a publication created and rolled
/// back in one transaction; also checks its columns against the replica identity.
async fn deparse_filter(client: &Client, t: &Table, filter: &str) -> Result<String, Error> {
    let probe = format!("pgferry_probe_{}", std::process::id());
    client
        .batch_execute("BEGIN")
        .await
        .map_err(|e| Error::postgres("checking a row filter", e))?;
    let result = async {
        client
            .batch_execute(&format!(
                "CREATE PUBLICATION {probe} FOR TABLE {} WHERE ({filter})",
                t.source.quoted()
            ))
            .await
            .map_err(|e| {
                Error::postgres(format!("{}: where", t.origin.display()), e)
                    .with_hint("write one SQL expression over this table's columns, as CREATE PUBLICATION … WHERE takes it")
            })?;
        let row = client
            .query_one(
                "select pt.rowfilter, pr.prqual::text, c.relreplident::text,                         coalesce((select array_agg(k)::text from pg_index i, unnest(i.indkey) k                                   where i.indrelid = c.oid and ((c.relreplident = 'd' and i.indisprimary)                                         or (c.relreplident = 'i' and i.indisreplident))), '{}')                  from pg_publication_tables pt                  join pg_publication p on p.pubname = pt.pubname                  join pg_publication_rel pr on pr.prpubid = p.oid                  join pg_class c on c.oid = pr.prrelid                  where pt.pubname = $1",
                &[&probe],
            )
            .await
            .map_err(|e| Error::postgres("checking a row filter", e))?;
        let deparsed: String = row.get(0);
        let tree: String = row.get(1);
        let identity: String = row.get(2);
        let key: String = row.get(3);
        if identity != "f" {
            let key: Vec<&str> = key.trim_matches(|c| c == '{' || c == '}').split(',').collect();
            let outside: Vec<&str> = tree
                .split(":varattno ")
                .skip(1)
                .filter_map(|rest| rest.split(' ').next())
                .filter(|attno| !key.contains(attno))
                .collect();
            if !outside.is_empty() {
                return Err(Error::operator(format!(
                    "{}: where = {filter:?} uses a column outside table {}'s replica identity; PostgreSQL would then                      refuse every UPDATE and DELETE of the table on the source",
                    t.origin.display(),
                    t.source
                ))
                .with_hint("filter on the key columns only, or set ALTER TABLE … REPLICA IDENTITY FULL"));
            }
        }
        Ok(deparsed)
    }
    .await;
    let _ = client.batch_execute("ROLLBACK").await;
    result
}

fn publication_error(publication: &str, e: tokio_postgres::Error) -> Error {
    Error::postgres(format!("creating or extending publication {publication}"), e).with_hint(
        "the role needs CREATE on the database and ownership of the tables; or create the publication \
         as the table owner (see sql/source_setup.sql)",
    )
}

/// Create the slot if it does not exist; check that an existing one is usable.
/// Returns the slot as it is now.
pub async fn ensure_slot(client: &Client, slot: &str) -> Result<SlotInfo, Error> {
    if slot_info(client, slot).await?.is_none() {
        client
            .query_one("select lsn::text from pg_create_logical_replication_slot($1, 'pgoutput')", &[&slot])
            .await
            .map_err(|e| {
                Error::postgres(format!("creating replication slot {slot}"), e)
                    .with_hint("the role needs the REPLICATION attribute, and max_replication_slots a free slot")
            })?;
        tracing::info!(%slot, "created replication slot");
    }
    let info = slot_info(client, slot).await?.ok_or_else(|| {
        Error::fatal(format!(
            "replication slot {slot} vanished right after it was created"
        ))
    })?;
    let current_db: String = client
        .query_one("select current_database()", &[])
        .await
        .map_err(|e| Error::postgres("reading current_database()", e))?
        .get(0);
    if info.slot_type != "logical" || info.plugin.as_deref() != Some("pgoutput") {
        return Err(Error::operator(format!(
            "replication slot {slot} exists but is not a logical pgoutput slot (type {}, plugin {})",
            info.slot_type,
            info.plugin.as_deref().unwrap_or("none")
        ))
        .with_hint("configure another source.slot, or drop that slot if nothing uses it"));
    }
    if info.database.as_deref() != Some(current_db.as_str()) {
        return Err(Error::operator(format!(
            "replication slot {slot} belongs to database {}, not {current_db}",
            info.database.as_deref().unwrap_or("?")
        ))
        .with_hint("configure another source.slot for this database"));
    }
    check_slot_health(slot, &info)?;
    Ok(info)
}

/// A lost slot means WAL the slot needed was removed: changes are gone. Fail loudly.
pub fn check_slot_health(slot: &str, info: &SlotInfo) -> Result<(), Error> {
    if info.wal_status.as_deref() == Some("lost") {
        return Err(Error::fatal(format!(
            "replication slot {slot} is lost (wal_status = lost): the server removed WAL it still needed, \
             so changes have been lost"
        ))
        .with_hint("drop and recreate the slot, then resynchronise the target (initial snapshot); \
                    raise max_slot_wal_keep_size to prevent this"));
    }
    Ok(())
}

/// Write a non-transactional logical message so that an idle publication still gets
/// traffic, letting the slot advance past WAL written for other tables.
pub async fn heartbeat(client: &Client) -> Result<(), Error> {
    client
        .batch_execute("select pg_logical_emit_message(false, 'pgferry', 'heartbeat')")
        .await
        .map_err(|e| Error::postgres("writing the heartbeat message", e))
}

/// The configured tables' OIDs (so a table renamed while streaming is still followed),
/// after checking that each configured key is one the server can send: see
/// [`key_problem`]. Errors name every table at fault at once.
pub async fn configured_tables(
    client: &Client,
    config: &Config,
) -> Result<HashMap<u32, TableName>, Error> {
    let mut oids = HashMap::new();
    let mut problems = Vec::new();
    for t in &config.tables {
        let row = client
            .query_opt(
                "select c.oid from pg_class c join pg_namespace n on n.oid = c.relnamespace \
                 where n.nspname = $1 and c.relname = $2 and c.relkind in ('r', 'p')",
                &[&t.source.schema, &t.source.name],
            )
            .await
            .map_err(|e| Error::postgres(format!("looking up table {}", t.source), e))?;
        if let Some(r) = row {
            oids.insert(r.get::<_, u32>(0), t.source.clone());
        }
        if let Some(p) = key_problem(client, t).await? {
            problems.push(p);
        }
        problems.extend(transform_problems(client, t).await?);
    }
    if !problems.is_empty() {
        return Err(Error::operator(problems.join("; "))
            .with_hint("fix the table files named above: a `key` must be the table's replica identity (its primary key, \
                        or ALTER TABLE … REPLICA IDENTITY USING INDEX) unless REPLICA IDENTITY FULL; a transform must name \
                        a column of a type it applies to"));
    }
    Ok(oids)
}

/// Each `[transform]` must name a column of the table, of a type it applies to.
pub async fn transform_problems(client: &Client, table: &Table) -> Result<Vec<String>, Error> {
    let mut out = Vec::new();
    for (column, transform) in &table.transform {
        let row = client
            .query_opt(
                "select t.typcategory::text, coalesce(nullif(t.typbasetype, 0), t.oid)::oid \
                 from pg_attribute a join pg_class c on c.oid = a.attrelid \
                 join pg_namespace n on n.oid = c.relnamespace join pg_type t on t.oid = a.atttypid \
                 where n.nspname = $1 and c.relname = $2 and a.attname = $3 and a.attnum > 0 and not a.attisdropped",
                &[&table.source.schema, &table.source.name, column],
            )
            .await
            .map_err(|e| Error::postgres(format!("reading the columns of {}", table.source), e))?;
        let Some(row) = row else {
            out.push(format!(
                "{}: transform: table {} has no column {column:?}",
                table.origin.display(),
                table.source
            ));
            continue;
        };
        let (category, base): (String, u32) = (row.get(0), row.get(1));
        let fits = match transform {
            crate::event::Transform::Redact => category == "S",
            crate::event::Transform::Year => matches!(base, 1082 | 1114 | 1184),
            _ => true,
        };
        if !fits {
            out.push(format!(
                "{}: transform: {} cannot apply to column {column} of table {} (redact takes text columns, \
                 year dates and timestamps)",
                table.origin.display(),
                transform.as_str(),
                table.source
            ));
        }
    }
    Ok(out)
}

/// A configured `key` must be what the server sends for updates and deletes: with
/// REPLICA IDENTITY DEFAULT or USING INDEX, old rows carry only the identity's columns,
/// so any other key makes deletes lose their key and key changes duplicate rows. Only
/// FULL (whole old rows) allows any key.
pub async fn key_problem(client: &Client, table: &Table) -> Result<Option<String>, Error> {
    let Some(key) = &table.key else {
        return Ok(None);
    };
    let row = client
        .query_opt(
            "select c.relreplident::text, \
                    (select array_agg(a.attname::text order by a.attname) from pg_index i \
                       join pg_attribute a on a.attrelid = i.indrelid and a.attnum = any(i.indkey::int2[]) \
                      where i.indrelid = c.oid and \
                            ((c.relreplident = 'd' and i.indisprimary) or (c.relreplident = 'i' and i.indisreplident))) \
             from pg_class c join pg_namespace n on n.oid = c.relnamespace \
             where n.nspname = $1 and c.relname = $2",
            &[&table.source.schema, &table.source.name],
        )
        .await
        .map_err(|e| Error::postgres(format!("reading the replica identity of {}", table.source), e))?;
    let Some(row) = row else { return Ok(None) };
    let identity: String = row.get(0);
    if identity == "f" {
        return Ok(None);
    }
    let identity_cols: Vec<String> = row.get::<_, Option<Vec<String>>>(1).unwrap_or_default();
    let mut configured = key.clone();
    configured.sort();
    if configured == identity_cols {
        return Ok(None);
    }
    let what = if identity_cols.is_empty() {
        "has no replica identity columns".to_string()
    } else {
        format!("sends ({}) as the old key", identity_cols.join(", "))
    };
    Ok(Some(format!(
        "{}: key = [{}] of table {} differs from its replica identity, which {what}",
        table.origin.display(),
        key.join(", "),
        table.source
    )))
}
