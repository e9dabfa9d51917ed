//! Sessions: what every session does whatever carries it, and the two transports that carry
//! it.
//!
//! The hello and its checks, control frames, clock sync, notes, token expiry and how a
//! session ends are written once, here; [`webtransport`] (a QUIC session: one bidirectional
//! stream and datagrams) and [`websocket`] (one WebSocket, for networks that block QUIC) only
//! move bytes. So both transports have one authorization, one set of limits and the same error
//! codes.
//!
//! A session's first frame is a hello (it joins a room) or a probe (a network check that may
//! only sync its clock for a while: [`probe`]); both kinds end through the same path.
//!
//! Every session runs in one task (plus a writer task draining its queues) inside a tracing
//! span with its member id and room. Nothing a peer sends can panic the server: lengths are
//! checked before allocating, decode errors become stable error codes, and a bad datagram is
//! dropped and counted while the session carries on.

mod h3;
pub(crate) mod probe;
mod race;
pub(crate) mod websocket;
mod webtransport;

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use self::probe::{ProbeSlot, Probes};
use self::race::race;
use downbeat_engine::limit::TokenBucket;
use downbeat_protocol::{
    self as wire, ClientDatagram, ClientMessage, DecodeError, ErrorCode, MAX_SYNC_REPLY_LEN, PROTOCOL_VERSION,
    RoomRequest, ServerDatagram, ServerMessage, ServerNanos, SyncReply, SyncRequest, Transport,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tracing::{Span, debug, field, info, info_span, warn};

use crate::auth::{Principal, Tenants};
use crate::authz::{Operation, Refusal, authorize};
use crate::clock::ServerClock;
use crate::limits::{NetworkPlace, PerNetwork, Place, Places};
use crate::room::{Departure, Joining, Kick, Outgoing, Peer, RoomHandle, RoomMeta, Rooms, SessionCounters};
use crate::shutdown::Shutdown;
use crate::stats::Stats;
use downbeat_engine::room::error_frame;

pub(crate) use self::webtransport::accept_loop;

/// Messages a member's control queue holds before the room disconnects them as too slow.
const CONTROL_QUEUE: usize = 64;
/// How long a closing session waits for its last frames to be acknowledged.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);
/// How long shutdown waits for sessions to say goodbye before aborting them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
/// Sustained datagrams per second a session may send (clock sync and notes); more are dropped.
const DATAGRAMS_PER_SECOND: u32 = 100;
/// Burst of datagrams allowed above the sustained rate.
const DATAGRAM_BURST: u32 = 200;
/// A session asks its room to repair a stale timeline at most this often, whatever its peer
/// claims: no more frames than a room's burst pace sends every member anyway, and the room's
/// command queue, which classmates' notes share, is not flooded.
const REPAIR_INTERVAL_NANOS: u64 = 100_000_000;
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
    /// A session that receives nothing for this long is lost (QUIC's idle timeout; WebSocket
    /// sessions apply it to their reads).
    pub(crate) idle_timeout: Duration,
    /// How often the server makes sure an idle peer answers (QUIC's keep-alive; WebSocket
    /// sessions send a ping).
    pub(crate) keep_alive: Duration,
    /// QUIC handshakes in progress, in all (at most `max_handshakes`)...
    pub(crate) handshakes: Arc<Semaphore>,
    pub(crate) max_handshakes: usize,
    /// ...and per client network.
    pub(crate) handshakes_per_network: PerNetwork,
    /// Handshakes in progress past which new QUIC connections must prove their address first.
    pub(crate) retry_above_handshakes: usize,
    /// Sessions (both transports), in all...
    pub(crate) sessions: Arc<Semaphore>,
    /// ...and per client network.
    pub(crate) sessions_per_network: PerNetwork,
    pub(crate) probes: Probes,
    pub(crate) next_session_id: AtomicU64,
}

/// A session's places under the server's session limit and its client network's, held for
/// as long as it lives (whichever transport carries it).
#[derive(Debug)]
pub(crate) struct SessionPlaces {
    _server: OwnedSemaphorePermit,
    _network: NetworkPlace,
}

/// Which limit refused a new session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SessionsFull {
    /// `max_sessions`.
    Server,
    /// `max_sessions_per_address`.
    Network,
}

impl SessionsFull {
    /// What the refused client is told.
    pub(crate) fn message(self) -> &'static str {
        match self {
            Self::Server => "this server has its maximum number of sessions open",
            Self::Network => "this network has its maximum number of sessions open",
        }
    }
}

impl SessionContext {
    /// Places for a new session from `peer`, or the limit that refuses it (counted).
    pub(crate) fn session_places(&self, peer: IpAddr) -> Result<SessionPlaces, SessionsFull> {
        let Ok(server) = self.sessions.clone().try_acquire_owned() else {
            self.stats.handshakes_refused.inc();
            warn!("session limit reached; refusing a session");
            return Err(SessionsFull::Server);
        };
        let Some(network) = self.sessions_per_network.try_take(peer) else {
            self.stats.handshakes_refused.inc();
            debug!(%peer, "session limit of this network reached; refusing a session");
            return Err(SessionsFull::Network);
        };
        Ok(SessionPlaces { _server: server, _network: network })
    }
}

