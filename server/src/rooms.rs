//! The room registry and one task per room.
//!
//! Each room task owns its engine [`Room`] and its members' handles; everything else talks to
//! it through a bounded command queue. The task wakes when the engine says a frame is due,
//! hands each frame to QUIC without waiting (a slow or gone client never delays others) and
//! pushes control messages into each member's bounded queue with `try_send`: a member whose
//! queue is full is disconnected rather than waited on.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use downbeat_engine::room::{self, Room};
use downbeat_engine::timeline::{Applied, TimelineError};
use downbeat_protocol::{
    self as wire, BoundedVec, Change, EncodeError, ErrorCode, MAX_MEMBERS, Member, MicroBpm, Name, PROTOCOL_VERSION,
    RoomId, ServerDatagram, ServerMessage, ServerNanos, Welcome,
};
use rand::Rng as _;
use tokio::sync::{mpsc, oneshot};
use tracing::{Instrument as _, debug, info, info_span, warn};

use crate::clock::ServerClock;
use crate::shutdown::Shutdown;
use crate::stats::Stats;

/// Room ids are drawn from this alphabet: lowercase, no look-alikes (0/o, 1/l/i).
const ROOM_ID_ALPHABET: &[u8] = b"23456789abcdefghjkmnpqrstuvwxyz";
/// Length of a room id (31^10, about 8e14 ids).
const ROOM_ID_LEN: usize = 10;
/// Commands a room queues before senders wait (sessions) or are refused (HTTP).
const COMMAND_QUEUE: usize = 256;

/// What the room task needs from a member's connection. Implemented by
/// [`wtransport::Connection`]; tests use a fake.
pub(crate) trait Peer: Send + Sync + fmt::Debug + 'static {
    /// Largest datagram the path takes now; `None` if the peer does not take datagrams.
    fn max_datagram_size(&self) -> Option<usize>;
    /// Queues a datagram without waiting; false if it was refused.
    fn send_datagram(&self, bytes: &[u8]) -> bool;
    /// Closes the session with `code`.
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

/// Why a room operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RoomsError {
    /// The engine refused the change or the room settings.
    #[error(transparent)]
    Timeline(#[from] TimelineError),
    /// No room has this id.
    #[error("no room has this id")]
    NotFound,
    /// The server holds its maximum number of rooms.
    #[error("the server holds its maximum number of rooms; try again later")]
    TooManyRooms,
    /// The room's command queue is full.
    #[error("the room is busy; try again")]
    Busy,
    /// The room's task has ended (the server is shutting down).
    #[error("the server is shutting down")]
    Gone,
}

impl RoomsError {
    /// The stable code.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Timeline(e) => e.code(),
            Self::NotFound => ErrorCode::RoomNotFound,
            Self::TooManyRooms => ErrorCode::TooManyRooms,
            Self::Busy => ErrorCode::ServerBusy,
            Self::Gone => ErrorCode::ShuttingDown,
        }
    }
}

/// A room as the HTTP API shows it.
#[derive(Clone, Debug)]
pub(crate) struct Snapshot {
    pub(crate) timeline: wire::Timeline,
    pub(crate) members: usize,
}

/// A member joining: who, and the two ways to reach them.
#[derive(Debug)]
pub(crate) struct Joining {
    pub(crate) member_id: u64,
    pub(crate) name: Name,
    pub(crate) peer: Arc<dyn Peer>,
    pub(crate) control_tx: mpsc::Sender<ServerMessage>,
}

#[derive(Debug)]
enum Command {
    Join { joining: Joining, reply: oneshot::Sender<Result<Welcome, ErrorCode>> },
    Leave { member_id: u64 },
    Change { change: Change, reply: oneshot::Sender<Result<Applied, TimelineError>> },
    Snapshot { reply: oneshot::Sender<Snapshot> },
}

/// A cheap, cloneable way to reach one room's task.
#[derive(Clone, Debug)]
pub(crate) struct RoomHandle {
    id: Arc<str>,
    tx: mpsc::Sender<Command>,
}

