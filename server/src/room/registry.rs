//! The room registry: rooms by tenant and join code, their limits, and handles to their tasks.
//!
//! Each room runs in its own task (`super::task`); everything else reaches it through a
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
//! right. Teachers and admins reach their tenant's live rooms while the shared buckets are
//! empty (others' guessing cannot lock the staff out), so every wrong code of a teacher takes a token from
//! their own bucket even when it is refused, and an empty one refuses them like a student.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use downbeat_engine::limit::TokenBucket;
use downbeat_engine::room::{self, Handover, Room};
use downbeat_engine::timeline::Timeline;
use downbeat_protocol::{BoundedString, ErrorCode, Name, RoomSettings, ServerNanos, TextKind, check_text};
use tokio::sync::{mpsc, oneshot};
use tracing::{Instrument as _, debug, info, info_span, warn};

use super::handle::{Command, RoomHandle, RoomMeta};
use super::task::{RoomParts, RoomTask};
use crate::auth::{Principal, Role, Tenant, Tenants};
use crate::authz::{Refusal, RoomAccess as _};
use crate::clock::ServerClock;
use crate::cluster::{AdoptError, Cluster, Located, RoomState, TenantUsage};
use crate::codes::JoinCode;
use crate::config::TenantLimits;
use crate::limits::{Buckets, Refill, network};
use crate::sel::Sel;
use crate::session::TenantSessions;
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

/// Whether a school's rooms on the cluster's other nodes count against its limit.
#[derive(Clone, Copy, Debug)]
enum Elsewhere {
    /// A new room: they count.
    Counted,
    /// A room taken over: it was counted where it was made.
    NotCounted,
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

/// Whether `who` (from `address`) may look a code up now, taking nothing: `None` if not (their
/// own failed-join bucket is empty, or a shared one is and they are a student), else whether
/// the shared buckets (the address's and the school's) have room for a failed join. Staff
/// (teachers and admins) are not locked out by students' guessing.
fn lookup_budget(
    usage: &TenantRooms,
    addresses: &Buckets<IpAddr>,
    who: &Principal,
    address: &IpAddr,
    now: ServerNanos,
) -> Option<bool> {
    if usage.people.available(&who.subject, now.0) == 0 {
        return None;
    }
    let shared_left = addresses.available(address, now.0) > 0 && usage.failed_joins.available(now.0) > 0;
    (shared_left || who.role != Role::Student).then_some(shared_left)
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
    /// The cluster's room directory, if this server is one of several.
    cluster: Option<Arc<Cluster>>,
    /// This node is draining: it takes no room over.
    draining: std::sync::atomic::AtomicBool,
    /// Notified whenever a room ends.
    changed: tokio::sync::Notify,
}

/// Codes tried before a create gives up when the cluster's directory holds each already.
const CLAIM_ATTEMPTS: usize = 8;

impl Rooms {
    pub(crate) fn new(
        config: RoomsConfig,
        clock: ServerClock,
        stats: Arc<Stats>,
        sel: Sel,
        shutdown: Shutdown,
        cluster: Option<Arc<Cluster>>,
    ) -> Self {
        Self {
            registry: Mutex::new(Registry::default()),
            config,
            clock,
            stats,
            sel,
            shutdown,
            cluster,
            draining: std::sync::atomic::AtomicBool::new(false),
            changed: tokio::sync::Notify::new(),
        }
    }

    /// The cluster this server is one of, if any.
    pub(crate) fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.as_ref()
    }

