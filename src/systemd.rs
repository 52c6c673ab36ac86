//! systemd's notify protocol, spoken directly (no extra daemon, no library): one
//! datagram per state to `$NOTIFY_SOCKET`. `READY=1` once every stage streams,
//! `WATCHDOG=1` every half `$WATCHDOG_USEC` while healthy, `STOPPING=1` when a
//! graceful stop begins. Without `$NOTIFY_SOCKET` every call does nothing.

use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::health::Health;

/// Send one notification; failures are logged, never fatal.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let result = (|| -> std::io::Result<()> {
        let socket = UnixDatagram::unbound()?;
        let bytes = path.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            // An abstract socket (Linux).
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(state.as_bytes(), &addr)?;
        } else {
            socket.send_to(state.as_bytes(), &path)?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        tracing::warn!(error = %e, %state, "cannot notify systemd");
    }
}

/// Tell systemd READY=1 once `health` is ready (or, at the latest, [`READY_AT_LATEST`]
/// after start), ping the watchdog while the process is alive, and say STOPPING=1 when
/// `shutdown` fires.
///
/// The watchdog is liveness, not readiness: during a hospital-database outage the sink
/// waits and retries while the source keeps publishing, and a watchdog tied to
/// readiness would have systemd kill the source for the target's sake. READY=1 is
/// likewise "started"; `/readyz` says whether every stage streams.
const READY_AT_LATEST: Duration = Duration::from_secs(10);

pub fn supervise(health: Arc<Health>, shutdown: CancellationToken) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let watchdog = std::env::var("WATCHDOG_USEC")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(|us| Duration::from_micros(us / 2));
    tokio::spawn(async move {
        let mut ready_sent = false;
        let mut tick = tokio::time::interval(
            watchdog
                .unwrap_or(Duration::from_millis(200))
                .min(Duration::from_millis(200)),
        );
        let mut last_ping = tokio::time::Instant::now();
        let started = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    notify("STOPPING=1");
                    return;
                }
                _ = tick.tick() => {}
            }
            let ready = health.ready() || started.elapsed() >= READY_AT_LATEST;
            if ready && !ready_sent {
                notify("READY=1");
                ready_sent = true;
            }
            if let Some(every) = watchdog {
                // The runtime ticking is the liveness that counts: a hung process
                // stops pinging and systemd restarts it.
                if last_ping.elapsed() >= every {
                    notify("WATCHDOG=1");
                    last_ping = tokio::time::Instant::now();
                }
            }
        }
    });
}