impl RoomHandle {
    /// The room id.
    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    /// Adds a member; the welcome to send first on success.
    pub(crate) async fn join(&self, joining: Joining) -> Result<Welcome, ErrorCode> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Join { joining, reply }).await.map_err(|_| ErrorCode::ShuttingDown)?;
        rx.await.unwrap_or(Err(ErrorCode::ShuttingDown))
    }

    /// Removes a member (no-op if it is not one).
    pub(crate) async fn leave(&self, member_id: u64) {
        let _ = self.tx.send(Command::Leave { member_id }).await;
    }

    /// Applies a change, waiting for room in the queue (sessions).
    pub(crate) async fn change(&self, change: Change) -> Result<Applied, RoomsError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Change { change, reply }).await.map_err(|_| RoomsError::Gone)?;
        Ok(rx.await.map_err(|_| RoomsError::Gone)??)
    }

    /// Applies a change, refusing if the queue is full (HTTP).
    pub(crate) async fn try_change(&self, change: Change) -> Result<Applied, RoomsError> {
        let (reply, rx) = oneshot::channel();
        self.try_send(Command::Change { change, reply })?;
        Ok(rx.await.map_err(|_| RoomsError::Gone)??)
    }

    /// The room's timeline and member count.
    pub(crate) async fn snapshot(&self) -> Result<Snapshot, RoomsError> {
        let (reply, rx) = oneshot::channel();
        self.try_send(Command::Snapshot { reply })?;
        rx.await.map_err(|_| RoomsError::Gone)
    }

    fn try_send(&self, command: Command) -> Result<(), RoomsError> {
        self.tx.try_send(command).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => RoomsError::Busy,
            mpsc::error::TrySendError::Closed(_) => RoomsError::Gone,
        })
    }
}

/// Settings the registry passes to every room.
#[derive(Clone, Debug)]
pub(crate) struct RoomsConfig {
    pub(crate) engine: room::Config,
    pub(crate) max_rooms: usize,
}

/// All rooms, by id. The lock guards only the map and is never held across an await.
#[derive(Debug)]
pub(crate) struct Rooms {
    map: Mutex<HashMap<Arc<str>, RoomHandle>>,
    config: RoomsConfig,
    clock: ServerClock,
    stats: Arc<Stats>,
    shutdown: Shutdown,
}

impl Rooms {
    pub(crate) fn new(config: RoomsConfig, clock: ServerClock, stats: Arc<Stats>, shutdown: Shutdown) -> Self {
        Self { map: Mutex::new(HashMap::new()), config, clock, stats, shutdown }
    }

    fn map(&self) -> MutexGuard<'_, HashMap<Arc<str>, RoomHandle>> {
        // A panic while holding this lock cannot leave the map half-updated (single inserts,
        // removes and lookups), so a poisoned lock is still good to use.
        self.map.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Creates a stopped room and starts its task. Must be called within the tokio runtime.
    pub(crate) fn create(&self, tempo: MicroBpm, beats_per_bar: u8) -> Result<(String, wire::Timeline), RoomsError> {
        if self.shutdown.is_fired() {
            return Err(RoomsError::Gone);
        }
        let now = self.clock.now();
        let room = Room::new(self.config.engine.clone(), now, tempo, beats_per_bar)?;
        let timeline = room.timeline().to_wire();
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        let id: Arc<str> = {
            let mut map = self.map();
            if map.len() >= self.config.max_rooms {
                return Err(RoomsError::TooManyRooms);
            }
            let id = loop {
                let candidate: Arc<str> = new_room_id().into();
                if !map.contains_key(&candidate) {
                    break candidate;
                }
            };
            map.insert(id.clone(), RoomHandle { id: id.clone(), tx });
            id
        };
        self.stats.rooms_active.inc();
        self.stats.rooms_created.inc();
        let task =
            RoomTask { id: id.clone(), room, members: BTreeMap::new(), clock: self.clock, stats: self.stats.clone() };
        let span = info_span!("room", room = %id);
        tokio::spawn(task.run(rx, self.shutdown.clone()).instrument(span));
        info!(room = %id, bpm = tempo.as_bpm_f64(), beats_per_bar, "room created");
        Ok((id.to_string(), timeline))
    }

