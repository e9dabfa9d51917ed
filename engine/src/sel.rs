//! Participation measured on the shared timeline: how far each note landed from the beat.
//!
//! The server records participation itself, from the notes it accepts; nothing here trusts a
//! client's opinion of how well it played. Because every client stamps a note with its
//! estimate of *server* time (synced to well under a millisecond), the distance between a
//! note's `played_at` and the nearest beat of the room's timeline is a real measure of
//! keeping time with the class, which no arrival-time system can give.
//!
//! - [`measure`] places one note on the timeline: its signed offset from the nearest sounding
//!   beat, whether that is on the beat (within [`ON_BEAT_NANOS`]), and, for a student with
//!   assigned beats, whether it is one of theirs (their turn) and which bar-beat it took.
//! - [`Tally`] adds notes up; it is what the server keeps per student in memory, flushes to
//!   the database in batches, and sums in summaries. [`Tally::collaboration_score`] is the
//!   formula the README documents.

use crate::timeline::Timeline;
use downbeat_protocol::ServerNanos;

/// A note within this distance of a beat counts as on the beat (60 ms: about a
/// thirty-second note at 120 BPM, generous for children, strict enough to mean something).
pub const ON_BEAT_NANOS: u64 = 60_000_000;

/// Where one note landed on the shared timeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    /// The nearest sounding beat's index.
    pub beat: i64,
    /// `played_at` minus that beat's instant (negative: early).
    pub offset_nanos: i64,
    /// Within [`ON_BEAT_NANOS`] of the beat.
    pub on_beat: bool,
    /// The player had assigned beats when the note was played.
    pub assigned: bool,
    /// The nearest beat is one of the player's assigned positions in the bar, and the note
    /// is on it.
    pub in_part: bool,
}

/// Places a note played at `played_at` by someone whose assigned bar positions are
/// `assigned` (empty: no assignment). `None` if no beat sounds near that instant (the
/// timeline is stopped there, or the note is from before the timeline's memory).
pub fn measure(timeline: &Timeline, played_at: ServerNanos, assigned: &[u8]) -> Option<Placement> {
    // The nearest beat is the last one at or before the note or the next one after it.
    let before = timeline.beat_at(played_at);
    let after = before.map_or_else(
        || {
            // Before the first sounding beat of a run (e.g. during a stop, just before a
            // start): the first beat sounding after the note, if the timeline knows it.
            let s = timeline.segments().iter().find(|s| s.start > played_at && s.running)?;
            Some(s.beat_ceil_at(played_at.max(s.start)))
        },
        |b| Some(b.saturating_add(1)),
    );
    let candidates = [before, after];
    let (beat, at) = candidates
        .iter()
        .flatten()
        .filter_map(|&b| timeline.time_of(b).map(|t| (b, t)))
        .min_by_key(|&(_, t)| t.0.abs_diff(played_at.0))?;
    let offset_nanos = if played_at >= at {
        i64::try_from(played_at.0 - at.0).unwrap_or(i64::MAX)
    } else {
        -i64::try_from(at.0 - played_at.0).unwrap_or(i64::MAX)
    };
    let on_beat = offset_nanos.unsigned_abs() <= ON_BEAT_NANOS;
    let assigned_now = !assigned.is_empty();
    let in_part = on_beat && assigned_now && timeline.beat_in_bar(beat).is_some_and(|pos| assigned.contains(&pos));
    Some(Placement { beat, offset_nanos, on_beat, assigned: assigned_now, in_part })
}

/// Participation counters: what the server adds up per student and stores.
///
/// All counts are of notes the room accepted (muted or rate-limited notes are not played, so
/// they do not count). Sums of two tallies are tallies ([`Tally::add`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Tally {
    /// Notes played.
    pub notes: u64,
    /// Notes played while beats were sounding (the ones with an offset).
    pub timed: u64,
    /// Timed notes within [`ON_BEAT_NANOS`] of the nearest beat.
    pub on_beat: u64,
    /// Sum of |offset| of timed notes, in microseconds.
    pub offset_abs_sum_micros: u64,
    /// Sum of the signed offsets of timed notes, in microseconds (negative: early), so the
    /// mean says whether a player tends to rush or drag. Each note's offset is truncated to
    /// whole microseconds toward zero, as for [`Self::offset_abs_sum_micros`].
    #[serde(default)]
    pub offset_sum_micros: i64,
    /// Timed notes played while the student had assigned beats.
    pub assigned: u64,
    /// Assigned notes on one of the student's own beats (playing in their part).
    pub in_part: u64,
    /// Turns taken: distinct assigned beats on which the student played in their part.
    pub turns: u64,
}

