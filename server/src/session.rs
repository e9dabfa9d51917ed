//! WebTransport sessions: the accept loop with its capacity limits, the hello, the control
//! stream, and clock-sync datagrams.
//!
//! Every session runs in one task (plus a writer task draining its control queue) inside a
//! tracing span with its member id and room. Nothing a peer sends can panic the server:
//! lengths are checked before allocating, decode errors become stable error codes, and a bad
//! datagram is dropped and counted while the session carries on.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use downbeat_protocol::{
    self as wire, BoundedString, ClientDatagram, ClientMessage, ControlAck, DecodeError, ErrorCode, ErrorFrame,
    FRAME_HEADER_LEN, PROTOCOL_VERSION, ServerDatagram, ServerMessage, SyncReply,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout, timeout_at};
use tracing::{Instrument as _, Span, debug, field, info, info_span, warn};
use wtransport::endpoint::IncomingSession;
use wtransport::endpoint::endpoint_side::Server as ServerSide;
use wtransport::{Connection, Endpoint, RecvStream, SendStream, VarInt};

use crate::clock::ServerClock;
use crate::http::token_matches;
use crate::rooms::{Joining, Peer, RoomHandle, Rooms};
use crate::shutdown::Shutdown;
use crate::stats::Stats;

/// Messages a member's control queue holds before the room disconnects them as too slow.
const CONTROL_QUEUE: usize = 64;
/// Once a frame header has arrived, its body must follow within this time.
const FRAME_BODY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a closing session waits for its last frames to be acknowledged.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);
/// How long shutdown waits for sessions to say goodbye before aborting them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
/// Sustained clock-sync datagrams per second a session may send; more are dropped.
const DATAGRAMS_PER_SECOND: u64 = 100;
/// Burst of datagrams allowed above the sustained rate.
const DATAGRAM_BURST: u64 = 200;

/// What every session shares.
#[derive(Debug)]
pub(crate) struct SessionContext {
    pub(crate) rooms: Arc<Rooms>,
    pub(crate) stats: Arc<Stats>,
    pub(crate) clock: ServerClock,
    pub(crate) dev_token: Arc<str>,
    pub(crate) hello_timeout: Duration,
    pub(crate) handshakes: Arc<Semaphore>,
    pub(crate) sessions: Arc<Semaphore>,
    pub(crate) next_member_id: AtomicU64,
}

/// Accepts sessions until shutdown, then waits (briefly) for them to close with
/// [`ErrorCode::ShuttingDown`]. Returns before the endpoint is closed, which must not happen
/// while `Endpoint::accept` is pending.
pub(crate) async fn accept_loop(endpoint: &Endpoint<ServerSide>, ctx: Arc<SessionContext>, mut shutdown: Shutdown) {
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
            incoming = endpoint.accept() => incoming,
        };
        // Refusing at the QUIC level costs one packet; a WebTransport 429 would first cost a
        // whole handshake, which is what this limit protects.
        let Ok(permit) = ctx.handshakes.clone().try_acquire_owned() else {
            ctx.stats.handshakes_refused.inc();
            debug!("too many handshakes in progress; refusing a connection");
            incoming.refuse();
            continue;
        };
        sessions.spawn(handle_incoming(incoming, permit, ctx.clone(), shutdown.clone()));
    }
    info!(open = sessions.len(), "closing sessions");
    if timeout(SHUTDOWN_GRACE, async { while sessions.join_next().await.is_some() {} }).await.is_err() {
        sessions.abort_all();
    }
}

/// Decrements `sessions_active` however the session ends.
struct ActiveGuard(Arc<Stats>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.sessions_active.dec();
    }
}

