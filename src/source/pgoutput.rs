//! pgoutput protocol version 1 decoder: a pure function from one XLogData payload to a
//! [`Message`]. No I/O, no catalog: values stay as zero-copy slices of the input.
//!
//! Every length read from the wire is checked against what remains before it is used,
//! so a malformed or truncated message is a [`DecodeError`], never a panic.

use bytes::{Buf, Bytes};

use crate::lsn::Lsn;
use crate::timestamp::PgTimestamp;

pub mod tag {
    pub const BEGIN: u8 = b'B';
    pub const COMMIT: u8 = b'C';
    pub const ORIGIN: u8 = b'O';
    pub const RELATION: u8 = b'R';
    pub const TYPE: u8 = b'Y';
    pub const INSERT: u8 = b'I';
    pub const UPDATE: u8 = b'U';
    pub const DELETE: u8 = b'D';
    pub const TRUNCATE: u8 = b'T';
    pub const MESSAGE: u8 = b'M';
    /// Marks the new tuple of an insert or update.
    pub const NEW_TUPLE: u8 = b'N';
    /// Marks an old tuple holding only the replica identity key.
    pub const KEY_TUPLE: u8 = b'K';
    /// Marks a full old tuple (REPLICA IDENTITY FULL).
    pub const OLD_TUPLE: u8 = b'O';
    pub const COL_NULL: u8 = b'n';
    pub const COL_UNCHANGED_TOAST: u8 = b'u';
    pub const COL_TEXT: u8 = b't';
    pub const COL_BINARY: u8 = b'b';
}

/// A decoded pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Begin {
        /// LSN of the commit record.
        final_lsn: Lsn,
        commit_ts: PgTimestamp,
        xid: u32,
    },
    Commit {
        flags: u8,
        commit_lsn: Lsn,
        /// End of the commit record: the position to confirm once durable.
        end_lsn: Lsn,
        commit_ts: PgTimestamp,
    },
    Origin {
        commit_lsn: Lsn,
        name: String,
    },
    Relation(Relation),
    Type {
        oid: u32,
        namespace: String,
        name: String,
    },
    Insert {
        relation: u32,
        new: Tuple,
    },
    Update {
        relation: u32,
        old: Option<OldTuple>,
        new: Tuple,
    },
    Delete {
        relation: u32,
        old: OldTuple,
    },
    Truncate {
        /// Bit 1: CASCADE, bit 2: RESTART IDENTITY.
        options: u8,
        relations: Vec<u32>,
    },
    Message {
        transactional: bool,
        lsn: Lsn,
        prefix: String,
        content: Bytes,
    },
}

/// A relation (table) description, sent before its first change after each
/// (re)connect and after every schema change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub oid: u32,
    pub namespace: String,
    pub name: String,
    /// `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    pub columns: Vec<RelationColumn>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Bit 1: part of the replica identity key.
    pub flags: u8,
    pub name: String,
    pub type_oid: u32,
    pub typmod: i32,
}

impl RelationColumn {
    pub fn is_key(&self) -> bool {
        self.flags & 1 != 0
    }
}

/// The old image of an update or delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple {
    /// Only the replica identity key columns are set (`K`).
    Key(Tuple),
    /// The whole old row (`O`, REPLICA IDENTITY FULL).
    Full(Tuple),
}

pub type Tuple = Vec<TupleValue>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TupleValue {
    Null,
    /// Unchanged TOASTed value; the server sent no data.
    UnchangedToast,
    Text(Bytes),
    Binary(Bytes),
}

/// A malformed pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed pgoutput message ({what} at byte {offset} of {len})")]
pub struct DecodeError {
    pub what: String,
    pub offset: usize,
    pub len: usize,
}

