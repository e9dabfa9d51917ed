//! Playing a recorded take back into the room, in sync: its notes are placed in beats from a
//! bar boundary of the shared timeline and go out on the note path like a classmate's notes,
//! so every member sounds each at one instant and clients need nothing new.
//!
//! - **Beats, not times.** A note is `tick` ticks ([`crate::take::TICKS_PER_BEAT`] a beat)
//!   after the start beat; its instant is computed from the timeline only when the note is
//!   sent, so a tempo change announced during the playback moves the notes not yet sent, like
//!   the beat.
//! - **Sent ahead, twice.** A note goes out once when it is within one lead of sounding and
//!   again within half a lead, in frames from [`PLAYBACK_FROM`] (member ids start at 1) with
//!   one generation per playback; receivers ignore the copy. `played_at` is its instant less
//!   the playout delay, as a live note would carry.
//! - **Stops on a bar.** A stop lands on the next bar boundary at least one lead away: nothing
//!   at or after it was sent yet, so it stops for everyone at once. A beat that stops ends the
//!   playback where it stops.

use downbeat_protocol::{BoundedVec, MAX_NOTES_PER_DATAGRAM, Note, NoteFrame, PlaybackInfo, ServerNanos};
use serde::{Deserialize, Serialize};

use crate::take::TICKS_PER_BEAT;
use crate::timeline::Timeline;

/// The member id a playback's notes come from: no member has it.
pub const PLAYBACK_FROM: u64 = 0;
/// Notes one playback holds at most (a take holds at most [`super::MAX_TAKE_NOTES`]).
pub const MAX_PLAYBACK_NOTES: usize = super::MAX_TAKE_NOTES as usize;

/// A recorded note to play back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlaybackNote {
    /// Where it sounds: ticks after the playback's start beat.
    pub tick: u64,
    /// MIDI note number.
    pub midi: u8,
    /// MIDI velocity.
    pub velocity: u8,
    /// General MIDI program.
    pub instrument: u8,
}

/// A playback running in the room.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Playback {
    pub(crate) info: PlaybackInfo,
    generation: u32,
    /// In tick order.
    notes: Vec<PlaybackNote>,
    /// Notes before this index were sent once; before `sent_twice`, twice.
    sent_once: usize,
    sent_twice: usize,
    /// The beat it stops on, once asked.
    stop_beat: Option<i64>,
}

impl Playback {
    /// Playback number `generation` of `take`, starting on `start_beat` at `starts_at`.
    pub(crate) fn new(
        take: u32,
        generation: u32,
        start_beat: i64,
        starts_at: ServerNanos,
        mut notes: Vec<PlaybackNote>,
    ) -> Self {
        notes.sort_by_key(|n| n.tick);
        notes.truncate(MAX_PLAYBACK_NOTES);
        Self {
            info: PlaybackInfo { take, starts_at, start_beat, stops_at: None },
            generation,
            notes,
            sent_once: 0,
            sent_twice: 0,
            stop_beat: None,
        }
    }

    /// Stops on `beat` (at `at`): notes there or later are never sent.
    pub(crate) fn stop_at(&mut self, beat: i64, at: ServerNanos) {
        self.stop_beat = Some(beat);
        self.info.stops_at = Some(at);
        let end = self.notes.partition_point(|n| self.beat_of(n).0 < beat);
        self.notes.truncate(end.max(self.sent_once));
    }

    /// Whether a stop was asked.
    pub(crate) fn stopping(&self) -> bool {
        self.stop_beat.is_some()
    }

    /// The whole beat a note falls in, and the ticks into it.
    fn beat_of(&self, n: &PlaybackNote) -> (i64, u64) {
        let per = u64::from(TICKS_PER_BEAT);
        let whole = i64::try_from(n.tick / per).unwrap_or(i64::MAX);
        (self.info.start_beat.saturating_add(whole), n.tick % per)
    }

    /// When note `i` sounds on `timeline`; `None` if its beat does not sound (stopped).
    fn instant(&self, timeline: &Timeline, i: usize) -> Option<ServerNanos> {
        let (beat, part) = self.beat_of(&self.notes[i]);
        timeline.time_of_fraction(beat, part, u64::from(TICKS_PER_BEAT))
    }

    /// When the next note is due to be sent.
    pub(crate) fn next_send(&self, timeline: &Timeline, lead_nanos: u64) -> Option<ServerNanos> {
        let due = |i: usize, ahead: u64| -> Option<ServerNanos> {
            let at = self.instant(timeline, i)?;
            Some(ServerNanos(at.0.saturating_sub(ahead)))
        };
        let first = (self.sent_once < self.notes.len()).then(|| due(self.sent_once, lead_nanos));
        let second = (self.sent_twice < self.sent_once).then(|| due(self.sent_twice, lead_nanos / 2));
        // A note whose beat no longer sounds is due now (it ends the playback).
        [first, second].into_iter().flatten().map(|d| d.unwrap_or(ServerNanos(0))).min()
    }

    /// The frames due at `now`, and whether the playback is over (everything sent twice and
    /// sounded, or the beat stopped under it).
    pub(crate) fn poll(
        &mut self,
        now: ServerNanos,
        timeline: &Timeline,
        lead_nanos: u64,
        playout_delay_nanos: u64,
    ) -> (Vec<NoteFrame>, bool) {
        let mut notes = Vec::new();
        let mut silenced = false;
        for (cursor, ahead) in [(0, lead_nanos / 2), (1, lead_nanos)] {
            loop {
                let i = if cursor == 0 { self.sent_twice } else { self.sent_once };
                let limit = if cursor == 0 { self.sent_once } else { self.notes.len() };
                if i >= limit {
                    break;
                }
                let Some(at) = self.instant(timeline, i) else {
                    silenced = true;
                    break;
                };
                if at.0.saturating_sub(ahead) > now.0 {
                    break;
                }
                let n = self.notes[i];
                let seq = u32::try_from(i + 1).unwrap_or(u32::MAX);
                let played_at = ServerNanos(at.0.saturating_sub(playout_delay_nanos));
                notes.push(Note { seq, midi: n.midi, velocity: n.velocity, instrument: n.instrument, played_at });
                if cursor == 0 {
                    self.sent_twice += 1;
                } else {
                    self.sent_once += 1;
                }
            }
        }
        if silenced {
            // The beat stopped under the playback: what was not sent never will be.
            self.notes.truncate(self.sent_once);
            self.sent_twice = self.sent_once;
        }
        let frames = notes
            .chunks(MAX_NOTES_PER_DATAGRAM)
            .map(|chunk| NoteFrame {
                from: PLAYBACK_FROM,
                generation: self.generation,
                // Cannot fail: at most the wire cap.
                notes: BoundedVec::try_from_vec(chunk.to_vec()).unwrap_or_default(),
            })
            .collect();
        let last_sounded = match self.notes.len().checked_sub(1) {
            None => true,
            Some(last) => self.instant(timeline, last).is_none_or(|at| at <= now),
        };
        let over = self.sent_twice >= self.notes.len() && last_sounded;
        (frames, over)
    }
}