    /// Creates a room (see [`Self::create`]); in a cluster its code is first claimed in the
    /// directory, so no two nodes ever hold one code.
    pub(crate) async fn open(
        self: &Arc<Self>,
        tenant: &Tenant,
        owner: &Principal,
        settings: &RoomSettings,
    ) -> Result<RoomHandle, Refusal> {
        let Some(cluster) = &self.cluster else { return self.create(tenant, owner, settings, None) };
        for _ in 0..CLAIM_ATTEMPTS {
            let code = JoinCode::random(&mut rand::rng());
            let claimed = cluster.claim(tenant.id(), code.as_str()).await.map_err(|e| {
                warn!(error = %e, "the cluster's directory cannot be reached; no room is created");
                Refusal::new(ErrorCode::ServerBusy, "the cluster's room directory cannot be reached; try again shortly")
            })?;
            if !claimed {
                continue;
            }
            let room = match self.create(tenant, owner, settings, Some(code.clone())) {
                Ok(room) => room,
                Err(refusal) => {
                    cluster.release(tenant.id(), code.as_str()).await;
                    return Err(refusal);
                }
            };
            // Its state is in the directory before its code is given out, so another node
            // can take it over from the start.
            let (reply, persisted) = oneshot::channel();
            let sent = room.tx.send(Command::Persist { reply }).await.is_ok();
            return match persisted.await {
                Ok(Ok(())) if sent => Ok(room),
                Ok(Err(refusal)) => {
                    let _ = room.control(downbeat_protocol::ControlOp::Close).await;
                    Err(refusal)
                }
                _ => Err(Refusal::new(ErrorCode::ServerBusy, "the room closed as it was created; try again")),
            };
        }
        Err(Refusal::new(ErrorCode::ServerBusy, "no free join code was found; try again"))
    }

    /// In a cluster, where the room `input` of `tenant` lives when another node holds it
    /// (the hello is answered `moved`); `None` when it is here, nowhere, or there is no
    /// cluster. Refused like [`Self::lookup`] while the asker may look nothing up, so a move
    /// tells a guesser no more than a welcome would.
    pub(crate) async fn moved(
        self: &Arc<Self>,
        tenant: &Tenant,
        who: &Principal,
        peer: Option<IpAddr>,
        input: &str,
    ) -> Result<Option<downbeat_protocol::Moved>, Refusal> {
        let Some(cluster) = &self.cluster else { return Ok(None) };
        let Some(code) = JoinCode::parse(input) else { return Ok(None) };
        if self.find(tenant.id(), code.as_str()).is_some() {
            return Ok(None);
        }
        if !self.may_look_up(tenant, who, peer) {
            return Err(Refusal::new(ErrorCode::RateLimited, TOO_MANY_WRONG_CODES));
        }
        match cluster.locate(tenant.id(), code.as_str()).await {
            Ok(Located::Elsewhere(node)) => Ok(Some(node.moved())),
            // A room handed to this node, or left by a node that died, is taken up here: its
            // members arrive before (or without) this node's sweep.
            Ok(Located::Orphaned) => {
                if self.adopt(tenant, code.as_str()).await.is_some() {
                    return Ok(None);
                }
                // Another node took it up first (its sweep, or a member's hello there), or
                // this node may not: follow the room where it went. Never `room_not_found`,
                // which a client takes as final, for a room that exists.
                match cluster.locate(tenant.id(), code.as_str()).await {
                    Ok(Located::Elsewhere(node)) => Ok(Some(node.moved())),
                    _ => Err(Refusal::new(
                        ErrorCode::ServerBusy,
                        "the room is moving to another server; try again shortly",
                    )),
                }
            }
            Ok(Located::Nowhere) => Ok(None),
            Err(e) => {
                warn!(error = %e, "the cluster's directory cannot be reached");
                Err(Refusal::new(
                    ErrorCode::ServerBusy,
                    "the cluster's room directory cannot be reached; try again shortly",
                ))
            }
        }
    }

    /// Whether `who` (from `peer`) may look a code up now: what [`Self::lookup`] checks before
    /// anything, without taking from any bucket.
    fn may_look_up(&self, tenant: &Tenant, who: &Principal, peer: Option<IpAddr>) -> bool {
        let now = self.clock.now();
        let mut registry = self.registry();
        let Registry { tenants, addresses, .. } = &mut *registry;
        let usage = tenants.entry(Arc::from(tenant.id())).or_insert_with(|| TenantRooms::new(tenant.limits(), now));
        lookup_budget(usage, addresses, who, &network(peer), now).is_some()
    }

