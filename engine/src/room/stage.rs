//! The room's stage: the timeline, paced beat frames per attached member, and students'
//! notes. [`super::Room`] drives it for every attached seat; the simulation harness drives it
//! alone.
//!
//! The room sends beat frames on one schedule, its tick. Each tick builds one frame, with one
//! room-wide sequence number, for every member at once, so the I/O layer encodes it once
//! however many members hear it. Each frame carries the whole timeline plus the beats of the
//! next [`Config::lead_nanos`], so a lost, duplicated or reordered frame costs nothing: any
//! later one says everything. Clients compute every beat from the timeline they hold, so a
//! frame that repeats an unchanged timeline says nothing new; the tick's pace follows that:
//!
//! - **Burst**: a timeline change (start, stop, tempo, meter, a playback's start) makes the
//!   tick due at once, then frames go out every [`Config::send_interval_nanos`] (100 ms) for
//!   [`Config::burst_nanos`] (1.5 s) after the change, and in any case until the change takes
//!   effect. A change takes effect at least one lead after it is asked, so every frame of the
//!   announcement carries it, and an outage shorter than the lead (the simulation's 1 s)
//!   cannot swallow all of them.
//! - **Steady**: beats sounding, nothing changed for a burst: a frame every
//!   [`Config::steady_send_interval_nanos`] (10 s), as a sign of life.
//! - **Idle**: stopped, nothing pending: a frame every [`Config::idle_send_interval_nanos`]
//!   (10 s).
//!
//! Neither slow pace repairs anything: a member's clock-sync requests (every second or more
//! often) name the timeline epoch it holds, and one behind the room's gets a frame of its own
//! at once ([`Stage::handle_held_epoch`]). That brings back a member that lost every frame of
//! a burst or was cut off for longer than the lead, within a sync interval and a round trip,
//! and a member that holds the current timeline is sent nothing it already knows.
//!
//! Notes also keep the burst pace, for [`Config::burst_nanos`] after the last one the room
//! accepted: frames every 100 ms are what keep a power-saving Wi-Fi radio awake (it dozes
//! after some 200 ms without traffic and then hears only every beacon, 102.4 ms apart), and a
//! classmate's note reaching a dozing radio arrives up to a beacon late, often too late to
//! sound with the others. A room where nobody plays settles to the steady pace.
//!
//! A member who joins gets a frame of its own at once (its welcome already carries the
//! timeline), then the room's; neither a join nor a repair starts a burst. The I/O layer only
//! ever hands frames to a non-blocking send, so a slow member never delays another.
//!
//! Notes ([`Stage::handle_notes`]) are validated, de-duplicated by sequence number, dropped
//! while the member is muted (the caller says so: mute is a seat's, stored once) or beyond
//! their rate limit (a [`TokenBucket`] per member), and fanned out as one [`NoteFrame`] for
//! every other member, repeating the member's last [`notes::REDUNDANT_NOTES`] forwarded notes
//! while they have yet to sound (see [`crate::notes`]).

use std::collections::BTreeMap;

use downbeat_protocol::{
    BeatFrame, BoundedVec, Change, ErrorCode, MAX_BEATS_PER_FRAME, MAX_NOTES_PER_DATAGRAM, MicroBpm, Note, NoteFrame,
    ServerNanos,
};

use serde::{Deserialize, Serialize};

use super::Config;
use crate::limit::TokenBucket;
use crate::notes::{self, Recent};
use crate::timeline::{Applied, Timeline, TimelineError};

/// A member operation was refused; nothing changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RoomError {
    /// No free seat.
    #[error("the room is full")]
    Full,
    /// Already a member.
    #[error("already a member")]
    AlreadyMember,
    /// No such member.
    #[error("no such member")]
    NotMember,
}

impl RoomError {
    /// The stable code.
    pub const fn code(&self) -> ErrorCode {
        match self {
            Self::Full => ErrorCode::RoomFull,
            Self::AlreadyMember => ErrorCode::UnexpectedMessage,
            Self::NotMember => ErrorCode::MemberNotFound,
        }
    }
}

/// Why a member's notes were not forwarded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum NoteRefusal {
    /// The sender is not a member of the room.
    #[error("not a member of the room")]
    NotMember,
    /// The teacher muted the sender.
    #[error("muted by the teacher")]
    Muted,
    /// A note's fields or time were out of range; the whole datagram was refused.
    #[error("a note was out of range")]
    OutOfRange,
    /// The sender exceeded their note rate.
    #[error("too many notes")]
    RateLimited,
}

impl NoteRefusal {
    /// The stable code.
    pub const fn code(&self) -> ErrorCode {
        match self {
            Self::NotMember => ErrorCode::MemberNotFound,
            Self::Muted => ErrorCode::Forbidden,
            Self::OutOfRange => ErrorCode::NoteOutOfRange,
            Self::RateLimited => ErrorCode::RateLimited,
        }
    }
}

/// What [`Stage::handle_notes`] did with a datagram of notes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotesOutcome {
    /// What to send to every member except `from`; None when nothing new was accepted.
    pub forward: Option<NoteFrame>,
    /// New notes accepted (and in `forward`).
    pub accepted: u32,
    /// Copies of notes already handled (redundancy), ignored.
    pub duplicates: u32,
    /// New notes not forwarded (muted or rate-limited); for a datagram refused whole (not a
    /// member, out of range), every note in it.
    pub dropped: u32,
    /// Why notes were dropped, if any were.
    pub refusal: Option<NoteRefusal>,
}

