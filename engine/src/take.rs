//! A recorded take read back: the timelines it ran on as one history, and where each of its
//! instants falls in ticks (a fixed number per beat), for a MIDI file.
//!
//! **Ticks count beats.** While the beat runs, tick `t` is `(beat position - origin) * ppq`
//! exactly, so a note's tick is where the shared timeline puts it, tempo changes included;
//! the origin is the downbeat at or before the take's start. Where the beat was stopped, ticks
//! go on at the stopped segment's tempo (real time), and the next start is moved on to the
//! next bar line of the meter before it, so bars stay whole: a stretch without a beat gets up
//! to one bar longer than it was. Every segment start is a tempo change in the map; every
//! start of a running segment also a meter (time signature) change.

use downbeat_protocol::MicroBpm;

use crate::room::TakeSegment;
use crate::timeline::NANOS_PER_BEAT_AT_ONE_MICRO_BPM;

/// Ticks per beat a MIDI file of a take uses.
pub const TICKS_PER_BEAT: u16 = 480;

/// The history of a take's timeline: from the segment in force at its start, each segment
/// until the next begins, up to its end.
///
/// Built from the timelines the take stored (one per epoch): a later epoch replaces every
/// segment of the earlier ones from its first segment's start on (that one is the segment in
/// force when it was made; what follows it is what it announced).
pub fn history(timelines: &[(u64, Vec<TakeSegment>)], length_nanos: u64) -> Vec<TakeSegment> {
    let mut ordered: Vec<&(u64, Vec<TakeSegment>)> = timelines.iter().collect();
    ordered.sort_by_key(|(epoch, _)| *epoch);
    let mut history: Vec<TakeSegment> = Vec::new();
    for (_, segments) in ordered {
        let Some(first) = segments.first() else { continue };
        history.retain(|s| s.offset_nanos < first.offset_nanos);
        history.extend(segments.iter().copied());
    }
    let end = i64::try_from(length_nanos).unwrap_or(i64::MAX);
    // Segments after the end never sounded in the take; of those before its start only the
    // last (in force at the start) matters.
    history.retain(|s| s.offset_nanos <= end);
    if let Some(first_kept) = history.iter().rposition(|s| s.offset_nanos <= 0) {
        history.drain(..first_kept);
    }
    history
}

/// One stretch of ticks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    /// Where it starts, in nanoseconds from the take's start (the first may be before it).
    pub offset_nanos: i64,
    /// Its first tick.
    pub tick: u64,
    /// Its tempo.
    pub tempo: MicroBpm,
    /// Its beats per bar.
    pub beats_per_bar: u8,
    /// Whether the beat runs (a meter change is written at its start).
    pub running: bool,
}

/// Ticks for a take's instants. See the module docs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TickMap {
    ppq: u16,
    pieces: Vec<Piece>,
}

/// `nanos` at `tempo` as ticks of `ppq` per beat, rounded to the nearest.
fn ticks_in(nanos: i128, tempo: MicroBpm, ppq: u16) -> i128 {
    let scaled = nanos * i128::from(tempo.0.max(1)) * i128::from(ppq);
    let half = NANOS_PER_BEAT_AT_ONE_MICRO_BPM / 2;
    if scaled >= 0 {
        (scaled + half) / NANOS_PER_BEAT_AT_ONE_MICRO_BPM
    } else {
        -((-scaled + half) / NANOS_PER_BEAT_AT_ONE_MICRO_BPM)
    }
}

fn tick_u64(t: i128) -> u64 {
    t.clamp(0, i128::from(u64::MAX)) as u64
}

impl TickMap {
    /// The map of `history` ([`history`]) at `ppq` ticks per beat. An empty history (a take
    /// that stored no timeline) counts real time at 120 BPM in 4/4.
    pub fn new(history: &[TakeSegment], ppq: u16) -> Self {
        let ppq = ppq.max(1);
        let fallback = TakeSegment {
            offset_nanos: 0,
            start_beat: 0,
            tempo: MicroBpm::from_bpm(120),
            beats_per_bar: 4,
            running: false,
            count_in_bars: 0,
        };
        let history = if history.is_empty() { std::slice::from_ref(&fallback) } else { history };
        let first = history[0];
        // The origin: the downbeat at or before the take's start when the beat runs there.
        let origin = if first.running && first.offset_nanos < 0 {
            let bar_ticks = i128::from(first.beats_per_bar.max(1)) * i128::from(ppq);
            let into = ticks_in(-i128::from(first.offset_nanos), first.tempo, ppq);
            // Whole bars of the first segment before the take's start.
            let bars = into / bar_ticks;
            first.offset_nanos + nanos_of(bars * bar_ticks, first.tempo, ppq)
        } else {
            first.offset_nanos.max(0)
        };
        let mut pieces = vec![Piece {
            offset_nanos: origin,
            tick: 0,
            tempo: first.tempo,
            beats_per_bar: first.beats_per_bar,
            running: first.running,
        }];
        // The bar grid: where the last meter was written, and its bar length.
        let mut grid = (0_i128, i128::from(first.beats_per_bar.max(1)) * i128::from(ppq));
        for pair in history.windows(2) {
            let (before, next) = (pair[0], pair[1]);
            let last = pieces[pieces.len() - 1];
            let mut tick = if before.running && next.running {
                // Exactly the beats between them.
                i128::from(last.tick) + (i128::from(next.start_beat) - i128::from(before.start_beat)) * i128::from(ppq)
                    - ticks_in(i128::from(last.offset_nanos) - i128::from(before.offset_nanos), before.tempo, ppq)
            } else {
                i128::from(last.tick)
                    + ticks_in(i128::from(next.offset_nanos) - i128::from(last.offset_nanos), last.tempo, ppq)
            };
            if next.running && !before.running {
                let (grid_tick, bar) = grid;
                let into = (tick - grid_tick).rem_euclid(bar);
                if into != 0 {
                    tick += bar - into;
                }
            }
            if next.running {
                grid = (tick, i128::from(next.beats_per_bar.max(1)) * i128::from(ppq));
            }
            pieces.push(Piece {
                offset_nanos: next.offset_nanos,
                tick: tick_u64(tick),
                tempo: next.tempo,
                beats_per_bar: next.beats_per_bar,
                running: next.running,
            });
        }
        Self { ppq, pieces }
    }

