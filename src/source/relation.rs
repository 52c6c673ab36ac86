//! The relation cache: turns each pgoutput Relation message into a [`TableSchema`],
//! re-derived on every R (after reconnects and ALTER TABLE alike), with type names,
//! modifiers, nullability and the primary key read from the catalog over a normal
//! connection. Also maps tuples to row images, dropping excluded columns.

use std::collections::HashMap;
use std::sync::Arc;

use prometheus::IntCounter;
use tokio_postgres::Client;

use super::pgoutput::{OldTuple, Relation, RelationColumn, Tuple, TupleValue};
use crate::config::{Config, Table};
use crate::error::Error;
use crate::event::{
    Column, Datum, Op, PgType, ReplicaIdentity, Row, TableName, TableSchema, Text, TypeKind,
};
use crate::metrics::metrics;

/// What the source knows about one relation OID.
pub struct RelationState {
    pub schema: Arc<TableSchema>,
    /// For each published column, its position in the relation message's tuples.
    positions: Vec<usize>,
    /// Number of columns in the relation message (tuple length to expect).
    wire_columns: usize,
    /// False when tables are configured and this one is not: its changes are skipped.
    pub selected: bool,
    /// `pgferry_source_changes_total{table,op}` for this table, by [`op_index`].
    counters: [IntCounter; 4],
    /// The key of `hmac` transforms.
    phi_key: super::transform::HmacKey,
}

/// The type of a transformed (`hmac`, `redact`) column's values.
fn text_type() -> PgType {
    PgType {
        oid: 25,
        name: "text".into(),
        kind: TypeKind::Text,
        delimiter: b',',
    }
}

/// Index into [`RelationState::count`]'s counters.
fn op_index(op: Op) -> usize {
    match op {
        Op::Create | Op::Read => 0,
        Op::Update => 1,
        Op::Delete => 2,
        Op::Truncate => 3,
    }
}

pub struct RelationCache {
    relations: HashMap<u32, RelationState>,
    types: HashMap<u32, Arc<PgType>>,
    /// The configured tables' OIDs when the source started: a table renamed (or moved
    /// to another schema) since is still followed, under its configured name.
    configured_oids: HashMap<u32, TableName>,
    /// Unconfigured relations already warned about.
    warned: std::collections::HashSet<u32>,
}

impl Default for RelationCache {
    fn default() -> Self {
        Self::new(HashMap::new())
    }
}

impl RelationCache {
    pub fn new(configured_oids: HashMap<u32, TableName>) -> Self {
        RelationCache {
            relations: HashMap::new(),
            types: HashMap::new(),
            configured_oids,
            warned: std::collections::HashSet::new(),
        }
    }

    pub fn get(&self, oid: u32) -> Option<&RelationState> {
        self.relations.get(&oid)
    }

    /// A Type message: a user type may have changed, so resolve it again next time.
    pub fn forget_type(&mut self, oid: u32) {
        self.types.remove(&oid);
    }

