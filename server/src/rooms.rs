//! The room registry: rooms by tenant and join code, their limits, and handles to their tasks.
//!
//! Each room runs in its own task ([`crate::room_task`]); everything else reaches it through a
//! [`RoomHandle`] and a bounded command queue. The registry's lock guards only its maps and is
//! never held across an await.
//!
//! Join codes are unique within a tenant. Looking a code up answers, in this order: the
//! caller's tenant's live room; `room_closed` for a code of the caller's tenant that was closed
//! or expired (remembered for a day); `room_not_found` for anything else, another tenant's live
//! code included (answered and counted exactly alike, so codes cannot be probed across
//! schools).
//!
//! A lookup that finds no live room of the caller's tenant is a failed join. Failed joins are
//! counted in three buckets: the person's (tenant and subject: a few, then one every ten
//! seconds), their network address's (across tenants), and the school's (its `joins_per_second`
//! and `join_burst`). The person's bucket is much smaller than the others, so one student
//! guessing codes runs out long before the school does and cannot lock anyone else out. While
//! any of a student's three buckets is empty, every lookup of theirs is refused with
//! `rate_limited`, a right code too: otherwise the answer would tell a guesser which code is
//! right. Teachers reach their tenant's live rooms while the shared buckets are empty (others'
//! guessing cannot lock the staff out), so every wrong code of a teacher takes a token from
//! their own bucket even when it is refused, and an empty one refuses them like a student.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use downbeat_engine::limit::TokenBucket;
use downbeat_engine::room::{self, Room};
use downbeat_protocol::{
    self as wire, Applied, BoundedVec, ClientReport, ControlOp, ErrorCode, MAX_NOTES_PER_DATAGRAM, Member, Name, Note,
    Reflection, ReflectionNotice, RoomSettings, ServerMessage, ServerNanos, Welcome,
};
use tokio::sync::{mpsc, oneshot};
use tracing::{Instrument as _, info, info_span};

use crate::auth::{Principal, Role, Tenant};
use crate::authz::Refusal;
use crate::clock::ServerClock;
use crate::codes::JoinCode;
use crate::config::TenantLimits;
use crate::limits::{Buckets, Refill, network};
use crate::room_sel::RoomSel;
use crate::room_task::{RoomParts, RoomTask};
use crate::sel::store::RoomSessionRow;
use crate::sel::{Sel, unix_ms};
use crate::shutdown::Shutdown;
use crate::stats::Stats;

/// Commands a room queues before senders wait (sessions) or are refused (HTTP, datagrams).
const COMMAND_QUEUE: usize = 512;
/// How long a closed room's code answers `room_closed` rather than `room_not_found`.
const CLOSED_MEMORY_NANOS: u64 = 24 * 3600 * 1_000_000_000;
/// Most closed codes remembered per tenant.
const CLOSED_MEMORY_PER_TENANT: usize = 10_000;
/// Failed joins one person may make in a burst...
const PERSON_JOIN_BURST: u32 = 5;
/// ...and how fast they may go on: one every ten seconds.
const PERSON_JOIN_REFILL: Refill = Refill { tokens: 1, secs: 10 };
/// Failed joins one network address may make in a burst (fewer than a school's by default,
/// so one machine with many identities cannot exhaust a school)...
const ADDRESS_JOIN_BURST: u32 = 10;
/// ...and how fast it may go on.
const ADDRESS_JOIN_REFILL: Refill = Refill { tokens: 1, secs: 1 };
/// People, and separately network addresses, whose failed-join buckets are remembered.
const MAX_TRACKED_JOINERS: usize = 10_000;
/// The one answer to a lookup refused for too many failed joins, whichever bucket is empty
/// and whatever the code.
const TOO_MANY_WRONG_CODES: &str = "too many wrong join codes were tried just now; wait a minute";

