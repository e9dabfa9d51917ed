//! One room as a state machine: seats, presence, teacher controls, notes and their fan-out,
//! the note abuse policy, sync quality, idle expiry, and the decisions about SEL work.
//!
//! The server's room task only moves bytes: it feeds [`Room`] its inputs (`handle_*(now, ..)`),
//! takes what to do from [`Room::poll_output`] and wakes at [`Room::poll_timeout`]. Every
//! decision is made here, on virtual time in tests, and the state is plain data
//! (serializable), so a room can be handed to another process.
//!
//! - **Seats, not sessions.** A seat is keyed by the token's subject. A member whose connection
//!   is lost ([`Departure::Lost`]) keeps its seat (member id, part, mute) for
//!   [`Config::seat_grace_nanos`], so a Chromebook whose Wi-Fi blips comes back without anyone
//!   seeing it leave and join. A second session of the same subject takes the seat over and
//!   the first is ended with `session_replaced`. Every input from a session names its session
//!   id, and the room ignores a session that no longer holds its seat.
//! - **One order.** Outputs are polled in one order and each names its recipients when it is
//!   made, so presence rebuilt from the welcome plus the events agrees everywhere. The shell
//!   queues control messages without waiting; a member whose queue is full comes back through
//!   [`Room::handle_slow`], is dropped, and everyone hears it left.
//! - **Mute is kept once**, on the seat's [`Member`], and survives a resumed seat. The
//!   [`Stage`] (timeline, paced beat frames, note validation, de-duplication and rate) is told
//!   it with every datagram.
//! - **Note abuse.** Refused note datagrams (out of range, over the rate) drain a bucket of
//!   [`ABUSE_BURST`] refilled at [`ABUSE_PER_SECOND`]; once empty the session is ended with
//!   `rate_limited`. The member hears at most one note error per
//!   [`NOTE_ERROR_INTERVAL_NANOS`].
//! - **SEL decisions**: participation counted per student on the timeline, flushed about once
//!   a second ([`Flush`]), and reflections checked against the room's prompts. The shell turns
//!   them into store rows and queues them; what the queue refuses comes back through
//!   [`Room::handle_sel_refused`].
//!   The live feed (reflections and participation as committed) goes to the members the
//!   server marks for it ([`Join::sel_feed`], [`Room::handle_sel_feed`]): the room's own
//!   teachers, not every teacher seated in it.
//! - **What a peer can make the server store is capped**: a student answers one prompt at most
//!   [`Config::max_reflections_per_prompt`] times (default [`MAX_REFLECTIONS_PER_PROMPT`]) (`too_many_reflections`; a retry of the same
//!   reflection id is not a new one), and one person takes at most [`MAX_JOINS_PER_WINDOW`]
//!   new seats in [`JOIN_WINDOW_NANOS`] (`rate_limited`; a reconnect to a held seat is no
//!   new seat), since each writes participation rows and tells the class.
//! - **Deletion is final**: a person whose data an admin deletes loses their seat at once,
//!   their session ends with `data_deleted`, and nothing more about them is written
//!   ([`Room::handle_forget`]).
//! - A room with no seat closes after [`Config::idle_expiry_nanos`].

mod handover;
mod output;
mod participation;
mod playback;
mod prompts;
mod recording;
mod seats;
mod stage;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, VecDeque};

use downbeat_protocol::{
    Applied, Assignment, BoundedString, BoundedVec, Change, ClientReport, ControlAck, ControlOp, ErrorCode, JoinCode,
    LeaveReason, MAX_MEMBERS, Member, Name, Note, NoteFrame, PROTOCOL_VERSION, PlaybackInfo, Prompt, RecordingInfo,
    Reflection, ReflectionNotice, Role, RoomInfo, ServerMessage, ServerNanos, SyncQuality, TextKind, Transport,
    Welcome, check_text,
};
use serde::{Deserialize, Serialize};

pub use handover::{Essentials, Handover};
pub use output::{
    Closing, EndReason, Joined, NotesHandled, Output, Recipient, ReflectionWork, Refused, ReportHandled, Seated,
    SelWork, Tick, encode_beats_to_fit, error_frame,
};
pub use participation::{FLUSH_INTERVAL_NANOS, Flush, Record, RecordKind};
pub use playback::{MAX_PLAYBACK_NOTES, PLAYBACK_FROM, PlaybackNote};
pub use prompts::MAX_REFLECTIONS_PER_PROMPT;
pub use recording::{MAX_HELD_ROWS, MAX_TAKE_NOTES, MAX_TAKES, RecordingWork, TakeNote, TakeRow, TakeSegment};
pub use seats::{ABUSE_BURST, ABUSE_PER_SECOND, JOIN_WINDOW_NANOS, MAX_JOINS_PER_WINDOW, NOTE_ERROR_INTERVAL_NANOS};
pub use stage::{NoteRefusal, NotesOutcome, RoomError, Stage, Transmit};

use participation::Participation;
use playback::Playback;
use prompts::Prompts;
use recording::{Recorded, Recorder};
use seats::{Attached, Churn, Seat};

use crate::timeline::{MAX_BEATS_PER_BAR, Timeline};