    /// Keeps this node's leases in the cluster's directory, about three times a lease, until
    /// shutdown; a room another node took over is closed here (this node no longer acts for
    /// it).
    ///
    /// Each renewal also publishes what every school has open here (rooms, and `sessions`)
    /// and reads what the other nodes published, so a school's limits hold across the cluster.
    pub(crate) async fn keep_leases(
        self: Arc<Self>,
        tenants: Arc<Tenants>,
        sessions: TenantSessions,
        mut shutdown: Shutdown,
    ) {
        let Some(cluster) = self.cluster.clone() else { return };
        let mut beat = tokio::time::interval(cluster.lease() / 3);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.wait() => return,
                lost = cluster.lost_rooms() => {
                    for (tenant, code) in lost {
                        if let Some(room) = self.find(&tenant, &code) {
                            warn!(%tenant, %code, "this node lost the room to another node; its members are sent there");
                            let _ = room.tx.send(Command::Lost).await;
                        }
                    }
                    continue;
                }
                _ = beat.tick() => {}
            }
            cluster.publish_usage(self.usage(&sessions));
            cluster.renew().await;
            if self.draining.load(std::sync::atomic::Ordering::Relaxed) {
                continue;
            }
            // Rooms handed to this node, or left by a node whose lease ran out.
            for (tenant, code) in cluster.orphans() {
                if let Some(tenant) = tenants.tenant(&tenant) {
                    self.adopt(tenant, &code).await;
                }
            }
        }
    }

    /// What each school has open here: its rooms, and its sessions as `sessions` counts them.
    fn usage(&self, sessions: &TenantSessions) -> BTreeMap<String, TenantUsage> {
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        let mut usage: BTreeMap<String, TenantUsage> = self
            .registry()
            .tenants
            .iter()
            .filter(|(_, rooms)| rooms.live > 0)
            .map(|(tenant, rooms)| (tenant.to_string(), TenantUsage { rooms: count(rooms.live), sessions: 0 }))
            .collect();
        for (tenant, n) in sessions.snapshot() {
            usage.entry(tenant.to_string()).or_default().sessions = count(n);
        }
        usage
    }

    /// Takes the room `code` of `tenant` over from the cluster's directory if it is this
    /// node's to take ([`Cluster::adopt`]) and this node has room for it, and starts it here.
    async fn adopt(self: &Arc<Self>, tenant: &Tenant, code: &str) -> Option<RoomHandle> {
        let cluster = self.cluster.as_ref()?;
        if let Some(room) = self.find(tenant.id(), code) {
            return Some(room);
        }
        // The school's own limit is not asked: the room exists already, and the node that
        // held it stops counting it when its lease runs out, which is when it may be taken.
        if let Err(refusal) = self.has_room_for(tenant, Elsewhere::NotCounted) {
            debug!(tenant = tenant.id(), code, why = %refusal.message, "this node does not take the room over");
            return None;
        }
        let state = match cluster.adopt(tenant.id(), code).await {
            Ok(state) => state?,
            Err(AdoptError::Clock(why)) => {
                self.stats.cluster_takeovers_refused.inc();
                warn!(tenant = tenant.id(), code, "{why}");
                return None;
            }
            Err(AdoptError::Directory(e)) => {
                warn!(error = %e, "taking a room over failed");
                return None;
            }
        };
        match self.resume(tenant, code, &state) {
            Ok(room) => {
                self.stats.cluster_rooms_adopted.inc();
                Some(room)
            }
            Err(refusal) => {
                warn!(code, message = %refusal.message, "a room taken over could not be resumed; it is given back");
                cluster.release(tenant.id(), code).await;
                None
            }
        }
    }

    /// Starts the room `code` of `tenant` as `state` holds it (taken over from another node).
    fn resume(self: &Arc<Self>, tenant: &Tenant, code: &str, state: &RoomState) -> Result<RoomHandle, Refusal> {
        use base64::Engine as _;
        let broken = |what: &str| Refusal::new(ErrorCode::Internal, format!("a room's handed-over state {what}"));
        let code = JoinCode::parse(code).ok_or_else(|| broken("has a bad code"))?;
        let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(&state.room)
            .map_err(|_| broken("is not base64"))?;
        let handover: Handover = postcard::from_bytes(&bytes).map_err(|_| broken("did not decode"))?;
        let now = self.clock.now();
        let room = Room::from_handover(handover, now);
        let created_at = u64::try_from(state.created_at_ms)
            .map_or(SystemTime::UNIX_EPOCH, |ms| SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(ms));
        let meta = RoomMeta {
            code,
            tenant: Arc::from(tenant.id()),
            owner: state.owner.clone(),
            name: Name::truncating(&state.name),
            created_at,
            sel_id: state.sel_id.clone(),
            co_teachers: Mutex::new(state.co_teachers.clone()),
            epoch: AtomicU64::new(0),
        };
        let (handle, rx) = self.register(tenant, meta, now, Elsewhere::NotCounted)?;
        info!(code = %handle.meta.code, tenant = %handle.meta.tenant, "room taken over from the cluster's directory");
        Ok(self.start(handle, rx, room, true))
    }

    /// Hands every room here to the cluster's other live nodes (this node drains), each at
    /// once: the rooms' timelines and seats go with them, so no beat moves. Returns once
    /// every room is handed over or `patience` is spent; the number handed over.
    pub(crate) async fn drain(&self, patience: std::time::Duration) -> usize {
        let Some(cluster) = &self.cluster else { return 0 };
        self.draining.store(true, std::sync::atomic::Ordering::Relaxed);
        let me = cluster.node_id();
        let deadline = tokio::time::Instant::now() + patience;
        let mut handed = 0;
        loop {
            let rooms = self.all();
            if rooms.is_empty() {
                break;
            }
            let nodes: Vec<_> = cluster.nodes().into_iter().filter(|n| n.id != me).collect();
            if nodes.is_empty() || tokio::time::Instant::now() >= deadline {
                warn!(rooms = rooms.len(), "draining: no other node takes these rooms; they close here");
                break;
            }
            let mut kept = 0;
            for (i, room) in rooms.iter().enumerate() {
                let to = nodes[i % nodes.len()].clone();
                let (reply, answer) = oneshot::channel();
                if room.tx.send(Command::HandOver { to, reply }).await.is_ok() && answer.await.unwrap_or(false) {
                    handed += 1;
                } else {
                    kept += 1;
                }
            }
            // The rooms handed over leave the registry as their tasks end; those not handed
            // over (the directory did not answer) are tried again.
            let settled = async {
                loop {
                    let changed = self.changed.notified();
                    if self.registry().count <= kept {
                        break;
                    }
                    changed.await;
                }
            };
            if tokio::time::timeout_at(deadline, settled).await.is_err() {
                warn!("draining: rooms handed over did not end in time");
                break;
            }
        }
        info!(rooms = handed, "drained: rooms handed to other nodes");
        handed
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        // Every update below leaves the maps consistent before it can panic, so a poisoned
        // lock is still good to use.
        self.registry.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Creates a stopped room owned by `owner` (already authorized as a teacher of `tenant`)
    /// and starts its task. Must be called within the tokio runtime.
    /// `code`: the code to give it (claimed in the cluster's directory already), or `None`
    /// for a random free one.
    pub(crate) fn create(
        self: &Arc<Self>,
        tenant: &Tenant,
        owner: &Principal,
        settings: &RoomSettings,
        code: Option<JoinCode>,
    ) -> Result<RoomHandle, Refusal> {
        if let Err(bad) = check_text(&settings.name, TextKind::Line) {
            return Err(Refusal::new(ErrorCode::BadRequest, format!("a room name: {bad}")));
        }
        let limits = tenant.limits();
        let engine = room::Config {
            // The tenant's limit, within the server-wide cap.
            max_members: (limits.max_members_per_room as usize).min(self.config.engine.max_members),
            notes_per_second: limits.notes_per_second,
            note_burst: limits.note_burst,
            seat_grace_nanos: self.config.seat_grace_nanos,
            idle_expiry_nanos: self.config.idle_expiry_nanos,
            ..self.config.engine.clone()
        };
        let now = self.clock.now();
        let timeline = Timeline::new(now, settings.tempo, settings.beats_per_bar)
            .map_err(|e| Refusal::new(e.code(), e.to_string()))?;
        let code = match code {
            Some(code) => code,
            None => self.free_code(tenant),
        };
        let meta = RoomMeta {
            code,
            tenant: Arc::from(tenant.id()),
            owner: owner.subject.clone(),
            name: settings.name.clone(),
            created_at: SystemTime::now(),
            sel_id: hex::encode(rand::random::<[u8; 16]>()),
            co_teachers: Mutex::new(Vec::new()),
            epoch: AtomicU64::new(0),
        };
        let (handle, rx) = self.register(tenant, meta, now, Elsewhere::Counted)?;
        let code = BoundedString::truncating(handle.meta.code.as_str());
        let room = Room::new(engine, now, code, settings.name.clone(), timeline);
        info!(
            code = %handle.meta.code,
            tenant = %handle.meta.tenant,
            bpm = settings.tempo.as_bpm_f64(),
            beats_per_bar = settings.beats_per_bar,
            "room created"
        );
        Ok(self.start(handle, rx, room, false))
    }

    /// A random code no live or recently closed room of `tenant` has here.
    fn free_code(&self, tenant: &Tenant) -> JoinCode {
        let registry = self.registry();
        let tenant_id = tenant.id();
        let mut rng = rand::rng();
        loop {
            let code = JoinCode::random(&mut rng);
            let live = registry.live.get(&code).is_some_and(|rooms| rooms.iter().any(|r| &*r.meta.tenant == tenant_id));
            let closed = registry.tenants.get(tenant_id).is_some_and(|usage| usage.closed.contains_key(&code));
            if !live && !closed {
                return code;
            }
        }
    }

    /// Whether a room of `tenant` may open here now (the server's and the school's limits).
    fn has_room_for(&self, tenant: &Tenant, elsewhere: Elsewhere) -> Result<(), Refusal> {
        let registry = self.registry();
        let live = registry.tenants.get(tenant.id()).map_or(0, |usage| usage.live);
        self.room_limits(registry.count, live, tenant, elsewhere)
    }

    /// Why a room of `tenant` may not open here, with `count` rooms here and `live` of the
    /// school's. Its limit counts its rooms on the cluster's other nodes too, unless
    /// `elsewhere` says not to (a room taken over).
    fn room_limits(&self, count: usize, live: usize, tenant: &Tenant, elsewhere: Elsewhere) -> Result<(), Refusal> {
        if self.shutdown.is_fired() || self.draining.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(Refusal::new(ErrorCode::ShuttingDown, "the server is shutting down"));
        }
        if count >= self.config.max_rooms {
            return Err(Refusal::new(
                ErrorCode::TooManyRooms,
                "the server holds its maximum number of rooms; try again later",
            ));
        }
        let Elsewhere::Counted = elsewhere else { return Ok(()) };
        let others = self.cluster.as_ref().map_or(0, |c| c.elsewhere(tenant.id()).rooms as usize);
        let max = tenant.limits().max_rooms;
        if live + others >= max as usize {
            return Err(Refusal::new(
                ErrorCode::TooManyRooms,
                format!("your school may have {max} rooms open at once; close one first"),
            ));
        }
        Ok(())
    }

    /// Registers the room `meta` describes (within the limits): its handle, and the
    /// receiving end of its command queue for its task.
    fn register(
        &self,
        tenant: &Tenant,
        meta: RoomMeta,
        now: ServerNanos,
        elsewhere: Elsewhere,
    ) -> Result<(RoomHandle, mpsc::Receiver<Command>), Refusal> {
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        let mut registry = self.registry();
        let Registry { live, tenants, count, .. } = &mut *registry;
        let usage = tenants.entry(meta.tenant.clone()).or_insert_with(|| TenantRooms::new(tenant.limits(), now));
        self.room_limits(*count, usage.live, tenant, elsewhere)?;
        if live.get(&meta.code).is_some_and(|rooms| rooms.iter().any(|r| r.meta.tenant == meta.tenant)) {
            return Err(Refusal::new(ErrorCode::ServerBusy, "that join code is taken here; try again"));
        }
        let handle = RoomHandle { meta: Arc::new(meta), tx };
        live.entry(handle.meta.code.clone()).or_default().push(handle.clone());
        *count += 1;
        usage.live += 1;
        Ok((handle, rx))
    }

    /// Starts the task of the room `handle` registered, running `room` (`resumed`: taken over
    /// from another node, as the directory holds it).
    fn start(
        self: &Arc<Self>,
        handle: RoomHandle,
        rx: mpsc::Receiver<Command>,
        room: Room,
        resumed: bool,
    ) -> RoomHandle {
        self.stats.rooms_active.inc();
        self.stats.rooms_created.inc();
        let span = info_span!("room", code = %handle.meta.code, tenant = %handle.meta.tenant);
        let meta = handle.meta.clone();
        let task = RoomTask::new(RoomParts {
            meta: meta.clone(),
            room,
            clock: self.clock,
            stats: self.stats.clone(),
            sel: self.sel.clone(),
            own: handle.tx.downgrade(),
            cluster: self.cluster.clone(),
            resumed,
        });
        let rooms = self.clone();
        let shutdown = self.shutdown.clone();
        tokio::spawn(
            async move {
                let moved = task.run(rx, shutdown).await;
                rooms.closed(&meta, !moved);
                if let Some(cluster) = &rooms.cluster {
                    cluster.release(&meta.tenant, meta.code.as_str()).await;
                }
            }
            .instrument(span),
        );
        handle
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
        let Some(shared_left) = lookup_budget(usage, addresses, who, &address, now) else { return Err(too_many()) };
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

    /// The live rooms of `tenant` that `teacher` owns or co-teaches, newest first.
    pub(crate) fn run_by(&self, tenant: &str, teacher: &str) -> Vec<RoomHandle> {
        let mut rooms: Vec<_> = self
            .registry()
            .live
            .values()
            .flatten()
            .filter(|r| &*r.meta.tenant == tenant && (r.meta.owner == teacher || r.meta.has_co_teacher(teacher)))
            .cloned()
            .collect();
        rooms.sort_by(|a, b| b.meta.created_at.cmp(&a.meta.created_at).then_with(|| a.meta.code.cmp(&b.meta.code)));
        rooms
    }

    /// Every live room of every school, by school then oldest first (the inspector's).
    pub(crate) fn all(&self) -> Vec<RoomHandle> {
        let mut rooms: Vec<_> = self.registry().live.values().flatten().cloned().collect();
        rooms.sort_by(|a, b| {
            (&a.meta.tenant, a.meta.created_at, &a.meta.code).cmp(&(&b.meta.tenant, b.meta.created_at, &b.meta.code))
        });
        rooms
    }

    /// The live room `code` of `tenant` exactly (the inspector's: no failed-join accounting,
    /// which is for people typing codes).
    pub(crate) fn find(&self, tenant: &str, code: &str) -> Option<RoomHandle> {
        let code = JoinCode::parse(code)?;
        self.registry().live.get(&code)?.iter().find(|r| &*r.meta.tenant == tenant).cloned()
    }

    /// Called as a room's task ends: the code stops being live and (`remember`: it closed
    /// here, rather than moving to another node) answers `room_closed` for a day.
    pub(crate) fn closed(&self, meta: &RoomMeta, remember: bool) {
        self.forget_room(meta, remember);
        self.changed.notify_waiters();
    }

    fn forget_room(&self, meta: &RoomMeta, remember: bool) {
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
            if remember && usage.closed.len() < CLOSED_MEMORY_PER_TENANT {
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
