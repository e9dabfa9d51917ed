//! One room's task: the shell around [`downbeat_engine::room::Room`], which decides everything
//! (seats, presence, controls, notes, abuse, expiry, SEL work).
//!
//! The task feeds the engine its commands and the time, and moves what the engine asks for
//! to sockets and to the SEL writer. It wakes when the engine's [`Room::poll_timeout`] is due.
//! It never waits on a member: datagrams go to QUIC without waiting, and control messages go
//! into each session's bounded queue with `try_send`; a full queue goes back to the engine
//! ([`Room::handle_slow`]), which drops that member. Connections are kept here by session
//! id, the engine's outputs name the session they are for, so a replaced session's connection
//! is never mistaken for its successor's.
//!
//! SEL work leaves through [`super::sel`] (rows) and [`Sel::try_submit`] (never waiting);
//! what the writer commits comes back as commands ([`Command::Feed`],
//! [`Command::ReflectionCommitted`]).
//!
//! Co-teachers change here, in order with every other command: the list in [`RoomMeta`]
//! (which authorization reads), the store's record of the room session, and which seated
//! members hear the SEL feed, each decided again by [`crate::authz::authorize`] for every
//! session of the subject.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use downbeat_engine::room::{self, Departure, Essentials, Join, Output, Recipient, Room, SelWork, encode_beats_to_fit};
use downbeat_protocol::{self as wire, ControlOp, ErrorCode, Name, ServerDatagram, ServerMessage, ServerNanos};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use super::handle::{Command, Conn, DatagramKind, Joining, MAX_CO_TEACHERS, Outgoing, RoomMeta, RoomView};
use super::inspect::{Observers, RoomInspection, SessionExtras};
use crate::authz::{Operation, Refusal, authorize};
use crate::clock::ServerClock;
use crate::cluster::{Cluster, Located, NodeEntry, RoomState, WriteError};
use crate::sel::{Job, Sel};
use crate::shutdown::Shutdown;
use crate::stats::Stats;

/// How long a closing room waits for room in the SEL queue for its last flush.
const LAST_FLUSH_PATIENCE: std::time::Duration = std::time::Duration::from_secs(2);
/// How long a playback waits for the recording's queued writes.
const PLAYBACK_PATIENCE: std::time::Duration = std::time::Duration::from_secs(5);

impl From<room::Refused> for Refusal {
    fn from(refused: room::Refused) -> Self {
        Self::new(refused.code, refused.message)
    }
}

/// A beat frame encoded for one datagram size: its bytes, and whether beats were left out to
/// fit (`None`: even the timeline alone did not fit).
type FittedBeats = Option<(Vec<u8>, bool)>;

pub(crate) struct RoomTask {
    meta: Arc<RoomMeta>,
    room: Room,
    /// By session id.
    conns: HashMap<u64, Conn>,
    clock: ServerClock,
    stats: Arc<Stats>,
    sel: Sel,
    /// This room's own queue, for what the SEL writer reports back once it committed.
    own: mpsc::WeakSender<Command>,
    /// Operators watching the room from the inspector.
    observers: Observers,
    /// The cluster's directory, in which the room's state is written before any change that
    /// matters for a takeover is acknowledged.
    cluster: Option<Arc<Cluster>>,
    /// What was last written there.
    written: Option<Essentials>,
    /// The room went to another node: what is left for the SEL writer (instead of ending the
    /// room session, which that node carries on).
    moved: Option<Vec<SelWork>>,
}

/// What a room task is given when it starts.
pub(crate) struct RoomParts {
    pub(crate) meta: Arc<RoomMeta>,
    pub(crate) room: Room,
    pub(crate) clock: ServerClock,
    pub(crate) stats: Arc<Stats>,
    pub(crate) sel: Sel,
    pub(crate) own: mpsc::WeakSender<Command>,
    pub(crate) cluster: Option<Arc<Cluster>>,
    /// The room was taken over as the directory holds it (nothing to write until it changes).
    pub(crate) resumed: bool,
}

