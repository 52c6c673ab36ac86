//! The one change-event model that flows through the pipeline.
//!
//! A committed source transaction arrives as `Begin`, its row changes in order, and
//! `Commit`. Every change carries its table schema, key, before/after images, the
//! columns whose unchanged TOAST value was not sent, the commit LSN and timestamp, the
//! xid and its ordinal inside the transaction. Avro, JSON and SQL are encodings of this.
//!
//! Order is `(commit_lsn, ordinal)`: commit LSNs grow across transactions, the LSNs of
//! individual changes do not.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;

use crate::lsn::Lsn;
use crate::timestamp::PgTimestamp;

/// What happened to a row. The letters are Debezium's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// `c`: insert.
    Create,
    /// `u`: update.
    Update,
    /// `d`: delete.
    Delete,
    /// `t`: truncate of the whole table.
    Truncate,
    /// `r`: a row read by the initial snapshot.
    Read,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Create => "c",
            Op::Update => "u",
            Op::Delete => "d",
            Op::Truncate => "t",
            Op::Read => "r",
        }
    }
}

/// How pgferry interprets a PostgreSQL type (domains are resolved to their base type).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TypeKind {
    Bool,
    Int2,
    Int4,
    Int8,
    Oid,
    Float4,
    Float8,
    Numeric,
    Money,
    /// text, varchar, bpchar, citext, name, char and other plain strings.
    Text,
    Uuid,
    Json,
    Jsonb,
    Date,
    Time,
    Timestamp,
    Timestamptz,
    Timetz,
    Interval,
    Bytea,
    Enum,
    /// Any other type: carried as its PostgreSQL text form (inet, ranges, xml, …).
    Other,
    /// An array; element values are parsed from the array literal.
    Array(Box<PgType>),
}

/// A resolved column type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgType {
    pub oid: u32,
    /// `format_type` without modifier, e.g. `numeric`, `public.mood`, `integer[]`.
    pub name: String,
    pub kind: TypeKind,
    /// Element delimiter in array literals of this type (`,` for all but `box`).
    pub delimiter: u8,
}

/// One column of a table as pgferry publishes it (excluded columns are not here).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub ty: Arc<PgType>,
    /// PostgreSQL's type modifier (-1 when none), e.g. numeric precision and scale.
    pub typmod: i32,
    /// `format_type(oid, typmod)`, e.g. `numeric(10,2)`.
    pub type_name: String,
    pub nullable: bool,
    /// A PHI transform applied at the source (the type above is then the transformed
    /// value's: `text` for `hmac` and `redact`).
    pub transform: Option<Transform>,
}

/// A column transform of the source stage (`[transform]` in a table file): the
/// plaintext never leaves the source, whatever reads the events (Kafka, `tail`, the
/// sink, dead-letter topics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transform {
    /// Lowercase hex HMAC-SHA256 of the value's PostgreSQL text, keyed by `[phi] key`.
    Hmac,
    /// The string `REDACTED` (text columns only).
    Redact,
    /// Always NULL.
    Null,
    /// A date or timestamp truncated to January 1st of its year (HIPAA Safe Harbor).
    Year,
}

impl Transform {
    pub fn as_str(self) -> &'static str {
        match self {
            Transform::Hmac => "hmac",
            Transform::Redact => "redact",
            Transform::Null => "null",
            Transform::Year => "year",
        }
    }
}

impl Column {
    /// Precision and scale of a `numeric(p,s)` column, if it has a modifier.
    pub fn numeric_precision_scale(&self) -> Option<(u32, i32)> {
        if self.typmod < 4 {
            return None;
        }
        let m = self.typmod - 4;
        let precision = ((m >> 16) & 0xFFFF) as u32;
        // The scale is an 11-bit signed number since PostgreSQL 15.
        let scale = ((m & 0x7FF) ^ 1024) - 1024;
        Some((precision, scale))
    }
}

/// Replica identity of the source table: what the old image of an update/delete holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaIdentity {
    /// The primary key.
    Default,
    /// Nothing: updates and deletes cannot be published.
    Nothing,
    /// The whole old row.
    Full,
    /// The columns of a unique index.
    Index,
}

impl ReplicaIdentity {
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            b'd' => Some(Self::Default),
            b'n' => Some(Self::Nothing),
            b'f' => Some(Self::Full),
            b'i' => Some(Self::Index),
            _ => None,
        }
    }
}

/// A schema-qualified table name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

impl TableName {
    pub fn new(schema: impl Into<String>, name: impl Into<String>) -> Self {
        TableName {
            schema: schema.into(),
            name: name.into(),
        }
    }

    /// The name quoted for SQL: `"public"."Patients"`.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// Quote a SQL identifier (always, so case and reserved words survive).
pub fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// The schema of a source table as of a relation message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSchema {
    /// The relation's OID on the source.
    pub oid: u32,
    pub name: TableName,
    pub columns: Vec<Column>,
    /// Indices into `columns` of the key (configured key, else primary key, else
    /// replica identity index). Empty when the table has none.
    pub key: Vec<usize>,
    pub replica_identity: ReplicaIdentity,
}

impl TableSchema {
    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }
}

/// UTF-8 text held without copying out of the network buffer.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Text(Bytes);

impl Text {
    pub fn new(bytes: Bytes) -> Result<Self, std::str::Utf8Error> {
        std::str::from_utf8(&bytes)?;
        Ok(Text(bytes))
    }

    pub fn from_string(s: String) -> Self {
        Text(Bytes::from(s))
    }

