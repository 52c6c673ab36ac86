//! Decoder tests over messages captured from a real server by
//! `scripts/capture-pgoutput-fixtures.sh` (see that script for the workload).

use super::*;

const WORKLOAD: &str = include_str!("../../../tests/fixtures/pgoutput/workload.txt");

fn payloads() -> Vec<Bytes> {
    WORKLOAD
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let hex = l
                .split_whitespace()
                .nth(1)
                .expect("fixture line: <lsn> <hex>");
            let bytes: Vec<u8> = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
                .collect();
            Bytes::from(bytes)
        })
        .collect()
}

fn messages() -> Vec<Message> {
    payloads()
        .into_iter()
        .map(|p| decode(p).expect("fixture decodes"))
        .collect()
}

fn text(v: &TupleValue) -> &str {
    match v {
        TupleValue::Text(b) => std::str::from_utf8(b).unwrap(),
        other => panic!("expected text, got {other:?}"),
    }
}

fn tag_of(m: &Message) -> char {
    match m {
        Message::Begin { .. } => 'B',
        Message::Commit { .. } => 'C',
        Message::Origin { .. } => 'O',
        Message::Relation(_) => 'R',
        Message::Type { .. } => 'Y',
        Message::Insert { .. } => 'I',
        Message::Update { .. } => 'U',
        Message::Delete { .. } => 'D',
        Message::Truncate { .. } => 'T',
        Message::Message { .. } => 'M',
    }
}

#[test]
fn decodes_the_whole_workload_in_order() {
    let tags: String = messages().iter().map(tag_of).collect();
    assert_eq!(
        tags,
        "BYRIIRIUUUDDC BYRRTC BRIIC BRIC BUC M BMYRIC".replace(' ', "")
    );
}

#[test]
fn begin_and_commit_agree_on_the_commit_lsn() {
    let msgs = messages();
    let mut open = None;
    for m in &msgs {
        match m {
            Message::Begin { final_lsn, xid, .. } => {
                assert!(*xid > 0);
                open = Some(*final_lsn);
            }
            Message::Commit {
                commit_lsn,
                end_lsn,
                ..
            } => {
                assert_eq!(Some(*commit_lsn), open.take());
                assert!(end_lsn > commit_lsn);
            }
            _ => {}
        }
    }
}

#[test]
fn relation_messages_describe_columns_and_identity() {
    let msgs = messages();
    let Message::Type {
        namespace, name, ..
    } = &msgs[1]
    else {
        panic!("{:?}", msgs[1])
    };
    assert_eq!((namespace.as_str(), name.as_str()), ("fixtures", "mood"));
    let Message::Relation(patients) = &msgs[2] else {
        panic!()
    };
    assert_eq!(
        (patients.namespace.as_str(), patients.name.as_str()),
        ("fixtures", "patients")
    );
    assert_eq!(patients.replica_identity, b'd');
    let names: Vec<&str> = patients.columns.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["id", "name", "mood", "notes"]);
    assert!(patients.columns[0].is_key() && !patients.columns[1].is_key());
    assert_eq!(patients.columns[0].type_oid, 23);
    assert!(patients.columns[2].type_oid >= 16384, "enum is a user type");
    let Message::Relation(audit) = &msgs[5] else {
        panic!()
    };
    assert_eq!(audit.replica_identity, b'f');
    assert!(
        audit.columns.iter().all(|c| c.is_key()),
        "FULL flags every column"
    );
}

#[test]
fn row_changes_carry_the_right_images() {
    let msgs = messages();
    let Message::Insert { new, .. } = &msgs[3] else {
        panic!()
    };
    assert_eq!(text(&new[1]), "Ada");
    assert_eq!(text(&new[2]), "calm");
    assert_eq!(new[3], TupleValue::Null);
    // update of a non-key column, identity DEFAULT: no old tuple
    let Message::Update { old: None, new, .. } = &msgs[7] else {
        panic!("{:?}", msgs[7])
    };
    assert_eq!(text(&new[3]), "seen");
    // update of the key: old key tuple with only the key set
    let Message::Update {
        old: Some(OldTuple::Key(old)),
        new,
        ..
    } = &msgs[8]
    else {
        panic!("{:?}", msgs[8])
    };
    assert_eq!(text(&old[0]), "2");
    assert_eq!(old[1], TupleValue::Null);
    assert_eq!(text(&new[0]), "3");
    // identity FULL: whole old row
    let Message::Update {
        old: Some(OldTuple::Full(old)),
        new,
        ..
    } = &msgs[9]
    else {
        panic!("{:?}", msgs[9])
    };
    assert_eq!(text(&old[1]), "created");
    assert_eq!(text(&new[1]), "changed");
    let Message::Delete {
        old: OldTuple::Key(old),
        ..
    } = &msgs[10]
    else {
        panic!("{:?}", msgs[10])
    };
    assert_eq!(text(&old[0]), "1");
    let Message::Delete {
        old: OldTuple::Full(old),
        ..
    } = &msgs[11]
    else {
        panic!("{:?}", msgs[11])
    };
    assert_eq!(text(&old[2]), "small");
}

