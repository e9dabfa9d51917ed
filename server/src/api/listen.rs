//! The listeners' side of HTTP: the peer address of a connection, and the HTTPS listener with
//! the certificate resolver that lets its certificate be swapped (and answers ACME's
//! TLS-ALPN-01 validation handshakes).

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use downbeat_certs::CertifiedKey;
use downbeat_certs::acme::ACME_TLS_ALPN;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign;
use tokio_rustls::server::TlsStream;
use tracing::{debug, error};

/// TLS handshakes in progress at once on the HTTPS listener; past this, accepting waits.
const MAX_TLS_HANDSHAKES: usize = 256;

/// The peer address of an HTTP or HTTPS connection, for per-client rate limits.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ClientAddr(pub(crate) SocketAddr);

impl Connected<IncomingStream<'_, TcpListener>> for ClientAddr {
    fn connect_info(stream: IncomingStream<'_, TcpListener>) -> Self {
        Self(*stream.remote_addr())
    }
}

impl Connected<IncomingStream<'_, TlsListener>> for ClientAddr {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        Self(*stream.remote_addr())
    }
}

/// The HTTPS listener's certificate, swapped whole while the listener runs: every handshake
/// takes the one in place when it starts, so connections already open keep theirs.
///
/// A handshake that offers only the `acme-tls/1` protocol is ACME's TLS-ALPN-01 validation
/// (RFC 8737): it gets the challenge certificate for the name it asks for while one is set,
/// and nothing (the handshake fails) otherwise. Such a connection never reaches HTTP.
#[derive(Debug)]
pub(crate) struct CertResolver {
    current: RwLock<Arc<sign::CertifiedKey>>,
    challenge: RwLock<Option<(String, Arc<sign::CertifiedKey>)>>,
}

impl CertResolver {
    /// A resolver presenting `key`.
    pub(crate) fn new(key: &CertifiedKey) -> Result<Self, rustls::Error> {
        Ok(Self { current: RwLock::new(signing_key(key)?), challenge: RwLock::new(None) })
    }

    /// Presents `key` from the next handshake on.
    pub(crate) fn set(&self, key: &CertifiedKey) -> Result<(), rustls::Error> {
        let key = signing_key(key)?;
        *self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner) = key;
        Ok(())
    }

    /// Answers TLS-ALPN-01 validation handshakes for `domain` with `certificate` until
    /// [`Self::clear_challenge`].
    pub(crate) fn set_challenge(&self, domain: &str, certificate: &CertifiedKey) -> Result<(), rustls::Error> {
        // webpki refuses to parse a certificate with the critical acmeIdentifier extension,
        // so rustls cannot check this key against it; it was made with it a moment ago.
        let (chain, private) = crate::identity::rustls_chain_and_key(certificate);
        let key = Arc::new(sign::CertifiedKey::new(chain, rustls::crypto::ring::sign::any_supported_type(&private)?));
        *self.challenge.write().unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some((domain.to_ascii_lowercase(), key));
        Ok(())
    }

    /// Stops answering validation handshakes.
    pub(crate) fn clear_challenge(&self) {
        *self.challenge.write().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<sign::CertifiedKey>> {
        let validation = hello.alpn().is_some_and(|mut offered| offered.any(|p| p == ACME_TLS_ALPN));
        if validation {
            let challenge = self.challenge.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            let (domain, key) = challenge.as_ref()?;
            let asked = hello.server_name()?;
            return asked.eq_ignore_ascii_case(domain).then(|| key.clone());
        }
        Some(self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone())
    }
}

/// `key` as rustls signs with it (ring); refuses a key that does not fit the certificate.
fn signing_key(key: &CertifiedKey) -> Result<Arc<sign::CertifiedKey>, rustls::Error> {
    let (chain, private) = crate::identity::rustls_chain_and_key(key);
    let signer = rustls::crypto::ring::sign::any_supported_type(&private)?;
    let certified = sign::CertifiedKey::new(chain, signer);
    certified.keys_match()?;
    Ok(Arc::new(certified))
}

/// The rustls config of the HTTPS listener: TLS 1.3 on ring, HTTP/1.1 (and `acme-tls/1` for
/// validation handshakes), certificates from `resolver`.
fn https_tls_config(resolver: Arc<CertResolver>) -> Result<rustls::ServerConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    tls.alpn_protocols = vec![b"http/1.1".to_vec(), ACME_TLS_ALPN.to_vec()];
    Ok(tls)
}

/// A TCP listener that hands out TLS streams. Handshakes run concurrently (at most
/// [`MAX_TLS_HANDSHAKES`], each within the HTTP header timeout), so a slow or silent client
/// never holds up the others. The certificate comes from a [`CertResolver`], so it can be
/// swapped while the listener runs; TLS-ALPN-01 validation connections end after their
/// handshake.
pub(crate) struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    handshake_timeout: Duration,
    handshakes: JoinSet<Option<(TlsStream<TcpStream>, SocketAddr)>>,
}

impl std::fmt::Debug for TlsListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsListener")
            .field("local_addr", &self.tcp.local_addr().ok())
            .field("handshakes", &self.handshakes.len())
            .finish_non_exhaustive()
    }
}

impl TlsListener {
    /// Serves TLS on `tcp` with the certificates `resolver` gives; a handshake not done within
    /// `handshake_timeout` is dropped.
    pub(crate) fn new(
        tcp: TcpListener,
        resolver: Arc<CertResolver>,
        handshake_timeout: Duration,
    ) -> Result<Self, rustls::Error> {
        let acceptor = TlsAcceptor::from(Arc::new(https_tls_config(resolver)?));
        Ok(Self { tcp, acceptor, handshake_timeout, handshakes: JoinSet::new() })
    }
}

impl Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            // Both branches are cancel safe: a dropped `accept` loses no connection.
            tokio::select! {
                accepted = self.tcp.accept(), if self.handshakes.len() < MAX_TLS_HANDSHAKES => match accepted {
                    Ok((mut stream, peer)) => {
                        super::serve::no_delay(&mut stream);
                        let (acceptor, limit) = (self.acceptor.clone(), self.handshake_timeout);
                        self.handshakes.spawn(async move {
                            match tokio::time::timeout(limit, acceptor.accept(stream)).await {
                                Ok(Ok(tls)) if tls.get_ref().1.alpn_protocol() == Some(ACME_TLS_ALPN) => {
                                    debug!(%peer, "ACME TLS-ALPN-01 validation handshake answered");
                                    None
                                }
                                Ok(Ok(tls)) => Some((tls, peer)),
                                Ok(Err(e)) => {
                                    debug!(%peer, error = %e, "TLS handshake failed");
                                    None
                                }
                                Err(_) => {
                                    debug!(%peer, "TLS handshake timed out");
                                    None
                                }
                            }
                        });
                    }
                    Err(e) if is_connection_error(&e) => {}
                    Err(e) => {
                        // Out of file descriptors and the like: give the system a moment.
                        error!(error = %e, "accepting an HTTPS connection failed");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                },
                Some(done) = self.handshakes.join_next() => {
                    if let Ok(Some(connection)) = done {
                        return connection;
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// Errors of one incoming connection, not of the listener.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}