    pub fn as_str(&self) -> &str {
        // SAFETY: the only constructors check or guarantee UTF-8.
        unsafe { std::str::from_utf8_unchecked(&self.0) }
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Text {
    /// Row values may be PHI: debug output shows only their size.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Text({} bytes)", self.0.len())
    }
}

/// One column value of a row image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Datum {
    Null,
    /// The PostgreSQL text form of the value.
    Text(Text),
    /// An unchanged TOASTed value the server did not send. Never null, never a
    /// placeholder: encoders leave it out and list the column as unchanged.
    Unchanged,
}

/// A row image aligned with [`TableSchema::columns`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub values: Vec<Datum>,
    /// Only the key columns are meaningful (an old key tuple of replica identity
    /// DEFAULT or INDEX); the other values are `Null` and must not be read as data.
    pub key_only: bool,
}

/// `source.snapshot` of an event, as Debezium sets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SnapshotMark {
    /// A streamed change.
    #[default]
    No,
    /// The first row of the initial snapshot.
    First,
    /// A row of the initial snapshot.
    True,
    /// The last row of the initial snapshot.
    Last,
    /// A row of an incremental (on-demand, or resumed) snapshot.
    Incremental,
}

impl SnapshotMark {
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotMark::No => "false",
            SnapshotMark::First => "first",
            SnapshotMark::True => "true",
            SnapshotMark::Last => "last",
            SnapshotMark::Incremental => "incremental",
        }
    }
}

/// One committed row change.
#[derive(Debug, Clone)]
pub struct Change {
    pub op: Op,
    pub table: Arc<TableSchema>,
    pub xid: u32,
    /// LSN of the transaction's commit record (same for all its changes).
    pub commit_lsn: Lsn,
    /// LSN of this change's WAL record.
    pub lsn: Lsn,
    /// Position of the change inside its transaction, from 0.
    pub ordinal: u32,
    pub commit_ts: PgTimestamp,
    /// End LSN of the transaction the source handed on before this one (Debezium's
    /// `source.sequence[0]`, the last committed LSN).
    pub prev_commit_end: Lsn,
    pub before: Option<Row>,
    pub after: Option<Row>,
    /// Set on rows read by a snapshot (`op` is then `Read`).
    pub snapshot: SnapshotMark,
}

impl Change {
    /// The row that identifies the changed row: the after image, or the before image
    /// of a delete.
    fn identifying_row(&self) -> Option<&Row> {
        self.after.as_ref().or(self.before.as_ref())
    }

    /// Key column values, in key order. `None` for truncates and keyless tables.
    pub fn key(&self) -> Option<impl Iterator<Item = (&Column, &Datum)>> {
        if self.table.key.is_empty() {
            return None;
        }
        let row = self.identifying_row()?;
        Some(
            self.table
                .key
                .iter()
                .map(move |&i| (&self.table.columns[i], &row.values[i])),
        )
    }

    /// Names of the columns whose unchanged TOAST value was not sent.
    pub fn unchanged(&self) -> impl Iterator<Item = &str> {
        let values = self
            .after
            .as_ref()
            .map(|r| r.values.as_slice())
            .unwrap_or(&[]);
        values
            .iter()
            .zip(&self.table.columns)
            .filter(|(d, _)| matches!(d, Datum::Unchanged))
            .map(|(_, c)| c.name.as_str())
    }
}

/// Transaction metadata from the source's Begin message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Txn {
    pub xid: u32,
    pub commit_lsn: Lsn,
    pub commit_ts: PgTimestamp,
    /// See [`Change::prev_commit_end`].
    pub prev_commit_end: Lsn,
}

/// What the source hands to the next stage, in commit order.
#[derive(Debug, Clone)]
pub enum Event {
    Begin(Txn),
    Change(Change),
    /// The transaction is complete. `end_lsn` is what the slot may be confirmed to
    /// once this and every earlier transaction are durable downstream.
    Commit {
        txn: Txn,
        end_lsn: Lsn,
    },
    /// A row of the initial snapshot, outside any transaction: durable on its own and
    /// confirming nothing (the slot waits at its consistent point meanwhile).
    Snapshot(Change),
    /// Everything before this is durable downstream once this mark is (see
    /// `Downstream::marks`): how a snapshot learns that its chunks are safe.
    Mark(u64),
}

impl Event {
    /// About how many bytes the event holds: its values, plus a fixed overhead. What
    /// the byte budget between stages counts (see `budget`).
    pub fn weight(&self) -> usize {
        const OVERHEAD: usize = 64;
        let (Event::Change(c) | Event::Snapshot(c)) = self else {
            return OVERHEAD;
        };
        let row = |r: &Option<Row>| {
            r.as_ref().map_or(0, |r| {
                r.values
                    .iter()
                    .map(|d| match d {
                        Datum::Text(t) => t.as_str().len() + 8,
                        _ => 8,
                    })
                    .sum()
            })
        };
        OVERHEAD + row(&c.before) + row(&c.after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn column(typmod: i32) -> Column {
        Column {
            name: "v".into(),
            ty: Arc::new(PgType {
                oid: 1700,
                name: "numeric".into(),
                kind: TypeKind::Numeric,
                delimiter: b',',
            }),
            typmod,
            type_name: "numeric".into(),
            nullable: true,
            transform: None,
        }
    }

    #[test]
    fn numeric_typmod_decodes_precision_and_scale() {
        // numeric(10,2)
        assert_eq!(
            column((10 << 16 | 2) + 4).numeric_precision_scale(),
            Some((10, 2))
        );
        // numeric(3,-2) is legal since PostgreSQL 15
        let m = (3 << 16) | (-2i32 & 0x7FF);
        assert_eq!(column(m + 4).numeric_precision_scale(), Some((3, -2)));
        assert_eq!(column(-1).numeric_precision_scale(), None);
    }

    #[test]
    fn quotes_identifiers() {
        assert_eq!(
            TableName::new("public", "Pa\"t").quoted(),
            "\"public\".\"Pa\"\"t\""
        );
    }
}