/// Open sessions per tenant, against each tenant's `max_sessions`.
pub(crate) type TenantSessions = Places<Arc<str>>;

/// One counted session of a tenant; uncounts itself when dropped.
pub(crate) type TenantSlot = Place<Arc<str>>;

/// Why reading a control frame failed.
#[derive(Debug)]
enum ReadError {
    /// The stream or connection ended.
    Closed,
    /// The bytes were not a frame; the stream is out of step.
    Decode(DecodeError),
    /// A header arrived but its body did not follow in time.
    Stalled,
}

/// A joined session: the seat it holds and how to reach its room.
#[derive(Debug)]
struct Joined {
    seat: Seat,
    principal: Principal,
    control_tx: mpsc::Sender<Outgoing>,
    control_rx: mpsc::Receiver<Outgoing>,
    kick: oneshot::Receiver<Kick>,
    /// Its datagram counts (the inspector's).
    counters: Arc<SessionCounters>,
    _slot: TenantSlot,
}

/// What a session was admitted as (its first answer is written before it is served).
#[derive(Debug)]
enum Admitted {
    /// A member of a room (answered with the welcome): [`Session::serve`].
    Joined(Joined),
    /// A network check (answered with [`ServerMessage::ProbeStarted`]): [`Session::probe`].
    Probe(ProbeSlot),
}

impl Admitted {
    /// The first answer could not be written: the seat (if any) is given up, `how` telling the
    /// room whether it may be held for a reconnect (`Lost`) or is freed now.
    async fn abandon(self, how: Departure) {
        if let Self::Joined(joined) = self {
            joined.seat.leave(how).await;
        }
    }
}

/// What a transport does for an admitted session; the rest is [`Session::serve`] and
/// [`Session::probe`].
trait Link: Send {
    /// Starts the task that writes queued control messages (and whatever else the transport
    /// sends from its own queues) until `rx` closes; it says goodbye with the code given to
    /// [`Link::closing`], if any.
    fn spawn_writer(&mut self, rx: mpsc::Receiver<Outgoing>) -> JoinHandle<()>;

    /// Reads what the peer sends, handing control frames to `control` and datagrams to
    /// `datagrams`, until the peer ends the session or a frame ends it.
    fn read<'a>(
        &'a mut self,
        control: &'a mut Control<'_>,
        datagrams: &'a mut Datagrams<'_>,
        control_tx: &'a mpsc::Sender<Outgoing>,
    ) -> impl Future<Output = End> + Send + 'a;

    /// After [`End::Closed`]: whether the peer left or was lost.
    fn departure(&self) -> impl Future<Output = Departure> + Send + '_;

    /// The session is about to end with `code`: the writer's goodbye carries it.
    fn closing(&self, code: ErrorCode, message: &'static str);

    /// Closes at once (`None`: a normal close).
    fn close(&self, code: Option<ErrorCode>, message: &str);

    /// After the goodbye was written, before [`Link::close`]: waits, at most
    /// [`FLUSH_TIMEOUT`], until the peer can no longer lose it (it read the goodbye and
    /// closed, or the transport's own closing handshake ran).
    fn linger(&mut self) -> impl Future<Output = ()> + Send + '_;
}

/// One session, whatever carries it.
#[derive(Debug)]
struct Session {
    session_id: u64,
    carrier: Transport,
    /// The client's address, for the failed-join limit.
    peer: IpAddr,
    ctx: Arc<SessionContext>,
    shutdown: Shutdown,
}

/// Counts a session open while it lives, in all and per carrier.
#[derive(Debug)]
struct ActiveGuard(Arc<Stats>, Transport);

impl ActiveGuard {
    fn new(stats: &Arc<Stats>, carrier: Transport) -> Self {
        stats.sessions_total.inc();
        stats.sessions_active.inc();
        stats.transport_sessions_total.get(carrier).inc();
        stats.transport_sessions_active.get(carrier).inc();
        Self(stats.clone(), carrier)
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.sessions_active.dec();
        self.0.transport_sessions_active.get(self.1).dec();
    }
}

impl Session {
    /// A new session of `carrier` from `peer`, with its id and tracing span.
    fn new(ctx: Arc<SessionContext>, carrier: Transport, peer: IpAddr, shutdown: Shutdown) -> (Self, Span) {
        let session_id = ctx.next_session_id.fetch_add(1, Ordering::Relaxed);
        let span = info_span!(
            "session",
            id = session_id,
            transport = carrier.as_str(),
            tenant = field::Empty,
            room = field::Empty,
            member = field::Empty
        );
        (Self { session_id, carrier, peer, ctx, shutdown }, span)
    }