async fn handle_incoming(
    incoming: IncomingSession,
    handshake: OwnedSemaphorePermit,
    ctx: Arc<SessionContext>,
    shutdown: Shutdown,
) {
    let remote = incoming.remote_address();
    let deadline = Instant::now() + ctx.hello_timeout;
    let request = match timeout_at(deadline, incoming).await {
        Ok(Ok(request)) => request,
        Ok(Err(e)) => {
            debug!(%remote, error = %e, "handshake failed");
            return;
        }
        Err(_) => {
            debug!(%remote, "handshake timed out");
            return;
        }
    };
    let Ok(session_permit) = ctx.sessions.clone().try_acquire_owned() else {
        ctx.stats.handshakes_refused.inc();
        warn!("session limit reached; refusing a session");
        let _ = timeout(FLUSH_TIMEOUT, request.too_many_requests()).await;
        return;
    };
    let conn = match timeout_at(deadline, request.accept()).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            debug!(%remote, error = %e, "session accept failed");
            return;
        }
        Err(_) => {
            debug!(%remote, "session accept timed out");
            return;
        }
    };
    drop(handshake);
    ctx.stats.sessions_total.inc();
    ctx.stats.sessions_active.inc();
    let _active = ActiveGuard(ctx.stats.clone());
    let member_id = ctx.next_member_id.fetch_add(1, Ordering::Relaxed);
    let span = info_span!("session", member = member_id, room = field::Empty);
    debug!(parent: &span, %remote, "session accepted");
    Session { conn, member_id, ctx, shutdown }.run(deadline).instrument(span).await;
    drop(session_permit);
}

/// Why reading a frame stopped.
#[derive(Debug)]
enum ReadError {
    /// The stream or connection ended.
    Closed,
    /// The bytes were not a frame; the stream is out of step.
    Decode(DecodeError),
    /// A header arrived but its body did not follow in time.
    Stalled,
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

/// How a session ended.
#[derive(Debug)]
enum End {
    /// The peer went away; nothing to say.
    Closed,
    /// The server is shutting down.
    Shutdown,
    /// A fatal error: tell the peer, then close with the code.
    Fatal(ErrorCode, &'static str),
}

fn error_frame(code: ErrorCode, request_id: Option<u32>, message: &str) -> ServerMessage {
    ServerMessage::Error(ErrorFrame { code, request_id, message: BoundedString::truncating(message) })
}

fn close_code(code: ErrorCode) -> VarInt {
    VarInt::from_u32(u32::from(code.as_u16()))
}

struct Session {
    conn: Connection,
    member_id: u64,
    ctx: Arc<SessionContext>,
    shutdown: Shutdown,
}

impl Session {
    async fn run(self, deadline: Instant) {
        let mut shutdown = self.shutdown.clone();
        let joined = tokio::select! {
            joined = self.hello(deadline) => joined,
            () = shutdown.wait() => {
                self.conn.close(close_code(ErrorCode::ShuttingDown), b"shutting down");
                return;
            }
        };
        let Some((room, send, recv, control_tx, control_rx)) = joined else { return };
        self.serve(room, send, recv, control_tx, control_rx).await;
    }

    /// Opens the control stream and handles the hello. On success the member has joined and
    /// the welcome is written; on failure the peer was told why and the session closed.
    #[allow(clippy::type_complexity)]
    async fn hello(
        &self,
        deadline: Instant,
    ) -> Option<(RoomHandle, SendStream, RecvStream, mpsc::Sender<ServerMessage>, mpsc::Receiver<ServerMessage>)> {
        let (mut send, mut recv) = match timeout_at(deadline, self.conn.accept_bi()).await {
            Ok(Ok(streams)) => streams,
            Ok(Err(e)) => {
                debug!(error = %e, "closed before opening the control stream");
                return None;
            }
            Err(_) => {
                self.ctx.stats.hello_failures.inc(ErrorCode::HelloTimeout);
                debug!("no control stream in time");
                self.conn.close(close_code(ErrorCode::HelloTimeout), b"no control stream in time");
                return None;
            }
        };
        let first = match timeout_at(deadline, read_frame(&mut recv)).await {
            Ok(Ok(message)) => message,
            Ok(Err(ReadError::Closed)) => {
                debug!("closed before saying hello");
                return None;
            }
            Ok(Err(ReadError::Decode(e))) => {
                self.count_decode_error(e);
                return self.refuse(send, e.code(), "the first frame did not decode").await;
            }
            Ok(Err(ReadError::Stalled)) | Err(_) => {
                return self.refuse(send, ErrorCode::HelloTimeout, "no hello in time").await;
            }
        };
        let ClientMessage::Hello(hello) = first else {
            return self.refuse(send, ErrorCode::HelloRequired, "the first frame must be a hello").await;
        };
        if hello.version != PROTOCOL_VERSION {
            return self.refuse(send, ErrorCode::UnsupportedVersion, "this server speaks protocol version 1").await;
        }
        if !token_matches(&self.ctx.dev_token, &hello.token) {
            return self.refuse(send, ErrorCode::Unauthorized, "the token is not valid").await;
        }
        let Some(room) = self.ctx.rooms.get(&hello.room) else {
            return self.refuse(send, ErrorCode::RoomNotFound, "no room has this id").await;
        };
        Span::current().record("room", room.id());

        let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
        let peer: Arc<dyn Peer> = Arc::new(self.conn.clone());
        let joining = Joining { member_id: self.member_id, name: hello.name, peer, control_tx: control_tx.clone() };
        let welcome = match room.join(joining).await {
            Ok(welcome) => welcome,
            Err(code) => {
                let message = match code {
                    ErrorCode::RoomFull => "the room is full",
                    ErrorCode::ShuttingDown => "the server is shutting down",
                    _ => "cannot join the room",
                };
                return self.refuse(send, code, message).await;
            }
        };
        let written = match wire::encode_frame(&ServerMessage::Welcome(welcome)) {
            Ok(bytes) => send.write_all(&bytes).await.is_ok(),
            Err(e) => {
                warn!(error = %e, "welcome did not encode");
                false
            }
        };
        if !written {
            room.leave(self.member_id).await;
            self.conn.close(close_code(ErrorCode::Internal), b"");
            return None;
        }
        info!("joined");
        Some((room, send, recv, control_tx, control_rx))
    }

