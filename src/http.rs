//! The HTTP endpoint on `[http].listen`: `/metrics` (Prometheus text), `/healthz`
//! (the process is alive) and `/readyz` (every enabled stage is streaming).
//! A deliberately tiny HTTP/1.1 responder: three GET routes do not need a framework.
//! And the client side that reads `/metrics` back (`status`, `verify --ledger`).
//!
//! It faces whatever can reach the port, so it is bounded: at most
//! [`MAX_CONNECTIONS`] at once (more are closed at once), request headers of at most
//! [`MAX_HEADER_BYTES`] (else 431), and [`HEADER_TIMEOUT`] to send them (a slow client
//! is dropped and frees its slot).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::error::Error;
use crate::health::Health;

pub const MAX_CONNECTIONS: usize = 32;
pub const MAX_HEADER_BYTES: usize = 8 * 1024;
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(2);

/// Bind the listener now (so a busy port is a startup error) and serve in the
/// background. Returns the bound address (useful with port 0).
pub async fn serve(listen: &str, health: Arc<Health>) -> Result<std::net::SocketAddr, Error> {
    let listener = TcpListener::bind(listen).await.map_err(|e| {
        Error::operator(format!("http.listen: cannot listen on {listen}"))
            .with_source(e)
            .with_hint("choose a free address in [http].listen, or set it to \"\" to disable the HTTP server")
    })?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::fatal("http.listen: reading the bound address").with_source(e))?;
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        // Full: close at once rather than queue behind slow clients.
                        drop(stream);
                        continue;
                    };
                    let health = health.clone();
                    tokio::spawn(async move {
                        let _ =
                            tokio::time::timeout(Duration::from_secs(10), respond(stream, &health))
                                .await;
                        drop(slot);
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "http accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    Ok(addr)
}

async fn respond(mut stream: TcpStream, health: &Health) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let read_headers = async {
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() <= MAX_HEADER_BYTES {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    if tokio::time::timeout(HEADER_TIMEOUT, read_headers)
        .await
        .is_err()
    {
        return Ok(());
    }
    if buf.len() > MAX_HEADER_BYTES {
        let body = "request headers too large\n";
        let head = format!(
            "HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        return stream.shutdown().await;
    }
    let request = String::from_utf8_lossy(&buf);
    let mut parts = request.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4",
            crate::metrics::render(),
        ),
        ("GET", "/healthz") => ("200 OK", "text/plain", "ok\n".to_string()),
        ("GET", "/readyz") if health.ready() => ("200 OK", "text/plain", "ready\n".to_string()),
        ("GET", "/readyz") => (
            "503 Service Unavailable",
            "text/plain",
            "not streaming\n".to_string(),
        ),
        ("GET", _) => (
            "404 Not Found",
            "text/plain",
            "try /metrics, /healthz or /readyz\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_string(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// Prometheus label text: `a="x",b="y\"z"` -> {a: x, b: y"z} (Prometheus text escapes `\\`, `\"`, `\n`).
pub fn parse_labels(text: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut chars = text.chars().peekable();
    loop {
        let name: String = chars.by_ref().take_while(|c| *c != '=').collect();
        let name = name.trim().trim_start_matches(',').trim().to_string();
        if name.is_empty() || chars.next() != Some('"') {
            break;
        }
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(other) => value.push(other),
                    None => break,
                },
                '"' => break,
                c => value.push(c),
            }
        }
        out.insert(name, value);
    }
    out
}

/// GET `url` (plain `http://host:port/path`): the body of a 200 answer.
pub async fn get(url: &str) -> Result<String, Error> {
    let bad = || {
        Error::operator(format!(
            "{url}: expected http://host:port/path (e.g. http://127.0.0.1:9187/metrics)"
        ))
    };
    let rest = url.strip_prefix("http://").ok_or_else(bad)?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/metrics"),
    };
    if authority.is_empty() {
        return Err(bad());
    }
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(authority).await?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(std::time::Duration::from_secs(10), fetch)
        .await
        .map_err(|_| Error::transient(format!("{url}: no answer within 10 s")))?
        .map_err(|e| Error::transient(format!("{url}: cannot fetch")).with_source(e))?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| Error::transient(format!("{url}: not an HTTP response")))?;
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        return Err(Error::operator(format!("{url}: HTTP status {status}")));
    }
    Ok(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: std::net::SocketAddr, request: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let _ = s.write_all(request.as_bytes()).await;
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        out
    }

    #[tokio::test]
    async fn slow_clients_and_huge_headers_cannot_starve_the_probes() {
        let addr = serve("127.0.0.1:0", Arc::new(Health::new(true, false)))
            .await
            .unwrap();
        // More idle connections than there are slots, sending nothing.
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS * 3 {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        tokio::time::sleep(HEADER_TIMEOUT + Duration::from_millis(500)).await;
        let ok = get(addr, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        let big = format!(
            "GET /healthz HTTP/1.1\r\nX: {}\r\n\r\n",
            "a".repeat(MAX_HEADER_BYTES * 2)
        );
        let refused = get(addr, &big).await;
        assert!(refused.starts_with("HTTP/1.1 431"), "{refused}");
        drop(idle);
    }
}
