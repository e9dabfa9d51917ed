//! The seam between the classroom and the network: what carries a session's bytes.
//!
//! A transport is an open session to the server with one reliable, ordered control stream
//! (length-prefixed frames, the same bytes whatever carries them) and unreliable datagrams.
//! The session engine and the classroom's loops are the same for every transport; a second
//! one (WebSocket, say) is one more file implementing [`Transport`] and a branch in [`open`].
//! WebTransport is the only one today ([`crate::webtransport`]).

use std::rc::Rc;

use futures_util::future::LocalBoxFuture;

use crate::js::Failure;

/// An open session to the server. The browser runs everything on one thread, so futures need
/// not be `Send`.
pub(crate) trait Transport {
    /// Writes `bytes` on the control stream and waits until the stream took them
    /// ([`Failure::closed`] if it cannot).
    fn send_control<'a>(&'a self, bytes: &'a [u8]) -> LocalBoxFuture<'a, Result<(), Failure>>;
    /// The next bytes of the control stream, in any chunking; `None` once it ended or failed.
    /// Only one loop reads.
    fn recv_control(&self) -> LocalBoxFuture<'_, Option<Vec<u8>>>;
    /// Sends a datagram; a full buffer or a closed session drops it (datagrams are unreliable
    /// by design; every sender copes with loss).
    fn send_datagram(&self, bytes: &[u8]);
    /// The next datagram; `None` once the session ended. Only one loop reads.
    fn recv_datagram(&self) -> LocalBoxFuture<'_, Option<Vec<u8>>>;
    /// Closes the session with an application `code` and `reason` (idempotent).
    fn close(&self, code: u32, reason: &str);
    /// Resolves once the session has ended, for whatever reason.
    fn closed(&self) -> LocalBoxFuture<'static, ()>;
}

/// Opens a session to `url`, pinning `hashes` (SHA-256 of acceptable self-signed
/// certificates; empty: the browser's trust store). Today: WebTransport.
pub(crate) async fn open(url: &str, hashes: &[[u8; 32]]) -> Result<Rc<dyn Transport>, Failure> {
    Ok(Rc::new(crate::webtransport::WebTransport::open(url, hashes).await?))
}