    /// Tells the peer why its hello was refused, then closes the session with that code.
    async fn refuse<T>(&self, mut send: SendStream, code: ErrorCode, message: &'static str) -> Option<T> {
        self.ctx.stats.hello_failures.inc(code);
        debug!(code = code.as_str(), "hello refused");
        if let Ok(bytes) = wire::encode_frame(&error_frame(code, None, message)) {
            let _ = timeout(FLUSH_TIMEOUT, async {
                if send.write_all(&bytes).await.is_ok() {
                    let _ = send.finish().await;
                }
            })
            .await;
        }
        self.conn.close(close_code(code), message.as_bytes());
        None
    }

    fn count_decode_error(&self, e: DecodeError) {
        match e {
            DecodeError::TooLarge { .. } => self.ctx.stats.frames_too_large.inc(),
            _ => self.ctx.stats.frames_malformed.inc(),
        }
    }

    /// The joined session: a writer task drains the control queue; this task reads control
    /// frames and answers clock-sync datagrams until either side ends it.
    async fn serve(
        &self,
        room: RoomHandle,
        send: SendStream,
        mut recv: RecvStream,
        control_tx: mpsc::Sender<ServerMessage>,
        control_rx: mpsc::Receiver<ServerMessage>,
    ) {
        let writer = tokio::spawn(write_loop(send, control_rx).instrument(Span::current()));
        let mut shutdown = self.shutdown.clone();
        let end = tokio::select! {
            end = self.control_loop(&room, &mut recv, &control_tx) => end,
            () = datagram_loop(&self.conn, self.ctx.clock, &self.ctx.stats) => End::Closed,
            () = shutdown.wait() => End::Shutdown,
        };
        // The room drops its sender for this member when it handles the leave; once ours is
        // dropped too, the writer finishes the stream after the last queued message.
        room.leave(self.member_id).await;
        let (code, message) = match end {
            End::Closed => {
                debug!("session ended");
                writer.abort();
                self.conn.close(VarInt::from_u32(0), b"");
                return;
            }
            End::Shutdown => (ErrorCode::ShuttingDown, "the server is shutting down"),
            End::Fatal(code, message) => (code, message),
        };
        debug!(code = code.as_str(), "closing session");
        let _ = control_tx.try_send(error_frame(code, None, message));
        drop(control_tx);
        if timeout(FLUSH_TIMEOUT, writer).await.is_err() {
            debug!("control stream did not flush in time");
        }
        self.conn.close(close_code(code), message.as_bytes());
    }