/// Room settings; the server passes them explicitly.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Config {
    /// How far ahead beats are sent, and the least notice a change is given.
    pub lead_nanos: u64,
    /// Frame interval during a burst: from a timeline change until
    /// [`Config::burst_nanos`] after it, and always until the change takes effect.
    pub send_interval_nanos: u64,
    /// Frame interval while stopped, outside a burst: a sign of life (a stale member is
    /// repaired when its sync request says so, see [`Stage::handle_held_epoch`]).
    pub idle_send_interval_nanos: u64,
    /// Frame interval while beats sound and the timeline has not changed for a burst: a sign
    /// of life, since every client computes every beat from the timeline it holds and a stale
    /// one is repaired when its sync request says so.
    #[serde(default = "default_steady_send_interval")]
    pub steady_send_interval_nanos: u64,
    /// How long after a timeline change (and after the last note the room accepted) frames go
    /// out every [`Config::send_interval_nanos`]; after a change, at least until it takes
    /// effect.
    #[serde(default = "default_burst")]
    pub burst_nanos: u64,
    /// Most beats per frame (capped at the wire limit).
    pub beats_per_frame: usize,
    /// Most members (seats, held ones included).
    pub max_members: usize,
    /// How long after a note's `played_at` every receiver sounds it (sent in the welcome).
    pub playout_delay_nanos: u64,
    /// Notes per second a member may sustain (their token bucket's refill rate).
    pub notes_per_second: u32,
    /// Notes a member may play in a burst (their token bucket's size).
    pub note_burst: u32,
    /// A note played longer ago than this is out of range.
    pub note_past_window_nanos: u64,
    /// A note played further in the future than this is out of range.
    pub note_future_window_nanos: u64,
    /// A member whose connection is lost keeps its seat this long (0: freed at once).
    pub seat_grace_nanos: u64,
    /// A room with nobody in it closes after this long.
    pub idle_expiry_nanos: u64,
    /// Reflections one student may write to one prompt (a retry of one is no new one).
    #[serde(default = "default_reflections_per_prompt")]
    pub max_reflections_per_prompt: usize,
}

fn default_reflections_per_prompt() -> usize {
    MAX_REFLECTIONS_PER_PROMPT
}

fn default_steady_send_interval() -> u64 {
    Config::default().steady_send_interval_nanos
}

fn default_burst() -> u64 {
    Config::default().burst_nanos
}

impl Default for Config {
    fn default() -> Self {
        Self {
            lead_nanos: 1_500_000_000,
            send_interval_nanos: 100_000_000,
            idle_send_interval_nanos: 10_000_000_000,
            steady_send_interval_nanos: 10_000_000_000,
            burst_nanos: 1_500_000_000,
            beats_per_frame: 8,
            max_members: 64,
            playout_delay_nanos: 80_000_000,
            notes_per_second: 20,
            note_burst: 40,
            note_past_window_nanos: 5_000_000_000,
            note_future_window_nanos: 500_000_000,
            seat_grace_nanos: 15_000_000_000,
            idle_expiry_nanos: 1_800_000_000_000,
            max_reflections_per_prompt: MAX_REFLECTIONS_PER_PROMPT,
        }
    }
}

/// Who joins: from the verified token, and the session asking.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Join {
    /// The session's id (unique on the server); later inputs from it name it.
    pub session: u64,
    /// The token's subject: one seat per subject.
    pub subject: String,
    /// Display name.
    pub name: Name,
    /// Role.
    pub role: Role,
    /// When the token expires (Unix seconds, told in the welcome).
    pub token_expires_at: u64,
    /// What carries the session (shown in presence).
    pub transport: Transport,
    /// Whether the member hears the SEL feed (reflections and participation as they are
    /// committed): decided by the server's authorization, changed later by
    /// [`Room::handle_sel_feed`].
    pub sel_feed: bool,
}

/// How a session left its seat.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Departure {
    /// The client closed the session: the seat is freed now.
    Left,
    /// The connection was lost: the seat is kept for the grace period.
    Lost,
    /// The server ended the session (expired token, malformed frame, abuse): the seat is
    /// freed now and the room hears it was closed.
    Closed,
}

/// One room. See the module docs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Room {
    config: Config,
    code: JoinCode,
    name: Name,
    stage: Stage,
    /// By member id, in the order members joined.
    seats: BTreeMap<u64, Seat>,
    by_subject: BTreeMap<String, u64>,
    next_member_id: u64,
    /// Since when nobody holds a seat.
    empty_since: Option<ServerNanos>,
    closed: bool,
    /// [`Output::Closed`] was polled.
    closed_told: bool,
    prompts: Prompts,
    participation: Participation,
    /// Recent new seats per subject (join and leave churn).
    #[serde(default)]
    churn: Churn,
    /// Takes of this room session.
    #[serde(default)]
    recorder: Recorder,
    /// The take playing back, if any.
    #[serde(default)]
    playback: Option<Playback>,
    /// Playbacks started (each one's note generation).
    #[serde(default)]
    playbacks: u32,
    /// Operators' test notes sent (each one's note generation).
    #[serde(default)]
    test_notes: u32,
    out: VecDeque<Output>,
}

/// The member id an operator's test notes come from: no member has it (ids count up from 1),
/// nor does a playback ([`PLAYBACK_FROM`]). It is the largest integer JavaScript numbers hold
/// exactly, so browsers read it as it is.
pub const TEST_NOTE_FROM: u64 = (1 << 53) - 1;

/// The velocity of an operator's test note.
pub const TEST_NOTE_VELOCITY: u8 = 100;

/// A seat as the operators' inspector sees it: the member and, while a session holds the seat,
/// that session's id and its last report.
#[derive(Clone, Copy, Debug)]
pub struct SeatView<'a> {
    /// The member (the inspector shows its id, role, part, mute, sync and transport).
    pub member: &'a Member,
    /// The session holding it and that session's last report; `None` while the seat is held
    /// for a reconnect.
    pub session: Option<(u64, ClientReport)>,
}

impl Room {
    /// An empty room with join code `code`, called `name`, on `timeline`, created at `now`.
    pub fn new(config: Config, now: ServerNanos, code: JoinCode, name: Name, timeline: Timeline) -> Self {
        Self {
            stage: Stage::with_timeline(config.clone(), timeline),
            config,
            code,
            name,
            seats: BTreeMap::new(),
            by_subject: BTreeMap::new(),
            next_member_id: 1,
            empty_since: Some(now),
            closed: false,
            closed_told: false,
            prompts: Prompts::default(),
            participation: Participation::new(now),
            churn: Churn::default(),
            recorder: Recorder::default(),
            playback: None,
            playbacks: 0,
            test_notes: 0,
            out: VecDeque::new(),
        }
    }

