//! Bad input gets a clear message and the right exit code; `pgferry check` reports
//! one line per problem; authentication methods and TLS modes work against real servers.

mod common;

use std::time::Duration;

use common::*;

fn write(dir: &std::path::Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

/// A directory for one test's files, removed with them when the test ends.
struct Scratch(std::path::PathBuf);

impl std::ops::Deref for Scratch {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch(tag: &str) -> Scratch {
    let d = std::env::temp_dir().join(format!("pgferry-cli-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    Scratch(d)
}

#[test]
fn malformed_config_exits_2_naming_the_file() {
    let d = scratch("malformed");
    let f = write(&d, "broken.toml", "[source\nurl = \"postgres://x@y/z\"\n");
    let (code, _, err) = run(&["tail", "--config", &f]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("broken.toml") && err.contains("not valid TOML") && err.contains("line 1"),
        "{err}"
    );
}

#[test]
fn unknown_key_exits_2_naming_file_and_key() {
    let d = scratch("unknown");
    std::fs::create_dir_all(d.join("tables")).unwrap();
    write(
        &d.join("tables"),
        "public.patients.toml",
        "source = \"public.patients\"\nexclude = [\"ssn\"]\nrenmae = {}\n",
    );
    let f = write(
        &d,
        "main.toml",
        "tables_dir = \"tables\"\n[source]\nurl = \"postgres://x@y/z\"\n",
    );
    let (code, _, err) = run(&["check", "--config", &f]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("public.patients.toml") && err.contains("renmae"),
        "{err}"
    );

    let f = write(
        &d,
        "main2.toml",
        "[source]\nurl = \"postgres://x@y/z\"\n[http]\nlisten = \"x\"\nport = 1\n",
    );
    let (code, _, err) = run(&["tail", "--config", &f]);
    assert_eq!(code, 2);
    assert!(
        err.contains("main2.toml: http.port: unknown field `port`"),
        "{err}"
    );
}

#[test]
fn missing_environment_variable_is_named() {
    let d = scratch("env");
    let f = write(
        &d,
        "m.toml",
        "[source]\nurl = \"postgres://u:${PGFERRY_TEST_NO_SUCH_VAR}@h/d\"\n",
    );
    let (code, _, err) = run(&["tail", "--config", &f]);
    assert_eq!(code, 2);
    assert!(
        err.contains("source.url") && err.contains("PGFERRY_TEST_NO_SUCH_VAR"),
        "{err}"
    );
}

#[test]
fn unreachable_server_fails_with_a_hint() {
    let d = scratch("unreachable");
    let port = free_port();
    let f = write(
        &d,
        "m.toml",
        &format!("[source]\nurl = \"postgres://u@127.0.0.1:{port}/d\"\n[http]\nlisten = \"\"\n"),
    );
    let (code, _, err) = run(&["tail", "--config", &f]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("127.0.0.1:{port}")) && err.contains("is the server running"),
        "{err}"
    );
    let (code, out, _) = run(&["check", "--config", &f]);
    assert_eq!(code, 1);
    assert!(out.contains("source.url: cannot connect"), "{out}");
}

/// Roles are global to the server and tests run in parallel: every test gives a role
/// the same password, so no test changes it under another. One at a time (the lock
/// lasts the statements' one transaction): two sessions altering one role at once
/// fail with "tuple concurrently updated".
fn ensure_role(db: &TestDb, role: &str, encryption: &str, password: &str) {
    db.sql(&format!(
        "select pg_advisory_xact_lock(hashtext('pgferry tests: roles'));
         do $$ begin create role {role} login replication; exception when duplicate_object then null; end $$;
         set password_encryption = '{encryption}';
         alter role {role} password '{password}';"
    ));
}

/// Issue 8.19: no cleartext or md5 password over a connection that does not verify
/// the server, unless the URL says so.
#[test]
fn an_md5_password_is_not_sent_over_an_unverified_connection() {
    let db = TestDb::new("unverified");
    ensure_role(&db, "pgferry_md5", "md5", "pw-md5");
    for mode in ["prefer", "require", "disable"] {
        let url = format!(
            "{}?sslmode={mode}",
            db.url.replace("postgres@", "pgferry_md5:pw-md5@")
        );
        let cfg = db.config_with_url(&format!("{mode}.toml"), &url, "s", "");
        let (code, _, err) = run(&["tail", "--config", cfg.to_str().unwrap()]);
        assert_eq!(code, 2, "{mode}: {err}");
        assert!(err.contains("did not send it"), "{mode}: {err}");
        assert!(
            err.contains("unverified_password=allow"),
            "says what to do: {err}"
        );
        assert!(!err.contains("pw-md5"), "{err}");
    }
}

#[test]
fn channel_binding_require_refuses_a_password_without_scram() {
    let db = TestDb::new("cbind");
    ensure_role(&db, "pgferry_md5", "md5", "pw-md5");
    let url = format!(
        "{}?sslmode=require&channel_binding=require",
        db.url.replace("postgres@", "pgferry_md5:pw-md5@")
    );
    let cfg = db.config_with_url("p.toml", &url, "s", "");
    let (code, _, err) = run(&["tail", "--config", cfg.to_str().unwrap()]);
    assert_ne!(code, 0, "{err}");
    // Refused before anything is sent: by the guard on unverified passwords, or by
    // channel_binding=require itself.
    assert!(
        err.contains("channel_binding") || err.contains("did not send it"),
        "{err}"
    );
    assert!(
        !err.contains("pw-md5"),
        "the password must not be printed: {err}"
    );
}

#[test]
fn wrong_password_exits_2() {
    let db = TestDb::new("badpw");
    ensure_role(&db, "pgferry_md5", "md5", "pw-md5");
    let url = format!(
        "{}?unverified_password=allow",
        db.url.replace("postgres@", "pgferry_md5:wrong@")
    );
    let cfg = db.config_with_url("p.toml", &url, "s", "");
    let (code, _, err) = run(&["tail", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("password authentication failed"), "{err}");
    assert!(
        !err.contains("wrong"),
        "the password must not be printed: {err}"
    );
}

#[test]
fn wal_level_not_logical_is_refused() {
    let db = TestDb::on(&service_env("PGFERRY_PLAIN_URL"), "plain");
    db.sql("create table t (id int primary key)");
    let cfg = db.config("p.toml", "s", "[[tables]]\nsource = \"public.t\"\n");
    let (code, _, err) = run(&["tail", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("wal_level = replica") && err.contains("wal_level = logical"),
        "{err}"
    );
    let (code, out, _) = run(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(out.contains("wal_level is replica"), "{out}");
}

#[test]
fn check_reports_each_problem_on_its_own_line() {
    let db = TestDb::new("check");
    db.sql(
        "create table good (id int primary key, ssn text);
         create table nokey (id int, v text);
         create table full_nokey (id int, v text);
         alter table full_nokey replica identity full;",
    );
    let ok = db.config(
        "ok.toml",
        "s_check",
        "[[tables]]\nsource = \"public.good\"\nexclude = [\"ssn\"]\n",
    );
    let (code, out, err) = run(&["check", "--config", ok.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("ok:"), "{out}");
    // Issue 8.19: a connection that does not verify the server is warned about.
    assert!(
        err.contains("warning: source.url: sslmode=prefer"),
        "the default sslmode does not verify the server: {err}"
    );
    let ca = format!("{}/ca.crt", service_env("PGFERRY_SERVICES_DIR"));
    let verified = db.config_with_url(
        "verified.toml",
        &format!(
            "{}?sslmode=verify-full&sslrootcert={ca}",
            db.url.replace("127.0.0.1", "localhost")
        ),
        "s_check",
        "[[tables]]\nsource = \"public.good\"\nexclude = [\"ssn\"]\n",
    );
    let (code, out, err) = run(&["check", "--config", verified.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        !err.contains("warning"),
        "verify-full is not warned about: {err}"
    );

    let bad = db.config(
        "bad.toml",
        "s_check",
        "[[tables]]\nsource = \"public.nokey\"\n\
         [[tables]]\nsource = \"public.missing\"\n\
         [[tables]]\nsource = \"public.full_nokey\"\n\
         [[tables]]\nsource = \"public.good\"\nexclude = [\"sssn\"]\n",
    );
    let (code, out, _) = run(&["check", "--config", bad.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert!(
        lines[0].contains("public.nokey")
            && lines[0].contains("no primary key")
            && lines[0].contains("REPLICA IDENTITY FULL")
    );
    assert!(lines[1].contains("public.missing") && lines[1].contains("does not exist"));
    assert!(lines[2].contains("public.full_nokey") && lines[2].contains("key = [...]"));
    assert!(lines[3].contains("public.good") && lines[3].contains("sssn"));
    for l in &lines {
        assert!(
            l.contains("bad.toml"),
            "each table problem names its file: {l}"
        );
    }

    // A role without REPLICATION and without SELECT.
    db.sql(
        "do $$ begin create role pgferry_plainrole login; exception when duplicate_object then null; end $$;
         alter role pgferry_plainrole noreplication;",
    );
    let url = db.url.replace("postgres@", "pgferry_plainrole@");
    let cfg = db.config_with_url(
        "role.toml",
        &url,
        "s_check",
        "[[tables]]\nsource = \"public.good\"\n",
    );
    let (code, out, _) = run(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(out.contains("neither REPLICATION nor SUPERUSER"), "{out}");
    assert!(out.contains("lacks SELECT"), "{out}");
}

#[test]
fn check_reports_a_slot_of_the_wrong_kind() {
    let db = TestDb::new("wrongslot");
    db.sql("create table t (id int primary key)");
    let slot = db.slot("s_lost");
    db.sql(&format!(
        "select pg_create_logical_replication_slot('{slot}', 'test_decoding')"
    ));
    let cfg = db.config("p.toml", "s_lost", "[[tables]]\nsource = \"public.t\"\n");
    let (code, out, _) = run(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(out.contains("not a logical pgoutput slot"), "{out}");
}

#[test]
fn run_without_a_sink_section_says_so_and_exits_2() {
    let d = scratch("nosink");
    let cfg = write(
        &d,
        "m.toml",
        "[source]\nurl = \"postgres://u@h/d\"\n[http]\nlisten = \"\"\n",
    );
    let (code, _, err) = run(&["run", "--only", "sink", "--config", cfg.as_str()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("[sink]"), "{err}");
}

/// Each password method and TLS mode, through the replication connection that pgferry
/// implements itself: a row inserted after start must come out of `tail`.
#[test]
fn authentication_methods_and_tls_modes_stream() {
    let db = TestDb::new("auth");
    db.sql("create table t (id int primary key)");
    ensure_role(&db, "pgferry_password", "scram-sha-256", "pw-cleartext");
    ensure_role(&db, "pgferry_md5", "md5", "pw-md5");
    ensure_role(&db, "pgferry_scram", "scram-sha-256", "pw-scram");
    db.sql(&format!(
        "grant select on t to pgferry_password, pgferry_md5, pgferry_scram;
         grant create on database {} to pgferry_password, pgferry_md5, pgferry_scram;
         create publication pub_auth for table t;",
        db.name
    ));
    let ca = format!("{}/ca.crt", service_env("PGFERRY_SERVICES_DIR"));
    let cases = [
        ("trust", db.url.clone()),
        // Cleartext and md5 only where the URL allows them without a verified server,
        // or over verify-full.
        (
            "password",
            format!(
                "{}?unverified_password=allow",
                db.url
                    .replace("postgres@", "pgferry_password:pw-cleartext@")
            ),
        ),
        (
            "md5",
            format!(
                "{}?unverified_password=allow",
                db.url.replace("postgres@", "pgferry_md5:pw-md5@")
            ),
        ),
        (
            "md5verified",
            format!(
                "{}?sslmode=verify-full&sslrootcert={ca}",
                db.url
                    .replace("127.0.0.1", "localhost")
                    .replace("postgres@", "pgferry_md5:pw-md5@")
            ),
        ),
        (
            "scram",
            db.url.replace("postgres@", "pgferry_scram:pw-scram@"),
        ),
        (
            "require",
            format!(
                "{}?sslmode=require",
                db.url.replace("postgres@", "pgferry_scram:pw-scram@")
            ),
        ),
        // SCRAM-SHA-256-PLUS: the server checks pgferry's tls-server-end-point hash
        // of its certificate, on the catalog and the replication connection alike.
        (
            "scramplus",
            format!(
                "{}?sslmode=require&channel_binding=require",
                db.url.replace("postgres@", "pgferry_scram:pw-scram@")
            ),
        ),
        (
            "verifyfull",
            format!(
                "{}?sslmode=verify-full&sslrootcert={ca}",
                db.url.replace("127.0.0.1", "localhost")
            ),
        ),
        (
            "verifyca",
            format!("{}?sslmode=verify-ca&sslrootcert={ca}", db.url),
        ),
        ("disable", format!("{}?sslmode=disable", db.url)),
    ];
    for (i, (name, url)) in cases.iter().enumerate() {
        let tag = format!("a_{name}");
        let cfg = db.config_with_url(
            &format!("{name}.toml"),
            url,
            &tag,
            "[[tables]]\nsource = \"public.t\"\n",
        );
        let text = std::fs::read_to_string(&cfg).unwrap().replace(
            &format!("publication = \"{}\"", db.slot(&tag)),
            "publication = \"pub_auth\"",
        );
        std::fs::write(&cfg, text).unwrap();
        let mut tail = Pgferry::tail(&cfg, &[]);
        wait_streaming(&db, &tag);
        db.sql(&format!("insert into t values ({i})"));
        let line = tail.json(1, Duration::from_secs(30));
        assert_eq!(line[0]["after"]["id"], i as i64, "{name}");
        let tls_rows = db.value(&format!(
            "select count(*) from pg_stat_ssl s join pg_replication_slots r on r.active_pid = s.pid \
             where r.slot_name = '{}' and s.ssl",
            db.slot(&tag)
        ));
        let expect_tls = !matches!(*name, "disable");
        assert_eq!(
            tls_rows.as_deref() == Some("1"),
            expect_tls,
            "{name}: TLS in use? {tls_rows:?}"
        );
        assert!(tail.terminate().success(), "{name}: {}", tail.stderr_text());
    }
}

#[test]
fn verify_full_rejects_a_certificate_from_another_ca() {
    let db = TestDb::new("tlsca");
    db.sql("create table t (id int primary key)");
    let other_ca = db.dir.join("other-ca.crt");
    let status = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=not-our-ca",
        ])
        .arg("-keyout")
        .arg(db.dir.join("other-ca.key"))
        .arg("-out")
        .arg(&other_ca)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl");
    assert!(status.success());
    let url = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        db.url,
        other_ca.display()
    );
    let cfg = db.config_with_url("p.toml", &url, "s", "");
    let (code, _, err) = run(&["tail", "--config", cfg.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(
        err.contains("certificate") || err.contains("UnknownIssuer"),
        "{err}"
    );
}