    /// Checks the first control frame (`first`): a hello takes a seat, reachable through
    /// `conn`; a probe takes a place under the probe caps. Returns what the session holds and
    /// must answer first (the welcome, or the probe's start), or why not (counted; `None` when
    /// the peer left before saying anything).
    async fn admit(
        &self,
        first: Result<ClientMessage, ReadError>,
        conn: Arc<dyn Peer>,
    ) -> Result<(Admitted, ServerMessage), Option<Refusal>> {
        let refused = |refusal: Refusal| {
            let code = refusal.code;
            self.ctx.stats.hello_failures.inc(code);
            self.ctx.stats.refused.inc(code);
            debug!(code = code.as_str(), message = %refusal.message, "hello refused");
            Some(refusal)
        };
        let first = match first {
            Ok(message) => message,
            Err(ReadError::Closed) => {
                debug!("closed before saying hello");
                return Err(None);
            }
            Err(ReadError::Decode(e)) => {
                count_decode_error(&self.ctx.stats, e);
                return Err(refused(Refusal::new(e.code(), "the first frame did not decode")));
            }
            Err(ReadError::Stalled) => return Err(refused(Refusal::new(ErrorCode::HelloTimeout, "no hello in time"))),
        };
        let hello = match first {
            ClientMessage::Hello(hello) => hello,
            ClientMessage::Probe { version } => return self.admit_probe(version),
            _ => return Err(refused(Refusal::new(ErrorCode::HelloRequired, "the first frame must be a hello"))),
        };
        if hello.version != PROTOCOL_VERSION {
            return Err(refused(Refusal::new(ErrorCode::UnsupportedVersion, "this server speaks protocol version 1")));
        }
        let principal =
            self.ctx.tenants.verify(&hello.token).map_err(|e| refused(Refusal::new(e.code(), e.to_string())))?;
        Span::current().record("tenant", &*principal.tenant);
        if principal.role == crate::auth::Role::Operator {
            let message = "operators do not join rooms: the inspector observes them";
            return Err(refused(Refusal::new(ErrorCode::Forbidden, message)));
        }
        let Some(tenant) = self.ctx.tenants.tenant(&principal.tenant) else {
            return Err(refused(Refusal::new(ErrorCode::Unauthorized, "unknown school")));
        };
        // In a cluster, the school's sessions on the other nodes count too (as they last said).
        let elsewhere = self.ctx.rooms.cluster().map_or(0, |c| c.elsewhere(tenant.id()).sessions as usize);
        let cap = (tenant.limits().max_sessions as usize).saturating_sub(elsewhere);
        let Some(slot) = self.ctx.tenant_sessions.try_take(&principal.tenant, cap) else {
            let refusal =
                Refusal::new(ErrorCode::TooManySessions, "your school has its maximum number of sessions open");
            return Err(refused(refusal));
        };
        let room = match &hello.room {
            RoomRequest::Join(code) => {
                // In a cluster, a room another node holds: the client is told where.
                match self.ctx.rooms.moved(tenant, &principal, Some(self.peer), code).await {
                    Ok(Some(to)) => return Err(refused(Refusal::moved(to))),
                    Ok(None) => {}
                    Err(refusal) => return Err(refused(refusal)),
                }
                self.ctx
                    .rooms
                    .lookup(tenant, &principal, Some(self.peer), code)
                    .and_then(|room| authorize(&principal, Some(room.meta()), Operation::Join).map(|()| room))
            }
            RoomRequest::Create(settings) => match authorize(&principal, None, Operation::CreateRoom) {
                Ok(()) => self.ctx.rooms.open(tenant, &principal, settings).await,
                Err(refusal) => Err(refusal),
            },
        };
        let room = room.map_err(refused)?;
        Span::current().record("room", room.meta().code.as_str());

        let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
        let (kick_tx, kick) = oneshot::channel();
        let counters = Arc::new(SessionCounters::default());
        let joining = Joining {
            session_id: self.session_id,
            who: principal.clone(),
            transport: self.carrier,
            peer: conn,
            control_tx: control_tx.clone(),
            kick: kick_tx,
            counters: counters.clone(),
        };
        let welcome = room.join(joining).await.map_err(refused)?;
        let seat = Seat::new(room, welcome.member_id, self.session_id);
        Span::current().record("member", welcome.member_id);
        info!(role = ?principal.role, "joined");
        let joined = Joined { seat, principal, control_tx, control_rx, kick, counters, _slot: slot };
        Ok((Admitted::Joined(joined), ServerMessage::Welcome(welcome)))
    }

