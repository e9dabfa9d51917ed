//! The seam between the client and the network: what carries a session's bytes.
//!
//! A transport is an open session to the server with one reliable, ordered control stream
//! (length-prefixed frames, the same bytes whatever carries them) and unreliable datagrams.
//! Everything above it (the session engine, the tasks of [`crate::Client`]) is the same for
//! every transport: WebTransport ([`crate::webtransport`]) and WebSocket
//! ([`crate::websocket`]), chosen by the URL's scheme.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::{ClientError, ConnectOptions};

/// A boxed future, so that [`Transport`] can be a trait object shared by tokio tasks.
pub(crate) type Boxed<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// An open session to the server.
pub(crate) trait Transport: Send + Sync + 'static {
    /// Writes `bytes` on the control stream, whole and in order with other writes.
    fn send_control<'a>(&'a self, bytes: &'a [u8]) -> Boxed<'a, Result<(), ClientError>>;
    /// The next bytes of the control stream, in any chunking; `None` once it ended or failed.
    /// Only one task reads.
    fn recv_control(&self) -> Boxed<'_, Option<Vec<u8>>>;
    /// Sends a datagram without waiting; a full buffer drops it (every sender copes with loss).
    fn send_datagram(&self, bytes: &[u8]) -> Result<(), ClientError>;
    /// The next datagram; `None` once the session ended. Only one task reads.
    fn recv_datagram(&self) -> Boxed<'_, Option<Vec<u8>>>;
    /// Closes the session with an application `code` and `reason` (idempotent).
    fn close(&self, code: u32, reason: &[u8]);
    /// Resolves once the session is closed by either side, with why.
    fn closed(&self) -> Boxed<'_, String>;
}

/// Opens a session as `options` say: WebSocket for a `ws://` or `wss://` URL, else
/// WebTransport.
pub(crate) async fn open(options: &ConnectOptions) -> Result<Arc<dyn Transport>, ClientError> {
    if options.url.starts_with("ws://") || options.url.starts_with("wss://") {
        return Ok(Arc::new(crate::websocket::WebSocket::open(options).await?));
    }
    Ok(Arc::new(crate::webtransport::WebTransport::open(options).await?))
}
