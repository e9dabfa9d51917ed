//! One room's task: seats and presence, teacher controls, note fan-out, paced beat frames.
//!
//! The task owns its engine [`Room`] and its seats; nothing else touches them. It wakes when
//! the engine says a frame is due, when a lost member's grace period ends, or when an empty
//! room expires. It never waits on a member: frames and notes go to QUIC without waiting, and
//! control messages go into each member's bounded queue with `try_send`, so a member whose
//! queue is full is disconnected rather than waited on.
//!
//! Seats are keyed by the token's subject. A member whose connection is lost keeps its seat
//! (member id, part, mute) for the grace period, so a Chromebook whose Wi-Fi blips comes back
//! without anyone seeing it leave and join; a second session of the same subject takes the
//! seat over and the first is closed with `session_replaced`.
//!
//! The task also keeps the room's SEL bookkeeping ([`RoomSel`]): it counts each student's
//! accepted notes against the timeline, flushes the counts to the SEL writer about once a
//! second without waiting, checks reflections against the room's prompts, and passes what
//! the writer committed on to the teachers (their live feed) and to the reflection's author
//! (the acknowledgement).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use downbeat_engine::limit::TokenBucket;
use downbeat_engine::room::{self, Room};
use downbeat_protocol::{
    self as wire, Applied, Assignment, BoundedString, BoundedVec, ClientReport, ControlAck, ControlOp, EncodeError,
    ErrorCode, ErrorFrame, LeaveReason, MAX_MEMBERS, Member, Note, PROTOCOL_VERSION, Reflection, RoomInfo,
    ServerDatagram, ServerMessage, ServerNanos, SyncQuality, Welcome,
};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::authz::Refusal;
use crate::clock::ServerClock;
use crate::room_sel::{self, Flush, RoomSel};
use crate::rooms::{Command, Departure, Joining, Kick, Peer, RoomMeta, RoomView, Rooms};
use crate::sel::{Job, Sel};
use crate::shutdown::Shutdown;
use crate::stats::Stats;

/// At most one note error per this interval is told to a member (the rest are counted).
const NOTE_ERROR_INTERVAL_NANOS: u64 = 1_000_000_000;
/// Refused note datagrams a member may send in a burst before the session is closed...
const ABUSE_BURST: u32 = 50;
/// ...and the sustained rate of refusals tolerated.
const ABUSE_PER_SECOND: u32 = 5;
/// How long a closing room waits for room in the SEL queue for its last flush.
const LAST_FLUSH_PATIENCE: std::time::Duration = std::time::Duration::from_secs(2);

/// A live member's connection.
#[derive(Debug)]
struct Attached {
    session_id: u64,
    peer: Arc<dyn Peer>,
    control_tx: mpsc::Sender<ServerMessage>,
    kick: Option<oneshot::Sender<Kick>>,
    /// Playout counts last reported by this session (reports are cumulative).
    reported: ClientReport,
}

impl Attached {
    /// Tells the session to end with `code` (it says why, then closes).
    fn kick(&mut self, code: ErrorCode, message: &'static str) {
        if let Some(kick) = self.kick.take()
            && kick.send(Kick { code, message }).is_err()
        {
            self.peer.close(code, message);
        }
    }
}

#[derive(Debug)]
struct Seat {
    member: Member,
    subject: String,
    /// `None` while the connection is lost and the seat is held.
    attached: Option<Attached>,
    grace_until: Option<ServerNanos>,
    last_note_error: Option<ServerNanos>,
    abuse: TokenBucket,
}

/// Sync quality coarse enough that a change is worth telling everyone.
fn coarse(q: SyncQuality) -> (bool, u32, u32) {
    (q.synced, q.rtt_micros / 1000, q.uncertainty_micros / 250)
}