#[test]
fn truncate_lists_every_relation() {
    let msgs = messages();
    let Message::Truncate { relations, options } = &msgs[17] else {
        panic!("{:?}", msgs[17])
    };
    assert_eq!(relations.len(), 2);
    assert_eq!(*options, 0);
}

#[test]
fn values_are_the_servers_text() {
    let msgs = messages();
    let Message::Insert { new, .. } = &msgs[21] else {
        panic!("{:?}", msgs[21])
    };
    let values: Vec<&str> = new.iter().map(text).collect();
    assert_eq!(values[1], "t");
    assert_eq!(values[2], "-32768");
    assert_eq!(values[3], "9223372036854775807");
    assert_eq!(values[4], "NaN");
    assert_eq!(values[5], "-Infinity");
    assert_eq!(values[6], "12345678.1234");
    assert_eq!(values[7], "NaN");
    assert_eq!(values[9], "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11");
    assert_eq!(values[10], r#"{"k": [1, "é"]}"#);
    assert_eq!(values[11], "infinity");
    assert_eq!(values[12], "-infinity");
    assert_eq!(values[15], r"\x00ff00");
    assert_eq!(values[16], "{1,NULL,3}");
    assert_eq!(values[17], r#"{"a b","NULL",NULL,"q\"uote"}"#);
    let Message::Insert { new, .. } = &msgs[22] else {
        panic!()
    };
    assert!(new[1..].iter().all(|v| *v == TupleValue::Null));
}

#[test]
fn unchanged_toast_is_marked_not_sent() {
    let msgs = messages();
    let Message::Insert { new, .. } = &msgs[26] else {
        panic!("{:?}", msgs[26])
    };
    assert!(text(&new[2]).len() > 8000);
    // Same decoding session: the relation was already sent, so no R before the update.
    let Message::Update { new, .. } = &msgs[29] else {
        panic!("{:?}", msgs[29])
    };
    assert_eq!(text(&new[1]), "1");
    assert_eq!(new[2], TupleValue::UnchangedToast);
}

#[test]
fn logical_messages_and_unicode() {
    let msgs = messages();
    let Message::Message {
        transactional,
        prefix,
        content,
        ..
    } = &msgs[31]
    else {
        panic!("{:?}", msgs[31])
    };
    assert!(!transactional);
    assert_eq!(
        (prefix.as_str(), &content[..]),
        ("pgferry", &b"heartbeat"[..])
    );
    let Message::Message {
        transactional,
        prefix,
        ..
    } = &msgs[33]
    else {
        panic!("{:?}", msgs[33])
    };
    assert!(*transactional);
    assert_eq!(prefix, "app");
    let Message::Insert { new, .. } = &msgs[36] else {
        panic!("{:?}", msgs[36])
    };
    assert_eq!(text(&new[1]), "Émilie 🩺");
}

#[test]
fn every_truncation_is_an_error_not_a_panic() {
    for payload in payloads() {
        for len in 0..payload.len() {
            assert!(
                decode(payload.slice(..len)).is_err(),
                "prefix of {len} bytes decoded"
            );
        }
    }
}

#[test]
fn corrupted_bytes_never_panic() {
    // Deterministic corruption: flip each byte of each message in turn.
    for payload in payloads().into_iter().take(12) {
        for i in 0..payload.len() {
            let mut bytes = payload.to_vec();
            bytes[i] ^= 0xA5;
            let _ = decode(Bytes::from(bytes));
        }
    }
}

#[test]
fn rejects_lengths_that_do_not_fit() {
    // Insert with a tuple that claims 30000 columns.
    let mut b = vec![b'I', 0, 0, 0, 1, b'N'];
    b.extend_from_slice(&30000i16.to_be_bytes());
    assert!(decode(Bytes::from(b)).is_err());
    // A text value claiming 2 GB.
    let mut b = vec![b'I', 0, 0, 0, 1, b'N', 0, 1, b't'];
    b.extend_from_slice(&i32::MAX.to_be_bytes());
    assert!(decode(Bytes::from(b)).is_err());
    // Negative length.
    let mut b = vec![b'I', 0, 0, 0, 1, b'N', 0, 1, b't'];
    b.extend_from_slice(&(-5i32).to_be_bytes());
    assert!(decode(Bytes::from(b)).is_err());
    // Unknown tag.
    assert!(decode(Bytes::from_static(b"S\0\0\0\x01\x01")).is_err());
}
