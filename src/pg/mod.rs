//! What every PostgreSQL connection of pgferry shares: the connection URL and TLS.
//! The source's replication connection and the sink's target connection both build on
//! this; neither depends on the other.

pub mod raw;
pub mod tls;
pub mod url;

use tokio_postgres::Client;

pub use url::{PgUrl, SslMode};

use crate::error::Error;

/// Open a normal (non-replication) connection and drive it on a background task.
pub async fn connect(url: &PgUrl, purpose: &str) -> Result<Client, Error> {
    raw::check_password_method(url)
        .await
        .map_err(|e| e.context(purpose))?;
    let tls = tls::MakeRustls::new(tls::client_config(url)?);
    let (client, connection) = url
        .tokio_config()
        .connect(tls)
        .await
        .map_err(|e| connect_error(url, purpose, e))?;
    let purpose = purpose.to_string();
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(%purpose, error = %e, "connection closed");
        }
    });
    Ok(client)
}

fn connect_error(url: &PgUrl, purpose: &str, e: tokio_postgres::Error) -> Error {
    let err = Error::postgres(format!("connecting to {url} ({purpose})"), e);
    match err.kind() {
        crate::error::ErrorKind::Transient if err.hint().is_none() => {
            err.with_hint("is the server running and reachable at that host and port?")
        }
        crate::error::ErrorKind::Operator if err.hint().is_none() => err.with_hint(
            "check the user, password and database in the URL, and pg_hba.conf on the server",
        ),
        _ => err,
    }
}
