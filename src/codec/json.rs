//! `tail` lines (DESIGN §2): values are their faithful PostgreSQL text where JSON has
//! no exact type; integers, booleans, text and json/jsonb are native; arrays are JSON
//! arrays. Writes straight into a byte buffer (no intermediate value tree) because
//! `tail` runs it once per change. Kafka's `format = "json"` is [`super::connect`].

use std::io::Write;

use super::array::{self, Element};
use crate::event::{Change, Column, Datum, PgType, Row, TypeKind};

/// Append one `tail` line (with its newline) for `change` to `out`.
pub fn write_tail_line(change: &Change, out: &mut Vec<u8>) {
    let table = &change.table;
    out.extend_from_slice(b"{\"op\":\"");
    out.extend_from_slice(change.op.as_str().as_bytes());
    out.extend_from_slice(b"\",\"schema\":");
    write_str(out, &table.name.schema);
    out.extend_from_slice(b",\"table\":");
    write_str(out, &table.name.name);
    let _ = write!(
        out,
        ",\"xid\":{},\"commit_lsn\":\"{}\",\"lsn\":\"{}\",\"ordinal\":{},\"commit_ts\":\"{}\",\"key\":",
        change.xid, change.commit_lsn, change.lsn, change.ordinal, change.commit_ts
    );
    if !write_key_object(change, out) {
        out.extend_from_slice(b"null");
    }
    out.extend_from_slice(b",\"before\":");
    write_row(out, &table.columns, &table.key, change.before.as_ref());
    out.extend_from_slice(b",\"after\":");
    write_row(out, &table.columns, &table.key, change.after.as_ref());
    out.extend_from_slice(b",\"unchanged\":[");
    for (i, name) in change.unchanged().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(out, name);
    }
    out.extend_from_slice(b"]}\n");
}

/// The key columns as a JSON object. Writes nothing and returns false when the change
/// has no key (truncates, keyless tables).
pub fn write_key_object(change: &Change, out: &mut Vec<u8>) -> bool {
    let Some(key) = change.key() else {
        return false;
    };
    out.push(b'{');
    for (i, (col, datum)) in key.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(out, &col.name);
        out.push(b':');
        write_datum(out, col, datum);
    }
    out.push(b'}');
    true
}

/// A row image as a JSON object. Unchanged TOAST columns are left out (they are listed
/// in `unchanged`); a key-only old image shows only the key columns.
fn write_row(out: &mut Vec<u8>, columns: &[Column], key: &[usize], row: Option<&Row>) {
    let Some(row) = row else {
        out.extend_from_slice(b"null");
        return;
    };
    out.push(b'{');
    let mut first = true;
    for (i, (col, datum)) in columns.iter().zip(&row.values).enumerate() {
        if matches!(datum, Datum::Unchanged) || (row.key_only && !key.contains(&i)) {
            continue;
        }
        if !first {
            out.push(b',');
        }
        first = false;
        write_str(out, &col.name);
        out.push(b':');
        write_datum(out, col, datum);
    }
    out.push(b'}');
}

fn write_datum(out: &mut Vec<u8>, col: &Column, datum: &Datum) {
    match datum {
        Datum::Text(t) => write_value(out, &col.ty, t.as_str()),
        // Unchanged values never reach here from rows; a key is never unchanged TOAST.
        Datum::Null | Datum::Unchanged => out.extend_from_slice(b"null"),
    }
}

/// One value from its PostgreSQL text form.
pub fn write_value(out: &mut Vec<u8>, ty: &PgType, text: &str) {
    match &ty.kind {
        TypeKind::Bool => out.extend_from_slice(if text == "t" { b"true" } else { b"false" }),
        TypeKind::Int2 | TypeKind::Int4 | TypeKind::Int8 | TypeKind::Oid if is_integer(text) => {
            out.extend_from_slice(text.as_bytes())
        }
        TypeKind::Json | TypeKind::Jsonb => out.extend_from_slice(text.as_bytes()),
        TypeKind::Array(elem) => match array::parse(text, ty.delimiter) {
            Some(items) => write_elements(out, elem, &items),
            None => write_str(out, text),
        },
        _ => write_str(out, text),
    }
}