    /// Ticks per beat.
    pub fn ppq(&self) -> u16 {
        self.ppq
    }

    /// The stretches, in order: a tempo change at each, a meter change at each running one.
    pub fn pieces(&self) -> &[Piece] {
        &self.pieces
    }

    /// The tick of the instant `offset_nanos` from the take's start.
    pub fn tick_at(&self, offset_nanos: i64) -> u64 {
        let i = self.pieces.iter().rposition(|p| p.offset_nanos <= offset_nanos).unwrap_or(0);
        let piece = self.pieces[i];
        let tick = i128::from(piece.tick)
            + ticks_in(i128::from(offset_nanos) - i128::from(piece.offset_nanos), piece.tempo, self.ppq);
        // A note late in a stopped stretch stays before the next start, moved on to its bar.
        let tick = match self.pieces.get(i + 1) {
            Some(next) => tick.min(i128::from(next.tick)),
            None => tick,
        };
        tick_u64(tick)
    }
}

/// `ticks` at `tempo` as nanoseconds, rounded to the nearest.
fn nanos_of(ticks: i128, tempo: MicroBpm, ppq: u16) -> i64 {
    let scaled = ticks * NANOS_PER_BEAT_AT_ONE_MICRO_BPM;
    let per = i128::from(tempo.0.max(1)) * i128::from(ppq);
    let nanos = if scaled >= 0 { (scaled + per / 2) / per } else { -((-scaled + per / 2) / per) };
    nanos.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(offset_ms: i64, start_beat: i64, bpm: u32, bpb: u8, running: bool) -> TakeSegment {
        TakeSegment {
            offset_nanos: offset_ms * 1_000_000,
            start_beat,
            tempo: MicroBpm::from_bpm(bpm),
            beats_per_bar: bpb,
            running,
            count_in_bars: 0,
        }
    }

    #[test]
    fn later_epochs_replace_what_they_announce_and_the_history_is_clipped_to_the_take() {
        // Epoch 1: 120 BPM running since before the take. Epoch 2: a change to 90 at 4 s.
        // Epoch 3 (made at 3 s, before that took effect): instead a change to 60 at 6 s.
        let timelines = vec![
            (3, vec![seg(-1_000, 0, 120, 4, true), seg(6_000, 14, 60, 4, true)]),
            (1, vec![seg(-1_000, 0, 120, 4, true)]),
            (2, vec![seg(-1_000, 0, 120, 4, true), seg(4_000, 10, 90, 4, true)]),
            (4, vec![seg(6_000, 14, 60, 4, true), seg(20_000, 28, 60, 4, false)]),
        ];
        let h = history(&timelines, 10_000_000_000);
        assert_eq!(h, vec![seg(-1_000, 0, 120, 4, true), seg(6_000, 14, 60, 4, true)]);
    }

    #[test]
    fn running_ticks_are_beats_from_the_downbeat_before_the_start() {
        // 120 BPM (500 ms a beat) in 3/4 since 2.2 s before the take: the downbeat before the
        // start is beat 3 (1.5 s in), at -0.7 s.
        let map = TickMap::new(&[seg(-2_200, 0, 120, 3, true), seg(2_300, 9, 60, 3, true)], 480);
        assert_eq!(map.pieces()[0].offset_nanos, -700_000_000);
        assert_eq!(map.tick_at(-700_000_000), 0);
        // The take's start is 0.7 s after that downbeat: 1.4 beats.
        assert_eq!(map.tick_at(0), 672);
        // The change at beat 9 is 6 beats after the origin (beat 3).
        assert_eq!(map.pieces()[1].tick, 6 * 480);
        // Half a beat at 60 BPM after it.
        assert_eq!(map.tick_at(2_800_000_000), 6 * 480 + 240);
    }

    #[test]
    fn a_start_after_a_stop_lands_on_a_bar_line() {
        // Stopped at 120 BPM in 4/4 from the take's start; the beat starts at 1.3 s (2.6
        // beats of real time later): moved on to the next bar line, tick 4 * 480.
        let map = TickMap::new(&[seg(-5_000, 0, 120, 4, false), seg(1_300, 0, 100, 4, true)], 480);
        assert_eq!(map.pieces()[1].tick, 1_920);
        // A note in the stopped stretch keeps its real time; one after the start counts beats.
        assert_eq!(map.tick_at(250_000_000), 240);
        assert_eq!(map.tick_at(1_300_000_000 + 600_000_000), 1_920 + 480);
    }
}
