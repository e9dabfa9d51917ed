//! How the rest of the server reaches a room's task: the [`RoomHandle`] and the [`Command`]s
//! it queues, what a joining session brings ([`Joining`], a [`Peer`] for its datagrams), what
//! is known about a room outside its task ([`RoomMeta`]: what never changes, its co-teachers,
//! and its timeline's epoch), and its view for the HTTP API ([`RoomView`]).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use downbeat_protocol::{
    self as wire, Applied, BoundedVec, ClientReport, ControlOp, ErrorCode, MAX_NOTES_PER_DATAGRAM, Member, Name, Note,
    Reflection, ReflectionNotice, ServerMessage, ServerNanos, Welcome,
};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::inspect::{PathFigures, RoomInspection, SessionCounters};
use crate::auth::Principal;
use crate::authz::{Refusal, RoomAccess};
use crate::codes::JoinCode;
use crate::sel::store::RoomSessionRow;
use crate::sel::unix_ms;
use crate::stats::Stats;

/// What the room task needs from a member's connection. Implemented for WebTransport
/// sessions (`session::h3::WtPeer`) and WebSocket ones; tests use a fake.
pub(crate) trait Peer: Send + Sync + fmt::Debug + 'static {
    /// Largest datagram the path takes now; `None` if the peer does not take datagrams.
    fn max_datagram_size(&self) -> Option<usize>;
    /// Queues a datagram of `kind` without waiting; false if it was refused.
    fn send_datagram(&self, kind: DatagramKind, bytes: &[u8]) -> bool;
    /// Closes the session with `code` at once.
    fn close(&self, code: ErrorCode, reason: &str);
    /// What the transport knows of the path, for the inspector (`None`: nothing).
    fn path(&self) -> Option<PathFigures> {
        None
    }
}

/// What a datagram the room sends carries: a transport that must queue datagrams keeps only
/// the newest beat frame, since each one carries the whole timeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DatagramKind {
    /// A beat frame.
    Beats,
    /// A classmate's notes.
    Notes,
}

/// The room tells a session to end: it says why on the control stream, then closes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Kick {
    pub(crate) code: ErrorCode,
    pub(crate) message: &'static str,
}

/// A control message as queued to a session. Shared: a broadcast is one allocation however
/// many members it goes to, and a queue's slots are a pointer each (tokio allocates a
/// queue's slots 32 at a time, so slots of a whole `ServerMessage` cost every session
/// about 5 KiB before it queued anything).
pub(crate) type Outgoing = Arc<ServerMessage>;

/// A session's connection as a room task reaches it: who it is, its datagrams, its bounded
/// control queue, and the way to tell it to end. Nothing here ever waits.
#[derive(Debug)]
pub(crate) struct Conn {
    pub(crate) who: Principal,
    peer: Arc<dyn Peer>,
    control_tx: mpsc::Sender<Outgoing>,
    kick: Option<oneshot::Sender<Kick>>,
    pub(crate) counters: Arc<SessionCounters>,
    pub(crate) seated_at: Instant,
}

impl Conn {
    pub(crate) fn new(joining: Joining) -> Self {
        let Joining { session_id: _, who, transport: _, peer, control_tx, kick, counters } = joining;
        Self { who, peer, control_tx, kick: Some(kick), counters, seated_at: Instant::now() }
    }

    /// What the transport knows of the path.
    pub(crate) fn path(&self) -> Option<PathFigures> {
        self.peer.path()
    }

    /// Queues a control message; false only if the queue is full (a slow reader). A closed
    /// queue is a session that is ending: its departure is on its way to the room.
    pub(crate) fn queue(&self, message: Outgoing) -> bool {
        !matches!(self.control_tx.try_send(message), Err(mpsc::error::TrySendError::Full(_)))
    }

    /// Hands a datagram to the transport without waiting, counting it; whether it was taken.
    pub(crate) fn send_datagram(&self, kind: DatagramKind, bytes: &[u8], stats: &Stats) -> bool {
        let sent = self.peer.send_datagram(kind, bytes);
        if sent {
            stats.datagrams_sent.inc();
            SessionCounters::count(&self.counters.sent);
        } else {
            stats.datagrams_send_failed.inc();
            SessionCounters::count(&self.counters.send_failed);
        }
        sent
    }

