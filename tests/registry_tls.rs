//! Issue 9.4: an `https://` schema registry, verified against `schema_registry_ca`,
//! with basic auth. The registry here is a small in-test HTTPS server (no registry
//! with TLS can be installed here), with the local services' CA and server
//! certificate; a wrong password and an untrusted certificate stop pgferry clearly,
//! without the password in any message.

mod common;
mod kafka_support;

use std::io::{BufRead, BufReader, Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use kafka_support::*;

const T: Duration = Duration::from_secs(90);
const USER: &str = "registry-user";
const PASSWORD: &str = "s3cret-registry-pw";

struct TlsRegistry {
    port: u16,
    /// (subject, Authorization header) of every registration.
    seen: Arc<Mutex<Vec<(String, String)>>>,
}

fn tls_server_config() -> Arc<rustls::ServerConfig> {
    let dir = std::path::PathBuf::from(service_env("PGFERRY_SERVICES_DIR")).join("tls");
    let certs: Vec<_> =
        rustls_pemfile::certs(&mut std::fs::read(dir.join("server.crt")).unwrap().as_slice())
            .map(|c| c.unwrap())
            .collect();
    let key =
        rustls_pemfile::private_key(&mut std::fs::read(dir.join("server.key")).unwrap().as_slice())
            .unwrap()
            .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap(),
    )
}

impl TlsRegistry {
    fn start() -> TlsRegistry {
        use base64::Engine;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen: Arc<Mutex<Vec<(String, String)>>> = Default::default();
        let store = seen.clone();
        let config = tls_server_config();
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"))
        );
        std::thread::spawn(move || {
            let mut schemas: Vec<String> = Vec::new();
            for tcp in listener.incoming() {
                let Ok(tcp) = tcp else { continue };
                let Ok(conn) = rustls::ServerConnection::new(config.clone()) else {
                    continue;
                };
                let mut tls = rustls::StreamOwned::new(conn, tcp);
                let mut reader = BufReader::new(&mut tls);
                let mut request_line = String::new();
                if reader.read_line(&mut request_line).is_err() {
                    continue; // a client that refused our certificate
                }
                let (mut length, mut auth) = (0, String::new());
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).is_err() || line.trim().is_empty() {
                        break;
                    }
                    let lower = line.to_ascii_lowercase();
                    if let Some(v) = lower.strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                    if lower.starts_with("authorization:") {
                        auth = line["authorization:".len()..].trim().to_string();
                    }
                }
                let mut body = vec![0; length];
                let _ = reader.read_exact(&mut body);
                let path = request_line
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or("")
                    .to_string();
                let subject = path
                    .trim_start_matches("/subjects/")
                    .trim_end_matches("/versions")
                    .to_string();
                store.lock().unwrap().push((subject, auth.clone()));
                let (status, reply) = if auth != expected {
                    (
                        "401 Unauthorized",
                        r#"{"error_code":401,"message":"Unauthorized"}"#.to_string(),
                    )
                } else {
                    let schema = serde_json::from_slice::<serde_json::Value>(&body).unwrap()
                        ["schema"]
                        .as_str()
                        .unwrap()
                        .to_string();
                    let id = match schemas.iter().position(|s| *s == schema) {
                        Some(i) => i + 1,
                        None => {
                            schemas.push(schema);
                            schemas.len()
                        }
                    };
                    ("200 OK", format!("{{\"id\":{id}}}"))
                };
                let _ = write!(
                    tls,
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
                    reply.len()
                );
                tls.conn.send_close_notify();
                let _ = tls.flush();
            }
        });
        TlsRegistry { port, seen }
    }
}

fn config(db: &TestDb, registry: &TlsRegistry, ca: &str, password: &str) -> std::path::PathBuf {
    db.sql("create table if not exists p (id int primary key, v text)");
    db.config(
        "r.toml",
        "s",
        &format!(
            "[kafka]\nbrokers = \"{}\"\ntopic_prefix = \"t{}\"\n\
             schema_registry = \"https://localhost:{}\"\nschema_registry_ca = \"{ca}\"\n\
             schema_registry_user = \"{USER}\"\nschema_registry_password = \"{password}\"\n\
             [[tables]]\nsource = \"public.p\"\n",
            brokers(),
            db.name,
            registry.port
        ),
    )
}

fn ca() -> String {
    format!("{}/ca.crt", service_env("PGFERRY_SERVICES_DIR"))
}

#[test]
fn an_https_registry_with_basic_auth_gets_the_schemas() {
    let registry = TlsRegistry::start();
    let db = TestDb::new("regtls");
    let cfg = config(&db, &registry, &ca(), PASSWORD);
    let mut run = Pgferry::spawn(
        &["run", "--only", "source", "--config", cfg.to_str().unwrap()],
        db.dir.join("run.stderr"),
    );
    wait_streaming(&db, "s");
    db.sql("insert into p values (1, 'a')");
    let records = consume(&brokers(), &format!("t{}.public.p", db.name), 1, T);
    let value = records[0].value.as_ref().unwrap();
    assert_eq!(value[0], 0, "Confluent framing");
    let seen = registry.seen.lock().unwrap().clone();
    assert!(
        seen.iter().any(|(s, _)| s.ends_with(".public.p-value")),
        "{seen:?}"
    );
    assert!(
        seen.iter().all(|(_, a)| a.starts_with("Basic ")),
        "{seen:?}"
    );
    assert!(run.terminate().success(), "{}", run.stderr_text());
    assert!(!run.stderr_text().contains(PASSWORD));
}

/// `run --only source` must end by itself with a non-zero exit.
fn fails(cfg: &std::path::Path, stderr: std::path::PathBuf, db: &TestDb) -> String {
    let mut run = Pgferry::spawn(
        &["run", "--only", "source", "--config", cfg.to_str().unwrap()],
        stderr,
    );
    wait_streaming(db, "s");
    db.sql("insert into p values (2, 'b')");
    let status = wait_for("pgferry to stop", T, || run.child.try_wait().unwrap());
    assert!(!status.success(), "{}", run.stderr_text());
    run.stderr_text()
}

#[test]
fn a_wrong_registry_password_stops_without_showing_it() {
    let registry = TlsRegistry::start();
    let db = TestDb::new("regpw");
    let wrong = "wrong-registry-pw-1234";
    let cfg = config(&db, &registry, &ca(), wrong);
    let err = fails(&cfg, db.dir.join("run.stderr"), &db);
    assert!(err.contains("401"), "{err}");
    assert!(
        !err.contains(wrong),
        "the password must not be shown: {err}"
    );
}

#[test]
fn an_untrusted_registry_certificate_stops_with_a_clear_message() {
    let registry = TlsRegistry::start();
    let db = TestDb::new("regca");
    // Trust only the system bundle: our local CA is not in it.
    let cfg = config(
        &db,
        &registry,
        "/etc/ssl/certs/ca-certificates.crt",
        PASSWORD,
    );
    let err = fails(&cfg, db.dir.join("run.stderr"), &db);
    assert!(err.contains("TLS handshake"), "{err}");
    assert!(
        err.contains("schema_registry_ca"),
        "says what to check: {err}"
    );
}