/// Why a change was not acknowledged: the cluster's directory did not take it.
fn unwritten() -> Refusal {
    Refusal::new(ErrorCode::ServerBusy, "the cluster's room directory cannot be reached; nothing changed, try again")
}

/// Why a request was not answered: the room lives on another node now.
fn moved_away() -> Refusal {
    Refusal::new(ErrorCode::Moved, "the class moved to another server; reconnecting there")
}

impl RoomTask {
    pub(crate) fn new(parts: RoomParts) -> Self {
        let RoomParts { meta, room, clock, stats, sel, own, cluster, resumed } = parts;
        let written = resumed.then(|| room.essentials());
        Self {
            meta,
            room,
            conns: HashMap::new(),
            clock,
            stats,
            sel,
            own,
            observers: Observers::default(),
            cluster,
            written,
            moved: None,
        }
    }

    /// The room as another node takes it over.
    pub(crate) fn state(&self) -> RoomState {
        use base64::Engine as _;
        let handover = postcard::to_allocvec(&self.room.handover()).unwrap_or_default();
        let created_at_ms = self
            .meta
            .created_at
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        RoomState {
            owner: self.meta.owner.clone(),
            name: self.meta.name.to_string(),
            sel_id: self.meta.sel_id.clone(),
            created_at_ms,
            co_teachers: self.meta.co_teachers().clone(),
            room: base64::engine::general_purpose::STANDARD_NO_PAD.encode(handover),
        }
    }

    /// In a cluster, writes the room's state to the directory if what a takeover needs
    /// changed (`force`: whatever changed), before anything about the change leaves. Not
    /// written: the room is as it was `before` (if given; else the next renewal writes it),
    /// and the refusal says why. Lost to another node: the room moves there.
    async fn persist(&mut self, before: Option<Room>, force: bool) -> Result<(), Refusal> {
        let Some(cluster) = self.cluster.clone() else { return Ok(()) };
        let essentials = self.room.essentials();
        if !force && self.written.as_ref() == Some(&essentials) {
            return Ok(());
        }
        let written = cluster.write_state(&self.meta.tenant, self.meta.code.as_str(), self.state()).await;
        match written {
            Ok(()) => {
                self.written = Some(essentials);
                Ok(())
            }
            Err(WriteError::Unreachable(e)) => {
                warn!(error = %e, "the room's state was not written to the cluster's directory");
                self.stats.cluster_writes_failed.inc();
                if let Some(before) = before {
                    self.room = before;
                }
                Err(unwritten())
            }
            Err(WriteError::Lost) => {
                if let Some(before) = before {
                    self.room = before;
                }
                self.move_away(None).await;
                Err(moved_away())
            }
        }
    }

    /// The room lives on another node now (`to`, or where the directory says, or any other
    /// live node, which sends its members on): every member is told where to go, and the
    /// room ends here without ending its room session.
    async fn move_away(&mut self, to: Option<NodeEntry>) {
        if self.moved.is_some() {
            return;
        }
        let now = self.clock.now();
        let to = match (to, &self.cluster) {
            (Some(to), _) => Some(to),
            (None, Some(cluster)) => match cluster.locate(&self.meta.tenant, self.meta.code.as_str()).await {
                Ok(Located::Elsewhere(owner)) => Some(owner),
                _ => {
                    let me = cluster.node_id();
                    cluster.nodes().into_iter().find(|n| n.id != me)
                }
            },
            (None, None) => None,
        };
        let Some(to) = to else {
            warn!("the room was lost and no other node is live; closing it");
            let _ = self.room.handle_control(now, ControlOp::Close, None);
            self.drain(now);
            return;
        };
        info!(node = %to.id, "the room lives on another node now; its members are sent there");
        self.stats.cluster_rooms_moved.inc();
        let work = self.room.handle_moved(now, to.moved());
        self.moved = Some(work);
        self.drain(now);
    }