pub(crate) struct RoomTask {
    meta: Arc<RoomMeta>,
    room: Room,
    rooms: Arc<Rooms>,
    seats: BTreeMap<u64, Seat>,
    by_subject: HashMap<String, u64>,
    next_member_id: u64,
    /// Since when nobody holds a seat.
    empty_since: Option<ServerNanos>,
    closed: bool,
    clock: ServerClock,
    stats: Arc<Stats>,
    sel: Sel,
    room_sel: RoomSel,
    /// This room's own queue, for what the SEL writer reports back once it committed.
    own: mpsc::WeakSender<Command>,
}

/// What a room task is given when it starts.
pub(crate) struct RoomParts {
    pub(crate) meta: Arc<RoomMeta>,
    pub(crate) room: Room,
    pub(crate) rooms: Arc<Rooms>,
    pub(crate) clock: ServerClock,
    pub(crate) stats: Arc<Stats>,
    pub(crate) sel: Sel,
    pub(crate) room_sel: RoomSel,
    pub(crate) own: mpsc::WeakSender<Command>,
}

impl RoomTask {
    pub(crate) fn new(parts: RoomParts) -> Self {
        let RoomParts { meta, room, rooms, clock, stats, sel, room_sel, own } = parts;
        Self {
            meta,
            room,
            rooms,
            seats: BTreeMap::new(),
            by_subject: HashMap::new(),
            next_member_id: 1,
            empty_since: Some(clock.now()),
            closed: false,
            clock,
            stats,
            sel,
            room_sel,
            own,
        }
    }

    pub(crate) async fn run(mut self, mut commands: mpsc::Receiver<Command>, mut shutdown: Shutdown) {
        let idle_expiry = self.rooms.config().idle_expiry_nanos;
        loop {
            let now = self.clock.now();
            while let Some(transmit) = self.room.poll_transmit(now) {
                self.send_frame(transmit);
            }
            self.expire_seats(now);
            if let Some(since) = self.empty_since
                && now.0.saturating_sub(since.0) >= idle_expiry
            {
                info!("room expired with nobody in it");
                self.close("the room expired");
            }
            if self.closed {
                break;
            }
            if self.room_sel.flush_due().is_some_and(|due| due <= now) {
                self.flush();
            }
            let expiry = self.empty_since.map(|since| since.add_nanos(idle_expiry));
            let grace = self.seats.values().filter_map(|s| s.grace_until).min();
            let flush = self.room_sel.flush_due();
            let wake = [self.room.poll_timeout(), grace, expiry, flush].into_iter().flatten().min();
            tokio::select! {
                biased;
                () = shutdown.wait() => break,
                command = commands.recv() => match command {
                    Some(command) => self.handle(command),
                    None => break,
                },
                () = sleep_until_opt(wake.map(|t| self.clock.instant_of(t))) => {}
            }
        }
        // Flushed while the room is still registered, so a student's data deletion that
        // finds no room here finds every row of it already queued before its own write.
        self.last_flush().await;
        self.rooms.closed(&self.meta);
        self.stats.rooms_active.dec();
        debug!("room task ended");
    }

    /// Hands the counted participation to the SEL writer without waiting; if its queue is
    /// full the counts wait for the next flush.
    fn flush(&mut self) {
        let Some(flush) = self.room_sel.take_flush(false) else { return };
        let Flush { batch, notices } = flush;
        let own = self.own.clone();
        let on_commit = room_sel::notices_message(notices.clone()).map(|message| {
            Box::new(move || {
                if let Some(tx) = own.upgrade() {
                    let _ = tx.try_send(Command::Feed(message));
                }
            }) as crate::sel::OnCommit
        });
        if let Err(job) = self.sel.try_submit(Job { batch, on_commit }) {
            debug!("SEL queue full; participation waits for the next flush");
            self.room_sel.restore(self.clock.now(), Flush { batch: job.batch, notices });
        }
    }

