//! Sessions over WebTransport: the accept loop with its capacity limits, the control stream
//! (a bidirectional stream of length-prefixed frames) and QUIC datagrams. The HTTP/3 side of
//! a session is in [`super::h3`].

use std::sync::Arc;
use std::time::Duration;

use downbeat_protocol::{self as wire, ClientMessage, ErrorCode, FRAME_HEADER_LEN, Transport};
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{Instant, timeout, timeout_at};
use tracing::{Instrument as _, Span, debug, info, warn};

use super::h3::{Established, H3Failure, Requested, close_code};
use super::race::race;
use super::{
    ActiveGuard, Control, Datagrams, End, FLUSH_TIMEOUT, Link, ReadError, SHUTDOWN_GRACE, Session, SessionContext,
    SessionPlaces, sync_reply,
};
use crate::authz::Refusal;
use crate::limits::NetworkPlace;
use crate::quic::{Connection, ConnectionError, Endpoint, Incoming, RecvStream, SendStream, VarInt};
use crate::room::{Departure, Outgoing};
use crate::shutdown::Shutdown;

/// Once a frame header has arrived, its body must follow within this time.
const FRAME_BODY_TIMEOUT: Duration = Duration::from_secs(5);

/// Accepts sessions until shutdown, then waits (briefly) for them to close with
/// [`ErrorCode::ShuttingDown`]. Returns before the endpoint is closed, which must not happen
/// while `Endpoint::accept` is pending.
pub(crate) async fn accept_loop(endpoint: &Endpoint, ctx: Arc<SessionContext>, mut shutdown: Shutdown) {
    let mut sessions = JoinSet::new();
    loop {
        let incoming = tokio::select! {
            biased;
            () = shutdown.wait() => break,
            Some(done) = sessions.join_next(), if !sessions.is_empty() => {
                if done.is_err_and(|e| e.is_panic()) {
                    warn!("a session task panicked");
                }
                continue;
            }
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => break,
            },
        };
        // Under pressure a connection first proves its address with a stateless Retry (one
        // packet, nothing kept), so forged source addresses cannot hold handshakes.
        let in_progress = ctx.max_handshakes.saturating_sub(ctx.handshakes.available_permits());
        if in_progress >= ctx.retry_above_handshakes && !incoming.remote_address_validated() {
            ctx.stats.handshakes_retried.inc();
            incoming.retry();
            continue;
        }
        // Refusing at the QUIC level costs one packet; a WebTransport 429 would first cost a
        // whole handshake, which is what these limits protect.
        let remote = incoming.remote_address();
        let Some(place) = ctx.handshakes_per_network.try_take(remote.ip()) else {
            ctx.stats.handshakes_refused.inc();
            debug!(%remote, "too many handshakes in progress from this network; refusing a connection");
            incoming.refuse();
            continue;
        };
        let Ok(permit) = ctx.handshakes.clone().try_acquire_owned() else {
            ctx.stats.handshakes_refused.inc();
            debug!("too many handshakes in progress; refusing a connection");
            incoming.refuse();
            continue;
        };
        sessions.spawn(handle_incoming(Box::new(incoming), (permit, place), ctx.clone(), shutdown.clone()));
    }
    info!(open = sessions.len(), "closing sessions");
    if timeout(SHUTDOWN_GRACE, async { while sessions.join_next().await.is_some() {} }).await.is_err() {
        sessions.abort_all();
    }
}

/// `incoming` comes boxed: an argument stays in the session's future for its whole life, and
/// a connection attempt is far larger than a pointer.
async fn handle_incoming(
    incoming: Box<Incoming>,
    handshake: (OwnedSemaphorePermit, NetworkPlace),
    ctx: Arc<SessionContext>,
    shutdown: Shutdown,
) {
    let remote = incoming.remote_address();
    let deadline = Instant::now() + ctx.hello_timeout;
    // The handshake's state is its own future's, gone once it is done: held in this one, it
    // would stay in the session's task for as long as the session lives.
    let Some((established, places)) = establish(incoming, handshake, &ctx, deadline).await else { return };
    let _active = ActiveGuard::new(&ctx.stats, Transport::WebTransport);
    let (session, span) = Session::new(ctx, Transport::WebTransport, remote.ip(), shutdown);
    debug!(parent: &span, %remote, "session accepted");
    run(session, established, deadline).instrument(span).await;
    drop(places);
}