    /// The room with this id.
    pub(crate) fn get(&self, id: &str) -> Option<RoomHandle> {
        self.map().get(id).cloned()
    }

    /// Number of rooms.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map().len()
    }

    /// Forgets every room (their tasks end on the shutdown signal).
    pub(crate) fn clear(&self) {
        self.map().clear();
    }
}

/// A fresh random room id.
pub(crate) fn new_room_id() -> String {
    let mut rng = rand::rng();
    (0..ROOM_ID_LEN).map(|_| char::from(ROOM_ID_ALPHABET[rng.random_range(0..ROOM_ID_ALPHABET.len())])).collect()
}

#[derive(Debug)]
struct MemberEntry {
    name: Name,
    peer: Arc<dyn Peer>,
    control_tx: mpsc::Sender<ServerMessage>,
}

struct RoomTask {
    id: Arc<str>,
    room: Room,
    members: BTreeMap<u64, MemberEntry>,
    clock: ServerClock,
    stats: Arc<Stats>,
}

impl RoomTask {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>, mut shutdown: Shutdown) {
        loop {
            let now = self.clock.now();
            while let Some(transmit) = self.room.poll_transmit(now) {
                self.send_frame(transmit);
            }
            let wake = self.room.poll_timeout().map(|t| self.clock.instant_of(t));
            tokio::select! {
                biased;
                () = shutdown.wait() => break,
                command = commands.recv() => match command {
                    Some(command) => self.handle(command),
                    None => break,
                },
                () = sleep_until_opt(wake) => {}
            }
        }
        self.stats.rooms_active.dec();
        debug!("room task ended");
    }

    fn handle(&mut self, command: Command) {
        let now = self.clock.now();
        match command {
            Command::Join { joining, reply } => self.join(now, joining, reply),
            Command::Leave { member_id } => {
                if self.remove(member_id).is_some() {
                    self.broadcast(ServerMessage::MemberLeft { member_id }, None);
                }
            }
            Command::Change { change, reply } => {
                let result = self.room.handle_change(now, change);
                match &result {
                    Ok(applied) => {
                        self.stats.changes_applied.inc();
                        info!(
                            epoch = applied.epoch,
                            effective_beat = applied.effective_beat,
                            ?change,
                            "timeline changed"
                        );
                        let timeline = self.wire_timeline(now);
                        self.broadcast(ServerMessage::Timeline(timeline), None);
                    }
                    Err(e) => {
                        self.stats.changes_refused.inc();
                        debug!(error = %e, "change refused");
                    }
                }
                let _ = reply.send(result);
            }
            Command::Snapshot { reply } => {
                let _ = reply.send(Snapshot { timeline: self.wire_timeline(now), members: self.room.member_count() });
            }
        }
    }

    fn join(&mut self, now: ServerNanos, joining: Joining, reply: oneshot::Sender<Result<Welcome, ErrorCode>>) {
        let Joining { member_id, name, peer, control_tx } = joining;
        if let Err(e) = self.room.join(now, member_id) {
            let _ = reply.send(Err(e.code()));
            return;
        }
        self.broadcast(ServerMessage::MemberJoined(Member { id: member_id, name: name.clone() }), None);
        self.members.insert(member_id, MemberEntry { name, peer, control_tx });
        let members =
            self.members.iter().take(MAX_MEMBERS).map(|(id, m)| Member { id: *id, name: m.name.clone() }).collect();
        let welcome = Welcome {
            version: PROTOCOL_VERSION,
            member_id,
            room: RoomId::truncating(&self.id),
            timeline: self.wire_timeline(now),
            // Cannot fail: `take(MAX_MEMBERS)`.
            members: BoundedVec::try_from_vec(members).unwrap_or_default(),
            lead_nanos: self.room.config().lead_nanos,
            server_now: self.clock.now(),
        };
        if reply.send(Ok(welcome)).is_err() {
            // The session gave up while waiting: undo.
            if self.remove(member_id).is_some() {
                self.broadcast(ServerMessage::MemberLeft { member_id }, None);
            }
            return;
        }
        info!(member = member_id, members = self.members.len(), "member joined");
    }

    fn remove(&mut self, member_id: u64) -> Option<MemberEntry> {
        self.room.leave(member_id);
        let entry = self.members.remove(&member_id)?;
        info!(member = member_id, members = self.members.len(), "member left");
        Some(entry)
    }

    /// The timeline as of `now`, without segments that are over.
    fn wire_timeline(&self, now: ServerNanos) -> wire::Timeline {
        self.room.timeline().to_wire_at(now)
    }

    /// Queues `message` for every member but `except`, never waiting: a member whose queue
    /// is full is disconnected, and everyone left hears that they left.
    fn broadcast(&mut self, message: ServerMessage, except: Option<u64>) {
        let mut pending = VecDeque::from([(message, except)]);
        while let Some((message, except)) = pending.pop_front() {
            let mut dropped = Vec::new();
            for (id, member) in &self.members {
                if Some(*id) == except {
                    continue;
                }
                match member.control_tx.try_send(message.clone()) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => dropped.push((*id, true)),
                    Err(mpsc::error::TrySendError::Closed(_)) => dropped.push((*id, false)),
                }
            }
            for (id, slow) in dropped {
                let Some(member) = self.remove(id) else { continue };
                if slow {
                    self.stats.slow_members_dropped.inc();
                    warn!(member = id, "control queue full; disconnecting the member");
                    member.peer.close(ErrorCode::ServerBusy, "control stream backlog");
                }
                pending.push_back((ServerMessage::MemberLeft { member_id: id }, None));
            }
        }
    }

    /// Encodes and hands one beat frame to QUIC. Drops beats from the end until the frame
    /// fits the path's datagram size; never waits.
    fn send_frame(&self, transmit: room::Transmit) {
        let Some(member) = self.members.get(&transmit.member) else { return };
        let Some(max) = member.peer.max_datagram_size() else {
            self.stats.datagrams_send_failed.inc();
            return;
        };
        let Some((bytes, trimmed)) = encode_to_fit(transmit.frame, max) else {
            self.stats.datagrams_send_failed.inc();
            return;
        };
        if trimmed {
            self.stats.beat_frames_trimmed.inc();
        }
        if member.peer.send_datagram(&bytes) {
            self.stats.datagrams_sent.inc();
            self.stats.beat_frames_sent.inc();
        } else {
            self.stats.datagrams_send_failed.inc();
        }
    }
}

