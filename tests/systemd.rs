//! The systemd notify protocol against a test socket, and a graceful stop under load:
//! READY=1 once streaming, STOPPING=1 on SIGTERM, exit 0, and a restart loses nothing.

mod common;
mod kafka_support;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::*;
use kafka_support::*;

fn receive(socket: &UnixDatagram, want: &str, timeout: Duration) -> Vec<String> {
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while Instant::now() < deadline {
        if let Ok(n) = socket.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = msg == want;
            seen.push(msg);
            if done {
                return seen;
            }
        }
    }
    panic!("no {want} within {timeout:?}; got {seen:?}");
}

#[test]
fn notifies_systemd_and_stops_gracefully_under_load_without_loss() {
    let src = TestDb::new("notify");
    let tgt = TestDb::on(&service_env("PGFERRY_TARGET_URL"), "notify_t");
    src.sql("create table n (id int primary key, counter int not null)");
    let cfg = src.config(
        "n.toml",
        "s_notify",
        &format!(
            "[kafka]\nbrokers = \"{}\"\ntopic_prefix = \"t{}\"\n[sink]\nurl = \"{}\"\nconsumer = \"test\"\n\
             create_tables = true\n[[tables]]\nsource = \"public.n\"\n",
            brokers(),
            src.name,
            tgt.url
        ),
    );
    let socket_path = src.dir.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    let sock = socket_path.to_str().unwrap().to_string();
    let args = ["run", "--config", cfg.to_str().unwrap()];
    let env = [
        ("NOTIFY_SOCKET", sock.as_str()),
        ("WATCHDOG_USEC", "1000000"),
    ];
    let mut p = Pgferry::spawn_env(&args, cfg.with_extension("1.stderr"), &env);
    let seen = receive(&socket, "READY=1", Duration::from_secs(60));
    assert!(!seen.contains(&"STOPPING=1".to_string()));
    receive(&socket, "WATCHDOG=1", Duration::from_secs(5));

    src.sql("insert into n select g, 0 from generate_series(1, 300) g");
    let url = src.url.clone();
    let writer = std::thread::spawn(move || {
        for _ in 0..20 {
            sql(&url, "update n set counter = counter + 1");
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    std::thread::sleep(Duration::from_millis(800));
    let status = p.terminate();
    assert!(
        status.success(),
        "SIGTERM under load exits 0: {status:?}\n{}",
        p.stderr_text()
    );
    receive(&socket, "STOPPING=1", Duration::from_secs(5));
    writer.join().unwrap();

    // A restart catches up with nothing lost and nothing doubled.
    let p2 = Pgferry::spawn(&args, cfg.with_extension("2.stderr"));
    wait_for("the restart to catch up", Duration::from_secs(120), || {
        let (code, _, _) = run(&["verify", "--config", cfg.to_str().unwrap()]);
        (code == 0).then_some(())
    });
    assert_eq!(
        tgt.value("select count(*)::text || ' ' || min(counter) || ' ' || max(counter) from n")
            .as_deref(),
        Some("300 20 20"),
        "{}",
        p2.stderr_text()
    );
}
