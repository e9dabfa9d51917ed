//! The listeners' side of HTTP: the peer address of a connection, and the HTTPS listener.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use downbeat_certs::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
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

/// The rustls config of the HTTPS listener: `key`'s chain, TLS 1.3 on ring, HTTP/1.1.
fn https_tls_config(key: &CertifiedKey) -> Result<rustls::ServerConfig, rustls::Error> {
    crate::identity::rustls_server_config(key, b"http/1.1")
}

/// A TCP listener that hands out TLS streams. Handshakes run concurrently (at most
/// [`MAX_TLS_HANDSHAKES`], each within the HTTP header timeout), so a slow or silent client
/// never holds up the others. The certificate is fixed when the listener is made.
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
    /// Serves TLS with `key` on `tcp`; a handshake not done within `handshake_timeout` is
    /// dropped.
    pub(crate) fn new(
        tcp: TcpListener,
        key: &CertifiedKey,
        handshake_timeout: Duration,
    ) -> Result<Self, rustls::Error> {
        let acceptor = TlsAcceptor::from(Arc::new(https_tls_config(key)?));
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
                    Ok((stream, peer)) => {
                        let (acceptor, limit) = (self.acceptor.clone(), self.handshake_timeout);
                        self.handshakes.spawn(async move {
                            match tokio::time::timeout(limit, acceptor.accept(stream)).await {
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
