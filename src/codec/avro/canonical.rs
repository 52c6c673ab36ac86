//! The Avro specification's Parsing Canonical Form and its CRC-64-AVRO fingerprint.
//!
//! Written here rather than taken from apache-avro because the crate's canonical form
//! keeps attributes the specification strips: a `{"type":"string","logicalType":"uuid"}`
//! stays an object there, where the specification (and Apache Avro Java's
//! `SchemaNormalization`, and fastavro) reduce it to `"string"`. Standard single-object
//! decoders look schemas up by the specification's fingerprint, so ours must match it.
//!
//! The transformations, in the specification's words: PRIMITIVES (a primitive in object
//! form becomes its bare name), FULLNAMES (names are written in full, namespaces
//! dropped), STRIP (only `name`, `type`, `fields`, `symbols`, `items`, `values`, `size`
//! survive), ORDER (in that order), INTEGERS and WHITESPACE (compact JSON). A named type
//! seen before is written as its full name.

use std::collections::HashSet;

use serde_json::Value;

/// CRC-64-AVRO's empty value (the specification's `EMPTY`).
const EMPTY: u64 = 0xc15d_213a_a4d7_a795;

const PRIMITIVES: [&str; 8] = [
    "null", "boolean", "int", "long", "float", "double", "bytes", "string",
];

/// Why a schema has no canonical form.
#[derive(Debug, thiserror::Error)]
#[error("not a valid Avro schema: {0}")]
pub struct CanonicalError(String);

/// The Parsing Canonical Form of `schema`.
pub fn canonical_form(schema: &Value) -> Result<String, CanonicalError> {
    let mut out = String::new();
    let mut seen = HashSet::new();
    write(schema, None, &mut seen, &mut out)?;
    Ok(out)
}

/// CRC-64-AVRO of `bytes`, as the specification's reference code computes it.
pub fn crc64_avro(bytes: &[u8]) -> u64 {
    static TABLE: std::sync::OnceLock<[u64; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u64; 256];
        for (i, slot) in t.iter_mut().enumerate() {
            let mut fp = i as u64;
            for _ in 0..8 {
                fp = (fp >> 1) ^ (EMPTY & (0u64.wrapping_sub(fp & 1)));
            }
            *slot = fp;
        }
        t
    });
    bytes.iter().fold(EMPTY, |fp, &b| {
        (fp >> 8) ^ table[((fp ^ u64::from(b)) & 0xff) as usize]
    })
}

fn full_name(name: &str, namespace: Option<&str>) -> String {
    match namespace {
        Some(ns) if !name.contains('.') && !ns.is_empty() => format!("{ns}.{name}"),
        _ => name.to_string(),
    }
}