/// What the room task needs from a member's connection. Implemented by
/// [`wtransport::Connection`]; tests use a fake.
pub(crate) trait Peer: Send + Sync + fmt::Debug + 'static {
    /// Largest datagram the path takes now; `None` if the peer does not take datagrams.
    fn max_datagram_size(&self) -> Option<usize>;
    /// Queues a datagram without waiting; false if it was refused.
    fn send_datagram(&self, bytes: &[u8]) -> bool;
    /// Closes the session with `code` at once.
    fn close(&self, code: ErrorCode, reason: &str);
}

impl Peer for wtransport::Connection {
    fn max_datagram_size(&self) -> Option<usize> {
        Self::max_datagram_size(self)
    }

    fn send_datagram(&self, bytes: &[u8]) -> bool {
        Self::send_datagram(self, bytes).is_ok()
    }

    fn close(&self, code: ErrorCode, reason: &str) {
        Self::close(self, wtransport::VarInt::from_u32(u32::from(code.as_u16())), reason.as_bytes());
    }
}

/// The room tells a session to end: it says why on the control stream, then closes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Kick {
    pub(crate) code: ErrorCode,
    pub(crate) message: &'static str,
}

/// A session joining a room: who (from the verified token) and how to reach them.
#[derive(Debug)]
pub(crate) struct Joining {
    /// Server-wide session id; tells a session's late leave from its successor's seat.
    pub(crate) session_id: u64,
    pub(crate) subject: String,
    pub(crate) name: Name,
    pub(crate) role: wire::Role,
    pub(crate) token_expires_at: u64,
    pub(crate) peer: Arc<dyn Peer>,
    pub(crate) control_tx: mpsc::Sender<ServerMessage>,
    pub(crate) kick: oneshot::Sender<Kick>,
}

/// How a session left its seat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Departure {
    /// The client closed the session: the seat is freed now.
    Left,
    /// The connection was lost: the seat is kept for the grace period.
    Lost,
    /// The server ended the session (expired token, malformed frame, abuse): the seat is
    /// freed now and the room hears it was closed.
    Closed,
}

/// A room with its presence, as the HTTP API shows it.
#[derive(Clone, Debug)]
pub(crate) struct RoomView {
    pub(crate) timeline: wire::Timeline,
    pub(crate) members: Vec<(Member, bool)>,
    pub(crate) playout_delay_nanos: u64,
}

#[derive(Debug)]
pub(crate) enum Command {
    Join {
        joining: Joining,
        reply: oneshot::Sender<Result<Welcome, Refusal>>,
    },
    Depart {
        member_id: u64,
        session_id: u64,
        how: Departure,
    },
    /// From HTTP (`reply`) or from a member's control stream (`requester`: member and request
    /// id; the room queues the ack or error to that member itself, in order with broadcasts).
    Control {
        op: ControlOp,
        requester: Option<(u64, u32)>,
        reply: Option<oneshot::Sender<Result<Option<Applied>, Refusal>>>,
    },
    Notes {
        member_id: u64,
        session_id: u64,
        notes: BoundedVec<Note, MAX_NOTES_PER_DATAGRAM>,
    },
    Report {
        member_id: u64,
        session_id: u64,
        report: ClientReport,
    },
    View {
        reply: oneshot::Sender<RoomView>,
    },
    /// A student's reflection (checked and queued by the room).
    Reflect {
        member_id: u64,
        session_id: u64,
        reflection: Reflection,
    },
    /// From the SEL writer: a reflection is committed (acknowledge it, tell the teachers).
    ReflectionCommitted {
        member_id: u64,
        request_id: u32,
        notice: ReflectionNotice,
    },
    /// From the SEL writer: a feed update for the teachers, now committed.
    Feed(ServerMessage),
    /// Drop everything held in memory about a student whose data is being deleted; answers
    /// once done.
    Forget {
        subject: String,
        reply: oneshot::Sender<()>,
    },
}