    /// A probe's first frame: no token, no room; a place under the caps.
    fn admit_probe(&self, version: u16) -> Result<(Admitted, ServerMessage), Option<Refusal>> {
        let refused = |refusal: Refusal| {
            self.ctx.stats.refused.inc(refusal.code);
            debug!(code = refusal.code.as_str(), message = %refusal.message, "probe refused");
            Some(refusal)
        };
        if version != PROTOCOL_VERSION {
            return Err(refused(Refusal::new(ErrorCode::UnsupportedVersion, "this server speaks protocol version 1")));
        }
        let Some(slot) = self.ctx.probes.admit(self.peer, self.carrier, &self.ctx.stats) else {
            let message = "too many network checks are running; try again in a minute";
            return Err(refused(Refusal::new(ErrorCode::TooManyProbes, message)));
        };
        debug!("network check started");
        let duration_ms = u32::try_from(self.ctx.probes.duration.as_millis()).unwrap_or(u32::MAX);
        Ok((Admitted::Probe(slot), ServerMessage::ProbeStarted { duration_ms }))
    }

    /// Serves what the session was admitted as, once its answer is written.
    /// The link is lent, not given: a value moved into a nested `async fn` stays in the
    /// session's future twice (as the callee's argument and its local), for the session's life.
    async fn run(&self, link: &mut impl Link, admitted: Admitted) {
        match admitted {
            Admitted::Joined(joined) => self.serve(link, joined).await,
            Admitted::Probe(slot) => self.probe(link, slot).await,
        }
    }

    /// The joined session: the link's writer drains the control queue; the link reads control
    /// frames, clock sync and notes until either side ends the session.
    async fn serve(&self, link: &mut impl Link, joined: Joined) {
        let Joined { seat, principal, control_tx, control_rx, kick, counters, _slot } = joined;
        let (room, member_id) = (seat.room.clone(), seat.member_id);
        let mut writer = link.spawn_writer(control_rx);
        let mut shutdown = self.shutdown.clone();
        let (expiry_tx, expiry_rx) = watch::channel(principal.expires_at_unix);
        let member =
            Member { ctx: &self.ctx, room: &room, member_id, session_id: self.session_id, counters: &counters };
        let mut control = Control::Member(Box::new(MemberControl::new(member, self.carrier, principal, expiry_tx)));
        let mut datagrams = Datagrams::new(&self.ctx, Some(member));
        // What the peer sends wakes the link's read, not these. The futures are built in place
        // (a future held in a local and then moved would be held twice).
        let end = race(link.read(&mut control, &mut datagrams, &control_tx), async {
            tokio::select! {
                // The writer only stops early when its transport failed.
                _ = &mut writer => End::Closed,
                () = shutdown.wait() => End::Shutdown,
                () = token_expiry(expiry_rx) => End::Fatal(ErrorCode::TokenExpired, "the token expired; join again with a fresh one"),
                kicked = kick => match kicked {
                    Ok(Kick { code, message }) => End::Fatal(code, message),
                    // The room ended without saying why (server shutdown).
                    Err(_) => End::Shutdown,
                },
            }
        })
        .await;
        drop((control, datagrams));
        self.finish(link, writer, control_tx, end, Held::Seat(seat)).await;
    }

    /// The probe: the link reads clock sync (and nothing else) until its time is up or either
    /// side ends it.
    async fn probe(&self, link: &mut impl Link, slot: ProbeSlot) {
        let (control_tx, control_rx) = mpsc::channel(1);
        let mut writer = link.spawn_writer(control_rx);
        let mut shutdown = self.shutdown.clone();
        let mut control = Control::Probe(&self.ctx);
        let mut datagrams = Datagrams::new(&self.ctx, None);
        let end = tokio::select! {
            end = link.read(&mut control, &mut datagrams, &control_tx) => end,
            _ = &mut writer => End::Closed,
            () = shutdown.wait() => End::Shutdown,
            () = tokio::time::sleep(self.ctx.probes.duration) => End::Fatal(ErrorCode::ProbeOver, "the network check is over"),
        };
        drop((control, datagrams));
        self.finish(link, writer, control_tx, end, Held::Probe(slot)).await;
    }

    /// How every session ends: what it holds is given back first (a seat is left, telling the
    /// room how; a probe's place is freed before the probe hears it ended), then the peer is
    /// told why (an error frame through the writer, then the transport's close with the code)
    /// and the link lingers until the goodbye cannot be lost.
    async fn finish(
        &self,
        link: &mut impl Link,
        mut writer: JoinHandle<()>,
        control_tx: mpsc::Sender<Outgoing>,
        end: End,
        held: Held,
    ) {
        let (code, message) = match end {
            End::Closed => {
                let how = link.departure().await;
                debug!(?how, "session ended");
                held.give_back(how).await;
                writer.abort();
                link.close(None, "");
                return;
            }
            End::Shutdown => (ErrorCode::ShuttingDown, "the server is shutting down"),
            End::Fatal(code, message) => (code, message),
        };
        // Frees the seat unless the room already did (kicked sessions no longer hold it).
        held.give_back(Departure::Closed).await;
        debug!(code = code.as_str(), "closing session");
        link.closing(code, message);
        let _ = control_tx.try_send(error_frame(code, None, message).into());
        drop(control_tx);
        if timeout(FLUSH_TIMEOUT, &mut writer).await.is_err() {
            debug!("control stream did not flush in time");
            writer.abort();
            // A peer that does not take the goodbye is not waited for again.
            link.close(Some(code), message);
        }
        link.linger().await;
        link.close(Some(code), message);
    }
}

