//! TLS for every PostgreSQL connection, with rustls, following libpq's `sslmode`:
//! `require` encrypts without checking the certificate, `verify-ca` checks the chain
//! against `sslrootcert`, `verify-full` also checks the host name.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite, BufStream, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};
use tokio_rustls::TlsConnector;

use super::url::{PgUrl, SslMode};
use crate::error::Error;

/// Build the rustls client configuration that `url.sslmode` asks for.
pub fn client_config(url: &PgUrl) -> Result<Arc<ClientConfig>, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::fatal("initialising TLS").with_source(e))?;
    let verifier: Arc<dyn ServerCertVerifier> = match url.sslmode {
        SslMode::Disable | SslMode::Prefer | SslMode::Require => Arc::new(NoVerification(provider)),
        SslMode::VerifyCa | SslMode::VerifyFull => {
            let roots = load_roots(url)?;
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| {
                    Error::operator(format!("loading CA certificates for {url}")).with_source(e)
                })?;
            if url.sslmode == SslMode::VerifyCa {
                Arc::new(ChainOnly(webpki))
            } else {
                webpki
            }
        }
    };
    let config = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

fn load_roots(url: &PgUrl) -> Result<RootCertStore, Error> {
    let path = url
        .sslrootcert
        .as_deref()
        .unwrap_or(std::path::Path::new(""));
    let pem = std::fs::read(path).map_err(|e| {
        Error::operator(format!("reading sslrootcert {} for {url}", path.display())).with_source(e)
    })?;
    let mut roots = RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        let cert = cert.map_err(|e| {
            Error::operator(format!("parsing sslrootcert {}", path.display())).with_source(e)
        })?;
        roots.add(cert).map_err(|e| {
            Error::operator(format!("using sslrootcert {}", path.display())).with_source(e)
        })?;
    }
    if roots.is_empty() {
        return Err(Error::operator(format!(
            "sslrootcert {} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(roots)
}

/// The `tls-server-end-point` channel binding data (RFC 5929) of a TLS connection: a
/// hash of the server's certificate, with the hash of the certificate's signature
/// algorithm (SHA-256 for MD5, SHA-1 and anything else, as PostgreSQL does). With it,
/// SCRAM-SHA-256-PLUS ties the password exchange to this TLS session, so a man in the
/// middle cannot relay it even where the certificate is not verified.
pub fn server_end_point(conn: &rustls::ClientConnection) -> Option<Vec<u8>> {
    let cert = conn.peer_certificates()?.first()?;
    let algorithm = match signature_algorithm(cert.as_ref()) {
        // sha384WithRSAEncryption, ecdsa-with-SHA384
        Some(oid)
            if oid == [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c]
                || oid == [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03] =>
        {
            &ring::digest::SHA384
        }
        // sha512WithRSAEncryption, ecdsa-with-SHA512
        Some(oid)
            if oid == [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d]
                || oid == [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04] =>
        {
            &ring::digest::SHA512
        }
        _ => &ring::digest::SHA256,
    };
    Some(
        ring::digest::digest(algorithm, cert.as_ref())
            .as_ref()
            .to_vec(),
    )
}

/// The OID of a DER certificate's `signatureAlgorithm`: Certificate ::= SEQUENCE {
/// tbsCertificate, signatureAlgorithm AlgorithmIdentifier, signature }.
fn signature_algorithm(der: &[u8]) -> Option<&[u8]> {
    /// (tag, content, rest) of one DER element.
    fn element(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, b) = b.split_first()?;
        let (&first, mut b) = b.split_first()?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || b.len() < n {
                return None;
            }
            let len = b[..n]
                .iter()
                .fold(0usize, |l, &x| (l << 8) | usize::from(x));
            b = &b[n..];
            len
        };
        (b.len() >= len).then(|| (tag, &b[..len], &b[len..]))
    }
    let (_, certificate, _) = element(der)?;
    let (_, _tbs, rest) = element(certificate)?;
    let (_, algorithm, _) = element(rest)?;
    let (tag, oid, _) = element(algorithm)?;
    (tag == 0x06).then_some(oid)
}

/// The server name rustls sends (SNI) and, for verify-full, checks.
pub fn server_name(host: &str) -> Result<ServerName<'static>, Error> {
    ServerName::try_from(host.to_string()).map_err(|e| {
        Error::operator(format!("{host:?} is not a valid TLS server name")).with_source(e)
    })
}

/// `sslmode=require`: encryption without authentication of the server, as in libpq.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `sslmode=verify-ca`: the chain must lead to a trusted root; the name may differ.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// tokio-postgres's TLS hook, backed by the same rustls configuration.
#[derive(Clone)]
pub struct MakeRustls {
    config: Arc<ClientConfig>,
}

impl MakeRustls {
    pub fn new(config: Arc<ClientConfig>) -> Self {
        MakeRustls { config }
    }
}

impl<S> MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, Error> {
        Ok(RustlsConnect {
            connector: TlsConnector::from(self.config.clone()),
            name: server_name(domain)?,
        })
    }
}

pub struct RustlsConnect {
    connector: TlsConnector,
    name: ServerName<'static>,
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let buffered = BufStream::with_capacity(READ_AHEAD, WRITE_BEHIND, stream);
            let tls = self.connector.connect(self.name, buffered).await?;
            Ok(RustlsStream(tls))
        })
    }
}

/// What one read from the socket may take. rustls asks for at most 4 KiB at a time, so
/// a COPY of a large table read 4 KiB per system call, several per TLS record; read
/// ahead, most of rustls's reads are served from memory.
pub(crate) const READ_AHEAD: usize = 64 << 10;

/// What the records rustls writes may gather before they go to the socket. tokio-postgres
/// writes at most 8 KiB at a time, and rustls sent each as a record of its own, one
/// system call each (a COPY into the target: 30,000 for 250 MB). Everything written is
/// sent when tokio-postgres flushes, which it does whenever it waits for the server;
/// rustls's handshake flushes too.
const WRITE_BEHIND: usize = 64 << 10;

pub struct RustlsStream<S>(tokio_rustls::client::TlsStream<BufStream<S>>);

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        match server_end_point(self.0.get_ref().1) {
            Some(hash) => ChannelBinding::tls_server_end_point(hash),
            None => ChannelBinding::none(),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}
