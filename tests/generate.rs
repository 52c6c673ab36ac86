//! `pgferry generate` against the demo EHR schema: deterministic for a seed, and it
//! only refers to rows that exist (the schema's foreign keys would refuse the rest).

mod common;

use common::*;

const EHR_SCHEMA: &str = include_str!("../sql/ehr_schema.sql");

fn generate(db: &TestDb, seed: &str) {
    let (code, _, err) = run(&[
        "generate",
        "--url",
        &db.url,
        "--rate",
        "200",
        "--duration",
        "2s",
        "--seed",
        seed,
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("generate: done"),
        "progress and a summary on stderr: {err}"
    );
}

fn first_patients(db: &TestDb) -> Vec<Vec<Option<String>>> {
    db.sql("select id::text, name, dob::text, gender, email from patients order by created_at, id limit 15")
}

#[test]
fn the_same_seed_writes_the_same_records() {
    let a = TestDb::new("gen_a");
    let b = TestDb::new("gen_b");
    let c = TestDb::new("gen_c");
    for db in [&a, &b, &c] {
        db.sql(EHR_SCHEMA);
    }
    generate(&a, "42");
    generate(&b, "42");
    generate(&c, "43");
    let (pa, pb, pc) = (first_patients(&a), first_patients(&b), first_patients(&c));
    assert!(pa.len() >= 10, "{} patients", pa.len());
    assert_eq!(pa, pb, "same seed, same patients");
    assert_ne!(pa, pc, "another seed, other patients");
    // All kinds of activity happened, and every child row has its patient.
    for table in [
        "visits",
        "doctor_notes",
        "allergies",
        "lab_results",
        "medications",
    ] {
        let n: i64 = a
            .value(&format!("select count(*) from {table}"))
            .unwrap()
            .parse()
            .unwrap();
        assert!(n > 0, "no {table} generated");
    }
    let long_notes = a
        .value("select count(*) from doctor_notes where length(notes) > 8000")
        .unwrap();
    assert_ne!(long_notes, "0", "some notes are long enough to be TOASTed");
}

#[test]
fn a_database_without_the_schema_gets_a_clear_error() {
    let db = TestDb::new("gen_empty");
    let (code, _, err) = run(&["generate", "--url", &db.url, "--duration", "1s"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("sql/ehr_schema.sql"), "{err}");
}