/// The answer to a clock-sync request received at `t1`, stamped now: call it as late as
/// possible before the write.
fn sync_reply(clock: ServerClock, request: SyncRequest, t1: ServerNanos) -> Option<SyncReplyBytes> {
    let reply = ServerDatagram::SyncReply(SyncReply { id: request.id, t0: request.t0, t1, t2: clock.now() });
    let mut bytes = [0; MAX_SYNC_REPLY_LEN];
    let len = wire::encode_server_datagram_to_slice(&reply, &mut bytes).ok()?.len();
    Some(SyncReplyBytes { bytes, len })
}

/// An encoded clock-sync reply, on the stack. Every settled client asks once a second, so the
/// server encodes more of these than of anything else; encoded into a growing vector, each
/// cost three allocations before the transport's copy.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SyncReplyBytes {
    bytes: [u8; MAX_SYNC_REPLY_LEN],
    len: usize,
}

impl PartialEq for SyncReplyBytes {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for SyncReplyBytes {}

impl std::ops::Deref for SyncReplyBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// What an ending session gives back.
#[derive(Debug)]
enum Held {
    Seat(Seat),
    Probe(ProbeSlot),
}

impl Held {
    /// Gives it back: a seat is left (`how` tells the room), a probe's place freed.
    async fn give_back(self, how: Departure) {
        match self {
            Self::Seat(seat) => seat.leave(how).await,
            Self::Probe(slot) => drop(slot),
        }
    }
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

/// Who a joined session is, for what handles its input.
#[derive(Clone, Copy, Debug)]
struct Member<'a> {
    ctx: &'a SessionContext,
    room: &'a RoomHandle,
    member_id: u64,
    session_id: u64,
    counters: &'a Arc<SessionCounters>,
}

/// The control side of a session: what it does with the frames its peer sends.
#[derive(Debug)]
enum Control<'a> {
    /// A member's: checked and forwarded.
    Member(Box<MemberControl<'a>>),
    /// A probe's: none is allowed.
    Probe(&'a SessionContext),
}

impl<'a> Control<'a> {
    /// What every session shares.
    fn ctx(&self) -> &'a SessionContext {
        match self {
            Self::Member(member) => member.ctx,
            Self::Probe(ctx) => ctx,
        }
    }

    /// Handles one control frame as read (or why reading failed); `Some` ends the session.
    async fn handle(
        &mut self,
        read: Result<ClientMessage, ReadError>,
        control_tx: &mpsc::Sender<Outgoing>,
    ) -> Option<End> {
        match self {
            // Boxed: a control frame is rare next to the datagrams, and its handling (which may
            // wait on the room's queue) would otherwise take its room in every session's
            // future for the session's whole life.
            Self::Member(member) => Box::pin(member.handle(read, control_tx)).await,
            Self::Probe(ctx) => Some(probe::control(ctx, read)),
        }
    }
}

/// A control frame as read, or how the session ends because it could not be read (a frame
/// that did not decode, was too large or stalled is counted; a closed stream is the peer
/// leaving).
fn read_failure(ctx: &SessionContext, read: Result<ClientMessage, ReadError>) -> Result<ClientMessage, End> {
    match read {
        Ok(message) => Ok(message),
        Err(ReadError::Closed) => Err(End::Closed),
        Err(ReadError::Decode(e)) => {
            count_decode_error(&ctx.stats, e);
            ctx.stats.refused.inc(e.code());
            let message = match e {
                DecodeError::TooLarge { .. } => "frame larger than the limit",
                _ => "frame did not decode",
            };
            Err(End::Fatal(e.code(), message))
        }
        Err(ReadError::Stalled) => {
            ctx.stats.frames_malformed.inc();
            Err(End::Fatal(ErrorCode::MalformedFrame, "frame body did not arrive in time"))
        }
    }
}

/// The control side of a joined session: checks and forwards what the peer sends.
#[derive(Debug)]
struct MemberControl<'a> {
    ctx: &'a SessionContext,
    room: &'a RoomHandle,
    member_id: u64,
    session_id: u64,
    carrier: Transport,
    principal: Principal,
    expiry: watch::Sender<u64>,
    limit: TokenBucket,
    reports: TokenBucket,
    abuse: TokenBucket,
}