fn quoted(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

fn write(
    schema: &Value,
    namespace: Option<&str>,
    seen: &mut HashSet<String>,
    out: &mut String,
) -> Result<(), CanonicalError> {
    match schema {
        Value::String(name) => {
            if PRIMITIVES.contains(&name.as_str()) {
                out.push_str(&quoted(name));
            } else {
                out.push_str(&quoted(&full_name(name, namespace)));
            }
            Ok(())
        }
        Value::Array(branches) => {
            out.push('[');
            for (i, b) in branches.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write(b, namespace, seen, out)?;
            }
            out.push(']');
            Ok(())
        }
        Value::Object(map) => {
            let ty = map
                .get("type")
                .ok_or_else(|| CanonicalError("an object schema without \"type\"".into()))?;
            let ty = match ty {
                Value::String(t) => t.as_str(),
                // `{"type": {...}}` or `{"type": [...]}` is the inner schema.
                other => return write(other, namespace, seen, out),
            };
            match ty {
                "record" | "error" | "enum" | "fixed" => {
                    let name = map
                        .get("name")
                        .and_then(Value::as_str)
                        .ok_or_else(|| CanonicalError(format!("a {ty} without a name")))?;
                    let ns = map.get("namespace").and_then(Value::as_str).or(namespace);
                    let full = full_name(name, ns);
                    if !seen.insert(full.clone()) {
                        out.push_str(&quoted(&full));
                        return Ok(());
                    }
                    // Names inside a named type resolve against its own namespace.
                    let inner_ns = full.rsplit_once('.').map(|(ns, _)| ns.to_string());
                    out.push_str(&format!("{{\"name\":{},\"type\":", quoted(&full)));
                    match ty {
                        "enum" => {
                            out.push_str("\"enum\",\"symbols\":");
                            let symbols =
                                map.get("symbols")
                                    .and_then(Value::as_array)
                                    .ok_or_else(|| {
                                        CanonicalError(format!("enum {full} without symbols"))
                                    })?;
                            let list: Vec<String> = symbols
                                .iter()
                                .map(|s| s.as_str().map(quoted))
                                .collect::<Option<_>>()
                                .ok_or_else(|| {
                                    CanonicalError(format!("enum {full}: a symbol is not a string"))
                                })?;
                            out.push_str(&format!("[{}]", list.join(",")));
                        }
                        "fixed" => {
                            let size =
                                map.get("size").and_then(Value::as_u64).ok_or_else(|| {
                                    CanonicalError(format!("fixed {full} without a size"))
                                })?;
                            out.push_str(&format!("\"fixed\",\"size\":{size}"));
                        }
                        _ => {
                            out.push_str(&format!("{},\"fields\":[", quoted(ty)));
                            let fields =
                                map.get("fields").and_then(Value::as_array).ok_or_else(|| {
                                    CanonicalError(format!("record {full} without fields"))
                                })?;
                            for (i, f) in fields.iter().enumerate() {
                                if i > 0 {
                                    out.push(',');
                                }
                                let fname =
                                    f.get("name").and_then(Value::as_str).ok_or_else(|| {
                                        CanonicalError(format!(
                                            "record {full}: a field without a name"
                                        ))
                                    })?;
                                let ftype = f.get("type").ok_or_else(|| {
                                    CanonicalError(format!(
                                        "record {full}: field {fname} without a type"
                                    ))
                                })?;
                                out.push_str(&format!("{{\"name\":{},\"type\":", quoted(fname)));
                                write(ftype, inner_ns.as_deref(), seen, out)?;
                                out.push('}');
                            }
                            out.push(']');
                        }
                    }
                    out.push('}');
                    Ok(())
                }
                "array" => {
                    let items = map
                        .get("items")
                        .ok_or_else(|| CanonicalError("an array without items".into()))?;
                    out.push_str("{\"type\":\"array\",\"items\":");
                    write(items, namespace, seen, out)?;
                    out.push('}');
                    Ok(())
                }
                "map" => {
                    let values = map
                        .get("values")
                        .ok_or_else(|| CanonicalError("a map without values".into()))?;
                    out.push_str("{\"type\":\"map\",\"values\":");
                    write(values, namespace, seen, out)?;
                    out.push('}');
                    Ok(())
                }
                // PRIMITIVES (with or without a logicalType) and references by name.
                other => write(&Value::String(other.to_string()), namespace, seen, out),
            }
        }
        other => Err(CanonicalError(format!("unexpected JSON {other}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fp(schema: &Value) -> u64 {
        crc64_avro(canonical_form(schema).unwrap().as_bytes())
    }

    #[test]
    fn matches_the_specification_test_vectors() {
        // From the Avro specification's fingerprint test vectors (as signed i64 there).
        assert_eq!(fp(&json!("null")), 0x63dd_24e7_cc25_8f8a);
        assert_eq!(fp(&json!("int")), 0x7275_d51a_3f39_5c8f);
        assert_eq!(fp(&json!({"type": "int"})), 0x7275_d51a_3f39_5c8f);
    }

    #[test]
    fn logical_types_canonicalize_to_their_primitive() {
        // The test vector of issue 9, checked against Apache Avro Java's
        // SchemaNormalization.parsingFingerprint64.
        let schema = json!({"type":"record","name":"Key","namespace":"ehr.public.patients",
            "fields":[{"name":"id","type":{"type":"string","logicalType":"uuid",
            "connect.name":"io.debezium.data.Uuid"}}]});
        assert_eq!(
            canonical_form(&schema).unwrap(),
            r#"{"name":"ehr.public.patients.Key","type":"record","fields":[{"name":"id","type":"string"}]}"#
        );
        assert_eq!(fp(&schema), 0x130e_58e5_a63a_1eda);
        assert_eq!(
            fp(&schema).to_le_bytes(),
            [0xda, 0x1e, 0x3a, 0xa6, 0xe5, 0x58, 0x0e, 0x13]
        );
    }

    #[test]
    fn names_resolve_against_the_enclosing_namespace_and_repeat_by_name() {
        let schema = json!({"type":"record","name":"Envelope","namespace":"a.b",
            "doc":"x","fields":[
              {"name":"before","type":["null",{"type":"record","name":"Value","fields":[
                 {"name":"n","type":{"type":"fixed","name":"F","size":4}},
                 {"name":"e","type":{"type":"enum","name":"x.E","symbols":["A","B"]}},
                 {"name":"m","type":{"type":"map","values":"long"}}]}],"default":null},
              {"name":"after","type":["null","Value"]},
              {"name":"arr","type":{"type":"array","items":{"type":"bytes","logicalType":"decimal","precision":4}}}]});
        assert_eq!(
            canonical_form(&schema).unwrap(),
            concat!(
                r#"{"name":"a.b.Envelope","type":"record","fields":["#,
                r#"{"name":"before","type":["null",{"name":"a.b.Value","type":"record","fields":["#,
                r#"{"name":"n","type":{"name":"a.b.F","type":"fixed","size":4}},"#,
                r#"{"name":"e","type":{"name":"x.E","type":"enum","symbols":["A","B"]}},"#,
                r#"{"name":"m","type":{"type":"map","values":"long"}}]}]},"#,
                r#"{"name":"after","type":["null","a.b.Value"]},"#,
                r#"{"name":"arr","type":{"type":"array","items":"bytes"}}]}"#
            )
        );
    }

    #[test]
    fn malformed_schemas_are_errors() {
        for bad in [json!(1), json!({"type":"record"}), json!({"name":"x"})] {
            assert!(canonical_form(&bad).is_err(), "{bad}");
        }
    }
}