    /// The room's settings.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The timeline.
    pub fn timeline(&self) -> &Timeline {
        self.stage.timeline()
    }

    /// Every seat's member, in join order, and whether a session holds it now.
    pub fn members(&self) -> impl Iterator<Item = (&Member, bool)> + '_ {
        self.seats.values().map(|s| (&s.member, s.attached.is_some()))
    }

    /// Every seat with the session holding it, in join order (for the inspector).
    pub fn seats(&self) -> impl Iterator<Item = SeatView<'_>> + '_ {
        self.seats
            .values()
            .map(|s| SeatView { member: &s.member, session: s.attached.map(|a| (a.session, a.reported)) })
    }

    /// The current reflection prompt, if any.
    pub fn prompt(&self) -> Option<&Prompt> {
        self.prompts.current()
    }

    /// The recording running now, if any.
    pub fn recording(&self) -> Option<RecordingInfo> {
        self.recorder.info()
    }

    /// The take playing back now, if any.
    pub fn playback(&self) -> Option<PlaybackInfo> {
        self.playback.as_ref().map(|p| p.info)
    }

    /// Whether the room closed (it takes no more input).
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// The next thing to do, in order. Call until `None` after every input. Once the room
    /// closed, [`Output::Closed`] comes after everything else.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front().or_else(|| {
            (self.closed && !self.closed_told).then(|| {
                self.closed_told = true;
                Output::Closed
            })
        })
    }

    /// When [`Room::handle_timeout`] next has something to do: a beat frame, a grace period
    /// or the idle expiry ending, a participation flush. `None` once closed.
    pub fn poll_timeout(&self) -> Option<ServerNanos> {
        if self.closed {
            return None;
        }
        let grace = self.seats.values().filter_map(|s| s.grace_until).min();
        let expiry = self.empty_since.map(|since| since.add_nanos(self.config.idle_expiry_nanos));
        let playback = self.playback.as_ref().and_then(|p| p.next_send(self.stage.timeline(), self.config.lead_nanos));
        [self.stage.poll_timeout(), grace, expiry, self.participation.flush_due(), self.recorder.flush_due(), playback]
            .into_iter()
            .flatten()
            .min()
    }

    /// Does what is due at `now`: beat frames, seats whose grace period ended (everyone hears
    /// they left), the idle expiry, the participation flush.
    pub fn handle_timeout(&mut self, now: ServerNanos) -> Tick {
        let mut tick = Tick::default();
        if self.closed {
            return tick;
        }
        while let Some(transmit) = self.stage.poll_transmit(now) {
            let to: Vec<Recipient> = transmit.members.iter().filter_map(|&m| self.recipient(m)).collect();
            if !to.is_empty() {
                self.out.push_back(Output::Beats { to, frame: transmit.frame });
            }
        }
        self.play(now);
        let expired: Vec<u64> =
            self.seats.iter().filter(|(_, s)| s.grace_until.is_some_and(|t| t <= now)).map(|(id, _)| *id).collect();
        for member in expired {
            tick.seats_expired += 1;
            self.remove(now, member, LeaveReason::Left);
        }
        if let Some(since) = self.empty_since
            && now.0.saturating_sub(since.0) >= self.config.idle_expiry_nanos
        {
            self.close(Closing::Expired);
            return tick;
        }
        if self.participation.flush_due().is_some_and(|due| due <= now)
            && let Some(flush) = self.participation.take_flush(now, false)
        {
            self.out.push_back(Output::Sel(SelWork::Flush(flush)));
        }
        if self.recorder.flush_due().is_some_and(|due| due <= now)
            && let Some(work) = self.recorder.take_flush()
        {
            self.out.push_back(Output::Sel(SelWork::Recording(work)));
        }
        tick
    }

    /// Seats a member: the subject's held or open seat, or a new one. The welcome is for the
    /// session to write first; the current prompt follows it in the outputs.
    pub fn handle_join(&mut self, now: ServerNanos, join: Join) -> Result<Joined, Refused> {
        if self.closed {
            return Err(Refused::new(ErrorCode::RoomClosed, "the room was closed"));
        }
        let Join { session, subject, name, role, token_expires_at, transport, sel_feed } = join;
        let (member_id, seated) = match self.by_subject.get(&subject) {
            Some(&member_id) => (member_id, self.resume(now, member_id, session, name, role, transport)?),
            None => {
                self.churn.check(now, &subject, self.config.max_members)?;
                let member_id = self.seat(now, session, subject.clone(), name, role, transport)?;
                self.churn.record(now, &subject);
                (member_id, Seated::New)
            }
        };
        if let Some(seat) = self.seats.get_mut(&member_id) {
            seat.sel_feed = sel_feed;
        }
        self.empty_since = None;
        let welcome = self.welcome(now, member_id, role, token_expires_at);
        if let Some(prompt) = self.prompts.current().cloned() {
            self.send_to(member_id, ServerMessage::Prompt(Some(prompt)));
        }
        if let Some(recording) = self.recorder.info() {
            self.send_to(member_id, ServerMessage::Recording(Some(recording)));
        }
        if let Some(playback) = self.playback() {
            self.send_to(member_id, ServerMessage::Playback(Some(playback)));
        }
        Ok(Joined { welcome, seated })
    }

    /// The same subject again: a reconnect within the grace period, or a new session taking
    /// over from one still open. Same seat, no leave or join.
    fn resume(
        &mut self,
        now: ServerNanos,
        member_id: u64,
        session: u64,
        name: Name,
        role: Role,
        transport: Transport,
    ) -> Result<Seated, Refused> {
        let Some(seat) = self.seats.get_mut(&member_id) else {
            return Err(Refused::new(ErrorCode::Internal, "seat index out of step"));
        };
        let old = seat.attached.replace(Attached { session, reported: ClientReport::default() });
        seat.grace_until = None;
        let changed = seat.member.name != name || seat.member.role != role || seat.member.transport != transport;
        seat.member.name = name;
        seat.member.role = role;
        seat.member.transport = transport;
        seat.member.sync = SyncQuality::default();
        let update = changed.then(|| seat.member.clone());
        let seated = match old {
            Some(old) => {
                let to = Recipient { member: member_id, session: old.session };
                self.out.push_back(Output::End { to, reason: EndReason::Replaced });
                Seated::Replaced
            }
            None => Seated::Resumed,
        };
        // A fresh stage membership: the new session's notes count from 1 again. Cannot fail:
        // the seat's own place was just freed.
        self.stage.leave(member_id);
        let _ = self.stage.join(now, member_id);
        if let Some(update) = update {
            self.send_all(ServerMessage::MemberUpdated(update), Some(member_id));
        }
        Ok(seated)
    }

    /// A new seat; everyone already seated hears `MemberJoined`.
    fn seat(
        &mut self,
        now: ServerNanos,
        session: u64,
        subject: String,
        name: Name,
        role: Role,
        transport: Transport,
    ) -> Result<u64, Refused> {
        if self.seats.len() >= self.config.max_members {
            return Err(Refused::new(ErrorCode::RoomFull, "the room is full"));
        }
        let member_id = self.next_member_id;
        self.stage.join(now, member_id).map_err(|e| Refused::new(e.code(), e.to_string()))?;
        self.next_member_id += 1;
        let member = Member {
            id: member_id,
            name,
            role,
            assignment: Assignment::default(),
            muted: false,
            sync: SyncQuality::default(),
            transport,
        };
        self.send_all(ServerMessage::MemberJoined(member.clone()), None);
        if role == Role::Student {
            self.participation.joined(now, &subject, member_id);
        }
        self.by_subject.insert(subject.clone(), member_id);
        self.seats.insert(member_id, Seat::new(now, member, subject, session));
        Ok(member_id)
    }

    fn welcome(&self, now: ServerNanos, member_id: u64, role: Role, token_expires_at: u64) -> Welcome {
        let members = self.seats.values().take(MAX_MEMBERS).map(|s| s.member.clone()).collect();
        Welcome {
            version: PROTOCOL_VERSION,
            member_id,
            role,
            room: RoomInfo {
                code: self.code.clone(),
                name: self.name.clone(),
                playout_delay_nanos: self.config.playout_delay_nanos,
            },
            timeline: self.timeline().to_wire_at(now),
            // Cannot fail: `take(MAX_MEMBERS)`.
            members: BoundedVec::try_from_vec(members).unwrap_or_default(),
            lead_nanos: self.config.lead_nanos,
            server_now: now,
            token_expires_at,
        }
    }

    /// Session `session` left the seat of `member` (nothing if it no longer holds it).
    pub fn handle_depart(&mut self, now: ServerNanos, member: u64, session: u64, how: Departure) {
        let grace = self.config.seat_grace_nanos;
        let Some(seat) = self.seats.get_mut(&member).filter(|s| s.held_by(session)) else { return };
        match how {
            Departure::Lost if grace > 0 => {
                seat.attached = None;
                seat.grace_until = Some(now.add_nanos(grace));
                self.stage.leave(member);
            }
            Departure::Lost | Departure::Left => {
                self.remove(now, member, LeaveReason::Left);
            }
            Departure::Closed => {
                self.remove(now, member, LeaveReason::Closed);
            }
        }
    }

    /// The shell could not queue a message for `slow` (their control queues are full): each
    /// still holding its seat loses it, its session is closed at once, and everyone left hears
    /// it left. These outputs come before any already waiting. The number dropped.
    pub fn handle_slow(&mut self, now: ServerNanos, slow: &[Recipient]) -> u32 {
        let waiting = std::mem::take(&mut self.out);
        let mut dropped = Vec::new();
        for &to in slow {
            if self.seats.get(&to.member).is_some_and(|s| s.held_by(to.session)) {
                self.free_seat(now, to.member);
                self.out.push_back(Output::End { to, reason: EndReason::Backlog });
                dropped.push(to.member);
            }
        }
        for &member_id in &dropped {
            self.send_all(ServerMessage::MemberLeft { member_id, reason: LeaveReason::Closed }, None);
        }
        self.out.extend(waiting);
        u32::try_from(dropped.len()).unwrap_or(u32::MAX)
    }

    /// A teacher control (already authorized), from HTTP or from member `requester.0`'s
    /// control stream with request id `requester.1` (then the ack or error is queued to them,
    /// after what the control broadcast). Refusals change nothing.
    pub fn handle_control(
        &mut self,
        now: ServerNanos,
        op: ControlOp,
        requester: Option<(u64, u32)>,
    ) -> Result<Option<Applied>, Refused> {
        let result = self.control(now, op);
        self.answer(requester, result.as_ref().map(|applied| *applied));
        result
    }

    /// Queues the ack (with where it lands) or the refusal of a control to the member who
    /// asked on their control stream, if one did.
    fn answer(&mut self, requester: Option<(u64, u32)>, result: Result<Option<Applied>, &Refused>) {
        let Some((member, request_id)) = requester else { return };
        let answer = match result {
            Ok(applied) => ServerMessage::ControlAck(ControlAck { request_id, applied }),
            Err(refused) => error_frame(refused.code, Some(request_id), &refused.message),
        };
        self.send_to(member, answer);
    }

    fn control(&mut self, now: ServerNanos, op: ControlOp) -> Result<Option<Applied>, Refused> {
        if self.closed {
            return Err(Refused::new(ErrorCode::RoomClosed, "the room was closed"));
        }
        match op {
            ControlOp::Timeline(change) => {
                let applied =
                    self.stage.handle_change(now, change).map_err(|e| Refused::new(e.code(), e.to_string()))?;
                self.recorder.timeline(now, self.stage.timeline());
                let timeline = self.timeline().to_wire_at(now);
                self.send_all(ServerMessage::Timeline(timeline), None);
                Ok(Some(applied.to_wire()))
            }
            ControlOp::Mute { member, muted } => {
                let seat = self.student(member, "only students can be muted")?;
                seat.member.muted = muted;
                let update = seat.member.clone();
                self.send_all(ServerMessage::MemberUpdated(update), None);
                Ok(None)
            }
            ControlOp::Assign { member, assignment } => {
                check_assignment(&assignment)?;
                let seat = self.seats.get_mut(&member).ok_or_else(not_a_member)?;
                seat.member.assignment = assignment;
                let update = seat.member.clone();
                self.send_all(ServerMessage::MemberUpdated(update), None);
                Ok(None)
            }
            ControlOp::Remove { member } => {
                self.student(member, "only students can be removed")?;
                self.expel(now, member, LeaveReason::Removed, EndReason::Removed);
                Ok(None)
            }
            ControlOp::Close => {
                self.close(Closing::Teacher);
                Ok(None)
            }
            ControlOp::Prompt { text } => {
                let prompt = self.prompts.set(text)?;
                self.send_all(ServerMessage::Prompt(prompt), None);
                Ok(None)
            }
            ControlOp::StartRecording => {
                let info = self.recorder.start(now, self.stage.timeline())?;
                self.send_all(ServerMessage::Recording(Some(info)), None);
                Ok(None)
            }
            ControlOp::StopRecording => {
                self.stop_recording(now)?;
                Ok(None)
            }
            ControlOp::PlayRecording { .. } => {
                // The take's notes live in the database: the shell loads them and calls
                // `handle_playback`.
                Err(Refused::new(ErrorCode::Internal, "a playback needs the take's notes"))
            }
            ControlOp::StopPlayback => {
                let lead = self.config.lead_nanos;
                let Some(playback) = self.playback.as_mut().filter(|p| !p.stopping()) else {
                    return Err(Refused::new(ErrorCode::NotPlaying, "nothing is playing back"));
                };
                // Strictly more than a lead away: a note sounding exactly one lead from now may
                // have gone out already.
                let Some((at, beat)) = self.stage.timeline().next_boundary(now, lead + 1) else {
                    // The beat stops anyway: so does the playback, with it.
                    return Err(Refused::new(
                        ErrorCode::NotRunning,
                        "the beat is stopping: the playback stops with it",
                    ));
                };
                playback.stop_at(beat, at);
                let info = playback.info;
                self.send_all(ServerMessage::Playback(Some(info)), None);
                Ok(Some(Applied { epoch: self.stage.timeline().epoch(), effective_at: at, effective_beat: beat }))
            }
        }
    }

    /// Plays take `take` back from the next bar boundary: starts the beat if it is stopped,
    /// at `tempo` if given (both at that boundary, announced one lead ahead), then sends
    /// `notes` ahead on the note path (see `playback`). `notes` is the shell's refusal when it
    /// could not load the take (`recording_not_found`, `store_unavailable`). Answered like
    /// [`Room::handle_control`].
    pub fn handle_playback(
        &mut self,
        now: ServerNanos,
        take: u32,
        tempo: Option<downbeat_protocol::MicroBpm>,
        notes: Result<Vec<PlaybackNote>, Refused>,
        requester: Option<(u64, u32)>,
    ) -> Result<Applied, Refused> {
        let result = self.start_playback(now, take, tempo, notes);
        self.answer(requester, result.as_ref().map(|applied| Some(*applied)));
        result
    }

    /// An operator's test note: `midi` on `instrument` at [`TEST_NOTE_VELOCITY`], sent at once
    /// on the note path from [`TEST_NOTE_FROM`] to every attached member, to sound on the
    /// first beat at least one lead away (one lead from now while the beat is stopped), like a
    /// classmate's note. The instant it sounds, or why not (`room_closed`,
    /// `note_out_of_range`).
    pub fn handle_test_note(&mut self, now: ServerNanos, midi: u8, instrument: u8) -> Result<ServerNanos, Refused> {
        if self.closed {
            return Err(Refused::new(ErrorCode::RoomClosed, "the room was closed"));
        }
        if !crate::notes::playable(midi, TEST_NOTE_VELOCITY, instrument) {
            return Err(Refused::new(ErrorCode::NoteOutOfRange, "a test note's MIDI number and instrument are 0-127"));
        }
        let earliest = now.add_nanos(self.config.lead_nanos);
        let timeline = self.stage.timeline();
        let on_beat = timeline
            .beat_at(earliest)
            .and_then(|beat| if timeline.time_of(beat) == Some(earliest) { Some(beat) } else { beat.checked_add(1) })
            .and_then(|beat| timeline.time_of(beat));
        let sounds_at = on_beat.unwrap_or(earliest);
        self.test_notes = self.test_notes.wrapping_add(1);
        let note = Note {
            seq: 1,
            midi,
            velocity: TEST_NOTE_VELOCITY,
            instrument,
            played_at: ServerNanos(sounds_at.0.saturating_sub(self.config.playout_delay_nanos)),
        };
        let frame = NoteFrame {
            from: TEST_NOTE_FROM,
            generation: self.test_notes,
            notes: BoundedVec::try_from_vec(vec![note]).unwrap_or_default(),
        };
        let to = self.recipients(|_, _| true);
        if !to.is_empty() {
            self.out.push_back(Output::Notes { to, frame });
        }
        Ok(sounds_at)
    }

    fn start_playback(
        &mut self,
        now: ServerNanos,
        take: u32,
        tempo: Option<downbeat_protocol::MicroBpm>,
        notes: Result<Vec<PlaybackNote>, Refused>,
    ) -> Result<Applied, Refused> {
        if self.closed {
            return Err(Refused::new(ErrorCode::RoomClosed, "the room was closed"));
        }
        let notes = notes?;
        if self.playback.is_some() {
            return Err(Refused::new(ErrorCode::AlreadyPlaying, "a recording is already playing back"));
        }
        // Checked on a copy first: a refused tempo changes nothing.
        let mut changes = Vec::new();
        if !self.stage.timeline().last().running {
            changes.push(Change::Start { count_in_bars: 0 });
        }
        if let Some(tempo) = tempo {
            changes.push(Change::SetTempo(tempo));
        }
        let mut trial = self.stage.timeline().clone();
        for change in &changes {
            trial.apply(now, *change, self.config.lead_nanos).map_err(|e| Refused::new(e.code(), e.to_string()))?;
        }
        let mut applied = None;
        for change in changes {
            applied = Some(self.stage.handle_change(now, change).map_err(|e| Refused::new(e.code(), e.to_string()))?);
        }
        let (starts_at, start_beat) = self
            .stage
            .timeline()
            .next_boundary(now, self.config.lead_nanos)
            .ok_or_else(|| Refused::new(ErrorCode::Internal, "the beat did not start"))?;
        if applied.is_some() {
            self.recorder.timeline(now, self.stage.timeline());
            let timeline = self.timeline().to_wire_at(now);
            self.send_all(ServerMessage::Timeline(timeline), None);
        }
        self.playbacks += 1;
        let playback = Playback::new(take, self.playbacks, start_beat, starts_at, notes);
        let info = playback.info;
        self.playback = Some(playback);
        self.send_all(ServerMessage::Playback(Some(info)), None);
        self.play(now);
        Ok(Applied { epoch: self.stage.timeline().epoch(), effective_at: starts_at, effective_beat: start_beat })
    }

    /// Sends the playback's notes due at `now` to every attached member; tells everyone once
    /// it is over.
    fn play(&mut self, now: ServerNanos) {
        let (lead, delay) = (self.config.lead_nanos, self.config.playout_delay_nanos);
        let Some(playback) = self.playback.as_mut() else { return };
        let (frames, over) = playback.poll(now, self.stage.timeline(), lead, delay);
        if over {
            self.playback = None;
        }
        let to = self.recipients(|_, _| true);
        if !to.is_empty() {
            for frame in frames {
                self.out.push_back(Output::Notes { to: to.clone(), frame });
            }
        }
        if over {
            self.send_all(ServerMessage::Playback(None), None);
        }
    }

    /// Stops the take running and tells everyone; its rows go to the writer at once.
    fn stop_recording(&mut self, now: ServerNanos) -> Result<(), Refused> {
        self.recorder.stop(now)?;
        // The rows first: whoever hears the take stopped finds them queued for the store.
        self.flush_recording();
        self.send_all(ServerMessage::Recording(None), None);
        Ok(())
    }

    fn flush_recording(&mut self) {
        if let Some(work) = self.recorder.take_flush() {
            self.out.push_back(Output::Sel(SelWork::Recording(work)));
        }
    }

    /// The seat of `member`, which must be a student.
    fn student(&mut self, member: u64, message: &'static str) -> Result<&mut Seat, Refused> {
        let seat = self.seats.get_mut(&member).ok_or_else(not_a_member)?;
        if !seat.is_student() {
            return Err(Refused::new(ErrorCode::Forbidden, message));
        }
        Ok(seat)
    }

    /// A datagram of notes from session `session` of `member`: accepted notes are counted for
    /// SEL (students) and fanned out to every other attached member as one frame; refused
    /// ones may earn the member a (throttled) error or, past the abuse limit, the end of the
    /// session. `None` if the session does not hold the seat (nothing happened).
    pub fn handle_notes(
        &mut self,
        now: ServerNanos,
        member: u64,
        session: u64,
        notes: &[Note],
    ) -> Option<NotesHandled> {
        let muted = self.seats.get(&member).filter(|s| s.held_by(session))?.member.muted;
        let outcome = self.stage.handle_notes(now, member, muted, notes);
        let mut handled = NotesHandled {
            accepted: outcome.accepted,
            duplicates: outcome.duplicates,
            dropped: outcome.dropped,
            refusal: outcome.refusal,
            expelled: false,
        };
        if let Some(frame) = outcome.forward {
            self.count_participation(now, member, &frame, outcome.accepted);
            self.record(now, member, &frame, outcome.accepted);
            let to = self.recipients(|id, _| id != member);
            if !to.is_empty() {
                self.out.push_back(Output::Notes { to, frame });
            }
        }
        let Some(refusal) = outcome.refusal else { return Some(handled) };
        let seat = self.seats.get_mut(&member)?;
        let abusive = matches!(refusal, NoteRefusal::RateLimited | NoteRefusal::OutOfRange);
        if abusive && !seat.abuse.try_take(now.0) {
            self.expel(now, member, LeaveReason::Closed, EndReason::NoteAbuse);
            handled.expelled = true;
            return Some(handled);
        }
        if seat.last_note_error.is_some_and(|t| now.0.saturating_sub(t.0) < NOTE_ERROR_INTERVAL_NANOS) {
            return Some(handled);
        }
        seat.last_note_error = Some(now);
        let message = match refusal {
            NoteRefusal::Muted => "you are muted: your notes are not heard",
            NoteRefusal::RateLimited => "too many notes: some were not heard",
            NoteRefusal::OutOfRange => "a note's MIDI number, velocity, instrument or time is out of range",
            NoteRefusal::NotMember => "notes refused",
        };
        self.send_to(member, error_frame(refusal.code(), None, message));
        Some(handled)
    }

    /// Counts a student's newly accepted notes (the last `accepted` of `frame`) on the
    /// timeline.
    fn count_participation(&mut self, now: ServerNanos, member: u64, frame: &NoteFrame, accepted: u32) {
        let Some(seat) = self.seats.get(&member).filter(|s| s.is_student()) else { return };
        let new = frame.notes.len().saturating_sub(accepted as usize);
        for note in &frame.notes[new..] {
            self.participation.note(
                now,
                &seat.subject,
                member,
                self.stage.timeline(),
                note.played_at,
                &seat.member.assignment.beats,
            );
        }
    }

    /// Records a member's newly accepted notes (the last `accepted` of `frame`) while a take
    /// runs; a take that fills up stops, and everyone hears it.
    fn record(&mut self, now: ServerNanos, member: u64, frame: &NoteFrame, accepted: u32) {
        let Some(seat) = self.seats.get(&member) else { return };
        let new = frame.notes.len().saturating_sub(accepted as usize);
        let mut full = false;
        for note in &frame.notes[new..] {
            let part = seat.member.assignment.part.as_ref();
            full |= self.recorder.note(now, &seat.subject, member, part, note) == Recorded::Full;
        }
        if full {
            self.flush_recording();
            self.send_all(ServerMessage::Recording(None), None);
        }
    }

    /// Session `session` of `member` holds timeline `epoch` (its clock-sync request says so):
    /// behind the room's, it gets a beat frame of its own at the next
    /// [`Room::handle_timeout`] (see [`Stage::handle_held_epoch`]). Whether one is owed; false
    /// too if the session does not hold the seat.
    pub fn handle_held_epoch(&mut self, now: ServerNanos, member: u64, session: u64, epoch: u64) -> bool {
        self.seats.get(&member).is_some_and(|s| s.held_by(session)) && self.stage.handle_held_epoch(now, member, epoch)
    }

    /// A client report from session `session` of `member`: its sync quality becomes the
    /// member's, and everyone hears it when it changed coarsely. What the cumulative playout
    /// counts added; `None` if the session does not hold the seat.
    pub fn handle_report(
        &mut self,
        _now: ServerNanos,
        member: u64,
        session: u64,
        report: ClientReport,
    ) -> Option<ReportHandled> {
        let seat = self.seats.get_mut(&member)?;
        let attached = seat.attached.as_mut().filter(|a| a.session == session)?;
        let handled = ReportHandled {
            notes_played: report.notes_played.saturating_sub(attached.reported.notes_played),
            notes_late: report.notes_late.saturating_sub(attached.reported.notes_late),
        };
        attached.reported = report;
        let before = seat.member.sync.coarse();
        seat.member.sync = report.sync;
        if report.sync.coarse() != before {
            // Only the teachers are told: they watch who is in time, and a student's screen
            // has no use for a classmate's round trip. Told to everyone, each report would cost
            // the room a message per member, so a class's reports would cost the square of its
            // size, and a loaded server (whose round trips change with its load) would make
            // more of them the more loaded it is. Students see a classmate's sync quality in
            // the welcome and with the classmate's next other change.
            let update = ServerMessage::MemberUpdated(seat.member.clone());
            let to = self.recipients(|_, seat| !seat.is_student());
            self.out.push_back(Output::Message { to, message: update });
        }
        Some(handled)
    }

    /// A student's reflection from session `session` of `member`: checked against the room's
    /// prompts and handed out as SEL work, acknowledged only once committed
    /// ([`Room::handle_reflection_saved`]). A refusal is told to the member; its code is
    /// returned for counting. Nothing happens if the session does not hold the seat.
    pub fn handle_reflection(
        &mut self,
        _now: ServerNanos,
        member: u64,
        session: u64,
        reflection: &Reflection,
    ) -> Option<ErrorCode> {
        let seat = self.seats.get(&member).filter(|s| s.held_by(session))?;
        let checked = if seat.is_student() {
            self.prompts.check(&seat.subject, reflection, self.config.max_reflections_per_prompt)
        } else {
            Err(Refused::new(ErrorCode::Forbidden, "only students write reflections"))
        };
        let request_id = reflection.request_id;
        let checked = match checked {
            Ok(checked) => checked,
            Err(refused) => {
                self.send_to(member, error_frame(refused.code, Some(request_id), &refused.message));
                return Some(refused.code);
            }
        };
        let work = ReflectionWork {
            member,
            subject: seat.subject.clone(),
            request_id,
            prompt: checked.prompt,
            id: reflection.id,
            mood: reflection.mood,
            notice: prompts::notice(member, reflection, checked.text.clone()),
            text: checked.text,
        };
        self.out.push_back(Output::Sel(SelWork::Reflection(work)));
        None
    }

    /// The SEL writer committed the reflection `request_id` of `member`: they hear it is saved
    /// and the teachers see it.
    pub fn handle_reflection_saved(&mut self, member: u64, request_id: u32, notice: ReflectionNotice) {
        let id = notice.id;
        self.send_to(member, ServerMessage::ReflectionSaved { request_id, id });
        self.send_teachers(ServerMessage::Reflection(notice));
    }

    /// The database refused the row of the reflection `request_id` of `member` for what it
    /// holds: they hear `store_refused` (a retry of the same would be refused the same way).
    pub fn handle_reflection_unwritable(&mut self, member: u64, request_id: u32) {
        let message = "the school's database refused to store this reflection";
        self.send_to(member, error_frame(ErrorCode::StoreRefused, Some(request_id), message));
    }

    /// A feed update for the teachers, committed by the SEL writer ([`Flush::feed`]).
    pub fn handle_feed(&mut self, message: ServerMessage) {
        self.send_teachers(message);
    }

    /// From now on the seat of `subject` (if any) hears the SEL feed or not: a co-teacher
    /// added or removed by the room's owner.
    pub fn handle_sel_feed(&mut self, subject: &str, sel_feed: bool) {
        if let Some(seat) = self.by_subject.get(subject).and_then(|id| self.seats.get_mut(id)) {
            seat.sel_feed = sel_feed;
        }
    }

    /// The SEL writer's queue refused `work`: a flush is folded back for the next one; a
    /// reflection's author hears it cannot be saved now.
    pub fn handle_sel_refused(&mut self, now: ServerNanos, work: SelWork) {
        match work {
            SelWork::Flush(flush) => self.participation.restore(now, flush),
            SelWork::Recording(work) => self.recorder.restore(now, work),
            SelWork::Reflection(work) => {
                let message = "reflections cannot be saved right now; try again in a moment";
                self.send_to(work.member, error_frame(ErrorCode::StoreUnavailable, Some(work.request_id), message));
            }
        }
    }

    /// Recorded notes dropped since the last call because the SEL writer's queue stayed full
    /// and the recorder held too many rows (the take keeps the rest), for the shell's metrics.
    pub fn take_recorded_notes_dropped(&mut self) -> u64 {
        self.recorder.take_dropped()
    }

    /// `subject`'s data is being deleted: their seat, if they hold one, is freed and its
    /// session ended with `data_deleted` (everyone hears they left), and everything held about
    /// them for SEL is forgotten, their leave included, so nothing about them is written
    /// afterwards. Every reflection of theirs handed out before this is already with the
    /// shell, ahead of the deletion.
    pub fn handle_forget(&mut self, now: ServerNanos, subject: &str) {
        if let Some(&member) = self.by_subject.get(subject) {
            self.expel(now, member, LeaveReason::Closed, EndReason::DataDeleted);
        }
        self.participation.forget(subject);
        self.prompts.forget(subject);
        self.recorder.forget(subject);
        self.churn.remove(subject);
    }

    /// The room session ends (the room closed, or the server shuts down): every student
    /// still seated leaves, a take still running stops, and the last flushes close the
    /// session. What is left to write, in order.
    pub fn finish(&mut self, now: ServerNanos) -> Vec<SelWork> {
        let seated: Vec<String> = self.seats.values().filter(|s| s.is_student()).map(|s| s.subject.clone()).collect();
        for subject in seated {
            self.participation.left(now, &subject);
        }
        // Nothing to stop is fine.
        let _ = self.recorder.stop(now);
        let mut work: Vec<SelWork> = self.recorder.take_flush().map(SelWork::Recording).into_iter().collect();
        work.extend(self.participation.take_flush(now, true).map(SelWork::Flush));
        work
    }

    /// Frees a seat (its stage membership, the subject's index, a student's leave for SEL)
    /// without telling anyone.
    fn free_seat(&mut self, now: ServerNanos, member: u64) -> Option<Seat> {
        let seat = self.seats.remove(&member)?;
        self.by_subject.remove(&seat.subject);
        self.stage.leave(member);
        if seat.is_student() {
            self.participation.left(now, &seat.subject);
        }
        if self.seats.is_empty() {
            self.empty_since = Some(now);
        }
        Some(seat)
    }

    /// Frees a seat and tells everyone left.
    fn remove(&mut self, now: ServerNanos, member: u64, reason: LeaveReason) -> Option<Seat> {
        let seat = self.free_seat(now, member)?;
        self.send_all(ServerMessage::MemberLeft { member_id: member, reason }, None);
        Some(seat)
    }

    /// Frees a seat, tells everyone left, and ends its session (if attached).
    fn expel(&mut self, now: ServerNanos, member: u64, reason: LeaveReason, end: EndReason) {
        if let Some(seat) = self.remove(now, member, reason)
            && let Some(attached) = seat.attached
        {
            let to = Recipient { member, session: attached.session };
            self.out.push_back(Output::End { to, reason: end });
        }
    }

    /// Closes the room: everyone is told why, then every session ends with `room_closed`.
    fn close(&mut self, closing: Closing) {
        self.send_all(ServerMessage::RoomClosed { message: BoundedString::truncating(closing.message()) }, None);
        for to in self.recipients(|_, _| true) {
            self.out.push_back(Output::End { to, reason: EndReason::RoomClosed(closing) });
        }
        self.closed = true;
    }

    fn recipient(&self, member: u64) -> Option<Recipient> {
        let attached = self.seats.get(&member)?.attached?;
        Some(Recipient { member, session: attached.session })
    }

    /// The attached members `to` picks, in member order.
    fn recipients(&self, to: impl Fn(u64, &Seat) -> bool) -> Vec<Recipient> {
        self.seats
            .iter()
            .filter(|(id, seat)| to(**id, seat))
            .filter_map(|(&member, seat)| seat.attached.map(|a| Recipient { member, session: a.session }))
            .collect()
    }

    /// Queues `message` for one member (nothing if they are not attached).
    fn send_to(&mut self, member: u64, message: ServerMessage) {
        if let Some(to) = self.recipient(member) {
            self.out.push_back(Output::Message { to: vec![to], message });
        }
    }

    /// Queues `message` for every attached member but `except`.
    fn send_all(&mut self, message: ServerMessage, except: Option<u64>) {
        let to = self.recipients(|id, _| Some(id) != except);
        self.out.push_back(Output::Message { to, message });
    }

    /// Queues `message` for the attached members who hear the SEL feed (the room's teachers).
    fn send_teachers(&mut self, message: ServerMessage) {
        let to = self.recipients(|_, seat| seat.sel_feed);
        self.out.push_back(Output::Feed { to, message });
    }
}

fn not_a_member() -> Refused {
    Refused::new(ErrorCode::MemberNotFound, "no member with this id is in the room")
}

fn check_assignment(assignment: &Assignment) -> Result<(), Refused> {
    if let Some(part) = &assignment.part
        && (part.trim().is_empty() || check_text(part, TextKind::Line).is_err())
    {
        return Err(Refused::new(ErrorCode::BadRequest, "a part needs a name on one line without control characters"));
    }
    if assignment.beats.iter().any(|b| *b >= MAX_BEATS_PER_BAR) {
        return Err(Refused::new(ErrorCode::BadRequest, "assigned beats are positions in the bar, 0 to 15"));
    }
    Ok(())
}