impl<'a> MemberControl<'a> {
    fn new(member: Member<'a>, carrier: Transport, principal: Principal, expiry: watch::Sender<u64>) -> Self {
        let Member { ctx, room, member_id, session_id, .. } = member;
        let limits = ctx.tenants.tenant(&principal.tenant).map(|t| *t.limits()).unwrap_or_default();
        let now = ctx.clock.now().0;
        Self {
            ctx,
            room,
            member_id,
            session_id,
            carrier,
            principal,
            expiry,
            limit: TokenBucket::new(limits.controls_per_second, limits.control_burst, now),
            reports: TokenBucket::new(REPORTS_PER_SECOND, 3, now),
            abuse: TokenBucket::new(ABUSE_PER_SECOND, ABUSE_BURST, now),
        }
    }

    /// Handles one control frame as read (or why reading failed); `Some` ends the session.
    async fn handle(
        &mut self,
        read: Result<ClientMessage, ReadError>,
        control_tx: &mpsc::Sender<Outgoing>,
    ) -> Option<End> {
        let message = match read_failure(self.ctx, read) {
            Ok(message) => message,
            Err(end) => return Some(end),
        };
        let now = self.ctx.clock.now().0;
        if let ClientMessage::Report(report) = message {
            if self.reports.try_take(now) {
                self.ctx
                    .stats
                    .transport_sync_uncertainty
                    .get(self.carrier)
                    .observe_micros(report.sync.uncertainty_micros);
                self.room.report(self.member_id, self.session_id, report);
            }
            return None;
        }
        if !self.limit.try_take(now) {
            self.ctx.stats.refused.inc(ErrorCode::RateLimited);
            if !self.abuse.try_take(now) {
                self.ctx.stats.sessions_closed_for_abuse.inc();
                return Some(End::Fatal(ErrorCode::RateLimited, "too many control messages"));
            }
            let request_id = request_id_of(&message);
            let reply = error_frame(ErrorCode::RateLimited, request_id, "too many control messages; slow down");
            return control_tx.send(reply.into()).await.is_err().then_some(End::Closed);
        }
        let reply = match message {
            ClientMessage::Hello(_) | ClientMessage::Probe { .. } => {
                self.ctx.stats.refused.inc(ErrorCode::UnexpectedMessage);
                error_frame(ErrorCode::UnexpectedMessage, None, "this session already said hello")
            }
            ClientMessage::Control(request) => {
                let op = Operation::Control(&request.op);
                match authorize(&self.principal, Some(self.room.meta()), op) {
                    Ok(()) => {
                        // The room answers on this stream, in order with its broadcasts.
                        if !self.room.control_from(self.member_id, request.request_id, request.op).await {
                            return Some(End::Fatal(ErrorCode::RoomClosed, "the room was closed"));
                        }
                        return None;
                    }
                    Err(refusal) => {
                        self.ctx.stats.refused.inc(refusal.code);
                        error_frame(refusal.code, Some(request.request_id), &refusal.message)
                    }
                }
            }
            ClientMessage::RefreshToken { request_id, token } => self.refresh(request_id, &token),
            ClientMessage::Reflect(reflection) => {
                // The room checks it against its prompts and answers on this stream once it
                // is committed (or refused).
                if !self.room.reflect(self.member_id, self.session_id, reflection).await {
                    return Some(End::Fatal(ErrorCode::RoomClosed, "the room was closed"));
                }
                return None;
            }
            ClientMessage::Report(_) => return None,
        };
        // A closed queue: the room dropped this member (too slow) and the writer is gone.
        control_tx.send(reply.into()).await.is_err().then_some(End::Closed)
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
        ClientMessage::Hello(_) | ClientMessage::Report(_) | ClientMessage::Probe { .. } => None,
    }
}

/// The datagram side of a session: clock sync, and a member's notes.
#[derive(Debug)]
struct Datagrams<'a> {
    ctx: &'a SessionContext,
    /// Whose notes go to which room; `None` for a probe, which may send none.
    member: Option<Member<'a>>,
    /// The session's datagram rate, shared with its [`SyncAnswer`].
    bucket: Arc<Mutex<TokenBucket>>,
    /// When this session last asked its room for a repair.
    last_repair: Option<ServerNanos>,
}

impl<'a> Datagrams<'a> {
    fn new(ctx: &'a SessionContext, member: Option<Member<'a>>) -> Self {
        let bucket = TokenBucket::new(DATAGRAMS_PER_SECOND, DATAGRAM_BURST, ctx.clock.now().0);
        Self { ctx, member, bucket: Arc::new(Mutex::new(bucket)), last_repair: None }
    }

    /// What answers this session's clock-sync requests where they arrive, as
    /// [`Datagrams::receive`] and [`sync_reply`] would.
    pub(crate) fn sync_answer(&self) -> SyncAnswer {
        SyncAnswer {
            clock: self.ctx.clock,
            stats: self.ctx.stats.clone(),
            bucket: self.bucket.clone(),
            member: self.member.map(|m| (m.room.shared_meta(), m.counters.clone())),
        }
    }