    /// Runs the room until it closes, the server shuts down, or it moves to another node
    /// (then true).
    pub(crate) async fn run(mut self, mut commands: mpsc::Receiver<Command>, mut shutdown: Shutdown) -> bool {
        loop {
            let now = self.clock.now();
            let tick = self.room.handle_timeout(now);
            if tick.seats_expired > 0 {
                self.stats.seats_expired.add(u64::from(tick.seats_expired));
                info!(seats = tick.seats_expired, "grace period over; seats freed");
                let _ = self.persist(None, false).await;
            }
            // Published before the frames go out: a member that received one carrying an epoch
            // is compared with at least that epoch.
            self.meta.epoch.store(self.room.timeline().epoch(), Ordering::Relaxed);
            self.drain(now);
            if self.room.is_closed() {
                break;
            }
            // Nothing due: about 30 years out (the clock saturates there).
            let wake = self.clock.instant_of(self.room.poll_timeout().unwrap_or(ServerNanos(u64::MAX)));
            tokio::select! {
                biased;
                () = shutdown.wait() => break,
                command = commands.recv() => match command {
                    Some(command) => self.handle(command).await,
                    None => break,
                },
                () = tokio::time::sleep_until(wake) => {}
            }
        }
        // Flushed while the room is still registered, so a student's data deletion that
        // finds no room here finds every row of it already queued before its own write. A
        // room that moved leaves its room session open for the node that has it now.
        let moved = self.moved.is_some();
        let left = match self.moved.take() {
            Some(work) => work,
            None => self.room.finish(self.clock.now()),
        };
        for work in left {
            let job = Job::rows(super::sel::batch(&self.meta, &self.clock, &work));
            if let Err(job) = self.sel.submit_within(job, LAST_FLUSH_PATIENCE).await {
                let lost = job.batch.participation.len() as u64;
                self.stats.participation_dropped.add(lost);
                let notes = job.batch.recorded_notes.len();
                warn!(rows = lost, notes, "SEL queue full as the room closed; its last rows are lost");
            }
        }
        self.stats.rooms_active.dec();
        debug!("room task ended");
        moved
    }

