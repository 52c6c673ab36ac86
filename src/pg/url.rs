//! `PgUrl`: a parsed `postgres://` connection URL, shared by every connection pgferry
//! opens (replication, catalog, target). We parse it ourselves because tokio-postgres
//! does not know `sslmode=verify-ca|verify-full` or `sslrootcert`.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// libpq's `sslmode` values that pgferry supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plain TCP.
    Disable,
    /// TLS if the server offers it, else plain (libpq's default).
    Prefer,
    /// TLS, certificate not checked.
    Require,
    /// TLS, certificate chain checked against `sslrootcert`, host name not checked.
    VerifyCa,
    /// TLS, chain and host name checked.
    VerifyFull,
}

impl SslMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "disable" => Self::Disable,
            "prefer" | "allow" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            _ => return None,
        })
    }
}

#[derive(Clone, PartialEq, Eq)]
pub struct PgUrl {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub dbname: String,
    pub sslmode: SslMode,
    /// CA certificates (PEM) for `verify-ca` / `verify-full`.
    pub sslrootcert: Option<PathBuf>,
    pub application_name: Option<String>,
    pub connect_timeout: Option<Duration>,
    /// `channel_binding=require`: SCRAM must be bound to the TLS session
    /// (SCRAM-SHA-256-PLUS), as libpq's option of that name. Default `prefer`: bound
    /// whenever the server offers it.
    pub channel_binding_required: bool,
    /// `unverified_password=allow`: send a cleartext or md5 password even where the
    /// server is not verified (see `raw::guard_password`).
    pub unverified_password_allowed: bool,
}

/// What is wrong with a connection URL (never includes the password).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UrlError(String);

impl PgUrl {
    pub fn parse(text: &str) -> Result<Self, UrlError> {
        let err = |m: &str| UrlError(m.to_string());
        let rest = text
            .strip_prefix("postgres://")
            .or_else(|| text.strip_prefix("postgresql://"))
            .ok_or_else(|| err("a connection URL must start with postgres:// or postgresql://"))?;
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.split_once('/') {
            Some((a, p)) => (a, p),
            None => (rest, ""),
        };
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (user, password) = match userinfo {
            Some(u) => match u.split_once(':') {
                Some((user, pw)) => (Some(decode(user)?), Some(decode(pw)?)),
                None => (Some(decode(u)?), None),
            },
            None => (None, None),
        };
        let (host, port) = split_host_port(hostport)?;
        let user = match user.filter(|u| !u.is_empty()) {
            Some(u) => u,
            None => std::env::var("PGUSER")
                .or_else(|_| std::env::var("USER"))
                .map_err(|_| err("the URL names no user (postgres://USER@host/db)"))?,
        };
        let dbname = match decode(path)? {
            d if d.is_empty() => user.clone(),
            d => d,
        };
        let mut url = PgUrl {
            host,
            port,
            user,
            password: password.or_else(|| std::env::var("PGPASSWORD").ok()),
            dbname,
            sslmode: SslMode::Prefer,
            sslrootcert: None,
            application_name: None,
            connect_timeout: None,
            channel_binding_required: false,
            unverified_password_allowed: false,
        };
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = decode(v)?;
            match k {
                "sslmode" => {
                    url.sslmode = SslMode::parse(&v).ok_or_else(|| {
                        UrlError(format!(
                            "sslmode={v} is not supported: use disable, prefer, require, verify-ca or verify-full"
                        ))
                    })?
                }
                "sslrootcert" => url.sslrootcert = Some(PathBuf::from(v)),
                "unverified_password" => {
                    url.unverified_password_allowed = match v.as_str() {
                        "allow" => true,
                        "refuse" => false,
                        _ => {
                            return Err(UrlError(format!(
                                "unverified_password={v} is not supported: use allow or refuse"
                            )))
                        }
                    }
                }
                "channel_binding" => {
                    url.channel_binding_required = match v.as_str() {
                        "require" => true,
                        "prefer" | "disable" => false,
                        _ => {
                            return Err(UrlError(format!(
                                "channel_binding={v} is not supported: use prefer or require"
                            )))
                        }
                    }
                }
                "application_name" => url.application_name = Some(v),
                "connect_timeout" => {
                    let secs: u64 = v.parse().map_err(|_| {
                        UrlError(format!("connect_timeout={v} must be a whole number of seconds"))
                    })?;
                    url.connect_timeout = Some(Duration::from_secs(secs));
                }
                "user" => url.user = v,
                "password" => url.password = Some(v),
                "dbname" => url.dbname = v,
                "host" if v.starts_with('/') => {
                    return Err(err("Unix-domain sockets are not supported: use a TCP host name or address"))
                }
                "host" => url.host = v,
                "port" => {
                    url.port = v
                        .parse()
                        .map_err(|_| UrlError(format!("port={v} is not a port number")))?
                }
                other => {
                    return Err(UrlError(format!(
                        "unknown URL parameter {other:?}: pgferry understands sslmode, sslrootcert, \
                         application_name, connect_timeout, user, password, dbname, host, port"
                    )))
                }
            }
        }
        if matches!(url.sslmode, SslMode::VerifyCa | SslMode::VerifyFull)
            && url.sslrootcert.is_none()
        {
            let home_cert = std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".postgresql/root.crt"))
                .filter(|p| p.exists());
            url.sslrootcert = home_cert;
            if url.sslrootcert.is_none() {
                return Err(err(
                    "sslmode=verify-ca/verify-full needs the CA certificate: add sslrootcert=/path/to/ca.crt to the URL",
                ));
            }
        }
        Ok(url)
    }

    /// The same connection as a tokio-postgres config. TLS verification itself is done
    /// by the connector built from this URL (see [`super::tls`]).
    pub fn tokio_config(&self) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host(&self.host)
            .port(self.port)
            .user(&self.user)
            .dbname(&self.dbname);
        if let Some(pw) = &self.password {
            c.password(pw);
        }
        c.ssl_mode(match self.sslmode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });
        c.application_name(self.application_name.as_deref().unwrap_or("pgferry"));
        c.channel_binding(if self.channel_binding_required {
            tokio_postgres::config::ChannelBinding::Require
        } else {
            tokio_postgres::config::ChannelBinding::Prefer
        });
        // "already exists, skipping" notices of idempotent DDL are not news.
        c.options("-c client_min_messages=warning");
        c.connect_timeout(self.connect_timeout.unwrap_or(Duration::from_secs(10)));
        c
    }
}

