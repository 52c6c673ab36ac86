//! Issue 12.2: row filters (`where` in a table file) as publication row filters. Rows
//! moving in and out of the filter, the initial and the on-demand snapshot applying
//! the same filter, and the filters PostgreSQL would turn into failed UPDATEs on the
//! EHR (a column outside the replica identity) or that disagree with a publication
//! pgferry does not own, refused with a clear message.

mod common;
mod kafka_support;

use std::time::{Duration, Instant};

use common::*;
use kafka_support::*;

const T: Duration = Duration::from_secs(180);

fn config(src: &TestDb, tgt: &TestDb, slot: &str, table: &str) -> std::path::PathBuf {
    src.config(
        &format!("{slot}.toml"),
        slot,
        &format!(
            "[kafka]\nbrokers = \"{}\"\ntopic_prefix = \"t{}\"\n\
             [sink]\nurl = \"{}\"\nconsumer = \"rf\"\nbatch_linger = \"20ms\"\ncreate_tables = true\n{table}",
            brokers(),
            src.name,
            tgt.url
        ),
    )
}

fn wait_equal(cfg: &std::path::Path, p: &Pgferry) {
    let deadline = Instant::now() + T;
    loop {
        let (code, out, err) = common::run(&["verify", "--config", cfg.to_str().unwrap()]);
        if code == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "verify never became equal:\n{out}{err}\n{}",
            p.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn rows(db: &TestDb, query: &str) -> Vec<Vec<Option<String>>> {
    db.sql(query)
}

#[test]
fn rows_moving_in_and_out_of_the_filter_end_right_in_stream_and_snapshots() {
    let src = TestDb::new("rowf");
    let tgt = TestDb::on(&service_env("PGFERRY_TARGET_URL"), "rowf_t");
    src.sql(
        "create table patients (id int primary key, ward text not null, name text);
         alter table patients replica identity full;
         insert into patients select g, case when g % 4 = 0 then 'psych' else 'ward ' || g % 3 end, 'p' || g
         from generate_series(1, 400) g;",
    );
    let cfg = config(
        &src,
        &tgt,
        "rf",
        "[[tables]]\nsource = \"public.patients\"\nwhere = \"ward <> 'psych'\"\n",
    );
    let mut p = Pgferry::spawn(
        &["run", "--config", cfg.to_str().unwrap()],
        cfg.with_extension("run.stderr"),
    );
    wait_equal(&cfg, &p);
    // The initial snapshot applied the filter.
    assert_eq!(
        tgt.value("select count(*) from patients").as_deref(),
        Some("300")
    );
    assert_eq!(
        tgt.value("select count(*) from patients where ward = 'psych'")
            .as_deref(),
        Some("0")
    );
    src.sql(
        "insert into patients values (1001, 'psych', 'hidden'), (1002, 'ward 1', 'shown');
         update patients set ward = 'psych' where id in (1, 2);      -- out of the filter: a DELETE arrives
         update patients set ward = 'ward 9' where id in (4, 8);     -- into the filter: an INSERT arrives
         update patients set name = 'renamed' where id in (12, 13);  -- psych 12 stays out, 13 is updated
         delete from patients where id in (16, 17);",
    );
    wait_equal(&cfg, &p);
    let expect = rows(
        &src,
        "select id, ward, name from patients where ward <> 'psych' order by id",
    );
    assert_eq!(
        expect,
        rows(&tgt, "select id, ward, name from patients order by id")
    );
    for (id, present) in [
        (1, false),
        (2, false),
        (4, true),
        (8, true),
        (1001, false),
        (1002, true),
        (17, false),
    ] {
        assert_eq!(
            tgt.value(&format!("select count(*) from patients where id = {id}"))
                .as_deref(),
            Some(if present { "1" } else { "0" }),
            "row {id}"
        );
    }
    // An on-demand snapshot applies the filter too (and repairs the target).
    tgt.sql("delete from patients where id % 5 = 0");
    let (code, out, err) = common::run(&[
        "snapshot",
        "--config",
        cfg.to_str().unwrap(),
        "--table",
        "public.patients",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    wait_equal(&cfg, &p);
    assert_eq!(
        expect,
        rows(&tgt, "select id, ward, name from patients order by id")
    );
    assert_eq!(p.terminate().code(), Some(0), "{}", p.stderr_text());
}

#[test]
fn a_filter_outside_the_replica_identity_or_against_a_foreign_publication_is_refused() {
    let src = TestDb::new("rowfbad");
    let tgt = TestDb::on(&service_env("PGFERRY_TARGET_URL"), "rowfbad_t");
    src.sql("create table p (id int primary key, ward text)");
    // `ward` is not in the replica identity (the primary key): PostgreSQL would refuse
    // every UPDATE of p once the publication filtered on it.
    let cfg = config(
        &src,
        &tgt,
        "rfb",
        "[[tables]]\nsource = \"public.p\"\nwhere = \"ward <> 'psych'\"\n",
    );
    let (code, _, err) = common::run(&["run", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("outside table public.p's replica identity"),
        "{err}"
    );
    src.sql("insert into p values (1, 'a'); update p set ward = 'b' where id = 1");

    // A publication pgferry did not create, filtering differently from the file.
    src.sql(&format!(
        "create publication {} for table p where (id > 10)",
        src.slot("rfc")
    ));
    let cfg = config(
        &src,
        &tgt,
        "rfc",
        "[[tables]]\nsource = \"public.p\"\nwhere = \"id > 5\"\n",
    );
    let (code, _, err) = common::run(&["run", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("publishes table public.p with (id > 10), but the file says (id > 5)"),
        "{err}"
    );
}
