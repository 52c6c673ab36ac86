//! The replication connection: startup with `replication=database`, authentication
//! (trust, cleartext, md5, SCRAM-SHA-256), TLS, the simple query protocol, and the
//! CopyBoth stream of XLogData and keepalives. Built on tokio and `postgres-protocol`
//! because tokio-postgres cannot speak the replication protocol (DESIGN §4).
//!
//! Only `flush` in a standby status update moves the slot's `confirmed_flush_lsn`; the
//! stage decides what to report (see `super::progress`).

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::{self, sasl};
use postgres_protocol::message::backend::{self, ErrorResponseBody, Header};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::error::{sqlstate_kind, Error, ErrorKind};
use crate::lsn::Lsn;
use crate::pg::PgUrl;
use crate::timestamp::PgTimestamp;

/// CopyBothResponse; `backend::Message::parse` does not know it.
const COPY_BOTH_RESPONSE: u8 = b'W';
const XLOG_DATA: u8 = b'w';
const PRIMARY_KEEPALIVE: u8 = b'k';
const STANDBY_STATUS_UPDATE: u8 = b'r';
/// Frames larger than this are refused rather than buffered (pgoutput sends one
/// message per change; a single row is at most 1 GB per field in PostgreSQL).
const MAX_FRAME: usize = 1 << 30;

/// Settings that make the server's text output of values stable and unambiguous.
/// Intervals print as ISO 8601 durations (`P1Y2M3DT4H5M6.5S`): exact, accepted back by
/// PostgreSQL's input, and the form of Debezium's lossless `interval.handling.mode=string`.
const SESSION_OPTIONS: &str = "-c DateStyle=ISO -c IntervalStyle=iso_8601 -c TimeZone=UTC \
     -c extra_float_digits=1 -c bytea_output=hex -c client_encoding=UTF8 -c lc_monetary=C";

use crate::pg::raw::{negotiate_tls, Stream};

/// A connection in replication mode, before or after START_REPLICATION.
pub struct ReplicationConn {
    stream: Box<dyn Stream>,
    /// `tls-server-end-point` data for SCRAM-SHA-256-PLUS, when on TLS.
    channel_binding: Option<Vec<u8>>,
    read: BytesMut,
    write: BytesMut,
    url: PgUrl,
    /// `server_version_num`-style number (e.g. 150004), from ParameterStatus.
    pub server_version: u32,
}

/// What IDENTIFY_SYSTEM reports.
#[derive(Debug, Clone)]
pub struct SystemId {
    pub system_id: String,
    pub timeline: u32,
    pub xlogpos: Lsn,
    pub dbname: String,
}

/// One message of the CopyBoth stream.
#[derive(Debug)]
pub enum ReplicationMessage {
    XLogData {
        wal_start: Lsn,
        wal_end: Lsn,
        payload: Bytes,
    },
    Keepalive {
        wal_end: Lsn,
        reply_requested: bool,
    },
}

/// A row of a simple-query result, as text.
pub type TextRow = Vec<Option<String>>;

enum Incoming {
    Message(backend::Message),
    CopyBoth,
}

impl ReplicationConn {
    /// Connect, negotiate TLS as `sslmode` says, and authenticate.
    pub async fn connect(url: &PgUrl) -> Result<Self, Error> {
        Self::connect_decoding(url, None).await
    }