    /// Derive the table schema from a Relation message and the catalog.
    pub async fn update(
        &mut self,
        catalog: &Client,
        config: &Config,
        rel: Relation,
    ) -> Result<&RelationState, Error> {
        let mut name = TableName::new(rel.namespace.clone(), rel.name.clone());
        let configured_oid = self
            .configured_oids
            .iter()
            .find(|(_, n)| **n == name)
            .map(|(oid, _)| *oid);
        if let Some(old) = configured_oid.filter(|old| *old != rel.oid) {
            // Another table now has a configured table's name. If the configured one
            // still exists (renamed, and this is a new table in its place), this one
            // is not ours; if it was dropped, this is its successor.
            let still_there = catalog
                .query_opt("select 1 from pg_class where oid = $1", &[&old])
                .await
                .map_err(|e| Error::postgres("looking up a renamed table", e))?
                .is_some();
            if still_there {
                name = TableName::new(
                    rel.namespace.clone(),
                    format!("{} (oid {}, not the configured table)", rel.name, rel.oid),
                );
            } else {
                self.configured_oids.remove(&old);
                self.configured_oids.insert(rel.oid, name.clone());
            }
        }
        if config.table(&name).is_none() {
            if let Some(configured) = self.configured_oids.get(&rel.oid) {
                // Renamed, or moved by SET SCHEMA, while streaming. Its changes keep
                // their configured name (and so their topic and target); the next start
                // stops until the configuration names the table as it is now.
                tracing::warn!(configured = %configured, now = %name, oid = rel.oid,
                    "a configured table was renamed on the source; following it by OID under its configured name \
                     (update its table file before the next restart)");
                metrics()
                    .errors
                    .with_label_values(&["source", "renamed_table"])
                    .inc();
                name = configured.clone();
            }
        }
        let table_cfg = config.table(&name);
        let selected = config.tables.is_empty() || table_cfg.is_some();
        if !selected {
            // Not ours: its changes are skipped. Nothing of it is resolved (a type it
            // alone uses may be gone), but it is said once, not hidden.
            if self.warned.insert(rel.oid) {
                tracing::warn!(table = %name, oid = rel.oid,
                    "the publication carries a table that is not configured; its changes are skipped");
            }
            let schema = Arc::new(TableSchema {
                oid: rel.oid,
                name,
                columns: Vec::new(),
                key: Vec::new(),
                replica_identity: ReplicaIdentity::Default,
            });
            let table = schema.name.to_string();
            let counters = ["c", "u", "d", "t"]
                .map(|op| metrics().source_changes.with_label_values(&[&table, op]));
            self.relations.insert(
                rel.oid,
                RelationState {
                    schema,
                    positions: Vec::new(),
                    wire_columns: rel.columns.len(),
                    selected,
                    counters,
                    phi_key: super::transform::HmacKey::new(&[]),
                },
            );
            return Ok(&self.relations[&rel.oid]);
        }
        let attrs = catalog_columns(catalog, rel.oid).await?;
        let mut columns = Vec::new();
        let mut positions = Vec::new();
        let mut pk = Vec::new();
        let mut identity_key = Vec::new();
        for (pos, rc) in rel.columns.iter().enumerate() {
            if table_cfg.is_some_and(|t| t.exclude.contains(&rc.name)) {
                continue;
            }
            let attr = attrs.iter().find(|a| a.name == rc.name);
            let ty = self.resolve_type(catalog, rc.type_oid).await?;
            let type_name = match attr {
                Some(a) if a.type_oid == rc.type_oid => a.type_name.clone(),
                _ => ty.name.clone(),
            };
            if let Some(a) = attr.filter(|a| a.pk_position.is_some()) {
                pk.push((a.pk_position.unwrap_or(0), columns.len()));
            }
            if rc.is_key() {
                identity_key.push(columns.len());
            }
            let transform = table_cfg.and_then(|t| t.transform.get(&rc.name).copied());
            let mut column = Column {
                name: rc.name.clone(),
                ty,
                typmod: rc.typmod,
                type_name,
                nullable: attr.is_none_or(|a| !a.not_null),
                transform,
            };
            if let Some(t) = transform {
                super::transform::check(t, &column.ty).map_err(|why| {
                    Error::operator(format!(
                        "{}: transform of table {} column {}: {why}",
                        table_cfg.map_or_else(String::new, |c| c.origin.display().to_string()),
                        name,
                        rc.name
                    ))
                })?;
                match t {
                    // What leaves the source is text.
                    crate::event::Transform::Hmac | crate::event::Transform::Redact => {
                        column.ty = Arc::new(text_type());
                        column.typmod = -1;
                        column.type_name = "text".into();
                    }
                    crate::event::Transform::Null => column.nullable = true,
                    crate::event::Transform::Year => {}
                }
            }
            columns.push(column);
            positions.push(pos);
        }
        let replica_identity =
            ReplicaIdentity::from_byte(rel.replica_identity).unwrap_or(ReplicaIdentity::Default);
        pk.sort();
        let configured = table_cfg.and_then(|t| t.key.as_ref().map(|k| (t, k)));
        let key = match configured {
            Some((table, names)) => configured_key(table, names, &columns)?,
            None if !pk.is_empty() => pk.into_iter().map(|(_, i)| i).collect(),
            // FULL flags every column as key: that is not a key.
            None if replica_identity == ReplicaIdentity::Index => identity_key,
            None => Vec::new(),
        };
        let schema = Arc::new(TableSchema {
            oid: rel.oid,
            name,
            columns,
            key,
            replica_identity,
        });
        tracing::debug!(table = %schema.name, oid = rel.oid, columns = schema.columns.len(), "relation");
        let table = schema.name.to_string();
        let counters = ["c", "u", "d", "t"]
            .map(|op| metrics().source_changes.with_label_values(&[&table, op]));
        let state = RelationState {
            schema,
            positions,
            wire_columns: rel.columns.len(),
            selected,
            counters,
            // Present whenever a table uses hmac (checked with the config).
            phi_key: super::transform::HmacKey::new(
                config.phi_key.as_ref().map_or(&[][..], |k| &k.0[..]),
            ),
        };
        self.relations.insert(rel.oid, state);
        Ok(&self.relations[&rel.oid])
    }

