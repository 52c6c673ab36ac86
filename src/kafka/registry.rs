//! A client for the few Confluent Schema Registry endpoints pgferry uses: register a
//! schema under a subject and get its id. Plain HTTP/1.1 over tokio: one POST per new
//! schema version, rare enough not to need an HTTP client library.

use std::collections::HashMap;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::error::Error;

const TIMEOUT: Duration = Duration::from_secs(30);

pub struct Registry {
    /// `host:port`.
    authority: String,
    /// Path prefix without trailing slash ("" or "/registry").
    base_path: String,
    url: String,
    ids: HashMap<(String, String), u32>,
}

impl Registry {
    /// `http://host:port[/path]`.
    pub fn new(url: &str) -> Result<Registry, Error> {
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            Error::operator(format!(
                "kafka.schema_registry = {url:?}: only http:// registry URLs are supported"
            ))
        })?;
        let (authority, path) = match rest.split_once('/') {
            Some((a, p)) => (a, format!("/{}", p.trim_end_matches('/'))),
            None => (rest, String::new()),
        };
        if authority.is_empty() {
            return Err(Error::operator(format!(
                "kafka.schema_registry = {url:?} names no host"
            )));
        }
        let authority = if authority.contains(':') {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        Ok(Registry {
            authority,
            base_path: if path == "/" { String::new() } else { path },
            url: url.to_string(),
            ids: HashMap::new(),
        })
    }

    /// Register `schema` (JSON text) under `subject`; the registry returns the id of
    /// the existing version when it is already registered. Cached per process.
    pub async fn register(&mut self, subject: &str, schema: &str) -> Result<u32, Error> {
        let cache_key = (subject.to_string(), schema.to_string());
        if let Some(id) = self.ids.get(&cache_key) {
            return Ok(*id);
        }
        let body = serde_json::json!({ "schema": schema }).to_string();
        let path = format!("{}/subjects/{}/versions", self.base_path, subject);
        let reply = self
            .call("POST", &path, &body, &format!("refused the schema of subject {subject}"))
            .await
            .map_err(|e| {
                e.with_hint("a 409 means the new schema is incompatible with the subject's compatibility setting")
            })?;
        let id = serde_json::from_str::<serde_json::Value>(&reply)
            .ok()
            .and_then(|v| v.get("id").and_then(|id| id.as_u64()))
            .and_then(|id| u32::try_from(id).ok())
            .ok_or_else(|| {
                Error::fatal(format!(
                    "schema registry {}: no schema id in the answer for {subject}",
                    self.url
                ))
            })?;
        self.ids.insert(cache_key, id);
        Ok(id)
    }

    /// The schema (JSON text) registered under `id`.
    pub async fn fetch(&self, id: u32) -> Result<String, Error> {
        let path = format!("{}/schemas/ids/{id}", self.base_path);
        let reply = self
            .call("GET", &path, "", &format!("schema id {id}"))
            .await?;
        serde_json::from_str::<serde_json::Value>(&reply)
            .ok()
            .and_then(|v| v.get("schema").and_then(|s| s.as_str()).map(str::to_string))
            .ok_or_else(|| {
                Error::fatal(format!(
                    "schema registry {}: no schema in the answer for id {id}",
                    self.url
                ))
            })
    }

    /// One request with a timeout; the body of a 2xx answer, else an error saying
    /// `what` failed (transient for 5xx, fatal otherwise).
    async fn call(
        &self,
        method: &str,
        path: &str,
        body: &str,
        what: &str,
    ) -> Result<String, Error> {
        let (status, reply) = tokio::time::timeout(TIMEOUT, self.request(method, path, body))
            .await
            .map_err(|_| {
                Error::transient(format!(
                    "schema registry {}: no answer within 30s",
                    self.url
                ))
            })??;
        if (200..300).contains(&status) {
            return Ok(reply);
        }
        let kind = if status >= 500 {
            Error::transient
        } else {
            Error::fatal
        };
        Err(kind(format!(
            "schema registry {}: {what}: HTTP {status}: {}",
            self.url,
            reply.trim()
        )))
    }

    async fn request(&self, method: &str, path: &str, body: &str) -> Result<(u16, String), Error> {
        let io = |e: std::io::Error| {
            Error::transient(format!("schema registry {}", self.url)).with_source(e)
        };
        let mut stream = TcpStream::connect(&self.authority).await.map_err(io)?;
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/vnd.schemaregistry.v1+json\r\n\
             Accept: application/vnd.schemaregistry.v1+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.authority,
            body.len()
        );
        stream.write_all(request.as_bytes()).await.map_err(io)?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.map_err(io)?;
        let text = String::from_utf8_lossy(&response);
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                Error::transient(format!("schema registry {}: not an HTTP answer", self.url))
            })?;
        let chunked = head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked");
        Ok((
            status,
            if chunked {
                dechunk(body)
            } else {
                body.to_string()
            },
        ))
    }
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_registry_urls() {
        let r = Registry::new("http://reg:8081/prefix/").unwrap();
        assert_eq!(
            (r.authority.as_str(), r.base_path.as_str()),
            ("reg:8081", "/prefix")
        );
        assert_eq!(Registry::new("http://reg").unwrap().authority, "reg:80");
        assert!(Registry::new("https://reg").is_err());
    }

    #[test]
    fn dechunks_bodies() {
        assert_eq!(
            dechunk("4\r\n{\"id\r\n3\r\n\":1\r\n1\r\n}\r\n0\r\n\r\n"),
            "{\"id\":1}"
        );
    }
}