    /// Largest datagram the path takes now.
    pub(crate) fn max_datagram_size(&self) -> Option<usize> {
        self.peer.max_datagram_size()
    }

    /// Ends the session with `code`: it says why on its control stream, then closes; closed
    /// here at once when `at_once` (its queue is stuck) or when the session is already gone.
    pub(crate) fn end(&mut self, code: ErrorCode, message: &'static str, at_once: bool) {
        if at_once {
            self.peer.close(code, message);
        }
        if let Some(kick) = self.kick.take()
            && kick.send(Kick { code, message }).is_err()
        {
            self.peer.close(code, message);
        }
    }
}

/// A session joining a room: who (from the verified token) and how to reach them.
#[derive(Debug)]
pub(crate) struct Joining {
    /// Server-wide session id; tells a session's late leave from its successor's seat.
    pub(crate) session_id: u64,
    /// From the verified token (a teacher or a student: admins never join).
    pub(crate) who: Principal,
    pub(crate) transport: wire::Transport,
    pub(crate) peer: Arc<dyn Peer>,
    pub(crate) control_tx: mpsc::Sender<Outgoing>,
    pub(crate) kick: oneshot::Sender<Kick>,
    /// Its datagram counts, which the room and the session keep.
    pub(crate) counters: Arc<SessionCounters>,
}

/// How a session left its seat (decided by the room engine).
pub(crate) use downbeat_engine::room::Departure;

/// A room with its presence, as the HTTP API shows it.
#[derive(Clone, Debug)]
pub(crate) struct RoomView {
    pub(crate) timeline: wire::Timeline,
    pub(crate) members: Vec<(Member, bool)>,
    pub(crate) playout_delay_nanos: u64,
    pub(crate) recording: Option<wire::RecordingInfo>,
    pub(crate) playback: Option<wire::PlaybackInfo>,
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
    /// A take's notes loaded for [`ControlOp::PlayRecording`] (or why they could not be),
    /// back from the task that read them.
    Playback {
        take: u32,
        tempo: Option<wire::MicroBpm>,
        notes: Result<Vec<downbeat_engine::room::PlaybackNote>, downbeat_engine::room::Refused>,
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
    /// A member's clock-sync request named a timeline older than the room's.
    HeldEpoch {
        member_id: u64,
        session_id: u64,
        epoch: u64,
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
    /// From the SEL writer: the database refused a reflection's row (tell its author).
    ReflectionRefused {
        member_id: u64,
        request_id: u32,
    },
    /// From the SEL writer: a feed update for the teachers, now committed.
    Feed(ServerMessage),
    /// Adds (`present`) or removes a co-teacher (already authorized); answers whether
    /// anything changed.
    CoTeacher {
        subject: String,
        present: bool,
        reply: oneshot::Sender<Result<bool, Refusal>>,
    },
    /// A person whose data is being deleted: end their seat's session (`data_deleted`) and
    /// drop everything held in memory about them; answers once done.
    Forget {
        subject: String,
        reply: oneshot::Sender<()>,
    },
    /// The inspector's view of the room.
    Inspect {
        reply: oneshot::Sender<RoomInspection>,
    },
    /// An operator's test note (already authorized); answers the instant it sounds.
    TestNote {
        midi: u8,
        instrument: u8,
        reply: oneshot::Sender<Result<ServerNanos, Refusal>>,
    },
    /// An operator ends a session (`ended_by_operator`); answers whether the room had it.
    EndSession {
        session_id: u64,
        reply: oneshot::Sender<bool>,
    },
    /// An operator observes the room: its events go to `tx` (the room as it is first) until
    /// `tx` closes or the room does; false if the room has as many observers as it takes.
    Observe {
        tx: mpsc::Sender<serde_json::Value>,
        reply: oneshot::Sender<bool>,
    },
    /// Writes the room's state to the cluster's directory now (a new room, before its code
    /// is given out).
    Persist {
        reply: oneshot::Sender<Result<(), Refusal>>,
    },
    /// The cluster's directory says another node holds the room now: its members go there
    /// (`moved`) and the room ends here, its room session carried on there.
    Lost,
    /// Hands the room to node `to` (this node drains): its state is written to the directory
    /// naming `to`, its members are told to go there, and the room ends here. Answers whether
    /// it was handed over.
    HandOver {
        to: crate::cluster::NodeEntry,
        reply: oneshot::Sender<bool>,
    },
}

/// Most co-teachers a room has at once.
pub(crate) const MAX_CO_TEACHERS: usize = 8;

/// What is known about a room outside its task: what never changes, its co-teachers, and its
/// timeline's epoch.
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
    /// The teachers the owner added (subjects, at most [`MAX_CO_TEACHERS`]). Read by
    /// authorization anywhere; changed only by the room's task, in order with its commands.
    pub(crate) co_teachers: Mutex<Vec<String>>,
    /// The epoch of the room's timeline, as its task last published it (each time round its
    /// loop, after carrying out a change). A session compares a member's sync requests with it
    /// and asks the task for a repair only when the member is behind: one atomic load per
    /// request, not a command.
    pub(crate) epoch: AtomicU64,
}

impl RoomAccess for RoomMeta {
    fn tenant(&self) -> &str {
        &self.tenant
    }