    /// Handles a datagram received at `t1` (stamped the moment it was handed over, before
    /// decoding): notes go to the room; a clock-sync request is returned for the transport to
    /// answer with [`sync_reply`] as late as it can, and tells the room when the member holds
    /// an older timeline than the room's. `Err`: the session ends (a probe sent
    /// notes).
    fn receive(&mut self, datagram: &[u8], t1: ServerNanos) -> Result<Option<SyncRequest>, End> {
        let stats = &self.ctx.stats;
        if !admit(stats, self.member.map(|m| &**m.counters), &self.bucket, t1) {
            return Ok(None);
        }
        match wire::decode_client_datagram(datagram) {
            Err(_) => stats.datagrams_malformed.inc(),
            Ok(ClientDatagram::SyncRequest(request)) => {
                // A member behind the room's timeline (it lost every frame of a change) gets
                // the current one at once; the room decides, asked only then, and at most
                // every REPAIR_INTERVAL_NANOS.
                if let Some(Member { room, member_id, session_id, .. }) = self.member
                    && request.epoch < room.meta().epoch()
                    && self.last_repair.is_none_or(|at| t1.0.saturating_sub(at.0) >= REPAIR_INTERVAL_NANOS)
                {
                    self.last_repair = Some(t1);
                    room.held_epoch(member_id, session_id, request.epoch);
                }
                return Ok(Some(request));
            }
            Ok(ClientDatagram::Notes(notes)) => {
                let Some(Member { room, member_id, session_id, .. }) = self.member else {
                    return Err(probe::not_sync(self.ctx));
                };
                stats.note_datagrams_received.inc();
                if !room.notes(member_id, session_id, notes) {
                    stats.notes_dropped.inc(ErrorCode::ServerBusy);
                }
            }
        }
        Ok(None)
    }
}

/// Counts a session's datagram received at `at` and takes it from the session's rate: false if
/// it is over the rate (counted as such), and then dropped. [`Datagrams::receive`] and
/// [`SyncAnswer::answer`] both admit what they handle through here.
fn admit(stats: &Stats, counters: Option<&SessionCounters>, bucket: &Mutex<TokenBucket>, at: ServerNanos) -> bool {
    stats.datagrams_received.inc();
    if let Some(counters) = counters {
        SessionCounters::count(&counters.received);
    }
    let admitted = bucket.lock().unwrap_or_else(PoisonError::into_inner).try_take(at.0);
    if !admitted {
        stats.datagrams_rate_limited.inc();
    }
    admitted
}

/// Answers a session's clock-sync requests without the session: where a transport hands over
/// datagrams on another thread (the QUIC driver), a request is answered there, in the packet
/// that acknowledges it, and the session's task is not woken for it. It answers only what
/// needs nothing of the session: a request naming the room's timeline (or a probe's). Any
/// other datagram (notes, one that does not decode, a request from a member behind the
/// room's timeline, which the room repairs) is the session's, through
/// [`Datagrams::receive`]. What it takes counts as the session would count it, against the
/// same rate.
#[derive(Debug)]
pub(crate) struct SyncAnswer {
    clock: ServerClock,
    stats: Arc<Stats>,
    bucket: Arc<Mutex<TokenBucket>>,
    /// The member's room (for its timeline) and its counters; `None` for a probe.
    member: Option<(Arc<RoomMeta>, Arc<SessionCounters>)>,
}

/// What a [`SyncAnswer`] does with a datagram.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Answered {
    /// Not one it answers: the session's.
    Pass,
    /// Over the session's rate: dropped, as the session would.
    Dropped,
    /// The reply (a server datagram), or `None` if it could not be encoded.
    Reply(Option<SyncReplyBytes>),
}

impl SyncAnswer {
    /// What to do with `datagram`, handed over now, whose packet reached the host at `arrived`
    /// (the kernel's stamp), if stamped.
    pub(crate) fn answer(&self, datagram: &[u8], arrived: Option<std::time::Instant>) -> Answered {
        let Ok(ClientDatagram::SyncRequest(request)) = wire::decode_client_datagram(datagram) else {
            return Answered::Pass;
        };
        if let Some((room, _)) = &self.member
            && request.epoch < room.epoch()
        {
            return Answered::Pass;
        }
        let handled = self.clock.now();
        if !admit(&self.stats, self.member.as_ref().map(|(_, counters)| &**counters), &self.bucket, handled) {
            return Answered::Dropped;
        }
        let t1 = crate::arrival::t1(self.clock, handled, arrived);
        Answered::Reply(sync_reply(self.clock, request, t1))
    }

    /// A reply it gave was handed to the transport (`sent`), or refused by it.
    pub(crate) fn replied(&self, sent: bool) {
        self.stats.count_sync_reply(sent);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use downbeat_protocol::{LeaveReason, MicroBpm, Name, RoomSettings};

    use crate::auth::{DEMO_TENANT_ID, Role};
    use crate::config::Config;
    use crate::room::{DatagramKind, RoomsConfig};
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

        fn send_datagram(&self, _: DatagramKind, _: &[u8]) -> bool {
            false
        }

        fn close(&self, _: ErrorCode, _: &str) {}
    }