/// Encodes `frame` as a datagram of at most `max` bytes, dropping beats from the end as
/// needed. `None` if even the timeline alone does not fit. The flag says beats were dropped.
fn encode_to_fit(frame: wire::BeatFrame, max: usize) -> Option<(Vec<u8>, bool)> {
    let mut datagram = ServerDatagram::Beats(frame);
    let mut trimmed = false;
    loop {
        match wire::encode_server_datagram(&datagram) {
            Ok(bytes) if bytes.len() <= max => return Some((bytes, trimmed)),
            Ok(_) | Err(EncodeError::TooLarge { .. }) => {
                let ServerDatagram::Beats(frame) = &mut datagram else { return None };
                let mut beats = std::mem::take(&mut frame.beats).into_vec();
                beats.pop()?;
                // Cannot fail: one shorter than a vector that fit.
                frame.beats = BoundedVec::try_from_vec(beats).unwrap_or_default();
                trimmed = true;
            }
            Err(_) => return None,
        }
    }
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    #[derive(Debug, Default)]
    struct FakePeer {
        max: Option<usize>,
        sent: Mutex<Vec<Vec<u8>>>,
        closed: Mutex<Option<ErrorCode>>,
        refuse: AtomicUsize,
    }

    impl Peer for FakePeer {
        fn max_datagram_size(&self) -> Option<usize> {
            self.max
        }
        fn send_datagram(&self, bytes: &[u8]) -> bool {
            if self.refuse.load(Ordering::Relaxed) > 0 {
                return false;
            }
            self.sent.lock().unwrap().push(bytes.to_vec());
            true
        }
        fn close(&self, code: ErrorCode, _reason: &str) {
            *self.closed.lock().unwrap() = Some(code);
        }
    }

    fn rooms(max_rooms: usize, max_members: usize) -> (Rooms, Arc<Stats>, crate::shutdown::Trigger) {
        let (trigger, shutdown) = crate::shutdown::channel();
        let stats = Arc::new(Stats::default());
        let config = RoomsConfig { engine: room::Config { max_members, ..room::Config::default() }, max_rooms };
        (Rooms::new(config, ServerClock::new(), stats.clone(), shutdown), stats, trigger)
    }

    fn joining(id: u64, peer: &Arc<FakePeer>, queue: usize) -> (Joining, mpsc::Receiver<ServerMessage>) {
        let (control_tx, rx) = mpsc::channel(queue);
        let name = Name::new(format!("m{id}")).unwrap();
        let peer: Arc<dyn Peer> = peer.clone();
        (Joining { member_id: id, name, peer, control_tx }, rx)
    }

    fn decode(bytes: &[u8]) -> wire::BeatFrame {
        match wire::decode_server_datagram(bytes).unwrap() {
            ServerDatagram::Beats(frame) => frame,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn room_ids_use_the_unambiguous_alphabet() {
        for _ in 0..100 {
            let id = new_room_id();
            assert_eq!(id.len(), ROOM_ID_LEN);
            assert!(id.bytes().all(|b| ROOM_ID_ALPHABET.contains(&b)), "{id}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn create_is_bounded_and_validated() {
        let (rooms, stats, _trigger) = rooms(2, 4);
        assert!(matches!(
            rooms.create(MicroBpm::from_bpm(10), 4),
            Err(RoomsError::Timeline(TimelineError::TempoOutOfRange { .. }))
        ));
        assert!(matches!(rooms.create(MicroBpm::from_bpm(120), 0), Err(RoomsError::Timeline(_))));
        let (a, timeline) = rooms.create(MicroBpm::from_bpm(120), 4).unwrap();
        assert_eq!(timeline.epoch, 1);
        rooms.create(MicroBpm::from_bpm(90), 3).unwrap();
        assert!(matches!(rooms.create(MicroBpm::from_bpm(90), 3), Err(RoomsError::TooManyRooms)));
        assert_eq!(rooms.len(), 2);
        assert_eq!(stats.rooms_active.get(), 2);
        let snapshot = rooms.get(&a).unwrap().snapshot().await.unwrap();
        assert_eq!(snapshot.members, 0);
        assert!(rooms.get("nosuchroom").is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn join_welcome_broadcasts_and_beats() {
        let (rooms, stats, _trigger) = rooms(10, 2);
        let (id, _) = rooms.create(MicroBpm::from_bpm(120), 4).unwrap();
        let handle = rooms.get(&id).unwrap();

        let peer1 = Arc::new(FakePeer { max: Some(1200), ..FakePeer::default() });
        let (j1, mut rx1) = joining(1, &peer1, 16);
        let welcome = handle.join(j1).await.unwrap();
        assert_eq!(welcome.member_id, 1);
        assert_eq!(welcome.room.as_str(), id);
        assert_eq!(welcome.members.len(), 1);
        assert_eq!(welcome.lead_nanos, 1_500_000_000);

        let peer2 = Arc::new(FakePeer { max: Some(1200), ..FakePeer::default() });
        let (j2, mut rx2) = joining(2, &peer2, 16);
        let welcome = handle.join(j2).await.unwrap();
        assert_eq!(welcome.members.iter().map(|m| m.id).collect::<Vec<_>>(), vec![1, 2]);
        assert!(matches!(rx1.recv().await, Some(ServerMessage::MemberJoined(m)) if m.id == 2));

        // Full room.
        let peer3 = Arc::new(FakePeer::default());
        let (j3, _rx3) = joining(3, &peer3, 16);
        assert_eq!(handle.join(j3).await, Err(ErrorCode::RoomFull));

        // Start: both hear the new timeline, then beats flow on datagrams.
        let applied = handle.change(Change::Start).await.unwrap();
        assert_eq!(applied.epoch, 2);
        assert!(matches!(rx1.recv().await, Some(ServerMessage::Timeline(t)) if t.epoch == 2));
        assert!(matches!(rx2.recv().await, Some(ServerMessage::Timeline(t)) if t.epoch == 2));
        assert!(matches!(handle.change(Change::Start).await, Err(RoomsError::Timeline(TimelineError::AlreadyRunning))));
        tokio::time::sleep(Duration::from_secs(3)).await;
        let frames: Vec<_> = peer1.sent.lock().unwrap().iter().map(|b| decode(b)).collect();
        assert!(frames.len() >= 20, "{}", frames.len());
        assert!(frames.iter().any(|f| !f.beats.is_empty()));
        assert!(frames.windows(2).all(|w| w[0].seq < w[1].seq));
        assert!(stats.beat_frames_sent.get() >= 40);

        // Leave: the other hears it.
        handle.leave(2).await;
        assert!(matches!(rx1.recv().await, Some(ServerMessage::MemberLeft { member_id: 2 })));
        assert_eq!(handle.snapshot().await.unwrap().members, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_member_with_a_full_queue_is_dropped_not_waited_on() {
        let (rooms, stats, _trigger) = rooms(10, 8);
        let (id, _) = rooms.create(MicroBpm::from_bpm(120), 4).unwrap();
        let handle = rooms.get(&id).unwrap();
        let slow = Arc::new(FakePeer { max: Some(1200), ..FakePeer::default() });
        let (j, _slow_rx) = joining(1, &slow, 1);
        handle.join(j).await.unwrap();
        let fast = Arc::new(FakePeer { max: Some(1200), ..FakePeer::default() });
        let (j, mut fast_rx) = joining(2, &fast, 64);
        handle.join(j).await.unwrap(); // Fills the slow member's queue (MemberJoined).
        handle.change(Change::Start).await.unwrap(); // Overflows it.
        assert_eq!(*slow.closed.lock().unwrap(), Some(ErrorCode::ServerBusy));
        assert_eq!(stats.slow_members_dropped.get(), 1);
        assert!(matches!(fast_rx.recv().await, Some(ServerMessage::Timeline(_))));
        assert!(matches!(fast_rx.recv().await, Some(ServerMessage::MemberLeft { member_id: 1 })));
        assert_eq!(handle.snapshot().await.unwrap().members, 1);
    }

    #[test]
    fn frames_are_trimmed_to_fit_the_datagram_size() {
        let mut room = Room::new(room::Config::default(), ServerNanos(0), MicroBpm::from_bpm(300), 4).unwrap();
        room.join(ServerNanos(0), 1).unwrap();
        room.handle_change(ServerNanos(0), Change::Start).unwrap();
        let frame = room.frame_at(ServerNanos(3_000_000_000));
        let full = frame.beats.len();
        assert!(full > 2, "{full}");
        let (bytes, trimmed) = encode_to_fit(frame.clone(), 1200).unwrap();
        assert!(!trimmed);
        let limit = bytes.len() - 1;
        let (bytes, trimmed) = encode_to_fit(frame.clone(), limit).unwrap();
        assert!(trimmed && bytes.len() <= limit);
        assert_eq!(decode(&bytes).beats.len(), full - 1);
        assert!(encode_to_fit(frame, 10).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn send_failures_are_counted_and_do_not_stop_the_room() {
        let (rooms, stats, _trigger) = rooms(10, 8);
        let (id, _) = rooms.create(MicroBpm::from_bpm(120), 4).unwrap();
        let handle = rooms.get(&id).unwrap();
        let gone = Arc::new(FakePeer { max: Some(1200), refuse: AtomicUsize::new(1), ..FakePeer::default() });
        let (j, _rx) = joining(1, &gone, 8);
        handle.join(j).await.unwrap();
        let no_datagrams = Arc::new(FakePeer::default());
        let (j, _rx2) = joining(2, &no_datagrams, 8);
        handle.join(j).await.unwrap();
        handle.change(Change::Start).await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(stats.datagrams_send_failed.get() >= 10);
        assert_eq!(stats.datagrams_sent.get(), 0);
        assert!(handle.snapshot().await.is_ok());
    }
}