impl NotesOutcome {
    fn refused(dropped: usize, refusal: NoteRefusal) -> Self {
        Self {
            forward: None,
            accepted: 0,
            duplicates: 0,
            dropped: u32::try_from(dropped).unwrap_or(u32::MAX),
            refusal: Some(refusal),
        }
    }
}

/// A frame to send, the same to each of its members.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transmit {
    /// Who to send it to, in ascending order.
    pub members: Vec<u64>,
    /// What to send.
    pub frame: BeatFrame,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct MemberState {
    /// Which join of this member this is (see [`NoteFrame::generation`]).
    generation: u32,
    /// Joined, or said it holds a stale timeline, at this instant and not sent a frame since:
    /// one of its own goes out at once.
    owed: Option<ServerNanos>,
    note_bucket: TokenBucket,
    /// Highest note sequence number handled (accepted or dropped).
    highest_note_seq: u32,
    /// The last notes forwarded, repeated while they have yet to sound.
    forwarded: Recent,
}

impl MemberState {
    fn new(config: &Config, now: ServerNanos, generation: u32) -> Self {
        Self {
            generation,
            owed: Some(now),
            note_bucket: TokenBucket::new(config.notes_per_second, config.note_burst, now.0),
            highest_note_seq: 0,
            forwarded: Recent::default(),
        }
    }
}

/// The stage of one room.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Stage {
    config: Config,
    timeline: Timeline,
    members: BTreeMap<u64, MemberState>,
    /// Joins so far: each membership's note generation.
    joins: u32,
    /// When the room's next frame to every member is due.
    tick: ServerNanos,
    /// The last frame's sequence number (room-wide; each member sees it rise).
    seq: u64,
    /// Until when frames go out at the burst pace: the last timeline change plus
    /// [`Config::burst_nanos`], or when it takes effect if later.
    #[serde(default)]
    burst_until: ServerNanos,
    /// Until when frames go out at the burst pace because notes flow: the last note accepted
    /// plus [`Config::burst_nanos`].
    #[serde(default)]
    playing_until: ServerNanos,
}

impl Stage {
    /// A stopped stage.
    pub fn new(config: Config, now: ServerNanos, tempo: MicroBpm, beats_per_bar: u8) -> Result<Self, TimelineError> {
        Ok(Self::with_timeline(config, Timeline::new(now, tempo, beats_per_bar)?))
    }

    /// A stage with `timeline` and no members.
    pub fn with_timeline(config: Config, timeline: Timeline) -> Self {
        Self {
            config,
            timeline,
            members: BTreeMap::new(),
            joins: 0,
            tick: ServerNanos(0),
            seq: 0,
            burst_until: ServerNanos(0),
            playing_until: ServerNanos(0),
        }
    }

    /// The room's settings.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Adds a member; its first frame goes out at once (its own), then the room's.
    pub fn join(&mut self, now: ServerNanos, member: u64) -> Result<(), RoomError> {
        if self.members.contains_key(&member) {
            return Err(RoomError::AlreadyMember);
        }
        if self.members.len() >= self.config.max_members {
            return Err(RoomError::Full);
        }
        self.joins = self.joins.wrapping_add(1);
        self.members.insert(member, MemberState::new(&self.config, now, self.joins));
        Ok(())
    }

    /// Removes a member and everything the stage knew of them (note rate and sequence state);
    /// false if it was not one.
    pub fn leave(&mut self, member: u64) -> bool {
        self.members.remove(&member).is_some()
    }

    /// Whether `member` is in the room.
    pub fn contains(&self, member: u64) -> bool {
        self.members.contains_key(&member)
    }

    /// Number of members.
    pub fn member_count(&self) -> usize {
        self.members.len()
    }