fn write_elements(out: &mut Vec<u8>, elem: &PgType, items: &[Element]) {
    out.push(b'[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        match item {
            Element::Null => out.extend_from_slice(b"null"),
            Element::Value(v) => write_value(out, elem, v),
            Element::Array(sub) => write_elements(out, elem, sub),
        }
    }
    out.push(b']');
}

fn is_integer(s: &str) -> bool {
    let digits = s.strip_prefix('-').unwrap_or(s);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

/// A JSON string literal.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    // serde_json's escaping is exact and fast; writing into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::event::{Op, ReplicaIdentity, TableName, TableSchema, Text};
    use crate::lsn::Lsn;
    use crate::timestamp::PgTimestamp;

    fn ty(kind: TypeKind) -> Arc<PgType> {
        Arc::new(PgType {
            oid: 0,
            name: "t".into(),
            kind,
            delimiter: b',',
        })
    }

    fn col(name: &str, kind: TypeKind) -> Column {
        Column {
            name: name.into(),
            ty: ty(kind),
            typmod: -1,
            type_name: "t".into(),
            nullable: true,
            transform: None,
        }
    }

    fn text(s: &str) -> Datum {
        Datum::Text(Text::from_string(s.to_string()))
    }

    fn render(kind: TypeKind, value: &str) -> String {
        let mut out = Vec::new();
        write_value(&mut out, &ty(kind), value);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn values_map_as_designed() {
        assert_eq!(
            render(TypeKind::Int8, "-9223372036854775808"),
            "-9223372036854775808"
        );
        assert_eq!(render(TypeKind::Bool, "f"), "false");
        assert_eq!(render(TypeKind::Numeric, "NaN"), "\"NaN\"");
        assert_eq!(render(TypeKind::Float8, "-0"), "\"-0\"");
        assert_eq!(render(TypeKind::Jsonb, "{\"a\": [1]}"), "{\"a\": [1]}");
        assert_eq!(render(TypeKind::Text, "é\"\n"), "\"é\\\"\\n\"");
        let ints = TypeKind::Array(Box::new((*ty(TypeKind::Int4)).clone()));
        assert_eq!(render(ints.clone(), "{{1,NULL},{3,4}}"), "[[1,null],[3,4]]");
        assert_eq!(render(ints, "[0:1]={1,2}"), "\"[0:1]={1,2}\"");
        let texts = TypeKind::Array(Box::new((*ty(TypeKind::Text)).clone()));
        assert_eq!(
            render(texts, r#"{"a b",NULL,"NULL"}"#),
            r#"["a b",null,"NULL"]"#
        );
    }

    #[test]
    fn tail_line_lists_unchanged_and_omits_them() {
        let table = Arc::new(TableSchema {
            oid: 1,
            name: TableName::new("public", "patients"),
            columns: vec![
                col("id", TypeKind::Int4),
                col("name", TypeKind::Text),
                col("scan", TypeKind::Text),
            ],
            key: vec![0],
            replica_identity: ReplicaIdentity::Default,
        });
        let change = Change {
            op: Op::Update,
            table,
            xid: 771,
            commit_lsn: Lsn(0x1A2B3C4),
            lsn: Lsn(0x1A2B300),
            ordinal: 3,
            commit_ts: PgTimestamp(0),
            prev_commit_end: Lsn(0x1A2B000),
            before: None,
            after: Some(Row {
                values: vec![text("7"), text("Ada"), Datum::Unchanged],
                key_only: false,
            }),
            snapshot: Default::default(),
        };
        let mut out = Vec::new();
        write_tail_line(&change, &mut out);
        let line = String::from_utf8(out).unwrap();
        assert_eq!(
            line,
            "{\"op\":\"u\",\"schema\":\"public\",\"table\":\"patients\",\"xid\":771,\"commit_lsn\":\"0/1A2B3C4\",\
             \"lsn\":\"0/1A2B300\",\"ordinal\":3,\"commit_ts\":\"2000-01-01T00:00:00.000000Z\",\"key\":{\"id\":7},\
             \"before\":null,\"after\":{\"id\":7,\"name\":\"Ada\"},\"unchanged\":[\"scan\"]}\n"
        );
        let parsed: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(parsed["unchanged"][0], "scan");
    }
}
