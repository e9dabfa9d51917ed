//! The seam between the classroom and the network: what carries a session's bytes.
//!
//! A transport is an open session to the server with one reliable, ordered control stream
//! (length-prefixed frames, the same bytes whatever carries them) and unreliable datagrams.
//! The session engine and the classroom's loops are the same for every transport. There are
//! two: WebTransport ([`crate::webtransport`]) and, for networks that block QUIC, WebSocket
//! ([`crate::websocket`]); which one a classroom uses is decided in [`crate::race`].

use std::rc::Rc;

use futures_util::future::LocalBoxFuture;

use crate::js::{Failure, INVALID_ARGUMENT};

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
    /// Resolves once the session has ended, for whatever reason, with the peer's close code
    /// where the transport carries one the server sets to its error code (WebTransport), else
    /// 0.
    fn closed(&self) -> LocalBoxFuture<'static, (u32, String)>;
}

/// Which transport carries a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    WebTransport,
    WebSocket,
}

impl Kind {
    /// The name pages see (`classroom.transport`, the `transport` option).
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::WebTransport => "webtransport",
            Self::WebSocket => "websocket",
        }
    }
}

/// Where the server is, on each transport.
#[derive(Clone, Debug)]
pub(crate) struct Endpoints {
    /// The WebTransport URL and the certificate hashes to pin (SHA-256 of acceptable
    /// self-signed certificates; empty: the browser's trust store).
    pub(crate) webtransport: Option<(String, Vec<[u8; 32]>)>,
    /// The WebSocket URL (`ws:` or `wss:`).
    pub(crate) websocket: Option<String>,
}

/// Opens a session of `kind` to the server at `endpoints`.
pub(crate) async fn open(kind: Kind, endpoints: &Endpoints) -> Result<Rc<dyn Transport>, Failure> {
    let missing = || Failure::new(INVALID_ARGUMENT, format!("no {} URL to connect to", kind.as_str()));
    Ok(match kind {
        Kind::WebTransport => {
            let (url, hashes) = endpoints.webtransport.as_ref().ok_or_else(missing)?;
            Rc::new(crate::webtransport::WebTransport::open(url, hashes).await?)
        }
        Kind::WebSocket => {
            let url = endpoints.websocket.as_ref().ok_or_else(missing)?;
            Rc::new(crate::websocket::WebSocket::open(url).await?)
        }
    })
}
