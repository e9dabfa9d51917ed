//! WebTransport sessions: the accept loop with its capacity limits, the hello, the control
//! stream, and clock-sync datagrams.
//!
//! Every session runs in one task (plus a writer task draining its control queue) inside a
//! tracing span with its member id and room. Nothing a peer sends can panic the server:
//! lengths are checked before allocating, decode errors become stable error codes, and a bad
//! datagram is dropped and counted while the session carries on.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use downbeat_engine::limit::TokenBucket;
use downbeat_protocol::{
    self as wire, ClientDatagram, ClientMessage, DecodeError, ErrorCode, FRAME_HEADER_LEN, Name, PROTOCOL_VERSION,
    RoomRequest, ServerDatagram, ServerMessage, SyncReply,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout, timeout_at};
use tracing::{Instrument as _, Span, debug, field, info, info_span, warn};
use wtransport::endpoint::IncomingSession;
use wtransport::endpoint::endpoint_side::Server as ServerSide;
use wtransport::error::ConnectionError;
use wtransport::{Connection, Endpoint, RecvStream, SendStream, VarInt};

use crate::auth::{Principal, Tenants};
use crate::authz::{Operation, Refusal, authorize};
use crate::clock::ServerClock;
use crate::room::{Departure, Joining, Kick, Peer, RoomHandle, Rooms};
use crate::shutdown::Shutdown;
use crate::stats::Stats;
use downbeat_engine::room::error_frame;

/// Messages a member's control queue holds before the room disconnects them as too slow.
const CONTROL_QUEUE: usize = 64;
/// Once a frame header has arrived, its body must follow within this time.
const FRAME_BODY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a closing session waits for its last frames to be acknowledged.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);
/// How long shutdown waits for sessions to say goodbye before aborting them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
/// Sustained datagrams per second a session may send (clock sync and notes); more are dropped.
const DATAGRAMS_PER_SECOND: u32 = 100;
/// Burst of datagrams allowed above the sustained rate.
const DATAGRAM_BURST: u32 = 200;
/// Client reports a session may send per second (sustained; a burst of 3); more are ignored.
const REPORTS_PER_SECOND: u32 = 1;
/// Refused control frames (rate limit) a session may send in a burst before it is closed...
const ABUSE_BURST: u32 = 20;
/// ...and the sustained rate of refusals tolerated.
const ABUSE_PER_SECOND: u32 = 2;
/// Slack on a token's expiry before the session is ended (clock skew between issuers).
const EXPIRY_LEEWAY: Duration = Duration::from_secs(5);

/// What every session shares.
#[derive(Debug)]
pub(crate) struct SessionContext {
    pub(crate) rooms: Arc<Rooms>,
    pub(crate) tenants: Arc<Tenants>,
    pub(crate) tenant_sessions: TenantSessions,
    pub(crate) stats: Arc<Stats>,
    pub(crate) clock: ServerClock,
    pub(crate) hello_timeout: Duration,
    pub(crate) handshakes: Arc<Semaphore>,
    pub(crate) sessions: Arc<Semaphore>,
    pub(crate) next_session_id: AtomicU64,
}

/// Open sessions per tenant, against each tenant's `max_sessions`.
#[derive(Debug, Default)]
pub(crate) struct TenantSessions(Arc<Mutex<HashMap<Arc<str>, usize>>>);

/// One counted session; uncounts itself when dropped.
#[derive(Debug)]
pub(crate) struct TenantSlot {
    counts: Arc<Mutex<HashMap<Arc<str>, usize>>>,
    tenant: Arc<str>,
}

impl TenantSessions {
    /// Counts a session of `tenant`, unless it already has `max` open.
    pub(crate) fn acquire(&self, tenant: &Arc<str>, max: usize) -> Option<TenantSlot> {
        let mut counts = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = counts.entry(tenant.clone()).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(TenantSlot { counts: self.0.clone(), tenant: tenant.clone() })
    }
}

impl Drop for TenantSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = counts.get_mut(&self.tenant) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.tenant);
            }
        }
    }
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
    let session_id = ctx.next_session_id.fetch_add(1, Ordering::Relaxed);
    let span =
        info_span!("session", id = session_id, tenant = field::Empty, room = field::Empty, member = field::Empty);
    debug!(parent: &span, %remote, "session accepted");
    Session { conn, session_id, peer: remote.ip(), ctx, shutdown }.run(deadline).instrument(span).await;
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
    /// The peer closed the session or its connection was lost.
    Closed,
    /// The server is shutting down.
    Shutdown,
    /// A fatal error: tell the peer, then close with the code.
    Fatal(ErrorCode, &'static str),
}

