//! The server's per-room state machine: members, timeline changes, and paced beat frames.
//!
//! For every member the room keeps its own send schedule: a frame every
//! [`Config::send_interval_nanos`] while beats sound (or a change is pending), every
//! [`Config::idle_send_interval_nanos`] while stopped. Each frame carries the whole timeline
//! plus the beats of the next [`Config::lead_nanos`], so a lost, duplicated or reordered frame
//! costs nothing: any later one says everything. Members are scheduled independently, so a
//! slow member never delays another; the I/O layer only ever hands frames to a non-blocking
//! send.

use std::collections::BTreeMap;

use downbeat_protocol::{BeatFrame, BoundedVec, Change, ErrorCode, MAX_BEATS_PER_FRAME, MicroBpm, ServerNanos};

use crate::timeline::{Applied, Timeline, TimelineError};

/// Room settings; the server passes them explicitly.
#[derive(Clone, Debug)]
pub struct Config {
    /// How far ahead beats are sent, and the least notice a change is given.
    pub lead_nanos: u64,
    /// Frame interval per member while beats sound or a change is pending.
    pub send_interval_nanos: u64,
    /// Frame interval per member while stopped with nothing pending.
    pub idle_send_interval_nanos: u64,
    /// Most beats per frame (capped at the wire limit).
    pub beats_per_frame: usize,
    /// Most members.
    pub max_members: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            lead_nanos: 1_500_000_000,
            send_interval_nanos: 100_000_000,
            idle_send_interval_nanos: 1_000_000_000,
            beats_per_frame: 8,
            max_members: 64,
        }
    }
}

/// A member could not join.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RoomError {
    /// No free seat.
    #[error("the room is full")]
    Full,
    /// Already a member.
    #[error("already a member")]
    AlreadyMember,
}

impl RoomError {
    /// The stable code.
    pub const fn code(&self) -> ErrorCode {
        match self {
            Self::Full => ErrorCode::RoomFull,
            Self::AlreadyMember => ErrorCode::UnexpectedMessage,
        }
    }
}

/// A frame to send to one member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// Who to send it to.
    pub member: u64,
    /// What to send.
    pub frame: BeatFrame,
}

#[derive(Clone, Copy, Debug)]
struct MemberState {
    next_send: ServerNanos,
    seq: u64,
}

/// One room.
#[derive(Debug)]
pub struct Room {
    config: Config,
    timeline: Timeline,
    members: BTreeMap<u64, MemberState>,
}

impl Room {
    /// A stopped room.
    pub fn new(config: Config, now: ServerNanos, tempo: MicroBpm, beats_per_bar: u8) -> Result<Self, TimelineError> {
        Ok(Self { config, timeline: Timeline::new(now, tempo, beats_per_bar)?, members: BTreeMap::new() })
    }

    /// The room's settings.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Adds a member; its first frame goes out at once.
    pub fn join(&mut self, now: ServerNanos, member: u64) -> Result<(), RoomError> {
        if self.members.contains_key(&member) {
            return Err(RoomError::AlreadyMember);
        }
        if self.members.len() >= self.config.max_members {
            return Err(RoomError::Full);
        }
        self.members.insert(member, MemberState { next_send: now, seq: 0 });
        Ok(())
    }

    /// Removes a member; false if it was not one.
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

    /// The timeline.
    pub fn timeline(&self) -> &Timeline {
        &self.timeline
    }

    /// Applies a timeline change; every member gets a frame carrying it right away.
    pub fn handle_change(&mut self, now: ServerNanos, change: Change) -> Result<Applied, TimelineError> {
        let applied = self.timeline.apply(now, change, self.config.lead_nanos)?;
        for m in self.members.values_mut() {
            m.next_send = m.next_send.min(now);
        }
        Ok(applied)
    }

    fn interval_at(&self, now: ServerNanos) -> u64 {
        let busy = self.timeline.is_running_at(now) || self.timeline.segments().iter().any(|s| s.start > now);
        if busy { self.config.send_interval_nanos } else { self.config.idle_send_interval_nanos }.max(1)
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

    /// The next frame due at or before `now`, if any. Call until `None`.
    pub fn poll_transmit(&mut self, now: ServerNanos) -> Option<Transmit> {
        let (&member, _) = self.members.iter().filter(|(_, m)| m.next_send <= now).min_by_key(|(_, m)| m.next_send)?;
        let interval = self.interval_at(now);
        self.timeline.prune(now);
        let mut frame = self.frame_at(now);
        let state = self.members.get_mut(&member)?;
        state.seq += 1;
        frame.seq = state.seq;
        // Keep the member's cadence (no drift from late polling) but never fall behind now.
        state.next_send =
            ServerNanos(state.next_send.0.saturating_add(interval)).max(now.add_nanos(1)).min(now.add_nanos(interval));
        Some(Transmit { member, frame })
    }

    /// When [`Room::poll_transmit`] next has something; `None` with no members.
    pub fn poll_timeout(&self) -> Option<ServerNanos> {
        self.members.values().map(|m| m.next_send).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn room() -> Room {
        Room::new(Config { max_members: 3, ..Config::default() }, ServerNanos(0), MicroBpm::from_bpm(120), 4).unwrap()
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
    fn frames_are_paced_per_member_and_carry_the_next_beats() {
        let mut r = room();
        r.join(ServerNanos(0), 1).unwrap();
        r.join(ServerNanos(30 * MS), 2).unwrap();
        r.handle_change(ServerNanos(30 * MS), Change::Start).unwrap();
        let mut sent: Vec<(u64, u64, u64)> = Vec::new();
        let mut now = ServerNanos(30 * MS);
        while now.0 < 1_000 * MS {
            while let Some(t) = r.poll_transmit(now) {
                sent.push((now.0 / MS, t.member, t.frame.seq));
                assert!(t.frame.beats.len() <= 8);
                for b in t.frame.beats.iter() {
                    assert!(b.at >= now && b.at.0 < now.0 + 1_500 * MS);
                }
            }
            now = r.poll_timeout().unwrap();
        }
        let per_member = |m| sent.iter().filter(|s| s.1 == m).count();
        // 30 ms .. 1000 ms at one frame per 100 ms: 10 frames each.
        assert_eq!(per_member(1), 10);
        assert_eq!(per_member(2), 10);
        let seqs: Vec<_> = sent.iter().filter(|s| s.1 == 2).map(|s| s.2).collect();
        assert_eq!(seqs, (1..=10).collect::<Vec<_>>());
    }

    #[test]
    fn stopped_rooms_send_slowly_and_changes_go_out_at_once() {
        let mut r = room();
        r.join(ServerNanos(0), 1).unwrap();
        assert!(r.poll_transmit(ServerNanos(0)).is_some());
        assert_eq!(r.poll_timeout(), Some(ServerNanos(1_000 * MS)));
        r.handle_change(ServerNanos(10 * MS), Change::Start).unwrap();
        assert_eq!(r.poll_timeout(), Some(ServerNanos(10 * MS)));
        let t = r.poll_transmit(ServerNanos(10 * MS)).unwrap();
        assert_eq!(t.frame.timeline.epoch, 2);
        assert_eq!(r.poll_timeout(), Some(ServerNanos(110 * MS)));
    }

    #[test]
    fn no_members_no_timeout() {
        assert_eq!(room().poll_timeout(), None);
    }
}