impl fmt::Display for PgUrl {
    /// The URL without its password, for messages and logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        write!(
            f,
            "postgres://{}@{host}:{}/{}",
            self.user, self.port, self.dbname
        )
    }
}

impl fmt::Debug for PgUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PgUrl({self})")
    }
}

fn split_host_port(hostport: &str) -> Result<(String, u16), UrlError> {
    let bad_port = |p: &str| UrlError(format!("{p:?} is not a port number"));
    if let Some(rest) = hostport.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| UrlError("unterminated [IPv6] host".into()))?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| bad_port(p))?,
            None => 5432,
        };
        return Ok((host.to_string(), port));
    }
    if hostport.contains(',') {
        return Err(UrlError(
            "several hosts in one URL are not supported: name one host".into(),
        ));
    }
    match hostport.rsplit_once(':') {
        Some((h, p)) => Ok((non_empty_host(h), p.parse().map_err(|_| bad_port(p))?)),
        None => Ok((non_empty_host(hostport), 5432)),
    }
}

fn non_empty_host(h: &str) -> String {
    if h.is_empty() {
        "localhost".into()
    } else {
        h.to_string()
    }
}

/// Percent-decoding of URL components.
fn decode(s: &str) -> Result<String, UrlError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| UrlError("invalid %-escape in the URL".into()))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out)
        .map_err(|_| UrlError("the URL is not valid UTF-8 after %-decoding".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_url() {
        let u = PgUrl::parse(
            "postgres://ehr%40x:p%2Fw@db.example:6543/ehr?sslmode=require&application_name=a",
        )
        .unwrap();
        assert_eq!(u.user, "ehr@x");
        assert_eq!(u.password.as_deref(), Some("p/w"));
        assert_eq!((u.host.as_str(), u.port), ("db.example", 6543));
        assert_eq!(u.dbname, "ehr");
        assert_eq!(u.sslmode, SslMode::Require);
        assert_eq!(u.to_string(), "postgres://ehr@x@db.example:6543/ehr");
    }

    #[test]
    fn defaults_port_db_and_sslmode() {
        let u = PgUrl::parse("postgresql://bob@[::1]").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.dbname.as_str()),
            ("::1", 5432, "bob")
        );
        assert_eq!(u.sslmode, SslMode::Prefer);
    }

    #[test]
    fn rejects_what_it_cannot_honour() {
        for bad in [
            "mysql://x@y/z",
            "postgres://x@y:notaport/z",
            "postgres://x@y/z?sslmode=sometimes",
            "postgres://x@y/z?frobnicate=1",
            "postgres://x@y,z/db",
        ] {
            assert!(PgUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn display_hides_the_password() {
        let u = PgUrl::parse("postgres://u:secret@h/d").unwrap();
        assert!(!u.to_string().contains("secret"));
        assert!(!format!("{u:?}").contains("secret"));
    }
}