/// The QUIC handshake, the `CONNECT` and its answer, by `deadline`: the established session
/// and its places under the session limits, or `None` (the peer was told why, or is gone).
/// The handshake's places are given back when it returns.
async fn establish(
    incoming: Box<Incoming>,
    _handshake: (OwnedSemaphorePermit, NetworkPlace),
    ctx: &SessionContext,
    deadline: Instant,
) -> Option<(Established, SessionPlaces)> {
    let remote = incoming.remote_address();
    let connecting = match incoming.accept() {
        Ok(connecting) => connecting,
        Err(e) => {
            debug!(%remote, error = %e, "handshake failed");
            return None;
        }
    };
    let requested = async {
        let conn = connecting.established().await.map_err(|e| {
            debug!(%remote, error = %e, "handshake failed");
            H3Failure::Closed
        })?;
        Requested::read(conn).await
    };
    let request = match timeout_at(deadline, requested).await {
        Ok(Ok(request)) => request,
        Ok(Err(e)) => {
            debug!(%remote, error = %e, "no WebTransport session");
            return None;
        }
        Err(_) => {
            debug!(%remote, "handshake timed out");
            return None;
        }
    };
    let Ok(places) = ctx.session_places(remote.ip()) else {
        let _ = timeout(FLUSH_TIMEOUT, request.too_many_requests()).await;
        return None;
    };
    match timeout_at(deadline, request.accept()).await {
        Ok(Ok(established)) => Some((established, places)),
        Ok(Err(e)) => {
            debug!(%remote, error = %e, "session accept failed");
            None
        }
        Err(_) => {
            debug!(%remote, "session accept timed out");
            None
        }
    }
}

/// Reads one frame: header, length check before allocating, body, decode.
async fn read_frame(recv: &mut RecvStream) -> Result<ClientMessage, ReadError> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    recv.read_exact(&mut header).await.map_err(|_| ReadError::Closed)?;
    let len = wire::frame_body_len(header).map_err(ReadError::Decode)?;
    let mut body = vec![0u8; len];
    match timeout(FRAME_BODY_TIMEOUT, recv.read_exact(&mut body)).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) => return Err(ReadError::Closed),
        Err(_) => return Err(ReadError::Stalled),
    }
    wire::decode_frame_body(&body).map_err(ReadError::Decode)
}

/// Writes queued control messages as frames until the queue closes, then finishes the stream.
/// A frame not written within `deadline` (a peer that stopped reading, or keeps its receive
/// window shut) ends the session with `server_busy`: the session then ends as closed by the
/// server and its seat is freed at once.
async fn write_loop(conn: Connection, mut send: SendStream, mut rx: mpsc::Receiver<Outgoing>, deadline: Duration) {
    while let Some(message) = rx.recv().await {
        let bytes = match wire::encode_frame(&message) {
            Ok(bytes) => bytes,
            Err(e) => {
                warn!(error = %e, "control message did not encode; skipped");
                continue;
            }
        };
        match timeout(deadline, send.write_all(&bytes)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return,
            Err(_) => {
                debug!(?deadline, "a control frame was not taken in time; closing the session");
                conn.close(close_code(ErrorCode::ServerBusy), b"the control stream stopped moving");
                return;
            }
        }
    }
    finish(&mut send).await;
}

/// Finishes `send` and waits until the peer acknowledged everything written on it (or stopped
/// it, or the connection closed).
async fn finish(send: &mut SendStream) -> bool {
    send.finish().is_ok() && matches!(send.stopped().await, Ok(None))
}

