//! PHI transforms of the source stage (`[transform]` in a table file), applied to each
//! value as it is decoded, before the change leaves the source: Kafka, `tail`, the
//! sink and dead-letter topics only ever see the result.
//!
//! - `hmac`: lowercase hex HMAC-SHA256 of the value's PostgreSQL text (UTF-8), keyed by
//!   `[phi] key`: the same value always gives the same digest, so joins and keys still
//!   work, and without the key it cannot be reversed or recomputed.
//! - `redact`: the string `REDACTED` (text columns).
//! - `null`: always NULL.
//! - `year`: a date or timestamp truncated to January 1st of its year (HIPAA Safe
//!   Harbor keeps only the year); ±infinity stay as they are.

use crate::event::{PgType, Transform, TypeKind};

/// Whether `transform` applies to a column of type `ty`; the reason when it does not.
pub fn check(transform: Transform, ty: &PgType) -> Result<(), String> {
    let ok = match transform {
        Transform::Hmac | Transform::Null => true,
        Transform::Redact => matches!(ty.kind, TypeKind::Text),
        Transform::Year => matches!(
            ty.kind,
            TypeKind::Date | TypeKind::Timestamp | TypeKind::Timestamptz
        ),
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{} applies to {} columns, not to type {}",
            transform.as_str(),
            match transform {
                Transform::Redact => "text",
                _ => "date, timestamp and timestamptz",
            },
            ty.name
        ))
    }
}

/// The `[phi]` key of `hmac`, prepared once: HMAC's padded key states are computed
/// here, not again for every value (with a hex digit per `format!`, that cost more
/// than a whole change's encoding: 7.1 against 4.4 CPU-s in the drain benchmark).
#[derive(Clone)]
pub struct HmacKey(ring::hmac::Key);

impl HmacKey {
    pub fn new(key: &[u8]) -> Self {
        HmacKey(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key))
    }
}

impl std::fmt::Debug for HmacKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HmacKey(..)")
    }
}

/// The transformed text of `text`; `None` means NULL.
pub fn apply(transform: Transform, key: &HmacKey, text: &str) -> Option<String> {
    match transform {
        Transform::Hmac => {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            let tag = ring::hmac::sign(&key.0, text.as_bytes());
            let mut out = String::with_capacity(2 * tag.as_ref().len());
            for b in tag.as_ref() {
                out.push(char::from(HEX[usize::from(b >> 4)]));
                out.push(char::from(HEX[usize::from(b & 0xF)]));
            }
            Some(out)
        }
        Transform::Redact => Some("REDACTED".to_string()),
        Transform::Null => None,
        Transform::Year => Some(first_of_year(text)),
    }
}

/// `2026-11-22` -> `2026-01-01`; `2026-11-22 01:02:03.5` -> `2026-01-01 00:00:00`;
/// `2026-11-22 01:02:03+00` -> `2026-01-01 00:00:00+00`; ` BC` kept; infinity as is.
/// (The replication session prints dates as ISO, timestamptz in UTC.)
fn first_of_year(text: &str) -> String {
    if text.ends_with("infinity") {
        return text.to_string();
    }
    let Some((year, rest)) = text.split_once('-') else {
        return text.to_string();
    };
    let bc = if text.ends_with(" BC") { " BC" } else { "" };
    // After the date: " hh:mm:ss[.frac][+zz]" for timestamps.
    let time = rest.get(5..).unwrap_or("");
    let time = time.strip_suffix(" BC").unwrap_or(time);
    let zone = time
        .rfind(['+', '-'])
        .filter(|&i| i > 0)
        .map_or("", |i| &time[i..]);
    let clock = if time.trim().is_empty() {
        ""
    } else {
        " 00:00:00"
    };
    format!("{year}-01-01{clock}{zone}{bc}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_is_rfc_4231_hmac_sha256_in_hex() {
        // RFC 4231 test case 2.
        assert_eq!(
            apply(
                Transform::Hmac,
                &HmacKey::new(b"Jefe"),
                "what do ya want for nothing?"
            )
            .unwrap(),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn year_keeps_only_the_year() {
        for (from, to) in [
            ("2026-11-22", "2026-01-01"),
            ("0044-03-15 BC", "0044-01-01 BC"),
            ("2026-11-22 01:02:03.123456", "2026-01-01 00:00:00"),
            ("2026-11-22 01:02:03+00", "2026-01-01 00:00:00+00"),
            ("0044-03-15 12:00:00 BC", "0044-01-01 00:00:00 BC"),
            ("infinity", "infinity"),
            ("-infinity", "-infinity"),
        ] {
            assert_eq!(
                apply(Transform::Year, &HmacKey::new(b""), from).unwrap(),
                to,
                "{from}"
            );
        }
    }
}
