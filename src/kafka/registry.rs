//! A client for the few Confluent Schema Registry endpoints pgferry uses: register a
//! schema under a subject and get its id. Plain HTTP/1.1 over tokio, optionally in TLS
//! (rustls, verified against `schema_registry_ca` or the system bundle) with basic
//! auth: one POST per new schema version, rare enough not to need an HTTP client
//! library. The password never appears in messages.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::KafkaConfig;
use crate::error::Error;

/// Where the system keeps its CA bundle (Debian, Ubuntu, Alpine).
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

const TIMEOUT: Duration = Duration::from_secs(30);

pub struct Registry {
    /// `host:port`.
    authority: String,
    /// Host name for TLS (SNI and verification).
    host: String,
    https: bool,
    /// Set for `https://` registries by [`Registry::from_config`].
    tls: Option<tokio_rustls::TlsConnector>,
    /// `Basic …` header value.
    authorization: Option<String>,
    /// Path prefix without trailing slash ("" or "/registry").
    base_path: String,
    url: String,
    ids: HashMap<(String, String), u32>,
}

impl Registry {
    /// The registry `[kafka]` names, with its CA and credentials.
    pub fn from_config(kafka: &KafkaConfig) -> Result<Registry, Error> {
        let mut r = Registry::new(&kafka.schema_registry)?;
        if r.https {
            r.tls = Some(connector(kafka.schema_registry_ca.as_deref())?);
        } else if kafka.schema_registry_ca.is_some() {
            return Err(Error::operator(
                "kafka.schema_registry_ca is set but kafka.schema_registry is not an https:// URL",
            ));
        }
        match (&kafka.schema_registry_user, &kafka.schema_registry_password) {
            (Some(user), Some(password)) => {
                use base64::Engine;
                let token =
                    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
                r.authorization = Some(format!("Basic {token}"));
            }
            (None, None) => {}
            _ => {
                return Err(Error::operator(
                    "kafka.schema_registry_user and kafka.schema_registry_password go together",
                ))
            }
        }
        Ok(r)
    }

    /// `http://host:port[/path]` or `https://…` (TLS against the system's CAs).
    pub fn new(url: &str) -> Result<Registry, Error> {
        let (rest, tls, default_port) = if let Some(r) = url.strip_prefix("http://") {
            (r, false, 80)
        } else if let Some(r) = url.strip_prefix("https://") {
            (r, true, 443)
        } else {
            return Err(Error::operator(format!(
                "kafka.schema_registry = {url:?}: write an http:// or https:// URL"
            )));
        };
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
            format!("{authority}:{default_port}")
        };
        let host = authority
            .rsplit_once(':')
            .map_or(authority.as_str(), |(h, _)| h)
            .trim_matches(|c| c == '[' || c == ']')
            .to_string();
        Ok(Registry {
            authority,
            host,
            https: tls,
            tls: None,
            authorization: None,
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
            .call(
                "POST",
                &path,
                &body,
                &format!("refused the schema of subject {subject}"),
            )
            .await?;
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
        let e = kind(format!(
            "schema registry {}: {what}: HTTP {status}: {}",
            self.url,
            reply.trim()
        ));
        Err(match status {
            401 | 403 => e.with_hint(
                "check kafka.schema_registry_user and kafka.schema_registry_password, and the user's rights",
            ),
            409 => e.with_hint(
                "the new schema is incompatible with the subject's compatibility setting",
            ),
            _ => e,
        })
    }

    async fn request(&self, method: &str, path: &str, body: &str) -> Result<(u16, String), Error> {
        let io = |e: std::io::Error| {
            Error::transient(format!("schema registry {}", self.url)).with_source(e)
        };
        let tcp = TcpStream::connect(&self.authority).await.map_err(io)?;
        let auth = self
            .authorization
            .as_deref()
            .map(|a| format!("Authorization: {a}\r\n"))
            .unwrap_or_default();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\n{auth}Content-Type: application/vnd.schemaregistry.v1+json\r\n\
             Accept: application/vnd.schemaregistry.v1+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.authority,
            body.len()
        );
        let response = match &self.tls {
            None if self.https => {
                return Err(Error::fatal(format!(
                    "schema registry {}: no TLS configuration",
                    self.url
                )))
            }
            None => exchange(tcp, &request).await.map_err(io)?,
            Some(tls) => {
                let name =
                    rustls::pki_types::ServerName::try_from(self.host.clone()).map_err(|e| {
                        Error::operator(format!(
                            "schema registry {}: not a TLS server name",
                            self.url
                        ))
                        .with_source(e)
                    })?;
                let stream = tls.connect(name, tcp).await.map_err(|e| {
                    // A certificate the CA does not vouch for will not change by retrying.
                    let kind = if e.to_string().contains("certificate") {
                        Error::operator
                    } else {
                        Error::transient
                    };
                    kind(format!("schema registry {}: TLS handshake", self.url))
                        .with_source(e)
                        .with_hint("check kafka.schema_registry_ca")
                })?;
                exchange(stream, &request).await.map_err(io)?
            }
        };
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

/// Send `request`, read the whole answer.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    request: &str,
) -> std::io::Result<Vec<u8>> {
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    match stream.read_to_end(&mut response).await {
        Ok(_) => Ok(response),
        // Servers that close TLS without close_notify: what arrived is the answer.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !response.is_empty() => {
            Ok(response)
        }
        Err(e) => Err(e),
    }
}

/// A TLS connector that trusts the CAs in `ca` (PEM), or the system's bundle.
fn connector(ca: Option<&std::path::Path>) -> Result<tokio_rustls::TlsConnector, Error> {
    let path = ca.unwrap_or(std::path::Path::new(SYSTEM_CA_BUNDLE));
    let what = if ca.is_some() {
        "kafka.schema_registry_ca"
    } else {
        "the system CA bundle"
    };
    let pem = std::fs::read(path).map_err(|e| {
        Error::operator(format!("reading {what} {}", path.display()))
            .with_source(e)
            .with_hint("set kafka.schema_registry_ca to the PEM file of the registry's CA")
    })?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        let cert = cert.map_err(|e| {
            Error::operator(format!("parsing {what} {}", path.display())).with_source(e)
        })?;
        // A bundle may hold certificates rustls does not take; the rest still count.
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err(Error::operator(format!(
            "{what} {} holds no usable PEM certificate",
            path.display()
        )));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::fatal("initialising TLS").with_source(e))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
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
        assert!(Registry::new("ftp://reg").is_err());
    }

    #[test]
    fn dechunks_bodies() {
        assert_eq!(
            dechunk("4\r\n{\"id\r\n3\r\n\":1\r\n1\r\n}\r\n0\r\n\r\n"),
            "{\"id\":1}"
        );
    }
}