fn close_code(code: ErrorCode) -> VarInt {
    VarInt::from_u32(u32::from(code.as_u16()))
}

/// A seat a session holds in a room. However the session ends (returning, failing, its task
/// panicking or being aborted), the room hears that the seat is free: [`Seat::leave`] says how,
/// and a seat dropped without leaving is freed as closed by the server.
#[derive(Debug)]
struct Seat {
    room: RoomHandle,
    member_id: u64,
    session_id: u64,
    held: bool,
}

impl Seat {
    fn new(room: RoomHandle, member_id: u64, session_id: u64) -> Self {
        Self { room, member_id, session_id, held: true }
    }

    /// Gives the seat up, telling the room how (a no-op there if it no longer holds it).
    async fn leave(mut self, how: Departure) {
        self.held = false;
        self.room.depart(self.member_id, self.session_id, how).await;
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        if self.held {
            self.room.depart_soon(self.member_id, self.session_id, Departure::Closed);
        }
    }
}

/// A joined session: the seat it holds and how to reach its room.
struct Joined {
    seat: Seat,
    principal: Principal,
    send: SendStream,
    recv: RecvStream,
    control_tx: mpsc::Sender<ServerMessage>,
    control_rx: mpsc::Receiver<ServerMessage>,
    kick: oneshot::Receiver<Kick>,
    _slot: TenantSlot,
}