/// A WebTransport session from its first stream to its end.
async fn run(session: Session, established: Established, deadline: Instant) {
    let mut shutdown = session.shutdown.clone();
    // Boxed: the hello's state (the join, the first answer) is gone once the session is
    // served, and held inline it would size the session's future for its whole life.
    let joined = tokio::select! {
        joined = Box::pin(hello(&session, &established, deadline)) => joined,
        () = shutdown.wait() => {
            established.conn().close(close_code(ErrorCode::ShuttingDown), b"shutting down");
            return;
        }
    };
    let Some((admitted, send, recv)) = joined else { return };
    let write_deadline = session.ctx.idle_timeout;
    session.run(&mut WtLink { established, send: Some(send), recv, write_deadline }, admitted).await;
}

/// Opens the control stream and handles the hello or probe (see [`Session::admit`]). On
/// success the first answer (welcome or probe start) is written; on failure the peer was told
/// why and the session closed.
async fn hello(
    session: &Session,
    established: &Established,
    deadline: Instant,
) -> Option<(super::Admitted, SendStream, RecvStream)> {
    let conn = &established.peer.conn;
    let (mut send, mut recv) = match timeout_at(deadline, established.accept_stream()).await {
        Ok(Ok(streams)) => streams,
        Ok(Err(e)) => {
            debug!(error = %e, "no control stream");
            e.close(conn);
            return None;
        }
        Err(_) => {
            session.ctx.stats.hello_failures.inc(ErrorCode::HelloTimeout);
            debug!("no control stream in time");
            conn.close(close_code(ErrorCode::HelloTimeout), b"no control stream in time");
            return None;
        }
    };
    let first = timeout_at(deadline, read_frame(&mut recv)).await.unwrap_or(Err(ReadError::Stalled));
    let (admitted, answer) = match session.admit(first, Arc::new(established.peer.clone())).await {
        Ok(admitted) => admitted,
        Err(refusal) => {
            if let Some(refusal) = refusal {
                refuse(conn, send, &refusal).await;
            }
            return None;
        }
    };
    // The answer has the hello's time again to be taken: a peer keeping its receive window
    // shut must not hold the seat it was just given.
    let written = match wire::encode_frame(&answer) {
        Ok(bytes) => match timeout(session.ctx.hello_timeout, send.write_all(&bytes)).await {
            Ok(result) => result.map_err(|_| ErrorCode::Internal),
            Err(_) => Err(ErrorCode::ServerBusy),
        },
        Err(e) => {
            warn!(error = %e, "the first answer did not encode");
            Err(ErrorCode::Internal)
        }
    };
    if let Err(code) = written {
        debug!(code = code.as_str(), "the first answer was not written");
        // A peer that kept its window shut is closed by us: its seat is freed now. One whose
        // connection broke may come back to it.
        let how = if code == ErrorCode::ServerBusy { Departure::Closed } else { Departure::Lost };
        admitted.abandon(how).await;
        conn.close(close_code(code), code.as_str().as_bytes());
        return None;
    }
    Some((admitted, send, recv))
}

/// Tells the peer why its hello was refused, then closes the session with that code.
async fn refuse(conn: &Connection, mut send: SendStream, refusal: &Refusal) {
    let code = refusal.code;
    if let Ok(bytes) = wire::encode_frame(&refusal.answer()) {
        let _ = timeout(FLUSH_TIMEOUT, async {
            if send.write_all(&bytes).await.is_ok() && finish(&mut send).await {
                wait_for_peer_close(conn).await;
            }
        })
        .await;
    }
    conn.close(close_code(code), code.as_str().as_bytes());
}

/// After a goodbye on the control stream was acknowledged: waits, at most [`FLUSH_TIMEOUT`],
/// for the peer to close the session (every client does once it read an error frame). A QUIC
/// close makes the peer throw away stream data its application has not read yet, even data it
/// acknowledged, so closing first would lose the goodbye: a page whose tab was replaced would
/// read a lost connection and take its seat back.
async fn wait_for_peer_close(conn: &Connection) {
    let _ = timeout(FLUSH_TIMEOUT, conn.closed()).await;
}