    async fn resolve_type(&mut self, catalog: &Client, oid: u32) -> Result<Arc<PgType>, Error> {
        if let Some(t) = self.types.get(&oid) {
            return Ok(t.clone());
        }
        let row = catalog
            .query_opt(
                "select format_type(t.oid, null), t.typtype::text, t.typelem, t.typbasetype, \
                        t.typdelim::text, t.typcategory::text, t.typlen, t.typname::text \
                 from pg_type t where t.oid = $1",
                &[&oid],
            )
            .await
            .map_err(|e| {
                Error::postgres(format!("looking up type {oid} in the source catalog"), e)
            })?
            .ok_or_else(|| {
                Error::fatal(format!(
                    "type OID {oid} is not in the source catalog (dropped?)"
                ))
            })?;
        let name: String = row.get(0);
        let typtype: String = row.get(1);
        let elem: u32 = row.get(2);
        let base: u32 = row.get(3);
        let delim: String = row.get(4);
        let category: String = row.get(5);
        let typlen: i16 = row.get(6);
        let typname: String = row.get(7);
        let kind = if typtype == "d" {
            // A domain behaves as its base type.
            Box::pin(self.resolve_type(catalog, base))
                .await?
                .kind
                .clone()
        } else if category == "A" && typlen == -1 && elem != 0 && typname.starts_with('_') {
            TypeKind::Array(Box::new(
                (*Box::pin(self.resolve_type(catalog, elem)).await?).clone(),
            ))
        } else if typtype == "e" {
            TypeKind::Enum
        } else {
            builtin_kind(oid, &typname)
        };
        let ty = Arc::new(PgType {
            oid,
            name,
            kind,
            delimiter: delim.bytes().next().unwrap_or(b','),
        });
        self.types.insert(oid, ty.clone());
        Ok(ty)
    }
}

impl RelationState {
    /// Count one change of this table.
    pub fn count(&self, op: Op) {
        self.counters[op_index(op)].inc();
    }

    /// The row image of a tuple, keeping only published columns.
    pub fn row(&self, tuple: Tuple, key_only: bool) -> Result<Row, Error> {
        if tuple.len() != self.wire_columns {
            return Err(Error::fatal(format!(
                "table {}: a tuple has {} columns but its relation message announced {}",
                self.schema.name,
                tuple.len(),
                self.wire_columns
            )));
        }
        let mut values = Vec::with_capacity(self.positions.len());
        // Usually the wire columns are the table's, in order: no reshuffle needed.
        let in_order = self.positions.len() == tuple.len()
            && self.positions.iter().enumerate().all(|(i, &p)| i == p);
        if in_order {
            for (i, v) in tuple.into_iter().enumerate() {
                values.push(self.datum(i, Some(v))?);
            }
        } else {
            let mut tuple: Vec<Option<TupleValue>> = tuple.into_iter().map(Some).collect();
            for (i, &pos) in self.positions.iter().enumerate() {
                values.push(self.datum(i, tuple[pos].take())?);
            }
        }
        Ok(Row { values, key_only })
    }

    /// Column `i`'s value from the wire, its transform applied.
    fn datum(&self, i: usize, value: Option<TupleValue>) -> Result<Datum, Error> {
        let datum = match value {
            Some(TupleValue::Text(bytes)) => Datum::Text(Text::new(bytes).map_err(|_| {
                Error::operator(format!(
                    "table {} column {}: value is not valid UTF-8",
                    self.schema.name, self.schema.columns[i].name
                ))
                .with_hint(
                    "pgferry reads with client_encoding UTF8; check the source database encoding",
                )
            })?),
            Some(TupleValue::UnchangedToast) => Datum::Unchanged,
            Some(TupleValue::Null) | None => Datum::Null,
            Some(TupleValue::Binary(_)) => {
                return Err(Error::fatal(format!(
                    "table {}: the server sent a binary value, which pgferry never asks for",
                    self.schema.name
                )))
            }
        };
        Ok(match (self.schema.columns[i].transform, datum) {
            (Some(t), Datum::Text(text)) => {
                match super::transform::apply(t, &self.phi_key, text.as_str()) {
                    Some(v) => Datum::Text(Text::from_string(v)),
                    None => Datum::Null,
                }
            }
            // Unchanged TOAST stays unchanged: the target keeps its transformed value.
            (Some(crate::event::Transform::Null), Datum::Unchanged) => Datum::Null,
            (_, d) => d,
        })
    }

    pub fn old_row(&self, old: OldTuple) -> Result<Row, Error> {
        match old {
            OldTuple::Key(t) => self.row(t, true),
            OldTuple::Full(t) => self.row(t, false),
        }
    }
}