/// Decode one pgoutput message (the payload of an XLogData frame).
pub fn decode(payload: Bytes) -> Result<Message, DecodeError> {
    let mut r = Reader {
        len: payload.len(),
        buf: payload,
    };
    let tag = r.u8("message tag")?;
    let msg = match tag {
        tag::BEGIN => Message::Begin {
            final_lsn: Lsn(r.u64("final LSN")?),
            commit_ts: PgTimestamp(r.i64("commit timestamp")?),
            xid: r.u32("xid")?,
        },
        tag::COMMIT => Message::Commit {
            flags: r.u8("commit flags")?,
            commit_lsn: Lsn(r.u64("commit LSN")?),
            end_lsn: Lsn(r.u64("end LSN")?),
            commit_ts: PgTimestamp(r.i64("commit timestamp")?),
        },
        tag::ORIGIN => Message::Origin {
            commit_lsn: Lsn(r.u64("origin LSN")?),
            name: r.cstr("origin name")?,
        },
        tag::RELATION => {
            let oid = r.u32("relation OID")?;
            let namespace = r.cstr("namespace")?;
            let name = r.cstr("relation name")?;
            let replica_identity = r.u8("replica identity")?;
            let n = r.count("column count")?;
            let mut columns = Vec::with_capacity(n.min(r.remaining()));
            for _ in 0..n {
                columns.push(RelationColumn {
                    flags: r.u8("column flags")?,
                    name: r.cstr("column name")?,
                    type_oid: r.u32("column type OID")?,
                    typmod: r.i32("column type modifier")?,
                });
            }
            Message::Relation(Relation {
                oid,
                namespace,
                name,
                replica_identity,
                columns,
            })
        }
        tag::TYPE => Message::Type {
            oid: r.u32("type OID")?,
            namespace: r.cstr("type namespace")?,
            name: r.cstr("type name")?,
        },
        tag::INSERT => {
            let relation = r.u32("relation OID")?;
            r.expect(tag::NEW_TUPLE, "'N' before the new tuple")?;
            Message::Insert {
                relation,
                new: r.tuple()?,
            }
        }
        tag::UPDATE => {
            let relation = r.u32("relation OID")?;
            let old = match r.u8("tuple kind")? {
                tag::KEY_TUPLE => Some(OldTuple::Key(r.tuple()?)),
                tag::OLD_TUPLE => Some(OldTuple::Full(r.tuple()?)),
                tag::NEW_TUPLE => None,
                other => return Err(r.error(format!("unexpected tuple kind {:?}", other as char))),
            };
            if old.is_some() {
                r.expect(tag::NEW_TUPLE, "'N' before the new tuple")?;
            }
            Message::Update {
                relation,
                old,
                new: r.tuple()?,
            }
        }
        tag::DELETE => {
            let relation = r.u32("relation OID")?;
            let old = match r.u8("tuple kind")? {
                tag::KEY_TUPLE => OldTuple::Key(r.tuple()?),
                tag::OLD_TUPLE => OldTuple::Full(r.tuple()?),
                other => return Err(r.error(format!("unexpected old tuple kind {:?}", other as char))),
            };
            Message::Delete { relation, old }
        }
        tag::TRUNCATE => {
            let n = r.u32("relation count")? as usize;
            let options = r.u8("truncate options")?;
            if n > r.remaining() / 4 {
                return Err(r.error(format!("{n} relations do not fit in the message")));
            }
            let mut relations = Vec::with_capacity(n);
            for _ in 0..n {
                relations.push(r.u32("relation OID")?);
            }
            Message::Truncate { options, relations }
        }
        tag::MESSAGE => {
            let flags = r.u8("message flags")?;
            let lsn = Lsn(r.u64("message LSN")?);
            let prefix = r.cstr("message prefix")?;
            let len = r.u32("message length")? as usize;
            Message::Message {
                transactional: flags & 1 != 0,
                lsn,
                prefix,
                content: r.bytes(len, "message content")?,
            }
        }
        other => {
            return Err(r.error(format!(
                "unknown message tag {:?} (pgferry speaks pgoutput protocol version 1 without streaming)",
                other as char
            )))
        }
    };
    if r.remaining() != 0 {
        return Err(r.error(format!("{} trailing bytes", r.remaining())));
    }
    Ok(msg)
}

struct Reader {
    buf: Bytes,
    len: usize,
}

impl Reader {
    fn remaining(&self) -> usize {
        self.buf.remaining()
    }

    fn error(&self, what: impl Into<String>) -> DecodeError {
        DecodeError {
            what: what.into(),
            offset: self.len - self.buf.remaining(),
            len: self.len,
        }
    }

    fn need(&self, n: usize, what: &str) -> Result<(), DecodeError> {
        if self.buf.remaining() < n {
            return Err(self.error(format!("truncated {what}")));
        }
        Ok(())
    }

    fn u8(&mut self, what: &str) -> Result<u8, DecodeError> {
        self.need(1, what)?;
        Ok(self.buf.get_u8())
    }

    fn expect(&mut self, want: u8, what: &str) -> Result<(), DecodeError> {
        let got = self.u8(what)?;
        if got != want {
            return Err(self.error(format!("expected {what}, found {:?}", got as char)));
        }
        Ok(())
    }

    fn u32(&mut self, what: &str) -> Result<u32, DecodeError> {
        self.need(4, what)?;
        Ok(self.buf.get_u32())
    }

    fn i32(&mut self, what: &str) -> Result<i32, DecodeError> {
        self.need(4, what)?;
        Ok(self.buf.get_i32())
    }

    fn u64(&mut self, what: &str) -> Result<u64, DecodeError> {
        self.need(8, what)?;
        Ok(self.buf.get_u64())
    }

    fn i64(&mut self, what: &str) -> Result<i64, DecodeError> {
        self.need(8, what)?;
        Ok(self.buf.get_i64())
    }

    /// A 16-bit column count; negative counts are malformed.
    fn count(&mut self, what: &str) -> Result<usize, DecodeError> {
        self.need(2, what)?;
        let n = self.buf.get_i16();
        usize::try_from(n).map_err(|_| self.error(format!("negative {what} {n}")))
    }

    fn bytes(&mut self, n: usize, what: &str) -> Result<Bytes, DecodeError> {
        self.need(n, what)?;
        Ok(self.buf.split_to(n))
    }

    fn cstr(&mut self, what: &str) -> Result<String, DecodeError> {
        let end = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| self.error(format!("unterminated {what}")))?;
        let s = self.buf.split_to(end);
        self.buf.advance(1);
        String::from_utf8(s.to_vec()).map_err(|_| self.error(format!("{what} is not UTF-8")))
    }

    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let n = self.count("tuple column count")?;
        // Each column takes at least one byte, so `n` bounds the allocation safely.
        if n > self.remaining() {
            return Err(self.error(format!("{n} tuple columns do not fit in the message")));
        }
        let mut values = Vec::with_capacity(n);
        for _ in 0..n {
            let v = match self.u8("tuple column kind")? {
                tag::COL_NULL => TupleValue::Null,
                tag::COL_UNCHANGED_TOAST => TupleValue::UnchangedToast,
                kind @ (tag::COL_TEXT | tag::COL_BINARY) => {
                    let len = self.i32("column value length")?;
                    let len = usize::try_from(len)
                        .map_err(|_| self.error(format!("negative column value length {len}")))?;
                    let data = self.bytes(len, "column value")?;
                    if kind == tag::COL_TEXT {
                        TupleValue::Text(data)
                    } else {
                        TupleValue::Binary(data)
                    }
                }
                other => {
                    return Err(self.error(format!("unknown tuple column kind {:?}", other as char)))
                }
            };
            values.push(v);
        }
        Ok(values)
    }
}

#[cfg(test)]
mod tests;
