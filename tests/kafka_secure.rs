//! Issue 9.3: `pgferry run` end to end over the broker's secured listeners that
//! `scripts/services.sh` starts: SASL_SSL with SCRAM-SHA-512, and mutual TLS. Settings
//! go through `[kafka.properties]` under librdkafka's names and reach the producer, the
//! sink's consumer and the state topic alike. A wrong password or an untrusted
//! certificate stops pgferry with a clear message and exit 1 instead of retrying, and
//! the password never reaches the log.

mod common;

use std::time::{Duration, Instant};

use common::*;

const T: Duration = Duration::from_secs(120);

/// Source and target databases, one table, and a config over `brokers` with `props`.
fn setup(tag: &str, brokers: &str, props: &str) -> (TestDb, TestDb, std::path::PathBuf) {
    let src = TestDb::new(tag);
    src.sql("create table p (id int primary key, v text)");
    let tgt = TestDb::on(&service_env("PGFERRY_TARGET_URL"), tag);
    tgt.sql("create table p (id int primary key, v text)");
    let prefix = format!("t{}", src.name);
    let cfg = src.config(
        "s.toml",
        "s",
        &format!(
            "[kafka]\nbrokers = \"{brokers}\"\ntopic_prefix = \"{prefix}\"\n\
             [kafka.properties]\n{props}\n\
             [sink]\nurl = \"{}\"\nconsumer = \"secure\"\nbatch_linger = \"20ms\"\n\
             [[tables]]\nsource = \"public.p\"\n",
            tgt.url
        ),
    );
    (src, tgt, cfg)
}

fn end_to_end(tag: &str, brokers: &str, props: &str, secret: Option<&str>) {
    let (src, tgt, cfg) = setup(tag, brokers, props);
    let mut p = Pgferry::spawn(
        &["run", "--config", cfg.to_str().unwrap()],
        src.dir.join("run.stderr"),
    );
    wait_streaming(&src, "s");
    src.sql("insert into p select g, 'v' || g from generate_series(1, 500) g; update p set v = 'w' where id <= 100; delete from p where id > 400");
    wait_for("every change in the target", T, || {
        let n = tgt.value("select count(*) || ':' || count(*) filter (where v = 'w') from p");
        (n.as_deref() == Some("400:100")).then_some(())
    });
    assert!(p.terminate().success(), "{}", p.stderr_text());
    if let Some(secret) = secret {
        assert!(
            !p.stderr_text().contains(secret),
            "the Kafka password must not be logged"
        );
    }
}

fn secure_props(password: &str) -> String {
    format!(
        "\"security.protocol\" = \"SASL_SSL\"\n\"sasl.mechanism\" = \"SCRAM-SHA-512\"\n\
         \"sasl.username\" = \"{}\"\n\"sasl.password\" = \"{password}\"\n\"ssl.ca.location\" = \"{}\"\n",
        service_env("PGFERRY_KAFKA_USER"),
        service_env("PGFERRY_KAFKA_CA"),
    )
}

#[test]
fn sasl_ssl_with_scram_sha_512_end_to_end() {
    let password = service_env("PGFERRY_KAFKA_PASSWORD");
    end_to_end(
        "ksasl",
        &service_env("PGFERRY_KAFKA_SECURE_BROKERS"),
        &secure_props(&password),
        Some(&password),
    );
}

#[test]
fn mutual_tls_end_to_end() {
    let props = format!(
        "\"security.protocol\" = \"SSL\"\n\"ssl.ca.location\" = \"{}\"\n\
         \"ssl.certificate.location\" = \"{}\"\n\"ssl.key.location\" = \"{}\"\n",
        service_env("PGFERRY_KAFKA_CA"),
        service_env("PGFERRY_KAFKA_CLIENT_CERT"),
        service_env("PGFERRY_KAFKA_CLIENT_KEY"),
    );
    end_to_end(
        "kmtls",
        &service_env("PGFERRY_KAFKA_MTLS_BROKERS"),
        &props,
        None,
    );
}

/// `run` must end by itself, with exit 1, within `within`.
fn must_fail(cfg: &std::path::Path, stderr: std::path::PathBuf, within: Duration) -> String {
    let mut p = Pgferry::spawn(&["run", "--config", cfg.to_str().unwrap()], stderr);
    let start = Instant::now();
    loop {
        if let Some(status) = p.child.try_wait().unwrap() {
            assert_eq!(status.code(), Some(1), "{}", p.stderr_text());
            return p.stderr_text();
        }
        assert!(
            start.elapsed() < within,
            "pgferry kept retrying for {within:?}; stderr:\n{}",
            p.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_wrong_password_stops_with_a_clear_message() {
    let wrong = "not-the-password-4711";
    let (src, _tgt, cfg) = setup(
        "kwrongpw",
        &service_env("PGFERRY_KAFKA_SECURE_BROKERS"),
        &secure_props(wrong),
    );
    let err = must_fail(&cfg, src.dir.join("run.stderr"), Duration::from_secs(60));
    assert!(
        err.contains("uthentication"),
        "says authentication failed: {err}"
    );
    assert!(
        !err.contains(wrong),
        "the password must not be logged: {err}"
    );
}

#[test]
fn an_untrusted_broker_certificate_stops_with_a_clear_message() {
    // Trust some other CA: the broker's certificate must be refused.
    let src_dir = std::env::temp_dir().join(format!("pgferry-otherca-{}", std::process::id()));
    std::fs::create_dir_all(&src_dir).unwrap();
    let other_ca = src_dir.join("other-ca.crt");
    let ok = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=not-the-kafka-ca", "-keyout"])
        .arg(src_dir.join("other-ca.key"))
        .arg("-out")
        .arg(&other_ca)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl")
        .success();
    assert!(ok);
    let props = secure_props(&service_env("PGFERRY_KAFKA_PASSWORD"))
        .replace(&service_env("PGFERRY_KAFKA_CA"), other_ca.to_str().unwrap());
    let (src, _tgt, cfg) = setup(
        "kbadca",
        &service_env("PGFERRY_KAFKA_SECURE_BROKERS"),
        &props,
    );
    let err = must_fail(&cfg, src.dir.join("run.stderr"), Duration::from_secs(60));
    assert!(
        err.contains("certificate") || err.contains("SSL handshake"),
        "says the certificate was not trusted: {err}"
    );
    let _ = std::fs::remove_dir_all(src_dir);
}