/// A configured table as a Relation message would describe it, read from the catalog:
/// for commands (`pgferry schema`) that need a table's schema without streaming.
pub async fn describe(catalog: &Client, table: &Table) -> Result<Relation, Error> {
    let row = catalog
        .query_opt(
            "select c.oid, c.relreplident::text from pg_class c join pg_namespace n on n.oid = c.relnamespace \
             where n.nspname = $1 and c.relname = $2 and c.relkind in ('r', 'p')",
            &[&table.source.schema, &table.source.name],
        )
        .await
        .map_err(|e| Error::postgres(format!("looking up table {}", table.source), e))?
        .ok_or_else(|| {
            Error::operator(format!("{}: table {} does not exist on the source", table.origin.display(), table.source))
        })?;
    let oid: u32 = row.get(0);
    let identity: String = row.get(1);
    let rows = catalog
        .query(
            "select a.attname::text, a.atttypid, a.atttypmod, \
                    coalesce((select a.attnum = any(i.indkey) from pg_index i where i.indrelid = a.attrelid \
                              and ((i.indisprimary and c.relreplident = 'd') or (i.indisreplident and c.relreplident = 'i'))), \
                             c.relreplident = 'f') \
             from pg_attribute a join pg_class c on c.oid = a.attrelid \
             where a.attrelid = $1 and a.attnum > 0 and not a.attisdropped and a.attgenerated = '' order by a.attnum",
            &[&oid],
        )
        .await
        .map_err(|e| Error::postgres(format!("reading the columns of {}", table.source), e))?;
    Ok(Relation {
        oid,
        namespace: table.source.schema.clone(),
        name: table.source.name.clone(),
        replica_identity: identity.bytes().next().unwrap_or(b'd'),
        columns: rows
            .iter()
            .map(|r| RelationColumn {
                flags: u8::from(r.get::<_, bool>(3)),
                name: r.get(0),
                type_oid: r.get(1),
                typmod: r.get(2),
            })
            .collect(),
    })
}

struct CatalogColumn {
    name: String,
    type_oid: u32,
    type_name: String,
    not_null: bool,
    pk_position: Option<i32>,
}

async fn catalog_columns(catalog: &Client, rel: u32) -> Result<Vec<CatalogColumn>, Error> {
    let rows = catalog
        .query(
            "select a.attname::text, a.atttypid, format_type(a.atttypid, a.atttypmod), a.attnotnull, \
                    (select array_position(i.indkey::int2[], a.attnum) from pg_index i \
                      where i.indrelid = a.attrelid and i.indisprimary) \
             from pg_attribute a where a.attrelid = $1 and a.attnum > 0 and not a.attisdropped",
            &[&rel],
        )
        .await
        .map_err(|e| Error::postgres(format!("reading the columns of relation {rel} from the source catalog"), e))?;
    Ok(rows
        .iter()
        .map(|r| CatalogColumn {
            name: r.get(0),
            type_oid: r.get(1),
            type_name: r.get(2),
            not_null: r.get(3),
            pk_position: r.get(4),
        })
        .collect())
}

fn configured_key(
    table: &Table,
    names: &[String],
    columns: &[Column],
) -> Result<Vec<usize>, Error> {
    names
        .iter()
        .map(|n| {
            columns.iter().position(|c| &c.name == n).ok_or_else(|| {
                Error::operator(format!(
                    "{}: key: table {} has no column {n:?}",
                    table.origin.display(),
                    table.source
                ))
            })
        })
        .collect()
}

fn builtin_kind(oid: u32, typname: &str) -> TypeKind {
    match oid {
        16 => TypeKind::Bool,
        21 => TypeKind::Int2,
        23 => TypeKind::Int4,
        20 => TypeKind::Int8,
        26 => TypeKind::Oid,
        700 => TypeKind::Float4,
        701 => TypeKind::Float8,
        1700 => TypeKind::Numeric,
        790 => TypeKind::Money,
        25 | 1043 | 1042 | 19 | 18 => TypeKind::Text,
        2950 => TypeKind::Uuid,
        114 => TypeKind::Json,
        3802 => TypeKind::Jsonb,
        1082 => TypeKind::Date,
        1083 => TypeKind::Time,
        1114 => TypeKind::Timestamp,
        1184 => TypeKind::Timestamptz,
        1266 => TypeKind::Timetz,
        1186 => TypeKind::Interval,
        17 => TypeKind::Bytea,
        _ if typname == "citext" => TypeKind::Text,
        _ => TypeKind::Other,
    }
}
