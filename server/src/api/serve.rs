//! Serving HTTP/1.1 connections with limits no peer can outlast: a cap on open connections in
//! all and per client address (past it, a connection is closed as soon as it is accepted), a
//! deadline for each request's header (which also ends a keep-alive connection left idle), a
//! deadline for each request's handling, body included, and an idle deadline on the
//! connection's bytes, so a client that stops reading its answer does not hold it either.
//!
//! Shutdown stops accepting and lets the requests in flight finish; whoever runs [`serve`]
//! bounds that wait by dropping it, which drops every connection.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::extract::connect_info::ConnectInfo;
use axum::middleware::Next;
use axum::response::{IntoResponse as _, Response};
use axum::serve::Listener;
use downbeat_protocol::ErrorCode;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};
use tower::ServiceExt as _;
use tracing::debug;

use super::error::ApiError;
use super::listen::ClientAddr;
use crate::config::Config;
use crate::shutdown::Shutdown;

/// What a connection may cost: how many, and how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct HttpLimits {
    /// Open connections at once, over every address.
    pub(crate) max_connections: usize,
    /// Open connections at once from one client address.
    pub(crate) max_per_address: usize,
    /// Time to send a request's header, counted from when the server starts waiting for it.
    pub(crate) header_timeout: Duration,
    /// Time to send a request's body and have it answered.
    pub(crate) request_timeout: Duration,
}

impl HttpLimits {
    pub(crate) fn new(config: &Config) -> Self {
        Self {
            max_connections: config.http_max_connections,
            max_per_address: config.http_max_connections_per_address,
            header_timeout: config.http_header_timeout(),
            request_timeout: config.http_request_timeout(),
        }
    }
}

/// Open connections, in all and by client address.
#[derive(Debug, Default)]
struct Open {
    total: usize,
    by_address: HashMap<IpAddr, usize>,
}

/// One open connection's place under the caps, held by every request on it (as a request
/// extension) so that a connection upgraded to a WebSocket keeps it while the session lives.
#[derive(Clone, Debug)]
pub(crate) struct HeldConnection(#[allow(dead_code, reason = "held for its Drop")] Arc<Admitted>);

/// One open connection; uncounts itself when dropped.
#[derive(Debug)]
struct Admitted {
    open: Arc<Mutex<Open>>,
    address: IpAddr,
}

/// Counts a connection from `address` unless that would pass a cap.
fn admit(open: &Arc<Mutex<Open>>, limits: &HttpLimits, address: IpAddr) -> Option<Admitted> {
    let mut counts = open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if counts.total >= limits.max_connections {
        return None;
    }
    let n = counts.by_address.entry(address).or_default();
    if *n >= limits.max_per_address {
        return None;
    }
    *n += 1;
    counts.total += 1;
    Some(Admitted { open: open.clone(), address })
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut counts = self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        counts.total -= 1;
        if let Some(n) = counts.by_address.get_mut(&self.address) {
            *n -= 1;
            if *n == 0 {
                counts.by_address.remove(&self.address);
            }
        }
    }
}

/// Turns Nagle's algorithm off on an accepted connection. A WebSocket session's sync replies,
/// beat frames and notes are small messages that must leave at once: with Nagle on, a write
/// behind an unacknowledged one waits for the peer's delayed ACK (about 40 ms).
pub(crate) fn no_delay(tcp: &mut tokio::net::TcpStream) {
    if let Err(e) = tcp.set_nodelay(true) {
        debug!(error = %e, "TCP_NODELAY could not be set on a connection");
    }
}

/// Serves `router` on `listener` within `limits` until `shutdown`, then waits for the
/// requests in flight.
pub(crate) async fn serve<L>(mut listener: L, router: Router, limits: HttpLimits, mut shutdown: Shutdown)
where
    L: Listener<Addr = SocketAddr>,
{
    let open = Arc::new(Mutex::new(Open::default()));
    let mut connections = JoinSet::new();
    let (closing_tx, closing) = tokio::sync::watch::channel(false);
    loop {
        let (io, peer) = tokio::select! {
            () = shutdown.wait() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let Some(admitted) = admit(&open, &limits, peer.ip()) else {
            debug!(%peer, "too many HTTP connections; closing a new one");
            continue;
        };
        let router = router.clone();
        let mut closing = closing.clone();
        connections.spawn(async move {
            let held = HeldConnection(Arc::new(admitted));
            let service = router.map_request(move |mut request: Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(ConnectInfo(ClientAddr(peer)));
                request.extensions_mut().insert(held.clone());
                request
            });
            // Longer than any request may take, so only a connection stuck on its bytes (a
            // client that stopped reading its answer) reaches it.
            let io = TokioIo::new(IdleIo::new(io, limits.request_timeout + limits.header_timeout));
            let mut builder = http1::Builder::new();
            builder.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
            let mut connection = pin!(builder.serve_connection(io, TowerToHyperService::new(service)).with_upgrades());
            let ended = tokio::select! {
                ended = connection.as_mut() => ended,
                // It only ever changes to true.
                _ = closing.changed() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = ended {
                debug!(%peer, error = %e, "HTTP connection ended");
            }
        });
    }
    closing_tx.send_replace(true);
    while connections.join_next().await.is_some() {}
}

/// Answers `server_busy` (503) if a request is not handled, body included, within
/// `timeout`.
pub(crate) async fn request_deadline(timeout: Duration, request: Request, next: Next) -> Response {
    match tokio::time::timeout(timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::new(ErrorCode::ServerBusy, "the request took too long").into_response(),
    }
}

/// A connection's bytes that fail with `TimedOut` once reading or writing has waited longer
/// than `idle` without any progress.
#[derive(Debug)]
struct IdleIo<T> {
    inner: T,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl<T> IdleIo<T> {
    fn new(inner: T, idle: Duration) -> Self {
        Self { inner, idle, deadline: Box::pin(tokio::time::sleep(idle)) }
    }

    /// Moves the deadline after progress.
    fn progressed(&mut self) {
        self.deadline.as_mut().reset(Instant::now() + self.idle);
    }

    /// `Pending` while the deadline is ahead; an error once it has passed.
    fn check(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        ready!(self.deadline.as_mut().poll(cx));
        Poll::Ready(io::Error::new(io::ErrorKind::TimedOut, "no bytes moved on the connection in time"))
    }

    /// Wraps a poll of the inner stream: progress moves the deadline, waiting is bounded by it.
    fn bounded<R>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        match poll {
            Poll::Ready(result) => {
                self.progressed();
                Poll::Ready(result)
            }
            Poll::Pending => self.check(cx).map(Err),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleIo<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        this.bounded(cx, poll)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleIo<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.bounded(cx, poll)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_flush(cx);
        this.bounded(cx, poll)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.bounded(cx, poll)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.bounded(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
