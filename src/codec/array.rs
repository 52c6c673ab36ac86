//! Parser for PostgreSQL's array text form (`{1,NULL,"a b",{2,3}}`), shared by the
//! encoders that turn arrays into JSON or Avro arrays. Pure; never panics on input.

/// One element of a parsed array.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Element {
    Null,
    Value(String),
    /// A sub-array of a multi-dimensional array.
    Array(Vec<Element>),
}

/// Parse an array literal. Returns `None` for forms we do not map to nested arrays:
/// explicit bounds (`[0:1]={…}`) or malformed text, which callers then carry as text.
pub fn parse(text: &str, delimiter: u8) -> Option<Vec<Element>> {
    let bytes = text.as_bytes();
    if bytes.first() != Some(&b'{') {
        return None;
    }
    let mut pos = 0;
    let items = parse_level(bytes, &mut pos, delimiter)?;
    if pos != bytes.len() {
        return None;
    }
    Some(items)
}

fn parse_level(b: &[u8], pos: &mut usize, delim: u8) -> Option<Vec<Element>> {
    debug_assert_eq!(b.get(*pos), Some(&b'{'));
    *pos += 1;
    let mut items = Vec::new();
    if b.get(*pos) == Some(&b'}') {
        *pos += 1;
        return Some(items);
    }
    loop {
        match *b.get(*pos)? {
            b'{' => items.push(Element::Array(parse_level(b, pos, delim)?)),
            b'"' => {
                *pos += 1;
                let mut out = Vec::new();
                loop {
                    match *b.get(*pos)? {
                        b'\\' => {
                            out.push(*b.get(*pos + 1)?);
                            *pos += 2;
                        }
                        b'"' => {
                            *pos += 1;
                            break;
                        }
                        c => {
                            out.push(c);
                            *pos += 1;
                        }
                    }
                }
                items.push(Element::Value(String::from_utf8(out).ok()?));
            }
            _ => {
                let start = *pos;
                while let Some(&c) = b.get(*pos) {
                    if c == delim || c == b'}' {
                        break;
                    }
                    if c == b'"' || c == b'{' {
                        return None;
                    }
                    *pos += 1;
                }
                let raw = std::str::from_utf8(&b[start..*pos]).ok()?;
                if raw.eq_ignore_ascii_case("NULL") {
                    items.push(Element::Null);
                } else {
                    items.push(Element::Value(raw.to_string()));
                }
            }
        }
        match *b.get(*pos)? {
            c if c == delim => *pos += 1,
            b'}' => {
                *pos += 1;
                return Some(items);
            }
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Element::*;

    fn v(s: &str) -> Element {
        Value(s.to_string())
    }

    #[test]
    fn parses_nulls_quotes_and_escapes() {
        assert_eq!(
            parse("{1,NULL,3}", b',').unwrap(),
            vec![v("1"), Null, v("3")]
        );
        assert_eq!(
            parse(r#"{"a b","NULL",NULL,"q\"uote","back\\slash",""}"#, b',').unwrap(),
            vec![
                v("a b"),
                v("NULL"),
                Null,
                v("q\"uote"),
                v("back\\slash"),
                v("")
            ]
        );
        assert_eq!(parse("{}", b',').unwrap(), vec![]);
    }

    #[test]
    fn parses_nested_and_other_delimiters() {
        assert_eq!(
            parse("{{1,2},{3,NULL}}", b',').unwrap(),
            vec![Array(vec![v("1"), v("2")]), Array(vec![v("3"), Null])]
        );
        assert_eq!(
            parse("{(1,1),(0,0);(2,2),(1,1)}", b';').unwrap(),
            vec![v("(1,1),(0,0)"), v("(2,2),(1,1)")]
        );
    }

    #[test]
    fn refuses_what_it_cannot_map() {
        for bad in ["[0:1]={1,2}", "{1,2", "{\"a}", "1,2", "{1}x", "{a\"b}"] {
            assert_eq!(parse(bad, b','), None, "{bad}");
        }
    }
}