/// What never changes about a room.
#[derive(Debug)]
pub(crate) struct RoomMeta {
    pub(crate) code: JoinCode,
    pub(crate) tenant: Arc<str>,
    /// The subject of the teacher who created it.
    pub(crate) owner: String,
    pub(crate) name: Name,
    pub(crate) created_at: SystemTime,
    /// The room session's id in the SEL store (random, 128 bits, hex).
    pub(crate) sel_id: String,
}

impl RoomMeta {
    /// The room session's row in the SEL store, as the room starts it.
    pub(crate) fn session_row(&self) -> RoomSessionRow {
        RoomSessionRow {
            tenant_id: self.tenant.to_string(),
            id: self.sel_id.clone(),
            room_code: self.code.as_str().to_owned(),
            room_name: self.name.to_string(),
            teacher_id: self.owner.clone(),
            started_at_ms: unix_ms(self.created_at),
            ended_at_ms: None,
        }
    }
}

/// A cheap, cloneable way to reach one room's task.
#[derive(Clone, Debug)]
pub(crate) struct RoomHandle {
    meta: Arc<RoomMeta>,
    tx: mpsc::Sender<Command>,
}

fn gone() -> Refusal {
    Refusal::new(ErrorCode::RoomClosed, "the room was closed")
}

fn busy() -> Refusal {
    Refusal::new(ErrorCode::ServerBusy, "the room is busy; try again")
}

impl RoomHandle {
    pub(crate) fn meta(&self) -> &RoomMeta {
        &self.meta
    }

    /// Seats a member; the welcome to send first on success.
    pub(crate) async fn join(&self, joining: Joining) -> Result<Welcome, Refusal> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Join { joining, reply }).await.map_err(|_| gone())?;
        rx.await.unwrap_or_else(|_| Err(gone()))
    }

    /// The session `session_id` left the seat of `member_id` (no-op if it no longer holds it).
    pub(crate) async fn depart(&self, member_id: u64, session_id: u64, how: Departure) {
        let _ = self.tx.send(Command::Depart { member_id, session_id, how }).await;
    }

    /// [`Self::depart`] without waiting, for a drop guard: queues the departure now, or hands
    /// the wait to a new task while the room's queue is full. Nothing to do once the room is
    /// gone (or outside a runtime, where no room runs either).
    pub(crate) fn depart_soon(&self, member_id: u64, session_id: u64, how: Departure) {
        let command = Command::Depart { member_id, session_id, how };
        if let Err(mpsc::error::TrySendError::Full(command)) = self.tx.try_send(command)
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let tx = self.tx.clone();
            runtime.spawn(async move {
                let _ = tx.send(command).await;
            });
        }
    }

    /// Applies a teacher control (already authorized) asked over HTTP; refuses with
    /// `server_busy` rather than waiting when the room's queue is full.
    pub(crate) async fn control(&self, op: ControlOp) -> Result<Option<Applied>, Refusal> {
        let (reply, rx) = oneshot::channel();
        self.try_send(Command::Control { op, requester: None, reply: Some(reply) })?;
        rx.await.unwrap_or_else(|_| Err(gone()))
    }

    /// Applies a teacher control (already authorized) from a member's control stream; the room
    /// answers on that stream. False if the room is gone.
    pub(crate) async fn control_from(&self, member_id: u64, request_id: u32, op: ControlOp) -> bool {
        self.tx.send(Command::Control { op, requester: Some((member_id, request_id)), reply: None }).await.is_ok()
    }

    /// Hands notes to the room without waiting; false if the room's queue is full (dropped).
    pub(crate) fn notes(
        &self,
        member_id: u64,
        session_id: u64,
        notes: BoundedVec<Note, MAX_NOTES_PER_DATAGRAM>,
    ) -> bool {
        self.tx.try_send(Command::Notes { member_id, session_id, notes }).is_ok()
    }

    /// Hands a reflection to the room (it answers on the member's control stream). False if
    /// the room is gone.
    pub(crate) async fn reflect(&self, member_id: u64, session_id: u64, reflection: Reflection) -> bool {
        self.tx.send(Command::Reflect { member_id, session_id, reflection }).await.is_ok()
    }

    /// Hands a client report to the room without waiting; dropped if the queue is full.
    pub(crate) fn report(&self, member_id: u64, session_id: u64, report: ClientReport) {
        let _ = self.tx.try_send(Command::Report { member_id, session_id, report });
    }

    /// The timeline and presence.
    pub(crate) async fn view(&self) -> Result<RoomView, Refusal> {
        let (reply, rx) = oneshot::channel();
        self.try_send(Command::View { reply })?;
        rx.await.map_err(|_| gone())
    }

    fn try_send(&self, command: Command) -> Result<(), Refusal> {
        self.tx.try_send(command).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => busy(),
            mpsc::error::TrySendError::Closed(_) => gone(),
        })
    }
}