    async fn handle(&mut self, command: Command) {
        let now = self.clock.now();
        match command {
            Command::Join { joining, reply } => self.join(now, joining, reply).await,
            Command::Depart { member_id, session_id, how } => {
                self.conns.remove(&session_id);
                self.room.handle_depart(now, member_id, session_id, how);
                debug!(member = member_id, ?how, "session left");
                let _ = self.persist(None, false).await;
            }
            Command::Persist { reply } => {
                let _ = reply.send(self.persist(None, true).await);
            }
            Command::Lost => self.move_away(None).await,
            Command::HandOver { to, reply } => {
                let _ = reply.send(self.hand_over(to).await);
            }
            Command::Control { op: ControlOp::PlayRecording { take, tempo }, requester, reply } => {
                self.load_playback(take, tempo, requester, reply);
            }
            Command::Playback { take, tempo, notes, requester, reply } => {
                let before = self.cluster.is_some().then(|| self.room.clone());
                let mut result =
                    self.room.handle_playback(now, take, tempo, notes, requester).map(Some).map_err(Refusal::from);
                if result.is_ok()
                    && let Err(refusal) = self.persist(before, false).await
                {
                    result = Err(refusal);
                }
                match &result {
                    Ok(applied) => {
                        self.stats.controls_applied.inc();
                        info!(take, ?applied, "playback started");
                    }
                    Err(refusal) => {
                        self.stats.refused.inc(refusal.code);
                        debug!(code = refusal.code.as_str(), message = %refusal.message, "playback refused");
                    }
                }
                // What the control queued goes out first (its SEL rows among it), so a caller
                // who reads the store after the answer finds them queued.
                self.drain(now);
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
            }
            Command::Control { op, requester, reply } => {
                let before = self.cluster.is_some().then(|| self.room.clone());
                let mut result = self.room.handle_control(now, op.clone(), requester).map_err(Refusal::from);
                if result.is_ok()
                    && let Err(refusal) = self.persist(before, false).await
                {
                    result = Err(refusal);
                }
                match &result {
                    Ok(applied) => {
                        self.stats.controls_applied.inc();
                        match op {
                            ControlOp::Timeline(change) => {
                                self.stats.changes_applied.inc();
                                info!(?applied, ?change, "timeline changed");
                            }
                            ControlOp::Mute { member, muted } => info!(member, muted, "mute changed"),
                            ControlOp::Remove { member } => info!(member, "member removed"),
                            ControlOp::Prompt { .. } => {
                                info!(prompt = self.room.prompt().map(|p| p.id), "reflection prompt set");
                            }
                            ControlOp::StartRecording => info!(recording = ?self.room.recording(), "recording started"),
                            ControlOp::StopRecording => info!("recording stopped"),
                            ControlOp::StopPlayback => info!(?applied, "playback stopping"),
                            // Loaded first, then applied as `Command::Playback`.
                            ControlOp::PlayRecording { .. } => {}
                            ControlOp::Assign { .. } | ControlOp::Close => {}
                        }
                    }
                    Err(refusal) => {
                        self.stats.refused.inc(refusal.code);
                        debug!(code = refusal.code.as_str(), message = %refusal.message, "control refused");
                    }
                }
                // What the control queued goes out first (its SEL rows among it), so a caller
                // who reads the store after the answer finds them queued.
                self.drain(now);
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
            }
            Command::Notes { member_id, session_id, notes } => {
                let Some(handled) = self.room.handle_notes(now, member_id, session_id, &notes) else { return };
                self.stats.count_notes(&handled);
                if handled.expelled {
                    warn!(member = member_id, "note abuse; closing the session");
                }
            }
            Command::Reflect { member_id, session_id, reflection } => {
                if let Some(code) = self.room.handle_reflection(now, member_id, session_id, &reflection) {
                    self.stats.refused.inc(code);
                }
            }
            Command::ReflectionCommitted { member_id, request_id, notice } => {
                self.room.handle_reflection_saved(member_id, request_id, notice);
            }
            Command::ReflectionRefused { member_id, request_id } => {
                self.stats.refused.inc(ErrorCode::StoreRefused);
                self.room.handle_reflection_unwritable(member_id, request_id);
            }
            Command::Feed(message) => self.room.handle_feed(message),
            Command::CoTeacher { subject, present, reply } => {
                let changed = self.co_teacher(subject, present);
                if matches!(changed, Ok(true)) {
                    let _ = self.persist(None, true).await;
                }
                let _ = reply.send(changed);
            }
            Command::Forget { subject, reply } => {
                self.room.handle_forget(now, &subject);
                // Deletion is final on every node: the handover forgets them too.
                let _ = self.persist(None, true).await;
                let _ = reply.send(());
            }
            Command::Report { member_id, session_id, report } => {
                if let Some(handled) = self.room.handle_report(now, member_id, session_id, report) {
                    self.stats.count_report(&report, &handled);
                }
            }
            Command::HeldEpoch { member_id, session_id, epoch } => {
                if self.room.handle_held_epoch(now, member_id, session_id, epoch) {
                    self.stats.timelines_repaired.inc();
                }
            }
            Command::Inspect { reply } => {
                let _ = reply.send(self.inspection(now));
            }
            Command::TestNote { midi, instrument, reply } => {
                let result = self.room.handle_test_note(now, midi, instrument).map_err(Refusal::from);
                info!(midi, instrument, ok = result.is_ok(), "operator's test note");
                self.drain(now);
                let _ = reply.send(result);
            }
            Command::EndSession { session_id, reply } => {
                let found = self.conns.get_mut(&session_id).map(|conn| {
                    conn.end(ErrorCode::EndedByOperator, "a server operator ended this session", false);
                });
                info!(session = session_id, found = found.is_some(), "operator ended a session");
                let _ = reply.send(found.is_some());
            }
            Command::Observe { tx, reply } => {
                let snapshot = serde_json::json!({
                    "event": "observing",
                    "room": self.inspection(now),
                    "timeline": super::inspect::timeline_json(&self.room.timeline().to_wire_at(now), &self.clock),
                });
                let added = self.observers.add(tx, snapshot);
                info!(added, observers = self.observers.len(), "operator observing");
                let _ = reply.send(added);
            }
            Command::View { reply } => {
                let _ = reply.send(RoomView {
                    timeline: self.room.timeline().to_wire_at(now),
                    members: self.room.members().map(|(m, attached)| (m.clone(), attached)).collect(),
                    playout_delay_nanos: self.room.config().playout_delay_nanos,
                    recording: self.room.recording(),
                    playback: self.room.playback(),
                });
            }
        }
        self.drain(now);
    }