    /// Member ids in ascending order.
    pub fn members(&self) -> impl Iterator<Item = u64> + '_ {
        self.members.keys().copied()
    }

    /// Takes a datagram of notes from member `from` at `now`; `muted` says the teacher muted
    /// them.
    ///
    /// - Not a member: everything is dropped ([`NoteRefusal::NotMember`]).
    /// - If any note is out of range (see [`notes::fields_in_range`]; `played_at` more than
    ///   [`Config::note_past_window_nanos`] before or [`Config::note_future_window_nanos`] after
    ///   `now`), or the datagram holds more than [`MAX_NOTES_PER_DATAGRAM`] notes, the whole
    ///   datagram is refused ([`NoteRefusal::OutOfRange`]) and nothing changes: no tokens are
    ///   taken, no sequence number advances.
    /// - Notes are taken in sequence-number order. One at or below the highest sequence
    ///   number already handled is a copy (redundancy) and is ignored.
    /// - A new note while `muted` is dropped ([`NoteRefusal::Muted`]); one beyond the
    ///   member's token bucket is dropped ([`NoteRefusal::RateLimited`]). Either way its
    ///   sequence number is handled, so its copies are ignored and unmuting replays nothing.
    /// - The frame to forward holds the new accepted notes, preceded by up to
    ///   [`notes::REDUNDANT_NOTES`] notes forwarded before whose playout instant
    ///   (`played_at + playout delay`) is still after `now`, oldest first, at most
    ///   [`MAX_NOTES_PER_DATAGRAM`] (the newest win).
    pub fn handle_notes(&mut self, now: ServerNanos, from: u64, muted: bool, notes: &[Note]) -> NotesOutcome {
        let Self { config, members, .. } = self;
        let Some(state) = members.get_mut(&from) else {
            return NotesOutcome::refused(notes.len(), NoteRefusal::NotMember);
        };
        let in_range = |n: &Note| {
            notes::fields_in_range(n)
                && notes::time_in_range(n, now, config.note_past_window_nanos, config.note_future_window_nanos)
        };
        if notes.len() > MAX_NOTES_PER_DATAGRAM || !notes.iter().all(in_range) {
            return NotesOutcome::refused(notes.len(), NoteRefusal::OutOfRange);
        }
        let mut sorted = notes.to_vec();
        sorted.sort_by_key(|n| n.seq);
        let mut outcome = NotesOutcome { forward: None, accepted: 0, duplicates: 0, dropped: 0, refusal: None };
        let mut accepted = Vec::new();
        for note in sorted {
            if note.seq <= state.highest_note_seq {
                outcome.duplicates += 1;
                continue;
            }
            state.highest_note_seq = note.seq;
            if muted {
                outcome.dropped += 1;
                outcome.refusal = Some(NoteRefusal::Muted);
            } else if !state.note_bucket.try_take(now.0) {
                outcome.dropped += 1;
                outcome.refusal = Some(NoteRefusal::RateLimited);
            } else {
                accepted.push(note);
            }
        }
        if accepted.is_empty() {
            return outcome;
        }
        outcome.accepted = u32::try_from(accepted.len()).unwrap_or(u32::MAX);
        let mut frame: Vec<Note> = state.forwarded.live(now, config.playout_delay_nanos).collect();
        frame.extend_from_slice(&accepted);
        let frame = frame.split_off(frame.len().saturating_sub(MAX_NOTES_PER_DATAGRAM));
        for &note in &accepted {
            state.forwarded.push(note);
        }
        // Cannot fail: at most the wire cap.
        outcome.forward = Some(NoteFrame {
            from,
            generation: state.generation,
            notes: BoundedVec::try_from_vec(frame).unwrap_or_default(),
        });
        // Notes flowing keep the room at the burst pace, the next frame within one interval.
        self.playing_until = now.add_nanos(self.config.burst_nanos);
        self.tick = self.tick.min(now.add_nanos(self.config.send_interval_nanos));
        outcome
    }

    /// Frames sent so far (the last frame's sequence number), each to all its members.
    pub fn frames_sent(&self) -> u64 {
        self.seq
    }

    /// The timeline.
    pub fn timeline(&self) -> &Timeline {
        &self.timeline
    }

    /// Applies a timeline change; every member gets a frame carrying it right away, and the
    /// burst pace holds for [`Config::burst_nanos`] and until the change takes effect.
    pub fn handle_change(&mut self, now: ServerNanos, change: Change) -> Result<Applied, TimelineError> {
        let applied = self.timeline.apply(now, change, self.config.lead_nanos)?;
        self.tick = self.tick.min(now);
        self.burst_until = self.burst_until.max(now.add_nanos(self.config.burst_nanos)).max(applied.effective_at);
        Ok(applied)
    }

    /// A member says (in a clock-sync request) that it holds timeline `epoch`: one behind the
    /// room's gets a frame of its own at once, unless the burst pace brings one within an
    /// interval anyway (a request that crossed a change's first frames). This is what repairs
    /// a member that lost every frame of a burst, or came back from an outage longer than the
    /// lead, so the steady and idle paces need not. Whether a frame is now owed.
    pub fn handle_held_epoch(&mut self, now: ServerNanos, member: u64, epoch: u64) -> bool {
        if epoch >= self.timeline.epoch() || self.in_burst(now) {
            return false;
        }
        let Some(state) = self.members.get_mut(&member) else { return false };
        state.owed = Some(state.owed.map_or(now, |at| at.min(now)));
        true
    }

    /// Whether frames go out at the burst pace at `now`: within a burst, while a change is
    /// still to take effect, or within a burst of the last note.
    pub fn in_burst(&self, now: ServerNanos) -> bool {
        now < self.burst_until || now < self.playing_until || self.timeline.segments().iter().any(|s| s.start > now)
    }

    fn interval_at(&self, now: ServerNanos) -> u64 {
        let interval = if self.in_burst(now) {
            self.config.send_interval_nanos
        } else if self.timeline.is_running_at(now) {
            self.config.steady_send_interval_nanos
        } else {
            self.config.idle_send_interval_nanos
        };
        interval.max(1)
    }

    /// The beat frame that would go out at `now` (sequence number 0).
    pub fn frame_at(&self, now: ServerNanos) -> BeatFrame {
        let horizon = now.add_nanos(self.config.lead_nanos);
        let limit = self.config.beats_per_frame.min(MAX_BEATS_PER_FRAME);
        // Segments over before `now` yield no beats in `[now, horizon)`, so no pruning is needed.
        let beats: Vec<_> = self.timeline.beats_in(now, horizon).take(limit).collect();
        BeatFrame {
            seq: 0,
            sent_at: now,
            timeline: self.timeline.to_wire_at(now),
            // Cannot fail: `limit` is at most the wire cap.
            beats: BoundedVec::try_from_vec(beats).unwrap_or_default(),
        }
    }

    /// The next frame due at or before `now`, if any: the room's tick to every member, or a
    /// first frame to those who just joined. Call until `None`.
    pub fn poll_transmit(&mut self, now: ServerNanos) -> Option<Transmit> {
        if self.members.is_empty() {
            return None;
        }
        let members: Vec<u64> = if self.tick <= now {
            let interval = self.interval_at(now);
            // Keep the cadence (no drift from late polling) but never fall behind now.
            self.tick =
                ServerNanos(self.tick.0.saturating_add(interval)).max(now.add_nanos(1)).min(now.add_nanos(interval));
            self.members.keys().copied().collect()
        } else {
            self.members.iter().filter(|(_, m)| m.owed.is_some_and(|at| at <= now)).map(|(&id, _)| id).collect()
        };
        if members.is_empty() {
            return None;
        }
        for id in &members {
            if let Some(m) = self.members.get_mut(id) {
                m.owed = None;
            }
        }
        self.timeline.prune(now);
        self.seq += 1;
        let frame = BeatFrame { seq: self.seq, ..self.frame_at(now) };
        Some(Transmit { members, frame })
    }

    /// When [`Stage::poll_transmit`] next has something; `None` with no members.
    pub fn poll_timeout(&self) -> Option<ServerNanos> {
        if self.members.is_empty() {
            return None;
        }
        self.members.values().filter_map(|m| m.owed).chain([self.tick]).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    /// The default settings with the slow paces at a second, so that a few seconds show them.
    fn second_paces() -> Config {
        Config { steady_send_interval_nanos: 1_000 * MS, idle_send_interval_nanos: 1_000 * MS, ..Config::default() }
    }

    fn room() -> Stage {
        Stage::new(Config { max_members: 3, ..second_paces() }, ServerNanos(0), MicroBpm::from_bpm(120), 4).unwrap()
    }

    #[test]
    fn join_is_bounded_and_unique() {
        let mut r = room();
        for m in 1..=3 {
            r.join(ServerNanos(0), m).unwrap();
        }
        assert_eq!(r.join(ServerNanos(0), 4), Err(RoomError::Full));
        assert_eq!(r.join(ServerNanos(0), 1), Err(RoomError::AlreadyMember));
        assert!(r.leave(2));
        assert!(!r.leave(2));
        r.join(ServerNanos(0), 4).unwrap();
        assert_eq!(r.members().collect::<Vec<_>>(), vec![1, 3, 4]);
    }

    #[test]
    fn one_frame_a_tick_reaches_every_member_and_a_newcomer_hears_at_once() {
        let mut r = room();
        r.join(ServerNanos(0), 1).unwrap();
        let first = r.poll_transmit(ServerNanos(0)).unwrap();
        let mut sent: Vec<(u64, Vec<u64>, u64)> = vec![(0, first.members, first.frame.seq)];
        assert!(r.poll_transmit(ServerNanos(0)).is_none());
        r.join(ServerNanos(30 * MS), 2).unwrap();
        r.handle_change(ServerNanos(30 * MS), Change::Start { count_in_bars: 0 }).unwrap();
        let mut now = ServerNanos(30 * MS);
        while now.0 < 1_000 * MS {
            while let Some(t) = r.poll_transmit(now) {
                assert!(t.frame.beats.len() <= 8);
                for b in t.frame.beats.iter() {
                    assert!(b.at >= now && b.at.0 < now.0 + 1_500 * MS);
                }
                sent.push((now.0 / MS, t.members, t.frame.seq));
            }
            now = r.poll_timeout().unwrap();
        }
        // Member 1 alone at 0 ms; from the start at 30 ms, one frame a tick to both (the
        // newcomer's first frame is the room's), every 100 ms, one sequence of numbers.
        assert_eq!(sent[0], (0, vec![1], 1));
        let ticks: Vec<u64> = sent[1..].iter().map(|s| s.0).collect();
        assert_eq!(ticks, (0..10).map(|k| 30 + 100 * k).collect::<Vec<_>>());
        assert!(sent[1..].iter().all(|s| s.1 == vec![1, 2]), "{sent:?}");
        let seqs: Vec<u64> = sent.iter().map(|s| s.2).collect();
        assert_eq!(seqs, (1..=11).collect::<Vec<_>>());

        // A member who joins between ticks hears a frame of its own at once, then the room's.
        r.join(ServerNanos(1_005 * MS), 3).unwrap();
        assert_eq!(r.poll_timeout(), Some(ServerNanos(1_005 * MS)));
        let own = r.poll_transmit(ServerNanos(1_005 * MS)).unwrap();
        assert_eq!((own.members, own.frame.seq), (vec![3], 12));
        assert!(r.poll_transmit(ServerNanos(1_005 * MS)).is_none());
        assert_eq!(r.poll_timeout(), Some(ServerNanos(1_030 * MS)));
        let tick = r.poll_transmit(ServerNanos(1_030 * MS)).unwrap();
        assert_eq!((tick.members, tick.frame.seq), (vec![1, 2, 3], 13));
    }

    #[test]
    fn stopped_rooms_send_slowly_and_changes_go_out_at_once() {
        let mut r = room();
        r.join(ServerNanos(0), 1).unwrap();
        assert!(r.poll_transmit(ServerNanos(0)).is_some());
        assert_eq!(r.poll_timeout(), Some(ServerNanos(1_000 * MS)));
        r.handle_change(ServerNanos(10 * MS), Change::Start { count_in_bars: 0 }).unwrap();
        assert_eq!(r.poll_timeout(), Some(ServerNanos(10 * MS)));
        let t = r.poll_transmit(ServerNanos(10 * MS)).unwrap();
        assert_eq!(t.frame.timeline.epoch, 2);
        assert_eq!(r.poll_timeout(), Some(ServerNanos(110 * MS)));
    }

    /// Polls `r` from `from` to `to` (exclusive); the instants (ms) of the room's ticks.
    fn ticks(r: &mut Stage, from: u64, to: u64) -> Vec<u64> {
        let mut sent = Vec::new();
        let mut now = ServerNanos(from);
        while now.0 < to {
            while let Some(t) = r.poll_transmit(now) {
                sent.push(t.frame.sent_at.0 / MS);
            }
            now = r.poll_timeout().unwrap().max(now);
        }
        sent
    }

    #[test]
    fn a_running_room_bursts_after_a_change_then_sends_at_the_steady_pace() {
        let mut r = room();
        r.join(ServerNanos(0), 1).unwrap();
        assert_eq!(ticks(&mut r, 0, 10 * MS), vec![0]);
        // Start at 10 ms, sounding from 1510 ms (one lead later): 100 ms frames from the change
        // until it takes effect, then one a second.
        let applied = r.handle_change(ServerNanos(10 * MS), Change::Start { count_in_bars: 0 }).unwrap();
        assert_eq!(applied.effective_at, ServerNanos(1_510 * MS));
        let sent = ticks(&mut r, 10 * MS, 6_000 * MS);
        let burst: Vec<u64> = (0..15).map(|k| 10 + 100 * k).collect();
        let steady: Vec<u64> = (0..5).map(|k| 1_510 + 1_000 * k).collect();
        assert_eq!(sent, [burst, steady].concat());
        assert!(!r.in_burst(ServerNanos(6_000 * MS)));
        assert_eq!(ticks(&mut r, 6_000 * MS, 7_700 * MS), vec![6_510, 7_510]);

        // A tempo change in the steady phase goes out at once and starts a burst again, which
        // lasts until the change takes effect on the next bar boundary a lead away (bars of
        // 2 s at 120 BPM: the downbeat at 9510 ms).
        let applied = r.handle_change(ServerNanos(7_700 * MS), Change::SetTempo(MicroBpm::from_bpm(90))).unwrap();
        assert_eq!(applied.effective_at, ServerNanos(9_510 * MS));
        assert_eq!(r.poll_timeout(), Some(ServerNanos(7_700 * MS)));
        let sent = ticks(&mut r, 7_700 * MS, 12_000 * MS);
        let burst: Vec<u64> = (0..19).map(|k| 7_700 + 100 * k).collect();
        // The burst's last frame at 9500 ms; the next at 9600, the steady pace from there.
        let steady: Vec<u64> = vec![9_600, 10_600, 11_600];
        assert_eq!(sent, [burst, steady].concat());
    }

    #[test]
    fn a_burst_lasts_at_least_burst_nanos_and_until_a_distant_change_takes_effect() {
        // Burst longer than the lead: 3 s of 100 ms frames after a start at 0.
        let config = Config { burst_nanos: 3_000 * MS, ..second_paces() };
        let mut r = Stage::new(config, ServerNanos(0), MicroBpm::from_bpm(120), 4).unwrap();
        r.join(ServerNanos(0), 1).unwrap();
        r.handle_change(ServerNanos(0), Change::Start { count_in_bars: 0 }).unwrap();
        let sent = ticks(&mut r, 0, 5_000 * MS);
        assert_eq!(sent, [(0..30).map(|k| 100 * k).collect::<Vec<_>>(), vec![3_000, 4_000]].concat());

        // A slow tempo with long bars: a change lands on a downbeat far beyond one lead, and
        // every frame until then goes out at the burst pace.
        let mut r = Stage::new(second_paces(), ServerNanos(0), MicroBpm::from_bpm(20), 16).unwrap();
        r.join(ServerNanos(0), 1).unwrap();
        r.handle_change(ServerNanos(0), Change::Start { count_in_bars: 0 }).unwrap();
        ticks(&mut r, 0, 10_000 * MS);
        // Bars of 48 s: at 10 s the next downbeat at least a lead away is at 49.5 s.
        let applied = r.handle_change(ServerNanos(10_000 * MS), Change::SetMeter(4)).unwrap();
        assert_eq!(applied.effective_at, ServerNanos(49_500 * MS));
        let sent = ticks(&mut r, 10_000 * MS, 52_000 * MS);
        let fast = sent.iter().filter(|&&t| t < 49_500).count();
        assert_eq!(fast, 395, "every 100 ms from 10 s to 49.5 s");
        assert_eq!(&sent[fast..], &[49_500, 50_500, 51_500]);
    }

    #[test]
    fn a_newcomer_in_the_steady_phase_hears_at_once_without_a_burst() {
        let mut r = room();
        r.join(ServerNanos(0), 1).unwrap();
        r.handle_change(ServerNanos(0), Change::Start { count_in_bars: 0 }).unwrap();
        ticks(&mut r, 0, 5_000 * MS);
        assert_eq!(r.poll_timeout(), Some(ServerNanos(5_500 * MS)));
        r.join(ServerNanos(5_050 * MS), 2).unwrap();
        let own = r.poll_transmit(ServerNanos(5_050 * MS)).unwrap();
        assert_eq!(own.members, vec![2]);
        assert!(r.poll_transmit(ServerNanos(5_050 * MS)).is_none());
        // The room's tick stays where it was, to both.
        assert_eq!(r.poll_timeout(), Some(ServerNanos(5_500 * MS)));
        assert_eq!(r.poll_transmit(ServerNanos(5_500 * MS)).unwrap().members, vec![1, 2]);
        assert_eq!(r.poll_timeout(), Some(ServerNanos(6_500 * MS)));
    }

    #[test]
    fn a_member_behind_the_timeline_is_repaired_at_once_and_one_that_holds_it_is_sent_nothing() {
        // The default paces: a frame every 10 s once settled.
        let mut r = Stage::new(Config::default(), ServerNanos(0), MicroBpm::from_bpm(120), 4).unwrap();
        r.join(ServerNanos(0), 1).unwrap();
        r.join(ServerNanos(0), 2).unwrap();
        let start = r.handle_change(ServerNanos(0), Change::Start { count_in_bars: 0 }).unwrap();
        let tempo = r.handle_change(ServerNanos(0), Change::SetTempo(MicroBpm::from_bpm(90))).unwrap();
        assert!(tempo.epoch > start.epoch);
        assert_eq!(ticks(&mut r, 0, 20_000 * MS).len(), 15 + 2, "a burst, then 1.5 s and 11.5 s");
        assert_eq!(r.poll_timeout(), Some(ServerNanos(21_500 * MS)));

        // Member 1 holds the current timeline, member 2 the one before the tempo change (it
        // lost every frame that carried it); a member the room does not know is ignored.
        assert!(!r.handle_held_epoch(ServerNanos(20_000 * MS), 1, tempo.epoch));
        assert!(!r.handle_held_epoch(ServerNanos(20_000 * MS), 9, start.epoch));
        assert_eq!(r.poll_timeout(), Some(ServerNanos(21_500 * MS)));
        assert!(r.handle_held_epoch(ServerNanos(20_000 * MS), 2, start.epoch));
        assert_eq!(r.poll_timeout(), Some(ServerNanos(20_000 * MS)));
        let repair = r.poll_transmit(ServerNanos(20_000 * MS)).unwrap();
        assert_eq!(repair.members, vec![2]);
        assert_eq!(repair.frame.timeline.epoch, tempo.epoch);
        // The repair does not move the room's tick or start a burst.
        assert_eq!(r.poll_timeout(), Some(ServerNanos(21_500 * MS)));
        assert!(!r.in_burst(ServerNanos(20_000 * MS)));

        // In a burst the next frame is at most an interval away: a request that crossed the
        // change's first frames owes nothing more.
        assert_eq!(ticks(&mut r, 20_000 * MS, 22_000 * MS), vec![21_500]);
        let meter = r.handle_change(ServerNanos(22_000 * MS), Change::SetMeter(3)).unwrap();
        assert_eq!(r.poll_transmit(ServerNanos(22_000 * MS)).unwrap().members, vec![1, 2]);
        assert!(!r.handle_held_epoch(ServerNanos(22_050 * MS), 2, tempo.epoch));
        assert_eq!(r.poll_timeout(), Some(ServerNanos(22_100 * MS)));
        assert!(meter.epoch > tempo.epoch);
    }

    #[test]
    fn notes_keep_the_burst_pace_and_a_quiet_room_settles() {
        let mut r = room();
        r.join(ServerNanos(0), 1).unwrap();
        r.join(ServerNanos(0), 2).unwrap();
        r.handle_change(ServerNanos(0), Change::Start { count_in_bars: 0 }).unwrap();
        ticks(&mut r, 0, 5_000 * MS);
        assert_eq!(r.poll_timeout(), Some(ServerNanos(5_500 * MS)));
        // A note at 5.05 s and another at 5.8 s: the next frame within 100 ms of the first,
        // then every 100 ms until 1.5 s after the last (7.3 s; the frame at 7.25 s sets the
        // next at 7.35 s), then one a second.
        let note = |seq, at: u64| Note { seq, midi: 60, velocity: 100, instrument: 0, played_at: ServerNanos(at * MS) };
        assert!(r.handle_notes(ServerNanos(5_050 * MS), 1, false, &[note(1, 5_050)]).forward.is_some());
        assert_eq!(r.poll_timeout(), Some(ServerNanos(5_150 * MS)));
        let mut sent = ticks(&mut r, 5_050 * MS, 5_800 * MS);
        assert!(r.handle_notes(ServerNanos(5_800 * MS), 2, false, &[note(1, 5_800)]).forward.is_some());
        sent.extend(ticks(&mut r, 5_800 * MS, 10_000 * MS));
        let fast: Vec<u64> = (0..23).map(|k| 5_150 + 100 * k).collect();
        assert_eq!(sent, [fast, vec![8_350, 9_350]].concat());
        // A refused note (muted) keeps nothing awake.
        assert!(r.handle_notes(ServerNanos(10_000 * MS), 1, true, &[note(2, 10_000)]).forward.is_none());
        assert_eq!(r.poll_timeout(), Some(ServerNanos(10_350 * MS)));
    }

    #[test]
    fn a_handed_over_stage_keeps_its_burst() {
        let mut r = room();
        r.join(ServerNanos(0), 1).unwrap();
        r.handle_change(ServerNanos(0), Change::Start { count_in_bars: 0 }).unwrap();
        let bytes = postcard::to_allocvec(&r).unwrap();
        let mut restored: Stage = postcard::from_bytes(&bytes).unwrap();
        let (sent, expected) = (ticks(&mut restored, 0, 3_000 * MS), ticks(&mut r, 0, 3_000 * MS));
        assert_eq!(sent, expected);
        assert_eq!(sent.len(), 17, "15 in the burst, then 1.5 s and 2.5 s");
    }

    #[test]
    fn no_members_no_timeout() {
        assert_eq!(room().poll_timeout(), None);
    }

    const T: u64 = 10_000 * MS;

    fn note(seq: u32, played_at: u64) -> Note {
        Note { seq, midi: 60, velocity: 100, instrument: 0, played_at: ServerNanos(played_at) }
    }

    /// A room with members 1, 2 and 3 and the given note limits.
    fn note_room(notes_per_second: u32, note_burst: u32) -> Stage {
        let config = Config { notes_per_second, note_burst, ..Config::default() };
        let mut r = Stage::new(config, ServerNanos(0), MicroBpm::from_bpm(120), 4).unwrap();
        for m in 1..=3 {
            r.join(ServerNanos(0), m).unwrap();
        }
        r
    }

    fn seqs(outcome: &NotesOutcome) -> Vec<u32> {
        outcome.forward.as_ref().map(|f| f.notes.iter().map(|n| n.seq).collect()).unwrap_or_default()
    }

    #[test]
    fn notes_are_forwarded_with_the_last_two_still_to_sound_and_copies_ignored() {
        let mut r = note_room(20, 40);
        let n = |seq: u32, ms: u64| note(seq, T + ms * MS);
        let at = |ms: u64| ServerNanos(T + ms * MS + MS);

        let o = r.handle_notes(at(0), 1, false, &[n(1, 0)]);
        assert_eq!(o.forward.as_ref().unwrap().from, 1);
        assert_eq!((seqs(&o), o.accepted, o.duplicates, o.dropped, o.refusal), (vec![1], 1, 0, 0, None));
        // The client repeats note 1; the server ignores its copy and repeats it itself.
        let o = r.handle_notes(at(20), 1, false, &[n(1, 0), n(2, 20)]);
        assert_eq!((seqs(&o), o.accepted, o.duplicates), (vec![1, 2], 1, 1));
        let o = r.handle_notes(at(40), 1, false, &[n(1, 0), n(2, 20), n(3, 40)]);
        assert_eq!((seqs(&o), o.accepted, o.duplicates), (vec![1, 2, 3], 1, 2), "two back, both still to sound");
        // At 91 ms note 2 (sounds at 100 ms) is still to come, note 1 is not remembered.
        let o = r.handle_notes(at(90), 1, false, &[n(2, 20), n(3, 40), n(4, 90)]);
        assert_eq!((seqs(&o), o.accepted, o.duplicates), (vec![2, 3, 4], 1, 2));
        // At 151 ms note 3 has sounded (120 ms): only note 4 (170 ms) is repeated.
        let o = r.handle_notes(at(150), 1, false, &[n(5, 150)]);
        assert_eq!(seqs(&o), vec![4, 5]);
        // Long after, nothing is repeated.
        let o = r.handle_notes(at(1_000), 1, false, &[n(6, 1_000)]);
        assert_eq!(seqs(&o), vec![6]);
        // Only copies: nothing to forward, and no refusal.
        let o = r.handle_notes(at(1_010), 1, false, &[n(5, 150), n(6, 1_000)]);
        assert_eq!((o.forward, o.accepted, o.duplicates, o.dropped, o.refusal), (None, 0, 2, 0, None));
        // Out of order within a datagram: taken in sequence order, both new.
        let o = r.handle_notes(at(1_020), 1, false, &[n(8, 1_020), n(7, 1_015)]);
        assert_eq!((seqs(&o), o.accepted), (vec![6, 7, 8], 2));
        // Each member has its own sequence numbers.
        let o = r.handle_notes(at(1_020), 2, false, &[n(1, 1_020)]);
        assert_eq!((seqs(&o), o.forward.unwrap().from), (vec![1], 2));
    }

    #[test]
    fn the_forwarded_frame_is_capped_at_the_wire_limit() {
        let mut r = note_room(100, 100);
        r.handle_notes(ServerNanos(T), 1, false, &[note(1, T), note(2, T)]);
        let eight: Vec<Note> = (3..=10).map(|s| note(s, T + MS)).collect();
        let o = r.handle_notes(ServerNanos(T + MS), 1, false, &eight);
        assert_eq!((seqs(&o), o.accepted), ((3..=10).collect(), 8), "the newest win");
        let o = r.handle_notes(ServerNanos(T + 2 * MS), 1, false, &[note(11, T + 2 * MS)]);
        assert_eq!(seqs(&o), vec![9, 10, 11]);
    }

    /// Sends `bad` from member 1 to one of two identical rooms, then the same good datagrams
    /// to both: the outcomes must match (no tokens taken, no sequence number advanced).
    fn refused_changes_nothing(bad: &[Note], expected: NoteRefusal) {
        let (mut a, mut b) = (note_room(1, 3), note_room(1, 3));
        let o = a.handle_notes(ServerNanos(T), 1, false, bad);
        assert_eq!(o.refusal, Some(expected), "{bad:?}");
        assert_eq!((o.forward, o.accepted, o.duplicates, o.dropped), (None, 0, 0, bad.len() as u32));
        let good: Vec<Note> = (1..=4).map(|s| note(s, T)).collect();
        for (now, notes) in [(T, &good[..]), (T + 1_000 * MS, &[note(5, T + 1_000 * MS)][..])] {
            let (oa, ob) =
                (a.handle_notes(ServerNanos(now), 1, false, notes), b.handle_notes(ServerNanos(now), 1, false, notes));
            assert_eq!(oa, ob, "{bad:?}");
        }
        // And what that was: the burst of 3, the fourth rate-limited, one more a second later.
        let o = b.handle_notes(ServerNanos(T + 1_000 * MS), 1, false, &[note(6, T + 1_000 * MS)]);
        assert_eq!(o.refusal, Some(NoteRefusal::RateLimited));
    }

    #[test]
    fn out_of_range_datagrams_are_refused_whole_and_change_nothing() {
        let past = Config::default().note_past_window_nanos;
        let future = Config::default().note_future_window_nanos;
        let good = note(1, T);
        let bad = [
            Note { midi: 128, ..note(2, T) },
            Note { velocity: 0, ..note(2, T) },
            Note { velocity: 128, ..note(2, T) },
            Note { instrument: 128, ..note(2, T) },
            note(0, T),
            note(2, T - past - 1),
            note(2, T + future + 1),
        ];
        for b in bad {
            refused_changes_nothing(&[good, b], NoteRefusal::OutOfRange);
        }
        // More notes than a datagram can carry.
        let nine: Vec<Note> = (1..=9).map(|s| note(s, T)).collect();
        refused_changes_nothing(&nine, NoteRefusal::OutOfRange);
        // The window's edges are in range.
        let mut r = note_room(20, 40);
        let o = r.handle_notes(ServerNanos(T), 1, false, &[note(1, T - past), note(2, T + future)]);
        assert_eq!((o.accepted, o.refusal), (2, None));
    }

    #[test]
    fn strangers_are_refused() {
        let mut r = note_room(20, 40);
        let o = r.handle_notes(ServerNanos(T), 99, false, &[note(1, T), note(2, T)]);
        assert_eq!((o.forward, o.dropped, o.refusal), (None, 2, Some(NoteRefusal::NotMember)));
        assert_eq!(RoomError::NotMember.code(), ErrorCode::MemberNotFound);
        assert_eq!(NoteRefusal::NotMember.code(), ErrorCode::MemberNotFound);
        assert_eq!(NoteRefusal::Muted.code(), ErrorCode::Forbidden);
        assert_eq!(NoteRefusal::OutOfRange.code(), ErrorCode::NoteOutOfRange);
        assert_eq!(NoteRefusal::RateLimited.code(), ErrorCode::RateLimited);
    }

    #[test]
    fn muted_notes_are_dropped_take_no_tokens_and_are_never_replayed() {
        let mut r = note_room(1, 2);
        let five: Vec<Note> = (1..=5).map(|s| note(s, T)).collect();
        let o = r.handle_notes(ServerNanos(T), 1, true, &five);
        assert_eq!((o.forward, o.accepted, o.dropped, o.refusal), (None, 0, 5, Some(NoteRefusal::Muted)));
        // Unmuted: copies of the muted notes are copies; the new ones use the untouched burst of 2.
        let o =
            r.handle_notes(ServerNanos(T + MS), 1, false, &[note(4, T), note(5, T), note(6, T + MS), note(7, T + MS)]);
        assert_eq!((seqs(&o), o.accepted, o.duplicates, o.refusal), (vec![6, 7], 2, 2, None));
        // Other members are unaffected by one member's mute.
        assert_eq!(r.handle_notes(ServerNanos(T + MS), 2, false, &[note(1, T)]).accepted, 1);
    }

    #[test]
    fn a_flood_is_rate_limited_and_the_dropped_notes_stay_dropped() {
        let mut r = note_room(1, 3);
        let eight: Vec<Note> = (1..=8).map(|s| note(s, T)).collect();
        let o = r.handle_notes(ServerNanos(T), 1, false, &eight);
        assert_eq!((seqs(&o), o.accepted, o.dropped, o.refusal), (vec![1, 2, 3], 3, 5, Some(NoteRefusal::RateLimited)));
        // A second later one token: a copy of a dropped note is a copy, a new note takes it.
        let later = T + 1_000 * MS;
        let o = r.handle_notes(ServerNanos(later), 1, false, &[note(8, T), note(9, later), note(10, later)]);
        assert_eq!((seqs(&o), o.accepted, o.duplicates, o.dropped), (vec![9], 1, 1, 1));
    }

    #[test]
    fn leaving_clears_the_member_s_note_state() {
        let mut r = note_room(1, 2);
        r.handle_notes(ServerNanos(T), 1, false, &[note(1, T), note(2, T), note(3, T)]);
        assert!(r.leave(1));
        assert!(!r.contains(1));
        r.join(ServerNanos(T), 1).unwrap();
        // A new session numbers from 1 again, with a full bucket and nothing to repeat.
        let o = r.handle_notes(ServerNanos(T), 1, false, &[note(1, T), note(2, T)]);
        assert_eq!((seqs(&o), o.accepted, o.refusal), (vec![1, 2], 2, None));
    }
}