/// Settings the registry passes to every room.
#[derive(Clone, Debug)]
pub(crate) struct RoomsConfig {
    /// The engine's settings; member and note limits are replaced by the tenant's.
    pub(crate) engine: room::Config,
    /// Most rooms on the server.
    pub(crate) max_rooms: usize,
    /// A room with nobody in it closes after this long.
    pub(crate) idle_expiry_nanos: u64,
    /// A member whose connection is lost keeps its seat this long.
    pub(crate) seat_grace_nanos: u64,
}

#[derive(Debug)]
struct TenantRooms {
    live: usize,
    /// The school's failed joins.
    failed_joins: TokenBucket,
    /// Each person's failed joins, by subject.
    people: Buckets<String>,
    closed: HashMap<JoinCode, ServerNanos>,
}

impl TenantRooms {
    fn new(limits: &TenantLimits, now: ServerNanos) -> Self {
        Self {
            live: 0,
            failed_joins: TokenBucket::new(limits.joins_per_second, limits.join_burst, now.0),
            people: Buckets::new(PERSON_JOIN_BURST, PERSON_JOIN_REFILL, MAX_TRACKED_JOINERS),
            closed: HashMap::new(),
        }
    }
}

#[derive(Debug)]
struct Registry {
    /// Live rooms by code; codes are unique within a tenant, rarely shared across tenants.
    live: HashMap<JoinCode, Vec<RoomHandle>>,
    tenants: HashMap<Arc<str>, TenantRooms>,
    /// Failed joins by network address, across tenants.
    addresses: Buckets<IpAddr>,
    count: usize,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            live: HashMap::new(),
            tenants: HashMap::new(),
            addresses: Buckets::new(ADDRESS_JOIN_BURST, ADDRESS_JOIN_REFILL, MAX_TRACKED_JOINERS),
            count: 0,
        }
    }
}

/// All rooms. See the module docs.
#[derive(Debug)]
pub(crate) struct Rooms {
    registry: Mutex<Registry>,
    config: RoomsConfig,
    clock: ServerClock,
    stats: Arc<Stats>,
    sel: Sel,
    shutdown: Shutdown,
}

