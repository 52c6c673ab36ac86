//! Issue 8.1: pgferry remembers its source (server, slot, position) outside the process
//! and stops loudly when the slot is gone, was moved by someone else, or the server is
//! another one; only a first start creates the slot silently, and `--accept-data-loss`
//! is the operator's explicit way past. `tail` keeps the state in a file; `run` on the
//! Kafka topic `<prefix>._state`.

mod common;

use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(60);

fn tail_config(db: &TestDb, tag: &str) -> std::path::PathBuf {
    db.sql("create table if not exists p (id int primary key, v text)");
    db.config("t.toml", tag, "[[tables]]\nsource = \"public.p\"\n")
}

/// Tail until the row `id` arrives, then stop it with SIGTERM (exit 0).
fn tail_once(db: &TestDb, cfg: &std::path::Path, tag: &str, id: i32) {
    let mut tail = Pgferry::tail(cfg, &[]);
    wait_streaming(db, tag);
    db.sql(&format!("insert into p values ({id}, 'x')"));
    let l = tail.json(1, T);
    assert_eq!(l[0]["after"]["id"], id);
    // Let the position be recorded and confirmed before stopping.
    std::thread::sleep(Duration::from_millis(600));
    assert!(tail.terminate().success(), "{}", tail.stderr_text());
}

#[test]
fn a_dropped_slot_stops_tail_until_the_loss_is_accepted() {
    let db = TestDb::new("slotgone");
    let cfg = tail_config(&db, "s");
    tail_once(&db, &cfg, "s", 1);
    let state = db
        .dir
        .join(".pgferry")
        .join(format!("tail-{}.json", db.slot("s")));
    assert!(
        state.exists(),
        "tail remembers its source in {}",
        state.display()
    );

    // Dropped while stopped, and a change committed meanwhile: that change is lost.
    db.sql(&format!(
        "select pg_drop_replication_slot('{}')",
        db.slot("s")
    ));
    db.sql("insert into p values (2, 'lost')");
    let (code, _, err) = run(&["tail", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("is gone"), "{err}");
    assert!(err.contains(&db.slot("s")), "names the slot: {err}");
    assert!(err.contains("--accept-data-loss"), "says what to do: {err}");
    assert!(
        db.value(&format!(
            "select 1 from pg_replication_slots where slot_name = '{}'",
            db.slot("s")
        ))
        .is_none(),
        "the slot is not re-created without the operator"
    );

    // The operator accepts the loss: the slot is re-created and streaming goes on.
    let mut tail = Pgferry::tail(&cfg, &["--accept-data-loss"]);
    wait_streaming(&db, "s");
    db.sql("insert into p values (3, 'x')");
    let l = tail.json(1, T);
    assert_eq!(l[0]["after"]["id"], 3);
    assert!(tail.stderr_text().contains("accept-data-loss"));
    std::thread::sleep(Duration::from_millis(600));
    assert!(tail.terminate().success());

    // And from then on a plain restart works again.
    tail_once(&db, &cfg, "s", 4);
}

#[test]
fn a_slot_moved_by_someone_else_or_another_server_stops_tail() {
    let db = TestDb::new("slotmoved");
    let cfg = tail_config(&db, "s");
    tail_once(&db, &cfg, "s", 1);
    let state_file = db
        .dir
        .join(".pgferry")
        .join(format!("tail-{}.json", db.slot("s")));

    // Someone advances the slot past a change pgferry never read.
    db.sql("insert into p values (2, 'skipped')");
    db.sql(&format!(
        "select pg_replication_slot_advance('{}', pg_current_wal_lsn())",
        db.slot("s")
    ));
    let (code, _, err) = run(&["tail", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("ahead of"), "{err}");

    // The remembered server is another one (as after pointing source.url elsewhere).
    let text = std::fs::read_to_string(&state_file).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["system_identifier"] = "1234567890".into();
    std::fs::write(&state_file, v.to_string()).unwrap();
    let (code, _, err) = run(&["tail", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("not the one pgferry streamed from"), "{err}");
    assert!(err.contains("1234567890"), "{err}");

    // A corrupt state file is named.
    std::fs::write(&state_file, "{not json").unwrap();
    let (code, _, err) = run(&["tail", "--config", cfg.to_str().unwrap()]);
    assert_ne!(code, 0, "{err}");
    assert!(err.contains(state_file.to_str().unwrap()), "{err}");
}

#[test]
fn run_remembers_its_slot_on_the_state_topic() {
    let brokers = service_env("PGFERRY_BROKERS");
    let db = TestDb::new("slotrun");
    db.sql("create table p (id int primary key, v text)");
    let prefix = db.name.clone();
    let cfg = db.config(
        "r.toml",
        "s",
        &format!(
            "[kafka]\nbrokers = \"{brokers}\"\ntopic_prefix = \"{prefix}\"\n\
             [[tables]]\nsource = \"public.p\"\n"
        ),
    );
    let args = ["run", "--only", "source", "--config", cfg.to_str().unwrap()];
    let mut p = Pgferry::spawn(&args, db.dir.join("run1.stderr"));
    wait_streaming(&db, "s");
    db.sql("insert into p values (1, 'x')");
    wait_for("the slot to be confirmed past the insert", T, || {
        let confirmed = db.confirmed_flush("s")?;
        let now = db.value("select pg_current_wal_lsn()::text")?;
        (lsn(&confirmed) + 4096 >= lsn(&now)).then_some(())
    });
    assert!(p.terminate().success(), "{}", p.stderr_text());

    db.sql(&format!(
        "select pg_drop_replication_slot('{}')",
        db.slot("s")
    ));
    db.sql("insert into p values (2, 'lost')");
    let (code, _, err) = run(&args);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("is gone"), "{err}");
    assert!(
        err.contains(&format!("{prefix}._state")),
        "names where the state is: {err}"
    );
}