    fn owner(&self) -> &str {
        &self.owner
    }

    fn has_co_teacher(&self, subject: &str) -> bool {
        self.co_teachers().iter().any(|s| s == subject)
    }
}

impl RoomMeta {
    /// The co-teachers, locked (never held across an await).
    pub(crate) fn co_teachers(&self) -> MutexGuard<'_, Vec<String>> {
        // Every change leaves the list whole before it can panic.
        self.co_teachers.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The timeline's epoch as the room's task last published it.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Relaxed)
    }

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
    pub(super) meta: Arc<RoomMeta>,
    pub(super) tx: mpsc::Sender<Command>,
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

    /// The room's description, to hold apart from the handle.
    pub(crate) fn shared_meta(&self) -> Arc<RoomMeta> {
        self.meta.clone()
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

    /// Adds (`present`) or removes a co-teacher (already authorized as the owner's request);
    /// whether anything changed (both are idempotent).
    pub(crate) async fn co_teacher(&self, subject: String, present: bool) -> Result<bool, Refusal> {
        let (reply, rx) = oneshot::channel();
        self.try_send(Command::CoTeacher { subject, present, reply })?;
        rx.await.unwrap_or_else(|_| Err(gone()))
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

    /// Tells the room that a member holds an older timeline than its own, without waiting (the
    /// member's next sync request says so again if the queue was full).
    pub(crate) fn held_epoch(&self, member_id: u64, session_id: u64, epoch: u64) {
        let _ = self.tx.try_send(Command::HeldEpoch { member_id, session_id, epoch });
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

    /// The inspector's view of the room.
    pub(crate) async fn inspect(&self) -> Result<RoomInspection, Refusal> {
        let (reply, rx) = oneshot::channel();
        self.try_send(Command::Inspect { reply })?;
        rx.await.map_err(|_| gone())
    }

    /// Sends an operator's test note to everyone in the room; the instant it sounds.
    pub(crate) async fn test_note(&self, midi: u8, instrument: u8) -> Result<ServerNanos, Refusal> {
        let (reply, rx) = oneshot::channel();
        self.try_send(Command::TestNote { midi, instrument, reply })?;
        rx.await.unwrap_or_else(|_| Err(gone()))
    }

    /// Ends session `session_id` (`ended_by_operator`); whether this room had it.
    pub(crate) async fn end_session(&self, session_id: u64) -> Result<bool, Refusal> {
        let (reply, rx) = oneshot::channel();
        self.try_send(Command::EndSession { session_id, reply })?;
        rx.await.map_err(|_| gone())
    }

    /// Sends the room's events to `tx` from now on; false if it has as many observers as it
    /// takes.
    pub(crate) async fn observe(&self, tx: mpsc::Sender<serde_json::Value>) -> Result<bool, Refusal> {
        let (reply, rx) = oneshot::channel();
        self.try_send(Command::Observe { tx, reply })?;
        rx.await.map_err(|_| gone())
    }

    fn try_send(&self, command: Command) -> Result<(), Refusal> {
        self.tx.try_send(command).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => busy(),
            mpsc::error::TrySendError::Closed(_) => gone(),
        })
    }
}