impl Rooms {
    pub(crate) fn new(
        config: RoomsConfig,
        clock: ServerClock,
        stats: Arc<Stats>,
        sel: Sel,
        shutdown: Shutdown,
    ) -> Self {
        Self { registry: Mutex::new(Registry::default()), config, clock, stats, sel, shutdown }
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        // Every update below leaves the maps consistent before it can panic, so a poisoned
        // lock is still good to use.
        self.registry.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn config(&self) -> &RoomsConfig {
        &self.config
    }

    /// Creates a stopped room owned by `owner` (already authorized as a teacher of `tenant`)
    /// and starts its task. Must be called within the tokio runtime.
    pub(crate) fn create(
        self: &Arc<Self>,
        tenant: &Tenant,
        owner: &Principal,
        settings: &RoomSettings,
    ) -> Result<RoomHandle, Refusal> {
        if self.shutdown.is_fired() {
            return Err(Refusal::new(ErrorCode::ShuttingDown, "the server is shutting down"));
        }
        let limits = tenant.limits();
        let engine = room::Config {
            // The tenant's limit, within the server-wide cap.
            max_members: (limits.max_members_per_room as usize).min(self.config.engine.max_members),
            notes_per_second: limits.notes_per_second,
            note_burst: limits.note_burst,
            ..self.config.engine.clone()
        };
        let now = self.clock.now();
        let room = Room::new(engine, now, settings.tempo, settings.beats_per_bar)
            .map_err(|e| Refusal::new(e.code(), e.to_string()))?;
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        let handle = {
            let mut registry = self.registry();
            if registry.count >= self.config.max_rooms {
                return Err(Refusal::new(
                    ErrorCode::TooManyRooms,
                    "the server holds its maximum number of rooms; try again later",
                ));
            }
            let Registry { live, tenants, count, .. } = &mut *registry;
            let tenant_id: Arc<str> = Arc::from(tenant.id());
            let usage = tenants.entry(tenant_id.clone()).or_insert_with(|| TenantRooms::new(limits, now));
            if usage.live >= limits.max_rooms as usize {
                return Err(Refusal::new(
                    ErrorCode::TooManyRooms,
                    format!("your school may have {} rooms open at once; close one first", limits.max_rooms),
                ));
            }
            let mut rng = rand::rng();
            let code = loop {
                let code = JoinCode::random(&mut rng);
                let taken = live.get(&code).is_some_and(|rooms| rooms.iter().any(|r| r.meta.tenant == tenant_id));
                if !taken && !usage.closed.contains_key(&code) {
                    break code;
                }
            };
            let meta = Arc::new(RoomMeta {
                code: code.clone(),
                tenant: tenant_id.clone(),
                owner: owner.subject.clone(),
                name: settings.name.clone(),
                created_at: SystemTime::now(),
                sel_id: hex::encode(rand::random::<[u8; 16]>()),
            });
            let handle = RoomHandle { meta, tx };
            live.entry(code).or_default().push(handle.clone());
            *count += 1;
            usage.live += 1;
            handle
        };
        self.stats.rooms_active.inc();
        self.stats.rooms_created.inc();
        let span = info_span!("room", code = %handle.meta.code, tenant = %handle.meta.tenant);
        let meta = &handle.meta;
        let task = RoomTask::new(RoomParts {
            meta: meta.clone(),
            room,
            rooms: self.clone(),
            clock: self.clock,
            stats: self.stats.clone(),
            sel: self.sel.clone(),
            room_sel: RoomSel::new(meta.session_row()),
            own: handle.tx.downgrade(),
        });
        tokio::spawn(task.run(rx, self.shutdown.clone()).instrument(span));
        info!(
            code = %handle.meta.code,
            tenant = %handle.meta.tenant,
            bpm = settings.tempo.as_bpm_f64(),
            beats_per_bar = settings.beats_per_bar,
            "room created"
        );
        Ok(handle)
    }

    /// Finds the room a member of `tenant` names by `input` (as typed), asking from `peer`
    /// (`None`: an unknown address, counted as one). See the module docs for the answers and
    /// the failed-join limits.
    pub(crate) fn lookup(
        &self,
        tenant: &Tenant,
        who: &Principal,
        peer: Option<IpAddr>,
        input: &str,
    ) -> Result<RoomHandle, Refusal> {
        let now = self.clock.now();
        let limits = tenant.limits();
        let address = network(peer);
        let mut registry = self.registry();
        let Registry { live, tenants, addresses, .. } = &mut *registry;
        let usage = tenants.entry(Arc::from(tenant.id())).or_insert_with(|| TenantRooms::new(limits, now));
        let code = JoinCode::parse(input);
        let own = code
            .as_ref()
            .and_then(|code| live.get(code))
            .and_then(|rooms| rooms.iter().find(|r| &*r.meta.tenant == tenant.id()));
        let too_many = || Refusal::new(ErrorCode::RateLimited, TOO_MANY_WRONG_CODES);
        let teacher = who.role == Role::Teacher;
        if usage.people.available(&who.subject, now.0) == 0 {
            return Err(too_many());
        }
        let shared_left = addresses.available(&address, now.0) > 0 && usage.failed_joins.available(now.0) > 0;
        if !shared_left && !teacher {
            return Err(too_many());
        }
        if let Some(room) = own {
            return Ok(room.clone());
        }
        // A wrong code. A teacher pays for it even when it is refused below: they reached a
        // right code however empty the shared buckets, so a free refusal would tell them apart.
        usage.people.try_take(who.subject.clone(), now.0);
        if !shared_left {
            return Err(too_many());
        }
        addresses.try_take(address, now.0);
        usage.failed_joins.try_take(now.0);
        let Some(code) = code else {
            return Err(Refusal::new(
                ErrorCode::RoomNotFound,
                "a join code is 8 letters and digits (no 0, O, 1 or I), like K7QF-M3XP",
            ));
        };
        usage.closed.retain(|_, at| now.0.saturating_sub(at.0) < CLOSED_MEMORY_NANOS);
        if usage.closed.contains_key(&code) {
            return Err(Refusal::new(ErrorCode::RoomClosed, "this room was closed"));
        }
        Err(Refusal::new(ErrorCode::RoomNotFound, "no room has this code; check it with your teacher"))
    }

    /// The live rooms of `tenant` owned by `owner`, newest first.
    pub(crate) fn owned_by(&self, tenant: &str, owner: &str) -> Vec<RoomHandle> {
        let mut rooms: Vec<_> = self
            .registry()
            .live
            .values()
            .flatten()
            .filter(|r| &*r.meta.tenant == tenant && r.meta.owner == owner)
            .cloned()
            .collect();
        rooms.sort_by(|a, b| b.meta.created_at.cmp(&a.meta.created_at).then_with(|| a.meta.code.cmp(&b.meta.code)));
        rooms
    }

    /// Called by a room's task as it ends: the code stops being live and answers
    /// `room_closed` for a day.
    pub(crate) fn closed(&self, meta: &RoomMeta) {
        let now = self.clock.now();
        let mut registry = self.registry();
        let Some(rooms) = registry.live.get_mut(&meta.code) else { return };
        let before = rooms.len();
        rooms.retain(|r| r.meta.tenant != meta.tenant);
        let removed = before - rooms.len();
        if rooms.is_empty() {
            registry.live.remove(&meta.code);
        }
        registry.count -= removed;
        if let Some(usage) = registry.tenants.get_mut(&meta.tenant) {
            usage.live -= removed;
            if usage.closed.len() >= CLOSED_MEMORY_PER_TENANT {
                usage.closed.retain(|_, at| now.0.saturating_sub(at.0) < CLOSED_MEMORY_NANOS);
            }
            if usage.closed.len() < CLOSED_MEMORY_PER_TENANT {
                usage.closed.insert(meta.code.clone(), now);
            }
        }
    }

    /// Has every live room of `tenant` drop what it holds in memory about `subject`; returns
    /// once each has (rooms that end meanwhile hold nothing more either).
    pub(crate) async fn forget_student(&self, tenant: &str, subject: &str) {
        let rooms: Vec<RoomHandle> =
            self.registry().live.values().flatten().filter(|r| &*r.meta.tenant == tenant).cloned().collect();
        for room in rooms {
            let (reply, rx) = oneshot::channel();
            if room.tx.send(Command::Forget { subject: subject.to_owned(), reply }).await.is_ok() {
                let _ = rx.await;
            }
        }
    }

    /// Forgets every room (their tasks end on the shutdown signal).
    pub(crate) fn clear(&self) {
        let mut registry = self.registry();
        registry.live.clear();
        registry.count = 0;
    }
}