    /// The closing flush: the room session ends. Waits briefly for room in the queue, as
    /// nothing else is left to do.
    async fn last_flush(&mut self) {
        // Leaves as the room closes: everyone still seated.
        let now = self.clock.now();
        let seated: Vec<String> =
            self.seats.values().filter(|s| s.member.role == wire::Role::Student).map(|s| s.subject.clone()).collect();
        for subject in seated {
            self.room_sel.left(now, &subject);
        }
        let Some(flush) = self.room_sel.take_flush(true) else { return };
        let job = Job { batch: flush.batch, on_commit: None };
        if let Err(job) = self.sel.submit_within(job, LAST_FLUSH_PATIENCE).await {
            let lost = job.batch.participation.len() as u64;
            self.stats.participation_dropped.add(lost);
            warn!(rows = lost, "SEL queue full as the room closed; its last participation rows are lost");
        }
    }

    fn handle(&mut self, command: Command) {
        let now = self.clock.now();
        match command {
            Command::Join { joining, reply } => self.join(now, joining, reply),
            Command::Depart { member_id, session_id, how } => self.depart(now, member_id, session_id, how),
            Command::Control { op, requester, reply } => {
                let result = self.control(now, op);
                match &result {
                    Ok(_) => self.stats.controls_applied.inc(),
                    Err(refusal) => {
                        self.stats.refused.inc(refusal.code);
                        debug!(code = refusal.code.as_str(), message = %refusal.message, "control refused");
                    }
                }
                if let Some((member_id, request_id)) = requester {
                    let answer = match &result {
                        Ok(applied) => ServerMessage::ControlAck(ControlAck { request_id, applied: *applied }),
                        Err(refusal) => error_frame(refusal.code, Some(request_id), &refusal.message),
                    };
                    self.send_to(member_id, answer);
                }
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
            }
            Command::Notes { member_id, session_id, notes } => self.notes(now, member_id, session_id, &notes),
            Command::Reflect { member_id, session_id, reflection } => {
                self.reflect(member_id, session_id, &reflection);
            }
            Command::ReflectionCommitted { member_id, request_id, notice } => {
                let id = notice.id;
                self.send_to(member_id, ServerMessage::ReflectionSaved { request_id, id });
                self.broadcast_to_teachers(ServerMessage::Reflection(notice));
            }
            Command::Feed(message) => self.broadcast_to_teachers(message),
            Command::Forget { subject, reply } => {
                self.room_sel.forget(&subject);
                let _ = reply.send(());
            }
            Command::Report { member_id, session_id, report } => self.report(member_id, session_id, report),
            Command::View { reply } => {
                let members = self.seats.values().map(|s| (s.member.clone(), s.attached.is_some())).collect::<Vec<_>>();
                let _ = reply.send(RoomView {
                    timeline: self.room.timeline().to_wire_at(now),
                    members,
                    playout_delay_nanos: self.room.config().playout_delay_nanos,
                });
            }
        }
    }