/// A joined WebTransport session's streams.
#[derive(Debug)]
struct WtLink {
    /// The connection, its datagrams, and the rest of the session's HTTP/3 (its `CONNECT`
    /// stream, the peer's other streams).
    established: Established,
    /// Until the writer takes it.
    send: Option<SendStream>,
    recv: RecvStream,
    /// The longest one control frame may take to be written (the idle timeout).
    write_deadline: Duration,
}

impl Link for WtLink {
    fn spawn_writer(&mut self, rx: mpsc::Receiver<Outgoing>) -> JoinHandle<()> {
        let send = self.send.take().expect("the writer starts once");
        tokio::spawn(
            write_loop(self.established.peer.conn.clone(), send, rx, self.write_deadline).instrument(Span::current()),
        )
    }

    async fn read(
        &mut self,
        control: &mut Control<'_>,
        datagrams: &mut Datagrams<'_>,
        control_tx: &mpsc::Sender<Outgoing>,
    ) -> End {
        let Self { established: Established { peer, streams, .. }, recv, .. } = self;
        let ctx = control.ctx();
        let clock = ctx.clock;
        // Clock-sync requests are answered by the connection's driver as it reads them, in the
        // packet that acknowledges them, without waking this task ([`super::SyncAnswer`]).
        let _answering = peer.answer_sync(datagrams.sync_answer());
        // Every other datagram comes straight from the QUIC connection: no other task reads
        // them, so each wakes this one task and `t1` is stamped as soon as it runs (and a sync
        // request's then moved back to its arrival, [`crate::arrival`]). A datagram wakes the
        // datagram reader alone, not the control stream's read too ([`race`]). The futures are
        // built in place: a future held in a local and then moved would be held twice.
        race(
            async {
                while let Ok(bytes) = peer.conn.read_datagram().await {
                    // An HTTP/3 datagram for no session of ours, or none at all.
                    let Some(payload) = peer.payload_of(bytes) else {
                        ctx.stats.datagrams_malformed.inc();
                        continue;
                    };
                    let t1 = clock.now();
                    match datagrams.receive(&payload, t1) {
                        Ok(Some(request)) => {
                            // Back to when it reached the host: its wait in the server is
                            // neither path delay nor offset.
                            let t1 = crate::arrival::t1(clock, t1, peer.conn.arrived());
                            let sent = sync_reply(clock, request, t1).is_some_and(|bytes| peer.send(&bytes));
                            ctx.stats.count_sync_reply(sent);
                        }
                        Ok(None) => {}
                        Err(end) => return end,
                    }
                }
                debug!("the connection's datagrams ended");
                End::Closed
            },
            async {
                tokio::select! {
                    end = async {
                        loop {
                            if let Some(end) = control.handle(read_frame(recv).await, control_tx).await {
                                return end;
                            }
                        }
                    } => end,
                    // The peer ended the session (its CONNECT stream), or a stream broke HTTP/3.
                    () = streams.serve(&peer.conn) => End::Closed,
                }
            },
        )
        .await
    }

    async fn departure(&self) -> Departure {
        // Polled once: resolves only if the connection is already closed.
        match timeout(Duration::ZERO, self.established.peer.conn.closed()).await.ok() {
            Some(ConnectionError::ApplicationClosed(_)) | None => Departure::Left,
            // Only the writer closes it on this side: the peer stopped taking control frames.
            Some(ConnectionError::LocallyClosed) => Departure::Closed,
            Some(_) => Departure::Lost,
        }
    }

    fn closing(&self, _code: ErrorCode, _message: &'static str) {
        // The error frame queued last is the goodbye; the close below carries the code.
    }

    fn close(&self, code: Option<ErrorCode>, message: &str) {
        match code {
            Some(code) => self.established.peer.conn.close(close_code(code), message.as_bytes()),
            None => self.established.peer.conn.close(VarInt::from_u32(0), b""),
        }
    }

    async fn linger(&mut self) {
        wait_for_peer_close(&self.established.peer.conn).await;
    }
}