    /// The room as the inspector shows it: seats by member id with their sessions' figures.
    fn inspection(&self, now: ServerNanos) -> RoomInspection {
        let timeline = self.room.timeline();
        let segment = timeline.segment_at(now);
        let seats = self
            .room
            .seats()
            .map(|view| {
                super::inspect::seat(&view, |session| {
                    self.conns.get(&session).map(|conn| SessionExtras {
                        seated_for: conn.seated_at.elapsed(),
                        counters: &conn.counters,
                        path: conn.path(),
                    })
                })
            })
            .collect();
        RoomInspection {
            running: segment.running,
            tempo_bpm: segment.tempo.as_bpm_f64(),
            beats_per_bar: segment.beats_per_bar,
            epoch: timeline.epoch(),
            recording: self.room.recording().map(|r| r.take),
            playback: self.room.playback().map(|p| p.take),
            observers: self.observers.len(),
            seats,
        }
    }

    /// Reads take `take` of this room session (once the writes queued before it are
    /// committed) on a task of its own, and hands its notes back as [`Command::Playback`]:
    /// the room never waits on the database.
    fn load_playback(
        &self,
        take: u32,
        tempo: Option<wire::MicroBpm>,
        requester: Option<(u64, u32)>,
        reply: Option<oneshot::Sender<Result<Option<wire::Applied>, Refusal>>>,
    ) {
        let (sel, own, meta) = (self.sel.clone(), self.own.clone(), self.meta.clone());
        tokio::spawn(async move {
            let refused = |code, message: &'static str| room::Refused { code, message: message.into() };
            let notes = if sel.barrier(PLAYBACK_PATIENCE).await {
                match sel.store().recording(&meta.tenant, &meta.sel_id, i64::from(take)).await {
                    Ok(Some(take)) => Ok(crate::sel::midi::playback_notes(&take)),
                    Ok(None) => Err(refused(ErrorCode::RecordingNotFound, "no such recording in this class")),
                    Err(e) => {
                        warn!(error = %e, "reading a recording for playback failed");
                        Err(refused(ErrorCode::StoreUnavailable, "the recording cannot be read right now"))
                    }
                }
            } else {
                Err(refused(ErrorCode::StoreUnavailable, "recordings are behind; try again shortly"))
            };
            if let Some(tx) = own.upgrade() {
                let _ = tx.send(Command::Playback { take, tempo, notes, requester, reply }).await;
            }
        });
    }

    /// Hands the room to node `to`: its state is written to the directory naming `to`, then
    /// its members are sent there. Whether it was handed over (if not, it stays here).
    async fn hand_over(&mut self, to: NodeEntry) -> bool {
        let Some(cluster) = self.cluster.clone() else { return false };
        let handed = cluster.hand_over(&self.meta.tenant, self.meta.code.as_str(), &to.id, self.state()).await;
        match handed {
            Ok(()) => {
                self.stats.cluster_rooms_handed_over.inc();
                self.move_away(Some(to)).await;
                true
            }
            Err(WriteError::Lost) => {
                self.move_away(None).await;
                true
            }
            Err(WriteError::Unreachable(e)) => {
                warn!(error = %e, node = %to.id, "the room could not be handed over");
                false
            }
        }
    }