    /// [`connect`](Self::connect), for the session that decodes the slot: with
    /// `logical_decoding_work_mem` set to `work_mem_kb` when given, so a transaction
    /// larger than the server's setting is decoded in memory up to that size instead of
    /// being spilled to the EHR's disk and read back.
    pub async fn connect_decoding(url: &PgUrl, work_mem_kb: Option<u64>) -> Result<Self, Error> {
        let addr = format!("{}:{}", url.host, url.port);
        let timeout = url.connect_timeout.unwrap_or(Duration::from_secs(10));
        let tcp = match tokio::time::timeout(timeout, TcpStream::connect(&addr)).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => {
                return Err(
                    Error::transient(format!("connecting to {url} (replication)"))
                        .with_source(e)
                        .with_hint("is the server running and reachable at that host and port?"),
                )
            }
            Err(_) => {
                return Err(Error::transient(format!(
                    "connecting to {url} (replication): no answer within {}s",
                    timeout.as_secs()
                )))
            }
        };
        let _ = tcp.set_nodelay(true);
        let (stream, channel_binding) = negotiate_tls(tcp, url).await?;
        let mut conn = ReplicationConn {
            stream,
            channel_binding,
            read: BytesMut::with_capacity(64 * 1024),
            write: BytesMut::with_capacity(1024),
            url: url.clone(),
            server_version: 0,
        };
        conn.startup(work_mem_kb).await?;
        Ok(conn)
    }

    async fn startup(&mut self, work_mem_kb: Option<u64>) -> Result<(), Error> {
        let app = self
            .url
            .application_name
            .clone()
            .unwrap_or_else(|| "pgferry".into());
        let options = match work_mem_kb {
            Some(kb) => format!("{SESSION_OPTIONS} -c logical_decoding_work_mem={kb}kB"),
            None => SESSION_OPTIONS.to_string(),
        };
        let params = [
            ("user", self.url.user.as_str()),
            ("database", self.url.dbname.as_str()),
            ("replication", "database"),
            ("application_name", app.as_str()),
            ("options", options.as_str()),
        ];
        frontend::startup_message(params.iter().copied(), &mut self.write)
            .map_err(|e| self.io_error(e))?;
        self.flush().await?;
        let mut scram: Option<sasl::ScramSha256> = None;
        loop {
            let msg = match self.recv().await? {
                Incoming::Message(m) => m,
                Incoming::CopyBoth => return Err(self.protocol("CopyBothResponse during startup")),
            };
            match msg {
                backend::Message::AuthenticationOk => {}
                backend::Message::AuthenticationCleartextPassword
                | backend::Message::AuthenticationMd5Password(_)
                    if self.url.channel_binding_required =>
                {
                    return Err(Error::operator(format!(
                        "{}: channel_binding=require, but the server asks for a password without SCRAM; \
                         pgferry does not send it",
                        self.url
                    ))
                    .with_hint("make the role's pg_hba.conf method scram-sha-256, or drop channel_binding=require"));
                }
                backend::Message::AuthenticationCleartextPassword
                | backend::Message::AuthenticationMd5Password(_)
                    if crate::pg::raw::guard_password(&self.url) =>
                {
                    return Err(crate::pg::raw::unverified_password_error(&self.url));
                }
                backend::Message::AuthenticationCleartextPassword => {
                    let pw = self.password()?;
                    frontend::password_message(pw.as_bytes(), &mut self.write)
                        .map_err(|e| self.io_error(e))?;
                    self.flush().await?;
                }
                backend::Message::AuthenticationMd5Password(body) => {
                    let pw = self.password()?;
                    let hash = authentication::md5_hash(
                        self.url.user.as_bytes(),
                        pw.as_bytes(),
                        body.salt(),
                    );
                    frontend::password_message(hash.as_bytes(), &mut self.write)
                        .map_err(|e| self.io_error(e))?;
                    self.flush().await?;
                }
                backend::Message::AuthenticationSasl(body) => {
                    let mut mechanisms = body.mechanisms();
                    let (mut has_scram, mut has_plus) = (false, false);
                    while let Some(m) = mechanisms.next().map_err(|e| self.io_error(e))? {
                        has_scram |= m == sasl::SCRAM_SHA_256;
                        has_plus |= m == sasl::SCRAM_SHA_256_PLUS;
                    }
                    if !has_scram && !has_plus {
                        return Err(Error::operator(format!(
                            "{}: the server offers no SASL mechanism pgferry supports (SCRAM-SHA-256)",
                            self.url
                        )));
                    }
                    let pw = self.password()?;
                    // Bind the exchange to the TLS session when the server can
                    // (SCRAM-SHA-256-PLUS); on TLS without it, say so ("y"), which
                    // lets the server detect a downgrade by a man in the middle.
                    if self.url.channel_binding_required
                        && (!has_plus || self.channel_binding.is_none())
                    {
                        return Err(Error::operator(format!(
                            "{}: channel_binding=require, but the server offers no SCRAM-SHA-256-PLUS over this connection",
                            self.url
                        ))
                        .with_hint("use TLS (sslmode=require or stricter) and a scram-sha-256 role, or drop channel_binding=require"));
                    }
                    let (mechanism, binding) = match &self.channel_binding {
                        Some(hash) if has_plus => (
                            sasl::SCRAM_SHA_256_PLUS,
                            sasl::ChannelBinding::tls_server_end_point(hash.clone()),
                        ),
                        Some(_) => (sasl::SCRAM_SHA_256, sasl::ChannelBinding::unrequested()),
                        None => (sasl::SCRAM_SHA_256, sasl::ChannelBinding::unsupported()),
                    };
                    let s = sasl::ScramSha256::new(pw.as_bytes(), binding);
                    frontend::sasl_initial_response(mechanism, s.message(), &mut self.write)
                        .map_err(|e| self.io_error(e))?;
                    scram = Some(s);
                    self.flush().await?;
                }
                backend::Message::AuthenticationSaslContinue(body) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| self.protocol("SASL continue without SASL start"))?;
                    s.update(body.data()).map_err(|e| self.auth_error(e))?;
                    frontend::sasl_response(s.message(), &mut self.write)
                        .map_err(|e| self.io_error(e))?;
                    self.flush().await?;
                }
                backend::Message::AuthenticationSaslFinal(body) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| self.protocol("SASL final without SASL start"))?;
                    s.finish(body.data()).map_err(|e| self.auth_error(e))?;
                }
                backend::Message::ParameterStatus(body) => {
                    let name = body.name().map_err(|e| self.io_error(e))?;
                    if name == "server_version" {
                        self.server_version =
                            parse_server_version(body.value().map_err(|e| self.io_error(e))?);
                    }
                }
                backend::Message::BackendKeyData(_) | backend::Message::NoticeResponse(_) => {}
                backend::Message::ReadyForQuery(_) => return Ok(()),
                backend::Message::ErrorResponse(body) => {
                    return Err(self.server_error("authenticating", &body))
                }
                backend::Message::AuthenticationGss
                | backend::Message::AuthenticationKerberosV5
                | backend::Message::AuthenticationScmCredential
                | backend::Message::AuthenticationSspi => {
                    return Err(Error::operator(format!(
                        "{}: the server asks for an authentication method pgferry does not support",
                        self.url
                    ))
                    .with_hint(
                        "use trust, password, md5 or scram-sha-256 in pg_hba.conf for this role",
                    ))
                }
                _ => return Err(self.protocol("unexpected message during startup")),
            }
        }
    }

    fn password(&self) -> Result<String, Error> {
        self.url.password.clone().ok_or_else(|| {
            Error::operator(format!("{}: the server asks for a password but none is configured", self.url))
                .with_hint("put the password in the URL (postgres://user:${PASSWORD}@host/db) or set PGPASSWORD")
        })
    }

    /// Run a command with the simple query protocol and return its rows as text.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<TextRow>, Error> {
        frontend::query(sql, &mut self.write).map_err(|e| self.io_error(e))?;
        self.flush().await?;
        let mut rows = Vec::new();
        let mut failure = None;
        loop {
            match self.recv().await? {
                Incoming::CopyBoth => return Err(self.protocol("unexpected CopyBothResponse")),
                Incoming::Message(msg) => match msg {
                    backend::Message::DataRow(body) => {
                        let buf = body.buffer();
                        let mut row = Vec::new();
                        let mut ranges = body.ranges();
                        while let Some(range) = ranges.next().map_err(|e| self.io_error(e))? {
                            row.push(range.map(|r| String::from_utf8_lossy(&buf[r]).into_owned()));
                        }
                        rows.push(row);
                    }
                    backend::Message::ErrorResponse(body) => {
                        failure =
                            Some(self.server_error(&format!("running {}", first_word(sql)), &body))
                    }
                    backend::Message::ReadyForQuery(_) => {
                        return match failure {
                            Some(e) => Err(e),
                            None => Ok(rows),
                        }
                    }
                    _ => {}
                },
            }
        }
    }

    pub async fn identify_system(&mut self) -> Result<SystemId, Error> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        let row = rows
            .first()
            .ok_or_else(|| self.protocol("IDENTIFY_SYSTEM returned no row"))?;
        let col = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
        Ok(SystemId {
            system_id: col(0),
            timeline: col(1).parse().unwrap_or(0),
            xlogpos: col(2).parse().unwrap_or_default(),
            dbname: col(3),
        })
    }

    /// `CREATE_REPLICATION_SLOT … LOGICAL pgoutput`; returns the consistent point.
    pub async fn create_slot(&mut self, slot: &str) -> Result<Lsn, Error> {
        let sql = format!("CREATE_REPLICATION_SLOT {slot} LOGICAL pgoutput NOEXPORT_SNAPSHOT");
        let rows = self.simple_query(&sql).await?;
        let point = rows
            .first()
            .and_then(|r| r.get(1).cloned().flatten())
            .ok_or_else(|| self.protocol("CREATE_REPLICATION_SLOT returned no consistent point"))?;
        point
            .parse()
            .map_err(|e| self.protocol(&format!("CREATE_REPLICATION_SLOT: {e}")))
    }

    /// Create the slot and export its snapshot: returns the consistent point and the
    /// snapshot's name, which other sessions can import while this connection stays
    /// idle (DESIGN §4).
    pub async fn create_slot_exported(&mut self, slot: &str) -> Result<(Lsn, String), Error> {
        let sql = format!("CREATE_REPLICATION_SLOT {slot} LOGICAL pgoutput EXPORT_SNAPSHOT");
        let rows = self.simple_query(&sql).await?;
        let row = rows
            .first()
            .ok_or_else(|| self.protocol("CREATE_REPLICATION_SLOT returned no row"))?;
        let point: Lsn = row
            .get(1)
            .cloned()
            .flatten()
            .ok_or_else(|| self.protocol("CREATE_REPLICATION_SLOT returned no consistent point"))?
            .parse()
            .map_err(|e| self.protocol(&format!("CREATE_REPLICATION_SLOT: {e}")))?;
        let name = row
            .get(2)
            .cloned()
            .flatten()
            .ok_or_else(|| self.protocol("CREATE_REPLICATION_SLOT exported no snapshot"))?;
        Ok((point, name))
    }

    /// `START_REPLICATION` with pgoutput v1 and logical messages; switches to CopyBoth.
    pub async fn start_replication(
        &mut self,
        slot: &str,
        start: Lsn,
        publication: &str,
    ) -> Result<(), Error> {
        // publication_names is parsed as an identifier list: quote it.
        let pub_ident = format!("\"{}\"", publication.replace('"', "\"\"")).replace('\'', "''");
        let sql = format!(
            "START_REPLICATION SLOT {slot} LOGICAL {start} \
             (proto_version '1', publication_names '{pub_ident}', messages 'true')"
        );
        frontend::query(&sql, &mut self.write).map_err(|e| self.io_error(e))?;
        self.flush().await?;
        loop {
            match self.recv().await? {
                Incoming::CopyBoth => return Ok(()),
                Incoming::Message(backend::Message::ErrorResponse(body)) => {
                    let err = self.server_error("starting replication", &body);
                    // Drain to ReadyForQuery so the connection could be reused.
                    let _ = self.until_ready().await;
                    return Err(err);
                }
                Incoming::Message(backend::Message::NoticeResponse(_)) => {}
                Incoming::Message(_) => {
                    return Err(self.protocol("unexpected reply to START_REPLICATION"))
                }
            }
        }
    }

    async fn until_ready(&mut self) -> Result<(), Error> {
        loop {
            if let Incoming::Message(backend::Message::ReadyForQuery(_)) = self.recv().await? {
                return Ok(());
            }
        }
    }

    /// The next XLogData or keepalive. Cancel-safe: a message is only consumed from
    /// the buffer once it is complete.
    pub async fn next_message(&mut self) -> Result<ReplicationMessage, Error> {
        loop {
            match self.recv().await? {
                Incoming::Message(backend::Message::CopyData(body)) => {
                    return parse_copy_data(body.into_bytes()).map_err(|m| self.protocol(&m));
                }
                Incoming::Message(backend::Message::CopyDone) => {
                    return Err(Error::transient(format!(
                        "{}: the server ended the replication stream",
                        self.url
                    )))
                }
                Incoming::Message(backend::Message::ErrorResponse(body)) => {
                    return Err(self.server_error("streaming", &body))
                }
                Incoming::Message(backend::Message::NoticeResponse(_))
                | Incoming::Message(backend::Message::ParameterStatus(_)) => {}
                // A server shutting down ends the stream with CommandComplete (and
                // ReadyForQuery) after CopyDone: the stream is over, reconnect.
                Incoming::Message(backend::Message::CommandComplete(_))
                | Incoming::Message(backend::Message::ReadyForQuery(_)) => {
                    return Err(Error::transient(format!(
                        "{}: the server ended the replication stream",
                        self.url
                    )))
                }
                Incoming::Message(_) | Incoming::CopyBoth => {
                    return Err(self.protocol("unexpected message in the replication stream"))
                }
            }
        }
    }

    /// Send a standby status update. `flush` is what the slot may be confirmed to.
    pub async fn send_status(
        &mut self,
        write: Lsn,
        flush: Lsn,
        reply_requested: bool,
    ) -> Result<(), Error> {
        self.write.put_u8(b'd');
        self.write.put_i32(4 + 1 + 8 * 4 + 1);
        self.write.put_u8(STANDBY_STATUS_UPDATE);
        self.write.put_u64(write.0);
        self.write.put_u64(flush.0);
        self.write.put_u64(flush.0);
        self.write.put_i64(PgTimestamp::now().0);
        self.write.put_u8(u8::from(reply_requested));
        self.flush().await
    }

    /// Close a connection that is not streaming (after `IDENTIFY_SYSTEM`, or the
    /// exporter of a snapshot): `Terminate` alone. (`finish` would wait 5 s for an
    /// answer to a CopyDone that an idle connection never gives.)
    pub async fn close(mut self) {
        frontend::terminate(&mut self.write);
        let _ = self.flush().await;
    }

    /// End the CopyBoth stream politely (after a final status update).
    pub async fn finish(mut self) -> Result<(), Error> {
        frontend::copy_done(&mut self.write);
        self.flush().await?;
        // The server answers with CopyDone, CommandComplete(s) and ReadyForQuery; data
        // still in flight may come first. Bounded wait: we are shutting down anyway.
        let drain = async {
            loop {
                if let Incoming::Message(backend::Message::ReadyForQuery(_)) = self.recv().await? {
                    return Ok::<(), Error>(());
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
        frontend::terminate(&mut self.write);
        let _ = self.flush().await;
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), Error> {
        let buf = self.write.split();
        self.stream
            .write_all(&buf)
            .await
            .map_err(|e| self.io_error(e))?;
        self.stream.flush().await.map_err(|e| self.io_error(e))
    }

    async fn recv(&mut self) -> Result<Incoming, Error> {
        loop {
            if let Some(header) = Header::parse(&self.read).map_err(|e| self.io_error(e))? {
                let len = header.len() as usize + 1;
                if len > MAX_FRAME {
                    return Err(
                        self.protocol(&format!("a {len}-byte message exceeds the 1 GiB limit"))
                    );
                }
                if self.read.len() >= len {
                    if header.tag() == COPY_BOTH_RESPONSE {
                        self.read.advance(len);
                        return Ok(Incoming::CopyBoth);
                    }
                    match backend::Message::parse(&mut self.read).map_err(|e| self.io_error(e))? {
                        Some(m) => return Ok(Incoming::Message(m)),
                        None => return Err(self.protocol("incomplete message")),
                    }
                }
                self.read.reserve(len - self.read.len());
            } else {
                self.read.reserve(64 * 1024);
            }
            let n = self
                .stream
                .read_buf(&mut self.read)
                .await
                .map_err(|e| self.io_error(e))?;
            if n == 0 {
                return Err(Error::transient(format!(
                    "{}: the server closed the replication connection",
                    self.url
                )));
            }
        }
    }

    fn io_error(&self, e: std::io::Error) -> Error {
        Error::transient(format!("{}: replication connection", self.url)).with_source(e)
    }

    fn protocol(&self, what: &str) -> Error {
        Error::fatal(format!("{}: replication protocol error: {what}", self.url))
    }

    fn auth_error(&self, e: std::io::Error) -> Error {
        Error::operator(format!("{}: SCRAM authentication failed", self.url)).with_source(e)
    }

    fn server_error(&self, doing: &str, body: &ErrorResponseBody) -> Error {
        let mut code = String::new();
        let mut message = String::new();
        let mut detail = None;
        let mut hint = None;
        let mut fields = body.fields();
        while let Ok(Some(f)) = fields.next() {
            let value = String::from_utf8_lossy(f.value_bytes()).into_owned();
            match f.type_() {
                b'C' => code = value,
                b'M' => message = value,
                b'D' => detail = Some(value),
                b'H' => hint = Some(value),
                _ => {}
            }
        }
        let kind = sqlstate_kind(&code);
        let mut text = format!("{}: {doing}: {message} (SQLSTATE {code})", self.url);
        if let Some(d) = detail {
            text.push_str(&format!("; {d}"));
        }
        let mut err = Error::new(kind, text);
        if let Some(h) = hint {
            err = err.with_hint(h);
        } else if kind == ErrorKind::Operator && code.starts_with("28") {
            err = err
                .with_hint("check the user and password in the URL, and pg_hba.conf on the server");
        }
        err
    }
}

fn parse_copy_data(mut data: Bytes) -> Result<ReplicationMessage, String> {
    if data.is_empty() {
        return Err("empty CopyData".into());
    }
    match data.get_u8() {
        XLOG_DATA => {
            if data.len() < 24 {
                return Err("truncated XLogData header".into());
            }
            let wal_start = Lsn(data.get_u64());
            let wal_end = Lsn(data.get_u64());
            let _server_clock = data.get_i64();
            Ok(ReplicationMessage::XLogData {
                wal_start,
                wal_end,
                payload: data,
            })
        }
        PRIMARY_KEEPALIVE => {
            if data.len() < 17 {
                return Err("truncated keepalive".into());
            }
            let wal_end = Lsn(data.get_u64());
            let _server_clock = data.get_i64();
            Ok(ReplicationMessage::Keepalive {
                wal_end,
                reply_requested: data.get_u8() != 0,
            })
        }
        other => Err(format!("unknown CopyData message {:?}", other as char)),
    }
}

/// "15.4 (Debian 15.4-1)" -> 150004; "9.6.3" -> 90603.
fn parse_server_version(v: &str) -> u32 {
    let mut parts = v
        .split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let major = parts.next().unwrap_or(0);
    let minor = parts.next().unwrap_or(0);
    if major >= 10 {
        major * 10000 + minor
    } else {
        major * 10000 + minor * 100 + parts.next().unwrap_or(0)
    }
}

fn first_word(sql: &str) -> &str {
    sql.split_whitespace().next().unwrap_or(sql)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_xlogdata_and_keepalive() {
        let mut b = BytesMut::new();
        b.put_u8(b'w');
        b.put_u64(0x10);
        b.put_u64(0x20);
        b.put_i64(0);
        b.put_slice(b"BODY");
        match parse_copy_data(b.freeze()).unwrap() {
            ReplicationMessage::XLogData {
                wal_start,
                wal_end,
                payload,
            } => {
                assert_eq!((wal_start, wal_end), (Lsn(0x10), Lsn(0x20)));
                assert_eq!(&payload[..], b"BODY");
            }
            other => panic!("{other:?}"),
        }
        let mut b = BytesMut::new();
        b.put_u8(b'k');
        b.put_u64(0x30);
        b.put_i64(0);
        b.put_u8(1);
        assert!(matches!(
            parse_copy_data(b.freeze()).unwrap(),
            ReplicationMessage::Keepalive {
                wal_end: Lsn(0x30),
                reply_requested: true
            }
        ));
    }

    #[test]
    fn rejects_truncated_frames() {
        assert!(parse_copy_data(Bytes::from_static(b"")).is_err());
        assert!(parse_copy_data(Bytes::from_static(b"w\0\0")).is_err());
        assert!(parse_copy_data(Bytes::from_static(b"k\0")).is_err());
        assert!(parse_copy_data(Bytes::from_static(b"x")).is_err());
    }

    #[test]
    fn parses_server_versions() {
        assert_eq!(
            parse_server_version("15.4 (Debian 15.4-1.pgdg120+1)"),
            150004
        );
        assert_eq!(parse_server_version("16beta1"), 160001);
        assert_eq!(parse_server_version("9.6.3"), 90603);
    }
}