impl Tally {
    /// Counts one note; `placement` from [`measure`] (`None`: no beat was sounding).
    /// `new_turn` says this note is the first in part on its beat (the caller remembers the
    /// last beat counted, see [`TurnTracker`]).
    pub fn count(&mut self, placement: Option<Placement>, new_turn: bool) {
        self.notes += 1;
        let Some(p) = placement else { return };
        self.timed += 1;
        self.offset_abs_sum_micros += p.offset_nanos.unsigned_abs() / 1000;
        self.offset_sum_micros = self.offset_sum_micros.saturating_add(p.offset_nanos / 1000);
        if p.on_beat {
            self.on_beat += 1;
        }
        if p.assigned {
            self.assigned += 1;
        }
        if p.in_part {
            self.in_part += 1;
            if new_turn {
                self.turns += 1;
            }
        }
    }

    /// Adds `other` into `self`.
    pub fn add(&mut self, other: &Self) {
        self.notes += other.notes;
        self.timed += other.timed;
        self.on_beat += other.on_beat;
        self.offset_abs_sum_micros += other.offset_abs_sum_micros;
        self.offset_sum_micros = self.offset_sum_micros.saturating_add(other.offset_sum_micros);
        self.assigned += other.assigned;
        self.in_part += other.in_part;
        self.turns += other.turns;
    }

    /// Whether nothing was counted.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Mean distance from the beat of timed notes, in microseconds.
    pub fn mean_offset_micros(&self) -> Option<u64> {
        (self.timed > 0).then(|| self.offset_abs_sum_micros / self.timed)
    }

    /// Mean signed offset from the beat of timed notes, in microseconds: negative when the
    /// player tends to be early, positive when late.
    pub fn mean_signed_offset_micros(&self) -> Option<i64> {
        let timed = i64::try_from(self.timed).ok().filter(|&t| t > 0)?;
        Some(self.offset_sum_micros / timed)
    }

    /// The share of timed notes on the beat, 0 to 1.
    pub fn on_beat_ratio(&self) -> Option<f64> {
        ratio(self.on_beat, self.timed)
    }

    /// The collaboration score, 0 to 100 (`None` until a note was played with beats
    /// sounding):
    ///
    /// - `in_time` = on-beat notes / timed notes (playing with the group's pulse);
    /// - `in_turn` = in-part notes / assigned notes (playing one's own part and leaving the
    ///   others' beats to them), or `in_time` for a student who had no assigned beats;
    /// - score = round(100 × (in_time + in_turn) / 2).
    pub fn collaboration_score(&self) -> Option<u8> {
        let in_time = self.on_beat_ratio()?;
        let in_turn = ratio(self.in_part, self.assigned).unwrap_or(in_time);
        // In 0..=100 by construction.
        Some(((in_time + in_turn) * 50.0).round().clamp(0.0, 100.0) as u8)
    }
}

fn ratio(part: u64, whole: u64) -> Option<f64> {
    (whole > 0).then(|| part as f64 / whole as f64)
}

/// Remembers the last beat a student took a turn on, so several notes on one beat are one
/// turn.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TurnTracker {
    last: Option<i64>,
}

impl TurnTracker {
    /// Whether a note placed at `placement` starts a new turn (and remembers it).
    pub fn new_turn(&mut self, placement: Option<Placement>) -> bool {
        match placement {
            Some(p) if p.in_part && self.last != Some(p.beat) => {
                self.last = Some(p.beat);
                true
            }
            _ => false,
        }
    }
}

/// Measures and counts one note: [`measure`], then [`Tally::count`] with the turn tracker.
pub fn count_note(
    tally: &mut Tally,
    turns: &mut TurnTracker,
    timeline: &Timeline,
    played_at: ServerNanos,
    assigned: &[u8],
) -> Option<Placement> {
    let placement = measure(timeline, played_at, assigned);
    let new_turn = turns.new_turn(placement);
    tally.count(placement, new_turn);
    placement
}

#[cfg(test)]
mod tests {
    use super::*;
    use downbeat_protocol::{Change, MicroBpm};

    const MS: u64 = 1_000_000;

    /// 120 BPM in 4/4 started so that beat 0 sounds at exactly 10 s (500 ms per beat).
    fn running() -> (Timeline, ServerNanos) {
        let mut t = Timeline::new(ServerNanos(0), MicroBpm::from_bpm(120), 4).expect("timeline");
        let applied = t.apply(ServerNanos(0), Change::Start { count_in_bars: 0 }, 1_000 * MS).expect("start");
        (t, applied.effective_at)
    }