struct Session {
    conn: Connection,
    session_id: u64,
    /// The client's address, for the failed-join limit.
    peer: IpAddr,
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
        let Some(joined) = joined else { return };
        self.serve(joined).await;
    }

    /// Opens the control stream and handles the hello: verifies the token, finds or creates
    /// the room, authorizes and takes a seat. On success the welcome is written; on failure
    /// the peer was told why and the session closed.
    async fn hello(&self, deadline: Instant) -> Option<Joined> {
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
                count_decode_error(&self.ctx.stats, e);
                return self.refuse(send, Refusal::new(e.code(), "the first frame did not decode")).await;
            }
            Ok(Err(ReadError::Stalled)) | Err(_) => {
                return self.refuse(send, Refusal::new(ErrorCode::HelloTimeout, "no hello in time")).await;
            }
        };
        let ClientMessage::Hello(hello) = first else {
            return self.refuse(send, Refusal::new(ErrorCode::HelloRequired, "the first frame must be a hello")).await;
        };
        if hello.version != PROTOCOL_VERSION {
            let refusal = Refusal::new(ErrorCode::UnsupportedVersion, "this server speaks protocol version 1");
            return self.refuse(send, refusal).await;
        }
        let principal = match self.ctx.tenants.verify(&hello.token) {
            Ok(principal) => principal,
            Err(e) => return self.refuse(send, Refusal::new(e.code(), e.to_string())).await,
        };
        Span::current().record("tenant", &*principal.tenant);
        let Some(tenant) = self.ctx.tenants.tenant(&principal.tenant) else {
            return self.refuse(send, Refusal::new(ErrorCode::Unauthorized, "unknown school")).await;
        };
        let Some(slot) = self.ctx.tenant_sessions.acquire(&principal.tenant, tenant.limits().max_sessions as usize)
        else {
            let refusal =
                Refusal::new(ErrorCode::TooManySessions, "your school has its maximum number of sessions open");
            return self.refuse(send, refusal).await;
        };
        let room = match &hello.room {
            RoomRequest::Join(code) => self
                .ctx
                .rooms
                .lookup(tenant, &principal, Some(self.peer), code)
                .and_then(|room| authorize(&principal, Some(&room.meta().tenant), Operation::Join).map(|()| room)),
            RoomRequest::Create(settings) => authorize(&principal, None, Operation::CreateRoom)
                .and_then(|()| self.ctx.rooms.create(tenant, &principal, settings)),
        };
        let room = match room {
            Ok(room) => room,
            Err(refusal) => return self.refuse(send, refusal).await,
        };
        Span::current().record("room", room.meta().code.as_str());

        let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
        let (kick_tx, kick) = oneshot::channel();
        let peer: Arc<dyn Peer> = Arc::new(self.conn.clone());
        let joining = Joining {
            session_id: self.session_id,
            subject: principal.subject.clone(),
            name: Name::truncating(&principal.name),
            role: principal.role.into(),
            token_expires_at: principal.expires_at_unix,
            peer,
            control_tx: control_tx.clone(),
            kick: kick_tx,
        };
        let welcome = match room.join(joining).await {
            Ok(welcome) => welcome,
            Err(refusal) => return self.refuse(send, refusal).await,
        };
        let member_id = welcome.member_id;
        let seat = Seat::new(room, member_id, self.session_id);
        Span::current().record("member", member_id);
        let written = match wire::encode_frame(&ServerMessage::Welcome(welcome)) {
            Ok(bytes) => send.write_all(&bytes).await.is_ok(),
            Err(e) => {
                warn!(error = %e, "welcome did not encode");
                false
            }
        };
        if !written {
            seat.leave(Departure::Lost).await;
            self.conn.close(close_code(ErrorCode::Internal), b"");
            return None;
        }
        info!(role = ?principal.role, "joined");
        Some(Joined { seat, principal, send, recv, control_tx, control_rx, kick, _slot: slot })
    }

    /// Tells the peer why its hello was refused, then closes the session with that code.
    async fn refuse<T>(&self, mut send: SendStream, refusal: Refusal) -> Option<T> {
        let code = refusal.code;
        self.ctx.stats.hello_failures.inc(code);
        self.ctx.stats.refused.inc(code);
        debug!(code = code.as_str(), message = %refusal.message, "hello refused");
        if let Ok(bytes) = wire::encode_frame(&error_frame(code, None, &refusal.message)) {
            let _ = timeout(FLUSH_TIMEOUT, async {
                if send.write_all(&bytes).await.is_ok() {
                    let _ = send.finish().await;
                }
            })
            .await;
        }
        self.conn.close(close_code(code), code.as_str().as_bytes());
        None
    }

    /// The joined session: a writer task drains the control queue; this task reads control
    /// frames, answers clock sync and forwards notes until either side ends it.
    async fn serve(&self, joined: Joined) {
        let Joined { seat, principal, send, mut recv, control_tx, control_rx, kick, _slot } = joined;
        let (room, member_id) = (seat.room.clone(), seat.member_id);
        let writer = tokio::spawn(write_loop(send, control_rx).instrument(Span::current()));
        let mut shutdown = self.shutdown.clone();
        let (expiry_tx, expiry_rx) = watch::channel(principal.expires_at_unix);
        let mut control = Control::new(&self.ctx, &room, member_id, self.session_id, principal, expiry_tx);
        let datagrams =
            Datagrams { conn: &self.conn, ctx: &self.ctx, room: &room, member_id, session_id: self.session_id };
        let end = tokio::select! {
            end = control.run(&mut recv, &control_tx) => end,
            () = datagrams.run() => End::Closed,
            () = shutdown.wait() => End::Shutdown,
            () = token_expiry(expiry_rx) => End::Fatal(ErrorCode::TokenExpired, "the token expired; join again with a fresh one"),
            kicked = kick => match kicked {
                Ok(Kick { code, message }) => End::Fatal(code, message),
                // The room ended without saying why (server shutdown).
                Err(_) => End::Shutdown,
            },
        };
        let (code, message) = match end {
            End::Closed => {
                // Polled once: resolves only if the connection is already closed.
                let how = match timeout(Duration::ZERO, self.conn.closed()).await.ok() {
                    Some(ConnectionError::ApplicationClosed(_)) | None => Departure::Left,
                    Some(_) => Departure::Lost,
                };
                debug!(?how, "session ended");
                seat.leave(how).await;
                writer.abort();
                self.conn.close(VarInt::from_u32(0), b"");
                return;
            }
            End::Shutdown => (ErrorCode::ShuttingDown, "the server is shutting down"),
            End::Fatal(code, message) => (code, message),
        };
        // Frees the seat unless the room already did (kicked sessions no longer hold it).
        seat.leave(Departure::Closed).await;
        debug!(code = code.as_str(), "closing session");
        let _ = control_tx.try_send(error_frame(code, None, message));
        drop(control_tx);
        if timeout(FLUSH_TIMEOUT, writer).await.is_err() {
            debug!("control stream did not flush in time");
        }
        self.conn.close(close_code(code), message.as_bytes());
    }
}

