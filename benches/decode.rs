//! pgoutput decode throughput: how many messages per second the pure decoder
//! [`pgferry::source::pgoutput::decode`] turns from wire bytes into a `Message`.
//!
//! The payloads are built here, byte for byte as a PostgreSQL 15 walsender sends them
//! with `proto_version '1'` (text-format values): an Insert and an Update of a
//! 10-column `patients` row (uuid, name, dob, gender, phone, email, address, a
//! ~200-byte notes text, a numeric, a timestamptz), and the Begin / Commit that
//! frame a transaction. Each payload is a shared `Bytes`, cloned per decode like the
//! slice the replication reader hands on, so the atomic reference counting of the
//! zero-copy column values is part of what is measured, as is dropping the result.
//!
//! Besides the bare decoder it measures one more step the source stage does for
//! every row change: turning each text value into a UTF-8 checked
//! [`pgferry::event::Datum`] (what `RelationState::row` does, minus the column
//! reordering, which needs a catalog connection).
//!
//! Each case decodes `DECODE_MESSAGES` messages (default 2,000,000) per round,
//! after 2 warm-up rounds, for `DECODE_ROUNDS` timed rounds (default 5, at least 3),
//! and prints the best and the median round. MB/s counts payload bytes (10^6 bytes).
//!
//! Run it with:
//!
//! ```text
//! cargo bench --bench decode
//! DECODE_MESSAGES=500000 DECODE_ROUNDS=3 cargo bench --bench decode   # quicker
//! DECODE_ONLY=begin cargo bench --bench decode                          # one case
//! ```

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use pgferry::event::{Datum, Text};
use pgferry::source::pgoutput::{decode, Message, TupleValue};

const WARMUP_ROUNDS: usize = 2;
const MIN_ROUNDS: usize = 3;
const RELATION_OID: u32 = 16_385;

/// One patients row in PostgreSQL's text output format, in table column order.
const PATIENT_ROW: [&str; 10] = [
    // id uuid
    "3f1c2a9e-8b7d-4c6e-9a51-2d4f6b8c0e13",
    // name
    "Margaret O'Connell-Whitfield",
    // dob date
    "1957-03-14",
    // gender
    "F",
    // contact_number
    "+44 20 7946 0958",
    // email
    "margaret.oconnell-whitfield@example.org",
    // address
    "14 Harbour View Road, Flat 3, Portsmouth PO1 3LJ, United Kingdom",
    // notes: a ~200-byte free-text clinical note
    "Follow-up after laparoscopic cholecystectomy; wound healing well, no signs of infection. \
     Mild post-operative nausea resolved. Continue paracetamol 1g QDS PRN; review bloods in 2 weeks. Diet advice given.",
    // weight numeric(6,2)
    "72.45",
    // updated_at timestamptz
    "2024-05-17 09:42:13.123456+00",
];

fn put_tuple(buf: &mut BytesMut, row: &[&str]) {
    buf.put_i16(i16::try_from(row.len()).expect("column count fits i16"));
    for value in row {
        buf.put_u8(b't');
        buf.put_i32(i32::try_from(value.len()).expect("value length fits i32"));
        buf.put_slice(value.as_bytes());
    }
}

/// `I`, relation OID, `N`, new tuple.
fn insert_payload(row: &[&str]) -> Bytes {
    let mut buf = BytesMut::new();
    buf.put_u8(b'I');
    buf.put_u32(RELATION_OID);
    buf.put_u8(b'N');
    put_tuple(&mut buf, row);
    buf.freeze()
}

/// `U`, relation OID, `N`, new tuple: an update that leaves the key alone under
/// REPLICA IDENTITY DEFAULT sends no old tuple.
fn update_payload(row: &[&str]) -> Bytes {
    let mut buf = BytesMut::new();
    buf.put_u8(b'U');
    buf.put_u32(RELATION_OID);
    buf.put_u8(b'N');
    put_tuple(&mut buf, row);
    buf.freeze()
}

/// Microseconds since 2000-01-01, the PostgreSQL epoch: 2024-05-17 09:42:13.123456.
const COMMIT_TS: i64 = 769_254_133_123_456;

/// `B`, final LSN, commit timestamp, xid.
fn begin_payload() -> Bytes {
    let mut buf = BytesMut::new();
    buf.put_u8(b'B');
    buf.put_u64(0x0000_0001_6B37_4D48);
    buf.put_i64(COMMIT_TS);
    buf.put_u32(748_213);
    buf.freeze()
}

/// `C`, flags 0, commit LSN, end LSN, commit timestamp.
fn commit_payload() -> Bytes {
    let mut buf = BytesMut::new();
    buf.put_u8(b'C');
    buf.put_u8(0);
    buf.put_u64(0x0000_0001_6B37_4D48);
    buf.put_u64(0x0000_0001_6B37_4D78);
    buf.put_i64(COMMIT_TS);
    buf.freeze()
}

/// Fail loudly before timing if a payload does not decode to what it should: a
/// decoder that returns an error early would otherwise look very fast.
fn check_payloads(insert: &Bytes, update: &Bytes, begin: &Bytes, commit: &Bytes) {
    let expect_row = |tuple: &[TupleValue]| {
        assert_eq!(tuple.len(), PATIENT_ROW.len());
        for (v, want) in tuple.iter().zip(PATIENT_ROW) {
            assert_eq!(v, &TupleValue::Text(Bytes::from_static(want.as_bytes())));
        }
    };
    match decode(insert.clone()).expect("insert decodes") {
        Message::Insert { relation, new } => {
            assert_eq!(relation, RELATION_OID);
            expect_row(&new);
        }
        other => panic!("insert payload decoded to {other:?}"),
    }
    match decode(update.clone()).expect("update decodes") {
        Message::Update { relation, old, new } => {
            assert_eq!(relation, RELATION_OID);
            assert!(old.is_none());
            expect_row(&new);
        }
        other => panic!("update payload decoded to {other:?}"),
    }
    match decode(begin.clone()).expect("begin decodes") {
        Message::Begin { xid, .. } => assert_eq!(xid, 748_213),
        other => panic!("begin payload decoded to {other:?}"),
    }
    match decode(commit.clone()).expect("commit decodes") {
        Message::Commit { flags, .. } => assert_eq!(flags, 0),
        other => panic!("commit payload decoded to {other:?}"),
    }
}