    async fn join(
        &mut self,
        now: ServerNanos,
        joining: Joining,
        reply: oneshot::Sender<Result<wire::Welcome, Refusal>>,
    ) {
        let (session_id, who) = (joining.session_id, &joining.who);
        let Some(role) = who.role.member_role() else {
            let _ = reply.send(Err(Refusal::new(ErrorCode::Forbidden, "admins and operators do not join rooms")));
            return;
        };
        let join = Join {
            session: session_id,
            subject: who.subject.clone(),
            name: Name::truncating(&who.name),
            role,
            token_expires_at: who.expires_at_unix,
            transport: joining.transport,
            sel_feed: authorize(who, Some(&*self.meta), Operation::ReadSel).is_ok(),
        };
        let before = self.cluster.is_some().then(|| self.room.clone());
        self.conns.insert(session_id, Conn::new(joining));
        let joined = match self.room.handle_join(now, join) {
            Ok(joined) => joined,
            Err(refused) => {
                self.conns.remove(&session_id);
                let _ = reply.send(Err(refused.into()));
                return;
            }
        };
        // The seat is in the directory before the member is welcomed to it.
        if let Err(refusal) = self.persist(before, false).await {
            self.conns.remove(&session_id);
            let _ = reply.send(Err(refusal));
            return;
        }
        let mut welcome = joined.welcome;
        if self.cluster.is_some() {
            // The write took a directory round trip (more under load): the welcome says the
            // server's time as it leaves, so a client carrying its clock estimate over from
            // its last session finds it agrees (see `engine::client::Client::carry_clock`).
            welcome.server_now = self.clock.now();
        }
        let member_id = welcome.member_id;
        self.stats.count_seated(joined.seated);
        info!(member = member_id, seated = ?joined.seated, "member seated");
        // Queued behind the welcome, which the session writes first.
        self.drain(now);
        if reply.send(Ok(welcome)).is_err() {
            // The session gave up while waiting: free the seat again.
            self.conns.remove(&session_id);
            self.room.handle_depart(now, member_id, session_id, Departure::Left);
        }
    }

    /// Adds (`present`) or removes the co-teacher `subject` (the owner's request, authorized):
    /// recorded for the room session in the SEL store first (refused with nothing changed
    /// when its queue is full), then made, and the subject's seated sessions hear the SEL feed
    /// or stop hearing it. Whether anything changed.
    fn co_teacher(&mut self, subject: String, present: bool) -> Result<bool, Refusal> {
        if present && subject == self.meta.owner {
            return Err(Refusal::new(ErrorCode::BadRequest, "the room's owner runs it already"));
        }
        {
            let mut co_teachers = self.meta.co_teachers();
            if co_teachers.contains(&subject) == present {
                return Ok(false);
            }
            if present && co_teachers.len() >= MAX_CO_TEACHERS {
                return Err(Refusal::new(
                    ErrorCode::BadRequest,
                    format!("a room has at most {MAX_CO_TEACHERS} co-teachers; remove one first"),
                ));
            }
            let job = Job::rows(super::sel::co_teacher_batch(&self.meta, &subject, present));
            if self.sel.try_submit(job).is_err() {
                return Err(Refusal::new(
                    ErrorCode::StoreUnavailable,
                    "the SEL database is behind; try adding or removing the co-teacher again shortly",
                ));
            }
            if present {
                co_teachers.push(subject.clone());
            } else {
                co_teachers.retain(|s| *s != subject);
            }
        }
        info!(present, co_teachers = self.meta.co_teachers().len(), "co-teachers changed");
        // Every session of the subject has the same principal's role; the last one decides.
        let feed = self
            .conns
            .values()
            .filter(|c| c.who.subject == subject)
            .map(|c| authorize(&c.who, Some(&*self.meta), Operation::ReadSel).is_ok())
            .last();
        if let Some(feed) = feed {
            self.room.handle_sel_feed(&subject, feed);
        }
        Ok(true)
    }