/// Counts a control frame that did not decode, by kind.
fn count_decode_error(stats: &Stats, e: DecodeError) {
    match e {
        DecodeError::TooLarge { .. } => stats.frames_too_large.inc(),
        _ => stats.frames_malformed.inc(),
    }
}

/// Resolves once the token (whose expiry, in Unix seconds, `rx` holds) has expired. An expiry
/// past what the system clock can represent never comes (and overflows nothing).
async fn token_expiry(mut rx: watch::Receiver<u64>) {
    loop {
        let expires_at = *rx.borrow_and_update();
        let deadline = SystemTime::UNIX_EPOCH
            .checked_add(Duration::from_secs(expires_at))
            .and_then(|at| at.checked_add(EXPIRY_LEEWAY));
        let Some(deadline) = deadline else {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
            continue;
        };
        let left = deadline.duration_since(SystemTime::now()).unwrap_or_default();
        tokio::select! {
            () = tokio::time::sleep(left) => {
                // The wall clock may have been stepped while sleeping: check again.
                if SystemTime::now() >= deadline {
                    return;
                }
            }
            changed = rx.changed() => if changed.is_err() {
                std::future::pending::<()>().await;
            },
        }
    }
}

/// The control-stream side of a joined session.
struct Control<'a> {
    ctx: &'a SessionContext,
    room: &'a RoomHandle,
    member_id: u64,
    session_id: u64,
    principal: Principal,
    expiry: watch::Sender<u64>,
    limit: TokenBucket,
    reports: TokenBucket,
    abuse: TokenBucket,
}

impl<'a> Control<'a> {
    fn new(
        ctx: &'a SessionContext,
        room: &'a RoomHandle,
        member_id: u64,
        session_id: u64,
        principal: Principal,
        expiry: watch::Sender<u64>,
    ) -> Self {
        let limits = ctx.tenants.tenant(&principal.tenant).map(|t| *t.limits()).unwrap_or_default();
        let now = ctx.clock.now().0;
        Self {
            ctx,
            room,
            member_id,
            session_id,
            principal,
            expiry,
            limit: TokenBucket::new(limits.controls_per_second, limits.control_burst, now),
            reports: TokenBucket::new(REPORTS_PER_SECOND, 3, now),
            abuse: TokenBucket::new(ABUSE_PER_SECOND, ABUSE_BURST, now),
        }
    }