    fn join(&mut self, now: ServerNanos, joining: Joining, reply: oneshot::Sender<Result<Welcome, Refusal>>) {
        let Joining { session_id, subject, name, role, token_expires_at, peer, control_tx, kick } = joining;
        let attached = Attached { session_id, peer, control_tx, kick: Some(kick), reported: ClientReport::default() };
        let member_id = if let Some(&member_id) = self.by_subject.get(&subject) {
            // The same person again: a reconnect within the grace period, or a new session
            // taking over from one that is still open. Same seat, no leave or join.
            let Some(seat) = self.seats.get_mut(&member_id) else {
                let _ = reply.send(Err(Refusal::new(ErrorCode::Internal, "seat index out of step")));
                return;
            };
            if let Some(mut old) = seat.attached.take() {
                old.kick(ErrorCode::SessionReplaced, "you joined this room from another session");
                self.stats.sessions_replaced.inc();
            } else {
                self.stats.seats_resumed.inc();
            }
            seat.attached = Some(attached);
            seat.grace_until = None;
            let changed = seat.member.name != name || seat.member.role != role;
            seat.member.name = name;
            seat.member.role = role;
            seat.member.sync = SyncQuality::default();
            let muted = seat.member.muted;
            // A fresh engine membership: the new session's notes count from 1 again.
            self.room.leave(member_id);
            if let Err(e) = self.room.join(now, member_id) {
                warn!(error = %e, "engine refused a returning member");
            }
            let _ = self.room.set_muted(member_id, muted);
            if changed {
                let member = self.seats.get(&member_id).map(|s| s.member.clone());
                if let Some(member) = member {
                    self.broadcast(ServerMessage::MemberUpdated(member), Some(member_id));
                }
            }
            info!(member = member_id, "member resumed its seat");
            member_id
        } else {
            if self.seats.len() >= self.room.config().max_members {
                let _ = reply.send(Err(Refusal::new(ErrorCode::RoomFull, "the room is full")));
                return;
            }
            let member_id = self.next_member_id;
            if let Err(e) = self.room.join(now, member_id) {
                let _ = reply.send(Err(Refusal::new(e.code(), e.to_string())));
                return;
            }
            self.next_member_id += 1;
            let member = Member {
                id: member_id,
                name,
                role,
                assignment: Assignment::default(),
                muted: false,
                sync: SyncQuality::default(),
            };
            self.broadcast(ServerMessage::MemberJoined(member.clone()), None);
            self.seats.insert(
                member_id,
                Seat {
                    member,
                    subject: subject.clone(),
                    attached: Some(attached),
                    grace_until: None,
                    last_note_error: None,
                    abuse: TokenBucket::new(ABUSE_PER_SECOND, ABUSE_BURST, now.0),
                },
            );
            if role == wire::Role::Student {
                self.room_sel.joined(now, &subject, member_id);
            }
            self.by_subject.insert(subject, member_id);
            info!(member = member_id, members = self.seats.len(), "member joined");
            member_id
        };
        self.empty_since = None;
        let welcome = self.welcome(now, member_id, role, token_expires_at);
        if reply.send(Ok(welcome)).is_err() {
            // The session gave up while waiting: free the seat again.
            self.depart(now, member_id, session_id, Departure::Left);
            return;
        }
        // Queued behind the welcome, which the session writes first.
        if let Some(prompt) = self.room_sel.prompt().cloned() {
            self.send_to(member_id, ServerMessage::Prompt(Some(prompt)));
        }
    }

    fn welcome(&self, now: ServerNanos, member_id: u64, role: wire::Role, token_expires_at: u64) -> Welcome {
        let members = self.seats.values().take(MAX_MEMBERS).map(|s| s.member.clone()).collect();
        Welcome {
            version: PROTOCOL_VERSION,
            member_id,
            role,
            room: RoomInfo {
                code: BoundedString::truncating(self.meta.code.as_str()),
                name: self.meta.name.clone(),
                playout_delay_nanos: self.room.config().playout_delay_nanos,
            },
            timeline: self.room.timeline().to_wire_at(now),
            // Cannot fail: `take(MAX_MEMBERS)`.
            members: BoundedVec::try_from_vec(members).unwrap_or_default(),
            lead_nanos: self.room.config().lead_nanos,
            server_now: self.clock.now(),
            token_expires_at,
        }
    }

    fn depart(&mut self, now: ServerNanos, member_id: u64, session_id: u64, how: Departure) {
        let Some(seat) = self.seats.get_mut(&member_id) else { return };
        if seat.attached.as_ref().is_none_or(|a| a.session_id != session_id) {
            // A session that was replaced or removed: its seat is no longer its own.
            return;
        }
        let grace = self.rooms.config().seat_grace_nanos;
        match how {
            Departure::Lost if grace > 0 => {
                seat.attached = None;
                seat.grace_until = Some(now.add_nanos(grace));
                self.room.leave(member_id);
                debug!(member = member_id, "connection lost; holding the seat");
            }
            Departure::Lost | Departure::Left => {
                self.remove(now, member_id, LeaveReason::Left);
            }
            Departure::Closed => {
                self.remove(now, member_id, LeaveReason::Closed);
            }
        }
    }

