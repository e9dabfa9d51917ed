//! Handing a room to another process: what a takeover keeps, and how the room resumes there.
//!
//! A room's state is plain data, so another node of a cluster can carry on with it. What it
//! must keep is small: the timeline (beat n sounds at the same instant), the seats (member
//! ids, names, roles, parts, mute), the prompt and the reflections already counted against
//! it, the take running, and the SEL room session's counters. [`Room::essentials`] is that
//! part, for the shell to tell when a change must be written down before it is acknowledged;
//! [`Room::handover`] is the whole room as another node resumes it; [`Room::from_handover`] starts
//! it there, every seat held for its member's reconnect.
//!
//! Times are server times. Nodes of one cluster share a time base (their hosts' synchronized
//! wall clocks, each read through its own monotonic clock), so a timeline needs no
//! translation: beat n's instant is the same number on every node.
//!
//! What a takeover loses, on purpose: work held for the SEL writer but not yet handed to it
//! (at most a flush interval of notes and participation, which the old node may have written:
//! writing it twice would count it twice), and a playback (its notes are read from the store
//! again if the teacher starts it again). Row sequence numbers jump past anything the old
//! node could have written, so no row of the new node is mistaken for one of the old.

use downbeat_protocol::{Member, Moved, Prompt, RecordingInfo, ServerMessage, ServerNanos};
use serde::{Deserialize, Serialize};

use super::{EndReason, Output, Room, SelWork};
use crate::timeline::Timeline;

/// What a takeover must keep, compared by the shell after each input that can change it (a
/// join, a departure, a control, an expired seat): when it differs from what was last
/// written, the new handover is written before anything is acknowledged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Essentials {
    timeline: Timeline,
    /// Seats by member id: subject, and the member as everyone sees them but for the parts
    /// that change with every report (sync quality).
    seats: Vec<(u64, String, Member)>,
    next_member_id: u64,
    prompt: Option<Prompt>,
    recording: Option<RecordingInfo>,
    closed: bool,
}

/// A room as another node resumes it ([`Room::from_handover`]). Serializable; its layout is the
/// engine's own and only the same build reads it back.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Handover {
    room: Room,
}

impl Handover {
    /// The timeline handed over.
    pub fn timeline(&self) -> &Timeline {
        self.room.timeline()
    }

    /// How many seats are handed over.
    pub fn seats(&self) -> usize {
        self.room.seats.len()
    }
}

/// How far row sequence numbers jump at each resume: past anything one node can write in a
/// room session.
const SEQ_JUMP: i64 = 1 << 32;

impl Room {
    /// What a takeover must keep, now. See [`Essentials`].
    pub fn essentials(&self) -> Essentials {
        let seats = self
            .seats
            .iter()
            .map(|(&id, seat)| {
                let mut member = seat.member.clone();
                member.sync = Default::default();
                (id, seat.subject.clone(), member)
            })
            .collect();
        Essentials {
            timeline: self.timeline().clone(),
            seats,
            next_member_id: self.next_member_id,
            prompt: self.prompts.current().cloned(),
            recording: self.recorder.info(),
            closed: self.closed,
        }
    }

    /// The room as another node resumes it: everything but the outputs not yet polled, the
    /// SEL work held for the writer, and a playback.
    pub fn handover(&self) -> Handover {
        let mut room = self.clone();
        room.out.clear();
        room.playback = None;
        room.participation.handed_over();
        room.recorder.handed_over();
        Handover { room }
    }

    /// Resumes `handover` at `now`, with the settings it was handed over with (the nodes of
    /// a cluster share them): every seat is held for the grace period, as if each member's
    /// connection had just been lost, so members reconnecting take their own seats back (same
    /// member id, part and mute) and nobody hears anyone leave or join.
    pub fn from_handover(handover: Handover, now: ServerNanos) -> Self {
        let mut room = handover.room;
        let grace = room.config.seat_grace_nanos.max(1);
        for (&member, seat) in &mut room.seats {
            seat.attached = None;
            seat.grace_until = Some(now.add_nanos(grace));
            room.stage.leave(member);
        }
        room.empty_since = room.seats.is_empty().then_some(now);
        room.participation.resumed(SEQ_JUMP);
        room.recorder.resumed();
        room.out.clear();
        room
    }

    /// The room now lives on another node (this one handed it over, or lost it): every
    /// member is told where it went and their session ends with `moved`; the room closes
    /// here without ending its room session, which the other node carries on. What is left
    /// for the SEL writer, in order (at most the last flush interval's).
    pub fn handle_moved(&mut self, now: ServerNanos, to: Moved) -> Vec<SelWork> {
        if self.closed {
            return Vec::new();
        }
        self.send_all(ServerMessage::Moved(to), None);
        for to in self.recipients(|_, _| true) {
            self.out.push_back(Output::End { to, reason: EndReason::Moved });
        }
        self.closed = true;
        let mut work: Vec<SelWork> = self.recorder.take_flush().map(SelWork::Recording).into_iter().collect();
        work.extend(self.participation.take_flush(now, false).map(SelWork::Flush));
        work
    }
}