    async fn control_loop(
        &self,
        room: &RoomHandle,
        recv: &mut RecvStream,
        control_tx: &mpsc::Sender<ServerMessage>,
    ) -> End {
        loop {
            let reply = match read_frame(recv).await {
                Err(ReadError::Closed) => return End::Closed,
                Err(ReadError::Decode(e)) => {
                    self.count_decode_error(e);
                    let message = match e {
                        DecodeError::TooLarge { .. } => "frame larger than the limit",
                        _ => "frame did not decode",
                    };
                    return End::Fatal(e.code(), message);
                }
                Err(ReadError::Stalled) => {
                    self.ctx.stats.frames_malformed.inc();
                    return End::Fatal(ErrorCode::MalformedFrame, "frame body did not arrive in time");
                }
                Ok(ClientMessage::Hello(_)) => {
                    error_frame(ErrorCode::UnexpectedMessage, None, "this session already said hello")
                }
                Ok(ClientMessage::Control(request)) => match room.change(request.change).await {
                    Ok(applied) => ServerMessage::ControlAck(ControlAck {
                        request_id: request.request_id,
                        epoch: applied.epoch,
                        effective_at: applied.effective_at,
                        effective_beat: applied.effective_beat,
                    }),
                    Err(e) => error_frame(e.code(), Some(request.request_id), &e.to_string()),
                },
            };
            if control_tx.send(reply).await.is_err() {
                // The room dropped this member (too slow) and the writer is gone.
                return End::Closed;
            }
        }
    }
}

/// Writes queued control messages as frames until the queue closes, then finishes the stream.
async fn write_loop(mut send: SendStream, mut rx: mpsc::Receiver<ServerMessage>) {
    while let Some(message) = rx.recv().await {
        let bytes = match wire::encode_frame(&message) {
            Ok(bytes) => bytes,
            Err(e) => {
                warn!(error = %e, "control message did not encode; skipped");
                continue;
            }
        };
        if send.write_all(&bytes).await.is_err() {
            return;
        }
    }
    let _ = send.finish().await;
}

/// A token bucket in whole datagrams over server time.
#[derive(Debug)]
struct TokenBucket {
    tokens: u64,
    last: u64,
}

impl TokenBucket {
    const NANOS_PER_TOKEN: u64 = 1_000_000_000 / DATAGRAMS_PER_SECOND;

    fn new(now: wire::ServerNanos) -> Self {
        Self { tokens: DATAGRAM_BURST, last: now.0 }
    }

    fn take(&mut self, now: wire::ServerNanos) -> bool {
        let earned = now.0.saturating_sub(self.last) / Self::NANOS_PER_TOKEN;
        if earned > 0 {
            self.tokens = (self.tokens + earned).min(DATAGRAM_BURST);
            self.last += earned * Self::NANOS_PER_TOKEN;
        }
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }
}

/// Answers clock-sync requests until the connection ends. `t1` is stamped the moment a
/// datagram is handed over, before decoding; `t2` just before the reply is sent.
async fn datagram_loop(conn: &Connection, clock: ServerClock, stats: &Stats) {
    let mut bucket = TokenBucket::new(clock.now());
    loop {
        let Ok(datagram) = conn.receive_datagram().await else { return };
        let t1 = clock.now();
        stats.datagrams_received.inc();
        if !bucket.take(t1) {
            stats.datagrams_rate_limited.inc();
            continue;
        }
        match wire::decode_client_datagram(&datagram) {
            Err(_) => stats.datagrams_malformed.inc(),
            Ok(ClientDatagram::SyncRequest(request)) => {
                let reply =
                    ServerDatagram::SyncReply(SyncReply { id: request.id, t0: request.t0, t1, t2: clock.now() });
                let sent = wire::encode_server_datagram(&reply).is_ok_and(|bytes| conn.send_datagram(bytes).is_ok());
                if sent {
                    stats.datagrams_sent.inc();
                    stats.sync_replies_sent.inc();
                } else {
                    stats.datagrams_send_failed.inc();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_bucket_allows_a_burst_then_the_rate() {
        let mut bucket = TokenBucket::new(wire::ServerNanos(0));
        let allowed = (0..1000).filter(|_| bucket.take(wire::ServerNanos(0))).count();
        assert_eq!(allowed as u64, DATAGRAM_BURST);
        // One second later, one second's worth.
        let t = wire::ServerNanos(1_000_000_000);
        let allowed = (0..1000).filter(|_| bucket.take(t)).count();
        assert_eq!(allowed as u64, DATAGRAMS_PER_SECOND);
        // Refill never exceeds the burst.
        let t = wire::ServerNanos(100_000_000_000);
        let allowed = (0..1000).filter(|_| bucket.take(t)).count();
        assert_eq!(allowed as u64, DATAGRAM_BURST);
    }
}