/// Decode and drop one message; panics on a decode error (checked payloads only).
fn decode_one(payload: &Bytes) {
    let msg = decode(black_box(payload.clone())).expect("payload decodes");
    black_box(&msg);
}

/// Decode, then turn the tuple's text values into UTF-8 checked datums, as the
/// source stage does for every row change.
fn decode_to_datums(payload: &Bytes) {
    let msg = decode(black_box(payload.clone())).expect("payload decodes");
    let tuple = match msg {
        Message::Insert { new, .. } | Message::Update { new, .. } => new,
        _ => Vec::new(),
    };
    let values: Vec<Datum> = tuple
        .into_iter()
        .map(|v| match v {
            TupleValue::Text(b) => Datum::Text(Text::new(b).expect("bench values are UTF-8")),
            TupleValue::UnchangedToast => Datum::Unchanged,
            TupleValue::Null | TupleValue::Binary(_) => Datum::Null,
        })
        .collect();
    black_box(&values);
}

struct Case<'a> {
    name: &'a str,
    /// Decoded in order, over and over.
    payloads: Vec<Bytes>,
    step: fn(&Bytes),
}

struct Settings {
    messages: usize,
    rounds: usize,
}

fn env_usize(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .replace('_', "")
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a whole number")),
        Err(_) => default,
    }
}

/// Time one round of `messages` messages; returns (elapsed, payload bytes decoded).
fn round(case: &Case, messages: usize) -> (Duration, usize) {
    let per_cycle = case.payloads.len();
    let cycles = messages.div_ceil(per_cycle);
    let bytes_per_cycle: usize = case.payloads.iter().map(Bytes::len).sum();
    let start = Instant::now();
    for _ in 0..cycles {
        for p in &case.payloads {
            (case.step)(p);
        }
    }
    (start.elapsed(), cycles * bytes_per_cycle)
}

fn run(case: &Case, s: &Settings) {
    let per_cycle = case.payloads.len();
    let messages = s.messages.div_ceil(per_cycle) * per_cycle;
    for _ in 0..WARMUP_ROUNDS {
        round(case, messages);
    }
    let mut times = Vec::with_capacity(s.rounds);
    let mut bytes = 0;
    for _ in 0..s.rounds {
        let (t, b) = round(case, messages);
        times.push(t);
        bytes = b;
    }
    times.sort();
    let best = times[0];
    let median = times[times.len() / 2];
    let rate = |t: Duration| messages as f64 / t.as_secs_f64() / 1e6;
    let mbps = |t: Duration| bytes as f64 / t.as_secs_f64() / 1e6;
    let avg_size = bytes as f64 / messages as f64;
    println!(
        "decode: {:<26} best {:>6.2} M msgs/s {:>6.0} MB/s   median {:>6.2} M msgs/s {:>6.0} MB/s   \
         ({:.0} B/msg, {:.1} ns/msg)",
        case.name,
        rate(best),
        mbps(best),
        rate(median),
        mbps(median),
        avg_size,
        median.as_nanos() as f64 / messages as f64,
    );
}

fn main() {
    let settings = Settings {
        messages: env_usize("DECODE_MESSAGES", 2_000_000).max(1),
        rounds: env_usize("DECODE_ROUNDS", 5).max(MIN_ROUNDS),
    };
    let insert = insert_payload(&PATIENT_ROW);
    let update = update_payload(&PATIENT_ROW);
    let begin = begin_payload();
    let commit = commit_payload();
    check_payloads(&insert, &update, &begin, &commit);

    println!(
        "decode: {} messages per round, {} warm-up + {} timed rounds; insert {} B, update {} B, begin {} B, commit {} B",
        settings.messages,
        WARMUP_ROUNDS,
        settings.rounds,
        insert.len(),
        update.len(),
        begin.len(),
        commit.len()
    );

    let cases = [
        Case {
            name: "insert 10 cols",
            payloads: vec![insert.clone()],
            step: decode_one,
        },
        Case {
            name: "update 10 cols",
            payloads: vec![update.clone()],
            step: decode_one,
        },
        Case {
            name: "begin",
            payloads: vec![begin.clone()],
            step: decode_one,
        },
        Case {
            name: "commit",
            payloads: vec![commit.clone()],
            step: decode_one,
        },
        // One row per transaction, the common OLTP shape: B, I, C.
        Case {
            name: "txn B+I+C",
            payloads: vec![begin.clone(), insert.clone(), commit.clone()],
            step: decode_one,
        },
        Case {
            name: "insert 10 cols -> datums",
            payloads: vec![insert.clone()],
            step: decode_to_datums,
        },
        Case {
            name: "update 10 cols -> datums",
            payloads: vec![update.clone()],
            step: decode_to_datums,
        },
    ];
    // DECODE_ONLY=<substring> runs only the matching cases (handy under a profiler).
    let only = std::env::var("DECODE_ONLY").unwrap_or_default();
    for case in cases.iter().filter(|c| c.name.contains(only.as_str())) {
        run(case, &settings);
    }
}