    fn expire_seats(&mut self, now: ServerNanos) {
        let expired: Vec<u64> =
            self.seats.iter().filter(|(_, s)| s.grace_until.is_some_and(|t| t <= now)).map(|(id, _)| *id).collect();
        for member_id in expired {
            self.stats.seats_expired.inc();
            info!(member = member_id, "grace period over; seat freed");
            self.remove(now, member_id, LeaveReason::Left);
        }
    }

    /// Frees a seat (the engine's membership, the subject's index, a student's leave for SEL)
    /// without telling anyone.
    fn free_seat(&mut self, now: ServerNanos, member_id: u64) -> Option<Seat> {
        let seat = self.seats.remove(&member_id)?;
        self.by_subject.remove(&seat.subject);
        self.room.leave(member_id);
        if seat.member.role == wire::Role::Student {
            self.room_sel.left(now, &seat.subject);
        }
        if self.seats.is_empty() {
            self.empty_since = Some(now);
        }
        Some(seat)
    }

    /// Frees a seat and tells everyone left.
    fn remove(&mut self, now: ServerNanos, member_id: u64, reason: LeaveReason) -> Option<Seat> {
        let seat = self.free_seat(now, member_id)?;
        info!(member = member_id, members = self.seats.len(), ?reason, "member left");
        self.broadcast(ServerMessage::MemberLeft { member_id, reason }, None);
        Some(seat)
    }

    /// Frees a seat, tells everyone left, and ends its session (if connected) with `code`.
    fn expel(&mut self, now: ServerNanos, member_id: u64, reason: LeaveReason, code: ErrorCode, message: &'static str) {
        if let Some(mut seat) = self.remove(now, member_id, reason)
            && let Some(attached) = &mut seat.attached
        {
            attached.kick(code, message);
        }
    }

    /// Closes the room: everyone is told why, then every session ends with `room_closed`.
    fn close(&mut self, message: &'static str) {
        self.broadcast(ServerMessage::RoomClosed { message: BoundedString::truncating(message) }, None);
        for seat in self.seats.values_mut() {
            if let Some(attached) = &mut seat.attached {
                attached.kick(ErrorCode::RoomClosed, message);
            }
        }
        self.closed = true;
        info!(message, "room closed");
    }

    fn control(&mut self, now: ServerNanos, op: ControlOp) -> Result<Option<Applied>, Refusal> {
        match op {
            ControlOp::Timeline(change) => {
                let applied =
                    self.room.handle_change(now, change).map_err(|e| Refusal::new(e.code(), e.to_string()))?;
                self.stats.changes_applied.inc();
                info!(epoch = applied.epoch, effective_beat = applied.effective_beat, ?change, "timeline changed");
                let timeline = self.room.timeline().to_wire_at(now);
                self.broadcast(ServerMessage::Timeline(timeline), None);
                Ok(Some(applied.to_wire()))
            }
            ControlOp::Mute { member, muted } => {
                let seat = self.student(member, "only students can be muted")?;
                seat.member.muted = muted;
                let update = seat.member.clone();
                let attached = seat.attached.is_some();
                if attached {
                    let _ = self.room.set_muted(member, muted);
                }
                info!(member, muted, "mute changed");
                self.broadcast(ServerMessage::MemberUpdated(update), None);
                Ok(None)
            }
            ControlOp::Assign { member, assignment } => {
                check_assignment(&assignment)?;
                let seat = self.seats.get_mut(&member).ok_or_else(not_a_member)?;
                seat.member.assignment = assignment;
                let update = seat.member.clone();
                self.broadcast(ServerMessage::MemberUpdated(update), None);
                Ok(None)
            }
            ControlOp::Remove { member } => {
                self.student(member, "only students can be removed")?;
                self.expel(
                    now,
                    member,
                    LeaveReason::Removed,
                    ErrorCode::Removed,
                    "the teacher removed you from the room",
                );
                Ok(None)
            }
            ControlOp::Close => {
                self.close("the teacher closed the room");
                Ok(None)
            }
            ControlOp::Prompt { text } => {
                let prompt = self.room_sel.set_prompt(text)?;
                info!(prompt = prompt.as_ref().map(|p| p.id), "reflection prompt set");
                self.broadcast(ServerMessage::Prompt(prompt), None);
                Ok(None)
            }
        }
    }