    #[test]
    fn offsets_are_signed_distances_to_the_nearest_beat() {
        let (t, zero) = running();
        let b0 = t.beat_at(zero).expect("sounding");
        let p = measure(&t, zero.add_nanos(20 * MS), &[]).expect("placed");
        assert_eq!((p.beat, p.offset_nanos, p.on_beat), (b0, 20 * MS as i64, true));
        // 480 ms after beat 0 is 20 ms before beat 1.
        let p = measure(&t, zero.add_nanos(480 * MS), &[]).expect("placed");
        assert_eq!((p.beat, p.offset_nanos, p.on_beat), (b0 + 1, -(20 * MS as i64), true));
        // Half way between beats is off the beat.
        let p = measure(&t, zero.add_nanos(250 * MS), &[]).expect("placed");
        assert!(!p.on_beat);
        assert_eq!(p.offset_nanos.unsigned_abs(), 250 * MS);
        // Just inside and just outside the window.
        assert!(measure(&t, zero.add_nanos(ON_BEAT_NANOS), &[]).expect("placed").on_beat);
        assert!(!measure(&t, zero.add_nanos(ON_BEAT_NANOS + 1), &[]).expect("placed").on_beat);
    }

    #[test]
    fn a_note_just_before_the_first_beat_is_early_for_it() {
        let (t, zero) = running();
        let p = measure(&t, ServerNanos(zero.0 - 10 * MS), &[]).expect("placed");
        assert_eq!(p.offset_nanos, -(10 * MS as i64));
        assert!(p.on_beat);
        // Long before the start nothing sounds near, but the next beat is still the nearest.
        let p = measure(&t, ServerNanos(zero.0 - 400 * MS), &[]).expect("placed");
        assert!(!p.on_beat);
    }

    #[test]
    fn a_stopped_timeline_places_nothing() {
        let t = Timeline::new(ServerNanos(0), MicroBpm::from_bpm(120), 4).expect("timeline");
        assert_eq!(measure(&t, ServerNanos(5_000 * MS), &[]), None);
    }

    #[test]
    fn assigned_beats_decide_the_part_and_turns() {
        let (t, zero) = running();
        let first_beat = t.beat_at(zero).expect("sounding");
        let downbeat_pos = t.beat_in_bar(first_beat).expect("pos");
        let mine = [downbeat_pos];
        let mut tally = Tally::default();
        let mut turns = TurnTracker::default();
        // Two notes on my beat (one turn), one on the next beat (not mine), one far off.
        for at in [zero.add_nanos(5 * MS), zero.add_nanos(30 * MS), zero.add_nanos(505 * MS), zero.add_nanos(750 * MS)]
        {
            count_note(&mut tally, &mut turns, &t, at, &mine);
        }
        // A bar later, my beat again: a second turn.
        count_note(&mut tally, &mut turns, &t, zero.add_nanos(2_000 * MS), &mine);
        assert_eq!(
            tally,
            Tally {
                notes: 5,
                timed: 5,
                on_beat: 4,
                offset_abs_sum_micros: 5_000 + 30_000 + 5_000 + 250_000,
                offset_sum_micros: 5_000 + 30_000 + 5_000 + 250_000,
                assigned: 5,
                in_part: 3,
                turns: 2,
            }
        );
        // in_time 4/5, in_turn 3/5: 70.
        assert_eq!(tally.collaboration_score(), Some(70));
    }

    #[test]
    fn score_without_an_assignment_is_time_keeping() {
        let mut tally = Tally { notes: 4, timed: 4, on_beat: 3, ..Tally::default() };
        assert_eq!(tally.collaboration_score(), Some(75));
        tally.add(&Tally { notes: 2, ..Tally::default() });
        assert_eq!(tally.notes, 6);
        assert_eq!(Tally { notes: 3, ..Tally::default() }.collaboration_score(), None);
    }

    #[test]
    fn the_signed_mean_says_early_or_late() {
        let (t, zero) = running();
        let mut tally = Tally::default();
        let mut turns = TurnTracker::default();
        // 30 ms early, 10 ms late, 20 ms early: on average 40 / 3 ms early.
        for at in [ServerNanos(zero.0 - 30 * MS), zero.add_nanos(510 * MS), zero.add_nanos(980 * MS)] {
            count_note(&mut tally, &mut turns, &t, at, &[]);
        }
        assert_eq!((tally.offset_sum_micros, tally.offset_abs_sum_micros), (-40_000, 60_000));
        assert_eq!(tally.mean_signed_offset_micros(), Some(-13_333));
        assert_eq!(tally.mean_offset_micros(), Some(20_000));
        // Sub-microsecond remainders are truncated toward zero, as for the distance.
        let mut tally = Tally::default();
        count_note(&mut tally, &mut turns, &t, ServerNanos(zero.0 - 1_999), &[]);
        assert_eq!((tally.offset_sum_micros, tally.offset_abs_sum_micros), (-1, 1));
        assert_eq!(Tally::default().mean_signed_offset_micros(), None);
    }
}