    /// Seats `principal` in `room` as session `session_id`: its member id and control queue.
    async fn seat(room: &RoomHandle, principal: &Principal, session_id: u64) -> (u64, mpsc::Receiver<Outgoing>) {
        let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
        let joining = Joining {
            session_id,
            who: principal.clone(),
            transport: Transport::WebTransport,
            peer: Arc::new(Offline),
            control_tx,
            kick: oneshot::channel().0,
            counters: Arc::default(),
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
        let rooms = Arc::new(Rooms::new(config, ServerClock::new(), stats, sel, shutdown, None));
        let principal = |role, subject: &str| {
            let token = tenants.mint(DEMO_TENANT_ID, role, subject, subject, Duration::from_secs(60)).unwrap();
            tenants.verify(&token).unwrap()
        };
        let teacher = principal(Role::Teacher, "t-1");
        let settings =
            RoomSettings { name: Name::truncating("Room"), tempo: MicroBpm::from_bpm(100), beats_per_bar: 4 };
        let room = rooms.create(tenants.tenant(DEMO_TENANT_ID).unwrap(), &teacher, &settings, None).unwrap();
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
                match *teacher_rx.recv().await.expect("the room is open") {
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

    /// A member's [`SyncAnswer`] in a room whose timeline is at `epoch`.
    fn sync_answer(epoch: u64) -> (SyncAnswer, Arc<Stats>, Arc<SessionCounters>) {
        let clock = ServerClock::new();
        let room = RoomMeta {
            code: crate::codes::JoinCode::random(&mut rand::rng()),
            tenant: Arc::from(DEMO_TENANT_ID),
            owner: "t-1".into(),
            name: Name::truncating("Room"),
            created_at: SystemTime::now(),
            sel_id: "0".repeat(32),
            co_teachers: std::sync::Mutex::new(Vec::new()),
            epoch: AtomicU64::new(epoch),
        };
        let (stats, counters) = (Arc::new(Stats::default()), Arc::new(SessionCounters::default()));
        let bucket = TokenBucket::new(DATAGRAMS_PER_SECOND, DATAGRAM_BURST, clock.now().0);
        let answer = SyncAnswer {
            clock,
            stats: stats.clone(),
            bucket: Arc::new(Mutex::new(bucket)),
            member: Some((Arc::new(room), counters.clone())),
        };
        (answer, stats, counters)
    }

    fn request(id: u32, epoch: u64) -> Vec<u8> {
        let request = SyncRequest { id, t0: downbeat_protocol::ClientNanos(1_000 + u64::from(id)), epoch };
        wire::encode_client_datagram(&ClientDatagram::SyncRequest(request)).unwrap()
    }

    #[tokio::test]
    async fn a_sync_request_on_the_rooms_timeline_is_answered_where_it_arrives_and_the_rest_is_the_sessions() {
        let (answer, stats, counters) = sync_answer(3);
        let arrived = std::time::Instant::now();
        let Answered::Reply(Some(reply)) = answer.answer(&request(7, 3), Some(arrived)) else {
            panic!("a request naming the room's timeline is answered");
        };
        let ServerDatagram::SyncReply(reply) = wire::decode_server_datagram(&reply).unwrap() else {
            panic!("a sync reply");
        };
        assert_eq!((reply.id, reply.t0), (7, downbeat_protocol::ClientNanos(1_007)));
        assert!(reply.t1 <= reply.t2, "{reply:?}");
        answer.replied(true);
        assert_eq!((stats.datagrams_received.get(), stats.sync_replies_sent.get()), (1, 1));
        assert_eq!(counters.received.load(Ordering::Relaxed), 1);

        // A member behind the room's timeline is the session's (the room repairs it), and so
        // are notes and what does not decode: none of them counted here.
        let notes = wire::encode_client_datagram(&ClientDatagram::Notes(Default::default())).unwrap();
        for datagram in [request(8, 2), notes, vec![0xff; 9]] {
            assert_eq!(answer.answer(&datagram, None), Answered::Pass);
        }
        assert_eq!(stats.datagrams_received.get(), 1);

        // The session's rate holds: past the burst, requests are dropped and counted.
        let answered = (0..DATAGRAM_BURST * 2)
            .filter(|&i| matches!(answer.answer(&request(100 + i, 3), None), Answered::Reply(Some(_))))
            .count();
        assert!(answered < DATAGRAM_BURST as usize + 10, "{answered} answered at once");
        assert!(stats.datagrams_rate_limited.get() > 0);
        assert_eq!(stats.datagrams_received.get(), 1 + u64::from(DATAGRAM_BURST) * 2);
    }
}