    /// A student's reflection: checked here, queued for the writer without waiting, and
    /// acknowledged (with the teachers told) only once it is committed.
    fn reflect(&mut self, member_id: u64, session_id: u64, reflection: &Reflection) {
        let Some(seat) = self.seats.get(&member_id) else { return };
        if seat.attached.as_ref().is_none_or(|a| a.session_id != session_id) {
            return;
        }
        let request_id = reflection.request_id;
        let checked = if seat.member.role == wire::Role::Student {
            self.room_sel.reflection(&seat.subject, member_id, reflection)
        } else {
            Err(Refusal::new(ErrorCode::Forbidden, "only students write reflections"))
        };
        let (row, notice) = match checked {
            Ok(checked) => checked,
            Err(refusal) => {
                self.stats.refused.inc(refusal.code);
                self.send_to(member_id, error_frame(refusal.code, Some(request_id), &refusal.message));
                return;
            }
        };
        let own = self.own.clone();
        let on_commit = Box::new(move || {
            if let Some(tx) = own.upgrade() {
                let _ = tx.try_send(Command::ReflectionCommitted { member_id, request_id, notice });
            }
        });
        let mut batch = crate::sel::store::Batch::default();
        batch.reflections.push(row);
        if self.sel.try_submit(Job { batch, on_commit: Some(on_commit) }).is_err() {
            self.stats.reflections_refused.inc();
            self.stats.refused.inc(ErrorCode::StoreUnavailable);
            let message = "reflections cannot be saved right now; try again in a moment";
            self.send_to(member_id, error_frame(ErrorCode::StoreUnavailable, Some(request_id), message));
        }
    }

    /// The seat of `member`, which must be a student.
    fn student(&mut self, member: u64, message: &'static str) -> Result<&mut Seat, Refusal> {
        let seat = self.seats.get_mut(&member).ok_or_else(not_a_member)?;
        if seat.member.role != wire::Role::Student {
            return Err(Refusal::new(ErrorCode::Forbidden, message));
        }
        Ok(seat)
    }