    async fn run(&mut self, recv: &mut RecvStream, control_tx: &mpsc::Sender<ServerMessage>) -> End {
        loop {
            let message = match read_frame(recv).await {
                Ok(message) => message,
                Err(ReadError::Closed) => return End::Closed,
                Err(ReadError::Decode(e)) => {
                    count_decode_error(&self.ctx.stats, e);
                    self.ctx.stats.refused.inc(e.code());
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
            };
            let now = self.ctx.clock.now().0;
            if let ClientMessage::Report(report) = message {
                if self.reports.try_take(now) {
                    self.room.report(self.member_id, self.session_id, report);
                }
                continue;
            }
            if !self.limit.try_take(now) {
                self.ctx.stats.refused.inc(ErrorCode::RateLimited);
                if !self.abuse.try_take(now) {
                    self.ctx.stats.sessions_closed_for_abuse.inc();
                    return End::Fatal(ErrorCode::RateLimited, "too many control messages");
                }
                let request_id = request_id_of(&message);
                let reply = error_frame(ErrorCode::RateLimited, request_id, "too many control messages; slow down");
                if control_tx.send(reply).await.is_err() {
                    return End::Closed;
                }
                continue;
            }
            let reply = match message {
                ClientMessage::Hello(_) => {
                    self.ctx.stats.refused.inc(ErrorCode::UnexpectedMessage);
                    error_frame(ErrorCode::UnexpectedMessage, None, "this session already said hello")
                }
                ClientMessage::Control(request) => {
                    let op = Operation::Control(&request.op);
                    match authorize(&self.principal, Some(&self.room.meta().tenant), op) {
                        Ok(()) => {
                            // The room answers on this stream, in order with its broadcasts.
                            if !self.room.control_from(self.member_id, request.request_id, request.op).await {
                                return End::Fatal(ErrorCode::RoomClosed, "the room was closed");
                            }
                            continue;
                        }
                        Err(refusal) => {
                            self.ctx.stats.refused.inc(refusal.code);
                            error_frame(refusal.code, Some(request.request_id), &refusal.message)
                        }
                    }
                }
                ClientMessage::RefreshToken { request_id, token } => self.refresh(request_id, &token),
                ClientMessage::Reflect(reflection) => {
                    // The room checks it against its prompts and answers on this stream once
                    // it is committed (or refused).
                    if !self.room.reflect(self.member_id, self.session_id, reflection).await {
                        return End::Fatal(ErrorCode::RoomClosed, "the room was closed");
                    }
                    continue;
                }
                ClientMessage::Report(_) => continue,
            };
            if control_tx.send(reply).await.is_err() {
                // The room dropped this member (too slow) and the writer is gone.
                return End::Closed;
            }
        }
    }

    /// Takes a fresh token for the same tenant, subject and role; the session's expiry moves.
    fn refresh(&mut self, request_id: u32, token: &str) -> ServerMessage {
        let fresh = match self.ctx.tenants.verify(token) {
            Ok(fresh) => fresh,
            Err(e) => {
                self.ctx.stats.refused.inc(e.code());
                return error_frame(e.code(), Some(request_id), &e.to_string());
            }
        };
        if fresh.tenant != self.principal.tenant
            || fresh.subject != self.principal.subject
            || fresh.role != self.principal.role
        {
            self.ctx.stats.refused.inc(ErrorCode::Forbidden);
            return error_frame(
                ErrorCode::Forbidden,
                Some(request_id),
                "a fresh token must name the same school, person and role",
            );
        }
        let expires_at = fresh.expires_at_unix;
        self.principal = fresh;
        self.expiry.send_replace(expires_at);
        debug!(expires_at, "token refreshed");
        ServerMessage::TokenRefreshed { request_id, expires_at }
    }
}

fn request_id_of(message: &ClientMessage) -> Option<u32> {
    match message {
        ClientMessage::Control(request) => Some(request.request_id),
        ClientMessage::RefreshToken { request_id, .. } => Some(*request_id),
        ClientMessage::Reflect(reflection) => Some(reflection.request_id),
        ClientMessage::Hello(_) | ClientMessage::Report(_) => None,
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

/// The datagram side of a joined session: clock sync and notes.
struct Datagrams<'a> {
    conn: &'a Connection,
    ctx: &'a SessionContext,
    room: &'a RoomHandle,
    member_id: u64,
    session_id: u64,
}

impl Datagrams<'_> {
    /// Answers clock-sync requests and hands notes to the room until the connection ends.
    /// `t1` is stamped the moment a datagram is handed over, before decoding; `t2` just
    /// before the reply is sent.
    async fn run(&self) {
        let (clock, stats) = (self.ctx.clock, &self.ctx.stats);
        let mut bucket = TokenBucket::new(DATAGRAMS_PER_SECOND, DATAGRAM_BURST, clock.now().0);
        loop {
            let Ok(datagram) = self.conn.receive_datagram().await else { return };
            let t1 = clock.now();
            stats.datagrams_received.inc();
            if !bucket.try_take(t1.0) {
                stats.datagrams_rate_limited.inc();
                continue;
            }
            match wire::decode_client_datagram(&datagram) {
                Err(_) => stats.datagrams_malformed.inc(),
                Ok(ClientDatagram::SyncRequest(request)) => {
                    let reply =
                        ServerDatagram::SyncReply(SyncReply { id: request.id, t0: request.t0, t1, t2: clock.now() });
                    let sent =
                        wire::encode_server_datagram(&reply).is_ok_and(|bytes| self.conn.send_datagram(bytes).is_ok());
                    if sent {
                        stats.datagrams_sent.inc();
                        stats.sync_replies_sent.inc();
                    } else {
                        stats.datagrams_send_failed.inc();
                    }
                }
                Ok(ClientDatagram::Notes(notes)) => {
                    stats.note_datagrams_received.inc();
                    if !self.room.notes(self.member_id, self.session_id, notes) {
                        stats.notes_dropped.inc(ErrorCode::ServerBusy);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use downbeat_protocol::{LeaveReason, MicroBpm, RoomSettings};

    use crate::auth::{DEMO_TENANT_ID, Role};
    use crate::config::Config;
    use crate::room::RoomsConfig;
    use crate::sel::Sel;
    use crate::sel::store::Store;

    #[tokio::test(start_paused = true)]
    async fn an_expiry_too_far_for_the_clock_never_comes_and_never_panics() {
        let (tx, rx) = watch::channel(u64::MAX);
        let expiry = tokio::spawn(token_expiry(rx));
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert!(!expiry.is_finished(), "a far-future expiry fired");
        // A refreshed expiry in the past takes over.
        tx.send_replace(1);
        expiry.await.expect("the expiry task did not panic");
    }

    /// A member's connection in these tests: takes no datagrams and closes nothing.
    #[derive(Debug)]
    struct Offline;

    impl Peer for Offline {
        fn max_datagram_size(&self) -> Option<usize> {
            None
        }

        fn send_datagram(&self, _: &[u8]) -> bool {
            false
        }

        fn close(&self, _: ErrorCode, _: &str) {}
    }

    /// Seats `principal` in `room` as session `session_id`: its member id and control queue.
    async fn seat(room: &RoomHandle, principal: &Principal, session_id: u64) -> (u64, mpsc::Receiver<ServerMessage>) {
        let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
        let joining = Joining {
            session_id,
            subject: principal.subject.clone(),
            name: Name::truncating(&principal.name),
            role: principal.role.into(),
            token_expires_at: principal.expires_at_unix,
            peer: Arc::new(Offline),
            control_tx,
            kick: oneshot::channel().0,
        };
        (room.join(joining).await.expect("seated").member_id, control_rx)
    }

    #[tokio::test]
    async fn a_session_task_that_panics_frees_its_seat() {
        let dir = tempfile::tempdir().unwrap();
        let tenants = Tenants::new(&Config { data_dir: dir.path().to_owned(), ..Config::default() }).unwrap();
        let store = Store::open(&format!("sqlite://{}", dir.path().join("sel.sqlite3").display())).await.unwrap();
        let stats = Arc::new(Stats::default());
        let (_trigger, shutdown) = crate::shutdown::channel();
        let (sel, _writer) = Sel::spawn(store, 16, stats.clone(), shutdown.clone());
        let config = RoomsConfig {
            engine: downbeat_engine::room::Config::default(),
            max_rooms: 1,
            idle_expiry_nanos: 3_600_000_000_000,
            seat_grace_nanos: 60_000_000_000,
        };
        let rooms = Arc::new(Rooms::new(config, ServerClock::new(), stats, sel, shutdown));
        let principal = |role, subject: &str| {
            let token = tenants.mint(DEMO_TENANT_ID, role, subject, subject, Duration::from_secs(60)).unwrap();
            tenants.verify(&token).unwrap()
        };
        let teacher = principal(Role::Teacher, "t-1");
        let settings =
            RoomSettings { name: Name::truncating("Room"), tempo: MicroBpm::from_bpm(100), beats_per_bar: 4 };
        let room = rooms.create(tenants.tenant(DEMO_TENANT_ID).unwrap(), &teacher, &settings).unwrap();
        let (_, mut teacher_rx) = seat(&room, &teacher, 1).await;
        let (student, _student_rx) = seat(&room, &principal(Role::Student, "s-1"), 2).await;

        // The session task holds the seat as `Session::hello` hands it over, then panics.
        let held = Seat::new(room.clone(), student, 2);
        let task = tokio::spawn(async move {
            let _seat = held;
            panic!("a bug in the session task");
        });
        assert!(task.await.unwrap_err().is_panic());

        let left = timeout(Duration::from_secs(10), async {
            loop {
                match teacher_rx.recv().await.expect("the room is open") {
                    ServerMessage::MemberLeft { member_id, reason } => return (member_id, reason),
                    _ => continue,
                }
            }
        })
        .await
        .expect("the teacher heard the student leave");
        assert_eq!(left, (student, LeaveReason::Closed));
        let members: Vec<u64> = room.view().await.unwrap().members.iter().map(|(m, _)| m.id).collect();
        assert!(!members.contains(&student), "{members:?}");
    }
}
