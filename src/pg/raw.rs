//! Raw connection pieces shared by the replication connection (which speaks the wire
//! protocol itself) and the normal connections' password guard: TLS negotiation as
//! libpq's `sslmode` says, and a look at which password method the server asks for.
//!
//! The guard: over a connection that does not verify the server (`sslmode` below
//! `verify-ca`), a man in the middle could be the one asking. A cleartext password
//! would be handed to it, and an md5 hash is as good as the password for logging in.
//! So pgferry sends neither there unless the URL says `unverified_password=allow`;
//! SCRAM (which never reveals the password, and with channel binding ties it to the
//! session) is always fine.

use bytes::BytesMut;
use postgres_protocol::message::{backend, frontend};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{tls, PgUrl, SslMode};
use crate::error::Error;

pub(crate) trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// The stream, and the TLS channel binding data when TLS is on.
pub(crate) async fn negotiate_tls(
    mut tcp: TcpStream,
    url: &PgUrl,
) -> Result<(Box<dyn Stream>, Option<Vec<u8>>), Error> {
    if url.sslmode == SslMode::Disable {
        return Ok((Box::new(tcp), None));
    }
    let mut buf = BytesMut::new();
    frontend::ssl_request(&mut buf);
    let io = |e: std::io::Error| Error::transient(format!("{url}: TLS negotiation")).with_source(e);
    tcp.write_all(&buf).await.map_err(io)?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.map_err(io)?;
    match answer[0] {
        b'S' => {
            let connector = tokio_rustls::TlsConnector::from(tls::client_config(url)?);
            // Read ahead under TLS, as tokio-postgres's connections do (tls.rs).
            let buffered = tokio::io::BufReader::with_capacity(tls::READ_AHEAD, tcp);
            let tls = connector
                .connect(tls::server_name(&url.host)?, buffered)
                .await
                .map_err(|e| {
                    Error::operator(format!("{url}: TLS handshake failed (sslmode)")).with_source(e)
                })?;
            let binding = tls::server_end_point(tls.get_ref().1);
            Ok((Box::new(tls), binding))
        }
        b'N' if url.sslmode == SslMode::Prefer => Ok((Box::new(tcp), None)),
        b'N' => Err(Error::operator(format!(
            "{url}: the server does not accept TLS connections but the URL asks for sslmode that needs TLS"
        ))
        .with_hint("enable ssl on the server or use sslmode=prefer/disable")),
        other => Err(Error::fatal(format!("{url}: unexpected answer {other:?} to the TLS request"))),
    }
}

/// Whether a password must not go out as cleartext or md5 on `url`.
pub fn guard_password(url: &PgUrl) -> bool {
    url.password.is_some()
        && !matches!(url.sslmode, SslMode::VerifyCa | SslMode::VerifyFull)
        && !url.unverified_password_allowed
}

pub fn unverified_password_error(url: &PgUrl) -> Error {
    Error::operator(format!(
        "{url}: the server asks for a cleartext or md5 password, and this connection does not verify \
         the server (sslmode={}); pgferry did not send it",
        url.sslmode.as_str()
    ))
    .with_hint(
        "use sslmode=verify-full with sslrootcert, or a scram-sha-256 role; or add unverified_password=allow \
         to the URL to send it anyway",
    )
}

/// Before a normal connection hands the password to tokio-postgres: ask the server
/// which method it wants (a startup, read up to the authentication request, close),
/// and refuse cleartext and md5 where [`guard_password`] says so.
pub async fn check_password_method(url: &PgUrl) -> Result<(), Error> {
    if !guard_password(url) {
        return Ok(());
    }
    let addr = format!("{}:{}", url.host, url.port);
    let timeout = url
        .connect_timeout
        .unwrap_or(std::time::Duration::from_secs(10));
    let Ok(Ok(tcp)) = tokio::time::timeout(timeout, TcpStream::connect(&addr)).await else {
        return Ok(()); // the real connection reports it
    };
    let Ok((mut stream, _)) = negotiate_tls(tcp, url).await else {
        return Ok(());
    };
    let mut buf = BytesMut::new();
    let params = [
        ("user", url.user.as_str()),
        ("database", url.dbname.as_str()),
        ("application_name", "pgferry"),
    ];
    if frontend::startup_message(params.iter().copied(), &mut buf).is_err()
        || stream.write_all(&buf).await.is_err()
    {
        return Ok(());
    }
    let mut read = BytesMut::with_capacity(1024);
    let asks = loop {
        match backend::Message::parse(&mut read) {
            Ok(Some(backend::Message::AuthenticationCleartextPassword))
            | Ok(Some(backend::Message::AuthenticationMd5Password(_))) => break true,
            Ok(Some(_)) | Err(_) => break false,
            Ok(None) => {
                let read_more = tokio::time::timeout(timeout, stream.read_buf(&mut read)).await;
                if !matches!(read_more, Ok(Ok(n)) if n > 0) {
                    break false;
                }
            }
        }
    };
    drop(stream);
    if asks {
        return Err(unverified_password_error(url));
    }
    Ok(())
}