    fn notes(&mut self, now: ServerNanos, member_id: u64, session_id: u64, notes: &[Note]) {
        let holds_seat =
            self.seats.get(&member_id).and_then(|s| s.attached.as_ref()).is_some_and(|a| a.session_id == session_id);
        if !holds_seat {
            return;
        }
        let outcome = self.room.handle_notes(now, member_id, notes);
        self.stats.notes_accepted.add(u64::from(outcome.accepted));
        self.stats.notes_duplicate.add(u64::from(outcome.duplicates));
        if let Some(frame) = &outcome.forward {
            self.count_participation(now, member_id, frame, outcome.accepted);
        }
        if let Some(frame) = outcome.forward {
            match wire::encode_server_datagram(&ServerDatagram::Notes(frame)) {
                Ok(bytes) => {
                    for (id, seat) in &self.seats {
                        let Some(attached) = seat.attached.as_ref().filter(|_| *id != member_id) else { continue };
                        if attached.peer.send_datagram(&bytes) {
                            self.stats.datagrams_sent.inc();
                            self.stats.note_frames_sent.inc();
                        } else {
                            self.stats.datagrams_send_failed.inc();
                        }
                    }
                }
                Err(e) => warn!(error = %e, "note frame did not encode"),
            }
        }
        let Some(refusal) = outcome.refusal else { return };
        let code = refusal.code();
        self.stats.notes_dropped.inc(code);
        self.stats.notes_dropped_total.add(u64::from(outcome.dropped.max(1)));
        let Some(seat) = self.seats.get_mut(&member_id) else { return };
        let abusive = matches!(code, ErrorCode::RateLimited | ErrorCode::NoteOutOfRange);
        if abusive && !seat.abuse.try_take(now.0) {
            warn!(member = member_id, code = code.as_str(), "note abuse; closing the session");
            self.stats.sessions_closed_for_abuse.inc();
            self.expel(now, member_id, LeaveReason::Closed, ErrorCode::RateLimited, "too many refused notes");
            return;
        }
        if seat.last_note_error.is_some_and(|t| now.0.saturating_sub(t.0) < NOTE_ERROR_INTERVAL_NANOS) {
            return;
        }
        seat.last_note_error = Some(now);
        let message = match code {
            ErrorCode::Forbidden => "you are muted: your notes are not heard",
            ErrorCode::RateLimited => "too many notes: some were not heard",
            ErrorCode::NoteOutOfRange => "a note's MIDI number, velocity, instrument or time is out of range",
            _ => "notes refused",
        };
        self.send_to(member_id, error_frame(code, None, message));
    }

    /// Counts a student's newly accepted notes (the last `accepted` of `frame`) on the
    /// timeline.
    fn count_participation(&mut self, now: ServerNanos, member_id: u64, frame: &wire::NoteFrame, accepted: u32) {
        let Some(seat) = self.seats.get(&member_id).filter(|s| s.member.role == wire::Role::Student) else { return };
        let new = frame.notes.len().saturating_sub(accepted as usize);
        for note in &frame.notes[new..] {
            self.room_sel.note(
                now,
                &seat.subject,
                member_id,
                self.room.timeline(),
                note.played_at,
                &seat.member.assignment.beats,
            );
        }
    }

    fn report(&mut self, member_id: u64, session_id: u64, report: ClientReport) {
        let Some(seat) = self.seats.get_mut(&member_id) else { return };
        let Some(attached) = seat.attached.as_mut().filter(|a| a.session_id == session_id) else { return };
        self.stats.sync_rtt.observe_micros(report.sync.rtt_micros);
        self.stats.sync_uncertainty.observe_micros(report.sync.uncertainty_micros);
        self.stats
            .notes_played_reported
            .add(u64::from(report.notes_played.saturating_sub(attached.reported.notes_played)));
        self.stats.notes_late_reported.add(u64::from(report.notes_late.saturating_sub(attached.reported.notes_late)));
        attached.reported = report;
        let before = coarse(seat.member.sync);
        seat.member.sync = report.sync;
        if coarse(report.sync) != before {
            let update = seat.member.clone();
            self.broadcast(ServerMessage::MemberUpdated(update), None);
        }
    }

    /// Queues `message` for one member (dropped if they are not connected).
    fn send_to(&mut self, member_id: u64, message: ServerMessage) {
        let Some(attached) = self.seats.get(&member_id).and_then(|s| s.attached.as_ref()) else { return };
        if full(attached.control_tx.try_send(message)) && self.evict_slow(member_id) {
            self.broadcast(ServerMessage::MemberLeft { member_id, reason: LeaveReason::Closed }, None);
        }
    }