    /// Queues `message` on the control stream of each of `to` (one message, shared); the
    /// recipients whose queue was full.
    fn queue_to(&self, to: Vec<Recipient>, message: ServerMessage) -> Vec<Recipient> {
        let message = Outgoing::new(message);
        to.into_iter().filter(|r| self.conns.get(&r.session).is_some_and(|c| !c.queue(message.clone()))).collect()
    }

    /// Carries out everything the engine asks for, in its order.
    fn drain(&mut self, now: ServerNanos) {
        while let Some(output) = self.room.poll_output() {
            match output {
                Output::Message { to, message } => {
                    self.observers.message(&message, &self.clock);
                    let slow = self.queue_to(to, message);
                    // Recipients dropped meanwhile are no longer the engine's: it ignores them.
                    let dropped = if slow.is_empty() { 0 } else { self.room.handle_slow(now, &slow) };
                    if dropped > 0 {
                        self.stats.slow_members_dropped.add(u64::from(dropped));
                        warn!(members = dropped, "control queue full; disconnecting");
                    }
                }
                Output::Feed { to, message } => {
                    let missed = self.queue_to(to, message).len();
                    if missed > 0 {
                        self.stats.feed_dropped.add(missed as u64);
                        debug!(teachers = missed, "control queue full; a feed update was left out");
                    }
                }
                Output::Beats { to, frame } => {
                    // One frame for the room's members: encoded once for each datagram size
                    // their paths allow (nearly always one).
                    let mut encoded: Vec<(usize, FittedBeats)> = Vec::with_capacity(1);
                    for conn in to.iter().filter_map(|r| self.conns.get(&r.session)) {
                        let Some(max) = conn.max_datagram_size() else {
                            self.stats.datagrams_send_failed.inc();
                            continue;
                        };
                        let at = match encoded.iter().position(|(size, _)| *size == max) {
                            Some(at) => at,
                            None => {
                                encoded.push((max, encode_beats_to_fit(frame.clone(), max)));
                                encoded.len() - 1
                            }
                        };
                        let Some((bytes, trimmed)) = &encoded[at].1 else {
                            self.stats.datagrams_send_failed.inc();
                            continue;
                        };
                        if *trimmed {
                            self.stats.beat_frames_trimmed.inc();
                        }
                        if conn.send_datagram(DatagramKind::Beats, bytes, &self.stats) {
                            self.stats.beat_frames_sent.inc();
                        }
                    }
                }
                Output::Notes { to, frame } => {
                    let delay = self.room.config().playout_delay_nanos;
                    self.observers.notes(&frame, delay, &self.clock);
                    // Encoded once for every recipient.
                    let bytes = match wire::encode_server_datagram(&ServerDatagram::Notes(frame)) {
                        Ok(bytes) => bytes,
                        Err(e) => {
                            warn!(error = %e, "note frame did not encode");
                            continue;
                        }
                    };
                    for conn in to.iter().filter_map(|r| self.conns.get(&r.session)) {
                        if conn.send_datagram(DatagramKind::Notes, &bytes, &self.stats) {
                            self.stats.note_frames_sent.inc();
                        }
                    }
                }
                Output::Sel(work) => {
                    if self.sel.try_submit(super::sel::job(&self.meta, &self.clock, &self.own, &work)).is_ok() {
                        continue;
                    }
                    if let SelWork::Reflection(_) = work {
                        self.stats.reflections_refused.inc();
                        self.stats.refused.inc(ErrorCode::StoreUnavailable);
                    } else {
                        debug!("SEL queue full; participation waits for the next flush");
                    }
                    self.room.handle_sel_refused(now, work);
                }
                Output::End { to, reason } => {
                    if let Some(conn) = self.conns.get_mut(&to.session) {
                        conn.end(reason.code(), reason.message(), reason.at_once());
                    }
                }
                Output::Closed => info!("room closed"),
            }
        }
        // Held take rows past their cap (the queue stayed full), by the handling just done.
        self.stats.recorded_notes_dropped.add(self.room.take_recorded_notes_dropped());
    }
}