    /// Frees the seat of a member whose control queue is full and closes its session, without
    /// telling anyone (the caller does). False if there was no such seat.
    fn evict_slow(&mut self, member_id: u64) -> bool {
        let Some(mut seat) = self.free_seat(self.clock.now(), member_id) else { return false };
        self.stats.slow_members_dropped.inc();
        warn!(member = member_id, "control queue full; disconnecting the member");
        if let Some(attached) = &mut seat.attached {
            // The queue is full, so the session could not say why: close at once.
            attached.peer.close(ErrorCode::ServerBusy, "control stream backlog");
            attached.kick(ErrorCode::ServerBusy, "control stream backlog");
        }
        true
    }

    /// Queues `message` for every connected member but `except`, never waiting: a member whose
    /// queue is full is disconnected, and everyone left hears that they left.
    fn broadcast(&mut self, message: ServerMessage, except: Option<u64>) {
        self.broadcast_where(message, |id, _| Some(id) != except);
    }

    /// [`Self::broadcast`] to the connected teachers only (the SEL feed).
    fn broadcast_to_teachers(&mut self, message: ServerMessage) {
        self.broadcast_where(message, |_, seat| seat.member.role == wire::Role::Teacher);
    }

    /// Queues `message` for every connected member `to` picks (see [`Self::broadcast`]).
    fn broadcast_where(&mut self, message: ServerMessage, to: impl Fn(u64, &Seat) -> bool) {
        let mut pending = VecDeque::from([(message, false)]);
        while let Some((message, everyone)) = pending.pop_front() {
            let mut slow = Vec::new();
            for (id, seat) in &self.seats {
                let Some(attached) = &seat.attached else { continue };
                if (everyone || to(*id, seat)) && full(attached.control_tx.try_send(message.clone())) {
                    slow.push(*id);
                }
            }
            for member_id in slow {
                if self.evict_slow(member_id) {
                    pending.push_back((ServerMessage::MemberLeft { member_id, reason: LeaveReason::Closed }, true));
                }
            }
        }
    }

    /// Encodes and hands one beat frame to QUIC. Drops beats from the end until the frame
    /// fits the path's datagram size; never waits.
    fn send_frame(&self, transmit: room::Transmit) {
        let Some(attached) = self.seats.get(&transmit.member).and_then(|s| s.attached.as_ref()) else { return };
        let Some(max) = attached.peer.max_datagram_size() else {
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
        if attached.peer.send_datagram(&bytes) {
            self.stats.datagrams_sent.inc();
            self.stats.beat_frames_sent.inc();
        } else {
            self.stats.datagrams_send_failed.inc();
        }
    }
}

/// Whether a member's control queue refused a message for being full: a slow reader. (A
/// closed queue is a session that is ending; its departure is on its way to the room.)
fn full(sent: Result<(), mpsc::error::TrySendError<ServerMessage>>) -> bool {
    matches!(sent, Err(mpsc::error::TrySendError::Full(_)))
}

fn not_a_member() -> Refusal {
    Refusal::new(ErrorCode::MemberNotFound, "no member with this id is in the room")
}

fn check_assignment(assignment: &Assignment) -> Result<(), Refusal> {
    if let Some(part) = &assignment.part
        && (part.trim().is_empty() || part.chars().any(char::is_control))
    {
        return Err(Refusal::new(ErrorCode::BadRequest, "a part needs a name without control characters"));
    }
    if assignment.beats.iter().any(|b| *b >= downbeat_engine::timeline::MAX_BEATS_PER_BAR) {
        return Err(Refusal::new(ErrorCode::BadRequest, "assigned beats are positions in the bar, 0 to 15"));
    }
    Ok(())
}

pub(crate) fn error_frame(code: ErrorCode, request_id: Option<u32>, message: &str) -> ServerMessage {
    ServerMessage::Error(ErrorFrame { code, request_id, message: BoundedString::truncating(message) })
}

/// Encodes `frame` as a datagram of at most `max` bytes, dropping beats from the end as
/// needed. `None` if even the timeline alone does not fit. The flag says beats were dropped.
pub(crate) fn encode_to_fit(frame: wire::BeatFrame, max: usize) -> Option<(Vec<u8>, bool)> {
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
